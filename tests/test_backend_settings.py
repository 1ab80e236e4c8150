"""Model selection by environment and model_version naming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.errors import ModelUnavailableError
from backend.model_server import ModelServer
from runtime.settings import Settings


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAM_MODEL_TYPE", "vit_l")
    monkeypatch.setenv("SAM_PLUGINS", "none")
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls:8080/")
    monkeypatch.setenv("WEBHOOK_SECRET", "")
    monkeypatch.setenv("IMAGE_MAX_PIXELS", "1234")
    settings = Settings()
    assert settings.sam_model_type == "vit_l" and not settings.plugins_enabled
    assert settings.label_studio_url == "http://ls:8080"
    assert settings.webhook_secret is None  # empty = not configured
    assert settings.image_max_pixels == 1234


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError):
        Settings(sam_model_type="vit_x")


def test_every_base_stable_sam_builds_can_be_configured():
    from stable_sam import MODEL_TYPES

    assert "hq_mini" in MODEL_TYPES
    for model_type in MODEL_TYPES:
        assert Settings(sam_model_type=model_type).sam_model_type == model_type


def test_model_version_names_base_and_plugins_without_building(tmp_path):
    plain = ModelServer(Settings(sam_plugins="none", versions_dir=tmp_path))
    assert plain.model_version("1").startswith("sam-")
    stable = ModelServer(Settings(versions_dir=tmp_path))
    assert stable.model_version("1").startswith("stable-sam-mini")
    assert not stable.loaded


def test_official_size_without_checkpoint_is_a_clear_503(tmp_path):
    server = ModelServer(Settings(sam_model_type="vit_b", versions_dir=tmp_path))
    with pytest.raises(ModelUnavailableError, match="SAM_CHECKPOINT") as info:
        server.predictor()
    assert info.value.status_code == 503
    assert "SAM_CHECKPOINT" in server.error  # shown by /health


def test_missing_checkpoint_or_plugin_file_is_a_clear_503(tmp_path):
    missing = ModelServer(Settings(sam_checkpoint=tmp_path / "nope.pth", versions_dir=tmp_path))
    with pytest.raises(ModelUnavailableError, match="not found"):
        missing.predictor()
    plugins = ModelServer(
        Settings(sam_allow_random_weights=True, sam_plugins=str(tmp_path / "p.safetensors"))
    )
    with pytest.raises(ModelUnavailableError, match="SAM_PLUGINS"):
        plugins.predictor()


def test_official_format_checkpoint_loads_as_plain_sam(tmp_path):
    from stable_sam import build_sam

    path = tmp_path / "sam_mini_official.pth"
    torch.save(build_sam("mini").state_dict(), path)
    server = ModelServer(
        Settings(
            sam_model_type="mini",
            sam_checkpoint=path,
            sam_plugins="none",
            device="cpu",
            versions_dir=tmp_path,
        )
    )
    assert server.spec.version == "sam-mini-sam_mini_official"
    predictor = server.predictor()
    assert not predictor.model.has_plugins
    image = np.zeros((40, 50, 3), np.uint8)
    masks = predictor.predict(image, point_coords=np.array([[10.0, 10.0]]),
                              point_labels=np.array([1])).masks  # fmt: skip
    assert masks.shape[-2:] == (40, 50)


def test_warm_up_builds_the_model_and_runs_one_prediction(tmp_path):
    server = ModelServer(
        Settings(sam_allow_random_weights=True, device="cpu", versions_dir=tmp_path)
    )
    assert not server.loaded and not server.warm
    server.warm_up()
    assert server.loaded and server.warm
    assert server.predictor().cache.misses == 1  # the tiny warm-up image was embedded


def test_torch_threads_setting_is_applied_when_the_model_is_built(tmp_path):
    before = torch.get_num_threads()
    try:
        server = ModelServer(
            Settings(sam_allow_random_weights=True, torch_threads=1, versions_dir=tmp_path)
        )
        server.predictor()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_stuck_threshold_within_one_heartbeat_is_refused():
    with pytest.raises(
        ValueError, match="TRAIN_STUCK_AFTER_S must be longer than TRAIN_HEARTBEAT_S"
    ):
        Settings(train_heartbeat_s=10, train_stuck_after_s=10)
