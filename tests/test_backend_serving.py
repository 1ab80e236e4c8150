"""The app under a real uvicorn server on loopback: /health and /setup while /predict is saturated,
and a request body cut off while it streams in.

The image server here holds every download until the test releases it, so that ``/predict`` calls
pile up on their worker threads exactly as behind a slow Label Studio or cloud storage.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import uvicorn
from backend_support import CONFIG, FakeLabelStudio, kp, png_bytes, scene

from backend.app import create_app
from backend.ls_backend import StableSamBackend
from bench.loopback import LoopbackServer, QuietHandler
from runtime.settings import Settings

PREDICT_CONCURRENCY = 2
PILED_UP = 48  # more /predict calls than anyio's default 40 worker threads


class HeldImages(LoopbackServer):
    """An image server whose downloads wait until ``release`` is set, then answer 404."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                with server._lock:
                    server.waiting += 1
                server.release.wait(timeout=60)
                self.send_body(404, b'{"detail": "Not found."}')

        super().__init__(Handler)


class UvicornThread:
    """``app`` served by uvicorn on a free loopback port from a daemon thread."""

    def __init__(self, app: Any) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)


def timed_get(url: str) -> float:
    """Seconds ``GET url`` took (a 5 s timeout counts as 5 s)."""
    started = time.perf_counter()
    with contextlib.suppress(httpx.TimeoutException):
        assert httpx.get(url, timeout=5).status_code == 200
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def saturated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a served app with PILED_UP interactive /predict calls waiting for images."""
    with HeldImages() as images:
        settings = Settings(
            label_studio_url=images.url,
            sam_model_type="mini",
            sam_allow_random_weights=True,
            preload_model=False,
            device="cpu",
            prefetch_workers=0,
            image_fetch_timeout_s=60,
            versions_dir=tmp_path_factory.mktemp("versions"),
            redis_url="redis://127.0.0.1:9/0",
            predict_concurrency=PREDICT_CONCURRENCY,
        )
        backend = StableSamBackend(settings)
        backend.models.predictor()  # built before the clicks: they wait for images only
        with UvicornThread(create_app(settings, backend)) as server:

            def click(n: int) -> int:
                body = {
                    "tasks": [{"id": n, "data": {"img": f"/held/{n}.png"}}],
                    "project": "1.1700000000",
                    "label_config": CONFIG,
                    "params": {"context": {"result": [kp(50, 50)]}},
                }
                return httpx.post(f"{server.url}/predict", json=body, timeout=120).status_code

            with ThreadPoolExecutor(PILED_UP) as clients:
                answers = [clients.submit(click, n) for n in range(PILED_UP)]
                deadline = time.monotonic() + 30
                while images.waiting < PREDICT_CONCURRENCY:
                    assert time.monotonic() < deadline, "the clicks never reached the images"
                    time.sleep(0.02)
                time.sleep(0.3)  # the other clicks arrive and queue up
                try:
                    yield server.url
                finally:
                    images.release.set()
                    assert [a.result() for a in answers] == [404] * PILED_UP


def test_health_answers_within_a_second_while_predict_waits_for_images(saturated: str) -> None:
    assert max(timed_get(f"{saturated}/health") for _ in range(3)) < 1.0
    assert timed_get(f"{saturated}/") < 1.0


def test_setup_and_versions_keep_their_threads_while_predict_waits_for_images(
    saturated: str,
) -> None:
    started = time.perf_counter()
    answer = httpx.post(f"{saturated}/setup", json={"project": "3.1", "schema": CONFIG}, timeout=5)
    assert answer.status_code == 200
    assert time.perf_counter() - started < 1.0
    assert timed_get(f"{saturated}/versions") < 1.0


def test_a_chunked_body_is_refused_while_it_streams_in(tmp_path) -> None:
    limit = 64 * 1024
    settings = Settings(preload_model=False, versions_dir=tmp_path, max_body_bytes=limit)
    with (
        UvicornThread(create_app(settings)) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn,
    ):
        conn.sendall(
            b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 4096
        sent = 0
        while sent < 100 * limit:  # a client that would send 6.4 MB
            if select.select([conn], [], [], 0.01)[0]:
                break  # the server answered
            try:
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        while more := conn.recv(65536):  # the server closes after its answer
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request_too_large" in answer
    assert sent < 4 * limit  # answered as soon as the limit passed, not after the whole body


SLOW_DOWNLOADS = 45  # the measurement: 45 slow downloads made /health take 13 s


def test_a_click_on_a_cached_image_is_answered_while_slow_downloads_hold_requests(
    tmp_path,
) -> None:
    with HeldImages() as held, FakeLabelStudio() as public:
        image, _ = scene(96, 128)
        public.files["cached.png"] = png_bytes(image)
        settings = Settings(
            label_studio_url=held.url,
            sam_model_type="mini",
            sam_allow_random_weights=True,
            preload_model=False,
            device="cpu",
            prefetch_workers=0,
            image_fetch_timeout_s=60,
            versions_dir=tmp_path,
            redis_url="redis://127.0.0.1:9/0",
        )
        backend = StableSamBackend(settings)

        def click(image_url: str) -> int:
            body = {
                "tasks": [{"id": 1, "data": {"img": image_url}}],
                "project": "1.1700000000",
                "label_config": CONFIG,
                "params": {"context": {"result": [kp(50, 50)]}},
            }
            return httpx.post(f"{server.url}/predict", json=body, timeout=120).status_code

        with (
            UvicornThread(create_app(settings, backend)) as server,
            ThreadPoolExecutor(SLOW_DOWNLOADS) as clients,
        ):
            cached = f"{public.url}/public/cached.png"
            assert click(cached) == 200  # downloaded, decoded and embedded once
            answers = [clients.submit(click, f"/held/{n}.png") for n in range(SLOW_DOWNLOADS)]
            try:
                deadline = time.monotonic() + 30
                while held.waiting < SLOW_DOWNLOADS:
                    assert time.monotonic() < deadline, f"only {held.waiting} downloads started"
                    time.sleep(0.02)
                started = time.perf_counter()
                assert click(cached) == 200
                assert time.perf_counter() - started < 2.0
            finally:
                held.release.set()
            assert [a.result() for a in answers] == [404] * SLOW_DOWNLOADS


def test_model_calls_at_once_never_exceed_model_concurrency(tmp_path) -> None:
    with FakeLabelStudio() as public:
        image, _ = scene(96, 128)
        public.files["a.png"] = png_bytes(image)
        settings = Settings(
            sam_model_type="mini",
            sam_allow_random_weights=True,
            preload_model=False,
            device="cpu",
            prefetch_workers=0,
            versions_dir=tmp_path,
            model_concurrency=1,
        )
        backend = StableSamBackend(settings)
        predictor = backend.models.predictor()
        running, most = 0, 0
        lock = threading.Lock()
        original = predictor.predict

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            try:
                time.sleep(0.05)  # long enough for the other calls to overlap if allowed
                return original(*args, **kwargs)
            finally:
                with lock:
                    running -= 1

        predictor.predict = counted
        context = {"result": [kp(50, 50)]}
        tasks = [{"id": 1, "data": {"img": f"{public.url}/public/a.png"}}]
        with ThreadPoolExecutor(6) as pool:
            results = list(
                pool.map(lambda _: backend.predict(tasks, context, "1.1", CONFIG), range(6))
            )
        backend.close()
    assert all(r[0]["result"] for r in results)
    assert most == 1
