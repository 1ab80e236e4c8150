"""Downloads from Label Studio and the hosts its tasks point to: resolving, limits, one deadline.

Label Studio tasks reference files as LS-relative paths (``/data/upload/<pid>/<file>``,
``/data/local-files/?d=...``, ``/tasks/<id>/presign/?fileuri=...``), cloud URIs (``s3://``,
``gs://``, ``azure-blob://``: resolved through LS's presign endpoint for the task) or plain
http(s) URLs (``resolve_image_url``). Every request has one deadline, from connecting to its
last byte (``DownloadDeadline``: httpx's timeouts bound each read, not their sum), a body is
refused past a byte limit while it streams in (``read_limited``), and URLs reach logs and error
messages only through ``display_url`` (no credentials, no signatures).
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from labelstudio.errors import InvalidRequestError
from labelstudio.trust import origin_of

T = TypeVar("T")

CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")


@dataclass(frozen=True)
class DownloadLimits:
    """What one request, and one downloaded image, may cost.

    ``timeout_s``: seconds from connecting to the last byte (a token exchange, a retry after a
    401 and redirects included); ``max_bytes``: the body, refused while it streams in (task
    files may live on any host); ``max_pixels``: W*H of a downloaded image, refused from its
    header before decoding (decompression bombs).
    """

    timeout_s: float = 30.0
    max_bytes: int = 100 * 1024 * 1024
    max_pixels: int = 50_000_000


def resolve_image_url(value: str, task_id: int | None, base_url: str) -> tuple[str, bool]:
    """Absolute URL of a task's image and whether to send Label Studio credentials with it."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError("the task's image field is empty or not a string")
    value = value.strip()
    if value.startswith(CLOUD_PREFIXES):
        if task_id is None:
            raise InvalidRequestError(
                f"cloud storage image {display_url(value)!r} needs the task id"
            )
        if not base_url:
            raise InvalidRequestError("cloud storage images need LABEL_STUDIO_URL")
        fileuri = base64.urlsafe_b64encode(value.encode()).decode()
        return f"{base_url}/tasks/{task_id}/presign/?fileuri={fileuri}", True
    if value.startswith("/"):
        if not base_url:
            raise InvalidRequestError(
                f"image path {display_url(value)!r} is relative to Label Studio; set "
                "LABEL_STUDIO_URL (or LABEL_STUDIO_TRUST_SETUP=true to take it from /setup)"
            )
        return base_url + value, True
    try:
        parts = urlsplit(value)
        _ = parts.port  # so does a port that is not a number in 0-65535
    except ValueError as exc:  # e.g. an unbalanced "[" in the host
        raise InvalidRequestError(
            f"the task's image URL cannot be parsed ({exc}); expected an http(s) URL"
        ) from exc
    if parts.scheme in ("http", "https") and parts.netloc:
        # Credentials go only to Label Studio's own origin, never to another host.
        same_origin = bool(base_url) and origin_of(value) == origin_of(base_url)
        if same_origin and "@" in parts.netloc:
            # httpx would send user:password as its own Authorization header in place of
            # ours, and Label Studio's 401 to it would look like a refusal of our token.
            raise InvalidRequestError(
                f"image URL {display_url(value)!r} on Label Studio's origin carries credentials "
                "of its own (user:password@); the backend sends Label Studio's token itself"
            )
        return value, same_origin
    raise InvalidRequestError(f"unsupported image URL scheme in {display_url(value)[:60]!r}")


class DownloadDeadline:
    """A wall-clock deadline for one download: connecting, headers and body, all requests of it.

    httpx's timeouts bound each network operation, not their sum: a server trickling a byte per
    second keeps a request alive as long as it likes. ``trace`` (httpcore's ``trace`` request
    extension) is told of every socket the download opens (``connect_tcp`` / ``start_tls``
    complete, the network stream in ``return_value``); when the deadline passes a timer shuts
    them down, which wakes a blocked read at once and fails the request. The client must not
    keep connections alive: a reused socket opens no connection, so the deadline would not see
    it. (A DNS lookup is not bounded: the socket does not exist yet.)

    Any client from ``deadline_client`` keeps to the deadline in scope: make each download's
    requests inside ``with DownloadDeadline(seconds) as deadline:``. A cut-off body can read as
    one that ended early, so a download is complete only if ``deadline.expired`` is still False.
    """

    def __init__(self, seconds: float) -> None:
        self._expires_at = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._scope: contextvars.Token[DownloadDeadline | None] | None = None

    def __enter__(self) -> DownloadDeadline:
        self._timer.start()
        self._scope = _current_deadline.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        if self._scope is not None:
            _current_deadline.reset(self._scope)

    @property
    def expired(self) -> bool:
        return self._expired

    def remaining_s(self) -> float:
        return max(0.0, self._expires_at - time.monotonic())

    def trace(self, event: str, info: dict) -> None:
        """httpcore's trace callback: remember each new connection's socket."""
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        sock = info["return_value"].get_extra_info("socket")
        with self._lock:
            self._sockets.append(sock)
            expired = self._expired
        if expired:  # connected just as the deadline passed
            _shut_down(sock)

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    """Shut a socket down from another thread: its blocked reader wakes to end-of-file."""
    # socket.socket's shutdown, not SSLSocket's: that one also drops the SSL object under the
    # reading thread's feet. A socket closed already, or detached by start_tls, raises OSError.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current_deadline: contextvars.ContextVar[DownloadDeadline | None] = contextvars.ContextVar(
    "download_deadline", default=None
)


def deadline_client(timeout_s: float, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """An httpx client (redirects followed) whose requests keep to the ``DownloadDeadline`` in
    scope; ``timeout_s`` bounds each network operation outside one. No connection is kept
    alive (see ``DownloadDeadline``)."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=True,  # httpx drops Authorization on cross-origin redirects
        limits=httpx.Limits(max_keepalive_connections=0),
        event_hooks={"request": [_apply_deadline]},
        transport=transport,
    )


def within_deadline(
    timeout_s: float,
    fetch: Callable[[], T],
    *,
    timed_out: Callable[[], Exception],
    failed: Callable[[httpx.HTTPError], Exception],
    unusable_url: Callable[[Exception], Exception],
    own_error: type[Exception],
) -> T:
    """``fetch()`` (requests of a ``deadline_client``) within a ``DownloadDeadline`` of
    ``timeout_s``: an httpx error becomes ``failed(exc)``, or ``timed_out()`` once the
    deadline has passed, as does an ``own_error`` (a token exchange cut short) then. A URL
    httpx or IDNA refuses becomes ``unusable_url(exc)``."""
    with DownloadDeadline(timeout_s) as deadline:
        try:
            result = fetch()
        # Not httpx.HTTPError: httpx.InvalidURL (a NUL in the path, "http://ⓛs.example"), an
        # IDNAError ("http://xn--") or the socket's own IDNA UnicodeError ("http://a..b").
        except (httpx.InvalidURL, UnicodeError) as exc:
            raise unusable_url(exc) from exc
        except httpx.HTTPError as exc:
            if deadline.expired or isinstance(exc, httpx.TimeoutException):
                raise timed_out() from exc
            raise failed(exc) from exc
        except own_error as exc:
            if deadline.expired:
                raise timed_out() from exc
            raise
        if deadline.expired:  # a shut-down socket can also read as a body that ended early
            raise timed_out()
    return result


def declared_length(value: str | None) -> int | None:
    """A ``Content-Length`` header's value as bytes, ``None`` when absent or malformed (count
    the body instead); never ``int()`` of a 5,000-digit value (Python refuses it)."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return int(value) if len(value) <= 18 else sys.maxsize


def read_limited(
    response: httpx.Response, limit: int, too_large: Callable[[int | None], Exception]
) -> bytes:
    """The body of a streamed ``response``, refused with ``too_large(declared size or None)``
    as soon as it is known to be over ``limit`` bytes: from Content-Length before reading,
    else while it streams in."""
    declared = declared_length(response.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise too_large(declared)
    buffer = bytearray()
    for chunk in response.iter_bytes():
        buffer.extend(chunk)
        if len(buffer) > limit:
            raise too_large(None)
    return bytes(buffer)


def _apply_deadline(request: httpx.Request) -> None:
    """The client's request hook: every request of a download, the token exchange and
    redirects included, gets the download's deadline (its trace and the time left)."""
    deadline = _current_deadline.get()
    if deadline is None:
        return
    left = deadline.remaining_s()
    request.extensions = {
        **request.extensions,
        "trace": deadline.trace,
        "timeout": {"connect": left, "read": left, "write": left, "pool": left},
    }


def display_url(url: str) -> str:
    """``url`` made safe to log or echo in an error: no ``user:password@``, no fragment, and no
    query (it may hold signatures) except the ``d=<file name>`` of ``/data/local-files``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return "<unparseable URL>"
    host = parts.netloc.rpartition("@")[2]
    path = parts.path
    if not parts.netloc:  # "user:pass@host/a.png", without "//", parses as scheme "user"
        first, slash, rest = path.partition("/")
        path = first.rpartition("@")[2] + slash + rest
    query = ""
    if path.startswith("/data/local-files"):  # ?d=<path> is the file name, not secret
        query = "&".join(p for p in parts.query.split("&") if p.startswith("d="))
    return urlunsplit((parts.scheme, host, path, query, ""))
