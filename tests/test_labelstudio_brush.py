"""Brush RLE: our vectorised encoder is byte-identical to label-studio-sdk's ``mask2rle``; the one
decoder reads brush regions as Label Studio stores them."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from labelstudio.brush import brush_region_mask, mask_to_rle, rle_to_mask


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 3), (17, 23), (64, 48)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 0.95, 1.0])
def test_random_masks_match_the_sdk_byte_for_byte(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    mask = ((rng.random(shape) < density) * 255).astype(np.uint8)
    assert mask_to_rle(mask) == mask2rle(mask)


def test_structured_masks_match_the_sdk():
    yy, xx = np.mgrid[:300, :400]
    disc = (((yy - 150) ** 2 + (xx - 200) ** 2) < 90**2) * 255
    stripes = ((xx // 3) % 2) * 255  # many short runs
    box = np.zeros((300, 400))
    box[40:260, 17:390] = 255
    for mask in (disc, stripes, box):
        mask = mask.astype(np.uint8)
        assert mask_to_rle(mask) == mask2rle(mask)


def test_runs_longer_than_65536_bytes_match_the_sdk():
    mask = np.full((300, 300), 255, np.uint8)  # 360000 RGBA bytes in one run
    mask[299, 299] = 0
    assert mask_to_rle(mask) == mask2rle(mask)
    mask[:] = 0
    assert mask_to_rle(mask) == mask2rle(mask)


def test_run_lengths_at_every_token_boundary_match_the_sdk():
    # Pixel runs of n give byte runs of 4n: cover 4..16 (short/medium), 17..256, >256.
    for n in (1, 2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385, 32768):
        mask = np.zeros((1, n + 2), np.uint8)
        mask[0, 1 : n + 1] = 255
        assert mask_to_rle(mask) == mask2rle(mask), n


def test_non_binary_uint8_values_match_the_sdk():
    rng = np.random.default_rng(3)
    mask = rng.integers(0, 256, (20, 30)).astype(np.uint8)
    assert mask_to_rle(mask) == mask2rle(mask)


def test_bool_mask_is_encoded_as_0_255():
    mask = np.zeros((10, 12), bool)
    mask[2:7, 3:9] = True
    assert mask_to_rle(mask) == mask2rle(mask.astype(np.uint8) * 255)


def test_rle_decodes_to_exactly_h_w_4_rgba_bytes():
    mask = np.zeros((37, 53), bool)
    mask[5:30, 10:40] = True
    rle = mask_to_rle(mask)
    flat = decode_rle(rle)
    assert flat.size == 37 * 53 * 4
    assert set(np.unique(flat)) <= {0, 255}
    np.testing.assert_array_equal(rle_to_mask(rle, 37, 53), mask)


def test_rle_to_mask_rejects_a_wrong_size():
    rle = mask_to_rle(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="expected 4x5x4"):
        rle_to_mask(rle, 4, 5)


def mask2rle_of_rgba(rgba: np.ndarray) -> list[int]:
    """The sdk's RLE of raw RGBA bytes (its encoder repeats one value per pixel four times)."""
    from label_studio_sdk.converter.brush import encode_rle

    return encode_rle(rgba.ravel())


def brush_region(mask: np.ndarray, **changes) -> dict:
    h, w = mask.shape
    region = {"id": "b1", "type": "brushlabels", "original_width": w, "original_height": h,
              "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255),
                        "brushlabels": ["Object"]}}  # fmt: skip
    region.update(changes)
    return region


def test_the_pixels_the_browser_paints_are_the_mask():
    # The browser paints where alpha is not 0, whatever the colour bytes hold.
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[1, 2] = (0, 0, 0, 1)
    rgba[0, 0] = (255, 255, 255, 0)
    rle = mask2rle_of_rgba(rgba)
    expected = np.zeros((3, 4), bool)
    expected[1, 2] = True
    np.testing.assert_array_equal(rle_to_mask(rle, 3, 4), expected)


def test_a_brush_region_decodes_at_its_original_size():
    mask = np.zeros((40, 60), bool)
    mask[5:20, 10:30] = True
    np.testing.assert_array_equal(brush_region_mask(brush_region(mask)), mask)


def test_a_brush_region_of_the_wrong_size_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"brush region b1: .*expected 40x61x4"):
        brush_region_mask(brush_region(np.zeros((40, 60), bool), original_width=61))


def test_a_brush_region_in_another_format_is_refused():
    region = brush_region(np.zeros((4, 4), bool))
    region["value"]["format"] = "png"
    with pytest.raises(ValueError, match="not in RLE format"):
        brush_region_mask(region)


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 2, 2), np.uint8), np.zeros((3, 3), np.float32), np.zeros((0, 4), np.uint8)]
)
def test_rejects_masks_it_cannot_encode(bad):
    with pytest.raises(ValueError):
        mask_to_rle(bad)
