"""Label Studio webhook actions -> training jobs, coalesced per project (the web process).

The invariant, per project: at most one queued and one running job.

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

Every decision is one WATCH/MULTI transaction over the project's state hash
(``runtime.queue.state``), which the job also updates when it starts (``jobs.mark_started``).
Whether a recorded job is still alive is read from RQ's own job status, so a job that RQ
failed, finished or gave up on (a SIGKILLed worker, cleaned up by RQ's ``StartedJobRegistry``)
never blocks the next trigger. Tokens never go into job arguments (they are visible in RQ
dashboards): the Label Studio access a job needs is in ``runtime.queue.access``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import redis
from redis.client import Pipeline
from rq.job import Dependency, Job, JobStatus

from runtime.queue.connection import SERIALIZER, redis_connection, training_queue, transaction
from runtime.queue.jobs import JOB_FUNCTION, RUNNING, WILL_RUN, JobOptions, new_job_id, read_meta
from runtime.queue.state import (
    HISTORY_LENGTH,
    history_key,
    projects_key,
    read_state,
    state_key,
)

if TYPE_CHECKING:
    from runtime.settings import Settings

logger = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 2.0
# Below max_queued_jobs minus this many, a trigger reads the queue's length without WATCHing it
# (triggers of distinct projects would abort each other's transactions); from there on the
# length is WATCHed, so the bound is exact unless this many new jobs commit concurrently.
QUEUE_FULL_WATCH_MARGIN = 64

# Label Studio webhook actions.
START_TRAINING = "START_TRAINING"
ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"})
TRAINING_ACTIONS = ANNOTATION_ACTIONS | {START_TRAINING}

TrainOn = Literal["start_training", "annotations"]
Outcome = Literal["enqueued", "merged", "follow_up", "counted", "ignored"]


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


def job_status(pipe: Pipeline, job_id: str) -> JobStatus | None:
    """RQ's status of ``job_id`` (``None``: no such job), WATCHed by ``pipe`` from now on."""
    job_key = Job.key_for(job_id)
    pipe.watch(job_key)
    status = pipe.hget(job_key, "status")
    return JobStatus(status.decode()) if status else None


class TrainingTriggers:
    """Turns webhook actions into training jobs of TRAINING_QUEUE, coalesced per project.

    ``connection`` is any Redis client (the web app's has short timeouts, see
    ``redis_connection``); ``queue_name`` the RQ queue the worker listens on;
    ``max_queued_jobs`` how many jobs may wait in the queue (queued or deferred) at once
    (MAX_QUEUED_TRAINING_JOBS).
    """

    def __init__(
        self,
        connection: redis.Redis,
        queue_name: str = "stable-sam-training",
        policy: TrainingPolicy | None = None,
        job_options: JobOptions | None = None,
        max_queued_jobs: int = 100,
    ) -> None:
        if max_queued_jobs < 1:
            raise ValueError("max_queued_jobs must be >= 1")
        self.connection = connection
        self.queue = training_queue(connection, queue_name)
        self.policy = policy or TrainingPolicy()
        self.job_options = job_options or JobOptions()
        self.max_queued_jobs = max_queued_jobs

    @classmethod
    def from_settings(
        cls, settings: Settings, connection: redis.Redis | None = None
    ) -> TrainingTriggers:
        """The triggers ``settings`` describe: TRAINING_QUEUE on REDIS_URL (``connection``, else
        a new one with short timeouts), TRAIN_ON / MIN_NEW_ANNOTATIONS, the job options
        (TRAIN_JOB_TIMEOUT_S, TRAIN_RETRIES, TRAIN_RETRY_INTERVALS_S) and
        MAX_QUEUED_TRAINING_JOBS."""
        return cls(
            connection or redis_connection(settings.redis_url),
            settings.training_queue,
            policy=TrainingPolicy(settings.train_on, settings.min_new_annotations),
            job_options=JobOptions(
                timeout_s=settings.train_job_timeout_s,
                retries=settings.train_retries,
                retry_intervals_s=tuple(settings.train_retry_intervals_s),
            ),
            max_queued_jobs=settings.max_queued_training_jobs,
        )

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

    def _transact(self, project: str, reason: str, count_annotation: bool) -> TriggerResult:
        # Triggers of one project take turns (a short Redis lock) so that a burst does not
        # starve in WATCH retries; WATCH still guards against the job's own state changes.
        lock = self.connection.lock(
            f"{state_key(project)}:lock",
            timeout=LOCK_TIMEOUT_S,
            blocking_timeout=LOCK_TIMEOUT_S,
            sleep=0.002,
        )
        with lock:
            result, _ = transaction(
                self.connection,
                [state_key(project)],
                lambda pipe: self._decide(pipe, project, reason, count_annotation),
                f"project {project}: a training trigger",
            )
        logger.info(
            "project %s: %s -> %s (job %s, triggers %d)",
            project,
            reason,
            result.outcome,
            result.job_id,
            result.triggers,
        )
        return result

    def _decide(
        self, pipe: Pipeline, project: str, reason: str, count_annotation: bool
    ) -> TriggerResult:
        """Read the state (pipe is WATCHing it) and queue the writes (leaves pipe in MULTI)."""
        key = state_key(project)
        state = read_state(pipe, project)

        if count_annotation:
            pending = int(state.get("pending_annotations", 0)) + 1
            if pending < self.policy.min_new_annotations:
                pipe.multi()
                pipe.hset(key, "pending_annotations", pending)
                pipe.sadd(projects_key(), project)
                return TriggerResult("counted", project, new_annotations=pending)

        queued_id = state.get("queued")
        if queued_id and job_status(pipe, queued_id) in WILL_RUN:
            triggers = int(state.get("queued_triggers", 1)) + 1
            meta = read_meta(pipe, queued_id)
            reasons = meta.get("reasons")
            reasons = dict(reasons) if isinstance(reasons, dict) else {}
            count = reasons.get(reason, 0)
            reasons[reason] = (count if isinstance(count, int) else 0) + 1
            meta.update(triggers=triggers, reasons=reasons)
            pipe.multi()
            pipe.hset(key, mapping={"queued_triggers": triggers, "pending_annotations": 0})
            pipe.hset(Job.key_for(queued_id), "meta", SERIALIZER.dumps(meta))
            return TriggerResult("merged", project, queued_id, triggers)

        self._check_room(pipe, project)
        running_id = state.get("running")
        running_alive = bool(running_id) and job_status(pipe, running_id) in RUNNING
        job = self.queue.create_job(
            JOB_FUNCTION,
            kwargs={"project": project},
            job_id=new_job_id(project),
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
        pipe.hset(key, mapping={"queued": job.id, "queued_triggers": 1, "pending_annotations": 0})
        if running_id and not running_alive:
            pipe.hdel(key, "running", "running_triggers")
        pipe.sadd(projects_key(), project)
        pipe.lpush(history_key(project), job.id)
        pipe.ltrim(history_key(project), 0, HISTORY_LENGTH - 1)
        return TriggerResult("follow_up" if running_alive else "enqueued", project, job.id, 1)

    def _check_room(self, pipe: Pipeline, project: str) -> None:
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
