"""The Label Studio client: credentials, task files and the API, as the web process, the training
job and the user study all use it.

Files are fetched from a real loopback server (``backend_support.FakeLabelStudio``: auth, slow
and trickling routes); the API calls (through label-studio-sdk's client) go to an in-process
stand-in of Label Studio's REST API in LS 1.23's JSON shapes (``ls_api``).
"""

from __future__ import annotations

import logging
import time

import httpx
import numpy as np
import pytest
from backend_support import NO_ACCESS_TOKEN_ANSWERS, FakeLabelStudio, fake_jwt, scene
from ls_api import LEGACY_TOKEN, LS_URL, FakeLabelStudioAPI, task

import labelstudio.client
from labelstudio.auth import LabelStudioAuth
from labelstudio.client import LabelStudioClient
from labelstudio.download import DownloadLimits
from labelstudio.errors import (
    ImageFetchError,
    ImageTooLargeError,
    InvalidRequestError,
    LabelStudioError,
)


@pytest.fixture(scope="module")
def ls():
    with FakeLabelStudio.serving_a_scene() as server:
        yield server


def client_for(
    ls: FakeLabelStudio, api_key: str = "", trust_setup: bool = False, **limits
) -> LabelStudioClient:
    return LabelStudioClient(
        LabelStudioAuth(ls.url, api_key, trust_setup), DownloadLimits(**limits)
    )


def api_client(fake: FakeLabelStudioAPI, token: str | None = None) -> LabelStudioClient:
    auth = LabelStudioAuth(LS_URL, fake.token if token is None else token)
    return LabelStudioClient(auth, transport=httpx.MockTransport(fake))


def pat() -> str:
    return fake_jwt({"token_type": "refresh", "exp": time.time() + 3600})


# --- credentials ------------------------------------------------------------------------------


def test_legacy_token_from_setup_is_sent_as_token_header(ls):
    client = client_for(ls, trust_setup=True)
    with pytest.raises(ImageFetchError) as info:
        client.image("/data/upload/1/scene.png")
    assert info.value.code == "image_fetch_unauthorized" and info.value.status_code == 502
    assert "LABEL_STUDIO_API_KEY" in info.value.detail
    client.auth.update_from_setup(None, ls.legacy_token)
    assert client.image("/data/upload/1/scene.png").shape == (60, 80, 3)
    assert ls.auth_headers[-1] == f"Token {ls.legacy_token}"


def test_legacy_api_key_is_sent_as_token_header(ls):
    assert client_for(ls, ls.legacy_token).image("/data/upload/2/scene.png").shape[0] == 60
    assert ls.auth_headers[-1] == f"Token {ls.legacy_token}"


def test_personal_access_token_is_exchanged_once_and_cached(ls):
    client = client_for(ls, ls.pat)
    before = ls.refreshes
    client.image("/data/upload/1/scene.png")
    client.image("/data/upload/1/scene.png")
    assert ls.refreshes == before + 1
    assert ls.auth_headers[-1].startswith("Bearer ") and ls.auth_headers[-1] != f"Bearer {ls.pat}"


def test_expired_access_token_is_refreshed_after_a_401(ls):
    client = client_for(ls, ls.pat)
    client.image("/data/upload/1/scene.png")
    ls.access_tokens.clear()  # the server forgets it, as after 5 minutes
    before = ls.refreshes
    assert client.image("/data/upload/1/scene.png").shape[1] == 80
    assert ls.refreshes == before + 1


def test_an_access_token_jwt_is_sent_as_bearer_without_exchange(ls):
    access = fake_jwt({"token_type": "access", "exp": time.time() + 300})
    ls.access_tokens.add(access)
    client = client_for(ls, trust_setup=True)
    client.auth.update_from_setup(None, access)
    before = ls.refreshes
    assert client.image("/data/upload/1/scene.png").shape[1] == 80
    assert ls.refreshes == before and ls.auth_headers[-1] == f"Bearer {access}"


def test_a_rejected_personal_access_token_is_a_clear_error(ls):
    bad = fake_jwt({"token_type": "refresh", "exp": time.time() + 60, "x": "wrong"})
    with pytest.raises(LabelStudioError, match="refused the personal access token") as info:
        client_for(ls, bad).image("/data/upload/1/scene.png")
    assert (info.value.status_code, info.value.code) == (502, "label_studio_auth_failed")


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_the_token_exchange_does_not_follow_a_redirect(status):
    fake = FakeLabelStudioAPI([], {}, token=pat())
    fake.refresh_answer = httpx.Response(
        status, headers={"Location": "http://elsewhere.test/api/token/refresh/"}
    )
    with pytest.raises(LabelStudioError, match=f"HTTP {status}"):
        api_client(fake).image("/data/upload/7/a.png")
    assert "elsewhere.test" not in fake.hosts


@pytest.mark.parametrize("kind", NO_ACCESS_TOKEN_ANSWERS)
def test_a_token_exchange_answer_without_an_access_token_is_a_clear_502(kind):
    fake = FakeLabelStudioAPI([], {}, token=pat())
    fake.refresh_answer = NO_ACCESS_TOKEN_ANSWERS[kind]()
    with pytest.raises(LabelStudioError, match="without an access token") as info:
        api_client(fake).image("/data/upload/7/a.png")
    assert info.value.status_code == 502


def test_the_token_goes_only_to_label_studio_s_own_origin(ls):
    # The same host and port under another scheme is another origin: no token there.
    other_scheme = ls.url.replace("http://", "https://")
    client = LabelStudioClient(LabelStudioAuth(other_scheme, ls.legacy_token))
    before = len(ls.auth_headers)
    client.image(f"{ls.url}/public/scene.png")
    assert ls.auth_headers[before:] == [""]


def test_an_image_url_with_credentials_on_label_studio_s_origin_is_refused(ls):
    # httpx would send them as its own Authorization in place of our token, and Label
    # Studio's 401 would look like a refusal of that token (which then gets swapped out).
    client = client_for(ls, ls.legacy_token)
    before = len(ls.auth_headers)
    with pytest.raises(InvalidRequestError, match="carries credentials") as info:
        client.image(ls.url.replace("http://", "http://x:s3cret@") + "/data/upload/1/scene.png")
    assert len(ls.auth_headers) == before  # nothing was sent
    assert "s3cret" not in info.value.detail


def test_tokens_never_reach_the_log(ls, caplog):
    caplog.set_level(logging.DEBUG)
    client = client_for(ls, ls.pat)
    client.image("/data/upload/1/scene.png")
    with pytest.raises(ImageFetchError):
        client.image(f"{ls.url}/public/missing.png")
    assert ls.pat not in caplog.text
    assert not any(token in caplog.text for token in ls.access_tokens)


# --- task files -------------------------------------------------------------------------------


def test_public_image_is_fetched_and_decoded(ls):
    image = client_for(ls).image(f"{ls.url}/public/scene.png")
    np.testing.assert_array_equal(image, scene(60, 80)[0])


def test_a_task_file_is_fetched_as_its_bytes(ls):
    assert client_for(ls, ls.legacy_token).file("/data/upload/1/scene.png") == ls.files["scene.png"]


@pytest.mark.parametrize(
    ("value", "problem"),
    [("http://[bad/a.png", "Invalid IPv6 URL"), ("http://host:abc/a.png", "Port")],
    ids=["unbalanced-bracket", "port-not-a-number"],
)
def test_urls_python_cannot_parse_are_400_naming_the_problem(ls, value, problem):
    with pytest.raises(InvalidRequestError) as info:
        client_for(ls).image(value, 1)
    assert (info.value.status_code, info.value.code) == (400, "invalid_request")
    assert "cannot be parsed" in info.value.detail and problem in info.value.detail


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("http://\u24dbs.example/a.png", "InvalidURL"),  # "ⓛ": no IDNA mapping
        ("http://a..b/a.png", "UnicodeError"),  # an empty label: the socket's IDNA refuses it
        ("http://xn--/a.png", "IDNAError"),  # an A-label without Punycode
        ("http://example.invalid/a\x00.png", "InvalidURL"),  # a NUL in the path
    ],
    ids=["unmappable-host", "empty-label", "bad-a-label", "nul-in-path"],
)
def test_urls_httpx_refuses_are_400_naming_the_problem(ls, value, problem):
    with pytest.raises(InvalidRequestError) as info:
        client_for(ls).image(value.replace("http://", "http://user:s3cret@"), 1)
    assert (info.value.status_code, info.value.code) == (400, "invalid_request")
    assert "not a usable URL" in info.value.detail and problem in info.value.detail
    assert "s3cret" not in info.value.detail


def test_missing_image_is_404_naming_the_url(ls):
    with pytest.raises(ImageFetchError) as info:
        client_for(ls).image(f"{ls.url}/public/missing.png")
    assert info.value.status_code == 404 and "missing.png" in info.value.detail


def test_unreachable_server_is_502():
    client = LabelStudioClient(LabelStudioAuth("http://127.0.0.1:9"), DownloadLimits(timeout_s=1))
    with pytest.raises(ImageFetchError) as info:
        client.image("http://127.0.0.1:9/a.png")
    assert info.value.status_code == 502


def test_download_over_the_byte_limit_is_413(ls):
    with pytest.raises(ImageTooLargeError, match="IMAGE_MAX_BYTES") as info:
        client_for(ls, max_bytes=100).image(f"{ls.url}/public/scene.png")
    assert info.value.status_code == 413


def test_images_over_the_pixel_limit_are_refused(ls):
    with pytest.raises(ImageTooLargeError, match="80x60"):
        client_for(ls, max_pixels=4000).image(f"{ls.url}/public/scene.png")


@pytest.mark.parametrize("where", ["not-found", "unreachable"])
def test_file_errors_do_not_echo_credentials_in_the_url(ls, where):
    # Label Studio elsewhere: on its own origin such a URL is refused before any request.
    host = ls.url.removeprefix("http://") if where == "not-found" else "127.0.0.1:9"
    client = LabelStudioClient(LabelStudioAuth(LS_URL), DownloadLimits(timeout_s=2.0))
    with pytest.raises(ImageFetchError) as info:
        client.image(f"http://admin:s3cret@{host}/public/missing.png?X-Amz-Signature=abc")
    assert f"http://{host}/public/missing.png" in info.value.detail
    assert "s3cret" not in info.value.detail and "admin" not in info.value.detail


def test_unreachable_label_studio_error_hides_its_credentials():
    token = fake_jwt({"token_type": "refresh", "exp": 2e9})
    client = LabelStudioClient(LabelStudioAuth("http://admin:s3cret@127.0.0.1:9", token))
    with pytest.raises(ImageFetchError) as info:
        client.image("/data/upload/1/scene.png")
    assert "127.0.0.1:9" in info.value.detail and "s3cret" not in info.value.detail


# --- one deadline per request, from connecting to the last byte --------------------------------


def assert_times_out_after(deadline_s: float, request, error=ImageFetchError) -> Exception:
    """``request()`` fails with a "timed out" ``error`` at the deadline (within 0.5 s)."""
    started = time.monotonic()
    with pytest.raises(error, match="timed out after") as info:
        request()
    elapsed = time.monotonic() - started
    assert deadline_s - 0.05 <= elapsed < deadline_s + 0.5, elapsed
    return info.value


def test_slow_server_times_out_with_504(ls):
    ls.slow_s = 2.0
    client = client_for(ls, timeout_s=0.3)
    timed_out = assert_times_out_after(0.3, lambda: client.image(f"{ls.url}/slow/scene.png"))
    assert (timed_out.status_code, timed_out.code) == (504, "image_fetch_timeout")


def test_a_body_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline(ls):
    client = client_for(ls, timeout_s=1.0)
    assert_times_out_after(1.0, lambda: client.image(f"{ls.url}/trickle-body/scene.png"))


def test_headers_trickled_a_byte_at_a_time_are_cut_off_at_the_deadline(ls):
    client = client_for(ls, timeout_s=1.0)
    assert_times_out_after(1.0, lambda: client.image(f"{ls.url}/trickle-headers/scene.png"))


def test_a_second_download_over_the_same_client_has_a_deadline_too(ls):
    client = client_for(ls, timeout_s=1.0)
    client.image(f"{ls.url}/public/scene.png")  # a connection that could be kept alive
    assert_times_out_after(1.0, lambda: client.image(f"{ls.url}/trickle-body/scene.png"))


def test_the_token_exchange_counts_against_the_deadline():
    with FakeLabelStudio() as slow_ls:
        slow_ls.trickle_refresh = True
        client = client_for(slow_ls, slow_ls.pat, timeout_s=1.0)
        assert_times_out_after(1.0, lambda: client.image("/data/upload/1/scene.png"))


def test_an_api_request_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline(ls, monkeypatch):
    monkeypatch.setattr(ls, "trickle_api", True)
    client = client_for(ls, ls.legacy_token, timeout_s=1.0)
    assert client.sdk is not None  # the SDK imported (over a second) before the clock starts
    assert_times_out_after(1.0, lambda: client.tasks(7), LabelStudioError)


# --- the API ----------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [LEGACY_TOKEN, "pat"], ids=["legacy", "pat"])
def test_api_calls_carry_only_our_authorization(token):
    fake = FakeLabelStudioAPI(
        [task(1, "/data/upload/7/a.png", [])], {}, pat() if token == "pat" else token
    )
    client = api_client(fake)
    assert client.project(7)["label_config"].startswith("<View>")
    assert [t["id"] for t in client.tasks(7)] == [1]
    # Never the SDK's own header: each request had the scheme of our token, and nothing else.
    assert set(fake.seen_auth) == {"Bearer" if token == "pat" else "Token"}


def test_an_api_call_refused_with_401_is_retried_once_with_a_fresh_access_token():
    fake = FakeLabelStudioAPI([], {}, token=pat())
    client = api_client(fake)
    client.project(7)
    fake.forget_access_tokens()
    assert client.project(7)["id"] == 7
    assert fake.refreshes == 2


def test_a_wrong_token_is_a_clear_error_without_the_token():
    fake = FakeLabelStudioAPI([], {}, token="right-token-0000")
    with pytest.raises(LabelStudioError, match="HTTP 401 for project 7") as info:
        api_client(fake, "wrong-token-1111").project(7)
    assert "wrong-token-1111" not in info.value.detail


def test_tasks_are_listed_page_by_page_until_the_last(monkeypatch):
    monkeypatch.setattr(labelstudio.client, "PAGE_SIZE", 2)
    fake = FakeLabelStudioAPI([task(i, f"/data/upload/7/{i}.png", []) for i in range(5)], {})
    assert [t["id"] for t in api_client(fake).tasks(7)] == [0, 1, 2, 3, 4]
    assert fake.paths.count("/api/tasks/") == 3


def test_a_page_past_the_end_ends_the_listing(monkeypatch):
    # Label Studio answers 404 for it (asked for when its total counts tasks not listed).
    monkeypatch.setattr(labelstudio.client, "PAGE_SIZE", 2)
    fake = FakeLabelStudioAPI([task(i, f"/data/upload/7/{i}.png", []) for i in range(4)], {})
    fake.reported_total = 10
    assert len(api_client(fake).tasks(7)) == 4
    assert fake.paths.count("/api/tasks/") == 3


def test_tasks_keep_label_studio_s_json_as_it_came():
    result = {"id": "r1", "type": "brushlabels", "value": {"format": "rle", "rle": [1, 2]}}
    listed = task(3, "/data/upload/7/a.png", [result], updated_at="2026-01-01T00:00:00Z")
    (got,) = api_client(FakeLabelStudioAPI([listed], {})).tasks(7)
    assert got["annotations"][0]["result"] == [result]
    assert got["annotations"][0]["updated_at"] == "2026-01-01T00:00:00Z"
    assert got["data"] == {"image": "/data/upload/7/a.png"}


def test_a_missing_project_is_an_error_naming_it():
    with pytest.raises(LabelStudioError, match="HTTP 404 for project 8"):
        api_client(FakeLabelStudioAPI([], {})).project(8)


def test_the_export_is_the_list_of_tasks():
    tasks = [task(1, "/data/upload/7/a.png", [])]
    assert api_client(FakeLabelStudioAPI(tasks, {})).export(7) == tasks


def test_users_are_named_by_email_or_id():
    assert api_client(FakeLabelStudioAPI([], {})).users() == {1: "admin@example.com", 2: "user2"}
