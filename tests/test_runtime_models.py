"""runtime.models: the base, default plugins and version name the settings describe, as the
backend serves them and the training job trains on them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.models import ModelConfigError, resolve_model
from runtime.settings import Settings
from stable_sam import build_sam, default_model_paths

SHIPPED = default_model_paths()
DEFAULT = SHIPPED.model_type  # the embedded default's type


def short_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def test_the_embedded_default_is_the_shipped_base_with_the_shipped_plugins():
    spec = resolve_model(Settings())
    assert spec.model_type == DEFAULT == Settings().sam_model_type
    assert spec.checkpoint == SHIPPED.base_checkpoint
    assert spec.default_plugins == SHIPPED.plugin_checkpoint
    assert spec.plugins_enabled
    spec.check()


def test_plain_sam_is_served_but_a_job_still_starts_from_the_default_plugins():
    spec = resolve_model(Settings(sam_plugins="none"))
    assert not spec.plugins_enabled
    assert spec.checkpoint == SHIPPED.base_checkpoint
    assert spec.default_plugins == SHIPPED.plugin_checkpoint


def test_the_embedded_defaults_version_names_the_shipped_weights(tmp_path: Path):
    stable = resolve_model(Settings())
    assert stable.version == f"stable-sam-{DEFAULT}-default-{short_hash(SHIPPED.plugin_checkpoint)}"
    plain = resolve_model(Settings(sam_plugins="none"))
    assert plain.version == f"sam-{DEFAULT}-{short_hash(SHIPPED.base_checkpoint)}"

    # New shipped plugins (a retrained default) give a new version, so Label Studio sees that
    # its stored predictions came from another model.
    copy = tmp_path / "plugins.safetensors"
    copy.write_bytes(SHIPPED.plugin_checkpoint.read_bytes() + b" ")
    moved = type(SHIPPED)(SHIPPED.model_type, SHIPPED.base_checkpoint, copy)
    assert resolve_model(Settings(), defaults=moved).version != stable.version


def test_a_plugin_file_is_the_default_plugins_and_names_the_version(tmp_path: Path):
    plugins = tmp_path / "my_plugins.safetensors"
    plugins.write_bytes(SHIPPED.plugin_checkpoint.read_bytes())
    spec = resolve_model(Settings(sam_plugins=str(plugins)))
    assert spec.default_plugins == plugins
    assert spec.checkpoint == SHIPPED.base_checkpoint
    assert spec.version == f"stable-sam-{DEFAULT}-my_plugins"


def test_a_type_shipped_beside_the_default_serves_its_own_files(monkeypatch, tmp_path):
    from stable_sam import build

    for model_type in build.SHIPPED_FILES:  # what the repository ships is on disk
        paths = default_model_paths(model_type)
        assert paths.base_checkpoint.is_file() and paths.plugin_checkpoint.is_file()
    # A second shipped type, in a weights folder of its own: its files, not the default's.
    monkeypatch.setattr(build, "WEIGHTS_DIR", tmp_path)
    for name in build.SHIPPED_FILES[DEFAULT]:
        (tmp_path / name).write_bytes(name.encode())
    monkeypatch.setitem(build.SHIPPED_FILES, "vit_t", ("other_base.st", "other_plugins.st"))
    (tmp_path / "other_base.st").write_bytes(b"base")
    (tmp_path / "other_plugins.st").write_bytes(b"plugins")
    spec = resolve_model(Settings(sam_model_type="vit_t"))
    assert spec.checkpoint == tmp_path / "other_base.st"
    assert spec.default_plugins == tmp_path / "other_plugins.st"
    assert spec.version == f"stable-sam-vit_t-default-{short_hash(tmp_path / 'other_plugins.st')}"
    default = resolve_model(Settings())  # the default still serves its own
    assert default.model_type == DEFAULT
    assert default.checkpoint == tmp_path / SHIPPED.base_checkpoint.name
    # A type without shipped weights is named as such.
    with pytest.raises(ValueError, match="no shipped weights for 'vit_b'; shipped: "):
        default_model_paths("vit_b")


def test_a_configured_checkpoint_names_the_base_and_starts_untrained(tmp_path: Path):
    checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
    spec = resolve_model(Settings(sam_model_type="vit_b", sam_checkpoint=checkpoint))
    assert spec.checkpoint == checkpoint and spec.default_plugins is None
    assert spec.version == "stable-sam-vit_b-sam_vit_b_01ec64-untrained"
    plain = resolve_model(
        Settings(sam_model_type="vit_b", sam_checkpoint=checkpoint, sam_plugins="none")
    )
    assert plain.version == "sam-vit_b-sam_vit_b_01ec64"


def test_an_official_size_needs_a_checkpoint_unless_random_weights_are_allowed():
    spec = resolve_model(Settings(sam_model_type="vit_b"))
    with pytest.raises(ModelConfigError, match="SAM_CHECKPOINT"):
        spec.check()
    random = resolve_model(Settings(sam_model_type="vit_b", sam_allow_random_weights=True))
    random.check()
    assert random.checkpoint is None
    assert random.version == "stable-sam-vit_b-random-untrained"


def test_missing_weight_files_are_config_errors(tmp_path: Path):
    missing = resolve_model(Settings(sam_checkpoint=tmp_path / "nope.pth"))
    with pytest.raises(ModelConfigError, match="SAM_CHECKPOINT not found"):
        missing.build()
    plugins = resolve_model(Settings(sam_plugins=str(tmp_path / "p.safetensors")))
    with pytest.raises(ModelConfigError, match="SAM_PLUGINS file not found"):
        plugins.build()


def test_the_device_setting_is_the_build_device():
    assert resolve_model(Settings()).device is None  # auto: CUDA when available
    assert resolve_model(Settings(device="cpu")).device == "cpu"


def test_build_installs_the_default_plugins_or_builds_plain_sam():
    spec = resolve_model(Settings(device="cpu"))
    model = spec.build()
    shipped = load_file(str(SHIPPED.plugin_checkpoint))
    installed = model.plugins.state_dict()
    assert shipped.keys() == installed.keys()
    assert all(torch.equal(shipped[k].float(), installed[k].float()) for k in shipped)
    assert not resolve_model(Settings(sam_plugins="none", device="cpu")).build().has_plugins
    # A training job always trains plugins, whatever is served.
    assert resolve_model(Settings(sam_plugins="none", device="cpu")).build(plugins=True).has_plugins


def test_an_official_format_checkpoint_is_the_base(tmp_path: Path):
    torch.manual_seed(0)
    path = tmp_path / "mini_official.pth"
    torch.save(build_sam("mini").state_dict(), path)
    model = resolve_model(
        Settings(sam_model_type="mini", sam_checkpoint=path, device="cpu")
    ).build()
    assert model.base_checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.has_plugins  # freshly initialised: no default plugins for this base
