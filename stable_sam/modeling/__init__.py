from .plugins import (
    DeformableSamplingPlugin,
    DynamicRoutingPlugin,
    PluginConfig,
    StableSamPlugins,
    sample_at_offsets,
)
from .prompt_adapter import (
    PromptAdapter,
    PromptAdapterConfig,
    PromptAdapterOutput,
    gumbel_top_k,
    image_detail,
)
from .stable_block import StableTwoWayAttentionBlock
from .stable_sam import StableSam
from .stable_sam2 import StableSam2

__all__ = [
    "DeformableSamplingPlugin",
    "DynamicRoutingPlugin",
    "PluginConfig",
    "PromptAdapter",
    "PromptAdapterConfig",
    "PromptAdapterOutput",
    "StableSam",
    "StableSam2",
    "StableSamPlugins",
    "StableTwoWayAttentionBlock",
    "gumbel_top_k",
    "image_detail",
    "sample_at_offsets",
]
