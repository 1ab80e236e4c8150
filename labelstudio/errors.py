"""The errors of the whole service, and those raised while reading Label Studio's data.

Every error the service answers is a ``ServiceError``: an HTTP status, a short machine-readable
``code`` and a ``detail`` naming the problem; the JSON body is ``{"error": code, "detail": ...}``.
The base lives here, on the lowest floor that raises such errors (task images, labeling configs,
regions), so the adapter needs nothing from the web layer; ``backend.errors`` adds the web
layer's own. Raising one anywhere fails only the request (or training task) that caused it.
"""

from __future__ import annotations

from typing import Any


def quoted(text: str, limit: int = 60) -> str:
    """``text`` as an error message shows a caller's value: ``repr``, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


class ServiceError(Exception):
    """Base class of every error the service answers: ``status_code`` and a short ``code``."""

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


class InvalidRequestError(ServiceError):
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


class LabelStudioError(ServiceError):
    """Label Studio could not be reached, refused our token, or answered something unusable (502)."""

    status_code = 502
    code = "label_studio_error"

    def __init__(self, detail: str, *, answered: int | None = None, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.answered = answered  # the HTTP status Label Studio answered, when it answered


class ImageFetchError(ServiceError):
    """The task's image could not be downloaded (502 upstream error, 504 timeout, 404)."""

    status_code = 502
    code = "image_fetch_failed"


class ImageDecodeError(ServiceError):
    """The downloaded bytes are not a readable image (corrupt or truncated) (422)."""

    status_code = 422
    code = "image_unreadable"


class ImageTooLargeError(ServiceError):
    """The image exceeds IMAGE_MAX_PIXELS or IMAGE_MAX_BYTES (413)."""

    status_code = 413
    code = "image_too_large"


class ImageDecodeBusyError(ServiceError):
    """No decode slot or decode memory budget came free in IMAGE_DECODE_WAIT_S (503)."""

    status_code = 503
    code = "image_decode_busy"


class UntrustedLabelStudioError(ServiceError):
    """``/setup`` named a Label Studio other than the trusted one (403)."""

    status_code = 403
    code = "untrusted_label_studio"
