"""Loopback HTTP servers: the plumbing the stand-in Label Studios (benchmarks, tests) share.

``LoopbackServer(handler_class)`` serves on 127.0.0.1 at a free port from a daemon thread, as a
context manager; ``QuietHandler`` is a request handler that does not log and answers with
``send_body`` / ``send_json`` (a client that hangs up early is not an error).
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """``image`` (H, W) or (H, W, 3) uint8 as PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def send_body(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any) -> None:
        self.send_body(status, json.dumps(obj).encode())


class LoopbackServer:
    """A threading HTTP server on 127.0.0.1; ``url`` is its base URL."""

    def __init__(self, handler_class: type[BaseHTTPRequestHandler]) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class ImageServer:
    """Task images on a loopback port, standing in for Label Studio's ``/data/upload``:
    ``add(name, data)`` serves ``data`` at ``/data/upload/1/<name>`` and returns that URL;
    ``/slow/<anything>`` trickles an endless PNG one byte per ``trickle_interval_s`` (a slow
    image server; ``slow_started`` counts them). Started on creation; ``close()`` stops it."""

    def __init__(self, trickle_interval_s: float = 1.0) -> None:
        self.files: dict[str, bytes] = {}
        self.slow_started = 0
        server = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path.startswith("/slow/"):
                    server.slow_started += 1
                    self._trickle()
                    return
                body = server.files.get(self.path.rsplit("/", 1)[-1])
                self.send_body(200 if body else 404, body or b"", "image/jpeg")

            def _trickle(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                try:
                    for _ in range(600):  # at most 10 minutes, then give up
                        self.wfile.write(b"\x89")
                        self.wfile.flush()
                        time.sleep(trickle_interval_s)
                except OSError:  # the client gave up: what a backend must do
                    return

        self._server = LoopbackServer(Handler).__enter__()
        self.url = self._server.url

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.url}/data/upload/1/{name}"

    def close(self) -> None:
        self._server.__exit__(None, None, None)
