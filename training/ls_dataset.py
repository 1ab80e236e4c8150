"""Label Studio annotations -> ``Sample``s with instance masks, fetched through the LS API.

The training job's adapter to Label Studio. ``LabelStudioClient`` authenticates with a personal
access token (a JWT refresh token, exchanged at ``POST /api/token/refresh/`` for short-lived
access tokens) or a legacy token (``Authorization: Token ...``), lists a project's tasks with
their annotations (``GET /api/tasks?project=..&fields=all``, paged) and downloads task images
(LS-relative ``/data/...`` paths, storage URLs resolved by LS, or plain http(s)). Every request
has one deadline, from connecting to its last byte (``labelstudio.images.DownloadDeadline``), and
images are decoded by the web process's decoder (``labelstudio.images.decode_image``).

Each ``brushlabels`` region becomes one instance mask (its RLE decodes to H*W*4 RGBA bytes,
foreground where alpha != 0, ``label_studio_sdk.converter.brush.decode_rle``); each
``polygonlabels`` region is rasterised (points are percent of the original image). One
``Sample`` per (task, Image tag) that has at least one mask; a task's newest non-cancelled
annotation is used. Tokens are never logged, and URLs reach logs and errors only through
``labelstudio.images.display_url`` (no credentials, no signatures).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlparse

import cv2
import httpx
import numpy as np
from defusedxml import ElementTree as SafeET
from label_studio_sdk.converter.brush import decode_rle

from labelstudio import images
from labelstudio.errors import ImageDecodeError, ImageTooLargeError
from labelstudio.images import (
    access_token_of,
    deadline_client,
    display_url,
    read_limited,
    within_deadline,
)
from labelstudio.trust import origin_of
from training.data import Sample

logger = logging.getLogger(__name__)

MASK_TYPES = ("brushlabels", "polygonlabels")
PAGE_SIZE = 100
ACCESS_TOKEN_MARGIN_S = 30.0


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached, refused the token, or sent something unusable."""


def _jwt_claims(token: str) -> dict[str, Any] | None:
    """The (unverified) claims of a JWT, or ``None`` if ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, json.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


@dataclass
class LabelStudioClient:
    """A small Label Studio REST client for one base ``url`` and ``token`` (PAT or legacy).

    ``timeout_s``: the deadline of each request, seconds, from connecting to its last byte (a
    token exchange and a retry after a 401 included): a server trickling bytes cannot hold the
    job. ``max_image_pixels``: images larger than this (W*H) are refused before decoding
    (decompression bombs); ``max_image_bytes``: image downloads larger than this are cut off
    (task images may live on any host).
    """

    url: str
    token: str = field(repr=False)
    timeout_s: float = 30.0
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 100 * 1024 * 1024
    transport: httpx.BaseTransport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.url:
            raise LabelStudioError(
                "no Label Studio URL (set LABEL_STUDIO_URL or connect via /setup)"
            )
        if not self.token:
            raise LabelStudioError("no Label Studio token (set LABEL_STUDIO_API_KEY)")
        self._http = deadline_client(self.timeout_s, self.transport)
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()
        claims = _jwt_claims(self.token)
        self._personal_access_token = claims is not None and claims.get("token_type") == "refresh"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- auth ----------------------------------------------------------------------------

    def _authorization(self) -> str:
        if not self._personal_access_token:
            return f"Token {self.token}"
        with self._lock:
            if self._access is not None and self._access[1] > time.time():
                return f"Bearer {self._access[0]}"
            try:
                # Not redirected: a 307/308 would re-POST the token to wherever it points.
                response = self._http.post(
                    f"{self.url}/api/token/refresh/",
                    json={"refresh": self.token},
                    follow_redirects=False,
                )
            except httpx.HTTPError as exc:
                raise LabelStudioError(
                    f"cannot reach Label Studio at {display_url(self.url)}: {type(exc).__name__}"
                ) from exc
            if response.status_code != 200:
                raise LabelStudioError(
                    f"Label Studio refused the personal access token (HTTP {response.status_code}"
                    " from /api/token/refresh/)"
                )
            access = access_token_of(response)
            if access is None:
                raise LabelStudioError(
                    "Label Studio answered the personal access token exchange "
                    '(/api/token/refresh/) without an access token (expected JSON {"access": '
                    "...}); is LABEL_STUDIO_URL Label Studio?"
                )
            expires = (_jwt_claims(access) or {}).get("exp", time.time() + 240.0)
            self._access = (access, float(expires) - ACCESS_TOKEN_MARGIN_S)
            return f"Bearer {access}"

    def _get(
        self, url: str, params: dict[str, Any] | None = None, max_bytes: int | None = None
    ) -> httpx.Response:
        """GET ``url``, all of it within ``timeout_s`` (``LabelStudioError`` after), its body
        at most ``max_bytes`` when given."""
        shown = display_url(url)
        return within_deadline(
            self.timeout_s,
            lambda: self._get_with_auth(url, params, max_bytes),
            timed_out=lambda: self._timed_out(shown),
            failed=lambda exc: LabelStudioError(f"GET {shown} failed: {type(exc).__name__}"),
            unusable_url=lambda exc: LabelStudioError(
                f"GET {shown}: not a usable URL ({type(exc).__name__}: {exc})"
            ),
            own_error=LabelStudioError,  # the token exchange failed: cut short by the deadline?
        )

    def _get_with_auth(
        self, url: str, params: dict[str, Any] | None, max_bytes: int | None
    ) -> httpx.Response:
        # The token goes to Label Studio's own origin only (scheme, host and port).
        same_origin = origin_of(url) == origin_of(self.url)
        headers = {"Authorization": self._authorization()} if same_origin else {}
        response = self._read(url, params, headers, max_bytes)
        if response.status_code == 401 and same_origin and self._personal_access_token:
            with self._lock:
                self._access = None
            headers = {"Authorization": self._authorization()}
            response = self._read(url, params, headers, max_bytes)
        return response

    def _read(
        self,
        url: str,
        params: dict[str, Any] | None,
        headers: dict[str, str],
        max_bytes: int | None,
    ) -> httpx.Response:
        """The response with its body read, refused past ``max_bytes`` while it streams in."""
        if max_bytes is None:
            return self._http.get(url, params=params, headers=headers)
        with self._http.stream("GET", url, params=params, headers=headers) as response:
            body = read_limited(
                response,
                max_bytes,
                lambda _: LabelStudioError(
                    f"{display_url(url)} is over {max_bytes} bytes (IMAGE_MAX_BYTES)"
                ),
            )
        # A response holding the decoded body (no Content-Encoding left to decode again).
        kept = [
            (k, v)
            for k, v in response.headers.multi_items()
            if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            response.status_code, headers=kept, content=body, request=response.request
        )

    def _timed_out(self, shown: str) -> LabelStudioError:
        return LabelStudioError(f"timed out after {self.timeout_s:g} s: GET {shown}")

    # --- API -----------------------------------------------------------------------------

    def project(self, project_id: str) -> dict[str, Any]:
        """The project object (``label_config``, ``title``, ...)."""
        response = self._get(f"{self.url}/api/projects/{int(project_id)}/")
        _raise_for_status(response, f"project {project_id}")
        return response.json()

    def tasks(self, project_id: str) -> list[dict[str, Any]]:
        """Every task of the project with its annotations (paged ``/api/tasks``)."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            params = {
                "project": int(project_id),
                "fields": "all",
                "page": page,
                "page_size": PAGE_SIZE,
                "resolve_uri": "true",
            }
            response = self._get(f"{self.url}/api/tasks/", params=params)
            if response.status_code == 404 and page > 1:
                break  # LS answers 404 for a page past the end
            _raise_for_status(response, f"tasks of project {project_id}")
            body = response.json()
            batch = body.get("tasks", []) if isinstance(body, dict) else body
            tasks.extend(batch)
            total = body.get("total") if isinstance(body, dict) else None
            if not batch or len(batch) < PAGE_SIZE or (total is not None and len(tasks) >= total):
                break
            page += 1
        return tasks

    def image(self, value: str) -> np.ndarray:
        """Download a task image (``/data/...``, LS-resolved or absolute URL) as (H,W,3) uint8.

        EXIF orientation is applied, as the browser does when it shows the task.
        """
        try:
            parts = urlparse(value)
            _ = parts.port  # so does a port that is not a number in 0-65535
            absolute = parts.scheme in ("http", "https")
            url = value if absolute else urljoin(self.url + "/", value)
        except ValueError as exc:  # e.g. an unbalanced "[" in the host
            raise LabelStudioError(f"the task's image URL cannot be parsed ({exc})") from exc
        response = self._get(url, max_bytes=self.max_image_bytes)
        _raise_for_status(response, f"image {display_url(url)}")
        return decode_image(response.content, self.max_image_pixels)


def _raise_for_status(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise LabelStudioError(f"Label Studio answered HTTP {response.status_code} for {what}")


def decode_image(data: bytes, max_pixels: int = 50_000_000) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8 RGB as the browser shows them (LS's coordinates refer to
    that view), by ``labelstudio.images.decode_image``: EXIF orientation applied, 16-bit samples
    scaled to 8 bits, no full-size copies. Images over ``max_pixels`` (W*H) are refused from
    the header, before decoding."""
    try:
        return images.decode_image(data, max_pixels)
    except ImageTooLargeError as exc:
        raise LabelStudioError(f"image exceeds the pixel limit: {exc.detail}") from exc
    except ImageDecodeError as exc:
        raise LabelStudioError(exc.detail) from exc  # corrupt, truncated, not an image


# --- annotations -> masks ------------------------------------------------------------------


def brush_mask(result: dict[str, Any]) -> np.ndarray:
    """A ``brushlabels`` region -> (H, W) bool (H, W = its original_height, original_width)."""
    height, width = int(result["original_height"]), int(result["original_width"])
    value = result["value"]
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise ValueError(f"brush region {result.get('id')} is not in RLE format")
    rgba = decode_rle(value["rle"])
    if rgba.size != height * width * 4:
        raise ValueError(
            f"brush region {result.get('id')}: RLE has {rgba.size} values, expected "
            f"{height}x{width}x4"
        )
    return rgba.reshape(height, width, 4)[:, :, 3] > 0


def polygon_mask(result: dict[str, Any]) -> np.ndarray:
    """A ``polygonlabels`` region -> (H, W) bool, points given in percent of the image."""
    height, width = int(result["original_height"]), int(result["original_width"])
    points = np.asarray(result["value"]["points"], dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < 3 or points.shape[1] != 2:
        raise ValueError(f"polygon region {result.get('id')} needs at least 3 (x, y) points")
    pixels = points / 100.0 * np.array([width, height])
    canvas = np.zeros((height, width), dtype=np.uint8)
    # cv2 rasterises at integer pixel centres; subpixel precision via a shift of 4 bits.
    cv2.fillPoly(canvas, [np.round(pixels * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def region_mask(result: dict[str, Any]) -> np.ndarray | None:
    """The instance mask of one result region, ``None`` for non-mask regions."""
    kind = result.get("type")
    if kind == "brushlabels":
        return brush_mask(result)
    if kind == "polygonlabels":
        return polygon_mask(result)
    return None


def image_data_keys(label_config: str) -> dict[str, str]:
    """``{Image tag name: task data key}`` from a label config (``<Image name value="$key">``)."""
    try:
        root = SafeET.fromstring(label_config)
    except (SafeET.ParseError, ValueError) as exc:
        raise LabelStudioError(f"the project's label config is not valid XML: {exc}") from exc
    keys = {}
    for tag in root.iter("Image"):
        name, value = tag.get("name"), tag.get("value", "")
        if name and value.startswith("$"):
            keys[name] = value[1:]
    return keys


def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's newest annotation that was not cancelled (skipped), or ``None``."""
    annotations = [
        a for a in task.get("annotations") or [] if not a.get("was_cancelled") and a.get("result")
    ]
    if not annotations:
        return None
    return max(annotations, key=lambda a: (str(a.get("updated_at") or ""), int(a.get("id") or 0)))


def task_masks(annotation: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    """``{Image tag name (to_name): [instance masks (H,W) bool]}`` of one annotation.

    Empty masks and regions that cannot be decoded are skipped with a warning.
    """
    masks: dict[str, list[np.ndarray]] = {}
    for result in annotation.get("result") or []:
        if result.get("type") not in MASK_TYPES:
            continue
        try:
            mask = region_mask(result)
        except (KeyError, ValueError, TypeError) as exc:
            logger.warning("annotation %s: skipping a region: %s", annotation.get("id"), exc)
            continue
        if mask is not None and mask.any():
            masks.setdefault(str(result.get("to_name", "")), []).append(mask)
    return masks


def _fit_masks(masks: list[np.ndarray], shape: tuple[int, int], name: str) -> np.ndarray:
    """Stack masks as (N, H, W) at ``shape``; resize (nearest) when LS's size differs."""
    fitted = []
    for mask in masks:
        if mask.shape != shape:
            logger.warning(
                "%s: mask %s differs from the image %s; resizing", name, mask.shape, shape
            )
            mask = cv2.resize(mask.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST)
            mask = mask.astype(bool)
        fitted.append(mask)
    return np.stack(fitted)


def load_project_samples(
    client: LabelStudioClient,
    project_id: str,
    progress: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """Every annotated (task, Image tag) of the project as a ``Sample`` with instance masks.

    ``Sample.name`` is ``"task<id>"`` (or ``"task<id>-<tag>"`` for tasks with several images).
    ``progress(done, total)`` is called after each task. Tasks whose image cannot be fetched
    are skipped with a warning; a project with no mask annotations gives an empty list.
    """
    config = client.project(project_id).get("label_config") or ""
    data_keys = image_data_keys(config) if config else {}
    tasks = [t for t in client.tasks(project_id) if latest_annotation(t) is not None]
    samples: list[Sample] = []
    for done, task in enumerate(tasks, start=1):
        annotation = latest_annotation(task)
        assert annotation is not None
        by_image = task_masks(annotation)
        for to_name, masks in sorted(by_image.items()):
            key = data_keys.get(to_name)
            data = task.get("data") or {}
            if key is None and len(data) == 1:
                key = next(iter(data))
            if key is None or not isinstance(data.get(key), str):
                logger.warning("task %s: no image for tag %r", task.get("id"), to_name)
                continue
            name = f"task{task['id']}" if len(by_image) == 1 else f"task{task['id']}-{to_name}"
            try:
                image = client.image(data[key])
            except LabelStudioError as exc:
                logger.warning("%s: skipped: %s", name, exc)
                continue
            samples.append(Sample(image, _fit_masks(masks, image.shape[:2], name), name))
        if progress is not None:
            progress(done, len(tasks))
    logger.info(
        "project %s: %d annotated tasks -> %d samples, %d instances",
        project_id,
        len(tasks),
        len(samples),
        sum(s.num_instances for s in samples),
    )
    return samples


def split_train_val(
    samples: Sequence[Sample], val_fraction: float
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/validation split by a hash of each sample's name.

    A sample is in validation when the first 8 bytes of sha1(name), as a fraction of 2**64,
    are below ``val_fraction``: membership does not depend on the other samples, so a task
    stays on its side as the project grows. With at least two samples both sides are
    non-empty (the samples nearest the threshold are moved).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")

    def score(sample: Sample) -> float:
        digest = hashlib.sha1(sample.name.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    ranked = sorted(samples, key=score)
    n_val = sum(1 for s in ranked if score(s) < val_fraction)
    if len(ranked) >= 2:
        n_val = min(max(n_val, 1), len(ranked) - 1)
    val, train = ranked[:n_val], ranked[n_val:]
    train.sort(key=lambda s: s.name)
    val.sort(key=lambda s: s.name)
    return train, val
