"""User-study evaluator: export parsing, matching and metrics on hand-computed tiny cases."""

from __future__ import annotations

import numpy as np
import pytest
from user_study_support import BoxFiller

from training.evaluation import EvalModel, ObjectPrompts, ObjectScore
from training.user_study.box_quality import (
    equivalent_noise_scale,
    iou_histogram,
    simulated_mean_iou,
    summarize,
)
from training.user_study.ground_truth import GtImage, GtObject, from_brush_masks
from training.user_study.ls_export import annotator_name, image_key_for, parse_export
from training.user_study.matching import match_boxes
from training.user_study.segmentation import (
    StudyObject,
    aggregate,
    evaluate_segmentation,
)


def square_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """(h, w) bool, True on columns x0..x1-1 and rows y0..y1-1."""
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rect(x0: float, y0: float, x1: float, y1: float, width: int, height: int, **extra) -> dict:
    """A Label Studio rectangle region for pixel box ``xyxy`` on a ``width`` x ``height`` image."""
    value = {
        "x": 100 * x0 / width,
        "y": 100 * y0 / height,
        "width": 100 * (x1 - x0) / width,
        "height": 100 * (y1 - y0) / height,
        "rotation": 0,
        "rectanglelabels": ["target"],
    }
    value.update(extra)
    return {
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "value": value,
    }


def task(tid: int, annotations: list, target: str | None = "1", name: str = "img") -> dict:
    data = {"image": f"/data/upload/3/0a1b2c3d-{name}_t.png", "image_name": f"{name}.jpg"}
    if target is not None:
        data["target_id"] = target
    return {"id": tid, "data": data, "annotations": annotations}


def ann(aid: int, who: str, result: list, **extra) -> dict:
    return {"id": aid, "completed_by": {"id": aid, "email": who}, "result": result, **extra}


def test_image_key_is_the_original_name_or_the_upload_name_without_prefix():
    assert (
        image_key_for({"image": "/data/upload/3/0a1b2c3d-cat.jpg", "image_name": "dog.png"})
        == "dog"
    )
    assert image_key_for({"image": "/data/upload/3/0a1b2c3d-cat.jpg"}) == "cat"
    assert image_key_for({"image": "/data/local-files/?d=photos/bird.jpeg"}) == "bird"


def test_annotators_are_named_by_email_or_id():
    assert annotator_name({"id": 4, "email": "a@x"}) == "a@x"
    assert annotator_name(4) == "user4"
    assert annotator_name(4, {4: "b@x"}) == "b@x"


# --- export edge cases ------------------------------------------------------------------------


def test_export_edge_cases_are_counted_not_raised():
    W = H = 100
    tasks = [
        task(1, [ann(1, "a", [rect(10, 10, 30, 30, W, H)], lead_time=3.5)]),
        task(2, [ann(2, "a", [], was_cancelled=True)]),  # skipped
        task(3, [ann(3, "a", [])]),  # submitted with no box
        task(
            4,
            [  # duplicate: the newer annotation wins
                ann(4, "a", [rect(0, 0, 5, 5, W, H)], updated_at="2026-01-01T00:00:00Z"),
                ann(5, "a", [rect(10, 10, 20, 20, W, H)], updated_at="2026-01-02T00:00:00Z"),
            ],
        ),
        task(5, [ann(6, "a", [rect(0, 0, 5, 5, W, H), rect(40, 40, 60, 60, W, H)])]),  # 2 boxes
        task(6, [ann(7, "a", [rect(120, 10, 130, 20, W, H)])]),  # outside
        task(7, [ann(8, "a", [rect(-10, 10, 20, 20, W, H)])]),  # clipped
        task(8, []),
    ]
    region = rect(10, 10, 20, 20, W, H)
    del region["original_width"], region["original_height"]
    tasks.append(task(9, [ann(9, "a", [region])], name="nosize"))
    broken = {
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "value": {"x": 1},
    }
    tasks.append(task(10, [ann(10, "a", [broken])]))
    export = parse_export(tasks)
    c = export.counts
    assert (c.tasks, c.annotations, c.tasks_without_annotations) == (10, 10, 1)
    assert (c.skipped, c.empty, c.duplicates, c.extra_boxes) == (1, 1, 1, 1)
    assert (c.outside, c.clipped, c.unknown_size, c.with_lead_time) == (1, 1, 1, 1)
    assert c.malformed == 1  # a rectangle without y/width/height
    assert c.boxes == 4 == len(export.boxes)
    by_task = {b.task_id: b for b in export.boxes}
    np.testing.assert_allclose(by_task[4].box_xyxy, [10, 10, 20, 20])  # the newer one
    np.testing.assert_allclose(by_task[5].box_xyxy, [40, 40, 60, 60])  # the last one drawn
    np.testing.assert_allclose(by_task[7].box_xyxy, [0, 10, 20, 20])
    assert by_task[1].lead_time_s == 3.5 and by_task[1].target_id == "1"
    # the image size of the ground truth fills in a missing original_width/height
    export = parse_export(tasks, image_sizes={"nosize": (H, W)})
    assert export.counts.unknown_size == 0 and export.counts.boxes == 5


def test_brush_ground_truth_is_read_from_the_export_and_not_taken_as_a_user_box():
    from label_studio_sdk.converter.brush import mask2rle

    mask = square_mask(6, 8, 2, 1, 5, 4)
    brush = {
        "type": "brushlabels",
        "original_width": 8,
        "original_height": 6,
        "value": {
            "format": "rle",
            "rle": mask2rle(mask.astype(np.uint8) * 255),
            "brushlabels": ["cat"],
        },
    }
    tasks = [task(1, [ann(1, "gt@x", [brush]), ann(2, "u@x", [rect(2, 1, 5, 4, 8, 6)])])]
    export = parse_export(tasks, read_brush_gt=True)
    assert export.counts.ground_truth_annotations == 1 and export.counts.boxes == 1
    gt = from_brush_masks(export.brush_masks)
    np.testing.assert_array_equal(gt["img"].objects["1"].mask, mask)
    assert gt["img"].objects["1"].label == "cat"
    matching = match_boxes(export.boxes, gt)
    assert matching.matched[0].box_iou == pytest.approx(1.0)
    # restricted to another annotator, the brush annotation is ignored (it has no box)
    export = parse_export(tasks, read_brush_gt=True, gt_annotator="someone@else")
    assert export.counts.ground_truth_annotations == 0 and export.counts.empty == 1


# --- matching ---------------------------------------------------------------------------------


def gt_two_objects() -> dict[str, GtImage]:
    """A 40x40 image: object '1' on [0,10)x[0,10), object '2' on [20,30)x[20,40)."""
    objects = {
        "1": GtObject("1", square_mask(40, 40, 0, 0, 10, 10)),
        "2": GtObject("2", square_mask(40, 40, 20, 20, 30, 40)),
    }
    return {"img": GtImage("img", 40, 40, objects)}


def test_box_of_a_named_target_belongs_to_it_whatever_it_overlaps():
    tasks = [task(1, [ann(1, "a", [rect(20, 20, 30, 40, 40, 40)])], target="1")]
    matching = match_boxes(parse_export(tasks).boxes, gt_two_objects())
    (m,) = matching.matched
    assert (m.object_id, m.by_target, m.box_iou) == ("1", True, 0.0)


def test_box_iou_of_known_boxes():
    # GT box of object 1 is [0, 0, 10, 10]; the user box [5, 0, 15, 10] overlaps half: 50 / 150
    tasks = [task(1, [ann(1, "a", [rect(5, 0, 15, 10, 40, 40)])], target="1")]
    (m,) = match_boxes(parse_export(tasks).boxes, gt_two_objects()).matched
    assert m.box_iou == pytest.approx(1 / 3)


def test_unnamed_targets_match_greedily_by_iou_one_to_one():
    # A and B both overlap object 1 (IoU 0.81 and 0.64): greedy gives it to A, and B, which
    # overlaps nothing else, stays unmatched; C takes object 2; the far box matches nothing.
    a = rect(0, 0, 9, 9, 40, 40)  # IoU with object 1: 81/100
    b = rect(2, 2, 10, 10, 40, 40)  # IoU with object 1: 64/100; with object 2: 0
    c = rect(20, 22, 30, 40, 40, 40)  # IoU with object 2: 180/200 = 0.9
    far = rect(35, 0, 40, 5, 40, 40)  # overlaps nothing
    tasks = [task(1, [ann(1, "a", [a, b, c, far])], target=None)]
    matching = match_boxes(parse_export(tasks).boxes, gt_two_objects())
    pairs = sorted((m.object_id, round(m.box_iou, 4)) for m in matching.matched)
    assert pairs == [("1", 0.81), ("2", 0.9)]
    assert len(matching.unmatched) == 2
    assert all("no free ground-truth box" in u.reason for u in matching.unmatched)


def test_each_annotator_is_matched_independently():
    a = rect(0, 0, 10, 10, 40, 40)
    tasks = [task(1, [ann(1, "a", [a]), ann(2, "b", [a])], target=None)]
    matching = match_boxes(parse_export(tasks).boxes, gt_two_objects())
    assert sorted(m.box.annotator for m in matching.matched) == ["a", "b"]
    assert all(m.object_id == "1" for m in matching.matched)


def test_unknown_image_or_target_is_listed_as_unmatched():
    tasks = [
        task(1, [ann(1, "a", [rect(0, 0, 10, 10, 40, 40)])], target="9"),
        task(2, [ann(2, "a", [rect(0, 0, 10, 10, 40, 40)])], name="other"),
        task(3, [ann(3, "a", [rect(0, 0, 10, 10, 50, 40)])]),  # wrong image size
    ]
    matching = match_boxes(parse_export(tasks).boxes, gt_two_objects())
    reasons = sorted(u.reason for u in matching.unmatched)
    assert not matching.matched and len(reasons) == 3
    assert "image 'other' not in the ground truth" in reasons
    assert "target '9' not in the ground truth" in reasons
    assert any("differs from the ground truth" in r for r in reasons)


# --- box quality ------------------------------------------------------------------------------


def test_histogram_bins_are_tenths_with_the_last_bin_closed():
    hist = iou_histogram([0.05, 0.1, 0.55, 0.99, 1.0, 0.0])
    assert hist["counts"] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert hist["edges"][0] == 0.0 and hist["edges"][-1] == 1.0 and len(hist["edges"]) == 11


def test_summary_statistics():
    s = summarize([0.2, 0.4, 0.9])
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.5) and s["median"] == pytest.approx(0.4)
    assert summarize([])["mean"] is None
    assert summarize([None, 1.0])["n"] == 1


def test_equivalent_noise_scale_recovers_the_scale_that_made_the_iou():
    boxes = [np.array([10.0, 10, 50, 40]), np.array([0.0, 0, 30, 60])]
    sizes = [(100, 100), (100, 100)]
    target = simulated_mean_iou(boxes, sizes, 0.3, samples_per_box=256, seed=1)
    assert 0.5 < target < 0.9
    found = equivalent_noise_scale(target, boxes, sizes, samples_per_box=256, seed=1)
    assert found["bound"] is None
    assert found["scale"] == pytest.approx(0.3, abs=0.01)
    assert simulated_mean_iou(boxes, sizes, 0.0) == pytest.approx(1.0)


def test_equivalent_noise_scale_reports_a_bound_when_out_of_reach():
    boxes, sizes = [np.array([10.0, 10, 50, 40])], [(100, 100)]
    found = equivalent_noise_scale(0.01, boxes, sizes, samples_per_box=64, max_scale=1.0)
    assert found["bound"] == ">max" and found["scale"] == 1.0
    assert equivalent_noise_scale(1.0, boxes, sizes)["scale"] == 0.0


# --- segmentation aggregation -----------------------------------------------------------------


def study_object(user_boxes: list[list[float]], **more_boxes: np.ndarray) -> StudyObject:
    """Object "1" of image "img": GT box [0,10)x[0,10), boxes by annotators a, b, ..."""
    boxes = {"gt_box": np.array([[0.0, 0, 10, 10]]), "user": np.array(user_boxes), **more_boxes}
    annotators = ["a", "b", "c"][: len(user_boxes)]
    return StudyObject("img", "1", annotators, ObjectPrompts(by_kind=boxes))


def test_miou_mbiou_and_st_of_known_masks():
    # GT: [0,10)x[0,10) in a 20x20 image. User boxes: A = the GT box (IoU 1), B = twice as tall
    # (IoU 0.5). ST = (IoU(A, A∪B) + IoU(B, A∪B)) / 2 = (0.5 + 1) / 2 = 0.75.
    gt_mask = square_mask(20, 20, 0, 0, 10, 10)
    gt = {"img": GtImage("img", 20, 20, {"1": GtObject("1", gt_mask)})}
    obj = study_object(
        [[0.0, 0, 10, 10], [0.0, 0, 10, 20]],
        noisy=np.array([[0.0, 0, 20, 10]]),  # IoU 0.5, a single prompt: no ST
    )
    image = np.zeros((20, 20, 3), np.uint8)
    model = EvalModel("box", BoxFiller())
    result = evaluate_segmentation({"box": model}, [obj], gt, lambda key: image)
    scores = result["box"][("img", "1")]
    assert scores["gt_box"].iou == pytest.approx(1.0) and scores["gt_box"].n == 1
    assert scores["user"].ious == pytest.approx([1.0, 0.5])
    assert scores["user"].iou == pytest.approx(0.75)
    assert scores["user"].st == pytest.approx(0.75)
    assert scores["noisy"].iou == pytest.approx(0.5) and scores["noisy"].n == 1
    # boundary IoU: 20x20 image, d = max(1, round(0.02 * 28.3)) = 1, so the band is the mask
    # minus its 1-px erosion. A's band equals the GT band (1.0); B's band (rows 0..19 outline
    # of [0,10)x[0,20)) shares the top row and the left/right columns of rows 0..9 with it.
    gt_band = 10 + 10 + 8 + 8  # 36 px
    b_band = 10 + 10 + 18 + 18  # 56 px
    shared = 10 + 9 + 9  # top row, left and right columns of rows 1..9
    expected_b = shared / (gt_band + b_band - shared)
    assert scores["user"].biou == pytest.approx((1.0 + expected_b) / 2)
    table = aggregate(result["box"])
    assert table["user"]["miou"] == pytest.approx(0.75) and table["user"]["st"] == pytest.approx(
        0.75
    )
    assert table["gt_box"]["st"] is None and table["noisy"]["st"] is None
    assert table["user"]["prompts"] == 2 and table["noisy"]["miou"] == pytest.approx(0.5)


def test_a_source_without_boxes_is_not_scored():
    gt_mask = square_mask(20, 20, 0, 0, 10, 10)
    gt = {"img": GtImage("img", 20, 20, {"1": GtObject("1", gt_mask)})}
    obj = study_object([[0.0, 0, 10, 10]])  # no noisy boxes
    image = np.zeros((20, 20, 3), np.uint8)
    result = evaluate_segmentation(
        {"box": EvalModel("box", BoxFiller())}, [obj], gt, lambda k: image
    )
    assert set(result["box"][("img", "1")]) == {"gt_box", "user"}
    assert aggregate(result["box"])["noisy"] == {
        "miou": None,
        "mbiou": None,
        "st": None,
        "objects": 0,
        "prompts": 0,
    }


def test_an_image_of_another_size_than_its_ground_truth_is_refused():
    gt = {"img": GtImage("img", 20, 20, {"1": GtObject("1", square_mask(20, 20, 0, 0, 10, 10))})}
    image = np.zeros((20, 24, 3), np.uint8)
    with pytest.raises(ValueError, match="differs from its ground truth"):
        evaluate_segmentation(
            {"box": EvalModel("box", BoxFiller())},
            [study_object([[0.0, 0, 9, 9]])],
            gt,
            lambda k: image,
        )


def test_aggregate_weighs_every_object_equally():
    per_object = {
        ("i", "1"): {"user": ObjectScore((0.9, 0.8, 1.0), (0.7, 0.8, 0.9), st=0.7)},
        ("i", "2"): {"user": ObjectScore((0.5,), (0.4,), st=1.0)},
    }
    table = aggregate(per_object)
    assert table["user"]["miou"] == pytest.approx(0.7)
    assert table["user"]["mbiou"] == pytest.approx(0.6)
    assert table["user"]["st"] == pytest.approx(0.7)  # only objects with >= 2 boxes
    assert table["user"]["objects"] == 2 and table["user"]["prompts"] == 4
    assert table["noisy"]["miou"] is None


def test_per_annotator_scores_follow_each_persons_boxes():
    from training.user_study.segmentation import by_annotator

    gt_mask = square_mask(20, 20, 0, 0, 10, 10)
    gt = {"img": GtImage("img", 20, 20, {"1": GtObject("1", gt_mask)})}
    obj = study_object([[0.0, 0, 10, 10], [0.0, 0, 10, 20]])
    image = np.zeros((20, 20, 3), np.uint8)
    model = EvalModel("box", BoxFiller())
    result = evaluate_segmentation({"box": model}, [obj], gt, lambda key: image)
    rows = by_annotator([obj], result["box"])
    assert rows["a"]["miou"] == pytest.approx(1.0) and rows["a"]["mbiou"] == pytest.approx(1.0)
    assert rows["b"]["miou"] == pytest.approx(0.5) and rows["b"]["n"] == 1


# --- consensus of several annotators ----------------------------------------------------------


def consensus_study() -> tuple[dict[str, GtImage], list[StudyObject]]:
    """A 20x20 image. Object "1" (GT [0,10)x[0,10)) boxed by three annotators: A = the GT box,
    B = A shifted right by 1 px (they agree), C = [10,20)x[10,20) (off). Object "2" (GT
    [14,18)x[2,6)) boxed by one annotator only."""
    objects = {
        "1": GtObject("1", square_mask(20, 20, 0, 0, 10, 10)),
        "2": GtObject("2", square_mask(20, 20, 14, 2, 18, 6)),
    }
    gt = {"img": GtImage("img", 20, 20, objects)}
    three = study_object([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [10.0, 10, 20, 20]])
    one = StudyObject(
        "img",
        "2",
        ["a"],
        ObjectPrompts(
            by_kind={"gt_box": np.array([[14.0, 2, 18, 6]]), "user": np.array([[14.0, 2, 18, 6]])}
        ),
    )
    return gt, [three, one]


def test_consensus_of_three_boxes_is_their_majority_mask():
    from stable_sam import metrics
    from training.user_study.consensus import CONSENSUS

    gt, objects = consensus_study()
    image = np.zeros((20, 20, 3), np.uint8)
    result = evaluate_segmentation(
        {"box": EvalModel("box", BoxFiller())}, objects, gt, lambda k: image
    )
    consensus = result["box"][("img", "1")][CONSENSUS]
    # Pixels in at least 2 of the 3 masks: A ∩ B = columns 1..9, rows 0..9 (C overlaps neither).
    majority = square_mask(20, 20, 1, 0, 10, 10)
    gt_mask = gt["img"].objects["1"].mask
    assert consensus.ious == pytest.approx((0.9,))  # 90 of the GT's 100 px, nothing outside
    assert consensus.iou == pytest.approx(metrics.mask_iou(majority, gt_mask))
    assert consensus.biou == pytest.approx(metrics.boundary_iou(majority, gt_mask))
    # agreement: IoU with the majority of A (90/100), B (90/100) and C (0), averaged
    assert consensus.agreement == pytest.approx(0.6)
    assert CONSENSUS not in result["box"][("img", "2")]  # one box: no consensus


def test_consensus_is_compared_with_one_annotator_on_the_same_objects_only():
    from training.user_study.consensus import consensus_table

    gt, objects = consensus_study()
    image = np.zeros((20, 20, 3), np.uint8)
    result = evaluate_segmentation(
        {"box": EvalModel("box", BoxFiller())}, objects, gt, lambda k: image
    )
    table = consensus_table(result["box"])
    # one annotator on object "1": A 1.0, B 90/110, C 0; object "2" (its one box: IoU 1.0) is
    # left out of both numbers, and counted
    single = (1.0 + 90 / 110 + 0.0) / 3
    assert table["single_miou"] == pytest.approx(single)
    assert table["consensus_miou"] == pytest.approx(0.9)
    assert table["gain_points"] == pytest.approx(100 * (0.9 - single))
    assert table["agreement"] == pytest.approx(0.6)
    assert (table["objects"], table["boxes"], table["single_box_objects"]) == (1, 3, 1)
    assert (table["min_boxes"], table["max_boxes"]) == (3, 3)


def test_without_objects_boxed_twice_there_is_nothing_to_compare():
    from training.user_study.consensus import consensus_table

    gt, objects = consensus_study()
    image = np.zeros((20, 20, 3), np.uint8)
    model = {"box": EvalModel("box", BoxFiller())}
    table = consensus_table(evaluate_segmentation(model, objects[1:], gt, lambda k: image)["box"])
    assert table["objects"] == 0 and table["single_box_objects"] == 1
    assert table["consensus_miou"] is None and table["gain_points"] is None
