"""The web process's task images (``runtime.image_cache``): fetched through the Label Studio
adapter from a real loopback server, cached by URL and by content, decoded within the budget."""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from backend_support import FakeLabelStudio, fake_jwt, png_bytes, scene
from PIL import ImageFile

from labelstudio.auth import LabelStudioAuth
from labelstudio.errors import ImageFetchError, ImageTooLargeError
from labelstudio.images import decode_peak_bytes
from runtime.image_cache import ImageLoader
from runtime.logs import redact
from runtime.settings import Settings


@pytest.fixture(scope="module")
def ls():
    with FakeLabelStudio.serving_a_scene() as server:
        yield server


def loader_for(ls: FakeLabelStudio, **overrides) -> ImageLoader:
    settings = Settings(label_studio_url=ls.url, **overrides)
    return ImageLoader(settings, LabelStudioAuth(ls.url))


def test_public_image_is_fetched_and_decoded(ls):
    image = loader_for(ls).load(f"{ls.url}/public/scene.png")
    assert image.rgb.shape == (60, 80, 3) and image.rgb.dtype == np.uint8
    assert (image.width, image.height) == (80, 60)


def test_images_are_cached_by_url_and_by_content(ls):
    ls.files["copy.png"] = ls.files["scene.png"]
    loader = loader_for(ls)
    first = loader.load(f"{ls.url}/public/scene.png")
    count = ls.requests["/public/scene.png"]
    again = loader.load(f"{ls.url}/public/scene.png")
    assert again is first and ls.requests["/public/scene.png"] == count  # no new download
    copy = loader.load(f"{ls.url}/public/copy.png")
    assert copy is first  # same bytes, decoded once


def test_credentials_in_an_image_url_reach_neither_the_log_nor_the_error(ls, caplog):
    caplog.set_level(logging.DEBUG, logger="runtime")
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


@pytest.mark.parametrize(
    ("setting", "path", "error", "message"),
    [
        ({"image_fetch_timeout_s": 0.3}, "trickle-body", ImageFetchError, r"after 0\.3 s"),
        ({"image_max_bytes": 100}, "public", ImageTooLargeError, "IMAGE_MAX_BYTES=100"),
        ({"image_max_pixels": 4000}, "public", ImageTooLargeError, "80x60"),
    ],
    ids=["IMAGE_FETCH_TIMEOUT_S", "IMAGE_MAX_BYTES", "IMAGE_MAX_PIXELS"],
)
def test_the_image_settings_limit_each_download(ls, setting, path, error, message):
    with pytest.raises(error, match=message):
        loader_for(ls, image_url_ttl_s=0, **setting).load(f"{ls.url}/{path}/scene.png")


def test_redact_scrubs_token_looking_strings():
    jwt = fake_jwt({"exp": 1})
    text = redact(f"Authorization: Token abcdef0123456789 and {jwt} and access_token=s3cr3tvalue")
    assert "abcdef0123456789" not in text and jwt not in text and "s3cr3tvalue" not in text
    assert redact("GET /data/upload/1/a.png 200") == "GET /data/upload/1/a.png 200"


def test_the_logging_filter_scrubs_records_before_any_handler():
    from runtime.logs import RedactingFilter

    record = logging.LogRecord(
        "backend", logging.INFO, __file__, 1, "got %s", ("Bearer abcdefabcdef1234",), None
    )
    assert RedactingFilter().filter(record)
    assert "abcdefabcdef1234" not in record.getMessage()


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
