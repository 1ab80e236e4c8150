"""The project-wide box conversion on real RQ workers: tasks per second with 1 and with 2.

Starts a private Redis and the stand-in Label Studio box project (``bench.label_studio_boxes``:
synthetic scenes, two crowd annotators' boxes per object, a detector's on every third task),
then runs the same conversion twice in one process: with one ``python -m training.worker``,
then with two (the first one kept), each run from ``Conversions.start`` to the run's end.
Prints both rates and their ratio; ``--json`` writes them.

    .venv/bin/python bench/bench_convert.py --tasks 60 --size 512 --chunk-tasks 10

``--device cuda`` runs the workers on the GPU, where there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make the repo importable

import redis  # noqa: E402

from bench.label_studio_api import LEGACY_TOKEN  # noqa: E402
from bench.label_studio_boxes import BoxProjectAPI  # noqa: E402
from bench.processes import RedisServer, RQWorker, settings_env, wait_until  # noqa: E402
from runtime.models import resolve_model  # noqa: E402
from runtime.queue.conversion import ACTIVE, Conversions  # noqa: E402
from runtime.settings import Settings  # noqa: E402


def run_once(conversions: Conversions, project: str, version: str, timeout_s: float) -> dict:
    started = time.perf_counter()
    run_id = conversions.start(project, version)["run_id"]

    def ended() -> dict | None:
        view = conversions.status(run_id)
        return view if view and view["state"] not in ACTIVE else None

    view = wait_until(ended, timeout_s, "the conversion run", poll_s=0.1)
    seconds = time.perf_counter() - started
    return {
        "state": view["state"],
        "tasks": view["tasks"],
        "done": view["done"],
        "objects": view["objects"],
        "seconds": round(seconds, 2),
        "tasks_per_s": round(view["tasks"] / seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--size", type=int, default=512, help="image side, px")
    parser.add_argument("--chunk-tasks", type=int, default=10)
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    report: dict = {
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "tasks": args.tasks,
        "size": args.size,
        "chunk_tasks": args.chunk_tasks,
        "torch_threads_per_worker": args.torch_threads,
        "device": args.device,
    }
    workers: list[RQWorker] = []
    with (
        RedisServer(workdir) as server,
        BoxProjectAPI(
            project_id=11, n_tasks=args.tasks, size=args.size, no_box_tasks=0, missing_image_tasks=0
        ) as api,
    ):
        settings = Settings(
            redis_url=server.url,
            versions_dir=workdir / "versions",
            label_studio_url=api.url,
            label_studio_api_key=LEGACY_TOKEN,
            device=args.device,
            preload_model=False,
            convert_chunk_tasks=args.chunk_tasks,
            train_torch_threads=args.torch_threads,
        )
        conversions = Conversions.from_settings(settings, redis.Redis.from_url(server.url))
        version = resolve_model(settings).version
        env = settings_env(settings)
        try:
            for n_workers in (1, 2):
                while len(workers) < n_workers:
                    name = f"worker{len(workers) + 1}"
                    workers.append(
                        RQWorker(server.url, settings.training_queue, env, workdir / f"{name}.log")
                    )
                time.sleep(8)  # the workers import torch and the job modules before their first job
                result = run_once(conversions, "11", version, args.timeout_s)
                report[f"workers_{n_workers}"] = result
                print(f"{n_workers} worker(s): {result}", flush=True)
        finally:
            for worker in workers:
                worker.stop()
    one, two = report["workers_1"], report["workers_2"]
    report["ratio_2_over_1"] = round(two["tasks_per_s"] / one["tasks_per_s"], 3)
    print(f"2 workers / 1 worker: {report['ratio_2_over_1']:.2f}x tasks/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
