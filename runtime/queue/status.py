"""What ``/status`` shows of a project's training: queued and running job, progress, last run,
last failure (the web process; reads only)."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis
from rq import Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from runtime.queue.connection import MALFORMED, SERIALIZER, redis_connection, training_queue
from runtime.queue.jobs import RUNNING, WILL_RUN, read_meta
from runtime.queue.state import history_key, projects_key, read_state

if TYPE_CHECKING:
    from runtime.settings import Settings

logger = logging.getLogger(__name__)


class TrainingStatus:
    """The training status of the projects of one queue.

    ``stuck_after_s``: how old a started job's heartbeat may be before the job is called stuck
    (the worker's TRAIN_STUCK_AFTER_S, after which RQ treats the job as abandoned).
    """

    def __init__(
        self,
        connection: redis.Redis,
        queue_name: str = "stable-sam-training",
        stuck_after_s: float = 30.0,
    ) -> None:
        self.connection = connection
        self.queue = training_queue(connection, queue_name)
        self.stuck_after_s = stuck_after_s

    @classmethod
    def from_settings(
        cls, settings: Settings, connection: redis.Redis | None = None
    ) -> TrainingStatus:
        """The status of TRAINING_QUEUE on REDIS_URL (``connection``, else a new one with short
        timeouts), with TRAIN_STUCK_AFTER_S."""
        return cls(
            connection or redis_connection(settings.redis_url),
            settings.training_queue,
            stuck_after_s=settings.train_stuck_after_s,
        )

    def projects(self) -> list[str]:
        """Projects that ever had a trigger, in numeric order."""
        members = self.connection.smembers(projects_key())
        return sorted((m.decode() for m in members), key=lambda p: (len(p), p))

    def status(self, project: str) -> dict[str, Any]:
        """Queued/running job, progress, last run and last failure of ``project``."""
        state = read_state(self.connection, project)
        history = [h.decode() for h in self.connection.lrange(history_key(project), 0, -1)]
        jobs = {
            job.id: job
            for job in Job.fetch_many(history, connection=self.connection, serializer=SERIALIZER)
            if job is not None
        }

        def alive(job_id: str | None, statuses: frozenset[JobStatus]) -> Job | None:
            job = jobs.get(job_id or "") or self._fetch(job_id)
            return job if job is not None and job.get_status(refresh=False) in statuses else None

        queued = alive(state.get("queued"), WILL_RUN)
        running = alive(state.get("running"), RUNNING)
        last_run = next(
            (
                jobs[j]
                for j in history
                if j in jobs and jobs[j].get_status(refresh=False) == JobStatus.FINISHED
            ),
            None,
        )
        return {
            "project": project,
            "queued": self._describe(queued) if queued else None,
            "running": {**self._describe(running), **self._liveness(running)} if running else None,
            "pending_annotations": int(state.get("pending_annotations", 0)),
            "last_run": self._describe(last_run) if last_run else None,
            "last_failure": self._last_failure(state, history, jobs),
        }

    def _describe(self, job: Job) -> dict[str, Any]:
        """A JSON view of a training job: ids, times, triggers, progress, report (no arguments)."""
        meta = read_meta(self.connection, job.id)
        info: dict[str, Any] = {
            "job_id": job.id,
            "status": str(job.get_status(refresh=False).value),
            "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "ended_at": job.ended_at.isoformat() if job.ended_at else None,
            "triggers": meta.get("triggers", 1),
            "reasons": meta.get("reasons", {}),
            "attempt": meta.get("attempt", 0),
        }
        for key in ("progress", "training", "report"):
            if key in meta:
                info[key] = meta[key]
        return info

    def _liveness(self, job: Job) -> dict[str, Any]:
        """How the job in the running slot is doing: ``state`` "running"; "stuck" (started, but
        its heartbeat is older than ``stuck_after_s`` or its worker is gone: RQ will retry or
        fail it); or "retry_pending" (between attempts, with ``retry_at`` when scheduled)."""
        status = job.get_status(refresh=False)
        if status != JobStatus.STARTED:
            retry_at = None
            if status == JobStatus.SCHEDULED:
                with contextlib.suppress(NoSuchJobError):
                    retry_at = self.queue.scheduled_job_registry.get_scheduled_time(job.id)
            return {
                "state": "retry_pending",
                "retry_at": retry_at.isoformat() if retry_at else None,
            }
        beat = job.last_heartbeat or job.started_at
        age_s = (datetime.now(UTC) - beat).total_seconds() if beat else None
        worker_gone = bool(job.worker_name) and not self.connection.exists(
            Worker.redis_worker_namespace_prefix + job.worker_name
        )
        stuck = age_s is None or age_s > self.stuck_after_s or worker_gone
        return {
            "state": "stuck" if stuck else "running",
            "heartbeat_age_s": round(age_s, 1) if age_s is not None else None,
            "worker": job.worker_name,
        }

    def _fetch(self, job_id: str | None) -> Job | None:
        if not job_id:
            return None
        jobs = Job.fetch_many([job_id], connection=self.connection, serializer=SERIALIZER)
        return jobs[0] if jobs else None

    def _last_failure(
        self, state: dict[str, str], history: list[str], jobs: dict[str, Job]
    ) -> dict[str, Any] | None:
        """The newest failure: a job RQ gave up on, or an attempt the job itself recorded."""
        candidates: list[dict[str, Any]] = []
        for job_id in history:
            job = jobs.get(job_id)
            if job is None or job.get_status(refresh=False) != JobStatus.FAILED:
                continue
            try:
                result = job.latest_result()
            except MALFORMED:
                logger.warning("job %s: its stored result is unreadable, ignored", job_id)
                result = None
            error = (result.exc_string or "").strip() if result is not None else ""
            ended = job.ended_at or (result.created_at if result is not None else None)
            candidates.append(
                {
                    "job_id": job_id,
                    "ended_at": ended.astimezone(UTC).isoformat() if ended else None,
                    "error": error.splitlines()[-1] if error else "failed",
                }
            )
            break
        if state.get("last_failure_job"):
            candidates.append(
                {
                    "job_id": state["last_failure_job"],
                    "ended_at": state.get("last_failure_at"),
                    "error": state.get("last_failure_error", ""),
                }
            )
        if not candidates:
            return None
        return max(candidates, key=lambda c: c["ended_at"] or "")
