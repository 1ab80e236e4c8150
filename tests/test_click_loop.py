"""The click-loop benchmark: where the simulated annotator clicks, how NoC and mIoU@k are
counted, and that each model row gets the prompts (and refinement) it claims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from backend_support import scene

from stable_sam import StableSamPredictor, build_stable_sam
from training.click_loop import (
    MAX_CLICKS,
    GrabCutLoop,
    LoopModel,
    ObjectLoop,
    SamLoop,
    next_click,
    run_image,
    summarize,
)
from training.data import Sample


def rect_mask(h, w, y0, y1, x0, x1):
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_the_first_click_lands_at_the_centre_of_the_object():
    gt = rect_mask(60, 80, 10, 31, 20, 61)  # rows 10..30, columns 20..60
    click = next_click(gt, np.zeros_like(gt))
    assert click.positive
    assert (click.x, click.y) == (40.5, 20.5)


def test_a_larger_spill_than_miss_gets_a_negative_click_inside_the_spill():
    gt = rect_mask(60, 80, 10, 30, 10, 30)
    pred = gt.copy()
    pred[12:14, 12:14] = False  # a small miss
    pred[35:55, 40:75] = True  # a large spill
    click = next_click(gt, pred)
    assert not click.positive
    assert 40 <= click.x <= 75 and 35 <= click.y <= 55


def test_the_image_border_counts_as_the_edge_of_an_error_region():
    gt = rect_mask(40, 40, 0, 40, 0, 10)  # a strip along the left border
    click = next_click(gt, np.zeros_like(gt))
    assert click.x in (4.5, 5.5)  # the middle of the strip (10 px wide), not its border column


def test_an_exact_mask_gets_no_click():
    gt = rect_mask(20, 20, 5, 10, 5, 10)
    assert next_click(gt, gt.copy()) is None


def test_noc_counts_interactions_until_the_threshold_and_caps_failures():
    curves = [
        [0.5, 0.86, 0.91],  # NoC@85 2, NoC@90 3
        [0.95],  # stopped after one: both 1
        [0.2] * MAX_CLICKS,  # never: MAX_CLICKS, and a failure
    ]
    row = summarize(curves)
    assert row["noc85"] == pytest.approx((2 + 1 + MAX_CLICKS) / 3, abs=0.01)
    assert row["noc90"] == pytest.approx((3 + 1 + MAX_CLICKS) / 3, abs=0.01)
    assert row["nof90"] == pytest.approx(100 / 3, abs=0.1)
    # A curve that stopped early counts its last IoU after more interactions.
    assert row["miou@1"] == pytest.approx(100 * (0.5 + 0.95 + 0.2) / 3, abs=0.01)
    assert row["miou@5"] == pytest.approx(100 * (0.91 + 0.95 + 0.2) / 3, abs=0.01)


def test_worse_counts_the_clicks_answered_with_a_lower_iou_up_to_the_fifth():
    curves = [
        [0.5, 0.4, 0.6, 0.6, 0.55, 0.1],  # 2nd and 5th worse (equal is not); the 6th not counted
        [0.95],  # stopped after one: no later interaction
        [0.3, 0.35],  # stopped after two: 1 of 1 better
    ]
    assert summarize(curves)["worse"] == pytest.approx(100 * 2 / 5, abs=0.1)
    assert summarize([[0.9]])["worse"] == 0.0


class Scripted(LoopModel):
    """Answers with the object itself once it has had ``needed`` interactions."""

    key = "scripted"

    def __init__(self, needed: int) -> None:
        self.needed = needed
        self.prompts: list[tuple[int, bool]] = []  # (clicks, has box) per object and step

    def begin_image(self, image: np.ndarray) -> None:
        pass

    def step(self, objects: list[ObjectLoop]) -> list[np.ndarray]:
        out = []
        for obj in objects:
            self.prompts.append((len(obj.clicks), obj.box_xyxy is not None))
            done = len(obj.ious) + 1 >= self.needed
            out.append(obj.gt.copy() if done else np.zeros_like(obj.gt))
        return out


def sample_of(image: np.ndarray, mask: np.ndarray) -> Sample:
    return Sample(image=image, masks=mask[None], name="scene")


def test_a_box_first_loop_starts_with_the_box_and_adds_clicks_to_it():
    image, mask = scene(60, 80)
    model = Scripted(needed=3)
    [curve] = run_image(model, sample_of(image, mask), [0], "box")
    assert model.prompts[:3] == [(0, True), (1, True), (2, True)]
    assert curve[:3] == [0.0, 0.0, 1.0]


def test_an_exact_object_stops_getting_clicks():
    image, mask = scene(60, 80)
    model = Scripted(needed=1)
    [curve] = run_image(model, sample_of(image, mask), [0], "click")
    assert curve == [1.0]  # nowhere left to click: the loop ends for it


def test_grabcut_from_one_click_finds_a_plain_object():
    image, mask = scene(60, 80)
    [curve] = run_image(GrabCutLoop(), sample_of(image, mask), [0], "click", max_clicks=1)
    assert curve[0] > 0.9


@pytest.mark.parametrize("refine", [False, True])
def test_sam_rows_refine_exactly_when_they_say(random_mini_base, one_torch_thread, refine):
    image, mask = scene(60, 80)
    predictor = StableSamPredictor(build_stable_sam("mini", random_mini_base, plugins=False))
    masks_passed = []
    real = predictor.predict_batch

    def predict_batch(*args, **kwargs):
        masks_passed.append(kwargs.get("mask_input"))
        return real(*args, **kwargs)

    predictor.predict_batch = predict_batch
    run_image(SamLoop("sam", predictor, refine=refine), sample_of(image, mask), [0], "click", 3)
    assert masks_passed[0] is None
    assert all((m is not None) == refine for m in masks_passed[1:])


def test_a_shipped_model_type_without_files_uses_its_own_shipped_files():
    from stable_sam import default_model_paths
    from stable_sam.build import SHIPPED_FILES
    from training.click_loop import model_files, parse_args

    def files(paths):
        return paths.model_type, paths.base_checkpoint, paths.plugin_checkpoint

    for shipped_type in SHIPPED_FILES:  # one of them is not the default
        picked = model_files(parse_args(["--out", "o", "--model-type", shipped_type]))
        assert picked == files(default_model_paths(shipped_type))
    assert model_files(parse_args(["--out", "o"])) == files(default_model_paths())
    own = model_files(parse_args(["--out", "o", "--model-type", "vit_b", "--base", "b.pth"]))
    assert own[:2] == ("vit_b", Path("b.pth"))


def test_sam_rows_need_no_plugins_of_the_base(random_mini_base, tmp_path):
    from training.click_loop import build_models, parse_args

    common = ["--out", "o", "--model-type", "mini", "--base", str(random_mini_base)]
    missing = ["--plugins", str(tmp_path / "none.safetensors")]
    rows = build_models(parse_args([*common, *missing, "--models", "sam", "sam+refine"]))
    assert [r.key for r in rows] == ["sam", "sam+refine"]
    with pytest.raises(FileNotFoundError):  # a Stable-SAM row still reads them
        build_models(parse_args([*common, *missing, "--models", "stable_sam"]))
