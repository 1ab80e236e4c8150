"""PA-SAM's prompt adapter (Xie et al., ICME 2024, §2.3) on a frozen SAM mask decoder.

The adapter runs in parallel with layer 2 of SAM's two-way transformer (the one block the
paper's Table 3 keeps; the layer where our DSP / DRP plugins live too): it reads the tokens after
that layer's self-attention and the image features that enter it, and hands back residuals that
re-enter SAM, plus the refine and uncertain tokens of the final mask prediction.

* Adaptive detail enhancement. Dense prompt compensation (Eq. 1): ``x_pa = CRM(W_g[I, ∇I], x)``
  with the guided gate as CRM (the paper's choice, Table 3): ``g = W_g[I, ∇I]``,
  ``x_pa = x + σ(W_x x + W_g' g) ⊙ W_v g``. Sparse prompt optimisation (Eq. 2):
  ``t = LN(t_in + Attention(q = t_in, k = x_pa, v = x_pa))``. The uncertain and refine tokens
  come from an MLP over each mask token concatenated with a learned static token.
* Hard point mining (Eqs. 4–6): the guidance ``φ⁰ = M_U ∘ (M_R − M_C)`` (positive points) and
  ``M_U ∘ (M_C − M_R)`` (negative) on the S/16 grid of ``x_pa``; a Gumbel top-k sampler picks
  ``N_sample`` cells of each; the points are ``ĝ · x_pa`` plus their positional encoding and a
  positive / negative embedding. ``t_pa = [iou, r_pa, p_pa, b_pa, p_sample]`` (Eq. 7) goes
  through a self-attention of its own, so the mined points inform the other tokens.
* Residual reintegration: ``t_pa`` (its first N tokens, SAM's positions) is added to layer 2's
  tokens after its MLP, ``x_pa`` to its image features after its image-to-token attention, each
  through a zero-initialised linear map.
* The final mask (Eq. 3): ``M = M_U ∘ M_R + (1 − M_U) ∘ M_C`` at S/4, with ``M_C`` SAM's own mask
  logits (``M_SAM``), ``M_R = M_C + ΔR``: the refine token's hypernetwork on SAM's upscaled
  image features plus the adapter's detail features at S/4 (the trained "image upsampling" of
  the paper's Fig. 2), and ``M_U = σ(·)`` from the uncertain token.

Values the paper leaves open, our choices (``PromptAdapterConfig``):

* The detail tensor ``[I, ∇I]``: the normalised input image and the magnitude of the Sobel
  gradient of its grey level (Sobel where the paper names Canny as one example: it is
  differentiable and has no thresholds), both area-averaged to S/4, 4 channels stored in fp16
  (``image_detail``): 1/8 of the bytes of the fp32 (256, S/16, S/16) embedding beside which the
  embedding cache keeps it.
* ``W_g``: two stride-2 3x3 convolutions (4 → 32 → 64, GELU) and a 1x1 to 256, from S/4 to the
  S/16 grid; the S/4 branch is two 3x3 convolutions (4 → 32 → 32, GELU).
* ``M_R = M_C + ΔR`` and zero-initialised maps into SAM: the refine hypernetwork's last layer and
  both reintegration maps start at zero, so an untrained adapter leaves SAM's output bit for bit
  (``ΔR = 0``, so ``M = M_C``; every residual adds an exact zero). Training departs from SAM.
* The mining guidance uses mask token 0 (the single-mask output, the one RTS trains); its
  ``M_C`` cancels in ``M_R − M_C = ΔR``. Gumbel temperature τ = 1; Gumbel noise in training
  only (``self.training``), so serving is deterministic.
* Eq. 6 as printed takes one one-hot of the argmax of ``g' = Σ gⁿ``, i.e. one point for
  ``N_sample``. We keep one straight-through one-hot per point instead,
  ``ĝⁿ = one-hot(argmax φⁿ) + gⁿ − sg(gⁿ)``, excluding the cells picked before, so every
  draw yields exactly ``N_sample`` distinct points per sign (4 + 4, Table 3's best).
* Multimask output: refine and uncertain tokens are made for every mask token (shared MLPs and
  hypernetworks), so each of SAM's three masks gets its own Eq. 3.
* What is served (``PromptAdapter.serve``, stored in the adapter's file): the paper serves "only
  the output mask from the mask prediction module" (Fig. 2), which we read as ``M_SAM``, SAM's
  own mask with the adapter's residuals in (``"sam"``); ``M_PA``, Eq. 3's blend, supervises it.
  ``"blend"`` serves ``M_PA`` instead. Both are returned, with ``M_U``'s logits, for the loss.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn
from torch.nn import functional as F

ADAPTER_LAYER = 1  # layer 2 of the two-way transformer (0-based index 1), as PLUGIN_LAYER
DETAIL_CHANNELS = 4  # [I (RGB), |∇I|]
DETAIL_STRIDE = 4  # the detail tensor is at S/4
MINING_TOKEN = 0  # mask token whose maps guide hard point mining (the single-mask output)
SERVED_OUTPUTS = ("sam", "blend")  # M_SAM (the paper's inference output) or M_PA (Eq. 3)


@dataclass
class PromptAdapterConfig:
    """Hyper-parameters of the prompt adapter (stored in its file)."""

    embed_dim: int = 256  # C, SAM's decoder width
    num_heads: int = 8  # as SAM's decoder attentions
    attention_downsample_rate: int = 2  # Eq. 2's token-to-image attention, as SAM's
    detail_dims: tuple[int, int] = (32, 64)  # W_g's widths at S/8 and S/16
    hyper_dim: int = 32  # C/8: SAM's upscaled feature width, the maps' dot-product width
    n_positive: int = 4  # N_sample positive points (Table 3)
    n_negative: int = 4  # N_sample negative points
    gumbel_tau: float = 1.0  # τ of Eq. 5
    uncertain_band_px: int = 2  # M_U's target: within this many input-frame pixels of the
    # GT boundary (the loss's; recorded with the weights it trained)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PromptAdapterConfig:
        raw = json.loads(text)
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown prompt adapter config fields: {sorted(unknown)}")
        if "detail_dims" in raw:
            raw["detail_dims"] = tuple(raw["detail_dims"])
        return cls(**raw)


class AdapterPrompts(NamedTuple):
    """What the layer-2 branch hands back (B prompts, N SAM tokens, K mask tokens)."""

    token_delta: Tensor  # (B, N, C) added to layer 2's tokens
    key_delta: Tensor  # (B, HW, C) added to layer 2's image features
    refine_tokens: Tensor  # (B, K, C) r_pa after t_pa's self-attention
    uncertain_tokens: Tensor  # (B, K, C) u_pa
    points: Tensor  # (B, n_positive + n_negative, HW) the straight-through one-hots ĝ


class PromptAdapterOutput(NamedTuple):
    """One decoder pass with the adapter: served masks and what the loss needs beside them."""

    masks: Tensor  # (B, K, S/4, S/4) M_PA logits (Eq. 3)
    iou_predictions: Tensor  # (B, K) SAM's IoU head
    sam_masks: Tensor  # (B, K, S/4, S/4) M_SAM = M_C logits (SAM's mask, adapter residuals in)
    uncertainty_logits: Tensor | None  # (B, K, S/4, S/4) logits of M_U (None: no blend)


@torch.no_grad()
def image_detail(images: Tensor) -> Tensor:
    """The detail tensor ``[I, ∇I]`` of preprocessed images (B, 3, S, S) -> (B, 4, S/4, S/4)
    fp16: the normalised image and its Sobel gradient magnitude (of the grey level, computed at
    S), both area-averaged to S/4. Depends on the pixels alone: cached with the embedding."""
    x = images.float()
    grey = x.mean(dim=1, keepdim=True)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    gradient = F.conv2d(grey, kernels, padding=1).square().sum(dim=1, keepdim=True).sqrt()
    detail = torch.cat([x, gradient], dim=1)
    return F.avg_pool2d(detail, DETAIL_STRIDE).half()


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel(0, 1) samples on the CPU (``generator``'s stream, else torch's)."""
    u = torch.rand(shape, generator=generator)
    return -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))


def gumbel_top_k(phi: Tensor, k: int, tau: float, noise: Tensor | None = None) -> Tensor:
    """Eqs. 4–6: ``k`` straight-through one-hots over the last axis of ``phi`` (B, L).

    ``φ¹ = φ⁰ + γ`` (``noise``, training), ``gⁿ = softmax(φⁿ / τ)``, ``φⁿ⁺¹ = φⁿ + ln(1 − gⁿ)``;
    each draw is ``one-hot(argmax φⁿ over the cells not yet picked) + gⁿ − sg(gⁿ)``: exactly
    one-hot forward, ``gⁿ``'s gradient backward. Returns (B, k, L), k distinct cells per row.
    """
    if k > phi.shape[-1]:
        raise ValueError(f"cannot pick {k} distinct cells of {phi.shape[-1]}")
    logits = phi.float() if noise is None else phi.float() + noise.to(phi.device)
    taken = torch.zeros_like(logits, dtype=torch.bool)
    draws = []
    for _ in range(k):
        soft = torch.softmax(logits / tau, dim=-1)  # Eq. 5
        index = logits.detach().masked_fill(taken, float("-inf")).argmax(dim=-1)
        hard = F.one_hot(index, logits.shape[-1]).to(soft.dtype)
        draws.append(hard + (soft - soft.detach()))  # Eq. 6, per point
        taken |= hard.bool()
        logits = logits + torch.log1p(-soft.clamp(max=1 - 1e-6))  # Eq. 4, n >= 2
    return torch.stack(draws, dim=1)


class PromptAdapter(nn.Module):
    """The prompt adapter's parameters (the only ones PA-SAM trains) and its decoder pass.

    SAM's mask decoder is passed to ``decode``, not registered: the adapter's state_dict holds
    its own tensors alone (``stable-sam-pa-adapter`` files).
    """

    def __init__(self, config: PromptAdapterConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or PromptAdapterConfig()
        self.serve: str = "sam"  # SERVED_OUTPUTS: what StableSam.decode returns
        c, hyper = config.embed_dim, config.hyper_dim
        d8, d16 = config.detail_dims
        # Eq. 1: W_g from [I, ∇I] at S/4 to the S/16 grid, and the guided gate.
        self.detail_encoder = nn.Sequential(
            nn.Conv2d(DETAIL_CHANNELS, d8, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(d8, d16, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(d16, c, 1),
        )
        self.gate_image = nn.Linear(c, c)
        self.gate_detail = nn.Linear(c, c, bias=False)
        self.guide_value = nn.Linear(c, c)
        # Eq. 2: token-to-image attention on x_pa.
        self.token_to_image = Attention(c, config.num_heads, config.attention_downsample_rate)
        self.token_norm = nn.LayerNorm(c)
        # u_pa, r_pa: MLP([mask token; static token]).
        self.static_tokens = nn.Embedding(2, c)  # 0: uncertain, 1: refine
        self.uncertain_mlp = MLP(2 * c, c, c, 2)
        self.refine_mlp = MLP(2 * c, c, c, 2)
        # Maps: hypernetworks (as SAM's) dotted with features of width ``hyper``.
        self.uncertain_hyper = MLP(c, c, hyper, 3)
        self.refine_hyper = MLP(c, c, hyper, 3)
        self.mining_proj = nn.Linear(c, hyper)  # x_pa -> the S/16 mining maps' features
        self.detail_upsampling = nn.Sequential(  # the S/4 detail features of the final maps
            nn.Conv2d(DETAIL_CHANNELS, hyper, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hyper, hyper, 3, padding=1),
        )
        # Hard points: positive / negative embedding; t_pa's self-attention.
        self.point_labels = nn.Embedding(2, c)  # 0: negative, 1: positive
        self.pa_self_attn = Attention(c, config.num_heads)
        self.pa_norm = nn.LayerNorm(c)
        # Residual reintegration into SAM, zero at initialisation.
        self.token_out = nn.Linear(c, c)
        self.key_out = nn.Linear(c, c)
        with torch.no_grad():
            for layer in (self.refine_hyper.layers[-1], self.token_out, self.key_out):
                layer.weight.zero_()
                layer.bias.zero_()

    # -- layer 2's parallel branch -------------------------------------------------------------
    def adapt(
        self,
        tokens: Tensor,
        keys: Tensor,
        query_pe: Tensor,
        key_pe: Tensor,
        detail: Tensor,
        num_mask_tokens: int,
        generator: torch.Generator | None = None,
    ) -> AdapterPrompts:
        """Eqs. 1, 2, 4–7 beside layer 2 of the two-way transformer.

        Arguments:
          tokens: (B, N, C) t_in, layer 2's tokens after its self-attention ([iou, masks, prompts]).
          keys: (B, HW, C) x, the image features entering layer 2; query_pe (B, N, C), key_pe
            (B, HW, C): SAM's positional encodings of the two.
          detail: (1, 4, S/4, S/4) ``image_detail`` of the image.
          generator: the Gumbel noise's stream in training (``None``: torch's).
        """
        b, n, c = tokens.shape
        k = num_mask_tokens
        cfg = self.config
        # Eq. 1: dense prompt compensation with the guided gate.
        g = self.detail_encoder(detail.to(keys.dtype)).flatten(2).transpose(1, 2)  # (1, HW, C)
        if g.shape[1] != keys.shape[1]:
            raise ValueError(f"detail gives {g.shape[1]} cells, the image features {keys.shape[1]}")
        gate = torch.sigmoid(self.gate_image(keys) + self.gate_detail(g))
        x_pa = keys + gate * self.guide_value(g)
        # Eq. 2: sparse prompt optimisation.
        attn = self.token_to_image(q=tokens + query_pe, k=x_pa + key_pe, v=x_pa)
        t = self.token_norm(tokens + attn)
        masks = t[:, 1 : 1 + k]
        static = self.static_tokens.weight
        uncertain = self.uncertain_mlp(torch.cat([masks, static[0].expand(b, k, c)], dim=-1))
        refine = self.refine_mlp(torch.cat([masks, static[1].expand(b, k, c)], dim=-1))
        # Eq. 4's guidance on the S/16 grid: φ⁰ = M_U ∘ (M_R − M_C), with M_R − M_C = ΔR.
        features = self.mining_proj(x_pa)  # (B, HW, hyper)
        delta_r = (features @ self.refine_hyper(refine[:, MINING_TOKEN])[..., None])[..., 0]
        m_u = torch.sigmoid(
            (features @ self.uncertain_hyper(uncertain[:, MINING_TOKEN])[..., None])[..., 0]
        )
        phi = m_u * delta_r  # (B, HW)
        noise = None
        if self.training:  # Eq. 4's γ: diversity in training; serving is deterministic
            noise = gumbel_noise((2, *phi.shape), generator)
        picks = torch.cat(
            [
                gumbel_top_k(
                    phi, cfg.n_positive, cfg.gumbel_tau, None if noise is None else noise[0]
                ),
                gumbel_top_k(
                    -phi, cfg.n_negative, cfg.gumbel_tau, None if noise is None else noise[1]
                ),
            ],
            dim=1,
        ).to(x_pa.dtype)  # (B, P, HW)
        labels = torch.cat(
            [
                self.point_labels.weight[1].expand(cfg.n_positive, c),
                self.point_labels.weight[0].expand(cfg.n_negative, c),
            ]
        )
        points = picks @ x_pa + picks @ key_pe + labels  # p_sample (B, P, C)
        # Eq. 7: t_pa = [iou_pa, r_pa, p_pa, b_pa, p_sample], then its own self-attention.
        t_pa = torch.cat([t[:, :1], refine, t[:, 1 + k :], points], dim=1)
        pe = torch.cat([query_pe, torch.zeros_like(points)], dim=1)
        q = t_pa + pe
        t_pa = self.pa_norm(t_pa + self.pa_self_attn(q=q, k=q, v=t_pa))
        return AdapterPrompts(
            token_delta=self.token_out(t_pa[:, :n]),
            key_delta=self.key_out(x_pa),
            refine_tokens=t_pa[:, 1 : 1 + k],
            uncertain_tokens=uncertain,
            points=picks,
        )

    # -- Eq. 3 ---------------------------------------------------------------------------------
    def blend(
        self,
        sam_masks: Tensor,
        upscaled: Tensor,
        refine_tokens: Tensor,
        uncertain_tokens: Tensor,
        detail: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """``M = M_C + M_U ∘ ΔR`` (Eq. 3 with ``M_R = M_C + ΔR``) at S/4.

        sam_masks (B, K, h, w) M_C logits; upscaled (B, hyper, h, w) SAM's upscaled features;
        refine / uncertain tokens (B, K, C) of those K masks. Returns (M_PA logits, M_U logits).
        """
        b, k, h, w = sam_masks.shape
        features = upscaled + self.detail_upsampling(detail.to(upscaled.dtype))
        features = features.flatten(2)  # (B, hyper, hw)
        delta_r = (self.refine_hyper(refine_tokens) @ features).view(b, k, h, w)
        u_logits = (self.uncertain_hyper(uncertain_tokens) @ features).view(b, k, h, w)
        return sam_masks + torch.sigmoid(u_logits) * delta_r, u_logits

    # -- the decoder pass ----------------------------------------------------------------------
    def decode(
        self,
        decoder: nn.Module,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        detail: Tensor,
        multimask_output: bool,
        generator: torch.Generator | None = None,
        blend: bool = True,
    ) -> PromptAdapterOutput:
        """SAM's ``MaskDecoder`` (``decoder``, frozen) with the adapter beside layer 2.

        The same operations as ``MaskDecoder.forward`` and ``TwoWayTransformer.forward``, in the
        same order, plus the adapter's residuals and Eq. 3: zero residuals give SAM's bits.
        image_embeddings (1, C, h, w), image_pe (1, C, h, w), sparse (B, N', C), dense
        (B, C, h, w), detail (1, 4, 4h, 4w). ``blend=False`` (serving ``M_SAM``) skips Eq. 3:
        ``masks`` is then ``M_SAM`` and ``uncertainty_logits`` ``None``.
        """
        transformer = decoder.transformer
        n_masks = decoder.num_mask_tokens
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
        b, c, h, w = src.shape

        # TwoWayTransformer.forward, layer 2 opened up.
        keys = src.flatten(2).permute(0, 2, 1)
        key_pe = pos_src.flatten(2).permute(0, 2, 1)
        queries = tokens
        for index, layer in enumerate(transformer.layers):
            if index != ADAPTER_LAYER:
                queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
                continue
            if layer.skip_first_layer_pe:
                raise ValueError("the prompt adapter goes beside a layer with positional encodings")
            q = queries + tokens
            queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
            adapted = self.adapt(queries, keys, tokens, key_pe, detail, n_masks, generator)
            q = queries + tokens
            k = keys + key_pe
            queries = layer.norm2(queries + layer.cross_attn_token_to_image(q=q, k=k, v=keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            queries = queries + adapted.token_delta
            q = queries + tokens
            k = keys + key_pe
            keys = layer.norm4(keys + layer.cross_attn_image_to_token(q=k, k=q, v=queries))
            keys = keys + adapted.key_delta
        q = queries + tokens
        k = keys + key_pe
        queries = transformer.norm_final_attn(
            queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys)
        )

        # MaskDecoder.predict_masks.
        iou_token_out = queries[:, 0, :]
        mask_tokens_out = queries[:, 1 : (1 + n_masks), :]
        src = keys.transpose(1, 2).view(b, c, h, w)
        upscaled = decoder.output_upscaling(src)
        hyper_in = torch.stack(
            [
                decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                for i in range(n_masks)
            ],
            dim=1,
        )
        b, c4, h4, w4 = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c4, h4 * w4)).view(b, -1, h4, w4)
        iou_pred = decoder.iou_prediction_head(iou_token_out)

        # MaskDecoder.forward's selection, then Eq. 3 on the selected masks.
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        sam_masks, iou_pred = masks[:, chosen], iou_pred[:, chosen]
        if not blend:
            return PromptAdapterOutput(sam_masks, iou_pred, sam_masks, None)
        blended, u_logits = self.blend(
            sam_masks,
            upscaled,
            adapted.refine_tokens[:, chosen],
            adapted.uncertain_tokens[:, chosen],
            detail,
        )
        return PromptAdapterOutput(blended, iou_pred, sam_masks, u_logits)
