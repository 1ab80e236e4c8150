"""``StableSam2``: a frozen SAM 2.1 image model with DSP and DRP in its mask decoder.

SAM 2's mask decoder (``sam2.modeling.sam.mask_decoder.MaskDecoder``) is SAM's with two
additions, and its two-way transformer has the same two layers (same four steps, same
sub-module names), so the plugins go into layer 2 exactly as on SAM (paper §4.1-4.2):

* high-resolution skip features: the Hiera backbone's stride-4 and stride-8 maps, projected by
  the decoder's ``conv_s0`` / ``conv_s1`` when the image is encoded, are added inside the mask
  upscaling after the transformer. They never enter the transformer, so the plugins do not touch
  them; they are per-image, computed once and cached with the embedding.
* an object-score token, put *first*: the output tokens are ``[obj_score, iou, mask_0, mask_1,
  mask_2, mask_3]`` + the prompt tokens. ``t_o`` (paper Eq. 5, "the prompt token feature
  corresponding to the output mask") is ``mask_0``, index 2: the token whose hypernetwork MLP
  makes the single-mask output, as index 1 in SAM. The object-score token is not it: it predicts
  whether the object is present at all (for video), and no mask is read from it; the IoU token
  scores masks and makes none either.

The image path follows ``sam2.sam2_image_predictor.SAM2ImagePredictor``: the whole image is
resized to 1024 x 1024 (no padding), the lowest-resolution features get ``no_mem_embed`` (what
SAM 2 adds when there is no memory), a box is two corner points (labels 2, 3) in front of the
clicks, and the decoder's object score does not change the masks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .plugins import PluginConfig
from .stable_sam import StableSam

SAM2_MASK_TOKEN_INDEX = 2  # [obj_score, iou, mask_0, ...]: t_o = mask_0
# SAM 2's input normalisation (ImageNet mean / std, as SAM2Transforms applies them), in 0..255.
SAM2_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM2_PIXEL_STD = (58.395, 57.12, 57.375)

HighResFeatures = tuple[Tensor, Tensor]  # (B, 32, S/4, S/4), (B, 64, S/8, S/8)


class StableSam2(StableSam):
    """``StableSam`` on a ``sam2`` ``SAM2Base``: SAM 2 kept frozen, plugins in decoder layer 2.

    ``sam`` is the ``SAM2Base`` (``stable_sam.sam2_base.build_sam2_base``); its state_dict keys are
    unchanged, so official checkpoints load strictly. ``decode`` takes the image's
    high-resolution features (from ``encode``) where ``StableSam`` takes HQ-SAM's.
    """

    square_input = True

    def __init__(
        self,
        sam: nn.Module,
        model_type: str,
        base_checkpoint_sha256: str,
        plugin_config: PluginConfig | None = None,
    ) -> None:
        super().__init__(sam, model_type, base_checkpoint_sha256, plugin_config)
        device = self.sam.no_mem_embed.device
        # Buffers of this wrapper, not of SAM 2 (not persistent: the base's keys stay as they are).
        self.register_buffer(
            "_pixel_mean", torch.tensor(SAM2_PIXEL_MEAN, device=device).view(3, 1, 1), False
        )
        self.register_buffer(
            "_pixel_std", torch.tensor(SAM2_PIXEL_STD, device=device).view(3, 1, 1), False
        )
        # The decoder's object-score logits (B, 1) of the last ``decode`` call.
        self.last_object_score_logits: Tensor | None = None

    @property
    def mask_token_index(self) -> int:  # type: ignore[override]
        """t_o is ``mask_0``: index 2 behind the object-score and IoU tokens (1 without an
        object-score token, as in SAM)."""
        return SAM2_MASK_TOKEN_INDEX if self.mask_decoder.pred_obj_scores else 1

    def install_prompt_adapter(self, adapter: nn.Module) -> None:
        raise ValueError("PA-SAM's prompt adapter is built for SAM's decoder, not SAM 2's")

    # -- the base's parts --------------------------------------------------------------------
    @property
    def mask_decoder(self) -> nn.Module:
        return self.sam.sam_mask_decoder

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.sam.sam_prompt_encoder

    @property
    def pixel_mean(self) -> Tensor:
        return self._pixel_mean

    @property
    def pixel_std(self) -> Tensor:
        return self._pixel_std

    @property
    def device(self) -> torch.device:
        return self.sam.no_mem_embed.device

    def preprocess(self, images: Tensor) -> Tensor:
        """Resized images (B, 3, S, S) in 0..255 -> normalised as SAM 2 normalises them (padded
        with zeros to S x S if smaller, as SAM pads)."""
        x = (images - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        side = self.image_size
        return nn.functional.pad(x, (0, side - w, 0, side - h)) if (h, w) != (side, side) else x

    # -- forward pieces ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, HighResFeatures]:
        """Image embeddings (B, 256, S/16, S/16) and the high-resolution features for
        preprocessed images (B, 3, S, S); see ``encode_backbone``."""
        return self.encode_backbone(images)

    @torch.no_grad()
    def encode_backbone(self, images: Tensor) -> tuple[Tensor, HighResFeatures]:
        """The frozen Hiera image encoder, as ``SAM2ImagePredictor.set_image`` runs it.

        Returns the embedding (B, 256, S/16, S/16), with ``no_mem_embed`` added, and the
        decoder's high-resolution skip features ((B, 32, S/4, S/4), (B, 64, S/8, S/8)), already
        through its ``conv_s0`` / ``conv_s1``. All contiguous (what a cache holds is what it
        counts).
        """
        backbone_out = self.sam.forward_image(images)
        _, vision_feats, _, feat_sizes = self.sam._prepare_backbone_features(backbone_out)
        if self.sam.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.sam.no_mem_embed
        b = images.shape[0]
        maps = [
            feat.permute(1, 2, 0).reshape(b, -1, *size).contiguous()
            for feat, size in zip(vision_feats, feat_sizes, strict=True)
        ]
        s0, s1, embeddings = maps
        return embeddings, (s0, s1)

    def decoder_features(
        self, embeddings: Tensor, backbone_features: HighResFeatures | None
    ) -> HighResFeatures | None:
        """SAM 2's high-resolution features are final when encoded (frozen ``conv_s0/s1``)."""
        return backbone_features

    def decode(
        self,
        image_embeddings: Tensor,
        sparse: Tensor,
        dense: Tensor,
        multimask_output: bool,
        high_res_features: HighResFeatures | None = None,
        detail: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """SAM 2's mask decoder for one image's embedding (1, C, h, w) and B prompts.

        Returns low-res mask logits (B, K, 4h, 4w) and predicted IoUs (B, K), K = 3 with
        multimask output, else 1, selected as ``MaskDecoder.forward`` selects (a single mask
        that is not stable falls back to the best of the three). The object-score logits are
        kept in ``last_object_score_logits``. ``detail`` (PA-SAM's) is never set on SAM 2.
        """
        if high_res_features is None:
            raise ValueError("SAM 2 decoding needs the image's high-resolution features")
        masks, iou, _, object_scores = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=image_embeddings.shape[0] != sparse.shape[0],
            high_res_features=list(high_res_features),
        )
        self.last_object_score_logits = object_scores.detach()
        return masks, iou

    def encode_prompts(
        self,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        masks: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """SAM 2's prompt encoder, fed as ``SAM2ImagePredictor`` feeds it: a box (B, 4) becomes
        two corner points labelled 2 and 3 in front of the clicks (SAM 2 was trained so)."""
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device)
            labels = labels.expand(corners.shape[0], 2)
            if points is None:
                points = (corners, labels)
            else:
                points = (
                    torch.cat([corners, points[0]], dim=1),
                    torch.cat([labels, points[1].to(labels.dtype)], dim=1),
                )
        return self.prompt_encoder(points=points, boxes=None, masks=masks)
