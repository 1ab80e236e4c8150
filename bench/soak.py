"""Soak: many cached clicks, slow image servers and webhook bursts at once, on loopback only.

Starts a private Redis (with a password, as ``scripts/serve.sh`` does), the backend under
uvicorn on the embedded default model, and an image server on loopback; then, for
``--duration`` seconds, at the same time:

- ``--clicks`` concurrent annotators clicking on one cached 1024x1024 image (a new point each
  time, so only the embedding is reused), in a process of their own;
- ``--slow`` concurrent requests whose images trickle in at 1 byte/s (each must end at the
  download deadline, ``IMAGE_FETCH_TIMEOUT_S``), a new URL each time;
- a burst of ``--burst`` START_TRAINING webhooks every ``--burst-every`` seconds;
- ``GET /health`` every 100 ms with Label Studio's 1 s timeout, from a process of its own.

Before the load, the same click and health probes run alone for ``--baseline`` seconds: the
report gives every loaded figure beside its unloaded baseline from the same run (a ratio), the
backend's peak RSS (VmHWM) before and after, and the triggers: every webhook must be answered
200 and counted by the one queued job (no worker runs, so they coalesce), else they are lost.

    .venv/bin/python bench/soak.py                       # 3 minutes of load (~4 min in all)
    .venv/bin/python bench/soak.py --duration 30 --clicks 50 --slow 10   # a quick look

Bounded: every phase stops at its deadline, every client at ``--max-requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_predict_http import CONFIG, synthetic_jpeg  # noqa: E402

from bench.loopback import ImageServer  # noqa: E402

PROJECT = 77
HEALTH_TARGET_P99_S = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# --- the image server ----------------------------------------------------------------------------


# --- processes -----------------------------------------------------------------------------------


class PrivateRedis:
    """A password-protected redis-server on a free loopback port (config file, not argv)."""

    def __init__(self, workdir: Path) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        password = secrets.token_urlsafe(24)
        config = workdir / "redis.conf"
        config.write_text(
            f'port {self.port}\nbind 127.0.0.1\nsave ""\nappendonly no\n'
            f"dir {workdir}\nrequirepass {password}\n"
        )
        config.chmod(0o600)
        self.url = f"redis://:{password}@127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen([server, str(config)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class Backend:
    """The backend under uvicorn, as ``scripts/serve.sh`` starts it, with ``env`` added."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        command = [sys.executable, "-m", "uvicorn", "backend.app:create_app", "--factory",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the backend exited; see {log_path}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=1).json()
                if health.get("model_warm"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise SystemExit("the backend did not warm up within 300 s")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


# --- probes (each its own process, so the bench's own load does not colour them) ---------------


def click_body(image_url: str, i: int) -> dict:
    x, y = 20 + (i * 7) % 60, 20 + (i * 13) % 60  # percent: a new point every click
    region = {"type": "keypointlabels", "from_name": "point", "to_name": "image",
              "original_width": 1024, "original_height": 1024, "is_positive": True,
              "value": {"x": x, "y": y, "width": 1, "keypointlabels": ["Object"]}}  # fmt: skip
    return {"tasks": [{"id": 1, "data": {"image": image_url}}], "project": f"{PROJECT}.1",
            "label_config": CONFIG, "params": {"context": {"result": [region]}}}  # fmt: skip


def health_probe(url: str, seconds: float, out: mp.Queue) -> None:
    latencies, failures = [], 0
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=HEALTH_TARGET_P99_S) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                ok = client.get(f"{url}/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - started)
            failures += not ok
            time.sleep(max(0.0, 0.1 - (time.perf_counter() - started)))
    out.put({"latencies": latencies, "failures": failures})


def click_load(
    url: str, image_url: str, clients: int, seconds: float, max_requests: int, out: mp.Queue
) -> None:
    async def run() -> dict:
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        deadline = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

            async def annotator(k: int) -> None:
                for i in range(max_requests):
                    if time.monotonic() >= deadline:
                        return
                    started = time.perf_counter()
                    try:
                        answer = await client.post("/predict", json=click_body(image_url, k + i))
                        key = str(answer.status_code)
                    except httpx.HTTPError as exc:
                        key = type(exc).__name__
                    statuses[key] = statuses.get(key, 0) + 1
                    if key == "200":
                        latencies.append(time.perf_counter() - started)

            await asyncio.gather(*(annotator(k * 1000) for k in range(clients)))
        return {"latencies": latencies, "statuses": statuses}

    out.put(asyncio.run(run()))


def run_probes(
    url: str, image_url: str, clients: int, seconds: float, max_requests: int
) -> tuple[mp.Process, mp.Process, mp.Queue, mp.Queue]:
    health_out, click_out = mp.Queue(), mp.Queue()
    health = mp.Process(target=health_probe, args=(url, seconds, health_out))
    clicks = mp.Process(
        target=click_load, args=(url, image_url, clients, seconds, max_requests, click_out)
    )
    health.start()
    clicks.start()
    return health, clicks, health_out, click_out


# --- load in this process -------------------------------------------------------------------------


def slow_downloads(url: str, slow_url: str, clients: int, seconds: float) -> dict:
    """``clients`` threads, each requesting a new trickling image until ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    durations: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def one(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            i = 0
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    key = str(client.post("/predict", json=click_body(f"{slow_url}/slow/{k}-{i}.png", i)).status_code)  # fmt: skip
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                with lock:
                    durations.append(time.perf_counter() - started)
                    statuses[key] = statuses.get(key, 0) + 1
                i += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    return {"durations": durations, "statuses": statuses}


def webhook_bursts(url: str, burst: int, every_s: float, seconds: float) -> dict:
    """A burst of ``burst`` concurrent START_TRAINING webhooks every ``every_s`` seconds."""
    sent, accepted, failed = 0, 0, {}
    deadline = time.monotonic() + seconds
    body = {"action": "START_TRAINING", "project": {"id": PROJECT, "title": "soak"}}
    with httpx.Client(base_url=url, timeout=5) as client, ThreadPoolExecutor(burst) as pool:

        def one(_: int) -> str:
            try:
                return str(client.post("/webhook", json=body).status_code)
            except httpx.HTTPError as exc:
                return type(exc).__name__

        while time.monotonic() < deadline:
            started = time.monotonic()
            for status in pool.map(one, range(burst)):
                sent += 1
                if status == "200":
                    accepted += 1
                else:
                    failed[status] = failed.get(status, 0) + 1
            time.sleep(max(0.0, every_s - (time.monotonic() - started)))
    return {"sent": sent, "accepted": accepted, "failed": failed}


def counted_triggers(redis_url: str) -> int:
    """Triggers the project's queue state has recorded (queued + running jobs)."""
    state = redis.Redis.from_url(redis_url).hgetall(f"stable-sam:training:{PROJECT}")
    state = {k.decode(): v.decode() for k, v in state.items()}
    return int(state.get("queued_triggers", 0)) + int(state.get("running_triggers", 0))


def summary(latencies: list[float]) -> dict:
    ms = [1000 * v for v in latencies]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 1) if ms else None,
        "p99_ms": round(percentile(ms, 99), 1) if ms else None,
        "max_ms": round(max(ms), 1) if ms else None,
    }


def ratio(loaded: float | None, baseline: float | None) -> float | None:
    return round(loaded / baseline, 2) if loaded and baseline else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--baseline", type=float, default=20.0, help="seconds of the baseline")
    parser.add_argument("--clicks", type=int, default=200, help="concurrent clicking clients")
    parser.add_argument("--slow", type=int, default=45, help="concurrent slow downloads")
    parser.add_argument("--burst", type=int, default=50, help="webhooks per burst")
    parser.add_argument("--burst-every", type=float, default=15.0, help="seconds between bursts")
    parser.add_argument("--fetch-timeout", type=float, default=3.0, help="IMAGE_FETCH_TIMEOUT_S")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per click client")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="stable-sam-soak-"))
    images = ImageServer()
    images.files["photo.jpg"] = synthetic_jpeg(1024, 1024, seed=3)
    image_url = f"{images.url}/data/upload/1/photo.jpg"
    store = PrivateRedis(workdir)
    env = {
        "REDIS_URL": store.url,
        "TRAINING_QUEUE": "soak",
        "VERSIONS_DIR": str(workdir / "versions"),
        "IMAGE_FETCH_TIMEOUT_S": str(args.fetch_timeout),
        "TORCH_THREADS": "1",
        "LOG_LEVEL": "WARNING",
    }
    backend = Backend(env, workdir / "backend.log")
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        first = httpx.post(f"{backend.url}/predict", json=click_body(image_url, 0), timeout=120)
        first.raise_for_status()  # the embedding is cached from here on
        report["rss_mb_idle"] = round(backend.rss_mb(), 1)

        print(f"[soak] baseline: 1 click client + /health, {args.baseline:.0f} s", flush=True)
        procs = run_probes(backend.url, image_url, 1, args.baseline, args.max_requests)
        health_base, clicks_base = procs[2].get(), procs[3].get()
        for process in procs[:2]:
            process.join()

        print(
            f"[soak] load: {args.clicks} click clients, {args.slow} slow downloads, "
            f"{args.burst} webhooks every {args.burst_every:.0f} s, {args.duration:.0f} s",
            flush=True,
        )
        procs = run_probes(backend.url, image_url, args.clicks, args.duration, args.max_requests)
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(slow_downloads, backend.url, images.url, args.slow, args.duration)
            hooks = pool.submit(
                webhook_bursts, backend.url, args.burst, args.burst_every, args.duration
            )
            slow_result, hooks_result = slow.result(), hooks.result()
        health_load, clicks_load = procs[2].get(), procs[3].get()
        for process in procs[:2]:
            process.join()
        time.sleep(0.5)
        counted = counted_triggers(store.url)

        base_h, load_h = summary(health_base["latencies"]), summary(health_load["latencies"])
        base_c, load_c = summary(clicks_base["latencies"]), summary(clicks_load["latencies"])
        report.update(
            health={
                "baseline": {**base_h, "failures": health_base["failures"]},
                "loaded": {**load_h, "failures": health_load["failures"]},
                "p99_ratio": ratio(load_h["p99_ms"], base_h["p99_ms"]),
                "target_p99_ms": 1000 * HEALTH_TARGET_P99_S,
                "met": bool(load_h["p99_ms"] is not None)
                and load_h["p99_ms"] < 1000 * HEALTH_TARGET_P99_S
                and health_load["failures"] == 0,
            },
            clicks={
                "baseline": {**base_c, "statuses": clicks_base["statuses"]},
                "loaded": {**load_c, "statuses": clicks_load["statuses"]},
                "p50_ratio": ratio(load_c["p50_ms"], base_c["p50_ms"]),
                "p99_ratio": ratio(load_c["p99_ms"], base_c["p99_ms"]),
                # Clicks answered per second: with many more clients than cores, latency is
                # queueing (clients / throughput); throughput says what the load costs.
                "per_s_baseline": round(base_c["n"] / args.baseline, 1),
                "per_s_loaded": round(load_c["n"] / args.duration, 1),
                "per_s_ratio": ratio(load_c["n"] / args.duration, base_c["n"] / args.baseline),
            },
            slow_downloads={
                **summary(slow_result["durations"]),
                "statuses": slow_result["statuses"],
                "started_at_image_server": images.slow_started,
                "deadline_s": args.fetch_timeout,
            },
            webhooks={
                **hooks_result,
                "counted_by_the_queue": counted,
                "lost": hooks_result["sent"] - counted,
            },
            rss_mb_peak=round(backend.peak_rss_mb(), 1),
            rss_mb_end=round(backend.rss_mb(), 1),
        )
    finally:
        backend.close()
        store.close()
        images.close()
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
