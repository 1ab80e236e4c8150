"""Metrics and prompt sampling against small hand-made cases with known answers."""

import numpy as np
import pytest

from stable_sam import metrics, prompts


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_iou_of_two_overlapping_squares():
    a = _rect(10, 10, 0, 4, 0, 4)  # 16 px
    b = _rect(10, 10, 2, 6, 2, 6)  # 16 px, overlap 2x2 = 4
    assert metrics.mask_iou(a, b) == pytest.approx(4 / 28)
    assert metrics.mask_iou(a, a) == 1.0
    assert metrics.mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


def test_boundary_band_width_follows_two_percent_of_the_diagonal():
    assert metrics.boundary_dilation((300, 400)) == 10  # 0.02 * 500
    assert metrics.boundary_dilation((10, 10)) == 1  # never below 1


def test_boundary_of_a_square_is_its_one_pixel_rim_when_d_is_one():
    m = _rect(10, 10, 2, 8, 2, 8)  # 6x6 square; d = 1 for a 10x10 image
    band = metrics.mask_boundary(m)
    assert band.sum() == 36 - 16  # the 6x6 minus its 4x4 interior


def test_boundary_iou_of_shifted_squares():
    a = _rect(10, 10, 2, 8, 2, 8)
    b = _rect(10, 10, 2, 8, 3, 9)  # shifted right by one
    band_a, band_b = metrics.mask_boundary(a), metrics.mask_boundary(b)
    expected = (band_a & band_b).sum() / (band_a | band_b).sum()
    assert metrics.boundary_iou(a, b) == pytest.approx(expected)
    # hand count: rims of 20 px each; they share only the top and bottom rows at x=3..7
    # (2 * 5 = 10); each one's side columns lie inside the other: union 30.
    assert metrics.boundary_iou(a, b) == pytest.approx(10 / 30)


def test_stability_of_identical_masks_is_one_and_of_disjoint_halves_is_one_half():
    a = _rect(4, 4, 0, 4, 0, 2)
    b = _rect(4, 4, 0, 4, 2, 4)
    assert metrics.stability([a, a, a]) == 1.0
    assert metrics.stability([a, b]) == pytest.approx(0.5)


def test_box_iou_known_values():
    assert metrics.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert metrics.box_iou([0, 0, 2, 2], [2, 2, 3, 3]) == 0.0
    assert metrics.box_iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    m = metrics.box_iou_matrix(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3], [0, 0, 2, 2]]))
    assert m.shape == (1, 2) and m[0, 0] == pytest.approx(1 / 7) and m[0, 1] == 1.0


def test_mask_ap_is_perfect_for_exact_predictions():
    gts = [_rect(20, 20, 0, 8, 0, 8), _rect(20, 20, 10, 18, 10, 18)]
    assert metrics.mask_ap(gts, gts, [0.9, 0.8]) == {
        "ap": pytest.approx(1.0),
        "ap50": pytest.approx(1.0),
    }


def test_gt_box_covers_the_mask_pixels():
    m = _rect(10, 12, 2, 5, 3, 8)
    assert prompts.gt_box(m).tolist() == [3, 2, 8, 5]


def test_noisy_box_iou_respects_the_requested_range():
    rng = np.random.default_rng(0)
    box = np.array([100, 100, 200, 180], np.float32)
    for lo, hi in [(0.5, 1.0), (0.5, 0.6), (0.6, 0.7)]:
        for _ in range(20):
            noisy = prompts.noisy_box(box, rng, 0.4, (lo, hi))
            iou = metrics.box_iou(noisy, box)
            assert lo <= iou <= hi and (iou < hi or hi == 1.0)


def test_noisy_box_noise_is_bounded_by_the_scale():
    rng = np.random.default_rng(1)
    box = np.array([100, 100, 200, 200], np.float64)
    boxes = prompts.jitter_boxes(box, rng, 0.4, 2000)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sizes = boxes[:, 2:] - boxes[:, :2]
    assert np.abs(centres - 150).max() <= 0.4 * 100 / 2 + 1e-6
    assert sizes.min() >= 60 - 1e-6 and sizes.max() <= 140 + 1e-6


def test_noisy_box_is_clipped_to_the_image():
    rng = np.random.default_rng(2)
    box = np.array([0, 0, 50, 50], np.float32)
    for _ in range(20):
        b = prompts.noisy_box(box, rng, 0.4, image_size=(60, 60))
        assert b.min() >= 0 and b[2] <= 60 and b[3] <= 60


def test_impossible_iou_range_is_a_clear_error():
    with pytest.raises(ValueError, match="no noisy box"):
        prompts.noisy_box(np.array([0, 0, 10, 10]), np.random.default_rng(0), 0.01, (0.1, 0.2))


def test_sampled_points_lie_inside_the_mask():
    m = _rect(30, 30, 5, 10, 20, 25)
    pts = prompts.sample_points(m, 10, np.random.default_rng(0))
    assert pts.shape == (10, 2)
    cols, rows = np.floor(pts[:, 0]).astype(int), np.floor(pts[:, 1]).astype(int)
    assert m[rows, cols].all()


def test_coarse_mask_differs_only_near_the_boundary():
    m = np.zeros((100, 100), bool)
    m[20:80, 20:80] = True
    c = prompts.coarse_mask(m, np.random.default_rng(0))
    diff = c ^ m
    assert diff.any()
    ys, xs = np.nonzero(diff)
    dist = np.minimum.reduce([np.abs(ys - 20), np.abs(ys - 79), np.abs(xs - 20), np.abs(xs - 79)])
    assert dist.max() <= 6  # band radius 0.05 * diag(60*sqrt2) ≈ 4 px, plus a pixel of rounding
    assert c[50, 50] and not c[2, 2]


def test_greedy_matches_take_the_highest_iou_first_one_to_one_above_the_threshold():
    iou = np.array([[0.9, 0.8, 0.0], [0.85, 0.2, 0.0], [0.3, 0.3, 0.05]])
    # (0, 0) first; row 1 then has only 0.2 left (below 0.25); column 0 taken, row 2 gets column 1
    assert metrics.greedy_matches(iou, 0.25) == [(0, 0), (2, 1)]
    assert metrics.greedy_matches(np.zeros((0, 3)), 0.1) == []
