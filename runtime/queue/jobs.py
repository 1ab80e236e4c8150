"""A training job's life: how it is enqueued, and the bookkeeping the job does itself.

Job ids are ``train-<project>-<uuid4 hex>``: unique, and greppable per project. The job moves
itself from the project's ``queued`` slot to ``running`` (``mark_started``, a transaction on
the state hash the triggers use) *before* it reads any annotation, so a trigger either lands in
a job that has not looked at the data yet, or creates the follow-up; none is lost.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from redis.client import Pipeline
from rq import Retry
from rq.job import Job, JobStatus

from runtime.queue.connection import MALFORMED, SERIALIZER, transaction
from runtime.queue.state import attempts_key, read_state, state_key

logger = logging.getLogger(__name__)

JOB_FUNCTION = "training.jobs.train_project"
DEFAULT_FAILURE_TTL_S = 30 * 24 * 3600

# RQ statuses in which a recorded job will still run (or is running).
WILL_RUN = frozenset({JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED})
# ... and in which the job in the running slot still counts (queued/scheduled: a retry).
RUNNING = frozenset({JobStatus.STARTED, JobStatus.QUEUED, JobStatus.SCHEDULED})


@dataclass
class JobOptions:
    """How training jobs are enqueued: RQ timeout, retry policy and result lifetimes (s)."""

    timeout_s: int = 3600
    retries: int = 2
    retry_intervals_s: Sequence[int] = (30, 120)
    result_ttl_s: int = 7 * 24 * 3600
    failure_ttl_s: int = DEFAULT_FAILURE_TTL_S

    def retry(self) -> Retry | None:
        if self.retries <= 0:
            return None
        return Retry(max=self.retries, interval=list(self.retry_intervals_s) or 0)


def new_job_id(project: str) -> str:
    return f"train-{project}-{uuid.uuid4().hex}"


def read_meta(client: redis.Redis | Pipeline, job_id: str) -> dict[str, Any]:
    """The stored ``meta`` of job ``job_id``: ``{}`` when it has none, and ``{}`` (logged)
    when the stored value is not a JSON object."""
    raw = client.hget(Job.key_for(job_id), "meta")
    if not raw:
        return {}
    try:
        meta = SERIALIZER.loads(raw)
    except MALFORMED:
        meta = None
    if not isinstance(meta, dict):
        logger.warning("job %s: meta is not a JSON object, read as empty", job_id)
        return {}
    return meta


def mark_started(job: Job, project: str) -> int:
    """Move ``job`` from queued to running for ``project``; return its trigger count.

    Call this from the job before it reads any annotation: triggers that arrive after it
    create the follow-up run instead of merging into this one. Also counts the attempt in
    ``job.meta["attempt"]`` (RQ retries re-run the same job id). The count lives in its own
    Redis key: RQ re-saves a retried job with the meta it had when it was dequeued.
    """
    key = state_key(project)
    attempts = attempts_key(job.id)

    def move(pipe: Pipeline) -> int:
        state = read_state(pipe, project)
        queued_here = state.get("queued") == job.id
        triggers = int(state.get("queued_triggers" if queued_here else "running_triggers", 1))
        if not queued_here and state.get("running") not in (None, job.id):
            logger.warning(
                "project %s: job %s starts while %s is recorded as running",
                project,
                job.id,
                state.get("running"),
            )
        pipe.multi()
        if queued_here:
            pipe.hdel(key, "queued", "queued_triggers")
        pipe.hset(key, mapping={"running": job.id, "running_triggers": triggers})
        pipe.incr(attempts)
        pipe.expire(attempts, job.failure_ttl or DEFAULT_FAILURE_TTL_S)
        return triggers

    triggers, results = transaction(
        job.connection, [key], move, f"project {project}: starting job {job.id}"
    )
    meta = read_meta(job.connection, job.id)
    meta.update(
        triggers=triggers,
        attempt=int(results[-2]),
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    job.meta = meta
    job.save_meta()
    logger.info("project %s: job %s started (attempt %d)", project, job.id, meta["attempt"])
    return triggers


def mark_finished(job: Job, project: str) -> None:
    """Clear ``job`` as the running job of ``project`` (call when the run has ended)."""
    key = state_key(project)

    def clear(pipe: Pipeline) -> None:
        running = pipe.hget(key, "running")
        pipe.multi()
        if running is not None and running.decode() == job.id:
            pipe.hdel(key, "running", "running_triggers")
        pipe.hset(key, "last_finished", job.id)

    transaction(job.connection, [key], clear, f"project {project}: finishing job {job.id}")


def record_failure(job: Job, project: str, error: str) -> None:
    """Remember the last failed attempt of ``project`` (shown by the status)."""
    job.connection.hset(
        state_key(project),
        mapping={
            "last_failure_job": job.id,
            "last_failure_error": error[:2000],
            "last_failure_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
