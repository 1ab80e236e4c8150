"""Specification of the real-picture composites (training/composites.py).

On a catalogue of generated stand-in pictures (``tests/fake_pictures.py``), so they run where
the Debian packages are not installed; the test marked for the installed packages renders from
the repository's catalogue.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.fake_pictures import write_fake_catalogue
from training.composites import (
    MAX_OBJECTS,
    MIN_OBJECTS,
    CompositeDataset,
    make_composite,
)
from training.data import Sample
from training.real_pictures import (
    CATALOGUE_PATH,
    INSTALL_COMMAND,
    Catalogue,
    RealPicturesMissingError,
    installed_versions,
)

SIZE = (256, 320)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalogue, Path]:
    return write_fake_catalogue(tmp_path_factory.mktemp("packages"))


def test_same_seed_and_split_give_the_same_composite(fake) -> None:
    _, path = fake
    a, b = (make_composite(3, "train", SIZE, catalogue=path) for _ in range(2))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert (a.kinds, a.wholes, a.sources) == (b.kinds, b.wholes, b.sources)


def test_different_seeds_give_different_composites(fake) -> None:
    _, path = fake
    a, b = (make_composite(s, "train", SIZE, catalogue=path) for s in (1, 2))
    assert not np.array_equal(a.image, b.image)


@pytest.mark.parametrize("seed", range(6))
def test_masks_are_disjoint_visible_and_counted(fake, seed: int) -> None:
    _, path = fake
    c = make_composite(seed, ("train", "heldout")[seed % 2], catalogue=path, size_range=(256, 400))
    h, w = c.image.shape[:2]
    assert c.image.dtype == np.uint8 and c.image.shape == (h, w, 3)
    assert min(h, w) >= 256 and max(h, w) <= 400
    assert c.masks.dtype == np.bool_ and c.masks.shape[1:] == (h, w)
    assert c.masks.sum(axis=0).max() <= 1  # painter's order: one owner per pixel
    assert (c.masks.reshape(len(c.masks), -1).sum(axis=1) >= 48).all()
    assert MIN_OBJECTS <= len(c.masks) <= 3 * MAX_OBJECTS  # a body and up to two parts each
    assert len(c.kinds) == len(c.masks)
    assert set(c.kinds) <= {"clipart"} | {k for k in c.kinds if k.startswith("photo_")}


def test_objects_with_parts_list_two_or_more_instances(fake) -> None:
    _, path = fake
    wholes = [
        (c, g)
        for seed in range(12)
        for c in [make_composite(seed, "train", SIZE, catalogue=path)]
        for g in c.wholes
    ]
    assert wholes, "no object with parts in 12 composites"
    for c, g in wholes:
        assert len(g) >= 2 and len(set(g)) == len(g) and max(g) < len(c.masks)


def test_held_out_composites_use_only_held_out_pictures(fake) -> None:
    catalogue, path = fake
    for split in ("train", "heldout"):
        allowed = {
            p.path
            for p in (*catalogue.pool("backgrounds", split), *catalogue.pool("objects", split))
        }
        used = {
            s
            for seed in range(8)
            for s in make_composite(seed, split, SIZE, catalogue=path).sources
        }
        assert used and used <= allowed


def test_the_dataset_is_a_sequence_of_samples(fake) -> None:
    _, path = fake
    ds = CompositeDataset("heldout", n=3, size_range=(256, 256), catalogue=path)
    assert len(ds) == 3
    sample = ds[1]
    assert isinstance(sample, Sample) and sample.name == "composite_heldout_000001"
    np.testing.assert_array_equal(
        sample.image, make_composite(1, "heldout", size_range=(256, 256), catalogue=path).image
    )
    np.testing.assert_array_equal(ds[-1].image, ds[2].image)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError):
        CompositeDataset("test", n=1, catalogue=path)


def test_without_a_catalogue_the_error_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(RealPicturesMissingError, match=INSTALL_COMMAND.replace(".", r"\.")):
        CompositeDataset("train", n=1, catalogue=tmp_path / "missing" / "catalogue.json")


def test_without_the_packages_files_the_error_names_the_install_command(tmp_path: Path) -> None:
    _, path = write_fake_catalogue(tmp_path)
    shutil.rmtree(tmp_path / "usr")  # the packages' files are gone, the catalogue stays
    with pytest.raises(RealPicturesMissingError, match=INSTALL_COMMAND.replace(".", r"\.")):
        CompositeDataset("train", n=1, catalogue=path)


def test_a_changed_picture_is_refused(tmp_path: Path) -> None:
    catalogue, path = write_fake_catalogue(tmp_path)
    for picture in catalogue.backgrounds:  # every background differs from its catalogued hash
        Path(picture.path).write_bytes(Path(picture.path).read_bytes() + b"\0")
    with pytest.raises(ValueError, match="differs from the catalogue"):
        make_composite(0, "train", SIZE, catalogue=path)


def _installed() -> bool:
    try:
        return all(v is not None for v in installed_versions().values())
    except OSError:
        return False


@pytest.mark.skipif(
    not _installed(), reason=f"Debian picture packages not installed ({INSTALL_COMMAND})"
)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_composites_of_the_installed_packages(split: str) -> None:
    catalogue = Catalogue.from_json(CATALOGUE_PATH.read_text())
    allowed = {p.path for kind in ("backgrounds", "objects") for p in catalogue.pool(kind, split)}
    c = make_composite(0, split, (320, 384))
    assert c.masks.sum(axis=0).max() <= 1 and len(c.masks) >= MIN_OBJECTS
    assert set(c.sources) <= allowed


def test_pretraining_mixes_in_composites_at_the_configured_share(fake) -> None:
    from training.pretrain.config import PretrainConfig
    from training.pretrain.data import PretrainSamples

    _, catalogue = fake
    cfg = PretrainConfig(composite_fraction=0.5, composite_catalogue=str(catalogue),
                         train_size_range=(256, 320))  # fmt: skip
    samples = PretrainSamples(cfg, 256)
    drawn = [samples.is_composite(i) for i in range(400)]
    assert 0.4 < np.mean(drawn) < 0.6
    # a pure function of (seed, index): a resumed run (another start) draws the same
    resumed = PretrainSamples(cfg, 256, start=100)
    assert [resumed.is_composite(100 + i) for i in range(50)] == drawn[100:150]
    first = next(i for i in range(400) if drawn[i])
    batch = samples[first]
    assert batch is not None
    assert not any(PretrainSamples(PretrainConfig(), 256).is_composite(i) for i in range(50))


def test_a_mixture_takes_the_second_dataset_at_its_share_by_index() -> None:
    from training.data import Mixture

    def samples(name: str, n: int) -> list[Sample]:
        return [Sample(np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4, 4), bool), f"{name}{i}")
                for i in range(n)]  # fmt: skip

    mixed = Mixture(samples("s", 400), samples("c", 400), 0.3, seed=2)
    names = [mixed[i].name for i in range(400)]
    share = np.mean([n.startswith("c") for n in names])
    assert 0.22 < share < 0.38
    assert all(n.endswith(str(i)) for i, n in enumerate(names))  # item i is item i of either
    assert mixed[-1].name == names[-1] and len(mixed) == 400
    assert [Mixture(samples("s", 400), samples("c", 400), 0.3, seed=2)[i].name
            for i in range(399, -1, -1)] == names[::-1]  # fmt: skip
    with pytest.raises(IndexError):
        mixed[400]
    with pytest.raises(ValueError, match="400 and 3"):
        Mixture(samples("s", 400), samples("c", 3), 0.3)


@pytest.mark.skipif(
    not _installed(), reason=f"Debian picture packages not installed ({INSTALL_COMMAND})"
)
def test_plugin_training_reads_composites_and_mixed_data() -> None:
    from training.train import load_dataset

    composites = load_dataset("composites", 3)
    assert isinstance(composites, CompositeDataset) and len(composites) == 3
    mixed = load_dataset("mixed", 40, composite_fraction=0.5)
    kinds = {type(source).__name__ for source in (mixed.second, mixed.first)}
    assert kinds == {"CompositeDataset", "SceneDataset"} and len(mixed) == 40


def small_fit(catalogue: Path, out: Path, *extra: str) -> list[str]:
    """project_fit's arguments for 2 fit images and 1 scored one, 256 px, one prompt each
    (``extra`` after, so that it may override them)."""
    return ["--n-fit", "2", "--n-score", "1", "--n-prompts", "1", "--max-objects", "2",
            "--size-range", "256", "256", "--catalogue", str(catalogue), "--out", str(out),
            *extra]  # fmt: skip


@pytest.mark.usefixtures("one_torch_thread")
def test_the_project_fit_trains_on_the_first_images_and_scores_the_rest(fake, tmp_path) -> None:
    from training.project_fit import main

    _, catalogue = fake
    result = main(small_fit(catalogue, tmp_path))
    meta = result["meta"]
    from runtime.settings import Settings

    assert meta["fit_images"] == 2 and meta["train_steps"] >= 1
    assert meta["epochs"] == Settings().train_epochs  # the job's
    served, fitted = result["models"]["served"], result["models"]["fitted"]
    for kind in ("gt_box", "noisy_box", "points_1"):
        assert result["gain_miou"][kind] == pytest.approx(
            fitted[kind]["miou"] - served[kind]["miou"], abs=0.011
        )
    assert served != fitted  # the training moved the plugins
    assert "| gain |" in (tmp_path / "project_fit.md").read_text()


@pytest.mark.usefixtures("one_torch_thread")
def test_the_project_fits_upper_bound_scores_the_training_images_themselves(fake, tmp_path) -> None:
    from training.project_fit import main

    _, catalogue = fake
    meta = main(small_fit(catalogue, tmp_path, "--n-score", "5", "--score-on-fit"))["meta"]
    fit = CompositeDataset("heldout", 2, (256, 256), catalogue=catalogue)
    assert meta["scored_on_fit_images"] and meta["score_images"] == 2  # not --n-score's 5
    assert meta["score_objects"] == sum(min(2, len(fit[i].masks)) for i in range(2))
    assert "scored on images 0-1" in (tmp_path / "project_fit.md").read_text()


@pytest.mark.usefixtures("one_torch_thread")
def test_the_project_fit_of_the_whole_decoder_starts_from_the_plain_base(fake, tmp_path) -> None:
    from stable_sam import StableSamPredictor, build_stable_sam, default_model_paths
    from training.evaluation import EvalModel, evaluate
    from training.project_fit import main
    from training.real_benchmark import KINDS, percent_table

    _, catalogue = fake
    result = main(small_fit(catalogue, tmp_path, "--decoder"))
    assert result["meta"]["fitted"] == "SAM's mask decoder (DT-SAM)"
    assert result["meta"]["plugins"] is None
    paths = default_model_paths()
    plain = build_stable_sam(paths.model_type, paths.base_checkpoint, plugins=False)
    scored = CompositeDataset("heldout", 1, (256, 256), offset=2, catalogue=catalogue)
    row = EvalModel("served", StableSamPredictor(plain, multimask_policy="single"))
    scores = evaluate([row], [scored[0]], KINDS, 1, 2, 0)["served"]
    assert result["models"]["served"] == percent_table(scores)  # the plain base, not plugins
    assert result["models"]["fitted"] != result["models"]["served"]
    assert "Decoder fitted on the project (DT-SAM)" in (tmp_path / "project_fit.md").read_text()


def test_a_composite_share_without_mixed_data_is_refused() -> None:
    from training.train import parse_args

    base = ["--base", "b.safetensors", "--out", "p.safetensors"]
    assert parse_args([*base, "--data", "mixed", "--composite-fraction", "0.3"]).data == "mixed"
    with pytest.raises(SystemExit):
        parse_args([*base, "--composite-fraction", "0.3"])  # synthetic data: it would be ignored
