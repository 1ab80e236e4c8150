"""Ground truth for a user study: instance masks per image, from a mask folder, COCO or brushes.

Every loader returns ``dict[image_key, GtImage]`` where the image key is the image's file stem
(the same key ``ls_export.image_key_for`` derives from a task) and object ids are strings:

- mask folder (``MaskFolderDataset`` layout, ``training/data.py``): ``root/images/<name>.<ext>``
  and ``root/masks/<name>_<k>.png`` (one 0/255 PNG per instance, object id ``k``) or
  ``root/masks/<name>.png`` (one instance-label PNG, object id = pixel value, 0 = background).
  A folder holding only the mask PNGs works too (images then come from ``--images``).
- COCO instances JSON: object id = the annotation ``id``, label = category name.
- brush annotations in the Label Studio project itself (``ls_export.BrushMask``).

Ground-truth boxes are derived from the masks (the paper's user study does the same), on pixel
edges (``stable_sam.prompts.gt_box``: a mask over columns 3..7 gives x0 = 3, x1 = 8).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from stable_sam import prompts
from training.data import IMAGE_SUFFIXES, read_mask
from training.user_study.ls_export import BrushMask

logger = logging.getLogger(__name__)

_INSTANCE_FILE = re.compile(r"^(?P<name>.+)_(?P<k>\d+)$")


@dataclass
class GtObject:
    """One ground-truth object: ``mask`` (H, W) bool, its box and an optional class label."""

    object_id: str
    mask: np.ndarray
    label: str | None = None

    @property
    def box_xyxy(self) -> np.ndarray:
        """(4,) float64 xyxy px on pixel edges (``stable_sam.prompts.gt_box``)."""
        return prompts.gt_box(self.mask).astype(np.float64)


@dataclass
class GtImage:
    """The ground truth of one image: ``objects`` by id; ``image_path`` where known."""

    key: str
    height: int
    width: int
    objects: dict[str, GtObject] = field(default_factory=dict)
    image_path: Path | None = None


def _add(gt: dict[str, GtImage], key: str, obj: GtObject, image_path: Path | None = None) -> None:
    if not obj.mask.any():
        logger.warning("ground truth %s/%s: empty mask, skipped", key, obj.object_id)
        return
    h, w = obj.mask.shape
    image = gt.setdefault(key, GtImage(key=key, height=h, width=w, image_path=image_path))
    if (image.height, image.width) != (h, w):
        raise ValueError(
            f"ground truth {key}: masks of different sizes {(h, w)} and {(image.height, image.width)}"
        )
    if obj.object_id in image.objects:
        logger.warning("ground truth %s/%s: defined twice, the last one kept", key, obj.object_id)
    image.objects[obj.object_id] = obj


def load_mask_folder(root: str | Path, only: Collection[str] | None = None) -> dict[str, GtImage]:
    """Load a mask folder (see the module docstring); ``only``: these image keys, if given."""
    root = Path(root)
    mask_dir = root / "masks" if (root / "masks").is_dir() else root
    image_dir = root / "images"
    images: dict[str, Path] = {}
    if image_dir.is_dir():
        images = {
            p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
        }
    gt: dict[str, GtImage] = {}
    for path in sorted(mask_dir.glob("*.png")):
        match = _INSTANCE_FILE.match(path.stem)
        if path.stem not in images and match and (not images or match["name"] in images):
            name = match["name"]
            if only is None or name in only:
                _add(gt, name, GtObject(match["k"], read_mask(path)), images.get(name))
            continue
        if only is not None and path.stem not in only:
            continue
        labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if labels is None:
            raise OSError(f"cannot read mask {path}")
        if labels.ndim == 3:
            labels = labels[..., 0]
        for value in np.unique(labels):
            if value != 0:
                _add(
                    gt, path.stem, GtObject(str(int(value)), labels == value), images.get(path.stem)
                )
    without = [k for k in images if k not in gt and (only is None or k in only)]
    if without:
        logger.info("ground truth: %d images without masks, e.g. %s", len(without), without[0])
    logger.info("mask folder %s: %d images, %d objects", root, len(gt), _count(gt))
    return gt


def load_coco(
    path: str | Path, images_dir: str | Path | None = None, only: Collection[str] | None = None
) -> dict[str, GtImage]:
    """Load a COCO instances file; images are looked up in ``images_dir`` (or next to the file).

    ``only``: load just these image keys (a study uses a few images of a large set; every
    object's mask is decoded at full size).
    """
    from pycocotools.coco import COCO

    path = Path(path)
    coco = COCO(str(path))
    categories = {c["id"]: c.get("name") for c in coco.loadCats(coco.getCatIds())}
    search = [Path(images_dir)] if images_dir else [path.parent, path.parent / "images"]
    gt: dict[str, GtImage] = {}
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        file_name = Path(info["file_name"])
        key = file_name.stem
        if only is not None and key not in only:
            continue
        candidates = [d / name for d in search for name in (file_name, Path(file_name.name))]
        image_path = next((c for c in candidates if c.is_file()), None)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
            if ann.get("iscrowd"):
                continue
            mask = coco.annToMask(ann).astype(bool)
            _add(
                gt,
                key,
                GtObject(str(ann["id"]), mask, categories.get(ann["category_id"])),
                image_path,
            )
    logger.info("COCO %s: %d images, %d objects", path, len(gt), _count(gt))
    return gt


def from_brush_masks(brushes: Iterable[BrushMask]) -> dict[str, GtImage]:
    """Ground truth from brush annotations read out of the Label Studio export."""
    gt: dict[str, GtImage] = {}
    for brush in brushes:
        _add(gt, brush.image_key, GtObject(brush.object_id, brush.mask, brush.label))
    logger.info("brush ground truth: %d images, %d objects", len(gt), _count(gt))
    return gt


def _count(gt: Mapping[str, GtImage]) -> int:
    return sum(len(g.objects) for g in gt.values())
