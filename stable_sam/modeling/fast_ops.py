"""Faster CPU forms of SAM layers, with the same parameters and the same results.

SAM's mask decoder upsamples its output with two ``ConvTranspose2d(kernel_size=2, stride=2)``
layers. Such a layer maps each input pixel to its own 2 x 2 output block, so it is one matrix
product (pixels x C_in) @ (C_in x 4 C_out) followed by a pixel shuffle. PyTorch's CPU kernel for
transposed convolutions is several times slower than that product on the ViT-B decoder's
64 x 64 -> 256 x 256 path (measured in ``docs/BENCHMARKS.md``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PatchConvTranspose2d(nn.ConvTranspose2d):
    """A ``ConvTranspose2d`` whose kernel equals its stride and which has no padding, computed
    as one matrix product. Same parameters and state_dict keys as the layer it replaces."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is not None:
            return super().forward(x, output_size)
        n, c, h, w = x.shape
        kh, kw = self.kernel_size
        o = self.out_channels
        weight = self.weight.reshape(c, o * kh * kw)
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        if self.bias is None:
            y = pixels @ weight
        else:
            y = torch.addmm(self.bias.repeat_interleave(kh * kw), pixels, weight)
        y = y.reshape(n, h, w, o, kh, kw).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(n, o, h * kh, w * kw)


def _is_patch_transpose(m: nn.Module) -> bool:
    return (
        type(m) is nn.ConvTranspose2d
        and m.kernel_size == m.stride
        and m.padding == (0, 0)
        and m.output_padding == (0, 0)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def use_patch_transposed_convs(module: nn.Module) -> int:
    """Turn every eligible ``ConvTranspose2d`` under ``module`` into a ``PatchConvTranspose2d``
    in place (the parameters stay the same objects). Returns how many were converted."""
    converted = 0
    for m in module.modules():
        if _is_patch_transpose(m):
            m.__class__ = PatchConvTranspose2d
            converted += 1
    return converted
