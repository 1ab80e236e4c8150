"""Matching user boxes to ground-truth objects.

A task made by ``collect`` names its target (``target_id`` in the task data): the box belongs
to that object, whatever it overlaps. A task that names no target (any rectangle project) is
matched by box IoU: within one annotation, pairs are taken greedily in order of decreasing IoU,
so no two boxes of one annotator claim the same object; a box whose best remaining IoU is below
``min_iou`` stays unmatched. Unmatched boxes are listed with the reason.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stable_sam import metrics
from training.user_study.ground_truth import GtImage
from training.user_study.ls_export import UserBox

logger = logging.getLogger(__name__)

DEFAULT_MIN_IOU = 0.1


@dataclass
class MatchedBox:
    """A user box, the object it belongs to and their box IoU."""

    box: UserBox
    image_key: str
    object_id: str
    box_iou: float
    by_target: bool  # True: the task named the object; False: matched by IoU


@dataclass
class UnmatchedBox:
    box: UserBox
    reason: str


@dataclass
class Matching:
    matched: list[MatchedBox]
    unmatched: list[UnmatchedBox]


def match_boxes(
    boxes: Sequence[UserBox], gt: Mapping[str, GtImage], min_iou: float = DEFAULT_MIN_IOU
) -> Matching:
    """Assign every user box to a ground-truth object (see the module docstring)."""
    matched: list[MatchedBox] = []
    unmatched: list[UnmatchedBox] = []
    by_annotation: dict[tuple[int, str], list[UserBox]] = defaultdict(list)
    for box in boxes:
        image = gt.get(box.image_key)
        if image is None:
            unmatched.append(UnmatchedBox(box, f"image {box.image_key!r} not in the ground truth"))
            continue
        if (image.height, image.width) != tuple(box.image_size):
            unmatched.append(
                UnmatchedBox(
                    box,
                    f"image size {box.image_size} differs from the ground truth "
                    f"{(image.height, image.width)}",
                )
            )
            continue
        if box.target_id is None:
            by_annotation[(box.task_id, box.annotator)].append(box)
            continue
        obj = image.objects.get(box.target_id)
        if obj is None:
            unmatched.append(UnmatchedBox(box, f"target {box.target_id!r} not in the ground truth"))
            continue
        iou = float(metrics.box_iou(box.box_xyxy, obj.box_xyxy))
        matched.append(MatchedBox(box, box.image_key, obj.object_id, iou, by_target=True))
    for group in by_annotation.values():
        m, u = _match_by_iou(group, gt[group[0].image_key], min_iou)
        matched += m
        unmatched += u
    if unmatched:
        logger.info("matching: %d matched, %d unmatched", len(matched), len(unmatched))
    return Matching(matched, unmatched)


def _match_by_iou(
    boxes: Sequence[UserBox], image: GtImage, min_iou: float
) -> tuple[list[MatchedBox], list[UnmatchedBox]]:
    """Greedy one-to-one matching of one annotation's boxes to the image's objects."""
    ids = list(image.objects)
    if not ids:
        return [], [UnmatchedBox(b, "the image has no ground-truth objects") for b in boxes]
    iou = np.array(
        [
            [float(metrics.box_iou(b.box_xyxy, image.objects[i].box_xyxy)) for i in ids]
            for b in boxes
        ]
    )
    matched: list[MatchedBox] = []
    free_boxes = set(range(len(boxes)))
    for b, o in metrics.greedy_matches(iou, min_iou):  # highest IoU first, ties by index
        free_boxes.discard(b)
        matched.append(MatchedBox(boxes[b], image.key, ids[o], float(iou[b, o]), by_target=False))
    unmatched = [
        UnmatchedBox(boxes[b], f"no free ground-truth box with IoU >= {min_iou}")
        for b in sorted(free_boxes)
    ]
    return matched, unmatched
