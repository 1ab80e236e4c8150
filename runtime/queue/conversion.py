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
(the run's fields), ``:run:<id>:tasks`` (task -> outcome), ``:run:<id>:counts`` (outcome ->
tasks; ``objects``, ``boxes`` and ``box skipped: <reason>`` -> boxes), ``:run:<id>:failed``
(task -> reason), ``:run:<id>:chunks`` (chunk indexes ended). A run's keys expire
CONVERT_KEEP_DAYS after it ends.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.job import Job

from runtime.queue.connection import redis_connection, training_queue, transaction
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
FAILED_SHOWN = 20  # failed tasks listed in the status (all are kept in Redis)
REASON_CHARS = 500

# KEYS: tasks, counts, failed. ARGV: task, outcome, reason, objects, boxes, then
# (skip reason, boxes) pairs. Returns 1 when the outcome changed, 0 when it was recorded already.
_RECORD_TASK = """
local previous = redis.call('HGET', KEYS[1], ARGV[1])
if previous == ARGV[2] and previous ~= 'failed' then return 0 end
if previous then redis.call('HINCRBY', KEYS[2], previous, -1) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if ARGV[2] == 'failed' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
else
  redis.call('HDEL', KEYS[3], ARGV[1])
end
if previous ~= 'done' and previous ~= 'skipped' and ARGV[2] ~= 'failed' then
  redis.call('HINCRBY', KEYS[2], 'objects', tonumber(ARGV[4]))
  redis.call('HINCRBY', KEYS[2], 'boxes', tonumber(ARGV[5]))
  for i = 6, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[2], 'box skipped: ' .. ARGV[i], tonumber(ARGV[i + 1]))
  end
end
return 1
"""

# KEYS: run, chunks ended. ARGV: chunk index, finished_at. Returns 1 when this ended the run.
_FINISH_CHUNK = """
redis.call('SADD', KEYS[2], ARGV[1])
local total = tonumber(redis.call('HGET', KEYS[1], 'chunks') or '-1')
local state = redis.call('HGET', KEYS[1], 'state')
if (state == 'planning' or state == 'running') and redis.call('SCARD', KEYS[2]) >= total then
  redis.call('HSET', KEYS[1], 'state', 'done', 'finished_at', ARGV[2])
  return 1
end
return 0
"""


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
        """Record a run of ``project`` with ``model_version`` and enqueue its plan job; return
        its status. ``ConversionRunningError`` when the project has an active run."""
        latest = self.latest(project)
        if latest is not None and latest["state"] in ACTIVE:
            raise ConversionRunningError(latest)
        run_id = f"{project}-{uuid.uuid4().hex[:12]}"
        project_key = f"{PREFIX}:{project}"
        expected = latest["run_id"] if latest is not None else None

        def record(pipe: Pipeline) -> bool:
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
            pipe.set(project_key, run_id)
            pipe.sadd(f"{PREFIX}:projects", project)
            return True

        recorded, _ = transaction(
            self.connection, [project_key], record, f"project {project}: starting a conversion"
        )
        if not recorded:
            again = self.latest(project)
            assert again is not None
            raise ConversionRunningError(again)
        self.queue.enqueue(
            PLAN_FUNCTION,
            run_id,
            job_id=plan_job_id(run_id),
            job_timeout=self.options.timeout_s,
            retry=self.options.retry(),
            result_ttl=self.options.keep_s,
            failure_ttl=self.options.keep_s,
            description=f"plan the box conversion of project {project}",
        )
        logger.info("project %s: conversion run %s (%s) queued", project, run_id, model_version)
        view = self.status(run_id)
        assert view is not None
        return view

    def cancel(self, project: str) -> dict[str, Any] | None:
        """Cancel the project's active run (its chunk jobs stop at their next task); return its
        status, or ``None`` when the project has no run."""
        latest = self.latest(project)
        if latest is None:
            return None
        if latest["state"] in ACTIVE:
            key = run_key(latest["run_id"])
            self.connection.hset(key, mapping={"state": CANCELLED, "finished_at": _now()})
            self.connection.expire(key, self.options.keep_s)
            logger.info("project %s: conversion run %s cancelled", project, latest["run_id"])
        return self.status(latest["run_id"])

    def projects(self) -> list[str]:
        """Projects that ever had a conversion run."""
        members = self.connection.smembers(f"{PREFIX}:projects")
        return sorted((m.decode() for m in members), key=lambda p: (len(p), p))

    def latest(self, project: str) -> dict[str, Any] | None:
        """The status of the project's newest run, or ``None``."""
        run_id = self.connection.get(f"{PREFIX}:{project}")
        return self.status(run_id.decode()) if run_id else None

    def status(self, run_id: str) -> dict[str, Any] | None:
        """A run's progress: state, tasks done / failed / skipped / remaining, chunks, objects,
        boxes skipped by reason, the first failed tasks with their reasons; ``None`` if unknown.

        A run whose remaining chunks will never run (their jobs failed for good, or expired) is
        "incomplete"; one whose plan job failed for good is "failed": start it again.
        """
        run = self.run(run_id)
        if run is None:
            return None
        counts = {
            k: int(v)
            for k, v in _decoded(self.connection.hgetall(f"{run_key(run_id)}:counts")).items()
        }
        ended = {int(c) for c in self.connection.smembers(f"{run_key(run_id)}:chunks")}
        total_tasks = int(run["tasks"]) if "tasks" in run else None
        total_chunks = int(run["chunks"]) if "chunks" in run else None
        state = run["state"]
        lost: list[int] = []
        if state in (QUEUED, PLANNING) and not self._will_run([plan_job_id(run_id)]):
            state = FAILED
        elif state == RUNNING and total_chunks is not None:
            open_chunks = [k for k in range(total_chunks) if k not in ended]
            alive = self._will_run([chunk_job_id(run_id, k) for k in open_chunks])
            lost = [k for k in open_chunks if chunk_job_id(run_id, k) not in alive]
            if open_chunks and len(lost) == len(open_chunks):
                state = INCOMPLETE
        done = sum(counts.get(o, 0) for o in OUTCOMES)
        failed_raw = _decoded(self.connection.hgetall(f"{run_key(run_id)}:failed"))
        failed_tasks = sorted(failed_raw.items(), key=lambda kv: int(kv[0]))[:FAILED_SHOWN]
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
            "remaining": None if total_tasks is None else max(0, total_tasks - done),
            "chunks": {"total": total_chunks, "ended": len(ended), "lost": lost},
            "objects": counts.get("objects", 0),
            "boxes": counts.get("boxes", 0),
            "boxes_skipped": {
                k.removeprefix("box skipped: "): v
                for k, v in counts.items()
                if k.startswith("box skipped: ") and v
            },
            "failed_tasks": [{"task": int(t), "reason": r} for t, r in failed_tasks],
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

    # --- the jobs -------------------------------------------------------------------------

    def run(self, run_id: str) -> dict[str, str] | None:
        """The run's stored fields, or ``None``."""
        raw = self.connection.hgetall(run_key(run_id))
        return _decoded(raw) if raw else None

    def is_active(self, run_id: str) -> bool:
        run = self.run(run_id)
        return run is not None and run["state"] in ACTIVE

    def mark_planning(self, run_id: str) -> None:
        self.connection.hset(run_key(run_id), mapping={"state": PLANNING, "started_at": _now()})

    def plan(self, run_id: str, task_ids: Sequence[int]) -> list[list[int]]:
        """Split ``task_ids`` into chunks, store the totals, enqueue the chunk jobs that do not
        exist yet (a retried plan job adds none twice), then mark the run running; return the
        chunks. A run without tasks is done at once."""
        run = self.run(run_id) or {}
        size = int(run.get("chunk_tasks") or self.options.chunk_tasks)
        chunks = [list(task_ids[i : i + size]) for i in range(0, len(task_ids), size)]
        key = run_key(run_id)
        # Totals first: a chunk that ends before the last one is enqueued finds them.
        self.connection.hset(key, mapping={"tasks": len(task_ids), "chunks": len(chunks)})
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

        def running(pipe: Pipeline) -> None:
            state = pipe.hget(key, "state")
            pipe.multi()
            if state is not None and state.decode() == PLANNING:  # not ended or cancelled
                if chunks:
                    pipe.hset(key, "state", RUNNING)
                else:
                    pipe.hset(key, mapping={"state": DONE, "finished_at": _now()})

        transaction(self.connection, [key], running, f"conversion run {run_id}: planned")
        if not chunks:
            self._expire(run_id)
        return chunks

    def set_warnings(self, run_id: str, warnings: Sequence[str]) -> None:
        """What the run leaves out of the labeling config (``box_conversion_warnings``)."""
        if warnings:
            self.connection.hset(run_key(run_id), "warnings", json.dumps(list(warnings)))

    def fail(self, run_id: str, error: str) -> None:
        self.connection.hset(
            run_key(run_id),
            mapping={"state": FAILED, "error": error[:REASON_CHARS], "finished_at": _now()},
        )
        self._expire(run_id)

    def recorded(self, run_id: str) -> dict[int, str]:
        """task -> outcome recorded so far in this run."""
        raw = _decoded(self.connection.hgetall(f"{run_key(run_id)}:tasks"))
        return {int(k): v for k, v in raw.items()}

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
        key = run_key(run_id)
        args: list[Any] = [task, outcome, reason[:REASON_CHARS], objects, boxes]
        for skip_reason, count in (boxes_skipped or {}).items():
            args += [skip_reason, count]
        changed = self._record(keys=[f"{key}:tasks", f"{key}:counts", f"{key}:failed"], args=args)
        return bool(changed)

    def finish_chunk(self, run_id: str, index: int) -> bool:
        """Record chunk ``index`` as ended; True when it ended the run (then logged, and the
        run's keys set to expire)."""
        key = run_key(run_id)
        ended = bool(self._finish(keys=[key, f"{key}:chunks"], args=[index, _now()]))
        if ended:
            self._expire(run_id)
            view = self.status(run_id) or {}
            logger.info(
                "conversion run %s done: %s tasks, %s done, %s skipped, %s failed",
                run_id, view.get("tasks"), view.get("done"), view.get("skipped"),
                view.get("failed"),
            )  # fmt: skip
        return ended

    def _expire(self, run_id: str) -> None:
        key = run_key(run_id)
        with self.connection.pipeline() as pipe:
            for suffix in ("", ":tasks", ":counts", ":failed", ":chunks"):
                pipe.expire(key + suffix, self.options.keep_s)
            pipe.execute()
