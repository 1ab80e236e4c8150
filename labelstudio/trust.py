"""Which Label Studio the backend sends credentials to: the rule for ``/setup``'s hostname.

Anyone who can reach the backend can call ``/setup`` (Label Studio sends no credential of its
own), so what it says is a claim, not a fact. The rule, shared by the web process and the
training worker:

- ``LABEL_STUDIO_URL`` set: that is Label Studio. With ``LABEL_STUDIO_TRUST_SETUP`` off,
  ``/setup``'s hostname is ignored; with it on, a hostname of another origin is refused (403).
- ``LABEL_STUDIO_URL`` unset and ``LABEL_STUDIO_TRUST_SETUP`` on: the origin of the first
  hostname ``/setup`` reports is pinned (trust on first use, agreed between processes through
  Redis); any other origin is refused from then on. Not with ``LABEL_STUDIO_API_KEY``: the
  operator's key goes only to a Label Studio the operator named (``Settings`` refuses it).
- ``LABEL_STUDIO_URL`` unset and ``LABEL_STUDIO_TRUST_SETUP`` off (the default): the backend
  knows no Label Studio; relative image URLs fail with an error that says what to set.

Credentials only ever go to the trusted origin (``labelstudio.images`` sends them with a request
only when its origin is the trusted one; the token exchange posts only there).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import redis

from labelstudio.errors import UntrustedLabelStudioError

logger = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of an http(s) URL, lower-cased, default port dropped.

    ``None`` for anything else (no scheme, another scheme, no host, a bad port). Credentials
    in the URL (``user:pw@``) are not part of the origin.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except (ValueError, AttributeError):
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def base_url_of(url: str) -> str | None:
    """The origin plus the path (Label Studio may live under a prefix), without credentials,
    query or fragment and without a trailing slash; ``None`` if ``url`` is not http(s)."""
    origin = origin_of(url)
    if origin is None:
        return None
    return origin + urlsplit(url.strip()).path.rstrip("/")


PinStore = Callable[[str], str]
"""Pins a base URL for every process (Redis ``SET NX``) and returns the one pinned first."""


class LabelStudioTrust:
    """The trusted Label Studio base URL: configured, or pinned from the first ``/setup``.

    ``pin_store`` lets several processes agree on the pin; when it fails (Redis down) the pin
    is kept in this process only. Thread-safe.
    """

    def __init__(
        self, configured_url: str, trust_setup: bool, pin_store: PinStore | None = None
    ) -> None:
        self.configured_url = base_url_of(configured_url) if configured_url else None
        if configured_url and self.configured_url is None:
            raise ValueError(f"LABEL_STUDIO_URL must be an http(s) URL, not {configured_url!r}")
        self.trust_setup = trust_setup
        self.pin_store = pin_store
        self._pinned: str | None = None
        self._lock = threading.Lock()
        self._ignored_logged = False

    @property
    def base_url(self) -> str:
        """Where Label Studio is ("" when nothing is trusted yet)."""
        return self.configured_url or self._pinned or ""

    def is_trusted(self, url: str) -> bool:
        """True when ``url`` is on the trusted Label Studio's origin."""
        trusted = self.base_url
        return bool(trusted) and origin_of(url) == origin_of(trusted)

    def accept_setup_hostname(self, hostname: str | None) -> bool:
        """Check ``/setup``'s ``hostname``; True when what ``/setup`` sends may be used.

        Raises ``UntrustedLabelStudioError`` for a hostname of another origin than the trusted
        one (only when ``/setup`` is trusted at all: otherwise it is ignored, and False).
        """
        hostname = (hostname or "").strip()
        if not self.trust_setup:
            if hostname and not self._ignored_logged:
                self._ignored_logged = True
                logger.info(
                    "ignoring the Label Studio hostname and token /setup sends "
                    "(LABEL_STUDIO_TRUST_SETUP=false); Label Studio is %s",
                    self.configured_url or "not configured (set LABEL_STUDIO_URL)",
                )
            return False
        if not hostname:
            return True  # nothing claimed; a token goes only to the trusted origin anyway
        # The origin only: a path from /setup could point the pin at the wrong place on the
        # right host (Label Studio under a prefix: set LABEL_STUDIO_URL).
        candidate = origin_of(hostname)
        if candidate is None:
            raise UntrustedLabelStudioError(
                "/setup hostname is not an http(s) URL", code="invalid_label_studio_hostname"
            )
        with self._lock:
            if self.configured_url is None and self._pinned is None:
                self._pinned = self._pin(candidate)
                if self._pinned == candidate:
                    logger.info("trusting Label Studio at %s (first /setup)", origin_of(candidate))
        if not self.is_trusted(candidate):
            logger.warning(
                "refused /setup naming Label Studio %s: the trusted one is %s",
                origin_of(candidate),
                origin_of(self.base_url),
            )
            # Which Label Studio is trusted is for the operator's log, not for any caller.
            raise UntrustedLabelStudioError(
                f"/setup names Label Studio {candidate}, which this backend does not trust "
                f"({'LABEL_STUDIO_URL' if self.configured_url else 'the first /setup'} "
                "decides; the backend's log names it); see docs/SECURITY.md"
            )
        return True

    def _pin(self, candidate: str) -> str:
        if self.pin_store is None:
            return candidate
        try:
            return self.pin_store(candidate)
        except (redis.RedisError, OSError) as exc:  # Redis down or refusing: pin locally
            logger.warning(
                "cannot share the trusted Label Studio through Redis (%s); pinned in this "
                "process only",
                type(exc).__name__,
            )
            return candidate
