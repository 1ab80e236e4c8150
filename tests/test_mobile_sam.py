"""MobileSAM (``vit_t``) as a base: TinyViT with SAM's decoder, the official layout, the plugins.

Random weights throughout: ``mobile_sam.pt`` cannot be downloaded here, so its layout is pinned by
the classes that define it (``segment_anything_hq``'s TinyViT, ``segment_anything``'s prompt
encoder and mask decoder) and by a random file saved the way the official one is (a plain
state_dict) and loaded strictly.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from identity_inputs import IMAGE, PROMPTS

from stable_sam import (
    EmbeddingCache,
    PluginConfig,
    StableSam,
    StableSamPredictor,
    build_sam,
    build_stable_sam,
    load_plugins,
    read_plugin_metadata,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Move every float tensor (weights, TinyViT's attention biases, BatchNorm statistics) off
    its initial value, so that a tensor that fails to load shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                noise = torch.rand(t.shape, generator=g) if "running_var" in name else None
                t.add_(noise if noise is not None else torch.randn(t.shape, generator=g) * 0.02)
    module.eval()  # TinyViT's attention caches its biases in eval mode: after they changed


@pytest.fixture(scope="module")
def official_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight vit_t saved as MobileSAM ships ``mobile_sam.pt``: a plain state_dict."""
    torch.manual_seed(0)
    sam = build_sam("vit_t")
    _randomise(sam, seed=1)
    path = tmp_path_factory.mktemp("mobile") / "mobile_sam.pt"
    torch.save(sam.state_dict(), path)
    return path


def test_vit_t_is_tiny_vit_with_sams_own_prompt_encoder_and_mask_decoder():
    from segment_anything import modeling as sam_classes
    from segment_anything_hq.modeling.tiny_vit_sam import TinyViT

    sam = build_sam("vit_t")
    assert isinstance(sam.image_encoder, TinyViT)
    assert type(sam.prompt_encoder) is sam_classes.PromptEncoder
    assert type(sam.mask_decoder) is sam_classes.MaskDecoder  # plain SAM's, not HQ-SAM's
    assert sam.image_encoder.img_size == 1024
    assert sam.prompt_encoder.image_embedding_size == (64, 64)
    embedding = sam.image_encoder(torch.zeros(1, 3, 1024, 1024))
    assert embedding.shape == (1, 256, 64, 64)  # the embedding alone, as SAM's decoder takes it


def test_the_state_dict_is_mobile_sams_layout_key_for_key():
    """Encoder keys and shapes as MobileSAM's configuration of TinyViT (segment_anything_hq's
    ``build_sam_vit_t``) has them; prompt encoder and decoder as official SAM's."""
    from segment_anything import sam_model_registry
    from segment_anything_hq import sam_model_registry as hq_registry

    ours = {k: v.shape for k, v in build_sam("vit_t").state_dict().items()}
    tiny = hq_registry["vit_tiny"]().state_dict()
    sam_b = sam_model_registry["vit_b"]().state_dict()
    expected = {k: v.shape for k, v in tiny.items() if k.startswith("image_encoder.")}
    expected |= {k: v.shape for k, v in sam_b.items() if not k.startswith("image_encoder.")}
    assert ours == expected
    # 302 encoder tensors, the ImageNet head and BatchNorm counters included, as the official
    # file lists them.
    assert sum(k.startswith("image_encoder.") for k in ours) == 302
    assert "image_encoder.head.weight" in ours
    assert "image_encoder.layers.1.blocks.0.attn.attention_biases" in ours
    assert "image_encoder.patch_embed.seq.0.bn.num_batches_tracked" in ours


def test_an_official_layout_file_reloads_strictly_and_encodes_identically(official_file):
    torch.manual_seed(0)
    saved = build_sam("vit_t")
    _randomise(saved, seed=1)  # the very weights of ``official_file``
    loaded = build_sam("vit_t", official_file)
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.image_encoder(x), saved.image_encoder(x))


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_file_with_a_missing_or_stray_key_is_refused_naming_the_file_and_key(
    official_file, tmp_path, change
):
    state = torch.load(official_file, weights_only=True)
    if change == "missing":
        del state["image_encoder.neck.3.bias"]
    else:
        state["image_encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    key = "image_encoder.neck.3.bias" if change == "missing" else "image_encoder.extra.weight"
    with pytest.raises(RuntimeError, match=rf"broken\.pt is not a vit_t checkpoint.*{key}"):
        build_sam("vit_t", path)


def test_a_checkpoint_of_another_base_is_refused(tmp_path):
    path = tmp_path / "sam_mini.pth"
    torch.save(build_sam("mini").state_dict(), path)
    with pytest.raises(RuntimeError, match=r"sam_mini\.pth is not a vit_t checkpoint"):
        build_sam("vit_t", path)


def test_hq_sam_is_refused_on_the_plain_decoder_base():
    with pytest.raises(ValueError, match="add_hq is not supported on 'vit_t'"):
        build_sam("vit_t", add_hq=True)
    with pytest.raises(ValueError, match="unknown SAM model type 'hq_vit_t'"):
        build_sam("hq_vit_t")


# --- the plugins, which live in the decoder, on the TinyViT base --------------------------------


@pytest.fixture(scope="module")
def pair() -> tuple[StableSamPredictor, StableSamPredictor]:
    """Plain vit_t and Stable-SAM on the same weights with routing fixed to α = (0, 1) and the
    DSP moved off its initialisation; one embedding cache (the same encoder) for both."""
    torch.manual_seed(0)
    sam = build_sam("vit_t")
    vanilla = StableSam(copy.deepcopy(sam), "vit_t", "x", None)
    stable = StableSam(sam, "vit_t", "x", PluginConfig(fixed_alpha=(0.0, 1.0)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in stable.plugins.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    cache = EmbeddingCache()
    return StableSamPredictor(vanilla, cache), StableSamPredictor(stable, cache)


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_routing_fixed_to_zero_one_is_bit_equal_to_plain_vit_t(pair, prompt, multimask):
    vanilla, stable = pair
    a = vanilla.predict(IMAGE, multimask_output=multimask, **PROMPTS[prompt])
    b = stable.predict(IMAGE, multimask_output=multimask, **PROMPTS[prompt])
    assert np.array_equal(a.low_res_logits, b.low_res_logits)
    assert np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.masks, b.masks)


def test_the_resampled_features_change_the_masks_when_routed_in(pair):
    vanilla, stable = pair
    stable.model.plugins.config.fixed_alpha = (1.0, 0.0)
    try:
        a = vanilla.predict(IMAGE, **PROMPTS["box"])
        b = stable.predict(IMAGE, **PROMPTS["box"])
    finally:
        stable.model.plugins.config.fixed_alpha = (0.0, 1.0)
    assert np.abs(a.low_res_logits - b.low_res_logits).max() > 1e-3


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_the_predictor_answers_each_prompt_at_the_original_size(pair, prompt):
    _, stable = pair
    out = stable.predict(IMAGE, multimask_output=False, **PROMPTS[prompt])
    assert out.masks.shape == (1, 180, 240) and out.masks.dtype == bool
    assert out.low_res_logits.shape == (1, 256, 256)  # 4 x the 64 x 64 embedding
    assert out.scores.shape == (1,) and out.alpha.shape == (2,)
    assert stable.model._block.feature_hw == (64, 64)


# --- training on the TinyViT base ------------------------------------------------------------


@pytest.mark.slow
def test_the_train_cli_trains_plugins_on_vit_t_that_reload_onto_it(official_file, tmp_path):
    from training.train import main as train_main

    out = tmp_path / "plugins.safetensors"
    argv = ["--base", str(official_file), "--model-type", "vit_t", "--n", "1"]
    argv += ["--batch-prompts", "2", "--prompts-per-image", "2", "--max-steps", "1"]
    result = train_main([*argv, "--out", str(out), "--device", "cpu", "--no-progress"])
    assert result.steps == 1 and np.isfinite(result.final_loss)
    meta = read_plugin_metadata(out)
    assert meta["base_model_type"] == "vit_t"

    model = build_stable_sam("vit_t", official_file, device="cpu")
    fresh = copy.deepcopy(model.plugins.state_dict())
    load_plugins(model, out)
    moved = [k for k, v in model.plugins.state_dict().items() if not torch.equal(v, fresh[k])]
    assert moved, "one Adam step moved no plugin parameter"


@pytest.mark.slow
def test_the_training_job_trains_and_versions_plugins_for_a_vit_t_base(official_file, tmp_path):
    """The RQ job's body (``run_training``), on the base the settings name: vit_t."""
    from bench.label_studio_api import LEGACY_TOKEN, LabelStudioAPI
    from labelstudio.auth import LabelStudioAuth
    from labelstudio.client import LabelStudioClient
    from runtime.settings import Settings
    from runtime.versions import LocalVersionStore
    from training.jobs import JobProgress, run_training

    settings = Settings(
        sam_model_type="vit_t",
        sam_checkpoint=official_file,
        versions_dir=tmp_path / "versions",
        device="cpu",
        train_promote_tolerance=100.0,  # this test checks the plumbing, not the promotion rule
    )
    store = LocalVersionStore(settings.versions_dir)
    with (
        LabelStudioAPI(project_id=7, n_tasks=3, size=64) as api,
        LabelStudioClient(LabelStudioAuth(api.url, LEGACY_TOKEN)) as client,
    ):
        report = run_training("7", settings, client, store, JobProgress(None))
    assert report["promoted"], report
    version = store.current("7")
    meta = read_plugin_metadata(store.plugin_file(version))
    assert meta["base_model_type"] == "vit_t"
    load_plugins(build_stable_sam("vit_t", official_file, device="cpu"), store.plugin_file(version))
