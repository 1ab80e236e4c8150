"""Masks as Label Studio polygons (``PolygonLabels`` projects) and back.

A Label Studio polygon is one closed ring of points in percent of the image; a region holds one
ring, so a mask becomes **one polygon per connected part** (8-connected), each simplified to
``tolerance_px`` (Douglas-Peucker, ``cv2.approxPolyDP``):

- **Coordinates**: vertices sit at the centres of the mask's boundary pixels (pixel ``i`` spans
  ``[i, i + 1)``, so its centre is ``i + 0.5``), converted to percent of the image as Label
  Studio's own converters read them back (``x% / 100 * width``).
- **Holes** are cut into their part's ring by a zero-width bridge: the ring runs along the outer
  boundary to the vertex nearest the hole, around the hole the other way, and back along the
  same bridge. Its fill (a canvas's nonzero or even-odd rule, as the browser draws it; a
  scan-line fill, as COCO converters rasterise it) leaves the hole empty, so a ring-shaped
  object stays a ring in one editable region instead of a filled disc.
- **Specks**: parts under ``min_part_px`` pixels are dropped, except the largest part, which is
  always kept so that any non-empty mask gives a polygon. A part too thin to enclose an area
  through pixel centres (a 1 px dot or line) becomes the box of its pixel centres grown by a
  quarter pixel.

``polygons_to_mask`` rasterises polygons back (outline included, as PIL's and OpenCV's polygon
fills do) for the round-trip checks; ``bench/bench_polygon_tolerance.py`` chose the tolerance.
"""

from __future__ import annotations

import cv2
import numpy as np

DEFAULT_TOLERANCE_PX = 0.5  # chosen by bench/bench_polygon_tolerance.py (docs/BENCHMARKS.md)
DEFAULT_MIN_PART_PX = 16


def mask_to_polygons(
    mask: np.ndarray,
    tolerance_px: float = DEFAULT_TOLERANCE_PX,
    min_part_px: int = DEFAULT_MIN_PART_PX,
) -> list[np.ndarray]:
    """The polygons (each (N, 2) float64 ``x, y`` in pixels, N >= 3) of an (H, W) mask, largest
    part first; ``[]`` for an empty mask."""
    mask = np.ascontiguousarray(np.asarray(mask, dtype=bool)).astype(np.uint8)
    if not mask.any():
        return []
    # RETR_CCOMP: outer boundaries, each followed (through the hierarchy) by its holes.
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    links = hierarchy[0]
    parts: list[tuple[int, np.ndarray]] = []
    for index, contour in enumerate(contours):
        if links[index][3] != -1:
            continue  # a hole: handled with its outer boundary
        part = np.zeros_like(mask)
        cv2.drawContours(part, contours, index, 1, thickness=cv2.FILLED)
        area = int((part & mask).sum())
        holes = []
        child = links[index][2]
        while child != -1:
            holes.append(contours[child])
            child = links[child][0]
        parts.append((area, _part_ring(contour, holes, tolerance_px)))
    parts.sort(key=lambda item: -item[0])
    return [ring for k, (area, ring) in enumerate(parts) if k == 0 or area >= min_part_px]


def _simplify(contour: np.ndarray, tolerance_px: float) -> np.ndarray:
    """An OpenCV contour (N, 1, 2) int -> (M, 2) float64 at pixel centres, simplified."""
    if tolerance_px > 0 and len(contour) > 3:
        contour = cv2.approxPolyDP(contour, tolerance_px, closed=True)
    return contour.reshape(-1, 2).astype(np.float64) + 0.5


def _part_ring(outer: np.ndarray, holes: list[np.ndarray], tolerance_px: float) -> np.ndarray:
    ring = _simplify(outer, tolerance_px)
    if len(ring) < 3 or abs(_signed_area(ring)) < 1.0:
        # A dot or a 1-2 px line encloses (almost) nothing through pixel centres: the box of
        # its pixel centres, grown by a quarter pixel so that it has an area to show.
        xy = outer.reshape(-1, 2).astype(np.float64) + 0.5
        (x0, y0), (x1, y1) = xy.min(axis=0) - 0.25, xy.max(axis=0) + 0.25
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    for hole in holes:
        hole_ring = _simplify(hole, tolerance_px)
        if len(hole_ring) < 3:
            continue  # a hole of a pixel or two: not worth a bridge
        ring = _bridge(ring, hole_ring)
    return ring


def _bridge(ring: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """``ring`` with ``hole`` cut in through a zero-width bridge between their nearest vertices,
    the hole traversed against the ring's orientation (so its winding number is 0)."""
    distances = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(axis=2)
    i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
    same_turn = np.sign(_signed_area(ring)) == np.sign(_signed_area(hole))
    around = np.roll(hole, -j, axis=0)  # starts at the bridge's end
    if same_turn:
        around = np.concatenate([around[:1], around[1:][::-1]])
    return np.concatenate([ring[: i + 1], around, around[:1], ring[i:]])


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def polygons_to_mask(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterise polygons in pixels to an (H, W) bool mask: the pixels whose centres lie inside
    or on a polygon (the outline included, as PIL's and OpenCV's polygon fills do), each
    polygon on its own and the results united."""
    out = np.zeros((height, width), bool)
    for polygon in polygons:
        layer = np.zeros((height, width), np.uint8)
        # OpenCV's integer coordinates are pixel centres; 4 fractional bits keep edge vertices.
        points = np.round((np.asarray(polygon, np.float64) - 0.5) * 16).astype(np.int32)
        cv2.fillPoly(layer, [points], 1, lineType=cv2.LINE_8, shift=4)
        out |= layer.astype(bool)
    return out


def pixels_to_percent(polygon: np.ndarray, width: int, height: int) -> list[list[float]]:
    """(N, 2) pixels -> ``[[x%, y%], ...]`` in [0, 100], as Label Studio stores polygon points."""
    scale = np.array([100.0 / width, 100.0 / height])
    percent = (np.asarray(polygon, np.float64) * scale).clip(0.0, 100.0)
    return [[round(float(x), 4), round(float(y), 4)] for x, y in percent]


def percent_to_pixels(points: list[list[float]], width: int, height: int) -> np.ndarray:
    """Label Studio polygon points ``[[x%, y%], ...]`` -> (N, 2) float64 pixels."""
    return np.asarray(points, np.float64).reshape(-1, 2) / 100.0 * np.array([width, height])


__all__ = [
    "DEFAULT_MIN_PART_PX",
    "DEFAULT_TOLERANCE_PX",
    "mask_to_polygons",
    "percent_to_pixels",
    "pixels_to_percent",
    "polygons_to_mask",
]
