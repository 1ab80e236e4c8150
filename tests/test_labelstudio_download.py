"""Resolving a task's file reference to a URL, and showing URLs without their secrets."""

from __future__ import annotations

import pytest

from labelstudio.download import display_url, resolve_image_url
from labelstudio.errors import InvalidRequestError


def test_relative_urls_resolve_against_label_studio_with_credentials():
    url, auth = resolve_image_url("/data/upload/3/a.png", 7, "http://ls:8080")
    assert (url, auth) == ("http://ls:8080/data/upload/3/a.png", True)
    url, auth = resolve_image_url("/data/local-files/?d=imgs/a.jpg", 7, "http://ls:8080")
    assert url == "http://ls:8080/data/local-files/?d=imgs/a.jpg" and auth


def test_cloud_uris_go_through_the_tasks_presign_endpoint():
    url, auth = resolve_image_url("s3://bucket/a.jpg", 12, "http://ls:8080")
    assert url == "http://ls:8080/tasks/12/presign/?fileuri=czM6Ly9idWNrZXQvYS5qcGc=" and auth


def test_plain_urls_get_credentials_only_on_the_label_studio_origin():
    assert resolve_image_url("https://cdn.example/a.png", 1, "http://ls:8080") == (
        "https://cdn.example/a.png",
        False,
    )
    assert resolve_image_url("http://ls:8080/data/upload/1/a.png", 1, "http://ls:8080")[1]


@pytest.mark.parametrize(
    ("value", "base", "message"),
    [
        ("/data/upload/1/a.png", "", "LABEL_STUDIO_URL"),
        ("s3://b/a.png", "http://ls", None),
        ("ftp://host/a.png", "http://ls", "unsupported"),
        ("", "http://ls", "empty"),
    ],
)
def test_unusable_urls_are_request_errors(value, base, message):
    task_id = None if value.startswith("s3") else 1
    with pytest.raises(InvalidRequestError, match=message or "task id"):
        resolve_image_url(value, task_id, base)


def test_display_url_drops_user_password_query_and_fragment():
    assert display_url("https://user:s3cret@cdn.example:8443/a.png?X-Sig=abc#top") == (
        "https://cdn.example:8443/a.png"
    )


def test_display_url_keeps_only_the_file_name_of_local_files():
    url = "http://admin:s3cret@ls:8080/data/local-files/?d=imgs/a.jpg&token=abc"
    assert display_url(url) == "http://ls:8080/data/local-files/?d=imgs/a.jpg"


@pytest.mark.parametrize(
    ("value", "task_id", "shown"),
    [
        ("ftp://user:s3cret@host/a.png", 1, "ftp://host/a.png"),
        ("s3://KEY:s3cret@bucket/a.png", None, "s3://bucket/a.png"),
    ],
)
def test_url_errors_do_not_echo_credentials(value, task_id, shown):
    with pytest.raises(InvalidRequestError) as info:
        resolve_image_url(value, task_id, "http://ls:8080")
    assert shown in info.value.detail and "s3cret" not in info.value.detail
