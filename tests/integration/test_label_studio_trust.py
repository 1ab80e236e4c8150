"""A real RQ worker never sends the project's credentials to a host that ``/setup`` named.

The attacker calls the real app's ``/setup`` with its own hostname (no credentials needed), then
triggers training; the worker must not contact the attacker, and ``/status`` says why the run
could not start.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import redis

from bench.label_studio_api import LEGACY_TOKEN, LabelStudioAPI
from bench.processes import AppServer, running_worker, settings_env, wait_until
from runtime.settings import Settings

pytestmark = [pytest.mark.integration]

PROJECT = 9


@pytest.fixture
def attacker():
    with LabelStudioAPI(project_id=PROJECT, n_tasks=2, size=64) as api:
        yield api


def test_a_training_job_never_contacts_the_host_setup_named(
    redis_url: str, tmp_path: Path, attacker: LabelStudioAPI
) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(
        redis_url=redis_url,
        training_queue=f"trust-{tmp_path.name}",
        versions_dir=tmp_path / "versions",
        label_studio_url="",  # the documented set-up the attack used: the URL from /setup
        label_studio_api_key=LEGACY_TOKEN,
        sam_model_type="mini",
        device="cpu",
        preload_model=False,
        train_retries=0,
    )
    env = settings_env(settings)
    with (
        running_worker(redis_url, settings.training_queue, env, tmp_path / "w.log") as worker,
        AppServer(settings, tmp_path / "app.log") as app,
    ):
        setup = {"project": f"{PROJECT}.1", "schema": "<View/>", "hostname": attacker.url,
                 "access_token": "attacker-chosen-token"}  # fmt: skip
        assert httpx.post(f"{app.url}/setup", json=setup, timeout=5).status_code == 200
        start = {"action": "START_TRAINING", "project": {"id": PROJECT}}
        assert httpx.post(f"{app.url}/webhook", json=start, timeout=5).status_code == 200

        def failure() -> dict | None:
            status = httpx.get(f"{app.url}/status/{PROJECT}", timeout=5).json()
            return status["last_failure"]

        try:
            last_failure = wait_until(failure, 120, "the training job to fail")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nworker log:\n{worker.log_tail()}") from exc
    assert "no Label Studio access" in last_failure["error"]
    assert attacker.requests == 0
