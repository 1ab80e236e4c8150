"""Train the Stable-SAM plugins (DSP + DRP) on a frozen SAM with the robust training strategy.

Reads top to bottom: data (any ``Sequence[Sample]``), model, optimiser, loop, checkpoint; the
loop and the losses are ``training.engine``'s, the variants ``training.baselines``'.

    python -m training.train --base stable_sam/weights/sam_mini.safetensors --data synthetic \\
        --n 1000 --out stable_sam/weights/stable_sam_mini_plugins.safetensors

Adam, lr 1e-3, weight decay 0, one epoch (the paper's "fast adaptation" default).

Variants (``--variant``; the rows of paper Table 5 and the baselines, ``training.baselines``):
  ``stable``      DSP + DRP, full RTS (the shipped default plugins)
  ``dsp``         DSP only (routing fixed to α = (1, 0)), full RTS
  ``dsp-no-rts``  DSP only, clean prompts (GT boxes), no occlusion synthesis
  ``dt-sam``      no plugins; SAM's mask decoder fine-tuned with RTS (lr 1e-4)
  ``pt-sam``      no plugins; only SAM's tokens fine-tuned with RTS (lr 1e-3)
  ``hq-sam``      HQ-SAM's new parameters, its own recipe (12 epochs, lr 1e-3 → 1e-4 after 10)
  ``hq-sam-rts``  HQ-SAM's new parameters trained with RTS (one epoch)
  ``pa-sam``      PA-SAM's prompt adapter beside the frozen SAM, RTS (one epoch, lr 1e-3)

``--data``: ``synthetic``, ``composites`` (real-picture composites, ``training.composites``),
``mixed`` (both, ``--composite-fraction`` composites), a folder of ``images/`` + ``masks/``, or
an HQSeg-44K root (``training.hqseg``). As the paper trained (8 GPUs, total batch 32, one epoch of HQSeg-44K)::

    torchrun --nproc_per_node=8 -m training.train --base sam_vit_l_0b3195.pth \\
        --model-type vit_l --data data/sam-hq --images 0 --batch-prompts 32 --prompts-per-image 4 --out plugins.safetensors

Under ``torchrun`` the step's images are shared out over the processes and DDP averages the
gradients (``training.distributed``); ``--images`` replaces ``--n`` there (torchrun's own
parser takes ``--n`` for one of its options).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from runtime.logs import configure_logging
from training import distributed
from training.baselines import VARIANTS
from training.data import MaskFolderDataset, Mixture, Sample, Spread
from training.engine import TrainResult
from training.hqseg import SUBSET_NAMES, HQSegDataset, is_hqseg_root
from training.scenes import SceneDataset


def load_dataset(
    data: str,
    n: int,
    split: str = "train",
    hqseg_subsets: Sequence[str] | None = None,
    composite_fraction: float = 0.5,
    seed: int = 0,
) -> Sequence[Sample]:
    """``synthetic`` -> ``n`` synthetic scenes of ``split``; ``composites`` -> ``n``
    real-picture composites of ``split`` (``training.composites``; their Debian packages
    installed); ``mixed`` -> the two interleaved, a ``composite_fraction`` share composites
    (which ones: drawn from ``seed``);
    an HQSeg-44K root -> ``HQSegDataset`` (its ``hqseg_subsets``, default all); another folder
    -> ``MaskFolderDataset``. ``n`` > 0 keeps the first ``n`` images."""
    if data == "synthetic":
        return SceneDataset(split, n)
    if data in ("composites", "mixed"):
        from training.composites import CompositeDataset

        composites = CompositeDataset(split, n)
        if data == "composites":
            return composites
        return Mixture(SceneDataset(split, n), composites, composite_fraction, seed)
    folder = HQSegDataset(data, hqseg_subsets) if is_hqseg_root(data) else MaskFolderDataset(data)
    if n <= 0 or n >= len(folder):
        return folder
    # Spread over the whole folder (HQSeg-44K lists its sources one after the other), read
    # lazily: every torchrun rank holds only the indices.
    return Spread(folder, n)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="SAM base checkpoint (.safetensors/.pth)")
    parser.add_argument("--model-type", default="mini")
    parser.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic', 'composites' (real-picture composites), 'mixed' (both) or a mask "
        "folder (images/, masks/)",
    )
    parser.add_argument(
        "--composite-fraction", type=float, default=None,
        help="with --data mixed: the composites' share (default 0.5)",
    )  # fmt: skip
    # --images under torchrun, whose own parser takes "--n" for an abbreviation of its options.
    parser.add_argument(
        "--images", "--n", dest="n", type=int, default=1000, help="number of training images"
    )
    parser.add_argument(
        "--hqseg-subsets",
        default=None,
        help=f"with an HQSeg-44K --data root: comma-separated subsets of {','.join(SUBSET_NAMES)}",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors")
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="stable")
    parser.add_argument(
        "--epochs", type=int, default=None, help="default: the variant's (1; hq-sam: 12)"
    )
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
    args = parser.parse_args(argv)
    if args.composite_fraction is not None and args.data != "mixed":
        parser.error("--composite-fraction is for --data mixed")
    return args


def main(argv: list[str] | None = None) -> TrainResult:
    args = parse_args(argv)
    # Under torchrun: one process per GPU (or CPU share), gradients averaged by DDP.
    ranks, device = distributed.start(args.device)
    try:
        return _run(args, argv, ranks, device)
    finally:
        distributed.stop()


def _run(
    args: argparse.Namespace, argv: list[str] | None, ranks: distributed.Ranks, device: str | None
) -> TrainResult:
    configure_logging("INFO" if ranks.main else "WARNING")
    if args.threads:
        torch.set_num_threads(args.threads)
    variant = VARIANTS[args.variant]

    # Data.
    subsets = args.hqseg_subsets.split(",") if args.hqseg_subsets else None
    fraction = 0.5 if args.composite_fraction is None else args.composite_fraction
    dataset = load_dataset(
        args.data, args.n, hqseg_subsets=subsets, composite_fraction=fraction, seed=args.seed
    )
    # Model: a frozen SAM, with fresh plugins (or, for DT-SAM, its decoder to fine-tune).
    model = variant.build_model(args.model_type, args.base, device, seed=args.seed)
    # Optimiser and loop: Adam inside the engine's RTS loop.
    config = variant.train_config(
        lr=args.lr,
        epochs=args.epochs,
        batch_prompts=args.batch_prompts,
        prompts_per_image=args.prompts_per_image,
        seed=args.seed,
        max_steps=args.max_steps,
        device=device,
    )
    bar = None
    if not args.no_progress and ranks.main:
        from tqdm import tqdm

        bar = tqdm(total=1, unit="step", desc=f"RTS {args.variant}")

    def progress(step: int, total: int, loss: float) -> None:
        if bar is not None:
            bar.total = total
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(step - bar.n)

    result = variant.train(model, dataset, config, progress, ranks)
    if bar is not None:
        bar.close()
    # Checkpoint: the plugin (or decoder) file with the run's summary in its metadata.
    result.summary.update(
        {
            "variant": args.variant,
            "data": args.data,
            "base": Path(args.base).name,
            "hardware": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "command": "python -m training.train " + " ".join(argv or sys.argv[1:]),
        }
    )
    if not ranks.main:
        return result  # every rank holds the same weights: rank 0 writes them
    meta = {"version": args.version or f"{args.variant}-seed{args.seed}"}
    meta["training_summary"] = result.summary
    variant.save(model, args.out, meta)
    print(
        f"{args.variant}: {result.steps} steps, final loss {result.final_loss:.4f}, "
        f"{result.wall_s / 60:.1f} min, {result.images_per_s:.2f} images/s -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
