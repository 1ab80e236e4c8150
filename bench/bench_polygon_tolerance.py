"""Polygon output: the round-trip IoU of the filled polygon with the mask vs its point count,
per simplification tolerance, and what the hole bridges are worth.

On held-out synthetic scenes (``training.scenes``: ellipses, polygons, stars, rings, lines,
branches; 256-1024 px): every object's ground-truth mask, and the mask the embedded default
predicts from its box (what a polygon project actually gets), each turned into polygons
(``labelstudio.polygon``) and rasterised back. For each tolerance: mean and 5th-percentile IoU,
mean points per object; for ring-shaped objects also the IoU with their holes filled instead.

    .venv/bin/python bench/bench_polygon_tolerance.py --n-images 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make the repo importable

from labelstudio.polygon import mask_to_polygons, polygons_to_mask  # noqa: E402
from stable_sam.metrics import mask_iou  # noqa: E402

TOLERANCES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def filled(mask: np.ndarray) -> np.ndarray:
    """The mask with every hole filled (what a polygon without hole bridges shows)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
    return out.astype(bool)


def collect_masks(n_images: int, predicted: bool) -> dict[str, list[tuple[str, np.ndarray]]]:
    """``{"ground truth": [(kind, mask)], "predicted": [...]}`` over the held-out scenes."""
    from training.scenes import make_scene, scene_seed

    masks: dict[str, list[tuple[str, np.ndarray]]] = {"ground truth": []}
    predictor = None
    if predicted:
        import torch

        from stable_sam import StableSamPredictor, build_default_model, prompts

        torch.set_num_threads(1)
        predictor = StableSamPredictor(build_default_model())
        masks["predicted (embedded default, GT box)"] = []
    for index in range(n_images):
        scene = make_scene(scene_seed("heldout", index))
        for kind, mask in zip(scene.kinds, scene.masks, strict=True):
            masks["ground truth"].append((kind, mask))
        if predictor is not None and len(scene.masks):
            boxes = np.stack([prompts.gt_box(m) for m in scene.masks]).astype(np.float32)
            batch = predictor.predict_batch(scene.image, boxes_xyxy=boxes)
            for k, kind in enumerate(scene.kinds):
                masks["predicted (embedded default, GT box)"].append((kind, batch.masks[k, 0]))
    return masks


def measure(masks: list[tuple[str, np.ndarray]]) -> dict:
    rows = {}
    for tolerance in TOLERANCES:
        ious, points, parts = [], [], []
        started = time.perf_counter()
        for _, mask in masks:
            if not mask.any():
                continue
            polygons = mask_to_polygons(mask, tolerance)
            ious.append(mask_iou(polygons_to_mask(polygons, *mask.shape), mask))
            points.append(sum(len(p) for p in polygons))
            parts.append(len(polygons))
        rows[str(tolerance)] = {
            "miou": round(100 * float(np.mean(ious)), 2),
            "p5_iou": round(100 * float(np.percentile(ious, 5)), 2),
            "min_iou": round(100 * float(np.min(ious)), 2),
            "points_mean": round(float(np.mean(points)), 1),
            "parts_mean": round(float(np.mean(parts)), 2),
            "ms_per_mask": round(1000 * (time.perf_counter() - started) / len(ious), 2),
        }
    rings = [m for kind, m in masks if kind == "ring" and m.any()]
    holes = {"objects": len(rings)}
    if rings:
        holes["bridged_miou"] = round(
            100 * float(np.mean([mask_iou(polygons_to_mask(mask_to_polygons(m), *m.shape), m) for m in rings])), 2
        )  # fmt: skip
        holes["filled_miou"] = round(
            100 * float(np.mean([mask_iou(filled(m), m) for m in rings])), 2
        )
    return {"objects": len(masks), "tolerances": rows, "rings": holes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=40)
    parser.add_argument("--no-predicted", action="store_true", help="ground-truth masks only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {}
    for name, masks in collect_masks(args.n_images, not args.no_predicted).items():
        report[name] = measure(masks)
        print(f"\n{name}: {report[name]['objects']} objects; rings: {report[name]['rings']}")
        print("tolerance px | mIoU | p5 IoU | min IoU | points | parts | ms/mask")
        for tolerance, row in report[name]["tolerances"].items():
            print(f"{tolerance:>12} | {row['miou']:.2f} | {row['p5_iou']:.2f} | "
                  f"{row['min_iou']:.2f} | {row['points_mean']:.1f} | {row['parts_mean']:.2f} | "
                  f"{row['ms_per_mask']:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
