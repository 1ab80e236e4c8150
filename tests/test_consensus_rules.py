"""The consensus-rule measurement: what each candidate rule makes of K masks, how crowd boxes are
drawn, and that the script runs end to end on a few objects and writes its table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.consensus_rules import (
    CURRENT,
    RULES,
    CrowdMasks,
    clearly_better,
    crowd_boxes,
    main,
    rule_masks,
)


def strip_logits(
    h: int, w: int, x0: int, x1: int, inside: float = 4.0, outside: float = -4.0
) -> np.ndarray:
    """(H, W) logits: ``inside`` on columns x0..x1-1, ``outside`` elsewhere."""
    logits = np.full((h, w), outside, np.float32)
    logits[:, x0:x1] = inside
    return logits


def two_masks(inside_b: float = 4.0, outside_b: float = -4.0) -> CrowdMasks:
    """Mask A on columns 0..5, mask B on columns 4..9 of a (4, 10) image."""
    logits = np.stack([strip_logits(4, 10, 0, 6), strip_logits(4, 10, 4, 10, inside_b, outside_b)])
    boxes = np.array([[0, 0, 6, 4], [4, 0, 10, 4]], np.float32)
    empty = np.zeros((4, 10), bool)
    return CrowdMasks(logits, np.array([0.7, 0.9]), boxes, empty, empty)


def test_at_two_masks_majority_is_the_union_and_strict_majority_the_intersection():
    rules = rule_masks(two_masks())
    assert rules["majority"][0].tolist() == [True] * 10
    assert rules["strict_majority"][0].tolist() == [False] * 4 + [True] * 2 + [False] * 4


def test_the_soft_vote_keeps_the_overlap_and_the_more_confident_mask():
    rules = rule_masks(two_masks(inside_b=8.0, outside_b=-5.0))  # B surer than A, both ways
    expected = [False] * 4 + [True] * 6  # mean logits: (4 - 5)/2 out, (-4 + 8)/2 in
    assert rules["mean_logits"][0].tolist() == expected
    assert rules["mean_probability"][0].tolist() == expected


def test_best_score_takes_the_mask_sam_rates_highest():
    rules = rule_masks(two_masks())
    assert rules["best_score"][0].tolist() == [False] * 4 + [True] * 6  # 0.9 > 0.7


def test_the_medoid_is_the_mask_of_the_box_nearest_the_mean_box():
    h, w = 4, 20
    logits = np.stack([strip_logits(h, w, a, b) for a, b in [(0, 10), (1, 11), (8, 18)]])
    boxes = np.array([[0, 0, 10, 4], [1, 0, 11, 4], [8, 0, 18, 4]], np.float32)  # mean x 3..13
    empty = np.zeros((h, w), bool)
    rules = rule_masks(CrowdMasks(logits, np.ones(3), boxes, empty, empty))
    assert np.array_equal(rules["medoid_box"], logits[1] > 0)


def test_a_single_mask_is_its_own_consensus_under_every_mask_rule():
    crowd = two_masks()
    one = CrowdMasks(crowd.logits[:1], crowd.scores[:1], crowd.boxes[:1], *crowd.masks)
    rules = rule_masks(one)
    for rule in RULES:
        if rule not in ("mean_box", "median_box"):
            assert np.array_equal(rules[rule], crowd.masks[0]), rule


def test_crowd_boxes_are_clipped_to_the_image_and_reproducible():
    box = np.array([0, 0, 20, 20], np.float32)  # on the top-left corner: noise pushes it out
    a = crowd_boxes(box, np.random.default_rng(1), 0.4, 50, (30, 40))
    b = crowd_boxes(box, np.random.default_rng(1), 0.4, 50, (30, 40))
    assert np.array_equal(a, b)
    assert a.shape == (50, 4)
    assert (a[:, [0, 1]] >= 0).all() and (a[:, 2] <= 40).all() and (a[:, 3] <= 30).all()
    assert (a[:, 2] > a[:, 0]).all() and (a[:, 3] > a[:, 1]).all()


def table(delta_k2: float, ci_k2: float, delta_k3: float) -> dict:
    row = {"delta": 0.0, "ci95": 0.0}
    return {
        "2": {"x": {"delta": delta_k2, "ci95": ci_k2}, CURRENT: row},
        "3": {"x": {"delta": delta_k3, "ci95": 0.5}, CURRENT: row},
    }


@pytest.mark.parametrize(
    ("k2", "ci", "k3", "wins"),
    [
        (1.5, 0.4, 0.1, True),
        (0.8, 0.2, 0.5, False),  # not enough at K = 2
        (1.5, 2.0, 0.5, False),  # within noise at K = 2
        (1.5, 0.4, -0.3, False),  # worse at K = 3
    ],
)
def test_a_rule_is_clearly_better_only_by_enough_at_k2_and_no_loss_elsewhere(
    monkeypatch, k2, ci, k3, wins
):
    monkeypatch.setattr("training.consensus_rules.RULES", {CURRENT: "", "x": ""})
    models = {"sam": table(k2, ci, k3), "stable-sam": table(k2, ci, k3)}
    assert clearly_better(models, [2, 3]) == (["x"] if wins else [])


def test_the_script_writes_every_rule_per_k_and_model_on_a_few_objects(tmp_path):
    result = main(
        ["--n-images", "2", "--max-objects", "2", "--annotators", "2", "3",
         "--size-range", "128", "192", "--out", str(tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "consensus_rules.json").read_text())
    assert saved["models"].keys() == {"sam", "stable-sam"}
    for per_k in saved["models"].values():
        assert per_k.keys() == {"2", "3"}
        for row in per_k.values():
            assert row.keys() == {"single", *RULES}
            assert all(0 <= cell["miou"] <= 100 for cell in row.values())
            assert row[CURRENT]["delta"] == 0
    assert saved["meta"]["objects"] == result["meta"]["objects"] > 0
    assert 0.6 < saved["meta"]["mean_box_iou"] < 0.9
    report = (tmp_path / "consensus_rules.md").read_text()
    assert "One annotator (baseline)" in report and "Command:" in report
