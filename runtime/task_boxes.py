"""The boxes a task already has, for the batch ``/predict`` (Label Studio's "Retrieve predictions").

Label Studio sends each task of a batch ``/predict`` with its ``annotations`` and
``predictions``. Their rectangles (crowd boxes, or a detector's imported under another model
version) are what a box project wants turned into masks:

- **Sources** (``task_sources``): the latest non-cancelled annotation, or, when the task is
  labelled by several annotators (``overlap`` > 1), each annotator's latest one; and every
  prediction of another model version than ours (ours are masks already).
- **Boxes**: ``rectanglelabels`` regions, a rotated one as its axis-aligned hull (flagged),
  clipped to the image; a box that is malformed, of zero area or outside the image is skipped
  and counted, never fatal to the batch.
- **Objects** (``group_boxes``): boxes of one label on one image from different sources are the
  same object when their IoU is at least ``MIN_GROUP_IOU`` (greedy, highest IoU first, one box
  per source and object), as the user-study evaluator matches boxes to objects.
- **Consensus** (``consensus_mask``): one mask per object from the masks of its boxes, by pixel
  majority (a pixel is in when at least half the masks have it), scored by the agreement: the
  mean IoU of the boxes' masks with the consensus.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from labelstudio.errors import InvalidRegionError
from labelstudio.regions import ContextRegion, parse_rectangle, rectangle_box
from stable_sam import metrics

MIN_GROUP_IOU = 0.5


@dataclass(frozen=True)
class TaskBox:
    """One rectangle of a task: label, image (``to_name``), the box in pixels (xyxy, clipped)
    and where it came from."""

    label: str
    to_name: str
    box_xyxy: np.ndarray
    source: str
    rotated: bool = False


@dataclass
class TaskBoxes:
    """The boxes of a task by source (in source order) and the boxes skipped, by reason."""

    sources: list[list[TaskBox]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.sources)


def task_sources(task: dict[str, Any], own_versions: Collection[str]) -> list[tuple[str, list]]:
    """``(source name, result regions)`` of the annotations and predictions that count."""
    annotations = [
        a for a in _listed(task.get("annotations"))
        if isinstance(a, dict) and not a.get("was_cancelled") and isinstance(a.get("result"), list)
    ]  # fmt: skip
    annotations.sort(key=_age)
    overlap = task.get("overlap")
    if isinstance(overlap, int) and overlap > 1:
        latest: dict[Any, dict] = {}
        for annotation in annotations:  # oldest first: the last one per annotator stays
            latest[_annotator(annotation)] = annotation
        chosen = sorted(latest.values(), key=_age)
    else:
        chosen = annotations[-1:]
    sources = [(f"annotation {a.get('id')} by {_annotator(a)}", a["result"]) for a in chosen]
    for prediction in _listed(task.get("predictions")):
        if not isinstance(prediction, dict) or not isinstance(prediction.get("result"), list):
            continue
        if prediction.get("model_version") in own_versions:
            continue
        name = f"prediction {prediction.get('id')} ({prediction.get('model_version')})"
        sources.append((name, prediction["result"]))
    return sources


def _listed(value: Any) -> list:
    """A task field that should be a list (it comes from the network): else empty."""
    return value if isinstance(value, list) else []


def _age(annotation: dict) -> tuple[str, int]:
    """Sorts annotations oldest first: by update (or creation) time, then id."""
    when = str(annotation.get("updated_at") or annotation.get("created_at") or "")
    value = annotation.get("id")
    return when, value if isinstance(value, int) else 0


def _annotator(annotation: dict) -> str | int | None:
    """Who made the annotation: a user id or e-mail (``completed_by`` as a value or an object);
    ``None`` for anything else."""
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("id") or who.get("email")
    return who if isinstance(who, str | int) and not isinstance(who, bool) else None


def _is_rectangle(region: Any) -> bool:
    return isinstance(region, dict) and str(region.get("type", "")).lower() == "rectanglelabels"


def box_image_names(sources: Sequence[tuple[str, list]]) -> set[str]:
    """The images (``to_name``) the sources' rectangles are on: those to load."""
    return {
        region["to_name"]
        for _, result in sources
        for region in result
        if _is_rectangle(region) and isinstance(region.get("to_name"), str)
    }


def task_boxes(
    sources: Sequence[tuple[str, list]],
    sizes: dict[str, tuple[int, int]],
    max_boxes: int | None = None,
) -> TaskBoxes:
    """Every usable rectangle of a task's ``sources`` (``task_sources``), at most ``max_boxes``
    (the rest skipped and counted: a task's annotations come from the network); ``sizes``:
    image name -> (width, height) of the images boxes may be on (others' boxes are skipped)."""
    out = TaskBoxes()
    for name, result in sources:
        boxes = []
        for index, raw in enumerate(result):
            if not _is_rectangle(raw):
                continue
            if max_boxes is not None and out.count + len(boxes) >= max_boxes:
                out.skipped[f"over the limit of {max_boxes} boxes per task"] += 1
                continue
            try:
                region = ContextRegion.model_validate(raw)
                label, rect = parse_rectangle(region, index)
            except ValidationError:
                out.skipped["malformed rectangle"] += 1
                continue
            except InvalidRegionError as exc:
                out.skipped[_reason(exc.detail)] += 1
                continue
            if label is None:
                out.skipped["rectangle without a label"] += 1
                continue
            size = sizes.get(region.to_name or "")
            if size is None:
                out.skipped["rectangle on another image"] += 1
                continue
            try:
                box = rectangle_box(rect, *size)
            except InvalidRegionError:
                out.skipped["rectangle outside the image"] += 1
                continue
            boxes.append(TaskBox(label, region.to_name or "", box, name, rect.rotation != 0))
        if boxes:
            out.sources.append(boxes)
    return out


def _reason(detail: str) -> str:
    """A countable reason from a region error (``region 3: rectangle has zero ...``)."""
    return detail.split(": ", 1)[-1].split(" (")[0].split(";")[0]


def group_boxes(
    sources: Sequence[Sequence[TaskBox]], min_iou: float = MIN_GROUP_IOU
) -> list[list[TaskBox]]:
    """The objects: boxes of different sources, same label and image, matched by IoU."""
    groups: list[list[TaskBox]] = []
    for source in sources:
        # IoU of each box with each object so far; -inf where label or image differ.
        iou = np.full((len(source), len(groups)), -np.inf)
        for b, box in enumerate(source):
            for g, group in enumerate(groups):
                if (group[0].label, group[0].to_name) == (box.label, box.to_name):
                    iou[b, g] = metrics.box_iou(box.box_xyxy, _mean_box(group))
        matched = metrics.greedy_matches(iou, min_iou)
        for b, g in matched:
            groups[g].append(source[b])
        used = {b for b, _ in matched}
        groups += [[box] for b, box in enumerate(source) if b not in used]
    return groups


def _mean_box(group: Sequence[TaskBox]) -> np.ndarray:
    return np.mean([b.box_xyxy for b in group], axis=0)


def consensus_mask(masks: np.ndarray) -> tuple[np.ndarray, float]:
    """The pixel-majority mask of K (K, H, W) masks of one object and their agreement (the mean
    IoU of each mask with it; 1.0 for a single mask)."""
    masks = np.asarray(masks, dtype=bool)
    if len(masks) == 1:
        return masks[0], 1.0
    votes = masks.sum(axis=0, dtype=np.int32)
    consensus = 2 * votes >= len(masks)
    agreement = float(np.mean([metrics.mask_iou(m, consensus) for m in masks]))
    return consensus, agreement
