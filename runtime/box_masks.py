"""A task's boxes -> mask regions: one mask per object, through one model version.

The one conversion behind the batch ``/predict`` (the web process, Label Studio's "Retrieve
predictions") and the project-wide conversion job (``training.conversion``, on RQ workers):
the task's sources and rectangles and the objects they outline (``runtime.task_boxes``), the
images loaded once each (``runtime.image_cache``), the boxes decoded a few at a time, one
consensus mask per object, and the result regions the labeling config asks for (a brush
region, or polygons: ``labelstudio.regions.mask_regions``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labelstudio.errors import InvalidRequestError, ServiceError
from labelstudio.label_config import ControlTag, LabelConfig
from labelstudio.regions import mask_regions
from runtime.image_cache import ImageLoader, LoadedImage
from runtime.task_boxes import (
    TaskBox,
    box_image_names,
    consensus_mask,
    group_boxes,
    task_boxes,
    task_sources,
)

logger = logging.getLogger(__name__)

BOX_DECODE_CHUNK = 8  # boxes decoded at once: each mask is a full-size array
# What reading a task JSON of an unexpected shape may still raise: the converter checks the
# shapes it relies on, and catches these while it reads a task, so that one task never fails
# the others.
MALFORMED_TASK = (TypeError, ValueError, KeyError, AttributeError, IndexError)


@dataclass
class BoxMasks:
    """What converting one task's boxes gave.

    ``answer``: ``{result, score, model_version}`` as Label Studio stores a prediction, or
    ``None`` when the task has nothing to convert (``reason`` says why: no boxes, no usable box,
    its image cannot be had, it is malformed). ``error``: what made the task fail (its image
    could not be had, its JSON is malformed), ``None`` when it merely has nothing to convert.
    ``objects``: masks made; ``boxes``: boxes used; ``skipped``: boxes left out, by reason.
    """

    answer: dict[str, Any] | None = None
    reason: str = ""
    objects: int = 0
    boxes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    error: Exception | None = None


@dataclass
class BoxConverter:
    """Turns tasks' boxes into mask regions with ``predictor`` and ``plugins`` (served as
    ``model_version``), ignoring predictions of ``own_versions`` (our masks already).

    ``slot``: held around each model call (the web process's MODEL_CONCURRENCY slots).
    """

    predictor: Any  # stable_sam.StableSamPredictor
    plugins: Any  # stable_sam.StableSamPlugins, or None for the model's own
    model_version: str
    images: ImageLoader
    own_versions: Collection[str] = ()
    max_boxes: int | None = None
    polygon_tolerance_px: float = 0.5
    polygon_min_part_px: int = 16
    slot: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext

    def convert(self, task: dict[str, Any], config: LabelConfig) -> BoxMasks:
        """The mask regions of ``task``'s boxes (``BoxMasks``); never raises for the task's
        content: bad boxes are skipped and counted, a missing image or a malformed task is the
        ``reason`` and the ``error``."""
        out = BoxMasks()
        try:
            sources = task_sources(task, {self.model_version, *self.own_versions})
            to_names = box_image_names(sources) & set(config.image_data_keys)
            if not to_names:
                out.reason = "no rectangles"
                return out
            images = {
                name: task_image(self.images, task, config, name) for name in sorted(to_names)
            }
            sizes = {n: (i.width, i.height) for n, i in images.items()}
            boxes = task_boxes(sources, sizes, max_boxes=self.max_boxes)
        except ServiceError as exc:
            out.reason, out.error = f"image not loaded: {exc.detail}", exc
            return out
        except MALFORMED_TASK as exc:  # the task JSON comes from the network
            out.reason = f"the task is malformed ({type(exc).__name__}: {exc})"
            out.error = exc
            return out
        out.skipped = boxes.skipped
        groups = group_boxes(boxes.sources)
        started = time.perf_counter()
        regions: list[dict[str, Any]] = []
        scores: list[float] = []
        for name, image in images.items():
            here = []  # the image's objects whose label a mask tag offers, with that tag
            for group in groups:
                if group[0].to_name != name:
                    continue
                try:
                    here.append((group, config.mask_control_for(name, group[0].label)))
                except ServiceError as exc:  # before any model work on it
                    # One reason for every such label: labels come from the network.
                    out.skipped["label no mask tag offers"] += len(group)
                    logger.info("task %s: %s", task.get("id"), exc.detail)
            for chunk in decode_chunks(here, BOX_DECODE_CHUNK):
                for group, control, mask, score in self._decode(image, chunk):
                    regions += self._regions(group, control, name, mask, score)
                    scores.append(score)
                    out.boxes += len(group)
        out.objects = len(scores)
        if not scores:
            out.reason = f"no usable box (skipped: {dict(out.skipped) or 'none'})"
            return out
        logger.info(
            "task %s: %d boxes -> %d objects in %.0f ms (skipped: %s; %s)",
            task.get("id"), out.boxes, out.objects, (time.perf_counter() - started) * 1000,
            dict(out.skipped) or "none", self.model_version,
        )  # fmt: skip
        out.answer = {
            "result": regions,
            "score": float(np.mean(scores)),
            "model_version": self.model_version,
        }
        return out

    def _decode(
        self, image: LoadedImage, chunk: Sequence[tuple[list[TaskBox], ControlTag]]
    ) -> list[tuple[list[TaskBox], ControlTag, np.ndarray, float]]:
        """Each object of ``chunk`` with its consensus mask and score: the predicted IoU of a
        lone box's mask, the agreement of several."""
        flat = [b for group, _ in chunk for b in group]
        with self.slot():
            batch = self.predictor.predict_batch(
                image.rgb,
                boxes_xyxy=np.stack([b.box_xyxy for b in flat]).astype(np.float32),
                image_key=image.sha256,
                plugins=self.plugins,
            )
        assert batch.masks is not None
        decoded, start = [], 0
        for group, control in chunk:
            masks = batch.masks[start : start + len(group), 0]
            predicted = batch.scores[start : start + len(group), 0]
            start += len(group)
            mask, agreement = consensus_mask(masks)
            score = float(predicted[0]) if len(group) == 1 else agreement
            decoded.append((group, control, mask, score))
        return decoded

    def _regions(
        self,
        group: list[TaskBox],
        control: ControlTag,
        to_name: str,
        mask: np.ndarray,
        score: float,
    ) -> list[dict[str, Any]]:
        notes = []
        if len(group) > 1:
            notes.append(f"consensus of {len(group)} boxes, agreement {score:.2f}")
        if any(b.rotated for b in group):
            notes.append("rotated rectangle: its axis-aligned hull was used")
        regions = mask_regions(
            mask, group[0].label, control, to_name, score,
            self.polygon_tolerance_px, self.polygon_min_part_px,
        )  # fmt: skip
        for region in regions:
            if notes:
                region["meta"] = {"text": notes}
        return regions


def task_image(
    images: ImageLoader, task: dict[str, Any], config: LabelConfig, to_name: str
) -> LoadedImage:
    """The image ``to_name`` of ``task`` (the data field its ``<Image>`` tag names), loaded."""
    data_key = config.image_key(to_name)
    data = task.get("data")
    if not isinstance(data, dict) or not isinstance(data.get(data_key), str):
        raise InvalidRequestError(
            f"task {task.get('id')} has no data field {data_key!r} holding an image URL "
            f'(the <Image name="{to_name}" value="${data_key}"> of the config)'
        )
    return images.load(data[data_key], task.get("id"))


def decode_chunks(items: list, max_boxes: int) -> list[list]:
    """``(group, control)`` items in runs of at most ``max_boxes`` boxes (a larger group alone)."""
    runs: list[list] = []
    size = 0
    for item in items:
        if runs and size + len(item[0]) <= max_boxes:
            runs[-1].append(item)
            size += len(item[0])
        else:
            runs.append([item])
            size = len(item[0])
    return runs
