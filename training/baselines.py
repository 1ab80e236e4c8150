"""DT-SAM: the paper's strongest naive alternative to Stable-SAM — fine-tune SAM's mask decoder.

Trained with the same RTS loop as the plugins (``training.train.fit``) for a fair comparison;
the image and prompt encoders stay frozen. The result is saved as the full mask-decoder
state_dict (``.safetensors``, ~16 MB in fp32 for the 256-wide decoder) with the same metadata
layout as a plugin file, and loaded back into a plain SAM of the same base.

The paper does not publish DT-SAM's learning rate; we use Adam 1e-4 by default (the plugins'
1e-3 is for freshly initialised weights; a pretrained decoder at 1e-3 drifts far from SAM).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file

from stable_sam import PluginMismatchError, StableSam
from stable_sam.checkpoint import write_safetensors_atomic
from training.data import Sample
from training.train import Progress, TrainConfig, TrainResult, fit

DECODER_FORMAT = "stable-sam-dt-decoder"


def train_dt_sam(
    model: StableSam,
    dataset: Sequence[Sample],
    config: TrainConfig | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Fine-tune ``model.sam.mask_decoder`` with RTS (the model must have no plugins)."""
    if model.plugins is not None:
        raise ValueError(
            "DT-SAM fine-tunes plain SAM's decoder: build the model with plugins=False"
        )
    config = config or TrainConfig(lr=1e-4)
    decoder = model.sam.mask_decoder
    params = list(decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        return fit(model, params, dataset, config, progress, modules_to_train=[decoder])
    finally:
        for p in params:
            p.requires_grad_(False)


def save_decoder(
    model: StableSam, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the (fine-tuned) mask decoder's state_dict atomically, tagged with its base."""
    metadata = dict(metadata or {})
    header = {
        "format": DECODER_FORMAT,
        "base_model_type": model.model_type,
        "base_checkpoint_sha256": model.base_checkpoint_sha256,
        "version": str(metadata.pop("version", "unversioned")),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_summary": json.dumps(metadata.pop("training_summary", {}), sort_keys=True),
    }
    header.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return write_safetensors_atomic(model.sam.mask_decoder.state_dict(), path, header)


def load_decoder(model: StableSam, path: str | Path) -> dict[str, str]:
    """Load a DT-SAM decoder file into ``model.sam.mask_decoder`` (strict); returns metadata.

    Raises ``PluginMismatchError`` when the file was trained on another base.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != DECODER_FORMAT:
        raise ValueError(f"{path} is not a DT-SAM decoder file")
    if (
        meta["base_model_type"] != model.model_type
        or meta["base_checkpoint_sha256"] != model.base_checkpoint_sha256
    ):
        raise PluginMismatchError(f"DT-SAM decoder {Path(path).name} belongs to another base")
    if model.plugins is not None:
        raise ValueError("load the DT-SAM decoder into a plain SAM (plugins=False)")
    state = {k: v.to(model.device) for k, v in load_file(str(path)).items()}
    model.sam.mask_decoder.load_state_dict(state, strict=True)
    return meta


__all__ = ["DECODER_FORMAT", "load_decoder", "save_decoder", "train_dt_sam"]
