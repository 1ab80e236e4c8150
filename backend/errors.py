"""The web layer's own errors (model unavailable, request limits, malformed JSON) and the ASCII
JSON response every error body is rendered with. The error shape (``ServiceError``) and the
errors of Label Studio's data live in ``labelstudio.errors``."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from starlette.responses import JSONResponse

from labelstudio.errors import InvalidRequestError, ServiceError
from runtime.project_ids import MAX_PROJECT_ID_DIGITS

logger = logging.getLogger(__name__)


class AsciiJSONResponse(JSONResponse):
    """A JSON response rendered with ``ensure_ascii``: a caller's value echoed in it (an error
    naming a field's value, the webhook's ``action``) may hold lone surrogates ("\\ud800" in
    the request's JSON), which UTF-8 cannot encode; Starlette's ``JSONResponse`` then fails."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, indent=None, separators=(",", ":")
        ).encode("ascii")


class ModelUnavailableError(ServiceError):
    """The model could not be built or loaded (503)."""

    status_code = 503
    code = "model_unavailable"


class RequestTooLargeError(ServiceError):
    """The request exceeds a request limit (MAX_BODY_BYTES, MAX_TASKS_PER_PREDICT, ...) (413)."""

    status_code = 413
    code = "request_too_large"


def error_response(status_code: int, code: str, detail: str, **more: Any) -> AsciiJSONResponse:
    """The service's error body ``{"error": code, "detail": ..., **more}``."""
    return AsciiJSONResponse({"error": code, "detail": detail, **more}, status_code=status_code)


def invalid_project_id(field: str) -> AsciiJSONResponse:
    """The 400 for a project id (at ``field``) ``normalize_project_id`` refused."""
    return error_response(
        400,
        "invalid_request",
        f"{field}: must be a non-negative integer project id of at most "
        f"{MAX_PROJECT_ID_DIGITS} ASCII digits",
    )


def queue_unavailable(redis_url: str, exc: Exception, queue: str, lost: str) -> AsciiJSONResponse:
    """The 503 for Redis unreachable or busy behind ``queue`` (logged, the location without
    credentials); ``lost`` says what the request did not do."""
    where = redis_location(redis_url)
    logger.error("%s queue unreachable at %s: %s", queue, where, type(exc).__name__)
    return error_response(
        503,
        "queue_unavailable",
        f"the {queue} queue (Redis at {where}) is unreachable or busy ({type(exc).__name__}); "
        f"{lost}, send it again when Redis is back",
    )


def redis_location(url: str) -> str:
    """host:port/db of a Redis URL, without credentials."""
    kwargs = redis.connection.parse_url(url)
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def malformed_json(exc: BaseException) -> InvalidRequestError:
    """The 400 for a request body Python's ``json`` module refused with ``exc``.

    Besides invalid JSON (``JSONDecodeError``, ``UnicodeDecodeError``), valid JSON is refused when
    it nests deeper than the interpreter's recursion limit (``RecursionError``) or holds an
    integer of more than ``sys.get_int_max_str_digits()`` digits (a plain ``ValueError``).
    """
    if isinstance(exc, RecursionError):
        detail = "the request body nests JSON arrays/objects too deeply to parse"
    elif isinstance(exc, ValueError) and "integer string conversion" in str(exc):
        detail = "the request body holds an integer with too many digits to parse"
    else:
        detail = "the request body is not valid JSON"
    return InvalidRequestError(detail, code="malformed_json")
