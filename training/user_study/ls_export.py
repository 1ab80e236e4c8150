"""Reading a Label Studio export: user boxes, ground-truth brush masks, and what was left out.

A Label Studio JSON export is a list of tasks, each ``{id, data, annotations: [...]}``; an
annotation is ``{id, completed_by, result: [regions], was_cancelled, lead_time, ...}``.
Rectangle regions give ``value = {x, y, width, height, rotation}`` in **percent** of the
original image (``original_width`` x ``original_height`` px), rotated by ``rotation`` degrees
clockwise about the box's top-left corner (DESIGN §3).

Everything odd in an export is counted in ``ExportCounts`` rather than raised: skipped
(cancelled) annotations, annotations without a box, several boxes in one annotation of a
single-target task, a second annotation by the same annotator of the same task, boxes that
reach outside the image (clipped) or lie entirely outside it (dropped), rotated boxes
(replaced by their axis-aligned bounds), boxes without a known image size. Percent -> pixels:
``labelstudio.geometry``; brush RLE: ``labelstudio.brush``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelstudio.brush import brush_region_mask
from labelstudio.geometry import clip_box, rectangle_to_xyxy

logger = logging.getLogger(__name__)

# Label Studio prefixes uploaded files with 8 hex characters: /data/upload/7/1a2b3c4d-cat.jpg
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
# Task data keys this package writes (collect.py) and reads here.
IMAGE_KEY = "image"
IMAGE_NAME_KEY = "image_name"
ORIGINAL_IMAGE_KEY = "original_image"
TARGET_ID_KEY = "target_id"
TARGET_NAME_KEY = "target_name"


@dataclass
class UserBox:
    """One annotator's box for one task, in pixels of the original image.

    ``box_xyxy``: (4,) float64 ``[x0, y0, x1, y1]`` on pixel edges (a box hugging pixels
    10..19 spans 10.0..20.0), clipped to the image. ``image_size``: (H, W) px.
    ``target_id``: the object the task asked for (task data), ``None`` when the task names none.
    """

    task_id: int
    image_key: str
    annotator: str
    box_xyxy: np.ndarray
    image_size: tuple[int, int]
    target_id: str | None = None
    lead_time_s: float | None = None
    annotation_id: int | None = None
    region_id: str | None = None
    clipped: bool = False
    rotated: bool = False


@dataclass
class BrushMask:
    """A ground-truth brush region of a task: ``mask`` (H, W) bool at the original size."""

    task_id: int
    image_key: str
    object_id: str
    mask: np.ndarray
    label: str | None = None


@dataclass
class ExportCounts:
    """How many of each kind of thing the export held, and what was set aside (and why)."""

    tasks: int = 0
    tasks_without_annotations: int = 0
    annotations: int = 0
    skipped: int = 0  # was_cancelled: the annotator pressed Skip
    empty: int = 0  # submitted without any rectangle
    duplicates: int = 0  # an older annotation by the same annotator of the same task, dropped
    extra_boxes: int = 0  # more boxes than one in a single-target task; the last one drawn is kept
    boxes: int = 0  # user boxes kept
    clipped: int = 0  # reached outside the image, clipped to it
    outside: int = 0  # entirely outside the image (or zero area after clipping), dropped
    rotated: int = 0  # rotation != 0, replaced by the axis-aligned bounds
    unknown_size: int = 0  # no original_width/height and no known image size, dropped
    malformed: int = 0  # a rectangle without usable x/y/width/height, dropped
    ground_truth_annotations: int = 0  # brush annotations read as ground truth
    with_lead_time: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class StudyExport:
    """What ``parse_export`` found: ``boxes`` per annotator and task, brush GT, counts."""

    boxes: list[UserBox] = field(default_factory=list)
    brush_masks: list[BrushMask] = field(default_factory=list)
    counts: ExportCounts = field(default_factory=ExportCounts)
    # task id -> task data (image URLs for fetching, names for reports)
    task_data: dict[int, dict[str, Any]] = field(default_factory=dict)


def image_key_for(data: Mapping[str, Any]) -> str:
    """The name that identifies a task's image among the ground truth: its file stem.

    ``data["image_name"]`` when the study was made by ``collect`` (the original file name),
    else the file name in the image URL with Label Studio's upload prefix removed.
    """
    name = data.get(IMAGE_NAME_KEY)
    if not name:
        url = str(data.get(ORIGINAL_IMAGE_KEY) or data.get(IMAGE_KEY) or "")
        name = url.split("?d=")[-1].rstrip("/").split("/")[-1]
        name = _UPLOAD_PREFIX.sub("", name)
    return Path(str(name)).stem


def annotator_name(completed_by: Any, users: Mapping[int, str] | None = None) -> str:
    """A stable annotator name: the e-mail where the export or ``users`` has it, else ``user<id>``."""
    if isinstance(completed_by, Mapping):
        email = completed_by.get("email")
        if email:
            return str(email)
        completed_by = completed_by.get("id")
    if users and completed_by in users:
        return users[completed_by]
    return f"user{completed_by}"


def _annotation_order(annotation: Mapping[str, Any]) -> tuple[str, int]:
    """Sort key: the newest annotation last (updated_at / created_at are ISO strings)."""
    stamp = str(annotation.get("updated_at") or annotation.get("created_at") or "")
    return stamp, int(annotation.get("id") or 0)


def _is_brush(region: Mapping[str, Any]) -> bool:
    return region.get("type") == "brushlabels" and "rle" in (region.get("value") or {})


def parse_export(
    tasks: Iterable[Mapping[str, Any]],
    *,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
    users: Mapping[int, str] | None = None,
    read_brush_gt: bool = False,
    gt_annotator: str | None = None,
) -> StudyExport:
    """Read user boxes (and, with ``read_brush_gt``, ground-truth brush masks) from an export.

    ``image_sizes``: image key -> (H, W) px, used when a region lacks ``original_width``.
    ``users``: user id -> e-mail, to name annotators when the export has bare ids.
    With ``read_brush_gt``, annotations holding brush regions are ground truth (only those of
    ``gt_annotator`` when given); their rectangles, if any, are not user boxes.
    """
    out = StudyExport()
    counts = out.counts
    for task in tasks:
        counts.tasks += 1
        task_id = int(task["id"])
        data = dict(task.get("data") or {})
        out.task_data[task_id] = data
        image_key = image_key_for(data)
        target = data.get(TARGET_ID_KEY)
        target_id = None if target is None or target == "" else str(target)
        annotations = sorted(task.get("annotations") or [], key=_annotation_order)
        if not annotations:
            counts.tasks_without_annotations += 1
        # newest annotation per annotator; older ones are duplicates
        latest: dict[str, Mapping[str, Any]] = {}
        for annotation in annotations:
            counts.annotations += 1
            who = annotator_name(annotation.get("completed_by"), users)
            regions = annotation.get("result") or []
            is_gt = read_brush_gt and any(_is_brush(r) for r in regions)
            if is_gt and (gt_annotator is None or who == gt_annotator):
                counts.ground_truth_annotations += 1
                for k, region in enumerate(r for r in regions if _is_brush(r)):
                    labels = region["value"].get("brushlabels") or [None]
                    object_id = target_id or str(region.get("id") or k)
                    mask = brush_region_mask(region)
                    out.brush_masks.append(
                        BrushMask(task_id, image_key, object_id, mask, labels[0])
                    )
                continue
            if annotation.get("was_cancelled"):
                counts.skipped += 1
                continue
            if who in latest:
                counts.duplicates += 1
            latest[who] = annotation
        for who, annotation in latest.items():
            _read_boxes(out, task_id, image_key, target_id, who, annotation, image_sizes)
    logger.info("export: %s", counts.as_dict())
    return out


def _read_boxes(
    out: StudyExport,
    task_id: int,
    image_key: str,
    target_id: str | None,
    who: str,
    annotation: Mapping[str, Any],
    image_sizes: Mapping[str, tuple[int, int]] | None,
) -> None:
    counts = out.counts
    rectangles = [r for r in annotation.get("result") or [] if r.get("type") == "rectanglelabels"]
    if not rectangles:
        counts.empty += 1
        return
    if target_id is not None and len(rectangles) > 1:
        # one target per task: the last box drawn is the annotator's final answer
        counts.extra_boxes += len(rectangles) - 1
        rectangles = rectangles[-1:]
    lead_time = annotation.get("lead_time")
    lead_time_s = float(lead_time) if lead_time is not None else None
    if lead_time_s is not None:
        counts.with_lead_time += 1
    for region in rectangles:
        if region.get("original_width") and region.get("original_height"):
            size = (int(region["original_height"]), int(region["original_width"]))
        elif image_sizes and image_key in image_sizes:
            size = tuple(image_sizes[image_key])
        else:
            counts.unknown_size += 1
            continue
        try:
            box, rotated = _rectangle_box(region["value"], size)
        except (KeyError, TypeError, ValueError):
            counts.malformed += 1
            logger.warning("task %s: malformed rectangle region, skipped", task_id)
            continue
        counts.rotated += int(rotated)
        box, was_clipped = clip_box(box, width=size[1], height=size[0])
        if box is None:
            counts.outside += 1
            continue
        counts.clipped += int(was_clipped)
        counts.boxes += 1
        out.boxes.append(
            UserBox(
                task_id=task_id,
                image_key=image_key,
                annotator=who,
                box_xyxy=box,
                image_size=(int(size[0]), int(size[1])),
                target_id=target_id,
                lead_time_s=lead_time_s,
                annotation_id=annotation.get("id"),
                region_id=region.get("id"),
                clipped=was_clipped,
                rotated=rotated,
            )
        )


def _rectangle_box(value: Mapping[str, Any], size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """A rectangle ``value`` (percent, degrees) on an image of ``size`` (H, W) px as unclipped
    pixel ``xyxy`` (a rotated one: the axis-aligned bounds of its corners), and whether it was
    rotated."""
    rotation = float(value.get("rotation") or 0.0)
    box = rectangle_to_xyxy(
        float(value["x"]),
        float(value["y"]),
        float(value["width"]),
        float(value["height"]),
        rotation,
        width=size[1],
        height=size[0],
    )
    return box, rotation % 360.0 != 0.0


def read_export_file(path: str | Path) -> list[dict[str, Any]]:
    """Load a Label Studio JSON export (a list of tasks; a single task object is accepted)."""
    with open(path, encoding="utf-8") as f:
        tasks = json.load(f)
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: expected a JSON list of tasks")
    if tasks and not any(isinstance(t, dict) and "annotations" in t for t in tasks):
        raise ValueError(
            f"{path}: no task has an 'annotations' list; export the project as JSON (not JSON_MIN)"
        )
    return tasks
