"""Training through a real Label Studio: annotate, press "train", get a new served version.

A project with brush-annotated synthetic images (annotations created through Label Studio's
API, brush RLE exactly as the browser stores it); our backend and a real training worker
(``python -m training.worker``) run as processes with the same settings;
``POST /api/ml/{id}/train`` makes Label Studio send ``START_TRAINING`` to our ``/webhook``. The
job fetches the annotations and images back from Label Studio (with the personal access token,
or with the legacy token Label Studio sent in ``/setup``), trains, and writes a version; the
test checks that ``/versions`` lists it, that new interactive predictions carry its
``model_version`` and that their masks changed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from bench.loopback import png_bytes
from bench.ls_shapes import brush_region
from training.scenes import make_scene, scene_seed

from .harness import (
    BackendServer,
    HarnessError,
    ImportedTask,
    LabelStudioDriver,
    LabelStudioServer,
    keypoint_region,
    log_tail,
    start_worker,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.e2e

CONFIG = """
<View>
  <Image name="photo" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="photo">
    <Label value="Object" background="#FF0000"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="photo" smart="true">
    <Label value="Object" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
</View>
"""
IMAGE_HW = (192, 256)
N_IMAGES = 6
TRAIN_TIMEOUT_S = 420.0
PAT, LEGACY = "personal-access-token", "legacy-token"


@dataclass
class Scene:
    name: str
    image: np.ndarray
    masks: np.ndarray  # (N, H, W) bool
    png: bytes

    @property
    def size_wh(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]


def scenes(n: int) -> list[Scene]:
    out = []
    for index in range(n):
        scene = make_scene(scene_seed("heldout", 200 + index), size=IMAGE_HW)
        masks = np.stack([m for m in scene.masks if m.sum() >= 50])
        out.append(Scene(f"train-{index:02d}.png", scene.image, masks, png_bytes(scene.image)))
    return out


def inner_point(mask: np.ndarray) -> tuple[float, float]:
    depth = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(x) + 0.5, float(y) + 0.5


def decoded(region: dict) -> np.ndarray:
    width, height = region["original_width"], region["original_height"]
    return decode_rle(region["value"]["rle"]).reshape(height, width, 4)[..., 3] > 0


@dataclass
class Setup:
    mode: str
    project_id: int
    tasks: list[ImportedTask]
    ml_backend: dict
    backend: BackendServer
    worker: subprocess.Popen
    worker_log: Path


@pytest.fixture(scope="module", params=[PAT, LEGACY])
def setup(
    request: pytest.FixtureRequest,
    label_studio: LabelStudioServer,
    ls_client: LabelStudioDriver,
    start_backend,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    """A project with N_IMAGES uploaded images, our backend connected and an RQ worker."""
    mode = request.param
    workdir = tmp_path_factory.mktemp(f"training-{mode}")
    ls_client.set_legacy_tokens(mode == LEGACY)
    env = {
        "REDIS_URL": redis_url,
        "TRAINING_QUEUE": f"e2e-training-{mode}",
        "VERSIONS_DIR": str(workdir / "versions"),
        "TRAIN_TORCH_THREADS": "1",  # LS, the backend, the worker and pytest share the CPU
        "TRAIN_EPOCHS": "5",
        # The e2e test checks the plumbing end to end: every run is served. The promotion rule
        # itself is tested in tests/integration/test_training_worker.py.
        "TRAIN_PROMOTE_TOLERANCE": "100",
        "LOG_LEVEL": "INFO",
    }
    if mode == PAT:
        env["LABEL_STUDIO_URL"] = label_studio.url
        env["LABEL_STUDIO_API_KEY"] = label_studio.personal_access_token
    else:
        env["LABEL_STUDIO_TRUST_SETUP"] = "true"  # the legacy token and hostname from /setup
    backend = start_backend(f"training-{mode}", env)
    worker_log = workdir / "worker.log"
    worker = start_worker(env, worker_log)
    try:
        project = ls_client.create_project(f"Stable-SAM training e2e ({mode})", CONFIG)
        images = scenes(N_IMAGES)
        tasks = ls_client.import_images(project["id"], {s.name: s.png for s in images})
        ml_backend = ls_client.connect_ml_backend(project["id"], backend.url)
        yield Setup(mode, project["id"], tasks, ml_backend, backend, worker, worker_log)
    finally:
        stop_process(worker)


def interactive_mask(
    ls_client: LabelStudioDriver, setup: Setup, scene: Scene, task: ImportedTask
) -> tuple[np.ndarray, str]:
    largest = max(scene.masks, key=lambda m: int(m.sum()))
    click = keypoint_region(
        inner_point(largest), scene.size_wh, "Object", from_name="click", to_name="photo"
    )
    answer = ls_client.interactive_annotating(setup.ml_backend["id"], task.id, [click])
    assert "errors" not in answer, answer.get("errors")
    region = answer["data"]["result"][0]
    assert region["type"] == "brushlabels"
    return decoded(region), answer["data"]["model_version"]


def test_train_button_trains_and_serves_a_new_version(
    setup: Setup, ls_client: LabelStudioDriver
) -> None:
    ls_client.set_legacy_tokens(setup.mode == LEGACY)
    images = scenes(N_IMAGES)
    mask_before, version_before = interactive_mask(ls_client, setup, images[0], setup.tasks[0])

    for scene, task in zip(images, setup.tasks, strict=True):
        ls_client.create_annotation(
            task.id,
            [brush_region(m, f"brush{k}", "mask", "photo") for k, m in enumerate(scene.masks)],
        )
    ls_client.train(setup.ml_backend["id"])

    backend = httpx.Client(base_url=setup.backend.url, timeout=10)

    final: dict = {}

    def trained() -> bool:
        status = backend.get(f"/status/{setup.project_id}").json()
        ended = status["last_run"] is not None or status["last_failure"] is not None
        if ended and status["queued"] is None and status["running"] is None:
            final.update(status)
            return True
        return False

    try:
        wait_until(trained, TRAIN_TIMEOUT_S, "the training job", setup.worker, setup.worker_log)
    except HarnessError as error:
        pytest.fail(f"{error}\nbackend log:\n{log_tail(setup.backend.log_path)}", pytrace=False)
    status = final
    assert status["last_failure"] is None, f"{status['last_failure']}\n{log_tail(setup.worker_log)}"
    report = status["last_run"]["report"]
    assert report["samples"] == N_IMAGES
    assert report["instances"] == sum(len(s.masks) for s in images)
    assert report["promoted"] is True

    versions = backend.get("/versions", params={"project": setup.project_id}).json()["versions"]
    assert versions == [report["version"]]
    assert status["current_version"]["name"] == report["version"]
    # Label Studio lists the versions it gets from our /versions.
    listed = ls_client.model_versions(setup.ml_backend["id"])
    assert report["version"] in listed, listed[:500]

    mask_after, version_after = interactive_mask(ls_client, setup, images[0], setup.tasks[0])
    assert version_after == report["version"] != version_before
    assert not np.array_equal(mask_after, mask_before), (
        f"the new plugins did not change the mask (area {int(mask_before.sum())} px before and "
        f"after; an empty mask means the base model predicts nothing for this click)"
    )
    backend.close()
