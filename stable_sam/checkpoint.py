"""Plugin files: the only weights Stable-SAM trains, saved apart from the SAM base.

A plugin file is ``safetensors`` (no pickled code) with string metadata: base model type, base
checkpoint SHA-256, plugin config, version, creation time and a training summary. It is a few
hundred KB; an official SAM checkpoint stays loadable unchanged.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .modeling import PluginConfig, StableSam, StableSamPlugins

FORMAT_VERSION = "1"


class PluginMismatchError(ValueError):
    """A plugin file does not belong to this SAM base."""


def state_mismatch(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """What keeps ``state`` from loading strictly where ``expected`` is: the names it lacks, the
    names it has beyond them, and the shared names whose shapes differ, each sorted (all empty:
    it loads). One check for base checkpoints and trained files alike; callers word the error."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    return missing, unexpected, reshaped


def save_plugins(
    model: StableSam, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the model's plugins to ``path`` atomically (temp file + rename).

    ``metadata`` may carry ``version`` and ``training_summary`` (any JSON-able value); base type,
    base hash, plugin config and creation time are filled in here.
    """
    if model.plugins is None:
        raise ValueError("this model has no plugins to save (plain SAM)")
    metadata = dict(metadata or {})
    header = {
        "format": "stable-sam-plugins",
        "format_version": FORMAT_VERSION,
        "base_model_type": model.model_type,
        "base_checkpoint_sha256": model.base_checkpoint_sha256,
        "plugin_config": model.plugins.config.to_json(),
        "version": str(metadata.pop("version", "unversioned")),
        "created": metadata.pop("created", datetime.now(UTC).isoformat(timespec="seconds")),
        "training_summary": json.dumps(metadata.pop("training_summary", {}), sort_keys=True),
    }
    header.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return write_safetensors_atomic(model.plugins.state_dict(), path, header)


def write_safetensors_atomic(
    state_dict: dict[str, torch.Tensor],
    path: str | Path,
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write CPU copies of ``state_dict`` (floating tensors as ``dtype``) to ``path`` with string
    ``metadata``, via a temp file in the same folder and ``os.replace``: a reader never sees a
    partial file."""
    tensors = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in state_dict.items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; other processes (worker, backend) read it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_plugin_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a plugin file, without loading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "stable-sam-plugins":
        raise ValueError(f"{path} is not a Stable-SAM plugin file")
    return meta


def read_plugins(model: StableSam, path: str | Path) -> tuple[StableSamPlugins, dict[str, str]]:
    """Build the plugins stored in ``path`` for ``model``'s base, without installing them.

    Raises ``PluginMismatchError`` when the file was trained on another base (model type or base
    checkpoint hash differ).
    """
    from safetensors.torch import load_file

    meta = read_plugin_metadata(path)
    if meta["base_model_type"] != model.model_type:
        raise PluginMismatchError(
            f"plugin file {Path(path).name} is for base {meta['base_model_type']!r}, "
            f"this model is {model.model_type!r}"
        )
    if meta["base_checkpoint_sha256"] != model.base_checkpoint_sha256:
        raise PluginMismatchError(
            f"plugin file {Path(path).name} was trained on base checkpoint "
            f"{meta['base_checkpoint_sha256'][:12]}, this model's base is "
            f"{model.base_checkpoint_sha256[:12]}"
        )
    plugins = StableSamPlugins(PluginConfig.from_json(meta["plugin_config"]))
    plugins.load_state_dict(load_file(str(path)), strict=True)
    return plugins.to(model.device).eval(), meta


def load_plugins(model: StableSam, path: str | Path) -> dict[str, str]:
    """Install the plugins stored in ``path`` into ``model``; returns the file's metadata."""
    plugins, meta = read_plugins(model, path)
    model.install_plugins(plugins)
    return meta
