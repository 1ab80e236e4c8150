"""Task images: resolving Label Studio URLs, fetching with Label Studio auth, safe decoding.

Label Studio tasks reference images as LS-relative paths (``/data/upload/<pid>/<file>``,
``/data/local-files/?d=...``, ``/tasks/<id>/presign/?fileuri=...``), cloud URIs (``s3://``,
``gs://``, ``azure-blob://``: resolved through LS's presign endpoint for the task) or plain
http(s) URLs. LS answers only authenticated requests: a personal access token (a JWT refresh
token, exchanged at ``POST /api/token/refresh/`` for 5-minute access tokens) or a legacy token
(``Authorization: Token ...``, from ``LABEL_STUDIO_API_KEY`` or ``/setup``).

Decoding is defensive: the pixel count is checked from the header before any pixel is decoded
(decompression bombs), truncated and corrupt files fail with a clear error, and the EXIF
orientation is applied the way the browser shows the image (LS's percent coordinates refer to
that view).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import (
    ImageDecodeError,
    ImageFetchError,
    ImageTooLargeError,
    InvalidRequestError,
)
from backend.label_studio_trust import LabelStudioTrust, PinStore, origin_of
from backend.settings import Settings

logger = logging.getLogger(__name__)

CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")
ACCESS_TOKEN_MARGIN_S = 30.0  # refresh an access token this long before it expires


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

    Where Label Studio is and whether ``/setup`` may say so: ``backend.label_studio_trust``.
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
        with self._lock:
            if token in (self._setup_token, self._setup_next):
                return True
            if not self._setup_token or not self._setup_verified:
                self._setup_token, self._setup_verified = token, False
                self._access = None
            else:
                self._setup_next = token
        return True

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
                response = client.post(url, json={"refresh": refresh})
            except httpx.TimeoutException as exc:
                raise ImageFetchError(
                    "timed out exchanging the personal access token at Label Studio",
                    code="image_fetch_timeout",
                    status_code=504,
                ) from exc
            except httpx.HTTPError as exc:
                raise ImageFetchError(
                    f"cannot reach Label Studio at {self.base_url} to exchange the personal "
                    f"access token: {type(exc).__name__}"
                ) from exc
            if response.status_code != 200:
                raise ImageFetchError(
                    f"Label Studio refused the personal access token (HTTP "
                    f"{response.status_code} from /api/token/refresh/); check "
                    "LABEL_STUDIO_API_KEY",
                    code="label_studio_auth_failed",
                )
            access = response.json().get("access", "")
            expires = _jwt_expiry(access) or (time.time() + 240.0)
            self._access = (access, expires - ACCESS_TOKEN_MARGIN_S, refresh)
            return access


def resolve_image_url(value: str, task_id: int | None, base_url: str) -> tuple[str, bool]:
    """Absolute URL of a task's image and whether to send Label Studio credentials with it."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError("the task's image field is empty or not a string")
    value = value.strip()
    if value.startswith(CLOUD_PREFIXES):
        if task_id is None:
            shown = value.split("?")[0]
            raise InvalidRequestError(f"cloud storage image {shown!r} needs the task id")
        if not base_url:
            raise InvalidRequestError("cloud storage images need LABEL_STUDIO_URL")
        fileuri = base64.urlsafe_b64encode(value.encode()).decode()
        return f"{base_url}/tasks/{task_id}/presign/?fileuri={fileuri}", True
    if value.startswith("/"):
        if not base_url:
            raise InvalidRequestError(
                f"image path {value.split('?')[0]!r} is relative to Label Studio; set "
                "LABEL_STUDIO_URL (or LABEL_STUDIO_TRUST_SETUP=true to take it from /setup)"
            )
        return base_url + value, True
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.netloc:
        # Credentials go only to Label Studio's own origin, never to another host.
        same_origin = bool(base_url) and origin_of(value) == origin_of(base_url)
        return value, same_origin
    raise InvalidRequestError(f"unsupported image URL scheme in {value[:40]!r}")


def display_url(url: str) -> str:
    """A URL safe to put in logs and error messages (no query: it may hold signatures)."""
    parts = urlsplit(url)
    if parts.path.startswith("/data/local-files"):
        return url  # ?d=<path> is the file name, useful and not secret
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to RGB (H, W, 3) uint8 as the browser shows them (EXIF orientation).

    The pixel count is checked from the header, before decoding. Raises ``ImageTooLargeError``
    or ``ImageDecodeError`` (corrupt, truncated, not an image).
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("the downloaded file is not a readable image") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # a recognised format, broken header
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
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = np.array(image.convert("RGB"))  # a writable copy (torch warns on read-only)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(f"the image is corrupt or truncated: {exc}") from exc
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageDecodeError(f"decoded image has an unusable shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


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
        self._client = httpx.Client(
            timeout=httpx.Timeout(settings.image_fetch_timeout_s),
            follow_redirects=True,  # httpx drops Authorization on cross-origin redirects
        )
        self._cache = _ImageCache(settings.image_cache_mb * 1024 * 1024, settings.image_url_ttl_s)

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
            image = LoadedImage(decode_image(data, self.settings.image_max_pixels), sha256)
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
        shown = display_url(url)
        if send_auth and not self.auth.configured:
            logger.warning("fetching %s without a token: set LABEL_STUDIO_API_KEY", shown)
        for attempt in (1, 2):
            headers = self.auth.headers(self._client) if send_auth else {}
            try:
                with self._client.stream("GET", url, headers=headers) as response:
                    if response.status_code == 401 and send_auth and attempt == 1:
                        self.auth.invalidate(headers)  # an expired access token: retry once
                        continue
                    self._raise_for_status(response.status_code, shown, send_auth)
                    if headers:
                        self.auth.confirm(headers)
                    return self._read_limited(response, shown)
            except httpx.TimeoutException as exc:
                raise ImageFetchError(
                    f"timed out after {self.settings.image_fetch_timeout_s:g} s fetching {shown}",
                    code="image_fetch_timeout",
                    status_code=504,
                ) from exc
            except httpx.HTTPError as exc:
                raise ImageFetchError(f"cannot fetch {shown}: {type(exc).__name__}: {exc}") from exc
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
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ImageTooLargeError(
                f"image {shown} is {declared} bytes, over IMAGE_MAX_BYTES={limit}"
            )
        buffer = bytearray()
        for chunk in response.iter_bytes():
            buffer.extend(chunk)
            if len(buffer) > limit:
                raise ImageTooLargeError(f"image {shown} is over IMAGE_MAX_BYTES={limit}")
        return bytes(buffer)
