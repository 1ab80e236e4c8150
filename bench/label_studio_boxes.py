"""A stand-in Label Studio box project on loopback, for the conversion benchmark and its
integration tests.

``BoxProjectAPI`` answers the calls a conversion run makes, in Label Studio 1.23's JSON shapes:
``GET /api/projects/<id>/``, paged ``GET /api/tasks/``, ``GET /api/tasks/<id>/``,
``POST /api/predictions/``, ``DELETE /api/predictions/<id>/`` and the task images. Its tasks are
synthetic scenes whose objects carry two crowd annotators' boxes (``overlap`` 2, each a jittered
copy of the object's box) and, on every third task, a detector's imported box prediction; on
top, ``no_box_tasks`` tasks without any box and ``missing_image_tasks`` whose image is gone
(404). Stored predictions are kept per task, and every POST is counted, so a test sees
duplicates. (tests/e2e/test_batch_boxes_e2e.py runs against a real Label Studio.)
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from bench.label_studio_api import LEGACY_TOKEN
from bench.loopback import LoopbackServer, QuietHandler, png_bytes
from labelstudio.regions import rectangle_region

LABEL = "Object"
BOX_CONFIG = f"""<View>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="box" toName="image"><Label value="{LABEL}"/></RectangleLabels>
  <BrushLabels name="mask" toName="image"><Label value="{LABEL}"/></BrushLabels>
</View>"""
DETECTOR_VERSION = "detector-v1"
MIN_OBJECT_PX = 200  # objects smaller than this get no boxes (too small to matter here)


def box_region(box_xyxy: np.ndarray, width: int, height: int, region_id: str) -> dict[str, Any]:
    """A ``rectanglelabels`` region of the project's rectangle tool over the pixel box."""
    return rectangle_region(box_xyxy, width, height, LABEL, "box", "image", region_id=region_id)


def _jittered(box: np.ndarray, rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    w, h = box[2] - box[0], box[3] - box[1]
    moved = box + rng.normal(0, scale, 4) * np.array([w, h, w, h])
    return np.clip(moved, 0, size)


@dataclass
class BoxTask:
    """One task of the project: its JSON and the objects its boxes outline."""

    task: dict[str, Any]
    masks: list[np.ndarray] = field(default_factory=list)  # ground truth, one per boxed object


class BoxProjectAPI(LoopbackServer):
    """A box project ``project_id`` of ``n_tasks`` scenes (``size`` px), plus tasks without boxes
    and tasks whose image is gone. ``prediction_delay_s``: each ``POST /api/predictions/`` waits
    this long first (to catch a worker mid-chunk)."""

    def __init__(
        self,
        project_id: int = 11,
        n_tasks: int = 8,
        size: int = 128,
        seed: int = 300,
        no_box_tasks: int = 1,
        missing_image_tasks: int = 1,
        jitter: float = 0.04,
        prediction_delay_s: float = 0.0,
    ) -> None:
        from stable_sam.prompts import gt_box
        from training.scenes import make_scene

        self.project_id = project_id
        self.prediction_delay_s = prediction_delay_s
        self.files: dict[str, bytes] = {}
        self.tasks: dict[int, BoxTask] = {}
        self.predictions: dict[int, dict[str, Any]] = {}  # id -> prediction
        self.prediction_posts: dict[int, int] = {}  # task -> POST /api/predictions/ calls
        self.requests = 0
        self._lock = threading.Lock()
        self._next_prediction = 90000
        rng = np.random.default_rng(seed)
        task_id = 2000
        for i in range(n_tasks + no_box_tasks + missing_image_tasks):
            scene = make_scene(seed + i, size=size)
            path = f"/data/upload/{project_id}/boxes{i}.png"
            if i < n_tasks + no_box_tasks:
                self.files[path] = png_bytes(scene.image)
            masks = [m.astype(bool) for m in scene.masks if m.sum() >= MIN_OBJECT_PX]
            if n_tasks <= i < n_tasks + no_box_tasks:
                masks = []
            annotations = []
            for annotator in (1, 2):
                boxes = [_jittered(gt_box(m).astype(float), rng, size, jitter) for m in masks]
                regions = [
                    box_region(b, size, size, f"a{annotator}r{k}") for k, b in enumerate(boxes)
                ]
                annotations.append(
                    {
                        "id": task_id * 10 + annotator,
                        "completed_by": annotator,
                        "result": regions,
                        "was_cancelled": False,
                        "updated_at": f"2026-11-30T10:00:0{annotator}Z",
                    }
                )
            task = {
                "id": task_id,
                "project": project_id,
                "data": {"image": path},
                "overlap": 2,
                "annotations": annotations,
                "predictions": [],
            }
            self.tasks[task_id] = BoxTask(task, masks)
            if i % 3 == 0 and masks:
                detector = [
                    box_region(
                        _jittered(gt_box(m).astype(float), rng, size, jitter), size, size, f"d{k}"
                    )
                    for k, m in enumerate(masks)
                ]
                self._store(task_id, detector, DETECTOR_VERSION, None)
            task_id += 1
        api = self

        class Handler(QuietHandler):
            def _authorized(self) -> bool:
                with api._lock:
                    api.requests += 1
                if self.headers.get("Authorization") == f"Token {LEGACY_TOKEN}":
                    return True
                self.send_json(401, {"detail": "Authentication credentials were not provided."})
                return False

            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                if not self._authorized():
                    return
                url = urlparse(self.path)
                query = parse_qs(url.query)
                parts = url.path.strip("/").split("/")
                if url.path == f"/api/projects/{api.project_id}/":
                    self.send_json(200, {"id": api.project_id, "label_config": BOX_CONFIG})
                elif url.path == "/api/tasks/":
                    page, size = int(query["page"][0]), int(query["page_size"][0])
                    ids = sorted(api.tasks)[(page - 1) * size : page * size]
                    if not ids and page > 1:
                        self.send_json(404, {"detail": "Invalid page."})
                        return
                    only = query.get("fields", ["all"])[0] == "task_only"
                    tasks = [api.task_json(t, with_regions=not only) for t in ids]
                    self.send_json(200, {"tasks": tasks, "total": len(api.tasks)})
                elif parts[:2] == ["api", "tasks"] and len(parts) == 3 and parts[2].isdigit():
                    if int(parts[2]) not in api.tasks:
                        self.send_json(404, {"detail": "Not found."})
                    else:
                        self.send_json(200, api.task_json(int(parts[2])))
                elif url.path in api.files:
                    self.send_body(200, api.files[url.path], "image/png")
                else:
                    self.send_json(404, {"detail": "Not found."})

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if urlparse(self.path).path != "/api/predictions/":
                    self.send_json(404, {"detail": "Not found."})
                    return
                if api.prediction_delay_s:
                    time.sleep(api.prediction_delay_s)
                if body.get("task") not in api.tasks:
                    self.send_json(400, {"task": ["Invalid pk - object does not exist."]})
                    return
                created = api._store(
                    body["task"], body["result"], body.get("model_version"), body.get("score")
                )
                with api._lock:
                    api.prediction_posts[body["task"]] = (
                        api.prediction_posts.get(body["task"], 0) + 1
                    )
                self.send_json(201, created)

            def do_DELETE(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                parts = urlparse(self.path).path.strip("/").split("/")
                ok = parts[:2] == ["api", "predictions"] and len(parts) == 3
                with api._lock:
                    found = ok and parts[2].isdigit() and api.predictions.pop(int(parts[2]), None)
                if found:
                    self.send_body(204, b"")
                else:
                    self.send_json(404, {"detail": "Not found."})

        super().__init__(Handler)

    def _store(
        self, task: int, result: list, model_version: str | None, score: float | None
    ) -> dict[str, Any]:
        with self._lock:
            self._next_prediction += 1
            prediction = {
                "id": self._next_prediction,
                "task": task,
                "project": self.project_id,
                "result": result,
                "score": score,
                "model_version": model_version,
                "created_at": "2026-12-01T00:00:00Z",
                "updated_at": "2026-12-01T00:00:00Z",
            }
            self.predictions[prediction["id"]] = prediction
            return dict(prediction)

    def task_json(self, task_id: int, with_regions: bool = True) -> dict[str, Any]:
        task = dict(self.tasks[task_id].task)
        if with_regions:
            with self._lock:
                task["predictions"] = [
                    dict(p) for p in self.predictions.values() if p["task"] == task_id
                ]
        else:
            task.pop("annotations")
            task.pop("predictions")
        return task

    def predictions_of(self, task_id: int, model_version: str) -> list[dict[str, Any]]:
        with self._lock:
            return [
                dict(p)
                for p in self.predictions.values()
                if p["task"] == task_id and p["model_version"] == model_version
            ]

    @property
    def boxed_tasks(self) -> list[int]:
        return [t for t, box_task in self.tasks.items() if box_task.masks]

    @property
    def missing_image_tasks(self) -> list[int]:
        return [t for t, b in self.tasks.items() if b.task["data"]["image"] not in self.files]
