"""The evaluation protocol: prompts per object, decoding through the predictor, scoring."""

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from stable_sam import StableSam, StableSamPredictor, build_stable_sam, metrics
from training import evaluation
from training.data import Sample


def square_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """(h, w) bool, True on columns x0..x1-1 and rows y0..y1-1."""
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# --- prompts ----------------------------------------------------------------------------------


def test_object_prompts_follow_the_protocol():
    mask = square_mask(100, 120, 30, 20, 90, 60)
    p = evaluation.object_prompts(mask, np.random.default_rng(0), 20).by_kind
    assert list(p) == list(evaluation.PROMPT_KINDS)
    assert p["gt_box"].tolist() == [[30, 20, 90, 60]] and p["noisy_box"].shape == (20, 4)
    assert all(metrics.box_iou(b, p["gt_box"][0]) >= 0.5 for b in p["noisy_box"])
    assert not (p["noisy_box"] == p["gt_box"]).all(axis=1).any()
    for k in (1, 3, 5, 10):
        pts = p[f"points_{k}"]
        assert pts.shape == (20, k, 2)
        assert mask[pts[..., 1].astype(int), pts[..., 0].astype(int)].all()


def test_a_subset_of_kinds_draws_the_same_prompts_as_far_as_it_goes():
    mask = square_mask(64, 64, 10, 10, 40, 30)
    every = evaluation.object_prompts(mask, np.random.default_rng(1), 3).by_kind
    some = evaluation.object_prompts(mask, np.random.default_rng(1), 3, ("gt_box", "noisy_box"))
    assert list(some.by_kind) == ["gt_box", "noisy_box"]
    np.testing.assert_array_equal(some.by_kind["noisy_box"], every["noisy_box"])
    with pytest.raises(ValueError, match="unknown prompt kind"):
        evaluation.object_prompts(mask, np.random.default_rng(1), 3, ("coarse_mask",))


def test_a_box_no_noisy_draw_can_fit_keeps_the_gt_box():
    box = np.array([5.0, 5, 5, 9], np.float32)  # zero width: every IoU is 0
    boxes = evaluation.noisy_boxes(box, np.random.default_rng(0), 3, (20, 20))
    assert boxes.shape == (3, 4) and boxes.dtype == np.float32
    assert (boxes == box).all()


def test_an_images_prompts_depend_on_the_seed_and_its_index_only():
    masks = np.stack([square_mask(48, 48, 4 * i, 4 * i, 4 * i + 12, 4 * i + 10) for i in range(4)])
    sample = Sample(np.zeros((48, 48, 3), np.uint8), masks, "s")

    def noisy(index: int, seed: int, max_objects: int | None = None) -> list[np.ndarray]:
        _, prompts = evaluation.image_prompts(sample, index, seed, 2, max_objects)
        return [p.by_kind["noisy_box"] for p in prompts]

    objects, _ = evaluation.image_prompts(sample, 3, seed=0, n_prompts=2, max_objects=2)
    assert len(objects) == 2 and objects.tolist() == sorted(objects.tolist())
    assert len(noisy(3, 0)) == 4  # no max_objects: every object
    np.testing.assert_array_equal(noisy(3, 0), noisy(3, 0))
    assert not np.array_equal(noisy(3, 0), noisy(4, 0))
    assert not np.array_equal(noisy(3, 0), noisy(3, 1))


# --- scoring ----------------------------------------------------------------------------------


def test_object_scores_equal_full_image_metrics():
    rng = np.random.default_rng(0)
    hw = (300, 420)
    gt = square_mask(*hw, 100, 80, 260, 200)
    masks = np.stack(
        [square_mask(*hw, 100 + d, 80 - d, 250 + 2 * d, 210) for d in (0, 5, 12)]
        + [rng.random(hw) < 0.01]  # scattered pixels over the whole image
    )
    masks[1, 0:3, 0:5] = True  # touches the image corner
    score = evaluation.score_object(gt, masks)
    assert score.ious == tuple(metrics.mask_iou(m, gt) for m in masks)
    assert score.bious == tuple(metrics.boundary_iou(m, gt) for m in masks)
    assert score.st == metrics.stability(list(masks))
    assert score.n == 4 and score.iou == float(np.mean(score.ious))
    assert 0 < score.iou < 1 and 0 < score.st < 1


def test_scores_of_known_masks():
    # GT: [0,10)x[0,10) in a 20x20 image. A = the GT (IoU 1), B twice as tall (IoU 0.5).
    # ST = (IoU(A, A∪B) + IoU(B, A∪B)) / 2 = (0.5 + 1) / 2 = 0.75.
    gt = square_mask(20, 20, 0, 0, 10, 10)
    score = evaluation.score_object(gt, np.stack([gt, square_mask(20, 20, 0, 0, 10, 20)]))
    assert score.ious == (1.0, 0.5) and score.st == 0.75
    # d = max(1, round(0.02 * 28.3)) = 1: the band is the mask minus its 1-px erosion. B's band
    # shares the top row and the left/right columns of rows 1..9 with the GT's.
    gt_band, b_band, shared = 10 + 10 + 8 + 8, 10 + 10 + 18 + 18, 10 + 9 + 9
    assert score.bious == pytest.approx((1.0, shared / (gt_band + b_band - shared)))
    single = evaluation.score_object(gt, square_mask(20, 20, 0, 0, 10, 20)[None])
    assert single.st == 1.0 and single.iou == 0.5
    with pytest.raises(ValueError, match="at least one"):
        evaluation.score_object(gt, np.zeros((0, 20, 20), bool))


def test_summaries_weigh_every_object_equally_and_count_st_where_asked():
    many = evaluation.ObjectScore((0.9, 0.8, 1.0), (0.7, 0.8, 0.9), st=0.7)
    one = evaluation.ObjectScore((0.5,), (0.4,), st=1.0)
    both = evaluation.summarize([many, one])
    assert both["miou"] == pytest.approx(0.7) and both["mbiou"] == pytest.approx(0.6)
    assert both["st"] == pytest.approx(0.85) and both["objects"] == 2 and both["prompts"] == 4
    assert evaluation.summarize([many, one], st_min_prompts=2)["st"] == pytest.approx(0.7)
    assert evaluation.summarize([one], st_min_prompts=2)["st"] is None
    assert evaluation.summarize([]) == {
        "miou": None,
        "mbiou": None,
        "st": None,
        "objects": 0,
        "prompts": 0,
    }


# --- decoding and the whole protocol ----------------------------------------------------------

IMAGE = np.random.default_rng(0).integers(0, 255, size=(96, 128, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model() -> Iterator[StableSam]:
    """A random-weight mini SAM with plugins, decoding on one thread (2 were ~8x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield build_stable_sam("mini", device="cpu")
    torch.set_num_threads(threads)


@pytest.mark.parametrize("policy", ["single", "best", "auto"])
def test_decoding_gives_the_predictors_answer_under_its_policy(model, policy):
    predictor = StableSamPredictor(model, multimask_policy=policy)
    row = evaluation.EvalModel("m", predictor)
    embedding = predictor.embed(IMAGE)
    for prompt, asked in (
        (np.array([[[40.0, 30.0]]]), {"point_coords": [[40.0, 30.0]], "point_labels": [1]}),
        (np.array([[10.0, 10, 90, 70]]), {"box_xyxy": [10.0, 10, 90, 70]}),
    ):
        masks, alpha = evaluation.decode(row, embedding, prompt)
        own = predictor.predict(IMAGE, **asked)
        np.testing.assert_array_equal(masks, own.masks)
        np.testing.assert_array_equal(alpha, own.alpha[None])


def test_best_of_three_differs_from_single_here(model):
    # Otherwise the test above could not tell the policies apart.
    click = {"point_coords": [[40.0, 30.0]], "point_labels": [1]}
    best = StableSamPredictor(model, multimask_policy="best").predict(IMAGE, **click)
    single = StableSamPredictor(model, multimask_policy="single").predict(IMAGE, **click)
    assert not np.array_equal(best.masks, single.masks)


def test_decoding_in_chunks_keeps_every_prompt_in_order(model):
    row = evaluation.EvalModel("m", StableSamPredictor(model))
    embedding = row.predictor.embed(IMAGE)
    boxes = np.array([[10.0, 10, 90, 70], [0, 0, 128, 96], [50, 20, 60, 40]])
    masks, alpha = evaluation.decode(row, embedding, boxes, max_batch=2)
    first, first_alpha = evaluation.decode(row, embedding, boxes[:2])
    last, last_alpha = evaluation.decode(row, embedding, boxes[2:])
    np.testing.assert_array_equal(masks, np.concatenate([first, last]))
    np.testing.assert_array_equal(alpha, np.concatenate([first_alpha, last_alpha]))
    empty, no_alpha = evaluation.decode(row, embedding, np.zeros((0, 4)))
    assert empty.shape == (0, 96, 128) and no_alpha is None


def test_evaluate_scores_every_object_and_kind_with_shared_prompts(model):
    masks = np.stack([square_mask(96, 128, 10, 10, 50, 40), square_mask(96, 128, 60, 50, 120, 90)])
    data = [Sample(IMAGE, masks, "a"), Sample(IMAGE, masks[:0], "empty"), Sample(IMAGE, masks, "b")]
    auto = evaluation.EvalModel("auto", StableSamPredictor(model))
    single = auto.with_policy("single", "single")
    kinds = ("gt_box", "points_1")
    scores = evaluation.evaluate([auto, single], data, kinds, n_prompts=2)
    for row in scores.values():
        assert list(row.objects) == list(kinds)
        assert [s.n for s in row.objects["gt_box"]] == [1] * 4  # 2 images x 2 objects
        assert [s.n for s in row.objects["points_1"]] == [2] * 4
        assert len(row.alpha1["points_1"]) == 8
    assert scores["auto"].objects["gt_box"] == scores["single"].objects["gt_box"]
    assert scores["auto"].objects["points_1"] != scores["single"].objects["points_1"]
    # Image "b" (index 2): its own prompts, decoded in one batch, scored object by object.
    _, prompts = evaluation.image_prompts(data[2], 2, 0, 2, kinds=kinds)
    batch = np.concatenate([p.by_kind["points_1"] for p in prompts])
    decoded, _ = evaluation.decode(auto, auto.predictor.embed(IMAGE), batch)
    assert scores["auto"].objects["points_1"][2:] == [
        evaluation.score_object(masks[0], decoded[:2]),
        evaluation.score_object(masks[1], decoded[2:]),
    ]


def test_the_promotion_check_is_the_protocol_with_one_prompt_per_kind(model):
    from training.jobs import EVAL_PROMPTS, evaluate_plugins

    masks = np.stack([square_mask(96, 128, 10, 10, 50, 40), square_mask(96, 128, 60, 50, 120, 90)])
    data = [Sample(IMAGE, masks, "a"), Sample(IMAGE[::-1].copy(), masks, "b")]
    predictor = StableSamPredictor(model)
    result = evaluate_plugins(predictor, data, model.plugins, seed=3)
    assert list(result) == [f"miou_{kind}" for kind in EVAL_PROMPTS] + ["robust_miou", "objects"]
    assert EVAL_PROMPTS == ("gt_box", "noisy_box", "points_1", "points_3")
    row = evaluation.EvalModel("v", predictor, model.plugins)
    scores = evaluation.evaluate([row], data, EVAL_PROMPTS, n_prompts=1, seed=3)["v"].objects
    for kind in EVAL_PROMPTS:
        assert result[f"miou_{kind}"] == round(100 * evaluation.summarize(scores[kind])["miou"], 3)
    mean = np.mean([100 * evaluation.summarize(scores[k])["miou"] for k in EVAL_PROMPTS])
    assert result["robust_miou"] == round(float(mean), 3) and result["objects"] == 4.0
