"""Optional HTTP basic auth for every endpoint, the webhook shared secret, and log redaction."""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from backend.settings import Settings

# Token-looking strings: "Token abc", "Bearer abc", JWTs, 40-hex legacy tokens, and JSON/query
# fields named like secrets. Replaced before any handler sees the record.
_SECRET_PATTERNS = (
    re.compile(r"(?i)\b(token|bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"),
    re.compile(r"\b[0-9a-f]{40}\b"),
    re.compile(
        r"(?i)([\"']?(?:access_token|refresh|access|token|api_key|password|secret)[\"']?\s*[:=]\s*)"
        r"[\"']?[^\s,\"'&}]+[\"']?"
    ),
)


def redact(text: str) -> str:
    """``text`` with token-looking substrings replaced by ``***``."""
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + "***", text)
        else:
            text = pattern.sub("***", text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs tokens from every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` unless logging is configured already; redact tokens."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per image download
    install_log_redaction()


def install_log_redaction() -> None:
    """Attach ``RedactingFilter`` to every handler of the root and uvicorn loggers (idempotent)."""
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


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
