"""Optional HTTP basic auth for every endpoint, and the webhook shared secret."""

from __future__ import annotations

import base64
import binascii
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from runtime.settings import Settings


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def is_authorized(request: Request, settings: Settings) -> bool:
    """Basic auth matches, or (for /webhook) the shared-secret header matches, or auth is off."""
    if settings.webhook_secret is not None and request.url.path.startswith("/webhook"):
        sent = request.headers.get(settings.webhook_secret_header, "")
        if sent and secrets.compare_digest(
            sent.encode(), settings.webhook_secret.get_secret_value().encode()
        ):
            return True
        if not settings.basic_auth_enabled:
            return False
    if not settings.basic_auth_enabled:
        return True
    credentials = _basic_credentials(request.headers.get("authorization", ""))
    if credentials is None:
        return False
    assert settings.basic_auth_user is not None and settings.basic_auth_pass is not None
    user_ok = secrets.compare_digest(credentials[0].encode(), settings.basic_auth_user.encode())
    pass_ok = secrets.compare_digest(
        credentials[1].encode(), settings.basic_auth_pass.get_secret_value().encode()
    )
    return user_ok and pass_ok


def install_auth(app: FastAPI, settings: Settings) -> None:
    """Guard every endpoint with basic auth / the webhook secret when configured."""
    if not settings.basic_auth_enabled and settings.webhook_secret is None:
        return

    @app.middleware("http")
    async def _require_auth(request: Request, call_next):  # type: ignore[no-untyped-def]
        if is_authorized(request, settings):
            return await call_next(request)
        return JSONResponse(
            {"error": "unauthorized", "detail": "missing or wrong credentials"},
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="stable-sam-backend"'},
        )
