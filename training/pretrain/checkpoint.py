"""Pretraining checkpoints: the fp16 export that ships, and the full training state to resume."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from stable_sam.checkpoint import state_mismatch, write_safetensors_atomic
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


def resized_state(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` (a SAM of one input size) fitted to ``target``'s shapes (the same architecture
    at another input size): the image encoder's absolute position embedding (1, h, w, C) is
    resized bicubically to the new grid, the global-attention blocks' relative position tables
    (2s - 1, C) linearly to the new length (SAM's own ``get_rel_pos`` rule); every other tensor
    must match as is. Keys must be the same; a mismatch names them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        want = target.get(key)
        if want is None or want.shape == value.shape:
            out[key] = value
        elif key.endswith("pos_embed") and value.ndim == 4:
            grid = F.interpolate(
                value.permute(0, 3, 1, 2).float(), size=want.shape[1:3], mode="bicubic",
                align_corners=False,
            )  # fmt: skip
            out[key] = grid.permute(0, 2, 3, 1).to(value.dtype)
        elif ".rel_pos_" in key and value.ndim == 2:
            table = F.interpolate(value.T[None].float(), size=want.shape[0], mode="linear")
            out[key] = table[0].T.to(value.dtype)
        else:
            out[key] = value  # reported below
    missing, unexpected, reshaped = state_mismatch(out, target)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"cannot warm-start from this state: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {reshaped[:5]}"
        )
    return out


def warm_start(sam: Sam, path: Path) -> None:
    """Load the SAM file ``path`` (another input size of the same architecture, e.g. a ``mini``
    file into ``mini_512``) into ``sam`` through ``resized_state``."""
    from stable_sam.build import load_state_dict

    sam.load_state_dict(resized_state(load_state_dict(path), sam.state_dict()))
