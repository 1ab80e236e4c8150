"""Specification of mini SAM pretraining (training/pretrain/): a seconds-long smoke version."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from stable_sam import build_sam, build_stable_sam, prompts
from stable_sam.build import file_sha256
from training import rts
from training.data import Sample
from training.pretrain.checkpoint import export_fp16, resized_state, warm_start
from training.pretrain.config import PretrainConfig
from training.pretrain.data import (
    MIN_TARGET_PIXELS,
    PretrainSamples,
    batch_stream,
    collate_batch,
    jitter_sample,
    prepare_sample,
)
from training.pretrain.loop import (
    correction_points,
    decode_batched,
    heldout_metrics,
    pretrain,
    train_step_loss,
)
from training.pretrain.provenance import write_provenance
from training.pretrain.schedule import focal_weight_at, lr_at
from training.scenes import SceneDataset, make_scene


def test_scenes_are_jittered_as_rts_jitters_them_without_the_tiny_objects() -> None:
    scene = make_scene(0, (300, 420))
    speck = np.zeros((1, 300, 420), bool)
    speck[0, 150:154, 200:204] = True  # 16 px here, about 4 px in the 205 px wide frame
    sample = Sample(scene.image, np.concatenate([scene.masks, speck]), "s")
    cfg = PretrainConfig(scale_range=(0.8, 0.8))
    aug = jitter_sample(sample, np.random.default_rng(0), cfg, 256)
    ref = rts.large_scale_jitter(
        sample.image, sample.masks, 256, np.random.default_rng(0), (0.8, 0.8), 0.5
    )
    h, w = aug.valid_hw
    assert aug.image.shape == (256, 256, 3) and (h, w) == ref.valid_hw
    assert w == round(0.8 * 256) and h == int(300 * 0.8 * 256 / 420 + 0.5)
    np.testing.assert_array_equal(aug.image, ref.image)
    big = ref.masks.sum(axis=(1, 2)) >= MIN_TARGET_PIXELS
    assert big.sum() == len(scene.masks) and not big[-1]  # only the speck is dropped
    np.testing.assert_array_equal(aug.masks, ref.masks[big])


def test_lr_warms_up_then_decays() -> None:
    cfg = PretrainConfig(lr=1e-3, warmup_steps=10, steps=100, minutes=None, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 0.0) for s in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(1e-3)
    assert lrs[10] > lrs[50] > lrs[99] >= 1e-4


def test_focal_weight_ramps_to_sams_twenty() -> None:
    cfg = PretrainConfig(steps=100, minutes=None, focal_ramp=0.5)
    assert focal_weight_at(cfg, 0, 0.0) == 0.0
    assert focal_weight_at(cfg, 25, 0.0) == pytest.approx(10.0)
    assert focal_weight_at(cfg, 50, 0.0) == focal_weight_at(cfg, 99, 0.0) == 20.0
    assert focal_weight_at(PretrainConfig(focal_ramp=0.0), 0, 0.0) == 20.0


def test_fp16_export_loads_back_strictly(tmp_path) -> None:
    sam = build_sam("mini")
    path = tmp_path / "sam.safetensors"
    export_fp16(sam, path)
    assert path.stat().st_size <= 16 * 2**20
    loaded = build_sam("mini", path)  # strict load; safetensors come back as float32
    a = sam.state_dict()["mask_decoder.iou_token.weight"]
    b = loaded.state_dict()["mask_decoder.iou_token.weight"]
    assert b.dtype == torch.float32
    torch.testing.assert_close(a.half().float(), b)


def test_prepared_prompts_lie_in_their_masks_and_batches_concatenate() -> None:
    cfg = PretrainConfig(objects_per_image=4, max_points=3, train_size_range=(256, 320))
    items = [PretrainSamples(cfg, 256)[i] for i in range(2)]
    for it in items:
        assert len(it.masks) <= 4 and it.images.shape == (1, 256, 256, 3)
        for mask, box, pts, bpts in zip(it.masks, it.boxes, it.points, it.box_points, strict=True):
            np.testing.assert_array_equal(box, prompts.gt_box(mask))
            xy = np.concatenate([pts, bpts]).astype(int)
            assert pts.shape == (3, 2) and mask[xy[:, 1], xy[:, 0]].all()
    batch = collate_batch(items)
    n0, n1 = len(items[0].masks), len(items[1].masks)
    assert batch.images.shape[0] == 2 and len(batch.masks) == n0 + n1
    assert batch.image_index.tolist() == [0] * n0 + [1] * n1


def test_the_data_of_a_step_does_not_depend_on_loader_processes_or_resume_point() -> None:
    cfg = PretrainConfig(batch_size=2, train_size_range=(256, 256), workers=0)
    in_process = next(batch_stream(cfg, 256, start_step=3))
    cfg.workers = 2
    by_workers = next(batch_stream(cfg, 256, start_step=3))
    again = collate_batch([PretrainSamples(cfg, 256)[6], PretrainSamples(cfg, 256)[7]])
    for got in (by_workers, again):
        np.testing.assert_array_equal(got.images, in_process.images)
        np.testing.assert_array_equal(got.masks, in_process.masks)
        np.testing.assert_array_equal(got.points, in_process.points)


def test_batched_decoding_equals_sams_per_image_decoding() -> None:
    torch.manual_seed(0)
    model = build_stable_sam("mini", plugins=False, device="cpu")  # SAM's own decoder forward
    emb = torch.randn(2, 256, 16, 16)
    boxes = torch.tensor([[10.0, 20, 100, 120], [50, 60, 200, 210], [0, 0, 255, 255]])
    points = (torch.rand(3, 2, 2) * 255, torch.tensor([[1.0, 0], [1, 1], [0, 1]]))
    mask_in = torch.randn(3, 1, 64, 64)
    index = torch.tensor([0, 1, 1])
    with torch.no_grad():
        for multimask in (False, True):
            low, iou = decode_batched(model.sam, emb[index], points, boxes, mask_in, multimask)
            for i in range(3):
                pts_i = (points[0][i : i + 1], points[1][i : i + 1])
                sparse, dense = model.encode_prompts(pts_i, boxes[i : i + 1], mask_in[i : i + 1])
                ref_low, ref_iou = model.decode(emb[index[i]][None], sparse, dense, multimask)
                torch.testing.assert_close(low[i : i + 1], ref_low, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(iou[i : i + 1], ref_iou, atol=1e-4, rtol=1e-4)


def test_heldout_score_is_the_protocols_and_leaves_the_model_trainable() -> None:
    from stable_sam import StableSam, StableSamPredictor
    from training import evaluation

    torch.manual_seed(0)
    sam = build_sam("mini").train()
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    scenes = SceneDataset("heldout", 2, (256, 256))
    got = heldout_metrics(sam, scenes, torch.device("cpu"))
    assert sam.training and all(p.requires_grad for p in sam.parameters())
    assert all(torch.equal(v, before[k]) for k, v in sam.state_dict().items())

    model = StableSam(sam, "mini", "x")  # may freeze sam now: the checks above are done
    best = evaluation.EvalModel("best", StableSamPredictor(model, multimask_policy="best"))
    single = best.with_policy("single", "single")
    scores = evaluation.evaluate([best, single], scenes, ("gt_box", "points_1"), n_prompts=1)

    def miou(row: str, kind: str) -> float:
        return 100 * evaluation.summarize(scores[row].objects[kind])["miou"]

    assert got["objects"] == sum(s.num_instances for s in scenes)
    assert got["box_miou"] == miou("single", "gt_box")
    assert got["point1_miou"] == miou("best", "points_1")  # best of 3 for one click
    assert got["point1_single_miou"] == miou("single", "points_1")


@pytest.mark.slow
def test_loss_decreases_when_fitting_one_scene() -> None:
    torch.manual_seed(0)
    sam = build_sam("mini")
    sam.train()
    cfg = PretrainConfig(objects_per_image=3, correction_prob=0.0, box_points_prob=0.0)
    sample = SceneDataset("train", 1, (256, 256))[0]
    batch = prepare_sample(sample, np.random.default_rng(0), cfg, 256)
    opt = torch.optim.AdamW(sam.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        rng = np.random.default_rng(1)  # the same prompts every step
        loss = train_step_loss(sam, batch, rng, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow
def test_smoke_run_writes_a_strictly_loadable_checkpoint_and_resumes(tmp_path) -> None:
    out, state = tmp_path / "sam_mini.safetensors", tmp_path / "state.pt"
    cfg = PretrainConfig(
        steps=2,
        minutes=None,
        batch_size=1,
        objects_per_image=2,
        warmup_steps=1,
        train_size_range=(256, 256),
        heldout_n=2,
        heldout_size_range=(256, 256),
        threads=1,
    )
    summary = pretrain(cfg, out, state, progress=False, device=torch.device("cpu"))
    assert summary["steps"] == 2 and summary["images"] == 2
    assert 0.0 <= summary["heldout"]["box_miou"] <= 100.0
    build_sam("mini", out)  # strict
    assert torch.load(state, weights_only=True)["step"] == 2

    cfg.steps = 3
    summary = pretrain(
        cfg, out, state, resume=True, command="--resume", progress=False, device=torch.device("cpu")
    )
    assert summary["steps"] == 3
    assert torch.load(state, weights_only=True)["step"] == 3
    assert [(r["from_step"], r["to_step"]) for r in summary["history"]] == [(0, 2), (2, 3)]
    write_provenance(tmp_path / "PROVENANCE.md", ["--resume"], cfg, summary, out, 1.0)
    text = (tmp_path / "PROVENANCE.md").read_text()
    assert "steps 2-3" in text and "| GT box |" in text
    assert "The `mini` SAM" in text and "from random initialisation" in text


def test_warm_start_resizes_the_position_tables_and_keeps_every_other_weight(tmp_path) -> None:
    from segment_anything.modeling.image_encoder import get_rel_pos

    torch.manual_seed(0)
    small = build_sam("mini")
    with torch.no_grad():  # SAM starts these at zero: give them a pattern to resize
        for name, p in small.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn_like(p))
        # A ramp along x (the third axis of (1, h, w, C)), constant along y.
        ramp = torch.linspace(-1.0, 1.0, 16)
        small.image_encoder.pos_embed.copy_(ramp[None, None, :, None].expand(1, 16, 16, 192))
    path = tmp_path / "mini.safetensors"
    export_fp16(small, path)
    big = build_sam("mini_512")
    warm_start(big, path)
    before = {k: v.half().float() for k, v in small.state_dict().items()}
    after = big.state_dict()
    pos = after["image_encoder.pos_embed"]
    assert pos.shape == (1, 32, 32, 192)
    assert torch.allclose(pos[:, :1], pos, atol=1e-6)  # still constant along y
    assert torch.all(pos[0, 0, 1:, 0] > pos[0, 0, :-1, 0])  # and rising along x
    assert abs(float(pos[0, 0, 0, 0]) + 1.0) < 0.1 and abs(float(pos[0, 0, -1, 0]) - 1.0) < 0.1
    # Global blocks (1, 3, 5) attend over the 32x32 grid: tables of 2 * 32 - 1 rows, resized
    # as SAM's own get_rel_pos resizes a short table at run time.
    for b in (1, 3, 5):
        for axis in "hw":
            key = f"image_encoder.blocks.{b}.attn.rel_pos_{axis}"
            assert after[key].shape == (63, 64) and before[key].shape == (31, 64)
            expected = get_rel_pos(32, 32, before[key])
            assert torch.allclose(get_rel_pos(32, 32, after[key]), expected, atol=1e-5)
    resized = {"image_encoder.pos_embed"} | {
        f"image_encoder.blocks.{b}.attn.rel_pos_{a}" for b in (1, 3, 5) for a in "hw"
    }
    for key, value in before.items():
        if key not in resized:
            assert torch.equal(after[key], value), key
    with torch.no_grad():
        embedding = big.image_encoder(torch.zeros(1, 3, 512, 512))
    assert embedding.shape == (1, 256, 32, 32)


def test_warm_start_names_what_does_not_fit() -> None:
    small = build_sam("mini").state_dict()
    target = build_sam("mini_512").state_dict()
    del small["mask_decoder.iou_token.weight"]
    small["mask_decoder.mask_tokens.weight"] = torch.zeros(3, 256)
    with pytest.raises(ValueError, match=r"missing \['mask_decoder.iou_token.weight'\].*"
                       r"other shapes \['mask_decoder.mask_tokens.weight'\]"):  # fmt: skip
        resized_state(small, target)


def one_step_mini_512_run(tmp_path: Path, **changes) -> tuple[Path, Path, Path, PretrainConfig]:
    """A random mini file to start from, the run's export and state paths, and the config of a
    one-step ``mini_512`` run warm-started from it (``changes`` override fields)."""
    init = tmp_path / "mini.safetensors"
    export_fp16(build_sam("mini"), init)
    out, state = tmp_path / "sam_mini_512.safetensors", tmp_path / "state.pt"
    cfg = PretrainConfig(
        model_type="mini_512",
        init_from=str(init),
        steps=1,
        minutes=None,
        batch_size=1,
        objects_per_image=1,
        warmup_steps=1,
        train_size_range=(512, 512),
        heldout_n=1,
        heldout_size_range=(256, 256),
        threads=1,
    )
    return init, out, state, dataclasses.replace(cfg, **changes)


def test_a_mini_512_run_starts_from_a_mini_file_and_exports_its_own_type(tmp_path) -> None:
    init, out, state, cfg = one_step_mini_512_run(tmp_path, lr=0.0)
    summary = pretrain(cfg, out, state, progress=False, device=torch.device("cpu"))
    assert summary["steps"] == 1
    write_provenance(tmp_path / "PROVENANCE.md", [], cfg, summary, out, 1.0)
    text = (tmp_path / "PROVENANCE.md").read_text()
    assert "The `mini_512` SAM" in text and "from `mini.safetensors` (SHA-256 `" in text
    assert "encoder frozen" not in text and "correction clicks" not in text
    tuned = dataclasses.replace(cfg, freeze_encoder=True, correction_rounds=4)
    write_provenance(tmp_path / "TUNED.md", [], tuned, summary, out, 1.0)
    tuned_text = (tmp_path / "TUNED.md").read_text()
    assert "the image encoder frozen" in tuned_text and "with 4 correction clicks" in tuned_text
    exported = build_sam("mini_512", out)  # strict, at 512 px
    assert exported.image_encoder.img_size == 512
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["model_type"] == "mini_512"
    assert summary["history"][0]["init_sha256"] == file_sha256(init)
    # lr 0: the one step changed nothing, so the export is the warm start itself.
    expected = build_sam("mini_512")
    warm_start(expected, init)
    for key, value in expected.state_dict().items():
        assert torch.allclose(exported.state_dict()[key], value, atol=2e-3), key


def test_a_resume_keeps_the_runs_type_and_start(tmp_path) -> None:
    init, out, state, cfg = one_step_mini_512_run(tmp_path)
    pretrain(cfg, out, state, progress=False, device=torch.device("cpu"))
    # The resume's command line names no start: it is the saved one, for the provenance.
    again = dataclasses.replace(cfg, init_from=None, steps=2)
    summary = pretrain(again, out, state, resume=True, progress=False, device=torch.device("cpu"))
    assert summary["steps"] == 2 and again.init_from == str(init)
    with pytest.raises(ValueError, match="is a mini_512 run; resume it with --model-type mini_512"):
        pretrain(dataclasses.replace(cfg, model_type="mini"), out, state, resume=True,
                 progress=False, device=torch.device("cpu"))  # fmt: skip
    with pytest.raises(ValueError, match=r"started from .*mini\.safetensors, not --init-from"):
        pretrain(dataclasses.replace(cfg, init_from=str(out)), out, state, resume=True,
                 progress=False, device=torch.device("cpu"))  # fmt: skip


def test_the_command_lines_defaults_follow_the_model_type() -> None:
    from training.pretrain.__main__ import parse_args

    mini = parse_args([])
    assert mini.out == Path("stable_sam/weights/sam_mini.safetensors")
    assert mini.provenance == Path("stable_sam/weights/PROVENANCE.md")
    big = parse_args(["--model-type", "mini_512"])
    assert big.out == Path("stable_sam/weights/sam_mini_512.safetensors")
    assert big.state == Path(".cache/pretrain/mini_512_state.pt")
    assert big.provenance == Path("stable_sam/weights/PROVENANCE_mini_512.md")
    with pytest.raises(SystemExit):  # the run would overwrite the file it starts from
        parse_args(["--init-from", "stable_sam/weights/sam_mini.safetensors"])


def test_resolution_ceiling_is_perfect_for_big_grids_and_lower_for_small_ones() -> None:
    from training.resolution_ceiling import resolution_ceiling

    small = resolution_ceiling(64, n=2)["all"]
    large = resolution_ceiling(2048, n=2)["all"]
    assert 0 < small["area"] < large["area"] and large["signed_distance"] > 97
    assert small["objects"] == large["objects"] > 0


def test_correction_clicks_land_on_the_error_at_pixel_centres() -> None:
    target = np.zeros((2, 8, 8), bool)
    target[:, 2:6, 2:6] = True
    pred = target.copy()
    pred[0, 2:6, 2:4] = False  # a miss: the click must be positive, inside the missed part
    pred[1, 0, 0] = True  # a false positive: the click must be negative, on it
    coords, labels = correction_points(pred, target, np.random.default_rng(0))
    assert labels.tolist() == [[1.0], [0.0]]
    (x0, y0), (x1, y1) = coords[0, 0], coords[1, 0]
    assert 2 < x0 < 4 and 2 < y0 < 6 and (x1, y1) == (0.5, 0.5)


def _decoder_calls(monkeypatch, cfg: PretrainConfig) -> list[tuple[int, bool]]:
    """(points per prompt, whether a mask prompt went in) of every decoder call of one step."""
    import training.pretrain.loop as loop

    calls: list[tuple[int, bool]] = []
    real = loop.decode_batched

    def recording(sam, embeddings, points, boxes, mask_input, multimask):
        calls.append((0 if points is None else points[0].shape[1], mask_input is not None))
        return real(sam, embeddings, points, boxes, mask_input, multimask)

    monkeypatch.setattr(loop, "decode_batched", recording)
    torch.manual_seed(0)
    sample = SceneDataset("train", 1, (256, 256))[0]
    batch = prepare_sample(sample, np.random.default_rng(0), cfg, 256)
    train_step_loss(build_sam("mini"), batch, np.random.default_rng(1), cfg).backward()
    return calls


@pytest.mark.parametrize("mask_prob", [0.0, 1.0])
def test_correction_rounds_add_one_click_each_with_the_mask_prompt_as_configured(
    monkeypatch, mask_prob: float
) -> None:
    cfg = PretrainConfig(objects_per_image=2, correction_prob=1.0, box_points_prob=0.0,
                         correction_rounds=3, correction_mask_prob=mask_prob)  # fmt: skip
    box, points, *rounds = _decoder_calls(monkeypatch, cfg)
    assert box == (0, False) and not points[1]
    assert [n for n, _ in rounds] == [points[0] + 1, points[0] + 2, points[0] + 3]
    assert all(has_mask == bool(mask_prob) for _, has_mask in rounds)


def test_the_shipped_one_round_recipe_is_one_correction_with_the_mask_prompt(monkeypatch) -> None:
    cfg = PretrainConfig(objects_per_image=2, correction_prob=1.0, box_points_prob=0.0)
    _box, points, *rounds = _decoder_calls(monkeypatch, cfg)
    assert rounds == [(points[0] + 1, True)]


def test_a_frozen_encoder_gets_no_gradient_and_the_decoder_does() -> None:
    torch.manual_seed(0)
    sam = build_sam("mini")
    sam.train()
    cfg = PretrainConfig(objects_per_image=2, freeze_encoder=True)
    sample = SceneDataset("train", 1, (256, 256))[0]
    batch = prepare_sample(sample, np.random.default_rng(0), cfg, 256)
    train_step_loss(sam, batch, np.random.default_rng(1), cfg).backward()
    assert all(p.grad is None for p in sam.image_encoder.parameters())
    assert all(p.grad is not None for p in sam.mask_decoder.parameters() if p.requires_grad)
