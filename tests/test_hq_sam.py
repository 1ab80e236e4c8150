"""HQ-SAM on our own base (paper Table 1's HQ-SAM row): its parameters on a plain SAM checkpoint,
trained with SAM frozen, saved alone, reloaded strictly, served with its own embedding cache."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_data import two_rectangles

from stable_sam import PluginMismatchError, StableSamPredictor, build_sam, build_stable_sam
from stable_sam.build import is_hq_parameter
from training.baselines import (
    HQ_FORMAT,
    VARIANTS,
    hq_sam_modules,
    load_hq,
    save_hq,
    train_hq_sam,
)
from training.data import Sample
from training.engine import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_dataset(n: int = 2, side: int = 96) -> list[Sample]:
    return two_rectangles(n, side)


@pytest.fixture(scope="module")
def base_file(random_mini_base):
    return random_mini_base


def _hq(base_file, seed: int = 0):
    return VARIANTS["hq-sam"].build_model("mini", base_file, "cpu", seed=seed)


def _trained(base_file, steps: int = 2):
    model = _hq(base_file)
    config = VARIANTS["hq-sam"].train_config(
        batch_prompts=8, prompts_per_image=4, max_steps=steps, device="cpu"
    )
    result = train_hq_sam(model, _tiny_dataset(), config)
    return model, result


def test_hq_parameters_go_onto_a_plain_base_whose_sam_keys_load_strictly(base_file):
    plain = build_stable_sam("mini", base_file, plugins=False, device="cpu")
    hq = _hq(base_file)
    assert hq.is_hq and hq.model_type == "mini"
    assert hq.base_checkpoint_sha256 == plain.base_checkpoint_sha256
    state, base = hq.sam.state_dict(), plain.sam.state_dict()
    assert {k for k in state if not is_hq_parameter(k)} == set(base)
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert {k.split(".")[1] for k in state if is_hq_parameter(k)} == {
        "hf_token",
        "hf_mlp",
        "compress_vit_feat",
        "embedding_encoder",
        "embedding_maskfeature",
    }


def test_add_hq_refuses_an_hq_checkpoint_and_a_checkpoint_of_another_size(base_file, tmp_path):
    hq_file = tmp_path / "hq_mini.pth"
    torch.save(build_sam("hq_mini").state_dict(), hq_file)
    with pytest.raises(ValueError, match="already an HQ-SAM checkpoint"):
        build_sam("mini", hq_file, add_hq=True)
    state = load_file(str(base_file))
    del state["mask_decoder.iou_token.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(RuntimeError, match="iou_token"):
        build_sam("mini", tmp_path / "broken.safetensors", add_hq=True)
    with pytest.raises(ValueError, match="plain SAM base"):
        build_sam("hq_mini", base_file, add_hq=True)


def test_training_moves_only_hq_parameters_and_no_gradient_reaches_sam(base_file):
    model = _hq(base_file)
    before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    config = VARIANTS["hq-sam"].train_config(
        batch_prompts=8, prompts_per_image=4, max_steps=2, device="cpu"
    )
    result = train_hq_sam(model, _tiny_dataset(), config)
    assert result.steps == 2
    after = model.sam.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed and all(is_hq_parameter(k) for k in changed)
    # The fusion convolutions and the token all trained (their gradient is not zero).
    assert {k.split(".")[1] for k in changed} == {
        "hf_token",
        "hf_mlp",
        "compress_vit_feat",
        "embedding_encoder",
        "embedding_maskfeature",
    }
    for name, p in model.sam.named_parameters():
        assert not p.requires_grad, name
        if not is_hq_parameter(name):
            assert p.grad is None, name


def test_the_hq_token_mask_is_what_trains_and_sams_mask_plus_it_is_served(base_file):
    model = _hq(base_file)
    assert not model.hq_token_only  # served: HQ-SAM's default, SAM's mask plus the HQ mask
    image = np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    predictor = StableSamPredictor(model, multimask_policy="single")
    emb = predictor.embed(image)
    sparse, dense = model.encode_prompts(None, torch.tensor([[10.0, 10, 120, 120]]), None)
    summed, iou_summed = model.decode(emb.embeddings, sparse, dense, False, emb.hq_features)
    model.hq_token_only = True
    only, iou = model.decode(emb.embeddings, sparse, dense, False, emb.hq_features)
    decoder = model.sam.mask_decoder
    masks, _ = decoder.predict_masks(
        emb.embeddings, model.sam.prompt_encoder.get_dense_pe(), sparse, dense, emb.hq_features
    )
    n = decoder.num_mask_tokens
    torch.testing.assert_close(only, masks[:, n - 1 : n], rtol=0, atol=0)
    torch.testing.assert_close(summed, masks[:, :1] + masks[:, n - 1 : n], rtol=0, atol=0)
    assert torch.equal(iou, iou_summed)

    # Training supervises the HQ token's mask alone, and leaves the served output as it was.
    model.hq_token_only = False
    seen = []
    decode = model.decode

    def spy(*args, **kwargs):
        seen.append(model.hq_token_only)
        return decode(*args, **kwargs)

    model.decode = spy
    config = VARIANTS["hq-sam"].train_config(
        batch_prompts=8, prompts_per_image=4, max_steps=1, device="cpu"
    )
    train_hq_sam(model, _tiny_dataset(1), config)
    assert seen and all(seen)
    assert not model.hq_token_only


def test_a_saved_file_holds_the_hq_parameters_alone_and_reloads_to_the_same_masks(
    base_file, tmp_path
):
    model, result = _trained(base_file)
    path = save_hq(model, tmp_path / "hq.safetensors", {"training_summary": result.summary})
    state = load_file(str(path))
    assert state and all(is_hq_parameter(k) for k in state)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == HQ_FORMAT and meta["base_model_type"] == "mini"
    assert meta["hq_token_only"] == "false"

    fresh = _hq(base_file, seed=7)
    VARIANTS["hq-sam"].load(fresh, path)
    image = np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    box = np.array([4.0, 6, 40, 44])
    a = StableSamPredictor(model).predict(image, box_xyxy=box, multimask_output=False)
    b = StableSamPredictor(fresh).predict(image, box_xyxy=box, multimask_output=False)
    assert np.array_equal(a.low_res_logits, b.low_res_logits)


def test_loading_is_strict_and_bound_to_the_base(base_file, tmp_path):
    model, _ = _trained(base_file, steps=1)
    path = save_hq(model, tmp_path / "hq.safetensors")
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    fresh = _hq(base_file)
    state = load_file(str(path))
    del state["mask_decoder.hf_token.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"), header)
    with pytest.raises(ValueError, match=r"missing.*hf_token"):
        load_hq(fresh, tmp_path / "missing.safetensors")
    state = load_file(str(path))
    state["mask_decoder.hf_token.weight"] = torch.zeros(1, 128)
    save_file(state, str(tmp_path / "shape.safetensors"), header)
    with pytest.raises(ValueError, match="hf_token"):
        load_hq(fresh, tmp_path / "shape.safetensors")
    state = load_file(str(path))
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)  # a SAM key: not HQ's to set
    save_file(state, str(tmp_path / "extra.safetensors"), header)
    with pytest.raises(ValueError, match=r"unexpected.*iou_token"):
        load_hq(fresh, tmp_path / "extra.safetensors")
    other_base = load_file(str(base_file))
    other_base["mask_decoder.iou_token.weight"] += 1  # another base: another hash
    save_file(other_base, str(tmp_path / "other.safetensors"))
    other = VARIANTS["hq-sam"].build_model("mini", tmp_path / "other.safetensors", "cpu")
    with pytest.raises(PluginMismatchError, match="another base"):
        load_hq(other, path)
    plain = build_stable_sam("mini", base_file, plugins=False, device="cpu")
    with pytest.raises(ValueError, match="add_hq"):
        load_hq(plain, path)


def test_a_shared_cache_keeps_each_hq_files_features_apart_from_sams(base_file, tmp_path):
    sam = StableSamPredictor(build_stable_sam("mini", base_file, plugins=False, device="cpu"))
    first, _ = _trained(base_file, steps=1)
    second = _hq(base_file, seed=3)
    load_hq(second, save_hq(first, tmp_path / "a.safetensors"))
    third = _hq(base_file, seed=4)  # untrained: other fusion weights
    image = np.random.default_rng(3).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    box = np.array([2.0, 2, 30, 30])
    assert sam.embed(image).hq_features is None
    out = {}
    for name, model in {"second": second, "third": third}.items():
        predictor = StableSamPredictor(model, cache=sam.cache)
        out[name] = predictor.predict(image, box_xyxy=box, multimask_output=False)
        assert predictor.embed(image).hq_features is not None
    assert len(sam.cache) == 3
    own = StableSamPredictor(third).predict(image, box_xyxy=box, multimask_output=False)
    assert np.array_equal(out["third"].low_res_logits, own.low_res_logits)


def test_hq_sams_recipe_is_its_papers_and_the_rts_row_is_stable_sams():
    recipe = VARIANTS["hq-sam"].train_config()
    kinds, probs = recipe.rts.kinds_and_probs()
    assert kinds == ("gt_box", "points_10", "coarse_mask") and np.allclose(probs, 1 / 3)
    assert recipe.rts.occlusion_prob == 0.0
    assert (recipe.epochs, recipe.lr) == (12, 1e-3)
    assert [recipe.lr_at(e) for e in (0, 9, 10, 11)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    fair = VARIANTS["hq-sam-rts"].train_config()
    assert fair.epochs == 1 and fair.rts == VARIANTS["stable"].train_config().rts


def test_the_loop_applies_the_learning_rate_schedule(base_file):
    """A drop to 0 from the first epoch: nothing moves, so the loop did use ``lr_at``."""
    model = _hq(base_file)
    before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    config = TrainConfig(
        batch_prompts=8,
        prompts_per_image=4,
        max_steps=1,
        device="cpu",
        lr_drop_epochs=(0,),
        lr_drop_factor=0.0,
    )
    train_hq_sam(model, _tiny_dataset(), config)
    assert all(torch.equal(v, before[k]) for k, v in model.sam.state_dict().items())


def test_hq_sam_trains_what_it_says(base_file):
    modules = hq_sam_modules(_hq(base_file))
    n = sum(p.numel() for m in modules for p in m.parameters())
    assert n == 481_280  # the mini's HQ-SAM parameters (ViT width 192)
    with pytest.raises(ValueError, match="add_hq"):
        hq_sam_modules(build_stable_sam("mini", base_file, plugins=False, device="cpu"))


def test_the_train_cli_writes_an_hq_file_that_reloads(base_file, tmp_path):
    from training.train import main

    out = tmp_path / "hq.safetensors"
    argv = ["--base", str(base_file), "--n", "2", "--out", str(out), "--variant", "hq-sam"]
    result = main([*argv, "--max-steps", "1", "--no-progress"])
    assert result.summary["config"]["epochs"] == 12  # the recipe's default
    VARIANTS["hq-sam"].load(_hq(base_file), out)
