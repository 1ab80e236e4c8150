from .plugins import (
    DeformableSamplingPlugin,
    DynamicRoutingPlugin,
    PluginConfig,
    StableSamPlugins,
    sample_at_offsets,
)
from .stable_block import StableTwoWayAttentionBlock
from .stable_sam import StableSam
from .stable_sam2 import StableSam2

__all__ = [
    "DeformableSamplingPlugin",
    "DynamicRoutingPlugin",
    "PluginConfig",
    "StableSam",
    "StableSam2",
    "StableSamPlugins",
    "StableTwoWayAttentionBlock",
    "sample_at_offsets",
]
