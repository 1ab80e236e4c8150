"""MobileSAM's image encoder: ``segment_anything_hq``'s TinyViT, returning SAM's embedding alone.

MobileSAM (Zhang et al., 2023, "Faster Segment Anything") distils SAM's ViT-H into a TinyViT-5M
and keeps SAM's prompt encoder and mask decoder unchanged. ``segment_anything_hq`` ships that
TinyViT (for its HQ-SAM tiny model); its ``forward`` also returns the stage-2 features HQ-SAM's
decoder fuses. SAM's mask decoder takes the embedding only, so this subclass drops them; the
parameters, and so the state_dict keys of the official ``mobile_sam.pt``, are TinyViT's own.
"""

from __future__ import annotations

import warnings

from torch import Tensor

with warnings.catch_warnings():  # timm deprecation and registry-overwrite noise on import
    warnings.simplefilter("ignore")
    from segment_anything_hq.modeling.tiny_vit_sam import TinyViT

TINY_VIT_IMAGE_SIZE = 1024  # its forward reshapes to a fixed 64 x 64 grid: 1024 px input only


class TinyViTImageEncoder(TinyViT):
    """TinyViT-5M as MobileSAM configures it: (B, 3, 1024, 1024) -> (B, 256, 64, 64).

    Stages of width 64, 128, 160, 320 and depth 2, 2, 6, 2 (an MBConv stage, then windowed
    attention with 2, 4, 5, 10 heads in windows of 7, 7, 14, 7), and SAM's neck to 256 channels.
    The ImageNet head (``norm_head``, ``head``) is never run; it is kept because the official
    checkpoint holds it and loads strictly.
    """

    def __init__(self) -> None:
        super().__init__(
            img_size=TINY_VIT_IMAGE_SIZE,
            in_chans=3,
            num_classes=1000,
            embed_dims=[64, 128, 160, 320],
            depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10],
            window_sizes=[7, 7, 14, 7],
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )

    def forward(self, x: Tensor) -> Tensor:
        embeddings, _stage2_features = self.forward_features(x)
        return embeddings
