"""Label Studio annotations -> ``Sample``s with instance masks: the training job's dataset.

A project's tasks and images come through the Label Studio adapter
(``labelstudio.client.LabelStudioClient``: the API, one deadline per request, byte and pixel
limits, images decoded as the browser shows them). Each ``brushlabels`` region becomes one
instance mask (``labelstudio.brush.brush_region_mask``); each ``polygonlabels`` region is
rasterised (points are percent of the original image). One ``Sample`` per (task, Image tag)
that has at least one mask; a task's newest non-cancelled annotation is used. Tokens are never
logged, and URLs reach logs and errors only through ``labelstudio.download.display_url``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np

from labelstudio.brush import brush_region_mask
from labelstudio.client import LabelStudioClient
from labelstudio.errors import ServiceError
from labelstudio.geometry import percent_to_pixels
from labelstudio.label_config import parse_label_config
from training.data import Sample

logger = logging.getLogger(__name__)

MASK_TYPES = ("brushlabels", "polygonlabels")


# --- annotations -> masks ------------------------------------------------------------------


def polygon_mask(result: dict[str, Any]) -> np.ndarray:
    """A ``polygonlabels`` region -> (H, W) bool, points given in percent of the image."""
    height, width = int(result["original_height"]), int(result["original_width"])
    points = np.asarray(result["value"]["points"], dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < 3 or points.shape[1] != 2:
        raise ValueError(f"polygon region {result.get('id')} needs at least 3 (x, y) points")
    pixels = percent_to_pixels(points, width, height)
    canvas = np.zeros((height, width), dtype=np.uint8)
    # cv2 rasterises at integer pixel centres; subpixel precision via a shift of 4 bits.
    cv2.fillPoly(canvas, [np.round(pixels * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def region_mask(result: dict[str, Any]) -> np.ndarray | None:
    """The instance mask of one result region, ``None`` for non-mask regions."""
    kind = result.get("type")
    if kind == "brushlabels":
        return brush_region_mask(result)
    if kind == "polygonlabels":
        return polygon_mask(result)
    return None


def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's newest annotation that was not cancelled (skipped), or ``None``."""
    annotations = [
        a for a in task.get("annotations") or [] if not a.get("was_cancelled") and a.get("result")
    ]
    if not annotations:
        return None
    return max(annotations, key=lambda a: (str(a.get("updated_at") or ""), int(a.get("id") or 0)))


def task_masks(annotation: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    """``{Image tag name (to_name): [instance masks (H,W) bool]}`` of one annotation.

    Empty masks and regions that cannot be decoded are skipped with a warning.
    """
    masks: dict[str, list[np.ndarray]] = {}
    for result in annotation.get("result") or []:
        if result.get("type") not in MASK_TYPES:
            continue
        try:
            mask = region_mask(result)
        except (KeyError, ValueError, TypeError) as exc:
            logger.warning("annotation %s: skipping a region: %s", annotation.get("id"), exc)
            continue
        if mask is not None and mask.any():
            masks.setdefault(str(result.get("to_name", "")), []).append(mask)
    return masks


def _fit_masks(masks: list[np.ndarray], shape: tuple[int, int], name: str) -> np.ndarray:
    """Stack masks as (N, H, W) at ``shape``; resize (nearest) when LS's size differs."""
    fitted = []
    for mask in masks:
        if mask.shape != shape:
            logger.warning(
                "%s: mask %s differs from the image %s; resizing", name, mask.shape, shape
            )
            mask = cv2.resize(mask.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST)
            mask = mask.astype(bool)
        fitted.append(mask)
    return np.stack(fitted)


def load_project_samples(
    client: LabelStudioClient,
    project_id: str,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """Every annotated (task, Image tag) of the project as a ``Sample`` with instance masks.

    ``Sample.name`` is ``"task<id>"`` (or ``"task<id>-<tag>"`` for tasks with several images).
    ``progress(done, total)`` is called after each task. Tasks whose image cannot be fetched
    are skipped with a warning; a project with no mask annotations gives an empty list.
    """
    config = client.project(project_id).get("label_config") or ""
    data_keys = parse_label_config(config).image_data_keys if config else {}
    tasks = [t for t in client.tasks(project_id) if latest_annotation(t) is not None]
    samples: list[Sample] = []
    for done, task in enumerate(tasks, start=1):
        annotation = latest_annotation(task)
        assert annotation is not None
        by_image = task_masks(annotation)
        for to_name, masks in sorted(by_image.items()):
            key = data_keys.get(to_name)
            data = task.get("data") or {}
            if key is None and len(data) == 1:
                key = next(iter(data))
            if key is None or not isinstance(data.get(key), str):
                logger.warning("task %s: no image for tag %r", task.get("id"), to_name)
                continue
            name = f"task{task['id']}" if len(by_image) == 1 else f"task{task['id']}-{to_name}"
            try:
                image = client.image(data[key], task.get("id"))
            except ServiceError as exc:  # unreachable, refused, too large, not an image
                logger.warning("%s: skipped: %s", name, exc)
                continue
            samples.append(Sample(image, _fit_masks(masks, image.shape[:2], name), name))
        if progress is not None:
            progress(done, len(tasks))
    logger.info(
        "project %s: %d annotated tasks -> %d samples, %d instances",
        project_id,
        len(tasks),
        len(samples),
        sum(s.num_instances for s in samples),
    )
    return samples


def split_train_val(
    samples: Sequence[Sample], val_fraction: float
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/validation split by a hash of each sample's name.

    A sample is in validation when the first 8 bytes of sha1(name), as a fraction of 2**64,
    are below ``val_fraction``: membership does not depend on the other samples, so a task
    stays on its side as the project grows. With at least two samples both sides are
    non-empty (the samples nearest the threshold are moved).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")

    def score(sample: Sample) -> float:
        digest = hashlib.sha1(sample.name.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    ranked = sorted(samples, key=score)
    n_val = sum(1 for s in ranked if score(s) < val_fraction)
    if len(ranked) >= 2:
        n_val = min(max(n_val, 1), len(ranked) - 1)
    val, train = ranked[:n_val], ranked[n_val:]
    train.sort(key=lambda s: s.name)
    val.sort(key=lambda s: s.name)
    return train, val
