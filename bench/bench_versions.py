"""Plugin versions on one host's disk vs in Redis, and how fast a new one reaches a replica.

In one run, against a private Redis and a temporary folder:

1. ``current(project)`` (what every prediction asks) and ``write`` (what a training run does),
   ``LocalVersionStore`` vs ``RedisVersionStore``, the shipped ~330 KB plugin file, with the
   ratio redis / local;
2. two backend replicas (``uvicorn`` processes, separate ``VERSIONS_DIR``, the embedded mini
   base) sharing only that Redis: a version is written as a worker on a third "host" writes it,
   and the time until replica B's ``/setup`` reports it is measured (polled every 2 ms), then
   replica B's first click with it (its plugin file fetched from Redis and loaded) against
   the next click; the baseline of the first is one ``/setup`` round trip with nothing new.

    .venv/bin/python bench/bench_versions.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make the repo importable

import httpx  # noqa: E402
import redis  # noqa: E402

from bench.label_studio_api import LEGACY_TOKEN, LabelStudioAPI  # noqa: E402
from bench.processes import AppServer, RedisServer  # noqa: E402
from runtime.queue.connection import redis_connection  # noqa: E402
from runtime.settings import Settings  # noqa: E402
from runtime.versions import LocalVersionStore, VersionStore  # noqa: E402
from runtime.versions.shared import RedisVersionStore  # noqa: E402

PLUGINS = ROOT / "stable_sam" / "weights" / "stable_sam_mini_plugins.safetensors"
PROJECT = "7"
CONFIG = """<View><Image name="picture" value="$img"/>
  <BrushLabels name="masks" toName="picture"><Label value="Car"/></BrushLabels>
  <KeyPointLabels name="clicks" toName="picture" smart="true"><Label value="Car"/></KeyPointLabels>
</View>"""


def _time_us(call, n: int) -> float:
    """Median microseconds of ``call()`` over ``n`` calls (after 10 uncounted)."""
    for _ in range(10):
        call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def store_costs(stores: dict[str, VersionStore], n: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, store in stores.items():
        store.write(PROJECT, PLUGINS, {}, {}, True, "bench")
        out[name] = {
            "current_us": _time_us(lambda s=store: s.current(PROJECT), n),
            "write_ms": _time_us(
                lambda s=store: s.write(PROJECT, PLUGINS, {}, {}, True, "bench"), max(5, n // 50)
            )
            / 1000,
        }
    return out


def setup_version(url: str) -> str:
    body = {"project": f"{PROJECT}.1700000000", "schema": CONFIG, "hostname": ""}
    return httpx.post(f"{url}/setup", json=body, timeout=10).json()["model_version"]


def click_ms(url: str, x: float) -> tuple[float, str]:
    body = {
        "tasks": [{"id": 1000, "data": {"img": f"/data/upload/{PROJECT}/scene0.png"}}],
        "project": f"{PROJECT}.1700000000",
        "label_config": CONFIG,
        "params": {"context": {"result": [{
            "type": "keypointlabels", "from_name": "clicks", "to_name": "picture",
            "is_positive": True, "value": {"x": x, "y": 40, "width": 1, "keypointlabels": ["Car"]},
        }]}},
    }  # fmt: skip
    started = time.perf_counter()
    answer = httpx.post(f"{url}/predict", json=body, timeout=120)
    elapsed = (time.perf_counter() - started) * 1000
    answer.raise_for_status()
    return elapsed, answer.json()["results"][0]["model_version"]


def propagation(workdir: Path, redis_url: str, rounds: int) -> dict[str, float]:
    redis.Redis.from_url(redis_url).flushdb()
    with LabelStudioAPI(project_id=int(PROJECT), n_tasks=1, size=256) as api:
        common = {
            "redis_url": redis_url,
            "versions_store": "redis",
            "label_studio_url": api.url,
            "label_studio_api_key": LEGACY_TOKEN,
            "device": "cpu",
            "torch_threads": 1,
        }
        replicas = [
            Settings(**common, versions_dir=workdir / host / "versions") for host in ("a", "b")
        ]
        writer = RedisVersionStore(redis_connection(redis_url), workdir / "worker")
        with (
            AppServer(replicas[0], workdir / "a.log"),
            AppServer(replicas[1], workdir / "b.log") as app_b,
        ):
            click_ms(app_b.url, 40)  # model built and warm
            setup_ms = []  # the baseline: one /setup round trip when nothing changed
            for _ in range(rounds):
                started = time.perf_counter()
                setup_version(app_b.url)
                setup_ms.append((time.perf_counter() - started) * 1000)
            reach_ms, first_ms, next_ms = [], [], []
            for i in range(rounds):
                version = writer.write(PROJECT, PLUGINS, {}, {}, True, "bench")
                written = time.perf_counter()
                while setup_version(app_b.url) != version.name:
                    time.sleep(0.002)
                reach_ms.append((time.perf_counter() - written) * 1000)
                first, served = click_ms(app_b.url, 30 + i)
                assert served == version.name, (served, version.name)
                first_ms.append(first)
                next_ms.append(click_ms(app_b.url, 31 + i)[0])
    return {
        "setup_round_trip_ms_p50": statistics.median(setup_ms),
        "reach_second_replica_ms_p50": statistics.median(reach_ms),
        "reach_second_replica_ms_max": max(reach_ms),
        "first_click_with_new_version_ms_p50": statistics.median(first_ms),
        "next_click_ms_p50": statistics.median(next_ms),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="versions written to replicas")
    parser.add_argument("--reads", type=int, default=2000, help="current() calls timed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        workdir = Path(tmp)
        connection = redis_connection(server.url)
        stores = {
            "local": LocalVersionStore(workdir / "local"),
            "redis": RedisVersionStore(connection, workdir / "copies"),
        }
        costs = store_costs(stores, args.reads)
        spread = propagation(workdir, server.url, args.rounds)
    report = {
        "stores": {k: {m: round(v, 2) for m, v in c.items()} for k, c in costs.items()},
        "ratio_redis_to_local": {
            key: round(costs["redis"][key] / costs["local"][key], 2) for key in costs["local"]
        },
        **{k: round(v, 1) for k, v in spread.items()},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
