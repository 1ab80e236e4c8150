"""Task images decoded as the browser shows them: EXIF orientation, deep samples, bounded memory.

Decoding is defensive: the pixel count is checked from the header before any pixel is decoded
(decompression bombs), so is the memory the decode will hold, reserved from a budget shared by
all decodes (``DecodeBudget``); truncated and corrupt files fail with a clear error, and the EXIF
orientation is applied the way the browser shows the image (LS's percent coordinates refer to
that view). Downloading them: ``labelstudio.download`` and ``labelstudio.client``.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from labelstudio.errors import ImageDecodeBusyError, ImageDecodeError, ImageTooLargeError

# Decoded pixels become RGB this many bytes (at 4 bytes a pixel) of rows at a time: the copies a
# conversion makes are band-sized, not image-sized.
DECODE_BAND_BYTES = 4 * 1024 * 1024

# EXIF orientation -> the view of the displayed array that has the stored image's orientation:
# writing the stored rows through it shows them as the browser does (ImageOps.exif_transpose's
# transpositions, without its full-size copy).
_STORED_VIEW = {
    2: lambda shown: shown[:, ::-1],  # mirrored
    3: lambda shown: shown[::-1, ::-1],  # rotated 180
    4: lambda shown: shown[::-1],  # flipped
    5: lambda shown: shown.swapaxes(0, 1),  # transposed
    6: lambda shown: np.rot90(shown, 1),  # stored rotated 90 degrees counter-clockwise
    7: lambda shown: shown.swapaxes(0, 1)[::-1, ::-1],  # transversed
    8: lambda shown: np.rot90(shown, -1),  # stored rotated 90 degrees clockwise
}


def _band_rows(width: int) -> int:
    return max(1, DECODE_BAND_BYTES // (4 * width))


def decode_peak_bytes(width: int, height: int, mode: str, image_format: str | None) -> int:
    """Estimated peak memory of ``decode_image`` for a ``width`` x ``height`` image that Pillow
    opens in ``mode``, bytes, measured: the decoded image as Pillow keeps it (1 byte a pixel for
    1, L and P; 2 for I;16; 4 for the rest, RGB included), the RGB result (3), the copies of
    converting one band (up to 5 band-sized), and for WebP libwebp's two RGBA canvases (8).
    """
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    decoder = 8 if image_format == "WEBP" else 0
    band = min(height, _band_rows(width)) * width * 4
    return width * height * (stored + 3 + decoder) + 5 * band


class DecodeBudget:
    """Bounds the decodes running at once and the bytes they hold together (thread-safe).

    Each decode holds a slot and its estimated peak (``decode_peak_bytes``) while it runs; one
    that finds neither free within ``wait_s`` fails with ``ImageDecodeBusyError`` (503). An
    image estimated above the whole budget is decoded alone: it waits for all of the budget and
    holds all of it (IMAGE_MAX_PIXELS, not the budget, is what refuses images).
    """

    def __init__(self, max_decodes: int, max_bytes: int, wait_s: float) -> None:
        self.max_decodes = max_decodes
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self._decodes = 0
        self._bytes = 0
        self._freed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, peak_bytes: int) -> Iterator[None]:
        """Hold a decode slot and ``peak_bytes`` of the budget (all of it at most) meanwhile."""
        need = min(peak_bytes, self.max_bytes)

        def fits() -> bool:
            return self._decodes < self.max_decodes and self._bytes + need <= self.max_bytes

        with self._freed:
            if not self._freed.wait_for(fits, timeout=self.wait_s):
                raise ImageDecodeBusyError(
                    f"no image decode could start within {self.wait_s:g} s: {self._decodes} "
                    f"running hold {self._bytes / 2**20:.0f} of {self.max_bytes / 2**20:.0f} MB "
                    f"and this one needs {need / 2**20:.0f} MB (IMAGE_DECODE_CONCURRENCY, "
                    "IMAGE_DECODE_BUDGET_MB); retry shortly"
                )
            self._decodes += 1
            self._bytes += need
        try:
            yield
        finally:
            with self._freed:
                self._decodes -= 1
                self._bytes -= need
                self._freed.notify_all()


# What Pillow raises for bytes of a format it recognises but cannot read: besides OSError,
# SyntaxError and ValueError, NotImplementedError (a DDS header with a pixel format it does not
# support) and TypeError or OverflowError (TIFFs with mutated tags).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, NotImplementedError, TypeError, OverflowError)


def decode_image(data: bytes, max_pixels: int, budget: DecodeBudget | None = None) -> np.ndarray:
    """Decode image bytes to RGB (H, W, 3) uint8 as the browser shows them (EXIF orientation).

    The pixel count is checked from the header, before decoding; so is the memory the decode
    will hold (``decode_peak_bytes``: for most images the decoded image, 1 byte a pixel for
    1-bit, L and P images, 4 for RGB, plus the result, 3), reserved from ``budget`` for the
    decode. Raises ``ImageTooLargeError``, ``ImageDecodeError`` (corrupt, truncated, not an
    image) or ``ImageDecodeBusyError`` (no budget in time).
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("the downloaded file is not a readable image") from exc
    except DECODE_ERRORS as exc:  # a recognised format, broken header
        raise ImageDecodeError(
            f"the image is not a readable image (corrupt header: {exc})"
        ) from exc
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{max_pixels} (IMAGE_MAX_PIXELS)"
            )
        if width == 0 or height == 0:
            raise ImageDecodeError(f"the image has an unusable size {width}x{height}")
        peak = decode_peak_bytes(width, height, image.mode, image.format)
        with budget.reserve(peak) if budget is not None else contextlib.nullcontext():
            try:
                image.load()
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                return _displayed_rgb(image, orientation)
            except DECODE_ERRORS as exc:
                raise ImageDecodeError(f"the image is corrupt or truncated: {exc}") from exc


def _displayed_rgb(image: Image.Image, orientation: int) -> np.ndarray:
    """A loaded image as a new (H, W, 3) uint8 RGB array in its displayed orientation, converted
    a band of rows at a time straight into the result (no image-sized intermediate)."""
    width, height = image.size
    to_stored = _STORED_VIEW.get(orientation)
    swapped = orientation in (5, 6, 7, 8)
    shown = np.empty((width, height, 3) if swapped else (height, width, 3), np.uint8)
    stored = to_stored(shown) if to_stored is not None else shown  # (height, width, 3)
    white = _gray_white(image)
    rows = _band_rows(width)
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height)))
        stored[top : top + rows] = _band_rgb(band, white)
    return shown


def _gray_white(image: Image.Image) -> float | None:
    """The sample value shown white, for grayscale modes deeper than 8 bits; else ``None``.

    Pillow's RGB conversion clips those at 255 (a 16-bit image comes out nearly all white), so
    they are scaled instead: 16-bit samples (``I;16*``, how Pillow opens 16-bit grayscale PNG
    and TIFF, and browsers show a 16-bit PNG: 65535 -> 255) and 32-bit integers (``I``, read as
    16-bit: Pillow's other mode for them) are white at 65535; so are floats (``F``), unless all
    lie in [0, 1] (a normalised image): then 1.0 is white. Values outside clip.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        return 65535.0
    if image.mode == "F":
        low, high = image.getextrema()
        return 1.0 if low >= 0.0 and high <= 1.0 else 65535.0
    return None


def _band_rgb(band: Image.Image, white: float | None) -> np.ndarray:
    """RGB of a band of an image: (rows, W, 3) uint8, or (rows, W, 1) gray scaled so that
    ``white`` becomes 255 (see ``_gray_white``), which broadcasts to RGB."""
    if white is None:
        return np.asarray(band.convert("RGB"))
    gray = np.asarray(band).astype(np.float32)  # a writable copy: scaled in place
    gray *= np.float32(255.0 / white)
    np.clip(np.rint(gray, out=gray), 0, 255, out=gray)
    return gray.astype(np.uint8)[..., None]
