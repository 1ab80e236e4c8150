"""The deployment's pieces as real processes, for the benchmarks and the integration tests.

- ``RQWorker``: the training worker ``python -m training.worker`` as a subprocess (the command
  ``scripts/serve.sh`` and docker compose run), with its log kept for failure messages;
  ``kill_horse`` / ``kill_scheduler`` / ``kill`` SIGKILL the work horse, the scheduler or all.
- ``RedisServer``: a private password-protected ``redis-server`` that may be stopped and
  restarted.
- ``AppServer``: the backend app under uvicorn on a free port, as a subprocess.
- ``settings_env``: the environment that gives those processes the caller's ``Settings``.
- ``tiny_mini_checkpoint``: a seeded random ``mini`` SAM saved as an official-format ``.pth``,
  so that the worker and the app build the very same base.

Label Studio's API is the loopback stand-in of ``bench.label_studio_api``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.1
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def settings_env(settings: Any) -> dict[str, str]:
    """The environment that makes ``runtime.settings.Settings()`` equal ``settings``.

    The worker reads its settings from the environment (it is a separate process); deriving
    that environment from the test's Settings object keeps app and worker in agreement.
    """
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, list | dict):
            value = json.dumps(value)
        env[name.upper()] = str(value)
    return env


def tiny_mini_checkpoint(path: Path, seed: int = 0) -> Path:
    """A seeded random ``mini`` SAM state_dict saved as ``.pth`` (the official format)."""
    import torch

    from stable_sam import build_sam

    torch.manual_seed(seed)
    torch.save(build_sam("mini").state_dict(), path)
    return path


class RQWorker:
    """``python -m training.worker`` on ``queue`` as a subprocess, with ``env`` added to a clean
    environment (REDIS_URL and TRAINING_QUEUE travel there too, never in argv).
    ``allow_functions``: test job functions it runs besides the training job."""

    def __init__(
        self,
        redis_url: str,
        queue: str,
        env: dict[str, str],
        log_path: Path,
        allow_functions: Sequence[str] = (),
        root: Path = REPO_ROOT,
    ) -> None:
        """``root``: the checkout whose code runs (another one for a before/after comparison)."""
        self.log_path = log_path
        self.redis_url = redis_url
        self.name = f"test-worker-{os.getpid()}-{time.monotonic_ns()}"
        command = [sys.executable, "-m", "training.worker", "--name", self.name]
        for function in allow_functions:
            command += ["--allow-job-function", function]
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            cwd=root,
            env={
                **base,
                "PYTHONPATH": str(root),
                **env,
                "REDIS_URL": redis_url,
                "TRAINING_QUEUE": queue,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def children(self) -> list[int]:
        """The worker's child processes now: its scheduler and, while a job runs, the horse."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError):
            return [int(p) for p in children.read_text().split()]
        return []

    def horse_pid(self) -> int | None:
        """The work horse (the child forked to run a job), if there is one now.

        The other child is the scheduler; the horse is the one that made itself a process group
        leader (RQ's ``os.setpgrp()`` after the fork).
        """
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) == pid:
                    return pid
        return None

    def scheduler_pid(self) -> int | None:
        """The scheduler process (the child in the worker's own process group), if running."""
        for pid in self.children():
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) != pid:
                    return pid
        return None

    def kill_scheduler(self) -> int:
        pid = wait_until(self.scheduler_pid, 30, "the scheduler process to exist")
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_horse(self) -> int:
        pid = wait_until(self.horse_pid, 30, "the work horse to exist")
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill(self) -> None:
        """SIGKILL the worker, its horse and its scheduler (a machine loss or container kill:
        nothing of it runs after)."""
        for pid in [*self.children(), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class AppServer:
    """The backend app (``uvicorn backend.app:create_app --factory``) as a subprocess.

    Its settings come from ``settings`` through the environment, exactly as in production.
    """

    def __init__(
        self,
        settings: Any,
        log_path: Path,
        root: Path = REPO_ROOT,
        auth: tuple[str, str] | None = None,
    ) -> None:
        """``root``: the checkout whose code runs (another one for a before/after comparison);
        ``auth``: the basic-auth pair its ``/health`` needs, when ``settings`` set one."""
        self.port = free_port()
        self.auth = auth
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "uvicorn", "backend.app:create_app", "--factory"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(
            command,
            cwd=root,
            env={**base, "PYTHONPATH": str(root), **settings_env(settings)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the app exited:\n{self.log_tail()}")
        try:
            return httpx.get(f"{self.url}/health", auth=self.auth, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> AppServer:
        wait_until(self._healthy, 120, "the app to answer /health", poll_s=0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@contextlib.contextmanager
def running_worker(
    redis_url: str,
    queue: str,
    env: dict[str, str],
    log_path: Path,
    allow_functions: Sequence[str] = (),
) -> Iterator[RQWorker]:
    worker = RQWorker(redis_url, queue, env, log_path, allow_functions)
    try:
        yield worker
    finally:
        worker.stop()


class RedisServer:
    """A private ``redis-server`` on a free port with a password, which a test may ``stop`` and
    ``start`` again on the same port (``appendonly``: its data survive, as in docker compose).

    The password reaches the server through a config file, never argv.
    """

    def __init__(self, workdir: Path, password: str = "test-redis-password-0123") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        self.url = f"redis://:{password}@127.0.0.1:{self.port}/0"
        self.config = workdir / "redis.conf"
        self.config.write_text(
            f'port {self.port}\nbind 127.0.0.1\nrequirepass {password}\nsave ""\n'
            f"appendonly yes\ndir {workdir}\n"
        )
        self.config.chmod(0o600)
        self.process: subprocess.Popen[bytes] | None = None

    def _answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, 10, f"redis-server to answer on port {self.port}", poll_s=0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ReplicaProxy:
    """HAProxy with the deployment's own ``deploy/haproxy.cfg`` in front of backend replicas
    ``replicas`` ("host:port" each, as REPLICA_A, REPLICA_B), on a free loopback port;
    ``auth``: the replicas' basic-auth (user, password), for the health checks as compose
    passes it."""

    def __init__(
        self,
        replicas: Sequence[str],
        log_path: Path,
        auth: tuple[str, str] | None = None,
        root: Path = REPO_ROOT,
    ) -> None:
        binary = shutil.which("haproxy")
        if binary is None:
            raise AssertionError("haproxy is not installed (scripts/test.sh installs it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.auth = auth
        login = base64.b64encode(":".join(auth or ("", "")).encode()).decode()
        env = {"PATH": os.environ.get("PATH", ""), "PROXY_BIND": f"127.0.0.1:{self.port}"}
        env["HEALTH_AUTH"] = login
        env |= {f"REPLICA_{chr(ord('A') + i)}": r for i, r in enumerate(replicas)}
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(root / "deploy" / "haproxy.cfg")],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _up(self) -> bool:
        if self.process.poll() is not None:
            text = self.log_path.read_text(errors="replace")
            raise AssertionError(f"haproxy exited:\n{text[-3000:]}")
        try:
            return httpx.get(f"{self.url}/health", auth=self.auth, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def __enter__(self) -> ReplicaProxy:
        wait_until(self._up, 30, "haproxy to answer /health", poll_s=0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
