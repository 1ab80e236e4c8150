"""The two Stable-SAM plugins (Fan et al., ICLR 2025, §3.2–3.3).

Both act inside layer 2 of SAM's two-way transformer. The image features arrive there in token
layout ``(B, H*W, C)``; the plugins work in that layout so no permutes are needed on the hot path.

Unpublished values and our choices (see ``PluginConfig``):

* ``offset_scale`` — the pre-defined scale ``s_p`` of ``s_p * tanh(.)``. We express it as a fraction
  of the feature-map side, so the same setting means the same image distance for SAM's 64x64 and
  the mini SAM's 16x16 embeddings. Default 0.125: up to 8 cells on a 64x64 map (128 px of a 1024 px
  input), room to pull features from inside an object when a sloppy box or click lands beside it
  (the paper's noisy boxes move the centre by up to 0.2 box widths) while keeping samples local.
* Initialisation — the amplitude projection starts as the identity and the offset head at zero, so
  ``x*_{p+Δp} = x_p`` and, because ``α1 + α2 = s`` with ``s`` initialised to 1, Stable-SAM starts
  out equal to SAM (up to float rounding) and training departs from the frozen model smoothly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class PluginConfig:
    """Hyper-parameters of the DSP and DRP plugins."""

    embed_dim: int = 256  # C, SAM's decoder width
    offset_kernel_size: int = 5  # depthwise kernel of the offset network
    offset_scale: float = 0.125  # s_p as a fraction of max(H, W) of the feature map
    drp_hidden_dim: int = 32  # hidden width of the routing MLP
    routing_scale_init: float = 1.0  # initial value of the learnable scale s
    # When set, routing is fixed to this α instead of the DRP's output (ablations: DSP without
    # DRP uses (1, 0); the vanilla-SAM identity check uses (0, 1)).
    fixed_alpha: tuple[float, float] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PluginConfig:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown plugin config fields: {sorted(unknown)}")
        if raw.get("fixed_alpha") is not None:
            raw["fixed_alpha"] = tuple(raw["fixed_alpha"])
        return cls(**raw)


class DeformableSamplingPlugin(nn.Module):
    """DSP: resamples amplitude-modulated image features at learned offsets (paper Eq. 2–3).

    Offset network: Conv1x1 (C→C) → depthwise Conv k×k → LayerNorm → GELU → Conv1x1 (C→2).
    The first Conv1x1's output is ``x*_p``; it is what gets resampled, bilinearly, at the clamped
    positions ``p + Δp`` with ``Δp = s_p · tanh(offset)``. 1x1 convolutions are ``nn.Linear`` over
    the token layout, which is the same operation.
    """

    def __init__(self, config: PluginConfig) -> None:
        super().__init__()
        c, k = config.embed_dim, config.offset_kernel_size
        self.offset_scale = config.offset_scale
        self.amplitude = nn.Linear(c, c)  # Conv1x1 C→C, produces x*_p
        self.offset_dwconv = nn.Conv2d(c, c, k, padding=k // 2, groups=c)
        self.offset_norm = nn.LayerNorm(c)
        self.offset_proj = nn.Linear(c, 2)  # Conv1x1 C→2, (dx, dy) in feature cells
        with torch.no_grad():
            self.amplitude.weight.copy_(torch.eye(c))
            self.amplitude.bias.zero_()
            self.offset_proj.weight.zero_()
            self.offset_proj.bias.zero_()

    def forward(self, x_p: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Resample image features.

        Arguments:
          x_p: (B, H*W, C) image features from decoder layer 1, token layout (row-major).
          hw: (H, W) of the feature map.

        Returns:
          x*_{p+Δp}: (B, H*W, C) resampled amplitude-modulated features, contiguous.
          offsets: (B, H*W, 2) Δp as (dx, dy) in feature cells.
        """
        b, n, c = x_p.shape
        h, w = hw
        x_star = self.amplitude(x_p)  # (B, HW, C) = x*_p
        # The token layout of x*_p is the channels-last layout of the (B, C, H, W) map: the
        # depthwise conv reads and writes it without transposes, and LayerNorm runs in place.
        spatial = x_star.view(b, h, w, c).permute(0, 3, 1, 2)
        feats = self.offset_dwconv(spatial).permute(0, 2, 3, 1).reshape(b, n, c)
        feats = F.gelu(self.offset_norm(feats))
        s_p = self.offset_scale * max(h, w)
        offsets = s_p * torch.tanh(self.offset_proj(feats))  # (B, HW, 2)
        return sample_at_offsets(x_star, offsets, hw), offsets


def sample_at_offsets(x: Tensor, offsets: Tensor, hw: tuple[int, int]) -> Tensor:
    """Bilinear samples of token-layout features at ``p + Δp``, clamped to the map (Eq. 3).

    Arguments:
      x: (B, H*W, C) features, row-major positions p. offsets: (B, H*W, 2) Δp as (dx, dy) in
      cells. hw: (H, W).
    Returns:
      (B, H*W, C), contiguous. Equal to ``F.grid_sample(align_corners=True)`` at the clamped
      positions; computed as a weighted sum of the four neighbouring rows with one
      ``embedding_bag`` call, which is differentiable in both the features and the weights.
    """
    b, n, c = x.shape
    h, w = hw
    ys, xs = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=offsets.dtype),
        torch.arange(w, device=x.device, dtype=offsets.dtype),
        indexing="ij",
    )
    px = (xs.reshape(1, n) + offsets[..., 0]).clamp(0, w - 1)
    py = (ys.reshape(1, n) + offsets[..., 1]).clamp(0, h - 1)
    x0 = px.detach().floor().clamp(max=max(w - 2, 0))
    y0 = py.detach().floor().clamp(max=max(h - 2, 0))
    fx, fy = px - x0, py - y0  # in [0, 1]; gradients flow to the offsets through these
    x0i, y0i = x0.long(), y0.long()
    x1i, y1i = (x0i + 1).clamp(max=w - 1), (y0i + 1).clamp(max=h - 1)
    base = (torch.arange(b, device=x.device) * n).view(b, 1)
    index = torch.stack(
        [base + y0i * w + x0i, base + y0i * w + x1i, base + y1i * w + x0i, base + y1i * w + x1i],
        dim=-1,
    ).view(b * n, 4)
    weights = torch.stack(
        [(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=-1
    ).view(b * n, 4)
    out = F.embedding_bag(
        index, x.reshape(b * n, c), per_sample_weights=weights.to(x.dtype), mode="sum"
    )
    return out.view(b, n, c)


class DynamicRoutingPlugin(nn.Module):
    """DRP: ``α = softmax(MLP(t_o)) · s`` from the output mask token (paper Eq. 4).

    MLP = Linear(C→hidden) → LayerNorm → GELU → Linear(hidden→2); ``s`` is a learnable scalar.
    """

    def __init__(self, config: PluginConfig) -> None:
        super().__init__()
        c, hidden = config.embed_dim, config.drp_hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(c, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, 2)
        )
        self.scale = nn.Parameter(torch.tensor(float(config.routing_scale_init)))

    def forward(self, t_o: Tensor) -> Tensor:
        """t_o: (B, C) mask token after layer 2's self-attention -> α: (B, 2)."""
        return torch.softmax(self.mlp(t_o), dim=-1) * self.scale


class StableSamPlugins(nn.Module):
    """Container of the trainable plugins; the only parameters Stable-SAM trains and saves."""

    def __init__(self, config: PluginConfig) -> None:
        super().__init__()
        self.config = config
        self.dsp = DeformableSamplingPlugin(config)
        self.drp = DynamicRoutingPlugin(config)

    def route(self, t_o: Tensor) -> Tensor:
        """α (B, 2) for mask tokens t_o (B, C); fixed when the config says so."""
        if self.config.fixed_alpha is not None:
            alpha = torch.tensor(self.config.fixed_alpha, dtype=t_o.dtype, device=t_o.device)
            return alpha.expand(t_o.shape[0], 2)
        return self.drp(t_o)
