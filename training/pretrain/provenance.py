"""Where the weights came from: the machine, the commit, and the PROVENANCE.md record."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from stable_sam.build import file_sha256
from training.pretrain.config import PretrainConfig


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


def git_commit() -> str:
    """The checked-out commit of the training code (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def composite_packages(cfg: PretrainConfig) -> str:
    """The Debian packages (name version) the composites' pictures come from, per the catalogue."""
    from training.composites import catalogue_at
    from training.real_pictures import CATALOGUE_PATH

    catalogue = catalogue_at(cfg.composite_catalogue or CATALOGUE_PATH)
    return ", ".join(f"`{name} {version}`" for name, version in sorted(catalogue.packages.items()))


def write_provenance(
    path: Path, argv: list[str], cfg: PretrainConfig, summary: dict, out: Path, wall_s: float
) -> None:
    """The provenance record next to the shipped weights."""
    h = summary["heldout"]
    runs = "\n".join(
        f"  {i + 1}. `python -m training.pretrain {r['command']}`: steps {r['from_step']}-"
        f"{r['to_step']}, {r['train_min']} min, commit {r['commit'][:10]}, {r['hardware']}"
        for i, r in enumerate(summary.get("history", []))
    )
    data = "synthetic scenes (`training/scenes.py`, train split). No external data or weights were used."
    if cfg.composite_fraction > 0:
        data = (
            f"synthetic scenes (`training/scenes.py`, train split) and, for "
            f"{100 * cfg.composite_fraction:.0f} % of the images, real-picture composites "
            f"(`training/composites.py`, train split) from Debian packages {composite_packages(cfg)}. "
            "No external weights were used."
        )
    start = "from random initialisation"
    if cfg.init_from:
        init = Path(cfg.init_from)
        first = (summary.get("history") or [{}])[0]
        sha = first.get("init_sha256") or (
            file_sha256(init) if init.is_file() else "file not on this machine"
        )
        start = (
            f"from `{init.name}` (SHA-256 `{sha}` when the run started; position tables "
            "resized to the input where its grid differs, by "
            "`training.pretrain.checkpoint.warm_start`)"
        )
    if cfg.freeze_encoder:
        start += ", the image encoder frozen (prompt encoder and mask decoder trained)"
    if cfg.correction_rounds != 1:
        start += (
            f", with {cfg.correction_rounds} correction clicks per corrected prompt (the previous "
            f"logits as mask prompt in {100 * cfg.correction_mask_prob:.0f} % of the rounds)"
        )
    data_line = "synthetic train scenes (even seeds)"
    if cfg.composite_fraction > 0:
        data_line += f" and real-picture composites ({100 * cfg.composite_fraction:.0f} %)"
    text = f"""# Provenance of `{out.name}`

The `{cfg.model_type}` SAM (see `docs/MODEL.md`), pretrained {start} by this repository's
`training/pretrain/` on {data}

- Command (last invocation): `python -m training.pretrain {" ".join(argv)}`
- Runs that produced the weights (a run and its `--resume`s):
{runs}
- Seed: {cfg.seed}
- Data: {data_line}, sides {cfg.train_size_range[0]}-{cfg.train_size_range[1]} px,
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
