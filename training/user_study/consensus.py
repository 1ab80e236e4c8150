"""The consensus of several annotators against one annotator: what a crowd's boxes are worth.

For an object boxed by B >= 2 annotators, each model's B masks (one per annotator box, the
``user`` masks of ``segmentation``) are combined exactly as the backend combines crowd boxes
(``runtime.task_boxes.consensus_mask``: pixel majority, a pixel is in when at least half the B
masks have it; agreement = mean IoU of the B masks with the consensus), and the consensus mask
is scored against the ground truth like any other mask (``training.evaluation.score_object``).

Per model, over the objects with B >= 2 only, so that both numbers cover the same objects:
the one-annotator mIoU / mBIoU (mean over objects of the mean over the object's B masks, every
object weighing the same, as in Table 3) beside the consensus mIoU / mBIoU (mean over objects of
the consensus mask's IoU), the gain in points, the mean agreement, and how many objects and
boxes that is. Objects with a single box have no consensus; they are counted, not compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.task_boxes import consensus_mask
from training.evaluation import ObjectScore, score_object

CONSENSUS = "consensus"  # the per-object score key of the consensus mask (objects with B >= 2)
MIN_ANNOTATORS = 2  # a consensus of one box is that box


@dataclass(frozen=True)
class ConsensusScore(ObjectScore):
    """The consensus mask of one object's B >= 2 user-box masks against its GT mask: an
    ``ObjectScore`` of that one mask, and the ``agreement`` of the B masks with it."""

    agreement: float


def score_consensus(gt_mask: np.ndarray, masks: np.ndarray) -> ConsensusScore:
    """Score the consensus (``runtime.task_boxes.consensus_mask``) of B >= 2 masks (B, H, W)
    bool of one object against its (H, W) GT mask."""
    if len(masks) < MIN_ANNOTATORS:
        raise ValueError(f"a consensus needs at least {MIN_ANNOTATORS} masks, got {len(masks)}")
    mask, agreement = consensus_mask(masks)
    score = score_object(gt_mask, mask[None])
    return ConsensusScore(score.ious, score.bious, score.st, agreement)


def consensus_table(per_object: Mapping[tuple[str, str], Mapping[str, ObjectScore]]) -> dict:
    """One model's consensus-vs-one-annotator comparison (fractions; ``gain_points`` in points):
    ``single_miou``, ``single_mbiou``, ``consensus_miou``, ``consensus_mbiou``, ``gain_points``
    (consensus minus single mIoU, x100), ``agreement`` (mean), ``objects``, ``boxes``,
    ``min_boxes`` / ``max_boxes`` (annotators per object), and ``single_box_objects`` (objects
    with one box, excluded). Means over nothing are None."""
    pairs = [(s["user"], s[CONSENSUS]) for s in per_object.values() if CONSENSUS in s]
    single_box = sum(1 for s in per_object.values() if CONSENSUS not in s and "user" in s)
    out: dict[str, Any] = {
        "single_miou": None,
        "single_mbiou": None,
        "consensus_miou": None,
        "consensus_mbiou": None,
        "gain_points": None,
        "agreement": None,
        "objects": len(pairs),
        "boxes": sum(user.n for user, _ in pairs),
        "min_boxes": min((user.n for user, _ in pairs), default=None),
        "max_boxes": max((user.n for user, _ in pairs), default=None),
        "single_box_objects": single_box,
    }
    if not pairs:
        return out
    out["single_miou"] = float(np.mean([user.iou for user, _ in pairs]))
    out["single_mbiou"] = float(np.mean([user.biou for user, _ in pairs]))
    out["consensus_miou"] = float(np.mean([c.iou for _, c in pairs]))
    out["consensus_mbiou"] = float(np.mean([c.biou for _, c in pairs]))
    out["gain_points"] = 100 * (out["consensus_miou"] - out["single_miou"])
    out["agreement"] = float(np.mean([c.agreement for _, c in pairs]))
    return out
