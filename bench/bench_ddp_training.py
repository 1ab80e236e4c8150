"""Plugin training (RTS) in 1 process and in 2 CPU processes under torchrun (DDP, gloo), same
data, seed and total batch, in one run: images/s of each and their ratio.

Each process uses one torch thread, so 2 processes use 2 cores. The rate is the training loop's
own (images seen / the loop's wall time, from the output file's summary); the command's wall
time, with start-up and the process group, is printed beside it. The two outputs are also
compared (they must agree within float tolerance, as tests/test_distributed_training.py checks).

    .venv/bin/python bench/bench_ddp_training.py --images 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make the repo importable

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench.processes import free_port  # noqa: E402

BASE = ROOT / "stable_sam" / "weights" / "sam_mini.safetensors"


def train(out: Path, processes: int, images: int, device: str) -> dict:
    args = ["-m", "training.train", "--base", str(BASE), "--data", "synthetic"]
    args += ["--images", str(images), "--out", str(out), "--threads", "1", "--no-progress"]
    args += ["--device", device]
    if processes > 1:
        args = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                f"--master_port={free_port()}", *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    with safe_open(str(out), "pt") as f:
        summary = json.loads(f.metadata()["training_summary"])
    return {
        "processes": processes,
        "images": summary["images"],
        "images_per_s": summary["images_per_s"],
        "loop_s": summary["wall_s"],
        "command_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        one = train(Path(tmp) / "one.safetensors", 1, args.images, args.device)
        two = train(Path(tmp) / "two.safetensors", 2, args.images, args.device)
        a, b = load_file(f"{tmp}/one.safetensors"), load_file(f"{tmp}/two.safetensors")
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    report = {
        "one_process": one,
        "two_processes": two,
        "ratio_images_per_s": round(two["images_per_s"] / one["images_per_s"], 2),
        "largest_weight_difference": worst,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
