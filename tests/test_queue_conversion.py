"""Conversion runs in Redis (``runtime.queue.conversion``): one active run per project, outcomes
counted once per task however often a chunk is retried, the run's end, lost chunks, the HTTP
API's answers and the CLI. Real Redis; no worker (tests/integration/test_conversion.py runs
them)."""

from __future__ import annotations

import json

import pytest
import redis
from fastapi.testclient import TestClient
from rq.job import Job

from backend.app import create_app
from labelstudio.errors import LabelConfigError
from labelstudio.label_config import parse_label_config
from runtime.queue.connection import SERIALIZER
from runtime.queue.conversion import (
    CHUNK_FUNCTION,
    PLAN_FUNCTION,
    ConversionRunningError,
    Conversions,
    chunk_job_id,
    plan_job_id,
)
from runtime.settings import Settings
from training import conversion as cli

BOX_CONFIG = """<View><Image name="img" value="$image"/>
  <RectangleLabels name="box" toName="img"><Label value="Car"/><Label value="Tree"/></RectangleLabels>
  <BrushLabels name="mask" toName="img"><Label value="Car"/></BrushLabels></View>"""


@pytest.fixture
def conn(redis_url: str) -> redis.Redis:
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    return connection


@pytest.fixture
def runs(conn: redis.Redis) -> Conversions:
    return Conversions(conn, "convert-test")


def planned(runs: Conversions, tasks: list[int]) -> str:
    run_id = runs.start("4", "v1", chunk_tasks=2)["run_id"]
    runs.mark_planning(run_id)
    runs.plan(run_id, lambda: tasks)
    return run_id


def test_a_project_has_one_active_run_and_the_plan_job_is_queued(runs: Conversions) -> None:
    view = runs.start("4", "stable-sam-x")
    assert view["state"] == "queued" and view["model_version"] == "stable-sam-x"
    job = Job.fetch(plan_job_id(view["run_id"]), connection=runs.connection, serializer=SERIALIZER)
    assert job.func_name == PLAN_FUNCTION and job.args == [view["run_id"]]
    with pytest.raises(ConversionRunningError) as info:
        runs.start("4", "stable-sam-x")
    assert info.value.view["run_id"] == view["run_id"]
    assert runs.start("5", "stable-sam-x")["project"] == "5"  # other projects are free
    runs.cancel("4")
    assert runs.latest("4")["state"] == "cancelled"
    assert runs.start("4", "stable-sam-x")["run_id"] != view["run_id"]
    assert runs.projects() == ["4", "5"]


def test_planning_splits_into_chunk_jobs_once_even_when_the_plan_job_runs_again(
    runs: Conversions,
) -> None:
    run_id = planned(runs, [10, 11, 12, 13, 14])
    assert runs.queue.count == 1 + 3  # the plan job and three chunks
    job = Job.fetch(chunk_job_id(run_id, 2), connection=runs.connection, serializer=SERIALIZER)
    assert job.func_name == CHUNK_FUNCTION and job.args == [run_id, 2, [14]]

    def listed_again() -> list[int]:
        raise AssertionError("a retried plan job must reuse the stored chunks")

    runs.plan(run_id, listed_again)  # a retried plan job
    assert runs.queue.count == 4
    view = runs.status(run_id)
    assert (view["state"], view["tasks"], view["chunks"]["total"]) == ("running", 5, 3)
    assert view["remaining"] == 5


def test_a_retried_plan_job_enqueues_the_chunks_a_killed_one_left_out(runs: Conversions) -> None:
    run_id = planned(runs, [10, 11, 12, 13, 14])
    runs.queue.remove(chunk_job_id(run_id, 1))  # as if killed before enqueueing it
    runs.connection.delete(Job.key_for(chunk_job_id(run_id, 1)))
    runs.plan(run_id, lambda: [99])  # the listing changed meanwhile: the stored plan holds
    jobs = {j.id: j.args for j in runs.queue.get_jobs()}
    assert len(jobs) == 4 and jobs[chunk_job_id(run_id, 1)] == [run_id, 1, [12, 13]]


def test_duplicate_task_ids_land_in_one_chunk(runs: Conversions) -> None:
    run_id = planned(runs, [10, 11, 10, 12, 11])
    assert runs.status(run_id)["tasks"] == 3
    jobs = runs.queue.get_jobs()
    assert sorted(
        t for j in jobs if j.args[0] == run_id and len(j.args) == 3 for t in j.args[2]
    ) == [10, 11, 12]


def test_a_cancel_is_not_undone_by_a_plan_job_that_starts_after_it(runs: Conversions) -> None:
    run_id = runs.start("4", "v1")["run_id"]
    runs.cancel("4")
    assert not runs.mark_planning(run_id)
    assert runs.status(run_id)["state"] == "cancelled"


def test_a_project_whose_last_run_expired_can_be_converted_again(runs: Conversions) -> None:
    first = runs.start("4", "v1")["run_id"]
    runs.cancel("4")
    for key in runs.connection.scan_iter(f"stable-sam:convert:run:{first}*"):
        runs.connection.delete(key)  # CONVERT_KEEP_DAYS later
    assert runs.latest("4") is None
    assert runs.start("4", "v1")["state"] == "queued"


def test_concurrent_starts_of_one_project_make_one_run(runs: Conversions, redis_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def start(project: str) -> str | None:
        try:
            return Conversions(redis.Redis.from_url(redis_url), "convert-test").start(project, "v")[
                "run_id"
            ]
        except ConversionRunningError:
            return None

    with ThreadPoolExecutor(4) as pool:
        for project in range(20):
            started = [r for r in pool.map(start, [str(project)] * 4) if r]
            assert len(started) == 1, started
    assert runs.queue.count == 20  # one plan job per run, none without a run


def test_every_key_of_a_run_expires_however_it_ends(runs: Conversions) -> None:
    run_id = planned(runs, [10, 11, 12])
    runs.cancel("4")
    # A chunk still running writes after the cancel: its keys get the TTL too.
    runs.record_task(run_id, 10, "failed", "gone")
    runs.record_task(run_id, 11, "done", objects=1, boxes=1)
    runs.finish_chunk(run_id, 0)
    keys = list(runs.connection.scan_iter(f"stable-sam:convert:run:{run_id}*"))
    assert len(keys) == 7
    assert all(0 < runs.connection.ttl(k) <= runs.options.keep_s for k in keys)


def test_a_task_counts_once_per_run_and_a_failure_that_later_succeeds_counts_as_done(
    runs: Conversions,
) -> None:
    run_id = planned(runs, [10, 11, 12])
    assert runs.record_task(run_id, 10, "done", objects=2, boxes=4, boxes_skipped={"zero": 1})
    assert not runs.record_task(run_id, 10, "done", objects=2, boxes=4)  # a retried chunk
    runs.record_task(run_id, 11, "failed", "image not found")
    runs.record_task(run_id, 11, "done", objects=1, boxes=2)
    runs.record_task(run_id, 12, "skipped", "no rectangles")
    view = runs.status(run_id)
    assert (view["done"], view["failed"], view["skipped"], view["remaining"]) == (2, 0, 1, 0)
    assert (view["objects"], view["boxes"], view["boxes_skipped"]) == (3, 6, {"zero": 1})
    assert view["failed_tasks"] == []
    runs.record_task(run_id, 12, "failed", "x" * 2000)
    [failed] = runs.status(run_id)["failed_tasks"]
    assert failed["task"] == 12 and len(failed["reason"]) == 500
    with pytest.raises(ValueError):
        runs.record_task(run_id, 10, "maybe")


def test_the_last_chunk_to_end_ends_the_run(runs: Conversions) -> None:
    run_id = planned(runs, [10, 11, 12])
    assert not runs.finish_chunk(run_id, 0)
    assert not runs.finish_chunk(run_id, 0)  # again: still one of two
    assert runs.finish_chunk(run_id, 1)
    view = runs.status(run_id)
    assert view["state"] == "done" and view["finished_at"]
    assert runs.connection.ttl(f"stable-sam:convert:run:{run_id}") > 0


def test_a_run_whose_open_chunks_will_never_run_is_incomplete(runs: Conversions) -> None:
    run_id = planned(runs, [10, 11, 12])
    runs.finish_chunk(run_id, 0)
    assert runs.status(run_id)["state"] == "running"
    job = Job.fetch(chunk_job_id(run_id, 1), connection=runs.connection, serializer=SERIALIZER)
    job.set_status("failed")  # RQ gave up on it (retries spent, or abandoned on the last)
    view = runs.status(run_id)
    assert view["state"] == "incomplete" and view["chunks"]["lost"] == [1]
    assert not runs.is_active(run_id)  # written: its chunks still running stop
    runs.start("4", "v1")  # a new run may start


def test_a_run_whose_plan_job_is_gone_failed(runs: Conversions) -> None:
    view = runs.start("4", "v1")
    runs.connection.delete(Job.key_for(plan_job_id(view["run_id"])))
    assert runs.latest("4")["state"] == "failed"


def test_a_project_without_tasks_is_done_at_once(runs: Conversions) -> None:
    run_id = planned(runs, [])
    assert runs.status(run_id)["state"] == "done"


def test_the_config_check_names_what_a_conversion_leaves_out() -> None:
    [warning] = parse_label_config(BOX_CONFIG).box_conversion_warnings()
    assert "'Tree'" in warning and "skipped" in warning
    no_rectangles = BOX_CONFIG.replace("RectangleLabels", "PolygonLabels")
    with pytest.raises(LabelConfigError, match="no <RectangleLabels>"):
        parse_label_config(no_rectangles).box_conversion_warnings()
    no_mask = BOX_CONFIG.replace(
        '<Label value="Car"/></BrushLabels>', '<Label value="Bus"/></BrushLabels>'
    )
    with pytest.raises(LabelConfigError, match="no label"):
        parse_label_config(no_mask).box_conversion_warnings()


# --- the HTTP API ----------------------------------------------------------------------------


@pytest.fixture
def client(redis_url: str, conn: redis.Redis, tmp_path) -> TestClient:
    settings = Settings(
        redis_url=redis_url,
        convert_queue="convert-test",
        versions_dir=tmp_path / "versions",
        preload_model=False,
    )
    return TestClient(create_app(settings))


def test_post_convert_queues_a_run_and_status_shows_it(client: TestClient) -> None:
    answer = client.post("/convert", json={"project": 4, "chunk_tasks": 10})
    assert answer.status_code == 202, answer.text
    run = answer.json()
    assert run["state"] == "queued" and run["model_version"].startswith("stable-sam-")
    assert client.get("/convert/4").json()["run_id"] == run["run_id"]
    assert client.get("/status/4").json()["conversion"]["run_id"] == run["run_id"]
    assert [p["project"] for p in client.get("/status").json()["projects"]] == ["4"]
    busy = client.post("/convert", json={"project": 4})
    assert busy.status_code == 409 and busy.json()["run"]["run_id"] == run["run_id"]
    assert client.delete("/convert/4").json()["state"] == "cancelled"
    assert client.post("/convert", json={"project": 4}).status_code == 202


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        (b"{", 400, "JSON"),
        (b"[4]", 400, "JSON object"),
        (json.dumps({"project": "4; DROP"}).encode(), 400, "project"),
        (json.dumps({"project": 4, "chunk_tasks": 0}).encode(), 400, "chunk_tasks"),
        (json.dumps({"project": 4, "chunk_tasks": True}).encode(), 400, "chunk_tasks"),
        (json.dumps({"project": 4, "token": "s"}).encode(), 400, "unknown field"),
        (b" " * 5000, 413, "bytes"),
        (b" " * 10_000_000, 413, "bytes"),
    ],
)
def test_bad_convert_requests_get_a_clear_error(
    client: TestClient, body: bytes, status: int, names: str
) -> None:
    answer = client.post("/convert", content=body)
    assert answer.status_code == status, answer.text
    assert names in answer.json()["detail"] and answer.json()["error"]


def test_a_config_with_nothing_to_convert_is_refused_before_anything_is_queued(
    client: TestClient, runs: Conversions
) -> None:
    schema = BOX_CONFIG.replace("RectangleLabels", "KeyPointLabels")
    setup = client.post("/setup", json={"project": "4.1", "schema": schema})
    assert setup.status_code == 200, setup.text
    answer = client.post("/convert", json={"project": 4})
    assert answer.status_code == 422 and "RectangleLabels" in answer.json()["detail"]
    assert runs.latest("4") is None
    client.post("/setup", json={"project": "4.1", "schema": BOX_CONFIG})
    started = client.post("/convert", json={"project": 4}).json()
    assert "'Tree'" in started["config_warnings"][0]


def test_unknown_runs_and_bad_ids_answer_404_and_400(client: TestClient) -> None:
    assert client.get("/convert/9").status_code == 404
    assert client.delete("/convert/9").status_code == 404
    assert client.get("/convert/x9").status_code == 400


def test_convert_answers_503_when_redis_is_down(tmp_path) -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", preload_model=False,
                        versions_dir=tmp_path)  # fmt: skip
    answer = TestClient(create_app(settings)).post("/convert", json={"project": 4})
    assert answer.status_code == 503 and answer.json()["error"] == "queue_unavailable"


# --- the CLI ---------------------------------------------------------------------------------


def test_the_cli_starts_follows_and_cancels_a_run(
    redis_url: str, runs: Conversions, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("CONVERT_QUEUE", "convert-test")
    monkeypatch.setenv("VERSIONS_DIR", str(tmp_path))
    assert cli.main(["start", "--project", "4", "--chunk-tasks", "7"]) == 0
    started = json.loads(capsys.readouterr().out)
    assert started["state"] == "queued" and runs.run(started["run_id"])["chunk_tasks"] == "7"
    assert cli.main(["start", "--project", "4"]) == 2  # one active run per project
    assert "cancel it first" in capsys.readouterr().err
    assert cli.main(["cancel", "--project", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "cancelled"
    assert cli.main(["status", "--project", "4", "--wait"]) == 0
    assert cli.main(["status", "--project", "8"]) == 1
    with pytest.raises(SystemExit):
        cli.main(["start", "--project", "x"])


def test_chunk_sizes_are_bounded_once_for_the_api_the_cli_and_the_settings(
    runs: Conversions,
) -> None:
    from annotated_types import Le

    from runtime.queue.conversion import MAX_CHUNK_TASKS, InvalidChunkTasksError

    for bad in (0, MAX_CHUNK_TASKS + 1, True, "5", 2.0):
        with pytest.raises(InvalidChunkTasksError):
            runs.start("4", "v1", chunk_tasks=bad)
    bounds = Settings.model_fields["convert_chunk_tasks"].metadata
    assert Le(MAX_CHUNK_TASKS) in bounds
