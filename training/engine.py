"""The training engine: the mask losses, SAM's input preprocessing and the RTS loop.

Shared by the three trainers of this repository:

* the Stable-SAM plugins (``train_plugins``): DSP + DRP on a frozen SAM, robust training strategy
  (``training.rts``), the paper's "fast adaptation" default (Adam, lr 1e-3, one epoch);
* the baselines (``training.baselines``): DT-SAM, PT-SAM, HQ-SAM, PA-SAM, by the same loop (a
  variant's own loss plugs in as ``loss_fn``);
* the pretraining of the mini SAM (``training.pretrain``): its own loop (the whole model, a
  wall-time schedule, resume), on the losses, the preprocessing and the optimiser step below.

One RTS step = ``batch_prompts`` prompts (32, the paper's total batch) from ``batch_prompts //
prompts_per_image`` augmented images. The image encoder is frozen, so each augmented image is
embedded once, without gradients; only the prompt-conditioned decoder pass is differentiated.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import Tensor, nn
from torch.nn import functional as F

from stable_sam import StableSam
from stable_sam.device import autocast_context
from training import distributed, rts
from training.data import Sample

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]  # (step, total_steps, loss)
# (the decoder step's output: logits (B, 1, S/4, S/4) and PA-SAM's masks or None, the GT masks
# (B, S, S)) -> the mean loss over the B prompts (a scalar).
LossFn = Callable[[tuple[Tensor, distributed.AdapterMasks | None], Tensor], Tensor]

# SAM's loss weights (SAM §A): focal : dice = 20 : 1, plus the IoU head's MSE.
FOCAL_WEIGHT, DICE_WEIGHT, IOU_WEIGHT = 20.0, 1.0, 1.0
MASK_LOSSES = ("focal_dice", "bce_dice")


# ----------------------------------------------------------------------------- losses


def upsample_logits(low_res_logits: Tensor, size: Sequence[int]) -> Tensor:
    """Low-res logits (B, C, S/4, S/4) -> (B, C, *size) float, bilinear.

    The losses compare at the input frame's S x S: the GT keeps the thin structures (rings,
    lines) that a 4x downsampled target would lose.
    """
    return F.interpolate(
        low_res_logits.float(), size=tuple(size), mode="bilinear", align_corners=False
    )


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy per mask, mean over pixels: (B, H, W) logits, {0, 1} -> (B,)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice loss per mask: (B, H, W) logits and {0, 1} targets -> (B,)."""
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return 1 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017) per mask, mean over pixels: (B, H, W) -> (B,)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(1).mean(1)


def hard_iou(logits: Tensor, target: Tensor) -> Tensor:
    """IoU of (logits > 0) with the target: (B, H, W) -> (B,); what SAM's IoU head predicts."""
    pred = (logits > 0).flatten(1)
    t = target.flatten(1) > 0.5
    inter = (pred & t).sum(1).float()
    union = (pred | t).sum(1).float()
    return inter / union.clamp(min=1)


def mask_loss(
    logits: Tensor, target: Tensor, kind: str = "focal_dice", focal_weight: float = FOCAL_WEIGHT
) -> Tensor:
    """Per-mask loss, (B, H, W) logits and {0, 1} float targets -> (B,).

    ``kind``: ``"focal_dice"`` (SAM: ``focal_weight`` x focal + dice) or ``"bce_dice"`` (RTS:
    BCE + dice).
    """
    if kind == "focal_dice":
        pixel_loss = focal_weight * focal_loss(logits, target)
    elif kind == "bce_dice":
        pixel_loss = bce_loss(logits, target)
    else:
        raise ValueError(f"unknown mask loss {kind!r}; expected one of {MASK_LOSSES}")
    return pixel_loss + DICE_WEIGHT * dice_loss(logits, target)


def bce_dice_loss(low_res_logits: Tensor, target_masks: Tensor) -> Tensor:
    """The RTS loss: BCE + Dice of low-res logits (B, 1, S/4, S/4), upsampled to the targets'
    (B, S, S), against the GT masks in the input frame. Mean over prompts (scalar)."""
    logits = upsample_logits(low_res_logits, target_masks.shape[-2:])[:, 0]
    return mask_loss(logits, target_masks.float(), "bce_dice").mean()


def decoder_loss(output: tuple[Tensor, Any], target_masks: Tensor) -> Tensor:
    """The default ``LossFn``: the RTS loss (``bce_dice_loss``) of the step's logits."""
    return bce_dice_loss(output[0], target_masks)


def sam_loss(
    low_res_logits: Tensor,
    iou_predictions: Tensor,
    target_masks: Tensor,
    kind: str = "focal_dice",
    focal_weight: float = FOCAL_WEIGHT,
) -> tuple[Tensor, Tensor]:
    """SAM's training loss for M prompts with C outputs each (SAM §3 and §A).

    ``low_res_logits`` (M, C, S/4, S/4), ``iou_predictions`` (M, C), ``target_masks`` (M, S, S)
    float. With C > 1 only the best output's mask loss counts (the ambiguity rule); the IoU head
    learns every output's actual IoU (MSE). Returns (loss scalar, the chosen output's upsampled
    logits (M, S, S), detached).
    """
    m, c = low_res_logits.shape[:2]
    size = target_masks.shape[-2:]
    up = upsample_logits(low_res_logits, size)
    target = target_masks[:, None].expand(-1, c, -1, -1).reshape(m * c, *size)
    flat = up.reshape(m * c, *size)
    losses = mask_loss(flat, target, kind, focal_weight).view(m, c)
    with torch.no_grad():
        ious = hard_iou(flat, target).view(m, c)
    best = losses.argmin(dim=1)
    chosen = losses.gather(1, best[:, None]).squeeze(1)
    iou_loss = F.mse_loss(iou_predictions.float(), ious, reduction="none").mean(1)
    loss = (chosen + IOU_WEIGHT * iou_loss).mean()
    return loss, up[torch.arange(m), best].detach()


# ----------------------------------------------------------------------------- inputs and step


def preprocess(
    sam: Sam | StableSam, images: np.ndarray, valid_hw: Sequence[tuple[int, int]]
) -> Tensor:
    """Input-frame images (B, S, S, 3) uint8 -> normalised (B, 3, S, S) on the model's device.

    Like SAM's ``preprocess``: normalise with the model's pixel mean / std (a SAM's, or a
    ``StableSam``'s, which is its base's: SAM 2's for a SAM 2 base), then zero the padding
    outside each image's valid (h, w) top-left region.
    """
    x = torch.as_tensor(images, device=sam.pixel_mean.device).permute(0, 3, 1, 2).float()
    x = (x - sam.pixel_mean) / sam.pixel_std
    for i, (h, w) in enumerate(valid_hw):
        x[i, :, h:, :] = 0
        x[i, :, :, w:] = 0
    return x


def clip_and_step(
    optimizer: torch.optim.Optimizer, parameters: Sequence[nn.Parameter], max_norm: float | None
) -> None:
    """The optimiser update after ``backward``: clip the gradients' global norm (when
    ``max_norm``), then step."""
    if max_norm:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    optimizer.step()


# ----------------------------------------------------------------------------- RTS


@dataclass
class TrainConfig:
    """Hyper-parameters of one RTS training run (saved in the output file's metadata)."""

    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_prompts: int = 32  # prompts per optimiser step (the paper's total batch)
    prompts_per_image: int = 8  # prompts drawn per augmented image
    seed: int = 0
    max_steps: int | None = None  # stop early (smoke tests, time-boxed runs)
    grad_clip: float | None = 1.0
    device: str | None = None  # None: CUDA when available, else CPU
    rts: rts.RTSConfig = field(default_factory=rts.RTSConfig)
    # Step schedule: the learning rate is multiplied by ``lr_drop_factor`` at the start of each
    # of these (0-based) epochs (HQ-SAM's recipe: 12 epochs, 1e-3 dropping to 1e-4 after 10).
    lr_drop_epochs: tuple[int, ...] = ()
    lr_drop_factor: float = 0.1

    def lr_at(self, epoch: int) -> float:
        """The learning rate of (0-based) ``epoch``."""
        return self.lr * self.lr_drop_factor ** sum(epoch >= e for e in self.lr_drop_epochs)

    @property
    def images_per_step(self) -> int:
        return max(1, math.ceil(self.batch_prompts / self.prompts_per_image))


@dataclass
class TrainResult:
    """What a training run did. ``summary`` is JSON-able and goes into the file's metadata."""

    steps: int
    final_loss: float  # mean loss over the last 10% of steps (at least the last one)
    wall_s: float
    images_per_s: float
    losses: list[float]
    summary: dict[str, Any]


def step_loss(
    model: StableSam,
    augmented: Sequence[rts.AugmentedImage],
    prompt_lists: Sequence[Sequence[rts.TargetPrompt]],
    scale: float,
    backward: bool = True,
    decoder: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    noise_seeds: Sequence[int] | None = None,
) -> tuple[float, int]:
    """Embed the images once (no grad), decode every prompt, accumulate gradients of the loss.

    ``scale`` divides the per-prompt loss sum (1 / total prompts of the step), so the
    accumulated gradient equals the gradient of the step's mean loss. ``decoder``: the
    ``training.distributed.DecodeStep`` to decode through (DDP-wrapped in a distributed run:
    gradients are all-reduced with the step's last image only, and a rank without prompts
    still joins that all-reduce). ``loss_fn``: the per-prompt mean loss of one image's decoder
    output (default ``decoder_loss``). ``noise_seeds``: one per image, seeding the decoder's
    own randomness (PA-SAM's Gumbel noise). Returns (loss sum × scale, number of prompts).
    """
    device = model.device
    loss_fn = loss_fn or decoder_loss
    decoder = decoder if decoder is not None else distributed.DecodeStep(model, [])
    ddp = isinstance(decoder, nn.parallel.DistributedDataParallel)
    # Prompt embeddings need gradients only when the prompt encoder trains (PT-SAM's tokens).
    prompt_grad = backward and any(p.requires_grad for p in model.prompt_encoder.parameters())
    with_prompts = [i for i, plist in enumerate(prompt_lists) if plist]
    total, count = 0.0, 0
    if with_prompts:
        images = np.stack([augmented[i].image for i in with_prompts])
        with torch.no_grad(), autocast_context(device):
            # HQ-SAM's fusion of the ViT features is per image in the decoder step: HQ-SAM
            # trains it (``training.baselines``'s hq-sam). SAM 2: its high-resolution features.
            inputs = preprocess(model, images, [augmented[i].valid_hw for i in with_prompts])
            embeddings, vit_features = model.encode_backbone(inputs)
            details = model.image_detail(inputs)  # PA-SAM's [I, ∇I]; None for the others
        embeddings = embeddings.float()
    for k, i in enumerate(with_prompts):
        aug, plist = augmented[i], prompt_lists[i]
        prompts, targets_all = [], []
        for group in rts.group_prompts(plist).values():
            points, boxes, masks = rts.prompt_tensors(group, device)
            with torch.set_grad_enabled(prompt_grad):
                prompts.append(model.encode_prompts(points, boxes, masks))
            targets_all.append(np.stack([aug.masks[p.target] for p in group]))
        targets = torch.as_tensor(np.concatenate(targets_all), device=device)
        last = k == len(with_prompts) - 1
        # Gradients are accumulated image by image: one image's decoder graph at a time.
        with decoder.no_sync() if ddp and not last else contextlib.nullcontext():
            with autocast_context(device):
                vit = _image_features(vit_features, k)
                detail = None if details is None else details[k : k + 1]
                seed = None if noise_seeds is None else noise_seeds[i]
                output = decoder(embeddings[k : k + 1], prompts, vit, detail, seed)
            loss = loss_fn(output, targets) * (len(plist) * scale)
            if backward:
                loss.backward()
        total += float(loss.detach())
        count += len(plist)
    if ddp and backward and not with_prompts:
        decoder(None).backward()  # this rank has nothing to decode: a zero gradient
    return total, count


def _image_features(
    features: Tensor | tuple[Tensor, ...] | None, k: int
) -> Tensor | tuple[Tensor, ...] | None:
    """Image ``k``'s share (batch of one, float) of ``encode_backbone``'s per-image features."""
    if features is None:
        return None
    if isinstance(features, tuple):
        return tuple(f[k : k + 1].float() for f in features)
    return features[k : k + 1].float()


def fit(
    model: StableSam,
    parameters: Sequence[nn.Parameter],
    dataset: Sequence[Sample],
    config: TrainConfig,
    progress: Progress | None = None,
    modules_to_train: Sequence[nn.Module] = (),
    ranks: distributed.Ranks | None = None,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """The RTS loop shared by the plugins and the baselines: trains ``parameters`` (those of
    ``modules_to_train``) on ``loss_fn`` (default ``decoder_loss``, the RTS loss).

    ``ranks``: this process's share of a ``torchrun`` run (``training.distributed``; default a
    world of one). Every image of a step draws its augmentation and prompts from its own
    generator, seeded by (seed, step, position in the step), so any number of ranks train
    exactly what one process trains with the same total batch.
    """
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    parameters = list(parameters)
    if not parameters:
        raise ValueError("nothing to train: no parameters given")
    ranks = ranks or distributed.Ranks()
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    side = model.image_size
    per_step = config.images_per_step
    steps_per_epoch = math.ceil(len(dataset) / per_step)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    for m in modules_to_train:
        m.train()
    decoder = distributed.wrap(distributed.DecodeStep(model, modules_to_train), ranks, model.device)

    losses: list[float] = []
    images_seen, prompts_seen, step = 0, 0, 0
    start = time.perf_counter()
    if ranks.main:
        logger.info(
            "RTS training: %d images, %d steps of %d prompts (%d images/step), robust=%s, "
            "device=%s, %d process(es)",
            len(dataset),
            total_steps,
            config.batch_prompts,
            per_step,
            config.rts.robust,
            model.device,
            ranks.world,
        )
    if ranks.main and ranks.world > per_step:
        logger.warning(
            "%d processes but %d images per step (%d prompts, %d per image): %d processes "
            "idle every step; lower --prompts-per-image",
            ranks.world,
            per_step,
            config.batch_prompts,
            config.prompts_per_image,
            ranks.world - per_step,
        )
    # Step plan: one shuffled pass per epoch, cut into groups of ``per_step`` images; the same
    # on every rank, which takes its positions of each step (and their occlusion donors).
    plan = [
        order[first : first + per_step]
        for order in (rng.permutation(len(dataset)) for _ in range(config.epochs))
        for first in range(0, len(order), per_step)
    ][:total_steps]
    # Samples are read (synthetic scenes rendered) one step ahead in a thread: numpy/OpenCV
    # release the GIL, so this overlaps with the decoder passes.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rts-prefetch")
    pending = pool.submit(_load_shard, dataset, plan[0], ranks) if plan else None
    try:
        for index in range(len(plan)):
            shard = pending.result()
            if index + 1 < len(plan):
                pending = pool.submit(_load_shard, dataset, plan[index + 1], ranks)
            augmented, prompt_lists, noise_seeds = [], [], []
            for position, sample, donor in shard:
                image_rng = np.random.default_rng((config.seed, index, position))
                aug = rts.augment(sample, donor, side, image_rng, config.rts)
                augmented.append(aug)
                prompt_lists.append(
                    rts.sample_prompts(aug, config.prompts_per_image, image_rng, config.rts)
                )
                # The decoder's own noise (PA-SAM's Gumbel draws), from the image's stream too.
                noise_seeds.append(int(image_rng.integers(2**62)))
            n_prompts = int(ranks.sum(sum(len(p) for p in prompt_lists), model.device))
            images_seen += len(plan[index])
            step += 1
            if n_prompts == 0:  # on every rank alike
                logger.debug("step %d: no promptable objects, skipped", step)
                continue
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(index // steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients: ``world`` undoes its division by world.
            scale = ranks.world / n_prompts
            local, _ = step_loss(
                model,
                augmented,
                prompt_lists,
                scale,
                decoder=decoder,
                loss_fn=loss_fn,
                noise_seeds=noise_seeds,
            )
            clip_and_step(optimizer, parameters, config.grad_clip)
            loss = ranks.sum(local, model.device) / ranks.world
            losses.append(loss)
            prompts_seen += n_prompts
            if progress is not None and ranks.main:
                progress(step, total_steps, loss)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for m in modules_to_train:
            m.eval()
    wall = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float("nan")]
    final = float(np.mean(tail))
    result = TrainResult(
        steps=step,
        final_loss=final,
        wall_s=wall,
        images_per_s=images_seen / wall if wall > 0 else 0.0,
        losses=losses,
        summary={
            "steps": step,
            "images": images_seen,
            "prompts": prompts_seen,
            "dataset_size": len(dataset),
            "final_loss": round(final, 5),
            "first_loss": round(losses[0], 5) if losses else None,
            "wall_s": round(wall, 1),
            "images_per_s": round(images_seen / wall, 3) if wall > 0 else 0.0,
            "device": str(model.device),
            "torch_threads": torch.get_num_threads(),
            "processes": ranks.world,
            "process_group": torch.distributed.get_backend() if ranks.distributed else None,
            "config": _jsonable(asdict(config)),
        },
    )
    if ranks.main:
        logger.info(
            "RTS training done: %d steps, final loss %.4f, %.1f s, %.2f images/s",
            result.steps,
            result.final_loss,
            result.wall_s,
            result.images_per_s,
        )
    return result


def _load_shard(
    dataset: Sequence[Sample], indices: np.ndarray, ranks: distributed.Ranks
) -> list[tuple[int, Sample, Sample]]:
    """This rank's (position, sample, occlusion donor) of one step. The donor is the step's
    next image (itself when alone), as in a one-process run."""
    n = len(indices)
    positions = ranks.shard(n)
    loaded: dict[int, Sample] = {}

    def load(position: int) -> Sample:
        if position not in loaded:
            loaded[position] = dataset[int(indices[position])]
        return loaded[position]

    return [(p, load(p), load((p + 1) % n)) for p in positions]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def train_plugins(
    model: StableSam,
    dataset: Sequence[Sample],
    config: TrainConfig | None = None,
    progress: Progress | None = None,
    ranks: distributed.Ranks | None = None,
) -> TrainResult:
    """Train ``model.plugins`` (DSP + DRP) on ``dataset`` with RTS; SAM stays frozen.

    Arguments:
      model: a ``StableSam`` with plugins (its SAM parameters are frozen by construction).
      dataset: any sequence of ``Sample`` (image (H,W,3) uint8, masks (N,H,W) bool, name).
      config: ``TrainConfig`` (defaults: one epoch, Adam lr 1e-3, 32 prompts per step).
      progress: called as ``progress(step, total_steps, loss)`` after each optimiser step.
      ranks: this process's share of a ``torchrun`` run (``training.distributed``).
    """
    if model.plugins is None:
        raise ValueError("train_plugins needs a StableSam with plugins (plain SAM given)")
    config = config or TrainConfig()
    params = model.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    return fit(model, params, dataset, config, progress, [model.plugins], ranks)


__all__ = [
    "DICE_WEIGHT",
    "FOCAL_WEIGHT",
    "IOU_WEIGHT",
    "MASK_LOSSES",
    "LossFn",
    "Progress",
    "TrainConfig",
    "TrainResult",
    "bce_dice_loss",
    "bce_loss",
    "clip_and_step",
    "decoder_loss",
    "dice_loss",
    "fit",
    "focal_loss",
    "hard_iou",
    "mask_loss",
    "preprocess",
    "sam_loss",
    "step_loss",
    "train_plugins",
    "upsample_logits",
]
