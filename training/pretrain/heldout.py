"""Pretraining's held-out evaluation: mIoU of the GT box and of one positive point.

To be replaced by the one evaluation protocol (``training.evaluation``): pretraining calls it
from one place only, ``training.pretrain.loop.heldout_metrics``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from stable_sam import prompts
from training.data import Sample


def _decode(
    sam: Sam,
    embedding: torch.Tensor,
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run prompt encoder + mask decoder for M prompts on one image embedding (1,256,16,16).
    Returns low-res logits (M,C,4h,4w) and IoU predictions (M,C)."""
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
    return sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


def _full_res_ious(
    sam: Sam, low_res: torch.Tensor, input_size: tuple[int, int], gt: torch.Tensor
) -> list[float]:
    """IoUs of (M,1,h,w) low-res logits, upsampled to the original size, with (M,H,W) masks."""
    pred = sam.postprocess_masks(low_res.float(), input_size, tuple(gt.shape[1:]))[:, 0] > 0
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float().clamp(min=1)
    return (inter / union).tolist()


@torch.no_grad()
def evaluate(
    sam: Sam, dataset: Sequence[Sample], device: torch.device, seed: int = 0
) -> dict[str, float]:
    """Held-out mIoU (percent) at the original resolution, prompted as ``SamPredictor`` would:
    GT box; one random positive point with the best-scoring of 3 outputs (SAM's rule) and with
    the single output. Returns {"box_miou", "point1_miou", "point1_single_miou", "objects"}."""
    sam.eval()
    size = sam.image_encoder.img_size
    transform = ResizeLongestSide(size)
    rng = np.random.default_rng(seed)
    box_ious, p1_ious, p1s_ious = [], [], []
    for sample in dataset:
        if sample.num_instances == 0:
            continue
        h, w = sample.image.shape[:2]
        resized = transform.apply_image(sample.image)
        x = torch.as_tensor(resized, device=device).permute(2, 0, 1).contiguous()[None]
        x = sam.preprocess(x.float())
        emb = sam.image_encoder(x)
        input_size = resized.shape[:2]
        boxes = np.stack([prompts.gt_box(m) for m in sample.masks])
        boxes_t = torch.from_numpy(transform.apply_boxes(boxes, (h, w))).float().to(device)
        pts = np.stack([prompts.sample_points(m, 1, rng) for m in sample.masks])
        pts_t = torch.from_numpy(transform.apply_coords(pts, (h, w))).float().to(device)
        labels = torch.ones(pts_t.shape[:2], device=device)
        gt = torch.from_numpy(sample.masks).to(device)

        def ious(low: torch.Tensor) -> list[float]:
            return _full_res_ious(sam, low, input_size, gt)  # noqa: B023 (used in this iteration)

        low, _ = _decode(sam, emb, None, boxes_t, None, multimask=False)
        box_ious += ious(low)
        low, score = _decode(sam, emb, (pts_t, labels), None, None, multimask=True)
        best = score.argmax(dim=1)
        p1_ious += ious(low[torch.arange(len(best)), best][:, None])
        low, _ = _decode(sam, emb, (pts_t, labels), None, None, multimask=False)
        p1s_ious += ious(low)
    return {
        "box_miou": 100 * float(np.mean(box_ious)),
        "point1_miou": 100 * float(np.mean(p1_ious)),
        "point1_single_miou": 100 * float(np.mean(p1s_ious)),
        "objects": len(box_ious),
    }
