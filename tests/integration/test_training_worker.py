"""Webhook -> Redis -> a real worker -> RTS training -> a served plugin version.

Real Redis, real ``python -m training.worker`` subprocesses, the real HTTP app under uvicorn, the real trainer
(``training.engine.train_plugins``) on a seeded random ``mini`` SAM; Label Studio's API is a
loopback stand-in serving synthetic scenes annotated with brush RLE (the e2e test uses a real
Label Studio). Each run trains on a handful of 96 px images.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from rq.job import Job, JobStatus

from bench.label_studio_api import LEGACY_TOKEN, LabelStudioAPI
from bench.processes import (
    AppServer,
    RQWorker,
    running_worker,
    settings_env,
    wait_until,
)
from runtime.queue.connection import SERIALIZER
from runtime.queue.status import TrainingStatus
from runtime.queue.triggers import START_TRAINING, TrainingTriggers
from runtime.settings import Settings
from runtime.versions import LocalVersionStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = "7"
RUN_TIMEOUT_S = 240.0
START = {"action": "START_TRAINING", "project": {"id": int(PROJECT), "title": "p"}}


@pytest.fixture
def settings(
    redis_url: str, tmp_path: Path, checkpoint: Path, label_studio: LabelStudioAPI
) -> Settings:
    redis.Redis.from_url(redis_url).flushdb()
    return Settings(
        redis_url=redis_url,
        training_queue=f"training-{tmp_path.name}",
        versions_dir=tmp_path / "versions",
        label_studio_url=label_studio.url,
        label_studio_api_key=LEGACY_TOKEN,
        sam_model_type="mini",
        sam_checkpoint=checkpoint,
        device="cpu",
        preload_model=False,
        train_retries=1,
        train_retry_intervals_s=[0],
        # Every finished run is served: these tests check the plumbing, the promotion rule has
        # its own test below.
        train_promote_tolerance=100.0,
        train_torch_threads=1,  # the test process, the app and the worker share the CPU
    )


def worker_for(settings: Settings, tmp_path: Path, name: str = "worker") -> RQWorker:
    return RQWorker(
        settings.redis_url,
        settings.training_queue,
        settings_env(settings),
        tmp_path / f"{name}.log",
    )


def connection(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


def fetch_job(conn: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=SERIALIZER)


def wait_for_job(
    settings: Settings, job_id: str, worker: RQWorker, statuses: set[JobStatus]
) -> Job:
    conn = connection(settings)

    def done() -> Job | None:
        job = fetch_job(conn, job_id)
        return job if job.get_status() in statuses else None

    try:
        return wait_until(done, RUN_TIMEOUT_S, f"job {job_id} to reach {statuses}", poll_s=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{worker.log_tail()}") from exc


def wait_for_phase(settings: Settings, job_id: str, phases: set[str], worker: RQWorker) -> None:
    conn = connection(settings)

    def in_phase() -> bool:
        progress = fetch_job(conn, job_id).get_meta().get("progress", {})
        return progress.get("phase") in phases

    try:
        wait_until(in_phase, RUN_TIMEOUT_S, f"job {job_id} to be in {phases}", poll_s=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{worker.log_tail()}") from exc


def version_files(settings: Settings) -> list[str]:
    folder = settings.versions_dir / PROJECT
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def setup_model_version(app: AppServer) -> str:
    body = {
        "project": f"{PROJECT}.1700000000",
        "schema": "<View/>",
        "hostname": "",
        "access_token": None,
    }
    return httpx.post(f"{app.url}/setup", json=body, timeout=5).json()["model_version"]


def test_burst_of_50_webhooks_runs_at_most_twice_and_serves_the_new_version(
    settings: Settings, tmp_path: Path
) -> None:
    with (
        running_worker(
            settings.redis_url, settings.training_queue, settings_env(settings), tmp_path / "w.log"
        ) as worker,
        AppServer(settings, tmp_path / "app.log") as app,
    ):
        before = setup_model_version(app)

        http = httpx.Client(base_url=app.url, timeout=5)
        http.get("/health")

        def post(_: int) -> tuple[float, httpx.Response]:
            started = time.perf_counter()
            answer = http.post("/webhook", json=START)
            return time.perf_counter() - started, answer

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            answers = list(pool.map(post, range(50)))
        burst_s = time.perf_counter() - started
        http.close()

        assert burst_s < 1.0, f"50 webhooks took {burst_s:.2f} s"
        assert all(a.status_code == 200 for _, a in answers), [a.text for _, a in answers]
        assert max(latency for latency, _ in answers) < 1.0  # Label Studio's timeout
        bodies = [a.json() for _, a in answers]
        job_ids = {b["job_id"] for b in bodies}
        assert 1 <= len(job_ids) <= 2
        assert [b["status"] for b in bodies].count("enqueued") == 1
        assert [b["status"] for b in bodies].count("follow_up") == len(job_ids) - 1

        jobs = [
            wait_for_job(settings, j, worker, {JobStatus.FINISHED, JobStatus.FAILED})
            for j in job_ids
        ]
        assert all(job.get_status() == JobStatus.FINISHED for job in jobs), worker.log_tail()
        # Every trigger is accounted for by exactly one run.
        assert sum(job.get_meta()["triggers"] for job in jobs) == 50

        versions = httpx.get(f"{app.url}/versions", params={"project": PROJECT}).json()["versions"]
        assert len(versions) == len(job_ids)
        status = httpx.get(f"{app.url}/status/{PROJECT}").json()
        assert status["queued"] is None and status["running"] is None
        assert status["current_version"]["name"] == versions[-1]
        assert status["last_run"]["report"]["version"] == versions[-1]
        after = setup_model_version(app)
        assert after == versions[-1] != before
        report = jobs[0].get_meta()["report"]
        assert report["train_samples"] + report["val_samples"] == 5
        assert report["promoted"] is True
        assert jobs[0].get_meta()["progress"]["phase"] == "done"


def test_progress_is_reported_in_job_meta_while_training(
    settings: Settings, tmp_path: Path
) -> None:
    with running_worker(
        settings.redis_url, settings.training_queue, settings_env(settings), tmp_path / "w.log"
    ) as worker:
        job_id = (
            TrainingTriggers.from_settings(settings).handle_event(PROJECT, START_TRAINING).job_id
        )
        seen: list[dict[str, Any]] = []
        conn = connection(settings)

        def finished() -> bool:
            job = fetch_job(conn, job_id)
            progress = job.get_meta().get("progress")
            if progress and (not seen or progress != seen[-1]):
                seen.append(progress)
            return job.get_status() in (JobStatus.FINISHED, JobStatus.FAILED)

        wait_until(finished, RUN_TIMEOUT_S, "the job to end", poll_s=0.05)
        assert fetch_job(conn, job_id).get_status() == JobStatus.FINISHED, worker.log_tail()
    phases = [p["phase"] for p in seen]
    order = ["fetching", "evaluating current", "training", "evaluating new", "saving", "done"]
    first_seen = list(dict.fromkeys(phases))
    assert first_seen == [phase for phase in order if phase in first_seen], phases
    assert phases[-1] == "done"
    job = fetch_job(conn, job_id)
    meta = job.get_meta()
    assert job.return_value() == meta["report"]  # the result, stored as JSON like the meta
    steps = meta["report"]["training_summary"]["steps"]
    assert steps >= 1
    assert meta["training"]["step"] == meta["training"]["total"] == steps
    assert meta["training"]["loss"] > 0


def test_a_worse_version_is_written_but_not_served(settings: Settings, tmp_path: Path) -> None:
    strict = settings.model_copy(update={"train_promote_tolerance": -1000.0})  # never good enough
    with running_worker(
        strict.redis_url, strict.training_queue, settings_env(strict), tmp_path / "w.log"
    ) as worker:
        job_id = TrainingTriggers.from_settings(strict).handle_event(PROJECT, START_TRAINING).job_id
        job = wait_for_job(strict, job_id, worker, {JobStatus.FINISHED, JobStatus.FAILED})
    report = job.get_meta()["report"]
    assert report["promoted"] is False
    assert report["reason"].startswith("not promoted: validation robust mIoU")
    store = LocalVersionStore(strict.versions_dir)
    assert store.current(PROJECT) is None
    assert [v.name for v in store.list(PROJECT)] == [report["version"]]
    assert store.list(PROJECT)[0].reason == report["reason"]


def test_killed_work_horse_is_retried_and_never_leaves_a_half_version(
    settings: Settings, tmp_path: Path
) -> None:
    queue = TrainingTriggers.from_settings(settings)
    store = LocalVersionStore(settings.versions_dir)
    with (
        running_worker(
            settings.redis_url, settings.training_queue, settings_env(settings), tmp_path / "w.log"
        ) as worker,
        AppServer(settings, tmp_path / "app.log") as app,
    ):
        first = queue.handle_event(PROJECT, START_TRAINING).job_id
        wait_for_job(settings, first, worker, {JobStatus.FINISHED})
        served = store.current(PROJECT)
        assert served is not None

        second = queue.handle_event(PROJECT, START_TRAINING).job_id
        wait_for_phase(settings, second, {"evaluating current", "training"}, worker)
        worker.kill_horse()
        # RQ's worker notices the dead horse and applies the job's retry policy.
        assert store.current(PROJECT) == served
        assert setup_model_version(app) == served.name
        assert not [f for f in version_files(settings) if f.endswith(".tmp")]

        job = wait_for_job(settings, second, worker, {JobStatus.FINISHED, JobStatus.FAILED})
        assert job.get_status() == JobStatus.FINISHED, worker.log_tail()
        assert job.get_meta()["attempt"] == 2
        versions = store.list(PROJECT)
        assert len(versions) == 2  # the killed attempt wrote nothing
        assert setup_model_version(app) == versions[-1].name
        assert version_files(settings) == sorted(
            [".lock", "manifest.json", *(f"{v.name}.safetensors" for v in versions)]
        )


def test_killed_horse_without_retries_fails_visibly_and_the_next_trigger_trains(
    settings: Settings, tmp_path: Path
) -> None:
    no_retry = settings.model_copy(update={"train_retries": 0})
    queue = TrainingTriggers.from_settings(no_retry)
    with running_worker(
        no_retry.redis_url, no_retry.training_queue, settings_env(no_retry), tmp_path / "w.log"
    ) as worker:
        killed = queue.handle_event(PROJECT, START_TRAINING).job_id
        wait_for_phase(no_retry, killed, {"evaluating current", "training"}, worker)
        worker.kill_horse()
        wait_for_job(no_retry, killed, worker, {JobStatus.FAILED})
        status = TrainingStatus.from_settings(no_retry).status(PROJECT)
        assert status["last_failure"]["job_id"] == killed
        assert "Work-horse terminated unexpectedly" in status["last_failure"]["error"]
        assert status["running"] is None
        assert LocalVersionStore(no_retry.versions_dir).list(PROJECT) == []

        again = queue.handle_event(PROJECT, START_TRAINING)
        assert again.outcome == "enqueued"
        job = wait_for_job(no_retry, again.job_id, worker, {JobStatus.FINISHED, JobStatus.FAILED})
        assert job.get_status() == JobStatus.FINISHED, worker.log_tail()
        assert len(LocalVersionStore(no_retry.versions_dir).list(PROJECT)) == 1


def test_whole_worker_killed_mid_job_is_retried_after_rq_cleans_it_up(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL of the worker, its horse and its scheduler (OOM / machine loss): nothing runs
    after the kill.

    The next worker on this machine sees that the job's worker and horse processes are gone and
    RQ's StartedJobRegistry cleanup retries the job at once (tests/integration/
    test_worker_recovery.py times it); a trigger sent meanwhile becomes one follow-up that runs
    after it.
    """
    queue = TrainingTriggers.from_settings(settings)
    first_worker = worker_for(settings, tmp_path, "first")
    try:
        abandoned = queue.handle_event(PROJECT, START_TRAINING).job_id
        wait_for_phase(settings, abandoned, {"evaluating current", "training"}, first_worker)
        first_worker.kill()
    finally:
        first_worker.stop()
    follow_up = queue.handle_event(PROJECT, START_TRAINING)
    assert follow_up.outcome == "follow_up"
    assert queue.handle_event(PROJECT, START_TRAINING).outcome == "merged"
    assert LocalVersionStore(settings.versions_dir).list(PROJECT) == []

    with running_worker(
        settings.redis_url, settings.training_queue, settings_env(settings), tmp_path / "second.log"
    ) as worker:
        retried = wait_for_job(settings, abandoned, worker, {JobStatus.FINISHED, JobStatus.FAILED})
        assert retried.get_status() == JobStatus.FINISHED, worker.log_tail()
        assert retried.get_meta()["attempt"] == 2
        after = wait_for_job(
            settings, follow_up.job_id, worker, {JobStatus.FINISHED, JobStatus.FAILED}
        )
        assert after.get_status() == JobStatus.FINISHED, worker.log_tail()
        assert after.get_meta()["triggers"] == 2
    versions = LocalVersionStore(settings.versions_dir).list(PROJECT)
    assert len(versions) == 2
    assert not [f for f in version_files(settings) if f.endswith(".tmp")]
