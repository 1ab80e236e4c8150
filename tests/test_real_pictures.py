"""Specification of the real-picture catalogue (training/real_pictures.py).

Built from generated stand-ins of the Debian packages (``tests/fake_pictures.py``), so these
tests install nothing and run anywhere; the last ones check the repository's catalogue, and
the one marked ``installed`` runs only where the packages are installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.fake_pictures import (
    BACKGROUND_PACKAGE,
    N_BACKGROUNDS,
    N_OBJECTS,
    OBJECT_PACKAGE,
    write_fake_catalogue,
    write_fake_packages,
)
from training import real_pictures
from training.real_pictures import (
    CATALOGUE_PATH,
    INSTALL_COMMAND,
    Catalogue,
    RealPicturesMissingError,
    build_catalogue,
    load_catalogue,
    object_mask_ok,
)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalogue, Path]:
    return write_fake_catalogue(tmp_path_factory.mktemp("packages"))


def names(pictures) -> set[str]:
    return {Path(p.path).name for p in pictures}


def test_backgrounds_are_decodable_rasters_of_a_usable_size(fake) -> None:
    catalogue, _ = fake
    kept = names(catalogue.backgrounds)
    assert not kept & {"waves.svg", "slideshow.xml", "tiny.png", "screenshot.png"}
    assert len({p.group for p in catalogue.backgrounds}) == N_BACKGROUNDS


def test_one_file_per_picture_and_variant_variants_share_a_group(fake) -> None:
    catalogue, _ = fake
    kept = names(catalogue.backgrounds)
    assert "sea.png" in kept and "sea_640x480.png" not in kept  # the larger copy
    sky = [p for p in catalogue.backgrounds if p.path.endswith(("sky-l.png", "sky-d.png"))]
    assert len(sky) == 2 and len({(p.group, p.split) for p in sky}) == 1


def test_objects_are_cut_outs_with_a_real_shape(fake) -> None:
    catalogue, _ = fake
    kept = names(catalogue.objects)
    assert len(kept) == N_OBJECTS
    assert not kept & {"no_alpha.png", "opaque.png", "rectangle.png", "speck.png"}
    assert not any("duplicates" in p.path for p in catalogue.objects)


def test_a_recoloured_copy_of_a_cut_out_is_the_same_picture(fake) -> None:
    catalogue, _ = fake
    assert "thing00.png" in names(catalogue.objects)
    assert "thing00_recoloured.png" not in names(catalogue.objects)


def test_object_mask_rules() -> None:
    alpha = np.zeros((100, 100), np.uint8)
    assert not object_mask_ok(alpha)  # nothing
    alpha[10:90, 10:90] = 255
    assert not object_mask_ok(alpha)  # a filled rectangle
    alpha[10:50, 10:50] = 0
    assert object_mask_ok(alpha)  # an L shape
    alpha[:] = 0
    for y in range(0, 100, 20):  # a sheet of small pieces, none the object
        alpha[y : y + 10, ::20] = 255
    assert not object_mask_ok(alpha)


def test_held_out_and_train_share_no_file_no_content_and_no_picture(fake) -> None:
    catalogue, _ = fake
    for kind in ("backgrounds", "objects"):
        train, heldout = catalogue.pool(kind, "train"), catalogue.pool(kind, "heldout")
        assert train and heldout
        assert not {p.path for p in train} & {p.path for p in heldout}
        assert not {p.sha256 for p in train} & {p.sha256 for p in heldout}
        assert not {p.group for p in train} & {p.group for p in heldout}


def test_about_a_fifth_of_each_packages_pictures_is_held_out(fake) -> None:
    catalogue, _ = fake
    for kind, n in (("backgrounds", N_BACKGROUNDS), ("objects", N_OBJECTS)):
        heldout = {p.group for p in catalogue.pool(kind, "heldout")}
        assert len(heldout) == round(0.2 * n)


def test_another_package_never_moves_a_picture_between_splits(tmp_path: Path, fake) -> None:
    catalogue, _ = fake
    backgrounds, objects = write_fake_packages(tmp_path)
    rng = np.random.default_rng(1)
    other = []
    for i in range(7):
        grid = rng.random((3, 3, 3), dtype=np.float32) * 255
        other.append(tmp_path / f"other/pic{i}.png")
        other[-1].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(other[-1]), cv2.resize(grid, (640, 480)).astype(np.uint8))
    wider = build_catalogue({"other-backgrounds": ("1", other), **backgrounds}, objects)
    ours = {Path(p.path).name: p.split for p in catalogue.backgrounds}
    theirs = {
        Path(p.path).name: p.split for p in wider.backgrounds if p.package == BACKGROUND_PACKAGE
    }
    assert theirs == ours
    assert {p.split for p in wider.backgrounds if p.package == "other-backgrounds"} == {
        "train",
        "heldout",
    }


def test_the_catalogue_is_reproducible_and_round_trips_through_json(tmp_path: Path, fake) -> None:
    catalogue, path = fake
    again = build_catalogue(*write_fake_packages(tmp_path))
    assert [(Path(p.path).name, p.sha256, p.split) for p in again.objects] == [
        (Path(p.path).name, p.sha256, p.split) for p in catalogue.objects
    ]
    assert Catalogue.from_json(path.read_text()) == catalogue
    assert catalogue.packages == {BACKGROUND_PACKAGE: "1.0-1", OBJECT_PACKAGE: "2:0.5-3"}
    assert {p.version for p in catalogue.objects} == {"2:0.5-3"}


def test_scikit_image_samples_are_never_catalogued(tmp_path: Path) -> None:
    backgrounds, objects = write_fake_packages(tmp_path)
    sample = tmp_path / "site-packages/skimage/data/astronaut.png"
    sample.parent.mkdir(parents=True)
    shutil.copy(backgrounds[BACKGROUND_PACKAGE][1][0], sample)
    with pytest.raises(ValueError, match="reserved for evaluation"):
        build_catalogue({"x": ("1", [sample])}, objects)


def test_a_missing_catalogue_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(RealPicturesMissingError, match=INSTALL_COMMAND.replace(".", r"\.")):
        load_catalogue(tmp_path / "nowhere.json")


def test_missing_pictures_name_their_package_and_the_install_command(tmp_path: Path) -> None:
    _, path = write_fake_catalogue(tmp_path)
    shutil.rmtree(tmp_path / "usr/share/clipart")
    with pytest.raises(RealPicturesMissingError) as info:
        load_catalogue(path)
    assert OBJECT_PACKAGE in str(info.value) and INSTALL_COMMAND in str(info.value)


# ----------------------------------------------------------------------------- the real one


def test_the_repository_catalogue_holds_no_scikit_image_sample() -> None:
    catalogue = Catalogue.from_json(CATALOGUE_PATH.read_text())
    paths = [p.path.lower() for p in (*catalogue.backgrounds, *catalogue.objects)]
    assert paths and not [p for p in paths if "skimage" in p or "scikit" in p]
    assert all(p.startswith("/usr/share/") for p in paths)


def test_the_repository_catalogue_splits_by_picture() -> None:
    catalogue = Catalogue.from_json(CATALOGUE_PATH.read_text())
    assert set(catalogue.packages) == set(real_pictures.PACKAGES)
    for kind in ("backgrounds", "objects"):
        train, heldout = catalogue.pool(kind, "train"), catalogue.pool(kind, "heldout")
        assert not {p.sha256 for p in train} & {p.sha256 for p in heldout}
        assert not {p.group for p in train} & {p.group for p in heldout}
        groups = len({p.group for p in heldout}) / len({p.group for p in (*train, *heldout)})
        assert 0.15 <= groups <= 0.25


def _installed() -> bool:
    try:
        return all(v is not None for v in real_pictures.installed_versions().values())
    except OSError:  # no dpkg: not a Debian system
        return False


@pytest.mark.skipif(
    not _installed(), reason=f"Debian picture packages not installed ({INSTALL_COMMAND})"
)
def test_installed_packages_reproduce_the_repository_catalogue() -> None:
    catalogue = load_catalogue()  # every catalogued file is on this machine
    versions = real_pictures.installed_versions()
    assert catalogue.packages == versions
    # Rescanning one package (the quickest) gives its rows again, bit for bit.
    package = "mate-backgrounds"
    files = {package: (versions[package], real_pictures.package_files(package))}
    rescanned = real_pictures.scan_backgrounds(files)
    assert rescanned == [p for p in catalogue.backgrounds if p.package == package]
