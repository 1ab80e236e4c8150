"""``torchrun --nproc_per_node=2 -m training.train`` (DDP, gloo on CPU) trains what one process
trains with the same total batch and seed: the plugin (or DT-SAM decoder) tensors agree within
float tolerance, and so do the recorded losses.

The runs: 9 synthetic scenes, 4 images (32 prompts) per step, so 3 steps whose last has one
image (rank 1 has nothing to decode there and must still join the all-reduce). Measured: the
largest difference of any trained value is ~2e-6 (values up to ~1); a rank training on the
wrong share of a step moved them by 5.7e-3 (strided shards then), a loss not scaled back by the world size by 3.7e-4
(both checked by breaking the code).

PA-SAM draws Gumbel noise in training; each image's draws are seeded from its own stream
(``training.engine.fit``), so two ranks draw what one process draws and the same bound holds
(measured 2.5e-6). Drawn from torch's global generator instead, each rank's images got other
noise than in one process: the trained values then differed by 5.7e-3 (checked by breaking it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from bench.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "stable_sam" / "weights" / "sam_mini.safetensors"
ATOL = 2e-5  # trained values; 10x the largest difference measured between the two runs

pytestmark = pytest.mark.slow


def _train(out: Path, variant: str, processes: int, images: int = 9) -> Path:
    """``python -m training.train`` in ``processes`` processes (torchrun when more than one)."""
    args = ["-m", "training.train", "--base", str(BASE), "--data", "synthetic"]
    args += ["--images", str(images), "--out", str(out), "--variant", variant]
    args += ["--seed", "3", "--threads", "1", "--no-progress", "--device", "cpu"]
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        launcher += [f"--master_port={free_port()}"]
        args = launcher + args
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def _summary(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["training_summary"])


@pytest.mark.parametrize("variant", ["stable", "dt-sam", "pt-sam", "hq-sam-rts", "pa-sam"])
def test_two_gloo_processes_train_what_one_process_trains(tmp_path: Path, variant: str) -> None:
    one = _train(tmp_path / "one.safetensors", variant, 1)
    two = _train(tmp_path / "two.safetensors", variant, 2)
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= ATOL, f"largest difference {worst:.3g}"
    sa, sb = _summary(one), _summary(two)
    assert (sa["processes"], sb["processes"]) == (1, 2)
    assert sb["process_group"] == "gloo"
    assert sa["steps"] == sb["steps"] == 3
    assert sa["images"] == sb["images"] == 9
    assert sa["prompts"] == sb["prompts"]
    for key in ("first_loss", "final_loss"):
        assert sb[key] == pytest.approx(sa[key], rel=1e-4), key


def test_each_rank_takes_a_block_of_a_step_and_loads_one_image_past_it() -> None:
    from training.distributed import Ranks
    from training.engine import _load_shard

    # Positions of a step: one process takes all, the ranks split them into blocks.
    assert list(Ranks().shard(4)) == [0, 1, 2, 3]
    assert [list(Ranks(world=2, rank=r).shard(4)) for r in (0, 1)] == [[0, 1], [2, 3]]
    assert [list(Ranks(world=3, rank=r).shard(4)) for r in (0, 1, 2)] == [[0, 1], [2], [3]]
    assert [list(Ranks(world=2, rank=r).shard(1)) for r in (0, 1)] == [[0], []]
    reads: list[int] = []

    class Counting(list):
        def __getitem__(self, i):  # type: ignore[override]
            reads.append(i)
            return f"sample{i}"

    shard = _load_shard(Counting(range(10)), [7, 3, 5, 1], Ranks(world=2, rank=0))
    assert shard == [(0, "sample7", "sample3"), (1, "sample3", "sample5")]
    assert sorted(reads) == [3, 5, 7]  # each image read once
    assert Ranks().sum(2.5, "cpu") == 2.5  # a world of one needs no process group
