"""Boxes to masks through a real Label Studio's "Retrieve predictions": tasks holding an
annotator's rectangles and a detector's imported rectangles get one brush prediction per object,
of our model version, and retrieving again adds none."""

from __future__ import annotations

import numpy as np
import pytest

from stable_sam.metrics import mask_iou

from .harness import LabelStudioDriver, LabelStudioServer, rectangle_region
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


def shifted(box: tuple[float, float, float, float], dx: float, dy: float) -> tuple[float, ...]:
    """A sloppier box: its corners moved by ``dx``, ``dy`` times its size."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return (x0 + dx * w, y0 + dy * h, x1 + dx * w, y1 - dy * h)


def make_box_project(label_studio, ls_client, start_backend, name: str, env: dict[str, str]):
    """A project whose tasks hold an annotator's and a detector's box of their target."""
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
    project = ls_client.create_project(f"Stable-SAM e2e ({name})", SAM_CONFIG)
    tasks = ls_client.import_images(project["id"], {t.name: t.png for t in targets})
    for task, target in zip(tasks, targets, strict=True):
        box = target.box_xyxy()
        crowd = rectangle_region(shifted(box, 0.04, 0.03), target.size_wh, "Object",
                                 RECTANGLE_NAME, IMAGE_NAME)  # fmt: skip
        ls_client.create_annotation(task.id, [crowd])
        detector = rectangle_region(shifted(box, -0.03, 0.02), target.size_wh, "Object",
                                    RECTANGLE_NAME, IMAGE_NAME)  # fmt: skip
        ls_client.create_prediction(task.id, [detector], model_version="detector-v1")
    ml_backend = ls_client.connect_ml_backend(project["id"], backend.url)
    assert ml_backend["state"] == "CO", ml_backend.get("error_message")
    return project["id"], ml_backend, tasks, targets, backend


@pytest.fixture(scope="module")
def box_project(label_studio: LabelStudioServer, ls_client: LabelStudioDriver, start_backend):
    return make_box_project(label_studio, ls_client, start_backend, "batch-boxes", {})


def ours(ls_client: LabelStudioDriver, task_id: int, version: str) -> list[dict]:
    return [p for p in ls_client.task(task_id)["predictions"] if p["model_version"] == version]


def test_retrieve_predictions_turns_the_boxes_into_one_mask_per_object(
    box_project, ls_client: LabelStudioDriver
) -> None:
    project_id, ml_backend, tasks, targets, _ = box_project
    version = ml_backend["model_version"]
    ls_client.retrieve_predictions(project_id)
    for task, target in zip(tasks, targets, strict=True):
        [prediction] = ours(ls_client, task.id, version)
        [region] = prediction["result"]  # the annotator's and the detector's box: one object
        assert region["type"] == "brushlabels" and region["from_name"] == BRUSH_NAME
        assert region["value"]["brushlabels"] == ["Object"]
        assert region["meta"]["text"][0].startswith("consensus of 2 boxes")
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
    label_studio: LabelStudioServer, ls_client: LabelStudioDriver, start_backend
) -> None:
    # Past BATCH_PREDICT_BUDGET_S the backend answers one task; Label Studio then asks for each
    # task on its own, so every task still gets its masks (none is lost to the 100 s timeout).
    project_id, ml_backend, tasks, targets, backend = make_box_project(
        label_studio,
        ls_client,
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
