from .plugins import (
    DeformableSamplingPlugin,
    DynamicRoutingPlugin,
    PluginConfig,
    StableSamPlugins,
    sample_at_offsets,
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
    "sample_at_offsets",
]
