"""Logging for every process (web backend, training worker, CLIs): one format, tokens redacted."""

from __future__ import annotations

import logging
import re

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
