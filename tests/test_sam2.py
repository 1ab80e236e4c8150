"""SAM 2.1 bases (the ``sam2`` package): build, strict checkpoints, DSP/DRP in SAM 2's decoder
with the α = [0, 1] identity, the predictor, the embedding cache and plugin training.

Every SAM 2.1 model type is built with random weights, saved as an official checkpoint
(``{"model": state_dict}``) and reloaded from it; hiera tiny runs first and carries the checks
that do not depend on the size. The larger sizes encode a 1024 x 1024 image on the CPU (about a
minute for hiera large), once per size.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_data import two_rectangles

from runtime.models import resolve_model
from runtime.settings import Settings
from stable_sam import (
    EmbeddingCache,
    ImageEmbedding,
    PluginConfig,
    PluginMismatchError,
    StableSam2,
    StableSamPredictor,
    build_sam,
    build_stable_sam,
    file_sha256,
    load_plugins,
    read_plugin_metadata,
    save_plugins,
)
from stable_sam.sam2_base import SAM2_MODEL_TYPES, build_sam2_base, save_sam2_checkpoint
from stable_sam.transforms import low_res_to_original, scale_boxes, scale_coords
from training.data import Sample
from training.engine import TrainConfig, train_plugins

TINY = "sam2.1_hiera_tiny"
SIDE = 1024
MIB = 1024 * 1024

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(seed: int = 0) -> np.ndarray:
    """A 1024 x 1024 RGB picture: two flat shapes on noise. Square, so ``SAM2ImagePredictor``'s
    resize leaves it as it is and the two predictors see the same pixels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 80, (SIDE, SIDE, 3), dtype=np.uint8)
    image[200:600, 150:500] = (220, 40, 40)
    image[650:900, 550:950] = (40, 200, 60)
    return image


IMAGE = _image()
PROMPTS = {
    "box": dict(box_xyxy=np.array([140, 190, 510, 610])),
    "points": dict(point_coords=np.array([[300, 400], [700, 750]]), point_labels=np.array([1, 0])),
    "box+points": dict(
        box_xyxy=np.array([140, 190, 510, 610]),
        point_coords=np.array([[320, 380]]),
        point_labels=np.array([1]),
    ),
}


def _randomise_plugins(model: StableSam2, seed: int = 0) -> None:
    """Move the plugins off their identity initialisation so the checks are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.plugins.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + p)


@dataclass
class Base:
    """One SAM 2.1 size: its random-weight checkpoint, plain SAM 2 and Stable-SAM 2 on it (the
    plugins randomised, routing fixed to α), and ``IMAGE``'s embedding."""

    model_type: str
    checkpoint: Path
    vanilla: StableSamPredictor
    stable: StableSamPredictor
    embedding: ImageEmbedding


def _save_random_base(model_type: str, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_sam2_checkpoint(build_sam2_base(model_type), path)


SIZES = [TINY] + [pytest.param(t, marks=pytest.mark.slow) for t in SAM2_MODEL_TYPES[1:]]


@pytest.fixture(scope="module", params=SIZES)
def base(request, tmp_path_factory) -> Base:
    model_type = request.param
    path = _save_random_base(model_type, tmp_path_factory.mktemp("sam2") / f"{model_type}.pt")
    vanilla = build_stable_sam(model_type, path, plugins=False, device="cpu")
    stable = build_stable_sam(
        model_type, path, plugin_config=PluginConfig(fixed_alpha=(0.0, 1.0)), device="cpu"
    )
    _randomise_plugins(stable)
    plain = StableSamPredictor(vanilla)
    return Base(model_type, path, plain, StableSamPredictor(stable), plain.embed(IMAGE))


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return _save_random_base(TINY, tmp_path_factory.mktemp("sam2-tiny") / "tiny.pt")


# --- building and checkpoints ----------------------------------------------------------------


def test_a_saved_base_reloads_strictly_to_the_same_weights_and_binds_by_hash(base: Base):
    model = base.vanilla.model
    assert isinstance(model, StableSam2) and model.model_type == base.model_type
    assert model.base_checkpoint_sha256 == file_sha256(base.checkpoint)
    saved = torch.load(base.checkpoint, map_location="cpu", weights_only=True)
    assert set(saved) == {"model"}  # the official layout
    state = model.sam.state_dict()
    assert set(state) == set(saved["model"])
    assert all(torch.equal(state[k], v) for k, v in saved["model"].items())


def test_plugins_leave_sam2s_state_dict_keys_as_they_are(base: Base):
    keys = set(base.vanilla.model.sam.state_dict())
    assert set(base.stable.model.sam.state_dict()) == keys
    assert all(k.startswith(("dsp.", "drp.")) for k in base.stable.model.plugins.state_dict())
    n = sum(p.numel() for p in base.stable.model.trainable_parameters())
    assert n == 81_829  # the same plugins as on SAM: SAM 2's decoder is 256 wide too


def test_every_sam2_type_is_a_model_type_the_settings_accept():
    for model_type in SAM2_MODEL_TYPES:
        assert Settings(sam_model_type=model_type).sam_model_type == model_type
    assert SAM2_MODEL_TYPES == (
        "sam2.1_hiera_tiny",
        "sam2.1_hiera_small",
        "sam2.1_hiera_base_plus",
        "sam2.1_hiera_large",
    )


def test_a_checkpoint_with_a_renamed_key_is_refused_naming_the_keys(tiny_file, tmp_path):
    state = torch.load(tiny_file, map_location="cpu", weights_only=True)["model"]
    state["no_mem_embed_renamed"] = state.pop("no_mem_embed")
    bad = tmp_path / "renamed.pt"
    torch.save({"model": state}, bad)
    with pytest.raises(ValueError, match=r"renamed\.pt.*no_mem_embed.*no_mem_embed_renamed"):
        build_sam(TINY, bad)


def test_a_checkpoint_of_another_size_is_refused(tmp_path):
    small = _save_random_base("sam2.1_hiera_small", tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"small\.pt is not a checkpoint of this SAM 2 model"):
        build_sam(TINY, small)


def test_a_checkpoint_is_read_without_running_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": Evil()}}, f)
    with pytest.raises(pickle.UnpicklingError):
        build_sam(TINY, path)


def test_a_plugin_file_binds_to_its_sam2_base_by_hash(base: Base, tiny_file, tmp_path):
    if base.model_type != TINY:
        pytest.skip("the binding does not depend on the size")
    path = save_plugins(base.stable.model, tmp_path / "plugins.safetensors")
    meta = read_plugin_metadata(path)
    assert meta["base_model_type"] == TINY
    assert meta["base_checkpoint_sha256"] == file_sha256(base.checkpoint)
    same = build_stable_sam(TINY, base.checkpoint, plugin_checkpoint=path, device="cpu")
    own = base.stable.model.plugins.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in same.plugins.state_dict().items())
    other = build_stable_sam(TINY, _save_random_base(TINY, tmp_path / "other.pt", seed=1))
    with pytest.raises(PluginMismatchError, match="base checkpoint"):
        load_plugins(other, path)
    with pytest.raises(PluginMismatchError, match=r"sam2\.1_hiera_tiny"):
        load_plugins(build_stable_sam("mini", device="cpu"), path)


# --- DSP and DRP in SAM 2's decoder ----------------------------------------------------------


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_routing_fixed_to_zero_one_is_plain_sam2_bit_for_bit(base: Base, prompt, multimask):
    a = base.vanilla.predict(
        embedding=base.embedding, multimask_output=multimask, **PROMPTS[prompt]
    )
    a_objects = base.vanilla.model.last_object_score_logits
    b = base.stable.predict(embedding=base.embedding, multimask_output=multimask, **PROMPTS[prompt])
    assert np.array_equal(a.low_res_logits, b.low_res_logits)
    assert np.array_equal(a.scores, b.scores)
    assert torch.equal(a_objects, base.stable.model.last_object_score_logits)
    assert np.array_equal(a.masks, b.masks)
    assert b.alpha is not None and np.array_equal(b.alpha, [0.0, 1.0])


def test_routing_to_the_resampled_features_changes_sam2s_masks(base: Base):
    if base.model_type != TINY:
        pytest.skip("one size shows the identity test is not vacuous")
    model = base.stable.model
    deformed = PluginConfig(fixed_alpha=(1.0, 0.0))
    plugins = copy.deepcopy(model.plugins)
    plugins.config = deformed
    a = base.vanilla.predict(embedding=base.embedding, **PROMPTS["box"])
    b = base.stable.predict(embedding=base.embedding, plugins=plugins, **PROMPTS["box"])
    assert np.abs(a.low_res_logits - b.low_res_logits).max() > 1e-3


def test_drp_routes_on_the_mask_token_behind_the_object_score_and_iou_tokens(base: Base):
    if base.model_type != TINY:
        pytest.skip("the token layout does not depend on the size")
    model = build_stable_sam(TINY, base.checkpoint, device="cpu")
    _randomise_plugins(model)
    block = model.mask_decoder.transformer.layers[1]
    seen: dict[str, torch.Tensor] = {}
    model.plugins.drp.register_forward_pre_hook(lambda m, args: seen.update(t_o=args[0]))
    block.norm1.register_forward_hook(lambda m, args, out: seen.update(tokens=out))
    StableSamPredictor(model).predict(embedding=base.embedding, **PROMPTS["box"])
    # SAM 2's output tokens: [obj_score, iou, mask_0, mask_1, mask_2, mask_3] + prompts.
    assert model.mask_decoder.pred_obj_scores
    assert seen["tokens"].shape[1] == 6 + 3  # a box: two corners and SAM 2's padding point
    assert torch.equal(seen["t_o"], seen["tokens"][:, 2])


def test_plain_sam2_serves_what_sam2s_own_image_predictor_does(base: Base):
    if base.model_type != TINY:
        pytest.skip("one size pins the image path")
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    theirs = SAM2ImagePredictor(base.vanilla.model.sam)
    theirs.set_image(IMAGE)
    embedding = base.embedding
    assert torch.allclose(theirs._features["image_embed"], embedding.embeddings, atol=1e-4)
    for ref, ours in zip(
        theirs._features["high_res_feats"], embedding.high_res_features, strict=True
    ):
        assert torch.allclose(ref, ours, atol=1e-4)
    for prompt in PROMPTS.values():
        kw = dict(prompt)
        masks, scores, low_res = theirs.predict(
            point_coords=kw.get("point_coords"),
            point_labels=kw.get("point_labels"),
            box=kw.get("box_xyxy"),
            multimask_output=False,
        )
        ours = base.vanilla.predict(embedding=embedding, multimask_output=False, **kw)
        assert np.allclose(np.clip(ours.low_res_logits, -32, 32), low_res, atol=1e-3)
        assert np.allclose(ours.scores, scores, atol=1e-4)
        assert np.mean(ours.masks != masks) < 1e-3


# --- the predictor and the cache -------------------------------------------------------------


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_the_predictor_answers_a_box_points_and_both(base: Base, prompt):
    image = IMAGE[:600]  # not square: SAM 2 stretches it to 1024 x 1024
    out = base.stable.predict(image, **PROMPTS[prompt])
    assert out.masks.shape == (1, 600, SIDE) and out.masks.dtype == bool
    assert out.low_res_logits.shape == (1, SIDE // 4, SIDE // 4)
    assert out.scores.shape == (1,) and np.isfinite(out.scores).all()
    three = base.stable.predict(image, multimask_output=True, **PROMPTS[prompt])
    assert three.masks.shape == (3, 600, SIDE)
    assert base.stable.embed(image).input_size == (SIDE, SIDE)  # stretched, not padded


def test_the_predictor_puts_prompts_where_sam2s_transforms_put_them(base: Base):
    from sam2.utils.transforms import SAM2Transforms

    if base.model_type != TINY:
        pytest.skip("the frame does not depend on the size")
    hw = (480, 640)
    fake = ImageEmbedding("x", base.embedding.embeddings, None, hw, (SIDE, SIDE))
    box = np.array([[10.0, 20.0, 300.0, 400.0]], np.float32)
    points = np.array([[[5.0, 7.0], [600.0, 470.0]]], np.float32)
    (coords, _), boxes, _ = base.vanilla.prompt_tensors(fake, box, points, np.ones((1, 2)), None)
    transforms = SAM2Transforms(resolution=SIDE, mask_threshold=0.0)
    theirs_box = transforms.transform_boxes(torch.tensor(box), normalize=True, orig_hw=hw)
    theirs_pts = transforms.transform_coords(torch.tensor(points), normalize=True, orig_hw=hw)
    assert torch.allclose(boxes, theirs_box.reshape(1, 4))
    assert torch.allclose(coords, theirs_pts)


def test_the_square_frame_maps_prompts_and_masks_as_sam2_does():
    from sam2.utils.transforms import SAM2Transforms

    transforms = SAM2Transforms(resolution=SIDE, mask_threshold=0.0)
    hw = (480, 640)
    box = np.array([[10.0, 20.0, 300.0, 400.0]], np.float32)
    points = np.array([[[5.0, 7.0], [600.0, 470.0]]], np.float32)
    theirs_box = transforms.transform_boxes(torch.tensor(box), normalize=True, orig_hw=hw)
    theirs_pts = transforms.transform_coords(torch.tensor(points), normalize=True, orig_hw=hw)
    assert np.allclose(scale_boxes(box, hw, SIDE, square=True), theirs_box.reshape(1, 4))
    assert np.allclose(scale_coords(points, hw, SIDE, square=True), theirs_pts)
    # Smooth logits: cv2's warp interpolates at 1/32 pixel steps, torch exactly.
    yy, xx = np.mgrid[: SIDE // 4, : SIDE // 4].astype(np.float32)
    logits = np.sin(xx / 7.0) * np.cos(yy / 5.0) + (xx - yy) / 256
    up = torch.nn.functional.interpolate(
        torch.tensor(logits)[None, None], hw, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    assert np.abs(low_res_to_original(logits, hw, SIDE, square=True) - up).max() < 0.01


def test_the_cache_holds_the_embedding_and_both_high_res_maps_at_their_real_size(base: Base):
    embedding = base.embedding
    s0, s1 = embedding.high_res_features
    assert embedding.embeddings.shape == (1, 256, 64, 64)
    assert s0.shape == (1, 32, 256, 256) and s1.shape == (1, 64, 128, 128)
    assert embedding.nbytes == (256 * 64 * 64 + 32 * 256 * 256 + 64 * 128 * 128) * 4 == 16 * MIB
    cache = EmbeddingCache(max_bytes=16 * MIB + 1)
    cache.put(embedding)
    assert cache.nbytes == 16 * MIB
    other = ImageEmbedding(
        "other",
        embedding.embeddings,
        None,
        (SIDE, SIDE),
        (SIDE, SIDE),
        high_res_features=(s0.clone(), s1),
    )
    cache.put(other)  # two no longer fit under the cap: the older one goes
    assert "other" in cache and embedding.key not in cache and cache.nbytes == 16 * MIB


def test_the_cache_key_names_the_encoder_and_the_plugins_share_it(base: Base):
    model = base.vanilla.model
    key = base.vanilla.embedding_key(IMAGE)
    assert key.startswith(f"{base.model_type}:{model.base_checkpoint_sha256}/")
    assert base.stable.embedding_key(IMAGE) == key  # the plugins do not change the encoder


# --- training --------------------------------------------------------------------------------


def _dataset(n: int = 1, side: int = 96) -> list[Sample]:
    return two_rectangles(n, side)


def test_training_moves_only_the_plugins_on_a_frozen_sam2(base: Base):
    model = build_stable_sam(base.model_type, base.checkpoint, device="cpu")
    frozen = {k: v.clone() for k, v in model.sam.state_dict().items()}
    before = {k: v.clone() for k, v in model.plugins.state_dict().items()}
    config = TrainConfig(max_steps=1, batch_prompts=2, prompts_per_image=2, device="cpu")
    result = train_plugins(model, _dataset(), config)
    assert result.steps == 1 and np.isfinite(result.final_loss)
    after = model.plugins.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(frozen[k], v) for k, v in model.sam.state_dict().items())
    assert all(p.grad is None for p in model.sam.parameters())


def test_the_train_cli_writes_sam2_plugins_that_reload_on_their_base(tiny_file, tmp_path):
    from training.train import main

    out = tmp_path / "plugins.safetensors"
    argv = ["--base", str(tiny_file), "--model-type", TINY, "--n", "1", "--max-steps", "1"]
    argv += ["--batch-prompts", "2", "--prompts-per-image", "2", "--device", "cpu"]
    main([*argv, "--out", str(out), "--no-progress"])
    assert read_plugin_metadata(out)["base_model_type"] == TINY
    model = build_stable_sam(TINY, tiny_file, plugin_checkpoint=out, device="cpu")
    assert isinstance(model, StableSam2)


def test_the_training_job_builds_the_sam2_base_the_settings_name(tiny_file):
    # The RQ job (training.jobs.run_training) and the backend build through resolve_model.
    spec = resolve_model(Settings(sam_model_type=TINY, sam_checkpoint=tiny_file))
    assert spec.version == f"stable-sam-{TINY}-tiny-untrained"
    model = spec.build()
    assert isinstance(model, StableSam2) and model.plugins is not None
    assert model.base_checkpoint_sha256 == file_sha256(tiny_file)
