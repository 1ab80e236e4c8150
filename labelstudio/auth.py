"""Label Studio credentials: the token each request carries, sent only to the trusted Label Studio.

Label Studio answers only authenticated requests: a personal access token (a JWT refresh token,
exchanged at ``POST /api/token/refresh/`` for 5-minute access tokens) or a legacy token
(``Authorization: Token ...``, from ``LABEL_STUDIO_API_KEY`` or ``/setup``). ``LabelStudioAuth``
is the one holder of them, for the web process (its image downloads) and the training job and
user study (their API calls) alike: the access token is cached until shortly before it expires,
refreshed by one thread at a time, and dropped when Label Studio answers 401, after which the
request is sent once more (``LabelStudioAuth.for_client``: httpx's auth hook, so every request
of a client gets it). Where Label Studio is, and whether ``/setup`` may say so:
``labelstudio.trust``. Tokens are never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections.abc import Generator

import httpx

from labelstudio.errors import InvalidRequestError, LabelStudioError
from labelstudio.trust import LabelStudioTrust, PinStore

ACCESS_TOKEN_MARGIN_S = 30.0  # refresh an access token this long before it expires
ACCESS_TOKEN_LIFETIME_S = 240.0  # assumed for an access token without an ``exp`` claim
MAX_TOKEN_CHARS = 4096  # Label Studio's tokens: 40 hex (legacy) or a JWT of a few hundred


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
    """The ``exp`` claim of a JWT (epoch seconds), or ``None``."""
    try:
        return float(_jwt_claims(token)["exp"])
    except (KeyError, TypeError, ValueError):
        return None


def looks_like_jwt(token: str) -> bool:
    """Personal access tokens are JWTs (three dot-separated parts); legacy tokens are hex."""
    return token.count(".") == 2


def access_token_of(response: httpx.Response) -> str | None:
    """The access token of a 200 from ``/api/token/refresh/`` (``{"access": "<JWT>"}``), or
    ``None`` when the answer holds none (not JSON, not UTF-8, no string ``access``)."""
    try:
        body = response.json()
    except ValueError:
        return None
    access = body.get("access") if isinstance(body, dict) else None
    return access if isinstance(access, str) and access else None


class LabelStudioAuth:
    """Authorization headers for Label Studio, sent only to the trusted Label Studio.

    ``url``: Label Studio's base URL ("" when unknown: ``trust_setup`` may pin it from the first
    ``/setup``, shared between processes through ``pin_store``). ``api_key`` always wins; a
    token from ``/setup`` is used only without it and only when ``trust_setup`` is on. A newer
    ``/setup`` token never replaces one that Label Studio has accepted: it waits as the next one
    and takes over when the one in use is refused (so a stray ``/setup`` cannot lock every
    project out). Thread-safe.

    A personal access token is exchanged for an access token (cached until shortly before it
    expires, dropped on a 401); a legacy token is sent as ``Authorization: Token <token>``.
    """

    def __init__(
        self,
        url: str,
        api_key: str = "",
        trust_setup: bool = False,
        pin_store: PinStore | None = None,
    ) -> None:
        self.trust = LabelStudioTrust(url, trust_setup, pin_store)
        self._api_key = api_key.strip()
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
        """True when a token is known (``api_key`` or one from ``/setup``)."""
        return bool(self._api_key or self._setup_token)

    def is_trusted(self, url: str) -> bool:
        """True when ``url`` is on the trusted Label Studio's origin: credentials may go there."""
        return self.trust.is_trusted(url)

    def headers(self, client: httpx.Client) -> dict[str, str]:
        """The Authorization header to send to Label Studio ({} when no token is known).

        A personal access token is exchanged through ``client`` (not redirected) when no cached
        access token is fresh; ``LabelStudioError`` (502) when Label Studio refuses it or answers
        without an access token. httpx errors propagate: the caller's deadline maps them.
        """
        token = self._api_key or self._setup_token
        if not token:
            return {}
        if not looks_like_jwt(token):
            return {"Authorization": f"Token {token}"}
        if _jwt_claims(token).get("token_type") == "access":
            return {"Authorization": f"Bearer {token}"}  # already an access token: use as is
        return {"Authorization": f"Bearer {self._access_token(client, token)}"}

    def _access_token(self, client: httpx.Client, refresh: str) -> str:
        with self._lock:  # one exchange at a time: the others wait for its access token
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
            # Not redirected: a 307/308 would re-POST the token to wherever it points. Not
            # through this client's own auth hook either (auth=None): the exchange needs none.
            response = client.post(
                f"{self.base_url}/api/token/refresh/",
                json={"refresh": refresh},
                follow_redirects=False,
                auth=None,
            )
            if response.status_code != 200:
                raise LabelStudioError(
                    f"Label Studio refused the personal access token (HTTP "
                    f"{response.status_code} from /api/token/refresh/); check "
                    "LABEL_STUDIO_API_KEY",
                    code="label_studio_auth_failed",
                )
            access = access_token_of(response)
            if access is None:
                raise LabelStudioError(
                    "Label Studio answered the personal access token exchange "
                    '(/api/token/refresh/) without an access token (expected JSON {"access": '
                    "...}); check LABEL_STUDIO_URL",
                    code="label_studio_auth_failed",
                )
            expires = _jwt_expiry(access) or (time.time() + ACCESS_TOKEN_LIFETIME_S)
            self._access = (access, expires - ACCESS_TOKEN_MARGIN_S, refresh)
            return access

    def for_client(self, client: httpx.Client) -> httpx.Auth:
        """httpx's auth hook for requests of ``client`` (which also makes the token exchanges)."""
        return _TrustedOriginAuth(self, client)


class _TrustedOriginAuth(httpx.Auth):
    """Our Authorization header on every request to the trusted origin, and on none elsewhere;
    after a 401 the access token is dropped and the request sent once more (an access token
    that expired in flight, or a ``/setup`` token rotated meanwhile)."""

    def __init__(self, auth: LabelStudioAuth, client: httpx.Client) -> None:
        self._auth = auth
        self._client = client

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        # Whatever Authorization a caller set (the SDK sets its own) is ours to decide.
        request.headers.pop("Authorization", None)
        if not self._auth.is_trusted(str(request.url)):
            yield request
            return
        for attempt in (1, 2):
            headers = self._auth.headers(self._client)
            request.headers.pop("Authorization", None)
            request.headers.update(headers)
            response = yield request
            if response.status_code == 401 and headers and attempt == 1:
                self._auth.invalidate(headers)
                continue
            if headers and response.status_code < 400:
                self._auth.confirm(headers)
            return
