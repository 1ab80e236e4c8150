"""The paper's training variants: Stable-SAM, its Table 5 ablations and the DT-SAM baseline.

Every variant trains with the RTS loop of ``training.engine`` for a fair comparison:

  ``stable``      DSP + DRP, full RTS (the shipped default plugins)
  ``dsp``         DSP only (routing fixed to α = (1, 0)), full RTS
  ``dsp-no-rts``  DSP only, clean prompts (GT boxes), no occlusion synthesis
  ``dt-sam``      no plugins; SAM's mask decoder fine-tuned with RTS

DT-SAM is the paper's strongest naive alternative to Stable-SAM. Its image and prompt encoders
stay frozen; the result is saved as the full mask-decoder state_dict (``.safetensors``, ~16 MB in
fp32 for the 256-wide decoder) with the same metadata layout as a plugin file, and loaded back
into a plain SAM of the same base. The paper does not publish DT-SAM's learning rate; we use
Adam 1e-4 (the plugins' 1e-3 is for freshly initialised weights; a pretrained decoder at 1e-3
drifts far from SAM).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stable_sam import PluginConfig, PluginMismatchError, StableSam, build_stable_sam, save_plugins
from stable_sam.checkpoint import write_safetensors_atomic
from training import rts
from training.data import Sample
from training.distributed import Ranks
from training.engine import Progress, TrainConfig, TrainResult, fit, train_plugins

DECODER_FORMAT = "stable-sam-dt-decoder"
PLUGIN_LR, DT_SAM_LR = 1e-3, 1e-4


@dataclass(frozen=True)
class Variant:
    """One training variant: what trains (the plugins or SAM's decoder), with which prompts."""

    name: str
    plugins: bool  # False: plain SAM whose mask decoder is fine-tuned (DT-SAM)
    robust: bool  # the full RTS; False: clean prompts (GT boxes), no occlusion synthesis
    lr: float  # the variant's default Adam learning rate
    fixed_alpha: tuple[float, float] | None = None  # routing fixed (DSP without DRP)

    def build_model(
        self, model_type: str, base: str | Path, device: str | None = None, seed: int | None = None
    ) -> StableSam:
        """The untrained model of this variant on the frozen ``base`` checkpoint. With ``seed``,
        the fresh plugins are initialised from it (the same file every run); without, from
        torch's global generator, which this torch build seeds differently in every process."""
        config = PluginConfig(fixed_alpha=self.fixed_alpha) if self.plugins else None
        # fork_rng: the caller's generator state is left as it was.
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            return build_stable_sam(
                model_type, base, plugins=self.plugins, plugin_config=config, device=device
            )

    def train_config(self, lr: float | None = None, **fields: Any) -> TrainConfig:
        """A ``TrainConfig`` with this variant's learning rate and RTS mode (``fields`` as
        ``TrainConfig``'s)."""
        return TrainConfig(
            lr=self.lr if lr is None else lr, rts=rts.RTSConfig(robust=self.robust), **fields
        )

    def train(
        self,
        model: StableSam,
        dataset: Sequence[Sample],
        config: TrainConfig,
        progress: Progress | None = None,
        ranks: Ranks | None = None,
    ) -> TrainResult:
        """Train ``model`` (from ``build_model``) on ``dataset`` with the RTS loop (this
        process's share of it with ``ranks``)."""
        if self.plugins:
            return train_plugins(model, dataset, config, progress, ranks)
        return train_dt_sam(model, dataset, config, progress, ranks)

    def save(self, model: StableSam, path: str | Path, metadata: dict[str, Any]) -> Path:
        """Write what trained: the plugin file, or DT-SAM's decoder file."""
        if self.plugins:
            return save_plugins(model, path, metadata)
        return save_decoder(model, path, metadata)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("stable", plugins=True, robust=True, lr=PLUGIN_LR),
        Variant("dsp", plugins=True, robust=True, lr=PLUGIN_LR, fixed_alpha=(1.0, 0.0)),
        Variant("dsp-no-rts", plugins=True, robust=False, lr=PLUGIN_LR, fixed_alpha=(1.0, 0.0)),
        Variant("dt-sam", plugins=False, robust=True, lr=DT_SAM_LR),
    )
}


# ----------------------------------------------------------------------------- DT-SAM


def train_dt_sam(
    model: StableSam,
    dataset: Sequence[Sample],
    config: TrainConfig | None = None,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Fine-tune ``model.sam.mask_decoder`` with RTS (the model must have no plugins)."""
    if model.plugins is not None:
        raise ValueError(
            "DT-SAM fine-tunes plain SAM's decoder: build the model with plugins=False"
        )
    config = config or TrainConfig(lr=DT_SAM_LR)
    decoder = model.sam.mask_decoder
    params = list(decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        return fit(model, params, dataset, config, progress, [decoder], ranks)
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


__all__ = [
    "DECODER_FORMAT",
    "VARIANTS",
    "Variant",
    "load_decoder",
    "save_decoder",
    "train_dt_sam",
]
