"""Image encoding, cached clicks and the plugins' decoder overhead for each SAM base (issue 16).

Every base of ``stable_sam.MODEL_TYPES``: SAM, MobileSAM (``vit_t``), the mini and the SAM 2.1
sizes (``sam2.1_hiera_tiny`` ... ``sam2.1_hiera_large``, on ``StableSam2``). For each model
type, random weights (time does not depend on what was learned), on this CPU:

- ``encode``: the image encoder on one 480 x 640 image (``--image-hw``; resized to the
  model's input side, normalised, padded; SAM 2 also computes its decoder's high-resolution features), median of
  ``--encode-repeats`` after one warm-up;
- ``click p50 / p95``: one positive click on the cached embedding through
  ``StableSamPredictor.predict`` as the backend serves it (Stable-SAM, the multimask policy,
  masks resized to the image), percentiles of ``--repeats``;
- ``overhead``: prompt encoder + mask decoder (single-mask output) of Stable-SAM over plain SAM
  on the same frozen base and embedding, ratio of medians; the two are interleaved call by call,
  so the machine's load hits both alike (target <= 1.10);
- ``peak RSS``: the process's peak resident memory while the row ran (Linux; the interpreter and
  torch included, ~0.3 GB, and what earlier rows left in the allocator), its base with a plain
  SAM copy of the decoder, the encoding and the clicks.

Plugins are moved off their identity initialisation (non-zero offsets, real routing) as after
training. ``--clock cpu`` (default) counts this process's CPU time, robust on a shared machine;
``wall`` is ``perf_counter``.

    .venv/bin/python -m bench.bench_model_types [--model-types mini vit_t vit_b] [--repeats 40]
    .venv/bin/python -m bench.bench_model_types --model-types vit_l vit_h --encode-repeats 2
    .venv/bin/python -m bench.bench_model_types --model-types sam2.1_hiera_tiny sam2.1_hiera_small
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stable_sam import (
    MODEL_TYPES,
    PluginConfig,
    StableSam,
    StableSam2,
    StableSamPredictor,
    build_sam,
)
from stable_sam.cache import ImageEmbedding
from stable_sam.sam2_base import is_sam2_type

IMAGE_HW = (480, 640)
CLICK_AT = (300 / 640, 220 / 480)  # the click, as fractions of the image's width and height


def click_at(image_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """One positive click (x = 300, y = 220 on the default 480 x 640 image)."""
    h, w = image_hw
    x, y = round(CLICK_AT[0] * w), round(CLICK_AT[1] * h)
    return dict(point_coords=np.array([[float(x), float(y)]]), point_labels=np.array([1]))


WARMUP = 3


@dataclass
class ModelTypeTiming:
    """One row: the base's size and its timings in milliseconds."""

    model_type: str
    image_size: int
    parameters: int
    encode_ms: float
    click_p50_ms: float
    click_p95_ms: float
    sam_decode_ms: float
    stable_decode_ms: float
    peak_rss_bytes: int | None = None

    @property
    def overhead(self) -> float:
        return self.stable_decode_ms / self.sam_decode_ms

    def markdown(self) -> str:
        rss = "n/a" if self.peak_rss_bytes is None else f"{self.peak_rss_bytes / 2**30:.2f} GB"
        return (
            f"| {self.model_type} | {self.image_size} | {self.parameters / 1e6:.1f} M | "
            f"{self.encode_ms:,.0f} | {self.click_p50_ms:.1f} / {self.click_p95_ms:.1f} | "
            f"{self.sam_decode_ms:.1f} / {self.stable_decode_ms:.1f} | x {self.overhead:.3f} | "
            f"{rss} |"
        )


HEADER = (
    "| model type | input px | parameters | encode ms | cached click p50 / p95 ms | "
    "decoder SAM / Stable-SAM ms | overhead | peak RSS |\n|---|---|---|---|---|---|---|---|"
)


def reset_peak_rss() -> None:
    """Start the process's peak resident set (VmHWM) again from its current RSS (Linux)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int | None:
    """The process's peak resident set since the last reset; None where /proc cannot tell."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pair_on_one_base(model_type: str) -> tuple[StableSamPredictor, StableSamPredictor]:
    """Plain SAM and Stable-SAM (trained-like plugins) sharing one base's weights; the plain
    one without an image encoder (it decodes the embedding the other computed)."""
    torch.manual_seed(0)
    wrapper = StableSam2 if is_sam2_type(model_type) else StableSam
    sam = build_sam(model_type)
    encoder, sam.image_encoder = sam.image_encoder, torch.nn.Identity()
    vanilla = wrapper(copy.deepcopy(sam), model_type, "random", None)
    sam.image_encoder = encoder
    stable = wrapper(sam, model_type, "random", PluginConfig())
    with torch.no_grad():
        for p in stable.plugins.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return StableSamPredictor(vanilla), StableSamPredictor(stable)


def measure(
    model_type: str,
    repeats: int,
    encode_repeats: int,
    clock: Callable[[], float],
    image_hw: tuple[int, int] = IMAGE_HW,
) -> ModelTypeTiming:
    vanilla, stable = pair_on_one_base(model_type)
    image = np.random.default_rng(0).integers(0, 255, (*image_hw, 3), dtype=np.uint8)
    click = click_at(image_hw)

    encode_s = []
    embedding: ImageEmbedding | None = None
    for i in range(1 + encode_repeats):
        t0 = clock()
        embedding = stable._compute_embedding(f"bench-{i}", image)  # never from a cache
        if i:  # the first is the warm-up
            encode_s.append(clock() - t0)

    clicks, decode = [], {"sam": [], "stable": []}
    decode_args = dict(boxes_xyxy=None, mask_input=None, multimask_output=False)
    points = dict(
        point_coords=click["point_coords"][None], point_labels=click["point_labels"][None]
    )
    for i in range(WARMUP + repeats):
        for label, predictor in (("sam", vanilla), ("stable", stable)):
            t0 = clock()
            predictor.decode(embedding, **points, **decode_args)
            if i >= WARMUP:
                decode[label].append(clock() - t0)
        t0 = clock()
        stable.predict(embedding=embedding, **click)
        if i >= WARMUP:
            clicks.append(clock() - t0)
    return ModelTypeTiming(
        model_type=model_type,
        image_size=stable.model.image_size,
        parameters=sum(p.numel() for p in stable.model.sam.parameters()),
        encode_ms=1e3 * statistics.median(encode_s),
        click_p50_ms=1e3 * float(np.percentile(clicks, 50)),
        click_p95_ms=1e3 * float(np.percentile(clicks, 95)),
        sam_decode_ms=1e3 * statistics.median(decode["sam"]),
        stable_decode_ms=1e3 * statistics.median(decode["stable"]),
    )


def main(argv: list[str] | None = None) -> list[ModelTypeTiming]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-types", nargs="+", choices=MODEL_TYPES, default=["mini", "vit_t", "vit_b"]
    )
    parser.add_argument("--repeats", type=int, default=40, help="clicks per model type")
    parser.add_argument("--encode-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--target", type=float, default=1.10)
    parser.add_argument(
        "--image-hw", type=int, nargs=2, default=IMAGE_HW, help="the image's height and width"
    )
    args = parser.parse_args(argv)
    image_hw = tuple(args.image_hw)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, "
        f"{args.repeats} clicks, {args.encode_repeats} encodings of a {image_hw[0]}x{image_hw[1]} "
        "image per model type"
    )
    print(HEADER, flush=True)
    rows = []
    for model_type in args.model_types:
        gc.collect()  # the previous row's model is gone before the peak starts again
        reset_peak_rss()
        row = measure(model_type, args.repeats, args.encode_repeats, clock, image_hw)
        row.peak_rss_bytes = peak_rss_bytes()
        print(row.markdown(), flush=True)
        rows.append(row)
    worst = max(row.overhead for row in rows)
    verdict = "met" if worst <= args.target else "NOT met"
    print(f"worst overhead x {worst:.3f} (target <= {args.target:.2f}: {verdict})")
    return rows


if __name__ == "__main__":
    main()
