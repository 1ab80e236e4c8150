"""Where the training queue keeps its per-project state in Redis.

``state_key(project)`` is a hash, written by the triggers (web process) and by the job itself
(worker), read by the status:

- ``queued``, ``queued_triggers``: the job waiting to run (queued, or deferred behind the
  running one) and how many triggers it covers;
- ``running``, ``running_triggers``: the job that has marked itself started;
- ``pending_annotations``: annotation events counted since the last enqueue
  (TRAIN_ON=annotations);
- ``last_finished``; ``last_failure_job``, ``last_failure_error``, ``last_failure_at``: the
  newest attempt that ended, and the newest that failed.

``history_key(project)`` lists the project's newest ``HISTORY_LENGTH`` job ids, newest first;
``projects_key()`` is the set of projects that ever had a trigger.
"""

from __future__ import annotations

import redis
from redis.client import Pipeline

KEY_PREFIX = "stable-sam:training"
HISTORY_LENGTH = 20


def state_key(project: str) -> str:
    return f"{KEY_PREFIX}:{project}"


def history_key(project: str) -> str:
    return f"{KEY_PREFIX}:{project}:jobs"


def projects_key() -> str:
    return f"{KEY_PREFIX}:projects"


def attempts_key(job_id: str) -> str:
    """The attempt counter of one job (RQ retries re-run the same job id)."""
    return f"{KEY_PREFIX}:attempts:{job_id}"


def read_state(client: redis.Redis | Pipeline, project: str) -> dict[str, str]:
    """The state hash of ``project``, decoded (empty when the project never had a trigger)."""
    raw = client.hgetall(state_key(project))
    return {k.decode(): v.decode() for k, v in raw.items()}
