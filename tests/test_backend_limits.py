"""Request limits: 413 ``request_too_large`` naming the setting, before any download or model work.

Through the app in-process (TestClient) with small limits, a tiny random ``mini`` SAM and a
loopback image server whose request counts show that nothing was downloaded for a refused request.
"""

from __future__ import annotations

import json

import pytest
from backend_support import CONFIG, FakeLabelStudio, H, W, kp, png_bytes, scene
from fastapi.testclient import TestClient

from backend.app import create_app
from runtime.settings import Settings

MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def ls():
    with FakeLabelStudio() as server:
        image, _ = scene(H, W)
        server.files["scene.png"] = png_bytes(image)
        yield server


@pytest.fixture(scope="module")
def settings(ls, tmp_path_factory):
    return Settings(
        label_studio_url=ls.url,
        sam_model_type="mini",
        sam_allow_random_weights=True,
        preload_model=False,
        device="cpu",
        prefetch_workers=0,
        versions_dir=tmp_path_factory.mktemp("versions"),
        redis_url="redis://127.0.0.1:9/0",  # no Redis: /setup must not need one
        max_body_bytes=MAX_BODY_BYTES,
        max_tasks_per_predict=3,
        max_batch_tasks=8,
        max_regions=10,
        max_points_per_prompt=4,
        max_points_per_request=6,
        max_label_config_bytes=2048,
        schema_cache_size=3,
    )


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def interactive(context, image="/public/scene.png", label_config=CONFIG, tasks=None):
    """A /predict body as Label Studio sends it for a click."""
    return {
        "tasks": tasks or [{"id": 11, "data": {"img": image}}],
        "project": "1.1700000000",
        "label_config": label_config,
        "params": {"context": {"result": context}},
    }


def assert_too_large(answer, setting):
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"] == "request_too_large"
    assert setting in answer.json()["detail"]


# --- request body size (every endpoint) ------------------------------------------------------


@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook"])
def test_a_body_over_max_body_bytes_is_413_on_every_endpoint(client, path):
    body = json.dumps({"tasks": [], "pad": "x" * MAX_BODY_BYTES}).encode()
    answer = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_too_large(answer, "MAX_BODY_BYTES")
    assert str(len(body)) in answer.json()["detail"]  # the declared Content-Length


def test_a_chunked_body_without_content_length_is_counted_and_refused(client):
    def chunks():
        yield b'{"tasks": [], "pad": "'
        for _ in range(2 * MAX_BODY_BYTES // 4096):
            yield b"x" * 4096
        yield b'"}'

    answer = client.post("/setup", content=chunks(), headers={"Content-Type": "application/json"})
    assert answer.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in answer.request.headers
    assert_too_large(answer, "MAX_BODY_BYTES")
    assert "without Content-Length" in answer.json()["detail"]
    assert client.get("/health").status_code == 200


def test_a_body_under_max_body_bytes_is_served(client):
    body = {"project": "1.1", "schema": CONFIG, "pad": "x" * (MAX_BODY_BYTES // 2)}
    assert client.post("/setup", json=body).status_code == 200


# --- what one /predict may hold, checked before any download --------------------------------


def test_more_tasks_than_max_tasks_per_predict_is_413_before_any_download(client, ls):
    tasks = [{"id": i, "data": {"img": f"/public/scene.png?task={i}"}} for i in range(4)]
    answer = client.post("/predict", json=interactive([kp(50, 50)], tasks=tasks))
    assert_too_large(answer, "MAX_TASKS_PER_PREDICT")
    assert ls.requests["/public/scene.png"] == 0


def test_more_regions_than_max_regions_is_413_before_any_download(client, ls):
    regions = [kp(10 + i, 10 + i, label) for i in range(6) for label in ("Car", "Tree")]
    answer = client.post("/predict", json=interactive(regions))
    assert_too_large(answer, "MAX_REGIONS")
    assert ls.requests["/public/scene.png"] == 0


def test_more_keypoints_in_one_prompt_than_max_points_per_prompt_is_413(client, ls):
    answer = client.post("/predict", json=interactive([kp(10 + i, 20) for i in range(5)]))
    assert_too_large(answer, "MAX_POINTS_PER_PROMPT")
    assert "'Car'" in answer.json()["detail"]
    assert ls.requests["/public/scene.png"] == 0


def test_more_keypoints_in_one_request_than_max_points_per_request_is_413(client, ls):
    regions = [kp(10 + i, 20, label) for i in range(4) for label in ("Car", "Tree")]
    answer = client.post("/predict", json=interactive(regions))  # 4 + 4 points, 2 prompts
    assert_too_large(answer, "MAX_POINTS_PER_REQUEST")
    assert ls.requests["/public/scene.png"] == 0


def test_a_predict_label_config_over_max_label_config_bytes_is_413(client, ls):
    config = CONFIG.replace("</View>", f"<!-- {'x' * 2048} --></View>")
    answer = client.post("/predict", json=interactive([kp(50, 50)], label_config=config))
    assert_too_large(answer, "MAX_LABEL_CONFIG_BYTES")
    assert "label_config" in answer.json()["detail"]
    assert ls.requests["/public/scene.png"] == 0


def test_a_setup_schema_over_max_label_config_bytes_is_413_and_not_kept(client):
    config = CONFIG.replace("</View>", f"<!-- {'x' * 2048} --></View>")
    answer = client.post("/setup", json={"project": "2.1700000000", "schema": config})
    assert_too_large(answer, "MAX_LABEL_CONFIG_BYTES")
    assert "schema" in answer.json()["detail"]
    body = interactive([kp(50, 50)], label_config=None)
    body["project"] = "2.1700000000"
    assert client.post("/predict", json=body).json()["error"] == "label_config"


def test_a_request_within_every_limit_is_served(client):
    regions = [kp(30 + i, 40, "Car") for i in range(3)] + [kp(60 + i, 60, "Tree") for i in range(3)]
    answer = client.post("/predict", json=interactive(regions))
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["results"][0]["result"]) == 2


# --- the label configs /setup remembers ------------------------------------------------------


def test_setup_remembers_only_the_schema_cache_size_most_recent_projects(client):
    for project in range(100, 110):
        answer = client.post("/setup", json={"project": f"{project}.1", "schema": CONFIG})
        assert answer.status_code == 200
    assert len(client.app.state.backend._schemas) == 3

    def predict_for(project):
        body = interactive([kp(50, 50)], label_config=None)
        body["project"] = f"{project}.1"
        return client.post("/predict", json=body)

    forgotten = predict_for(100)
    assert forgotten.status_code == 400 and forgotten.json()["error"] == "label_config"
    assert predict_for(109).status_code == 200


def test_a_batch_predict_of_many_tasks_is_not_refused(client):
    # "Retrieve predictions" sends every selected task at once; without a context each one
    # costs only its (empty) entry, so only MAX_BODY_BYTES bounds it.
    tasks = [{"id": i, "data": {"img": f"/public/scene.png?task={i}"}} for i in range(5)]
    body = {"tasks": tasks, "project": "1.1", "label_config": CONFIG}
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200 and len(answer.json()["results"]) == 5


def test_a_batch_predict_over_max_batch_tasks_is_413_before_validation(client):
    # 2.6 M tasks in a 30 MB body held the process 19 s validating them.
    body = {"tasks": [{"data": {}}] * 9, "project": "1.1", "label_config": CONFIG}
    answer = client.post("/predict", json=body)
    assert answer.status_code == 413 and "MAX_BATCH_TASKS" in answer.json()["detail"]


def test_a_setup_body_larger_than_a_config_and_its_fields_is_413(settings):
    roomy = settings.model_copy(update={"max_body_bytes": 32 * 1024 * 1024})
    body = {"project": "1.1", "schema": "<View/>", "extra_params": "x" * (1024 * 1024)}
    with TestClient(create_app(roomy)) as client:
        answer = client.post("/setup", json=body)
    assert answer.status_code == 413 and "MAX_LABEL_CONFIG_BYTES" in answer.json()["detail"]
