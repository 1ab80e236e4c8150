"""Label Studio context regions -> grouped SAM prompts in pixels, and every bad region."""

from __future__ import annotations

import numpy as np
import pytest

from backend.regions import group_to_prompt
from labelstudio.errors import InvalidRegionError
from labelstudio.regions import Rectangle, brush_region, parse_context, rectangle_box


def keypoint(x, y, label="Car", positive=None, to_name="img"):
    region = {
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": to_name,
        "original_width": 200,
        "original_height": 100,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
    }
    if positive is not None:
        region["is_positive"] = positive
    return region


def rectangle(x, y, w, h, label="Car", rotation=0):
    return {
        "type": "rectanglelabels",
        "from_name": "box",
        "to_name": "img",
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation,
                  "rectanglelabels": [label]},
    }  # fmt: skip


def test_keypoint_percent_becomes_pixels_of_the_original_image():
    (group,) = parse_context([keypoint(25, 50)])
    prompt = group_to_prompt(group, width=200, height=100)
    np.testing.assert_allclose(prompt.points_xy, [[50.0, 50.0]])
    assert prompt.point_labels.tolist() == [1]
    assert prompt.box_xyxy is None


def test_missing_is_positive_means_positive_and_false_means_negative():
    (group,) = parse_context([keypoint(10, 10), keypoint(20, 20, positive=False)])
    prompt = group_to_prompt(group, 100, 100)
    assert prompt.point_labels.tolist() == [1, 0]


def test_rectangle_becomes_xyxy_pixels():
    (group,) = parse_context([rectangle(10, 20, 30, 40)])
    prompt = group_to_prompt(group, width=200, height=100)
    np.testing.assert_allclose(prompt.box_xyxy, [20, 20, 80, 60])
    assert prompt.points_xy is None


def test_rectangle_plus_keypoints_make_one_prompt():
    (group,) = parse_context([rectangle(10, 10, 50, 50), keypoint(30, 30, positive=False)])
    prompt = group_to_prompt(group, 100, 100)
    assert prompt.box_xyxy is not None and prompt.point_labels.tolist() == [0]


def test_regions_are_grouped_by_label_in_order_of_first_appearance():
    groups = parse_context(
        [keypoint(10, 10, "Dog"), keypoint(50, 50, "Cat"), keypoint(12, 12, "Dog", False)]
    )
    assert [g.label for g in groups] == ["Dog", "Cat"]
    assert len(groups[0].keypoints) == 2 and len(groups[1].keypoints) == 1
    assert groups[0].from_names == ["kp"] and groups[0].original_size == (200, 100)


def test_the_last_rectangle_of_a_label_wins():
    (group,) = parse_context([rectangle(0, 0, 10, 10), rectangle(50, 50, 20, 20)])
    np.testing.assert_allclose(group_to_prompt(group, 100, 100).box_xyxy, [50, 50, 70, 70])


def test_rotated_rectangle_gives_its_enclosing_box():
    # 90 degrees clockwise about the top-left corner: the box swings to the left of x.
    box = rectangle_box(Rectangle(50, 10, 20, 10, rotation=90), width=100, height=100)
    np.testing.assert_allclose(box, [40, 10, 50, 30], atol=1e-4)
    assert box.dtype == np.float32


def test_rotated_rectangle_is_clipped_to_the_image():
    box = rectangle_box(Rectangle(5, 5, 50, 10, rotation=180), width=100, height=100)
    np.testing.assert_allclose(box, [0, 0, 5, 5], atol=1e-4)


def test_a_rectangle_rotated_out_of_the_image_is_refused():
    with pytest.raises(InvalidRegionError, match="outside the image"):
        rectangle_box(Rectangle(0, 0, 10, 10, rotation=180), width=100, height=100)


def test_points_on_the_far_edge_are_accepted_and_clipped():
    (group,) = parse_context([keypoint(100.0, 100.0)])
    np.testing.assert_allclose(group_to_prompt(group, 64, 32).points_xy, [[64, 32]])


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ([keypoint(101, 50)], "outside the image"),
        ([keypoint(50, -3)], "outside the image"),
        ([rectangle(80, 10, 30, 10)], "outside the image"),
        ([rectangle(10, 10, 0, 10)], "zero or negative size"),
        ([rectangle(10, 10, 10, 0)], "zero or negative size"),
        ([rectangle(50, 50, -20, 10)], "zero or negative size"),  # inverted
        ([{"type": "polygonlabels", "to_name": "img", "value": {"points": []}}], "polygonlabels"),
        ([{"type": "keypointlabels", "to_name": "img", "value": {"y": 5}}], "value.x|x: Field"),
        ([{"type": "rectanglelabels", "to_name": "img", "value": {"x": "a"}}], "rectanglelabels"),
        ([{"value": {}}], "type"),
        (["not a region"], "region 0"),
        ([keypoint(10, 10, positive=False)], "only negative"),
        ([{**keypoint(10, 10), "value": {"x": 10, "y": 10}}], "no label"),
        ([{**keypoint(10, 10), "to_name": None}], "to_name"),
        ([], "empty"),
        ({"x": 1}, "must be a list"),
    ],
)
def test_bad_regions_raise_an_error_naming_the_problem(regions, message):
    with pytest.raises(InvalidRegionError, match=message) as info:
        parse_context(regions)
    assert info.value.status_code == 422


def test_nan_coordinates_are_rejected():
    with pytest.raises(InvalidRegionError, match=r"outside|finite"):
        parse_context([keypoint(float("nan"), 10)])


def test_brush_region_has_the_label_studio_shape():
    region = brush_region([1, 2, 3], "Car", "mask", "img", 200, 100, score=0.9)
    assert region["type"] == "brushlabels"
    assert region["value"] == {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["Car"]}
    assert (region["from_name"], region["to_name"]) == ("mask", "img")
    assert (region["original_width"], region["original_height"]) == (200, 100)
    assert region["score"] == pytest.approx(0.9)
