"""Batch ``/predict`` with boxes ("Retrieve predictions" on a box project), over real HTTP.

Starts the backend (embedded default, a uvicorn subprocess) and a loopback image server, then
posts batches of N tasks, each a distinct 1024x768 image with ``--boxes`` annotated rectangles
from two annotators (overlap 2, so each object is a consensus of two boxes), as Label Studio
sends them. Prints the wall time per batch and tasks per second, and the largest batch that fits
Label Studio's 100 s predict timeout at that rate (with a 20 % margin).

    .venv/bin/python bench/bench_batch_boxes.py --tasks 8 16 --torch-threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make the repo importable

from bench.bench_predict_http import CONFIG, Backend, synthetic_jpeg  # noqa: E402
from bench.loopback import ImageServer  # noqa: E402

LS_PREDICT_TIMEOUT_S = 100.0


def box_task(task_id: int, image_url: str, n_boxes: int) -> dict:
    def rect(k: int, jitter: float) -> dict:
        x, y = 10 + 25 * (k % 3) + jitter, 10 + 25 * (k // 3 % 3) + jitter
        return {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
                "value": {"x": x, "y": y, "width": 20, "height": 20, "rotation": 0,
                          "rectanglelabels": ["Object"]}}  # fmt: skip

    annotations = [
        {"id": 10 * task_id + a, "completed_by": a, "was_cancelled": False,
         "result": [rect(k, 0.7 * a) for k in range(n_boxes)]}
        for a in (1, 2)
    ]  # fmt: skip
    return {"id": task_id, "overlap": 2, "data": {"image": image_url}, "annotations": annotations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--boxes", type=int, default=3, help="objects per task")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = ImageServer()
    env = {"DEVICE": "cpu", "PREFETCH_WORKERS": "0", "TORCH_THREADS": str(args.torch_threads),
           "VERSIONS_DIR": str(ROOT / "var" / "bench"), "SAM_MODEL_TYPE": "mini"}  # fmt: skip
    backend = Backend(env)
    report: dict = {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                    "boxes_per_task": args.boxes, "runs": []}  # fmt: skip
    try:
        serial = 0
        for n in args.tasks:
            tasks = []
            for _ in range(n):
                serial += 1
                url = images.add(f"batch-{serial}.jpg", synthetic_jpeg(1024, 768, serial))
                tasks.append(box_task(serial, url, args.boxes))
            body = {"tasks": tasks, "project": "1.1", "label_config": CONFIG, "params": {}}
            started = time.perf_counter()
            answer = backend.client.post("/predict", json=body)
            wall = time.perf_counter() - started
            answer.raise_for_status()
            regions = sum(len(r["result"]) for r in answer.json()["results"])
            run = {"tasks": n, "wall_s": round(wall, 2), "tasks_per_s": round(n / wall, 2),
                   "regions": regions,
                   "max_batch_in_100s": int(0.8 * LS_PREDICT_TIMEOUT_S * n / wall)}  # fmt: skip
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    finally:
        backend.close()
    report["load_average_at_end"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
