"""Pretrain the ``mini`` SAM from scratch on synthetic scenes, the way SAM was trained.

All of SAM trains (image encoder, prompt encoder, mask decoder) with clean prompts only: the GT
box, 1..k positive points sampled from the mask, box + points, and one SAM-style correction
round (a point from the error region plus the previous low-res logits as the mask prompt).
Single-point prompts use the three multimask outputs and back-propagate the best one (SAM §3).
Loss: 20 * focal + dice on the masks, plus MSE between predicted and actual IoU (SAM §A).
Optimiser: AdamW with linear warmup then cosine decay. Images: LSJ-style scale jitter around
the 256 px input, random crop or bottom-right padding, horizontal flips.

The model never sees poor prompts (noisy boxes, coarse masks); its weakness on them is SAM's,
not put in on purpose.

    python -m training.pretrain --out stable_sam/weights/sam_mini.safetensors --seed 0 --minutes 50

A checkpoint with the full training state is written every ``--ckpt-minutes`` next to
``--state`` (default ``.cache/pretrain/state.pt``) together with the fp16 export at ``--out``,
so an interrupted run leaves a usable model; ``--resume`` continues from the state file.
With ``--minutes`` the learning-rate schedule runs on training wall time (so it fits a time
budget); with ``--steps`` it runs on steps (reproducible across machines).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from tqdm import tqdm

from stable_sam.build import build_sam
from stable_sam.checkpoint import write_safetensors_atomic
from training.data import Sample
from training.scenes import SceneDataset

logger = logging.getLogger(__name__)

MODEL_TYPE = "mini"
FOCAL_WEIGHT, DICE_WEIGHT, IOU_WEIGHT = 20.0, 1.0, 1.0  # SAM: focal:dice = 20:1
MIN_TARGET_PIXELS = 8  # at the 256 px input; smaller objects are not prompted


@dataclass
class PretrainConfig:
    """Hyper-parameters of one pretraining run (saved in the checkpoint and PROVENANCE)."""

    seed: int = 0
    minutes: float | None = 50.0  # training wall-time budget (None: use ``steps``)
    steps: int | None = None  # step budget (overrides ``minutes`` for the schedule)
    batch_size: int = 2  # images per step
    objects_per_image: int = 6  # prompted objects per image and prompt group
    max_points: int = 5  # positive points per point prompt: 1..max_points
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    scale_range: tuple[float, float] = (0.6, 1.5)  # LSJ-style jitter of the 256 px long side
    train_size_range: tuple[int, int] = (256, 640)  # scene sides (px) before resizing to 256
    correction_prob: float = 0.3  # chance of a SAM-style correction round on point prompts
    box_points_prob: float = 0.3  # chance of a box + points round
    grad_clip: float = 1.0
    mask_loss: str = "focal_dice"  # "focal_dice": 20 x focal + dice (SAM); "bce_dice": BCE + dice
    # Fraction of the budget over which the focal weight ramps from 0 to SAM's 20 (see
    # ``focal_weight_at``); 0 starts at 20 right away.
    focal_ramp: float = 0.4
    heldout_n: int = 100
    heldout_size_range: tuple[int, int] = (256, 1024)
    ckpt_minutes: float = 5.0
    monitor_n: int = 16  # held-out images scored at each checkpoint
    threads: int = 0  # torch CPU threads; 0 = adapt to the load average (see ``cpu_threads``)
    workers: int = 0  # data-loader processes rendering scenes (0: render in the training process)
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- data


def _resize_sample(
    image: np.ndarray, masks: np.ndarray, long_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resize (H,W,3) uint8 and (N,H,W) bool so the long side is ``long_side`` px."""
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    image = cv2.resize(image, (nw, nh), interpolation=interp)
    if len(masks) == 0:
        return image, np.zeros((0, nh, nw), bool)
    out = []
    for start in range(0, len(masks), 4):  # cv2.resize takes at most 4 channels for every mode
        chunk = np.ascontiguousarray(masks[start : start + 4].transpose(1, 2, 0)).astype(np.uint8)
        r = cv2.resize(chunk * 255, (nw, nh), interpolation=interp)
        out.append(r.reshape(nh, nw, -1).transpose(2, 0, 1) >= 128)
    return image, np.concatenate(out)


def lsj_sample(
    sample: Sample, rng: np.random.Generator, cfg: PretrainConfig, size: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Scale-jitter, crop/pad to ``size`` and flip: returns (size,size,3) uint8, (N,size,size)
    bool with tiny targets removed, and the valid (h, w) region (padding is bottom-right, as
    in SAM)."""
    long_side = int(size * rng.uniform(*cfg.scale_range))
    image, masks = _resize_sample(sample.image, sample.masks, long_side)
    h, w = image.shape[:2]
    y0 = int(rng.integers(0, h - size + 1)) if h > size else 0
    x0 = int(rng.integers(0, w - size + 1)) if w > size else 0
    image, masks = image[y0 : y0 + size, x0 : x0 + size], masks[:, y0 : y0 + size, x0 : x0 + size]
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    ch, cw = image.shape[:2]
    out_img = np.zeros((size, size, 3), np.uint8)
    out_img[:ch, :cw] = image
    out_masks = np.zeros((len(masks), size, size), bool)
    out_masks[:, :ch, :cw] = masks
    keep = out_masks.sum(axis=(1, 2)) >= MIN_TARGET_PIXELS
    return out_img, out_masks[keep], (ch, cw)


def normalize(
    sam: Sam,
    images_uint8: np.ndarray,
    valid_hw: list[tuple[int, int]],
    device: torch.device | None = None,
) -> torch.Tensor:
    """(B,S,S,3) uint8 -> (B,3,S,S) float on ``device`` (default: the model's), normalized with
    SAM's pixel mean/std; the padding outside each image's valid (h, w) top-left region is 0
    afterwards, as in ``Sam.preprocess``."""
    device = device or sam.pixel_mean.device
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device)
    x = x.permute(0, 3, 1, 2).float()
    x = (x - sam.pixel_mean.to(device)) / sam.pixel_std.to(device)
    for b, (h, w) in enumerate(valid_hw):
        x[b, :, h:] = 0
        x[b, :, :, w:] = 0
    return x


def mask_box_xyxy(mask: np.ndarray) -> np.ndarray:
    """(4,) float32 box [x_min, y_min, x_max, y_max] of a (H,W) bool mask, pixel indices."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return np.array([xs[0], ys[0], xs[-1], ys[-1]], np.float32)


def sample_mask_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(k,2) float32 xy pixel coordinates drawn uniformly from the mask (with replacement if
    the mask has fewer than k pixels)."""
    ys, xs = np.nonzero(mask)
    idx = rng.choice(len(ys), size=k, replace=len(ys) < k)
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float32)


@dataclass
class PretrainBatch:
    """One step's data, prompts included except those that depend on the model's output.

    ``images`` (B,S,S,3) uint8 with valid top-left regions ``valid_hw``; for the M prompted
    objects of the whole batch: ``image_index`` (M,) the image each lies in, ``masks`` (M,S,S)
    bool, ``boxes`` (M,4) xyxy, ``points`` (M,max_points,2) and ``box_points`` (M,2,2) xy
    positive points drawn uniformly from the mask (a step uses the first k of them)."""

    images: np.ndarray
    valid_hw: list[tuple[int, int]]
    image_index: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    points: np.ndarray
    box_points: np.ndarray


def prepare_sample(
    sample: Sample, rng: np.random.Generator, cfg: PretrainConfig, size: int
) -> PretrainBatch:
    """Scale-jitter one scene and draw its clean prompts: a one-image ``PretrainBatch`` with at
    most ``objects_per_image`` prompted objects."""
    image, masks, hw = lsj_sample(sample, rng, cfg, size)
    masks = masks[rng.permutation(len(masks))[: cfg.objects_per_image]]
    m = len(masks)
    boxes = np.zeros((m, 4), np.float32)
    points = np.zeros((m, cfg.max_points, 2), np.float32)
    box_points = np.zeros((m, 2, 2), np.float32)
    for i, mask in enumerate(masks):
        boxes[i] = mask_box_xyxy(mask)
        pts = sample_mask_points(mask, cfg.max_points + 2, rng)
        points[i], box_points[i] = pts[: cfg.max_points], pts[cfg.max_points :]
    return PretrainBatch(
        images=image[None],
        valid_hw=[hw],
        image_index=np.zeros(m, np.int64),
        masks=masks,
        boxes=boxes,
        points=points,
        box_points=box_points,
    )


def collate_batch(items: list[PretrainBatch]) -> PretrainBatch:
    """Concatenate one-image batches (a DataLoader ``collate_fn``)."""
    return PretrainBatch(
        images=np.concatenate([it.images for it in items]),
        valid_hw=[hw for it in items for hw in it.valid_hw],
        image_index=np.concatenate(
            [np.full(len(it.masks), b, np.int64) for b, it in enumerate(items)]
        ),
        masks=np.concatenate([it.masks for it in items]),
        boxes=np.concatenate([it.boxes for it in items]),
        points=np.concatenate([it.points for it in items]),
        box_points=np.concatenate([it.box_points for it in items]),
    )


class PretrainSamples(torch.utils.data.Dataset):
    """Training sample ``start + i`` of an endless stream: train scene ``start + i``, jittered
    and prompted with the generator seeded by ``(seed, start + i)``, so the data of a run does
    not depend on the number of loader processes or on where a resumed run starts."""

    def __init__(self, cfg: PretrainConfig, size: int, start: int = 0) -> None:
        self.cfg, self.size, self.start = cfg, size, start
        self.scenes = SceneDataset("train", n=10**9, size_range=cfg.train_size_range)

    def __len__(self) -> int:
        return 10**9 - self.start

    def __getitem__(self, i: int) -> PretrainBatch:
        index = self.start + i
        rng = np.random.default_rng((self.cfg.seed, index))
        return prepare_sample(self.scenes[index], rng, self.cfg, self.size)


def _loader_worker_init(_: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def batch_stream(cfg: PretrainConfig, size: int, start_step: int):
    """An iterator of ``PretrainBatch`` for steps ``start_step, start_step + 1, ...``, rendered
    by ``cfg.workers`` loader processes (or in this process when 0)."""
    loader = torch.utils.data.DataLoader(
        PretrainSamples(cfg, size, start=start_step * cfg.batch_size),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.workers,
        collate_fn=collate_batch,
        worker_init_fn=_loader_worker_init if cfg.workers else None,
        prefetch_factor=4 if cfg.workers else None,
        # Forked children of a process that has run torch's OpenMP pool can deadlock.
        multiprocessing_context="spawn" if cfg.workers else None,
    )
    return iter(loader)


# ----------------------------------------------------------------------------- loss


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss, mean over pixels; (M,H,W) -> (M,)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss; (M,H,W) -> (M,)."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return 1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) with the target; (M,H,W) -> (M,)."""
    pred = (logits > 0).flatten(1)
    t = target.flatten(1) > 0.5
    inter = (pred & t).sum(1).float()
    union = (pred | t).sum(1).float()
    return inter / union.clamp(min=1)


def prompt_loss(
    low_res: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    size: int,
    mask_loss: str = "focal_dice",
    focal_weight: float = FOCAL_WEIGHT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of M prompts with C outputs each: low_res (M,C,h,w) logits, iou_pred (M,C), target
    (M,S,S) float. With C > 1 only the best output's mask loss counts (SAM's ambiguity rule).
    Returns (loss scalar, upsampled logits of the chosen output (M,S,S), detached)."""
    m, c = low_res.shape[:2]
    up = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)
    tgt = target[:, None].expand(-1, c, -1, -1).reshape(m * c, size, size)
    flat = up.reshape(m * c, size, size)
    if mask_loss == "focal_dice":
        per_pixel = focal_weight * focal_loss(flat, tgt)
    elif mask_loss == "bce_dice":
        per_pixel = (
            F.binary_cross_entropy_with_logits(flat, tgt, reduction="none").flatten(1).mean(1)
        )
    else:
        raise ValueError(f"unknown mask loss {mask_loss!r}")
    losses = (per_pixel + DICE_WEIGHT * dice_loss(flat, tgt)).view(m, c)
    with torch.no_grad():
        ious = hard_iou(flat, tgt).view(m, c)
    best = losses.argmin(dim=1)
    chosen = losses.gather(1, best[:, None]).squeeze(1)
    iou_loss = F.mse_loss(iou_pred.float(), ious, reduction="none").mean(1)
    loss = (chosen + IOU_WEIGHT * iou_loss).mean()
    picked = up[torch.arange(m), best].detach()
    return loss, picked


# ----------------------------------------------------------------------------- model calls


def decode(
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


def decode_batched(
    sam: Sam,
    embeddings: torch.Tensor,
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode`` for M prompts on M possibly different images in one decoder call:
    ``embeddings`` (M,256,16,16) holds each prompt's image embedding.

    SAM's decoder adds the dense prompt embedding to the image embedding it repeats once per
    prompt; passing a zero image embedding and (embedding + dense) as the dense prompt gives
    the same sum, so the official forward runs unchanged (tested against ``decode``)."""
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
    return sam.mask_decoder(
        image_embeddings=embeddings.new_zeros((1, *embeddings.shape[1:])),
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=embeddings + dense,
        multimask_output=multimask,
    )


def correction_points(
    pred: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One SAM-style correction click per prompt: uniform from the error region; positive on
    a false negative, negative on a false positive. pred/target (M,S,S) bool -> (M,1,2) xy,
    (M,1) labels. A perfect prediction gets a positive point inside the target."""
    coords = np.zeros((len(pred), 1, 2), np.float32)
    labels = np.ones((len(pred), 1), np.float32)
    for i, (p, t) in enumerate(zip(pred, target, strict=True)):
        err = p ^ t
        region = err if err.any() else t
        ys, xs = np.nonzero(region)
        j = int(rng.integers(len(ys)))
        coords[i, 0] = (xs[j], ys[j])
        labels[i, 0] = 1.0 if t[ys[j], xs[j]] else 0.0
    return coords, labels


def train_step_loss(
    sam: Sam,
    batch: PretrainBatch,
    rng: np.random.Generator,
    cfg: PretrainConfig,
    device: torch.device,
    focal_weight: float | None = None,
) -> torch.Tensor:
    """Loss of one batch (``focal_weight`` None means SAM's 20). All prompts of a kind, over all
    images of the batch, go through the decoder in one call: the GT box; 1..k positive points
    (one k per step; a single point uses the multimask outputs); a correction round for a
    ``correction_prob`` share of the objects; box + 1..2 points for a ``box_points_prob`` share."""
    fw = FOCAL_WEIGHT if focal_weight is None else focal_weight
    size = batch.images.shape[1]
    embeddings = sam.image_encoder(normalize(sam, batch.images, batch.valid_hw, device))
    if len(batch.masks) == 0:
        return embeddings.sum() * 0.0
    emb = embeddings[torch.from_numpy(batch.image_index).to(device)]
    tgt = torch.from_numpy(batch.masks).to(device).float()
    boxes = torch.from_numpy(batch.boxes).to(device)

    def loss_of(
        sel: torch.Tensor | slice,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        with_boxes: bool,
        mask_input: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        low, iou = decode_batched(
            sam, emb[sel], points, boxes[sel] if with_boxes else None, mask_input, multimask
        )
        return prompt_loss(low, iou, tgt[sel], size, cfg.mask_loss, fw)

    everyone = slice(None)
    # 1) GT box.
    losses = [loss_of(everyone, None, True, None, False)[0]]
    # 2) 1..k positive points.
    k = int(rng.integers(1, cfg.max_points + 1))
    coords = torch.from_numpy(np.ascontiguousarray(batch.points[:, :k])).to(device)
    labels = torch.ones(coords.shape[:2], device=device)
    loss, picked = loss_of(everyone, (coords, labels), False, None, k == 1)
    losses.append(loss)
    # 3) SAM-style correction round: previous logits as mask prompt + an error-region click.
    sel = np.flatnonzero(rng.random(len(batch.masks)) < cfg.correction_prob)
    if len(sel):
        sel_t = torch.from_numpy(sel).to(device)
        pred = (picked[sel_t] > 0).cpu().numpy()
        c2, l2 = correction_points(pred, batch.masks[sel], rng)
        coords2 = torch.cat([coords[sel_t], torch.from_numpy(c2).to(device)], dim=1)
        labels2 = torch.cat([labels[sel_t], torch.from_numpy(l2).to(device)], dim=1)
        mask_in = F.interpolate(picked[sel_t][:, None], scale_factor=0.25, mode="bilinear")
        losses.append(loss_of(sel_t, (coords2, labels2), False, mask_in, False)[0])
    # 4) box + 1..2 positive points.
    sel = np.flatnonzero(rng.random(len(batch.masks)) < cfg.box_points_prob)
    if len(sel):
        kb = int(rng.integers(1, 3))
        sel_t = torch.from_numpy(sel).to(device)
        ptsb = torch.from_numpy(np.ascontiguousarray(batch.box_points[sel, :kb])).to(device)
        labelsb = torch.ones(ptsb.shape[:2], device=device)
        losses.append(loss_of(sel_t, (ptsb, labelsb), True, None, False)[0])
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- evaluation


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
    sam: Sam, dataset: SceneDataset | list[Sample], device: torch.device, seed: int = 0
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
        boxes = np.stack([mask_box_xyxy(m) for m in sample.masks])
        boxes_t = torch.from_numpy(transform.apply_boxes(boxes, (h, w))).float().to(device)
        pts = np.stack([sample_mask_points(m, 1, rng) for m in sample.masks])
        pts_t = torch.from_numpy(transform.apply_coords(pts, (h, w))).float().to(device)
        labels = torch.ones(pts_t.shape[:2], device=device)
        gt = torch.from_numpy(sample.masks).to(device)

        def ious(low: torch.Tensor) -> list[float]:
            return _full_res_ious(sam, low, input_size, gt)  # noqa: B023 (used in this iteration)

        low, _ = decode(sam, emb, None, boxes_t, None, multimask=False)
        box_ious += ious(low)
        low, score = decode(sam, emb, (pts_t, labels), None, None, multimask=True)
        best = score.argmax(dim=1)
        p1_ious += ious(low[torch.arange(len(best)), best][:, None])
        low, _ = decode(sam, emb, (pts_t, labels), None, None, multimask=False)
        p1s_ious += ious(low)
    return {
        "box_miou": 100 * float(np.mean(box_ious)),
        "point1_miou": 100 * float(np.mean(p1_ious)),
        "point1_single_miou": 100 * float(np.mean(p1s_ious)),
        "objects": len(box_ious),
    }


# ----------------------------------------------------------------------------- checkpoints


def export_fp16(sam: Sam, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the model state_dict as fp16 safetensors (atomically)."""
    write_safetensors_atomic(sam.state_dict(), path, metadata or {}, dtype=torch.float16)


def save_state(
    path: Path,
    sam: Sam,
    opt: torch.optim.Optimizer,
    step: int,
    elapsed: float,
    cfg: PretrainConfig,
    history: list[dict] | None = None,
) -> None:
    """The full training state (fp32 model, optimiser, progress, the runs so far)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "model": sam.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "elapsed_s": elapsed,
            "config": asdict(cfg),
            "history": history or [],
        },
        tmp,
    )
    tmp.replace(path)


def budget_fraction(cfg: PretrainConfig, step: int, elapsed_s: float) -> float:
    """How much of the step or wall-time budget is spent, in [0, 1]."""
    if cfg.steps is not None:
        frac = step / max(1, cfg.steps)
    else:
        frac = elapsed_s / (60.0 * (cfg.minutes or 1.0))
    return min(1.0, max(0.0, frac))


def focal_weight_at(cfg: PretrainConfig, step: int, elapsed_s: float) -> float:
    """The focal-loss weight: ramps linearly from 0 to SAM's 20 over ``focal_ramp`` of the
    budget. From scratch and with a short budget, 20 x focal from the first step drives the
    decoder to a constant low logit (the focal optimum for empty masks) and it stays there for
    hundreds of steps: measured on one scene, box IoU stayed 0 after 40 decoder steps with
    20:1, while dice alone reached IoU 0.7 in 30. Dice first teaches localization; focal then
    calibrates, as in SAM."""
    if cfg.focal_ramp <= 0:
        return FOCAL_WEIGHT
    return FOCAL_WEIGHT * min(1.0, budget_fraction(cfg, step, elapsed_s) / cfg.focal_ramp)


def lr_at(cfg: PretrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` over the
    step budget (``steps``) or the wall-time budget (``minutes``)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.steps is not None:
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    else:
        frac = elapsed_s / (60.0 * (cfg.minutes or 1.0))
    frac = min(1.0, max(0.0, frac))
    cos = 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def hardware_name() -> str:
    """The GPU name, or the CPU model name and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def cpu_threads(requested: int) -> int:
    """Torch CPU threads for the next steps. ``requested`` > 0 is used as is; 0 adapts: two
    threads when the machine is idle enough, else one, because OpenMP threads that wait on
    each other on an oversubscribed CPU slow a step down several times (measured here: 0.1
    images/s with 2 threads vs 0.6 with 1 at a load average of 9 on 2 cores)."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    return min(2, cores) if os.getloadavg()[0] < cores + 0.5 else 1


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- main loop


def pretrain(
    cfg: PretrainConfig,
    out: Path,
    state_path: Path,
    resume: bool = False,
    command: str = "",
    device: torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Train (or continue training) the mini SAM; export fp16 weights to ``out``.

    Returns a summary dict: steps, images, train wall time (s), images/s, final loss and the
    held-out metrics of ``evaluate``.
    """
    torch.set_num_threads(cpu_threads(cfg.threads))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    sam = build_sam(MODEL_TYPE).to(device)
    decay, no_decay = [], []
    for name, p in sam.named_parameters():
        (no_decay if p.ndim < 2 or "pos_embed" in name or "rel_pos" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.999),
    )
    step, elapsed = 0, 0.0
    history: list[dict] = []  # one entry per invocation (run, resumes)
    if resume:
        state = torch.load(state_path, map_location=device, weights_only=True)
        sam.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        history = list(state.get("history", []))
        logger.info("resumed from %s at step %d (%.1f min trained)", state_path, step, elapsed / 60)

    size = sam.image_encoder.img_size
    batches = batch_stream(cfg, size, step)
    monitor = SceneDataset("heldout", n=cfg.monitor_n, size_range=cfg.heldout_size_range)
    use_amp = device.type == "cuda"

    def done() -> bool:
        if cfg.steps is not None:
            return step >= cfg.steps
        return elapsed >= 60.0 * (cfg.minutes or 0.0)

    bar = tqdm(
        total=cfg.steps if cfg.steps is not None else round(60 * (cfg.minutes or 0)),
        initial=step if cfg.steps is not None else round(elapsed),
        unit="step" if cfg.steps is not None else "s",
        disable=not progress,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        dynamic_ncols=True,
    )
    last_ckpt = elapsed
    images_seen = 0
    run_start_elapsed = elapsed
    history.append(
        {
            "command": command,
            "commit": git_commit(),
            "hardware": hardware_name(),
            "from_step": step,
            "to_step": step,
            "train_min": 0.0,
        }
    )

    def checkpoint() -> None:
        history[-1].update(to_step=step, train_min=round((elapsed - run_start_elapsed) / 60, 1))
        save_state(state_path, sam, opt, step, elapsed, cfg, history)
        export_fp16(sam, out, {"step": str(step), "model_type": MODEL_TYPE})

    loss_ema = None
    sam.train()
    while not done():
        t0 = time.perf_counter()
        batch = next(batches)
        rng = np.random.default_rng((cfg.seed, step, 1))  # the prompts that depend on the model
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step, elapsed)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = train_step_loss(
                sam, batch, rng, cfg, device, focal_weight_at(cfg, step, elapsed)
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), cfg.grad_clip)
        opt.step()
        dt = time.perf_counter() - t0
        elapsed += dt
        step += 1
        images_seen += cfg.batch_size
        loss_v = float(loss.detach())
        loss_ema = loss_v if loss_ema is None else 0.98 * loss_ema + 0.02 * loss_v
        bar.update(1 if cfg.steps is not None else round(elapsed) - bar.n)
        bar.set_postfix(
            refresh=False,
            loss=f"{loss_ema:.3f}",
            lr=f"{opt.param_groups[0]['lr']:.2e}",
            ips=f"{cfg.batch_size / dt:.1f}",
        )
        if step % 25 == 0:
            torch.set_num_threads(cpu_threads(cfg.threads))
            logger.info(
                "step %d loss %.4f (ema %.4f) lr %.2e focal w %.1f %.2f img/s elapsed %.1f min threads %d",
                step,
                loss_v,
                loss_ema,
                opt.param_groups[0]["lr"],
                focal_weight_at(cfg, step, elapsed),
                cfg.batch_size / dt,
                elapsed / 60,
                torch.get_num_threads(),
            )
        if elapsed - last_ckpt >= 60.0 * cfg.ckpt_minutes:
            last_ckpt = elapsed
            checkpoint()
            metrics = evaluate(sam, monitor, device)
            sam.train()
            logger.info(
                "checkpoint step %d: monitor (%d held-out imgs) %s", step, cfg.monitor_n, metrics
            )
    bar.close()
    checkpoint()
    run_time = elapsed - run_start_elapsed
    summary = {
        "steps": step,
        "images": step * cfg.batch_size,
        "train_wall_s": round(elapsed, 1),
        "images_per_s_this_run": round(images_seen / run_time, 2) if run_time > 0 else None,
        "final_loss_ema": loss_ema,
        "history": history,
    }
    # Held-out metrics of the exported fp16 weights, exactly as shipped.
    shipped = build_sam(MODEL_TYPE, out).to(device)
    heldout = SceneDataset("heldout", n=cfg.heldout_n, size_range=cfg.heldout_size_range)
    summary["heldout"] = evaluate(shipped, heldout, device)
    return summary


def write_provenance(
    path: Path, argv: list[str], cfg: PretrainConfig, summary: dict, out: Path, wall_s: float
) -> None:
    """The provenance record next to the shipped weights."""
    from stable_sam.build import file_sha256

    h = summary["heldout"]
    runs = "\n".join(
        f"  {i + 1}. `python -m training.pretrain {r['command']}`: steps {r['from_step']}-"
        f"{r['to_step']}, {r['train_min']} min, commit {r['commit'][:10]}, {r['hardware']}"
        for i, r in enumerate(summary.get("history", []))
    )
    text = f"""# Provenance of `{out.name}`

The `mini` SAM (see `docs/MODEL.md`), pretrained from random initialisation by this repository's
`training/pretrain.py` on synthetic scenes (`training/scenes.py`, train split). No external data
or weights were used.

- Command (last invocation): `python -m training.pretrain {" ".join(argv)}`
- Runs that produced the weights (a run and its `--resume`s):
{runs}
- Seed: {cfg.seed}
- Data: synthetic train scenes (even seeds), sides {cfg.train_size_range[0]}-{cfg.train_size_range[1]} px,
  {summary["images"]} images seen ({summary["steps"]} steps x {cfg.batch_size}), rendered on the fly
- Train wall time: {summary["train_wall_s"] / 60:.1f} min (this process: {wall_s / 60:.1f} min incl. evaluation);
  throughput of the last run: {summary["images_per_s_this_run"]} images/s
- Hardware: {hardware_name()}, torch {torch.__version__}
- SHA-256: `{file_sha256(out)}`
- Config: `{asdict(cfg)}`

## Held-out metrics

{h["objects"]} objects in {cfg.heldout_n} held-out scenes (odd seeds, sides {cfg.heldout_size_range[0]}-{cfg.heldout_size_range[1]} px),
IoU at the original resolution, prompts as `SamPredictor` takes them:

| prompt | mIoU (%) |
|---|---|
| GT box | {h["box_miou"]:.1f} |
| 1 positive point, best of 3 outputs by predicted IoU | {h["point1_miou"]:.1f} |
| 1 positive point, single output | {h["point1_single_miou"]:.1f} |
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("stable_sam/weights/sam_mini.safetensors"))
    p.add_argument(
        "--state", type=Path, default=Path(".cache/pretrain/state.pt"), help="full training state"
    )
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=50.0, help="training wall-time budget")
    p.add_argument("--steps", type=int, default=None, help="step budget (instead of --minutes)")
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=PretrainConfig.lr)
    p.add_argument("--warmup-steps", type=int, default=PretrainConfig.warmup_steps)
    p.add_argument("--objects-per-image", type=int, default=PretrainConfig.objects_per_image)
    p.add_argument("--train-size", type=int, nargs=2, default=PretrainConfig.train_size_range)
    p.add_argument("--heldout-n", type=int, default=PretrainConfig.heldout_n)
    p.add_argument("--monitor-n", type=int, default=PretrainConfig.monitor_n)
    p.add_argument("--ckpt-minutes", type=float, default=PretrainConfig.ckpt_minutes)
    p.add_argument("--mask-loss", choices=["focal_dice", "bce_dice"], default="focal_dice")
    p.add_argument("--focal-ramp", type=float, default=PretrainConfig.focal_ramp)
    p.add_argument("--threads", type=int, default=PretrainConfig.threads)
    p.add_argument(
        "--workers", type=int, default=PretrainConfig.workers, help="scene-rendering processes"
    )
    p.add_argument(
        "--provenance", type=Path, default=None, help="default: PROVENANCE.md next to --out"
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = PretrainConfig(
        seed=args.seed,
        minutes=None if args.steps is not None else args.minutes,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        objects_per_image=args.objects_per_image,
        train_size_range=tuple(args.train_size),
        heldout_n=args.heldout_n,
        monitor_n=args.monitor_n,
        ckpt_minutes=args.ckpt_minutes,
        threads=args.threads,
        workers=args.workers,
        mask_loss=args.mask_loss,
        focal_ramp=args.focal_ramp,
    )
    t0 = time.time()
    summary = pretrain(
        cfg,
        args.out,
        args.state,
        resume=args.resume,
        command=" ".join(argv),
        progress=not args.no_progress,
    )
    wall = time.time() - t0
    provenance = args.provenance or args.out.parent / "PROVENANCE.md"
    write_provenance(provenance, argv, cfg, summary, args.out, wall)
    h = summary["heldout"]
    print(
        f"done: {summary['steps']} steps, {summary['images']} images, "
        f"{summary['images_per_s_this_run']} img/s; held-out GT-box mIoU {h['box_miou']:.1f}, "
        f"1-point mIoU {h['point1_miou']:.1f} (single output {h['point1_single_miou']:.1f}) "
        f"over {h['objects']} objects -> {args.out}"
    )


if __name__ == "__main__":
    main()
