"""Pretraining data: synthetic train scenes, jittered into the 256 px frame and prompted.

Sample ``i`` of a run is train scene ``i`` with the generator seeded by ``(seed, i)``: a run's
data does not depend on the number of loader processes or on where a resumed run starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from training.data import Sample
from training.pretrain.config import PretrainConfig
from training.scenes import SceneDataset

MIN_TARGET_PIXELS = 8  # at the 256 px input; smaller objects are not prompted


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


def batch_stream(cfg: PretrainConfig, size: int, start_step: int) -> Iterator[PretrainBatch]:
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
