"""The paper's evaluation protocol on our model (Stable-SAM, ICLR 2025, Tables 1, 5 and 6).

On the held-out synthetic split: per object and prompt type, ``n_prompts`` (20) random prompts —
GT box (deterministic: one prompt), noisy box (noise scale 0.4, IoU ≥ 0.5 to the GT box), 1, 3,
5 and 10 positive points. Metrics at the original image size, in percent: mIoU, mBIoU (boundary
IoU, HQ-SAM's definition) and ST (stability over the prompts of one object). Every model sees the
same prompts; all share the frozen base encoder, so each image is embedded once.

Rows: SAM (the mini base), Stable-SAM (the shipped plugins), the ablations of paper Table 5
(DSP without RTS, DSP + RTS, DSP + DRP + RTS), DT-SAM (decoder fine-tuned with RTS), the mean
routing weight α1 per prompt type (appendix Table 6), and a multimask study (single output vs
best of 3 vs the predictor's ``auto`` policy).

    python -m training.benchmark --out docs/benchmark --n-images 40 --train-missing

Trained ablation models are cached under ``runs/benchmark/`` (gitignored), named by variant,
number of training images and base hash, so a re-run only evaluates.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stable_sam import (
    PluginMismatchError,
    StableSamPredictor,
    build_stable_sam,
    default_model_paths,
    file_sha256,
    metrics,
    prompts,
)
from stable_sam.modeling import StableSamPlugins
from stable_sam.transforms import low_res_to_original
from training.data import Sample

logger = logging.getLogger(__name__)

EVAL_KINDS = ("gt_box", "noisy_box", "points_1", "points_3", "points_5", "points_10")
KIND_TITLES = {
    "gt_box": "GT box",
    "noisy_box": "Noisy box",
    "points_1": "1 point",
    "points_3": "3 points",
    "points_5": "5 points",
    "points_10": "10 points",
}
# JSON key -> (table title, training variant or None for models not trained here).
MODEL_ROWS = {
    "sam": ("SAM (mini base)", None),
    "stable_sam": ("Stable-SAM (DSP+DRP+RTS, shipped plugins)", None),
    "dsp_no_rts": ("DSP w/o RTS (Table 5)", "dsp-no-rts"),
    "dsp_rts": ("DSP + RTS (Table 5)", "dsp"),
    "dsp_drp_rts": ("DSP + DRP + RTS (Table 5)", "stable"),
    "dt_sam": ("DT-SAM (decoder fine-tuned, RTS)", "dt-sam"),
}


@dataclass
class ObjectPrompts:
    """The prompts of one object: boxes (n, 4) per box kind, points (n, k, 2) per point kind."""

    boxes: dict[str, np.ndarray] = field(default_factory=dict)
    points: dict[str, np.ndarray] = field(default_factory=dict)


def object_prompts(
    mask: np.ndarray, rng: np.random.Generator, n_prompts: int, image_hw: tuple[int, int]
) -> ObjectPrompts:
    """The protocol's prompts for one (H, W) object mask, in original-image pixels."""
    box = prompts.gt_box(mask)
    out = ObjectPrompts()
    out.boxes["gt_box"] = box[None]
    noisy = []
    for _ in range(n_prompts):
        try:
            noisy.append(prompts.noisy_box(box, rng, 0.4, (0.5, 1.0), image_size=image_hw))
        except ValueError:  # a degenerate box: no noisy draw lands in the IoU range
            noisy.append(box)
    out.boxes["noisy_box"] = np.stack(noisy)
    for k in (1, 3, 5, 10):
        out.points[f"points_{k}"] = np.stack(
            [prompts.sample_points(mask, k, rng) for _ in range(n_prompts)]
        )
    return out


# ----------------------------------------------------------------------------- scoring


def score_object(
    gt_mask: np.ndarray, logits: np.ndarray, side: int, d_full: int
) -> tuple[float, float, float]:
    """mIoU, mBIoU and ST (fractions) of B predictions (B, S/4, S/4) logits for one object.

    Masks are the logits upsampled to the original size, as the predictor returns them; the
    metrics are computed inside the bounding box of the GT and every prediction, grown by 1 px
    (the same numbers as on the full image, at a fraction of the cost). ``d_full``: the boundary
    width of the full image (``metrics.boundary_dilation``).
    """
    hw = gt_mask.shape
    full = [low_res_to_original(lg, hw, side) > 0 for lg in logits]
    ys, xs = np.nonzero(np.logical_or.reduce([gt_mask, *full]))
    y0, y1 = max(0, int(ys.min()) - 1), min(hw[0], int(ys.max()) + 2)
    x0, x1 = max(0, int(xs.min()) - 1), min(hw[1], int(xs.max()) + 2)
    preds = [m[y0:y1, x0:x1] for m in full]
    gt = gt_mask[y0:y1, x0:x1]
    # Same band width as on the full image: ratio chosen so round(ratio · crop diag) = d_full.
    ratio = d_full / float(np.hypot(*gt.shape))
    ious = [metrics.mask_iou(p, gt) for p in preds]
    bious = [metrics.boundary_iou(p, gt, dilation_ratio=ratio) for p in preds]
    return float(np.mean(ious)), float(np.mean(bious)), metrics.stability(preds)


class Accumulator:
    """Per-object scores of one model, by prompt type; reduced to percent means."""

    def __init__(self) -> None:
        self.scores: dict[str, list[tuple[float, float, float]]] = {}
        self.alpha1: dict[str, list[float]] = {}

    def add(self, kind: str, score: tuple[float, float, float], alpha: np.ndarray | None) -> None:
        self.scores.setdefault(kind, []).append(score)
        if alpha is not None:
            self.alpha1.setdefault(kind, []).extend(float(a) for a in alpha[:, 0])

    def table(self) -> dict[str, dict[str, float]]:
        out = {}
        for kind in EVAL_KINDS:
            if kind in self.scores:
                s = np.array(self.scores[kind]) * 100
                out[kind] = {
                    "miou": round(float(s[:, 0].mean()), 2),
                    "mbiou": round(float(s[:, 1].mean()), 2),
                    "st": round(float(s[:, 2].mean()), 2),
                }
        return out

    def mean_alpha1(self) -> dict[str, float]:
        return {k: round(float(np.mean(v)), 4) for k, v in self.alpha1.items()}


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalModel:
    """A model row: a predictor, and the plugin set to decode with (None: the model's own)."""

    key: str
    predictor: StableSamPredictor
    plugins: StableSamPlugins | None = None


def evaluate(
    models: Sequence[EvalModel],
    dataset: Sequence[Sample],
    n_prompts: int = 20,
    max_objects: int | None = None,
    seed: int = 0,
    multimask_study: Sequence[str] = (),
    progress: bool = False,
) -> dict:
    """Run the protocol; returns the benchmark JSON (``models``, ``alpha1``, ``multimask``, ``meta``).

    All models must share the base encoder: the first model's predictor embeds each image.
    ``multimask_study`` lists model keys for which single, best-of-3 and auto are compared.
    """
    acc = {m.key: Accumulator() for m in models}
    mm = {k: {p: Accumulator() for p in ("single", "best", "auto")} for k in multimask_study}
    encoder = models[0].predictor
    n_objects = 0
    start = time.perf_counter()
    iterator = range(len(dataset))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="benchmark", unit="image")
    for index in iterator:
        sample = dataset[index]
        if sample.num_instances == 0:
            continue
        rng = np.random.default_rng([seed, index])
        objects = np.arange(sample.num_instances)
        if max_objects is not None and objects.size > max_objects:
            objects = np.sort(rng.choice(objects, max_objects, replace=False))
        hw = sample.image.shape[:2]
        d_full = metrics.boundary_dilation(hw)
        per_object = [object_prompts(sample.masks[o], rng, n_prompts, hw) for o in objects]
        n_objects += len(objects)
        embedding = encoder.embed(sample.image)
        for m in models:
            side = m.predictor.model.image_size
            for kind in EVAL_KINDS:
                logits, alpha = _decode_kind(m, embedding, per_object, kind, False)
                for j, o in enumerate(objects):
                    lg = logits[j][:, 0]
                    acc[m.key].add(
                        kind,
                        score_object(sample.masks[o], lg, side, d_full),
                        None if alpha is None else alpha[j],
                    )
                if m.key in mm:
                    best, _ = _decode_kind(m, embedding, per_object, kind, True)
                    for j, o in enumerate(objects):
                        single_s = score_object(sample.masks[o], logits[j][:, 0], side, d_full)
                        best_s = score_object(sample.masks[o], best[j][:, 0], side, d_full)
                        mm[m.key]["single"].add(kind, single_s, None)
                        mm[m.key]["best"].add(kind, best_s, None)
                        mm[m.key]["auto"].add(
                            kind, best_s if kind == "points_1" else single_s, None
                        )
    wall = time.perf_counter() - start
    return {
        "models": {m.key: acc[m.key].table() for m in models},
        "alpha1": {m.key: acc[m.key].mean_alpha1() for m in models if acc[m.key].alpha1},
        "multimask": {k: {p: a.table() for p, a in v.items()} for k, v in mm.items()},
        "meta": {
            "images": len(dataset),
            "objects": n_objects,
            "prompts_per_object_and_type": n_prompts,
            "max_objects_per_image": max_objects,
            "seed": seed,
            "wall_s": round(wall, 1),
        },
    }


def _decode_kind(
    m: EvalModel, embedding, per_object: Sequence[ObjectPrompts], kind: str, best_of_three: bool
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Decode every object's prompts of one kind in a single batch; split back per object."""
    if kind in per_object[0].boxes:
        arrays = [p.boxes[kind] for p in per_object]
        batch = m.predictor.predict_batch(
            embedding=embedding,
            boxes_xyxy=np.concatenate(arrays),
            multimask_output=best_of_three,
            best_of_three=best_of_three,
            plugins=m.plugins,
            return_masks=False,
        )
    else:
        arrays = [p.points[kind] for p in per_object]
        coords = np.concatenate(arrays)
        batch = m.predictor.predict_batch(
            embedding=embedding,
            point_coords=coords,
            point_labels=np.ones(coords.shape[:2], dtype=np.int64),
            multimask_output=best_of_three,
            best_of_three=best_of_three,
            plugins=m.plugins,
            return_masks=False,
        )
    splits = np.cumsum([len(a) for a in arrays])[:-1]
    logits = np.split(batch.low_res_logits, splits)
    alpha = None if batch.alpha is None else np.split(batch.alpha, splits)
    return logits, alpha


# ----------------------------------------------------------------------------- reports


def markdown_report(result: dict, notes: Sequence[str] = ()) -> str:
    """The benchmark JSON as markdown tables (values in percent)."""
    lines = ["# Benchmark: the Stable-SAM paper's protocol on the mini SAM", ""]
    meta = result["meta"]
    lines.append(
        f"Held-out synthetic scenes: {meta['images']} images, {meta['objects']} objects; "
        f"{meta['prompts_per_object_and_type']} prompts per object and prompt type "
        f"(GT box: 1); metrics in percent at the original resolution."
    )
    lines += ["", *notes, ""] if notes else [""]
    kinds = [k for k in EVAL_KINDS if any(k in t for t in result["models"].values())]
    for metric, title in (("miou", "mIoU"), ("mbiou", "mBIoU"), ("st", "ST")):
        lines += [f"## {title}", ""]
        lines.append("| model | " + " | ".join(KIND_TITLES[k] for k in kinds) + " |")
        lines.append("|---|" + "---|" * len(kinds))
        for key, table in result["models"].items():
            name = MODEL_ROWS.get(key, (key, None))[0]
            cells = [f"{table[k][metric]:.1f}" if k in table else "–" for k in kinds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if result.get("alpha1"):
        lines += ["## Mean routing weight α1 (appendix Table 6)", ""]
        lines.append("| model | " + " | ".join(KIND_TITLES[k] for k in kinds) + " |")
        lines.append("|---|" + "---|" * len(kinds))
        for key, a in result["alpha1"].items():
            name = MODEL_ROWS.get(key, (key, None))[0]
            lines.append(
                f"| {name} | " + " | ".join(f"{a[k]:.3f}" if k in a else "–" for k in kinds) + " |"
            )
        lines.append("")
    for key, policies in result.get("multimask", {}).items():
        name = MODEL_ROWS.get(key, (key, None))[0]
        lines += [f"## Multimask policy study: {name} (mIoU / ST)", ""]
        lines.append("| policy | " + " | ".join(KIND_TITLES[k] for k in kinds) + " |")
        lines.append("|---|" + "---|" * len(kinds))
        for policy, table in policies.items():
            cells = [
                f"{table[k]['miou']:.1f} / {table[k]['st']:.1f}" if k in table else "–"
                for k in kinds
            ]
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- models


def variant_path(cache_dir: Path, variant: str, n_train: int, base_sha: str) -> Path:
    suffix = "decoder" if variant == "dt-sam" else "plugins"
    return cache_dir / f"{variant}-n{n_train}-{base_sha[:12]}.{suffix}.safetensors"


def train_variant(
    variant: str,
    base: Path,
    model_type: str,
    n_train: int,
    out: Path,
    max_steps: int | None,
    seed: int = 0,
    device: str | None = None,
) -> None:
    """Train one ablation variant on ``n_train`` synthetic train scenes into ``out``: the file
    ``python -m training.train --variant VARIANT --data synthetic --n N_TRAIN`` writes."""
    from training.baselines import VARIANTS
    from training.scenes import SceneDataset

    setup = VARIANTS[variant]
    dataset = SceneDataset("train", n_train)
    model = setup.build_model(model_type, base, device)
    config = setup.train_config(seed=seed, max_steps=max_steps, device=device)
    result = setup.train(model, dataset, config)
    result.summary.update({"variant": variant, "data": "synthetic", "base": base.name})
    setup.save(model, out, {"version": f"{variant}-seed{seed}", "training_summary": result.summary})


def build_rows(args: argparse.Namespace) -> tuple[list[EvalModel], list[str]]:
    """The model rows that exist (training missing ablations when asked); notes for the table."""
    from stable_sam.checkpoint import read_plugins
    from training.baselines import load_decoder

    base = Path(args.base)
    base_sha = file_sha256(base)
    device = args.device
    notes: list[str] = []
    sam = build_stable_sam(args.model_type, base, plugins=False, device=device)
    sam_pred = StableSamPredictor(sam)
    rows = [EvalModel("sam", sam_pred)]
    stable = build_stable_sam(args.model_type, base, plugins=True, device=device)
    stable_pred = StableSamPredictor(stable, cache=sam_pred.cache)

    def plugin_row(key: str, path: Path) -> None:
        try:
            plugins, meta = read_plugins(stable, path)
        except PluginMismatchError as exc:
            notes.append(f"- `{key}` skipped: {exc}")
            return
        summary = json.loads(meta.get("training_summary", "{}"))
        notes.append(
            f"- `{key}`: `{path.name}` trained on {summary.get('images', '?')} images, "
            f"{summary.get('steps', '?')} steps"
        )
        rows.append(EvalModel(key, stable_pred, plugins))

    plugin_file = Path(args.plugins) if args.plugins else default_model_paths().plugin_checkpoint
    if plugin_file.is_file():
        plugin_row("stable_sam", plugin_file)
    else:
        notes.append(f"- `stable_sam` skipped: no plugin file {plugin_file}")

    cache_dir = Path(args.cache_dir)
    for key, (_title, variant) in MODEL_ROWS.items():
        if variant is None or key not in args.models:
            continue
        path = variant_path(cache_dir, variant, args.ablation_n, base_sha)
        if not path.is_file():
            if not args.train_missing:
                notes.append(f"- `{key}` skipped: not trained ({path}; use --train-missing)")
                continue
            logger.info("training missing variant %s -> %s", variant, path)
            train_variant(
                variant,
                base,
                args.model_type,
                args.ablation_n,
                path,
                args.train_max_steps,
                device=device,
            )
        if variant == "dt-sam":
            dt = build_stable_sam(args.model_type, base, plugins=False, device=device)
            meta = load_decoder(dt, path)
            summary = json.loads(meta.get("training_summary", "{}"))
            notes.append(
                f"- `{key}`: `{path.name}` trained on {summary.get('images', '?')} images, "
                f"{summary.get('steps', '?')} steps"
            )
            rows.append(EvalModel(key, StableSamPredictor(dt, cache=sam_pred.cache)))
        else:
            plugin_row(key, path)
    return rows, notes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    paths = default_model_paths()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .md and .json")
    parser.add_argument("--base", default=str(paths.base_checkpoint))
    parser.add_argument("--model-type", default=paths.model_type)
    parser.add_argument("--plugins", default=None, help="Stable-SAM plugins (default: shipped)")
    parser.add_argument("--n-images", type=int, default=40, help="held-out images")
    parser.add_argument("--n-prompts", type=int, default=20, help="prompts per object and type")
    parser.add_argument("--max-objects", type=int, default=None, help="objects per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--cache-dir", default="runs/benchmark")
    parser.add_argument("--ablation-n", type=int, default=300, help="training images per variant")
    parser.add_argument("--train-missing", action="store_true")
    parser.add_argument("--train-max-steps", type=int, default=None)
    parser.add_argument(
        "--models",
        nargs="*",
        default=[k for k, (_t, v) in MODEL_ROWS.items() if v is not None],
        help="ablation rows to include",
    )
    parser.add_argument("--multimask-study", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see docs)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.n_prompts, args.max_objects = 2, 3, 2
        args.ablation_n = min(args.ablation_n, 4)
        args.train_max_steps = 1
    return args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from training.scenes import SceneDataset

    rows, notes = build_rows(args)
    dataset = SceneDataset("heldout", args.n_images)
    study = ("sam", "stable_sam") if args.multimask_study else ()
    study = tuple(k for k in study if any(r.key == k for r in rows))
    result = evaluate(
        rows,
        dataset,
        n_prompts=args.n_prompts,
        max_objects=args.max_objects,
        seed=args.seed,
        multimask_study=study,
        progress=not args.no_progress,
    )
    result["meta"]["base"] = Path(args.base).name
    result["meta"]["command"] = "python -m training.benchmark " + " ".join(
        argv if argv is not None else _argv()
    )
    notes = [*notes, f"- Command: `{result['meta']['command']}`"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    report = markdown_report(result, notes)
    (args.out / "benchmark.md").write_text(report + "\n")
    print(report)
    return result


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


__all__ = [
    "EVAL_KINDS",
    "MODEL_ROWS",
    "EvalModel",
    "evaluate",
    "main",
    "markdown_report",
    "object_prompts",
    "score_object",
]

if __name__ == "__main__":
    main()
