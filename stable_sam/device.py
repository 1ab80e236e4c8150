"""Device choice: CUDA when present, CPU otherwise; nothing assumes a GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else ``cuda`` when available, else ``cpu``."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def autocast_context(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); a no-op on CPU.

    Used for the image encoder and training forward passes; losses and metrics stay in fp32.
    """
    if not enabled or device.type != "cuda":
        yield
        return
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast("cuda", dtype=dtype):
        yield
