"""training.ls_dataset: Label Studio tasks + annotations -> Samples with instance masks.

A small in-process stand-in for Label Studio's REST API (``ls_api``, httpx.MockTransport) serves
tasks in exactly the JSON shape LS 1.23 returns, with brush RLE made by the sdk's own encoder,
to the adapter's client. The client itself (credentials, deadlines, limits):
``test_labelstudio_client.py``.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import httpx
import numpy as np
import pytest
from ls_api import LS_URL, FakeLabelStudioAPI, task
from PIL import Image

import labelstudio.client
import training.ls_dataset as ls
from bench.loopback import png_bytes
from bench.ls_shapes import brush_region
from labelstudio.auth import LabelStudioAuth
from labelstudio.client import LabelStudioClient
from training.data import Sample


def brush_result(mask: np.ndarray, region_id: str = "b1") -> dict[str, Any]:
    return brush_region(mask, region_id, to_name="img")


def polygon_result(points_pct: list[list[float]], w: int, h: int) -> dict[str, Any]:
    return {
        "id": "p1",
        "type": "polygonlabels",
        "from_name": "poly",
        "to_name": "img",
        "original_width": w,
        "original_height": h,
        "value": {"points": points_pct, "closed": True, "polygonlabels": ["Object"]},
    }


@pytest.fixture
def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    a = np.zeros((40, 60), bool)
    a[5:20, 10:30] = True
    b = np.zeros((40, 60), bool)
    b[25:35, 40:55] = True
    return image, a, b


def client_for(fake: FakeLabelStudioAPI) -> LabelStudioClient:
    return LabelStudioClient(
        LabelStudioAuth(LS_URL, fake.token), transport=httpx.MockTransport(fake)
    )


def test_brush_regions_become_instance_masks_with_a_legacy_token(scene) -> None:
    image, a, b = scene
    fake = FakeLabelStudioAPI(
        [task(1, "/data/upload/7/a.png", [brush_result(a), brush_result(b, "b2")])],
        {"/data/upload/7/a.png": png_bytes(image)},
        token="0123456789abcdef0123456789abcdef01234567",
    )
    samples = ls.load_project_samples(client_for(fake), "7")
    assert len(samples) == 1
    sample = samples[0]
    assert sample.name == "task1"
    np.testing.assert_array_equal(sample.image, image)
    np.testing.assert_array_equal(sample.masks, np.stack([a, b]))
    assert set(fake.seen_auth) == {"Token"}


def test_tasks_whose_image_url_or_bytes_cannot_be_used_are_skipped(scene) -> None:
    image, a, _ = scene
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44)
    dds += struct.pack("<2I", 32, 0) + bytes(44)  # pixel-format flags 0: not implemented
    fake = FakeLabelStudioAPI(
        [
            task(1, "/data/upload/7/a.png", [brush_result(a)]),
            task(2, "http://\u24dbs.example/a.png", [brush_result(a)]),  # InvalidURL
            task(3, "http://xn--/a.png", [brush_result(a)]),  # IDNAError
            task(4, "/data/upload/7/a\x00.png", [brush_result(a)]),  # InvalidURL
            task(5, "/data/upload/7/b.dds", [brush_result(a)]),  # NotImplementedError
        ],
        {"/data/upload/7/a.png": png_bytes(image), "/data/upload/7/b.dds": dds},
        token="0123456789abcdef0123456789abcdef01234567",
    )
    samples = ls.load_project_samples(client_for(fake), "7")
    assert [sample.name for sample in samples] == ["task1"]


def test_polygon_is_rasterised_from_percent_points() -> None:
    result = polygon_result([[10, 10], [50, 10], [50, 60], [10, 60]], w=100, h=50)
    mask = ls.polygon_mask(result)
    assert mask.shape == (50, 100)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 50, 5, 30)


def test_a_region_that_cannot_be_decoded_is_skipped_not_the_task(scene, caplog) -> None:
    image, a, b = scene
    wrong_size = brush_result(a, "b1")
    wrong_size["original_width"] = 61
    fake = FakeLabelStudioAPI(
        [task(1, "/data/upload/7/a.png", [wrong_size, brush_result(b, "b2")])],
        {"/data/upload/7/a.png": png_bytes(image)},
    )
    (sample,) = ls.load_project_samples(client_for(fake), "7")
    np.testing.assert_array_equal(sample.masks, b[None])
    assert "brush region b1" in caplog.text


def test_tasks_are_paged_and_unannotated_or_cancelled_ones_skipped(monkeypatch, scene) -> None:
    monkeypatch.setattr(labelstudio.client, "PAGE_SIZE", 2)
    image, a, _ = scene
    images = {f"/data/upload/7/{i}.png": png_bytes(image) for i in range(5)}
    tasks = [task(i, f"/data/upload/7/{i}.png", [brush_result(a)]) for i in range(3)]
    tasks.append({"id": 3, "data": {"image": "/data/upload/7/3.png"}, "annotations": []})
    tasks.append(task(4, "/data/upload/7/4.png", [brush_result(a)], was_cancelled=True))
    fake = FakeLabelStudioAPI(tasks, images, token="legacy-token-000000")
    names = [s.name for s in ls.load_project_samples(client_for(fake), "7")]
    assert names == ["task0", "task1", "task2"]


def test_newest_annotation_of_a_task_is_used(scene) -> None:
    image, a, b = scene
    t = task(1, "/data/upload/7/a.png", [brush_result(a)], updated_at="2026-01-01T00:00:00Z")
    t["annotations"].append(
        {
            "id": 11,
            "result": [brush_result(b)],
            "was_cancelled": False,
            "updated_at": "2026-02-01T00:00:00Z",
        }
    )
    fake = FakeLabelStudioAPI(
        [t], {"/data/upload/7/a.png": png_bytes(image)}, token="legacy-token-0000"
    )
    (sample,) = ls.load_project_samples(client_for(fake), "7")
    np.testing.assert_array_equal(sample.masks, b[None])


def test_missing_image_skips_the_task_not_the_project(scene) -> None:
    image, a, _ = scene
    tasks = [
        task(1, "/data/upload/7/gone.png", [brush_result(a)]),
        task(2, "/data/upload/7/b.png", [brush_result(a)]),
    ]
    fake = FakeLabelStudioAPI(
        tasks, {"/data/upload/7/b.png": png_bytes(image)}, token="legacy-token-0000"
    )
    assert [s.name for s in ls.load_project_samples(client_for(fake), "7")] == ["task2"]


def test_a_skipped_task_s_warning_does_not_log_credentials_in_its_url(scene, caplog) -> None:
    image, a, _ = scene
    tasks = [
        task(1, "http://admin:s3cret@cdn.test/gone.png", [brush_result(a)]),
        task(2, "/data/upload/7/b.png", [brush_result(a)]),
    ]
    fake = FakeLabelStudioAPI(
        tasks, {"/data/upload/7/b.png": png_bytes(image)}, token="legacy-token-0000"
    )
    samples = ls.load_project_samples(client_for(fake), "7")
    assert [s.name for s in samples] == ["task2"]
    assert "http://cdn.test/gone.png" in caplog.text and "s3cret" not in caplog.text


def test_an_image_url_python_cannot_parse_skips_the_task_not_the_project(scene) -> None:
    image, a, _ = scene
    tasks = [
        task(1, "http://[bad/a.png", [brush_result(a)]),
        task(2, "http://cdn.test:abc/a.png", [brush_result(a)]),
        task(3, "/data/upload/7/c.png", [brush_result(a)]),
    ]
    fake = FakeLabelStudioAPI(
        tasks, {"/data/upload/7/c.png": png_bytes(image)}, token="legacy-token-0000"
    )
    assert [s.name for s in ls.load_project_samples(client_for(fake), "7")] == ["task3"]


def test_16_bit_grayscale_images_are_scaled_to_8_bits_not_clipped() -> None:
    samples_16 = np.array([[0, 257, 30000, 65535]], np.uint16)  # a 16-bit grayscale PNG
    buffer = io.BytesIO()
    Image.fromarray(samples_16).save(buffer, format="PNG")
    fake = FakeLabelStudioAPI(
        [task(1, "/data/upload/7/deep.png", [brush_result(np.ones((1, 4), bool))])],
        {"/data/upload/7/deep.png": buffer.getvalue()},
        token="legacy-token-0000",
    )
    (sample,) = ls.load_project_samples(client_for(fake), "7")
    shown = np.array([[0, 1, 117, 255]], np.uint8)  # as the browser shows it (was 0/255/255/255)
    np.testing.assert_array_equal(sample.image, np.repeat(shown[..., None], 3, axis=2))


def _samples(n: int) -> list[Sample]:
    return [
        Sample(np.zeros((4, 4, 3), np.uint8), np.ones((1, 4, 4), bool), f"task{i}")
        for i in range(n)
    ]


def test_split_is_deterministic_disjoint_and_stable_as_the_project_grows() -> None:
    train, val = ls.split_train_val(_samples(50), 0.2)
    assert {s.name for s in train}.isdisjoint({s.name for s in val})
    assert len(train) + len(val) == 50
    assert 4 <= len(val) <= 18
    _, again_val = ls.split_train_val(list(reversed(_samples(50))), 0.2)
    assert [s.name for s in again_val] == [s.name for s in val]
    _, bigger_val = ls.split_train_val(_samples(80), 0.2)
    assert {s.name for s in val} <= {s.name for s in bigger_val}


def test_split_keeps_both_sides_non_empty_for_tiny_projects() -> None:
    train, val = ls.split_train_val(_samples(2), 0.2)
    assert len(train) == 1 and len(val) == 1
    train, val = ls.split_train_val(_samples(1), 0.2)
    assert len(train) + len(val) == 1
