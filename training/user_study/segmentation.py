"""Segmentation quality: what each model makes of the annotators' boxes (paper, appendix Table 3).

Every model is prompted, per object, with three prompt sources:

- ``gt_box``: the ground-truth box (one prompt);
- ``user``: each annotator's box for the object (B prompts, B = annotators who drew it);
- ``noisy``: ``noisy_per_object`` noisy boxes (``training.evaluation.noisy_boxes``: noise scale
  0.4, IoU with the GT box >= 0.5, DESIGN §2), the same boxes for every model.

Masks and scores come from the evaluation protocol (``training.evaluation``): each model's
predictor decodes the boxes with its multimask policy; per object and source, the mean mask IoU
and boundary IoU over the prompts and the stability ST over the B masks. Per model and source:
mIoU, mBIoU = the mean over objects of those per-object means (every object weighs the same,
however many annotators drew it); ST = the mean over objects with B >= 2. The same B user masks
also make each such object's consensus mask (``training.user_study.consensus``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.evaluation import (
    EvalModel,
    ObjectPrompts,
    ObjectScore,
    decode,
    noisy_boxes,
    score_object,
    summarize,
)
from training.user_study.consensus import CONSENSUS, MIN_ANNOTATORS, score_consensus
from training.user_study.ground_truth import GtImage

logger = logging.getLogger(__name__)

SOURCES = ("gt_box", "user", "noisy")
SOURCE_TITLES = {"gt_box": "GT box", "user": "User boxes", "noisy": "Noisy boxes (0.4)"}
ST_MIN_PROMPTS = 2  # the stability of a single box says nothing: such objects have no ST
MAX_BATCH = 16  # prompts per decoder call: bounds memory for studies with many annotators

# model -> (image, object) -> source (or "consensus") -> score
PerObjectScores = dict[str, dict[tuple[str, str], dict[str, ObjectScore]]]


@dataclass
class StudyObject:
    """An object some annotator drew: its image and id, who drew it, and its prompts by
    source (``gt_box`` (1, 4), ``user`` (B, 4) in ``annotators`` order, ``noisy`` (n, 4); px)."""

    image_key: str
    object_id: str
    annotators: list[str]
    prompts: ObjectPrompts = field(default_factory=ObjectPrompts)

    def boxes(self, source: str) -> np.ndarray:
        """The (n, 4) boxes of ``source``; none when it has not been filled in."""
        return self.prompts.by_kind.get(source, np.zeros((0, 4)))


def make_noisy_boxes(
    objects: Sequence[StudyObject],
    gt: Mapping[str, GtImage],
    per_object: int,
    noise_scale: float = 0.4,
    seed: int = 0,
) -> None:
    """Fill the ``noisy`` boxes of every object, deterministically in the given order."""
    rng = np.random.default_rng(seed)
    for obj in objects:
        size = (gt[obj.image_key].height, gt[obj.image_key].width)
        obj.prompts.by_kind["noisy"] = noisy_boxes(
            obj.boxes("gt_box")[0], rng, per_object, size, noise_scale
        )


def evaluate_segmentation(
    models: Mapping[str, EvalModel],
    objects: Sequence[StudyObject],
    gt: Mapping[str, GtImage],
    load_image: Callable[[str], np.ndarray],
    progress: Callable[[str], None] | None = None,
) -> PerObjectScores:
    """Prompt every model with every object's boxes; ``result[model][(image, object)][source]``
    (a source without boxes has no entry), and under ``consensus`` the consensus of the object's
    user masks when it has at least two (``training.user_study.consensus``).

    Each image is loaded once and embedded once per model; each model decodes all of an image's
    boxes together, ``MAX_BATCH`` at a time.
    """
    by_image: dict[str, list[StudyObject]] = {}
    for obj in objects:
        by_image.setdefault(obj.image_key, []).append(obj)
    result: PerObjectScores = {m: {} for m in models}
    for n, (image_key, group) in enumerate(sorted(by_image.items()), start=1):
        image = load_image(image_key)
        truth = gt[image_key]
        if image.shape[:2] != (truth.height, truth.width):
            raise ValueError(
                f"image {image_key}: size {image.shape[:2]} differs from its ground truth "
                f"{(truth.height, truth.width)}"
            )
        spans: list[tuple[StudyObject, str, int, int]] = []
        all_boxes = []
        for obj in group:
            for source in SOURCES:
                boxes = obj.boxes(source)
                spans.append((obj, source, len(all_boxes), len(all_boxes) + len(boxes)))
                all_boxes.extend(boxes)
        stacked = np.asarray(all_boxes, dtype=np.float64).reshape(-1, 4)
        for name, model in models.items():
            masks, _ = decode(model, model.predictor.embed(image), stacked, MAX_BATCH)
            for obj, source, start, stop in spans:
                if stop == start:
                    continue
                gt_mask = truth.objects[obj.object_id].mask
                scores = result[name].setdefault((image_key, obj.object_id), {})
                scores[source] = score_object(gt_mask, masks[start:stop])
                if source == "user" and stop - start >= MIN_ANNOTATORS:
                    scores[CONSENSUS] = score_consensus(gt_mask, masks[start:stop])
        if progress is not None:
            progress(f"segmented image {n}/{len(by_image)} ({image_key})")
    return result


def aggregate(per_object: Mapping[tuple[str, str], Mapping[str, ObjectScore]]) -> dict[str, Any]:
    """mIoU, mBIoU (means over objects), ST (mean over objects with >= 2 prompts), the number of
    objects and of prompts, per source (``training.evaluation.summarize``; fractions)."""
    return {
        source: summarize(
            [obj[source] for obj in per_object.values() if source in obj], ST_MIN_PROMPTS
        )
        for source in SOURCES
    }


def by_annotator(
    objects: Sequence[StudyObject],
    per_object: Mapping[tuple[str, str], Mapping[str, ObjectScore]],
) -> dict[str, dict[str, Any]]:
    """One model's mask IoU / BIoU from each annotator's boxes: ``{annotator: {miou, mbiou, n}}``.

    Shows how a model copes with each person's box quality (the paper's point: SAM degrades
    with sloppier boxes, Stable-SAM much less).
    """
    ious: dict[str, list[float]] = {}
    bious: dict[str, list[float]] = {}
    for obj in objects:
        scores = per_object[(obj.image_key, obj.object_id)]["user"]
        for who, iou, biou in zip(obj.annotators, scores.ious, scores.bious, strict=True):
            ious.setdefault(who, []).append(iou)
            bious.setdefault(who, []).append(biou)
    return {
        who: {
            "miou": float(np.mean(ious[who])),
            "mbiou": float(np.mean(bious[who])),
            "n": len(ious[who]),
        }
        for who in sorted(ious)
    }
