"""Evaluating a user study: match boxes, measure box quality, prompt the models, aggregate
(Table 3, per annotator, and the consensus of several annotators against one).

``evaluate_study`` is the whole pipeline on parsed inputs (an export, ground truth, models); the
CLI (``python -m training.user_study evaluate``) only gathers those inputs and writes the report.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.evaluation import EvalModel, ObjectPrompts
from training.user_study.box_quality import BoxQuality, box_quality
from training.user_study.consensus import consensus_table
from training.user_study.ground_truth import GtImage
from training.user_study.ls_export import StudyExport
from training.user_study.matching import DEFAULT_MIN_IOU, Matching, match_boxes
from training.user_study.segmentation import (
    PerObjectScores,
    StudyObject,
    aggregate,
    by_annotator,
    evaluate_segmentation,
    make_noisy_boxes,
)

logger = logging.getLogger(__name__)


@dataclass
class EvaluationConfig:
    """Knobs of an evaluation; every one is printed in the report."""

    noisy_per_object: int = 5
    noise_scale: float = 0.4
    min_match_iou: float = DEFAULT_MIN_IOU
    noise_samples: int = 2048  # simulated boxes per equivalent-noise-scale evaluation
    seed: int = 0


@dataclass
class StudyResult:
    """Everything the report shows."""

    config: EvaluationConfig
    counts: dict[str, int]
    matching: Matching
    box_quality: BoxQuality
    objects: list[StudyObject]
    labels: dict[tuple[str, str], str | None]
    objects_without_boxes: list[tuple[str, str]]
    models: dict[str, str] = field(default_factory=dict)  # name -> description
    per_object: PerObjectScores = field(default_factory=dict)
    table: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # model -> annotator -> {miou, mbiou, n}: each model prompted with one person's boxes
    by_annotator: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # model -> consensus of the objects' user masks vs one annotator (``consensus_table``)
    consensus: dict[str, dict[str, Any]] = field(default_factory=dict)


def study_objects(matching: Matching, gt: Mapping[str, GtImage]) -> list[StudyObject]:
    """One ``StudyObject`` per object some annotator drew, in (image, object) order, with its
    GT box and user boxes (noisy boxes come later: ``make_noisy_boxes``)."""
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for m in matching.matched:
        groups[(m.image_key, m.object_id)].append(m)
    objects = []
    for (image_key, object_id), group in sorted(groups.items()):
        group.sort(key=lambda m: m.box.annotator)
        boxes = {
            "gt_box": gt[image_key].objects[object_id].box_xyxy[None],
            "user": np.stack([m.box.box_xyxy for m in group]),
        }
        objects.append(
            StudyObject(
                image_key=image_key,
                object_id=object_id,
                annotators=[m.box.annotator for m in group],
                prompts=ObjectPrompts(by_kind=boxes),
            )
        )
    return objects


def evaluate_study(
    export: StudyExport,
    gt: Mapping[str, GtImage],
    models: Mapping[str, EvalModel],
    load_image: Callable[[str], np.ndarray] | None,
    config: EvaluationConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run the evaluation; ``models`` may be empty (box quality only, no images needed)."""
    config = config or EvaluationConfig()
    matching = match_boxes(export.boxes, gt, min_iou=config.min_match_iou)
    gt_boxes = {
        (key, oid): obj.box_xyxy for key, image in gt.items() for oid, obj in image.objects.items()
    }
    sizes = {key: (image.height, image.width) for key, image in gt.items()}
    quality = box_quality(
        matching.matched, gt_boxes, sizes, noise_samples=config.noise_samples, seed=config.seed
    )
    objects = study_objects(matching, gt)
    drawn = {(o.image_key, o.object_id) for o in objects}
    result = StudyResult(
        config=config,
        counts=export.counts.as_dict(),
        matching=matching,
        box_quality=quality,
        objects=objects,
        labels={k: gt[k[0]].objects[k[1]].label for k in gt_boxes},
        objects_without_boxes=sorted(k for k in gt_boxes if k not in drawn),
        models={name: model.description or name for name, model in models.items()},
    )
    result.counts["matched"] = len(matching.matched)
    result.counts["unmatched"] = len(matching.unmatched)
    result.counts["objects_with_boxes"] = len(objects)
    result.counts["objects_without_boxes"] = len(result.objects_without_boxes)
    if models and objects:
        if load_image is None:
            raise ValueError(
                "segmentation needs images: give --images or a Label Studio to fetch from"
            )
        make_noisy_boxes(
            objects, gt, config.noisy_per_object, noise_scale=config.noise_scale, seed=config.seed
        )
        result.per_object = evaluate_segmentation(models, objects, gt, load_image, progress)
        result.table = {name: aggregate(rows) for name, rows in result.per_object.items()}
        result.by_annotator = {
            name: by_annotator(objects, rows) for name, rows in result.per_object.items()
        }
        result.consensus = {name: consensus_table(rows) for name, rows in result.per_object.items()}
    return result
