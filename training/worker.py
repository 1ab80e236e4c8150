"""The training worker: ``python -m training.worker`` runs ``training.jobs`` from TRAINING_QUEUE.

An ``rq.Worker`` with its scheduler, configured from ``runtime.settings.Settings`` (REDIS_URL,
TRAINING_QUEUE, TRAIN_HEARTBEAT_S, TRAIN_STUCK_AFTER_S, TRAIN_MAINTENANCE_INTERVAL_S: the
connection comes from the environment, never from argv, where ``ps`` would show a password).
Jobs are JSON (``runtime.queue.connection.SERIALIZER``), never pickles.

Plain ``rq worker --with-scheduler`` (rq 2.12) stalls retries for 10-15 minutes after two common
faults; this worker closes the gaps with RQ's own mechanisms:

- **Redis restarts.** RQ's scheduler process (it enqueues retries whose wait is over) exits on the
  first Redis error, and the worker restarts it only at its next maintenance: every 600 s, and an
  idle worker only when its 405 s dequeue wait ends. ``TrainingScheduler`` rides out Redis errors
  and the worker checks its scheduler process at every heartbeat and maintenance round
  (seconds), restarting it when it died.
- **A worker killed (SIGKILL, OOM, container restart) and started again.** The dead worker's
  scheduler lock (``rq:scheduler-lock:<queue>``, TTL 61 s) keeps the new worker from running a
  scheduler, and its job stays "started" until the job's heartbeat expires (RQ: monitoring
  interval + 60 s) and a worker next cleans the registries. This worker reclaims a scheduler
  lock whose holder is dead (a local process that no longer exists, or a heartbeat older than
  TRAIN_STUCK_AFTER_S), expires at once the jobs of local workers whose processes are gone, lets
  a job's heartbeat expire after TRAIN_STUCK_AFTER_S, and cleans the registries every
  TRAIN_MAINTENANCE_INTERVAL_S. RQ's ``StartedJobRegistry.cleanup`` then retries or fails the
  abandoned job exactly as it would have, minutes earlier.

"Local" means the same process space: the same host (hostname and boot) and PID namespace, where
a process id read from Redis names the process it did (a worker restarted by ``scripts/serve.sh``
or a supervisor). A worker in a restarted container has a new PID namespace: the jobs of its
predecessor are abandoned by the heartbeat rule, after TRAIN_STUCK_AFTER_S.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from rq import Queue, Worker, worker_registration
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import SchedulerNotFound
from rq.executions import Execution
from rq.job import Job
from rq.registry import StartedJobRegistry, clean_registries
from rq.scheduler import RQScheduler
from rq.scripts import release_lock
from rq.utils import now
from rq.worker import WorkerStatus

from runtime.logs import configure_logging
from runtime.queue.connection import SERIALIZER
from runtime.queue.conversion import JOB_FUNCTIONS as CONVERSION_FUNCTIONS
from runtime.queue.jobs import JOB_FUNCTION
from runtime.settings import Settings

if TYPE_CHECKING:
    from redis.client import Pipeline

# Errors of a Redis that is restarting or unreachable; the worker and its scheduler outlive them.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
# RQ holds a queue's registry-cleaning lock for 899 s; a worker killed (or a Redis error) while
# cleaning would block every other worker's cleanup that long.
CLEANING_LOCK_TTL_S = 60
# The queues a worker listens on by default, highest priority first.
QUEUES = ("training", "convert")


def _process_space() -> str:
    """Where process ids mean the same processes: hostname, boot id and PID namespace."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


PROCESS_SPACE = _process_space()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        # "pid (comm) state ...": the state follows the last ")".
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


class TrainingJob(Job):
    """An RQ job that never imports or runs the callbacks or sends the webhooks a job record
    names: training jobs use neither, and whoever can write Redis could name any importable
    function (RQ imports and calls callbacks in the work horse, and the failure callback of an
    abandoned job in the worker itself, during registry cleanup)."""

    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        return None


def refusal(job: Job, allowed_functions: frozenset[str]) -> str | None:
    """Why the worker must not run ``job`` (read from its record, nothing imported), or
    ``None``: a function other than ``allowed_functions``, a method of a stored instance,
    callbacks or webhooks."""
    if job.func_name not in allowed_functions:
        return f"function {job.func_name!r} is not a training job function"
    if job.instance is not None:
        return "a method of a stored instance"
    names = (job._success_callback_name, job._failure_callback_name, job._stopped_callback_name)
    if any(names):
        return "callbacks"
    if job.webhooks:
        return "webhooks"
    return None


class TrainingScheduler(RQScheduler):
    """RQ's scheduler loop that survives Redis outages and ends with its worker.

    RQ's ``RQScheduler.work`` lets the first ``ConnectionError`` end the process. Here a Redis
    error is logged and the loop goes on (its heartbeat re-acquires a lock that a Redis restart
    lost); and the loop stops, releasing its lock, once the worker that forked it is gone, so
    that a restarted worker can take over at once instead of competing with an orphan.
    """

    def register_birth(self) -> None:
        super().register_birth()
        self.connection.hset(self.key, "process_space", PROCESS_SPACE)

    def work(self) -> None:
        self._install_signal_handlers()
        worker_pid = os.getppid()
        registered = False
        while not self._stop_requested and os.getppid() == worker_pid:
            try:
                if not registered:
                    self.register_birth()
                    registered = True
                if self.should_reacquire_locks:
                    self.acquire_locks()
                self.heartbeat()
                self.enqueue_scheduled_jobs()
            except REDIS_DOWN as exc:
                self.log.warning("Scheduler %s: Redis unavailable (%s)", self.name, exc)
                self._status = self.Status.STARTED
                registered = False  # a Redis restarted without persistence lost our record
            time.sleep(self.interval)
        with contextlib.suppress(*REDIS_DOWN):
            self.stop()


class TrainingWorker(Worker):
    """``rq.Worker`` with JSON jobs, a supervised ``TrainingScheduler`` and prompt cleanup of
    jobs abandoned by dead workers.

    ``stuck_after_s``: how old a running job's heartbeat may get before RQ treats the job as
    abandoned (RQ: the monitoring interval + 60 s). ``job_monitoring_interval`` (the heartbeat
    period) and ``maintenance_interval`` are RQ's own arguments.

    Only jobs of ``runtime.queue.jobs.JOB_FUNCTION`` run, plus ``extra_job_functions`` (dotted names,
    for tests' own job modules): any other job is failed without importing or calling anything
    (``execute_job``), since whoever can write Redis can enqueue any function name. Callbacks
    and webhooks named in a job record are never used (``TrainingJob``).
    """

    # RQ backs off up to 60 s between reconnects; a restarted Redis is used within seconds.
    max_connection_wait_time = 5.0

    def __init__(
        self,
        queues: Sequence[str],
        *,
        stuck_after_s: int,
        extra_job_functions: Iterable[str] = (),
        preload: bool = True,
        **kwargs: Any,
    ) -> None:
        self.stuck_after_s = stuck_after_s
        self.preload = preload
        self._preloaded = False
        self.allowed_functions = frozenset(
            {JOB_FUNCTION, *CONVERSION_FUNCTIONS, *extra_job_functions}
        )
        super().__init__(queues, serializer=SERIALIZER, job_class=TrainingJob, **kwargs)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        name: str | None = None,
        extra_job_functions: Iterable[str] = (),
        queues: Sequence[str] = QUEUES,
        preload: bool = True,
    ) -> TrainingWorker:
        """The worker of ``queues`` ("training": TRAINING_QUEUE, "convert": CONVERT_QUEUE, in
        that order of priority) on REDIS_URL with the settings' heartbeat timings."""
        names = {"training": settings.training_queue, "convert": settings.convert_queue}
        return cls(
            [names[q] for q in queues],
            name=name or f"stable-sam-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
            connection=redis.Redis.from_url(settings.redis_url),
            job_monitoring_interval=settings.train_heartbeat_s,
            maintenance_interval=settings.train_maintenance_interval_s,
            stuck_after_s=settings.train_stuck_after_s,
            extra_job_functions=extra_job_functions,
            preload=preload,
        )

    # --- which jobs run -------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        """RQ's ``execute_job`` (fork a work horse that imports and runs the job's function) for
        the jobs ``refusal`` allows; any other job fails here, in the worker, without a retry,
        before anything of it is imported."""
        try:
            reason = refusal(job, self.allowed_functions)
        except (ValueError, TypeError):  # a job record RQ cannot read (not [func, inst, ...])
            reason = "an unreadable job record"
        if reason is None:
            if self.preload and job.func_name in CONVERSION_FUNCTIONS and not self._preloaded:
                self._preloaded = True
                self.log.info("Worker %s: job modules imported in %.1f s", self.name,
                              preload_job_modules())  # fmt: skip
            super().execute_job(job, queue)
            return
        self.log.error(
            "Worker %s: refused job %s of queue %s (%s): failed without running it",
            self.name,
            job.id,
            queue.name,
            reason,
        )
        job.retries_left = None  # no retry
        self.prepare_execution(job)
        job.ended_at = now()
        self.handle_job_failure(
            job, queue=queue, exc_string=f"refused by the training worker: {reason}"
        )
        self.set_state(WorkerStatus.IDLE)

    # --- when a job counts as abandoned -------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job) -> int:
        """Seconds a heartbeat keeps ``job`` in the StartedJobRegistry: RQ's rule with
        ``stuck_after_s`` in place of its 60 s margin past the monitoring interval."""
        margin = self.stuck_after_s - self.job_monitoring_interval
        if job.timeout and job.timeout > 0:
            remaining = job.timeout - self.current_job_working_time
            return max(1, int(min(remaining, self.job_monitoring_interval)) + margin)
        return self.job_monitoring_interval + margin

    def register_birth(self) -> None:
        super().register_birth()
        self.connection.hset(self.key, "process_space", PROCESS_SPACE)

    @property
    def dequeue_timeout(self) -> int:
        # RQ waits worker_ttl - 15 s (405 s) for a job; wake up for each maintenance round.
        return max(1, min(self.worker_ttl - 15, self.maintenance_interval))

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        super().fork_work_horse(job, queue)
        # Recorded so that a restarted worker can tell a dead worker with a live horse (still
        # running the job: not abandoned) from a dead one.
        self.connection.hset(self.key, "horse_pid", self.horse_pid)

    # While the horse runs, RQ lets a Redis error in these two end the worker's loop (the horse
    # runs on, unwatched); here it costs one missed heartbeat.

    def set_current_job_working_time(
        self, current_job_working_time: float, pipeline: Pipeline | None = None
    ) -> None:
        try:
            super().set_current_job_working_time(current_job_working_time, pipeline)
        except REDIS_DOWN as exc:
            self.log.warning("Worker %s: Redis unavailable (%s)", self.name, exc)

    def maintain_heartbeats(self, job: Job) -> None:
        """RQ's heartbeat of the running job, then a check on the scheduler process."""
        try:
            super().maintain_heartbeats(job)
            self.keep_scheduler_running()
        except REDIS_DOWN as exc:
            self.log.warning("Worker %s: heartbeat of job %s failed (%s)", self.name, job.id, exc)

    # --- maintenance ----------------------------------------------------------------------

    def run_maintenance_tasks(self) -> None:
        self.keep_scheduler_running()
        self.expire_jobs_of_dead_workers()
        super().run_maintenance_tasks()

    def clean_registries(self) -> None:
        """RQ's registry cleaning (``rq.registry.clean_registries``: abandoned jobs retried or
        failed, expired entries dropped), one worker per queue at a time, with a cleaning lock
        that expires after ``CLEANING_LOCK_TTL_S`` (RQ: 899 s) and is released even when the
        cleaning fails, and logged at debug level: it runs every few seconds."""
        for queue in self.queues:
            if not self.connection.set(
                queue.registry_cleaning_key, self.name, nx=True, ex=CLEANING_LOCK_TTL_S
            ):
                continue
            try:
                self.log.debug("Worker %s: cleaning registries of queue %s", self.name, queue.name)
                clean_registries(queue, self._exc_handlers)
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
            finally:
                with contextlib.suppress(*REDIS_DOWN):
                    queue.release_maintenance_lock()
        self.last_cleaned_at = now()

    def _start_scheduler(
        self,
        burst: bool = False,
        logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
        log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:
        """RQ's ``_start_scheduler`` with a ``TrainingScheduler``, after reclaiming a lock that
        a dead scheduler holds."""
        if burst:
            super()._start_scheduler(burst, logging_level, date_format, log_format)
            return
        self.scheduler = TrainingScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format,
            log_format=log_format,
            serializer=self.serializer,
        )
        self.keep_scheduler_running()

    def keep_scheduler_running(self) -> None:
        """Start the scheduler process if it is not running and the queue's scheduler lock is
        free, or held by a dead scheduler."""
        scheduler = self.scheduler
        if scheduler is None or self._shutdown_requested_date is not None:  # RQ stopped it
            return
        process = scheduler._process
        if process is not None and process.is_alive():
            return
        if process is not None:
            self.log.warning(
                "Worker %s: scheduler process %s exited (code %s), restarting it",
                self.name,
                process.pid,
                process.exitcode,
            )
            scheduler._process = None
        self.reclaim_scheduler_locks()
        scheduler.acquire_locks(auto_start=True)

    def reclaim_scheduler_locks(self) -> None:
        """Release a queue's scheduler lock held by a scheduler that is dead: a process of this
        process space that no longer exists, or one whose heartbeat is older than
        ``stuck_after_s``.

        A lock whose holder left no record (starting up, or another RQ) is left to expire.
        """
        own = self.scheduler.name if self.scheduler is not None else None
        for queue in self.queues:
            key = RQScheduler.get_locking_key(queue.name)
            holder = self.connection.get(key)
            if holder is None or holder.decode() == own:
                continue
            try:
                other = RQScheduler.fetch(holder.decode(), self.connection)
            except (SchedulerNotFound, KeyError, ValueError):  # no (complete) record
                continue
            beat_age = (now() - other.last_heartbeat).total_seconds() if other.last_heartbeat else 0
            space = self.connection.hget(other.key, "process_space")
            local = space is not None and space.decode() == PROCESS_SPACE
            gone = local and not self._alive_elsewhere(other.pid)
            if (gone or beat_age > self.stuck_after_s) and release_lock(
                self.connection, key, other.name
            ):
                self.log.warning(
                    "Worker %s: reclaimed the scheduler lock of %s from dead scheduler %s "
                    "(pid %s on %s, heartbeat %.0f s ago)",
                    self.name,
                    queue.name,
                    other.name,
                    other.pid,
                    other.hostname,
                    beat_age,
                )

    def expire_jobs_of_dead_workers(self) -> None:
        """Mark as abandoned now the running jobs of workers of this process space whose worker
        and work horse processes are both gone, so that this round's registry cleanup (RQ's
        ``StartedJobRegistry.cleanup``) retries or fails them."""
        for queue in self.queues:
            registry = StartedJobRegistry(queue=queue, serializer=self.serializer)
            for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
                execution = Execution(execution_id, job_id, connection=self.connection)
                with contextlib.suppress(ValueError):  # execution record expired: RQ cleans it
                    execution.refresh()
                name = execution.worker_name
                if not name or name == self.name:
                    continue
                info = {
                    k.decode(): v.decode()
                    for k, v in self.connection.hgetall(
                        self.redis_worker_namespace_prefix + name
                    ).items()
                }
                if info.get("process_space") != PROCESS_SPACE:
                    continue  # pids we cannot check: the job's heartbeat tells (stuck_after_s)
                pids = (int(info.get("pid") or 0), int(info.get("horse_pid") or 0))
                if any(self._alive_elsewhere(pid) for pid in pids):
                    continue
                self.connection.zadd(registry.key, {execution.composite_key: 0}, xx=True)
                self.log.warning(
                    "Worker %s: job %s was running on worker %s (pid %s, horse %s), whose "
                    "processes are gone: abandoned",
                    self.name,
                    job_id,
                    name,
                    *pids,
                )

    def _alive_elsewhere(self, pid: int) -> bool:
        """Whether ``pid`` is a live process other than this worker and its children (a dead
        worker's pid may have been reused by this one, e.g. pid 1 in a restarted container)."""
        ours = {os.getpid(), self.horse_pid}
        if self.scheduler is not None and self.scheduler._process is not None:
            ours.add(self.scheduler._process.pid)
        return pid not in ours and process_alive(pid)


# Imported by the worker itself before it forks its first conversion job: each later job's work
# horse inherits them instead of importing them again (torch, segment_anything and the SDK take
# ~3-5 s to import on a busy 2-core CPU; a conversion job runs a few seconds). Not at start-up,
# which stays quick (a restarted worker reclaims the scheduler and runs retries at once).
# Importing builds no thread pool and touches no GPU, so the fork stays safe.
PRELOADED_MODULES = (
    "torch",
    "stable_sam",
    "segment_anything",
    "label_studio_sdk.client",
    "training.jobs",
    "training.conversion",
)


def preload_job_modules() -> float:
    """Import ``PRELOADED_MODULES``; return the seconds it took."""
    import importlib

    started = time.perf_counter()
    for name in PRELOADED_MODULES:
        importlib.import_module(name)
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m training.worker",
        description="Run the Stable-SAM training worker (settings from the environment: "
        "REDIS_URL, TRAINING_QUEUE, TRAIN_*; see the README).",
    )
    parser.add_argument("--name", help="worker name (default: stable-sam-<host>-<pid>-<random>)")
    parser.add_argument(
        "--allow-job-function",
        action="append",
        default=[],
        metavar="DOTTED.NAME",
        help=f"also run jobs of this function (repeatable; for tests: by default only "
        f"{JOB_FUNCTION} runs)",
    )
    parser.add_argument(
        "--queue",
        action="append",
        choices=QUEUES,
        help="listen on this queue only (repeatable): training (TRAINING_QUEUE) or convert "
        "(CONVERT_QUEUE); default: both, training jobs first",
    )
    parser.add_argument(
        "--no-preload",
        action="store_true",
        help="do not import torch and the job modules in the worker before its first conversion "
        "job (each job then imports them)",
    )
    args = parser.parse_args(argv)
    settings = Settings()
    # Before RQ's own set-up, which then logs through this handler (one format, tokens
    # redacted) instead of adding its own; the scheduler and work horses inherit it.
    configure_logging(settings.log_level)
    worker = TrainingWorker.from_settings(
        settings,
        name=args.name,
        extra_job_functions=args.allow_job_function,
        queues=[q for q in QUEUES if q in (args.queue or QUEUES)],
        preload=not args.no_preload,
    )
    worker.work(with_scheduler=True, logging_level=settings.log_level.upper())


if __name__ == "__main__":
    main()
