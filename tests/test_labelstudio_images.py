"""Decoding task images as the browser shows them: EXIF, deep samples, memory, bad files."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from backend_support import png_bytes, scene
from peak_rss import needs_proc, peak_rss_of_decoding
from PIL import Image, ImageFile, ImageOps

from labelstudio.errors import ImageDecodeBusyError, ImageDecodeError, ImageTooLargeError
from labelstudio.images import DecodeBudget, decode_image, decode_peak_bytes

# --- decoding ---------------------------------------------------------------------------------


def test_exif_orientation_is_applied_like_the_browser():
    stored = np.zeros((20, 40, 3), np.uint8)  # landscape as stored
    stored[:, :10] = 255  # left strip bright
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", exif=exif, quality=95)
    shown = decode_image(buffer.getvalue(), max_pixels=10_000)
    assert shown.shape == (40, 20, 3)  # portrait, as the browser shows it
    assert shown[:10].mean() > 200 and shown[-10:].mean() < 50  # the strip is now on top


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_shown_as_pillow_transposes_it(orientation):
    stored = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG", exif=exif)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    shown = decode_image(buffer.getvalue(), max_pixels=10_000)
    assert np.array_equal(shown, expected) and shown.flags.c_contiguous and shown.flags.writeable


@needs_proc
@pytest.mark.parametrize(("mode", "stored_bytes"), [("1", 1), ("RGB", 4)])
def test_decoding_holds_only_the_decoded_image_the_result_and_a_few_bands(
    tmp_path, mode, stored_bytes
):
    side = 4000
    Image.new(mode, (side, side)).save(tmp_path / "image.png")
    peak = peak_rss_of_decoding(tmp_path / "image.png")
    # Pillow's decoded copy + the (H, W, 3) result: was 12 (1-bit) or 18 (RGB) bytes a pixel.
    assert peak < (stored_bytes + 3) * side * side + 24 * 1024 * 1024


@needs_proc
@pytest.mark.parametrize(
    ("mode", "image_format", "side"),
    [("1", "PNG", 4000), ("I;16", "PNG", 3000), ("F", "TIFF", 3000), ("RGBA", "WEBP", 2000)],
)
def test_the_decode_peak_estimate_bounds_the_measured_peak(tmp_path, mode, image_format, side):
    path = tmp_path / f"image.{image_format.lower()}"
    Image.new(mode, (side, side)).save(path, format=image_format)
    assert peak_rss_of_decoding(path) <= decode_peak_bytes(side, side, mode, image_format)


def png_16_bit(samples: np.ndarray, color_type: int, transparent: int | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16-bit gray only): ``samples`` (H, W) for
    color type 0 (gray; ``transparent``: the gray value a tRNS chunk makes transparent) or
    (H, W, 2) for 4 (gray + alpha)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    trns = chunk(b"tRNS", struct.pack(">H", transparent)) if transparent is not None else b""
    idat = chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + trns + idat + chunk(b"IEND", b"")


SAMPLES_16 = np.array([[0, 257, 30000, 65535]], np.uint16)  # shown as 0, 1, 117, 255
SHOWN_8 = np.array([[0, 1, 117, 255]], np.uint8)


@pytest.mark.parametrize(
    "data",
    [
        png_16_bit(SAMPLES_16, 0),
        png_16_bit(SAMPLES_16, 0, transparent=257),
        png_16_bit(np.stack([SAMPLES_16, np.full_like(SAMPLES_16, 65535)], -1), 4),
    ],
    ids=["gray", "gray-with-transparent-value", "gray-and-alpha"],
)
def test_16_bit_grayscale_pngs_are_scaled_to_8_bits_not_clipped(data):
    shown = decode_image(data, max_pixels=100)
    assert np.array_equal(shown, np.repeat(SHOWN_8[..., None], 3, axis=2))


@pytest.mark.parametrize("dtype", [np.int32, np.float32], ids=["I", "F"])
def test_32_bit_integer_and_float_images_are_read_as_16_bit(dtype):
    buffer = io.BytesIO()
    Image.fromarray(SAMPLES_16.astype(dtype)).save(buffer, format="TIFF")
    assert np.array_equal(decode_image(buffer.getvalue(), 100)[..., 0], SHOWN_8)


def test_float_images_within_0_to_1_are_scaled_by_255():
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(buffer, format="TIFF")
    assert decode_image(buffer.getvalue(), 100)[0, :, 0].tolist() == [0, 128, 255]


# --- decoding, bounded ------------------------------------------------------------------------


def test_a_decode_that_gets_no_budget_in_time_is_refused_with_503():
    budget = DecodeBudget(max_decodes=1, max_bytes=2**30, wait_s=0.2)
    data = png_bytes(scene(60, 80)[0])
    started = time.monotonic()
    with budget.reserve(0), pytest.raises(ImageDecodeBusyError) as info:
        decode_image(data, 1_000_000, budget)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert (info.value.status_code, info.value.code) == (503, "image_decode_busy")
    assert decode_image(data, 1_000_000, budget).shape == (60, 80, 3)  # the slot is free again


def test_corrupt_bytes_are_unreadable():
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(b"<html>login page</html>", 1_000_000)


def dds_header(pixel_format_flags: int) -> bytes:
    """A 128-byte DDS file header (magic, header size 124, 8x8) with these pixel-format flags."""
    header = struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44)
    pixel_format = struct.pack("<2I", 32, pixel_format_flags) + bytes(24)
    return b"DDS " + header + pixel_format + bytes(20)


def test_an_image_format_pillow_does_not_implement_is_unreadable():
    assert len(dds_header(0)) == 128
    with pytest.raises(ImageDecodeError, match="pixel format"):
        decode_image(dds_header(0), 1_000_000)


@pytest.mark.parametrize("error", [TypeError, OverflowError])
def test_pillow_type_and_overflow_errors_while_decoding_are_unreadable(monkeypatch, error):
    # What Pillow raises reading some mutated TIFF tags; raised here from load().
    def broken_load(self):
        raise error("mutated tag")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(ImageDecodeError, match="mutated tag"):
        decode_image(png_bytes(np.zeros((8, 8), np.uint8)), 1_000_000)


def test_truncated_image_is_unreadable():
    data = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], 1_000_000)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    big = png_bytes(np.zeros((1200, 1000), np.uint8))
    with pytest.raises(ImageTooLargeError, match="1000x1200"):
        decode_image(big, max_pixels=1_000_000)
    # Only the header is there: a 413, not a decode error, proves nothing was decoded.
    with pytest.raises(ImageTooLargeError):
        decode_image(big[:200], max_pixels=1_000_000)
    assert decode_image(big, max_pixels=1_200_000).shape == (1200, 1000, 3)
