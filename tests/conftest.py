"""Fixtures shared by every test package.

``redis_url``: a Redis for integration tests. When ``redis-server`` is installed, each test
session gets its own private server on a free port (so a test may ``FLUSHALL`` without touching
a teammate's data or a developer's queue); otherwise the Redis on ``REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) is used if it answers. With neither, the test fails with a clear
message rather than being skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Redis that is running for the whole test session."""
    server = shutil.which("redis-server")
    if server is None:
        url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
        if not _answers(url):
            pytest.fail(f"no redis-server binary and no Redis answering at {url}", pytrace=False)
        yield url
        return

    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(workdir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10.0
        while not _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port}", pytrace=False)
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
