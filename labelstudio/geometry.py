"""Label Studio's region geometry in pixels: percent of the original image <-> pixel coordinates.

Regions give positions in **percent** of the original image as the browser shows it (EXIF
applied): keypoints ``x``, ``y``; rectangles their top-left ``x``, ``y``, ``width``, ``height``
and a ``rotation`` in degrees, clockwise on screen about the top-left corner (y points down),
applied in pixel space. Boxes are ``xyxy`` on pixel edges (a box hugging pixels 10..19 spans
10.0..20.0).
"""

from __future__ import annotations

import math

import numpy as np


def percent_to_pixels(points_pct: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 2) ``x, y`` in percent of a ``width`` x ``height`` image -> (N, 2) float64 pixels."""
    return np.asarray(points_pct, dtype=np.float64) / 100.0 * np.array([width, height])


def rectangle_to_xyxy(
    x: float,
    y: float,
    rect_width: float,
    rect_height: float,
    rotation: float,
    width: int,
    height: int,
) -> np.ndarray:
    """The axis-aligned box (4,) float64 ``xyxy`` in pixels enclosing a Label Studio rectangle
    (``x``, ``y``, ``rect_width``, ``rect_height`` in percent, ``rotation`` in degrees) on a
    ``width`` x ``height`` image; not clipped (``clip_box``)."""
    x0 = x / 100.0 * width
    y0 = y / 100.0 * height
    w = rect_width / 100.0 * width
    h = rect_height / 100.0 * height
    if rotation % 360.0 == 0.0:  # the corners as given: an inverted box stays inverted (dropped)
        return np.array([x0, y0, x0 + w, y0 + h], dtype=np.float64)
    theta = math.radians(rotation % 360.0)
    cos, sin = math.cos(theta), math.sin(theta)
    offsets = ((0.0, 0.0), (w, 0.0), (0.0, h), (w, h))
    xs = [x0 + dx * cos - dy * sin for dx, dy in offsets]
    ys = [y0 + dx * sin + dy * cos for dx, dy in offsets]
    return np.array([min(xs), min(ys), max(xs), max(ys)], dtype=np.float64)


def clip_box(box_xyxy: np.ndarray, width: int, height: int) -> tuple[np.ndarray | None, bool]:
    """``box_xyxy`` clipped to ``[0, width] x [0, height]`` and whether that changed it;
    ``(None, True)`` when nothing of it is left inside (zero area)."""
    clipped = np.array(
        [
            min(max(box_xyxy[0], 0.0), width),
            min(max(box_xyxy[1], 0.0), height),
            min(max(box_xyxy[2], 0.0), width),
            min(max(box_xyxy[3], 0.0), height),
        ],
        dtype=np.float64,
    )
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        return None, True
    return clipped, bool(np.any(np.abs(clipped - box_xyxy) > 1e-9))
