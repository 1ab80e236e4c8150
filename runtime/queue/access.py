"""The Label Studio access ``/setup`` shares with training jobs, and the trusted-origin pin.

Tokens never go into job arguments (they are visible in RQ dashboards): the web process keeps
the URL + token of each project in a Redis hash of its own, which only the job reads. The pin
is ``labelstudio.trust``'s trust on first use, shared by every process of one queue: the
backends and workers of one queue are one deployment.
"""

from __future__ import annotations

import redis

ACCESS_PREFIX = "stable-sam:ls-access"


class LabelStudioAccess:
    """The Label Studio URLs and tokens of the projects of queue ``queue_name`` (never logged)."""

    def __init__(self, connection: redis.Redis, queue_name: str) -> None:
        self.connection = connection
        self.queue_name = queue_name

    def _project_key(self, project: str) -> str:
        return f"{ACCESS_PREFIX}:{self.queue_name}:{project}"

    def _trusted_url_key(self) -> str:
        return f"{ACCESS_PREFIX}:trusted-url:{self.queue_name}"

    def store(self, project: str, url: str, token: str) -> None:
        """Keep the Label Studio URL + token a job of ``project`` may use.

        ``/setup`` carries ``hostname`` and ``access_token``; the job falls back to them when
        LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY are not configured.
        """
        if url and token:
            self.connection.hset(self._project_key(project), mapping={"url": url, "token": token})

    def of_project(self, project: str) -> tuple[str, str] | None:
        """The stored (url, token) of ``project``, or ``None``."""
        raw = self.connection.hgetall(self._project_key(project))
        if not raw or b"url" not in raw or b"token" not in raw:
            return None
        return raw[b"url"].decode(), raw[b"token"].decode()

    def pin_url(self, url: str) -> str:
        """Pin ``url`` as the Label Studio every process trusts, unless one is pinned already;
        return the pinned one."""
        key = self._trusted_url_key()
        with self.connection.pipeline() as pipe:
            pipe.set(key, url, nx=True)
            pipe.get(key)
            _, pinned = pipe.execute()
        return pinned.decode() if pinned else url

    def pinned_url(self) -> str | None:
        """The Label Studio URL pinned by ``pin_url``, if any."""
        pinned = self.connection.get(self._trusted_url_key())
        return pinned.decode() if pinned else None
