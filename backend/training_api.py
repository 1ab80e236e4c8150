"""``POST /webhook``, ``GET /versions``, ``GET /status``: the training side of the HTTP API (and
the box conversion runs in ``/status``).

``backend.app.create_app`` includes ``build_training_router(settings)``. The webhook only records
the trigger in Redis (``runtime.queue``) and answers within milliseconds: Label Studio gives event
webhooks 1 s and never retries them (DESIGN §3). With Redis down the webhook answers 503 at once
(short socket timeouts, no retries) and ``/predict`` is unaffected, since nothing here runs on
its path. Webhook bodies carry the project's token: they are never logged, and errors name the
offending field, never its value.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from backend.errors import (
    AsciiJSONResponse,
    error_response,
    invalid_project_id,
    malformed_json,
    queue_unavailable,
)
from runtime.project_ids import normalize_project_id
from runtime.queue.connection import redis_connection
from runtime.queue.conversion import Conversions
from runtime.queue.status import TrainingStatus
from runtime.queue.triggers import TRAINING_ACTIONS, QueueFullError, TrainingTriggers
from runtime.settings import Settings
from runtime.versions import (
    PluginVersion,
    VersionStore,
    VersionStoreUnavailableError,
    open_version_store,
)

logger = logging.getLogger(__name__)


def _redis_down(settings: Settings, exc: Exception) -> JSONResponse:
    return queue_unavailable(
        settings.redis_url, exc, "training", "the training request was not recorded"
    )


def _versions_down(exc: VersionStoreUnavailableError) -> JSONResponse:
    logger.error("%s", exc)
    return error_response(503, "versions_unavailable", f"{exc}; ask again when it is back")


def _versions_malformed(exc: ValueError) -> JSONResponse:
    return error_response(502, "versions_malformed", str(exc))


def _version_view(version: PluginVersion | None) -> dict[str, Any] | None:
    if version is None:
        return None
    return {
        "name": version.name,
        "created": version.created,
        "metrics": version.metrics,
        "reason": version.reason,
    }


def build_training_router(settings: Settings, connection: redis.Redis | None = None) -> APIRouter:
    """The router with ``/webhook``, ``/versions``, ``/status`` and ``/status/{project}``;
    ``/status`` also shows each project's latest box conversion run."""
    router = APIRouter()
    connection = connection or redis_connection(settings.redis_url)
    conversions = Conversions.from_settings(settings, connection)
    triggers = TrainingTriggers.from_settings(settings, connection)
    status = TrainingStatus.from_settings(settings, connection)
    store = open_version_store(settings)

    @router.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        """Record a Label Studio training trigger; training runs in the RQ worker."""
        body = await request.body()
        try:
            # On a worker thread: an annotation event's body can be MBs, and parsing it on
            # the event loop would hold up /health.
            data = await run_in_threadpool(json.loads, body)
        except (ValueError, RecursionError) as exc:  # also too deep or too long an integer
            error = malformed_json(exc)
            return error_response(error.status_code, error.code, error.detail)
        if not isinstance(data, dict):
            return error_response(400, "invalid_request", "the body must be a JSON object")
        action = data.get("action")
        if not isinstance(action, str) or not action:
            return error_response(400, "invalid_request", "action: a non-empty string is required")
        if action not in TRAINING_ACTIONS:
            return AsciiJSONResponse({"status": "ignored", "action": action})  # echoes the caller
        if "project" not in data:
            return error_response(400, "invalid_request", f"project: required for {action}")
        project = normalize_project_id(data["project"])
        if project is None:
            return invalid_project_id("project.id")
        try:
            result = await run_in_threadpool(triggers.handle_event, project, action)
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.LockError) as exc:
            return _redis_down(settings, exc)
        except QueueFullError as exc:
            logger.warning("training queue full: project %s not queued", project)
            return error_response(
                503,
                "queue_full",
                f"{exc.limit} training jobs are queued already (MAX_QUEUED_TRAINING_JOBS); the "
                "training request was not recorded, send it again when the queue has room",
            )
        return AsciiJSONResponse({**result.to_dict(), "action": action})

    @router.get("/versions")
    def versions(project: str | None = None) -> JSONResponse:
        """``{"versions": [...]}``: plugin version names of ``project`` (or of all), oldest first."""
        key = normalize_project_id(project) if project is not None else None
        if project is not None and key is None:
            return error_response(400, "invalid_request", "project: must be a numeric project id")
        try:
            return JSONResponse({"versions": [v.name for v in store.list(key)]})
        except VersionStoreUnavailableError as exc:
            return _versions_down(exc)
        except ValueError as exc:
            return _versions_malformed(exc)

    @router.get("/status")
    def status_all() -> JSONResponse:
        """Training status of every project that had a trigger or has versions."""
        try:
            # Only canonical ids: Redis may still hold what an older version let in ("07", a
            # 5,000-digit id), which must not break the listing of every other project.
            known = set(status.projects()) | set(store.projects()) | set(conversions.projects())
            projects = sorted((p for p in known if normalize_project_id(p) == p), key=int)
            statuses = [_project_status(status, store, conversions, p) for p in projects]
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.LockError) as exc:
            return _redis_down(settings, exc)
        except VersionStoreUnavailableError as exc:
            return _versions_down(exc)
        return JSONResponse({"projects": statuses})

    @router.get("/status/{project}")
    def status_one(project: str) -> JSONResponse:
        """Queued/running job, progress, last run, last failure, current version of one project."""
        key = normalize_project_id(project)
        if key is None:
            return error_response(400, "invalid_request", "project: must be a numeric project id")
        try:
            return JSONResponse(_project_status(status, store, conversions, key))
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.LockError) as exc:
            return _redis_down(settings, exc)
        except VersionStoreUnavailableError as exc:
            return _versions_down(exc)

    return router


def _project_status(
    status: TrainingStatus, store: VersionStore, conversions: Conversions, project: str
) -> dict[str, Any]:
    view = status.status(project)
    try:
        view["current_version"] = _version_view(store.current(project))
    except ValueError as exc:  # a malformed manifest: this project's view says so, no 500
        view["current_version"] = None
        view["versions_error"] = str(exc)
    view["conversion"] = conversions.latest(project)
    return view
