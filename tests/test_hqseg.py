"""training.hqseg: the HQSeg-44K layout read from a small generated tree, and picked by
``python -m training.train --data <root>``."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from training.hqseg import SUBSET_NAMES, TRAIN_SUBSETS, HQSegDataset, is_hqseg_root
from training.train import load_dataset


def _write(root: Path, subset: str, stem: str, value: int = 255, mask: bool = True) -> None:
    spec = next(s for s in TRAIN_SUBSETS if s.name == subset)
    image = np.full((12, 16, 3), 40, np.uint8)
    image[:, :, 0] = value  # tells the images apart (RGB red channel)
    (root / spec.image_dir).mkdir(parents=True, exist_ok=True)
    (root / spec.mask_dir).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / spec.image_dir / f"{stem}{spec.image_ext}"), image[:, :, ::-1])
    if mask:
        gray = np.zeros((12, 16), np.uint8)
        gray[2:6, 3:9] = 255
        gray[6, 3:9] = 128  # an anti-aliased edge row: in
        gray[7, 3:9] = 127  # just below half: out
        cv2.imwrite(str(root / spec.mask_dir / f"{stem}{spec.mask_ext}"), gray)


def test_every_training_source_is_read_with_one_binary_mask_per_image(tmp_path: Path) -> None:
    for subset in SUBSET_NAMES:
        _write(tmp_path, subset, "a")
    _write(tmp_path, "DUTS-TR", "b")
    _write(tmp_path, "DUTS-TR", "no_mask", mask=False)
    assert is_hqseg_root(tmp_path)
    data = HQSegDataset(tmp_path)
    assert len(data) == len(SUBSET_NAMES) + 1  # the image without a mask is skipped
    assert data.found["DUTS-TR"] == 2
    assert set(data.found) == set(SUBSET_NAMES)
    sample = data[0]
    assert sample.name == "DIS5K-TR/a"
    assert sample.masks.shape == (1, 12, 16) and sample.masks.dtype == bool
    assert sample.masks[0].sum() == 4 * 6 + 6  # the 255 block and the 128 row, not the 127 row
    assert not sample.masks[0, 7].any()
    assert sample.image.shape == (12, 16, 3)
    # jpg is lossy: the red channel, written as 255, reads back close to it.
    assert abs(int(sample.image[5, 5, 0]) - 255) <= 8


def test_subsets_can_be_chosen_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, "DIS5K-TR", "a")
    _write(tmp_path, "ECSSD", "b")
    data = HQSegDataset(tmp_path, ["ECSSD"])
    assert [data[i].name for i in range(len(data))] == ["ECSSD/b"]
    with pytest.raises(ValueError, match="unknown HQSeg-44K subsets"):
        HQSegDataset(tmp_path, ["COCO"])
    with pytest.raises(FileNotFoundError, match="no HQSeg-44K images"):
        HQSegDataset(tmp_path, ["MSRA10K"])


def test_a_mask_of_another_size_is_an_error_naming_it(tmp_path: Path) -> None:
    _write(tmp_path, "FSS", "a")
    spec = next(s for s in TRAIN_SUBSETS if s.name == "FSS")
    cv2.imwrite(str(tmp_path / spec.mask_dir / "a.png"), np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"a\.png is 5x5"):
        HQSegDataset(tmp_path)[0]


def test_train_reads_an_hqseg_root_and_an_images_masks_folder(tmp_path: Path) -> None:
    _write(tmp_path / "hq", "ThinObject5K-TR", "t1")
    _write(tmp_path / "hq", "ThinObject5K-TR", "t2")
    assert isinstance(load_dataset(str(tmp_path / "hq"), 0), HQSegDataset)
    assert len(load_dataset(str(tmp_path / "hq"), 1)) == 1
    chosen = load_dataset(str(tmp_path / "hq"), 0, hqseg_subsets=["ThinObject5K-TR"])
    assert len(chosen) == 2
    (tmp_path / "plain" / "images").mkdir(parents=True)
    assert not is_hqseg_root(tmp_path / "plain")
    assert not isinstance(load_dataset(str(tmp_path / "plain"), 0), HQSegDataset)


def test_a_number_of_images_is_spread_over_every_source_not_the_first_ones(
    tmp_path: Path,
) -> None:
    for i in range(6):
        _write(tmp_path, "DIS5K-TR", f"d{i}")
        _write(tmp_path, "MSRA10K", f"m{i}")
    chosen = load_dataset(str(tmp_path), 4)
    names = [chosen[i].name.split("/")[0] for i in range(len(chosen))]
    assert len(names) == 4
    assert set(names) == {"DIS5K-TR", "MSRA10K"}
    assert not isinstance(chosen, list)  # a lazy view: nothing read until asked
