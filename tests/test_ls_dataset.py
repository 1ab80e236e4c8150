"""training.ls_dataset: Label Studio tasks + annotations -> Samples with instance masks.

A small in-process stand-in for Label Studio's REST API (httpx.MockTransport) serves tasks in
exactly the JSON shape LS 1.23 returns, with brush RLE made by the sdk's own encoder; the
download deadline is tested against a real loopback server (``backend_support``).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
from typing import Any

import httpx
import numpy as np
import pytest
from backend_support import NO_ACCESS_TOKEN_ANSWERS
from backend_support import FakeLabelStudio as LoopbackLabelStudio
from backend_support import scene as loopback_scene
from label_studio_sdk.converter.brush import mask2rle
from loopback import png_bytes
from peak_rss import needs_proc, peak_rss_of_decoding
from PIL import Image

import training.ls_dataset as ls
from training.data import Sample

LS_URL = "http://ls.test:8080"
CONFIG = """<View>
  <Image name="img" value="$image"/>
  <BrushLabels name="tag" toName="img"><Label value="Object"/></BrushLabels>
  <PolygonLabels name="poly" toName="img"><Label value="Object"/></PolygonLabels>
</View>"""


def brush_result(mask: np.ndarray, region_id: str = "b1") -> dict[str, Any]:
    h, w = mask.shape
    return {
        "id": region_id,
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "img",
        "original_width": w,
        "original_height": h,
        "value": {
            "format": "rle",
            "rle": mask2rle(mask.astype(np.uint8) * 255),
            "brushlabels": ["Object"],
        },
    }


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


def make_jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


class FakeLabelStudio:
    """Routes for /api/projects/<id>/, /api/tasks/, /api/token/refresh/ and /data/upload/."""

    def __init__(self, tasks: list[dict[str, Any]], images: dict[str, bytes], token: str) -> None:
        self.tasks, self.images, self.token = tasks, images, token
        self.access = make_jwt({"token_type": "access", "exp": time.time() + 300})
        self.seen_auth: list[str] = []
        self.refresh_answer: httpx.Response | None = None  # instead of the access token
        self.hosts: list[str] = []

    def authorized(self, request: httpx.Request) -> bool:
        header = request.headers.get("authorization", "")
        self.seen_auth.append(header.split(" ")[0])
        return header in (f"Token {self.token}", f"Bearer {self.access}")

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.hosts.append(request.url.host)
        if path == "/api/token/refresh/" and self.refresh_answer is not None:
            return self.refresh_answer
        if path == "/api/token/refresh/":
            if json.loads(request.content)["refresh"] != self.token:
                return httpx.Response(401, json={"detail": "bad token"})
            return httpx.Response(200, json={"access": self.access})
        if not self.authorized(request):
            return httpx.Response(
                401, json={"detail": "Authentication credentials were not provided."}
            )
        if path == "/api/projects/7/":
            return httpx.Response(200, json={"id": 7, "label_config": CONFIG})
        if path == "/api/tasks/":
            page, size = int(request.url.params["page"]), int(request.url.params["page_size"])
            chunk = self.tasks[(page - 1) * size : page * size]
            if not chunk and page > 1:
                return httpx.Response(404, json={"detail": "Invalid page."})
            return httpx.Response(200, json={"tasks": chunk, "total": len(self.tasks)})
        if path in self.images:
            return httpx.Response(200, content=self.images[path])
        return httpx.Response(404, json={"detail": "Not found."})


def task(
    task_id: int, image_path: str, results: list[dict[str, Any]], **annotation: Any
) -> dict[str, Any]:
    return {
        "id": task_id,
        "data": {"image": image_path},
        "annotations": [
            {"id": task_id * 10, "result": results, "was_cancelled": False, **annotation}
        ],
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


def client_for(fake: FakeLabelStudio) -> ls.LabelStudioClient:
    return ls.LabelStudioClient(LS_URL, fake.token, transport=httpx.MockTransport(fake))


def test_brush_regions_become_instance_masks_with_a_legacy_token(scene) -> None:
    image, a, b = scene
    fake = FakeLabelStudio(
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


def test_personal_access_token_is_exchanged_for_a_bearer_access_token(scene) -> None:
    image, a, _ = scene
    pat = make_jwt({"token_type": "refresh", "exp": time.time() + 3600})
    fake = FakeLabelStudio(
        [task(1, "/data/upload/7/a.png", [brush_result(a)])],
        {"/data/upload/7/a.png": png_bytes(image)},
        token=pat,
    )
    samples = ls.load_project_samples(client_for(fake), "7")
    assert len(samples) == 1
    assert set(fake.seen_auth) == {"Bearer"}


def test_wrong_token_is_a_clear_error_without_the_token(scene) -> None:
    fake = FakeLabelStudio([], {}, token="right-token-0000")
    client = ls.LabelStudioClient(LS_URL, "wrong-token-1111", transport=httpx.MockTransport(fake))
    with pytest.raises(ls.LabelStudioError, match="HTTP 401") as info:
        ls.load_project_samples(client, "7")
    assert "wrong-token-1111" not in str(info.value)


def test_tasks_whose_image_url_or_bytes_cannot_be_used_are_skipped(scene) -> None:
    image, a, _ = scene
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44)
    dds += struct.pack("<2I", 32, 0) + bytes(44)  # pixel-format flags 0: not implemented
    fake = FakeLabelStudio(
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


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_the_token_exchange_does_not_follow_a_redirect(scene, status) -> None:
    fake = FakeLabelStudio([], {}, token=make_jwt({"token_type": "refresh", "exp": 1e10}))
    fake.refresh_answer = httpx.Response(
        status, headers={"Location": "http://elsewhere.test/api/token/refresh/"}
    )
    with pytest.raises(ls.LabelStudioError, match=f"HTTP {status}"):
        client_for(fake).image("/data/upload/7/a.png")
    assert "elsewhere.test" not in fake.hosts


@pytest.mark.parametrize("kind", NO_ACCESS_TOKEN_ANSWERS)
def test_a_token_exchange_answer_without_an_access_token_is_a_clear_error(kind) -> None:
    fake = FakeLabelStudio([], {}, token=make_jwt({"token_type": "refresh", "exp": 1e10}))
    fake.refresh_answer = NO_ACCESS_TOKEN_ANSWERS[kind]()
    with pytest.raises(ls.LabelStudioError, match="without an access token"):
        client_for(fake).image("/data/upload/7/a.png")


def test_polygon_is_rasterised_from_percent_points() -> None:
    result = polygon_result([[10, 10], [50, 10], [50, 60], [10, 60]], w=100, h=50)
    mask = ls.polygon_mask(result)
    assert mask.shape == (50, 100)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 50, 5, 30)


def test_brush_rle_of_the_wrong_size_is_refused(scene) -> None:
    _, a, _ = scene
    result = brush_result(a)
    result["original_width"] = 61
    with pytest.raises(ValueError, match="expected 40x61x4"):
        ls.brush_mask(result)


def test_tasks_are_paged_and_unannotated_or_cancelled_ones_skipped(monkeypatch, scene) -> None:
    monkeypatch.setattr(ls, "PAGE_SIZE", 2)
    image, a, _ = scene
    images = {f"/data/upload/7/{i}.png": png_bytes(image) for i in range(5)}
    tasks = [task(i, f"/data/upload/7/{i}.png", [brush_result(a)]) for i in range(3)]
    tasks.append({"id": 3, "data": {"image": "/data/upload/7/3.png"}, "annotations": []})
    tasks.append(task(4, "/data/upload/7/4.png", [brush_result(a)], was_cancelled=True))
    fake = FakeLabelStudio(tasks, images, token="legacy-token-000000")
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
    fake = FakeLabelStudio(
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
    fake = FakeLabelStudio(
        tasks, {"/data/upload/7/b.png": png_bytes(image)}, token="legacy-token-0000"
    )
    assert [s.name for s in ls.load_project_samples(client_for(fake), "7")] == ["task2"]


# --- downloads: one deadline per request, from connecting to the last byte ------------------


@pytest.fixture(scope="module")
def loopback_ls():
    with LoopbackLabelStudio() as server:
        server.files["scene.png"] = png_bytes(loopback_scene(60, 80)[0])
        yield server


def deadline_client(server: LoopbackLabelStudio, token: str | None = None) -> ls.LabelStudioClient:
    return ls.LabelStudioClient(server.url, token or server.legacy_token, timeout_s=1.0)


def assert_times_out_after(deadline_s: float, request) -> None:
    """``request()`` fails with a "timed out" ``LabelStudioError`` at the deadline (+0.5 s)."""
    started = time.monotonic()
    with pytest.raises(ls.LabelStudioError, match="timed out after"):
        request()
    elapsed = time.monotonic() - started
    assert deadline_s - 0.05 <= elapsed < deadline_s + 0.5, elapsed


def test_an_image_from_a_real_server_is_downloaded_within_the_deadline(loopback_ls) -> None:
    image = deadline_client(loopback_ls).image(f"{loopback_ls.url}/public/scene.png")
    np.testing.assert_array_equal(image, loopback_scene(60, 80)[0])


def test_an_image_body_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline(loopback_ls) -> None:
    client = deadline_client(loopback_ls)
    assert_times_out_after(1.0, lambda: client.image(f"{loopback_ls.url}/trickle-body/scene.png"))


def test_image_headers_trickled_a_byte_at_a_time_are_cut_off_at_the_deadline(loopback_ls) -> None:
    client = deadline_client(loopback_ls)
    url = f"{loopback_ls.url}/trickle-headers/scene.png"
    assert_times_out_after(1.0, lambda: client.image(url))


def test_a_second_image_over_the_same_client_has_a_deadline_too(loopback_ls) -> None:
    client = deadline_client(loopback_ls)
    client.image(f"{loopback_ls.url}/public/scene.png")  # a connection that could be kept alive
    assert_times_out_after(1.0, lambda: client.image(f"{loopback_ls.url}/trickle-body/scene.png"))


def test_an_api_request_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline(
    loopback_ls, monkeypatch
) -> None:
    monkeypatch.setattr(loopback_ls, "trickle_api", True)
    assert_times_out_after(1.0, lambda: deadline_client(loopback_ls).tasks("7"))


def test_the_token_exchange_counts_against_the_deadline(loopback_ls, monkeypatch) -> None:
    monkeypatch.setattr(loopback_ls, "trickle_refresh", True)
    client = deadline_client(loopback_ls, token=loopback_ls.pat)
    assert_times_out_after(1.0, lambda: client.image("/data/upload/7/scene.png"))


# --- URLs in errors and logs ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["not-found", "unreachable"])
def test_image_errors_do_not_echo_credentials_in_the_url(loopback_ls, where) -> None:
    host = loopback_ls.url.removeprefix("http://") if where == "not-found" else "127.0.0.1:9"
    client = deadline_client(loopback_ls)
    with pytest.raises(ls.LabelStudioError) as info:
        client.image(f"http://admin:s3cret@{host}/public/missing.png?X-Amz-Signature=abc")
    assert f"http://{host}/public/missing.png" in str(info.value)
    assert "s3cret" not in str(info.value) and "admin" not in str(info.value)


def test_a_skipped_task_s_warning_does_not_log_credentials_in_its_url(scene, caplog) -> None:
    image, a, _ = scene
    tasks = [
        task(1, "http://admin:s3cret@cdn.test/gone.png", [brush_result(a)]),
        task(2, "/data/upload/7/b.png", [brush_result(a)]),
    ]
    fake = FakeLabelStudio(
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
    fake = FakeLabelStudio(
        tasks, {"/data/upload/7/c.png": png_bytes(image)}, token="legacy-token-0000"
    )
    assert [s.name for s in ls.load_project_samples(client_for(fake), "7")] == ["task3"]


def test_exif_orientation_is_applied_like_the_browser() -> None:
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, :10] = 255
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(image).save(buffer, format="JPEG", exif=exif, quality=100)
    decoded = ls.decode_image(buffer.getvalue())
    assert decoded.shape == (30, 20, 3)


def test_16_bit_grayscale_images_are_scaled_to_8_bits_not_clipped() -> None:
    samples_16 = np.array([[0, 257, 30000, 65535]], np.uint16)  # a 16-bit grayscale PNG
    buffer = io.BytesIO()
    Image.fromarray(samples_16).save(buffer, format="PNG")
    fake = FakeLabelStudio(
        [task(1, "/data/upload/7/deep.png", [brush_result(np.ones((1, 4), bool))])],
        {"/data/upload/7/deep.png": buffer.getvalue()},
        token="legacy-token-0000",
    )
    (sample,) = ls.load_project_samples(client_for(fake), "7")
    shown = np.array([[0, 1, 117, 255]], np.uint8)  # as the browser shows it (was 0/255/255/255)
    np.testing.assert_array_equal(sample.image, np.repeat(shown[..., None], 3, axis=2))


@needs_proc
def test_decoding_an_image_holds_only_the_decoded_image_the_result_and_a_few_bands(
    tmp_path,
) -> None:
    side = 4000
    Image.new("RGB", (side, side)).save(tmp_path / "image.png")
    peak = peak_rss_of_decoding(tmp_path / "image.png", "training.ls_dataset:decode_image")
    # Pillow's decoded RGB (4 bytes a pixel) + the (H, W, 3) result: was 18 bytes a pixel.
    assert peak < (4 + 3) * side * side + 24 * 1024 * 1024


def test_images_over_the_pixel_limit_are_refused() -> None:
    with pytest.raises(ls.LabelStudioError, match="exceeds"):
        ls.decode_image(png_bytes(np.zeros((100, 100, 3), np.uint8)), max_pixels=5000)


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


def test_image_tag_names_map_to_task_data_keys() -> None:
    assert ls.image_data_keys(CONFIG) == {"img": "image"}
    with pytest.raises(ls.LabelStudioError):
        ls.image_data_keys("<View><Image")


def test_an_image_over_the_byte_limit_is_refused_while_it_streams_in(loopback_ls) -> None:
    client = ls.LabelStudioClient(
        loopback_ls.url, loopback_ls.legacy_token, timeout_s=5.0, max_image_bytes=100
    )
    with pytest.raises(ls.LabelStudioError, match="IMAGE_MAX_BYTES"):
        client.image(f"{loopback_ls.url}/public/scene.png")


def test_the_token_goes_only_to_label_studio_s_own_origin(loopback_ls) -> None:
    # The same host and port under another scheme is another origin: no token there.
    other_scheme = loopback_ls.url.replace("http://", "https://")
    client = ls.LabelStudioClient(other_scheme, loopback_ls.legacy_token, timeout_s=2.0)
    before = len(loopback_ls.auth_headers)
    client.image(f"{loopback_ls.url}/public/scene.png")
    assert loopback_ls.auth_headers[before:] == [""]
