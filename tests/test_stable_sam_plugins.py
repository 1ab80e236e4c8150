"""Stable-SAM plugins: size, placement, identity with vanilla SAM, HQ-SAM attachment."""

import copy

import numpy as np
import pytest
import torch
from identity_inputs import IMAGE
from identity_inputs import PROMPTS as BASE_PROMPTS
from torch.nn import functional as F

from stable_sam import (
    PluginConfig,
    StableSam,
    StableSamPredictor,
    build_sam,
    build_stable_sam,
)
from stable_sam.modeling import sample_at_offsets


def _randomise_plugins(model: StableSam, seed: int = 0) -> None:
    """Move the plugins off their identity initialisation so the checks are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.plugins.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + p)


def _pair(
    model_type: str = "mini", alpha=(0.0, 1.0)
) -> tuple[StableSamPredictor, StableSamPredictor]:
    torch.manual_seed(0)
    sam = build_sam(model_type)
    vanilla = StableSam(copy.deepcopy(sam), model_type, "x", None)
    stable = StableSam(sam, model_type, "x", PluginConfig(fixed_alpha=alpha))
    _randomise_plugins(stable)
    return StableSamPredictor(vanilla), StableSamPredictor(stable)


PROMPTS = {
    **BASE_PROMPTS,
    "mask": dict(mask_input=np.random.default_rng(1).normal(size=(1, 64, 64)).astype(np.float32)),
}


def test_trainable_parameter_count_matches_the_paper_size():
    model = build_stable_sam("mini")
    n = sum(p.numel() for p in model.trainable_parameters())
    assert n == 81_829  # Conv1x1 256→256, DW 5x5, LN, Conv1x1 256→2, DRP hidden 32, scale s


def test_only_plugin_parameters_require_grad():
    model = build_stable_sam("mini")
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in trainable), name


def test_sam_state_dict_keys_are_unchanged_by_the_plugins():
    vanilla_keys = set(build_sam("mini").state_dict())
    model = build_stable_sam("mini")
    assert set(model.sam.state_dict()) == vanilla_keys
    assert all(k.startswith(("dsp.", "drp.")) for k in model.plugins.state_dict())


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_routing_fixed_to_zero_one_equals_vanilla_sam(prompt, multimask):
    vanilla, stable = _pair()
    a = vanilla.predict(IMAGE, multimask_output=multimask, **PROMPTS[prompt])
    b = stable.predict(IMAGE, multimask_output=multimask, **PROMPTS[prompt])
    assert np.abs(a.low_res_logits - b.low_res_logits).max() <= 1e-5
    assert np.abs(a.scores - b.scores).max() <= 1e-5
    assert np.array_equal(a.masks, b.masks)


def test_routing_fixed_to_zero_one_equals_vanilla_sam_for_batched_prompts():
    vanilla, stable = _pair()
    boxes = np.array([[20, 30, 150, 160], [0, 0, 100, 80], [60, 40, 230, 170]], np.float32)
    points = np.array([[[50, 60]], [[10, 10]], [[200, 100]]], np.float32)
    labels = np.ones((3, 1), np.int64)
    a = vanilla.predict_batch(IMAGE, boxes_xyxy=boxes, point_coords=points, point_labels=labels)
    b = stable.predict_batch(IMAGE, boxes_xyxy=boxes, point_coords=points, point_labels=labels)
    assert np.abs(a.low_res_logits - b.low_res_logits).max() <= 1e-5


def test_plugins_change_the_output_when_routing_uses_the_resampled_features():
    vanilla, stable = _pair(alpha=(1.0, 0.0))
    a = vanilla.predict(IMAGE, **PROMPTS["box"])
    b = stable.predict(IMAGE, **PROMPTS["box"])
    assert np.abs(a.low_res_logits - b.low_res_logits).max() > 1e-3


def test_untrained_plugins_start_equal_to_sam():
    torch.manual_seed(0)
    sam = build_sam("mini")
    vanilla = StableSamPredictor(StableSam(copy.deepcopy(sam), "mini", "x", None))
    stable = StableSamPredictor(StableSam(sam, "mini", "x", PluginConfig()))
    a = vanilla.predict(IMAGE, **PROMPTS["box"])
    b = stable.predict(IMAGE, **PROMPTS["box"])
    assert np.abs(a.low_res_logits - b.low_res_logits).max() <= 1e-4
    assert b.alpha is not None and abs(b.alpha.sum() - 1.0) < 1e-6


def test_routing_weights_are_reported_per_prompt():
    model = build_stable_sam("mini")
    _randomise_plugins(model)
    predictor = StableSamPredictor(model)
    boxes = np.array([[20, 30, 150, 160], [0, 0, 100, 80]], np.float32)
    out = predictor.predict_batch(IMAGE, boxes_xyxy=boxes)
    assert out.alpha.shape == (2, 2)
    assert np.allclose(out.alpha.sum(axis=1), model.plugins.drp.scale.item(), atol=1e-5)


def test_token_layout_sampling_equals_grid_sample_with_clamped_positions():
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 8, 6, 7
    x = torch.randn(b, c, h, w, generator=g)
    offsets = torch.randn(b, h * w, 2, generator=g) * 3
    tokens = x.flatten(2).transpose(1, 2)
    ours = sample_at_offsets(tokens, offsets, (h, w))
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    px = (xs.reshape(1, -1) + offsets[..., 0]).clamp(0, w - 1)
    py = (ys.reshape(1, -1) + offsets[..., 1]).clamp(0, h - 1)
    grid = torch.stack([px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1], dim=-1).reshape(b, h, w, 2)
    ref = F.grid_sample(x, grid, mode="bilinear", align_corners=True).flatten(2).transpose(1, 2)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert ours.is_contiguous()


def test_sampling_is_differentiable_in_features_and_offsets_like_grid_sample():
    g = torch.Generator().manual_seed(1)
    h, w = 5, 6
    x = torch.randn(1, 4, h, w, generator=g, requires_grad=True)
    offsets = (torch.rand(1, h * w, 2, generator=g) * 1.6 - 0.8).requires_grad_()
    tokens = x.flatten(2).transpose(1, 2)
    sample_at_offsets(tokens, offsets, (h, w)).pow(2).sum().backward()
    ours = (x.grad.clone(), offsets.grad.clone())
    x.grad, offsets.grad = None, None
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    px = (xs.reshape(1, -1) + offsets[..., 0]).clamp(0, w - 1)
    py = (ys.reshape(1, -1) + offsets[..., 1]).clamp(0, h - 1)
    grid = torch.stack([px / (w - 1) * 2 - 1, py / (h - 1) * 2 - 1], dim=-1).reshape(1, h, w, 2)
    F.grid_sample(x, grid, align_corners=True).pow(2).sum().backward()
    assert torch.allclose(ours[0], x.grad, atol=1e-4)
    assert torch.allclose(ours[1], offsets.grad, atol=1e-3)


def test_a_whole_cell_offset_reads_the_neighbouring_feature():
    h, w = 3, 4
    x = torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1)
    offsets = torch.zeros(1, h * w, 2)
    offsets[..., 0] = 1.0  # one cell to the right; the last column is clamped
    out = sample_at_offsets(x, offsets, (h, w)).view(h, w)
    expected = torch.tensor([[1, 2, 3, 3], [5, 6, 7, 7], [9, 10, 11, 11]], dtype=torch.float32)
    assert torch.equal(out, expected)


def test_offsets_are_bounded_by_the_offset_scale():
    model = build_stable_sam("mini", plugin_config=PluginConfig(offset_scale=0.25))
    _randomise_plugins(model, seed=3)
    with torch.no_grad():
        model.plugins.dsp.offset_proj.bias.fill_(100.0)
        keys = torch.randn(1, 16 * 16, 256)
        _, offsets = model.plugins.dsp(keys, (16, 16))
    assert offsets.abs().max() <= 0.25 * 16 + 1e-4
    assert offsets.abs().max() > 0.25 * 16 - 1e-2


def test_plugins_attach_to_hq_sam_and_keep_its_keys():
    torch.manual_seed(0)
    hq = build_sam("hq_mini")
    keys = set(hq.state_dict())
    vanilla = StableSamPredictor(StableSam(copy.deepcopy(hq), "hq_mini", "x", None))
    model = StableSam(hq, "hq_mini", "x", PluginConfig(fixed_alpha=(0.0, 1.0)))
    _randomise_plugins(model)
    assert model.is_hq and set(model.sam.state_dict()) == keys
    stable = StableSamPredictor(model)
    for prompt in ("box", "points"):
        a = vanilla.predict(IMAGE, **PROMPTS[prompt])
        b = stable.predict(IMAGE, **PROMPTS[prompt])
        assert np.abs(a.low_res_logits - b.low_res_logits).max() <= 1e-5
    assert b.alpha is not None


def test_gradients_reach_only_the_plugins():
    model = build_stable_sam("mini")
    predictor = StableSamPredictor(model)
    emb = predictor.embed(IMAGE)
    points, boxes, masks = predictor.prompt_tensors(
        emb, np.array([[20, 30, 150, 160]], np.float32), None, None, None
    )
    sparse, dense = model.encode_prompts(points, boxes, masks)
    logits, _ = model.decode(emb.embeddings, sparse, dense, multimask_output=False)
    logits.mean().backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.sam.parameters())
