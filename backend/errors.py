"""The web layer's own errors (model unavailable, request limits, malformed JSON) and the ASCII
JSON response every error body is rendered with. The error shape (``ServiceError``) and the
errors of Label Studio's data live in ``labelstudio.errors``."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from labelstudio.errors import InvalidRequestError, ServiceError


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
