"""``fit`` hands training to the RQ queue; ``/setup`` shares Label Studio access with the jobs."""

from __future__ import annotations

import time
import uuid

import pytest
from rq import Queue

from backend.model import StableSamBackend
from runtime.queue import redis_connection
from runtime.settings import Settings


def make_backend(redis_url: str, tmp_path, **overrides) -> StableSamBackend:
    settings = Settings(
        redis_url=redis_url,
        training_queue=f"test-backend-{uuid.uuid4().hex[:8]}",
        versions_dir=tmp_path,
        prefetch_workers=0,
        **overrides,
    )
    return StableSamBackend(settings)


@pytest.fixture
def backend(redis_url, tmp_path):
    instance = make_backend(redis_url, tmp_path)
    yield instance
    instance.close()


@pytest.fixture
def trusting_backend(redis_url, tmp_path):
    instance = make_backend(redis_url, tmp_path, label_studio_trust_setup=True)
    yield instance
    instance.close()


@pytest.mark.integration
def test_fit_enqueues_one_training_job_and_coalesces_the_next(backend):
    first = backend.fit("START_TRAINING", {"action": "START_TRAINING", "project": {"id": 41}})
    again = backend.fit("START_TRAINING", {"action": "START_TRAINING", "project": {"id": 41}})
    assert first["status"] == "enqueued" and first["project"] == "41"
    assert again["status"] == "merged" and again["job_id"] == first["job_id"]
    queue = Queue(
        backend.settings.training_queue, connection=redis_connection(backend.settings.redis_url)
    )
    assert queue.job_ids == [first["job_id"]]


@pytest.mark.integration
def test_setup_shares_label_studio_access_with_training_jobs(trusting_backend):
    trusting_backend.setup("42.1700000000", "<View/>", hostname="http://ls:8080/",
                           access_token="tok123")  # fmt: skip
    queue = trusting_backend.training_queue()
    assert queue.label_studio_access("42") == ("http://ls:8080", "tok123")
    assert queue.pinned_label_studio_url() == "http://ls:8080"


@pytest.mark.integration
def test_setup_shares_nothing_unless_the_operator_trusts_it(backend):
    backend.setup("42.1700000000", "<View/>", hostname="http://ls:8080", access_token="tok123")
    assert backend.training_queue().label_studio_access("42") is None
    assert backend.training_queue().pinned_label_studio_url() is None


def test_setup_stays_fast_when_redis_is_down(tmp_path):
    backend = make_backend("redis://127.0.0.1:9/0", tmp_path, label_studio_trust_setup=True)
    started = time.perf_counter()
    for _ in range(5):
        version = backend.setup("43.1", "<View/>", hostname="http://ls:8080", access_token="t")
    assert version.startswith("stable-sam") or version.startswith("sam-")
    assert time.perf_counter() - started < 1.5  # one failed connect, then no retries for 30 s
    backend.close()
