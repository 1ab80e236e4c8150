"""RTS training of the plugins (and the DT-SAM baseline): smoke runs on tiny data."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_data import two_rectangles

from stable_sam import build_stable_sam, read_plugin_metadata
from training import rts
from training.baselines import load_decoder, save_decoder, train_dt_sam
from training.data import Sample, write_mask_folder
from training.engine import TrainConfig, step_loss, train_plugins
from training.train import main


def _tiny_dataset(n: int = 4, side: int = 96) -> list[Sample]:
    return two_rectangles(n, side)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_file(random_mini_base):
    return random_mini_base


def test_train_plugins_runs_and_only_touches_the_plugins(base_file):
    model = build_stable_sam("mini", base_file, device="cpu")
    sam_before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    plugins_before = {k: v.clone() for k, v in model.plugins.state_dict().items()}
    calls = []
    cfg = TrainConfig(batch_prompts=8, prompts_per_image=4, max_steps=2)
    result = train_plugins(model, _tiny_dataset(), cfg, progress=lambda *a: calls.append(a))

    assert result.final_loss == pytest.approx(result.losses[-1])  # last 10 % of 2 steps: 1
    assert result.steps == 2 and len(result.losses) == 2 and np.isfinite(result.final_loss)
    assert result.wall_s > 0 and result.images_per_s > 0
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)]
    assert result.summary["steps"] == 2 and result.summary["images"] == 4
    json.dumps(result.summary)  # goes into the plugin file's metadata
    for k, v in model.sam.state_dict().items():
        assert torch.equal(v, sam_before[k]), k
    changed = [
        k for k, v in model.plugins.state_dict().items() if not torch.equal(v, plugins_before[k])
    ]
    assert changed


def test_loss_goes_down_on_a_fixed_batch(base_file):
    torch.manual_seed(0)
    model = build_stable_sam("mini", base_file, device="cpu")
    rng = np.random.default_rng(0)
    cfg = rts.RTSConfig()
    data = _tiny_dataset(2)
    # No jitter: each image's long side fills the frame, as SAM's own resize does.
    augmented = [
        rts.large_scale_jitter(s.image, s.masks, model.image_size, rng, (1.0, 1.0), 0.0)
        for s in data
    ]
    prompt_lists = [rts.sample_prompts(a, 6, rng, cfg) for a in augmented]
    params = model.trainable_parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)  # a fast check of the mechanics
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss, n = step_loss(model, augmented, prompt_lists, 1 / 12)
        opt.step()
        losses.append(loss)
    assert n == 12
    # A random base limits what layer-2 plugins can fix; the trend must still be clearly down.
    assert losses[-1] < 0.97 * losses[0], losses
    assert max(losses[-3:]) < min(losses[:3]), losses


def test_cli_writes_a_plugin_file_with_the_training_summary(base_file, tmp_path):
    folder = write_mask_folder(_tiny_dataset(3), tmp_path / "data")
    out = tmp_path / "plugins.safetensors"
    result = main(
        [
            "--base",
            str(base_file),
            "--data",
            str(folder),
            "--n",
            "3",
            "--out",
            str(out),
            "--max-steps",
            "1",
            "--batch-prompts",
            "8",
            "--prompts-per-image",
            "4",
            "--no-progress",
        ]
    )
    assert result.steps == 1
    meta = read_plugin_metadata(out)
    summary = json.loads(meta["training_summary"])
    assert summary["steps"] == 1 and summary["variant"] == "stable"
    assert summary["config"]["lr"] == 1e-3 and summary["config"]["weight_decay"] == 0.0
    reloaded = build_stable_sam("mini", base_file, plugin_checkpoint=out, device="cpu")
    saved, state = load_file(str(out)), reloaded.plugins.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


def test_dsp_variant_keeps_routing_fixed(base_file, tmp_path):
    out = tmp_path / "dsp.safetensors"
    main(
        [
            "--base",
            str(base_file),
            "--data",
            str(write_mask_folder(_tiny_dataset(2), tmp_path / "d")),
            "--n",
            "2",
            "--out",
            str(out),
            "--max-steps",
            "1",
            "--variant",
            "dsp",
            "--no-progress",
        ]
    )
    model = build_stable_sam("mini", base_file, plugin_checkpoint=out, device="cpu")
    assert model.plugins.config.fixed_alpha == (1.0, 0.0)


def test_dt_sam_fine_tunes_the_decoder_and_round_trips(base_file, tmp_path):
    model = build_stable_sam("mini", base_file, plugins=False, device="cpu")
    encoder_before = {k: v.clone() for k, v in model.sam.image_encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.sam.mask_decoder.state_dict().items()}
    cfg = TrainConfig(lr=1e-4, batch_prompts=8, prompts_per_image=4, max_steps=1)
    result = train_dt_sam(model, _tiny_dataset(2), cfg)
    assert result.steps == 1
    for k, v in model.sam.image_encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k])
    assert any(
        not torch.equal(v, decoder_before[k])
        for k, v in model.sam.mask_decoder.state_dict().items()
    )
    assert not any(p.requires_grad for p in model.sam.parameters())

    path = save_decoder(model, tmp_path / "dt.safetensors", {"training_summary": result.summary})
    fresh = build_stable_sam("mini", base_file, plugins=False, device="cpu")
    load_decoder(fresh, path)
    for k, v in fresh.sam.mask_decoder.state_dict().items():
        assert torch.equal(v, model.sam.mask_decoder.state_dict()[k])


def test_empty_dataset_is_refused(base_file):
    model = build_stable_sam("mini", base_file, device="cpu")
    with pytest.raises(ValueError, match="empty"):
        train_plugins(model, [], TrainConfig())


def test_the_benchmark_trains_a_variant_exactly_as_the_cli_does(base_file, tmp_path):
    from safetensors.torch import load_file

    from training.benchmark import train_variant

    cli, api = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    # Fresh plugins draw from torch's global generator: the same state for both runs.
    torch.manual_seed(5)
    argv = ["--base", str(base_file), "--n", "2", "--out", str(cli), "--variant", "dsp"]
    main([*argv, "--max-steps", "1", "--seed", "3", "--no-progress"])
    torch.manual_seed(5)
    train_variant("dsp", base_file, "mini", 2, api, max_steps=1, seed=3)

    a, b = load_file(str(cli)), load_file(str(api))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads(read_plugin_metadata(api)["training_summary"])
    assert summary["variant"] == "dsp" and summary["config"]["seed"] == 3


def test_a_variant_built_with_a_seed_has_the_same_fresh_plugins_every_time(base_file):
    from training.baselines import VARIANTS

    def plugin_state(seed):
        model = VARIANTS["stable"].build_model("mini", base_file, "cpu", seed=seed)
        return {k: v.clone() for k, v in model.plugins.state_dict().items()}

    first, again, other = plugin_state(3), plugin_state(3), plugin_state(4)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_building_a_seeded_variant_leaves_the_callers_generator_alone(base_file):
    from training.baselines import VARIANTS

    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    VARIANTS["stable"].build_model("mini", base_file, "cpu", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_pt_sam_trains_only_the_tokens_and_round_trips_strictly(base_file, tmp_path):
    from training.baselines import PT_SAM_TOKENS, load_tokens, save_tokens, train_pt_sam

    model = build_stable_sam("mini", base_file, plugins=False, device="cpu")
    before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    cfg = TrainConfig(lr=1e-3, batch_prompts=8, prompts_per_image=4, epochs=4, seed=1)
    result = train_pt_sam(model, _tiny_dataset(2), cfg)
    assert result.steps == 4
    after = model.sam.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    # Every token RTS's prompts use moved, the prompt encoder's too; RTS draws no negative
    # clicks, so the negative-point embedding has no gradient and stays SAM's.
    assert changed == set(PT_SAM_TOKENS) - {"prompt_encoder.point_embeddings.0.weight"}
    assert not any(p.requires_grad for p in model.sam.parameters())  # ... nothing else did

    path = save_tokens(model, tmp_path / "pt.safetensors", {"training_summary": result.summary})
    assert set(load_file(str(path))) == set(PT_SAM_TOKENS)
    fresh = build_stable_sam("mini", base_file, plugins=False, device="cpu")
    load_tokens(fresh, path)
    assert all(torch.equal(v, after[k]) for k, v in fresh.sam.state_dict().items())
    # Strict: a file missing a token, or with one of another shape, is refused.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    state = load_file(str(path))
    del state[PT_SAM_TOKENS[0]]
    save_file(state, str(tmp_path / "missing.safetensors"), header)
    with pytest.raises(ValueError, match="missing"):
        load_tokens(fresh, tmp_path / "missing.safetensors")
    state = load_file(str(path))
    state["mask_decoder.mask_tokens.weight"] = torch.zeros(3, 256)
    save_file(state, str(tmp_path / "shape.safetensors"), header)
    with pytest.raises(ValueError, match="mask_tokens"):
        load_tokens(fresh, tmp_path / "shape.safetensors")


def test_pt_sam_at_its_initial_tokens_is_plain_sam(base_file):
    """PT-SAM starts from SAM's own tokens (no new parameters): its output is SAM's, bit for
    bit, before training; the step's gradient reaches the prompt encoder's tokens."""
    from training.baselines import PT_SAM_TOKENS, pt_sam_parameters

    sam = build_stable_sam("mini", base_file, plugins=False, device="cpu")
    pt = build_stable_sam("mini", base_file, plugins=False, device="cpu")
    for p in pt_sam_parameters(pt):
        p.requires_grad_(True)
    aug = rts.augment(
        _tiny_dataset(1)[0], None, sam.image_size, np.random.default_rng(0), rts.RTSConfig()
    )
    prompts = rts.sample_prompts(aug, 4, np.random.default_rng(1), rts.RTSConfig())
    with torch.no_grad():
        a, _ = step_loss(sam, [aug], [prompts], 0.25, backward=False)
    b, _ = step_loss(pt, [aug], [prompts], 0.25, backward=True)
    assert a == b
    grads = {name: p.grad for name, p in zip(PT_SAM_TOKENS, pt_sam_parameters(pt), strict=True)}
    reached = {name for name, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert {"mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"} <= reached
    assert any(name.startswith("prompt_encoder.") for name in reached), reached
