"""Region geometry: Label Studio's percent of the original image <-> pixels, rotated rectangles."""

from __future__ import annotations

import numpy as np

from labelstudio.geometry import clip_box, percent_to_pixels, rectangle_to_xyxy


def test_percent_points_become_pixels_of_the_original_image():
    points = percent_to_pixels(np.array([[25.0, 50.0], [100.0, 0.0]]), width=200, height=100)
    np.testing.assert_allclose(points, [[50, 50], [200, 0]])


def test_percent_rectangle_converts_to_pixels_of_the_original_image():
    box = rectangle_to_xyxy(10, 20, 30, 40, 0, width=200, height=100)
    np.testing.assert_allclose(box, [20, 20, 80, 60])


def test_rotated_rectangle_becomes_axis_aligned_bounds_of_its_corners():
    # rotation 90 deg clockwise about the top-left corner (50, 10): the 20x10 box swings down-left
    box = rectangle_to_xyxy(50, 10, 20, 10, 90, width=100, height=100)
    np.testing.assert_allclose(box, [40, 10, 50, 30], atol=1e-9)


def test_a_full_turn_is_no_rotation():
    np.testing.assert_array_equal(
        rectangle_to_xyxy(50, 10, 20, 10, 360, 100, 100),
        rectangle_to_xyxy(50, 10, 20, 10, 0, 100, 100),
    )


def test_rotation_is_applied_in_pixels_not_percent_on_a_non_square_image():
    # 10% x 10% of a 200x100 image is a 20x10 px box; rotated by 90 deg it is 10 wide, 20 tall
    box = rectangle_to_xyxy(50, 10, 10, 10, 90, width=200, height=100)
    np.testing.assert_allclose(box, [90, 10, 100, 30], atol=1e-9)


def test_a_rotated_rectangle_reaching_outside_is_not_clipped_until_asked():
    box = rectangle_to_xyxy(5, 5, 50, 10, 180, width=100, height=100)
    np.testing.assert_allclose(box, [-45, -5, 5, 5], atol=1e-9)
    clipped, was_clipped = clip_box(box, width=100, height=100)
    np.testing.assert_allclose(clipped, [0, 0, 5, 5], atol=1e-9)
    assert was_clipped


def test_box_reaching_outside_is_clipped_and_one_fully_outside_is_dropped():
    box, clipped = clip_box(np.array([-10.0, 5, 50, 120]), height=100, width=100)
    np.testing.assert_allclose(box, [0, 5, 50, 100])
    assert clipped
    assert clip_box(np.array([110.0, 0, 120, 10]), height=100, width=100) == (None, True)
    box, clipped = clip_box(np.array([1.0, 2, 3, 4]), height=100, width=100)
    assert not clipped


def test_an_inverted_unrotated_rectangle_stays_inverted_and_is_dropped():
    box = rectangle_to_xyxy(50, 50, -10, 10, 0, width=100, height=100)
    np.testing.assert_allclose(box, [50, 50, 40, 60])
    assert clip_box(box, width=100, height=100) == (None, True)
