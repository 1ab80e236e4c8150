"""A small Label Studio API client for the user study (httpx).

Authenticates with either kind of Label Studio key: a personal access token (a JWT refresh
token, exchanged at ``POST /api/token/refresh/`` for 5-minute access tokens, renewed on 401)
or a legacy API token (``Authorization: Token ...``). Keys are never logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)


class LabelStudioClient:
    """The few Label Studio calls a study needs: projects, uploads, tasks, export, images."""

    def __init__(self, url: str, api_key: str, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._key = api_key
        self._is_pat = api_key.count(".") == 2  # a JWT: header.payload.signature
        self._access: str | None = None
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _auth(self, refresh: bool = False) -> dict[str, str]:
        if not self._is_pat:
            return {"Authorization": f"Token {self._key}"}
        if self._access is None or refresh:
            response = self._http.post("/api/token/refresh/", json={"refresh": self._key})
            response.raise_for_status()
            self._access = response.json()["access"]
        return {"Authorization": f"Bearer {self._access}"}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call with auth; a PAT's access token is renewed once on 401."""
        response = self._http.request(method, path, headers=self._auth(), **kwargs)
        if response.status_code == 401 and self._is_pat:
            response = self._http.request(method, path, headers=self._auth(refresh=True), **kwargs)
        if response.is_error:
            logger.error(
                "Label Studio %s %s -> %d: %.300s",
                method,
                path,
                response.status_code,
                response.text,
            )
        response.raise_for_status()
        return response

    def create_project(self, title: str, label_config: str, **fields: Any) -> dict[str, Any]:
        body = {"title": title, "label_config": label_config, **fields}
        return self.request("POST", "/api/projects/", json=body).json()

    def upload_images(self, project: int, files: Sequence[Path]) -> list[int]:
        """Upload image files (one task each); returns the created task ids."""
        handles = [(f"file{i}", (p.name, p.read_bytes(), "image/png")) for i, p in enumerate(files)]
        response = self.request(
            "POST",
            f"/api/projects/{project}/import",
            params={"return_task_ids": "true"},
            files=handles,
        )
        return [int(t) for t in response.json().get("task_ids") or []]

    def import_tasks(self, project: int, tasks: Sequence[Mapping[str, Any]]) -> list[int]:
        response = self.request(
            "POST",
            f"/api/projects/{project}/import",
            params={"return_task_ids": "true"},
            json=list(tasks),
        )
        return [int(t) for t in response.json().get("task_ids") or []]

    def get_task(self, task: int) -> dict[str, Any]:
        return self.request("GET", f"/api/tasks/{task}/").json()

    def update_task_data(self, task: int, data: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", f"/api/tasks/{task}/", json={"data": dict(data)}).json()

    def create_annotation(
        self, task: int, result: list[dict[str, Any]], **fields: Any
    ) -> dict[str, Any]:
        body = {"result": result, **fields}
        return self.request("POST", f"/api/tasks/{task}/annotations/", json=body).json()

    def export(self, project: int) -> list[dict[str, Any]]:
        """The project's JSON export, every task included."""
        response = self.request(
            "GET",
            f"/api/projects/{project}/export",
            params={"exportType": "JSON", "download_all_tasks": "true"},
        )
        return json.loads(response.content)

    def users(self) -> dict[int, str]:
        """user id -> e-mail, to name annotators in exports that carry bare ids."""
        body = self.request("GET", "/api/users/").json()
        rows = body.get("results", body) if isinstance(body, dict) else body
        return {int(u["id"]): str(u.get("email") or f"user{u['id']}") for u in rows}

    def download(self, url: str) -> bytes:
        """A task's file: Label Studio-relative (``/data/...``) with auth, or an absolute URL."""
        if url.startswith("/"):
            return self.request("GET", url).content
        if url.startswith(self.url):
            return self.request("GET", url[len(self.url) :]).content
        response = httpx.get(url, timeout=60.0, follow_redirects=True)
        response.raise_for_status()
        return response.content

    def list_tasks(self, project: int, page_size: int = 500) -> list[dict[str, Any]]:
        """Every task of ``project`` (data and ids; annotations are in ``export``)."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            response = self._http.request(
                "GET",
                "/api/tasks/",
                headers=self._auth(),
                params={"project": project, "page": page, "page_size": page_size},
            )
            if response.status_code == 404:  # past the last page
                break
            response.raise_for_status()
            body = response.json()
            rows = body.get("tasks", []) if isinstance(body, dict) else body
            tasks += rows
            total = body.get("total", len(tasks)) if isinstance(body, dict) else len(tasks)
            if not rows or len(tasks) >= total:
                break
            page += 1
        return tasks
