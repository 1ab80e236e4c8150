"""The paper's benchmark: seconds-long runs of its CLI, its rows against the predictor itself.

The protocol it runs (prompts, decoding, scoring) is tested in ``test_evaluation.py``.
"""

import json

import numpy as np
import pytest

from stable_sam import StableSamPredictor, build_stable_sam, metrics
from training import benchmark, evaluation
from training.scenes import SceneDataset
from training.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, random_mini_base):
    root = tmp_path_factory.mktemp("bench")
    base = random_mini_base
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


def small_run(out, base, plugins) -> list[str]:
    """The benchmark's arguments for the random mini base and its one-step plugins."""
    return ["--out", str(out), "--base", str(base), "--model-type", "mini",
            "--plugins", str(plugins)]  # fmt: skip


def test_quick_benchmark_writes_the_tables_and_json(trained, tmp_path):
    root, base, plugins = trained
    out = tmp_path / "bench"
    argv = [*small_run(out, base, plugins), "--quick"]
    argv += ["--cache-dir", str(root / "cache"), "--train-missing", "--models", "dsp_rts"]
    argv += ["--multimask-study", "--no-progress"]
    benchmark.main(argv)

    data = json.loads((out / "benchmark.json").read_text())
    assert set(data["models"]) == {"sam", "stable_sam", "dsp_rts"}
    for table in data["models"].values():
        assert set(table) == set(evaluation.PROMPT_KINDS)
        for cell in table.values():
            assert set(cell) == {"miou", "mbiou", "st"}
            assert all(0.0 <= v <= 100.0 for v in cell.values())
    assert set(data["alpha1"]) == {"stable_sam", "dsp_rts"}
    assert data["alpha1"]["dsp_rts"]["points_1"] == 1.0  # DSP only: α fixed to (1, 0)
    assert set(data["alpha1"]["stable_sam"]) == set(evaluation.PROMPT_KINDS)
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
    sam = data["models"]["sam"]
    row = " | ".join(f"{sam[k]['miou']:.1f}" for k in evaluation.PROMPT_KINDS)
    assert f"| SAM (frozen base) | {row} |" in md  # the mIoU table shows the JSON's numbers
    assert "## mBIoU" in md and "α1" in md

    # The trained variant is cached: a second run does not train again.
    cached = list((root / "cache").glob("dsp-*.plugins.safetensors"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime
    benchmark.main(argv)
    assert cached[0].stat().st_mtime == mtime


def test_every_trained_comparison_row_trains_and_scores_in_seconds(trained, tmp_path):
    """``--train-missing`` from an empty cache: the smoke of each baseline trainer (one step)."""
    _root, base, plugins = trained
    rows = [k for k, (_title, variant) in benchmark.MODEL_ROWS.items() if variant is not None]
    argv = small_run(tmp_path / "b", base, plugins)
    argv += ["--quick", "--cache-dir", str(tmp_path / "cache"), "--train-missing", "--models"]
    result = benchmark.main([*argv, *rows, "--no-progress"])
    assert set(result["models"]) == {"sam", "stable_sam", *rows}
    kinds = {p.name.split(".")[-2] for p in (tmp_path / "cache").glob("*.safetensors")}
    assert {"plugins", "decoder", "tokens", "hq", "pa"} <= kinds


def test_the_comparison_bench_times_each_row_against_sam(capsys):
    from bench.bench_comparison_rows import main as bench_main

    bench_main(["--repeats", "1", "--rows", "sam", "pt_sam", "hq_sam", "pa_sam"])
    out = capsys.readouterr().out
    assert "  sam " in out and "x 1.00" in out
    assert "2,560" in out  # PT-SAM's ten tokens
    assert "481,280" in out  # HQ-SAM's parameters on the mini
    assert "  pa_sam " in out and "1,454,464" in out  # PA-SAM's prompt adapter


def test_missing_variants_are_reported_not_trained(trained, tmp_path):
    _root, base, plugins = trained
    argv = small_run(tmp_path / "b", base, plugins)
    argv += ["--quick", "--cache-dir", str(tmp_path / "empty"), "--models", "dt_sam"]
    result = benchmark.main([*argv, "--no-progress"])
    assert set(result["models"]) == {"sam", "stable_sam"}
    assert "dt_sam" in (tmp_path / "b" / "benchmark.md").read_text()


def _protocol_points_1(predictor: StableSamPredictor, images: int) -> tuple[float, float]:
    """mIoU, mBIoU (percent, 2 decimals) of ``predictor.predict`` itself (its multimask policy)
    on the benchmark's 1-point prompts, one object and one prompt per image, scored on the
    whole image."""
    ious, bious = [], []
    for index, sample in enumerate(SceneDataset("heldout", images)):
        objects, prompts = evaluation.image_prompts(sample, index, 0, n_prompts=1, max_objects=1)
        point = prompts[0].by_kind["points_1"][0]
        mask = predictor.predict(sample.image, point_coords=point, point_labels=[1]).masks[0]
        ious.append(metrics.mask_iou(mask, sample.masks[objects[0]]))
        bious.append(metrics.boundary_iou(mask, sample.masks[objects[0]]))
    return round(100 * float(np.mean(ious)), 2), round(100 * float(np.mean(bious)), 2)


def test_multimask_rows_are_the_predictors_own_answers(trained, tmp_path):
    _root, base, plugins = trained
    images = 4
    argv = small_run(tmp_path / "b", base, plugins)
    argv += ["--n-images", str(images), "--n-prompts", "1", "--max-objects", "1", "--models"]
    result = benchmark.main([*argv, "--multimask-study", "--no-progress"])
    study = result["multimask"]["sam"]
    one_point = {policy: study[policy]["points_1"] for policy in benchmark.MULTIMASK_POLICIES}
    # A case where the policies disagree: best of 3 is not the single output for one click.
    assert one_point["best"]["miou"] != one_point["single"]["miou"]

    sam = build_stable_sam("mini", base, plugins=False, device="cpu")
    for policy in benchmark.MULTIMASK_POLICIES:
        predictor = StableSamPredictor(sam, multimask_policy=policy)
        expected = _protocol_points_1(predictor, images)
        assert (one_point[policy]["miou"], one_point[policy]["mbiou"]) == expected, policy
    assert one_point["auto"] == one_point["best"]  # a lone click: auto takes the best of 3
    assert study["auto"]["points_3"] == study["single"]["points_3"]


def test_the_model_types_bench_times_encoding_clicks_and_the_overhead_in_one_run(capsys):
    from bench.bench_model_types import HEADER
    from bench.bench_model_types import main as bench_main

    rows = bench_main(["--model-types", "mini", "--repeats", "2", "--encode-repeats", "1"])
    out = capsys.readouterr().out
    assert HEADER in out and "clock cpu" in out
    (row,) = rows
    assert row.model_type == "mini" and row.image_size == 256
    assert 7e6 < row.parameters < 8e6
    assert 0 < row.click_p50_ms <= row.click_p95_ms and row.encode_ms > 0
    assert row.overhead == row.stable_decode_ms / row.sam_decode_ms
    assert row.peak_rss_bytes is None or row.peak_rss_bytes > 100 * 2**20  # torch alone is more
    assert row.markdown() in out
    assert "worst overhead x" in out and "target <= 1.10" in out


@pytest.mark.slow  # two Hiera encodings of a 1024 px image: ~12 s of CPU
def test_the_model_types_bench_times_a_sam2_base_on_stable_sam2(capsys):
    from bench.bench_model_types import main as bench_main

    args = ["--model-types", "sam2.1_hiera_tiny", "--repeats", "2", "--encode-repeats", "1"]
    (row,) = bench_main(args)
    assert row.model_type == "sam2.1_hiera_tiny" and row.image_size == 1024
    assert 35e6 < row.parameters < 45e6  # SAM 2.1 hiera tiny: 38.9 M
    assert 0 < row.click_p50_ms <= row.click_p95_ms and row.encode_ms > 0
    assert row.sam_decode_ms > 0 and row.stable_decode_ms > 0
    assert row.markdown() in capsys.readouterr().out


def test_the_model_types_bench_refuses_an_unknown_model_type(capsys):
    from bench.bench_model_types import main as bench_main

    with pytest.raises(SystemExit):
        bench_main(["--model-types", "sam2_hiera_tiny"])
    assert "invalid choice: 'sam2_hiera_tiny'" in capsys.readouterr().err
