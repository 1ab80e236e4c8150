"""Helpers shared by the user-study tests."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from stable_sam.predictor import BatchPrediction


class BoxFiller:
    """A 'predictor' whose mask is exactly the (rounded) prompt box: IoUs are computable by hand."""

    multimask_policy = "single"

    def embed(self, image: np.ndarray) -> SimpleNamespace:
        return SimpleNamespace(original_size=image.shape[:2])

    def predict_batch(
        self, embedding: SimpleNamespace, boxes_xyxy: np.ndarray, **_: object
    ) -> BatchPrediction:
        h, w = embedding.original_size
        masks = np.zeros((len(boxes_xyxy), 1, h, w), bool)
        for i, (x0, y0, x1, y1) in enumerate(np.round(boxes_xyxy).astype(int)):
            masks[i, 0, y0:y1, x0:x1] = True
        ones = np.ones((len(boxes_xyxy), 1))
        return BatchPrediction(masks=masks, scores=ones, low_res_logits=ones, alpha=None)
