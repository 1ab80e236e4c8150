"""A byte-capped LRU cache of image embeddings, safe to share between threads.

Keys are ``(encoder identity, image content hash)``: plugins never invalidate an embedding, since
they only act inside the mask decoder. Concurrent requests for the same key compute it once (the
task-open warm-up and the first click often race for the same image). What is kept beside an
embedding (the click loop's ``ClickMemory``) subscribes to evictions with ``on_evict``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ImageEmbedding:
    """One image's encoder output and the geometry needed to map prompts and masks."""

    key: str
    embeddings: torch.Tensor  # (1, 256, S/16, S/16)
    hq_features: torch.Tensor | None  # (1, 32, S/4, S/4) for HQ-SAM, else None
    original_size: tuple[int, int]  # (H, W) of the image as given
    input_size: tuple[int, int]  # (h, w) after resizing the longest side to S
    # PA-SAM's detail tensor [I, ∇I] (1, 4, S/4, S/4) fp16 (+1/8 of the embedding's bytes)
    detail: torch.Tensor | None = None
    # SAM 2: the decoder's high-resolution skip features (1, 32, S/4, S/4), (1, 64, S/8, S/8).
    high_res_features: tuple[torch.Tensor, ...] | None = None

    @property
    def decoder_features(self) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
        """What the model's ``decode`` takes beside the embedding: SAM 2's high-resolution
        features, HQ-SAM's HQ features, or ``None`` (SAM)."""
        return self.high_res_features if self.high_res_features is not None else self.hq_features

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held (what ``EmbeddingCache`` counts against its cap)."""
        tensors = [self.embeddings, self.hq_features, self.detail, *(self.high_res_features or ())]
        return sum(t.nbytes for t in tensors if t is not None)


class EmbeddingCache:
    """LRU over ``ImageEmbedding`` objects, evicting least-recently-used past ``max_bytes``."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self.hits = 0
        self.misses = 0
        self._evict_listeners: list[Callable[[str], None]] = []

    def on_evict(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(key)`` whenever an embedding leaves the cache (evicted or cleared).
        Called with the cache's lock held: it must not call back into the cache."""
        self._evict_listeners.append(listener)

    def _evicted(self, key: str) -> None:
        for listener in self._evict_listeners:
            listener(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            return self._get_locked(key)

    def _get_locked(self, key: str) -> ImageEmbedding | None:
        """The item for ``key`` (marked most recently used, counted as a hit), or ``None``."""
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return item

    def put(self, item: ImageEmbedding) -> None:
        with self._lock:
            self._put_locked(item)

    def _put_locked(self, item: ImageEmbedding) -> None:
        old = self._items.pop(item.key, None)
        if old is not None:
            self._bytes -= old.nbytes  # the same key: the same content and encoder
        if item.nbytes > self.max_bytes:
            return  # larger than the whole cache: serve it, do not keep it
        self._items[item.key] = item
        self._bytes += item.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.nbytes
            self._evicted(evicted.key)

    def get_or_compute(self, key: str, compute: Callable[[], ImageEmbedding]) -> ImageEmbedding:
        """The cached embedding for ``key``, computing it once even under concurrent calls."""
        while True:
            with self._lock:
                item = self._get_locked(key)
                if item is not None:
                    return item
                waiter = self._inflight.get(key)
                if waiter is None:
                    done = threading.Event()
                    self._inflight[key] = done
                    self.misses += 1
                    break
            waiter.wait()  # another thread computes it; then look again
        try:
            item = compute()
            with self._lock:
                self._put_locked(item)
            return item
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            done.set()

    def clear(self) -> None:
        with self._lock:
            keys = list(self._items)
            self._items.clear()
            self._bytes = 0
            for key in keys:
                self._evicted(key)
