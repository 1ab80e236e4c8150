"""Refinement across clicks: the previous answer's low-res logits as the next click's mask prompt.

SAM was trained for an interactive loop: with every new click it also received the low-res
logits of its previous mask as the dense ``mask_input`` prompt (SAM paper §3 and its appendix:
11 rounds per mask, the previous unthresholded logits fed back). A service sees each click as a
separate request carrying every point placed so far, so the loop has to be rebuilt from the
prompts themselves.

``ClickMemory`` remembers the answer to each prompt, per *prompt chain*: the logits of the mask
returned for a prompt are stored under that prompt (and a caller's scope: task, image, label,
model version), and a new prompt looks up the prompt it **extends** (``PromptKey.parent``): the
same box and every point but the last. So:

- one more point (the annotator's next click): refined with the previous answer;
- a point removed: the shorter prompt is looked up as a prompt of its own, so removing the last
  point brings back exactly the answer the annotator had before it, and never reuses the
  answer of the longer prompt;
- a different box, or a first point: nothing to extend, decoded from scratch;
- two annotators on one task keep separate chains: each prompt finds its own parent.

Memory is bounded in bytes (least recently used go first) and an image's entries go when its
embedding leaves the ``EmbeddingCache`` (``forget_image``), since they are only useful with it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

import numpy as np

FirstPrompt = Literal["click", "box"]

# Coordinates are compared after rounding to this many decimals of a pixel: the same click
# resent by the browser converts to the same float, while distinct clicks are pixels apart.
COORD_DECIMALS = 3


@dataclass(frozen=True)
class PromptKey:
    """A prompt as a hashable value: the box (xyxy, pixels of the original image) or None, and
    the points in the order they were placed, each ``(x, y, label)`` with label 1 = positive."""

    box: tuple[float, float, float, float] | None
    points: tuple[tuple[float, float, int], ...]

    @classmethod
    def of(
        cls,
        points_xy: np.ndarray | None,
        point_labels: np.ndarray | None,
        box_xyxy: np.ndarray | None,
    ) -> PromptKey:
        """The key of a prompt as the predictor takes it: points (N, 2), labels (N,), box (4,)."""
        box = None
        if box_xyxy is not None:
            x0, y0, x1, y1 = (round(float(v), COORD_DECIMALS) for v in np.asarray(box_xyxy))
            box = (x0, y0, x1, y1)
        points: tuple[tuple[float, float, int], ...] = ()
        if points_xy is not None:
            if point_labels is None:
                raise ValueError("points_xy given without point_labels")
            xy = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
            labels = np.asarray(point_labels).reshape(-1)
            if len(labels) != len(xy):
                raise ValueError(f"{len(xy)} points but {len(labels)} labels")
            points = tuple(
                (round(float(x), COORD_DECIMALS), round(float(y), COORD_DECIMALS), int(lab))
                for (x, y), lab in zip(xy, labels, strict=True)
            )
        return cls(box, points)

    @property
    def first_prompt(self) -> FirstPrompt:
        """How the chain began: with a box (a box is part of every prompt of its chain) or a click."""
        return "box" if self.box is not None else "click"

    def parent(self) -> PromptKey | None:
        """The prompt this one extends (every point but the last), or None when it extends
        nothing: no points, or a single point without a box."""
        if not self.points:
            return None
        parent = PromptKey(self.box, self.points[:-1])
        return parent if parent.box is not None or parent.points else None


class ClickMemory:
    """The low-res logits of recent answers, per (image, scope, prompt); thread-safe.

    ``image_key`` identifies the image embedding the logits belong to (the ``EmbeddingCache``
    key); ``scope`` is the caller's (e.g. task, image name, label, model version), so chains of
    different objects or plugin versions never mix.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, Hashable, PromptKey], np.ndarray] = OrderedDict()
        self._by_image: dict[str, set[tuple[str, Hashable, PromptKey]]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def recall(self, image_key: str, scope: Hashable, prompt: PromptKey) -> np.ndarray | None:
        """The logits (1, s, s) of the answer to the prompt ``prompt`` extends, if remembered."""
        parent = prompt.parent()
        if parent is None:
            return None
        key = (image_key, scope, parent)
        with self._lock:
            logits = self._items.get(key)
            if logits is not None:
                self._items.move_to_end(key)
            return logits

    def remember(
        self, image_key: str, scope: Hashable, prompt: PromptKey, logits: np.ndarray
    ) -> None:
        """Keep the low-res ``logits`` (s, s) or (1, s, s) of the answer to ``prompt``."""
        value = np.array(logits, dtype=np.float32, copy=True).reshape(1, *np.shape(logits)[-2:])
        value.setflags(write=False)
        if value.nbytes > self.max_bytes:
            return
        key = (image_key, scope, prompt)
        with self._lock:
            self._drop_locked(key)
            self._items[key] = value
            self._by_image.setdefault(image_key, set()).add(key)
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._items))
                self._drop_locked(oldest)

    def forget_image(self, image_key: str) -> None:
        """Drop every answer on ``image_key`` (its embedding was evicted)."""
        with self._lock:
            for key in list(self._by_image.get(image_key, ())):
                self._drop_locked(key)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._by_image.clear()
            self._bytes = 0

    def _drop_locked(self, key: tuple[str, Hashable, PromptKey]) -> None:
        value = self._items.pop(key, None)
        if value is None:
            return
        self._bytes -= value.nbytes
        keys = self._by_image.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_image[key[0]]


__all__ = ["COORD_DECIMALS", "ClickMemory", "FirstPrompt", "PromptKey"]
