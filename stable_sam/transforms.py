"""Coordinate and image transforms between original images and SAM's square input frame.

SAM resizes the longest side to S (1024, or 256 for the mini SAM), pads to S x S, and predicts
low-resolution logits at S/4 x S/4 over the padded frame. SAM 2 resizes the whole image to S x S
(``square=True`` below: no padding, the aspect ratio not kept), as ``sam2``'s ``SAM2Transforms``.
"""

from __future__ import annotations

import cv2
import numpy as np


def input_size(original_size: tuple[int, int], side: int, square: bool = False) -> tuple[int, int]:
    """(h, w) after resizing (H, W) so that its longest side is ``side`` (``square``: to
    ``side`` x ``side``)."""
    if square:
        return side, side
    h, w = original_size
    scale = side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_side(image: np.ndarray, side: int, square: bool = False) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image so its longest side is ``side`` (``square``: to ``side``
    x ``side``); area filter downscaling."""
    h, w = input_size(image.shape[:2], side, square)
    if (h, w) == image.shape[:2]:
        return image
    shrinking = h * w < image.shape[0] * image.shape[1]
    return cv2.resize(
        image, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    )


def scale_coords(
    coords_xy: np.ndarray, original_size: tuple[int, int], side: int, square: bool = False
) -> np.ndarray:
    """Map (..., 2) xy pixel coordinates of the original image into the resized input frame."""
    h, w = original_size
    nh, nw = input_size(original_size, side, square)
    out = np.asarray(coords_xy, dtype=np.float32).copy()
    out[..., 0] *= nw / w
    out[..., 1] *= nh / h
    return out


def scale_boxes(
    boxes_xyxy: np.ndarray, original_size: tuple[int, int], side: int, square: bool = False
) -> np.ndarray:
    """Map (..., 4) xyxy boxes of the original image into the resized input frame."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float32)
    corners = boxes.reshape(*boxes.shape[:-1], 2, 2)
    return scale_coords(corners, original_size, side, square).reshape(boxes.shape)


def low_res_to_original(
    logits: np.ndarray, original_size: tuple[int, int], side: int, square: bool = False
) -> np.ndarray:
    """Resample (S/4, S/4) low-res logits to the original (H, W), in one bilinear warp.

    Equivalent to SAM's ``postprocess_masks`` (upsample to S, crop the unpadded part, resize to
    the original) up to interpolation details, at a fraction of the cost for large images.
    ``square``: SAM 2's frame, the whole (S/4, S/4) grid stretched onto (H, W).
    """
    h, w = original_size
    nh, nw = input_size(original_size, side, square)
    low = side / logits.shape[-1]  # input pixels per low-res pixel (4)
    sx, sy = nw / (w * low), nh / (h * low)
    # dst pixel centre (x + 0.5) -> src pixel centre coordinates in the low-res grid.
    matrix = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5]], dtype=np.float64)
    return cv2.warpAffine(
        logits.astype(np.float32),
        matrix,
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def mask_to_low_res_logits(
    mask: np.ndarray, side: int, magnitude: float = 8.0, square: bool = False
) -> np.ndarray:
    """A binary (H, W) mask as a SAM mask prompt: (1, S/4, S/4) logits of ±``magnitude``."""
    h, w = mask.shape
    nh, nw = input_size((h, w), side, square)
    low = side // 4
    lh, lw = max(1, round(nh / 4)), max(1, round(nw / 4))
    small = cv2.resize(mask.astype(np.float32), (lw, lh), interpolation=cv2.INTER_AREA)
    out = np.full((low, low), -magnitude, dtype=np.float32)
    out[:lh, :lw] = np.where(small >= 0.5, magnitude, -magnitude)
    return out[None]
