"""An in-process stand-in for Label Studio's REST API (``httpx.MockTransport``), in LS 1.23's shapes.

Routes: ``POST /api/token/refresh/``, ``GET /api/projects/<id>/``, paged ``GET /api/tasks/`` (404
past the last page), ``GET /api/projects/<id>/export``, ``GET /api/users/`` and any file in
``images``. Every route but the token exchange needs ``Token <legacy>`` or ``Bearer <access>``.
Used by the client tests (``test_labelstudio_client.py``) and the dataset tests
(``test_ls_dataset.py``); the download deadline is tested against a real loopback server
(``backend_support``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from backend_support import fake_jwt

LS_URL = "http://ls.test:8080"
CONFIG = """<View>
  <Image name="img" value="$image"/>
  <BrushLabels name="tag" toName="img"><Label value="Object"/></BrushLabels>
  <PolygonLabels name="poly" toName="img"><Label value="Object"/></PolygonLabels>
</View>"""
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"


class FakeLabelStudioAPI:
    """The routes above for project 7; ``seen_auth`` lists each request's auth scheme."""

    def __init__(
        self, tasks: list[dict[str, Any]], images: dict[str, bytes], token: str = LEGACY_TOKEN
    ) -> None:
        self.tasks, self.images, self.token = tasks, images, token
        self.access = fake_jwt({"token_type": "access", "exp": time.time() + 300})
        self.seen_auth: list[str] = []
        self.refresh_answer: httpx.Response | None = None  # instead of the access token
        self.refreshes = 0
        self.hosts: list[str] = []
        self.paths: list[str] = []
        self.users = [{"id": 1, "email": "admin@example.com"}, {"id": 2, "email": ""}]
        self.reported_total: int | None = None  # a "total" other than the number of tasks

    def authorized(self, request: httpx.Request) -> bool:
        header = request.headers.get("authorization", "")
        self.seen_auth.append(header.split(" ")[0])
        return header in (f"Token {self.token}", f"Bearer {self.access}")

    def forget_access_tokens(self) -> None:
        """As Label Studio does after 5 minutes: the next request with the old one is a 401."""
        self.access = fake_jwt({"token_type": "access", "exp": time.time() + 300, "n": 2})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.hosts.append(request.url.host)
        self.paths.append(path)
        if path == "/api/token/refresh/" and self.refresh_answer is not None:
            return self.refresh_answer
        if path == "/api/token/refresh/":
            if json.loads(request.content)["refresh"] != self.token:
                return httpx.Response(401, json={"detail": "bad token"})
            self.refreshes += 1
            return httpx.Response(200, json={"access": self.access})
        if not self.authorized(request):
            return httpx.Response(
                401, json={"detail": "Authentication credentials were not provided."}
            )
        if path == "/api/projects/7/":
            return httpx.Response(200, json={"id": 7, "label_config": CONFIG})
        if path == "/api/projects/7/export":
            return httpx.Response(200, json=self.tasks)
        if path == "/api/users/":
            return httpx.Response(200, json=self.users)
        if path == "/api/tasks/":
            page, size = int(request.url.params["page"]), int(request.url.params["page_size"])
            chunk = self.tasks[(page - 1) * size : page * size]
            if not chunk and page > 1:
                return httpx.Response(404, json={"detail": "Invalid page."})
            total = len(self.tasks) if self.reported_total is None else self.reported_total
            return httpx.Response(
                200,
                json={"tasks": chunk, "total": total, "total_annotations": 0,
                      "total_predictions": 0},
            )  # fmt: skip
        if path in self.images:
            return httpx.Response(200, content=self.images[path])
        return httpx.Response(404, json={"detail": "Not found."})


def task(
    task_id: int, image_path: str, results: list[dict[str, Any]], **annotation: Any
) -> dict[str, Any]:
    """A task with one annotation holding ``results`` (``annotation``: more of its fields)."""
    return {
        "id": task_id,
        "data": {"image": image_path},
        "annotations": [
            {"id": task_id * 10, "result": results, "was_cancelled": False, **annotation}
        ],
    }
