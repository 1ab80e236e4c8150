"""Project-wide box conversion runs: started by the web process or the CLI, worked off by any
number of RQ workers, followed in ``/status``.

A run converts every task of one project whose annotations or predictions hold rectangles into
mask predictions of one model version (fixed when the run starts). Its life:

1. ``Conversions.start`` records the run (``state`` "queued") and enqueues its plan job
   (``PLAN_FUNCTION``) on CONVERT_QUEUE; a project has at most one active run.
2. The plan job pages through the project's task ids, stores their number, and enqueues one
   chunk job (``CHUNK_FUNCTION``) per CONVERT_CHUNK_TASKS tasks, ids ``convert-<run>-<k>``
   (an enqueue is skipped for an id that exists: a retried plan job adds no duplicates).
3. Each chunk job records every task's outcome (``record_task``: done, skipped, failed with
   the reason) as it goes, and its own end (``finish_chunk``); the last chunk ends the run.

Everything is in Redis, so workers on any number of machines work on one run. A task's outcome
is recorded once per run: a retried chunk (a worker killed mid-chunk) skips the tasks recorded
done, and a task that failed and then succeeds counts once, as done. Counts are kept by Lua
scripts, atomic without WATCH retries however many workers write at once.

Keys, under ``stable-sam:convert``: ``:<project>`` (the project's latest run id), ``:run:<id>``
(the run's fields), ``:run:<id>:plan`` (chunk index -> its task ids, JSON, fixed by the first
plan), ``:run:<id>:tasks`` (task -> outcome), ``:run:<id>:counts`` (outcome -> tasks;
``objects``, ``boxes`` and ``box skipped: <reason>`` -> boxes), ``:run:<id>:failed`` (task ->
reason) and ``:run:<id>:failed-ids`` (the failed tasks, by id), ``:run:<id>:chunks`` (chunk
indexes ended). Every write to a run sets all its keys to expire CONVERT_KEEP_DAYS later, so a
run nobody writes to any more (ended, cancelled, or abandoned) goes away on its own.

State changes are compare-and-set (``_SET_STATE``): a cancel is never undone by a plan job that
read the state before it, and a run that ``status`` finds failed or incomplete (its jobs will
never run) is written so, which stops any chunk of it still running.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.job import Job

from runtime.queue.connection import (
    ContentionError,
    redis_connection,
    training_queue,
    transaction,
)
from runtime.queue.jobs import WILL_RUN

if TYPE_CHECKING:
    from runtime.settings import Settings

logger = logging.getLogger(__name__)

PREFIX = "stable-sam:convert"
PLAN_FUNCTION = "training.conversion.plan_conversion"
CHUNK_FUNCTION = "training.conversion.convert_chunk"
JOB_FUNCTIONS = frozenset({PLAN_FUNCTION, CHUNK_FUNCTION})

# A run's states. Active: a new run of the project is refused while one is.
QUEUED, PLANNING, RUNNING = "queued", "planning", "running"
DONE, CANCELLED, FAILED, INCOMPLETE = "done", "cancelled", "failed", "incomplete"
ACTIVE = frozenset({QUEUED, PLANNING, RUNNING})
OUTCOMES = ("done", "skipped", "failed")
MAX_CHUNK_TASKS = 1000  # CONVERT_CHUNK_TASKS' bound too
FAILED_SHOWN = 20  # failed tasks listed in the status (all are kept in Redis)
REASON_CHARS = 500


# Sets every key of the run (KEYS[1] and KEYS[1] .. suffix) to expire in ARGV[1] seconds.
_EXPIRE_RUN = """
local function expire_run(run, seconds)
  for _, suffix in ipairs({'', ':plan', ':tasks', ':counts', ':failed', ':failed-ids', ':chunks'}) do
    redis.call('EXPIRE', run .. suffix, seconds)
  end
end
"""

# KEYS: run. ARGV: keep_s, task, outcome, reason, objects, boxes, then (skip reason, boxes)
# pairs. Returns 1 when the outcome changed, 0 when it was recorded already.
_RECORD_TASK = (
    _EXPIRE_RUN
    + """
local run = KEYS[1]
local previous = redis.call('HGET', run .. ':tasks', ARGV[2])
if previous == ARGV[3] and previous ~= 'failed' then return 0 end
if previous then redis.call('HINCRBY', run .. ':counts', previous, -1) end
redis.call('HSET', run .. ':tasks', ARGV[2], ARGV[3])
redis.call('HINCRBY', run .. ':counts', ARGV[3], 1)
if ARGV[3] == 'failed' then
  redis.call('HSET', run .. ':failed', ARGV[2], ARGV[4])
  redis.call('ZADD', run .. ':failed-ids', tonumber(ARGV[2]), ARGV[2])
else
  redis.call('HDEL', run .. ':failed', ARGV[2])
  redis.call('ZREM', run .. ':failed-ids', ARGV[2])
end
if previous ~= 'done' and previous ~= 'skipped' and ARGV[3] ~= 'failed' then
  redis.call('HINCRBY', run .. ':counts', 'objects', tonumber(ARGV[5]))
  redis.call('HINCRBY', run .. ':counts', 'boxes', tonumber(ARGV[6]))
  for i = 7, #ARGV, 2 do
    redis.call('HINCRBY', run .. ':counts', 'box skipped: ' .. ARGV[i], tonumber(ARGV[i + 1]))
  end
end
expire_run(run, ARGV[1])
return 1
"""
)

# KEYS: run. ARGV: keep_s, chunk index, finished_at. Returns 1 when this ended the run.
_FINISH_CHUNK = (
    _EXPIRE_RUN
    + """
local run = KEYS[1]
redis.call('SADD', run .. ':chunks', ARGV[2])
expire_run(run, ARGV[1])
local total = tonumber(redis.call('HGET', run, 'chunks') or '-1')
local state = redis.call('HGET', run, 'state')
if (state == 'planning' or state == 'running') and redis.call('SCARD', run .. ':chunks') >= total then
  redis.call('HSET', run, 'state', 'done', 'finished_at', ARGV[3])
  return 1
end
return 0
"""
)

# KEYS: run. ARGV: keep_s, new state, then the states it may replace, then '--', then field,
# value pairs to set with it. Returns 1 when the state was set.
_SET_STATE = (
    _EXPIRE_RUN
    + """
local run = KEYS[1]
local state = redis.call('HGET', run, 'state')
local i, allowed = 3, false
while ARGV[i] ~= '--' do
  if state == ARGV[i] then allowed = true end
  i = i + 1
end
if not allowed then return 0 end
redis.call('HSET', run, 'state', ARGV[2])
for j = i + 1, #ARGV, 2 do redis.call('HSET', run, ARGV[j], ARGV[j + 1]) end
expire_run(run, ARGV[1])
return 1
"""
)


class InvalidChunkTasksError(ValueError):
    """A run's ``chunk_tasks`` is not an integer from 1 to ``MAX_CHUNK_TASKS``."""


def check_chunk_tasks(value: object) -> int | None:
    """``value`` as a run's tasks per chunk (``None``: CONVERT_CHUNK_TASKS); else
    ``InvalidChunkTasksError``."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CHUNK_TASKS:
        raise InvalidChunkTasksError(f"chunk_tasks: an integer from 1 to {MAX_CHUNK_TASKS}")
    return value


class ConversionRunningError(RuntimeError):
    """The project has an active run already (``view``: its status)."""

    def __init__(self, view: dict[str, Any]) -> None:
        super().__init__(f"run {view['run_id']} of project {view['project']} is {view['state']}")
        self.view = view


@dataclass(frozen=True)
class ConversionOptions:
    """How conversion jobs are enqueued (CONVERT_* settings)."""

    chunk_tasks: int = 25
    timeout_s: int = 1800
    retries: int = 3
    retry_intervals_s: Sequence[int] = (5, 30, 120)
    keep_s: int = 30 * 24 * 3600

    def retry(self) -> Retry | None:
        if self.retries <= 0:
            return None
        return Retry(max=self.retries, interval=list(self.retry_intervals_s) or 0)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _decoded(raw: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _json_list(raw: str | None) -> list:
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def run_key(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}"


def chunk_job_id(run_id: str, index: int) -> str:
    return f"convert-{run_id}-{index}"


def plan_job_id(run_id: str) -> str:
    return f"convert-{run_id}-plan"


class Conversions:
    """The conversion runs of the projects of one Redis, on queue ``queue_name``."""

    def __init__(
        self,
        connection: redis.Redis,
        queue_name: str = "stable-sam-convert",
        options: ConversionOptions | None = None,
    ) -> None:
        self.connection = connection
        self.queue: Queue = training_queue(connection, queue_name)
        self.options = options or ConversionOptions()
        self._record = connection.register_script(_RECORD_TASK)
        self._finish = connection.register_script(_FINISH_CHUNK)
        self._set_state = connection.register_script(_SET_STATE)

    @classmethod
    def from_settings(
        cls, settings: Settings, connection: redis.Redis | None = None
    ) -> Conversions:
        return cls(
            connection or redis_connection(settings.redis_url),
            settings.convert_queue,
            ConversionOptions(
                chunk_tasks=settings.convert_chunk_tasks,
                timeout_s=settings.convert_job_timeout_s,
                retries=settings.convert_retries,
                retry_intervals_s=tuple(settings.convert_retry_intervals_s),
                keep_s=settings.convert_keep_days * 24 * 3600,
            ),
        )

    # --- the web process and the CLI ------------------------------------------------------

    def start(self, project: str, model_version: str, chunk_tasks: int | None = None) -> dict:
        """Record a run of ``project`` with ``model_version`` and enqueue its plan job, in one
        transaction; return its status. ``ConversionRunningError`` when the project has an
        active run (also one that another start recorded meanwhile); ``InvalidChunkTasksError``
        for a ``chunk_tasks`` out of bounds."""
        chunk_tasks = check_chunk_tasks(chunk_tasks)
        project_key = f"{PREFIX}:{project}"
        for _ in range(3):  # a lost race with a start whose run then ended: look again
            pointer = self.connection.get(project_key)  # may name a run whose keys expired
            expected = pointer.decode() if pointer else None
            latest = self.status(expected) if expected else None
            if latest is not None and latest["state"] in ACTIVE:
                raise ConversionRunningError(latest)
            run_id = f"{project}-{uuid.uuid4().hex[:12]}"

            def record(
                pipe: Pipeline, run_id: str = run_id, expected: str | None = expected
            ) -> bool:
                current = pipe.get(project_key)
                if (current.decode() if current else None) != expected:
                    return False  # another start won meanwhile
                pipe.multi()
                pipe.hset(
                    run_key(run_id),
                    mapping={
                        "project": project,
                        "model_version": model_version,
                        "state": QUEUED,
                        "created_at": _now(),
                        "chunk_tasks": chunk_tasks or self.options.chunk_tasks,
                    },
                )
                pipe.expire(run_key(run_id), self.options.keep_s)
                pipe.set(project_key, run_id)
                pipe.sadd(f"{PREFIX}:projects", project)
                # In the same MULTI: never a queued run without its plan job.
                self.queue.enqueue_call(
                    PLAN_FUNCTION,
                    args=(run_id,),
                    job_id=plan_job_id(run_id),
                    timeout=self.options.timeout_s,
                    retry=self.options.retry(),
                    result_ttl=self.options.keep_s,
                    failure_ttl=self.options.keep_s,
                    description=f"plan the box conversion of project {project}",
                    pipeline=pipe,
                )
                return True

            recorded, _ = transaction(
                self.connection, [project_key], record, f"project {project}: starting a conversion"
            )
            if recorded:
                logger.info("project %s: conversion run %s (%s) queued", project, run_id,
                            model_version)  # fmt: skip
                view = self.status(run_id)
                assert view is not None
                return view
            won = self.latest(project)
            if won is not None and won["state"] in ACTIVE:
                raise ConversionRunningError(won)
        raise ContentionError(f"project {project}: starting a conversion: 3 races lost in a row")

    def cancel(self, project: str) -> dict[str, Any] | None:
        """Cancel the project's active run (its chunk jobs stop at their next task); return its
        status, or ``None`` when the project has no run."""
        latest = self.latest(project)
        if latest is None:
            return None
        if self._change_state(latest["run_id"], CANCELLED, ACTIVE, finished_at=_now()):
            logger.info("project %s: conversion run %s cancelled", project, latest["run_id"])
        return self.status(latest["run_id"])

    def projects(self) -> list[str]:
        """Projects that ever had a conversion run."""
        members = self.connection.smembers(f"{PREFIX}:projects")
        return sorted((m.decode() for m in members), key=lambda p: (len(p), p))

    def latest(self, project: str) -> dict[str, Any] | None:
        """The status of the project's newest run, or ``None`` (none, or its keys expired)."""
        run_id = self.connection.get(f"{PREFIX}:{project}")
        return self.status(run_id.decode()) if run_id else None

    def status(self, run_id: str) -> dict[str, Any] | None:
        """A run's progress: state, tasks done / failed / skipped / remaining, chunks, objects,
        boxes skipped by reason, the first failed tasks with their reasons; ``None`` if unknown.

        A run whose remaining chunks will never run (their jobs failed for good, or expired) is
        "incomplete", one whose plan job is gone "failed"; that is written to the run (so its
        chunks still running stop), and the project may be converted again.
        """
        run = self.run(run_id)
        if run is None:
            return None
        key = run_key(run_id)
        counts = {k: int(v) for k, v in _decoded(self.connection.hgetall(f"{key}:counts")).items()}
        ended = {int(c) for c in self.connection.smembers(f"{key}:chunks")}
        total_tasks = int(run["tasks"]) if "tasks" in run else None
        total_chunks = int(run["chunks"]) if "chunks" in run else None
        state = run["state"]
        lost: list[int] = []
        if state == QUEUED or (state == PLANNING and total_chunks is None):
            if not self._will_run([plan_job_id(run_id)]) and self._change_state(
                run_id, FAILED, (state,), error="its plan job is gone", finished_at=_now()
            ):
                return self.status(run_id)
        elif state in (PLANNING, RUNNING, INCOMPLETE) and total_chunks is not None:
            open_chunks = [k for k in range(total_chunks) if k not in ended]
            alive = self._will_run([chunk_job_id(run_id, k) for k in open_chunks])
            if state == PLANNING:  # the plan job may still be enqueueing chunks
                alive |= self._will_run([plan_job_id(run_id)])
            lost = [k for k in open_chunks if chunk_job_id(run_id, k) not in alive]
            if (
                state != INCOMPLETE
                and open_chunks
                and len(lost) == len(open_chunks)
                and plan_job_id(run_id) not in alive
                and self._change_state(run_id, INCOMPLETE, (state,), finished_at=_now())
            ):
                return self.status(run_id)
        recorded = sum(counts.get(o, 0) for o in OUTCOMES)
        failed_ids = [
            t.decode() for t in self.connection.zrange(f"{key}:failed-ids", 0, FAILED_SHOWN - 1)
        ]
        reasons = self.connection.hmget(f"{key}:failed", failed_ids) if failed_ids else []
        return {
            "run_id": run_id,
            "project": run.get("project"),
            "model_version": run.get("model_version"),
            "state": state,
            "created_at": run.get("created_at"),
            "started_at": run.get("started_at"),
            "finished_at": run.get("finished_at"),
            "error": run.get("error"),
            "warnings": _json_list(run.get("warnings")),
            "tasks": total_tasks,
            "done": counts.get("done", 0),
            "skipped": counts.get("skipped", 0),
            "failed": counts.get("failed", 0),
            "remaining": None if total_tasks is None else max(0, total_tasks - recorded),
            "chunks": {"total": total_chunks, "ended": len(ended), "lost": lost},
            "objects": counts.get("objects", 0),
            "boxes": counts.get("boxes", 0),
            "boxes_skipped": {
                k.removeprefix("box skipped: "): v
                for k, v in counts.items()
                if k.startswith("box skipped: ") and v
            },
            "failed_tasks": [
                {"task": int(t), "reason": (r or b"").decode()}
                for t, r in zip(failed_ids, reasons, strict=True)
            ],
        }

    def _will_run(self, job_ids: Sequence[str]) -> set[str]:
        """Those of ``job_ids`` whose RQ job exists and will still run (or runs)."""
        if not job_ids:
            return set()
        with self.connection.pipeline() as pipe:
            for job_id in job_ids:
                pipe.hget(Job.key_for(job_id), "status")
            statuses = pipe.execute()
        will_run = {s.value for s in WILL_RUN}
        return {j for j, s in zip(job_ids, statuses, strict=True) if s and s.decode() in will_run}

    def _change_state(
        self, run_id: str, state: str, replaces: Collection[str], **fields: str
    ) -> bool:
        """Set the run's state to ``state`` if it is one of ``replaces`` now (atomic), with
        ``fields``; True when it was set."""
        args: list[Any] = [self.options.keep_s, state, *replaces, "--"]
        for name, value in fields.items():
            args += [name, value]
        return bool(self._set_state(keys=[run_key(run_id)], args=args))

    # --- the jobs -------------------------------------------------------------------------

    def run(self, run_id: str) -> dict[str, str] | None:
        """The run's stored fields, or ``None``."""
        raw = self.connection.hgetall(run_key(run_id))
        return _decoded(raw) if raw else None

    def is_active(self, run_id: str) -> bool:
        state = self.connection.hget(run_key(run_id), "state")
        return state is not None and state.decode() in ACTIVE

    def mark_planning(self, run_id: str) -> bool:
        """Move a queued (or planning: a retried plan job) run to planning; False when it is
        not active any more (cancelled meanwhile, say): then nothing is to be planned."""
        return self._change_state(run_id, PLANNING, (QUEUED, PLANNING), started_at=_now())

    def plan(self, run_id: str, list_ids: Callable[[], Sequence[int]]) -> list[list[int]]:
        """Split the task ids ``list_ids()`` gives (duplicates dropped) into chunks and store
        them with the totals, the first time; then enqueue the chunk jobs that do not exist yet
        and mark the run running. A retried plan job reuses the stored chunks (``list_ids`` is
        not called again), so no task lands in two chunks. A run without tasks is done at once.
        """
        key = run_key(run_id)
        stored = self.connection.hgetall(f"{key}:plan")
        total = self.connection.hget(key, "chunks")
        if total is not None and len(stored) == int(total):
            chunks = [json.loads(stored[str(k).encode()]) for k in range(int(total))]
        else:
            run = self.run(run_id) or {}
            size = int(run.get("chunk_tasks") or self.options.chunk_tasks)
            task_ids = list(dict.fromkeys(list_ids()))
            chunks = [task_ids[i : i + size] for i in range(0, len(task_ids), size)]
            with self.connection.pipeline() as pipe:  # totals and chunks at once, first
                pipe.delete(f"{key}:plan")
                if chunks:
                    pipe.hset(
                        f"{key}:plan", mapping={k: json.dumps(c) for k, c in enumerate(chunks)}
                    )
                pipe.hset(key, mapping={"tasks": len(task_ids), "chunks": len(chunks)})
                pipe.execute()
        for index, chunk in enumerate(chunks):
            job_id = chunk_job_id(run_id, index)
            if Job.exists(job_id, connection=self.connection):
                continue
            self.queue.enqueue(
                CHUNK_FUNCTION,
                run_id,
                index,
                chunk,
                job_id=job_id,
                job_timeout=self.options.timeout_s,
                retry=self.options.retry(),
                result_ttl=self.options.keep_s,
                failure_ttl=self.options.keep_s,
                description=f"convert {len(chunk)} tasks ({index + 1}/{len(chunks)})",
            )
        if chunks:
            self._change_state(run_id, RUNNING, (PLANNING,))
        else:
            self._change_state(run_id, DONE, (PLANNING,), finished_at=_now())
        return chunks

    def set_warnings(self, run_id: str, warnings: Sequence[str]) -> None:
        """What the run leaves out of the labeling config (``box_conversion_warnings``)."""
        if warnings:
            self.connection.hset(run_key(run_id), "warnings", json.dumps(list(warnings)))

    def fail(self, run_id: str, error: str) -> bool:
        """End an active run as failed with ``error``; its chunks still running stop."""
        return self._change_state(
            run_id, FAILED, ACTIVE, error=error[:REASON_CHARS], finished_at=_now()
        )

    def outcomes(self, run_id: str, task_ids: Sequence[int]) -> dict[int, str]:
        """The outcomes recorded so far in this run of those of ``task_ids`` that have one."""
        if not task_ids:
            return {}
        raw = self.connection.hmget(f"{run_key(run_id)}:tasks", [str(t) for t in task_ids])
        return {t: r.decode() for t, r in zip(task_ids, raw, strict=True) if r is not None}

    def record_task(
        self,
        run_id: str,
        task: int,
        outcome: str,
        reason: str = "",
        objects: int = 0,
        boxes: int = 0,
        boxes_skipped: Mapping[str, int] | None = None,
    ) -> bool:
        """Record ``task``'s ``outcome`` ("done", "skipped" or "failed" with ``reason``) and,
        the first time it is done or skipped, its objects and boxes; False when recorded
        already."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        args: list[Any] = [self.options.keep_s, int(task), outcome, reason[:REASON_CHARS]]
        args += [objects, boxes]
        for skip_reason, count in (boxes_skipped or {}).items():
            args += [skip_reason, count]
        return bool(self._record(keys=[run_key(run_id)], args=args))

    def finish_chunk(self, run_id: str, index: int) -> bool:
        """Record chunk ``index`` as ended; True when it ended the run (then logged)."""
        ended = bool(
            self._finish(keys=[run_key(run_id)], args=[self.options.keep_s, index, _now()])
        )
        if ended:
            view = self.status(run_id) or {}
            logger.info(
                "conversion run %s done: %s tasks, %s done, %s skipped, %s failed",
                run_id, view.get("tasks"), view.get("done"), view.get("skipped"),
                view.get("failed"),
            )  # fmt: skip
        return ended
