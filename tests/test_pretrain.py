"""Specification of mini SAM pretraining (training/pretrain.py): a seconds-long smoke version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stable_sam.build import build_sam
from training.data import Sample
from training.pretrain import (
    PretrainConfig,
    dice_loss,
    export_fp16,
    focal_loss,
    focal_weight_at,
    lr_at,
    lsj_sample,
    mask_box_xyxy,
    pretrain,
    sample_mask_points,
    train_step_loss,
    write_provenance,
)
from training.scenes import SceneDataset, make_scene


def test_lsj_sample_pads_to_input_size_and_keeps_targets_aligned() -> None:
    scene = make_scene(0, (300, 420))
    sample = Sample(scene.image, scene.masks, "s")
    cfg = PretrainConfig(scale_range=(0.8, 0.8))
    image, masks, (h, w) = lsj_sample(sample, np.random.default_rng(0), cfg, 256)
    assert image.shape == (256, 256, 3) and masks.shape[1:] == (256, 256)
    assert (h, w) == (int(300 * 204 / 420 + 0.5), 204)
    assert not image[h:].any() and not image[:, w:].any()  # bottom-right padding
    assert not masks[:, h:].any() and not masks[:, :, w:].any()
    assert 1 <= len(masks) <= len(sample.masks)


def test_prompts_come_from_the_mask() -> None:
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:25] = True
    np.testing.assert_array_equal(mask_box_xyxy(mask), [10, 5, 24, 8])
    pts = sample_mask_points(mask, 5, np.random.default_rng(0)).astype(int)
    assert mask[pts[:, 1], pts[:, 0]].all()


def test_losses_are_small_for_the_right_mask_and_large_for_the_wrong_one() -> None:
    target = torch.zeros(1, 16, 16)
    target[0, 4:12, 4:12] = 1
    good, bad = (target * 2 - 1) * 10, (1 - target * 2) * 10
    assert focal_loss(good, target) < 1e-3 < focal_loss(bad, target)
    assert dice_loss(good, target) < 0.05 < 0.9 < dice_loss(bad, target)


def test_lr_warms_up_then_decays() -> None:
    cfg = PretrainConfig(lr=1e-3, warmup_steps=10, steps=100, minutes=None, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 0.0) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert lrs[10] > lrs[50] > lrs[99] >= 1e-4


def test_focal_weight_ramps_to_sams_twenty() -> None:
    cfg = PretrainConfig(steps=100, minutes=None, focal_ramp=0.5)
    assert focal_weight_at(cfg, 0, 0.0) == 0.0
    assert focal_weight_at(cfg, 25, 0.0) == pytest.approx(10.0)
    assert focal_weight_at(cfg, 50, 0.0) == focal_weight_at(cfg, 99, 0.0) == 20.0
    assert focal_weight_at(PretrainConfig(focal_ramp=0.0), 0, 0.0) == 20.0


def test_fp16_export_loads_back_strictly(tmp_path) -> None:
    sam = build_sam("mini")
    path = tmp_path / "sam.safetensors"
    export_fp16(sam, path)
    assert path.stat().st_size <= 16 * 2**20
    loaded = build_sam("mini", path)  # strict load; safetensors come back as float32
    a = sam.state_dict()["mask_decoder.iou_token.weight"]
    b = loaded.state_dict()["mask_decoder.iou_token.weight"]
    assert b.dtype == torch.float32
    torch.testing.assert_close(a.half().float(), b)


@pytest.mark.slow
def test_loss_decreases_when_fitting_one_scene() -> None:
    torch.manual_seed(0)
    sam = build_sam("mini")
    sam.train()
    cfg = PretrainConfig(objects_per_image=3, correction_prob=0.0, box_points_prob=0.0)
    sample = SceneDataset("train", 1, (256, 256))[0]
    image, masks, hw = lsj_sample(sample, np.random.default_rng(0), cfg, 256)
    opt = torch.optim.AdamW(sam.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        rng = np.random.default_rng(1)  # the same prompts every step
        loss = train_step_loss(sam, image[None], [masks], [hw], rng, cfg, torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
def test_smoke_run_writes_a_strictly_loadable_checkpoint_and_resumes(tmp_path) -> None:
    out, state = tmp_path / "sam_mini.safetensors", tmp_path / "state.pt"
    cfg = PretrainConfig(
        steps=2,
        minutes=None,
        batch_size=1,
        objects_per_image=2,
        warmup_steps=1,
        train_size_range=(256, 256),
        heldout_n=2,
        heldout_size_range=(256, 256),
        threads=1,
    )
    summary = pretrain(cfg, out, state, progress=False, device=torch.device("cpu"))
    assert summary["steps"] == 2 and summary["images"] == 2
    assert 0.0 <= summary["heldout"]["box_miou"] <= 100.0
    build_sam("mini", out)  # strict
    assert torch.load(state, weights_only=True)["step"] == 2

    cfg.steps = 3
    summary = pretrain(
        cfg, out, state, resume=True, command="--resume", progress=False, device=torch.device("cpu")
    )
    assert summary["steps"] == 3
    assert torch.load(state, weights_only=True)["step"] == 3
    assert [(r["from_step"], r["to_step"]) for r in summary["history"]] == [(0, 2), (2, 3)]
    write_provenance(tmp_path / "PROVENANCE.md", ["--resume"], cfg, summary, out, 1.0)
    text = (tmp_path / "PROVENANCE.md").read_text()
    assert "steps 2-3" in text and "| GT box |" in text
