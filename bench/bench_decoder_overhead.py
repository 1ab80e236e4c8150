"""Decoder overhead of the Stable-SAM plugins on a ViT-B-sized decoder (issue: stable_sam).

Times prompt encoder + mask decoder (one prompt, single-mask output) for vanilla SAM and for
Stable-SAM on the same frozen SAM, on a 64x64 image embedding with random weights, and prints the
ratio of medians measured in this run. Runs are interleaved so machine load hits both alike.

    .venv/bin/python -m bench.bench_decoder_overhead [--repeats 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from stable_sam import PluginConfig, StableSam, StableSamPredictor, build_sam
from stable_sam.cache import ImageEmbedding

PROMPTS = {
    "1 box": dict(boxes_xyxy=np.array([[200, 300, 700, 800]], np.float32)),
    "1 point": dict(
        point_coords=np.array([[[500, 500]]], np.float32), point_labels=np.array([[1]])
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", type=float, default=1.10)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter; cpu: this process's CPU time (robust on a loaded machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    sam = build_sam("vit_b")
    sam.image_encoder = torch.nn.Identity()  # not timed; frees ~350 MB
    vanilla = StableSamPredictor(StableSam(copy.deepcopy(sam), "vit_b", "random", None))
    stable_model = StableSam(sam, "vit_b", "random", PluginConfig())
    with torch.no_grad():  # trained-like plugins: non-zero offsets, real routing
        for p in stable_model.plugins.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stable = StableSamPredictor(stable_model)
    embedding = ImageEmbedding(
        "bench", torch.randn(1, 256, 64, 64), None, (1024, 1024), (1024, 1024)
    )

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"repeats {args.repeats}, clock {args.clock}"
    )
    worst = 0.0
    for name, prompt in PROMPTS.items():
        times: dict[str, list[float]] = {"sam": [], "stable": []}
        for i in range(args.repeats + 5):
            for label, predictor in (("sam", vanilla), ("stable", stable)):
                t0 = clock()
                predictor.decode(
                    embedding, multimask_output=False, mask_input=None, **_full(prompt)
                )
                if i >= 5:  # warm-up
                    times[label].append(clock() - t0)
        sam_ms = statistics.median(times["sam"]) * 1e3
        stable_ms = statistics.median(times["stable"]) * 1e3
        ratio = stable_ms / sam_ms
        worst = max(worst, ratio)
        print(f"{name:8s} SAM {sam_ms:7.2f} ms  Stable-SAM {stable_ms:7.2f} ms  ratio {ratio:.3f}")
    verdict = "met" if worst <= args.target else "NOT met"
    print(f"worst ratio {worst:.3f} (target <= {args.target:.2f}: {verdict})")


def _full(prompt: dict) -> dict:
    return {
        "boxes_xyxy": prompt.get("boxes_xyxy"),
        "point_coords": prompt.get("point_coords"),
        "point_labels": prompt.get("point_labels"),
    }


if __name__ == "__main__":
    main()
