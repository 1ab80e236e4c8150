"""A simulated user study on synthetic images: the evaluator end to end in one command.

``python -m training.user_study demo --out DIR`` renders synthetic scenes (``training.scenes``),
picks the largest objects as targets, and lets five simulated annotators draw one box per
target. Annotator k draws ``stable_sam.prompts.noisy_box(GT box, noise_scale=s_k)`` (DESIGN §2
noise model, no IoU filter) with ``s = ANNOTATOR_NOISE``, and takes a simulated 2-6 s per box.
A few things real exports contain are simulated too: one skipped task, one re-submitted
(duplicate) annotation, boxes that reach past the image border. The data is written as a Label
Studio JSON export plus a mask folder, then evaluated exactly as ``evaluate`` would; the report
says it is simulated, and ``demo_data/`` holds the inputs for re-running ``evaluate`` on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path
from typing import Any

import numpy as np

from labelstudio.regions import rectangle_region
from stable_sam import prompts
from training.data import Sample, write_mask_folder
from training.user_study.ground_truth import load_mask_folder
from training.user_study.ls_export import parse_export

logger = logging.getLogger(__name__)

# annotator name -> noise scale of the boxes they draw
ANNOTATOR_NOISE: dict[str, float] = {
    "careful@demo": 0.1,
    "quick@demo": 0.2,
    "average@demo": 0.25,
    "hurried@demo": 0.3,
    "sloppy@demo": 0.4,
}


def make_scenes(n: int, size: int, seed: int) -> list[Sample]:
    """``n`` synthetic scenes of ``size`` px (``training.scenes``, held-out split)."""
    from training.scenes import make_scene, scene_seed

    samples = []
    for i in range(n):
        scene = make_scene(scene_seed("heldout", seed * 1000 + i), size)
        samples.append(Sample(image=scene.image, masks=scene.masks, name=f"scene{i:03d}"))
    return samples


def _region(box: np.ndarray, height: int, width: int, rid: str) -> dict[str, Any]:
    """A Label Studio rectangle region for an (unclipped) pixel box."""
    return rectangle_region(box, width, height, "target", "box", "image", region_id=rid)


def simulate_export(
    samples: list[Sample], targets_per_image: int, seed: int
) -> tuple[list[dict[str, Any]], int]:
    """A Label Studio JSON export of the simulated study; returns (tasks, boxes outside image)."""
    rng = np.random.default_rng(seed)
    tasks: list[dict[str, Any]] = []
    annotation_id = 0
    spilled = 0
    for sample in samples:
        height, width = sample.image.shape[:2]
        areas = sample.masks.reshape(len(sample.masks), -1).sum(1)
        for k in np.argsort(-areas, kind="stable")[:targets_per_image]:
            task_id = len(tasks) + 1
            gt_box = prompts.gt_box(sample.masks[k]).astype(np.float64)
            annotations = []
            for a, (who, scale) in enumerate(ANNOTATOR_NOISE.items()):
                annotation_id += 1
                stamp = f"2026-01-01T00:{task_id % 60:02d}:{a:02d}Z"
                base = {"id": annotation_id, "completed_by": {"id": a + 1, "email": who}}
                if task_id == 1 and who == "sloppy@demo":  # pressed Skip
                    annotations.append(
                        {**base, "result": [], "was_cancelled": True, "created_at": stamp}
                    )
                    continue
                box = prompts.noisy_box(gt_box, rng, noise_scale=scale, iou_range=(0.0, 1.0))
                spilled += int(box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height)
                lead_time = float(rng.uniform(2.0, 6.0))
                region = _region(box, height, width, f"r{annotation_id}")
                if task_id == 2 and who == "quick@demo":  # a first try, later re-submitted
                    first = _region(gt_box + np.array([-9, -9, 9, 9]), height, width, "first")
                    annotations.append(
                        {
                            **base,
                            "result": [first],
                            "lead_time": 1.0,
                            "created_at": "2025-12-31T23:59:00Z",
                        }
                    )
                    annotation_id += 1
                    base = {**base, "id": annotation_id}
                annotations.append(
                    {
                        **base,
                        "result": [region],
                        "was_cancelled": False,
                        "lead_time": lead_time,
                        "created_at": stamp,
                    }
                )
            tasks.append(
                {
                    "id": task_id,
                    "data": {
                        "image": f"/data/upload/1/{task_id:08x}-{sample.name}_t{k}.png",
                        "image_name": f"{sample.name}.png",
                        "target_id": str(k),
                    },
                    "annotations": annotations,
                }
            )
    return tasks, spilled


def run_demo(args: argparse.Namespace, command: str) -> Path:
    """Render, simulate, evaluate, report; returns the report.md path."""
    from training.user_study.evaluate import EvaluationConfig, evaluate_study
    from training.user_study.images import OriginalImages
    from training.user_study.models import build_models, model_names
    from training.user_study.report import write_report

    out = Path(args.out)
    data_dir = out / "demo_data"
    samples = make_scenes(args.images, args.size, args.seed)
    write_mask_folder(samples, data_dir / "gt")
    tasks, spilled = simulate_export(samples, args.targets_per_image, args.seed)
    export_path = data_dir / "export.json"
    export_path.write_text(json.dumps(tasks, indent=1), encoding="utf-8")

    gt = load_mask_folder(data_dir / "gt")
    export = parse_export(json.loads(export_path.read_text(encoding="utf-8")))
    models = build_models(model_names(args.models), allow_random_base=True)
    config = EvaluationConfig(seed=args.seed)
    result = evaluate_study(export, gt, models, OriginalImages(gt), config, logger.info)
    noise = ", ".join(f"{who} {s}" for who, s in ANNOTATOR_NOISE.items())
    rerun = (
        f"python -m training.user_study evaluate --export {shlex.quote(str(export_path))} "
        f"--gt {shlex.quote(str(data_dir / 'gt'))} --models {args.models} --out DIR"
    )
    simulated = (
        f"{len(samples)} synthetic images ({args.size} px, training.scenes), "
        f"{args.targets_per_image} targets each, {len(ANNOTATOR_NOISE)} simulated annotators drawing "
        f"`noisy_box(GT box, noise_scale=s)` with s: {noise}; lead times uniform 2-6 s; "
        f"one skipped task, one re-submitted annotation, {spilled} boxes drawn past the image "
        f"border. Not real annotators. Re-run the evaluation alone with: `{rerun}`"
    )
    return write_report(result, out, command, simulated=simulated)
