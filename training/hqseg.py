"""A reader for HQSeg-44K, the data Stable-SAM's plugins (and HQ-SAM) were trained on.

HQSeg-44K (HQ-SAM, Ke et al. 2023) is 44,320 images with one fine mask each, from six sources,
laid out under one root as HQ-SAM's training code expects::

    DIS5K/DIS-TR/im/*.jpg                                 DIS5K/DIS-TR/gt/*.png
    thin_object_detection/ThinObject5K/images_train/*.jpg  .../ThinObject5K/masks_train/*.png
    cascade_psp/{fss_all,DUTS-TR,DUTS-TE,ecssd,MSRA_10K}/  <name>.jpg beside <name>.png

(the validation sets, COIFT, HRSOD, ThinObject5K's test part and DIS-VD, are not read here).
An image and its mask share a file stem. A mask is read as grayscale and binarised at > 127:
the masks are 0/255 with anti-aliased edges, and half way keeps the object's outline where an
annotator drew it. Images without a mask are skipped (and counted in the log).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from training.data import Sample, read_rgb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subset:
    """One source of HQSeg-44K: its image and mask folders under the root."""

    name: str
    image_dir: str
    mask_dir: str
    image_ext: str = ".jpg"
    mask_ext: str = ".png"


TRAIN_SUBSETS = (
    Subset("DIS5K-TR", "DIS5K/DIS-TR/im", "DIS5K/DIS-TR/gt"),
    Subset(
        "ThinObject5K-TR",
        "thin_object_detection/ThinObject5K/images_train",
        "thin_object_detection/ThinObject5K/masks_train",
    ),
    Subset("FSS", "cascade_psp/fss_all", "cascade_psp/fss_all"),
    Subset("DUTS-TR", "cascade_psp/DUTS-TR", "cascade_psp/DUTS-TR"),
    Subset("DUTS-TE", "cascade_psp/DUTS-TE", "cascade_psp/DUTS-TE"),
    Subset("ECSSD", "cascade_psp/ecssd", "cascade_psp/ecssd"),
    Subset("MSRA10K", "cascade_psp/MSRA_10K", "cascade_psp/MSRA_10K"),
)
SUBSET_NAMES = tuple(s.name for s in TRAIN_SUBSETS)


def is_hqseg_root(root: str | Path) -> bool:
    """Whether ``root`` holds at least one HQSeg-44K training source."""
    return any((Path(root) / s.image_dir).is_dir() for s in TRAIN_SUBSETS)


def read_binary_mask(path: Path) -> np.ndarray:
    """A grayscale mask file as (H, W) bool: > 127 is the object."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise OSError(f"cannot read mask {path}")
    return mask > 127


class HQSegDataset(Sequence[Sample]):
    """The training sources of HQSeg-44K under ``root`` (those in ``subsets``, default all
    that are present), one ``Sample`` with one mask per image, read lazily."""

    def __init__(self, root: str | Path, subsets: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        unknown = sorted(set(subsets or ()) - set(SUBSET_NAMES))
        if unknown:
            raise ValueError(f"unknown HQSeg-44K subsets {unknown}; known: {list(SUBSET_NAMES)}")
        wanted = [s for s in TRAIN_SUBSETS if subsets is None or s.name in subsets]
        self.pairs: list[tuple[str, Path, Path]] = []
        self.found: dict[str, int] = {}
        for subset in wanted:
            image_dir, mask_dir = self.root / subset.image_dir, self.root / subset.mask_dir
            if not image_dir.is_dir():
                continue
            masks = {p.stem: p for p in mask_dir.glob(f"*{subset.mask_ext}")}
            images = sorted(image_dir.glob(f"*{subset.image_ext}"))
            pairs = [(subset.name, p, masks[p.stem]) for p in images if p.stem in masks]
            if len(pairs) < len(images):
                logger.warning(
                    "HQSeg-44K %s: %d of %d images have no mask, skipped",
                    subset.name,
                    len(images) - len(pairs),
                    len(images),
                )
            self.found[subset.name] = len(pairs)
            self.pairs.extend(pairs)
        if not self.pairs:
            names = ", ".join(s.name for s in wanted)
            raise FileNotFoundError(f"no HQSeg-44K images with masks under {self.root} ({names})")
        logger.info(
            "HQSeg-44K under %s: %d images (%s)",
            self.root,
            len(self.pairs),
            ", ".join(f"{name} {n}" for name, n in self.found.items()),
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError("HQSegDataset supports integer indexing only")
        subset, image_path, mask_path = self.pairs[index]
        image = read_rgb(image_path)
        mask = read_binary_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"HQSeg-44K {subset}: mask {mask_path.name} is {mask.shape[1]}x{mask.shape[0]}, "
                f"its image {image.shape[1]}x{image.shape[0]}"
            )
        return Sample(image=image, masks=mask[None], name=f"{subset}/{image_path.stem}")
