"""Two hosts that share only Redis: two backend replicas and two training workers, each host
with its own local folder (``VERSIONS_DIR``), plugin versions in Redis (``VERSIONS_STORE=redis``).

Real Redis, real ``uvicorn`` backends and ``python -m training.worker`` processes, the real
trainer on a seeded random ``mini`` SAM; Label Studio's API is the loopback stand-in of
``bench.label_studio_api`` (five annotated 96 px scenes).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
import redis
from pydantic import SecretStr
from rq.job import Job, JobStatus

from bench.label_studio_api import LEGACY_TOKEN, LabelStudioAPI
from bench.processes import (
    AppServer,
    ReplicaProxy,
    RQWorker,
    running_worker,
    settings_env,
    wait_until,
)
from runtime.queue.connection import SERIALIZER
from runtime.settings import Settings
from runtime.versions import REDIS_COPIES
from tests.backend_support import CONFIG, kp

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = "7"
RUN_TIMEOUT_S = 300.0
START = {"action": "START_TRAINING", "project": {"id": int(PROJECT), "title": "p"}}


@pytest.fixture
def hosts(
    redis_url: str, tmp_path: Path, checkpoint: Path, label_studio: LabelStudioAPI
) -> dict[str, Settings]:
    """The settings of host "a" and host "b": the same Redis and queues, separate folders."""
    redis.Redis.from_url(redis_url).flushdb()
    shared = {
        "redis_url": redis_url,
        "training_queue": f"training-{tmp_path.name}",
        "convert_queue": f"convert-{tmp_path.name}",
        "versions_store": "redis",
        "label_studio_url": label_studio.url,
        "label_studio_api_key": LEGACY_TOKEN,
        "sam_model_type": "mini",
        "sam_checkpoint": checkpoint,
        "device": "cpu",
        "preload_model": False,
        "train_retries": 1,
        "train_retry_intervals_s": [0],
        "train_promote_tolerance": 100.0,  # every finished run is served: plumbing only
        "train_torch_threads": 1,
        "torch_threads": 1,
    }
    return {host: Settings(**shared, versions_dir=tmp_path / host / "versions") for host in "ab"}


@contextlib.contextmanager
def replicas(
    hosts: dict[str, Settings], tmp_path: Path, auth: tuple[str, str] | None = None
) -> Iterator[tuple[AppServer, AppServer]]:
    """The backend of host a and of host b, both up (``auth``: their basic-auth pair)."""
    with (
        AppServer(hosts["a"], tmp_path / "app-a.log", auth=auth) as app_a,
        AppServer(hosts["b"], tmp_path / "app-b.log", auth=auth) as app_b,
    ):
        yield app_a, app_b


def worker_on(settings: Settings, log: Path) -> AbstractContextManager[RQWorker]:
    return running_worker(settings.redis_url, settings.training_queue, settings_env(settings), log)


def wait_for_job(settings: Settings, job_id: str, worker: RQWorker) -> Job:
    conn = redis.Redis.from_url(settings.redis_url)

    def ended() -> Job | None:
        job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
        return job if job.get_status() in (JobStatus.FINISHED, JobStatus.FAILED) else None

    try:
        job = wait_until(ended, RUN_TIMEOUT_S, f"job {job_id} to end", poll_s=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{worker.log_tail()}") from exc
    assert job.get_status() == JobStatus.FINISHED, worker.log_tail()
    return job


def served_version(app: AppServer) -> str:
    """What ``/setup`` reports for the project (no model load)."""
    body = {"project": f"{PROJECT}.1700000000", "schema": CONFIG, "hostname": ""}
    return httpx.post(f"{app.url}/setup", json=body, timeout=10).json()["model_version"]


def click(url: str, task: int = 1000, x: float = 40) -> httpx.Response:
    """One interactive click on task ``task`` (its image one of the stand-in's five scenes)."""
    body = {
        "tasks": [{"id": task, "data": {"img": f"/data/upload/{PROJECT}/scene{task % 5}.png"}}],
        "project": f"{PROJECT}.1700000000",
        "label_config": CONFIG,
        "params": {"context": {"result": [kp(x, 40, positive=True)]}},
    }
    answer = httpx.post(f"{url}/predict", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    assert result["result"] and result["result"][0]["type"] == "brushlabels", result
    return answer


def click_version(app: AppServer) -> str:
    """The ``model_version`` a click's mask was made with (the default one if the replica
    could not load the project's plugin file)."""
    return click(app.url).json()["results"][0]["model_version"]


def copies(settings: Settings) -> list[str]:
    folder = settings.versions_dir / REDIS_COPIES / PROJECT
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_version_trained_by_either_worker_is_served_by_both_replicas(
    hosts: dict[str, Settings], tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    with replicas(hosts, tmp_path) as (app_a, app_b):
        default = served_version(app_a)
        assert served_version(app_b) == default
        assert click_version(app_b) == default

        versions: list[str] = []
        # One run on host a's worker (asked through replica a), then one on host b's worker
        # (asked through replica b): each worker's version reaches both replicas.
        for settings, app, host in ((a, app_a, "a"), (b, app_b, "b")):
            with worker_on(settings, tmp_path / f"worker-{host}.log") as worker:
                answer = httpx.post(f"{app.url}/webhook", json=START, timeout=5).json()
                job = wait_for_job(settings, answer["job_id"], worker)
                assert job.worker_name == worker.name
            versions.append(job.get_meta()["report"]["version"])
            for replica in (app_a, app_b):
                assert served_version(replica) == versions[-1]
                assert click_version(replica) == versions[-1]  # its plugin file was loaded
        assert versions == ["stable-sam-p7-v1", "stable-sam-p7-v2"]
        # Nothing went through a shared disk: each host has its own copies only, no local store.
        for settings in (a, b):
            assert [name.split("-")[3] for name in copies(settings)] == ["v1", "v2"]
            assert not (settings.versions_dir / PROJECT).exists()


def test_a_burst_of_webhooks_to_both_replicas_coalesces_into_one_run(
    hosts: dict[str, Settings], tmp_path: Path
) -> None:
    a, b = hosts["a"], hosts["b"]
    with (
        replicas(hosts, tmp_path) as (app_a, app_b),
        worker_on(a, tmp_path / "worker-a.log") as worker_a,
        worker_on(b, tmp_path / "worker-b.log") as worker_b,
    ):
        clients = [httpx.Client(base_url=app.url, timeout=5) for app in (app_a, app_b)]
        for client in clients:
            client.get("/health")

        def post(i: int) -> httpx.Response:
            return clients[i % 2].post("/webhook", json=START)

        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            answers = list(pool.map(post, range(50)))
        for client in clients:
            client.close()
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        bodies = [a.json() for a in answers]
        job_ids = {body["job_id"] for body in bodies}
        # One run, plus at most one follow-up for the triggers that came while it ran.
        assert 1 <= len(job_ids) <= 2
        assert [body["status"] for body in bodies].count("enqueued") == 1
        assert [body["status"] for body in bodies].count("follow_up") == len(job_ids) - 1

        workers = {worker_a.name: worker_a, worker_b.name: worker_b}
        jobs = [wait_for_job(a, job_id, worker_a) for job_id in job_ids]
        assert sum(job.get_meta()["triggers"] for job in jobs) == 50
        assert {job.worker_name for job in jobs} <= set(workers)
        names = sorted(job.get_meta()["report"]["version"] for job in jobs)
        listed = httpx.get(f"{app_b.url}/versions", params={"project": PROJECT}).json()
        assert listed["versions"] == names
        for replica in (app_a, app_b):
            assert served_version(replica) == names[-1]


def test_the_proxy_sends_every_click_of_a_task_to_one_replica_and_fails_over(
    hosts: dict[str, Settings], tmp_path: Path
) -> None:
    """deploy/haproxy.cfg, as the compose profile runs it, in front of the two replicas."""
    with replicas(hosts, tmp_path) as (app_a, app_b):
        addresses = [f"127.0.0.1:{app.port}" for app in (app_a, app_b)]
        with ReplicaProxy(addresses, tmp_path / "haproxy.log") as proxy:
            served_by: dict[int, set[str]] = {}
            for task in range(1000, 1016):
                for x in (30, 40, 50):  # three clicks, as a user refines one object
                    answer = click(proxy.url, task, x)
                    served_by.setdefault(task, set()).add(answer.headers["x-served-by"])
            assert all(len(names) == 1 for names in served_by.values()), served_by
            on = {task: next(iter(names)) for task, names in served_by.items()}
            assert set(on.values()) == {"a", "b"}, on  # the tasks are spread over both
            # Per-project and stateless requests go to either replica.
            seen = {httpx.get(f"{proxy.url}/health").headers["x-served-by"] for _ in range(4)}
            assert seen == {"a", "b"}

            # Replica a goes away: its tasks move to b after the proxy's health checks.
            app_a.process.terminate()
            app_a.process.wait(timeout=15)
            moved = [task for task, name in on.items() if name == "a"]

            def all_on_b() -> bool:
                try:
                    return all(click(proxy.url, t).headers["x-served-by"] == "b" for t in moved)
                except (AssertionError, httpx.HTTPError):
                    return False

            wait_until(all_on_b, 30, "replica a's tasks to reach replica b", poll_s=0.5)
            # b's own tasks stayed where they were (consistent hashing).
            for task in (t for t, name in on.items() if name == "b"):
                assert click(proxy.url, task).headers["x-served-by"] == "b"


def test_the_proxy_s_health_checks_log_in_when_the_replicas_use_basic_auth(
    hosts: dict[str, Settings], tmp_path: Path
) -> None:
    """The backends guard /health too: checks without credentials would mark every replica
    down and the proxy would answer 503 to everything."""
    auth = ("annotator", "s3cret-pass")
    guarded = {
        host: settings.model_copy(
            update={"basic_auth_user": auth[0], "basic_auth_pass": SecretStr(auth[1])}
        )
        for host, settings in hosts.items()
    }
    with replicas(guarded, tmp_path, auth) as (app_a, app_b):
        assert httpx.get(f"{app_a.url}/health").status_code == 401  # guarded indeed
        addresses = [f"127.0.0.1:{app.port}" for app in (app_a, app_b)]
        with ReplicaProxy(addresses, tmp_path / "haproxy.log", auth=auth) as proxy:
            # HAProxy starts servers up and marks them down after "fall 2" failed checks
            # "inter 2s" apart: past that, only replicas whose checks pass still serve.
            time.sleep(5.5)
            seen = {
                httpx.get(f"{proxy.url}/health", auth=auth).headers["x-served-by"] for _ in range(4)
            }
            assert seen == {"a", "b"}  # both replicas are up for the proxy
            assert httpx.get(f"{proxy.url}/health").status_code == 401
