"""RQ jobs for tests/integration/test_worker_recovery.py, run by a real worker process.

The worker imports them as ``tests.integration.recovery_jobs`` (PYTHONPATH is the repository
root). Each job appends the wall-clock time (``time.time()``) at which an attempt starts to the
Redis list ``attempts_key(job_id)``, so the test reads when every attempt ran.
"""

from __future__ import annotations

import time

from rq import get_current_job

from runtime.queue.jobs import mark_started

# The name the worker imports this module by (pytest imports it as ``integration.*``).
MODULE = "tests.integration.recovery_jobs"
# What a worker of the recovery tests runs besides the training job (`--allow-job-function`).
FUNCTIONS = tuple(
    f"{MODULE}.{name}"
    for name in ("fail_first_attempt", "hang_first_attempt", "hold_training_slot")
)


def attempts_key(job_id: str) -> str:
    return f"test:attempts:{job_id}"


def _record_attempt() -> int:
    """Record this attempt's start; return its number (1 for the first)."""
    job = get_current_job()
    assert job is not None
    return int(job.connection.rpush(attempts_key(job.id), time.time()))


def fail_first_attempt() -> str:
    """Raise on the first attempt, succeed on the next."""
    if _record_attempt() == 1:
        raise RuntimeError("the first attempt fails on purpose")
    return "ok"


def hang_first_attempt(seconds: float = 120.0) -> str:
    """Block on the first attempt (the test kills it), succeed on the next."""
    if _record_attempt() == 1:
        time.sleep(seconds)
    return "ok"


def hold_training_slot(project: str, seconds: float) -> str:
    """A training job's bookkeeping without the training: the job marks itself running for
    ``project`` (as ``training.jobs.train_project`` does), then sleeps."""
    job = get_current_job()
    assert job is not None
    _record_attempt()
    mark_started(job, project)
    time.sleep(seconds)
    return "ok"
