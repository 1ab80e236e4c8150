"""Task images, fetched through the Label Studio adapter, decoded and cached: for the web
process and the box-conversion jobs.

``ImageLoader.load`` resolves a task's image field (``labelstudio.download.resolve_image_url``),
downloads it (``labelstudio.client.LabelStudioClient.fetch``: credentials, deadline, byte limit)
and decodes it within the decode budget (``labelstudio.images``). Decoded images are kept by
content hash, bounded in bytes, and a URL maps to its content for ``IMAGE_URL_TTL_S`` seconds:
an annotator's clicks on one task download and decode its image once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from labelstudio.auth import LabelStudioAuth
from labelstudio.client import LabelStudioClient
from labelstudio.download import display_url, resolve_image_url
from labelstudio.images import DecodeBudget, decode_image
from runtime.settings import Settings

logger = logging.getLogger(__name__)

MAX_CACHED_URLS = 4096  # URL -> content entries kept at most


@dataclass(frozen=True)
class LoadedImage:
    """A decoded task image as the browser shows it: ``rgb`` (H, W, 3) uint8, EXIF applied."""

    rgb: np.ndarray
    sha256: str  # of the downloaded bytes

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


class _ImageCache:
    """LRU of decoded images keyed by content hash, bounded in bytes; URL -> hash with a TTL."""

    def __init__(self, max_bytes: int, url_ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.url_ttl_s = url_ttl_s
        self._images: OrderedDict[str, LoadedImage] = OrderedDict()
        self._urls: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def by_url(self, url: str) -> LoadedImage | None:
        with self._lock:
            entry = self._urls.get(url)
            if entry is None or entry[1] < time.monotonic():
                return None
            return self._get(entry[0])

    def by_hash(self, sha256: str) -> LoadedImage | None:
        with self._lock:
            return self._get(sha256)

    def _get(self, sha256: str) -> LoadedImage | None:
        image = self._images.get(sha256)
        if image is not None:
            self._images.move_to_end(sha256)
        return image

    def put(self, url: str, image: LoadedImage) -> None:
        with self._lock:
            if self.url_ttl_s > 0:
                self._urls[url] = (image.sha256, time.monotonic() + self.url_ttl_s)
                self._urls.move_to_end(url)
                while len(self._urls) > MAX_CACHED_URLS:
                    self._urls.popitem(last=False)
            size = image.rgb.nbytes
            if image.sha256 in self._images or size > self.max_bytes:
                return
            self._images[image.sha256] = image
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._images.popitem(last=False)
                self._bytes -= old.rgb.nbytes


class ImageLoader:
    """Fetch, decode and cache task images (thread-safe; one per app)."""

    def __init__(self, settings: Settings, auth: LabelStudioAuth) -> None:
        self.settings = settings
        self.client = LabelStudioClient(auth, settings.download_limits)
        self._cache = _ImageCache(settings.image_cache_mb * 1024 * 1024, settings.image_url_ttl_s)
        self.decode_budget = DecodeBudget(
            settings.image_decode_concurrency,
            settings.image_decode_budget_mb * 1024 * 1024,
            settings.image_decode_wait_s,
        )

    def close(self) -> None:
        self.client.close()

    def load(self, value: str, task_id: int | None = None) -> LoadedImage:
        """The decoded image a task's data field points to (cached by URL and by content)."""
        url, send_auth = resolve_image_url(value, task_id, self.client.base_url)
        cached = self._cache.by_url(url)
        if cached is not None:
            return cached
        data = self.client.fetch(url, send_auth)
        sha256 = hashlib.sha256(data).hexdigest()
        image = self._cache.by_hash(sha256)
        if image is None:
            started = time.perf_counter()
            rgb = decode_image(data, self.settings.image_max_pixels, self.decode_budget)
            image = LoadedImage(rgb, sha256)
            logger.info(
                "decoded image %s (%dx%d) in %.0f ms",
                display_url(url),
                image.width,
                image.height,
                (time.perf_counter() - started) * 1000,
            )
        self._cache.put(url, image)
        return image
