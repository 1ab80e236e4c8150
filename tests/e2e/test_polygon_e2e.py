"""A ``PolygonLabels`` project through a real Label Studio: a smart click comes back as polygon
regions that cover the object, and Label Studio stores them as an annotation."""

from __future__ import annotations

import numpy as np
import pytest

from labelstudio.polygon import percent_to_pixels, polygons_to_mask
from stable_sam.metrics import mask_iou

from .harness import LabelStudioDriver, LabelStudioServer, keypoint_region, rectangle_region
from .test_interactive import MIN_IOU, Target, synthetic_targets

pytestmark = pytest.mark.e2e

POLYGON_CONFIG = """
<View>
  <Image name="photo" value="$image" zoom="true"/>
  <PolygonLabels name="outline" toName="photo">
    <Label value="Object" background="#FF0000"/>
  </PolygonLabels>
  <KeyPointLabels name="click" toName="photo" smart="true">
    <Label value="Object" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="photo" smart="true">
    <Label value="Object" background="#000000" showInline="true"/>
  </RectangleLabels>
</View>
"""


def filled(regions: list[dict], size_wh: tuple[int, int]) -> np.ndarray:
    width, height = size_wh
    polygons = [percent_to_pixels(r["value"]["points"], width, height) for r in regions]
    return polygons_to_mask(polygons, height, width)


@pytest.fixture(scope="module")
def polygon_project(label_studio: LabelStudioServer, ls_client: LabelStudioDriver, start_backend):
    ls_client.set_legacy_tokens(False)
    backend = start_backend(
        "backend-polygons",
        {
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.personal_access_token,
        },
    )
    targets = synthetic_targets(1)
    project = ls_client.create_project("Stable-SAM e2e (polygons)", POLYGON_CONFIG)
    tasks = ls_client.import_images(project["id"], {t.name: t.png for t in targets})
    ml_backend = ls_client.connect_ml_backend(project["id"], backend.url)
    assert ml_backend["state"] == "CO", ml_backend.get("error_message")
    return ml_backend, tasks[0], targets[0]


@pytest.mark.parametrize("prompt", ["click", "box"])
def test_a_smart_prompt_in_a_polygon_project_comes_back_as_polygons_label_studio_stores(
    polygon_project, ls_client: LabelStudioDriver, prompt: str
) -> None:
    ml_backend, task, target = polygon_project
    target: Target
    if prompt == "click":
        region = keypoint_region(
            target.inner_point(), target.size_wh, "Object", True, "click", "photo"
        )
    else:
        region = rectangle_region(target.box_xyxy(), target.size_wh, "Object", "box", "photo")
    answer = ls_client.interactive_annotating(ml_backend["id"], task.id, [region])
    assert "errors" not in answer, answer.get("errors")
    regions = answer["data"]["result"]

    assert regions and all(r["type"] == "polygonlabels" for r in regions)
    for r in regions:
        assert (r["from_name"], r["to_name"]) == ("outline", "photo")
        assert r["value"]["polygonlabels"] == ["Object"]
        assert (r["original_width"], r["original_height"]) == target.size_wh
    assert mask_iou(filled(regions, target.size_wh), target.mask) >= MIN_IOU

    # The annotator accepts the polygons: Label Studio stores them as they are.
    created = ls_client.create_annotation(task.id, regions)
    stored = [r for r in ls_client.task(task.id)["annotations"] if r["id"] == created["id"]]
    assert len(stored) == 1
    result = stored[0]["result"]
    assert [r["type"] for r in result] == ["polygonlabels"] * len(regions)
    for sent, kept in zip(regions, result, strict=True):
        np.testing.assert_allclose(kept["value"]["points"], sent["value"]["points"], atol=1e-6)
        assert kept["value"]["polygonlabels"] == ["Object"]
