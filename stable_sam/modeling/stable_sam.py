"""``StableSam``: a frozen SAM (or HQ-SAM) with the Stable-SAM plugins (or PA-SAM's prompt
adapter) in its mask decoder."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .fast_ops import use_patch_transposed_convs
from .plugins import PluginConfig, StableSamPlugins
from .prompt_adapter import PromptAdapter, PromptAdapterOutput, image_detail
from .stable_block import MASK_TOKEN_INDEX, StableTwoWayAttentionBlock

PLUGIN_LAYER = 1  # decoder layer 2 of the two-way transformer (0-based index 1)


class StableSam(nn.Module):
    """SAM kept frozen, plus DSP and DRP in decoder layer 2; only ``plugins`` train.

    ``sam`` is a ``segment_anything`` (or ``segment_anything_hq``) ``Sam``; its state_dict keys are
    unchanged. With ``plugin_config=None`` the model is plain SAM (for side-by-side comparison).
    One base can serve several plugin sets (per-project versions): ``use_plugins`` swaps them for
    the duration of a call.
    """

    def __init__(
        self,
        sam: nn.Module,
        model_type: str,
        base_checkpoint_sha256: str,
        plugin_config: PluginConfig | None = None,
    ) -> None:
        super().__init__()
        self.sam = sam
        self.model_type = model_type
        self.base_checkpoint_sha256 = base_checkpoint_sha256
        self.is_hq = hasattr(self.mask_decoder, "hf_token")
        # HQ-SAM only: serve the HQ token's mask alone (HQ-SAM's choice for single-object
        # images) instead of SAM's mask plus it (its default, ``hq_token_only=False``).
        self.hq_token_only = False
        # What the cached per-image features depend on beyond the base: HQ-SAM parameters
        # trained on a plain base (``add_hq``) change its HQ features; their loader sets this.
        self.hq_tag = ""
        for p in self.sam.parameters():
            p.requires_grad_(False)
        self.sam.eval()
        use_patch_transposed_convs(self.mask_decoder)  # same weights, faster on CPU
        self._swap_lock = threading.RLock()
        self.plugins: StableSamPlugins | None = None
        self.prompt_adapter: PromptAdapter | None = None
        self._block: StableTwoWayAttentionBlock | None = None
        if plugin_config is not None:
            self.install_plugins(StableSamPlugins(plugin_config))

    # -- plugins -----------------------------------------------------------------------------
    def install_plugins(self, plugins: StableSamPlugins) -> None:
        """Insert ``plugins`` into decoder layer 2 (or replace the ones already there)."""
        if self.prompt_adapter is not None:
            raise ValueError("this model has PA-SAM's prompt adapter in layer 2: no plugins")
        transformer = self.mask_decoder.transformer
        if self._block is None:
            self._block = StableTwoWayAttentionBlock(
                transformer.layers[PLUGIN_LAYER], plugins, self.mask_token_index
            )
            transformer.layers[PLUGIN_LAYER] = self._block
            # The block sees flattened keys; record H x W from the transformer's input.
            transformer.register_forward_pre_hook(self._record_hw)
        else:
            self._block.set_plugins(plugins)
        self.plugins = plugins.to(self.device)

    def _record_hw(self, module: nn.Module, args: tuple) -> None:
        if self._block is not None and args:
            self._block.feature_hw = tuple(args[0].shape[-2:])

    @contextmanager
    def use_plugins(self, plugins: StableSamPlugins | None) -> Iterator[None]:
        """Run with ``plugins`` in place of the model's own; ``None`` keeps the current ones."""
        with self._swap_lock:
            if plugins is None or self._block is None:
                yield
                return
            own = self._block.plugins
            self._block.set_plugins(plugins)
            try:
                yield
            finally:
                self._block.set_plugins(own)

    def install_prompt_adapter(self, adapter: PromptAdapter) -> None:
        """Put PA-SAM's prompt adapter beside decoder layer 2 (or replace the one there)."""
        if self._block is not None or self.is_hq:
            raise ValueError("PA-SAM's prompt adapter goes on a plain SAM (no plugins, no HQ)")
        self.prompt_adapter = adapter.to(self.device)

    @property
    def has_plugins(self) -> bool:
        return self._block is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [] if self.plugins is None else list(self.plugins.parameters())

    @property
    def last_alpha(self) -> Tensor | None:
        """α (B, 2) of the last decoder call; ``None`` for plain SAM."""
        return None if self._block is None else self._block.last_alpha

    @property
    def encoder_id(self) -> str:
        """Identifies what ``encode`` computes: the base and, for HQ-SAM parameters trained on
        it, their tag; with a prompt adapter, ``+pa-detail`` (its cached embeddings carry the
        detail tensor). Embedding caches key on it; plugins and adapter weights never change it."""
        key = f"{self.model_type}:{self.base_checkpoint_sha256}"
        if self.hq_tag:
            key += f"+{self.hq_tag}"
        return key + "+pa-detail" if self.prompt_adapter is not None else key

    # -- the base's parts --------------------------------------------------------------------
    # Where the decoder keeps t_o, the output mask token the DRP routes on (see
    # ``StableTwoWayAttentionBlock``): tokens are [iou, mask_0, mask_1, ...] in SAM and HQ-SAM.
    mask_token_index = MASK_TOKEN_INDEX
    # How images enter the encoder: False, SAM's longest side resized to S and padded to S x S;
    # True, the whole image resized to S x S (SAM 2). ``stable_sam.transforms`` maps both.
    square_input = False

    @property
    def mask_decoder(self) -> nn.Module:
        return self.sam.mask_decoder

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.sam.prompt_encoder

    @property
    def pixel_mean(self) -> Tensor:
        """(3, 1, 1) RGB mean in 0..255 that the encoder's input is normalised with."""
        return self.sam.pixel_mean

    @property
    def pixel_std(self) -> Tensor:
        return self.sam.pixel_std

    # -- geometry ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        """Side of the square encoder input (1024 for official SAM, 256 for the mini)."""
        return self.prompt_encoder.input_image_size[0]

    def preprocess(self, images: Tensor) -> Tensor:
        """Resized images (B, 3, h, w) in 0..255 -> normalised and padded (B, 3, S, S)."""
        return self.sam.preprocess(images)

    # -- forward pieces ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Image embeddings for preprocessed images (B, 3, S, S).

        Returns (B, 256, S/16, S/16) embeddings and, for HQ-SAM, its per-image HQ features
        (B, 32, S/4, S/4) — computed once here so the decoder does not recompute them per prompt.
        """
        embeddings, vit_features = self.encode_backbone(images)
        if vit_features is None:
            return embeddings, None
        return embeddings, self.hq_features(embeddings, vit_features)

    @torch.no_grad()
    def encode_backbone(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The frozen ViT alone: (B, 256, S/16, S/16) embeddings and, for HQ-SAM, the early
        ViT features (B, D, S/16, S/16) (after its first global-attention block) that
        ``hq_features`` fuses; ``None`` for SAM."""
        if not self.is_hq:
            return self.sam.image_encoder(images), None
        embeddings, interm = self.sam.image_encoder(images)
        return embeddings, interm[0].permute(0, 3, 1, 2)

    def decoder_features(
        self, embeddings: Tensor, backbone_features: Tensor | None
    ) -> Tensor | None:
        """The per-image features ``decode`` takes beyond the embedding, from what
        ``encode_backbone`` returned: HQ-SAM's fused HQ features; ``None`` for SAM."""
        if backbone_features is None:
            return None
        return self.hq_features(embeddings, backbone_features)

    @torch.no_grad()
    def image_detail(self, images: Tensor) -> Tensor | None:
        """PA-SAM's detail tensor ``[I, ∇I]`` (B, 4, S/4, S/4) fp16 of preprocessed images
        (``prompt_adapter.image_detail``); ``None`` without a prompt adapter."""
        return None if self.prompt_adapter is None else image_detail(images)

    def hq_features(self, embeddings: Tensor, vit_features: Tensor) -> Tensor:
        """HQ-SAM's global-local fusion (its Eq. in §3.2): the final embedding and the early ViT
        features, each upsampled to (B, 32, S/4, S/4), summed. Differentiable: HQ-SAM trains it."""
        decoder = self.mask_decoder
        return decoder.embedding_encoder(embeddings) + decoder.compress_vit_feat(vit_features)

    def decode(
        self,
        image_embeddings: Tensor,
        sparse: Tensor,
        dense: Tensor,
        multimask_output: bool,
        hq_features: Tensor | None = None,
        detail: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Mask decoder for one image's embedding (1, C, h, w) and B prompts.

        Returns low-res mask logits (B, K, 4h, 4w) and predicted IoUs (B, K), K = 3 with
        multimask output, else 1 — exactly SAM's ``MaskDecoder.forward`` selection. ``detail``:
        the image's ``image_detail``, which a model with a prompt adapter needs (it returns
        ``M_SAM`` or Eq. 3's ``M_PA``, as its adapter's ``serve`` says).
        """
        if self.prompt_adapter is not None:
            blend = self.prompt_adapter.serve == "blend"
            out = self.decode_prompt_adapter(
                image_embeddings, sparse, dense, multimask_output, detail, blend=blend
            )
            return out.masks, out.iou_predictions
        decoder = self.mask_decoder
        pe = self.prompt_encoder.get_dense_pe()
        if not self.is_hq:
            return decoder(
                image_embeddings=image_embeddings,
                image_pe=pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        if hq_features is None:
            raise ValueError("HQ-SAM decoding needs the image's HQ features from encode()")
        masks, iou = decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            hq_features=hq_features,
        )
        # HQ-SAM's selection: the chosen SAM mask plus the HQ mask, or (``hq_token_only``) the
        # HQ mask alone, with SAM's predicted IoU either way.
        n = decoder.num_mask_tokens
        if self.hq_token_only:
            masks = masks[:, n - 1 : n]
            iou = iou[:, 1 : n - 1].max(dim=1).values[:, None] if multimask_output else iou[:, :1]
            return masks, iou
        if multimask_output:
            iou_multi, best = iou[:, 1 : n - 1].max(dim=1)
            sam_mask = masks[:, 1 : n - 1][torch.arange(masks.shape[0]), best].unsqueeze(1)
            iou = iou_multi.unsqueeze(1)
        else:
            sam_mask, iou = masks[:, 0:1], iou[:, 0:1]
        return sam_mask + masks[:, n - 1 : n], iou

    def decode_prompt_adapter(
        self,
        image_embeddings: Tensor,
        sparse: Tensor,
        dense: Tensor,
        multimask_output: bool,
        detail: Tensor | None,
        generator: torch.Generator | None = None,
        blend: bool = True,
    ) -> PromptAdapterOutput:
        """PA-SAM's decoder pass (``PromptAdapter.decode``): Eq. 3's M_PA, SAM's IoUs,
        and M_SAM and M_U's logits for the loss. ``generator``: the Gumbel noise's stream when
        the adapter trains; ``blend=False`` skips Eq. 3 (serving M_SAM)."""
        if self.prompt_adapter is None:
            raise ValueError("this model has no prompt adapter")
        if detail is None:
            raise ValueError("PA-SAM decoding needs the image's detail tensor (image_detail)")
        return self.prompt_adapter.decode(
            self.sam.mask_decoder,
            image_embeddings,
            self.sam.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            detail,
            multimask_output,
            generator,
            blend,
        )

    def encode_prompts(
        self,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        masks: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """SAM's prompt encoder (inputs in the resized-input frame)."""
        return self.prompt_encoder(points=points, boxes=boxes, masks=masks)
