"""A tiny two-object training set for seconds-long training runs (a red and a green rectangle on
dark noise), shared by the trainers' tests."""

import numpy as np

from training.data import Sample


def two_rectangles(n: int, side: int = 96) -> list[Sample]:
    """``n`` images of ``side`` x ``side + 16`` pixels, each with the same two objects."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.integers(0, 60, (side, side + 16, 3), dtype=np.uint8)
        masks = np.zeros((2, side, side + 16), bool)
        masks[0, 10:50, 10:60] = True
        masks[1, 55:90, 40:100] = True
        image[masks[0]] = (220, 40, 40)
        image[masks[1]] = (40, 200, 60)
        out.append(Sample(image, masks, f"tiny{i}"))
    return out
