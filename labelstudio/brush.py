"""Label Studio brush masks: the RLE format of ``BrushLabels`` regions.

Label Studio stores a brush mask as RGBA bytes (H*W*4, row-major) compressed with its own
bit-level run-length code; the browser paints every pixel whose alpha is not 0. The reference
encoder is ``label_studio_sdk.converter.brush.mask2rle`` (pure Python, ~100 ms for a
4000x3000 mask). ``mask_to_rle`` below produces the same bytes with numpy only: it finds the
runs of the mask once and writes every run's bit token in a vectorised pass.

Bit layout (reverse-engineered from the sdk encoder, which is the specification here):
header = 32 bits value count, 5 bits (word size - 1 = 7), four 4-bit (rle size - 1) = 2,3,7,15;
then one token per run of equal bytes (``L`` = run length, ``v`` = the byte):

=============  ==========================================  ====
run length     token                                       bits
=============  ==========================================  ====
1              ``0 00 000 v``                              14
2..8           ``1 00 (L-1):3 v``                          14
9..16          ``1 01 (L-1):4 v``                          15
17..256        ``1 10 (L-1):8 v``                          19
> 256          ``1 11 65535:16 v`` for every full 65536,   27
               then ``1 11 (rest-1):16 v``
=============  ==========================================  ====

and finally 1..8 zero bits of padding (always at least one: the sdk pads ``8 - len % 8``).

Decoding (``rle_to_mask``, ``brush_region_mask``) uses the sdk's reference decoder: the training
job and the user study read brush annotations with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

_WORD_SIZE = 8
_RLE_SIZES = (3, 4, 8, 16)
_CHUNK = 1 << 20  # runs per vectorised pass: bounds the temporary bit matrix to ~27 MB


def _header_bits(num_values: int) -> np.ndarray:
    """The 53 header bits (uint8 0/1) for ``num_values`` bytes of RGBA data."""
    text = f"{num_values:032b}{_WORD_SIZE - 1:05b}" + "".join(f"{s - 1:04b}" for s in _RLE_SIZES)
    return np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")


def _runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths (int64) and values (uint8) of a 1-D uint8 array."""
    change = np.flatnonzero(flat[1:] != flat[:-1])
    ends = np.append(change, flat.size - 1)
    lengths = np.diff(np.append(-1, ends))
    return lengths.astype(np.int64), flat[ends]


def _tokens(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each run as (code, width): ``code`` holds the token's ``width`` bits, MSB first."""
    # Runs longer than 256 bytes split into full 65536 chunks plus a remainder (sdk order).
    long_run = lengths > 256
    n_full = np.where(long_run, (lengths - 1) // 65536, 0)
    if n_full.any():
        repeat = n_full + 1
        is_last = np.zeros(int(repeat.sum()), dtype=bool)
        is_last[np.cumsum(repeat) - 1] = True
        rest = lengths - n_full * 65536
        lengths = np.where(is_last, np.repeat(rest, repeat), 65536)
        values = np.repeat(values, repeat)
        long_run = np.repeat(long_run, repeat)
    v = values.astype(np.int64)
    m = lengths - 1  # the encoded length field
    code = np.empty_like(lengths)
    width = np.empty_like(lengths)
    single = lengths == 1
    short = (lengths >= 2) & (lengths <= 8)
    medium = (lengths >= 9) & (lengths <= 16)
    large = (lengths >= 17) & ~long_run
    # flag(1) + size index(2) + length field + 8-bit value
    code[single] = v[single]
    width[single] = 14
    code[short] = (0b100 << 11) | (m[short] << 8) | v[short]
    width[short] = 14
    code[medium] = (0b101 << 12) | (m[medium] << 8) | v[medium]
    width[medium] = 15
    code[large] = (0b110 << 16) | (m[large] << 8) | v[large]
    width[large] = 19
    code[long_run] = (0b111 << 24) | (m[long_run] << 8) | v[long_run]
    width[long_run] = 27
    return code, width


def _token_bits(code: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Concatenate variable-width tokens into one uint8 0/1 bit array."""
    shifts = np.arange(26, -1, -1, dtype=np.int64)  # 27 bit positions, MSB first
    bits = ((code[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    keep = shifts[None, :] < width[:, None]
    return bits[keep]


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode a 2-D mask (H, W) as Label Studio brush RLE; byte-identical to the sdk's ``mask2rle``.

    ``mask`` is uint8 (use 0/255 so the browser paints it) or bool (mapped to 0/255). The RLE
    decodes to exactly H*W*4 bytes: every mask value repeated for R, G, B and alpha.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    elif mask.dtype != np.uint8:
        raise ValueError(f"mask must be uint8 or bool, got {mask.dtype}")
    flat = np.ascontiguousarray(mask).ravel()
    if flat.size == 0:
        raise ValueError("mask is empty")
    lengths, values = _runs(flat)
    lengths = lengths * 4  # each pixel becomes 4 equal bytes (RGBA), so runs just stretch
    pieces = [_header_bits(flat.size * 4)]
    for start in range(0, lengths.size, _CHUNK):
        code, width = _tokens(lengths[start : start + _CHUNK], values[start : start + _CHUNK])
        pieces.append(_token_bits(code, width))
    bits = np.concatenate(pieces)
    pad = 8 - bits.size % 8
    bits = np.concatenate([bits, np.zeros(pad, dtype=np.uint8)])
    return np.packbits(bits).tolist()


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Decode Label Studio brush RLE to a bool mask (H, W): the pixels the browser paints (alpha
    not 0). Raises ``ValueError`` unless the RLE holds exactly H*W*4 values."""
    from label_studio_sdk.converter.brush import decode_rle

    flat = np.asarray(decode_rle(rle), dtype=np.uint8)
    if flat.size != height * width * 4:
        raise ValueError(f"RLE holds {flat.size} values, expected {height}x{width}x4")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def brush_region_mask(region: Mapping[str, Any]) -> np.ndarray:
    """A ``brushlabels`` result region as Label Studio stores it -> (H, W) bool mask, at its
    ``original_height`` x ``original_width``. ``ValueError`` for another format or size."""
    value = region["value"]
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise ValueError(f"brush region {region.get('id')} is not in RLE format")
    height, width = int(region["original_height"]), int(region["original_width"])
    try:
        return rle_to_mask(value["rle"], height, width)
    except ValueError as exc:
        raise ValueError(f"brush region {region.get('id')}: {exc}") from exc
