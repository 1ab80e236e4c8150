"""Interactive speed of the backend over real HTTP, as Label Studio experiences it.

Starts the backend (uvicorn, a subprocess per model) and a loopback image server, then times
``POST /predict`` calls exactly as Label Studio sends them:

- embedded default, 1024x1024, embedding cached: click p50 / p95   (targets <= 60 / <= 120 ms)
- ViT-B-sized SAM (random weights), 1024x1024, cached: click p50    (target <= 200 ms)
- 4000x3000 image, embedded default, cached: click p50              (target <= 300 ms)
- cold first click (nothing cached) and the first click after the task-open warm-up
  (a batch ``/predict`` without context), i.e. how much the warm-up saves.

Also: brush RLE of 4000x3000 masks, label-studio-sdk ``mask2rle`` vs ours (byte-identical).

A "click" is one positive keypoint; every click of a series uses another point, so nothing but
the image embedding (and the decoded image) is reused. The embedded default uses the shipped
weights when ``stable_sam/weights/`` has them, else random mini weights (same timing).

    .venv/bin/python bench/bench_predict_http.py            # everything (~2-4 min on 2 cores)
    .venv/bin/python bench/bench_predict_http.py --skip-vit-b --clicks 20
    .venv/bin/python bench/bench_predict_http.py --baseline-tree ../base   # before/after a change
    .venv/bin/python bench/bench_predict_http.py --refinement-ab    # REFINE_MASKS on vs off
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make the repo importable

from bench.loopback import ImageServer  # noqa: E402 - after sys.path

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
</View>"""
TARGETS_MS = {
    "default_1024_cached_p50": 60.0,
    "default_1024_cached_p95": 120.0,
    "vit_b_1024_cached_p50": 200.0,
    "default_4000x3000_cached_p50": 300.0,
}


def synthetic_jpeg(width: int, height: int, seed: int) -> bytes:
    """A textured photo-like image with a few bright ellipses, as JPEG bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    for c in range(3):
        image[..., c] = 80 + 40 * np.sin(xx / (37 + 11 * c) + seed) * np.cos(yy / (53 + 7 * c))
    for _ in range(4):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        rx, ry = rng.uniform(0.05, 0.2) * width, rng.uniform(0.05, 0.2) * height
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        image[inside] = rng.uniform(150, 250, 3)
    image += rng.normal(0, 6, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Backend:
    """The backend in a uvicorn subprocess with the given environment."""

    def __init__(
        self, env: dict[str, str], startup_timeout_s: float = 300.0, root: Path = ROOT
    ) -> None:
        """``root``: the checkout whose code runs (another one for a before/after comparison)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONPATH": str(root), "LOG_LEVEL": "WARNING", **env}
        command = [sys.executable, "-m", "uvicorn", "backend.app:create_app", "--factory",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        self.process = subprocess.Popen(command, cwd=root, env=full_env)
        self.client = httpx.Client(base_url=self.url, timeout=600.0)
        self.response_bytes: list[int] = []  # of every click answer (the RLE dominates)
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:  # up, and the model built and warmed up
            try:
                if self.client.get("/health").json().get("model_warm"):
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError("backend exited during start-up")
            time.sleep(0.2)
        raise RuntimeError("backend did not load its model in time")

    def health(self) -> dict:
        return self.client.get("/health").json()

    def click(self, image_url: str, x: float, y: float, task_id: int = 1) -> float:
        """One interactive keypoint /predict; returns the wall time in ms."""
        return self.click_all(image_url, [(x, y, True)], task_id)

    def click_all(
        self, image_url: str, points: list[tuple[float, float, bool]], task_id: int = 1
    ) -> float:
        """An interactive /predict with every keypoint so far ``(x %, y %, positive)``, as
        Label Studio sends the n-th click of a region; returns the wall time in ms."""
        regions = [{"type": "keypointlabels", "from_name": "point", "to_name": "image",
                    "is_positive": positive,
                    "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Object"]}}
                   for x, y, positive in points]  # fmt: skip
        body = {"tasks": [{"id": task_id, "data": {"image": image_url}}], "project": "1.1",
                "label_config": CONFIG, "params": {"context": {"result": regions}}}  # fmt: skip
        started = time.perf_counter()
        answer = self.client.post("/predict", json=body)
        elapsed = (time.perf_counter() - started) * 1000
        answer.raise_for_status()
        assert answer.json()["results"][0]["result"][0]["type"] == "brushlabels"
        self.response_bytes.append(len(answer.content))
        return elapsed

    def open_task(self, image_url: str, task_id: int = 1) -> float:
        """The batch /predict Label Studio sends when a task opens (starts the warm-up)."""
        body = {"tasks": [{"id": task_id, "data": {"image": image_url}}], "project": "1.1",
                "label_config": CONFIG, "params": {}}  # fmt: skip
        started = time.perf_counter()
        self.client.post("/predict", json=body).raise_for_status()
        return (time.perf_counter() - started) * 1000

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def clicks(backend: Backend, image_url: str, n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [backend.click(image_url, *rng.uniform(10, 90, 2)) for _ in range(n)]


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure_model(name: str, env: dict[str, str], images: ImageServer, sizes: list[tuple[int, int]],
                  n_clicks: int, warmup_wait_s: float) -> dict:  # fmt: skip
    """Cold click, warm-up saving and cached click latency for one model configuration."""
    results: dict = {}
    started = time.perf_counter()
    backend = Backend(env)
    results["startup_s"] = round(time.perf_counter() - started, 1)
    results["model_version"] = backend.health()["model_version"]
    try:
        for width, height in sizes:
            tag = f"{width}x{height}" if width != height else str(width)
            cold_url = images.add(f"{name}-{tag}-cold.jpg", synthetic_jpeg(width, height, 1))
            cold_ms = backend.click(cold_url, 50, 50)
            # Task-open warm-up: batch /predict, the annotator looks at the image, then clicks.
            warm_url = images.add(f"{name}-{tag}-warm.jpg", synthetic_jpeg(width, height, 2))
            open_ms = backend.open_task(warm_url)
            wait_s = max(warmup_wait_s, 1.5 * cold_ms / 1000)
            time.sleep(wait_s)
            warmed_ms = backend.click(warm_url, 50, 50)
            series = clicks(backend, cold_url, n_clicks, seed=width)
            results[tag] = {
                "cold_first_click_ms": round(cold_ms, 1),
                "task_open_ms": round(open_ms, 1),
                "first_click_after_warmup_ms": round(warmed_ms, 1),
                "warmup_saves_ms": round(cold_ms - warmed_ms, 1),
                "warmup_wait_s": round(wait_s, 1),
                "cached_click_p50_ms": round(p(series, 50), 1),
                "cached_click_p95_ms": round(p(series, 95), 1),
                "cached_click_mean_ms": round(statistics.fmean(series), 1),
                # random weights give fragmented masks: long RLEs cost encoding and transfer
                "answer_kb_median": round(
                    statistics.median(backend.response_bytes[-n_clicks:]) / 1024, 1
                ),
                "clicks": n_clicks,
            }
            print(f"  {name} {tag}: {json.dumps(results[tag])}", flush=True)
    finally:
        backend.close()
    return results


def click_chains(
    backend: Backend, image_url: str, n_clicks: int, seed: int, length: int = 5
) -> list[float]:
    """Chains of ``length`` clicks on one spot's surroundings, each click resending the earlier
    ones (a positive first, then alternating negative / positive), until ``n_clicks`` clicks
    that extend a chain were timed; returns those times (a chain's first click is not one)."""
    rng = np.random.default_rng(seed)
    times: list[float] = []
    while len(times) < n_clicks:
        centre = rng.uniform(25, 75, 2)
        points = [(*centre, True)]
        backend.click_all(image_url, points)
        for k in range(1, length):
            x, y = (centre + rng.uniform(-15, 15, 2)).clip(1, 99)
            points.append((x, y, k % 2 == 0))
            times.append(backend.click_all(image_url, points))
    return times[:n_clicks]


def compare_backends(
    backends: dict[str, Backend], images: ImageServer, rounds: int, n_clicks: int,
    series: Callable[[Backend, str, int, int], list[float]] = clicks,
) -> dict:  # fmt: skip
    """Cached-click latency of the two ``backends`` (``{"baseline": .., "this": ..}``), measured
    in the same run: both are up at once and rounds of ``n_clicks`` clicks (``series``)
    alternate between them (ABBA order), so load drift hits both alike. Closes them. Returns
    p50 / p95 / mean of each and the ratios this / baseline."""
    image_url = images.add("ab-1024.jpg", synthetic_jpeg(1024, 1024, 3))
    times: dict[str, list[float]] = {name: [] for name in backends}
    try:
        for backend in backends.values():
            backend.click(image_url, 50, 50)  # embed once: every later click is cached
            series(backend, image_url, n_clicks, -1 % 2**32)  # warm-up round, not counted
        for index in range(rounds):
            order = list(backends) if index % 4 in (0, 3) else list(backends)[::-1]
            for name in order:
                times[name] += series(backends[name], image_url, n_clicks, index)
    finally:
        for backend in backends.values():
            backend.close()
    result: dict = {"clicks_each": rounds * n_clicks}
    for name, values in times.items():
        result[name] = {"p50_ms": round(p(values, 50), 2), "p95_ms": round(p(values, 95), 2),
                        "mean_ms": round(statistics.fmean(values), 2)}  # fmt: skip
    for stat in ("p50_ms", "p95_ms", "mean_ms"):
        result[f"ratio_{stat[:-3]}"] = round(result["this"][stat] / result["baseline"][stat], 3)
    return result


def compare_with_baseline(
    baseline_root: Path, env: dict[str, str], images: ImageServer, rounds: int, n_clicks: int
) -> dict:
    """This checkout's cached clicks against ``baseline_root``'s (another checkout, e.g. a
    worktree of the commit before a change), with the same settings (``compare_backends``)."""
    backends = {"baseline": Backend(env, root=baseline_root), "this": Backend(env)}
    result = compare_backends(backends, images, rounds, n_clicks)
    return {"baseline_root": str(baseline_root), **result}


def compare_refinement(
    env: dict[str, str], images: ImageServer, rounds: int, n_clicks: int
) -> dict:
    """The clicks that extend a chain (``click_chains``) with refinement on ("this") against
    off ("baseline"): this checkout's code, two backends (``compare_backends``)."""
    backends = {"baseline": Backend({**env, "REFINE_MASKS": "off"}),
                "this": Backend({**env, "REFINE_MASKS": "on"})}  # fmt: skip
    return compare_backends(backends, images, rounds, n_clicks, series=click_chains)


def rle_benchmark(repeats: int = 5) -> dict:
    """Brush RLE of 4000x3000 masks: label-studio-sdk ``mask2rle`` vs ``labelstudio.brush``."""
    from label_studio_sdk.converter.brush import mask2rle

    from labelstudio.brush import mask_to_rle

    yy, xx = np.mgrid[:3000, :4000]
    masks = {
        "one_blob": ((yy - 1500) ** 2 + (xx - 2000) ** 2 < 900**2),
        "200_blobs": (np.sin(xx / 61.0) * np.sin(yy / 47.0)) > 0.6,
    }
    results = {}
    for name, mask in masks.items():
        mask = mask.astype(np.uint8) * 255
        ours, sdk = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            mine = mask_to_rle(mask)
            ours.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            reference = mask2rle(mask)
            sdk.append((time.perf_counter() - started) * 1000)
        assert mine == reference, "RLE differs from the sdk"
        results[name] = {
            "rle_bytes": len(mine),
            "ours_ms": round(statistics.median(ours), 1),
            "sdk_ms": round(statistics.median(sdk), 1),
            "speed_up": round(statistics.median(sdk) / statistics.median(ours), 1),
        }
        print(f"  RLE 4000x3000 {name}: {json.dumps(results[name])}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=30, help="cached clicks per series")
    parser.add_argument("--skip-vit-b", action="store_true", help="skip the ViT-B-sized model")
    parser.add_argument("--skip-default", action="store_true", help="skip the embedded default")
    parser.add_argument("--warmup-wait", type=float, default=2.0,
                        help="seconds between opening a task and the first click (at least)")  # fmt: skip
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="TORCH_THREADS for the backend (0: torch's default)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--baseline-tree", type=Path,
                        help="only compare cached clicks (embedded default, 1024 px) with the code "
                             "of this other checkout, alternating rounds in one run")  # fmt: skip
    parser.add_argument("--refinement-ab", action="store_true",
                        help="only compare the clicks that extend a chain with REFINE_MASKS on "
                             "and off (embedded default, 1024 px), alternating rounds in one run")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=8,
                        help="with --baseline-tree or --refinement-ab: rounds each")  # fmt: skip
    args = parser.parse_args()

    images = ImageServer()
    common = {"PREFETCH_WORKERS": "1", "IMAGE_URL_TTL_S": "600", "DEVICE": "cpu",
              "SAM_ALLOW_RANDOM_WEIGHTS": "true", "VERSIONS_DIR": str(ROOT / "var" / "bench"),
              "TORCH_THREADS": str(args.torch_threads)}  # fmt: skip
    report: dict = {"cpu_count": os.cpu_count(), "torch_threads": args.torch_threads,
                    "load_average_at_start": os.getloadavg()}  # fmt: skip
    if args.baseline_tree is not None or args.refinement_ab:
        env = {**common, "SAM_MODEL_TYPE": "mini"}
        if args.refinement_ab:
            report["ab"] = compare_refinement(env, images, args.rounds, args.clicks)
        else:
            report["ab"] = compare_with_baseline(
                args.baseline_tree.resolve(), env, images, args.rounds, args.clicks
            )
        print(json.dumps(report["ab"], indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return
    print("brush RLE (byte-identical to the sdk):", flush=True)
    report["rle"] = rle_benchmark()
    if not args.skip_default:
        print("embedded default (mini):", flush=True)
        report["default"] = measure_model(
            "default", {**common, "SAM_MODEL_TYPE": "mini"}, images,
            [(1024, 1024), (4000, 3000)], args.clicks, args.warmup_wait,
        )  # fmt: skip
    if not args.skip_vit_b:
        print("ViT-B-sized SAM, random weights:", flush=True)
        report["vit_b"] = measure_model(
            "vit_b", {**common, "SAM_MODEL_TYPE": "vit_b"}, images,
            [(1024, 1024)], max(10, args.clicks // 3), args.warmup_wait,
        )  # fmt: skip

    measured = {}
    if "default" in report:
        default = report["default"]
        measured["default_1024_cached_p50"] = default["1024"]["cached_click_p50_ms"]
        measured["default_1024_cached_p95"] = default["1024"]["cached_click_p95_ms"]
        measured["default_4000x3000_cached_p50"] = default["4000x3000"]["cached_click_p50_ms"]
    if "vit_b" in report:
        measured["vit_b_1024_cached_p50"] = report["vit_b"]["1024"]["cached_click_p50_ms"]
    print("\nresult                               measured   target   ratio", flush=True)
    for key, value in measured.items():
        target = TARGETS_MS[key]
        verdict = "ok" if value <= target else "MISSED"
        print(f"{key:<36} {value:8.1f} {target:8.1f} {value / target:7.2f}  {verdict}")
    for name in ("default", "vit_b"):
        for tag, row in report.get(name, {}).items():
            if isinstance(row, dict):
                print(f"{name} {tag}: cold first click {row['cold_first_click_ms']:.0f} ms, after "
                      f"warm-up {row['first_click_after_warmup_ms']:.0f} ms "
                      f"(saves {row['warmup_saves_ms']:.0f} ms)")  # fmt: skip
    report["load_average_at_end"] = os.getloadavg()
    print(f"torch threads {args.torch_threads or 'default'}; load average (1 min) at start "
          f"{report['load_average_at_start'][0]:.1f}, at end {report['load_average_at_end'][0]:.1f} "
          f"on {os.cpu_count()} cores")  # fmt: skip
    report["measured_ms"] = measured
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
