"""Builders for the SAM bases Stable-SAM plugs into.

``build_sam(model_type, checkpoint)`` mirrors ``segment_anything.sam_model_registry`` and adds
the project's small ``mini`` SAM (the embedded default base, see ``docs/MODEL.md``) and
MobileSAM (``vit_t``: a TinyViT image encoder with SAM's prompt encoder and mask decoder).
Official checkpoints (``.pth`` state_dicts, MobileSAM's ``mobile_sam.pt``) load strictly through
the same code, with ``torch.load(weights_only=True)`` so that no pickled code is ever executed.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .modeling import PluginConfig, PromptAdapter, PromptAdapterConfig, StableSam, StableSam2
from .sam2_base import SAM2_MODEL_TYPES, build_sam2_base, is_sam2_type, load_sam2_state_dict

logger = logging.getLogger(__name__)

PROMPT_EMBED_DIM = 256  # the mask decoder width; the plugins are built for it


@dataclass(frozen=True)
class EncoderSpec:
    """The image encoder dimensions of one SAM size."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    window_size: int = 14


# Official sizes (segment_anything/build_sam.py) and the project's mini SAMs: ViT embed 192,
# depth 6, the standard 256-wide decoder (DESIGN §5); ``mini`` takes a 256 px input (16x16
# embedding), ``mini_512`` the same encoder at 512 px (32x32 embedding, 128x128 low-res masks),
# warm-started from a ``mini`` file by ``training.pretrain`` (``--init-from``).
ENCODER_SPECS: dict[str, EncoderSpec] = {
    "vit_h": EncoderSpec(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": EncoderSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": EncoderSpec(768, 12, 12, (2, 5, 8, 11)),
    "mini": EncoderSpec(192, 6, 3, (1, 3, 5), image_size=256, window_size=8),
    "mini_512": EncoderSpec(192, 6, 3, (1, 3, 5), image_size=512, window_size=8),
}


# MobileSAM (Zhang et al., 2023): TinyViT-5M distilled from SAM's ViT-H, 1024 px input, 64x64
# embedding, SAM's own prompt encoder and mask decoder (``modeling/tiny_vit.py``). Plain decoder
# only: HQ-SAM's parameters are not built on it.
TINY_VIT_TYPES = ("vit_t",)

HQ_PREFIX = "hq_"
MODEL_TYPES = tuple(ENCODER_SPECS) + TINY_VIT_TYPES + tuple(HQ_PREFIX + t for t in ENCODER_SPECS)
MODEL_TYPES += SAM2_MODEL_TYPES  # SAM 2.1 image models (``stable_sam.sam2_base``)


def build_sam(
    model_type: str, checkpoint: str | Path | None = None, add_hq: bool = False
) -> nn.Module:
    """Build a SAM of ``model_type``; load ``checkpoint`` strictly if given.

    ``model_type`` is one of ``vit_b``, ``vit_l``, ``vit_h``, ``mini``, or the same with an
    ``hq_`` prefix for HQ-SAM (``segment_anything_hq``'s classes), or ``vit_t`` for MobileSAM.
    ``checkpoint`` may be an official ``.pth`` state_dict (``mobile_sam.pt`` for ``vit_t``) or a
    ``.safetensors`` file (the format the project ships its mini SAM in, stored in fp16).
    ``None`` leaves random weights.

    ``add_hq``: HQ-SAM's architecture on a plain SAM ``checkpoint`` (``model_type`` without the
    prefix): every SAM key loads strictly, HQ-SAM's new parameters (``HQ_PARAMETER_PREFIXES``)
    keep their fresh initialisation, to be trained (``training.baselines``'s ``hq-sam``).

    A SAM 2.1 ``model_type`` (``sam2.1_hiera_tiny`` ...) builds ``sam2``'s ``SAM2Base``
    (``stable_sam.sam2_base``; checkpoints are its official ``.pt`` files).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"unknown SAM model type {model_type!r}; expected one of {list(MODEL_TYPES)}"
        )
    if is_sam2_type(model_type):
        if add_hq:
            raise ValueError(f"add_hq is for a plain SAM base, not {model_type!r}")
        sam2 = build_sam2_base(model_type)
        if checkpoint is not None:
            load_sam2_state_dict(sam2, load_state_dict(checkpoint), checkpoint)
        return sam2
    if add_hq and model_type.startswith(HQ_PREFIX):
        raise ValueError(f"add_hq is for a plain SAM base, not {model_type!r}")
    if add_hq and model_type in TINY_VIT_TYPES:
        raise ValueError(
            f"add_hq is not supported on {model_type!r} (MobileSAM): it is a plain-decoder "
            f"base; use a ViT base ({', '.join(ENCODER_SPECS)}) for HQ-SAM"
        )
    hq = add_hq or model_type.startswith(HQ_PREFIX)
    base_type = model_type.removeprefix(HQ_PREFIX)
    if hq:
        with warnings.catch_warnings():  # timm deprecation noise from segment_anything_hq
            warnings.simplefilter("ignore")
            from segment_anything_hq import modeling as classes
    else:
        from segment_anything import modeling as classes
    image_encoder, image_size = _image_encoder(base_type, classes)
    embedding_size = image_size // 16
    transformer = classes.TwoWayTransformer(
        depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
    )
    decoder_args = dict(
        num_multimask_outputs=3,
        transformer=transformer,
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    if hq:
        mask_decoder = classes.MaskDecoderHQ(
            vit_dim=ENCODER_SPECS[base_type].embed_dim, **decoder_args
        )
    else:
        mask_decoder = classes.MaskDecoder(**decoder_args)
    sam = classes.Sam(
        image_encoder=image_encoder,
        prompt_encoder=classes.PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    if checkpoint is not None and add_hq:
        _load_base_into_hq(sam, load_state_dict(checkpoint), checkpoint)
    elif checkpoint is not None:
        _load_strict(sam, load_state_dict(checkpoint), checkpoint, model_type)
    # After loading: TinyViT's attention caches its biases for inference when put in eval mode.
    sam.eval()
    return sam


def _image_encoder(base_type: str, classes: ModuleType) -> tuple[nn.Module, int]:
    """The image encoder of ``base_type`` and the side of its square input in pixels."""
    if base_type in TINY_VIT_TYPES:
        from .modeling.tiny_vit import TINY_VIT_IMAGE_SIZE, TinyViTImageEncoder

        return TinyViTImageEncoder(), TINY_VIT_IMAGE_SIZE
    spec = ENCODER_SPECS[base_type]
    encoder = classes.ImageEncoderViT(
        depth=spec.depth,
        embed_dim=spec.embed_dim,
        img_size=spec.image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
        out_chans=PROMPT_EMBED_DIM,
    )
    return encoder, spec.image_size


def _load_strict(
    sam: nn.Module, state: dict[str, torch.Tensor], path: str | Path, model_type: str
) -> None:
    """``load_state_dict(strict=True)``, refusing a file of another layout by name and key."""
    from .checkpoint import state_mismatch

    missing, unexpected, reshaped = state_mismatch(state, sam.state_dict())
    if missing or unexpected or reshaped:
        raise RuntimeError(
            f"{Path(path).name} is not a {model_type} checkpoint: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, other shapes {reshaped[:5]}"
        )
    sam.load_state_dict(state, strict=True)


# What HQ-SAM adds to SAM (its paper §3.2): the HQ-Output token, its three-layer MLP and the
# global-local fusion convolutions, all in the mask decoder.
HQ_PARAMETER_PREFIXES = tuple(
    f"mask_decoder.{name}."
    for name in (
        "hf_token",
        "hf_mlp",
        "compress_vit_feat",
        "embedding_encoder",
        "embedding_maskfeature",
    )
)


def is_hq_parameter(name: str) -> bool:
    """Whether ``name`` (a key of an HQ-SAM state_dict) is one of HQ-SAM's new parameters."""
    return name.startswith(HQ_PARAMETER_PREFIXES)


def _load_base_into_hq(sam: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a plain SAM state_dict into an HQ-SAM: strict on SAM's keys, HQ's left fresh."""
    hq_keys = {k for k in sam.state_dict() if is_hq_parameter(k)}
    stray = sorted(k for k in state if is_hq_parameter(k))
    if stray:
        raise ValueError(f"{Path(path).name} is already an HQ-SAM checkpoint (has {stray[0]})")
    missing, unexpected = sam.load_state_dict(state, strict=False)
    missing = sorted(set(missing) - hq_keys)
    if missing or unexpected:
        raise RuntimeError(
            f"{Path(path).name} does not match the SAM base: missing {missing[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or ``.pth`` without unpickling code; as float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def build_stable_sam(
    model_type: str,
    checkpoint: str | Path | None = None,
    plugins: bool = True,
    plugin_config: PluginConfig | None = None,
    plugin_checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    add_hq: bool = False,
    prompt_adapter: PromptAdapterConfig | None = None,
) -> StableSam:
    """Build Stable-SAM (or, with ``plugins=False``, plain SAM) on a frozen SAM base.

    ``plugin_checkpoint`` loads trained plugins (its own config wins over ``plugin_config``) and
    is checked against the base: a plugin file trained on another base raises
    ``PluginMismatchError``. ``device`` defaults to CUDA when available, else CPU. ``add_hq``:
    HQ-SAM's new (untrained) parameters on the plain SAM base (``build_sam``); the model keeps
    the base's ``model_type`` and hash, which HQ-SAM files trained on it bind to.
    ``prompt_adapter``: PA-SAM's prompt adapter of that config, freshly initialised (equal to
    SAM until trained), beside decoder layer 2 of a plain SAM (``plugins=False``).
    """
    from .checkpoint import load_plugins
    from .device import pick_device

    sam = build_sam(model_type, checkpoint, add_hq=add_hq)
    base_hash = file_sha256(checkpoint) if checkpoint is not None else "random-init"
    config = (plugin_config or PluginConfig()) if plugins else None
    wrapper = StableSam2 if is_sam2_type(model_type) else StableSam
    model = wrapper(sam, model_type, base_hash, config)
    if prompt_adapter is not None:
        model.install_prompt_adapter(PromptAdapter(prompt_adapter))
    if add_hq:  # fresh HQ parameters: features cached for them are this model's alone
        model.hq_tag = f"hq-fresh-{uuid.uuid4().hex[:12]}"
    model.to(pick_device(device))
    if plugin_checkpoint is not None:
        if not plugins:
            raise ValueError("plugin_checkpoint given for a plain SAM (plugins=False)")
        load_plugins(model, plugin_checkpoint)
    return model


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The bases the repository ships (pretrained by ``training.pretrain``, provenance in
# ``weights/PROVENANCE*.md``), each with its RTS-trained plugins: base file, plugin file.
SHIPPED_FILES: dict[str, tuple[str, str]] = {
    "mini": ("sam_mini.safetensors", "stable_sam_mini_plugins.safetensors"),
    "mini_512": ("sam_mini_512.safetensors", "stable_sam_mini_512_plugins.safetensors"),
}
DEFAULT_MODEL_TYPE = "mini"  # the embedded default: what a fresh install serves


@dataclass(frozen=True)
class DefaultModelPaths:
    """Where a shipped model (the embedded default, unless asked for another) lives."""

    model_type: str
    base_checkpoint: Path
    plugin_checkpoint: Path


def default_model_paths(model_type: str | None = None) -> DefaultModelPaths:
    """The shipped files of ``model_type`` (``SHIPPED_FILES``; default: the embedded default,
    ``DEFAULT_MODEL_TYPE``) in ``stable_sam/weights/``."""
    model_type = model_type or DEFAULT_MODEL_TYPE
    if model_type not in SHIPPED_FILES:
        raise ValueError(
            f"no shipped weights for {model_type!r}; shipped: {', '.join(SHIPPED_FILES)}"
        )
    base, plugins = SHIPPED_FILES[model_type]
    return DefaultModelPaths(model_type, WEIGHTS_DIR / base, WEIGHTS_DIR / plugins)


def build_default_model(
    plugins: bool = True, device: str | torch.device | None = None
) -> StableSam:
    """The embedded default: the shipped base, with its shipped plugins unless ``plugins=False``."""
    paths = default_model_paths()
    if not paths.base_checkpoint.is_file():
        raise FileNotFoundError(f"embedded default base missing: {paths.base_checkpoint}")
    plugin_file = paths.plugin_checkpoint if plugins and paths.plugin_checkpoint.is_file() else None
    if plugins and plugin_file is None:
        logger.warning(
            "embedded plugin file %s missing: plugins start untrained (identical to SAM)",
            paths.plugin_checkpoint,
        )
    return build_stable_sam(
        paths.model_type,
        paths.base_checkpoint,
        plugins=plugins,
        plugin_checkpoint=plugin_file,
        device=device,
    )


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file: identifies a base checkpoint in plugin metadata and caches."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
