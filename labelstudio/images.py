"""Task images: resolving Label Studio URLs, fetching with Label Studio auth, safe decoding.

Label Studio tasks reference images as LS-relative paths (``/data/upload/<pid>/<file>``,
``/data/local-files/?d=...``, ``/tasks/<id>/presign/?fileuri=...``), cloud URIs (``s3://``,
``gs://``, ``azure-blob://``: resolved through LS's presign endpoint for the task) or plain
http(s) URLs. LS answers only authenticated requests: a personal access token (a JWT refresh
token, exchanged at ``POST /api/token/refresh/`` for 5-minute access tokens) or a legacy token
(``Authorization: Token ...``, from ``LABEL_STUDIO_API_KEY`` or ``/setup``).

A download has one deadline, from connecting to its last byte (``DownloadDeadline``), and URLs
reach logs and error messages only through ``display_url`` (no credentials, no signatures).

Decoding is defensive: the pixel count is checked from the header before any pixel is decoded
(decompression bombs), so is the memory the decode will hold, reserved from a budget shared by
all decodes (``DecodeBudget``); truncated and corrupt files fail with a clear error, and the EXIF
orientation is applied the way the browser shows the image (LS's percent coordinates refer to
that view).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import hashlib
import io
import json
import logging
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from labelstudio.errors import (
    ImageDecodeBusyError,
    ImageDecodeError,
    ImageFetchError,
    ImageTooLargeError,
    InvalidRequestError,
)
from labelstudio.trust import LabelStudioTrust, PinStore, origin_of
from runtime.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")
ACCESS_TOKEN_MARGIN_S = 30.0  # refresh an access token this long before it expires
MAX_TOKEN_CHARS = 4096  # Label Studio's tokens: 40 hex (legacy) or a JWT of a few hundred


@dataclass(frozen=True)
class LoadedImage:
    """A decoded task image as the browser shows it: ``rgb`` (H, W, 3) uint8, EXIF applied."""

    rgb: np.ndarray
    sha256: str  # of the downloaded bytes

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def _jwt_claims(token: str) -> dict:
    """The claims of a JWT, unverified (only used to schedule refreshes); {} if unreadable."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (IndexError, ValueError, TypeError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, or ``None``."""
    try:
        return float(_jwt_claims(token)["exp"])
    except (KeyError, TypeError, ValueError):
        return None


def looks_like_jwt(token: str) -> bool:
    """Personal access tokens are JWTs (three dot-separated parts); legacy tokens are hex."""
    return token.count(".") == 2


class LabelStudioAuth:
    """Authorization headers for Label Studio, sent only to the trusted Label Studio.

    Where Label Studio is and whether ``/setup`` may say so: ``labelstudio.trust``.
    ``LABEL_STUDIO_API_KEY`` always wins; a token from ``/setup`` is used only without it and
    only when ``LABEL_STUDIO_TRUST_SETUP`` is on. A newer ``/setup`` token never replaces one
    that Label Studio has accepted: it waits as the next one and takes over when the one in
    use is refused (so a stray ``/setup`` cannot lock every project out).

    A personal access token is exchanged for an access token (cached until shortly before it
    expires, dropped on a 401); a legacy token is sent as ``Authorization: Token <token>``.
    """

    def __init__(self, settings: Settings, pin_store: PinStore | None = None) -> None:
        self.trust = LabelStudioTrust(
            settings.label_studio_url, settings.label_studio_trust_setup, pin_store
        )
        key = settings.label_studio_api_key
        self._api_key = key.get_secret_value().strip() if key is not None else ""
        self._setup_token = ""  # the /setup token in use
        self._setup_verified = False  # Label Studio accepted it
        self._setup_next = ""  # a newer /setup token, tried when the one in use is refused
        # (access token, refresh at (epoch seconds), the personal access token it came from)
        self._access: tuple[str, float, str] | None = None
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """The trusted Label Studio's base URL ("" when none is known)."""
        return self.trust.base_url

    def update_from_setup(self, hostname: str | None, access_token: str | None) -> bool:
        """Apply what ``/setup`` says (see the class); True when its token may be used.

        Raises ``UntrustedLabelStudioError`` when ``hostname`` is not the trusted Label Studio.
        """
        if not self.trust.accept_setup_hostname(hostname):
            return False
        token = (access_token or "").strip()
        if not token or self._api_key:
            return False
        if len(token) > MAX_TOKEN_CHARS or not token.isascii() or not token.isprintable():
            raise InvalidRequestError(
                f"/setup access_token must be printable ASCII of at most {MAX_TOKEN_CHARS} "
                "characters (a Label Studio token)"
            )
        with self._lock:
            if token in (self._setup_token, self._setup_next):
                return True
            if not self._setup_token or not self._setup_verified:
                self._setup_token, self._setup_verified = token, False
                self._access = None
            else:
                self._setup_next = token
        return True

    @property
    def setup_token(self) -> str:
        """The ``/setup`` token in use ("" when none): what training jobs are given."""
        return self._setup_token

    def confirm(self, headers: dict[str, str]) -> None:
        """Label Studio accepted ``headers`` (from ``headers()``): keep their token."""
        with self._lock:
            if self._setup_token and self._token_of(headers) == self._setup_token:
                self._setup_verified = True

    def invalidate(self, headers: dict[str, str] | None = None) -> None:
        """Label Studio answered 401 to ``headers``: drop the cached access token, and move
        on to the next ``/setup`` token if the refused one was the ``/setup`` token in use."""
        with self._lock:
            refused = self._token_of(headers or {})
            self._access = None
            if refused and refused == self._setup_token and self._setup_next:
                self._setup_token, self._setup_next = self._setup_next, ""
                self._setup_verified = False

    def _token_of(self, headers: dict[str, str]) -> str:
        """The configured or /setup token behind an Authorization header (caller holds lock)."""
        scheme, _, credential = headers.get("Authorization", "").partition(" ")
        if scheme == "Bearer" and self._access is not None and credential == self._access[0]:
            return self._access[2]
        return credential

    @property
    def configured(self) -> bool:
        return bool(self._api_key or self._setup_token)

    def headers(self, client: httpx.Client) -> dict[str, str]:
        """The Authorization header to send to Label Studio ({} when no token is known)."""
        token = self._api_key or self._setup_token
        if not token:
            return {}
        if not looks_like_jwt(token):
            return {"Authorization": f"Token {token}"}
        if _jwt_claims(token).get("token_type") == "access":
            return {"Authorization": f"Bearer {token}"}  # already an access token: use as is
        return {"Authorization": f"Bearer {self._access_token(client, token)}"}

    def _access_token(self, client: httpx.Client, refresh: str) -> str:
        with self._lock:
            if (
                self._access is not None
                and self._access[2] == refresh
                and self._access[1] > time.time()
            ):
                return self._access[0]
            if not self.base_url:
                raise InvalidRequestError(
                    "a personal access token needs the Label Studio URL: set LABEL_STUDIO_URL"
                )
            url = f"{self.base_url}/api/token/refresh/"
            try:
                # Not redirected: a 307/308 would re-POST the token to wherever it points.
                response = client.post(url, json={"refresh": refresh}, follow_redirects=False)
            except httpx.TimeoutException as exc:
                raise ImageFetchError(
                    "timed out exchanging the personal access token at Label Studio",
                    code="image_fetch_timeout",
                    status_code=504,
                ) from exc
            except httpx.HTTPError as exc:
                raise ImageFetchError(
                    f"cannot reach Label Studio at {display_url(self.base_url)} to exchange the "
                    f"personal access token: {type(exc).__name__}"
                ) from exc
            if response.status_code != 200:
                raise ImageFetchError(
                    f"Label Studio refused the personal access token (HTTP "
                    f"{response.status_code} from /api/token/refresh/); check "
                    "LABEL_STUDIO_API_KEY",
                    code="label_studio_auth_failed",
                )
            access = access_token_of(response)
            if access is None:
                raise ImageFetchError(
                    "Label Studio answered the personal access token exchange "
                    '(/api/token/refresh/) without an access token (expected JSON {"access": '
                    "...}); check LABEL_STUDIO_URL",
                    code="label_studio_auth_failed",
                )
            expires = _jwt_expiry(access) or (time.time() + 240.0)
            self._access = (access, expires - ACCESS_TOKEN_MARGIN_S, refresh)
            return access


def access_token_of(response: httpx.Response) -> str | None:
    """The access token of a 200 from ``/api/token/refresh/`` (``{"access": "<JWT>"}``), or
    ``None`` when the answer holds none (not JSON, not UTF-8, no string ``access``)."""
    try:
        body = response.json()
    except ValueError:
        return None
    access = body.get("access") if isinstance(body, dict) else None
    return access if isinstance(access, str) and access else None


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


# Decoded pixels become RGB this many bytes (at 4 bytes a pixel) of rows at a time: the copies a
# conversion makes are band-sized, not image-sized.
DECODE_BAND_BYTES = 4 * 1024 * 1024

# EXIF orientation -> the view of the displayed array that has the stored image's orientation:
# writing the stored rows through it shows them as the browser does (ImageOps.exif_transpose's
# transpositions, without its full-size copy).
_STORED_VIEW = {
    2: lambda shown: shown[:, ::-1],  # mirrored
    3: lambda shown: shown[::-1, ::-1],  # rotated 180
    4: lambda shown: shown[::-1],  # flipped
    5: lambda shown: shown.swapaxes(0, 1),  # transposed
    6: lambda shown: np.rot90(shown, 1),  # stored rotated 90 degrees counter-clockwise
    7: lambda shown: shown.swapaxes(0, 1)[::-1, ::-1],  # transversed
    8: lambda shown: np.rot90(shown, -1),  # stored rotated 90 degrees clockwise
}


def _band_rows(width: int) -> int:
    return max(1, DECODE_BAND_BYTES // (4 * width))


def decode_peak_bytes(width: int, height: int, mode: str, image_format: str | None) -> int:
    """Estimated peak memory of ``decode_image`` for a ``width`` x ``height`` image that Pillow
    opens in ``mode``, bytes, measured: the decoded image as Pillow keeps it (1 byte a pixel for
    1, L and P; 2 for I;16; 4 for the rest, RGB included), the RGB result (3), the copies of
    converting one band (up to 5 band-sized), and for WebP libwebp's two RGBA canvases (8).
    """
    stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    decoder = 8 if image_format == "WEBP" else 0
    band = min(height, _band_rows(width)) * width * 4
    return width * height * (stored + 3 + decoder) + 5 * band


class DecodeBudget:
    """Bounds the decodes running at once and the bytes they hold together (thread-safe).

    Each decode holds a slot and its estimated peak (``decode_peak_bytes``) while it runs; one
    that finds neither free within ``wait_s`` fails with ``ImageDecodeBusyError`` (503). An
    image estimated above the whole budget is decoded alone: it waits for all of the budget and
    holds all of it (IMAGE_MAX_PIXELS, not the budget, is what refuses images).
    """

    def __init__(self, max_decodes: int, max_bytes: int, wait_s: float) -> None:
        self.max_decodes = max_decodes
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self._decodes = 0
        self._bytes = 0
        self._freed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, peak_bytes: int) -> Iterator[None]:
        """Hold a decode slot and ``peak_bytes`` of the budget (all of it at most) meanwhile."""
        need = min(peak_bytes, self.max_bytes)

        def fits() -> bool:
            return self._decodes < self.max_decodes and self._bytes + need <= self.max_bytes

        with self._freed:
            if not self._freed.wait_for(fits, timeout=self.wait_s):
                raise ImageDecodeBusyError(
                    f"no image decode could start within {self.wait_s:g} s: {self._decodes} "
                    f"running hold {self._bytes / 2**20:.0f} of {self.max_bytes / 2**20:.0f} MB "
                    f"and this one needs {need / 2**20:.0f} MB (IMAGE_DECODE_CONCURRENCY, "
                    "IMAGE_DECODE_BUDGET_MB); retry shortly"
                )
            self._decodes += 1
            self._bytes += need
        try:
            yield
        finally:
            with self._freed:
                self._decodes -= 1
                self._bytes -= need
                self._freed.notify_all()


# What Pillow raises for bytes of a format it recognises but cannot read: besides OSError,
# SyntaxError and ValueError, NotImplementedError (a DDS header with a pixel format it does not
# support) and TypeError or OverflowError (TIFFs with mutated tags).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, NotImplementedError, TypeError, OverflowError)


def decode_image(data: bytes, max_pixels: int, budget: DecodeBudget | None = None) -> np.ndarray:
    """Decode image bytes to RGB (H, W, 3) uint8 as the browser shows them (EXIF orientation).

    The pixel count is checked from the header, before decoding; so is the memory the decode
    will hold (``decode_peak_bytes``: for most images the decoded image, 1 byte a pixel for
    1-bit, L and P images, 4 for RGB, plus the result, 3), reserved from ``budget`` for the
    decode. Raises ``ImageTooLargeError``, ``ImageDecodeError`` (corrupt, truncated, not an
    image) or ``ImageDecodeBusyError`` (no budget in time).
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("the downloaded file is not a readable image") from exc
    except DECODE_ERRORS as exc:  # a recognised format, broken header
        raise ImageDecodeError(
            f"the image is not a readable image (corrupt header: {exc})"
        ) from exc
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{max_pixels} (IMAGE_MAX_PIXELS)"
            )
        if width == 0 or height == 0:
            raise ImageDecodeError(f"the image has an unusable size {width}x{height}")
        peak = decode_peak_bytes(width, height, image.mode, image.format)
        with budget.reserve(peak) if budget is not None else contextlib.nullcontext():
            try:
                image.load()
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                return _displayed_rgb(image, orientation)
            except DECODE_ERRORS as exc:
                raise ImageDecodeError(f"the image is corrupt or truncated: {exc}") from exc


def _displayed_rgb(image: Image.Image, orientation: int) -> np.ndarray:
    """A loaded image as a new (H, W, 3) uint8 RGB array in its displayed orientation, converted
    a band of rows at a time straight into the result (no image-sized intermediate)."""
    width, height = image.size
    to_stored = _STORED_VIEW.get(orientation)
    swapped = orientation in (5, 6, 7, 8)
    shown = np.empty((width, height, 3) if swapped else (height, width, 3), np.uint8)
    stored = to_stored(shown) if to_stored is not None else shown  # (height, width, 3)
    white = _gray_white(image)
    rows = _band_rows(width)
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height)))
        stored[top : top + rows] = _band_rgb(band, white)
    return shown


def _gray_white(image: Image.Image) -> float | None:
    """The sample value shown white, for grayscale modes deeper than 8 bits; else ``None``.

    Pillow's RGB conversion clips those at 255 (a 16-bit image comes out nearly all white), so
    they are scaled instead: 16-bit samples (``I;16*``, how Pillow opens 16-bit grayscale PNG
    and TIFF, and browsers show a 16-bit PNG: 65535 -> 255) and 32-bit integers (``I``, read as
    16-bit: Pillow's other mode for them) are white at 65535; so are floats (``F``), unless all
    lie in [0, 1] (a normalised image): then 1.0 is white. Values outside clip.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        return 65535.0
    if image.mode == "F":
        low, high = image.getextrema()
        return 1.0 if low >= 0.0 and high <= 1.0 else 65535.0
    return None


def _band_rgb(band: Image.Image, white: float | None) -> np.ndarray:
    """RGB of a band of an image: (rows, W, 3) uint8, or (rows, W, 1) gray scaled so that
    ``white`` becomes 255 (see ``_gray_white``), which broadcasts to RGB."""
    if white is None:
        return np.asarray(band.convert("RGB"))
    gray = np.asarray(band).astype(np.float32)  # a writable copy: scaled in place
    gray *= np.float32(255.0 / white)
    np.clip(np.rint(gray, out=gray), 0, 255, out=gray)
    return gray.astype(np.uint8)[..., None]


class _ImageCache:
    """LRU of decoded images keyed by content hash, bounded in bytes; URL -> hash with a TTL."""

    def __init__(self, max_bytes: int, url_ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.url_ttl_s = url_ttl_s
        self._images: OrderedDict[str, LoadedImage] = OrderedDict()
        self._urls: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def by_url(self, url: str) -> LoadedImage | None:
        with self._lock:
            entry = self._urls.get(url)
            if entry is None or entry[1] < time.monotonic():
                return None
            return self._get(entry[0])

    def by_hash(self, sha256: str) -> LoadedImage | None:
        with self._lock:
            return self._get(sha256)

    def _get(self, sha256: str) -> LoadedImage | None:
        image = self._images.get(sha256)
        if image is not None:
            self._images.move_to_end(sha256)
        return image

    def put(self, url: str, image: LoadedImage) -> None:
        with self._lock:
            if self.url_ttl_s > 0:
                self._urls[url] = (image.sha256, time.monotonic() + self.url_ttl_s)
                self._urls.move_to_end(url)
                while len(self._urls) > 4096:
                    self._urls.popitem(last=False)
            size = image.rgb.nbytes
            if image.sha256 in self._images or size > self.max_bytes:
                return
            self._images[image.sha256] = image
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._images.popitem(last=False)
                self._bytes -= old.rgb.nbytes


class ImageLoader:
    """Fetch, decode and cache task images (thread-safe; one per app)."""

    def __init__(self, settings: Settings, auth: LabelStudioAuth) -> None:
        self.settings = settings
        self.auth = auth
        self._client = deadline_client(settings.image_fetch_timeout_s)
        self._cache = _ImageCache(settings.image_cache_mb * 1024 * 1024, settings.image_url_ttl_s)
        self.decode_budget = DecodeBudget(
            settings.image_decode_concurrency,
            settings.image_decode_budget_mb * 1024 * 1024,
            settings.image_decode_wait_s,
        )

    def close(self) -> None:
        self._client.close()

    def load(self, value: str, task_id: int | None = None) -> LoadedImage:
        """The decoded image a task's data field points to (cached by URL and by content)."""
        url, send_auth = resolve_image_url(value, task_id, self.auth.base_url)
        cached = self._cache.by_url(url)
        if cached is not None:
            return cached
        data = self._download(url, send_auth)
        sha256 = hashlib.sha256(data).hexdigest()
        image = self._cache.by_hash(sha256)
        if image is None:
            started = time.perf_counter()
            rgb = decode_image(data, self.settings.image_max_pixels, self.decode_budget)
            image = LoadedImage(rgb, sha256)
            logger.info(
                "decoded image %s (%dx%d) in %.0f ms",
                display_url(url),
                image.width,
                image.height,
                (time.perf_counter() - started) * 1000,
            )
        self._cache.put(url, image)
        return image

    def _download(self, url: str, send_auth: bool) -> bytes:
        """The bytes at ``url``, within IMAGE_FETCH_TIMEOUT_S from start to end (504 after)."""
        shown = display_url(url)
        if send_auth and not self.auth.configured:
            logger.warning("fetching %s without a token: set LABEL_STUDIO_API_KEY", shown)
        return within_deadline(
            self.settings.image_fetch_timeout_s,
            lambda: self._fetch(url, send_auth, shown),
            timed_out=lambda: self._timed_out(shown),
            failed=lambda exc: ImageFetchError(
                f"cannot fetch {shown}: {type(exc).__name__}: {exc}"
            ),
            unusable_url=lambda exc: InvalidRequestError(
                f"the task's image URL {shown} is not a usable URL ({type(exc).__name__}: {exc})"
            ),
            own_error=ImageFetchError,  # the token exchange failed: cut short by the deadline?
        )

    def _timed_out(self, shown: str) -> ImageFetchError:
        return ImageFetchError(
            f"timed out after {self.settings.image_fetch_timeout_s:g} s fetching {shown}",
            code="image_fetch_timeout",
            status_code=504,
        )

    def _fetch(self, url: str, send_auth: bool, shown: str) -> bytes:
        for attempt in (1, 2):
            headers = self.auth.headers(self._client) if send_auth else {}
            with self._client.stream("GET", url, headers=headers) as response:
                if response.status_code == 401 and send_auth and attempt == 1:
                    self.auth.invalidate(headers)  # an expired access token: retry once
                    continue
                self._raise_for_status(response.status_code, shown, send_auth)
                if headers:
                    self.auth.confirm(headers)
                return self._read_limited(response, shown)
        raise AssertionError("unreachable")

    @staticmethod
    def _raise_for_status(status: int, shown: str, send_auth: bool) -> None:
        if status in (401, 403):
            hint = (
                "check LABEL_STUDIO_API_KEY (or enable legacy tokens in Label Studio, with "
                "LABEL_STUDIO_TRUST_SETUP=true)"
                if send_auth
                else "the image server needs credentials the backend does not have"
            )
            raise ImageFetchError(
                f"image server refused {shown} (HTTP {status}): {hint}",
                code="image_fetch_unauthorized",
            )
        if status == 404:
            raise ImageFetchError(
                f"image not found: {shown} (HTTP 404)", code="image_not_found", status_code=404
            )
        if status >= 400:
            raise ImageFetchError(f"image server answered HTTP {status} for {shown}")

    def _read_limited(self, response: httpx.Response, shown: str) -> bytes:
        limit = self.settings.image_max_bytes

        def too_large(declared: int | None) -> ImageTooLargeError:
            size = f"{declared} bytes, over" if declared is not None else "over"
            return ImageTooLargeError(f"image {shown} is {size} IMAGE_MAX_BYTES={limit}")

        return read_limited(response, limit, too_large)
