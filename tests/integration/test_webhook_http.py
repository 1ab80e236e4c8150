"""``POST /webhook`` through the real HTTP app: validation, tokens kept out, Redis down -> 503,
pickles planted in Redis never loaded.

No worker here (tests/integration/test_training_worker.py has those); the Redis-down test
points the app at a closed port and checks that ``/predict`` keeps working.
"""

from __future__ import annotations

import base64
import logging
import pickle
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from rq.job import Job, JobStatus

from backend.app import create_app
from bench.label_studio_api import LABEL_CONFIG, LEGACY_TOKEN, LabelStudioAPI
from bench.processes import free_port, tiny_mini_checkpoint
from runtime.queue.connection import training_queue
from runtime.settings import Settings

pytestmark = pytest.mark.integration

SECRET = "project-token-that-must-never-be-logged-0123"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mini_checkpoint(tmp_path_factory.mktemp("ckpt") / "mini.pth")


@pytest.fixture
def client(redis_url: str, tmp_path: Path, checkpoint: Path) -> Iterator[TestClient]:
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(
        redis_url=redis_url,
        training_queue="webhook-http-test",
        versions_dir=tmp_path / "versions",
        sam_model_type="mini",
        sam_checkpoint=checkpoint,
        preload_model=False,
        device="cpu",
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def post_raw(client: TestClient, content: bytes) -> httpx.Response:
    return client.post("/webhook", content=content, headers={"Content-Type": "application/json"})


def test_malformed_json_is_a_400_naming_the_problem(client: TestClient) -> None:
    answer = post_raw(client, b'{"action": "START_TRAINING", ')
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "malformed_json",
        "detail": "the request body is not valid JSON",
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([1, 2], "JSON object"),
        ({"project": {"id": 7}}, "action"),
        ({"action": 5, "project": {"id": 7}}, "action"),
        ({"action": "START_TRAINING"}, "project"),
        ({"action": "START_TRAINING", "project": {"title": "no id"}}, "project.id"),
        ({"action": "ANNOTATION_CREATED", "project": {"id": "seven"}}, "project.id"),
        ({"action": "START_TRAINING", "project": {"id": -3}}, "project.id"),
    ],
)
def test_invalid_bodies_get_a_400_naming_the_field(
    client: TestClient, body: object, field: str
) -> None:
    answer = client.post("/webhook", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request"
    assert field in answer.json()["detail"]


def test_the_project_token_is_never_echoed_or_logged(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bad = client.post(
        "/webhook", json={"action": "START_TRAINING", "project": {"id": "x", "token": SECRET}}
    )
    good = client.post(
        "/webhook", json={"action": "START_TRAINING", "project": {"id": 7, "token": SECRET}}
    )
    assert bad.status_code == 400 and good.status_code == 200
    assert SECRET not in bad.text and SECRET not in good.text
    assert SECRET not in caplog.text


def test_other_actions_are_acknowledged_and_ignored(client: TestClient) -> None:
    answer = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 7}})
    assert answer.status_code == 200
    assert answer.json() == {"status": "ignored", "action": "TASKS_CREATED"}


def test_start_training_answers_with_the_job_that_covers_it(
    client: TestClient, redis_url: str
) -> None:
    first = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    second = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert first.status_code == second.status_code == 200
    assert first.json()["status"] == "enqueued" and first.json()["project"] == "7"
    assert second.json()["status"] == "merged"
    assert second.json()["job_id"] == first.json()["job_id"]
    queue = training_queue(redis.Redis.from_url(redis_url), "webhook-http-test")
    assert queue.job_ids == [first.json()["job_id"]]
    status = client.get("/status/7").json()
    assert status["queued"]["job_id"] == first.json()["job_id"]
    assert status["queued"]["triggers"] == 2
    assert status["current_version"] is None
    assert client.get("/versions", params={"project": "7"}).json() == {"versions": []}


class CreatesMarker:
    """Unpickling this calls ``open(path, "w")``: the file exists iff the pickle was loaded (the
    shape of any pickle exploit: a callable run at load time, e.g. ``os.system``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_a_pickle_planted_in_a_queued_jobs_meta_is_never_loaded(
    client: TestClient, redis_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled-meta"
    job_id = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    job_id = job_id.json()["job_id"]
    redis.Redis.from_url(redis_url).hset(
        Job.key_for(job_id), "meta", pickle.dumps(CreatesMarker(marker))
    )
    lenient = TestClient(client.app, raise_server_exceptions=False)
    answers = [
        lenient.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}),
        lenient.get("/status/7"),
        lenient.get("/status"),
    ]
    assert not marker.exists(), "the web process unpickled a value read from Redis"
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json()["status"] == "merged"
    assert answers[1].json()["queued"]["job_id"] == job_id


def test_a_pickle_planted_in_a_failed_jobs_result_is_never_loaded(
    client: TestClient, redis_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled-result"
    answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    job_id = answer.json()["job_id"]
    connection = redis.Redis.from_url(redis_url)
    connection.hset(Job.key_for(job_id), "status", JobStatus.FAILED.value)
    connection.xadd(
        f"rq:results:{job_id}",
        {"type": 2, "return_value": base64.b64encode(pickle.dumps(CreatesMarker(marker)))},
    )
    lenient = TestClient(client.app, raise_server_exceptions=False)
    answers = [lenient.get("/status/7"), lenient.get("/status")]
    assert not marker.exists(), "the web process unpickled a value read from Redis"
    assert [a.status_code for a in answers] == [200, 200]
    failure = answers[0].json()["last_failure"]
    assert failure["job_id"] == job_id and failure["error"] == "failed"


def test_redis_down_gives_503_fast_and_predict_keeps_working(
    tmp_path: Path, checkpoint: Path
) -> None:
    with LabelStudioAPI(n_tasks=1, size=96) as ls:
        settings = Settings(
            redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
            versions_dir=tmp_path / "versions",
            label_studio_url=ls.url,
            label_studio_api_key=LEGACY_TOKEN,
            sam_model_type="mini",
            sam_checkpoint=checkpoint,
            preload_model=False,
            device="cpu",
        )
        with TestClient(create_app(settings)) as client:
            started = time.perf_counter()
            answer = client.post(
                "/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}
            )
            elapsed = time.perf_counter() - started
            assert answer.status_code == 503
            assert answer.json()["error"] == "queue_unavailable"
            assert "Redis" in answer.json()["detail"] and "unreachable" in answer.json()["detail"]
            assert elapsed < 0.5
            assert client.get("/status/7").status_code == 503
            assert client.get("/versions").json() == {"versions": []}

            image_path = ls.tasks[0]["data"]["image"]
            body = {
                "tasks": [{"id": 1, "data": {"image": image_path}}],
                "project": "7.1700000000",
                "label_config": LABEL_CONFIG,
                "params": {
                    "context": {
                        "result": [
                            {
                                "type": "keypointlabels",
                                "from_name": "kp",
                                "to_name": "image",
                                "original_width": 96,
                                "original_height": 96,
                                "is_positive": True,
                                "value": {
                                    "x": 50,
                                    "y": 50,
                                    "width": 1,
                                    "keypointlabels": ["Object"],
                                },
                            }
                        ]
                    }
                },
            }
            predicted = client.post("/predict", json=body)
            assert predicted.status_code == 200, predicted.text
            result = predicted.json()["results"][0]
            assert result["result"][0]["type"] == "brushlabels"
            assert result["model_version"]


def test_a_zero_padded_project_id_is_the_same_project(client: TestClient) -> None:
    first = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": "07"}})
    second = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    third = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": "007"}})
    assert first.json()["status"] == "enqueued" and first.json()["project"] == "7"
    assert second.json()["status"] == third.json()["status"] == "merged"
    assert second.json()["job_id"] == third.json()["job_id"] == first.json()["job_id"]
    assert client.get("/status/007").json()["queued"]["triggers"] == 3


def test_a_5000_digit_project_id_is_refused_and_status_keeps_answering(client: TestClient) -> None:
    answer = client.post(
        "/webhook", json={"action": "START_TRAINING", "project": {"id": "9" * 5000}}
    )
    assert answer.status_code == 400 and "project.id" in answer.json()["detail"]
    assert client.get("/status").status_code == 200
    assert client.get(f"/status/{'9' * 5000}").status_code == 400


def test_status_skips_project_ids_an_older_version_left_in_redis(
    client: TestClient, redis_url: str
) -> None:
    from runtime.queue.state import projects_key

    redis.Redis.from_url(redis_url).sadd(projects_key(), "9" * 5000, "07", "٣")
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    answer = client.get("/status")
    assert answer.status_code == 200
    assert [p["project"] for p in answer.json()["projects"]] == ["7"]


@pytest.mark.parametrize("path", ["/status/٣", "/versions?project=٣", "/status/１２"])
def test_non_ascii_digits_are_not_a_project_id(client: TestClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request"


def test_a_webhook_with_non_ascii_digits_is_a_400(client: TestClient) -> None:
    answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": "٣"}})
    assert answer.status_code == 400 and "project.id" in answer.json()["detail"]


def test_a_full_queue_refuses_new_jobs_with_503_and_still_merges(
    redis_url: str, tmp_path: Path, checkpoint: Path
) -> None:
    """MAX_QUEUED_TRAINING_JOBS bounds the jobs a flood of distinct project ids leaves queued."""
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(
        redis_url=redis_url,
        training_queue="webhook-http-full",
        versions_dir=tmp_path / "versions",
        sam_model_type="mini",
        sam_checkpoint=checkpoint,
        preload_model=False,
        device="cpu",
        max_queued_training_jobs=2,
    )
    with TestClient(create_app(settings)) as client:

        def start(project: int) -> httpx.Response:
            return client.post("/webhook", json={"action": "START_TRAINING", "project": project})

        assert [start(p).json()["status"] for p in (1, 2)] == ["enqueued", "enqueued"]
        for project in (3, 4, 5):
            full = start(project)
            assert full.status_code == 503
            assert full.json()["error"] == "queue_full"
            assert "MAX_QUEUED_TRAINING_JOBS" in full.json()["detail"]
        merged = start(1)
        assert merged.status_code == 200 and merged.json()["status"] == "merged"
        assert client.get("/status/3").json()["queued"] is None
        assert redis.Redis.from_url(redis_url).llen("rq:queue:webhook-http-full") == 2
