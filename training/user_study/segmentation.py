"""Segmentation quality: what each model makes of the annotators' boxes (paper, appendix Table 3).

Every model is prompted, per object, with three prompt sources:

- ``gt_box``: the ground-truth box (one prompt);
- ``user``: each annotator's box for the object (B prompts, B = annotators who drew it);
- ``noisy``: ``noisy_per_object`` boxes from ``stable_sam.prompts.noisy_box`` (noise scale 0.4,
  IoU with the GT box >= 0.5, DESIGN §2), the same boxes for every model.

Per object and source: mean mask IoU and boundary IoU over the prompts (``stable_sam.metrics``)
and the stability ST over the B masks (defined for B >= 2). Per model and source: mIoU, mBIoU
= the mean over objects of those per-object means (every object weighs the same, however many
annotators drew it); ST = the mean over objects with B >= 2.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stable_sam import metrics, prompts
from training.user_study.ground_truth import GtImage

logger = logging.getLogger(__name__)

SOURCES = ("gt_box", "user", "noisy")
SOURCE_TITLES = {"gt_box": "GT box", "user": "User boxes", "noisy": "Noisy boxes (0.4)"}


class BoxSegmenter(Protocol):
    """A model that turns box prompts into masks."""

    def segment_boxes(self, image_rgb: np.ndarray, boxes_xyxy: np.ndarray) -> np.ndarray:
        """``image_rgb`` (H, W, 3) uint8, ``boxes_xyxy`` (B, 4) float px -> (B, H, W) bool."""
        ...


@dataclass
class ObjectPrompts:
    """The prompts of one object: ``user_boxes`` (B, 4) px and who drew them."""

    image_key: str
    object_id: str
    gt_box: np.ndarray
    user_boxes: np.ndarray
    annotators: list[str]
    noisy_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))

    def boxes(self, source: str) -> np.ndarray:
        if source == "gt_box":
            return self.gt_box[None]
        if source == "user":
            return self.user_boxes
        return self.noisy_boxes


def score_masks(masks: Sequence[np.ndarray], gt_mask: np.ndarray) -> dict[str, Any]:
    """Per-prompt IoU and boundary IoU of ``masks`` with ``gt_mask``; ST over them (B >= 2)."""
    ious = [float(metrics.mask_iou(m, gt_mask)) for m in masks]
    bious = [float(metrics.boundary_iou(m, gt_mask)) for m in masks]
    st = float(metrics.stability(list(masks))) if len(masks) >= 2 else None
    return {
        "n": len(masks),
        "iou": float(np.mean(ious)) if ious else None,
        "biou": float(np.mean(bious)) if bious else None,
        "st": st,
        "ious": ious,
        "bious": bious,
    }


def make_noisy_boxes(
    objects: Sequence[ObjectPrompts],
    gt: Mapping[str, GtImage],
    per_object: int,
    noise_scale: float = 0.4,
    seed: int = 0,
) -> None:
    """Fill ``noisy_boxes`` of every object, deterministically in the given order."""
    rng = np.random.default_rng(seed)
    for obj in objects:
        size = (gt[obj.image_key].height, gt[obj.image_key].width)
        boxes = [
            prompts.noisy_box(obj.gt_box, rng, noise_scale=noise_scale, image_size=size)
            for _ in range(per_object)
        ]
        obj.noisy_boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def evaluate_segmentation(
    models: Mapping[str, BoxSegmenter],
    objects: Sequence[ObjectPrompts],
    gt: Mapping[str, GtImage],
    load_image: Callable[[str], np.ndarray],
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[tuple[str, str], dict[str, dict[str, Any]]]]:
    """Prompt every model with every object's boxes; ``result[model][(image, object)][source]``.

    Each image is loaded once; each model segments all of an image's prompts in one batch (so
    a predictor with an embedding cache embeds the image once per model).
    """
    by_image: dict[str, list[ObjectPrompts]] = {}
    for obj in objects:
        by_image.setdefault(obj.image_key, []).append(obj)
    result: dict[str, dict[tuple[str, str], dict[str, dict[str, Any]]]] = {m: {} for m in models}
    for n, (image_key, group) in enumerate(sorted(by_image.items()), start=1):
        image = load_image(image_key)
        truth = gt[image_key]
        if image.shape[:2] != (truth.height, truth.width):
            raise ValueError(
                f"image {image_key}: size {image.shape[:2]} differs from its ground truth "
                f"{(truth.height, truth.width)}"
            )
        spans: list[tuple[ObjectPrompts, str, int, int]] = []
        all_boxes = []
        for obj in group:
            for source in SOURCES:
                boxes = obj.boxes(source)
                spans.append((obj, source, len(all_boxes), len(all_boxes) + len(boxes)))
                all_boxes.extend(boxes)
        stacked = np.asarray(all_boxes, dtype=np.float64).reshape(-1, 4)
        for name, model in models.items():
            masks = model.segment_boxes(image, stacked)
            for obj, source, start, stop in spans:
                gt_mask = truth.objects[obj.object_id].mask
                scores = score_masks(list(masks[start:stop]), gt_mask)
                result[name].setdefault((image_key, obj.object_id), {})[source] = scores
        if progress is not None:
            progress(f"segmented image {n}/{len(by_image)} ({image_key})")
    return result


def aggregate(
    per_object: Mapping[tuple[str, str], Mapping[str, Mapping[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """mIoU, mBIoU (means over objects) and ST (mean over objects with >= 2 prompts) per source."""
    table: dict[str, dict[str, Any]] = {}
    for source in SOURCES:
        rows = [obj[source] for obj in per_object.values() if obj.get(source, {}).get("n")]
        sts = [r["st"] for r in rows if r["st"] is not None]
        table[source] = {
            "miou": float(np.mean([r["iou"] for r in rows])) if rows else None,
            "mbiou": float(np.mean([r["biou"] for r in rows])) if rows else None,
            "st": float(np.mean(sts)) if sts else None,
            "objects": len(rows),
            "prompts": int(sum(r["n"] for r in rows)),
        }
    return table


def by_annotator(
    objects: Sequence[ObjectPrompts],
    per_object: Mapping[tuple[str, str], Mapping[str, Mapping[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """One model's mask IoU / BIoU from each annotator's boxes: ``{annotator: {miou, mbiou, n}}``.

    Shows how a model copes with each person's box quality (the paper's point: SAM degrades
    with sloppier boxes, Stable-SAM much less).
    """
    ious: dict[str, list[float]] = {}
    bious: dict[str, list[float]] = {}
    for obj in objects:
        scores = per_object[(obj.image_key, obj.object_id)]["user"]
        for who, iou, biou in zip(obj.annotators, scores["ious"], scores["bious"], strict=True):
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
