"""The user study through a real Label Studio: collect, two annotators box, export, evaluate.

``collect`` sets the study up from a tiny mask folder; two annotators sign up through the
organisation's invite link (as real people would) and submit boxes through the API with their
own personal access tokens; ``evaluate`` exports through the API and must report the box IoUs
computed by hand below, name the annotators by e-mail, and count the skip.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from labelstudio.regions import rectangle_region
from training.user_study.cli import main

from .harness import LabelStudioServer

pytestmark = pytest.mark.e2e

H, W = 48, 64  # not square, so x/y mix-ups show
# image key -> object id -> GT box on pixel edges (x0, y0, x1, y1); masks are these rectangles
OBJECTS = {
    "alpha": {"1": (4, 6, 24, 26), "2": (36, 10, 64, 40)},  # object 2 touches the right border
    "beta": {"7": (10, 20, 50, 44)},
}
ANNOTATOR_PASSWORD = "study-annotator-pw-123"


def write_ground_truth(root) -> None:
    """A mask folder: images/<key>.png (objects painted) and masks/<key>_<id>.png."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for key, objects in OBJECTS.items():
        image = np.full((H, W, 3), 90, np.uint8)
        for oid, (x0, y0, x1, y1) in objects.items():
            image[y0:y1, x0:x1] = (30 * int(oid), 200, 60)
            mask = np.zeros((H, W), np.uint8)
            mask[y0:y1, x0:x1] = 255
            cv2.imwrite(str(root / "masks" / f"{key}_{oid}.png"), mask)
        cv2.imwrite(str(root / "images" / f"{key}.png"), image)


def rectangle(box, rotation: float = 0.0) -> dict:
    return rectangle_region(box, W, H, "target", "box", "image", rotation=rotation)


def test_collect_annotate_export_evaluate(label_studio: LabelStudioServer, tmp_path, capsys):
    gt_dir = tmp_path / "gt"
    write_ground_truth(gt_dir)
    pat = label_studio.personal_access_token

    # --- collect: one task per (image, target), highlighted, target id in the task data
    argv = ["collect", "--ls-url", label_studio.url, "--api-key", pat, "--gt", str(gt_dir)]
    assert main([*argv, "--title", "box study", "--work-dir", str(tmp_path / "work")]) == 0
    project_id = int(capsys.readouterr().out.split("study project ")[1].split()[0])
    admin = label_studio.client()
    tasks = admin.tasks(project_id)
    targets = {(t["data"]["image_name"], t["data"]["target_id"]): t for t in tasks}
    assert sorted(targets) == [("alpha.png", "1"), ("alpha.png", "2"), ("beta.png", "7")]
    assert all(t["data"]["image"].startswith(f"/data/upload/{project_id}/") for t in tasks)
    project = admin.project(project_id)
    assert (
        "$target_name" in project["label_config"] and "RectangleLabels" in project["label_config"]
    )
    highlighted = admin.file(targets[("alpha.png", "1")]["data"]["image"])
    picture = cv2.imdecode(np.frombuffer(highlighted, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (H, W, 3)
    assert tuple(picture[6, 14]) == (40, 40, 255)  # BGR of the red outline, on object 1's top edge

    # --- two annotators, each with their own account and token
    ann = {
        who: label_studio.add_user(who, ANNOTATOR_PASSWORD)
        for who in ("ann1@study.test", "ann2@study.test")
    }
    t1, t2, t7 = (
        targets[("alpha.png", "1")]["id"],
        targets[("alpha.png", "2")]["id"],
        targets[("beta.png", "7")]["id"],
    )
    one, two = ann["ann1@study.test"], ann["ann2@study.test"]
    # ann1: exact boxes (IoU 1); the one of object 2 drawn past the right border, clipped to it
    one.create_annotation(t1, [rectangle((4, 6, 24, 26))], lead_time=2.0)
    one.create_annotation(t2, [rectangle((36, 10, 70, 40))], lead_time=4.0)
    one.create_annotation(t7, [rectangle((10, 20, 50, 44))], lead_time=3.0)
    # ann2: object 1 shifted by 10 px (overlap 10x20 of union 2*400-200 -> 200/600 = 1/3);
    # object 7 as a box rotated by 180 deg about (50, 44) -> the same box, counted as rotated;
    # object 2 skipped.
    two.create_annotation(t1, [rectangle((14, 6, 34, 26))], lead_time=5.0)
    two.create_annotation(t7, [rectangle((50, 44, 90, 68), rotation=180)], lead_time=6.0)
    two.create_annotation(t2, [], was_cancelled=True)

    # --- evaluate through the API export, box quality and one (randomly initialised) model
    out = tmp_path / "report"
    argv = [
        "evaluate",
        "--ls-url",
        label_studio.url,
        "--api-key",
        pat,
        "--project",
        str(project_id),
    ]
    argv += [
        "--gt",
        str(gt_dir),
        "--models",
        "sam",
        "--base-type",
        "mini",
        "--noisy-per-object",
        "2",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    counts = summary["counts"]
    assert (counts["tasks"], counts["annotations"], counts["skipped"]) == (3, 6, 1)
    assert (counts["boxes"], counts["matched"], counts["unmatched"]) == (5, 5, 0)
    assert (counts["clipped"], counts["rotated"]) == (1, 1)
    per = summary["box_quality"]["per_annotator"]
    assert sorted(per) == ["ann1@study.test", "ann2@study.test"]
    assert per["ann1@study.test"]["mean"] == pytest.approx(1.0)
    assert per["ann2@study.test"]["mean"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert summary["box_quality"]["overall"]["mean"] == pytest.approx((4 + 1 / 3) / 5)
    assert summary["box_quality"]["lead_time_s"]["mean"] == pytest.approx(4.0)
    assert summary["box_quality"]["lead_time_s"]["share_within_5s"] == pytest.approx(4 / 5)
    table = summary["segmentation"]["sam"]
    assert table["user"]["prompts"] == 5 and table["gt_box"]["objects"] == 3
    assert table["noisy"]["prompts"] == 6
    report = (out / "report.md").read_text()
    assert "--api-key REDACTED" in report and pat not in report
    assert "ann2@study.test" in report
