"""Layer 2 of SAM's two-way transformer with the Stable-SAM plugins inserted."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .plugins import StableSamPlugins

MASK_TOKEN_INDEX = 1  # output tokens are [iou, mask_0, ...] in SAM and HQ-SAM; t_o = mask_0


class StableTwoWayAttentionBlock(nn.Module):
    """A ``TwoWayAttentionBlock`` whose token-to-image attention sees routed, resampled features.

    ``block`` is a ``TwoWayAttentionBlock`` of ``segment_anything`` (SAM, HQ-SAM) or of ``sam2``
    (SAM 2): the same four steps under the same sub-module names. It adopts the original block's
    sub-modules under their original names, so the SAM state_dict
    keys are unchanged and official checkpoints load strictly. The plugins are referenced, not
    registered, here: they belong to ``StableSam.plugins`` and are saved separately.

    Layer 2 computes (paper Eq. 1, 4): ``x_mix = α1 · x*_{p+Δp} + α2 · x_p`` as keys and values of
    the token-to-image attention; the image-to-token attention keeps ``x_p``. The resampled
    features sit at the positions ``p`` they were sampled for, so they get ``p``'s positional
    encoding (with α = [0, 1] this is exactly vanilla SAM).
    """

    def __init__(
        self, block: nn.Module, plugins: StableSamPlugins, mask_token_index: int = MASK_TOKEN_INDEX
    ) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.skip_first_layer_pe = block.skip_first_layer_pe
        # Where t_o (the output mask token the DRP routes on) sits among the tokens: 1 in SAM
        # and HQ-SAM; SAM 2 puts its object-score token first, so 2 there.
        self.mask_token_index = mask_token_index
        object.__setattr__(self, "_plugins", plugins)  # not a sub-module: keeps keys unchanged
        self.feature_hw: tuple[int, int] | None = None
        self.last_alpha: Tensor | None = None
        self.last_offsets: Tensor | None = None

    @property
    def plugins(self) -> StableSamPlugins:
        return self._plugins

    def set_plugins(self, plugins: StableSamPlugins) -> None:
        object.__setattr__(self, "_plugins", plugins)

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        # Dynamic routing from the output mask token, then deformable sampling of x_p.
        hw = self.feature_hw or _square_hw(keys.shape[1])
        alpha = self.plugins.route(queries[:, self.mask_token_index, :])  # (B, 2)
        resampled, offsets = self.plugins.dsp(keys, hw)  # (B, HW, C), contiguous
        # x_mix = α1 · x*_{p+Δp} + α2 · x_p. Contiguous operands keep the attention's matmuls
        # (and so α = [0, 1]) bit-identical to vanilla SAM.
        a1, a2 = alpha[:, 0, None, None], alpha[:, 1, None, None]
        if torch.is_grad_enabled():
            mixed = torch.addcmul(keys * a2, resampled, a1)
        else:  # inference: reuse the resampled buffer instead of allocating two more
            mixed = resampled.mul_(a1).addcmul_(keys, a2)
        self.last_alpha, self.last_offsets = alpha.detach(), offsets.detach()

        q = queries + query_pe
        k = mixed + key_pe
        queries = queries + self.cross_attn_token_to_image(q=q, k=k, v=mixed)
        queries = self.norm2(queries)

        queries = queries + self.mlp(queries)
        queries = self.norm3(queries)

        q = queries + query_pe
        k = keys + key_pe
        keys = keys + self.cross_attn_image_to_token(q=k, k=q, v=queries)
        keys = self.norm4(keys)
        return queries, keys


def _square_hw(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"cannot infer a square feature map from {n} tokens")
    return side, side
