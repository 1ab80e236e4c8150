"""Segmentation and box metrics used by training, the benchmark and the user study (DESIGN §2).

Conventions: masks are (H, W) bool arrays; boxes are xyxy in continuous pixel coordinates
(a mask covering columns 3..7 has x0 = 3, x1 = 8). IoU of two empty sets is defined as 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two boolean masks of the same shape."""
    a, b = _as_bool_pair(a, b)
    union = np.count_nonzero(a | b)
    if union == 0:
        return 1.0
    return np.count_nonzero(a & b) / union


def boundary_dilation(shape: tuple[int, int], dilation_ratio: float = 0.02) -> int:
    """d = max(1, round(ratio · image diagonal)), the boundary band width in pixels."""
    h, w = shape
    return max(1, int(round(dilation_ratio * np.sqrt(h * h + w * w))))


def mask_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """The boundary band: the mask minus its erosion by a 3x3 kernel applied d times.

    The image border counts as background (the mask is zero-padded before eroding), as in
    HQ-SAM's evaluation.
    """
    mask = np.asarray(mask, dtype=bool)
    d = boundary_dilation(mask.shape, dilation_ratio)
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:-1, 1:-1]
    return mask & ~eroded.astype(bool)


def boundary_iou(a: np.ndarray, b: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU: the IoU of the two masks' boundary bands."""
    a, b = _as_bool_pair(a, b)
    return mask_iou(mask_boundary(a, dilation_ratio), mask_boundary(b, dilation_ratio))


def stability(masks: Sequence[np.ndarray]) -> float:
    """ST = (1/B) Σ_i IoU(M_i, ∪_j M_j) over B predictions of one target."""
    if len(masks) == 0:
        raise ValueError("stability needs at least one mask")
    stack = np.stack([np.asarray(m, dtype=bool) for m in masks])
    union = stack.any(axis=0)
    return float(np.mean([mask_iou(m, union) for m in stack]))


def box_area(box_xyxy: np.ndarray) -> float:
    x0, y0, x1, y1 = np.asarray(box_xyxy, dtype=np.float64)
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def box_iou(a_xyxy: np.ndarray, b_xyxy: np.ndarray) -> float:
    """IoU of two xyxy boxes; 0 when both are degenerate."""
    a = np.asarray(a_xyxy, dtype=np.float64)
    b = np.asarray(b_xyxy, dtype=np.float64)
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def box_iou_matrix(a_xyxy: np.ndarray, b_xyxy: np.ndarray) -> np.ndarray:
    """(N, M) IoUs between N boxes and M boxes (xyxy)."""
    a = np.asarray(a_xyxy, dtype=np.float64).reshape(-1, 4)[:, None]
    b = np.asarray(b_xyxy, dtype=np.float64).reshape(-1, 4)[None]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def greedy_matches(iou: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """One-to-one (row, column) pairs of an (N, M) IoU matrix, taken greedily in order of
    decreasing IoU (ties: row, then column) while the IoU is at least ``min_iou``."""
    iou = np.asarray(iou, dtype=np.float64)
    pairs: list[tuple[int, int]] = []
    rows: set[int] = set()
    columns: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        r, c = (int(v) for v in np.unravel_index(flat, iou.shape))
        if iou[r, c] < min_iou:
            break
        if r not in rows and c not in columns:
            rows.add(r)
            columns.add(c)
            pairs.append((r, c))
    return pairs


def mask_ap(
    gt_masks: Sequence[np.ndarray],
    pred_masks: Sequence[np.ndarray],
    pred_scores: Sequence[float],
) -> dict[str, float]:
    """COCO mask AP and AP50 of predictions for one multi-object image (pycocotools)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not gt_masks:
        raise ValueError("mask_ap needs ground-truth masks")
    h, w = np.asarray(gt_masks[0]).shape

    def rle(m: np.ndarray) -> dict:
        enc = mask_utils.encode(np.asfortranarray(np.asarray(m, dtype=np.uint8)))
        enc["counts"] = enc["counts"].decode("ascii")
        return enc

    annotations = []
    for i, m in enumerate(gt_masks):
        r = rle(m)
        annotations.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": r,
                "iscrowd": 0,
                "area": float(mask_utils.area(r)),
                "bbox": list(mask_utils.toBbox(r)),
            }
        )
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "height": h, "width": w}],
        "categories": [{"id": 1, "name": "object"}],
        "annotations": annotations,
    }
    coco.createIndex()
    dets = [
        {"image_id": 1, "category_id": 1, "segmentation": rle(m), "score": float(s)}
        for m, s in zip(pred_masks, pred_scores, strict=True)
    ]
    if not dets:
        return {"ap": 0.0, "ap50": 0.0}
    evaluator = COCOeval(coco, coco.loadRes(dets), iouType="segm")
    evaluator.params.maxDets = [1, 10, max(100, len(dets))]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"ap": float(evaluator.stats[0]), "ap50": float(evaluator.stats[1])}


def _as_bool_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b
