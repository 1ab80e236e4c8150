"""The training worker recovers from Redis restarts and worker kills within seconds.

Real processes throughout: a private password-protected ``redis-server`` that a test stops and
starts again on the same port, real ``python -m training.worker`` processes SIGKILLed and
restarted, and small jobs (``recovery_jobs``) that fail or hang on their first attempt and
record when each attempt starts. Retries wait ``RETRY_INTERVAL_S``; each must start within that
plus ``SLACK_S`` (plain ``rq worker --with-scheduler`` took 10-15 minutes in both cases).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus

from bench.processes import RedisServer, RQWorker, running_worker, settings_env, wait_until
from runtime.queue.connection import SERIALIZER
from runtime.queue.status import TrainingStatus
from runtime.settings import Settings

from .recovery_jobs import FUNCTIONS, MODULE, attempts_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RETRY_INTERVAL_S = 2
# Process start-up, the scheduler's 1 s poll and a shared 2-core CPU.
SLACK_S = 4.0
PROJECT = "7"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        training_queue="recovery",
        versions_dir=tmp_path / "versions",
        train_heartbeat_s=1,
        train_stuck_after_s=4,
        train_maintenance_interval_s=1,
    )


def start_worker(settings: Settings, tmp_path: Path, name: str) -> RQWorker:
    return RQWorker(
        settings.redis_url,
        settings.training_queue,
        settings_env(settings),
        tmp_path / name,
        allow_functions=FUNCTIONS,
    )


def worker_running(
    settings: Settings, tmp_path: Path, name: str
) -> contextlib.AbstractContextManager[RQWorker]:
    return running_worker(
        settings.redis_url,
        settings.training_queue,
        settings_env(settings),
        tmp_path / name,
        allow_functions=FUNCTIONS,
    )


def enqueue(settings: Settings, function: str, **kwargs: object) -> Job:
    connection = redis.Redis.from_url(settings.redis_url)
    queue = Queue(settings.training_queue, connection=connection, serializer=SERIALIZER)
    return queue.enqueue(
        f"{MODULE}.{function}", kwargs=kwargs, retry=Retry(max=1, interval=RETRY_INTERVAL_S)
    )


def attempts(settings: Settings, job_id: str) -> list[float]:
    """When each attempt of ``job_id`` started (``time.time()``)."""
    connection = redis.Redis.from_url(settings.redis_url)
    return [float(t) for t in connection.lrange(attempts_key(job_id), 0, -1)]


def wait_for_attempts(
    settings: Settings, job_id: str, count: int, timeout_s: float, worker: RQWorker
) -> list[float]:
    try:
        wait_until(
            lambda: len(attempts(settings, job_id)) >= count,
            timeout_s,
            f"attempt {count} of job {job_id}",
            poll_s=0.05,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{worker.log_tail()}") from exc
    return attempts(settings, job_id)


def job_status(settings: Settings, job_id: str) -> JobStatus:
    connection = redis.Redis.from_url(settings.redis_url)
    return Job.fetch(job_id, connection=connection, serializer=SERIALIZER).get_status()


def worker_registered(settings: Settings, worker: RQWorker) -> float | None:
    """When ``worker`` was first seen registered in Redis (``time.time()``), or None."""
    connection = redis.Redis.from_url(settings.redis_url)
    return time.time() if connection.exists(f"rq:worker:{worker.name}") else None


def scheduler_holds_lock(settings: Settings) -> bool:
    connection = redis.Redis.from_url(settings.redis_url)
    return connection.exists(f"rq:scheduler-lock:{settings.training_queue}") == 1


def test_a_retry_starts_on_time_after_redis_restarts(
    settings: Settings, redis_server: RedisServer, tmp_path: Path
) -> None:
    with worker_running(settings, tmp_path, "worker.log") as worker:
        wait_until(lambda: scheduler_holds_lock(settings), 30, "the worker's scheduler")
        redis_server.stop()
        time.sleep(3)  # down for a few of the scheduler's 1 s polls
        redis_server.start()

        job = enqueue(settings, "fail_first_attempt")
        first = wait_for_attempts(settings, job.id, 1, 30, worker)[0]
        times = wait_for_attempts(settings, job.id, 2, RETRY_INTERVAL_S + SLACK_S + 1, worker)
        assert times[1] - first <= RETRY_INTERVAL_S + SLACK_S, worker.log_tail()
        assert redis_server.password not in worker.log_tail(10_000)  # errors name host:port


def test_a_redis_restart_during_a_job_leaves_the_worker_running_and_the_job_finishes(
    settings: Settings, redis_server: RedisServer, tmp_path: Path
) -> None:
    with worker_running(settings, tmp_path, "worker.log") as worker:
        job = enqueue(settings, "hang_first_attempt", seconds=6.0)
        wait_for_attempts(settings, job.id, 1, 30, worker)
        redis_server.stop()
        time.sleep(3)  # a few missed heartbeats (TRAIN_HEARTBEAT_S=1)
        redis_server.start()
        wait_until(lambda: job_status(settings, job.id) == JobStatus.FINISHED, 20, "the job")
        assert worker.process.poll() is None, worker.log_tail()
        assert len(attempts(settings, job.id)) == 1


def test_a_retry_starts_on_time_after_the_worker_is_killed_and_restarted(
    settings: Settings, tmp_path: Path
) -> None:
    first_worker = start_worker(settings, tmp_path, "first.log")
    try:
        job = enqueue(settings, "hang_first_attempt")
        wait_for_attempts(settings, job.id, 1, 30, first_worker)
        wait_until(lambda: scheduler_holds_lock(settings), 30, "the worker's scheduler")
        first_worker.kill()  # worker, horse and scheduler: a container or machine kill
        killed_at = time.time()
    finally:
        first_worker.stop()

    with worker_running(settings, tmp_path, "second.log") as worker:
        # From the replacement's registration, not from the kill: how long the restart takes
        # (a container's, here a Python process importing torch: 4 s on a loaded CI machine)
        # is not the recovery's. A restart sooner than the dead worker's heartbeats go stale
        # still counts its wait here.
        up_at = wait_until(lambda: worker_registered(settings, worker), 30, "the new worker")
        times = wait_for_attempts(settings, job.id, 2, RETRY_INTERVAL_S + SLACK_S + 1, worker)
        restart = f"the new worker registered {up_at - killed_at:.1f} s after the kill"
        assert times[1] - up_at <= RETRY_INTERVAL_S + SLACK_S, f"{restart}\n{worker.log_tail()}"
        wait_until(lambda: job_status(settings, job.id) == JobStatus.FINISHED, 10, "the retry")


def test_a_killed_scheduler_process_is_restarted_by_its_worker(
    settings: Settings, tmp_path: Path
) -> None:
    with worker_running(settings, tmp_path, "worker.log") as worker:
        wait_until(lambda: scheduler_holds_lock(settings), 30, "the worker's scheduler")
        killed = worker.kill_scheduler()
        job = enqueue(settings, "fail_first_attempt")
        first = wait_for_attempts(settings, job.id, 1, 30, worker)[0]
        times = wait_for_attempts(settings, job.id, 2, RETRY_INTERVAL_S + SLACK_S + 1, worker)
        assert times[1] - first <= RETRY_INTERVAL_S + SLACK_S, worker.log_tail()
        assert worker.scheduler_pid() not in (None, killed)


def test_status_tells_a_running_job_from_one_whose_worker_was_killed(
    settings: Settings, tmp_path: Path
) -> None:
    status = TrainingStatus.from_settings(settings)
    worker = start_worker(settings, tmp_path, "worker.log")
    try:
        job = enqueue(
            settings,
            "hold_training_slot",
            project=PROJECT,
            seconds=120,
        )
        wait_until(lambda: status.status(PROJECT)["running"], 30, "the job to start")
        time.sleep(settings.train_stuck_after_s + 1)  # longer than the threshold: heartbeats
        running = status.status(PROJECT)["running"]
        assert running["job_id"] == job.id
        assert running["state"] == "running", worker.log_tail()
        assert running["heartbeat_age_s"] <= settings.train_heartbeat_s + 1
        worker.kill()
    finally:
        worker.stop()

    stuck = wait_until(
        lambda: (s := status.status(PROJECT)["running"]) and s["state"] == "stuck" and s,
        settings.train_stuck_after_s + 3,
        "the job to be reported stuck",
    )
    assert stuck["job_id"] == job.id and stuck["status"] == "started"
    assert stuck["heartbeat_age_s"] >= settings.train_stuck_after_s


def test_the_worker_refuses_a_job_of_any_other_function_without_running_it(
    settings: Settings, tmp_path: Path
) -> None:
    """Whoever can write Redis can enqueue any function name: the worker fails such a job
    (no retry) and runs nothing of it, then goes on with the next job."""
    marker = tmp_path / "marker"
    connection = redis.Redis.from_url(settings.redis_url)
    queue = Queue(settings.training_queue, connection=connection, serializer=SERIALIZER)
    with worker_running(settings, tmp_path, "worker.log") as worker:
        evil = queue.enqueue("os.system", f"touch {marker}", retry=Retry(max=2, interval=1))
        ended = (JobStatus.FAILED, JobStatus.FINISHED)
        wait_until(lambda: job_status(settings, evil.id) in ended, 30, "the job to end")
        assert not marker.exists(), worker.log_tail()
        assert job_status(settings, evil.id) == JobStatus.FAILED
        allowed = enqueue(settings, "fail_first_attempt")  # the worker still works
        wait_until(lambda: job_status(settings, allowed.id) == JobStatus.FINISHED, 30, "a job")
        assert f"refused job {evil.id}" in worker.log_tail(200)
        failed = Job.fetch(evil.id, connection=connection, serializer=SERIALIZER)
        assert "not a training job function" in failed.latest_result().exc_string
