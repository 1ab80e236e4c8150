"""How long webhook-triggered training takes: START_TRAINING -> a served new plugin version.

Starts the real pieces as processes, as ``scripts/serve.sh`` runs them: the backend (uvicorn),
one training worker (``python -m training.worker``) and a private ``redis-server``; Label Studio's API is the loopback stand-in
of the integration tests (``bench.label_studio_api.LabelStudioAPI``: the same JSON, brush
RLE made by the sdk encoder, PNG images) serving a project of ``--images`` synthetic scenes
(sizes 256-1024 px, all objects annotated). Then it posts ``START_TRAINING`` to ``/webhook`` and
polls ``/setup`` until the project's ``model_version`` is the new version.

Reports: time from the webhook to the served version, the job's phases (fetch + decode, model
build and evaluation, RTS training, writing), and the training throughput in images/s (RTS
images processed per second of training). Uses the embedded default model when
``stable_sam/weights/`` has it, else a seeded random ``mini`` (same architecture, same timing).

    .venv/bin/python bench/bench_training_job.py                  # 100 images (~3-5 min)
    .venv/bin/python bench/bench_training_job.py --images 20 --threads 2 --out /tmp/b.json
    .venv/bin/python bench/bench_training_job.py --images 40 --baseline-tree ../base  # before/after

With ``--baseline-tree`` the same run is made ``--rounds`` times with each checkout's code,
alternating (ABBA), and the ratios this / baseline of throughput and end-to-end time printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.label_studio_api import LEGACY_TOKEN, LabelStudioAPI  # noqa: E402 - after sys.path
from bench.processes import (  # noqa: E402
    AppServer,
    RQWorker,
    free_port,
    settings_env,
    tiny_mini_checkpoint,
    wait_until,
)

PROJECT = 7


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    def answers() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.RedisError:
            return False

    wait_until(answers, 10, "redis-server")
    return process, url


def run(args: argparse.Namespace, root: Path = ROOT) -> dict[str, Any]:
    """One webhook-to-served-version run with the code of checkout ``root``."""
    from runtime.settings import Settings
    from stable_sam import default_model_paths

    workdir = Path(tempfile.mkdtemp(prefix="bench-training-"))
    shipped = default_model_paths().base_checkpoint.is_file()
    checkpoint = None if shipped else tiny_mini_checkpoint(workdir / "mini-random.pth")
    redis_process, redis_url = start_redis(workdir)
    print(f"building {args.images} annotated scenes ...", file=sys.stderr)
    t0 = time.perf_counter()
    api = LabelStudioAPI(project_id=PROJECT, n_tasks=args.images, size=None, seed=args.seed)
    print(f"  {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    try:
        with api:
            settings = Settings(
                redis_url=redis_url,
                training_queue="bench-training",
                versions_dir=workdir / "versions",
                label_studio_url=api.url,
                label_studio_api_key=LEGACY_TOKEN,
                sam_model_type="mini",
                sam_checkpoint=checkpoint,
                device=args.device,
                preload_model=False,
                train_epochs=args.epochs,
                train_torch_threads=args.threads,
                train_retries=0,
                train_promote_tolerance=100.0,  # time the path to a *served* version
            )
            env = settings_env(settings)
            worker = RQWorker(redis_url, settings.training_queue, env, workdir / "w.log", root=root)
            try:
                with AppServer(settings, workdir / "app.log", root=root) as app:
                    result = _time_one_run(app, worker)
            finally:
                worker.stop()
    finally:
        redis_process.terminate()
        redis_process.wait()
    result.update(
        code=str(root),
        images=args.images,
        epochs=args.epochs,
        torch_threads=args.threads or "default",
        base="embedded default (shipped mini)" if shipped else "random mini (weights not shipped)",
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        load_average_1m=round(os.getloadavg()[0], 2),
    )
    return result


def _time_one_run(app: AppServer, worker: RQWorker) -> dict[str, Any]:
    http = httpx.Client(base_url=app.url, timeout=30)
    setup = {"project": f"{PROJECT}.1700000000", "schema": "<View/>"}
    before = http.post("/setup", json=setup).json()["model_version"]
    started = time.perf_counter()
    answer = http.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT}})
    webhook_ms = (time.perf_counter() - started) * 1000
    answer.raise_for_status()

    def served() -> str | None:
        version = http.post("/setup", json=setup).json()["model_version"]
        if version != before:
            return version
        status = http.get(f"/status/{PROJECT}").json()
        if status["last_failure"]:
            raise SystemExit(f"training failed: {status['last_failure']}\n{worker.log_tail()}")
        return None

    version = wait_until(served, 3600, "the new version to be served", poll_s=0.5)
    served_s = time.perf_counter() - started
    # The job writes the version first and its report just after: wait for the report.
    status = wait_until(
        lambda: s if (s := http.get(f"/status/{PROJECT}").json())["last_run"] else None,
        60,
        "the job's report",
        poll_s=0.2,
    )
    report = status["last_run"]["report"]
    http.close()
    return {
        "webhook_answer_ms": round(webhook_ms, 1),
        "start_training_to_served_s": round(served_s, 1),
        "served_version": version,
        "job_seconds": report["seconds"],
        "train_images_per_s": report["images_per_s"],
        "train_steps": report["training_summary"]["steps"],
        "train_images_seen": report["training_summary"]["images"],
        "train_samples": report["train_samples"],
        "val_samples": report["val_samples"],
        "instances": report["instances"],
        "metrics": report["metrics"],
    }


def compare_with_baseline(args: argparse.Namespace, baseline_root: Path) -> dict[str, Any]:
    """``args.rounds`` runs with each checkout's code, in ABBA order so that load drift hits both
    alike; medians of each and the ratios this / baseline."""
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "this": []}
    roots = {"baseline": baseline_root, "this": ROOT}
    for index in range(args.rounds):
        order = ["baseline", "this"] if index % 2 == 0 else ["this", "baseline"]
        for name in order:
            print(f"round {index + 1}: {name} ({roots[name]})", file=sys.stderr)
            runs[name].append(run(args, roots[name]))
    summary: dict[str, Any] = {"baseline_root": str(baseline_root), "rounds": args.rounds}
    for key in ("train_images_per_s", "start_training_to_served_s"):
        for name, results in runs.items():
            summary.setdefault(name, {})[key] = statistics.median(r[key] for r in results)
        summary[f"ratio_{key}"] = round(summary["this"][key] / summary["baseline"][key], 3)
    summary["runs"] = runs
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100, help="annotated images in the project")
    parser.add_argument("--epochs", type=int, default=1, help="TRAIN_EPOCHS")
    parser.add_argument("--threads", type=int, default=1, help="TRAIN_TORCH_THREADS (0: default)")
    parser.add_argument("--device", default="cpu", help="DEVICE for the job")
    parser.add_argument("--seed", type=int, default=300, help="first synthetic scene seed")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument("--baseline-tree", type=Path,
                        help="compare with the code of this other checkout, in the same run")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="with --baseline-tree: runs each")
    args = parser.parse_args(argv)
    if args.baseline_tree is None:
        result = run(args)
    else:
        result = compare_with_baseline(args, args.baseline_tree.resolve())
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
