"""``POST /convert``, ``GET /convert/{project}``, ``DELETE /convert/{project}``: the project-wide
box conversion (``runtime.queue.conversion``; its jobs run on the workers,
``training.conversion``).

``POST /convert`` with ``{"project": 3}`` (optional ``"chunk_tasks"``) answers 202 with the run's
status at once: the web process records the run and enqueues its plan job, nothing more. The
run converts with the model version the project is served with now. Errors, in the service's
JSON shape: 400 a malformed body or project id, 409 the project has an active run (its status
in ``run``), 422 a labeling config (known from ``/setup``) with nothing to convert, 503 Redis
unreachable. The run's progress is also in ``GET /status/{project}`` (``conversion``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
from labelstudio.errors import LabelConfigError
from labelstudio.label_config import parse_label_config
from runtime.project_ids import normalize_project_id
from runtime.queue.connection import ContentionError
from runtime.queue.conversion import (
    ConversionRunningError,
    Conversions,
    InvalidChunkTasksError,
    check_chunk_tasks,
)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, ContentionError)
MAX_BODY_BYTES = 4096


def build_conversion_router(
    redis_url: str,
    conversions: Conversions,
    model_version: Callable[[str], str],
    label_config: Callable[[str], str | None],
) -> APIRouter:
    """The conversion endpoints (``redis_url``: named, without credentials, when Redis is
    down). ``model_version(project)``: what the project is served with;
    ``label_config(project)``: its labeling config from ``/setup``, if known."""
    router = APIRouter()

    def start(project: str, chunk_tasks: int | None) -> JSONResponse:
        warnings: list[str] = []
        xml = label_config(project)
        if xml:
            try:
                warnings = parse_label_config(xml).box_conversion_warnings()
            except LabelConfigError as exc:
                return error_response(422, exc.code, exc.detail)
        try:
            view = conversions.start(project, model_version(project), chunk_tasks)
        except ConversionRunningError as exc:
            return error_response(
                409,
                "conversion_running",
                f"project {project} has a conversion run that is {exc.view['state']} "
                f"({exc.view['run_id']}); DELETE /convert/{project} cancels it",
                run=exc.view,
            )
        return AsciiJSONResponse({**view, "config_warnings": warnings}, status_code=202)

    @router.post("/convert")
    async def convert(request: Request) -> JSONResponse:
        """Start converting a project's boxes into mask predictions (202: queued)."""
        body = b""
        async for part in request.stream():  # read no more than the limit
            body += part
            if len(body) > MAX_BODY_BYTES:
                return error_response(
                    413, "request_too_large", f"the body is over {MAX_BODY_BYTES} bytes"
                )
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            error = malformed_json(exc)
            return error_response(error.status_code, error.code, error.detail)
        if not isinstance(data, dict):
            return error_response(
                400, "invalid_request", 'the body must be a JSON object: {"project": 3}'
            )
        unknown = sorted(set(data) - {"project", "chunk_tasks"})
        if unknown:
            return error_response(
                400, "invalid_request", f"unknown field(s): {', '.join(unknown)[:200]}"
            )
        project = normalize_project_id(data.get("project"))
        if project is None:
            return invalid_project_id("project")
        chunk_tasks = data.get("chunk_tasks")
        try:
            check_chunk_tasks(chunk_tasks)  # before the thread: start checks it again
        except InvalidChunkTasksError as exc:
            return error_response(400, "invalid_request", str(exc))
        try:
            return await run_in_threadpool(start, project, chunk_tasks)
        except REDIS_ERRORS as exc:
            return queue_unavailable(redis_url, exc, "conversion", "nothing was done")

    def _run_of(project: str, action: Callable[[str], dict[str, Any] | None]) -> JSONResponse:
        key = normalize_project_id(project)
        if key is None:
            return invalid_project_id("project")
        try:
            view = action(key)
        except REDIS_ERRORS as exc:
            return queue_unavailable(redis_url, exc, "conversion", "nothing was done")
        if view is None:
            return error_response(404, "not_found", f"project {key} has no conversion run")
        return AsciiJSONResponse(view)

    @router.get("/convert/{project}")
    def conversion(project: str) -> JSONResponse:
        """The project's latest run: state, tasks done / skipped / failed, failed tasks."""
        return _run_of(project, conversions.latest)

    @router.delete("/convert/{project}")
    def cancel(project: str) -> JSONResponse:
        """Cancel the project's active run (chunks stop at their next task)."""
        return _run_of(project, conversions.cancel)

    return router
