"""Boxes to masks through a real Label Studio: tasks holding two crowd annotators' rectangles
(``overlap`` 2) and a detector's imported rectangles get one brush prediction per object, of our
model version, through "Retrieve predictions" and through the project-wide conversion job on a
real RQ worker; retrieving or converting again adds none."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from stable_sam.metrics import mask_iou

from .harness import (
    LabelStudioDriver,
    LabelStudioServer,
    log_tail,
    rectangle_region,
    start_worker,
    stop_process,
    wait_until,
)
from .test_interactive import (
    BRUSH_NAME,
    IMAGE_NAME,
    MIN_IOU,
    RECTANGLE_NAME,
    SAM_CONFIG,
    decoded_mask,
    synthetic_targets,
)

pytestmark = pytest.mark.e2e

N_TASKS = 2
CONVERT_TIMEOUT_S = 240


def shifted(box: tuple[float, float, float, float], dx: float, dy: float) -> tuple[float, ...]:
    """A sloppier box: its corners moved by ``dx``, ``dy`` times its size."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return (x0 + dx * w, y0 + dy * h, x1 + dx * w, y1 - dy * h)


def make_box_project(
    label_studio, ls_client, crowd: LabelStudioDriver, start_backend, name: str, env: dict[str, str]
):
    """A project (two annotations per task) whose tasks hold two crowd annotators' boxes of
    their target and a detector's."""
    ls_client.set_legacy_tokens(False)
    backend = start_backend(
        name,
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.personal_access_token,
            "PREFETCH_WORKERS": "0",
            **env,
        },
    )
    targets = synthetic_targets(N_TASKS)
    project = ls_client.create_project(
        f"Stable-SAM e2e ({name})", SAM_CONFIG, maximum_annotations=2
    )
    tasks = ls_client.import_images(project["id"], {t.name: t.png for t in targets})
    for task, target in zip(tasks, targets, strict=True):
        box = target.box_xyxy()
        for annotator, (dx, dy) in ((ls_client, (0.04, 0.03)), (crowd, (-0.02, 0.04))):
            sloppy = rectangle_region(shifted(box, dx, dy), target.size_wh, "Object",
                                      RECTANGLE_NAME, IMAGE_NAME)  # fmt: skip
            annotator.create_annotation(task.id, [sloppy])
        detector = rectangle_region(shifted(box, -0.03, 0.02), target.size_wh, "Object",
                                    RECTANGLE_NAME, IMAGE_NAME)  # fmt: skip
        ls_client.create_prediction(task.id, [detector], model_version="detector-v1")
    ml_backend = ls_client.connect_ml_backend(project["id"], backend.url)
    assert ml_backend["state"] == "CO", ml_backend.get("error_message")
    return project["id"], ml_backend, tasks, targets, backend


@pytest.fixture(scope="module")
def crowd(label_studio: LabelStudioServer) -> Iterator[LabelStudioDriver]:
    """A second annotator of the organisation, with a token of their own."""
    client = label_studio.add_user("crowd2@boxes.test")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def box_project(
    label_studio: LabelStudioServer,
    ls_client: LabelStudioDriver,
    crowd: LabelStudioDriver,
    start_backend,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
):
    workdir = tmp_path_factory.mktemp("batch-boxes")
    env = {
        "REDIS_URL": redis_url,
        "CONVERT_QUEUE": "e2e-convert",
        "TRAINING_QUEUE": "e2e-convert-training",
        "VERSIONS_DIR": str(workdir / "versions"),
        "TRAIN_TORCH_THREADS": "1",  # LS, the backend, the worker and pytest share the CPU
        "LOG_LEVEL": "INFO",
    }
    return (*make_box_project(label_studio, ls_client, crowd, start_backend, "batch-boxes", env),
            env)  # fmt: skip


def ours(ls_client: LabelStudioDriver, task_id: int, version: str) -> list[dict]:
    return [p for p in ls_client.task(task_id)["predictions"] if p["model_version"] == version]


def test_retrieve_predictions_turns_the_boxes_into_one_mask_per_object(
    box_project, ls_client: LabelStudioDriver
) -> None:
    project_id, ml_backend, tasks, targets, _, _ = box_project
    version = ml_backend["model_version"]
    assert all(ls_client.task(t.id)["overlap"] == 2 for t in tasks)
    ls_client.retrieve_predictions(project_id)
    for task, target in zip(tasks, targets, strict=True):
        [prediction] = ours(ls_client, task.id, version)
        [region] = prediction["result"]  # the annotator's and the detector's box: one object
        assert region["type"] == "brushlabels" and region["from_name"] == BRUSH_NAME
        assert region["value"]["brushlabels"] == ["Object"]
        # the two annotators' boxes and the detector's: one object
        assert region["meta"]["text"][0].startswith("consensus of 3 boxes")
        assert mask_iou(decoded_mask(region), target.mask) >= MIN_IOU
        # the detector's own prediction is still there, untouched
        assert any(
            p["model_version"] == "detector-v1" for p in ls_client.task(task.id)["predictions"]
        )

    ls_client.retrieve_predictions(project_id)  # again: nothing new for these tasks
    for task in tasks:
        assert len(ours(ls_client, task.id, version)) == 1
    assert np.isfinite(prediction["score"])


def test_a_batch_past_its_budget_is_converted_task_by_task(
    label_studio: LabelStudioServer,
    ls_client: LabelStudioDriver,
    crowd: LabelStudioDriver,
    start_backend,
) -> None:
    # Past BATCH_PREDICT_BUDGET_S the backend answers one task; Label Studio then asks for each
    # task on its own, so every task still gets its masks (none is lost to the 100 s timeout).
    project_id, ml_backend, tasks, targets, backend = make_box_project(
        label_studio,
        ls_client,
        crowd,
        start_backend,
        "batch-budget",
        {"BATCH_PREDICT_BUDGET_S": "0.000001"},
    )
    ls_client.retrieve_predictions(project_id)
    for task, target in zip(tasks, targets, strict=True):
        [prediction] = ours(ls_client, task.id, ml_backend["model_version"])
        [region] = prediction["result"]
        assert mask_iou(decoded_mask(region), target.mask) >= MIN_IOU
    assert (
        "answering one task so that Label Studio asks task by task" in backend.log_path.read_text()
    )


@pytest.fixture(scope="module")
def convert_worker(
    box_project, label_studio: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``python -m training.worker`` with the backend's settings (the deployment's worker)."""
    env = {
        **box_project[-1],
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.personal_access_token,
    }
    log_path = tmp_path_factory.mktemp("convert-worker") / "worker.log"
    worker = start_worker(env, log_path)
    try:
        yield worker, log_path
    finally:
        stop_process(worker)


def run_conversion(backend_url: str, project_id: int, worker) -> dict:
    """POST /convert, then follow GET /convert/<project> until the run ends; its last status."""
    started = httpx.post(f"{backend_url}/convert", json={"project": project_id}, timeout=10)
    assert started.status_code == 202, started.text
    views: list[dict] = []

    def ended() -> bool:
        views.append(httpx.get(f"{backend_url}/convert/{project_id}", timeout=5).json())
        return views[-1]["state"] not in ("queued", "planning", "running")

    wait_until(ended, CONVERT_TIMEOUT_S, "the conversion run", *worker)
    assert views[-1]["run_id"] == started.json()["run_id"]
    return views[-1]


def test_the_project_job_converts_every_task_and_a_rerun_replaces_its_predictions(
    box_project, convert_worker, ls_client: LabelStudioDriver
) -> None:
    project_id, ml_backend, tasks, targets, backend, _ = box_project
    version = ml_backend["model_version"]
    before = {t.id: [p["id"] for p in ours(ls_client, t.id, version)] for t in tasks}
    ids: dict[int, list[int]] = {}
    runs: list[str] = []
    for _ in range(2):  # the second run replaces the first one's predictions
        view = run_conversion(backend.url, project_id, convert_worker)
        log = log_tail(convert_worker[1])
        assert view["state"] == "done", f"{view}\n{log}"
        assert (view["tasks"], view["done"], view["failed"]) == (N_TASKS, N_TASKS, 0), view
        assert view["objects"] == N_TASKS and view["boxes"] == 3 * N_TASKS
        status = httpx.get(f"{backend.url}/status/{project_id}", timeout=5).json()
        assert status["conversion"]["run_id"] == view["run_id"]
        for task, target in zip(tasks, targets, strict=True):
            [prediction] = ours(ls_client, task.id, version)  # one, never two
            assert prediction["id"] not in before[task.id] + ids.get(task.id, [])
            ids.setdefault(task.id, []).append(prediction["id"])
            [region] = prediction["result"]
            assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Object"]
            assert region["meta"]["text"][0].startswith("consensus of 3 boxes")
            assert mask_iou(decoded_mask(region), target.mask) >= MIN_IOU
            detector = [
                p for p in ls_client.task(task.id)["predictions"]
                if p["model_version"] == "detector-v1"
            ]  # fmt: skip
            assert len(detector) == 1  # untouched
        runs.append(view["run_id"])
    assert len(set(runs)) == 2
