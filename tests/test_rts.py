"""The robust training strategy: augmentation, occlusion synthesis, prompt mix, loss."""

import numpy as np
import pytest

from stable_sam import metrics, prompts
from training import rts
from training.data import Sample


def _square(hw, y0, y1, x0, x1):
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_paste_object_removes_occluded_pixels_and_drops_fully_hidden_objects():
    hw = (10, 10)
    image = np.zeros((*hw, 3), np.uint8)
    a = _square(hw, 0, 10, 0, 5)  # left half
    b = _square(hw, 6, 8, 5, 7)  # small square, fully under the patch
    patch = np.full((4, 4, 3), 200, np.uint8)
    patch_mask = np.ones((4, 4), bool)
    out, masks, kept = rts.paste_object(image, np.stack([a, b]), patch, patch_mask, (5, 3))

    occluder = _square(hw, 5, 9, 3, 7)
    assert kept.tolist() == [True, False]
    assert masks.shape == (2, 10, 10)  # a survives, b dropped, the occluder appended
    np.testing.assert_array_equal(masks[0], a & ~occluder)
    np.testing.assert_array_equal(masks[1], occluder)
    assert (out[occluder] == 200).all() and (out[~occluder] == 0).all()


def test_paste_object_clips_a_patch_hanging_over_the_border():
    hw = (8, 8)
    a = _square(hw, 0, 8, 0, 8)
    patch_mask = np.ones((4, 4), bool)
    _, masks, kept = rts.paste_object(
        np.zeros((*hw, 3), np.uint8), a[None], np.ones((4, 4, 3), np.uint8), patch_mask, (-2, 6)
    )
    occluder = _square(hw, 0, 2, 6, 8)
    assert kept.tolist() == [True]
    np.testing.assert_array_equal(masks[-1], occluder)
    np.testing.assert_array_equal(masks[0], a & ~occluder)


def test_synthesized_occluder_is_centred_inside_the_target_box():
    side = 128
    target = _square((side, side), 40, 90, 30, 100)
    aug = rts.AugmentedImage(np.full((side, side, 3), 50, np.uint8), target[None], (side, side))
    donor_image = np.full((60, 60, 3), 250, np.uint8)
    donor_mask = _square((60, 60), 10, 50, 20, 40)
    cfg = rts.RTSConfig()
    box = prompts.gt_box(target)
    for seed in range(20):
        out = rts.synthesize_occlusion(
            aug, donor_image, donor_mask, np.random.default_rng(seed), cfg
        )
        occ = out.masks[-1]
        ob = prompts.gt_box(occ)
        cx, cy = (ob[0] + ob[2]) / 2, (ob[1] + ob[3]) / 2
        assert box[0] - 1 <= cx <= box[2] + 1 and box[1] - 1 <= cy <= box[3] + 1
        assert not (out.masks[0] & occ).any()  # the target lost exactly what is covered
        np.testing.assert_array_equal(out.masks[0] | occ, target | occ)
        assert (out.image[occ] == 250).all()


def test_occluder_never_paints_into_the_padding():
    side = 64
    target = _square((side, side), 10, 40, 30, 40)  # touches the content's right edge
    image = np.zeros((side, side, 3), np.uint8)
    image[:, :40] = 90
    aug = rts.AugmentedImage(image, target[None], (side, 40))
    donor = _square((30, 30), 0, 30, 0, 30)
    for seed in range(10):
        out = rts.synthesize_occlusion(
            aug,
            np.full((30, 30, 3), 255, np.uint8),
            donor,
            np.random.default_rng(seed),
            rts.RTSConfig(),
        )
        assert not out.masks[:, :, 40:].any()
        assert (out.image[:, 40:] == 0).all()


def test_noisy_box_prompts_keep_iou_at_least_one_half():
    rng = np.random.default_rng(0)
    mask = _square((128, 128), 30, 70, 20, 100)
    box = prompts.gt_box(mask)
    ious = [
        metrics.box_iou(
            rts.make_prompt("noisy_box", mask, 0, 128, rng, rts.RTSConfig()).box_xyxy, box
        )
        for _ in range(300)
    ]
    assert min(ious) >= 0.5
    assert max(ious) < 0.99  # they are really noisy


def test_point_prompts_lie_on_the_object():
    rng = np.random.default_rng(0)
    mask = _square((64, 64), 10, 20, 30, 50)
    for k in (1, 3, 5, 10):
        p = rts.make_prompt(f"points_{k}", mask, 0, 64, rng, rts.RTSConfig())
        assert p.points_xy.shape == (k, 2)
        cols, rows = p.points_xy[:, 0].astype(int), p.points_xy[:, 1].astype(int)
        assert mask[rows, cols].all()


def test_coarse_mask_prompt_is_low_res_logits():
    mask = _square((64, 64), 10, 40, 10, 40)
    p = rts.make_prompt("coarse_mask", mask, 0, 64, np.random.default_rng(0), rts.RTSConfig())
    assert p.mask_logits.shape == (1, 16, 16)


def test_clean_mode_uses_gt_boxes_only():
    aug = rts.AugmentedImage(
        np.zeros((64, 64, 3), np.uint8),
        np.stack([_square((64, 64), 5, 20, 5, 20), _square((64, 64), 30, 60, 30, 60)]),
        (64, 64),
    )
    cfg = rts.RTSConfig(robust=False)
    batch = rts.sample_prompts(aug, 8, np.random.default_rng(0), cfg)
    assert len(batch) == 8 and {p.kind for p in batch} == {"gt_box"}
    assert {p.target for p in batch} == {0, 1}


def test_robust_mode_mixes_every_prompt_kind():
    aug = rts.AugmentedImage(
        np.zeros((64, 64, 3), np.uint8), _square((64, 64), 5, 40, 5, 40)[None], (64, 64)
    )
    batch = rts.sample_prompts(aug, 400, np.random.default_rng(0), rts.RTSConfig())
    assert {p.kind for p in batch} == set(rts.PROMPT_KINDS)


def test_tiny_objects_are_not_prompted():
    aug = rts.AugmentedImage(
        np.zeros((64, 64, 3), np.uint8), _square((64, 64), 5, 7, 5, 7)[None], (64, 64)
    )
    assert rts.sample_prompts(aug, 4, np.random.default_rng(0), rts.RTSConfig()) == []


def test_an_image_without_objects_gets_no_prompts_and_no_occluder():
    # A mask folder keeps images without any mask (N = 0); training must pass over them.
    empty = Sample(np.zeros((40, 50, 3), np.uint8), np.zeros((0, 40, 50), bool), "empty")
    donor = Sample(np.zeros((40, 50, 3), np.uint8), _square((40, 50), 5, 30, 5, 30)[None], "d")
    config = rts.RTSConfig(occlusion_prob=1.0)
    aug = rts.augment(empty, donor, 64, np.random.default_rng(0), config)
    assert aug.masks.shape == (0, 64, 64)
    assert rts.sample_prompts(aug, 4, np.random.default_rng(0), config) == []


@pytest.mark.parametrize("seed", range(5))
def test_large_scale_jitter_keeps_pixels_and_masks_aligned(seed):
    rng = np.random.default_rng(seed)
    h, w = 300, 200
    image = np.zeros((h, w, 3), np.uint8)
    image[...] = (0, 0, 255)
    obj = _square((h, w), 100, 220, 50, 150)
    image[obj] = (255, 0, 0)
    aug = rts.large_scale_jitter(image, obj[None], 128, rng)
    vh, vw = aug.valid_hw
    assert aug.image.shape == (128, 128, 3) and aug.masks.shape == (1, 128, 128)
    assert not aug.masks[:, vh:].any() and not aug.masks[:, :, vw:].any()
    assert (aug.image[vh:] == 0).all() and (aug.image[:, vw:] == 0).all()
    m = aug.masks[0]
    if m.sum() > 20:
        inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
        assert (aug.image[inner][:, 0] > 200).mean() > 0.95  # the object's pixels are red


def test_augment_returns_masks_in_the_frame():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    masks = np.stack([_square((90, 120), 10, 50, 10, 60), _square((90, 120), 40, 80, 70, 110)])
    sample = Sample(image, masks, "s")
    for seed in range(6):
        aug = rts.augment(sample, sample, 64, np.random.default_rng(seed), rts.RTSConfig())
        assert aug.image.shape == (64, 64, 3) and aug.masks.shape[1:] == (64, 64)
        assert aug.masks.dtype == bool
