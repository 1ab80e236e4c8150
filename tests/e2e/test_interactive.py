"""Interactive masks through a real Label Studio, exactly as the browser asks for them.

A project with the SAM labeling config gets synthetic images with a known target object; our
backend runs as a real process and is connected through Label Studio's API; each test posts what
the browser posts after a smart region is drawn (``/api/ml/{id}/interactive-annotating``) and
decodes the brush RLE that Label Studio hands back. Every test runs twice: with the backend
holding a personal access token (legacy tokens disabled, the LS 1.23 default) and with no
configuration, relying on the legacy token Label Studio sends in ``/setup``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle

from bench.loopback import png_bytes
from stable_sam import StableSamPredictor, build_stable_sam
from stable_sam.build import build_sam
from stable_sam.metrics import mask_iou
from stable_sam.sam2_base import is_sam2_type, save_sam2_checkpoint
from training.click_loop import next_click
from training.scenes import make_scene, scene_seed

from .harness import (
    BackendServer,
    ImportedTask,
    LabelStudioDriver,
    LabelStudioServer,
    keypoint_region,
    rectangle_region,
)

pytestmark = pytest.mark.e2e

# Unusual tag names on purpose: the backend must find the BrushLabels by its Image, not by name.
SAM_CONFIG = """
<View>
  <Image name="photo" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="photo">
    <Label value="Object" background="#FF0000"/>
    <Label value="Other" background="#0000FF"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="photo" smart="true">
    <Label value="Object" smart="true" background="#000000" showInline="true"/>
    <Label value="Other" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="photo" smart="true">
    <Label value="Object" background="#000000" showInline="true"/>
    <Label value="Other" background="#000000" showInline="true"/>
  </RectangleLabels>
</View>
"""
IMAGE_NAME, BRUSH_NAME, KEYPOINT_NAME, RECTANGLE_NAME = "photo", "mask", "click", "box"

IMAGE_HW = (480, 640)  # not square, so x/y mix-ups show
N_IMAGES = 2
MIN_IOU = 0.8

PAT, LEGACY = "personal-access-token", "legacy-token"


@dataclass
class Target:
    """One synthetic image and its target object: ``mask`` (H, W) bool, ``png`` the upload."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    png: bytes

    @property
    def size_wh(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]

    def inner_point(self) -> tuple[float, float]:
        """The pixel (x, y) deepest inside the object: where an annotator clicks."""
        depth = cv2.distanceTransform(self.mask.astype(np.uint8), cv2.DIST_L2, 5)
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        return float(x) + 0.5, float(y) + 0.5

    def outer_point(self) -> tuple[float, float]:
        """A background pixel (x, y) near the object, in its box grown by a quarter: where an
        annotator clicks "not this"."""
        x0, y0, x1, y1 = self.box_xyxy()
        grow_x, grow_y = (x1 - x0) / 4, (y1 - y0) / 4
        h, w = self.mask.shape
        left, top = max(0, int(x0 - grow_x)), max(0, int(y0 - grow_y))
        right, bottom = min(w, int(x1 + grow_x)), min(h, int(y1 + grow_y))
        distance = cv2.distanceTransform((~self.mask).astype(np.uint8), cv2.DIST_L2, 5)
        window = distance[top:bottom, left:right]
        y, x = np.unravel_index(int(np.argmax(window)), window.shape)
        return float(left + x) + 0.5, float(top + y) + 0.5

    def box_xyxy(self) -> tuple[float, float, float, float]:
        """The tight box of the object in pixels (x1, y1 exclusive)."""
        ys, xs = np.nonzero(self.mask)
        return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _is_clear_target(mask: np.ndarray) -> bool:
    """A solid, unoccluded, mid-sized object away from the border: unambiguous for one click."""
    h, w = mask.shape
    area = int(mask.sum())
    if not 0.03 * h * w <= area <= 0.3 * h * w:
        return False
    ys, xs = np.nonzero(mask)
    if xs.min() < 4 or ys.min() < 4 or xs.max() > w - 5 or ys.max() > h - 5:
        return False
    n_components, _ = cv2.connectedComponents(mask.astype(np.uint8))
    if n_components != 2:  # background + one piece
        return False
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    hull_area = cv2.contourArea(cv2.convexHull(contours[0]))
    return area >= 0.9 * hull_area


def synthetic_targets(n: int) -> list[Target]:
    """The first ``n`` held-out synthetic scenes that have a clear target (deterministic)."""
    targets: list[Target] = []
    index = 0
    while len(targets) < n:
        scene = make_scene(scene_seed("heldout", index), size=IMAGE_HW)
        candidates = [
            k
            for k, kind in enumerate(scene.kinds)
            if kind in ("ellipse", "convex") and _is_clear_target(scene.masks[k])
        ]
        if candidates:
            k = max(candidates, key=lambda c: int(scene.masks[c].sum()))
            name = f"scene-{index:03d}.png"
            targets.append(Target(name, scene.image, scene.masks[k], png_bytes(scene.image)))
        index += 1
        assert index < 500, "no clear targets in 500 scenes: the scene generator changed"
    return targets


@dataclass
class Connected:
    """A project with the targets' images, connected to a running backend."""

    mode: str
    project_id: int
    tasks: list[ImportedTask]
    ml_backend: dict
    backend: BackendServer


@pytest.fixture(scope="module")
def targets() -> list[Target]:
    return synthetic_targets(N_IMAGES)


@pytest.fixture(scope="module", params=[PAT, LEGACY])
def connected(
    request: pytest.FixtureRequest,
    label_studio: LabelStudioServer,
    ls_client: LabelStudioDriver,
    start_backend,
    targets: list[Target],
) -> Connected:
    """A project wired to a backend set up the ``request.param`` way."""
    mode = request.param
    ls_client.set_legacy_tokens(mode == LEGACY)
    if mode == PAT:
        env = {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.personal_access_token,
        }
    else:
        # Everything comes from /setup (hostname and the legacy access token), which the
        # operator allows explicitly; the first Label Studio to call is then the only one.
        env = {"LABEL_STUDIO_TRUST_SETUP": "true"}
    backend = start_backend(f"backend-{mode}", env)
    project = ls_client.create_project(f"Stable-SAM e2e ({mode})", SAM_CONFIG)
    tasks = ls_client.import_images(project["id"], {t.name: t.png for t in targets})
    ml_backend = ls_client.connect_ml_backend(project["id"], backend.url)
    return Connected(mode, project["id"], tasks, ml_backend, backend)


@pytest.fixture
def setup(connected: Connected, ls_client: LabelStudioDriver) -> Connected:
    """``connected`` with the organisation's legacy-token switch as that setup assumes: off for
    the PAT setup (so only the PAT can work), on for the legacy one."""
    ls_client.set_legacy_tokens(connected.mode == LEGACY)
    return connected


def predict(
    ls_client: LabelStudioDriver, setup: Connected, task: ImportedTask, regions: list[dict]
) -> dict:
    """Ask Label Studio for an interactive prediction; return the result entry it hands over."""
    answer = ls_client.interactive_annotating(setup.ml_backend["id"], task.id, regions)
    assert "errors" not in answer, f"Label Studio reported: {answer.get('errors')}"
    return answer["data"]


def decoded_mask(region: dict) -> np.ndarray:
    """The (H, W) bool mask of a brush region, checking the RLE is exactly H·W·4 RGBA bytes."""
    width, height = region["original_width"], region["original_height"]
    rgba = decode_rle(region["value"]["rle"])
    assert rgba.size == height * width * 4
    assert set(np.unique(rgba).tolist()) <= {0, 255}
    return rgba.reshape(height, width, 4)[..., 3] > 0


def only_brush_region(data: dict) -> dict:
    regions = data["result"]
    assert len(regions) == 1
    assert regions[0]["type"] == "brushlabels"
    return regions[0]


def test_connecting_checks_health_and_setup(setup: Connected) -> None:
    # Label Studio only stores a backend after /health and /setup answered.
    assert setup.ml_backend["state"] == "CO", setup.ml_backend.get("error_message")
    assert setup.ml_backend["model_version"]


def test_opening_a_task_stores_a_prediction_of_our_model_version(
    setup: Connected, ls_client: LabelStudioDriver
) -> None:
    # The batch /predict (no context) Label Studio sends when a task is opened.
    task = ls_client.task(setup.tasks[-1].id)
    versions = [prediction["model_version"] for prediction in task["predictions"]]
    assert versions == [setup.ml_backend["model_version"]]


def test_prediction_is_one_brush_region_with_the_prompting_label(
    setup: Connected, ls_client: LabelStudioDriver, targets: list[Target]
) -> None:
    target, task = targets[0], setup.tasks[0]
    click = keypoint_region(
        target.inner_point(), target.size_wh, "Other", from_name=KEYPOINT_NAME, to_name=IMAGE_NAME
    )
    data = predict(ls_client, setup, task, [click])

    region = only_brush_region(data)
    assert region["from_name"] == BRUSH_NAME
    assert region["to_name"] == IMAGE_NAME
    assert (region["original_width"], region["original_height"]) == target.size_wh
    assert region["value"]["format"] == "rle"
    assert region["value"]["brushlabels"] == ["Other"]
    assert decoded_mask(region).any()
    assert isinstance(data["score"], float)
    assert isinstance(data["model_version"], str) and data["model_version"]


@pytest.mark.parametrize("index", range(N_IMAGES))
def test_one_keypoint_covers_the_object(
    setup: Connected, ls_client: LabelStudioDriver, targets: list[Target], index: int
) -> None:
    target = targets[index]
    click = keypoint_region(
        target.inner_point(), target.size_wh, "Object", from_name=KEYPOINT_NAME, to_name=IMAGE_NAME
    )
    data = predict(ls_client, setup, setup.tasks[index], [click])

    region = only_brush_region(data)
    assert region["value"]["brushlabels"] == ["Object"]
    assert mask_iou(decoded_mask(region), target.mask) >= MIN_IOU
    assert data["model_version"]


@pytest.mark.parametrize("index", range(N_IMAGES))
def test_positive_and_negative_keypoints_cover_the_object(
    setup: Connected, ls_client: LabelStudioDriver, targets: list[Target], index: int
) -> None:
    target = targets[index]
    # The second click resends the first: the context holds every keypoint placed so far.
    inside = keypoint_region(
        target.inner_point(), target.size_wh, "Object", from_name=KEYPOINT_NAME, to_name=IMAGE_NAME
    )
    outside = keypoint_region(
        target.outer_point(),
        target.size_wh,
        "Object",
        positive=False,
        from_name=KEYPOINT_NAME,
        to_name=IMAGE_NAME,
    )
    data = predict(ls_client, setup, setup.tasks[index], [inside, outside])

    mask = decoded_mask(only_brush_region(data))
    assert mask_iou(mask, target.mask) >= MIN_IOU
    x, y = target.outer_point()
    assert not mask[int(y), int(x)], "the negative point is inside the mask"
    assert data["model_version"]


def test_three_successive_clicks_each_answer_at_least_as_well_as_the_last(
    setup: Connected, ls_client: LabelStudioDriver, targets: list[Target]
) -> None:
    # The annotator's loop: each click goes where the last mask is most wrong (the simulated
    # annotator of the click-loop benchmark), and Label Studio resends every click so far.
    target, task = targets[1], setup.tasks[1]
    mask = np.zeros_like(target.mask)
    regions: list[dict] = []
    ious = []
    for _ in range(3):
        click = next_click(target.mask, mask)
        assert click is not None, "the mask is exact already: pick another target"
        regions.append(
            keypoint_region(
                (click.x, click.y), target.size_wh, "Object", click.positive,
                KEYPOINT_NAME, IMAGE_NAME,
            )
        )  # fmt: skip
        mask = decoded_mask(only_brush_region(predict(ls_client, setup, task, list(regions))))
        ious.append(mask_iou(mask, target.mask))
    assert ious[0] >= MIN_IOU
    assert ious[1] >= ious[0] and ious[2] >= ious[1], ious


@pytest.mark.parametrize("index", range(N_IMAGES))
def test_rectangle_covers_the_object(
    setup: Connected, ls_client: LabelStudioDriver, targets: list[Target], index: int
) -> None:
    target = targets[index]
    box = rectangle_region(
        target.box_xyxy(), target.size_wh, "Object", from_name=RECTANGLE_NAME, to_name=IMAGE_NAME
    )
    data = predict(ls_client, setup, setup.tasks[index], [box])

    region = only_brush_region(data)
    assert region["value"]["brushlabels"] == ["Object"]
    assert mask_iou(decoded_mask(region), target.mask) >= MIN_IOU
    assert data["model_version"]


# --- The transport, independent of how well the model is trained ------------------------------


# The bases the transport is pinned for: the mini SAM; MobileSAM (real size, 1024 px input,
# TinyViT encoder); and, for SAM 2's square input frame, its box-as-points prompts and
# high-resolution features, SAM 2.1 hiera tiny. Seeds of their random weights: mini seed 7 gives
# masks covering 59-67 % of the first target image for all three prompts, so a misplaced prompt
# changes many pixels (seed 0 covers 86-98 %: too little contrast); vit_t seed 7 covers 43-66 %;
# hiera tiny seed 1 covers 39-58 % (its seed 0: 97 %). The other SAM 2.1 sizes share the code but
# not the config (every new model type goes through Label Studio once): small seed 2 covers
# 35-72 % (seed 1: 8-92 %), base+ seed 1 34-53 %, large seed 3 25-60 % (seeds 1, 2: 0-100 %).
TRANSPORT_BASES = {
    "mini": 7,
    "vit_t": 7,
    "sam2.1_hiera_tiny": 1,
    "sam2.1_hiera_small": 2,
    "sam2.1_hiera_base_plus": 1,
    "sam2.1_hiera_large": 3,
}


@pytest.fixture(scope="module", params=list(TRANSPORT_BASES))
def base_type(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory, base_type: str) -> Path:
    """A ``base_type`` SAM with fixed random weights, saved as an official checkpoint (a
    ``.pth`` state_dict for SAM, ``{"model": state_dict}`` in a ``.pt`` for SAM 2)."""
    torch.manual_seed(TRANSPORT_BASES[base_type])
    folder = tmp_path_factory.mktemp("weights")
    if is_sam2_type(base_type):
        return save_sam2_checkpoint(build_sam(base_type), folder / f"{base_type}-random.pt")
    path = folder / f"{base_type}-random.pth"
    torch.save(build_sam(base_type).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference_predictor(random_checkpoint: Path, base_type: str) -> StableSamPredictor:
    """The same plain SAM as the backend serves, in this process."""
    model = build_stable_sam(base_type, random_checkpoint, plugins=False, device="cpu")
    return StableSamPredictor(model)


@pytest.fixture(scope="module")
def plain_sam_setup(
    label_studio: LabelStudioServer,
    ls_client: LabelStudioDriver,
    start_backend,
    targets: list[Target],
    random_checkpoint: Path,
    base_type: str,
) -> Connected:
    """A project served by a backend running plain ``base_type`` from ``random_checkpoint``."""
    ls_client.set_legacy_tokens(False)
    env = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.personal_access_token,
        "SAM_MODEL_TYPE": base_type,
        "SAM_CHECKPOINT": str(random_checkpoint),
        "SAM_PLUGINS": "none",
        "REFINE_MASKS": "on",  # so the refined second click's transport is pinned too
    }
    backend = start_backend(f"backend-plain-{base_type}", env)
    project = ls_client.create_project(f"Stable-SAM e2e (plain {base_type})", SAM_CONFIG)
    tasks = ls_client.import_images(project["id"], {t.name: t.png for t in targets})
    ml_backend = ls_client.connect_ml_backend(project["id"], backend.url)
    return Connected(PAT, project["id"], tasks, ml_backend, backend)


@pytest.mark.parametrize("prompt", ["keypoint", "positive+negative", "rectangle"])
def test_mask_through_label_studio_is_the_models_mask_for_that_prompt(
    plain_sam_setup: Connected,
    ls_client: LabelStudioDriver,
    targets: list[Target],
    reference_predictor: StableSamPredictor,
    prompt: str,
) -> None:
    # Whatever the weights, the mask that comes back through Label Studio must be the one the
    # model makes in-process for the same pixel prompt: this pins percent coordinates, image
    # fetching and decoding, and the RLE, even where the IoU tests cannot pass.
    ls_client.set_legacy_tokens(False)
    target, task = targets[0], plain_sam_setup.tasks[0]
    inside, outside = target.inner_point(), target.outer_point()
    regions, points, labels, box = [], None, None, None
    if prompt == "rectangle":
        box = np.array(target.box_xyxy())
        regions = [rectangle_region(box, target.size_wh, "Object", RECTANGLE_NAME, IMAGE_NAME)]
    else:
        clicks = [(inside, True)] + ([(outside, False)] if prompt == "positive+negative" else [])
        regions = [
            keypoint_region(xy, target.size_wh, "Object", positive, KEYPOINT_NAME, IMAGE_NAME)
            for xy, positive in clicks
        ]
        points = np.array([xy for xy, _ in clicks], dtype=np.float32)
        labels = np.array([int(positive) for _, positive in clicks])

    mask_input = None
    if prompt == "positive+negative":
        # The second click of a chain: the backend refines it with its answer to the first.
        predict(ls_client, plain_sam_setup, task, regions[:1])
        first = reference_predictor.predict(
            target.image, point_coords=points[:1], point_labels=labels[:1]
        )
        mask_input = first.low_res_logits[:1]
    data = predict(ls_client, plain_sam_setup, task, regions)
    served = decoded_mask(only_brush_region(data))

    expected = reference_predictor.predict(
        target.image, point_coords=points, point_labels=labels, box_xyxy=box,
        mask_input=mask_input,
    )  # fmt: skip
    reference = np.asarray(expected.masks[0])
    assert 0.05 < reference.mean() < 0.95, "degenerate reference mask: pick another seed"
    # Identical up to float noise between two processes: at most 0.1 % of the pixels differ.
    assert np.mean(served != reference) <= 0.001
