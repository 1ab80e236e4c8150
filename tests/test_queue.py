"""runtime.queue: per-project coalescing of training triggers on a real Redis + RQ queue.

These tests drive the queue's decisions directly, through ``TrainingTriggers.handle_event`` as
the webhook does (the job's start is played by calling ``mark_started`` the way
``training.jobs`` does); tests/integration/ runs the same flows with a real ``rq worker``
process.
"""

from __future__ import annotations

import json
import logging
import threading
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus

from runtime.queue.access import LabelStudioAccess
from runtime.queue.connection import (
    MAX_TRANSACTION_ATTEMPTS,
    SERIALIZER,
    ContentionError,
    redis_connection,
    transaction,
)
from runtime.queue.jobs import JobOptions, mark_finished, mark_started, record_failure
from runtime.queue.state import state_key
from runtime.queue.status import TrainingStatus
from runtime.queue.triggers import START_TRAINING, TrainingPolicy, TrainingTriggers

pytestmark = pytest.mark.integration

QUEUE = "test-training"


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis_connection(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()


def make_queue(conn: redis.Redis, **policy: object) -> TrainingTriggers:
    return TrainingTriggers(
        conn,
        QUEUE,
        policy=TrainingPolicy(**policy),  # type: ignore[arg-type]
        job_options=JobOptions(retries=1, retry_intervals_s=()),
    )


def status_of(conn: redis.Redis) -> TrainingStatus:
    return TrainingStatus(conn, QUEUE)


def start(tq: TrainingTriggers, job_id: str, project: str = "7") -> Job:
    """Play an RQ worker taking ``job_id`` off the queue and the job marking itself started."""
    job = Job.fetch(job_id, connection=tq.connection, serializer=SERIALIZER)
    tq.queue.remove(job)
    job.set_status(JobStatus.STARTED)
    job.heartbeat(datetime.now(UTC), ttl=60)
    mark_started(job, project)
    return job


def test_first_trigger_enqueues_one_job(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    result = tq.handle_event("7", START_TRAINING)
    assert result.outcome == "enqueued"
    assert tq.queue.job_ids == [result.job_id]
    job = Job.fetch(result.job_id, connection=conn, serializer=SERIALIZER)
    assert job.func_name == "training.jobs.train_project"
    assert job.kwargs == {"project": "7"}
    assert job.meta["triggers"] == 1
    assert job.retries_left == 1
    assert job.timeout == 3600


def test_trigger_while_queued_merges_into_the_queued_job(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    first = tq.handle_event("7", START_TRAINING)
    second = tq.handle_event("7", START_TRAINING)
    assert second.outcome == "merged"
    assert second.job_id == first.job_id
    assert second.triggers == 2
    assert len(tq.queue) == 1
    meta = Job.fetch(first.job_id, connection=conn, serializer=SERIALIZER).get_meta()
    assert meta["triggers"] == 2
    assert meta["reasons"] == {"START_TRAINING": 2}


def test_trigger_while_running_creates_exactly_one_deferred_follow_up(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    running = start(tq, tq.handle_event("7", START_TRAINING).job_id)
    follow = tq.handle_event("7", START_TRAINING)
    assert follow.outcome == "follow_up"
    assert follow.job_id != running.id
    more = [tq.handle_event("7", START_TRAINING) for _ in range(5)]
    assert {r.outcome for r in more} == {"merged"}
    assert {r.job_id for r in more} == {follow.job_id}
    job = Job.fetch(follow.job_id, connection=conn, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.DEFERRED
    assert job.dependency_ids == [running.id]
    assert job.allow_dependency_failures
    assert job.get_meta()["triggers"] == 6
    assert len(tq.queue) == 0  # deferred until the running job ends


def test_follow_up_is_enqueued_when_the_running_job_fails(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    running = start(tq, tq.handle_event("7", START_TRAINING).job_id)
    follow = tq.handle_event("7", START_TRAINING)
    running.set_status(JobStatus.FAILED)
    tq.queue.enqueue_dependents(running)
    assert tq.queue.job_ids == [follow.job_id]


def test_a_failed_running_job_does_not_block_the_next_trigger(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    running = start(tq, tq.handle_event("7", START_TRAINING).job_id)
    running.set_status(JobStatus.FAILED)  # e.g. RQ cleaned up a SIGKILLed worker's job
    result = tq.handle_event("7", START_TRAINING)
    assert result.outcome == "enqueued"
    assert tq.queue.job_ids == [result.job_id]
    assert Job.fetch(result.job_id, connection=conn, serializer=SERIALIZER).dependency_ids == []


def test_a_vanished_queued_job_is_replaced_not_merged_into(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    first = tq.handle_event("7", START_TRAINING)
    Job.fetch(first.job_id, connection=conn, serializer=SERIALIZER).delete()
    second = tq.handle_event("7", START_TRAINING)
    assert second.outcome == "enqueued"
    assert second.job_id != first.job_id
    assert tq.queue.job_ids == [second.job_id]


def test_job_moves_from_queued_to_running_when_it_starts(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    job_id = tq.handle_event("7", START_TRAINING).job_id
    tq.handle_event("7", START_TRAINING)
    job = start(tq, job_id)
    state = conn.hgetall(state_key("7"))
    assert b"queued" not in state
    assert state[b"running"].decode() == job_id
    assert job.get_meta()["triggers"] == 2
    assert job.get_meta()["attempt"] == 1
    mark_finished(job, "7")
    assert b"running" not in conn.hgetall(state_key("7"))


def test_projects_coalesce_independently(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    a, b = tq.handle_event("7", START_TRAINING), tq.handle_event("8", START_TRAINING)
    assert a.outcome == b.outcome == "enqueued"
    assert a.job_id != b.job_id
    assert len(tq.queue) == 2
    assert status_of(conn).projects() == ["7", "8"]


def test_annotation_events_are_ignored_when_training_on_start_training_only(
    conn: redis.Redis,
) -> None:
    tq = make_queue(conn, train_on="start_training")
    for action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"):
        assert tq.handle_event("7", action).outcome == "ignored"
    assert len(tq.queue) == 0


def test_annotation_events_train_after_min_new_annotations(conn: redis.Redis) -> None:
    tq = make_queue(conn, train_on="annotations", min_new_annotations=3)
    outcomes = [tq.handle_event("7", "ANNOTATION_CREATED").outcome for _ in range(3)]
    assert outcomes == ["counted", "counted", "enqueued"]
    assert len(tq.queue) == 1
    # The counter restarts after an enqueue.
    assert tq.handle_event("7", "ANNOTATION_UPDATED").new_annotations == 1


def test_other_actions_are_acknowledged_and_ignored(conn: redis.Redis) -> None:
    tq = make_queue(conn, train_on="annotations")
    for action in ("TASKS_CREATED", "PROJECT_UPDATED", "SOMETHING_NEW"):
        assert tq.handle_event("7", action).outcome == "ignored"
    assert len(tq.queue) == 0


def test_concurrent_triggers_give_one_job_and_count_every_trigger(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    results = []
    barrier = threading.Barrier(20)

    def fire() -> None:
        barrier.wait()
        for _ in range(5):
            results.append(tq.handle_event("7", START_TRAINING))

    threads = [threading.Thread(target=fire) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 100
    assert len({r.job_id for r in results}) == 1
    assert sorted(r.outcome for r in results).count("enqueued") == 1
    assert (
        Job.fetch(results[0].job_id, connection=conn, serializer=SERIALIZER).get_meta()["triggers"]
        == 100
    )
    assert len(tq.queue) == 1


def test_status_reports_queued_running_and_recorded_failure(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    running = start(tq, tq.handle_event("7", START_TRAINING).job_id)
    follow = tq.handle_event("7", START_TRAINING)
    record_failure(running, "7", "RuntimeError: no annotated tasks")
    status = status_of(conn).status("7")
    assert status["running"]["job_id"] == running.id
    assert status["queued"]["job_id"] == follow.job_id
    assert status["queued"]["status"] == "deferred"
    assert status["last_failure"]["error"] == "RuntimeError: no annotated tasks"
    assert status_of(conn).status("99") == {
        "project": "99",
        "queued": None,
        "running": None,
        "pending_annotations": 0,
        "last_run": None,
        "last_failure": None,
    }


def test_label_studio_token_is_kept_out_of_the_job(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    access = LabelStudioAccess(conn, QUEUE)
    access.store("7", "http://ls:8080", "secret-token-123")
    job_id = tq.handle_event("7", START_TRAINING).job_id
    raw_job = conn.hgetall(Job.key_for(job_id))
    assert b"secret-token-123" not in b"".join(raw_job.values())
    assert "secret-token-123" not in repr(json.loads(raw_job[b"meta"]))
    assert access.of_project("7") == ("http://ls:8080", "secret-token-123")


def test_unreachable_redis_fails_fast(redis_url: str) -> None:
    tq = TrainingTriggers(redis_connection("redis://127.0.0.1:1/0"), QUEUE)
    with pytest.raises(redis.ConnectionError):
        tq.handle_event("7", START_TRAINING)
    assert Queue(QUEUE, connection=redis_connection(redis_url)).count == 0


def test_attempts_are_counted_even_when_rq_resaves_the_dequeued_meta(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    job = start(tq, tq.handle_event("7", START_TRAINING).job_id)
    stale = Job.fetch(job.id, connection=conn, serializer=SERIALIZER)
    stale.meta = {"project": "7", "triggers": 1}  # what RQ's retry writes back
    stale.save()
    mark_started(stale, "7")
    assert Job.fetch(job.id, connection=conn, serializer=SERIALIZER).get_meta()["attempt"] == 2


def test_jobs_are_stored_as_json_never_as_pickles(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    job_id = tq.handle_event("7", START_TRAINING).job_id
    raw = conn.hgetall(Job.key_for(job_id))
    assert json.loads(zlib.decompress(raw[b"data"])) == [
        "training.jobs.train_project",
        None,
        [],
        {"project": "7"},
    ]
    assert json.loads(raw[b"meta"]) == {
        "project": "7",
        "triggers": 1,
        "reasons": {"START_TRAINING": 1},
    }


def queue_a_job_whose_meta_is_not_json(tq: TrainingTriggers) -> str:
    job_id = tq.handle_event("7", START_TRAINING).job_id
    tq.connection.hset(Job.key_for(job_id), "meta", b"\x80\x04not json")
    return job_id


def test_a_job_meta_that_is_not_json_is_read_as_empty_and_logged(
    conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    tq = make_queue(conn)
    job_id = queue_a_job_whose_meta_is_not_json(tq)
    with caplog.at_level(logging.WARNING, logger="runtime.queue"):
        assert status_of(conn).status("7")["queued"]["triggers"] == 1
        merged = tq.handle_event("7", START_TRAINING)
    assert merged.outcome == "merged" and merged.triggers == 2
    assert Job.fetch(job_id, connection=conn, serializer=SERIALIZER).get_meta()["triggers"] == 2
    assert f"job {job_id}: meta is not a JSON object, read as empty" in caplog.text


def test_status_tells_a_running_job_from_one_whose_heartbeat_stopped(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    job = start(tq, tq.handle_event("7", START_TRAINING).job_id)
    status = status_of(conn)
    running = status.status("7")["running"]
    assert running["state"] == "running"
    assert 0 <= running["heartbeat_age_s"] < status.stuck_after_s
    job.heartbeat(datetime.now(UTC) - timedelta(seconds=status.stuck_after_s + 30), ttl=60)
    stuck = status.status("7")["running"]
    assert stuck["state"] == "stuck"
    assert stuck["heartbeat_age_s"] >= status.stuck_after_s + 30
    assert stuck["job_id"] == job.id and stuck["status"] == "started"


def test_status_shows_a_job_between_attempts_as_retry_pending(conn: redis.Redis) -> None:
    tq = make_queue(conn)
    job = start(tq, tq.handle_event("7", START_TRAINING).job_id)
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=30)
    tq.queue.schedule_job(job, at)
    running = status_of(conn).status("7")["running"]
    assert running["state"] == "retry_pending"
    assert running["retry_at"] == at.isoformat()


def interrupted_body(
    redis_url: str, interruptions: int
) -> tuple[Callable[[redis.client.Pipeline], int], list[int]]:
    """A transaction body that another client interrupts on its first ``interruptions``
    attempts (a write to the watched key after the WATCH), and the list of its attempts."""
    other = redis_connection(redis_url)
    attempts: list[int] = []

    def body(pipe: redis.client.Pipeline) -> int:
        attempts.append(len(attempts) + 1)
        if len(attempts) <= interruptions:
            other.incr("contended")
        value = int(pipe.get("contended") or 0)
        pipe.multi()
        pipe.set("written", value)
        return value

    return body, attempts


def test_a_transaction_interrupted_every_time_gives_up_after_max_attempts(
    conn: redis.Redis, redis_url: str
) -> None:
    body, attempts = interrupted_body(redis_url, MAX_TRANSACTION_ATTEMPTS + 10)
    with pytest.raises(ContentionError, match="the contended key"):
        transaction(conn, ["contended"], body, "the contended key")
    assert len(attempts) == MAX_TRANSACTION_ATTEMPTS
    assert conn.get("written") is None


def test_a_transaction_retries_until_its_watched_key_stays_unchanged(
    conn: redis.Redis, redis_url: str
) -> None:
    body, attempts = interrupted_body(redis_url, 2)
    value, results = transaction(conn, ["contended"], body, "the contended key")
    assert len(attempts) == 3
    assert value == 2 and results == [True]
    assert conn.get("written") == b"2"


def test_a_job_whose_meta_is_not_json_still_starts(
    conn: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    tq = make_queue(conn)
    job_id = queue_a_job_whose_meta_is_not_json(tq)
    with caplog.at_level(logging.WARNING, logger="runtime.queue"):
        job = start(tq, job_id)
    meta = Job.fetch(job.id, connection=conn, serializer=SERIALIZER).get_meta()
    assert meta["triggers"] == 1 and meta["attempt"] == 1
    assert f"job {job_id}: meta is not a JSON object, read as empty" in caplog.text
