"""``python -m training.pretrain``: pretrain the mini SAM (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from runtime.logs import configure_logging
from training.pretrain import __doc__ as package_doc
from training.pretrain.config import MODEL_TYPE, PRETRAIN_TYPES, PretrainConfig
from training.pretrain.loop import pretrain
from training.pretrain.provenance import write_provenance


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.pretrain", description=package_doc.split("\n\n")[0]
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the fp16 export (default: stable_sam/weights/sam_<model type>.safetensors)",
    )
    p.add_argument(
        "--state", type=Path, default=None,
        help="full training state (default: .cache/pretrain/state.pt for mini, "
             ".cache/pretrain/<model type>_state.pt otherwise)",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-type", choices=PRETRAIN_TYPES, default=PretrainConfig.model_type)
    p.add_argument(
        "--init-from", default=None,
        help="a SAM file to start from (a mini file for mini_512: position tables resized)",
    )  # fmt: skip
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
        "--composite-fraction", type=float, default=PretrainConfig.composite_fraction,
        help="share of real-picture composites among the training images (needs "
             "python -m training.real_pictures --install)",
    )  # fmt: skip
    p.add_argument("--correction-prob", type=float, default=PretrainConfig.correction_prob)
    p.add_argument(
        "--correction-rounds", type=int, default=PretrainConfig.correction_rounds,
        help="error-region clicks added one after another (SAM: 8)",
    )  # fmt: skip
    p.add_argument(
        "--correction-mask-prob", type=float, default=PretrainConfig.correction_mask_prob,
        help="share of correction rounds that also get the previous logits as mask prompt",
    )  # fmt: skip
    p.add_argument(
        "--freeze-encoder", action="store_true",
        help="train the prompt encoder and mask decoder only",
    )  # fmt: skip
    p.add_argument(
        "--provenance", type=Path, default=None,
        help="default: PROVENANCE.md (mini) or PROVENANCE_<model type>.md next to --out",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    mini = args.model_type == MODEL_TYPE
    args.out = args.out or Path(f"stable_sam/weights/sam_{args.model_type}.safetensors")
    args.state = args.state or Path(
        ".cache/pretrain/state.pt" if mini else f".cache/pretrain/{args.model_type}_state.pt"
    )
    name = "PROVENANCE.md" if mini else f"PROVENANCE_{args.model_type}.md"
    args.provenance = args.provenance or args.out.parent / name
    if args.init_from and Path(args.init_from).resolve() == args.out.resolve():
        p.error(f"--out {args.out} is the --init-from file: the run would overwrite its start")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    configure_logging("INFO")
    cfg = PretrainConfig(
        seed=args.seed,
        model_type=args.model_type,
        init_from=args.init_from,
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
        composite_fraction=args.composite_fraction,
        mask_loss=args.mask_loss,
        focal_ramp=args.focal_ramp,
        correction_prob=args.correction_prob,
        correction_rounds=args.correction_rounds,
        correction_mask_prob=args.correction_mask_prob,
        freeze_encoder=args.freeze_encoder,
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
    write_provenance(args.provenance, argv, cfg, summary, args.out, wall)
    h = summary["heldout"]
    print(
        f"done: {summary['steps']} steps, {summary['images']} images, "
        f"{summary['images_per_s_this_run']} img/s; held-out GT-box mIoU {h['box_miou']:.1f}, "
        f"1-point mIoU {h['point1_miou']:.1f} (single output {h['point1_single_miou']:.1f}) "
        f"over {h['objects']} objects -> {args.out}"
    )


if __name__ == "__main__":
    main()
