"""Masks as Label Studio polygons: round trips at the default tolerance, parts, holes, tiny and
empty masks, percent coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from labelstudio.label_config import parse_label_config
from labelstudio.polygon import (
    DEFAULT_TOLERANCE_PX,
    mask_to_polygons,
    percent_to_pixels,
    pixels_to_percent,
    polygons_to_mask,
)
from labelstudio.regions import mask_regions
from stable_sam.metrics import mask_iou

H, W = 120, 160
YY, XX = np.mgrid[:H, :W]


def disc(cy, cx, r):
    return np.hypot(YY - cy, XX - cx) < r


def round_trip(mask, tolerance=DEFAULT_TOLERANCE_PX):
    polygons = mask_to_polygons(mask, tolerance)
    return polygons, polygons_to_mask(polygons, *mask.shape)


@pytest.mark.parametrize(
    "name, mask",
    [
        ("disc", disc(60, 80, 35)),
        ("ellipse", ((YY - 60) / 30.0) ** 2 + ((XX - 80) / 70.0) ** 2 < 1),
        ("star", np.hypot(YY - 60, XX - 80) < 25 + 15 * np.cos(5 * np.arctan2(YY - 60, XX - 80))),
    ],
)
def test_a_shape_round_trips_at_the_default_tolerance(name, mask):
    polygons, back = round_trip(mask)
    assert len(polygons) == 1
    assert mask_iou(back, mask) >= 0.98, name
    # simplified: at most half the points of the unsimplified outline
    assert len(polygons[0]) <= 0.5 * len(mask_to_polygons(mask, tolerance_px=0)[0])


def test_a_rectangle_is_four_points_at_its_corner_pixel_centres():
    mask = np.zeros((H, W), bool)
    mask[10:30, 20:60] = True
    [polygon], back = round_trip(mask)
    assert sorted(map(tuple, polygon)) == [(20.5, 10.5), (20.5, 29.5), (59.5, 10.5), (59.5, 29.5)]
    assert np.array_equal(back, mask)


def test_a_ring_keeps_its_hole_in_one_ring_of_points():
    ring = disc(60, 80, 45) & ~disc(60, 80, 20)
    polygons, back = round_trip(ring)
    assert len(polygons) == 1
    assert not back[60, 80], "the hole was filled"
    assert mask_iou(back, ring) >= 0.97
    # Filling it instead would have cost a fifth of the mask.
    filled = polygons_to_mask(mask_to_polygons(disc(60, 80, 45)), H, W)
    assert mask_iou(filled, ring) < 0.85


def test_two_holes_in_one_part():
    mask = np.zeros((H, W), bool)
    mask[10:110, 10:150] = True
    mask[30:60, 30:60] = False
    mask[70:90, 100:130] = False
    polygons, back = round_trip(mask)
    assert len(polygons) == 1
    assert not back[45, 45] and not back[80, 115]
    assert mask_iou(back, mask) >= 0.99


def test_separate_parts_are_separate_polygons_largest_first_specks_dropped():
    mask = disc(40, 40, 25) | disc(80, 120, 30)
    mask[5:8, 150:153] = True  # a 9 px speck
    polygons, back = round_trip(mask)
    assert len(polygons) == 2
    first = polygons_to_mask(polygons[:1], H, W)
    assert first[80, 120] and not first[40, 40]  # the larger disc first
    assert mask_iou(back, mask) >= 0.97


@pytest.mark.parametrize(
    "region",
    [
        (slice(5, 6), slice(7, 8)),  # one pixel
        (slice(5, 7), slice(7, 9)),  # 2 x 2
        (slice(5, 6), slice(7, 40)),  # a 1 px horizontal line
        (slice(5, 60), slice(7, 8)),  # a 1 px vertical line
    ],
)
def test_a_tiny_mask_still_gives_a_polygon_with_an_area(region):
    mask = np.zeros((H, W), bool)
    mask[region] = True
    [polygon], back = round_trip(mask)
    x, y = polygon[:, 0], polygon[:, 1]
    assert 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) > 0
    assert np.array_equal(back, mask)


def test_a_tiny_mask_is_kept_as_the_only_part_below_the_speck_size():
    mask = np.zeros((H, W), bool)
    mask[50, 50] = True
    assert len(mask_to_polygons(mask, min_part_px=16)) == 1


def test_an_empty_mask_gives_no_polygon():
    assert mask_to_polygons(np.zeros((H, W), bool)) == []


def test_percent_points_stay_in_the_image_and_convert_back():
    mask = np.zeros((H, W), bool)
    mask[:, :] = True  # touches every border
    [polygon] = mask_to_polygons(mask)
    points = pixels_to_percent(polygon, W, H)
    assert all(0 <= v <= 100 for point in points for v in point)
    np.testing.assert_allclose(percent_to_pixels(points, W, H), polygon, atol=1e-3)


POLYGON_CONFIG = """<View><Image name="img" value="$image"/>
  <PolygonLabels name="outline" toName="img"><Label value="Cell"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="img" smart="true"><Label value="Cell"/></KeyPointLabels>
</View>"""


def test_a_mask_under_a_polygon_control_is_one_region_per_part_with_the_label():
    control = parse_label_config(POLYGON_CONFIG).mask_control_for("img", "Cell")
    regions = mask_regions(disc(40, 40, 25) | disc(80, 120, 30), "Cell", control, "img", 0.7)
    assert len(regions) == 2
    for region in regions:
        assert region["type"] == "polygonlabels"
        assert (region["from_name"], region["to_name"]) == ("outline", "img")
        assert (region["original_width"], region["original_height"]) == (W, H)
        assert region["value"]["polygonlabels"] == ["Cell"] and region["value"]["closed"]
        assert region["score"] == 0.7
    assert mask_regions(np.zeros((H, W), bool), "Cell", control, "img") == []
