"""Decoder time per click and trained parameters of every comparison row (paper Table 1's methods).

For each row of ``training.benchmark.MODEL_ROWS`` (SAM, Stable-SAM, the Table 5 ablations,
DT-SAM, PT-SAM, HQ-SAM, PA-SAM, ...), the model its variant builds (random weights: time does
not depend on what was learned) times one click — prompt encoder + mask decoder, single-mask
output, the image embedding already cached — on this CPU, and prints the median beside SAM's
as a ratio measured in the same run. The rows are interleaved repeat by repeat, so the machine's
load hits every row alike. ``trained`` is what each method trains and ships: the parameters
in the file its variant writes (for SAM, none).

    .venv/bin/python -m bench.bench_comparison_rows [--model-type mini] [--repeats 100]
    .venv/bin/python -m bench.bench_comparison_rows --model-type vit_b --repeats 30

``--model-type vit_b``: the same on a ViT-B-sized SAM (1024 px input, 64x64 embedding), the
paper's geometry; its encoder runs once per row to fill the cache.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from stable_sam import StableSam, StableSamPredictor, build_stable_sam
from training.baselines import VARIANTS
from training.benchmark import MODEL_ROWS

CLICKS = {
    "box": dict(box_xyxy=np.array([60.0, 80, 180, 200])),
    "1 point": dict(point_coords=np.array([[120.0, 140]]), point_labels=np.array([1])),
}


def build_row(key: str, model_type: str) -> StableSam:
    """The (random-weight) model of one benchmark row."""
    variant = MODEL_ROWS[key][1]
    if variant is None:
        return build_stable_sam(model_type, None, plugins=key != "sam", device="cpu")
    return VARIANTS[variant].build_model(model_type, None, "cpu", seed=0)


def trained_parameters(key: str, model: StableSam) -> int:
    """Values in the file the row's method ships (plugins, decoder, tokens, HQ parameters...)."""
    variant = MODEL_ROWS[key][1]
    if key == "sam":
        return 0
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "row.safetensors"
        VARIANTS[variant or "stable"].save(model, path, {})
        with safe_open(str(path), "pt") as f:
            return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="mini")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="*", default=list(MODEL_ROWS))
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="cpu",
        help="cpu: this process's CPU time (robust on a loaded machine); wall: perf_counter",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    rows: dict[str, tuple[StableSamPredictor, object, int]] = {}
    for key in args.rows:
        model = build_row(key, args.model_type)
        predictor = StableSamPredictor(model, multimask_policy="single")
        embedding = predictor.embed(image)  # cached: the click alone is timed
        if model.sam.image_encoder is not None:
            model.sam.image_encoder = torch.nn.Identity()  # not timed; frees its memory
        rows[key] = (predictor, embedding, trained_parameters(key, model))
    print(
        f"torch {torch.__version__}, {args.model_type}, threads {torch.get_num_threads()}, "
        f"repeats {args.repeats}, clock {args.clock}"
    )
    for name, click in CLICKS.items():
        times: dict[str, list[float]] = {key: [] for key in rows}
        for i in range(args.repeats + 5):
            for key, (predictor, embedding, _) in rows.items():
                t0 = clock()
                predictor.predict(embedding=embedding, multimask_output=False, **click)
                if i >= 5:  # warm-up
                    times[key].append(clock() - t0)
        base = statistics.median(times["sam"]) if "sam" in times else float("nan")
        print(f"\n{name}: median ms per click, ratio to SAM, trained parameters")
        for key, samples in times.items():
            ms = statistics.median(samples)
            print(f"  {key:12s} {ms * 1e3:8.2f} ms  x{ms / base:5.2f}  {rows[key][2]:>10,d}")


if __name__ == "__main__":
    main()
