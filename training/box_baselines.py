"""Baselines that need no model: OpenCV's GrabCut (from a box or from clicks) and the filled
box (the floor).

- ``GrabCut``: ``cv2.grabCut`` initialised from the box (``GC_INIT_WITH_RECT``: outside
  sure background, inside probably foreground), or in its click mode from seeds
  (``segment_clicks``: each click a disk of sure foreground or background, the box if any as
  its rectangle, the rest probably background; ``GC_INIT_WITH_MASK``),
  ``GRABCUT_ITERATIONS`` (5) iterations, the probable and sure foreground as the mask.
  GrabCut's cost grows with the pixels (~1-2 s at 1024 px on this CPU), so it runs at most
  ``max_side`` px on the long side (the click loop's GrabCut does the same) and its mask is
  scaled back with nearest-neighbour interpolation.
- ``filled_box``: the box itself as the mask, the score a method must beat to have used the
  pixels at all.

Boxes ``box_xyxy`` (4,) and clicks ``points_xy`` (k, 2) are in pixels of the original image,
boxes with exclusive corners, as ``stable_sam.prompts.gt_box`` / ``noisy_box`` /
``sample_points`` give them.
"""

from __future__ import annotations

import contextlib
import math

import cv2
import numpy as np

GRABCUT_ITERATIONS = 5
GRABCUT_MAX_SIDE = 512
GRABCUT_SEED_RADIUS = 5  # px at the resolution GrabCut runs at: a click's sure-label disk


def box_pixels(
    box_xyxy: np.ndarray, hw: tuple[int, int], scale: float = 1.0
) -> tuple[int, int, int, int]:
    """The pixel rows and columns (y0, y1, x0, x1), ends exclusive, that a box covers at
    ``scale`` times the image's resolution; at least one pixel, inside the (h, w) image."""
    h, w = hw
    x0, y0, x1, y1 = (float(v) * scale for v in box_xyxy)
    c0, r0 = min(max(0, math.floor(x0)), w - 1), min(max(0, math.floor(y0)), h - 1)
    c1, r1 = max(c0 + 1, min(w, math.ceil(x1))), max(r0 + 1, min(h, math.ceil(y1)))
    return r0, r1, c0, c1


def filled_box(box_xyxy: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The (h, w) bool mask of the pixels the box covers."""
    r0, r1, c0, c1 = box_pixels(box_xyxy, hw)
    mask = np.zeros(hw, dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


class GrabCut:
    """GrabCut on one image (module doc): ``segment(box_xyxy) -> (H, W) bool``, from clicks
    (and a box) ``segment_clicks``, or from a seed map ``segment_seeds(seeds)``."""

    def __init__(
        self,
        image_rgb: np.ndarray,
        iterations: int = GRABCUT_ITERATIONS,
        max_side: int = GRABCUT_MAX_SIDE,
    ) -> None:
        h, w = image_rgb.shape[:2]
        self.size = (h, w)
        self.iterations = iterations
        self.scale = min(1.0, max_side / max(h, w))
        bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
        if self.scale < 1.0:
            small = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))
            bgr = cv2.resize(bgr, small, interpolation=cv2.INTER_AREA)
        self.image = bgr

    def segment(self, box_xyxy: np.ndarray) -> np.ndarray:
        """GrabCut's mask for one box, at the original size. Where GrabCut cannot run (a box
        that leaves no background to model, or a box of one pixel), the filled box."""
        small_hw = self.image.shape[:2]
        r0, r1, c0, c1 = box_pixels(box_xyxy, small_hw, self.scale)
        labels = np.zeros(small_hw, np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        try:
            cv2.grabCut(
                self.image,
                labels,
                (c0, r0, c1 - c0, r1 - r0),
                bgd,
                fgd,
                self.iterations,
                cv2.GC_INIT_WITH_RECT,
            )
        except cv2.error:
            return filled_box(box_xyxy, self.size)
        return self.foreground(labels)

    def segment_clicks(
        self,
        points_xy: np.ndarray,
        labels: np.ndarray,
        box_xyxy: np.ndarray | None = None,
    ) -> np.ndarray:
        """GrabCut in its click mode: ``points_xy`` (k, 2) in pixels of the original image as
        disks of sure foreground (``labels`` 1) or background (0) of ``GRABCUT_SEED_RADIUS``;
        the box, if any, as its rectangle (outside sure background, inside probably
        foreground); without one, everything else probably background."""
        small_hw = self.image.shape[:2]
        seeds = np.full(small_hw, cv2.GC_PR_BGD, np.uint8)
        if box_xyxy is not None:
            r0, r1, c0, c1 = box_pixels(box_xyxy, small_hw, self.scale)
            seeds[:] = cv2.GC_BGD
            seeds[r0:r1, c0:c1] = cv2.GC_PR_FGD
        for (x, y), label in zip(np.asarray(points_xy), np.asarray(labels), strict=True):
            centre = (int(x * self.scale), int(y * self.scale))
            value = cv2.GC_FGD if label else cv2.GC_BGD
            cv2.circle(seeds, centre, GRABCUT_SEED_RADIUS, value, -1)
        return self.segment_seeds(seeds)

    def segment_seeds(self, seeds: np.ndarray) -> np.ndarray:
        """GrabCut's mask from a seed map at GrabCut's resolution (``image.shape[:2]``, values
        ``cv2.GC_BGD`` / ``GC_FGD`` / ``GC_PR_BGD`` / ``GC_PR_FGD``; ``GC_INIT_WITH_MASK``),
        at the original size. Where GrabCut cannot run (no background or no foreground sample
        to model), the seeds' own foreground."""
        labels = np.array(seeds, dtype=np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        with contextlib.suppress(cv2.error):
            cv2.grabCut(self.image, labels, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        return self.foreground(labels)

    def foreground(self, labels: np.ndarray) -> np.ndarray:
        """The sure and probable foreground of a GrabCut label map, at the original size."""
        small = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)
        if small.shape != self.size:
            small = cv2.resize(small, self.size[::-1], interpolation=cv2.INTER_NEAREST)
        return small.astype(bool)


__all__ = [
    "GRABCUT_ITERATIONS",
    "GRABCUT_MAX_SIDE",
    "GRABCUT_SEED_RADIUS",
    "GrabCut",
    "box_pixels",
    "filled_box",
]
