"""Setting up a user study in Label Studio: one task per (image, target), the target highlighted.

``python -m training.user_study collect --ls-url URL --gt GT`` takes ground truth (a mask folder
or a COCO file, with the original images), draws each target object on a copy of its image
(an outline, or a tint plus outline), uploads the copies to a new project with a
``RectangleLabels`` config, and writes into every task's data the original image's file name
(``image_name``), the target's ground-truth id (``target_id``), a readable name
(``target_name``) and the highlight style. ``evaluate`` reads those keys to match every box
with its object, and prompts the models on the original image (``--images`` or the ground
truth's image folder), never on the highlighted copy.

The upload goes through Label Studio's import endpoint (one task per file). A project whose
config references more than one task field turns uploaded files into ``$undefined$`` data, so
the project starts with an ``$image``-only config, the tasks' data is completed with PATCH, and
the final config (with the target's name in the header) is set last.
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from labelstudio.client import LabelStudioClient
from training.data import read_rgb
from training.user_study.ground_truth import GtImage
from training.user_study.ls_export import (
    IMAGE_KEY,
    IMAGE_NAME_KEY,
    TARGET_ID_KEY,
    TARGET_NAME_KEY,
    image_key_for,
)

logger = logging.getLogger(__name__)

HIGHLIGHT_RGB = (255, 40, 40)
UPLOAD_BATCH = 20  # files per import request

UPLOAD_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="box" toName="image">
    <Label value="target" background="#FF2828"/>
  </RectangleLabels>
</View>"""

STUDY_CONFIG = """<View>
  <Header value="Draw ONE tight box around the highlighted object: $target_name"/>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="box" toName="image">
    <Label value="target" background="#FF2828"/>
  </RectangleLabels>
</View>"""

INSTRUCTIONS = (
    "<p>Each image shows one object outlined in red. Draw one box that fits that object "
    "as tightly as you can, then submit. Work quickly: a few seconds per image. If the "
    "outlined object is impossible to box, press Skip.</p>"
)


@dataclass
class StudyTarget:
    """One task to create: ``image_key`` / ``object_id`` in the ground truth, and its picture."""

    image_key: str
    image_name: str
    object_id: str
    target_name: str
    highlighted_path: Path


def highlight(image_rgb: np.ndarray, mask: np.ndarray, style: str) -> np.ndarray:
    """A copy of ``image_rgb`` (H, W, 3) uint8 with ``mask`` (H, W) bool drawn on it.

    ``outline``: the mask's contour in red, ~0.4% of the image diagonal thick (>= 2 px);
    ``tint``: a 35% red tint over the mask plus the outline; ``none``: an unchanged copy.
    """
    out = image_rgb.copy()
    if style == "none":
        return out
    if style == "tint":
        tint = np.array(HIGHLIGHT_RGB, dtype=np.float32)
        out[mask] = (0.65 * out[mask].astype(np.float32) + 0.35 * tint).astype(np.uint8)
    elif style != "outline":
        raise ValueError(f"unknown highlight style {style!r}")
    h, w = mask.shape
    thickness = max(2, round(0.004 * float(np.hypot(h, w))))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, HIGHLIGHT_RGB, thickness)
    return out


def plan_targets(
    gt: Mapping[str, GtImage],
    work_dir: Path,
    style: str = "outline",
    max_targets: int | None = None,
    min_area: int = 0,
) -> list[StudyTarget]:
    """Render the highlighted image of every target into ``work_dir``; largest objects first."""
    work_dir.mkdir(parents=True, exist_ok=True)
    targets = []
    for key in sorted(gt):
        image = gt[key]
        if image.image_path is None:
            raise FileNotFoundError(f"image {key}: the ground truth has no image file for it")
        objects = [o for o in image.objects.values() if int(o.mask.sum()) >= min_area]
        objects.sort(key=lambda o: -int(o.mask.sum()))
        if not objects:
            continue
        rgb = read_rgb(image.image_path)
        for obj in objects[:max_targets]:
            # a numbered, filesystem- and URL-safe name: Label Studio may rewrite others on upload
            path = work_dir / f"t{len(targets):05d}__{_safe(key)}__{_safe(obj.object_id)}.png"
            picture = highlight(rgb, obj.mask, style)
            cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
            name = obj.label or f"object {obj.object_id}"
            targets.append(StudyTarget(key, image.image_path.name, obj.object_id, name, path))
    logger.info("user study: %d targets in %d images", len(targets), len(gt))
    return targets


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60]


def create_study(
    client: LabelStudioClient,
    targets: list[StudyTarget],
    title: str,
    style: str = "outline",
) -> dict[str, Any]:
    """Create the project, upload one task per target, complete the task data; the project."""
    project = client.create_project(
        title,
        UPLOAD_CONFIG,
        expert_instruction=INSTRUCTIONS,
        show_instruction=True,
        show_skip_button=True,
    )
    pid = int(project["id"])
    for start in range(0, len(targets), UPLOAD_BATCH):
        batch = targets[start : start + UPLOAD_BATCH]
        client.import_files(
            pid, {t.highlighted_path.name: t.highlighted_path.read_bytes() for t in batch}
        )
    by_file = {t.highlighted_path.stem: t for t in targets}
    completed = 0
    for task in client.tasks(pid):
        target = by_file.get(image_key_for(task["data"]))
        if target is None:
            logger.warning("task %s: image %s is not a study target", task["id"], task["data"])
            continue
        data = {
            IMAGE_KEY: task["data"][IMAGE_KEY],
            IMAGE_NAME_KEY: target.image_name,
            TARGET_ID_KEY: target.object_id,
            TARGET_NAME_KEY: target.target_name,
            "highlight": style,
        }
        client.update_task_data(int(task["id"]), data)
        completed += 1
    if completed != len(targets):
        raise RuntimeError(f"project {pid}: {completed} tasks completed for {len(targets)} targets")
    client.update_project(pid, label_config=STUDY_CONFIG)
    logger.info("user study project %d: %d tasks", pid, completed)
    return project


def run_collect(args: argparse.Namespace, api_key: str) -> dict[str, Any]:
    """The ``collect`` command: ground truth in, a Label Studio project out."""
    from training.user_study.loaders import load_ground_truth, study_client

    if not args.ls_url:
        raise SystemExit("collect needs --ls-url")
    gt = load_ground_truth(args.gt, args.images)
    if args.images:
        from training.user_study.images import OriginalImages

        files = OriginalImages(gt, args.images).files
        for key, image in gt.items():
            image.image_path = files.get(key, image.image_path)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="user_study_"))
    targets = plan_targets(gt, work_dir, args.highlight, args.max_targets, args.min_area)
    with study_client(args.ls_url, api_key) as client:
        return create_study(client, targets, args.title, args.highlight)
