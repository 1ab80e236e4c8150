"""The Label Studio REST API and task files, for every part of the service that talks to it.

``LabelStudioClient`` is built on label-studio-sdk's client (``label_studio_sdk.LabelStudio``)
for the API calls it covers: projects, tasks (paged), exports, task data, annotations, users.
Its requests go through our own httpx client (the SDK takes one), and that is where the three
things the SDK's client cannot do for us live:

- Credentials (``LabelStudioAuth``, one object for the web process and the workers): the SDK
  holds one fixed key per client and refreshes a personal access token only once it has
  expired (a token expiring in flight is a 401), never retries after a 401, POSTs the refresh
  through a client that follows redirects (a 307 would re-post the token wherever it points)
  and refuses an expired key at construction; the web process's token changes with ``/setup``
  (rotation, trust on first use). So the SDK is given no token: our httpx auth hook sets the
  Authorization header of every request, refreshes ahead of expiry under one lock, and sends a
  request once more after a 401.
- One deadline per request, from connecting to the last byte (``labelstudio.download``): the
  SDK's timeouts, like httpx's, bound each read. Its retry loop (sleeps on 5xx and 429) is off:
  a request fails at once, as before.
- Task files (``fetch``, ``file``, ``image``): downloads from Label Studio or any host a task
  points to, with byte and pixel limits and credentials only for the trusted origin; the SDK
  reads whole bodies and has no such download.

Files the SDK has no call for (uploading files to a project, ML-backend details) go through
``request``, over the same httpx client. The SDK is imported on first use (it takes over a
second to import; the web process never calls the API). Every failure is a ``ServiceError``:
``LabelStudioError`` for the API, the image errors of ``labelstudio.errors`` for files.
"""

from __future__ import annotations

import functools
import json
import logging
import mimetypes
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import numpy as np

from labelstudio.auth import LabelStudioAuth
from labelstudio.download import (
    DownloadLimits,
    deadline_client,
    display_url,
    read_limited,
    resolve_image_url,
    within_deadline,
)
from labelstudio.errors import (
    ImageFetchError,
    ImageTooLargeError,
    InvalidRequestError,
    LabelStudioError,
)
from labelstudio.images import decode_image

if TYPE_CHECKING:
    from label_studio_sdk.client import LabelStudio

logger = logging.getLogger(__name__)
T = TypeVar("T")

PAGE_SIZE = 100  # tasks per page of GET /api/tasks
# The SDK wants a key; any non-JWT string makes it send "Token <key>", which our auth hook
# replaces with the real header (or removes).
_NO_SDK_KEY = ""


class LabelStudioClient:
    """Label Studio's API and task files at ``auth.base_url``, authenticated by ``auth``.

    ``limits``: every request's deadline, and the byte and pixel limits of downloaded files.
    Thread-safe (one httpx client, no connection kept alive: see ``DownloadDeadline``).
    """

    def __init__(
        self,
        auth: LabelStudioAuth,
        limits: DownloadLimits = DownloadLimits(),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.auth = auth
        self.limits = limits
        self._http = deadline_client(limits.timeout_s, transport)
        self._http.auth = auth.for_client(self._http)
        self._sdk: LabelStudio | None = None

    @property
    def base_url(self) -> str:
        """The trusted Label Studio's base URL ("" when none is known yet)."""
        return self.auth.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- task files --------------------------------------------------------------------------

    def fetch(self, url: str, send_auth: bool) -> bytes:
        """The bytes at an absolute ``url`` (see ``resolve_image_url``), with Label Studio's
        credentials when ``send_auth``, all within ``limits.timeout_s`` (504 after).

        Raises ``ImageFetchError`` (502, 404 not found, 504 timed out), ``ImageTooLargeError``
        (over ``limits.max_bytes``), ``InvalidRequestError`` (a URL httpx refuses) or
        ``LabelStudioError`` (the personal access token refused).
        """
        shown = display_url(url)
        if send_auth and not self.auth.configured:
            logger.warning("fetching %s without a token: set LABEL_STUDIO_API_KEY", shown)
        return within_deadline(
            self.limits.timeout_s,
            lambda: self._get_limited(url, send_auth, shown),
            timed_out=lambda: ImageFetchError(
                f"timed out after {self.limits.timeout_s:g} s fetching {shown}",
                code="image_fetch_timeout",
                status_code=504,
            ),
            failed=lambda exc: ImageFetchError(
                f"cannot fetch {shown}: {type(exc).__name__}: {exc}"
            ),
            unusable_url=lambda exc: InvalidRequestError(
                f"the task's image URL {shown} is not a usable URL ({type(exc).__name__}: {exc})"
            ),
            own_error=LabelStudioError,  # the token exchange failed: cut short by the deadline?
        )

    def file(self, value: str, task_id: int | None = None) -> bytes:
        """The file a task's data field points to (``/data/...``, a cloud URI of task
        ``task_id``, or an http(s) URL): ``fetch`` of ``resolve_image_url``."""
        url, send_auth = resolve_image_url(value, task_id, self.base_url)
        return self.fetch(url, send_auth)

    def image(self, value: str, task_id: int | None = None) -> np.ndarray:
        """The image a task's data field points to as the browser shows it: (H, W, 3) uint8
        RGB, EXIF orientation applied; ``ImageTooLargeError`` over ``limits.max_pixels``."""
        return decode_image(self.file(value, task_id), self.limits.max_pixels)

    def _get_limited(self, url: str, send_auth: bool, shown: str) -> bytes:
        # Our credentials come from the client's auth hook; without them, httpx's own apply
        # (a URL's user:password@ on another host becomes Basic auth, as a browser sends it).
        auth = httpx.USE_CLIENT_DEFAULT if send_auth else None
        with self._http.stream("GET", url, auth=auth) as response:
            _raise_for_file_status(response.status_code, shown, send_auth)
            limit = self.limits.max_bytes

            def too_large(declared: int | None) -> ImageTooLargeError:
                size = f"{declared} bytes, over" if declared is not None else "over"
                return ImageTooLargeError(f"image {shown} is {size} IMAGE_MAX_BYTES={limit}")

            return read_limited(response, limit, too_large)

    # --- the API -----------------------------------------------------------------------------

    @property
    def sdk(self) -> LabelStudio:
        """label-studio-sdk's client, sending through this client (credentials, deadline)."""
        if self._sdk is None:
            from label_studio_sdk.client import LabelStudio

            self._sdk = LabelStudio(
                base_url=self._api_url(),
                api_key=_NO_SDK_KEY,
                httpx_client=self._http,
                max_retries=0,
            )
        return self._sdk

    def _api_url(self) -> str:
        if not self.base_url:
            raise LabelStudioError(
                "no Label Studio URL (set LABEL_STUDIO_URL or connect via /setup)"
            )
        return self.base_url

    def _call(self, what: str, call: Callable[[LabelStudio], T]) -> T:
        """``call(sdk)`` (requests of this client) within one deadline; an error answer, a
        transport error or the deadline as ``LabelStudioError`` naming ``what``."""
        from label_studio_sdk.core.api_error import ApiError
        from label_studio_sdk.core.parse_error import ParsingError

        sdk = self.sdk  # made (and imported) before the deadline starts

        def answered() -> T:
            try:
                return call(sdk)
            except ApiError as exc:
                raise LabelStudioError(
                    f"Label Studio answered HTTP {exc.status_code} for {what}",
                    answered=exc.status_code,
                ) from exc
            except ParsingError as exc:
                raise LabelStudioError(
                    f"Label Studio's answer for {what} is not in the shape of its API"
                ) from exc

        return self._within_deadline(what, answered)

    def _within_deadline(self, what: str, answer: Callable[[], T]) -> T:
        """``answer()`` within one deadline; a transport error or the deadline as
        ``LabelStudioError`` naming ``what``."""
        shown = display_url(self.base_url)
        return within_deadline(
            self.limits.timeout_s,
            answer,
            timed_out=lambda: LabelStudioError(
                f"timed out after {self.limits.timeout_s:g} s: {what} at {shown}"
            ),
            failed=lambda exc: LabelStudioError(f"{what} at {shown} failed: {type(exc).__name__}"),
            unusable_url=lambda exc: LabelStudioError(
                f"{what}: {shown} is not a usable URL ({type(exc).__name__}: {exc})"
            ),
            own_error=LabelStudioError,  # a refused token, or an answer cut short by the deadline
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call the SDK has no method for: ``path`` under the base URL, ``kwargs`` as
        httpx takes them. ``LabelStudioError`` for an answer of HTTP 400 or more. Sent by
        this client's httpx client directly: the SDK is neither needed nor built for it."""

        def send() -> httpx.Response:
            response = self._http.request(method, f"{self._api_url()}{path}", **kwargs)
            if response.status_code >= 400:
                raise LabelStudioError(
                    f"Label Studio answered HTTP {response.status_code} for {method} {path}",
                    answered=response.status_code,
                )
            return response

        return self._within_deadline(f"{method} {path}", send)

    def project(self, project: int | str) -> dict[str, Any]:
        """The project (``label_config``, ``title``, ...)."""
        return self._call(f"project {project}", lambda sdk: sdk.projects.get(int(project))).dict()

    def tasks(self, project: int | str) -> list[dict[str, Any]]:
        """Every task of ``project`` with its annotations and predictions, storage URIs resolved
        by Label Studio (``GET /api/tasks``, ``PAGE_SIZE`` a page, each within the deadline)."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            listed = self._call(
                f"tasks of project {project}",
                functools.partial(_task_page, project=int(project), page=page),
            )
            if listed is None:
                break
            batch = [task.dict() for task in listed.items or []]
            tasks.extend(batch)
            total = listed.response.total
            if len(batch) < PAGE_SIZE or len(tasks) >= total:
                break
            page += 1
        return tasks

    def task_ids(self, project: int | str) -> list[int]:
        """The ids of every task of ``project``, in Label Studio's order (``GET /api/tasks``
        without annotations and predictions, ``PAGE_SIZE`` a page)."""
        ids: list[int] = []
        page = 1
        while True:
            listed = self._call(
                f"task ids of project {project}",
                functools.partial(_task_page, project=int(project), page=page, fields="task_only"),
            )
            if listed is None:
                break
            batch = list(listed.items or [])
            # Whole numbers only: an id of any other shape names no task we could fetch.
            ids.extend(t.id for t in batch if isinstance(t.id, int) and not isinstance(t.id, bool))
            if len(batch) < PAGE_SIZE or len(ids) >= listed.response.total:
                break
            page += 1
        return ids

    def task(self, task: int) -> dict[str, Any]:
        """One task (``GET /api/tasks/<id>/``, as the labeling page opens it)."""
        return self._call(f"task {task}", lambda sdk: sdk.tasks.get(str(task))).dict()

    def export(self, project: int) -> list[dict[str, Any]]:
        """The project's JSON export, every task included."""
        data = self._call(
            f"the export of project {project}",
            lambda sdk: b"".join(
                sdk.projects.exports.download_sync(
                    project, export_type="JSON", download_all_tasks=True
                )
            ),
        )
        try:
            tasks = json.loads(data)
        except ValueError as exc:
            raise LabelStudioError(f"the export of project {project} is not JSON") from exc
        if not isinstance(tasks, list):
            raise LabelStudioError(f"the export of project {project} is not a list of tasks")
        return tasks

    def create_project(self, title: str, label_config: str, **fields: Any) -> dict[str, Any]:
        """A new project; ``fields``: more of its settings (``expert_instruction``, ...)."""
        created = self._call(
            "creating a project",
            lambda sdk: sdk.projects.create(title=title, label_config=label_config, **fields),
        )
        return created.dict()

    def update_project(self, project: int, **fields: Any) -> dict[str, Any]:
        """Change the project's settings (``label_config``, ``title``, ...)."""
        updated = self._call(
            f"updating project {project}", lambda sdk: sdk.projects.update(project, **fields)
        )
        return updated.dict()

    def import_files(self, project: int, files: Mapping[str, bytes]) -> list[int]:
        """Upload files (name -> bytes) as tasks, one each; the created task ids."""
        # One form field per file: Label Studio reads request.FILES as a dict, so files sent
        # under one repeated field name would collapse into the last one.
        handles = [
            (f"file{index}", (name, data, mimetypes.guess_type(name)[0] or "image/png"))
            for index, (name, data) in enumerate(files.items())
        ]
        response = self.request(
            "POST",
            f"/api/projects/{project}/import",
            params={"return_task_ids": "true"},
            files=handles,
        )
        return [int(t) for t in response.json().get("task_ids") or []]

    def update_task_data(self, task: int, data: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the task's data."""
        updated = self._call(
            f"updating task {task}", lambda sdk: sdk.tasks.update(str(task), data=dict(data))
        )
        return updated.dict()

    def create_annotation(
        self, task: int, result: Sequence[dict[str, Any]], **fields: Any
    ) -> dict[str, Any]:
        """Submit an annotation of ``task`` as this client's user (``lead_time``, ...)."""
        created = self._call(
            f"annotating task {task}",
            lambda sdk: sdk.annotations.create(task, result=list(result), **fields),
        )
        return created.dict()

    def create_prediction(
        self,
        task: int,
        result: Sequence[dict[str, Any]],
        model_version: str,
        score: float | None = None,
    ) -> dict[str, Any]:
        """Store a prediction of ``task`` (``POST /api/predictions/``), e.g. a detector's
        rectangles or our masks, tagged with ``model_version``."""
        fields: dict[str, Any] = {"score": score} if score is not None else {}
        created = self._call(
            f"storing a prediction of task {task}",
            lambda sdk: sdk.predictions.create(
                task=task, result=list(result), model_version=model_version, **fields
            ),
        )
        return created.dict()

    def delete_prediction(self, prediction: int) -> None:
        """Delete a prediction (``DELETE /api/predictions/<id>/``)."""
        self._call(
            f"deleting prediction {prediction}", lambda sdk: sdk.predictions.delete(prediction)
        )

    def users(self) -> dict[int, str]:
        """user id -> e-mail, to name annotators in exports that carry bare ids."""
        rows = self._call("listing users", lambda sdk: sdk.users.list())
        return {int(u.id): str(u.email or f"user{u.id}") for u in rows if u.id is not None}


def _task_page(sdk: LabelStudio, project: int, page: int, fields: str = "all") -> Any:
    """One page of ``GET /api/tasks`` (the SDK's pager), ``None`` for a page past the end."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        return sdk.tasks.list(
            project=project, fields=fields, page=page, page_size=PAGE_SIZE, resolve_uri=True
        )
    except ApiError as exc:
        if exc.status_code == 404 and page > 1:  # Label Studio's answer past the last page
            return None
        raise


def _raise_for_file_status(status: int, shown: str, send_auth: bool) -> None:
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
