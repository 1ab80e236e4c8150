"""Box quality: how close the annotators' boxes are to the ground-truth boxes.

IoU of each matched user box with its object's ground-truth box (``stable_sam.metrics.box_iou``),
summarised overall, per annotator and per object (mean, median, histogram), the annotation time
(Label Studio's ``lead_time``, seconds) where the export has it, and the **equivalent noise
scale**: the noise scale of ``stable_sam.prompts.noisy_box`` (DESIGN §2: uniform noise on the box
centre, width and height) at which simulated boxes around the same ground-truth boxes reach the
same mean IoU as the annotators. It is found by bisection with common random numbers (the same
seed at every scale, which makes the simulated mean IoU a monotone function of the scale up to
sampling noise). The simulation uses the noise model without the training-time acceptance rule
(IoU >= 0.5 with the GT box): with that filter a mean IoU below ~0.6 could not be reached.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stable_sam import metrics, prompts
from training.user_study.matching import MatchedBox

logger = logging.getLogger(__name__)

QUICK_BOX_S = 5.0  # seconds; the paper's time budget per box
HISTOGRAM_EDGES = np.linspace(0.0, 1.0, 11)  # ten bins of 0.1; IoU = 1.0 falls in the last


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, median, std, min, max of ``values`` (``None`` entries for an empty list)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def iou_histogram(ious: Sequence[float], edges: np.ndarray = HISTOGRAM_EDGES) -> dict[str, list]:
    """Counts of ``ious`` in ``[e_i, e_i+1)`` bins (the last bin closed): ``{edges, counts}``."""
    counts, _ = np.histogram(np.asarray(ious, dtype=np.float64), bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def simulated_mean_iou(
    gt_boxes: Sequence[np.ndarray],
    image_sizes: Sequence[tuple[int, int]],
    noise_scale: float,
    samples_per_box: int = 64,
    seed: int = 0,
) -> float:
    """Mean box IoU with ``gt`` of ``samples_per_box`` noisy copies of each GT box.

    The copies come from ``stable_sam.prompts.jitter_boxes`` (the noise model of ``noisy_box``)
    and are clipped to their image (H, W), as user boxes are; no IoU filter.
    """
    rng = np.random.default_rng(seed)
    ious = []
    for box, (h, w) in zip(gt_boxes, image_sizes, strict=True):
        noisy = prompts.jitter_boxes(box, rng, noise_scale, samples_per_box)
        noisy[:, [0, 2]] = noisy[:, [0, 2]].clip(0, w)
        noisy[:, [1, 3]] = noisy[:, [1, 3]].clip(0, h)
        ious.append(metrics.box_iou_matrix(noisy, box)[:, 0])
    return float(np.mean(np.concatenate(ious)))


def equivalent_noise_scale(
    mean_iou: float,
    gt_boxes: Sequence[np.ndarray],
    image_sizes: Sequence[tuple[int, int]],
    samples_per_box: int = 64,
    max_scale: float = 2.0,
    tolerance: float = 0.005,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``noisy_box`` noise scale whose simulated mean IoU equals ``mean_iou``.

    ``gt_boxes``: (4,) xyxy px, the ground-truth boxes the annotators drew around;
    ``image_sizes``: their images' (H, W). Returns ``{scale, bound, simulated_mean_iou}``:
    ``bound`` is ``None`` when bracketed, ``">max"`` when even ``max_scale`` is better than
    the annotators (``scale`` = ``max_scale``).
    """
    if not gt_boxes:
        return {"scale": None, "bound": None, "simulated_mean_iou": None}

    def sim(scale: float) -> float:
        return simulated_mean_iou(gt_boxes, image_sizes, scale, samples_per_box, seed)

    if mean_iou >= 1.0:
        return {"scale": 0.0, "bound": None, "simulated_mean_iou": 1.0}
    hi_iou = sim(max_scale)
    if mean_iou <= hi_iou:
        return {"scale": max_scale, "bound": ">max", "simulated_mean_iou": hi_iou}
    lo, hi = 0.0, max_scale
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        if sim(mid) > mean_iou:
            lo = mid
        else:
            hi = mid
    scale = 0.5 * (lo + hi)
    return {"scale": scale, "bound": None, "simulated_mean_iou": sim(scale)}


@dataclass
class BoxQuality:
    """Box IoU summaries; ``per_object`` keyed ``(image_key, object_id)``."""

    overall: dict[str, Any] = field(default_factory=dict)
    histogram: dict[str, list] = field(default_factory=dict)
    per_annotator: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_object: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    lead_time: dict[str, Any] = field(default_factory=dict)


def box_quality(
    matched: Sequence[MatchedBox],
    gt_boxes: dict[tuple[str, str], np.ndarray],
    image_sizes: dict[str, tuple[int, int]],
    noise_samples: int = 4096,
    seed: int = 0,
) -> BoxQuality:
    """Summarise the IoU of ``matched`` boxes; ``gt_boxes`` maps (image, object) to its GT box.

    ``noise_samples``: about how many simulated boxes each equivalent-noise-scale evaluation
    draws (spread over the group's boxes, at least 4 per box).
    """
    result = BoxQuality()
    ious = [m.box_iou for m in matched]
    result.overall = summarize(ious)
    result.histogram = iou_histogram(ious)
    result.lead_time = summarize([m.box.lead_time_s for m in matched])
    times = [m.box.lead_time_s for m in matched if m.box.lead_time_s is not None]
    # the paper's participants drew each box in under 5 s
    result.lead_time["share_within_5s"] = (
        float(np.mean([t <= QUICK_BOX_S for t in times])) if times else None
    )

    def noise_scale_for(group: Sequence[MatchedBox]) -> dict[str, Any]:
        if not group:
            return {"scale": None, "bound": None, "simulated_mean_iou": None}
        keys = [(m.image_key, m.object_id) for m in group]
        return equivalent_noise_scale(
            float(np.mean([m.box_iou for m in group])),
            [gt_boxes[k] for k in keys],
            [image_sizes[k[0]] for k in keys],
            samples_per_box=max(4, -(-noise_samples // len(group))),
            seed=seed,
        )

    result.overall["equivalent_noise_scale"] = noise_scale_for(matched)
    by_annotator: dict[str, list[MatchedBox]] = defaultdict(list)
    by_object: dict[tuple[str, str], list[MatchedBox]] = defaultdict(list)
    for m in matched:
        by_annotator[m.box.annotator].append(m)
        by_object[(m.image_key, m.object_id)].append(m)
    for who in sorted(by_annotator):
        group = by_annotator[who]
        stats = summarize([m.box_iou for m in group])
        stats["histogram"] = iou_histogram([m.box_iou for m in group])["counts"]
        stats["lead_time"] = summarize([m.box.lead_time_s for m in group])
        stats["equivalent_noise_scale"] = noise_scale_for(group)
        result.per_annotator[who] = stats
    for key in sorted(by_object):
        group = by_object[key]
        stats = summarize([m.box_iou for m in group])
        stats["annotators"] = sorted({m.box.annotator for m in group})
        result.per_object[key] = stats
    return result
