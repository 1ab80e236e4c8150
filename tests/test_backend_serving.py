"""The app under a real uvicorn server on loopback: a request body cut off while it streams in."""

from __future__ import annotations

import select
import socket
import threading
import time

import uvicorn

from backend.app import create_app
from backend.settings import Settings


class UvicornThread:
    """``app`` served by uvicorn on a free loopback port from a daemon thread."""

    def __init__(self, app: object) -> None:
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
