"""Label Studio training triggers -> an RQ queue, with per-project coalescing.

Label Studio sends ``START_TRAINING`` and annotation events with a 1 s timeout and no retry
(DESIGN §3), often several back to back. The web process therefore only records the trigger
in Redis and returns; an ``rq worker`` runs ``training.jobs.train_project``.

Coalescing, per project (the invariant: at most one queued and one running job):

- no job queued, none running          -> enqueue a new job;
- a job queued (not yet started)       -> merge into it: its ``meta["triggers"]`` grows;
- a job running, none queued           -> enqueue exactly one follow-up job that RQ defers
                                          until the running one ends (an RQ dependency with
                                          ``allow_failure``, so a failed run still lets the
                                          follow-up run);
- both                                 -> merge into the queued follow-up.

A new job (enqueued or follow-up) needs room: at most ``max_queued_jobs``
(MAX_QUEUED_TRAINING_JOBS) jobs wait in the queue (queued or deferred) at once; past that a
trigger that would create one raises ``QueueFullError`` (merging into a queued job still
works), so a flood of triggers for distinct projects cannot fill Redis.

The per-project state is a Redis hash (``queued``, ``running`` job ids). Every decision is one
WATCH/MULTI transaction over that hash, and the job moves itself from ``queued`` to ``running``
(``mark_started``) in a transaction on the same hash *before* it reads any annotation. So a
trigger either lands in a job that has not looked at the data yet, or creates the follow-up;
none is lost. Whether a recorded job is still alive is read from RQ's own job status, so a job
that RQ failed, finished or gave up on (a SIGKILLed worker, cleaned up by RQ's
``StartedJobRegistry``) never blocks the next trigger.

Job ids are ``train-<project>-<uuid4 hex>``: unique, and greppable per project. Tokens never go
into job arguments (they are visible in RQ dashboards): the Label Studio access a job needs is
kept in a separate Redis hash (``store_label_studio_access``).

Jobs are stored as JSON (``SERIALIZER``, RQ's ``JSONSerializer``), never as pickles: the web
process reads job metadata and results, and unpickling a value written into Redis runs code. The
worker (``training.worker``) uses the same serializer. A stored value that is not valid JSON is
logged and read as empty; it never fails a webhook or ``/status``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import redis
from redis.backoff import NoBackoff
from redis.exceptions import WatchError
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Dependency, Job, JobStatus
from rq.serializers import JSONSerializer

if TYPE_CHECKING:
    from runtime.settings import Settings

logger = logging.getLogger(__name__)

JOB_FUNCTION = "training.jobs.train_project"
KEY_PREFIX = "stable-sam:training"
ACCESS_PREFIX = "stable-sam:ls-access"
HISTORY_LENGTH = 20
MAX_TRANSACTION_ATTEMPTS = 50
LOCK_TIMEOUT_S = 2.0
# Below max_queued_jobs minus this many, a trigger reads the queue's length without WATCHing it
# (triggers of distinct projects would abort each other's transactions); from there on the
# length is WATCHed, so the bound is exact unless this many new jobs commit concurrently.
QUEUE_FULL_WATCH_MARGIN = 64

# How every job of this project is stored in Redis (Queue, Job.fetch*, the worker).
SERIALIZER = JSONSerializer
# What reading a malformed stored value (not JSON, not base64/zlib, missing fields) raises.
_MALFORMED = (ValueError, TypeError, KeyError, RecursionError, zlib.error)

# Label Studio webhook actions.
START_TRAINING = "START_TRAINING"
ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"})

# RQ statuses in which a recorded job will still run (or is running).
_WILL_RUN = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED}
_RUNNING = {JobStatus.STARTED, JobStatus.QUEUED, JobStatus.SCHEDULED}  # queued/scheduled: a retry

TrainOn = Literal["start_training", "annotations"]
Outcome = Literal["enqueued", "merged", "follow_up", "counted", "ignored"]


def redis_connection(
    url: str, connect_timeout_s: float = 0.25, socket_timeout_s: float = 1.0
) -> redis.Redis:
    """A Redis client with short timeouts and no retries, for request handlers.

    A webhook must answer within Label Studio's 1 s timeout even when Redis is down, so a
    refused or hanging connection fails fast (``redis.ConnectionError`` / ``TimeoutError``).
    """
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=socket_timeout_s,
        retry=RedisRetry(NoBackoff(), 0),
    )


class QueueFullError(Exception):
    """A trigger would create a job while ``max_queued_jobs`` jobs wait already."""

    def __init__(self, project: str, limit: int) -> None:
        super().__init__(f"project {project}: {limit} training jobs are queued already")
        self.project = project
        self.limit = limit


@dataclass(frozen=True)
class TrainingPolicy:
    """When annotation events start training.

    ``train_on="start_training"``: only ``START_TRAINING`` (the button, or "train on annotation
    submit") enqueues. ``"annotations"``: annotation created/updated/deleted events count too,
    and every ``min_new_annotations``-th one since the last enqueue triggers a run.
    """

    train_on: TrainOn = "start_training"
    min_new_annotations: int = 1

    def __post_init__(self) -> None:
        if self.train_on not in ("start_training", "annotations"):
            raise ValueError(
                f"train_on must be 'start_training' or 'annotations', not {self.train_on!r}"
            )
        if self.min_new_annotations < 1:
            raise ValueError("min_new_annotations must be >= 1")


@dataclass(frozen=True)
class TriggerResult:
    """What one webhook did to the queue. ``job_id`` is the job that will cover the trigger."""

    outcome: Outcome
    project: str
    job_id: str | None = None
    triggers: int = 0
    new_annotations: int = 0
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"status": self.outcome, "project": self.project}
        if self.job_id is not None:
            result["job_id"] = self.job_id
            result["triggers"] = self.triggers
        if self.outcome == "counted":
            result["new_annotations"] = self.new_annotations
        if self.detail:
            result["detail"] = self.detail
        return result


@dataclass
class JobOptions:
    """How training jobs are enqueued: RQ timeout, retry policy and result lifetimes (s)."""

    timeout_s: int = 3600
    retries: int = 2
    retry_intervals_s: Sequence[int] = (30, 120)
    result_ttl_s: int = 7 * 24 * 3600
    failure_ttl_s: int = 30 * 24 * 3600

    def retry(self) -> Retry | None:
        if self.retries <= 0:
            return None
        return Retry(max=self.retries, interval=list(self.retry_intervals_s) or 0)


class TrainingQueue:
    """The training queue of every project: triggers, the job's start/end bookkeeping, status.

    ``connection`` is any Redis client (the web app's has short timeouts, see
    ``redis_connection``); ``queue_name`` the RQ queue the worker listens on; ``stuck_after_s``
    how old a started job's heartbeat may be before ``status`` calls the job stuck (the
    worker's TRAIN_STUCK_AFTER_S, after which RQ treats the job as abandoned);
    ``max_queued_jobs`` how many jobs may wait in the queue (queued or deferred) at once
    (MAX_QUEUED_TRAINING_JOBS).
    """

    def __init__(
        self,
        connection: redis.Redis,
        queue_name: str = "stable-sam-training",
        policy: TrainingPolicy | None = None,
        job_options: JobOptions | None = None,
        stuck_after_s: float = 30.0,
        max_queued_jobs: int = 100,
    ) -> None:
        if max_queued_jobs < 1:
            raise ValueError("max_queued_jobs must be >= 1")
        self.connection = connection
        self.queue = Queue(queue_name, connection=connection, serializer=SERIALIZER)
        self.policy = policy or TrainingPolicy()
        self.job_options = job_options or JobOptions()
        self.stuck_after_s = stuck_after_s
        self.max_queued_jobs = max_queued_jobs

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainingQueue:
        """The queue described by ``settings``: REDIS_URL (short timeouts), TRAINING_QUEUE,
        TRAIN_ON / MIN_NEW_ANNOTATIONS, the job options (timeout, retries),
        TRAIN_STUCK_AFTER_S and MAX_QUEUED_TRAINING_JOBS."""
        return cls(
            redis_connection(settings.redis_url),
            settings.training_queue,
            policy=TrainingPolicy(settings.train_on, settings.min_new_annotations),
            job_options=JobOptions(
                timeout_s=settings.train_job_timeout_s,
                retries=settings.train_retries,
                retry_intervals_s=tuple(settings.train_retry_intervals_s),
            ),
            stuck_after_s=settings.train_stuck_after_s,
            max_queued_jobs=settings.max_queued_training_jobs,
        )

    # --- keys ------------------------------------------------------------------------------

    @staticmethod
    def state_key(project: str) -> str:
        return f"{KEY_PREFIX}:{project}"

    @staticmethod
    def history_key(project: str) -> str:
        return f"{KEY_PREFIX}:{project}:jobs"

    @staticmethod
    def projects_key() -> str:
        return f"{KEY_PREFIX}:projects"

    # --- triggers (web process) ----------------------------------------------------------

    def handle_event(self, project: str, action: str) -> TriggerResult:
        """Apply the policy to one Label Studio webhook ``action`` for ``project``."""
        if action == START_TRAINING:
            return self._transact(project, action, count_annotation=False)
        if action in ANNOTATION_ACTIONS:
            if self.policy.train_on != "annotations":
                return TriggerResult(
                    "ignored",
                    project,
                    detail="annotation events do not train (TRAIN_ON=start_training)",
                )
            return self._transact(project, action, count_annotation=True)
        return TriggerResult("ignored", project, detail=f"action {action} does not train")

    def trigger(self, project: str, reason: str = START_TRAINING) -> TriggerResult:
        """Request a training run of ``project`` now (coalesced with queued/running ones)."""
        return self._transact(project, reason, count_annotation=False)

    def _transact(self, project: str, reason: str, count_annotation: bool) -> TriggerResult:
        state_key = self.state_key(project)
        # Triggers of one project take turns (a short Redis lock) so that a burst does not
        # starve in WATCH retries; WATCH still guards against the job's own state changes.
        lock = self.connection.lock(
            f"{state_key}:lock",
            timeout=LOCK_TIMEOUT_S,
            blocking_timeout=LOCK_TIMEOUT_S,
            sleep=0.002,
        )
        with lock, self.connection.pipeline() as pipe:
            for _ in range(MAX_TRANSACTION_ATTEMPTS):
                try:
                    pipe.watch(state_key)
                    result = self._decide(pipe, project, reason, count_annotation)
                    pipe.execute()
                except WatchError:
                    continue
                logger.info(
                    "project %s: %s -> %s (job %s, triggers %d)",
                    project,
                    reason,
                    result.outcome,
                    result.job_id,
                    result.triggers,
                )
                return result
        raise RuntimeError(f"project {project}: too much contention on the training queue state")

    def _decide(
        self, pipe: redis.client.Pipeline, project: str, reason: str, count_annotation: bool
    ) -> TriggerResult:
        """Read the state (pipe is WATCHing it) and queue the writes (leaves pipe in MULTI)."""
        state_key = self.state_key(project)
        raw = pipe.hgetall(state_key)
        state = {k.decode(): v.decode() for k, v in raw.items()}

        if count_annotation:
            pending = int(state.get("pending_annotations", 0)) + 1
            if pending < self.policy.min_new_annotations:
                pipe.multi()
                pipe.hset(state_key, "pending_annotations", pending)
                pipe.sadd(self.projects_key(), project)
                return TriggerResult("counted", project, new_annotations=pending)

        queued_id = state.get("queued")
        if queued_id and self._status(pipe, queued_id) in _WILL_RUN:
            triggers = int(state.get("queued_triggers", 1)) + 1
            meta = self._read_meta(pipe, queued_id)
            reasons = meta.get("reasons")
            reasons = dict(reasons) if isinstance(reasons, dict) else {}
            count = reasons.get(reason, 0)
            reasons[reason] = (count if isinstance(count, int) else 0) + 1
            meta.update(triggers=triggers, reasons=reasons)
            pipe.multi()
            pipe.hset(state_key, mapping={"queued_triggers": triggers, "pending_annotations": 0})
            pipe.hset(Job.key_for(queued_id), "meta", self.queue.serializer.dumps(meta))
            return TriggerResult("merged", project, queued_id, triggers)

        self._check_room(pipe, project)
        running_id = state.get("running")
        running_alive = bool(running_id) and self._status(pipe, running_id) in _RUNNING
        job = self.queue.create_job(
            JOB_FUNCTION,
            kwargs={"project": project},
            job_id=f"train-{project}-{uuid.uuid4().hex}",
            description=f"train Stable-SAM plugins of project {project}",
            timeout=self.job_options.timeout_s,
            result_ttl=self.job_options.result_ttl_s,
            failure_ttl=self.job_options.failure_ttl_s,
            retry=self.job_options.retry(),
            depends_on=(
                Dependency(jobs=[running_id], allow_failure=True) if running_alive else None
            ),
            meta={"project": project, "triggers": 1, "reasons": {reason: 1}},
        )
        # RQ adds its own WATCHes (the dependency's status) and switches the pipe to MULTI.
        self.queue.enqueue_job(job, pipeline=pipe)
        if not pipe.explicit_transaction:
            pipe.multi()
        pipe.hset(
            state_key, mapping={"queued": job.id, "queued_triggers": 1, "pending_annotations": 0}
        )
        if running_id and not running_alive:
            pipe.hdel(state_key, "running", "running_triggers")
        pipe.sadd(self.projects_key(), project)
        pipe.lpush(self.history_key(project), job.id)
        pipe.ltrim(self.history_key(project), 0, HISTORY_LENGTH - 1)
        return TriggerResult("follow_up" if running_alive else "enqueued", project, job.id, 1)

    def _check_room(self, pipe: redis.client.Pipeline, project: str) -> None:
        """Raise ``QueueFullError`` when ``max_queued_jobs`` jobs wait (queued or deferred); near
        the limit, WATCH what was counted, so that concurrent triggers cannot both take the
        last place."""
        keys = (self.queue.key, self.queue.deferred_job_registry.key)

        def waiting() -> int:
            return int(pipe.llen(keys[0])) + int(pipe.zcard(keys[1]))

        count = waiting()
        if count + QUEUE_FULL_WATCH_MARGIN >= self.max_queued_jobs:
            pipe.watch(*keys)
            count = waiting()
        if count >= self.max_queued_jobs:
            raise QueueFullError(project, self.max_queued_jobs)

    def _status(self, pipe: redis.client.Pipeline, job_id: str) -> JobStatus | None:
        job_key = Job.key_for(job_id)
        pipe.watch(job_key)
        status = pipe.hget(job_key, "status")
        return JobStatus(status.decode()) if status else None

    def _read_meta(self, pipe: redis.client.Pipeline, job_id: str) -> dict[str, Any]:
        raw = pipe.hget(Job.key_for(job_id), "meta")
        if not raw:
            return {}
        try:
            meta = self.queue.serializer.loads(raw)
        except _MALFORMED:
            meta = None
        if not isinstance(meta, dict):
            logger.warning("job %s: meta is not a JSON object, read as empty", job_id)
            return {}
        return meta

    # --- the job's own bookkeeping (worker process) --------------------------------------

    def mark_started(self, job: Job, project: str) -> int:
        """Move ``job`` from queued to running for ``project``; return its trigger count.

        Call this from the job before it reads any annotation: triggers that arrive after it
        create the follow-up run instead of merging into this one. Also counts the attempt in
        ``job.meta["attempt"]`` (RQ retries re-run the same job id). The count lives in its own
        Redis key: RQ re-saves a retried job with the meta it had when it was dequeued.
        """
        state_key = self.state_key(project)
        attempt_key = f"{KEY_PREFIX}:attempts:{job.id}"
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(state_key)
                    raw = pipe.hgetall(state_key)
                    state = {k.decode(): v.decode() for k, v in raw.items()}
                    triggers = int(state.get("running_triggers", 1))
                    if state.get("queued") == job.id:
                        triggers = int(state.get("queued_triggers", 1))
                    elif state.get("running") not in (None, job.id):
                        logger.warning(
                            "project %s: job %s starts while %s is recorded as running",
                            project,
                            job.id,
                            state.get("running"),
                        )
                    pipe.multi()
                    if state.get("queued") == job.id:
                        pipe.hdel(state_key, "queued", "queued_triggers")
                    pipe.hset(state_key, mapping={"running": job.id, "running_triggers": triggers})
                    pipe.incr(attempt_key)
                    pipe.expire(attempt_key, self.job_options.failure_ttl_s)
                    attempt = int(pipe.execute()[-2])
                    break
                except WatchError:
                    continue
        meta = job.get_meta(refresh=True)
        meta.update(
            triggers=triggers,
            attempt=attempt,
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        job.meta = meta
        job.save_meta()
        logger.info("project %s: job %s started (attempt %d)", project, job.id, meta["attempt"])
        return triggers

    def mark_finished(self, job: Job, project: str) -> None:
        """Clear ``job`` as the running job of ``project`` (call when the run has ended)."""
        state_key = self.state_key(project)
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(state_key)
                    running = pipe.hget(state_key, "running")
                    pipe.multi()
                    if running is not None and running.decode() == job.id:
                        pipe.hdel(state_key, "running", "running_triggers")
                    pipe.hset(state_key, "last_finished", job.id)
                    pipe.execute()
                    return
                except WatchError:
                    continue

    def record_failure(self, job: Job, project: str, error: str) -> None:
        """Remember the last failed attempt of ``project`` (shown by ``status``)."""
        self.connection.hset(
            self.state_key(project),
            mapping={
                "last_failure_job": job.id,
                "last_failure_error": error[:2000],
                "last_failure_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )

    # --- status (web process) ------------------------------------------------------------

    def projects(self) -> list[str]:
        """Projects that ever had a trigger, in numeric order."""
        members = self.connection.smembers(self.projects_key())
        return sorted((m.decode() for m in members), key=lambda p: (len(p), p))

    def status(self, project: str) -> dict[str, Any]:
        """Queued/running job, progress, last run and last failure of ``project``."""
        raw = self.connection.hgetall(self.state_key(project))
        state = {k.decode(): v.decode() for k, v in raw.items()}
        history = [h.decode() for h in self.connection.lrange(self.history_key(project), 0, -1)]
        jobs = {
            job.id: job
            for job in Job.fetch_many(history, connection=self.connection, serializer=SERIALIZER)
            if job is not None
        }

        def alive(job_id: str | None, statuses: set[JobStatus]) -> Job | None:
            job = jobs.get(job_id or "") or self._fetch(job_id)
            return job if job is not None and job.get_status(refresh=False) in statuses else None

        queued = alive(state.get("queued"), _WILL_RUN)
        running = alive(state.get("running"), _RUNNING)
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
            "queued": _describe(queued) if queued else None,
            "running": {**_describe(running), **self._liveness(running)} if running else None,
            "pending_annotations": int(state.get("pending_annotations", 0)),
            "last_run": _describe(last_run) if last_run else None,
            "last_failure": self._last_failure(state, history, jobs),
        }

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
            except _MALFORMED:
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

    # --- Label Studio access for the job -------------------------------------------------

    def store_label_studio_access(self, project: str, url: str, token: str) -> None:
        """Keep the Label Studio URL + token a job of ``project`` may use (never logged).

        ``/setup`` carries ``hostname`` and ``access_token``; the job falls back to them when
        LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are not configured.
        """
        if url and token:
            self.connection.hset(
                f"{ACCESS_PREFIX}:{self.queue.name}:{project}", mapping={"url": url, "token": token}
            )

    def pin_label_studio_url(self, url: str) -> str:
        """Pin ``url`` as the Label Studio every process trusts, unless one is pinned already;
        return the pinned one (``labelstudio.trust``: trust on first use). One pin per
        queue: the backends and workers of one queue are one deployment."""
        key = self._trusted_url_key()
        with self.connection.pipeline() as pipe:
            pipe.set(key, url, nx=True)
            pipe.get(key)
            _, pinned = pipe.execute()
        return pinned.decode() if pinned else url

    def pinned_label_studio_url(self) -> str | None:
        """The Label Studio URL pinned by ``pin_label_studio_url``, if any."""
        pinned = self.connection.get(self._trusted_url_key())
        return pinned.decode() if pinned else None

    def _trusted_url_key(self) -> str:
        return f"{ACCESS_PREFIX}:trusted-url:{self.queue.name}"

    def label_studio_access(self, project: str) -> tuple[str, str] | None:
        """The stored (url, token) of ``project``, or ``None``."""
        raw = self.connection.hgetall(f"{ACCESS_PREFIX}:{self.queue.name}:{project}")
        if not raw or b"url" not in raw or b"token" not in raw:
            return None
        return raw[b"url"].decode(), raw[b"token"].decode()


def _job_meta(job: Job) -> dict[str, Any]:
    """``job.meta`` as read by RQ, or ``{}`` (logged) when the stored value was not JSON."""
    meta = job.get_meta(refresh=False)
    # RQ's Job.restore keeps a meta it cannot deserialize as {"unserialized": <raw bytes>}.
    if not isinstance(meta, dict) or "unserialized" in meta:
        logger.warning("job %s: meta is not a JSON object, read as empty", job.id)
        return {}
    return meta


def _describe(job: Job) -> dict[str, Any]:
    """A JSON view of a training job: ids, times, triggers, progress, report (no arguments)."""
    meta = _job_meta(job)
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
