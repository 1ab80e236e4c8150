"""The training engine's losses and input preprocessing (shared by RTS and pretraining)."""

import numpy as np
import pytest
import torch

from stable_sam import build_sam
from training import engine


def _square_target(n: int = 1, side: int = 16) -> torch.Tensor:
    target = torch.zeros(n, side, side)
    target[:, side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 1
    return target


def test_bce_dice_loss_prefers_the_right_mask():
    target = torch.zeros(2, 64, 64, dtype=torch.bool)
    target[:, 16:48, 16:48] = True
    good = torch.full((2, 1, 16, 16), -10.0)
    good[:, :, 4:12, 4:12] = 10.0
    bad = -good
    assert engine.bce_dice_loss(good, target) < 0.1 < engine.bce_dice_loss(bad, target)


def test_focal_and_dice_losses_are_small_for_the_right_mask_and_large_for_the_wrong_one():
    target = _square_target()
    good, bad = (target * 2 - 1) * 10, (1 - target * 2) * 10
    assert engine.focal_loss(good, target) < 1e-3 < engine.focal_loss(bad, target)
    assert engine.dice_loss(good, target) < 0.05 < 0.9 < engine.dice_loss(bad, target)


def test_mask_loss_is_sams_twenty_to_one_or_bce_plus_dice():
    target = _square_target(2)
    logits = torch.randn(2, 16, 16)
    dice = engine.dice_loss(logits, target)
    torch.testing.assert_close(
        engine.mask_loss(logits, target, "focal_dice"),
        20 * engine.focal_loss(logits, target) + dice,
    )
    torch.testing.assert_close(
        engine.mask_loss(logits, target, "bce_dice", focal_weight=3.0),
        engine.bce_loss(logits, target) + dice,
    )
    with pytest.raises(ValueError, match="unknown mask loss"):
        engine.mask_loss(logits, target, "l2")


def test_hard_iou_counts_pixels_of_positive_logits():
    target = _square_target()  # 8 x 8 = 64 pixels
    logits = torch.full((1, 16, 16), -1.0)
    logits[0, 4:12, 4:8] = 1.0  # half of the target
    assert engine.hard_iou(logits, target).item() == pytest.approx(0.5)


def test_sam_loss_back_propagates_only_the_best_of_several_outputs():
    good = torch.full((1, 1, 16, 16), -10.0)
    good[..., 4:12, 4:12] = 10.0
    target = (engine.upsample_logits(good, (64, 64))[:, 0] > 0).float()  # good's IoU: exactly 1
    low_res = torch.cat([-good, good, torch.zeros_like(good)], dim=1).requires_grad_(True)
    iou_pred = torch.tensor([[0.5, 1.0, 0.5]], requires_grad=True)  # actual: 0, 1, 0
    loss, picked = engine.sam_loss(low_res, iou_pred, target)
    loss.backward()
    torch.testing.assert_close(picked, engine.upsample_logits(good, (64, 64))[:, 0])  # the good one
    assert low_res.grad[0, 0].abs().sum() == 0 and low_res.grad[0, 2].abs().sum() == 0
    assert low_res.grad[0, 1].abs().sum() > 0
    # Every output's IoU prediction learns its actual IoU: only the wrong ones are off.
    assert iou_pred.grad[0, 1] == 0 and (iou_pred.grad[0, [0, 2]] > 0).all()


def test_preprocess_normalises_and_zeroes_the_padding():
    sam = build_sam("mini")
    images = np.full((2, 256, 256, 3), 200, np.uint8)
    x = engine.preprocess(sam, images, [(100, 256), (256, 30)])
    expected = (200 - sam.pixel_mean) / sam.pixel_std
    torch.testing.assert_close(x[0, :, :100], expected.expand(3, 100, 256))
    assert not x[0, :, 100:].any() and not x[1, :, :, 30:].any()
    torch.testing.assert_close(x[1, :, :, :30], expected.expand(3, 256, 30))
