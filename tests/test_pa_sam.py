"""PA-SAM on our own base (Xie et al., ICME 2024): its prompt adapter beside decoder layer 2 of a
frozen plain SAM, equal to SAM until trained, trained alone on its loss, saved alone, reloaded
strictly, and selectable as a benchmark row and a user-study model."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_data import two_rectangles

from stable_sam import (
    EmbeddingCache,
    PluginMismatchError,
    PromptAdapterConfig,
    StableSamPredictor,
    build_stable_sam,
)
from stable_sam.modeling import PromptAdapter, gumbel_top_k, image_detail
from training import rts
from training.baselines import (
    PA_FORMAT,
    VARIANTS,
    boundary_band,
    load_pa,
    pa_sam_loss,
    save_pa,
    train_pa_sam,
)
from training.data import Sample
from training.distributed import AdapterMasks, DecodeStep
from training.engine import bce_dice_loss, bce_loss, step_loss, upsample_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOX = np.array([4.0, 6, 40, 44])
CLICK = dict(point_coords=np.array([[20.0, 24]]), point_labels=np.array([1]))


def _tiny_dataset(n: int = 2, side: int = 96) -> list[Sample]:
    return two_rectangles(n, side)


@pytest.fixture(scope="module")
def base_file(random_mini_base):
    return random_mini_base


def _pa(base_file, seed: int = 0):
    return VARIANTS["pa-sam"].build_model("mini", base_file, "cpu", seed=seed)


def _config(steps: int):
    return VARIANTS["pa-sam"].train_config(
        batch_prompts=8, prompts_per_image=4, max_steps=steps, epochs=steps, device="cpu"
    )


@pytest.fixture(scope="module")
def trained(base_file):
    """A PA-SAM trained three steps (every adapter tensor moves: the zero-initialised maps on
    the first step, what feeds them on the next) and its SAM's weights before training."""
    model = _pa(base_file)
    sam_before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in model.prompt_adapter.state_dict().items()}
    result = train_pa_sam(model, _tiny_dataset(), _config(3))
    return model, result, sam_before, adapter_before


def _image(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- the model


def test_an_untrained_adapter_leaves_sams_output_bit_for_bit(base_file):
    sam = StableSamPredictor(build_stable_sam("mini", base_file, plugins=False, device="cpu"))
    model = _pa(base_file)
    pa = StableSamPredictor(model)
    image = _image()
    for train_mode in (False, True):  # with the Gumbel noise on too
        model.prompt_adapter.train(train_mode)
        for prompt in (dict(box_xyxy=BOX), CLICK):
            for multimask in (False, True):
                a = sam.predict(image, multimask_output=multimask, **prompt)
                b = pa.predict(image, multimask_output=multimask, **prompt)
                assert np.array_equal(a.low_res_logits, b.low_res_logits)
                assert np.array_equal(a.scores, b.scores)


def test_the_adapter_is_the_only_new_parameters_and_has_its_size(base_file):
    model = _pa(base_file)
    plain = build_stable_sam("mini", base_file, plugins=False, device="cpu")
    assert model.sam.state_dict().keys() == plain.sam.state_dict().keys()
    assert sum(p.numel() for p in model.prompt_adapter.parameters()) == 1_454_464
    assert not any(p.requires_grad for p in model.sam.parameters())
    with pytest.raises(ValueError, match="plain SAM"):
        build_stable_sam("mini", base_file, plugins=True, device="cpu").install_prompt_adapter(
            PromptAdapter()
        )


def test_the_detail_tensor_is_fp16_at_a_quarter_and_the_cache_counts_it(base_file):
    model = _pa(base_file)
    sam = build_stable_sam("mini", base_file, plugins=False, device="cpu")
    cache = EmbeddingCache()
    image = _image()
    emb = StableSamPredictor(model, cache=cache).embed(image)
    side = model.image_size // 4
    assert emb.detail.shape == (1, 4, side, side) and emb.detail.dtype == torch.float16
    assert emb.nbytes == emb.embeddings.nbytes + emb.detail.nbytes
    assert emb.detail.nbytes * 8 == emb.embeddings.nbytes  # +1/8 of the cache's bytes
    assert cache.nbytes == emb.nbytes
    # Plain SAM's entry for the same image has no detail: the two are kept apart.
    plain = StableSamPredictor(sam, cache=cache).embed(image)
    assert plain.detail is None and len(cache) == 2
    assert model.encoder_id == f"{sam.encoder_id}+pa-detail"


def test_the_detail_tensor_is_the_image_and_its_sobel_gradient_at_a_quarter():
    images = torch.zeros(1, 3, 32, 32)
    images[..., 16:] = 2.0  # a vertical edge between columns 15 and 16
    detail = image_detail(images).float()
    assert detail.shape == (1, 4, 8, 8)
    torch.testing.assert_close(detail[:, :3, :, 4:], torch.full((1, 3, 8, 4), 2.0))
    torch.testing.assert_close(detail[:, :3, :, :4], torch.zeros(1, 3, 8, 4))
    gradient = detail[0, 3, 2:6]  # rows away from the image's top and bottom
    assert (gradient[:, 3:5] > 0).all()  # the cells either side of the edge
    assert (gradient[:, [1, 2, 5, 6]] == 0).all()  # flat regions


def test_gumbel_top_k_picks_k_distinct_one_hots_with_gradients():
    phi = torch.randn(3, 40, requires_grad=True)
    noise = -torch.log(-torch.log(torch.rand(3, 40)))
    picks = gumbel_top_k(phi, 4, 1.0, noise)
    assert picks.shape == (3, 4, 40)
    hard = picks.detach()
    assert set(hard.unique().tolist()) == {0.0, 1.0} and (hard.sum(-1) == 1).all()
    assert (hard.sum(1) <= 1).all()  # four distinct cells per row
    (picks * torch.randn(3, 4, 40)).sum().backward()
    assert phi.grad is not None and phi.grad.abs().sum() > 0
    # Without noise (serving) they are φ's top four, in order.
    picks = gumbel_top_k(phi.detach(), 4, 1.0)
    assert torch.equal(picks.argmax(-1), phi.detach().topk(4).indices)


def test_the_adapter_mines_four_positive_and_four_negative_points(base_file):
    adapter = PromptAdapter(PromptAdapterConfig())
    adapter.train()
    b, n, hw, c = 2, 7, 16 * 16, 256
    out = adapter.adapt(
        torch.randn(b, n, c),
        torch.randn(b, hw, c),
        torch.randn(b, n, c),
        torch.randn(b, hw, c),
        torch.randn(1, 4, 64, 64).half(),
        num_mask_tokens=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.points.shape == (b, 8, hw)
    cells = out.points.argmax(-1)
    for row in cells:
        assert len(set(row[:4].tolist())) == 4 and len(set(row[4:].tolist())) == 4
    assert out.token_delta.shape == (b, n, c) and out.key_delta.shape == (b, hw, c)
    assert out.refine_tokens.shape == out.uncertain_tokens.shape == (b, 4, c)


# ----------------------------------------------------------------------------- training


def test_training_moves_the_adapter_alone_and_no_gradient_reaches_sam(trained):
    model, result, sam_before, adapter_before = trained
    assert result.steps == 3
    assert all(torch.equal(v, sam_before[k]) for k, v in model.sam.state_dict().items())
    for name, p in model.sam.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    after = model.prompt_adapter.state_dict()
    unchanged = [k for k, v in after.items() if torch.equal(v, adapter_before[k])]
    assert unchanged == []
    assert not model.prompt_adapter.training  # back to serving


def test_the_uncertain_band_is_the_pixels_near_the_boundary():
    masks = torch.zeros(1, 20, 20)
    masks[0, 5:15, 5:15] = 1  # a square on rows / columns 5..14
    band = boundary_band(masks, 2)
    expected = torch.zeros(20, 20)
    expected[3:17, 3:17] = 1  # within 2 px of the square's edge, inside or out
    expected[7:13, 7:13] = 0  # the interior beyond 2 px
    assert torch.equal(band[0], expected)
    edge = torch.zeros(1, 10, 10)
    edge[0, :, :4] = 1  # columns 0..3, along the image's edge, which is no boundary
    expected = torch.zeros(10, 10)
    expected[:, 3:5] = 1  # one pixel either side of the column 3 | 4 boundary, every row
    assert torch.equal(boundary_band(edge, 1)[0], expected)


def test_pa_sams_loss_is_its_three_terms():
    torch.manual_seed(0)
    logits, sam_logits, u_logits = (torch.randn(2, 1, 8, 8) for _ in range(3))
    targets = torch.zeros(2, 32, 32)
    targets[:, 8:24, 8:24] = 1
    loss = pa_sam_loss((logits, AdapterMasks(sam_logits, u_logits)), targets, band_px=2)
    band = boundary_band(targets, 2)
    uncertain = bce_loss(upsample_logits(u_logits, (32, 32))[:, 0], band).mean()
    expected = bce_dice_loss(logits, targets) + bce_dice_loss(sam_logits, targets) + uncertain
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="adapter"):
        pa_sam_loss((logits, None), targets)


def test_a_seeded_training_step_is_reproducible_and_the_seed_drives_the_noise(base_file):
    """What makes a DDP run exact: the Gumbel draws of an image come from its own seed."""
    model = _pa(base_file)
    with torch.no_grad():  # non-zero maps, so the mined points reach the output
        for p in model.prompt_adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.prompt_adapter.train()
    aug = rts.augment(
        _tiny_dataset(1)[0], None, model.image_size, np.random.default_rng(0), rts.RTSConfig()
    )
    prompts = rts.sample_prompts(aug, 4, np.random.default_rng(1), rts.RTSConfig())
    step = DecodeStep(model, [model.prompt_adapter])

    def loss(seed: int) -> float:
        with torch.no_grad():
            return step_loss(model, [aug], [prompts], 0.25, False, step, pa_sam_loss, [seed])[0]

    assert loss(5) == loss(5)
    assert loss(5) != loss(6)


def test_pa_sams_recipe_is_stable_sams_at_the_papers_learning_rate():
    recipe = VARIANTS["pa-sam"].train_config()
    assert (recipe.epochs, recipe.lr) == (1, 1e-3)
    assert recipe.images_per_step == 4  # the paper's batch of 4 images
    assert recipe.rts == VARIANTS["stable"].train_config().rts
    assert VARIANTS["pa-sam"].file_kind == "pa"


def test_the_train_cli_writes_an_adapter_file_that_reloads(base_file, tmp_path):
    from training.train import main

    out = tmp_path / "pa.safetensors"
    argv = ["--base", str(base_file), "--n", "2", "--out", str(out), "--variant", "pa-sam"]
    result = main([*argv, "--max-steps", "1", "--no-progress"])
    assert result.steps == 1 and np.isfinite(result.final_loss)
    VARIANTS["pa-sam"].load(_pa(base_file, seed=5), out)


# ----------------------------------------------------------------------------- files


def test_a_saved_adapter_holds_its_tensors_alone_and_reloads_to_the_same_masks(
    trained, base_file, tmp_path
):
    model, result, _, _ = trained
    path = save_pa(model, tmp_path / "pa.safetensors", {"training_summary": result.summary})
    assert set(load_file(str(path))) == set(model.prompt_adapter.state_dict())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == PA_FORMAT and meta["base_model_type"] == "mini"
    assert meta["base_checkpoint_sha256"] == model.base_checkpoint_sha256
    assert PromptAdapterConfig.from_json(meta["prompt_adapter_config"]) == PromptAdapterConfig()
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temp file left

    fresh = _pa(base_file, seed=7)
    VARIANTS["pa-sam"].load(fresh, path)
    image = _image(2)
    for prompt in (dict(box_xyxy=BOX), CLICK):
        a = StableSamPredictor(model).predict(image, multimask_output=False, **prompt)
        b = StableSamPredictor(fresh).predict(image, multimask_output=False, **prompt)
        assert np.array_equal(a.low_res_logits, b.low_res_logits)
    sam = StableSamPredictor(build_stable_sam("mini", base_file, plugins=False, device="cpu"))
    trained_out = StableSamPredictor(fresh).predict(image, box_xyxy=BOX, multimask_output=False)
    assert not np.array_equal(
        trained_out.low_res_logits,
        sam.predict(image, box_xyxy=BOX, multimask_output=False).low_res_logits,
    )


def test_the_served_output_is_m_sam_or_the_blend_as_the_file_says(trained, base_file, tmp_path):
    model, _, _, _ = trained
    emb = StableSamPredictor(model).embed(_image(3))
    sparse, dense = model.encode_prompts(None, torch.tensor([[10.0, 10, 120, 120]]), None)
    out = model.decode_prompt_adapter(emb.embeddings, sparse, dense, False, emb.detail)
    assert not torch.equal(out.masks, out.sam_masks)  # trained: the blend differs from M_SAM
    served = {}
    for serve in ("sam", "blend"):
        model.prompt_adapter.serve = serve
        served[serve] = model.decode(emb.embeddings, sparse, dense, False, detail=emb.detail)[0]
        path = save_pa(model, tmp_path / f"{serve}.safetensors")
        fresh = _pa(base_file, seed=9)
        VARIANTS["pa-sam"].load(fresh, path)
        assert fresh.prompt_adapter.serve == serve
    model.prompt_adapter.serve = "sam"
    assert torch.equal(served["sam"], out.sam_masks)  # the paper's inference output
    assert torch.equal(served["blend"], out.masks)
    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        header = {**f.metadata(), "pa_serve": "coarse"}
    save_file(state, str(tmp_path / "odd.safetensors"), metadata=header)
    with pytest.raises(ValueError, match="serves 'coarse'"):
        VARIANTS["pa-sam"].load(_pa(base_file), tmp_path / "odd.safetensors")


def test_loading_is_strict_and_bound_to_the_base(trained, base_file, tmp_path):
    model, _, _, _ = trained
    path = save_pa(model, tmp_path / "pa.safetensors")
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    fresh = _pa(base_file)
    own = fresh.prompt_adapter

    def refused(name: str, state: dict, match: str, error=ValueError) -> None:
        save_file(state, str(tmp_path / name), header)
        with pytest.raises(error, match=match):
            load_pa(fresh, tmp_path / name)

    state = load_file(str(path))
    del state["token_out.weight"]
    refused("missing.safetensors", state, r"missing \['token_out.weight'\]")
    state = load_file(str(path))
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)  # a SAM key: not the adapter's
    refused("extra.safetensors", state, r"unexpected \['mask_decoder.iou_token.weight'\]")
    state = load_file(str(path))
    state["token_out.weight"] = torch.zeros(256, 128)
    refused("shape.safetensors", state, r"token_out.weight is \(256, 128\), expected \(256, 256\)")
    assert fresh.prompt_adapter is own  # a refused file leaves the adapter in place
    other_base = load_file(str(base_file))
    other_base["mask_decoder.iou_token.weight"] += 1  # another base: another hash
    save_file(other_base, str(tmp_path / "other.safetensors"))
    with pytest.raises(PluginMismatchError, match="another base"):
        load_pa(_pa(tmp_path / "other.safetensors"), path)
    with pytest.raises(ValueError, match="not a PA-SAM adapter"):
        load_pa(fresh, base_file)
    with pytest.raises(ValueError, match="plain SAM"):
        load_pa(build_stable_sam("mini", base_file, plugins=True, device="cpu"), path)


# ----------------------------------------------------------------------------- rows


def test_pa_sam_is_a_benchmark_row_and_a_user_study_model(trained, base_file, tmp_path):
    from training.benchmark import MODEL_ROWS, variant_path
    from training.user_study.models import build_models

    assert MODEL_ROWS["pa_sam"][1] == "pa-sam"
    assert variant_path(tmp_path, "pa-sam", 300, "ab" * 32).name.endswith(".pa.safetensors")
    model, _, _, _ = trained
    path = save_pa(model, tmp_path / "pa.safetensors")
    name = f"pa-sam:{path}"
    study = build_models([name], base_type="mini", base_checkpoint=base_file, device="cpu")
    selected = study[name]
    assert "PA-SAM" in selected.description and "prompt adapter" in selected.description
    image = _image(3)
    a = selected.predictor.predict(image, box_xyxy=BOX, multimask_output=False)
    b = StableSamPredictor(model).predict(image, box_xyxy=BOX, multimask_output=False)
    assert np.array_equal(a.low_res_logits, b.low_res_logits)
