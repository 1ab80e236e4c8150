"""Bounds on what one request may ask of the backend, each a setting (README: ``MAX_*``).

``BodySizeLimit`` (a pure ASGI middleware) bounds the body of every request while it streams in;
``RequestLimits`` bounds what a parsed ``/predict`` or ``/setup`` holds: tasks, regions, keypoints
per prompt and per request, and the labeling config. Every limit is checked before any image
download or model work, and answered 413 ``request_too_large`` naming the setting to raise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence, Sized
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.errors import RequestTooLargeError
from labelstudio.download import declared_length
from labelstudio.errors import quoted
from labelstudio.regions import RegionGroup
from runtime.settings import Settings

logger = logging.getLogger(__name__)

# /setup's fields besides its schema (project, hostname, token, extra_params), bytes.
SETUP_OVERHEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class RequestLimits:
    """The content limits of ``/predict`` and ``/setup`` (see ``Settings``, "Request limits")."""

    max_tasks_per_predict: int
    max_regions: int
    max_points_per_prompt: int
    max_points_per_request: int
    max_label_config_bytes: int
    max_batch_tasks: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            max_tasks_per_predict=settings.max_tasks_per_predict,
            max_regions=settings.max_regions,
            max_points_per_prompt=settings.max_points_per_prompt,
            max_points_per_request=settings.max_points_per_request,
            max_label_config_bytes=settings.max_label_config_bytes,
            max_batch_tasks=settings.max_batch_tasks,
        )

    def check_batch_tasks(self, tasks: object) -> None:
        """Refuse a ``/predict`` of more tasks than any call may carry (``MAX_BATCH_TASKS``),
        before each is validated: validating millions holds the interpreter for seconds."""
        if isinstance(tasks, list) and len(tasks) > self.max_batch_tasks:
            raise RequestTooLargeError(
                f"{len(tasks)} tasks in one /predict; the limit is {self.max_batch_tasks} "
                "(MAX_BATCH_TASKS)"
            )

    def check_setup_body(self, body: bytes) -> None:
        """Refuse a ``/setup`` body that cannot be a labeling config and a few fields."""
        if len(body) > 2 * self.max_label_config_bytes + SETUP_OVERHEAD_BYTES:
            raise RequestTooLargeError(
                f"the /setup body is {len(body)} bytes; it carries one labeling config "
                f"(MAX_LABEL_CONFIG_BYTES={self.max_label_config_bytes}) and a few fields"
            )

    def check_tasks(self, tasks: Sized) -> None:
        """Refuse an interactive ``/predict`` with more than ``max_tasks_per_predict`` tasks."""
        if len(tasks) > self.max_tasks_per_predict:
            raise RequestTooLargeError(
                f"{len(tasks)} tasks in one /predict; the limit is {self.max_tasks_per_predict} "
                "(MAX_TASKS_PER_PREDICT)"
            )

    def check_regions(self, result: object) -> None:
        """Refuse a ``params.context.result`` of more than ``max_regions`` regions (unparsed)."""
        if isinstance(result, list) and len(result) > self.max_regions:
            raise RequestTooLargeError(
                f"params.context.result has {len(result)} regions; the limit is "
                f"{self.max_regions} (MAX_REGIONS)"
            )

    def check_points(self, groups: Sequence[RegionGroup]) -> None:
        """Refuse a prompt (one label's group) or a request with too many keypoints."""
        for group in groups:
            if len(group.keypoints) > self.max_points_per_prompt:
                raise RequestTooLargeError(
                    f"label {quoted(group.label)} has {len(group.keypoints)} keypoints; the "
                    f"limit for one prompt is {self.max_points_per_prompt} (MAX_POINTS_PER_PROMPT)"
                )
        total = sum(len(group.keypoints) for group in groups)
        if total > self.max_points_per_request:
            raise RequestTooLargeError(
                f"{total} keypoints in one /predict; the limit is {self.max_points_per_request} "
                "(MAX_POINTS_PER_REQUEST)"
            )

    def check_label_config(self, xml: str | None, field: str) -> None:
        """Refuse a labeling config (``field`` names it in the message) over the size limit."""
        if xml is None:
            return
        size = len(xml.encode("utf-8", errors="replace"))
        if size > self.max_label_config_bytes:
            raise RequestTooLargeError(
                f"{field} is {size} bytes; the limit is {self.max_label_config_bytes} bytes "
                "(MAX_LABEL_CONFIG_BYTES)"
            )


class _BodyCutOffError(Exception):
    """Raised into the app when the body it is reading passes the limit."""


class BodySizeLimit:
    """Pure ASGI middleware: a request body over ``max_bytes`` is answered 413.

    A declared ``Content-Length`` over the limit is answered at once, before any of the body is
    read. A body without one (chunked) is counted as it arrives and cut off the moment it passes
    the limit: no more of it is read, the app's own reaction to the cut-off body (an exception, a
    400) is discarded, and the client gets the 413 with ``Connection: close``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            detail = f"the request body is {declared} bytes (Content-Length); the limit is"
            await self._too_large(scope, detail)(scope, receive, send)
            return
        received = 0
        cut_off = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, cut_off
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    cut_off = True
                    raise _BodyCutOffError
            return message

        async def send_unless_cut_off(message: Message) -> None:
            nonlocal started
            if cut_off:
                return  # the app's answer to a body it could not finish reading
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, send_unless_cut_off)
        except Exception:
            # After a cut-off, whatever the app raised is its reaction to the missing rest of
            # the body (FastAPI wraps it, middleware may group it): the 413 below answers it.
            if not cut_off or started:
                raise
        if cut_off and not started:
            detail = "the request body (sent without Content-Length) is over the limit of"
            await self._too_large(scope, detail)(scope, receive, send)

    def _too_large(self, scope: Scope, detail: str) -> JSONResponse:
        error = RequestTooLargeError(f"{detail} {self.max_bytes} bytes (MAX_BODY_BYTES)")
        logger.warning("%s %s -> 413 %s: %s", scope.get("method"), scope.get("path"),
                       error.code, error.detail)  # fmt: skip
        return JSONResponse(error.to_json(), status_code=413, headers={"Connection": "close"})


def _content_length(scope: Scope) -> int | None:
    """The declared body size; a malformed header is left to the server (the body is counted)."""
    return declared_length(Headers(scope=scope).get("content-length"))
