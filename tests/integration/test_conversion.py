"""A project's crowd boxes -> mask predictions, on real RQ workers.

Real Redis, real ``python -m training.worker`` subprocesses (two on one run), the real HTTP app
under uvicorn and the embedded default model; Label Studio's API is the loopback stand-in of
``bench.label_studio_boxes`` (tests/e2e/test_batch_boxes_e2e.py runs against a real Label Studio).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from rq.job import Job

from bench.label_studio_api import LEGACY_TOKEN
from bench.label_studio_boxes import LABEL, BoxProjectAPI
from bench.processes import AppServer, RQWorker, settings_env, wait_until
from labelstudio.brush import rle_to_mask
from runtime.models import resolve_model
from runtime.queue.connection import SERIALIZER
from runtime.queue.conversion import ACTIVE, chunk_job_id, plan_job_id
from runtime.settings import Settings
from stable_sam.metrics import mask_iou

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT = 11
RUN_TIMEOUT_S = 300.0


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    redis.Redis.from_url(redis_url).flushdb()
    return Settings(
        redis_url=redis_url,
        training_queue=f"training-{tmp_path.name}",
        convert_queue=f"convert-{tmp_path.name}",
        versions_dir=tmp_path / "versions",
        label_studio_api_key=LEGACY_TOKEN,
        device="cpu",
        preload_model=False,
        convert_chunk_tasks=3,
        convert_retries=2,
        convert_retry_intervals_s=[0],
        train_torch_threads=1,  # the test process, the app and two workers share the CPU
    )


def fetch(conn: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=SERIALIZER)


def with_label_studio(settings: Settings, api: BoxProjectAPI) -> Settings:
    return settings.model_copy(update={"label_studio_url": api.url})


def worker(settings: Settings, tmp_path: Path, name: str) -> RQWorker:
    return RQWorker(
        settings.redis_url,
        settings.training_queue,
        settings_env(settings),
        tmp_path / f"{name}.log",
    )


@pytest.fixture
def stop_later() -> Iterator[list[RQWorker]]:
    workers: list[RQWorker] = []
    yield workers
    for w in workers:
        w.stop()


def wait_for_run(app: AppServer, workers: list[RQWorker]) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        view = httpx.get(f"{app.url}/status/{PROJECT}", timeout=5).json()["conversion"]
        return view if view and view["state"] not in ACTIVE else None

    try:
        return wait_until(ended, RUN_TIMEOUT_S, "the conversion run to end", poll_s=0.25)
    except AssertionError as exc:
        logs = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in workers)
        raise AssertionError(f"{exc}\n{logs}\napp log:\n{app.log_tail()}") from exc


def check_predictions(api: BoxProjectAPI, version: str) -> list[float]:
    """Each converted task holds exactly one prediction of ``version``, one brush region per
    object with the boxes' label; the IoU of every region with its object."""
    ious = []
    converted = [t for t in api.boxed_tasks if t not in api.missing_image_tasks]
    for task_id in converted:
        [prediction] = api.predictions_of(task_id, version)
        truth = api.tasks[task_id].masks
        regions = prediction["result"]
        assert len(regions) == len(truth), f"task {task_id}: one region per object"
        for region in regions:
            assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == [LABEL]
            # Two annotators' boxes, and a detector's on some tasks: one object, one mask.
            assert re.match(r"consensus of [23] boxes", region["meta"]["text"][0])
            h, w = region["original_height"], region["original_width"]
            mask = rle_to_mask(region["value"]["rle"], h, w)
            ious.append(max(mask_iou(mask, m) for m in truth))
    return ious


def test_two_workers_convert_a_project_and_a_rerun_replaces_its_predictions(
    settings: Settings, tmp_path: Path, stop_later: list[RQWorker]
) -> None:
    with BoxProjectAPI(project_id=PROJECT, n_tasks=10) as api:
        settings = with_label_studio(settings, api)
        version = resolve_model(settings).version
        stop_later += [worker(settings, tmp_path, "w1"), worker(settings, tmp_path, "w2")]
        with AppServer(settings, tmp_path / "app.log") as app:
            started = httpx.post(f"{app.url}/convert", json={"project": PROJECT}, timeout=10)
            assert started.status_code == 202, started.text
            assert started.json()["model_version"] == version
            again = httpx.post(f"{app.url}/convert", json={"project": PROJECT}, timeout=10)
            assert again.status_code == 409 and again.json()["error"] == "conversion_running"
            view = wait_for_run(app, stop_later)

            boxed = [t for t in api.boxed_tasks if t not in api.missing_image_tasks]
            assert view["state"] == "done", view
            assert view["tasks"] == len(api.tasks)
            assert view["done"] == len(boxed)
            assert view["failed"] == len(api.missing_image_tasks) == 1
            assert view["skipped"] == len(api.tasks) - len(boxed) - 1
            assert view["remaining"] == 0 and view["chunks"]["lost"] == []
            [failed] = view["failed_tasks"]
            assert failed["task"] == api.missing_image_tasks[0] and "HTTP 404" in failed["reason"]
            ious = check_predictions(api, version)
            assert view["objects"] == len(ious)
            assert float(np.mean(ious)) >= 0.7, ious
            # The chunks ran on both workers.
            conn = redis.Redis.from_url(settings.redis_url)
            ran_on = {
                fetch(conn, chunk_job_id(view["run_id"], k)).worker_name
                for k in range(view["chunks"]["total"])
            }
            assert ran_on == {w.name for w in stop_later}, ran_on
            detector_before = {t: api.predictions_of(t, "detector-v1") for t in api.tasks}

            rerun = httpx.post(f"{app.url}/convert", json={"project": PROJECT}, timeout=10)
            assert rerun.status_code == 202, rerun.text
            assert rerun.json()["run_id"] != view["run_id"]
            second = wait_for_run(app, stop_later)
            assert second["state"] == "done" and second["done"] == len(boxed)
            check_predictions(api, version)  # still exactly one per task
            assert all(api.prediction_posts[t] == 2 for t in boxed)
            assert {t: api.predictions_of(t, "detector-v1") for t in api.tasks} == detector_before


def test_a_worker_killed_mid_chunk_loses_nothing_and_writes_no_task_twice(
    settings: Settings, tmp_path: Path, stop_later: list[RQWorker]
) -> None:
    settings = settings.model_copy(update={"convert_chunk_tasks": 5})
    with BoxProjectAPI(project_id=PROJECT, n_tasks=6, prediction_delay_s=0.5) as api:
        settings = with_label_studio(settings, api)
        version = resolve_model(settings).version
        first = worker(settings, tmp_path, "doomed")
        stop_later.append(first)
        with AppServer(settings, tmp_path / "app.log") as app:
            started = httpx.post(f"{app.url}/convert", json={"project": PROJECT}, timeout=10)
            assert started.status_code == 202, started.text
            # Killed right after its first prediction is stored: mid-chunk.
            wait_until(lambda: sum(api.prediction_posts.values()) >= 1, RUN_TIMEOUT_S,
                       "the first prediction", poll_s=0.02)  # fmt: skip
            first.kill()
            posted_before = dict(api.prediction_posts)
            view = httpx.get(f"{app.url}/convert/{PROJECT}", timeout=5).json()
            assert view["state"] == "running" and view["done"] < view["tasks"]
            replacement = worker(settings, tmp_path, "replacement")
            stop_later.append(replacement)
            view = wait_for_run(app, stop_later)

            boxed = [t for t in api.boxed_tasks if t not in api.missing_image_tasks]
            assert view["state"] == "done", view
            assert view["done"] == len(boxed) and view["failed"] == 1
            check_predictions(api, version)  # exactly one per task: none lost, none twice
            # The task done before the kill was not converted again; at most the one in flight
            # when the worker died was stored twice (and its first copy deleted).
            redone = [t for t in posted_before if api.prediction_posts[t] > 1]
            assert len(redone) <= 1, api.prediction_posts
            # The chunk in flight was retried (RQ's retry of an abandoned job), once.
            conn = redis.Redis.from_url(settings.redis_url)
            chunk = fetch(conn, chunk_job_id(view["run_id"], 0))
            assert chunk.retries_left == settings.convert_retries - 1


def test_a_run_without_label_studio_access_fails_at_once_naming_the_settings(
    settings: Settings, tmp_path: Path, stop_later: list[RQWorker]
) -> None:
    # A configuration error: no retry would bring access, so the run fails on the first
    # attempt with the reason instead of after every retry (CONVERT_RETRY_INTERVALS_S).
    settings = settings.model_copy(
        update={"label_studio_api_key": None, "convert_retry_intervals_s": [60, 60]}
    )
    stop_later.append(worker(settings, tmp_path, "w"))
    with AppServer(settings, tmp_path / "app.log") as app:
        started = httpx.post(f"{app.url}/convert", json={"project": PROJECT}, timeout=10)
        assert started.status_code == 202, started.text
        view = wait_for_run(app, stop_later)
    assert view["state"] == "failed", view
    assert "LABEL_STUDIO_URL" in view["error"] and "LABEL_STUDIO_API_KEY" in view["error"]
    plan = fetch(redis.Redis.from_url(settings.redis_url), plan_job_id(view["run_id"]))
    assert plan.retries_left == settings.convert_retries  # no attempt was retried
