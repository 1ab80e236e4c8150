"""Pretraining checkpoints: the fp16 export that ships, and the full training state to resume."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from stable_sam.checkpoint import write_safetensors_atomic
from training.pretrain.config import PretrainConfig


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


def load_state(
    path: Path, sam: Sam, opt: torch.optim.Optimizer, device: torch.device
) -> tuple[int, float, list[dict]]:
    """Restore ``save_state``'s model and optimiser; returns (step, elapsed s, history)."""
    state = torch.load(path, map_location=device, weights_only=True)
    sam.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state["elapsed_s"]), list(state.get("history", []))
