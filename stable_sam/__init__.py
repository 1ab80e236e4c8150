"""Stable-SAM (Fan et al., ICLR 2025) on top of ``segment_anything``: SAM kept frozen, a deformable
sampling plugin (DSP) and a dynamic routing plugin (DRP) in its mask decoder (or, for comparison,
PA-SAM's prompt adapter beside the same decoder layer)."""

from . import metrics, prompts
from .build import (
    MODEL_TYPES,
    build_default_model,
    build_sam,
    build_stable_sam,
    default_model_paths,
    file_sha256,
)
from .cache import EmbeddingCache, ImageEmbedding
from .checkpoint import (
    PluginMismatchError,
    load_plugins,
    read_plugin_metadata,
    read_plugins,
    save_plugins,
)
from .device import autocast_context, pick_device
from .modeling import (
    DeformableSamplingPlugin,
    DynamicRoutingPlugin,
    PluginConfig,
    PromptAdapter,
    PromptAdapterConfig,
    StableSam,
    StableSam2,
    StableSamPlugins,
)
from .predictor import BatchPrediction, Prediction, StableSamPredictor, image_content_key
from .refinement import ClickMemory, PromptKey
from .sam2_base import SAM2_MODEL_TYPES

__all__ = [
    "MODEL_TYPES",
    "SAM2_MODEL_TYPES",
    "BatchPrediction",
    "ClickMemory",
    "DeformableSamplingPlugin",
    "DynamicRoutingPlugin",
    "EmbeddingCache",
    "ImageEmbedding",
    "PluginConfig",
    "PluginMismatchError",
    "Prediction",
    "PromptAdapter",
    "PromptAdapterConfig",
    "PromptKey",
    "StableSam",
    "StableSam2",
    "StableSamPlugins",
    "StableSamPredictor",
    "autocast_context",
    "build_default_model",
    "build_sam",
    "build_stable_sam",
    "default_model_paths",
    "file_sha256",
    "image_content_key",
    "load_plugins",
    "metrics",
    "pick_device",
    "prompts",
    "read_plugin_metadata",
    "read_plugins",
    "save_plugins",
]
