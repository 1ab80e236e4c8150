"""``ModelServer``: the one frozen SAM base, built lazily (or warmed up in the background at
start-up, never in ``/setup``), and per call the plugins of a project's newest promoted version
(``runtime.versions``), so new versions are served without a restart. ``slot()`` bounds
concurrent model work (``MODEL_CONCURRENCY``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.click_refinement import ClickRefinement
from backend.errors import ModelUnavailableError
from labelstudio.errors import ServiceError
from runtime.models import (
    ModelConfigError,
    project_version,
    resolve_model,
    served_model_version,
)
from runtime.settings import Settings
from runtime.versions import PluginVersion, open_version_store
from stable_sam.refinement import ClickMemory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PluginChoice:
    """The plugin set to use for one call and the ``model_version`` it is served as."""

    plugins: Any  # stable_sam.StableSamPlugins, or None for the model's own
    model_version: str


class ModelServer:
    """Builds the model once (thread-safe) and picks the plugin set per project."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._predictor: Any = None
        self.error: str | None = None  # why the model could not be built, for /health
        self.warm = False  # True once warm_up ran
        # (project, version name, file hash or mtime) -> plugins; one entry per project.
        self._plugin_cache: dict[tuple[str, str, str], Any] = {}
        self._slots = threading.BoundedSemaphore(settings.model_concurrency)
        self._versions = open_version_store(settings)
        self.spec = resolve_model(settings)  # base, default plugins, version name
        # The click loop's memory of previous answers; emptied of an image with its embedding.
        self.click_memory = ClickMemory(max_bytes=settings.click_memory_mb * 1024 * 1024)
        self.refinement = ClickRefinement(
            settings.refine_masks,
            "stable_sam" if self.spec.plugins_enabled else "sam",
            self.click_memory,
        )

    def current_version(self, project: str | None) -> PluginVersion | None:
        """The project's served plugin version, if plugins are on and it has one."""
        return project_version(self.settings, self._versions, project)

    def model_version(self, project: str | None) -> str:
        """What ``/setup`` and every prediction report as ``model_version`` (no model load)."""
        return served_model_version(self.settings, self.spec, self._versions, project)

    # -- the model ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the MODEL_CONCURRENCY model slots (waits for one) while running the
        model: requests may be many, model calls at once are few."""
        with self._slots:
            yield

    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    def predictor(self) -> Any:
        """The ``StableSamPredictor``, built on first use; ``ModelUnavailableError`` if it cannot be."""
        if self._predictor is not None:
            return self._predictor
        with self._lock:
            if self._predictor is None:
                try:
                    self._predictor = self._build()
                except ServiceError as exc:
                    self.error = exc.detail
                    raise
                except (OSError, ValueError, RuntimeError) as exc:
                    self.error = f"{type(exc).__name__}: {exc}"
                    logger.exception("building the model failed")
                    raise ModelUnavailableError(f"the model cannot be built: {exc}") from exc
        return self._predictor

    def _build(self) -> Any:
        from stable_sam import EmbeddingCache, StableSamPredictor

        s = self.settings
        started = time.perf_counter()
        try:
            self.spec.check()
        except ModelConfigError as exc:
            raise ModelUnavailableError(str(exc)) from exc
        if s.torch_threads > 0:
            import torch

            torch.set_num_threads(s.torch_threads)
        model = self.spec.build()
        cache = EmbeddingCache(max_bytes=s.embedding_cache_mb * 1024 * 1024)
        cache.on_evict(self.click_memory.forget_image)
        predictor = StableSamPredictor(model, cache=cache)
        logger.info(
            "model %s ready on %s in %.1f s",
            self.spec.version,
            model.device,
            time.perf_counter() - started,
        )
        return predictor

    def warm_up(self) -> None:
        """Build the model and run one tiny prediction, so the first real click pays neither.

        The first forward pass of a torch model is several times slower than the next ones
        (kernel selection, allocator growth); measured ~8 s vs ~0.8 s for a cold image on the
        mini model on a busy 2-core CPU (bench/bench_predict_http.py).
        """
        started = time.perf_counter()
        predictor = self.predictor()
        image = np.zeros((64, 64, 3), np.uint8)
        point = np.array([[32.0, 32.0]], np.float32)
        predictor.predict(
            image, point_coords=point, point_labels=np.array([1]), image_key="warm-up"
        )
        self.warm = True
        logger.info("model warm-up done in %.1f s", time.perf_counter() - started)

    def plugins_for(self, project: str | None) -> PluginChoice:
        """The project's newest promoted plugins (cached by file), else the default ones."""
        try:
            return self._plugins_of(self.current_version(project), project)
        except FileNotFoundError:
            # Pruned between reading the manifest and opening the file (a newer version was
            # promoted meanwhile): the manifest read again names it.
            return self._plugins_of(self.current_version(project), project, retry=False)

    def _plugins_of(
        self, version: PluginVersion | None, project: str | None, retry: bool = True
    ) -> PluginChoice:
        if version is None:
            return PluginChoice(None, self.spec.version)
        from stable_sam import read_plugins

        try:
            # A version's file never changes once named, but a manifest from before the hash
            # was recorded is keyed by the file's mtime (a store rebuilt under the same names).
            path = None if version.sha256 else self._versions.plugin_file(version)
            stamp = version.sha256 or str(path.stat().st_mtime_ns)
            key = (version.project, version.name, stamp)
            plugins = self._plugin_cache.get(key)
            if plugins is None:
                model = self.predictor().model  # built first: the file is opened right after
                plugins, _ = read_plugins(model, path or self._versions.plugin_file(version))
                with self._lock:
                    self._plugin_cache = {
                        k: v for k, v in self._plugin_cache.items() if k[0] != version.project
                    }
                    self._plugin_cache[key] = plugins
                logger.info("project %s: serving plugin version %s", project, version.name)
            return PluginChoice(plugins, version.name)
        except FileNotFoundError:
            if retry:
                raise
            return self._unusable(version, project, "its file is gone")
        except (OSError, ValueError, KeyError) as exc:  # PluginMismatchError is a ValueError
            return self._unusable(version, project, str(exc))

    def _unusable(self, version: PluginVersion, project: str | None, why: str) -> PluginChoice:
        logger.error(
            "project %s: plugin version %s unusable (%s); serving the default plugins",
            project,
            version.name,
            why,
        )
        return PluginChoice(None, self.spec.version)
