"""``StableSamBackend``: the familiar Label Studio ML backend shape over Stable-SAM.

``predict(tasks, context, ...)`` answers ``/predict``: with a context (regions the annotator
placed with the smart tools) it returns one ``brushlabels`` region per label (or its
``polygonlabels`` regions, in a ``PolygonLabels`` project); without one (a
task was opened) it returns empty results and starts computing the task's image embedding in
the background, so the first click is fast. Training events go to ``/webhook``
(``backend.training_api``), never here.

The model and the per-project plugins come from ``backend.model_server.ModelServer``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from backend.limits import RequestLimits
from backend.model_server import ModelServer, PluginChoice
from backend.regions import group_to_prompt
from labelstudio.auth import LabelStudioAuth
from labelstudio.errors import InvalidRequestError, LabelConfigError, ServiceError
from labelstudio.label_config import LabelConfig, LabelConfigStore, parse_label_config
from labelstudio.regions import RegionGroup, mask_regions, parse_context
from runtime.box_masks import BoxConverter, task_image
from runtime.image_cache import ImageLoader, LoadedImage
from runtime.project_ids import normalize_project_id
from runtime.queue.access import LabelStudioAccess
from runtime.queue.connection import redis_connection
from runtime.settings import Settings
from stable_sam.refinement import PromptKey

logger = logging.getLogger(__name__)

ACCESS_RESHARE_S = 60.0  # /setup re-shares LS access with training this often, at most
REDIS_RETRY_S = 30.0  # after a Redis error, /setup leaves Redis alone this long (LS gives it 3 s)
MAX_PENDING_PREFETCH = 16  # background embeddings queued at most; more task opens are skipped


class StableSamBackend:
    """The Label Studio ML backend: ``setup(project, schema, ...)`` and ``predict(tasks, context)``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = LabelStudioAuth(
            settings.label_studio_url,
            settings.label_studio_token,
            settings.label_studio_trust_setup,
            pin_store=self._pin_label_studio_url,
        )
        self.images = ImageLoader(settings, self.auth)
        self.models = ModelServer(settings)
        self.limits = RequestLimits.from_settings(settings)
        self._schemas = LabelConfigStore(settings.schema_cache_size)  # label configs from /setup
        self._prefetch = (
            ThreadPoolExecutor(settings.prefetch_workers, thread_name_prefix="prefetch")
            if settings.prefetch_workers > 0
            else None
        )
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._access: LabelStudioAccess | None = None
        # project -> (url, token, share again at): what training jobs were last given
        self._stored_access: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self._redis_retry_at = 0.0

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.shutdown(wait=False, cancel_futures=True)
        self.images.close()

    # -- /setup ------------------------------------------------------------------------------
    def setup(
        self,
        project: Any,
        schema: str | None,
        hostname: str | None = None,
        access_token: str | None = None,
    ) -> str:
        """Remember the project's config (and, if trusted, LS's address/token); return the
        model version. ``UntrustedLabelStudioError`` (403) for a Label Studio not trusted."""
        key = normalize_project_id(project)
        token_usable = self.auth.update_from_setup(hostname, access_token)
        if key is not None and schema:
            self._schemas.put(key, schema)
        if key is not None and token_usable and self.auth.setup_token and self.auth.base_url:
            # The token in use, not the one this caller sent: a stray /setup token waits
            # behind one that works, for training jobs too.
            self._share_access_with_training(key, self.auth.base_url, self.auth.setup_token)
        return self.models.model_version(key)

    def _pin_label_studio_url(self, url: str) -> str:
        """The Label Studio URL every process trusts: the first one pinned in Redis."""
        import redis

        if time.monotonic() < self._redis_retry_at:
            return url  # Redis was down a moment ago: keep /setup fast, pin locally
        try:
            return self.label_studio_access().pin_url(url)
        except (redis.RedisError, OSError):
            self._redis_retry_at = time.monotonic() + REDIS_RETRY_S
            raise

    def _share_access_with_training(self, project: str, url: str, token: str) -> None:
        """Let training jobs reach LS with /setup's token (once per change; Redis may be down)."""
        import redis

        now = time.monotonic()
        shared = self._stored_access.get(project)
        if shared is not None and shared[:2] == (url, token) and now < shared[2]:
            return
        if now < self._redis_retry_at:
            return  # Redis was down a moment ago: keep /setup fast
        try:
            self.label_studio_access().store(project, url, token)
            # Shared again after a while: Redis may have lost it (it keeps nothing on disk).
            self._stored_access[project] = (url, token, now + ACCESS_RESHARE_S)
            self._stored_access.move_to_end(project)
            while len(self._stored_access) > self.settings.schema_cache_size:
                self._stored_access.popitem(last=False)
        except (redis.RedisError, OSError) as exc:  # must not fail /setup (LS gives it 3 s)
            self._redis_retry_at = time.monotonic() + REDIS_RETRY_S
            logger.warning("cannot share LS access of project %s with training: %s",
                           project, type(exc).__name__)  # fmt: skip

    # -- /predict ----------------------------------------------------------------------------
    def predict(
        self,
        tasks: list[dict[str, Any]],
        context: dict[str, Any] | None = None,
        project: Any = None,
        label_config: str | None = None,
    ) -> list[dict[str, Any]]:
        """One ``{result, score, model_version}`` per task, in order.

        The request limits (``self.limits``) and the regions are checked first, before any
        image download or model work.
        """
        key = normalize_project_id(project)
        self.limits.check_label_config(label_config, "label_config")
        result = (context or {}).get("result") if isinstance(context, dict) else None
        if context is not None and not isinstance(context, dict):
            raise InvalidRequestError("params.context must be an object")
        if result:
            # Each task of an interactive call costs model work; a batch call (Retrieve
            # predictions, any number of tasks) costs a list entry and a bounded warm-up.
            self.limits.check_tasks(tasks)
            self.limits.check_regions(result)
            groups = parse_context(result)  # fail fast on bad regions, before any download
            self.limits.check_points(groups)
            config = self._config(key, label_config)
            return [self._predict_interactive(task, groups, config, key) for task in tasks]
        # Batch (Retrieve predictions, or a task opened): the boxes tasks already have become
        # masks; the other tasks' embeddings are warmed up for the first click.
        version = self.models.model_version(key)
        empty = {"result": [], "score": 0.0, "model_version": version}
        answers: list[dict[str, Any] | None] = [None] * len(tasks)
        config = self._batch_config(key, label_config)
        if config is not None and tasks:
            choice = self.models.plugins_for(key)
            converter = self._box_converter(choice, {choice.model_version, version})
            deadline = time.monotonic() + self.settings.batch_predict_budget_s
            for index, task in enumerate(tasks):
                if index > 0 and time.monotonic() > deadline:
                    # Label Studio drops every answer of a batch that misses its 100 s, but
                    # asks again task by task when a batch gets a single answer (its fallback
                    # for backends without batches; label_studio/ml/models.py): that one it
                    # gets, and each task then has 100 s of its own.
                    logger.warning(
                        "batch /predict of %d tasks: BATCH_PREDICT_BUDGET_S (%.0f s) spent after "
                        "%d; answering one task so that Label Studio asks task by task",
                        len(tasks), self.settings.batch_predict_budget_s, index,
                    )  # fmt: skip
                    return [answers[0] or dict(empty)]
                answers[index] = self._predict_task_boxes(converter, task, config)
        waiting = [t for t, a in zip(tasks, answers, strict=True) if a is None]
        self._start_prefetch(waiting, key, label_config)
        return [dict(empty) if a is None else a for a in answers]

    def _batch_config(self, project: str | None, label_config: str | None) -> LabelConfig | None:
        try:
            return self._config(project, label_config)
        except LabelConfigError as exc:
            logger.info("batch /predict without a usable labeling config: %s", exc.detail)
            return None

    def _box_converter(self, choice: PluginChoice, own: set[str]) -> BoxConverter:
        """Batch ``/predict``'s boxes-to-masks (``runtime.box_masks``) with ``choice``,
        ignoring predictions of the ``own`` model versions (our masks already)."""
        return BoxConverter(
            self.models.predictor(),
            choice.plugins,
            choice.model_version,
            self.images,
            own_versions=own,
            max_boxes=self.settings.max_regions,
            polygon_tolerance_px=self.settings.polygon_tolerance_px,
            polygon_min_part_px=self.settings.polygon_min_part_px,
            slot=self.models.slot,
        )

    @staticmethod
    def _predict_task_boxes(
        converter: BoxConverter, task: dict[str, Any], config: LabelConfig
    ) -> dict[str, Any] | None:
        """One mask region set per object the task's boxes outline; or None when the task has
        no boxes (or its image cannot be had, or it is malformed: logged)."""
        converted = converter.convert(task, config)
        if converted.answer is None and converted.reason != "no rectangles":
            logger.info("task %s: boxes not converted, %s", task.get("id"), converted.reason)
        return converted.answer

    def _config(self, project: str | None, label_config: str | None) -> LabelConfig:
        xml = label_config or (self._schemas.get(project) if project else None)
        if not xml:
            raise LabelConfigError(
                "no labeling config: /predict carried no label_config and /setup was not called "
                "for this project"
            )
        return parse_label_config(xml)

    def _predict_interactive(
        self,
        task: dict[str, Any],
        groups: list[RegionGroup],
        config: LabelConfig,
        project: str | None,
    ) -> dict[str, Any]:
        controls = [config.mask_control_for(g.to_name, g.label) for g in groups]  # errors first
        choice = self.models.plugins_for(project)
        predictor = self.models.predictor()
        images: dict[str, LoadedImage] = {}
        regions, scores = [], []
        for group, control in zip(groups, controls, strict=True):
            if group.to_name not in images:
                images[group.to_name] = task_image(self.images, task, config, group.to_name)
            image = images[group.to_name]
            if group.original_size and group.original_size != (image.width, image.height):
                logger.warning(
                    "task %s: LS reports the image as %dx%d, decoded %dx%d (EXIF?)",
                    task.get("id"),
                    *group.original_size,
                    image.width,
                    image.height,
                )
            prompt = group_to_prompt(group, image.width, image.height)
            chain = PromptKey.of(prompt.points_xy, prompt.point_labels, prompt.box_xyxy)
            embedding_key = predictor.embedding_key(image.rgb, image.sha256)
            scope = (project, task.get("id"), group.to_name, group.label, choice.model_version)
            refinement = self.models.refinement
            started = time.perf_counter()
            with self.models.slot():
                mask_input = refinement.mask_input(embedding_key, scope, chain)
                prediction = predictor.predict(
                    image.rgb,
                    point_coords=prompt.points_xy,
                    point_labels=prompt.point_labels,
                    box_xyxy=prompt.box_xyxy,
                    mask_input=mask_input,
                    image_key=image.sha256,
                    plugins=choice.plugins,
                )
            refinement.remember(embedding_key, scope, chain, prediction.low_res_logits[0])
            mask = np.asarray(prediction.masks[0])
            score = float(prediction.scores[0])
            answer = mask_regions(
                mask, group.label, control, group.to_name, score,
                self.settings.polygon_tolerance_px, self.settings.polygon_min_part_px,
            )  # fmt: skip
            logger.info(
                "task %s label %r: %d points, box=%s, refined=%s -> mask %.1f%% in %.0f ms (%s)",
                task.get("id"),
                group.label,
                0 if prompt.points_xy is None else len(prompt.points_xy),
                prompt.box_xyxy is not None,
                mask_input is not None,
                100.0 * mask.mean(),
                (time.perf_counter() - started) * 1000,
                choice.model_version,
            )
            regions.extend(answer)
            scores.append(score)
        return {
            "result": regions,
            "score": float(np.mean(scores)) if scores else 0.0,
            "model_version": choice.model_version,
        }

    def _start_prefetch(
        self, tasks: list[dict[str, Any]], project: str | None, label_config: str | None
    ) -> None:
        """Compute the tasks' image embeddings in the background (task-open warm-up)."""
        if self._prefetch is None:
            return
        try:
            config = self._config(project, label_config)
        except LabelConfigError as exc:
            logger.info("no warm-up: %s", exc.detail)
            return
        to_name = config.default_image_name()
        if to_name is None:
            return
        for task in tasks:
            with self._pending_lock:
                if self._pending >= MAX_PENDING_PREFETCH:
                    logger.info("warm-up queue full; skipping the remaining tasks")
                    return
                self._pending += 1
            self._prefetch.submit(self._prefetch_one, task, config, to_name)

    def _prefetch_one(self, task: dict[str, Any], config: LabelConfig, to_name: str) -> None:
        try:
            started = time.perf_counter()
            image = task_image(self.images, task, config, to_name)
            predictor = self.models.predictor()
            with self.models.slot():
                predictor.prefetch(image.rgb, image_key=image.sha256)
            logger.info(
                "warm-up: task %s embedded in %.0f ms",
                task.get("id"),
                (time.perf_counter() - started) * 1000,
            )
        except ServiceError as exc:
            logger.warning("warm-up of task %s failed: %s", task.get("id"), exc.detail)
        except Exception:  # a background job must never die silently
            logger.exception("warm-up of task %s failed", task.get("id"))
        finally:
            with self._pending_lock:
                self._pending -= 1

    def wait_for_prefetch(self, timeout_s: float = 60.0) -> bool:
        """Block until the background warm-ups are done (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._pending_lock:
                if self._pending == 0:
                    return True
            time.sleep(0.01)
        return False

    def label_config_of(self, project: str) -> str | None:
        """The project's labeling config as ``/setup`` last sent it, if it did."""
        return self._schemas.get(project)

    # -- training ----------------------------------------------------------------------------
    def label_studio_access(self) -> LabelStudioAccess:
        """Where ``/setup`` shares Label Studio access with training jobs (built once; no I/O)."""
        if self._access is None:
            self._access = LabelStudioAccess(
                redis_connection(self.settings.redis_url), self.settings.training_queue
            )
        return self._access
