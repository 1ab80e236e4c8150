"""Specification of the synthetic scene generator (training/scenes.py)."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import MaskFolderDataset, Sample, write_mask_folder
from training.scenes import MAX_OBJECTS, MIN_OBJECTS, SceneDataset, make_scene, scene_seed

SIZES = [(256, 256), (300, 420)]


def test_same_seed_gives_identical_scene() -> None:
    a, b = make_scene(5, (256, 320)), make_scene(5, (256, 320))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.kinds == b.kinds


def test_different_seeds_give_different_scenes() -> None:
    assert not np.array_equal(make_scene(1, 256).image, make_scene(2, 256).image)


def test_image_and_mask_shapes_and_types() -> None:
    scene = make_scene(3, (300, 420))
    assert scene.image.shape == (300, 420, 3) and scene.image.dtype == np.uint8
    assert scene.masks.shape[1:] == (300, 420) and scene.masks.dtype == np.bool_
    assert len(scene.kinds) == len(scene.masks)


def test_random_sizes_stay_in_range_and_include_non_square() -> None:
    ds = SceneDataset("train", n=12, size_range=(256, 400))
    shapes = [ds[i].image.shape[:2] for i in range(len(ds))]
    assert all(256 <= s <= 400 for hw in shapes for s in hw)
    assert any(h != w for h, w in shapes)


def test_train_and_heldout_seeds_are_disjoint() -> None:
    train = {scene_seed("train", i) for i in range(5000)}
    heldout = {scene_seed("heldout", i) for i in range(5000)}
    assert train.isdisjoint(heldout)
    a, b = SceneDataset("train", 1, (256, 256))[0], SceneDataset("heldout", 1, (256, 256))[0]
    assert not np.array_equal(a.image, b.image)
    assert a.name != b.name


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError):
        SceneDataset("test", 3)


@pytest.mark.parametrize("seed", range(8))
def test_masks_are_disjoint_visible_and_counted(seed: int) -> None:
    scene = make_scene(seed, SIZES[seed % 2])
    masks = scene.masks
    # Occlusion: every pixel belongs to at most one (the front-most) instance.
    assert masks.sum(axis=0).max() <= 1
    # Every kept instance is visible (not occluded away) and not tiny.
    assert (masks.reshape(len(masks), -1).sum(axis=1) >= 48).all()
    assert MIN_OBJECTS <= len(masks) <= MAX_OBJECTS


def test_object_counts_vary_across_scenes() -> None:
    counts = {len(make_scene(s, 256).masks) for s in range(30)}
    assert len(counts) >= 4


def test_scenes_include_thin_structures_and_solid_shapes() -> None:
    kinds = {k for s in range(30) for k in make_scene(s, 256).kinds}
    assert {"ring", "line", "branch"} & kinds
    assert {"convex", "concave", "ellipse", "star"} & kinds


def test_dataset_is_a_sequence_of_samples() -> None:
    ds = SceneDataset("heldout", n=3, size_range=(256, 256))
    assert len(ds) == 3
    s = ds[-1]
    assert isinstance(s, Sample) and s.name == "heldout_000002"
    with pytest.raises(IndexError):
        ds[3]


def test_mask_folder_round_trip(tmp_path) -> None:
    samples = [SceneDataset("train", 2, (256, 256))[i] for i in range(2)]
    write_mask_folder(samples, tmp_path)
    loaded = MaskFolderDataset(tmp_path)
    assert len(loaded) == 2
    for orig, back in zip(samples, loaded, strict=True):
        assert back.name == orig.name
        np.testing.assert_array_equal(back.image, orig.image)
        np.testing.assert_array_equal(back.masks, orig.masks)
