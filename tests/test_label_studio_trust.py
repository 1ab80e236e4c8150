"""``/setup`` cannot send our Label Studio credentials anywhere: the attacker's side of each path.

The attacker is a second loopback server that records every request. Without
``LABEL_STUDIO_TRUST_SETUP`` the backend ignores what ``/setup`` says; with it, the first
Label Studio (or ``LABEL_STUDIO_URL``) is the only one, and a token that works is never replaced
by a stray one. The worker's side is ``label_studio_client`` here and, with a real RQ worker,
``tests/integration/test_label_studio_trust.py``.
"""

from __future__ import annotations

import uuid

import pytest
from backend_support import FakeLabelStudio, png_bytes, scene
from fastapi.testclient import TestClient
from pydantic import SecretStr

from backend.app import create_app
from labelstudio.errors import LabelStudioError, UntrustedLabelStudioError
from labelstudio.trust import LabelStudioTrust, base_url_of, origin_of
from runtime.queue.access import LabelStudioAccess
from runtime.queue.connection import redis_connection
from runtime.settings import Settings
from training.jobs import label_studio_client

CONFIG = """<View>
  <Image name="picture" value="$img"/>
  <BrushLabels name="masks" toName="picture"><Label value="Car"/></BrushLabels>
  <KeyPointLabels name="clicks" toName="picture" smart="true"><Label value="Car"/></KeyPointLabels>
</View>"""
CLICK = {"type": "keypointlabels", "from_name": "clicks", "to_name": "picture",
         "original_width": 80, "original_height": 60,
         "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Car"]}}  # fmt: skip


def serving_scene(server: FakeLabelStudio) -> FakeLabelStudio:
    image, _ = scene(60, 80)
    for name in ("a.png", "b.png", "c.png"):
        server.files[name] = png_bytes(image)
    return server


@pytest.fixture
def label_studio():
    with FakeLabelStudio(legacy_token="real0legacy0token") as server:
        yield serving_scene(server)


@pytest.fixture
def attacker():
    with FakeLabelStudio(legacy_token="attacker0token0000") as server:
        yield serving_scene(server)


def app_for(tmp_path, **overrides) -> TestClient:
    settings = Settings(
        sam_model_type="mini",
        sam_allow_random_weights=True,
        preload_model=False,
        device="cpu",
        image_url_ttl_s=0,
        versions_dir=tmp_path / "versions",
        redis_url="redis://127.0.0.1:9/0",  # no Redis: the pin stays in the process
        **overrides,
    )
    return TestClient(create_app(settings))


def setup(client: TestClient, hostname: str, token: str | None = None, project: str = "3.1"):
    body = {"project": project, "schema": CONFIG, "hostname": hostname, "access_token": token}
    return client.post("/setup", json=body)


def click(client: TestClient, image: str = "/data/upload/3/a.png"):
    body = {"tasks": [{"id": 1, "data": {"img": image}}], "project": "3.1",
            "label_config": CONFIG, "params": {"context": {"result": [CLICK]}}}  # fmt: skip
    return client.post("/predict", json=body)


def test_setup_cannot_send_the_api_key_to_another_host(tmp_path, label_studio, attacker):
    key = SecretStr(label_studio.legacy_token)
    with app_for(tmp_path, label_studio_api_key=key) as client:
        assert setup(client, attacker.url).status_code == 200  # ignored, not an error
        answer = click(client)
    assert answer.status_code == 400 and "LABEL_STUDIO_URL" in answer.json()["detail"]
    assert sum(attacker.requests.values()) == 0 and attacker.auth_headers == []


def test_setup_cannot_send_the_personal_access_token_to_another_host(
    tmp_path, label_studio, attacker
):
    pat = SecretStr(label_studio.pat)
    with app_for(tmp_path, label_studio_api_key=pat) as client:
        setup(client, attacker.url)
        click(client)
    assert attacker.requests["/api/token/refresh/"] == 0 and sum(attacker.requests.values()) == 0


def test_a_configured_url_refuses_setup_naming_another_host(tmp_path, label_studio, attacker):
    pat = SecretStr(label_studio.pat)
    with app_for(
        tmp_path,
        label_studio_url=label_studio.url,
        label_studio_api_key=pat,
        label_studio_trust_setup=True,
    ) as client:
        refused = setup(client, attacker.url, "attacker-wants-this")
        assert refused.status_code == 403
        assert refused.json()["error"] == "untrusted_label_studio"
        assert setup(client, label_studio.url + "/").status_code == 200
        assert click(client).status_code == 200
    assert label_studio.refreshes >= 1  # the PAT was exchanged at the real Label Studio only
    assert sum(attacker.requests.values()) == 0


def test_trusted_setup_pins_the_first_label_studio(tmp_path, label_studio, attacker):
    with app_for(tmp_path, label_studio_trust_setup=True) as client:
        assert setup(client, label_studio.url, label_studio.legacy_token).status_code == 200
        assert click(client).status_code == 200
        refused = setup(client, attacker.url, attacker.legacy_token, project="4.1")
        assert refused.status_code == 403 and attacker.url.split("//")[1] in refused.text
        assert click(client, "/data/upload/3/b.png").status_code == 200
    assert sum(attacker.requests.values()) == 0
    assert label_studio.auth_headers[-1] == f"Token {label_studio.legacy_token}"


def test_a_stray_setup_token_does_not_replace_one_that_works(tmp_path, label_studio):
    with app_for(tmp_path, label_studio_trust_setup=True) as client:
        setup(client, label_studio.url, label_studio.legacy_token)
        assert click(client).status_code == 200  # the token is now known to work
        assert setup(client, label_studio.url, "bogus0token0from0anyone").status_code == 200
        assert click(client, "/data/upload/3/b.png").status_code == 200
    assert label_studio.auth_headers[-1] == f"Token {label_studio.legacy_token}"


def test_a_rotated_token_takes_over_when_the_old_one_is_refused(tmp_path, label_studio):
    with app_for(tmp_path, label_studio_trust_setup=True) as client:
        setup(client, label_studio.url, label_studio.legacy_token)
        assert click(client).status_code == 200
        label_studio.legacy_token = "rotated0legacy0token"  # Label Studio revokes the old one
        setup(client, label_studio.url, "rotated0legacy0token")
        assert click(client, "/data/upload/3/b.png").status_code == 200
    assert label_studio.auth_headers[-1] == "Token rotated0legacy0token"


def test_an_api_key_is_never_replaced_by_a_setup_token(tmp_path, label_studio):
    key = SecretStr(label_studio.legacy_token)
    with app_for(
        tmp_path,
        label_studio_url=label_studio.url,
        label_studio_api_key=key,
        label_studio_trust_setup=True,
    ) as client:
        setup(client, label_studio.url, "some0other0token0000")
        assert click(client).status_code == 200
    assert set(label_studio.auth_headers) == {f"Token {label_studio.legacy_token}"}


# --- the rule itself ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://LS.example:80/x/", "http://ls.example"),
        ("https://ls.example:443", "https://ls.example"),
        ("http://user:pw@ls.example:8080/", "http://ls.example:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("ftp://ls.example", None),
        ("ls.example:8080", None),
        ("http://ls.example:99999", None),
        ("", None),
    ],
)
def test_origins_are_compared_normalised(url, origin):
    assert origin_of(url) == origin


def test_base_urls_keep_the_path_and_drop_credentials():
    assert base_url_of("https://u:p@ls.example/label-studio/?q=1#f") == (
        "https://ls.example/label-studio"
    )


def test_the_pin_that_redis_holds_wins_over_this_process():
    trust = LabelStudioTrust("", trust_setup=True, pin_store=lambda url: "http://first:8080")
    with pytest.raises(UntrustedLabelStudioError) as refused:
        trust.accept_setup_hostname("http://second:8080")
    assert trust.base_url == "http://first:8080"
    assert "first:8080" not in refused.value.detail  # the trusted one: the operator's log


# --- the worker's side ---------------------------------------------------------------------------


def worker_settings(**overrides) -> Settings:
    return Settings(**{"label_studio_url": "", "label_studio_api_key": None, **overrides})


@pytest.fixture
def access(redis_url):
    return LabelStudioAccess(redis_connection(redis_url), f"trust-{uuid.uuid4().hex[:8]}")


@pytest.mark.integration
def test_the_worker_ignores_setup_access_unless_trusted(access):
    access.store("5", "http://attacker:666", "tok")
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_URL"):
        label_studio_client(worker_settings(), access, "5")


@pytest.mark.integration
def test_the_worker_sends_no_token_to_a_host_other_than_the_configured_one(access):
    access.store("5", "http://attacker:666", "tok")
    settings = worker_settings(label_studio_url="http://ls:8080", label_studio_trust_setup=True)
    with pytest.raises(LabelStudioError):
        label_studio_client(settings, access, "5")


@pytest.mark.integration
def test_the_worker_sends_no_token_to_a_host_other_than_the_pinned_one(access):
    access.pin_url("http://ls:8080")
    access.store("5", "http://attacker:666", "tok")
    with pytest.raises(LabelStudioError):
        label_studio_client(worker_settings(label_studio_trust_setup=True), access, "5")
    access.store("5", "http://ls:8080", "tok")
    with label_studio_client(worker_settings(label_studio_trust_setup=True), access, "5") as client:
        assert client.base_url == "http://ls:8080"


def test_only_the_origin_of_setup_s_hostname_is_pinned(tmp_path, label_studio, attacker):
    # A caller pinning the right host with a wrong path would break every image silently.
    with app_for(tmp_path, label_studio_trust_setup=True) as client:
        assert setup(client, label_studio.url + "/nowhere").status_code == 200
        setup(client, label_studio.url, label_studio.legacy_token)
        assert click(client).status_code == 200


def test_an_api_key_with_trusted_setup_needs_a_named_label_studio():
    with pytest.raises(ValueError, match="needs LABEL_STUDIO_URL"):
        Settings(label_studio_api_key=SecretStr("k" * 40), label_studio_trust_setup=True)


def test_a_setup_token_that_cannot_be_a_token_is_refused(tmp_path, label_studio):
    with app_for(tmp_path, label_studio_trust_setup=True) as client:
        answer = setup(client, label_studio.url, "x" * 5000)
    assert answer.status_code == 400 and "access_token" in answer.json()["detail"]


@pytest.mark.integration
def test_training_jobs_get_the_token_in_use_not_a_stray_one(redis_url, tmp_path, label_studio):
    settings = Settings(
        redis_url=redis_url,
        training_queue=f"trust-{uuid.uuid4().hex[:8]}",
        versions_dir=tmp_path / "versions",
        sam_model_type="mini",
        sam_allow_random_weights=True,
        preload_model=False,
        device="cpu",
        image_url_ttl_s=0,
        label_studio_trust_setup=True,
    )
    with TestClient(create_app(settings)) as client:
        setup(client, label_studio.url, label_studio.legacy_token)
        assert click(client).status_code == 200  # the token works
        setup(client, label_studio.url, "bogus0token0from0anyone")
    access = LabelStudioAccess(redis_connection(redis_url), settings.training_queue)
    assert access.of_project("3") == (label_studio.url, label_studio.legacy_token)
