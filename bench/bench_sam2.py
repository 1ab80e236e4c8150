"""SAM 2.1 bases on this CPU (issue: bases): image encoding, cached clicks, plugin overhead.

For each SAM 2.1 model type (hiera tiny by default; ``--all`` for small, base+ and large too),
with random weights (latency does not depend on their values):

* encode: one 1024 x 768 picture through the Hiera encoder (the predictor's whole ``embed``:
  resize, normalise, encode, high-resolution features), median of ``--encode-repeats`` after one
  warm-up, wall and CPU seconds;
* cached click: a lone positive click on the cached embedding, as the backend answers it
  (Stable-SAM with trained-like plugins, the predictor's multimask policy, the mask resized to
  the picture), p50 / p95 over ``--clicks`` clicks at random points;
* plugin overhead: prompt encoder + mask decoder (one box, single-mask output) of plain SAM 2
  and of Stable-SAM 2 on the same frozen base, interleaved in one run, ratio of medians
  (target <= 1.10).

    .venv/bin/python -m bench.bench_sam2 [--all] [--threads 1] [--clock cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from stable_sam import (
    SAM2_MODEL_TYPES,
    PluginConfig,
    StableSam2,
    StableSamPredictor,
    build_sam,
)
from training.scenes import make_scene, scene_seed

PICTURE_HW = (768, 1024)
OVERHEAD_BOX = np.array([[200, 150, 700, 600]], np.float32)


@dataclass
class Sam2Figures:
    """What ``bench_sam2`` measures for one model type (seconds, milliseconds, a ratio)."""

    model_type: str
    encode_wall_s: float
    encode_cpu_s: float
    click_p50_ms: float
    click_p95_ms: float
    sam2_decode_ms: float
    stable_decode_ms: float

    @property
    def overhead_ratio(self) -> float:
        return self.stable_decode_ms / self.sam2_decode_ms

    def line(self, target: float = 1.10) -> str:
        verdict = "met" if self.overhead_ratio <= target else "NOT met"
        return (
            f"{self.model_type:24s} encode {self.encode_wall_s:6.2f} s wall "
            f"({self.encode_cpu_s:6.2f} s CPU)  click p50 {self.click_p50_ms:6.1f} ms "
            f"p95 {self.click_p95_ms:6.1f} ms  decoder SAM 2 {self.sam2_decode_ms:6.1f} ms "
            f"Stable-SAM 2 {self.stable_decode_ms:6.1f} ms  ratio {self.overhead_ratio:.3f} "
            f"(target <= {target:.2f}: {verdict})"
        )


def _pair(model_type: str, seed: int = 0) -> tuple[StableSamPredictor, StableSamPredictor]:
    """Plain SAM 2 and Stable-SAM 2 (plugins moved off their identity start, like trained
    ones: non-zero offsets, real routing) on one random-weight base."""
    torch.manual_seed(seed)
    sam = build_sam(model_type)
    vanilla = StableSam2(copy.deepcopy(sam), model_type, "random", None)
    stable = StableSam2(sam, model_type, "random", PluginConfig())
    with torch.no_grad():
        for p in stable.plugins.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return StableSamPredictor(vanilla), StableSamPredictor(stable)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_sam2(
    model_type: str,
    clicks: int = 40,
    overhead_repeats: int = 40,
    encode_repeats: int = 2,
    clock: Callable[[], float] = time.process_time,
) -> Sam2Figures:
    """Measure one SAM 2.1 model type (see the module docstring); ``clock`` times the clicks
    and the decoder (CPU time by default: robust on a shared machine)."""
    vanilla, stable = _pair(model_type)
    picture = make_scene(scene_seed("heldout", 0), size=PICTURE_HW).image

    walls, cpus = [], []
    for i in range(encode_repeats + 1):
        stable.cache.clear()
        w0, c0 = time.perf_counter(), time.process_time()
        embedding = stable.embed(picture)
        if i > 0:  # the first one warms up
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)

    rng = np.random.default_rng(0)
    h, w = PICTURE_HW
    click_ms = []
    for i in range(clicks + 3):
        point = np.array([[rng.uniform(0, w), rng.uniform(0, h)]], np.float32)
        t0 = clock()
        stable.predict(embedding=embedding, point_coords=point, point_labels=np.array([1]))
        if i >= 3:
            click_ms.append((clock() - t0) * 1e3)

    times: dict[str, list[float]] = {"sam2": [], "stable": []}
    for i in range(overhead_repeats + 5):
        for label, predictor in (("sam2", vanilla), ("stable", stable)):
            t0 = clock()
            predictor.decode(embedding, OVERHEAD_BOX, None, None, None, multimask_output=False)
            if i >= 5:  # warm-up
                times[label].append((clock() - t0) * 1e3)
    return Sam2Figures(
        model_type=model_type,
        encode_wall_s=statistics.median(walls),
        encode_cpu_s=statistics.median(cpus),
        click_p50_ms=_percentile(click_ms, 50),
        click_p95_ms=_percentile(click_ms, 95),
        sam2_decode_ms=statistics.median(times["sam2"]),
        stable_decode_ms=statistics.median(times["stable"]),
    )


def main(argv: list[str] | None = None) -> list[Sam2Figures]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every SAM 2.1 size, not tiny alone")
    parser.add_argument("--model-type", choices=SAM2_MODEL_TYPES, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--overhead-repeats", type=int, default=40)
    parser.add_argument("--encode-repeats", type=int, default=2)
    parser.add_argument("--target", type=float, default=1.10)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="cpu",
        help="clicks and decoder: cpu, this process's CPU time (robust on a loaded machine); "
        "wall: perf_counter",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    types = SAM2_MODEL_TYPES if args.all else (args.model_type or SAM2_MODEL_TYPES[0],)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, "
        f"picture {PICTURE_HW[1]}x{PICTURE_HW[0]}, random weights"
    )
    results = []
    for model_type in types:
        figures = bench_sam2(
            model_type, args.clicks, args.overhead_repeats, args.encode_repeats, clock
        )
        print(figures.line(args.target), flush=True)
        results.append(figures)
    return results


if __name__ == "__main__":
    main()
