"""The HTTP app in-process (TestClient) with a tiny random ``mini`` SAM and a loopback image server.

Covers the Label Studio calls (/health, /setup, /predict interactive and batch), every bad input
answered as JSON while the server keeps serving, basic auth, and per-project plugin versions.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from backend_support import CONFIG, FakeLabelStudio, H, W, box, kp, png_bytes, scene
from fastapi.testclient import TestClient

from backend.app import create_app
from backend.auth import is_authorized
from labelstudio.brush import rle_to_mask
from runtime.settings import Settings


@pytest.fixture(scope="module")
def ls():
    with FakeLabelStudio() as server:
        image, _ = scene(H, W)
        server.files["scene.png"] = png_bytes(image)
        other, _ = scene(64, 64)
        server.files["other.png"] = png_bytes(other)
        server.files["corrupt.png"] = b"\x89PNG\r\n\x1a\n garbage"
        server.files["truncated.png"] = server.files["scene.png"][:120]
        server.files["huge.png"] = png_bytes(np.zeros((1100, 1000), np.uint8))
        server.slow_s = 2.0
        yield server


@pytest.fixture(scope="module")
def settings(ls, tmp_path_factory):
    return Settings(
        label_studio_url=ls.url,
        sam_model_type="mini",
        sam_allow_random_weights=True,
        preload_model=False,
        device="cpu",
        image_max_pixels=1_000_000,
        image_fetch_timeout_s=0.5,
        versions_dir=tmp_path_factory.mktemp("versions"),
    )


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def predict(client, context=None, image="/public/scene.png", ls_url="", project="1.1700000000",
            tasks=None):  # fmt: skip
    body = {
        "tasks": tasks or [{"id": 11, "data": {"img": ls_url + image}}],
        "project": project,
        "label_config": CONFIG,
        "params": {"login": None, "password": None},
    }
    if context is not None:
        body["params"]["context"] = {"result": context}
    return client.post("/predict", json=body)


def test_health_answers_without_loading_the_model(client):
    answer = client.get("/health")
    assert answer.status_code == 200 and answer.json()["status"] == "UP"


def test_setup_is_cheap_and_never_loads_the_model(client):
    started = time.perf_counter()
    answer = client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG,
                                         "hostname": "", "access_token": None,
                                         "extra_params": {}})  # fmt: skip
    elapsed = time.perf_counter() - started
    assert answer.status_code == 200
    assert answer.json()["model_version"].startswith("stable-sam-mini")
    assert not client.app.state.backend.models.loaded
    assert elapsed < 0.5


def test_keypoint_predicts_one_brush_region_of_the_image_size(client):
    answer = predict(client, [kp(50, 50)])
    assert answer.status_code == 200, answer.text
    (entry,) = answer.json()["results"]
    (region,) = entry["result"]
    assert region["type"] == "brushlabels"
    assert (region["from_name"], region["to_name"]) == ("masks", "picture")
    assert region["value"]["brushlabels"] == ["Car"] and region["value"]["format"] == "rle"
    assert (region["original_width"], region["original_height"]) == (W, H)
    mask = rle_to_mask(region["value"]["rle"], H, W)  # exactly H*W*4 RGBA bytes
    assert mask.shape == (H, W)
    assert entry["model_version"].startswith("stable-sam-mini")
    assert isinstance(entry["score"], float)


def test_setup_can_be_skipped_after_a_restart(settings):
    with TestClient(create_app(settings)) as fresh:
        assert predict(fresh, [kp(40, 40)]).status_code == 200


def test_several_labels_give_one_region_each_in_order(client):
    context = [kp(30, 30, "Tree"), kp(60, 60, "Car"), kp(35, 35, "Tree", positive=False)]
    (entry,) = predict(client, context).json()["results"]
    assert [r["value"]["brushlabels"] for r in entry["result"]] == [["Tree"], ["Car"]]


def test_rectangle_and_rectangle_with_keypoints(client):
    assert predict(client, [box(20, 20, 50, 50)]).status_code == 200
    answer = predict(client, [box(20, 20, 50, 50), kp(40, 40, positive=False)])
    assert answer.status_code == 200 and len(answer.json()["results"][0]["result"]) == 1


def test_batch_predict_answers_every_task_and_warms_up_embeddings(client):
    backend = client.app.state.backend
    cache = backend.models.predictor().cache
    before = len(cache)
    tasks = [{"id": 1, "data": {"img": "/public/other.png"}},
             {"id": 2, "data": {"img": "/public/missing.png"}}]  # fmt: skip
    answer = predict(client, tasks=tasks)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert len(results) == 2 and all(r["result"] == [] for r in results)
    assert all(r["model_version"].startswith("stable-sam") for r in results)
    assert backend.wait_for_prefetch(30)
    assert len(cache) == before + 1  # other.png embedded; the missing image only logged
    hits = cache.hits
    assert predict(client, [kp(50, 50)], image="/public/other.png").status_code == 200
    assert cache.hits == hits + 1  # the first click found the embedding


def test_relative_upload_url_uses_the_legacy_token_from_setup(ls, settings):
    trusting = settings.model_copy(update={"label_studio_trust_setup": True})
    with TestClient(create_app(trusting)) as fresh:
        assert predict(fresh, [kp(50, 50)], image="/data/upload/1/scene.png").status_code == 502
        fresh.post("/setup", json={"project": "1.1", "schema": CONFIG, "hostname": ls.url,
                                   "access_token": ls.legacy_token})  # fmt: skip
        assert predict(fresh, [kp(50, 50)], image="/data/upload/1/scene.png").status_code == 200


@pytest.mark.parametrize(
    ("context", "image", "status", "error", "needle"),
    [
        ([kp(150, 50)], "/public/scene.png", 422, "invalid_region", "outside the image"),
        ([box(10, 10, 0, 20)], "/public/scene.png", 422, "invalid_region", "zero or negative"),
        ([box(60, 60, -30, 20)], "/public/scene.png", 422, "invalid_region", "zero or negative"),
        ([{**kp(5, 5), "type": "ellipselabels"}], "/public/scene.png", 422, "invalid_region",
         "ellipselabels"),
        ([{"type": "keypointlabels", "value": {"x": 1}}], "/public/scene.png", 422,
         "invalid_region", "y"),
        ([kp(50, 50)], "/public/missing.png", 404, "image_not_found", "missing.png"),
        ([kp(50, 50)], "/data/upload/9/scene.png", 502, "image_fetch_unauthorized", "401"),
        ([kp(50, 50)], "/slow/scene.png", 504, "image_fetch_timeout", "timed out"),
        ([kp(50, 50)], "/public/corrupt.png", 422, "image_unreadable", "not a readable"),
        ([kp(50, 50)], "/public/truncated.png", 422, "image_unreadable", "truncated"),
        ([kp(50, 50)], "/public/huge.png", 413, "image_too_large", "IMAGE_MAX_PIXELS"),
        ([kp(50, 50)], "ftp://x/y.png", 400, "invalid_request", "unsupported"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_json_error_naming_the_problem(client, context, image, status, error,
                                                        needle):  # fmt: skip
    answer = predict(client, context, image=image)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == error
    assert needle in answer.json()["detail"]
    assert predict(client, [kp(50, 50)]).status_code == 200  # still serving


def test_an_error_body_does_not_echo_the_image_urls_credentials(client, ls):
    # Another origin than Label Studio's (localhost, not 127.0.0.1) ...
    with_password = ls.url.replace("http://127.0.0.1", "http://user:s3cret@localhost")
    answer = predict(client, [kp(50, 50)], image=f"{with_password}/public/missing.png")
    assert answer.status_code == 404 and answer.json()["error"] == "image_not_found"
    assert "missing.png" in answer.json()["detail"] and "s3cret" not in answer.text
    # ... and Label Studio's own, where such a URL is refused.
    with_password = ls.url.replace("http://", "http://user:s3cret@")
    answer = predict(client, [kp(50, 50)], image=f"{with_password}/public/missing.png")
    assert answer.status_code == 400 and "s3cret" not in answer.text


def test_a_request_whose_image_gets_no_decode_slot_in_time_is_503(settings):
    busy = settings.model_copy(update={"image_decode_concurrency": 1, "image_decode_wait_s": 0.1})
    with TestClient(create_app(busy)) as busy_client:
        budget = busy_client.app.state.backend.images.decode_budget
        with budget.reserve(0):  # another request's decode holds the only slot
            answer = predict(busy_client, [kp(50, 50)])
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "image_decode_busy"
        assert "IMAGE_DECODE_CONCURRENCY" in answer.json()["detail"]
        assert predict(busy_client, [kp(50, 50)]).status_code == 200  # served once free


def test_malformed_json_is_400(client):
    answer = client.post("/predict", content=b'{"tasks": [', headers={"Content-Type":
                                                                       "application/json"})  # fmt: skip
    assert answer.status_code == 400 and answer.json()["error"] == "malformed_json"
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "tasks"),
        ({"tasks": "abc"}, "tasks"),
        ({"tasks": [{"id": 1}]}, "tasks.0.data"),
        ({"tasks": [{"id": "x", "data": {}}]}, "tasks.0.id"),
        ({"tasks": [], "params": {"context": "oops"}}, "params.context"),
    ],
)
def test_missing_or_wrong_fields_are_422_naming_the_field(client, body, needle):
    answer = client.post("/predict", json=body)
    assert answer.status_code == 422
    assert answer.json()["error"] == "invalid_request" and needle in answer.json()["detail"]


def test_task_without_the_image_field_names_it(client):
    answer = predict(client, [kp(50, 50)], tasks=[{"id": 3, "data": {"photo": "x"}}])
    assert answer.status_code == 400 and "'img'" in answer.json()["detail"]


def test_config_without_brush_or_polygon_labels_is_a_clear_error(client):
    config = CONFIG.replace("BrushLabels", "EllipseLabels")
    body = {"tasks": [{"id": 1, "data": {"img": "/public/scene.png"}}], "label_config": config,
            "params": {"context": {"result": [kp(50, 50)]}}}  # fmt: skip
    answer = client.post("/predict", json=body)
    assert answer.status_code == 400 and answer.json()["error"] == "label_config"
    assert "<BrushLabels> or <PolygonLabels>" in answer.json()["detail"]


def test_a_polygon_project_gets_polygon_regions_of_the_mask(client):
    config = CONFIG.replace("BrushLabels", "PolygonLabels")
    body = {"tasks": [{"id": 1, "data": {"img": "/public/scene.png"}}], "label_config": config,
            "params": {"context": {"result": [kp(50, 50), box(20, 20, 60, 60, label="Tree")]}}}  # fmt: skip
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.text
    [result] = answer.json()["results"]
    assert result["result"], "a random-weight mini still masks something here"
    for region in result["result"]:
        assert region["type"] == "polygonlabels" and region["from_name"] == "masks"
        assert region["value"]["closed"] is True
        assert region["value"]["polygonlabels"][0] in ("Car", "Tree")
        points = np.array(region["value"]["points"])
        assert points.ndim == 2 and points.shape[1] == 2 and len(points) >= 3
        assert points.min() >= 0 and points.max() <= 100
    labels = {region["value"]["polygonlabels"][0] for region in result["result"]}
    assert labels <= {"Car", "Tree"}  # random weights: one of the two masks may be empty


def test_project_plugin_version_is_served_and_named(client, settings, tmp_path):
    from runtime.versions import LocalVersionStore
    from stable_sam import save_plugins

    model = client.app.state.backend.models.predictor().model
    plugin_file = save_plugins(model, tmp_path / "p.safetensors", {"version": "test"})
    version = LocalVersionStore(settings.versions_dir).write(
        "5", plugin_file, metadata={}, metrics={"miou": 0.5}, promote=True, reason="test"
    )
    setup = client.post("/setup", json={"project": "5.1700000000", "schema": CONFIG})
    assert setup.json()["model_version"] == version.name
    (entry,) = predict(client, [kp(50, 50)], project="5.1700000000").json()["results"]
    assert entry["model_version"] == version.name
    other = predict(client, [kp(50, 50)], project="6.1700000000").json()["results"][0]
    assert other["model_version"] != version.name


def test_basic_auth_guards_every_endpoint(settings):
    secured = settings.model_copy(
        update={"basic_auth_user": "ls", "basic_auth_pass": _secret("pw")}
    )
    with TestClient(create_app(secured)) as guarded:
        assert guarded.get("/health").status_code == 401
        assert guarded.post("/setup", json={}).status_code == 401
        assert guarded.get("/health", auth=("ls", "wrong")).status_code == 401
        assert guarded.get("/health", auth=("ls", "pw")).status_code == 200


def test_webhook_secret_header_is_an_alternative_to_basic_auth(settings):
    from starlette.requests import Request

    secured = settings.model_copy(update={"webhook_secret": _secret("hook")})

    def request(path, headers):
        scope = {"type": "http", "path": path, "headers": [(k.lower().encode(), v.encode())
                                                           for k, v in headers.items()]}  # fmt: skip
        return Request(scope)

    assert is_authorized(request("/webhook", {"X-Webhook-Secret": "hook"}), secured)
    assert not is_authorized(request("/webhook", {"X-Webhook-Secret": "nope"}), secured)
    assert not is_authorized(request("/webhook", {}), secured)
    assert is_authorized(request("/predict", {}), secured)  # no basic auth configured


def _secret(value):
    from pydantic import SecretStr

    return SecretStr(value)


def test_a_label_the_config_lacks_is_a_422_before_any_download(client, ls):
    before = ls.requests["/public/other.png"]
    answer = predict(client, [kp(50, 50, "Horse")], image="/public/other.png")
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_region"
    assert "'Horse'" in answer.json()["detail"] and "BrushLabels" in answer.json()["detail"]
    assert ls.requests["/public/other.png"] == before


def test_setup_and_predict_spell_a_project_id_one_way(settings):
    with TestClient(create_app(settings)) as fresh:
        fresh.post("/setup", json={"project": "007.1700000000", "schema": CONFIG})
        body = {"tasks": [{"id": 1, "data": {"img": "/public/scene.png"}}], "project": 7,
                "params": {"context": {"result": [kp(50, 50)]}}}  # fmt: skip
        answer = fresh.post("/predict", json=body)  # no label_config: /setup's is used
        assert answer.status_code == 200, answer.text


def test_predict_encodes_its_answer_off_the_event_loop(client, monkeypatch):
    import asyncio
    import types

    import orjson

    import backend.app

    on_event_loop = []

    def dumps(obj):
        try:
            asyncio.get_running_loop()
            on_event_loop.append(True)
        except RuntimeError:
            on_event_loop.append(False)
        return orjson.dumps(obj)

    monkeypatch.setattr(backend.app, "orjson", types.SimpleNamespace(dumps=dumps))
    assert predict(client, [kp(50, 50)]).status_code == 200
    assert on_event_loop == [False]
