"""SAM 2.1 image models from the ``sam2`` package (Ravi et al., 2024), as Stable-SAM bases.

``sam2`` builds its models from hydra configs that ship inside the package
(``configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml``); the model types here are named as ``sam2``
names its checkpoints (``sam2.1_hiera_tiny.pt`` -> ``sam2.1_hiera_tiny``). An official checkpoint
is ``{"model": state_dict}`` and loads strictly, through ``torch.load(weights_only=True)``: no
pickled code runs. The image path only is used (no memory attention, no video): ``StableSam2``
wraps the ``SAM2Base`` built here.

Importing ``sam2`` initialises hydra's global config module, so it is imported on first use.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# model type -> its config inside the sam2 package.
SAM2_CONFIGS: dict[str, str] = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
SAM2_MODEL_TYPES = tuple(SAM2_CONFIGS)


def is_sam2_type(model_type: str) -> bool:
    return model_type in SAM2_CONFIGS


def build_sam2_base(model_type: str) -> nn.Module:
    """A ``sam2.modeling.sam2_base.SAM2Base`` of ``model_type`` with random weights, on the CPU,
    in eval mode (``stable_sam.build.build_sam`` loads a checkpoint into it). Built as
    ``sam2.build_sam.build_sam2`` builds it for ``SAM2ImagePredictor`` (its post-processing
    defaults on: a single-mask output that is not stable falls back to the best of the three).
    """
    if model_type not in SAM2_CONFIGS:
        raise ValueError(
            f"unknown SAM 2 model type {model_type!r}; expected one of {list(SAM2_MODEL_TYPES)}"
        )
    from sam2.build_sam import build_sam2

    return build_sam2(SAM2_CONFIGS[model_type], ckpt_path=None, device="cpu", mode="eval")


def load_sam2_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], checkpoint: str | Path
) -> None:
    """Load ``state`` (read from ``checkpoint``) into ``model`` strictly; a file of another size
    or model is refused with the keys that do not match."""
    from .checkpoint import state_mismatch

    own = model.state_dict()
    missing, unexpected, wrong = state_mismatch(state, own)
    if missing or unexpected:
        raise ValueError(
            f"{Path(checkpoint).name} is not a checkpoint of this SAM 2 model: "
            f"{len(missing)} keys missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    if wrong:
        raise ValueError(
            f"{Path(checkpoint).name} does not fit this SAM 2 model: {len(wrong)} tensors of "
            f"another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} in the file, "
            f"{tuple(own[wrong[0]].shape)} here)"
        )
    model.load_state_dict(state, strict=True)


def save_sam2_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s weights as an official SAM 2 checkpoint does: ``{"model": state_dict}``
    (tests and benchmarks save random-weight bases this way)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path
