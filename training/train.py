"""Train the Stable-SAM plugins (DSP + DRP) on a frozen SAM with the robust training strategy.

Reads top to bottom: data (any ``Sequence[Sample]``), model, optimiser, loop, checkpoint.

    python -m training.train --base stable_sam/weights/sam_mini.safetensors --data synthetic \\
        --n 1000 --out stable_sam/weights/stable_sam_mini_plugins.safetensors

One step = ``batch_prompts`` prompts (32, the paper's total batch) from ``batch_prompts //
prompts_per_image`` augmented images. The image encoder is frozen, so each augmented image is
embedded once, without gradients; only the prompt-conditioned decoder pass is differentiated.
Adam, lr 1e-3, weight decay 0, one epoch (the paper's "fast adaptation" default).

Variants (``--variant``; the rows of paper Table 5 and the DT-SAM baseline):
  ``stable``      DSP + DRP, full RTS (the shipped default plugins)
  ``dsp``         DSP only (routing fixed to α = (1, 0)), full RTS
  ``dsp-no-rts``  DSP only, clean prompts (GT boxes), no occlusion synthesis
  ``dt-sam``      no plugins; SAM's mask decoder fine-tuned with RTS (``training.baselines``)
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stable_sam import PluginConfig, StableSam, build_stable_sam, save_plugins
from stable_sam.device import autocast_context
from training import rts
from training.data import Sample

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]  # (step, total_steps, loss)

VARIANTS = ("stable", "dsp", "dsp-no-rts", "dt-sam")


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


def variant_setup(variant: str) -> tuple[PluginConfig | None, bool]:
    """(plugin config or None for DT-SAM, robust RTS on/off) for a training variant."""
    if variant == "stable":
        return PluginConfig(), True
    if variant == "dsp":
        return PluginConfig(fixed_alpha=(1.0, 0.0)), True
    if variant == "dsp-no-rts":
        return PluginConfig(fixed_alpha=(1.0, 0.0)), False
    if variant == "dt-sam":
        return None, True
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


# ----------------------------------------------------------------------------- one step


def preprocess(model: StableSam, augmented: Sequence[rts.AugmentedImage]) -> torch.Tensor:
    """Augmented images (S, S, 3) uint8 -> normalised (n, 3, S, S) on the model's device.

    Like SAM's ``preprocess``: normalise the content, then zero padding bottom-right.
    """
    sam = model.sam
    images = np.stack([a.image for a in augmented])
    x = torch.as_tensor(images, device=model.device).permute(0, 3, 1, 2).float()
    x = (x - sam.pixel_mean) / sam.pixel_std
    for i, a in enumerate(augmented):
        h, w = a.valid_hw
        x[i, :, h:, :] = 0
        x[i, :, :, w:] = 0
    return x


def step_loss(
    model: StableSam,
    augmented: Sequence[rts.AugmentedImage],
    prompt_lists: Sequence[Sequence[rts.Prompt]],
    scale: float,
    backward: bool = True,
) -> tuple[float, int]:
    """Embed the images once (no grad), decode every prompt, accumulate gradients of the loss.

    ``scale`` divides the per-prompt loss sum (1 / total prompts of the step), so the
    accumulated gradient equals the gradient of the step's mean loss. Returns (loss sum × scale,
    number of prompts).
    """
    device = model.device
    with torch.no_grad(), autocast_context(device):
        embeddings, hq = model.encode(preprocess(model, augmented))
    embeddings = embeddings.float()
    total, count = 0.0, 0
    for i, (aug, plist) in enumerate(zip(augmented, prompt_lists, strict=True)):
        if not plist:
            continue
        emb = embeddings[i : i + 1]
        hq_i = None if hq is None else hq[i : i + 1].float()
        logits_all, targets_all = [], []
        for group in rts.group_prompts(plist).values():
            points, boxes, masks = rts.prompt_tensors(group, device)
            with torch.no_grad():
                sparse, dense = model.encode_prompts(points, boxes, masks)
            with autocast_context(device):
                logits, _ = model.decode(emb, sparse, dense, False, hq_i)
            logits_all.append(logits)
            targets_all.append(np.stack([aug.masks[p.target] for p in group]))
        logits = torch.cat(logits_all)
        targets = torch.as_tensor(np.concatenate(targets_all), device=device)
        loss = rts.bce_dice_loss(logits, targets) * (len(plist) * scale)
        if backward:
            loss.backward()
        total += float(loss.detach())
        count += len(plist)
    return total, count


# ----------------------------------------------------------------------------- the loop


def fit(
    model: StableSam,
    parameters: Sequence[nn.Parameter],
    dataset: Sequence[Sample],
    config: TrainConfig,
    progress: Progress | None = None,
    modules_to_train: Sequence[nn.Module] = (),
) -> TrainResult:
    """The RTS loop shared by the plugins and the DT-SAM baseline: trains ``parameters``."""
    if len(dataset) == 0:
        raise ValueError("cannot train on an empty dataset")
    parameters = list(parameters)
    if not parameters:
        raise ValueError("nothing to train: no parameters given")
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

    losses: list[float] = []
    images_seen, prompts_seen, step = 0, 0, 0
    start = time.perf_counter()
    logger.info(
        "RTS training: %d images, %d steps of %d prompts (%d images/step), robust=%s, device=%s",
        len(dataset),
        total_steps,
        config.batch_prompts,
        per_step,
        config.rts.robust,
        model.device,
    )
    # Step plan: one shuffled pass per epoch, cut into groups of ``per_step`` images.
    plan = [
        order[first : first + per_step]
        for order in (rng.permutation(len(dataset)) for _ in range(config.epochs))
        for first in range(0, len(order), per_step)
    ][:total_steps]
    # Samples are read (synthetic scenes rendered) one step ahead in a thread: numpy/OpenCV
    # release the GIL, so this overlaps with the decoder passes. Augmentation stays here, so
    # the random stream, and the run, are deterministic.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rts-prefetch")
    pending = pool.submit(_load, dataset, plan[0]) if plan else None
    try:
        for index in range(len(plan)):
            samples = pending.result()
            if index + 1 < len(plan):
                pending = pool.submit(_load, dataset, plan[index + 1])
            augmented, prompt_lists = [], []
            for j, sample in enumerate(samples):
                # Occluders come from another image of the step (itself when alone).
                donor = samples[(j + 1) % len(samples)]
                aug = rts.augment(sample, donor, side, rng, config.rts)
                augmented.append(aug)
                prompt_lists.append(
                    rts.sample_prompts(aug, config.prompts_per_image, rng, config.rts)
                )
            n_prompts = sum(len(p) for p in prompt_lists)
            images_seen += len(samples)
            step += 1
            if n_prompts == 0:
                logger.debug("step %d: no promptable objects, skipped", step)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss, _ = step_loss(model, augmented, prompt_lists, 1.0 / n_prompts)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            losses.append(loss)
            prompts_seen += n_prompts
            if progress is not None:
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
            "config": _jsonable(asdict(config)),
        },
    )
    logger.info(
        "RTS training done: %d steps, final loss %.4f, %.1f s, %.2f images/s",
        result.steps,
        result.final_loss,
        result.wall_s,
        result.images_per_s,
    )
    return result


def _load(dataset: Sequence[Sample], indices: np.ndarray) -> list[Sample]:
    return [dataset[int(i)] for i in indices]


def train_plugins(
    model: StableSam,
    dataset: Sequence[Sample],
    config: TrainConfig | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train ``model.plugins`` (DSP + DRP) on ``dataset`` with RTS; SAM stays frozen.

    Arguments:
      model: a ``StableSam`` with plugins (its SAM parameters are frozen by construction).
      dataset: any sequence of ``Sample`` (image (H,W,3) uint8, masks (N,H,W) bool, name).
      config: ``TrainConfig`` (defaults: one epoch, Adam lr 1e-3, 32 prompts per step).
      progress: called as ``progress(step, total_steps, loss)`` after each optimiser step.
    """
    if model.plugins is None:
        raise ValueError("train_plugins needs a StableSam with plugins (plain SAM given)")
    config = config or TrainConfig()
    params = model.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    return fit(model, params, dataset, config, progress, modules_to_train=[model.plugins])


# ----------------------------------------------------------------------------- CLI


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def load_dataset(data: str, n: int, split: str = "train") -> Sequence[Sample]:
    """``synthetic`` -> ``n`` synthetic scenes of ``split``; a folder -> ``MaskFolderDataset``."""
    if data == "synthetic":
        from training.scenes import SceneDataset

        return SceneDataset(split, n)
    from training.data import MaskFolderDataset

    folder = MaskFolderDataset(data)
    return folder if n <= 0 or n >= len(folder) else [folder[i] for i in range(n)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="SAM base checkpoint (.safetensors/.pth)")
    parser.add_argument("--model-type", default="mini")
    parser.add_argument(
        "--data", default="synthetic", help="'synthetic' or a mask folder (images/, masks/)"
    )
    parser.add_argument("--n", type=int, default=1000, help="number of training images")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors")
    parser.add_argument("--variant", choices=VARIANTS, default="stable")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3 (dt-sam: 1e-4)")
    parser.add_argument("--batch-prompts", type=int, default=32)
    parser.add_argument("--prompts-per-image", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if present)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: see docs/MODEL.md)"
    )
    parser.add_argument("--version", default=None, help="version string stored in the file")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> TrainResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plugin_config, robust = variant_setup(args.variant)
    lr = args.lr if args.lr is not None else (1e-4 if args.variant == "dt-sam" else 1e-3)
    config = TrainConfig(
        epochs=args.epochs,
        lr=lr,
        batch_prompts=args.batch_prompts,
        prompts_per_image=args.prompts_per_image,
        seed=args.seed,
        max_steps=args.max_steps,
        device=args.device,
        rts=rts.RTSConfig(robust=robust),
    )
    dataset = load_dataset(args.data, args.n)
    model = build_stable_sam(
        args.model_type,
        args.base,
        plugins=plugin_config is not None,
        plugin_config=plugin_config,
        device=args.device,
    )
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=1, unit="step", desc=f"RTS {args.variant}")

    def progress(step: int, total: int, loss: float) -> None:
        if bar is not None:
            bar.total = total
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(step - bar.n)

    if args.variant == "dt-sam":
        from training.baselines import save_decoder, train_dt_sam

        result = train_dt_sam(model, dataset, config, progress)
    else:
        result = train_plugins(model, dataset, config, progress)
    if bar is not None:
        bar.close()
    result.summary.update(
        {
            "variant": args.variant,
            "data": args.data,
            "base": Path(args.base).name,
            "hardware": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "command": "python -m training.train " + " ".join(argv or _argv()),
        }
    )
    meta = {"version": args.version or f"{args.variant}-seed{args.seed}"}
    meta["training_summary"] = result.summary
    if args.variant == "dt-sam":
        save_decoder(model, args.out, meta)
    else:
        save_plugins(model, args.out, meta)
    print(
        f"{args.variant}: {result.steps} steps, final loss {result.final_loss:.4f}, "
        f"{result.wall_s / 60:.1f} min, {result.images_per_s:.2f} images/s -> {args.out}"
    )
    return result


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
