"""Errors the backend answers with: each maps to an HTTP status and a JSON body naming the problem.

The JSON body is ``{"error": <code>, "detail": <human-readable message>}``. Raising one of these
anywhere below the HTTP layer fails only the request that caused it.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse


def quoted(text: str, limit: int = 60) -> str:
    """``text`` as an error message shows a caller's value: ``repr``, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


class AsciiJSONResponse(JSONResponse):
    """A JSON response rendered with ``ensure_ascii``: a caller's value echoed in it (an error
    naming a field's value, the webhook's ``action``) may hold lone surrogates ("\\ud800" in
    the request's JSON), which UTF-8 cannot encode; Starlette's ``JSONResponse`` then fails."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, indent=None, separators=(",", ":")
        ).encode("ascii")


class BackendError(Exception):
    """Base class: ``status_code`` and a short machine-readable ``code``."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str, *, code: str | None = None, status_code: int | None = None):
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code

    def to_json(self) -> dict[str, str]:
        """The response body."""
        return {"error": self.code, "detail": self.detail}


class InvalidRequestError(BackendError):
    """The request is well-formed JSON but its content is unusable (400)."""

    status_code = 400
    code = "invalid_request"


class InvalidRegionError(InvalidRequestError):
    """A context region is malformed, outside the image, or of an unsupported type (422)."""

    status_code = 422
    code = "invalid_region"


class LabelConfigError(InvalidRequestError):
    """The project's labeling config cannot serve brush masks (400)."""

    code = "label_config"


class ImageFetchError(BackendError):
    """The task's image could not be downloaded (502 upstream error, 504 timeout, 404)."""

    status_code = 502
    code = "image_fetch_failed"


class ImageDecodeError(BackendError):
    """The downloaded bytes are not a readable image (corrupt or truncated) (422)."""

    status_code = 422
    code = "image_unreadable"


class ImageTooLargeError(BackendError):
    """The image exceeds IMAGE_MAX_PIXELS or IMAGE_MAX_BYTES (413)."""

    status_code = 413
    code = "image_too_large"


class ImageDecodeBusyError(BackendError):
    """No decode slot or decode memory budget came free in IMAGE_DECODE_WAIT_S (503)."""

    status_code = 503
    code = "image_decode_busy"


class ModelUnavailableError(BackendError):
    """The model could not be built or loaded (503)."""

    status_code = 503
    code = "model_unavailable"


class RequestTooLargeError(BackendError):
    """The request exceeds a request limit (MAX_BODY_BYTES, MAX_TASKS_PER_PREDICT, ...) (413)."""

    status_code = 413
    code = "request_too_large"


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
