"""Fixtures shared by every test package.

``redis_url``: a Redis for integration tests. When ``redis-server`` is installed, each test
session gets its own private server on a free port (so a test may ``FLUSHALL`` without touching
a teammate's data or a developer's queue); otherwise the Redis on ``REDIS_URL`` (default
``redis://127.0.0.1:6379/0``) is used if it answers. With neither, the test fails with a clear
message rather than being skipped.

``one_torch_thread``: torch on one CPU thread for a module (on the shared 2-core machines
torch's 2-thread kernels were ~8x slower than one). ``random_mini_base``: a random-weight mini
SAM saved as a ``.safetensors`` base checkpoint, once per session.
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
import torch
from safetensors.torch import save_file

from stable_sam import build_sam

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


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def random_mini_base(tmp_path_factory: pytest.TempPathFactory):
    """The path of a random-weight mini SAM base checkpoint (seeded: the same weights each run)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in build_sam("mini").state_dict().items()}, str(path))
    return path
