"""Brush RLE: our vectorised encoder is byte-identical to label-studio-sdk's ``mask2rle``."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from labelstudio.brush import mask_to_rle, rle_to_mask


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
    with pytest.raises(ValueError, match="expected"):
        rle_to_mask(rle, 4, 5)


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 2, 2), np.uint8), np.zeros((3, 3), np.float32), np.zeros((0, 4), np.uint8)]
)
def test_rejects_masks_it_cannot_encode(bad):
    with pytest.raises(ValueError):
        mask_to_rle(bad)
