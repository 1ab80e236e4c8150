"""Boxes and clicks on held-out real-picture composites: GrabCut, the filled box, SAM, Stable-SAM.

The question of the stronger-base issue: does the embedded base beat OpenCV's GrabCut on real
pictures, and do the plugins add what the paper says? On ``training.composites``' held-out
split (pictures none of the training composites use), every row gets the same prompts,
``training.evaluation``'s: per object the GT box, ``n_prompts`` noisy boxes (noise 0.4, IoU >=
0.5 to the GT box) and ``n_prompts`` draws of 1, 3 and 5 positive clicks. Rows:

- GrabCut (``training.box_baselines.GrabCut``, 5 iterations, at <= 512 px on the long side):
  from a box ``GC_INIT_WITH_RECT``; from a click in its click mode (the click a disk of sure
  foreground, the rest probably background), on the boxes and the single click;
- the filled box (the floor), on the boxes;
- per ``--model`` pair (default: the embedded default), SAM (the base alone) and Stable-SAM
  (its plugins), single-mask output, through ``training.evaluation.evaluate``; with the mean
  DRP routing weight α1 per prompt type (the paper's Fig. 5: it should fall as clicks are
  added).

Scores through ``training.evaluation.score_object`` / ``summarize``: mIoU, mBIoU and ST in
percent at the original resolution.

    python -m training.real_benchmark --n-images 20 --out docs/benchmark
    python -m training.real_benchmark --model old mini OLD_BASE OLD_PLUGINS \\
        --model new mini_512 NEW_BASE NEW_PLUGINS

writes ``real_composites.json`` and ``.md`` (``--name``) in ``--out`` (when given) and prints
the table. ``--data synthetic`` runs the same rows on the held-out synthetic scenes instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from runtime.logs import configure_logging
from stable_sam import default_model_paths
from stable_sam.build import file_sha256
from training import evaluation
from training.box_baselines import GrabCut, filled_box
from training.data import Sample
from training.evaluation import KIND_TITLES, EvalModel, ModelScores, score_object, summarize

logger = logging.getLogger(__name__)

BOX_KINDS = ("gt_box", "noisy_box")
# Every row's prompt types: the boxes and one click (the targets); the models also get
# 3 and 5 clicks, for whether the routing weight alpha1 falls as points are added.
KINDS = (*BOX_KINDS, "points_1")
MODEL_KINDS = (*KINDS, "points_3", "points_5")
BASELINE_KEYS = ("grabcut", "filled_box")  # the rows no model makes
ROW_TITLES = {
    "grabcut": "GrabCut (box / click, 5 iterations)",
    "filled_box": "Filled box (floor)",
    "sam": "SAM",
    "stable_sam": "Stable-SAM",
}


def row_title(key: str) -> str:
    """``sam`` -> "SAM"; ``stable_sam:new base`` -> "Stable-SAM (new base)"."""
    name, _, label = key.partition(":")
    title = ROW_TITLES.get(name, name)
    return f"{title} ({label})" if label else title


def evaluate_baselines(
    dataset: Sequence[Sample],
    kinds: Sequence[str] = KINDS,
    n_prompts: int = 20,
    max_objects: int | None = None,
    seed: int = 0,
    prompt_kinds: Sequence[str] = MODEL_KINDS,
) -> dict[str, ModelScores]:
    """GrabCut (from a box: ``GrabCut.segment``; from clicks: ``segment_clicks``) on ``kinds``
    and the filled box on the box kinds among them, on the protocol's prompts:
    ``evaluation.image_prompts`` drawn for ``prompt_kinds``, the kinds the models are
    evaluated on with the same other arguments, so both see the same prompts."""
    scores = {key: ModelScores() for key in BASELINE_KEYS}
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample.num_instances == 0:
            continue
        objects, per_object = evaluation.image_prompts(
            sample, index, seed, n_prompts, max_objects, prompt_kinds
        )
        grabcut = GrabCut(sample.image)
        hw = sample.image.shape[:2]
        for kind in kinds:
            for o, prompts in zip(objects, per_object, strict=True):
                gt = sample.masks[o]
                if kind in BOX_KINDS:
                    boxes = prompts.by_kind[kind]
                    cut = np.stack([grabcut.segment(b) for b in boxes])
                    filled = np.stack([filled_box(b, hw) for b in boxes])
                    scores["filled_box"].objects.setdefault(kind, []).append(
                        score_object(gt, filled)
                    )
                else:
                    points = prompts.by_kind[kind]  # (n, k, 2), all positive
                    positive = np.ones(points.shape[1], bool)
                    cut = np.stack([grabcut.segment_clicks(p, positive) for p in points])
                scores["grabcut"].objects.setdefault(kind, []).append(score_object(gt, cut))
    return scores


def percent_table(scores: ModelScores) -> dict[str, dict[str, float]]:
    """Per kind: mIoU, mBIoU and ST in percent, and the mean routing weight alpha1 (0-1) of a
    model with plugins."""
    out = {}
    for kind, objects in scores.objects.items():
        summary = summarize(objects)
        out[kind] = {m: round(100 * summary[m], 2) for m in ("miou", "mbiou", "st")}
        if scores.alpha1.get(kind):
            out[kind]["alpha1"] = round(float(np.mean(scores.alpha1[kind])), 4)
    return out


def markdown_table(result: dict) -> str:
    """mIoU per row and prompt type, mBIoU of the boxes, ST of the noisy box and the click, in
    percent; then, for the models, mIoU and alpha1 with more clicks."""
    models = result["models"]
    kinds = [k for k in KINDS if k in result["meta"]["kinds"]]

    def cell(table: dict, kind: str, metric: str) -> str:
        value = table.get(kind, {}).get(metric)
        return "–" if value is None else f"{value:.1f}"

    columns = [(k, "miou", f"{KIND_TITLES[k]} mIoU") for k in kinds]
    columns += [(k, "mbiou", f"{KIND_TITLES[k]} mBIoU") for k in kinds if k in BOX_KINDS]
    columns += [(k, "st", f"{KIND_TITLES[k]} ST") for k in ("noisy_box", "points_1") if k in kinds]
    lines = [
        "| model | " + " | ".join(title for _, _, title in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key, table in models.items():
        cells = [cell(table, kind, metric) for kind, metric, _ in columns]
        lines.append(f"| {row_title(key)} | " + " | ".join(cells) + " |")
    more = [k for k in result["meta"]["kinds"] if k not in KINDS]
    if more:
        alpha_kinds = list(result["meta"]["kinds"])
        lines += [
            "",
            "| model | " + " | ".join(f"{KIND_TITLES[k]} mIoU" for k in more) + " | "
            + " | ".join(f"α1 {KIND_TITLES[k]}" for k in alpha_kinds) + " |",
            "|---|" + "---|" * (len(more) + len(alpha_kinds)),
        ]  # fmt: skip
        for key, table in models.items():
            if key in BASELINE_KEYS:
                continue
            cells = [cell(table, k, "miou") for k in more]
            cells += [
                "–" if "alpha1" not in table.get(k, {}) else f"{table[k]['alpha1']:.3f}"
                for k in alpha_kinds
            ]
            lines.append(f"| {row_title(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class ModelPair:
    """A base and its plugins, evaluated as two rows: SAM (the base alone) and Stable-SAM."""

    label: str
    model_type: str
    base: str
    plugins: str


def pair_rows(pairs: Sequence[ModelPair], device: str | None = None) -> list[EvalModel]:
    """SAM and Stable-SAM of each pair, single-mask output (the paper's tables), the two of a
    pair sharing one embedding cache. Keys ``sam`` / ``stable_sam``, suffixed ``:label`` when
    there is more than one pair."""
    from stable_sam import StableSamPredictor, build_stable_sam

    labels = [pair.label for pair in pairs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must differ, got {labels}")
    rows = []
    for pair in pairs:
        suffix = f":{pair.label}" if len(pairs) > 1 else ""
        sam = build_stable_sam(pair.model_type, pair.base, plugins=False, device=device)
        stable = build_stable_sam(
            pair.model_type, pair.base, plugin_checkpoint=pair.plugins, device=device
        )
        sam_pred = StableSamPredictor(sam, multimask_policy="single")
        stable_pred = StableSamPredictor(stable, cache=sam_pred.cache, multimask_policy="single")
        rows += [EvalModel("sam" + suffix, sam_pred), EvalModel("stable_sam" + suffix, stable_pred)]
    return rows


def load_dataset(data: str, n_images: int, size_range: tuple[int, int]) -> list[Sample]:
    """The held-out images, rendered once (every row reads them)."""
    if data == "composites":
        from training.composites import CompositeDataset

        dataset: Sequence[Sample] = CompositeDataset("heldout", n_images, size_range)
    else:
        from training.scenes import SceneDataset

        dataset = SceneDataset("heldout", n_images, size_range)
    return [dataset[i] for i in range(len(dataset))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("composites", "synthetic"), default="composites")
    parser.add_argument("--n-images", type=int, default=20, help="held-out images")
    parser.add_argument("--n-prompts", type=int, default=5, help="noisy boxes / clicks per object")
    parser.add_argument("--max-objects", type=int, default=5, help="objects per image")
    parser.add_argument("--size-range", type=int, nargs=2, default=(256, 1024))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model", nargs=4, action="append", metavar=("LABEL", "MODEL_TYPE", "BASE", "PLUGINS"),
        help="a base and its plugins (repeatable; default: the embedded default)",
    )  # fmt: skip
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="folder for the .json and .md")
    parser.add_argument("--name", default=None, help="file name (default: real_composites)")
    parser.add_argument(
        "--baselines-from", type=Path, default=None,
        help="take GrabCut's and the filled box's rows from this earlier run's .json (same "
             "data, images, prompts and seed; checked) instead of computing them again",
    )  # fmt: skip
    return parser.parse_args(argv)


# What must agree for an earlier run's baseline rows to be this run's.
SAME_RUN_KEYS = (
    "data", "images", "kinds", "prompts_per_object", "max_objects_per_image", "size_range", "seed",
    "samples_sha256",
)  # fmt: skip


def samples_sha256(samples: Sequence[Sample]) -> str:
    """A hash of the rendered images and their masks: two runs with the same one scored the
    same pixels (whatever changed in the renderer, the catalogue or the pictures)."""
    digest = hashlib.sha256()
    for sample in samples:
        for array in (sample.image, sample.masks):
            digest.update(repr((array.shape, array.dtype.str)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def reused_baselines(path: Path, meta: dict) -> dict[str, dict]:
    """The baseline rows of the earlier run at ``path``, refused (ValueError naming the field)
    unless it ran on the same images and prompts as ``meta`` describes."""
    earlier = json.loads(path.read_text())
    for key in SAME_RUN_KEYS:
        if earlier["meta"].get(key) != meta[key]:
            raise ValueError(
                f"{path}: its {key} is {earlier['meta'].get(key)!r}, this run's {meta[key]!r}"
            )
    return {key: earlier["models"][key] for key in BASELINE_KEYS}


def main(argv: list[str] | None = None) -> dict:
    configure_logging("INFO")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    paths = default_model_paths()
    pairs = [ModelPair(*m) for m in args.model] if args.model else [
        ModelPair("embedded default", paths.model_type, str(paths.base_checkpoint),
                  str(paths.plugin_checkpoint))
    ]  # fmt: skip
    samples = load_dataset(args.data, args.n_images, tuple(args.size_range))
    walls: dict[str, float] = {}
    meta = {
        "data": f"{args.data} (held-out)",
        "images": len(samples),
        "kinds": list(MODEL_KINDS),
        "prompts_per_object": args.n_prompts,
        "max_objects_per_image": args.max_objects,
        "size_range": list(args.size_range),
        "seed": args.seed,
        "samples_sha256": samples_sha256(samples),
    }

    if args.baselines_from is not None:
        tables = reused_baselines(args.baselines_from, meta)
        meta["baselines_from"] = str(args.baselines_from)
    else:
        start = time.perf_counter()
        baselines = evaluate_baselines(
            samples, KINDS, args.n_prompts, args.max_objects, args.seed, MODEL_KINDS
        )
        walls["grabcut_and_filled_box"] = round(time.perf_counter() - start, 1)
        tables = {key: percent_table(s) for key, s in baselines.items()}

    rows = pair_rows(pairs, args.device)
    start = time.perf_counter()
    models = evaluation.evaluate(
        rows, samples, MODEL_KINDS, args.n_prompts, args.max_objects, args.seed
    )
    walls["models"] = round(time.perf_counter() - start, 1)

    first = next(iter(models.values())).objects.get("gt_box", [])
    result = {
        "models": {**tables, **{key: percent_table(s) for key, s in models.items()}},
        "meta": {
            **meta,
            "objects": len(first),
            "pairs": [vars(p) | {"base_sha256": file_sha256(p.base)} for p in pairs],
            "wall_s": walls,
            "command": "python -m training.real_benchmark "
            + shlex.join(argv if argv is not None else _argv()),
        },
    }
    report = "\n".join(
        [
            f"{result['meta']['data']}: {len(samples)} images, {len(first)} objects, GT box, "
            f"{args.n_prompts} noisy boxes and {args.n_prompts} draws of 1 / 3 / 5 clicks per "
            "object; percent (α1: mean routing weight, 0-1).",
            "",
            markdown_table(result),
            "",
            "Models: "
            + "; ".join(f"{p.label}: {p.model_type} `{Path(p.base).name}` + "
                        f"`{Path(p.plugins).name}`" for p in pairs),
            "",
            f"Command: `{result['meta']['command']}`",
        ]
    )  # fmt: skip
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = args.name or ("real_composites" if args.data == "composites" else "synthetic_boxes")
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(report + "\n")
    print(report)
    return result


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


__all__ = [
    "BOX_KINDS",
    "KINDS",
    "MODEL_KINDS",
    "ModelPair",
    "evaluate_baselines",
    "main",
    "markdown_table",
    "pair_rows",
]

if __name__ == "__main__":
    main()
