"""Prompt sampling shared by training (RTS) and evaluation (DESIGN §2).

Boxes are xyxy in continuous pixel coordinates; points are xy at pixel centres (column + 0.5,
row + 0.5) of the original image. All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .metrics import box_iou, box_iou_matrix


@dataclass(kw_only=True)
class Prompt:
    """A SAM prompt for one object, in pixels of the image it comes with: points (N, 2) float32
    xy with labels (N,) (1 positive, 0 negative; ``None``: all positive), a box (4,) float32
    xyxy, and/or mask logits (1, S/4, S/4) such as a previous ``low_res_logits``."""

    points_xy: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box_xyxy: np.ndarray | None = None
    mask_logits: np.ndarray | None = None


def gt_box(mask: np.ndarray) -> np.ndarray:
    """The tight xyxy box of a non-empty mask (a mask over columns 3..7 gives x0 = 3, x1 = 8)."""
    ys, xs = np.nonzero(np.asarray(mask, dtype=bool))
    if xs.size == 0:
        raise ValueError("gt_box of an empty mask")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def jitter_boxes(
    box_xyxy: np.ndarray, rng: np.random.Generator, noise_scale: float, n: int
) -> np.ndarray:
    """n noisy copies of a box: uniform noise on centre (± scale·w/2, ± scale·h/2) and size
    (± scale·w, ± scale·h), the box noise of HQ-SAM/Stable-SAM's evaluation."""
    x0, y0, x1, y1 = np.asarray(box_xyxy, dtype=np.float64)
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + h / 2
    u = rng.uniform(-1.0, 1.0, size=(n, 4)) * noise_scale
    ncx, ncy = cx + u[:, 0] * w / 2, cy + u[:, 1] * h / 2
    nw, nh = np.maximum(w + u[:, 2] * w, 1.0), np.maximum(h + u[:, 3] * h, 1.0)
    return np.stack([ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2], axis=1)


def noisy_box(
    box_xyxy: np.ndarray,
    rng: np.random.Generator,
    noise_scale: float = 0.4,
    iou_range: tuple[float, float] = (0.5, 1.0),
    image_size: tuple[int, int] | None = None,
    max_draws: int = 4096,
) -> np.ndarray:
    """A noisy version of ``box_xyxy`` whose IoU with it lies in ``iou_range`` = [lo, hi).

    (hi = 1.0 is inclusive.) Boxes are clipped to ``image_size`` (H, W) when given, before the
    IoU test. Raises ``ValueError`` when no draw within ``max_draws`` lands in the range.
    """
    lo, hi = iou_range
    box = np.asarray(box_xyxy, dtype=np.float64)
    drawn = 0
    while drawn < max_draws:
        batch = jitter_boxes(box, rng, noise_scale, 256)
        drawn += 256
        if image_size is not None:
            h, w = image_size
            batch[:, [0, 2]] = batch[:, [0, 2]].clip(0, w)
            batch[:, [1, 3]] = batch[:, [1, 3]].clip(0, h)
        ious = box_iou_matrix(batch, box)[:, 0]
        ok = (ious >= lo) & ((ious < hi) | (hi >= 1.0)) & (ious <= hi)
        valid = np.flatnonzero(ok & (batch[:, 2] > batch[:, 0]) & (batch[:, 3] > batch[:, 1]))
        if valid.size:
            return batch[valid[0]].astype(np.float32)
    raise ValueError(
        f"no noisy box with IoU in [{lo}, {hi}) after {max_draws} draws at scale {noise_scale}"
    )


def sample_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k positive points drawn uniformly (with replacement only if the mask is smaller than k)."""
    ys, xs = np.nonzero(np.asarray(mask, dtype=bool))
    if xs.size == 0:
        raise ValueError("cannot sample points from an empty mask")
    idx = rng.choice(xs.size, size=k, replace=xs.size < k)
    return np.stack([xs[idx] + 0.5, ys[idx] + 0.5], axis=1).astype(np.float32)


def coarse_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    band_ratio: float = 0.05,
    noise_sigma: float = 1.0,
    smooth_ratio: float = 0.02,
) -> np.ndarray:
    """A coarse version of ``mask``: smooth Gaussian noise flips pixels in its boundary band.

    The band is the mask's dilation minus its erosion by ``band_ratio`` of the object's box
    diagonal; inside it, the signed mask (+1/−1) plus spatially smoothed noise is thresholded at 0.
    """
    mask = np.asarray(mask, dtype=bool)
    x0, y0, x1, y1 = gt_box(mask)
    diag = float(np.hypot(x1 - x0, y1 - y0))
    r = max(1, int(round(band_ratio * diag)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    m8 = mask.astype(np.uint8)
    band = cv2.dilate(m8, kernel).astype(bool) & ~cv2.erode(m8, kernel).astype(bool)
    noise = rng.normal(0.0, noise_sigma, size=mask.shape).astype(np.float32)
    s = max(1, int(round(smooth_ratio * diag)))
    noise = cv2.GaussianBlur(noise, (0, 0), s)
    noise /= noise.std() + 1e-6
    signed = np.where(mask, 1.0, -1.0).astype(np.float32)
    out = mask.copy()
    out[band] = (signed + noise * noise_sigma)[band] > 0
    return out


__all__ = ["box_iou", "coarse_mask", "gt_box", "jitter_boxes", "noisy_box", "sample_points"]
