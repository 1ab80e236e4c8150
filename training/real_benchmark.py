"""Box prompts on held-out real-picture composites: GrabCut, the filled box, SAM, Stable-SAM.

The question of the stronger-base issue: does the embedded base beat OpenCV's GrabCut on real
pictures? On ``training.composites``' held-out split (pictures none of the training
composites use), every row gets the same prompts, ``training.evaluation``'s: per object the GT
box and ``n_prompts`` noisy boxes (noise 0.4, IoU >= 0.5 to the GT box). Rows:

- GrabCut from the box (``training.box_baselines.GrabCut``: ``GC_INIT_WITH_RECT``, 5
  iterations, run at <= 512 px on the long side);
- the filled box (the floor);
- SAM (the mini base) and Stable-SAM (the shipped plugins), single-mask output, through
  ``training.benchmark.build_rows`` and ``training.evaluation.evaluate``.

Scores through ``training.evaluation.score_object`` / ``summarize``: mIoU, mBIoU and ST in
percent at the original resolution.

    python -m training.real_benchmark --n-images 20 --out docs/benchmark

writes ``real_composites.json`` and ``.md`` in ``--out`` (when given) and prints the table.
``--data synthetic`` runs the same rows on the held-out synthetic scenes instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from runtime.logs import configure_logging
from stable_sam import default_model_paths
from training import evaluation
from training.box_baselines import GrabCut, filled_box
from training.data import Sample
from training.evaluation import KIND_TITLES, ModelScores, score_object, summarize

logger = logging.getLogger(__name__)

BOX_KINDS = ("gt_box", "noisy_box")
ROW_TITLES = {
    "grabcut": "GrabCut (box, 5 iterations)",
    "filled_box": "Filled box (floor)",
    "sam": "SAM (mini base)",
    "stable_sam": "Stable-SAM (shipped plugins)",
}


def evaluate_box_baselines(
    dataset: Sequence[Sample],
    kinds: Sequence[str] = BOX_KINDS,
    n_prompts: int = 20,
    max_objects: int | None = None,
    seed: int = 0,
) -> dict[str, ModelScores]:
    """GrabCut and the filled box on the protocol's box prompts (``evaluation.image_prompts``
    with the same arguments as ``evaluation.evaluate``, so the prompts are the models')."""
    scores = {"grabcut": ModelScores(), "filled_box": ModelScores()}
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample.num_instances == 0:
            continue
        objects, per_object = evaluation.image_prompts(
            sample, index, seed, n_prompts, max_objects, kinds
        )
        grabcut = GrabCut(sample.image)
        hw = sample.image.shape[:2]
        for kind in kinds:
            for o, prompts in zip(objects, per_object, strict=True):
                boxes = prompts.by_kind[kind]
                gt = sample.masks[o]
                scores["grabcut"].objects.setdefault(kind, []).append(
                    score_object(gt, np.stack([grabcut.segment(b) for b in boxes]))
                )
                scores["filled_box"].objects.setdefault(kind, []).append(
                    score_object(gt, np.stack([filled_box(b, hw) for b in boxes]))
                )
    return scores


def percent_table(scores: ModelScores) -> dict[str, dict[str, float]]:
    out = {}
    for kind, objects in scores.objects.items():
        summary = summarize(objects)
        out[kind] = {m: round(100 * summary[m], 2) for m in ("miou", "mbiou", "st")}
    return out


def markdown_table(result: dict) -> str:
    """mIoU / mBIoU per row and box kind, and the noisy boxes' ST, in percent."""
    kinds = result["meta"]["kinds"]
    head = [f"{KIND_TITLES[k]} mIoU" for k in kinds] + [f"{KIND_TITLES[k]} mBIoU" for k in kinds]
    lines = [
        "| model | " + " | ".join([*head, "Noisy box ST"]) + " |",
        "|---|" + "---|" * (len(head) + 1),
    ]
    for key, table in result["models"].items():
        cells = [f"{table[k]['miou']:.1f}" for k in kinds] + [
            f"{table[k]['mbiou']:.1f}" for k in kinds
        ]
        st = table.get("noisy_box", {}).get("st")
        cells.append("–" if st is None else f"{st:.1f}")
        lines.append(f"| {ROW_TITLES.get(key, key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    paths = default_model_paths()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("composites", "synthetic"), default="composites")
    parser.add_argument("--n-images", type=int, default=20, help="held-out images")
    parser.add_argument("--n-prompts", type=int, default=5, help="noisy boxes per object")
    parser.add_argument("--max-objects", type=int, default=5, help="objects per image")
    parser.add_argument("--size-range", type=int, nargs=2, default=(256, 1024))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default=str(paths.base_checkpoint))
    parser.add_argument("--model-type", default=paths.model_type)
    parser.add_argument("--plugins", default=None, help="Stable-SAM plugins (default: shipped)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="folder for the .json and .md")
    args = parser.parse_args(argv)
    # What training.benchmark.build_rows reads: no ablation rows here.
    args.models, args.cache_dir, args.ablation_n, args.train_missing = (
        [],
        "runs/benchmark",
        0,
        False,
    )
    args.train_max_steps = None
    return args


def main(argv: list[str] | None = None) -> dict:
    from training.benchmark import build_rows

    configure_logging("INFO")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    samples = load_dataset(args.data, args.n_images, tuple(args.size_range))
    walls: dict[str, float] = {}

    start = time.perf_counter()
    baselines = evaluate_box_baselines(
        samples, BOX_KINDS, args.n_prompts, args.max_objects, args.seed
    )
    walls["grabcut_and_filled_box"] = round(time.perf_counter() - start, 1)

    rows, notes = build_rows(args)
    start = time.perf_counter()
    models = evaluation.evaluate(
        rows, samples, BOX_KINDS, args.n_prompts, args.max_objects, args.seed
    )
    walls["sam_and_stable_sam"] = round(time.perf_counter() - start, 1)

    all_scores = {**baselines, **models}
    first = baselines["grabcut"].objects.get("gt_box", [])
    result = {
        "models": {key: percent_table(s) for key, s in all_scores.items()},
        "meta": {
            "data": f"{args.data} (held-out)",
            "images": len(samples),
            "objects": len(first),
            "kinds": list(BOX_KINDS),
            "noisy_boxes_per_object": args.n_prompts,
            "max_objects_per_image": args.max_objects,
            "size_range": list(args.size_range),
            "seed": args.seed,
            "wall_s": walls,
            "command": "python -m training.real_benchmark "
            + " ".join(argv if argv is not None else _argv()),
            "notes": notes,
        },
    }
    report = "\n".join(
        [
            f"{result['meta']['data']}: {len(samples)} images, {len(first)} objects, GT box and "
            f"{args.n_prompts} noisy boxes per object; percent.",
            "",
            markdown_table(result),
            "",
            f"Command: `{result['meta']['command']}`",
        ]
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "real_composites" if args.data == "composites" else "synthetic_boxes"
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(report + "\n")
    print(report)
    return result


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


__all__ = ["BOX_KINDS", "evaluate_box_baselines", "main", "markdown_table"]

if __name__ == "__main__":
    main()
