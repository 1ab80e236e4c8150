"""The paper's training variants: Stable-SAM, its Table 5 ablations and the baselines.

Every variant trains with the RTS loop of ``training.engine`` for a fair comparison:

  ``stable``      DSP + DRP, full RTS (the shipped default plugins)
  ``dsp``         DSP only (routing fixed to α = (1, 0)), full RTS
  ``dsp-no-rts``  DSP only, clean prompts (GT boxes), no occlusion synthesis
  ``dt-sam``      no plugins; SAM's mask decoder fine-tuned with RTS
  ``pt-sam``      no plugins; only SAM's tokens fine-tuned with RTS (paper Table 1's PT-SAM)
  ``hq-sam``      HQ-SAM (Ke et al., NeurIPS 2023) on our base, trained with its own recipe
  ``hq-sam-rts``  the same HQ-SAM parameters trained with RTS, one epoch (a fair comparison)
  ``pa-sam``      PA-SAM (Xie et al., ICME 2024): its prompt adapter on our base, RTS, one epoch

DT-SAM is the paper's strongest naive alternative to Stable-SAM. Its image and prompt encoders
stay frozen; the result is saved as the full mask-decoder state_dict (``.safetensors``, ~16 MB in
fp32 for the 256-wide decoder) with the same metadata layout as a plugin file, and loaded back
into a plain SAM of the same base. The paper does not publish DT-SAM's learning rate; we use
Adam 1e-4 (the plugins' 1e-3 is for freshly initialised weights; a pretrained decoder at 1e-3
drifts far from SAM).

PT-SAM ("finetuning SAM's prompt token", paper §5.1) trains only the learned tokens that enter
SAM's two-way transformer beside the image: the prompt encoder's sparse prompt embeddings (the
positive / negative point and the two box-corner embeddings, and the padding point's) and the
mask decoder's output tokens (IoU token and four mask tokens), 10 x 256 values on every base
(``PT_SAM_TOKENS``; RTS draws no negative clicks, so the negative point's embedding gets no
gradient and stays SAM's). The dense "no mask" embedding, added to every image token, is left frozen:
it is not a token. The paper does not publish PT-SAM's learning rate; we use the plugins' 1e-3
(the tokens are few and their gradients small). Saved as those tensors alone (~11 KB), loaded
strictly into a plain SAM of the same base.

HQ-SAM adds to the frozen SAM an HQ-Output token (a fifth mask token, joining the two-way
transformer's tokens), its three-layer MLP and the global-local fusion (the final embedding and
the early ViT features after the first global-attention block, each upsampled to S/4 and
summed) — ``segment_anything_hq``'s ``MaskDecoderHQ``, built on our plain base with
``add_hq=True`` (``stable_sam.build``). Only those train (Adam 1e-3, BCE + dice on the HQ token's
mask, as HQ-SAM supervises); the file holds them alone (~1.3 MB on the mini), bound to the plain
base. HQ-SAM has no identity initialisation: its token joins SAM's self-attention among tokens,
so even SAM's own mask changes once it is there. The HQ token's mask alone is what trains, as
HQ-SAM supervises; we serve SAM's chosen mask plus it (``hq_token_only=False``, stored in the
file), HQ-SAM's own default. Measured on the held-out benchmark the sum is ahead on every row
(GT box 60.5 vs 60.0, noisy box 54.5 vs 54.2, 1 point 43.0 vs 41.5, 10 points 56.5 vs 56.0 for
``hq-sam``; the same ordering for ``hq-sam-rts``; docs/BENCHMARKS.md).

PA-SAM adds its prompt adapter (``stable_sam.modeling.prompt_adapter``, 1.45 M parameters,
whatever the encoder: the decoder is 256 wide everywhere) beside decoder layer 2 of the frozen
SAM; only the adapter trains, as the paper trains it. Its loss is the paper's (§3.1): BCE + dice
on M_SAM (SAM's mask with the adapter's residuals) and on M_PA (Eq. 3's blend),
plus BCE on M_U against the uncertain band, the pixels within ``uncertain_band_px`` (2) of the
GT boundary (our reading of "boundary dilation of the ground truth mask"), all at the input
frame's S x S, weighted 1 : 1 : 1 (the paper gives no weights). Recipe: the paper's Adam lr 1e-3;
its batch of 4 images is ours (32 prompts, 8 per image); it gives no epoch count and no prompt
mix, so PA-SAM trains like Stable-SAM: full RTS, one epoch. Its Gumbel noise is drawn from each
image's own seed (``training.engine.fit``), so a DDP run draws what one process draws. The file
(``stable-sam-pa-adapter``) holds the adapter's tensors alone (~5.8 MB in fp32), with its config,
bound to the base like the others and reloaded strictly. It also says what is served
(``pa_serve``): M_SAM, the paper's inference output ("sam", the default), or M_PA ("blend").
"""

from __future__ import annotations

import contextlib
import functools
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from torch.nn import functional as F

from stable_sam import (
    PluginConfig,
    PluginMismatchError,
    PromptAdapter,
    PromptAdapterConfig,
    StableSam,
    build_stable_sam,
    file_sha256,
    save_plugins,
)
from stable_sam.build import HQ_PARAMETER_PREFIXES, is_hq_parameter
from stable_sam.checkpoint import state_mismatch, write_safetensors_atomic
from stable_sam.modeling.prompt_adapter import SERVED_OUTPUTS
from training import rts
from training.data import Sample
from training.distributed import AdapterMasks, Ranks
from training.engine import (
    LossFn,
    Progress,
    TrainConfig,
    TrainResult,
    bce_dice_loss,
    bce_loss,
    fit,
    train_plugins,
    upsample_logits,
)

DECODER_FORMAT = "stable-sam-dt-decoder"
TOKENS_FORMAT = "stable-sam-pt-tokens"
HQ_FORMAT = "stable-sam-hq-params"
PA_FORMAT = "stable-sam-pa-adapter"
PLUGIN_LR, DT_SAM_LR, PT_SAM_LR, HQ_SAM_LR, PA_SAM_LR = 1e-3, 1e-4, 1e-3, 1e-3, 1e-3
# What PT-SAM trains: names in SAM's state_dict.
PT_SAM_TOKENS = (
    "prompt_encoder.point_embeddings.0.weight",
    "prompt_encoder.point_embeddings.1.weight",
    "prompt_encoder.point_embeddings.2.weight",
    "prompt_encoder.point_embeddings.3.weight",
    "prompt_encoder.not_a_point_embed.weight",
    "mask_decoder.iou_token.weight",
    "mask_decoder.mask_tokens.weight",
)


@dataclass(frozen=True)
class Variant:
    """One training variant: what trains (the plugins or SAM's decoder), with which prompts."""

    name: str
    plugins: bool  # False: plain SAM whose mask decoder is fine-tuned (DT-SAM)
    robust: bool  # the full RTS; False: clean prompts (GT boxes), no occlusion synthesis
    lr: float  # the variant's default Adam learning rate
    fixed_alpha: tuple[float, float] | None = None  # routing fixed (DSP without DRP)
    tokens_only: bool = False  # with plugins=False: PT-SAM (the tokens), not DT-SAM (decoder)
    hq: bool = False  # with plugins=False: HQ-SAM's new parameters train on the plain base
    pa: bool = False  # with plugins=False: PA-SAM's prompt adapter trains beside the plain base
    # The RTS prompt mix when not the full one (HQ-SAM's own recipe), and the default schedule.
    prompt_weights: dict[str, float] | None = None
    occlusion: bool = True
    epochs: int = 1
    lr_drop_epochs: tuple[int, ...] = ()

    def build_model(
        self, model_type: str, base: str | Path, device: str | None = None, seed: int | None = None
    ) -> StableSam:
        """The untrained model of this variant on the frozen ``base`` checkpoint. With ``seed``,
        the fresh plugins (or HQ-SAM parameters) are initialised from it (the same file every
        run); without, from torch's global generator, which this torch build seeds differently
        in every process."""
        config = PluginConfig(fixed_alpha=self.fixed_alpha) if self.plugins else None
        # fork_rng: the caller's generator state is left as it was.
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            model = build_stable_sam(
                model_type,
                base,
                plugins=self.plugins,
                plugin_config=config,
                device=device,
                add_hq=self.hq,
                prompt_adapter=PromptAdapterConfig() if self.pa else None,
            )
        # Served: SAM's mask plus the HQ token's (HQ-SAM's default); training sets token-only.
        model.hq_token_only = False
        return model

    def train_config(
        self, lr: float | None = None, epochs: int | None = None, **fields: Any
    ) -> TrainConfig:
        """A ``TrainConfig`` with this variant's learning rate, schedule and prompt mix
        (``fields`` as ``TrainConfig``'s; ``None`` for the variant's default)."""
        mix = rts.RTSConfig(robust=self.robust)
        if self.prompt_weights is not None:
            mix.prompt_weights = dict(self.prompt_weights)
        if not self.occlusion:
            mix.occlusion_prob = 0.0
        return TrainConfig(
            lr=self.lr if lr is None else lr,
            epochs=self.epochs if epochs is None else epochs,
            lr_drop_epochs=self.lr_drop_epochs,
            rts=mix,
            **fields,
        )

    def train(
        self,
        model: StableSam,
        dataset: Sequence[Sample],
        config: TrainConfig,
        progress: Progress | None = None,
        ranks: Ranks | None = None,
    ) -> TrainResult:
        """Train ``model`` (from ``build_model``) on ``dataset`` with the RTS loop (this
        process's share of it with ``ranks``)."""
        if self.plugins:
            return train_plugins(model, dataset, config, progress, ranks)
        if self.hq:
            return train_hq_sam(model, dataset, config, progress, ranks)
        if self.pa:
            return train_pa_sam(model, dataset, config, progress, ranks)
        if self.tokens_only:
            return train_pt_sam(model, dataset, config, progress, ranks)
        return train_dt_sam(model, dataset, config, progress, ranks)

    @property
    def file_kind(self) -> str:
        """What this variant's file holds: ``plugins``, ``decoder`` (DT-SAM), ``tokens``
        (PT-SAM), ``hq`` (HQ-SAM) or ``pa`` (PA-SAM's adapter)."""
        if self.plugins:
            return "plugins"
        if self.hq:
            return "hq"
        if self.pa:
            return "pa"
        return "tokens" if self.tokens_only else "decoder"

    def load(self, model: StableSam, path: str | Path) -> dict[str, str]:
        """Load a file of a plain-SAM variant (DT-SAM's decoder, PT-SAM's tokens, HQ-SAM's
        parameters, PA-SAM's adapter) into ``model`` (this variant's ``build_model``); returns
        the file's metadata."""
        if self.plugins:
            raise ValueError(f"{self.name} trains plugins: load them with build_stable_sam")
        if self.hq:
            return load_hq(model, path)
        if self.pa:
            return load_pa(model, path)
        return (load_tokens if self.tokens_only else load_decoder)(model, path)

    def save(self, model: StableSam, path: str | Path, metadata: dict[str, Any]) -> Path:
        """Write what trained: the plugin file, DT-SAM's decoder file, PT-SAM's tokens,
        HQ-SAM's parameters or PA-SAM's adapter."""
        if self.plugins:
            return save_plugins(model, path, metadata)
        if self.hq:
            return save_hq(model, path, metadata)
        if self.pa:
            return save_pa(model, path, metadata)
        if self.tokens_only:
            return save_tokens(model, path, metadata)
        return save_decoder(model, path, metadata)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("stable", plugins=True, robust=True, lr=PLUGIN_LR),
        Variant("dsp", plugins=True, robust=True, lr=PLUGIN_LR, fixed_alpha=(1.0, 0.0)),
        Variant("dsp-no-rts", plugins=True, robust=False, lr=PLUGIN_LR, fixed_alpha=(1.0, 0.0)),
        Variant("dt-sam", plugins=False, robust=True, lr=DT_SAM_LR),
        Variant("pt-sam", plugins=False, robust=True, lr=PT_SAM_LR, tokens_only=True),
        # HQ-SAM's own recipe (its §4.1 and appendix): GT boxes, 10 random points and
        # boundary-noised coarse masks in equal parts, large-scale jitter, no occlusion; lr 1e-3
        # for 12 epochs, dropping to 1e-4 after 10.
        Variant(
            "hq-sam",
            plugins=False,
            robust=True,
            lr=HQ_SAM_LR,
            hq=True,
            prompt_weights={"gt_box": 1.0, "points_10": 1.0, "coarse_mask": 1.0},
            occlusion=False,
            epochs=12,
            lr_drop_epochs=(10,),
        ),
        # The same parameters trained like Stable-SAM: full RTS, one epoch.
        Variant("hq-sam-rts", plugins=False, robust=True, lr=HQ_SAM_LR, hq=True),
        # PA-SAM: the paper's Adam lr 1e-3; no epochs or prompt mix given: Stable-SAM's RTS.
        Variant("pa-sam", plugins=False, robust=True, lr=PA_SAM_LR, pa=True),
    )
}


# ----------------------------------------------------------------------------- DT-SAM


def train_dt_sam(
    model: StableSam,
    dataset: Sequence[Sample],
    config: TrainConfig | None = None,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Fine-tune ``model.sam.mask_decoder`` with RTS (the model must have no plugins)."""
    if model.plugins is not None:
        raise ValueError(
            "DT-SAM fine-tunes plain SAM's decoder: build the model with plugins=False"
        )
    decoder = model.sam.mask_decoder
    params = list(decoder.parameters())
    config = config or TrainConfig(lr=DT_SAM_LR)
    return _fine_tune(model, params, [decoder], dataset, config, progress, ranks)


def _fine_tune(
    model: StableSam,
    params: list[torch.nn.Parameter],
    modules: Sequence[torch.nn.Module],
    dataset: Sequence[Sample],
    config: TrainConfig,
    progress: Progress | None,
    ranks: Ranks | None,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """The RTS loop on ``params`` of the plain SAM (in ``modules``), frozen again after."""
    for p in params:
        p.requires_grad_(True)
    try:
        return fit(model, params, dataset, config, progress, modules, ranks, loss_fn)
    finally:
        for p in params:
            p.requires_grad_(False)


# ----------------------------------------------------------------------------- PT-SAM


def pt_sam_parameters(model: StableSam) -> list[torch.nn.Parameter]:
    """The parameters PT-SAM trains (``PT_SAM_TOKENS``), in that order."""
    named = dict(model.sam.named_parameters())
    return [named[name] for name in PT_SAM_TOKENS]


def train_pt_sam(
    model: StableSam,
    dataset: Sequence[Sample],
    config: TrainConfig | None = None,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Fine-tune only SAM's tokens (``PT_SAM_TOKENS``) with RTS; everything else frozen."""
    if model.plugins is not None:
        raise ValueError("PT-SAM tunes plain SAM's tokens: build the model with plugins=False")
    config = config or TrainConfig(lr=PT_SAM_LR)
    modules = [model.sam.prompt_encoder, model.sam.mask_decoder]
    return _fine_tune(model, pt_sam_parameters(model), modules, dataset, config, progress, ranks)


# ----------------------------------------------------------------------------- HQ-SAM


def hq_sam_modules(model: StableSam) -> list[torch.nn.Module]:
    """What HQ-SAM trains (its §3.3): the HQ-Output token, its MLP and the three fusion
    convolutions (``stable_sam.build.HQ_PARAMETER_PREFIXES``)."""
    decoder = model.sam.mask_decoder
    if not model.is_hq:
        raise ValueError("HQ-SAM trains HQ-SAM's parameters: build the model with add_hq=True")
    return [
        getattr(decoder, prefix.removeprefix("mask_decoder.").rstrip("."))
        for prefix in HQ_PARAMETER_PREFIXES
    ]


def train_hq_sam(
    model: StableSam,
    dataset: Sequence[Sample],
    config: TrainConfig | None = None,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train HQ-SAM's new parameters on the frozen SAM, with BCE + dice on the HQ token's mask
    (the model's ``hq_token_only`` output, as HQ-SAM supervises)."""
    if model.plugins is not None:
        raise ValueError("HQ-SAM trains on a plain SAM: build the model with plugins=False")
    modules = hq_sam_modules(model)
    params = [p for m in modules for p in m.parameters()]
    config = config or VARIANTS["hq-sam"].train_config()
    only = model.hq_token_only
    model.hq_token_only = True
    try:
        return _fine_tune(model, params, modules, dataset, config, progress, ranks)
    finally:
        model.hq_token_only = only
        model.hq_tag = f"hq-trained-{uuid.uuid4().hex[:12]}"  # its HQ features changed


def save_hq(model: StableSam, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write HQ-SAM's parameters (``HQ_PARAMETER_PREFIXES`` of the SAM state_dict) atomically,
    tagged with the plain base they were trained on and the output they are served with."""
    state = {k: v for k, v in model.sam.state_dict().items() if is_hq_parameter(k)}
    metadata = {"hq_token_only": str(model.hq_token_only).lower(), **(metadata or {})}
    return write_safetensors_atomic(state, path, _base_header(model, HQ_FORMAT, metadata))


def load_hq(model: StableSam, path: str | Path) -> dict[str, str]:
    """Load an HQ-SAM parameters file into ``model`` (built with ``add_hq=True`` on the file's
    base): exactly HQ-SAM's keys with their shapes; the served output from the file."""
    meta = _check_base_file(model, path, HQ_FORMAT, "HQ-SAM parameters")
    state = load_file(str(path))
    own = {k: v for k, v in model.sam.state_dict().items() if is_hq_parameter(k)}
    if not own:
        raise ValueError("load HQ-SAM parameters into a model built with add_hq=True")
    check_tensors(state, own, path, "HQ-SAM parameters")
    model.sam.load_state_dict({**model.sam.state_dict(), **state}, strict=True)
    model.hq_token_only = meta.get("hq_token_only", "false") == "true"
    model.hq_tag = f"hq-{file_sha256(path)[:16]}"
    return meta


# ----------------------------------------------------------------------------- PA-SAM


def boundary_band(masks: Tensor, band_px: int) -> Tensor:
    """PA-SAM's uncertain-map target: (B, H, W) {0, 1} masks -> (B, H, W) float, 1 within
    ``band_px`` pixels (chessboard distance) of the boundary: where the (2 r + 1)² window
    around a pixel holds both object and background, inside the image (its edge is no
    boundary)."""
    m = masks.float()[:, None]
    size = 2 * band_px + 1
    dilated = F.max_pool2d(m, size, stride=1, padding=band_px)
    eroded = -F.max_pool2d(-m, size, stride=1, padding=band_px)
    return (dilated - eroded)[:, 0]


def pa_sam_loss(
    output: tuple[Tensor, AdapterMasks | None], target_masks: Tensor, band_px: int = 2
) -> Tensor:
    """PA-SAM's loss (its §3.1) for a decoder step's output and (B, S, S) GT masks: BCE + dice
    on M_PA (the served logits) and on M_SAM, BCE on M_U against ``boundary_band``; each a mean
    over the prompts, summed (scalar)."""
    logits, masks = output
    if masks is None:
        raise ValueError("PA-SAM's loss needs the prompt adapter's masks (a PA-SAM model)")
    band = boundary_band(target_masks, band_px)
    uncertainty = upsample_logits(masks.uncertainty_logits, target_masks.shape[-2:])[:, 0]
    return (
        bce_dice_loss(logits, target_masks)
        + bce_dice_loss(masks.sam_logits, target_masks)
        + bce_loss(uncertainty, band).mean()
    )


def prompt_adapter_of(model: StableSam) -> PromptAdapter:
    """The model's prompt adapter, refused for a model without one."""
    if model.prompt_adapter is None:
        raise ValueError(
            "PA-SAM trains a prompt adapter: build the model with VARIANTS['pa-sam'].build_model"
        )
    return model.prompt_adapter


def train_pa_sam(
    model: StableSam,
    dataset: Sequence[Sample],
    config: TrainConfig | None = None,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Train PA-SAM's prompt adapter beside the frozen SAM on ``pa_sam_loss`` (RTS prompts)."""
    adapter = prompt_adapter_of(model)
    config = config or VARIANTS["pa-sam"].train_config()
    loss_fn = functools.partial(pa_sam_loss, band_px=adapter.config.uncertain_band_px)
    params = list(adapter.parameters())
    return _fine_tune(model, params, [adapter], dataset, config, progress, ranks, loss_fn)


def save_pa(model: StableSam, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write PA-SAM's adapter (its tensors alone, and its config) atomically, bound to the
    base it was trained beside."""
    adapter = prompt_adapter_of(model)
    metadata = {
        "prompt_adapter_config": adapter.config.to_json(),
        "pa_serve": adapter.serve,
        **(metadata or {}),
    }
    header = _base_header(model, PA_FORMAT, metadata)
    return write_safetensors_atomic(adapter.state_dict(), path, header)


def load_pa(model: StableSam, path: str | Path) -> dict[str, str]:
    """Install the PA-SAM adapter of ``path`` beside ``model``'s decoder (a plain SAM of the
    file's base): exactly the adapter's tensors with their shapes, or ``ValueError``;
    ``PluginMismatchError`` for another base's file. Returns the file's metadata."""
    meta = _check_base_file(model, path, PA_FORMAT, "PA-SAM adapter")
    config = PromptAdapterConfig.from_json(meta["prompt_adapter_config"])
    width = model.sam.mask_decoder.transformer_dim
    if config.embed_dim != width:
        raise ValueError(
            f"PA-SAM adapter {Path(path).name} is {config.embed_dim} wide, the decoder {width}"
        )
    adapter = PromptAdapter(config)
    state = load_file(str(path))
    check_tensors(state, adapter.state_dict(), path, "PA-SAM adapter")
    adapter.load_state_dict(state, strict=True)
    serve = meta.get("pa_serve", "sam")
    if serve not in SERVED_OUTPUTS:
        raise ValueError(
            f"PA-SAM adapter {Path(path).name} serves {serve!r}, not one of {SERVED_OUTPUTS}"
        )
    adapter.serve = serve
    model.install_prompt_adapter(adapter.eval())
    return meta


# ----------------------------------------------------------------------------- files


def check_tensors(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], path: str | Path, what: str
) -> None:
    """Refuse (``ValueError``) a file's ``state`` unless it holds exactly ``expected``'s names,
    each with ``expected``'s shape: loading trained tensors is strict for every variant."""
    name = Path(path).name
    missing, extra, reshaped = state_mismatch(state, expected)
    if missing or extra:
        raise ValueError(f"{what} file {name}: missing {missing[:5]}, unexpected {extra[:5]}")
    if reshaped:
        key = reshaped[0]
        raise ValueError(
            f"{what} file {name}: {key} is {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
        )


def _base_header(model: StableSam, fmt: str, metadata: dict[str, Any] | None) -> dict[str, str]:
    """A trained file's header: its format, the base it binds to, version, summary, extras."""
    metadata = dict(metadata or {})
    header = {
        "format": fmt,
        "base_model_type": model.model_type,
        "base_checkpoint_sha256": model.base_checkpoint_sha256,
        "version": str(metadata.pop("version", "unversioned")),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_summary": json.dumps(metadata.pop("training_summary", {}), sort_keys=True),
    }
    header.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return header


def _check_base_file(model: StableSam, path: str | Path, fmt: str, what: str) -> dict[str, str]:
    """The header of ``path``, refused unless it is a ``fmt`` file of ``model``'s base and
    ``model`` is a plain SAM."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a {what} file")
    if (
        meta["base_model_type"] != model.model_type
        or meta["base_checkpoint_sha256"] != model.base_checkpoint_sha256
    ):
        raise PluginMismatchError(f"{what} {Path(path).name} belongs to another base")
    if model.plugins is not None:
        raise ValueError(f"load the {what} into a plain SAM (plugins=False)")
    return meta


def save_tokens(model: StableSam, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write PT-SAM's tokens atomically, tagged with their base."""
    state = {
        name: p.detach().cpu()
        for name, p in zip(PT_SAM_TOKENS, pt_sam_parameters(model), strict=True)
    }
    return write_safetensors_atomic(state, path, _base_header(model, TOKENS_FORMAT, metadata))


def load_tokens(model: StableSam, path: str | Path) -> dict[str, str]:
    """Load a PT-SAM tokens file into ``model.sam`` (exactly ``PT_SAM_TOKENS``, shapes
    checked); returns its metadata. ``PluginMismatchError`` for another base's file."""
    meta = _check_base_file(model, path, TOKENS_FORMAT, "PT-SAM tokens")
    state = load_file(str(path))
    own = dict(zip(PT_SAM_TOKENS, pt_sam_parameters(model), strict=True))
    check_tensors(state, own, path, "PT-SAM tokens")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(state[name].to(param.device, param.dtype))
    return meta


def save_decoder(
    model: StableSam, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write the (fine-tuned) mask decoder's state_dict atomically, tagged with its base."""
    header = _base_header(model, DECODER_FORMAT, metadata)
    return write_safetensors_atomic(model.sam.mask_decoder.state_dict(), path, header)


def load_decoder(model: StableSam, path: str | Path) -> dict[str, str]:
    """Load a DT-SAM decoder file into ``model.sam.mask_decoder`` (strict); returns metadata.

    Raises ``PluginMismatchError`` when the file was trained on another base.
    """
    meta = _check_base_file(model, path, DECODER_FORMAT, "DT-SAM decoder")
    state = {k: v.to(model.device) for k, v in load_file(str(path)).items()}
    model.sam.mask_decoder.load_state_dict(state, strict=True)
    return meta


__all__ = [
    "DECODER_FORMAT",
    "HQ_FORMAT",
    "PA_FORMAT",
    "PT_SAM_TOKENS",
    "TOKENS_FORMAT",
    "VARIANTS",
    "Variant",
    "boundary_band",
    "check_tensors",
    "hq_sam_modules",
    "load_decoder",
    "load_hq",
    "load_pa",
    "load_tokens",
    "pa_sam_loss",
    "prompt_adapter_of",
    "pt_sam_parameters",
    "save_decoder",
    "save_hq",
    "save_pa",
    "save_tokens",
    "train_dt_sam",
    "train_hq_sam",
    "train_pa_sam",
    "train_pt_sam",
]
