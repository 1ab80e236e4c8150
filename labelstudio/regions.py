"""Label Studio result regions: the prompting regions read, the mask regions written.

Interactive ``/predict`` calls carry ``params.context.result``: the regions the annotator placed
with the smart tools so far; a task's annotations and predictions hold rectangles in the same
shape (``parse_rectangle``). Keypoints (``keypointlabels``, ``is_positive`` may be absent =
positive) and rectangles (``rectanglelabels``, rotated about their top-left corner) give their
position in **percent** of the original image (``labelstudio.geometry`` turns it into pixels).
Regions are grouped by (label, image): each group is one object to segment and becomes one
``brushlabels`` region in the answer, or, in a ``PolygonLabels`` project, one
``polygonlabels`` region per connected part of the mask (``mask_regions``, the one way every
answer turns a mask into regions).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from labelstudio.brush import mask_to_rle
from labelstudio.errors import InvalidRegionError
from labelstudio.geometry import clip_box, rectangle_to_xyxy
from labelstudio.label_config import ControlTag
from labelstudio.polygon import (
    DEFAULT_MIN_PART_PX,
    DEFAULT_TOLERANCE_PX,
    mask_to_polygons,
    pixels_to_percent,
)

# Percent coordinates may carry float noise from the browser; beyond this they are outside.
PERCENT_TOLERANCE = 1e-3


class _KeypointValue(BaseModel):
    model_config = ConfigDict(extra="ignore")
    x: float
    y: float
    width: float | None = None  # the keypoint's drawn size in percent, unused
    keypointlabels: list[str] = []


class _RectangleValue(BaseModel):
    model_config = ConfigDict(extra="ignore")
    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0  # degrees, clockwise, about the top-left corner (x, y)
    rectanglelabels: list[str] = []


class ContextRegion(BaseModel):
    """One region of ``params.context.result`` as Label Studio sends it."""

    model_config = ConfigDict(extra="ignore")
    type: str
    value: dict[str, Any]
    from_name: str | None = None
    to_name: str | None = None
    is_positive: bool | None = None
    original_width: int | None = None
    original_height: int | None = None


@dataclass
class Keypoint:
    """A click: ``x``, ``y`` in percent of the original image."""

    x: float
    y: float
    positive: bool


@dataclass
class Rectangle:
    """A box: top-left ``x``, ``y`` and size in percent; ``rotation`` in degrees."""

    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0


@dataclass
class RegionGroup:
    """All prompting regions of one label on one image: one object to segment."""

    label: str
    to_name: str
    from_names: list[str] = field(default_factory=list)
    keypoints: list[Keypoint] = field(default_factory=list)
    rectangles: list[Rectangle] = field(default_factory=list)
    original_size: tuple[int, int] | None = None  # (width, height) as the browser reported it


def _field_errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in exc.errors()
    )


def _check_percent(name: str, value: float, index: int) -> None:
    if not math.isfinite(value) or value < -PERCENT_TOLERANCE or value > 100 + PERCENT_TOLERANCE:
        raise InvalidRegionError(
            f"region {index}: {name}={value} is outside the image (percent must be in [0, 100])"
        )


def _parse_keypoint(region: ContextRegion, index: int) -> tuple[str | None, Keypoint]:
    try:
        value = _KeypointValue.model_validate(region.value)
    except ValidationError as exc:
        raise InvalidRegionError(f"region {index} (keypointlabels): {_field_errors(exc)}") from exc
    _check_percent("x", value.x, index)
    _check_percent("y", value.y, index)
    positive = True if region.is_positive is None else region.is_positive
    label = value.keypointlabels[0] if value.keypointlabels else None
    return label, Keypoint(x=value.x, y=value.y, positive=positive)


def parse_rectangle(region: ContextRegion, index: int) -> tuple[str | None, Rectangle]:
    try:
        value = _RectangleValue.model_validate(region.value)
    except ValidationError as exc:
        raise InvalidRegionError(f"region {index} (rectanglelabels): {_field_errors(exc)}") from exc
    for name in ("x", "y", "width", "height", "rotation"):
        if not math.isfinite(getattr(value, name)):
            raise InvalidRegionError(f"region {index}: {name} is not a finite number")
    if value.width <= 0 or value.height <= 0:
        raise InvalidRegionError(
            f"region {index}: rectangle has zero or negative size "
            f"(width={value.width}, height={value.height}); draw it from corner to corner"
        )
    _check_percent("x", value.x, index)
    _check_percent("y", value.y, index)
    if value.rotation % 360 == 0:
        _check_percent("x + width", value.x + value.width, index)
        _check_percent("y + height", value.y + value.height, index)
    label = value.rectanglelabels[0] if value.rectanglelabels else None
    rect = Rectangle(value.x, value.y, value.width, value.height, value.rotation % 360)
    return label, rect


def parse_context(result: Any) -> list[RegionGroup]:
    """Group ``params.context.result`` by (label, to_name), in order of first appearance.

    Raises ``InvalidRegionError`` naming the region and the problem for malformed regions,
    coordinates outside the image, zero-area rectangles, unknown region types and regions
    without a label.
    """
    if not isinstance(result, list):
        raise InvalidRegionError("params.context.result must be a list of regions")
    if not result:
        raise InvalidRegionError("params.context.result is empty: place a keypoint or a rectangle")
    groups: dict[tuple[str, str], RegionGroup] = {}
    for index, raw in enumerate(result):
        try:
            region = ContextRegion.model_validate(raw)
        except ValidationError as exc:
            raise InvalidRegionError(f"region {index}: {_field_errors(exc)}") from exc
        kind = region.type.lower()
        if kind == "keypointlabels":
            label, prompt = _parse_keypoint(region, index)
        elif kind == "rectanglelabels":
            label, prompt = parse_rectangle(region, index)
        else:
            raise InvalidRegionError(
                f"region {index}: unsupported region type {region.type!r}; "
                "the backend takes keypointlabels and rectanglelabels"
            )
        if label is None:
            raise InvalidRegionError(f"region {index} ({kind}): no label selected")
        if not region.to_name:
            raise InvalidRegionError(f"region {index} ({kind}): to_name is missing")
        key = (label, region.to_name)
        group = groups.setdefault(key, RegionGroup(label=label, to_name=region.to_name))
        if region.from_name and region.from_name not in group.from_names:
            group.from_names.append(region.from_name)
        if region.original_width and region.original_height:
            group.original_size = (region.original_width, region.original_height)
        if isinstance(prompt, Keypoint):
            group.keypoints.append(prompt)
        else:
            group.rectangles.append(prompt)
    for group in groups.values():
        if not group.rectangles and not any(k.positive for k in group.keypoints):
            raise InvalidRegionError(
                f"label {group.label!r}: only negative keypoints; add a positive one or a rectangle"
            )
    return list(groups.values())


def rectangle_box(rect: Rectangle, width: int, height: int) -> np.ndarray:
    """Axis-aligned box (4,) float32 xyxy in pixels enclosing a (possibly rotated) LS rectangle,
    clipped to the image; ``InvalidRegionError`` when none of it is inside."""
    box, _ = clip_box(
        rectangle_to_xyxy(rect.x, rect.y, rect.width, rect.height, rect.rotation, width, height),
        width,
        height,
    )
    if box is None:
        raise InvalidRegionError("rectangle lies outside the image")
    return box.astype(np.float32)


def result_region(
    kind: str,
    value: dict[str, Any],
    from_name: str,
    to_name: str,
    width: int,
    height: int,
    score: float | None = None,
) -> dict[str, Any]:
    """A result region of type ``kind`` (e.g. ``brushlabels``) as Label Studio stores it."""
    region: dict[str, Any] = {
        "id": uuid.uuid4().hex[:10],
        "type": kind,
        "from_name": from_name,
        "to_name": to_name,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": value,
        "readonly": False,
    }
    if score is not None:
        region["score"] = float(score)
    return region


def rectangle_region(
    box_xyxy: Any,
    width: int,
    height: int,
    label: str,
    from_name: str,
    to_name: str,
    rotation: float = 0.0,
    region_id: str | None = None,
) -> dict[str, Any]:
    """A ``rectanglelabels`` region over the pixel box ``box_xyxy`` (x0, y0, x1, y1) of a
    ``width`` x ``height`` image, in percent, as Label Studio stores it."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    value = {
        "x": 100.0 * x0 / width,
        "y": 100.0 * y0 / height,
        "width": 100.0 * (x1 - x0) / width,
        "height": 100.0 * (y1 - y0) / height,
        "rotation": rotation,
        "rectanglelabels": [label],
    }
    region = result_region("rectanglelabels", value, from_name, to_name, width, height)
    if region_id is not None:
        region["id"] = region_id
    return region


def brush_region(
    rle: list[int],
    label: str,
    from_name: str,
    to_name: str,
    width: int,
    height: int,
    score: float | None = None,
) -> dict[str, Any]:
    """A ``brushlabels`` result region as Label Studio stores it."""
    value = {"format": "rle", "rle": rle, "brushlabels": [label]}
    return result_region("brushlabels", value, from_name, to_name, width, height, score)


def mask_regions(
    mask: np.ndarray,
    label: str,
    control: ControlTag,
    to_name: str,
    score: float | None = None,
    polygon_tolerance_px: float = DEFAULT_TOLERANCE_PX,
    polygon_min_part_px: int = DEFAULT_MIN_PART_PX,
) -> list[dict[str, Any]]:
    """The result regions of an (H, W) mask under ``control``: one brush region (even for an
    empty mask: Label Studio shows nothing), or one polygon region per part (none for an empty
    mask), all with ``label``."""
    height, width = mask.shape
    if control.tag == "polygonlabels":
        polygons = mask_to_polygons(mask, polygon_tolerance_px, polygon_min_part_px)
        values = [
            {
                "points": pixels_to_percent(p, width, height),
                "closed": True,
                "polygonlabels": [label],
            }
            for p in polygons
        ]
        return [
            result_region("polygonlabels", value, control.name, to_name, width, height, score)
            for value in values
        ]
    if control.tag != "brushlabels":
        raise ValueError(f"no mask output for a <{control.tag}> control")
    rle = mask_to_rle(mask)
    return [brush_region(rle, label, control.name, to_name, width, height, score)]
