"""Pretraining data: synthetic train scenes (and, with ``composite_fraction``, real-picture
composites of the train split), jittered into the model's input frame (256 px for ``mini``,
512 px for ``mini_512``) and prompted.

The jitter is RTS's (``training.rts``), the prompts ``stable_sam.prompts``' (boxes in continuous
pixel coordinates, points at pixel centres), as in RTS training and the benchmark.

Sample ``i`` of a run is train scene ``i`` with the generator seeded by ``(seed, i)``: a run's
data does not depend on the number of loader processes or on where a resumed run starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from stable_sam import prompts
from training import rts
from training.data import Sample
from training.pretrain.config import PretrainConfig
from training.scenes import SceneDataset

MIN_TARGET_PIXELS = 8  # in the input frame; smaller objects are not prompted


def jitter_sample(
    sample: Sample, rng: np.random.Generator, cfg: PretrainConfig, size: int
) -> rts.AugmentedImage:
    """RTS's large-scale jitter (``training.rts.large_scale_jitter``) of one scene into the
    ``size`` x ``size`` frame, with pretraining's scale range and a horizontal flip with p = 0.5;
    objects under ``MIN_TARGET_PIXELS`` are dropped."""
    aug = rts.large_scale_jitter(sample.image, sample.masks, size, rng, cfg.scale_range, 0.5)
    keep = aug.masks.sum(axis=(1, 2)) >= MIN_TARGET_PIXELS
    return rts.AugmentedImage(aug.image, aug.masks[keep], aug.valid_hw)


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
    aug = jitter_sample(sample, rng, cfg, size)
    masks = aug.masks[rng.permutation(len(aug.masks))[: cfg.objects_per_image]]
    m = len(masks)
    boxes = np.zeros((m, 4), np.float32)
    points = np.zeros((m, cfg.max_points, 2), np.float32)
    box_points = np.zeros((m, 2, 2), np.float32)
    for i, mask in enumerate(masks):
        boxes[i] = prompts.gt_box(mask)
        pts = prompts.sample_points(mask, cfg.max_points + 2, rng)
        points[i], box_points[i] = pts[: cfg.max_points], pts[cfg.max_points :]
    return PretrainBatch(
        images=aug.image[None],
        valid_hw=[aug.valid_hw],
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
        self.composites = None
        if cfg.composite_fraction > 0:
            from training.composites import CompositeDataset
            from training.real_pictures import CATALOGUE_PATH

            self.composites = CompositeDataset(
                "train", n=10**9, size_range=cfg.train_size_range,
                catalogue=cfg.composite_catalogue or CATALOGUE_PATH,
            )  # fmt: skip

    def __len__(self) -> int:
        return 10**9 - self.start

    def is_composite(self, index: int) -> bool:
        """Whether sample ``index`` is a real-picture composite (a pure function of the seed)."""
        if self.composites is None:
            return False
        draw = np.random.default_rng((self.cfg.seed, index, 1)).random()
        return bool(draw < self.cfg.composite_fraction)

    def __getitem__(self, i: int) -> PretrainBatch:
        index = self.start + i
        rng = np.random.default_rng((self.cfg.seed, index))
        source = self.composites if self.is_composite(index) else self.scenes
        return prepare_sample(source[index], rng, self.cfg, self.size)


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
