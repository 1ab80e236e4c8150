"""Batch /predict turns the boxes a task already has into masks: which annotations and
predictions count, boxes skipped and counted, objects matched across annotators, consensus."""

from __future__ import annotations

import numpy as np
import pytest
from backend_support import CONFIG, FakeLabelStudio, H, W, png_bytes, scene
from fastapi.testclient import TestClient

from backend.app import create_app
from labelstudio.brush import rle_to_mask
from runtime.settings import Settings
from runtime.task_boxes import (
    TaskBox,
    consensus_mask,
    group_boxes,
    task_boxes,
    task_sources,
)

SIZES = {"picture": (W, H)}


def rect(x, y, w, h, label="Car", rotation=0, to_name="picture"):
    return {"type": "rectanglelabels", "from_name": "boxes", "to_name": to_name,
            "original_width": W, "original_height": H,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
                      "rectanglelabels": [label]}}  # fmt: skip


def annotation(id_, user, result, cancelled=False, updated="2026-01-01T00:00:00"):
    return {"id": id_, "completed_by": user, "result": result, "was_cancelled": cancelled,
            "updated_at": updated}  # fmt: skip


# -- which sources count ---------------------------------------------------------------------------


def test_the_latest_non_cancelled_annotation_counts():
    task = {"annotations": [
        annotation(1, 7, [rect(1, 1, 5, 5)], updated="2026-01-01"),
        annotation(2, 8, [rect(2, 2, 5, 5)], updated="2026-01-03"),
        annotation(3, 9, [rect(3, 3, 5, 5)], cancelled=True, updated="2026-01-04"),
    ]}  # fmt: skip
    assert [name for name, _ in task_sources(task, set())] == ["annotation 2 by 8"]


def test_with_overlap_every_annotators_latest_annotation_counts():
    task = {"overlap": 3, "annotations": [
        annotation(1, 7, [], updated="2026-01-01"),
        annotation(2, 8, [], updated="2026-01-02"),
        annotation(3, 7, [], updated="2026-01-03"),  # 7 again: replaces 1
    ]}  # fmt: skip
    names = [name for name, _ in task_sources(task, set())]
    assert names == ["annotation 2 by 8", "annotation 3 by 7"]


def test_predictions_of_other_model_versions_count_ours_do_not():
    task = {"predictions": [
        {"id": 5, "model_version": "yolo-v8", "result": [rect(1, 1, 5, 5)]},
        {"id": 6, "model_version": "stable-sam-x", "result": []},
    ]}  # fmt: skip
    assert [n for n, _ in task_sources(task, {"stable-sam-x"})] == ["prediction 5 (yolo-v8)"]


def test_bad_boxes_are_skipped_and_counted():
    result = [
        rect(10, 10, 20, 20),
        rect(10, 10, 0, 20),  # zero area
        rect(10, 10, 20, 20, to_name="elsewhere"),
        {"type": "rectanglelabels", "to_name": "picture", "value": {"x": "left"}},
        {"type": "rectanglelabels", "to_name": "picture",
         "value": {"x": 1, "y": 1, "width": 2, "height": 2, "rectanglelabels": []}},
        {"type": "keypointlabels", "value": {}},  # not a box: ignored, not counted
    ]  # fmt: skip
    boxes = task_boxes(task_sources({"annotations": [annotation(1, 7, result)]}, set()), SIZES)
    assert boxes.count == 1
    assert sum(boxes.skipped.values()) == 4, boxes.skipped


def test_a_rotated_box_is_its_axis_aligned_hull_and_flagged():
    task = {"annotations": [annotation(1, 7, [rect(40, 20, 20, 20, rotation=45)])]}
    boxes = task_boxes(task_sources(task, set()), SIZES)
    [box] = boxes.sources[0]
    assert box.rotated
    x0, y0, x1, y1 = box.box_xyxy
    assert x0 < 0.40 * W < x1 and y1 - y0 > 0.20 * H


# -- objects and consensus -------------------------------------------------------------------------


def tb(x0, y0, x1, y1, label="Car", source="a"):
    return TaskBox(label, "picture", np.array([x0, y0, x1, y1], np.float32), source)


def test_boxes_of_one_object_from_different_sources_are_one_group():
    a = [tb(10, 10, 50, 50), tb(60, 10, 90, 40)]
    b = [tb(12, 8, 52, 49, source="b"), tb(100, 60, 120, 90, source="b")]
    c = [tb(11, 11, 48, 52, source="c"), tb(12, 12, 49, 50, label="Tree", source="c")]
    groups = group_boxes([a, b, c])
    sizes = sorted(len(g) for g in groups)
    assert sizes == [1, 1, 1, 3]
    [three] = [g for g in groups if len(g) == 3]
    assert {b.source for b in three} == {"a", "b", "c"}


def test_one_source_never_puts_two_boxes_in_one_object():
    groups = group_boxes(
        [[tb(10, 10, 50, 50)], [tb(10, 10, 50, 50, source="b"), tb(11, 11, 50, 50, source="b")]]
    )
    assert sorted(len(g) for g in groups) == [1, 2]


def test_consensus_is_the_pixel_majority_and_agreement_the_mean_iou():
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :, :6] = True
    masks[1, :, :5] = True
    masks[2, :, :4] = True
    mask, agreement = consensus_mask(masks)
    assert mask[:, :5].all() and not mask[:, 5:].any()
    assert agreement == pytest.approx((5 / 6 + 1 + 4 / 5) / 3)
    single, one = consensus_mask(masks[:1])
    assert one == 1.0 and np.array_equal(single, masks[0])


# -- through /predict --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory, random_mini_base):
    with FakeLabelStudio() as ls:
        ls.files["scene.png"] = png_bytes(scene(H, W)[0])
        settings = Settings(
            label_studio_url=ls.url, sam_model_type="mini", sam_checkpoint=random_mini_base,
            sam_plugins="none", preload_model=False, device="cpu",
            versions_dir=tmp_path_factory.mktemp("versions"),
        )  # fmt: skip
        with TestClient(create_app(settings)) as test_client:
            yield test_client


def batch(client, tasks, config=CONFIG):
    body = {"tasks": tasks, "project": "3.1700000000", "label_config": config, "params": {}}
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def test_batch_predict_turns_a_tasks_boxes_into_brush_regions_with_their_labels(client):
    task = {"id": 1, "data": {"img": "/public/scene.png"},
            "annotations": [annotation(1, 7, [rect(25, 25, 50, 50), rect(5, 5, 10, 10, "Tree")])]}  # fmt: skip
    [entry] = batch(client, [task])
    assert entry["model_version"]
    labels = sorted(r["value"]["brushlabels"][0] for r in entry["result"])
    assert labels == ["Car", "Tree"]
    for region in entry["result"]:
        assert region["type"] == "brushlabels" and region["from_name"] == "masks"
        assert rle_to_mask(region["value"]["rle"], H, W).shape == (H, W)


def test_crowd_boxes_of_one_object_give_one_consensus_region(client):
    task = {"id": 2, "overlap": 3, "data": {"img": "/public/scene.png"}, "annotations": [
        annotation(1, 7, [rect(25, 25, 50, 50)]),
        annotation(2, 8, [rect(24, 27, 52, 47)]),
        annotation(3, 9, [rect(26, 24, 49, 52)]),
    ]}  # fmt: skip
    [entry] = batch(client, [task])
    [region] = entry["result"]
    assert region["meta"]["text"][0].startswith("consensus of 3 boxes")
    assert 0.0 <= region["score"] <= 1.0


def test_tasks_without_boxes_keep_the_empty_answer(client):
    tasks = [{"id": 3, "data": {"img": "/public/scene.png"}},
             {"id": 4, "data": {"img": "/public/scene.png"},
              "predictions": [{"id": 9, "model_version": "x", "result": [
                  {"type": "choices", "value": {"choices": ["a"]}}]}]}]  # fmt: skip
    assert [e["result"] for e in batch(client, tasks)] == [[], []]


def test_labels_no_mask_tag_offers_are_counted_under_one_reason():
    # Labels come from the network: each one its own counter would grow without bound.
    from labelstudio.label_config import parse_label_config
    from runtime.box_masks import BoxConverter

    result = [rect(5 + k, 5, 5, 5, f"label-{k}") for k in range(5)]
    task = {"id": 1, "data": {"img": "x"}, "annotations": [annotation(1, 7, result)]}
    images = type("Images", (), {"load": lambda self, value, task_id: loaded})()
    loaded = type("Loaded", (), {"width": W, "height": H, "rgb": None, "sha256": "x"})()
    out = BoxConverter(None, None, "v", images).convert(task, parse_label_config(CONFIG))
    assert out.answer is None and dict(out.skipped) == {"label no mask tag offers": 5}


def test_a_box_label_without_a_mask_tag_is_skipped(client):
    task = {"id": 5, "data": {"img": "/public/scene.png"},
            "annotations": [annotation(1, 7, [rect(25, 25, 50, 50, "Bicycle")])]}  # fmt: skip
    [entry] = batch(client, [task])
    assert entry["result"] == []


@pytest.mark.parametrize(
    "malformed",
    [
        {"annotations": 5},
        {"annotations": [annotation(1, 7, [rect(25, 25, 50, 50)])], "predictions": 5},
        {"overlap": 2, "annotations": [annotation(1, 7, [rect(25, 25, 50, 50)]) | {"completed_by": [1]},
                                       annotation(2, 8, [rect(25, 25, 50, 50)]) | {"completed_by": {"id": [1]}}]},
        {"data": {"img": ["/public/scene.png"]}, "annotations": [annotation(1, 7, [rect(25, 25, 50, 50)])]},
    ],
)  # fmt: skip
def test_a_malformed_task_costs_only_itself_in_a_batch(client, malformed):
    # Task JSON comes from the network: one of an unexpected shape must not fail the batch.
    good = {"id": 8, "data": {"img": "/public/scene.png"},
            "annotations": [annotation(1, 7, [rect(25, 25, 50, 50)])]}  # fmt: skip
    bad = {"id": 9, "data": {"img": "/public/scene.png"}, **malformed}
    first, second = batch(client, [bad, good])
    assert len(second["result"]) == 1
    assert isinstance(first["result"], list)


def test_a_task_whose_data_is_no_object_names_the_field() -> None:
    # /predict's schema refuses it (422); a conversion job reads tasks from Label Studio's API.
    from labelstudio.errors import InvalidRequestError
    from labelstudio.label_config import parse_label_config
    from runtime.box_masks import task_image

    for data in ("img", ["x"], {"img": 5}):
        with pytest.raises(InvalidRequestError, match="data field 'img'"):
            task_image(None, {"id": 1, "data": data}, parse_label_config(CONFIG), "picture")


def test_a_polygon_project_gets_polygons_in_batch_too(client):
    task = {"id": 6, "data": {"img": "/public/scene.png"},
            "annotations": [annotation(1, 7, [rect(25, 25, 50, 50)])]}  # fmt: skip
    [entry] = batch(client, [task], CONFIG.replace("BrushLabels", "PolygonLabels"))
    assert all(r["type"] == "polygonlabels" for r in entry["result"])


def test_a_batch_past_its_budget_answers_one_task_so_label_studio_asks_one_by_one(
    tmp_path, random_mini_base
):
    with FakeLabelStudio() as ls:
        ls.files["scene.png"] = png_bytes(scene(H, W)[0])
        settings = Settings(
            label_studio_url=ls.url, sam_model_type="mini", sam_checkpoint=random_mini_base,
            sam_plugins="none", preload_model=False, device="cpu", versions_dir=tmp_path,
            batch_predict_budget_s=1e-6,
        )  # fmt: skip
        with TestClient(create_app(settings)) as client:
            tasks = [{"id": i, "data": {"img": "/public/scene.png"},
                      "annotations": [annotation(i, 7, [rect(25, 25, 50, 50)])]}
                     for i in (1, 2, 3)]  # fmt: skip
            [only] = batch(client, tasks)
            assert only["result"], "the first task is converted"
            [single] = batch(client, tasks[1:2])  # a batch of one is always answered
            assert single["result"]


def test_a_task_with_more_boxes_than_the_limit_converts_only_the_limit():
    # A task's annotations come from the network: a million rectangles must not mean a million
    # full-size masks.
    result = [rect(1 + k % 50, 1 + k // 50, 5, 5) for k in range(120)]
    boxes = task_boxes(task_sources({"annotations": [annotation(1, 7, result)]}, set()), SIZES, 100)
    assert boxes.count == 100
    assert boxes.skipped["over the limit of 100 boxes per task"] == 20


def test_batch_decoding_runs_a_few_boxes_at_a_time_keeping_objects_whole():
    from runtime.box_masks import decode_chunks

    groups = [([0] * n, "control") for n in (3, 4, 2, 9, 1)]
    runs = decode_chunks(groups, 8)
    assert [[len(g) for g, _ in run] for run in runs] == [[3, 4], [2], [9], [1]]
