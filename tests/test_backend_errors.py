"""One error body, ``{"error": code, "detail": message}``, for every error the app answers.

FastAPI/Starlette's own errors (unknown route, wrong method, a body ``json`` cannot parse) included.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from runtime.settings import Settings


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(
        preload_model=False,
        prefetch_workers=0,
        versions_dir=tmp_path_factory.mktemp("versions"),
        redis_url="redis://127.0.0.1:9/0",  # nothing here reaches Redis
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_an_unknown_route_is_a_404_in_our_error_body(client):
    answer = client.get("/nowhere")
    assert answer.status_code == 404
    assert answer.json() == {"error": "not_found", "detail": "Not Found"}


def test_a_wrong_method_is_a_405_in_our_error_body(client):
    answer = client.get("/predict")
    assert answer.status_code == 405
    assert answer.json() == {"error": "method_not_allowed", "detail": "Method Not Allowed"}
    assert answer.headers["allow"] == "POST"


DEEP = b'{"project": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HUGE_INT = b'{"project": ' + b"7" * 5000 + b', "tasks": []}'


@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
@pytest.mark.parametrize(
    ("body", "needle"), [(DEEP, "too deeply"), (HUGE_INT, "too many digits")], ids=["deep", "int"]
)
def test_json_python_cannot_parse_is_a_400_in_our_error_body(client, path, body, needle):
    answer = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "malformed_json"
    assert needle in answer.json()["detail"]


def post_with_a_lone_surrogate(client, path: str, body: dict):
    """POST ``body`` with each ``"SURROGATE"`` spelt ``"\\ud800x"`` in the JSON: a lone
    surrogate and an "x" once parsed, which UTF-8 cannot encode."""
    raw = json.dumps(body).replace("SURROGATE", "\\ud800x").encode()
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def test_a_lone_surrogate_echoed_in_an_error_body_is_escaped_not_a_500(client):
    region = {"type": "keypointlabels", "from_name": "clicks", "to_name": "SURROGATE",
              "value": {"x": 5, "y": 5, "width": 1, "keypointlabels": ["Car"]}}  # fmt: skip
    body = {
        "tasks": [{"id": 1, "data": {"img": "/a.png"}}],
        "label_config": '<View><Image name="picture" value="$img"/></View>',
        "params": {"context": {"result": [region]}},
    }
    answer = post_with_a_lone_surrogate(client, "/predict", body)
    assert 400 <= answer.status_code < 500, answer.text
    assert set(answer.json()) == {"error", "detail"} and "\ud800x" in answer.json()["detail"]


def test_a_lone_surrogate_in_an_ignored_webhook_action_is_echoed_escaped(client):
    answer = post_with_a_lone_surrogate(client, "/webhook", {"action": "SURROGATE"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ignored", "action": "\ud800x"}
