"""``/setup`` shares Label Studio access with the training jobs (``runtime.queue.access``)."""

from __future__ import annotations

import time
import uuid

import pytest

from backend.ls_backend import StableSamBackend
from runtime.queue.access import LabelStudioAccess
from runtime.queue.connection import redis_connection
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


def access_of(backend: StableSamBackend) -> LabelStudioAccess:
    """What a training job of ``backend``'s queue reads (its own connection)."""
    settings = backend.settings
    return LabelStudioAccess(redis_connection(settings.redis_url), settings.training_queue)


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
def test_setup_shares_label_studio_access_with_training_jobs(trusting_backend):
    trusting_backend.setup("42.1700000000", "<View/>", hostname="http://ls:8080/",
                           access_token="tok123")  # fmt: skip
    access = access_of(trusting_backend)
    assert access.of_project("42") == ("http://ls:8080", "tok123")
    assert access.pinned_url() == "http://ls:8080"


@pytest.mark.integration
def test_setup_shares_nothing_unless_the_operator_trusts_it(backend):
    backend.setup("42.1700000000", "<View/>", hostname="http://ls:8080", access_token="tok123")
    assert access_of(backend).of_project("42") is None
    assert access_of(backend).pinned_url() is None


def test_setup_stays_fast_when_redis_is_down(tmp_path):
    backend = make_backend("redis://127.0.0.1:9/0", tmp_path, label_studio_trust_setup=True)
    started = time.perf_counter()
    for _ in range(5):
        version = backend.setup("43.1", "<View/>", hostname="http://ls:8080", access_token="t")
    assert version.startswith("stable-sam") or version.startswith("sam-")
    assert time.perf_counter() - started < 1.5  # one failed connect, then no retries for 30 s
    backend.close()
