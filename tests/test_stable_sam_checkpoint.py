"""Plugin files and SAM checkpoints: real loading paths, metadata, safety."""

import pickle

import numpy as np
import pytest
import torch

from stable_sam import (
    PluginMismatchError,
    build_sam,
    build_stable_sam,
    load_plugins,
    read_plugin_metadata,
    save_plugins,
)


@pytest.fixture(scope="module")
def mini_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "sam_mini.pth"
    torch.manual_seed(0)
    torch.save(build_sam("mini").state_dict(), path)
    return path


def test_plugin_file_round_trips_weights_and_metadata(tmp_path, mini_checkpoint):
    model = build_stable_sam("mini", mini_checkpoint)
    with torch.no_grad():
        model.plugins.dsp.offset_proj.bias.fill_(0.3)
    path = save_plugins(
        model, tmp_path / "p.safetensors", {"version": "v7", "training_summary": {"steps": 3}}
    )
    assert path.stat().st_size < 1_000_000
    meta = read_plugin_metadata(path)
    assert meta["version"] == "v7"
    assert meta["base_model_type"] == "mini"
    assert len(meta["base_checkpoint_sha256"]) == 64
    assert '"steps": 3' in meta["training_summary"]
    assert "offset_scale" in meta["plugin_config"] and meta["created"]

    fresh = build_stable_sam("mini", mini_checkpoint)
    load_plugins(fresh, path)
    assert torch.equal(fresh.plugins.dsp.offset_proj.bias, torch.full((2,), 0.3))


def test_plugin_file_for_another_base_is_refused(tmp_path, mini_checkpoint):
    model = build_stable_sam("mini", mini_checkpoint)
    path = save_plugins(model, tmp_path / "p.safetensors")
    other = build_stable_sam("mini")  # random base: a different checkpoint hash
    with pytest.raises(PluginMismatchError, match="base checkpoint"):
        load_plugins(other, path)
    hq = build_stable_sam("hq_mini")
    with pytest.raises(PluginMismatchError, match="hq_mini"):
        load_plugins(hq, path)


def test_saving_is_atomic_and_leaves_no_temp_files(tmp_path, mini_checkpoint):
    model = build_stable_sam("mini", mini_checkpoint)
    save_plugins(model, tmp_path / "p.safetensors")
    save_plugins(model, tmp_path / "p.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_checkpoint_with_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        build_sam("mini", path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        build_sam("mini", tmp_path / "nope.pth")


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="vit_q"):
        build_sam("vit_q")


def test_fp16_safetensors_base_loads_as_float32(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sam = build_sam("mini")
    path = tmp_path / "mini.safetensors"
    save_file({k: v.half().contiguous() for k, v in sam.state_dict().items()}, str(path))
    loaded = build_sam("mini", path)
    w = loaded.mask_decoder.iou_token.weight
    assert w.dtype == torch.float32
    assert torch.allclose(w, sam.mask_decoder.iou_token.weight, atol=1e-3)


@pytest.mark.slow
def test_official_vit_b_checkpoint_loads_strictly_through_the_real_path(tmp_path):
    """A real-size vit_b SAM (random weights) saved as an official .pth and loaded back."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    official = sam_model_registry["vit_b"]()  # Meta's own builder
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(official.state_dict(), path)
    assert len(official.state_dict()) > 300
    model = build_stable_sam("vit_b", path)
    for key, value in official.state_dict().items():
        assert torch.equal(model.sam.state_dict()[key], value), key
    assert sum(p.numel() for p in model.trainable_parameters()) == 81_829
    # the plugin layer sees a 64x64 map from a 1024 input; a prompt decodes end to end
    from stable_sam import StableSamPredictor

    image = np.zeros((64, 64, 3), np.uint8)
    out = StableSamPredictor(model).predict(image, box_xyxy=np.array([8, 8, 40, 40]))
    assert out.masks.shape == (1, 64, 64) and model._block.feature_hw == (64, 64)
