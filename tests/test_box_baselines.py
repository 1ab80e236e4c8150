"""Specification of the model-free box baselines (training/box_baselines.py) and of the
real-picture benchmark's rows (training/real_benchmark.py)."""

from __future__ import annotations

import numpy as np
import pytest

from stable_sam import metrics, prompts
from training import evaluation
from training.box_baselines import GrabCut, box_pixels, filled_box
from training.data import Sample
from training.real_benchmark import BOX_KINDS, MODEL_KINDS, evaluate_baselines, main


def square_on_noise(h: int = 200, w: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright disk on a dark noisy background, and its mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 4) ** 2
    image[mask] = rng.integers(190, 256, (int(mask.sum()), 3), dtype=np.uint8)
    return image, mask


def test_the_filled_gt_box_of_a_rectangle_is_the_rectangle() -> None:
    mask = np.zeros((50, 60), bool)
    mask[10:20, 5:40] = True
    np.testing.assert_array_equal(filled_box(prompts.gt_box(mask), mask.shape), mask)


def test_a_box_covers_at_least_one_pixel_inside_the_image() -> None:
    assert box_pixels(np.array([70.0, 70.0, 70.2, 70.1]), (50, 60)) == (49, 50, 59, 60)
    assert box_pixels(np.array([-5.0, -5.0, 100.0, 100.0]), (50, 60)) == (0, 50, 0, 60)


def test_grabcut_finds_a_distinct_object_in_a_loose_box() -> None:
    image, mask = square_on_noise()
    box = prompts.gt_box(mask) + np.array([-15, -10, 12, 15])
    out = GrabCut(image).segment(box)
    assert out.shape == mask.shape and out.dtype == np.bool_
    assert metrics.mask_iou(out, mask) > 0.9
    assert metrics.mask_iou(filled_box(box, mask.shape), mask) < 0.6


def test_grabcut_runs_downscaled_and_answers_at_the_original_size() -> None:
    image, mask = square_on_noise(700, 900)
    grabcut = GrabCut(image, max_side=300)
    assert max(grabcut.image.shape[:2]) == 300
    out = grabcut.segment(prompts.gt_box(mask))
    assert out.shape == mask.shape and metrics.mask_iou(out, mask) > 0.9


def test_a_box_that_leaves_no_background_gives_the_filled_box() -> None:
    image, _ = square_on_noise(64, 64)
    whole = np.array([0.0, 0.0, 64.0, 64.0])
    out = GrabCut(image).segment(whole)  # GrabCut itself refuses: no background sample
    np.testing.assert_array_equal(out, np.ones((64, 64), bool))


def test_the_baselines_are_scored_on_the_models_prompts() -> None:
    mask = np.zeros((80, 90), bool)
    mask[20:50, 30:70] = True
    image = np.full((80, 90, 3), 30, np.uint8)
    image[mask] = 220
    samples = [Sample(image=image, masks=mask[None], name="box")]
    kinds = (*BOX_KINDS, "points_1")
    scores = evaluate_baselines(samples, kinds, n_prompts=4, seed=3)
    gt_box, noisy = (scores["filled_box"].objects[k][0] for k in BOX_KINDS)
    assert gt_box.ious == (1.0,)  # a rectangle is its own filled box
    assert "points_1" not in scores["filled_box"].objects  # a click fills no box
    # The prompts are those the models get: drawn for all of the models' kinds.
    _, per_object = evaluation.image_prompts(samples[0], 0, 3, 4, None, MODEL_KINDS)
    expected = [
        metrics.mask_iou(filled_box(b, mask.shape), mask)
        for b in per_object[0].by_kind["noisy_box"]
    ]
    assert noisy.ious == pytest.approx(tuple(expected))
    grabcut = GrabCut(image)
    clicks = [
        metrics.mask_iou(grabcut.segment_clicks(p, np.ones(1, bool)), mask)
        for p in per_object[0].by_kind["points_1"]
    ]
    assert scores["grabcut"].objects["points_1"][0].ious == pytest.approx(tuple(clicks))


def test_grabcut_from_one_click_finds_a_distinct_object() -> None:
    image, mask = square_on_noise()
    ys, xs = np.nonzero(mask)
    out = GrabCut(image).segment_clicks(np.array([[xs.mean(), ys.mean()]]), np.ones(1, bool))
    assert metrics.mask_iou(out, mask) > 0.8
    # A negative click where the object is: GrabCut keeps that disk background.
    cx, cy = int(xs.mean()), int(ys.mean())
    box = prompts.gt_box(mask)
    cut = GrabCut(image).segment_clicks(np.array([[cx, cy]]), np.zeros(1, bool), box)
    assert not cut[cy, cx] and cut.sum() > 0.5 * mask.sum()


@pytest.mark.usefixtures("one_torch_thread")
def test_the_benchmark_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", "synthetic", "--n-images", "1", "--n-prompts", "1", "--max-objects", "1"]
    result = main([*argv, "--size-range", "256", "256"])
    assert set(result["models"]) == {"grabcut", "filled_box", "sam", "stable_sam"}
    out = capsys.readouterr().out
    assert "GrabCut (box / click, 5 iterations)" in out and "| Stable-SAM |" in out
    assert set(result["models"]["stable_sam"]) == set(MODEL_KINDS)
    assert 0.0 <= result["models"]["stable_sam"]["points_5"]["alpha1"] <= 1.0
    assert "alpha1" not in result["models"]["sam"]["points_1"]  # plain SAM routes nothing


@pytest.mark.usefixtures("one_torch_thread")
def test_two_model_pairs_get_a_row_each_with_their_label(tmp_path) -> None:
    from stable_sam import build_stable_sam, default_model_paths, save_plugins

    paths = default_model_paths("mini")
    fresh = tmp_path / "fresh_plugins.safetensors"  # untrained plugins: Stable-SAM = SAM
    save_plugins(build_stable_sam("mini", paths.base_checkpoint), fresh)
    base = ["mini", str(paths.base_checkpoint)]
    argv = ["--data", "synthetic", "--n-images", "1", "--n-prompts", "1", "--max-objects", "1"]
    argv += ["--size-range", "256", "256", "--model", "a", *base, str(paths.plugin_checkpoint)]
    argv += ["--model", "b", *base, str(fresh)]
    result = main([*argv, "--out", str(tmp_path), "--name", "two"])
    models = result["models"]
    assert list(models) == [
        "grabcut", "filled_box", "sam:a", "stable_sam:a", "sam:b", "stable_sam:b"
    ]  # fmt: skip
    assert models["sam:a"] == models["sam:b"]  # one base
    # Each pair's Stable-SAM row is its own plugins': fresh ones give SAM's masks.
    miou = {key: [models[key][k]["miou"] for k in MODEL_KINDS] for key in list(models)[2:]}
    assert miou["stable_sam:b"] == miou["sam:b"] != miou["stable_sam:a"]
    assert "| Stable-SAM (b) |" in (tmp_path / "two.md").read_text()
    with pytest.raises(ValueError, match="model labels must differ"):
        main([*argv[:-5], "--model", "a", *base, str(fresh)])


@pytest.mark.usefixtures("one_torch_thread")
def test_baselines_are_reused_only_from_a_run_on_the_same_images_and_prompts(tmp_path) -> None:
    argv = ["--data", "synthetic", "--n-images", "1", "--n-prompts", "1", "--max-objects", "1",
            "--size-range", "256", "256", "--out", str(tmp_path)]  # fmt: skip
    first = main(argv)
    earlier = tmp_path / "synthetic_boxes.json"
    again = main([*argv, "--name", "again", "--baselines-from", str(earlier)])
    assert again["models"] == first["models"]
    assert "grabcut_and_filled_box" not in again["meta"]["wall_s"]
    other = [*argv[:5], "2", *argv[6:]]  # two noisy boxes per object: other prompts
    with pytest.raises(ValueError, match="prompts_per_object is 1, this run's 2"):
        main([*other, "--baselines-from", str(earlier)])
