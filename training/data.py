"""The dataset protocol every trainer accepts, and small loaders.

A dataset is any ``Sequence[Sample]``: synthetic scenes (``training.scenes.SceneDataset``), a
folder of masks (``MaskFolderDataset``) or a list built from Label Studio annotations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class Sample:
    """One annotated image.

    ``image``: (H, W, 3) uint8 RGB. ``masks``: (N, H, W) bool, one instance per channel (N may
    be 0). ``name``: an identifier for logs and reports.
    """

    image: np.ndarray
    masks: np.ndarray
    name: str

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"image must be (H,W,3) uint8, got {self.image.shape} {self.image.dtype}"
            )
        if self.masks.ndim != 3 or self.masks.shape[1:] != self.image.shape[:2]:
            raise ValueError(
                f"masks must be (N,H,W) matching image {self.image.shape[:2]}, got {self.masks.shape}"
            )
        if self.masks.dtype != np.bool_:
            self.masks = self.masks.astype(bool)

    @property
    def num_instances(self) -> int:
        return int(self.masks.shape[0])


Dataset = Sequence[Sample]


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as (H, W) bool (any non-zero pixel is foreground)."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise OSError(f"cannot read mask {path}")
    return m > 0


class MaskFolderDataset(Sequence[Sample]):
    """A folder ``root/images/<name>.<ext>`` + ``root/masks/<name>_<k>.png`` (one per instance).

    Images without any mask file are kept with N = 0 masks. Samples are read lazily.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        image_dir, self.mask_dir = self.root / "images", self.root / "masks"
        if not image_dir.is_dir():
            raise FileNotFoundError(f"no images/ folder under {self.root}")
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.mask_files: dict[str, list[Path]] = {p.stem: [] for p in self.images}
        if self.mask_dir.is_dir():
            pattern = re.compile(r"^(?P<name>.+)_(?P<k>\d+)$")
            for m in sorted(self.mask_dir.glob("*.png")):
                match = pattern.match(m.stem)
                if match and match["name"] in self.mask_files:
                    self.mask_files[match["name"]].append(m)
            for files in self.mask_files.values():
                files.sort(key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        logger.info("mask folder %s: %d images", self.root, len(self.images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError("MaskFolderDataset supports integer indexing only")
        path = self.images[index]
        image = read_rgb(path)
        files = self.mask_files[path.stem]
        if files:
            masks = np.stack([read_mask(f) for f in files])
        else:
            masks = np.zeros((0, *image.shape[:2]), bool)
        return Sample(image=image, masks=masks, name=path.stem)


def write_mask_folder(samples: Sequence[Sample], root: str | Path) -> Path:
    """Write samples in the ``MaskFolderDataset`` layout (PNG images and 0/255 masks)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for s in samples:
        cv2.imwrite(
            str(root / "images" / f"{s.name}.png"), cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR)
        )
        for k, m in enumerate(s.masks):
            cv2.imwrite(str(root / "masks" / f"{s.name}_{k}.png"), m.astype(np.uint8) * 255)
    return root


class Mixture(Sequence[Sample]):
    """Two datasets of one length interleaved: item ``i`` is ``second[i]`` for a ``fraction``
    share of the indices (drawn from a generator seeded by ``(seed, i)``, so an item does not
    depend on how the dataset is read), else ``first[i]``."""

    def __init__(
        self, first: Sequence[Sample], second: Sequence[Sample], fraction: float, seed: int = 0
    ) -> None:
        if len(first) != len(second):
            raise ValueError(f"datasets of {len(first)} and {len(second)} items")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction {fraction} outside [0, 1]")
        self.first, self.second, self.fraction, self.seed = first, second, fraction, seed

    def __len__(self) -> int:
        return len(self.first)

    def from_second(self, index: int) -> bool:
        return bool(np.random.default_rng((self.seed, index)).random() < self.fraction)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError("Mixture supports integer indexing only")
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return (self.second if self.from_second(index) else self.first)[index]


class Spread(Sequence[Sample]):
    """``n`` items of ``data`` evenly spaced from its first to its last, read on access."""

    def __init__(self, data: Sequence[Sample], n: int) -> None:
        self.data = data
        self.indices = sorted({round(i * (len(data) - 1) / max(1, n - 1)) for i in range(n)})

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        return self.data[self.indices[index]]
