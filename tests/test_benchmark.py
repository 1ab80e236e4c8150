"""The paper's benchmark protocol: scoring on hand-made cases and a seconds-long smoke run."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stable_sam import build_sam, metrics
from stable_sam.transforms import low_res_to_original
from training import benchmark
from training.train import main as train_main


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_object_scores_equal_full_image_metrics():
    rng = np.random.default_rng(0)
    hw, side = (300, 420), 256
    gt = np.zeros(hw, bool)
    gt[80:200, 100:260] = True
    logits = rng.normal(-3, 1, size=(4, 64, 64)).astype(np.float32)
    logits[:, 15:40, 15:42] += 6 + rng.normal(0, 2, size=(4, 25, 27))
    miou, mbiou, st = benchmark.score_object(gt, logits, side, metrics.boundary_dilation(hw))
    full = [low_res_to_original(lg, hw, side) > 0 for lg in logits]
    assert miou == pytest.approx(np.mean([metrics.mask_iou(m, gt) for m in full]))
    assert mbiou == pytest.approx(np.mean([metrics.boundary_iou(m, gt) for m in full]))
    assert st == pytest.approx(metrics.stability(full))
    assert 0 < miou < 1 and 0 < st < 1


def test_object_prompts_follow_the_protocol():
    mask = np.zeros((100, 120), bool)
    mask[20:60, 30:90] = True
    p = benchmark.object_prompts(mask, np.random.default_rng(0), 20, mask.shape)
    assert p.boxes["gt_box"].shape == (1, 4) and p.boxes["noisy_box"].shape == (20, 4)
    gt = p.boxes["gt_box"][0]
    assert all(metrics.box_iou(b, gt) >= 0.5 for b in p.boxes["noisy_box"])
    for k in (1, 3, 5, 10):
        pts = p.points[f"points_{k}"]
        assert pts.shape == (20, k, 2)
        assert mask[pts[..., 1].astype(int), pts[..., 0].astype(int)].all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    base = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in build_sam("mini").state_dict().items()}, str(base))
    plugins = root / "plugins.safetensors"
    train_main(
        [
            "--base",
            str(base),
            "--n",
            "2",
            "--out",
            str(plugins),
            "--max-steps",
            "1",
            "--no-progress",
        ]
    )
    return root, base, plugins


def test_quick_benchmark_writes_the_tables_and_json(trained, tmp_path):
    root, base, plugins = trained
    out = tmp_path / "bench"
    argv = ["--out", str(out), "--base", str(base), "--plugins", str(plugins), "--quick"]
    argv += ["--cache-dir", str(root / "cache"), "--train-missing", "--models", "dsp_rts"]
    argv += ["--multimask-study", "--no-progress"]
    result = benchmark.main(argv)

    data = json.loads((out / "benchmark.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert set(data["models"]) == {"sam", "stable_sam", "dsp_rts"}
    for table in data["models"].values():
        assert set(table) == set(benchmark.EVAL_KINDS)
        for cell in table.values():
            assert set(cell) == {"miou", "mbiou", "st"}
            assert all(0.0 <= v <= 100.0 for v in cell.values())
    assert data["models"]["sam"]["gt_box"]["st"] == 100.0  # one deterministic prompt
    assert set(data["alpha1"]) == {"stable_sam", "dsp_rts"}
    assert data["alpha1"]["dsp_rts"]["points_1"] == 1.0  # DSP only: α fixed to (1, 0)
    assert set(data["alpha1"]["stable_sam"]) == set(benchmark.EVAL_KINDS)
    assert set(data["multimask"]) == {"sam", "stable_sam"}
    assert set(data["multimask"]["sam"]) == {"single", "best", "auto"}
    assert (
        data["multimask"]["sam"]["auto"]["points_3"]
        == data["multimask"]["sam"]["single"]["points_3"]
    )
    assert (
        data["multimask"]["sam"]["auto"]["points_1"] == data["multimask"]["sam"]["best"]["points_1"]
    )
    assert data["meta"]["images"] == 2 and data["meta"]["prompts_per_object_and_type"] == 3
    md = (out / "benchmark.md").read_text()
    assert "| SAM (mini base) |" in md and "## mBIoU" in md and "α1" in md

    # The trained variant is cached: a second run does not train again.
    cached = list((root / "cache").glob("dsp-*.plugins.safetensors"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime
    benchmark.main(argv)
    assert cached[0].stat().st_mtime == mtime


def test_missing_variants_are_reported_not_trained(trained, tmp_path):
    _root, base, plugins = trained
    argv = ["--out", str(tmp_path / "b"), "--base", str(base), "--plugins", str(plugins)]
    argv += ["--quick", "--cache-dir", str(tmp_path / "empty"), "--models", "dt_sam"]
    result = benchmark.main([*argv, "--no-progress"])
    assert set(result["models"]) == {"sam", "stable_sam"}
    assert "dt_sam" in (tmp_path / "b" / "benchmark.md").read_text()
