"""Fetching task images from a real loopback server: auth, errors, EXIF, size limits, caching."""

from __future__ import annotations

import io
import logging
import math
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from backend_support import (
    NO_ACCESS_TOKEN_ANSWERS,
    FakeLabelStudio,
    fake_jwt,
    png_bytes,
    scene,
)
from peak_rss import needs_proc, peak_rss_of_decoding
from PIL import Image, ImageFile, ImageOps
from pydantic import SecretStr

from labelstudio.errors import (
    ImageDecodeBusyError,
    ImageDecodeError,
    ImageFetchError,
    ImageTooLargeError,
    InvalidRequestError,
)
from labelstudio.images import (
    DecodeBudget,
    ImageLoader,
    LabelStudioAuth,
    deadline_client,
    decode_image,
    decode_peak_bytes,
    display_url,
    resolve_image_url,
)
from runtime.logs import redact
from runtime.settings import Settings


@pytest.fixture(scope="module")
def ls():
    with FakeLabelStudio() as server:
        image, _ = scene(60, 80)
        server.files["scene.png"] = png_bytes(image)
        yield server


def loader_for(ls: FakeLabelStudio, **overrides) -> ImageLoader:
    settings = Settings(label_studio_url=ls.url, **overrides)
    return ImageLoader(settings, LabelStudioAuth(settings))


# --- URL resolution ---------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("value", "problem"),
    [("http://[bad/a.png", "Invalid IPv6 URL"), ("http://host:abc/a.png", "Port")],
    ids=["unbalanced-bracket", "port-not-a-number"],
)
def test_urls_python_cannot_parse_are_400_naming_the_problem(ls, value, problem):
    with pytest.raises(InvalidRequestError) as info:
        loader_for(ls).load(value, 1)
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
        loader_for(ls).load(value.replace("http://", "http://user:s3cret@"), 1)
    assert (info.value.status_code, info.value.code) == (400, "invalid_request")
    assert "not a usable URL" in info.value.detail and problem in info.value.detail
    assert "s3cret" not in info.value.detail


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


# --- fetching ---------------------------------------------------------------------------------


def test_public_image_is_fetched_and_decoded(ls):
    image = loader_for(ls).load(f"{ls.url}/public/scene.png")
    assert image.rgb.shape == (60, 80, 3) and image.rgb.dtype == np.uint8
    assert (image.width, image.height) == (80, 60)


def test_legacy_token_from_setup_is_sent_as_token_header(ls):
    loader = loader_for(ls, label_studio_trust_setup=True)
    with pytest.raises(ImageFetchError) as info:
        loader.load("/data/upload/1/scene.png")
    assert info.value.code == "image_fetch_unauthorized" and info.value.status_code == 502
    assert "LABEL_STUDIO_API_KEY" in info.value.detail
    loader.auth.update_from_setup(None, ls.legacy_token)
    assert loader.load("/data/upload/1/scene.png").rgb.shape == (60, 80, 3)
    assert ls.auth_headers[-1] == f"Token {ls.legacy_token}"


def test_legacy_api_key_from_settings_is_sent_as_token_header(ls):
    loader = loader_for(ls, label_studio_api_key=SecretStr(ls.legacy_token))
    assert loader.load("/data/upload/2/scene.png").height == 60


def test_personal_access_token_is_exchanged_once_and_cached(ls):
    loader = loader_for(ls, label_studio_api_key=SecretStr(ls.pat), image_url_ttl_s=0)
    before = ls.refreshes
    loader.load("/data/upload/1/scene.png")
    loader.load("/data/upload/1/scene.png")
    assert ls.refreshes == before + 1
    assert ls.auth_headers[-1].startswith("Bearer ") and ls.auth_headers[-1] != f"Bearer {ls.pat}"


def test_expired_access_token_is_refreshed_after_a_401(ls):
    loader = loader_for(ls, label_studio_api_key=SecretStr(ls.pat), image_url_ttl_s=0)
    loader.load("/data/upload/1/scene.png")
    ls.access_tokens.clear()  # the server forgets it, as after 5 minutes
    before = ls.refreshes
    assert loader.load("/data/upload/1/scene.png").width == 80
    assert ls.refreshes == before + 1


def test_a_rejected_personal_access_token_is_a_clear_error(ls):
    bad = fake_jwt({"token_type": "refresh", "exp": time.time() + 60, "x": "wrong"})
    loader = loader_for(ls, label_studio_api_key=SecretStr(bad))
    with pytest.raises(ImageFetchError, match="refused the personal access token"):
        loader.load("/data/upload/1/scene.png")


def label_studio_answering_the_exchange(
    answer: httpx.Response,
) -> tuple[LabelStudioAuth, list, httpx.Client]:
    """A ``LabelStudioAuth`` with a PAT, and the requests its Label Studio (``answer``) saw."""
    settings = Settings(
        label_studio_url="http://ls.test:8080",
        label_studio_api_key=SecretStr(fake_jwt({"token_type": "refresh", "exp": 1e10})),
    )
    seen: list[httpx.Request] = []

    def label_studio(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer

    return (
        LabelStudioAuth(settings),
        seen,
        deadline_client(5.0, httpx.MockTransport(label_studio)),  # follows redirects
    )


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_the_token_exchange_does_not_follow_a_redirect(status):
    answer = httpx.Response(status, headers={"Location": "http://elsewhere.test/steal"})
    auth, seen, client = label_studio_answering_the_exchange(answer)
    with pytest.raises(ImageFetchError, match=f"HTTP {status}"):
        auth.headers(client)
    assert [request.url.host for request in seen] == ["ls.test"]


@pytest.mark.parametrize("kind", NO_ACCESS_TOKEN_ANSWERS)
def test_a_token_exchange_answer_without_an_access_token_is_502(kind):
    auth, _, client = label_studio_answering_the_exchange(NO_ACCESS_TOKEN_ANSWERS[kind]())
    with pytest.raises(ImageFetchError, match="without an access token") as info:
        auth.headers(client)
    assert info.value.status_code == 502


def test_missing_image_is_404_naming_the_url(ls):
    with pytest.raises(ImageFetchError) as info:
        loader_for(ls).load(f"{ls.url}/public/missing.png")
    assert info.value.status_code == 404 and "missing.png" in info.value.detail


def test_slow_server_times_out_with_504(ls):
    ls.slow_s = 2.0
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as info:
        loader_for(ls, image_fetch_timeout_s=0.3).load(f"{ls.url}/slow/scene.png")
    assert info.value.status_code == 504 and "timed out" in info.value.detail
    assert time.monotonic() - started < 1.5


def assert_times_out_after(deadline_s: float, load) -> None:
    """``load()`` fails with 504 ``image_fetch_timeout`` at the deadline (within 0.5 s)."""
    started = time.monotonic()
    with pytest.raises(ImageFetchError) as info:
        load()
    elapsed = time.monotonic() - started
    assert (info.value.status_code, info.value.code) == (504, "image_fetch_timeout")
    assert deadline_s - 0.05 <= elapsed < deadline_s + 0.5, elapsed


def test_a_body_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline(ls):
    loader = loader_for(ls, image_fetch_timeout_s=1.0)
    assert_times_out_after(1.0, lambda: loader.load(f"{ls.url}/trickle-body/scene.png"))


def test_headers_trickled_a_byte_at_a_time_are_cut_off_at_the_deadline(ls):
    loader = loader_for(ls, image_fetch_timeout_s=1.0)
    assert_times_out_after(1.0, lambda: loader.load(f"{ls.url}/trickle-headers/scene.png"))


def test_a_second_download_over_the_same_server_has_a_deadline_too(ls):
    loader = loader_for(ls, image_fetch_timeout_s=1.0, image_url_ttl_s=0)
    loader.load(f"{ls.url}/public/scene.png")  # a connection that could be kept alive
    assert_times_out_after(1.0, lambda: loader.load(f"{ls.url}/trickle-body/scene.png"))


def test_the_token_exchange_counts_against_the_deadline():
    with FakeLabelStudio() as slow_ls:
        slow_ls.trickle_refresh = True
        loader = loader_for(
            slow_ls, label_studio_api_key=SecretStr(slow_ls.pat), image_fetch_timeout_s=1.0
        )
        assert_times_out_after(1.0, lambda: loader.load("/data/upload/1/scene.png"))


def test_unreachable_server_is_502():
    settings = Settings(label_studio_url="http://127.0.0.1:9", image_fetch_timeout_s=1)
    with pytest.raises(ImageFetchError) as info:
        ImageLoader(settings, LabelStudioAuth(settings)).load("http://127.0.0.1:9/a.png")
    assert info.value.status_code == 502


def test_download_over_the_byte_limit_is_413(ls):
    with pytest.raises(ImageTooLargeError, match="IMAGE_MAX_BYTES"):
        loader_for(ls, image_max_bytes=100).load(f"{ls.url}/public/scene.png")


def test_images_are_cached_by_url_and_by_content(ls):
    ls.files["copy.png"] = ls.files["scene.png"]
    loader = loader_for(ls)
    first = loader.load(f"{ls.url}/public/scene.png")
    count = ls.requests["/public/scene.png"]
    again = loader.load(f"{ls.url}/public/scene.png")
    assert again is first and ls.requests["/public/scene.png"] == count  # no new download
    copy = loader.load(f"{ls.url}/public/copy.png")
    assert copy is first  # same bytes, decoded once


def test_tokens_never_reach_the_log(ls, caplog):
    caplog.set_level(logging.DEBUG)
    loader = loader_for(ls, label_studio_api_key=SecretStr(ls.pat), image_url_ttl_s=0)
    loader.load("/data/upload/1/scene.png")
    with pytest.raises(ImageFetchError):
        loader.load(f"{ls.url}/public/missing.png")
    assert ls.pat not in caplog.text
    assert not any(token in caplog.text for token in ls.access_tokens)


def test_credentials_in_an_image_url_reach_neither_the_log_nor_the_error(ls, caplog):
    caplog.set_level(logging.DEBUG, logger="labelstudio")
    loader = loader_for(ls, image_url_ttl_s=0)
    # Another origin than Label Studio's (localhost, not 127.0.0.1): on Label Studio's own
    # origin such a URL is refused (the next test).
    with_password = ls.url.replace("http://127.0.0.1", "http://user:s3cret@localhost")
    loader.load(f"{with_password}/public/scene.png")
    with pytest.raises(ImageFetchError) as info:
        loader.load(f"{with_password}/public/missing.png")
    assert "missing.png" in info.value.detail and "s3cret" not in info.value.detail
    assert "scene.png" in caplog.text and "s3cret" not in caplog.text


def test_an_image_url_with_credentials_on_label_studio_s_origin_is_refused(ls):
    # httpx would send them as its own Authorization in place of our token, and Label
    # Studio's 401 would look like a refusal of that token (which then gets swapped out).
    loader = loader_for(ls, image_url_ttl_s=0, label_studio_api_key=SecretStr(ls.legacy_token))
    before = len(ls.auth_headers)
    with pytest.raises(InvalidRequestError, match="carries credentials"):
        loader.load(ls.url.replace("http://", "http://x@") + "/data/upload/1/scene.png")
    assert len(ls.auth_headers) == before  # nothing was sent


def test_unreachable_label_studio_error_hides_its_credentials():
    settings = Settings(
        label_studio_url="http://admin:s3cret@127.0.0.1:9",
        label_studio_api_key=SecretStr(fake_jwt({"token_type": "refresh", "exp": 2e9})),
    )
    loader = ImageLoader(settings, LabelStudioAuth(settings))
    with pytest.raises(ImageFetchError) as info:
        loader.load("/data/upload/1/scene.png")
    assert "127.0.0.1:9" in info.value.detail and "s3cret" not in info.value.detail


def test_redact_scrubs_token_looking_strings():
    jwt = fake_jwt({"exp": 1})
    text = redact(f"Authorization: Token abcdef0123456789 and {jwt} and access_token=s3cr3tvalue")
    assert "abcdef0123456789" not in text and jwt not in text and "s3cr3tvalue" not in text
    assert redact("GET /data/upload/1/a.png 200") == "GET /data/upload/1/a.png 200"


# --- decoding ---------------------------------------------------------------------------------


def test_exif_orientation_is_applied_like_the_browser():
    stored = np.zeros((20, 40, 3), np.uint8)  # landscape as stored
    stored[:, :10] = 255  # left strip bright
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", exif=exif, quality=95)
    shown = decode_image(buffer.getvalue(), max_pixels=10_000)
    assert shown.shape == (40, 20, 3)  # portrait, as the browser shows it
    assert shown[:10].mean() > 200 and shown[-10:].mean() < 50  # the strip is now on top


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_shown_as_pillow_transposes_it(orientation):
    stored = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG", exif=exif)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    shown = decode_image(buffer.getvalue(), max_pixels=10_000)
    assert np.array_equal(shown, expected) and shown.flags.c_contiguous and shown.flags.writeable


@needs_proc
@pytest.mark.parametrize(("mode", "stored_bytes"), [("1", 1), ("RGB", 4)])
def test_decoding_holds_only_the_decoded_image_the_result_and_a_few_bands(
    tmp_path, mode, stored_bytes
):
    side = 4000
    Image.new(mode, (side, side)).save(tmp_path / "image.png")
    peak = peak_rss_of_decoding(tmp_path / "image.png")
    # Pillow's decoded copy + the (H, W, 3) result: was 12 (1-bit) or 18 (RGB) bytes a pixel.
    assert peak < (stored_bytes + 3) * side * side + 24 * 1024 * 1024


@needs_proc
@pytest.mark.parametrize(
    ("mode", "image_format", "side"),
    [("1", "PNG", 4000), ("I;16", "PNG", 3000), ("F", "TIFF", 3000), ("RGBA", "WEBP", 2000)],
)
def test_the_decode_peak_estimate_bounds_the_measured_peak(tmp_path, mode, image_format, side):
    path = tmp_path / f"image.{image_format.lower()}"
    Image.new(mode, (side, side)).save(path, format=image_format)
    assert peak_rss_of_decoding(path) <= decode_peak_bytes(side, side, mode, image_format)


def png_16_bit(samples: np.ndarray, color_type: int, transparent: int | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16-bit gray only): ``samples`` (H, W) for
    color type 0 (gray; ``transparent``: the gray value a tRNS chunk makes transparent) or
    (H, W, 2) for 4 (gray + alpha)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    trns = chunk(b"tRNS", struct.pack(">H", transparent)) if transparent is not None else b""
    idat = chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + trns + idat + chunk(b"IEND", b"")


SAMPLES_16 = np.array([[0, 257, 30000, 65535]], np.uint16)  # shown as 0, 1, 117, 255
SHOWN_8 = np.array([[0, 1, 117, 255]], np.uint8)


@pytest.mark.parametrize(
    "data",
    [
        png_16_bit(SAMPLES_16, 0),
        png_16_bit(SAMPLES_16, 0, transparent=257),
        png_16_bit(np.stack([SAMPLES_16, np.full_like(SAMPLES_16, 65535)], -1), 4),
    ],
    ids=["gray", "gray-with-transparent-value", "gray-and-alpha"],
)
def test_16_bit_grayscale_pngs_are_scaled_to_8_bits_not_clipped(data):
    shown = decode_image(data, max_pixels=100)
    assert np.array_equal(shown, np.repeat(SHOWN_8[..., None], 3, axis=2))


@pytest.mark.parametrize("dtype", [np.int32, np.float32], ids=["I", "F"])
def test_32_bit_integer_and_float_images_are_read_as_16_bit(dtype):
    buffer = io.BytesIO()
    Image.fromarray(SAMPLES_16.astype(dtype)).save(buffer, format="TIFF")
    assert np.array_equal(decode_image(buffer.getvalue(), 100)[..., 0], SHOWN_8)


def test_float_images_within_0_to_1_are_scaled_by_255():
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(buffer, format="TIFF")
    assert decode_image(buffer.getvalue(), 100)[0, :, 0].tolist() == [0, 128, 255]


# --- decoding, bounded ------------------------------------------------------------------------


@pytest.fixture
def decodes(monkeypatch):
    """Records each image decode (Pillow's first ``load``) as (width, started, ended); a decode
    lasts at least 0.1 s so that decodes allowed to overlap do."""
    spans: list[tuple[int, float, float]] = []
    pillow_load = ImageFile.ImageFile.load

    def load(self):
        if not self.tile:  # decoded already
            return pillow_load(self)
        started = time.monotonic()
        time.sleep(0.1)
        pixels = pillow_load(self)
        spans.append((self.size[0], started, time.monotonic()))
        return pixels

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return spans


def overlapping(spans, width=None) -> list:
    """The pairs of ``spans`` that ran at the same time (one of them ``width`` wide, if given)."""
    return [
        (a, b)
        for i, a in enumerate(spans)
        for b in spans[i + 1 :]
        if a[1] < b[2] and b[1] < a[2] and width in (None, a[0], b[0])
    ]


def load_all(loader: ImageLoader, urls: list[str]) -> list:
    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(loader.load, urls))


def distinct_images(ls: FakeLabelStudio, count: int, height: int, width: int) -> list[str]:
    """URLs of ``count`` different ``height`` x ``width`` PNGs on ``ls``."""
    for i in range(count):
        image, _ = scene(height, width)
        image[0, 0] = i  # different bytes: not one decode shared through the cache
        ls.files[f"distinct-{width}-{i}.png"] = png_bytes(image)
    return [f"{ls.url}/public/distinct-{width}-{i}.png" for i in range(count)]


def test_with_one_decode_slot_decodes_never_overlap(ls, decodes):
    loader = loader_for(ls, image_decode_concurrency=1)
    images = load_all(loader, distinct_images(ls, 4, 60, 81))
    assert len({image.sha256 for image in images}) == 4 and len(decodes) == 4
    assert overlapping(decodes) == []


def test_decodes_within_the_slots_and_the_budget_run_at_the_same_time(ls, monkeypatch):
    both_decoding = threading.Barrier(2, timeout=5)  # broken unless two decodes meet
    pillow_load = ImageFile.ImageFile.load

    def load(self):
        if self.tile:
            both_decoding.wait()
        return pillow_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    loader = loader_for(ls, image_decode_concurrency=2)
    assert len(load_all(loader, distinct_images(ls, 2, 60, 82))) == 2


def test_decodes_whose_peaks_together_exceed_the_budget_run_one_at_a_time(ls, decodes):
    peak = decode_peak_bytes(500, 400, "RGB", "PNG")
    budget_mb = math.ceil(1.5 * peak / 2**20)  # room for one, not two
    loader = loader_for(ls, image_decode_concurrency=4, image_decode_budget_mb=budget_mb)
    assert len(load_all(loader, distinct_images(ls, 3, 400, 500))) == 3
    assert overlapping(decodes) == []


def test_an_image_over_the_whole_budget_is_decoded_alone(ls, decodes):
    assert (
        decode_peak_bytes(600, 500, "RGB", "PNG")
        > 2**20
        > 3 * decode_peak_bytes(83, 60, "RGB", "PNG")
    )
    loader = loader_for(ls, image_decode_concurrency=4, image_decode_budget_mb=1)
    urls = distinct_images(ls, 1, 500, 600) + distinct_images(ls, 3, 60, 83)
    assert [image.width for image in load_all(loader, urls)] == [600, 83, 83, 83]
    assert overlapping(decodes, width=600) == []


def test_a_decode_that_gets_no_budget_in_time_is_refused_with_503():
    budget = DecodeBudget(max_decodes=1, max_bytes=2**30, wait_s=0.2)
    data = png_bytes(scene(60, 80)[0])
    started = time.monotonic()
    with budget.reserve(0), pytest.raises(ImageDecodeBusyError) as info:
        decode_image(data, 1_000_000, budget)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert (info.value.status_code, info.value.code) == (503, "image_decode_busy")
    assert decode_image(data, 1_000_000, budget).shape == (60, 80, 3)  # the slot is free again


def test_corrupt_bytes_are_unreadable():
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(b"<html>login page</html>", 1_000_000)


def dds_header(pixel_format_flags: int) -> bytes:
    """A 128-byte DDS file header (magic, header size 124, 8x8) with these pixel-format flags."""
    header = struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44)
    pixel_format = struct.pack("<2I", 32, pixel_format_flags) + bytes(24)
    return b"DDS " + header + pixel_format + bytes(20)


def test_an_image_format_pillow_does_not_implement_is_unreadable():
    assert len(dds_header(0)) == 128
    with pytest.raises(ImageDecodeError, match="pixel format"):
        decode_image(dds_header(0), 1_000_000)


@pytest.mark.parametrize("error", [TypeError, OverflowError])
def test_pillow_type_and_overflow_errors_while_decoding_are_unreadable(monkeypatch, error):
    # What Pillow raises reading some mutated TIFF tags; raised here from load().
    def broken_load(self):
        raise error("mutated tag")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(ImageDecodeError, match="mutated tag"):
        decode_image(png_bytes(np.zeros((8, 8), np.uint8)), 1_000_000)


def test_truncated_image_is_unreadable():
    data = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], 1_000_000)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    big = png_bytes(np.zeros((1200, 1000), np.uint8))
    with pytest.raises(ImageTooLargeError, match="1000x1200"):
        decode_image(big, max_pixels=1_000_000)
    # Only the header is there: a 413, not a decode error, proves nothing was decoded.
    with pytest.raises(ImageTooLargeError):
        decode_image(big[:200], max_pixels=1_000_000)
    assert decode_image(big, max_pixels=1_200_000).shape == (1200, 1000, 3)


def test_the_logging_filter_scrubs_records_before_any_handler():
    from runtime.logs import RedactingFilter

    record = logging.LogRecord(
        "backend", logging.INFO, __file__, 1, "got %s", ("Bearer abcdefabcdef1234",), None
    )
    assert RedactingFilter().filter(record)
    assert "abcdefabcdef1234" not in record.getMessage()


def test_an_access_token_jwt_is_sent_as_bearer_without_exchange(ls):
    access = fake_jwt({"token_type": "access", "exp": time.time() + 300})
    ls.access_tokens.add(access)
    loader = loader_for(ls, image_url_ttl_s=0, label_studio_trust_setup=True)
    loader.auth.update_from_setup(None, access)
    before = ls.refreshes
    assert loader.load("/data/upload/1/scene.png").width == 80
    assert ls.refreshes == before and ls.auth_headers[-1] == f"Bearer {access}"
