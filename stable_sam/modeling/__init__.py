from .plugins import (
    DeformableSamplingPlugin,
    DynamicRoutingPlugin,
    PluginConfig,
    StableSamPlugins,
    bilinear_sample_tokens,
)
from .stable_block import StableTwoWayAttentionBlock
from .stable_sam import StableSam

__all__ = [
    "DeformableSamplingPlugin",
    "DynamicRoutingPlugin",
    "PluginConfig",
    "StableSam",
    "StableSamPlugins",
    "StableTwoWayAttentionBlock",
    "bilinear_sample_tokens",
]
