"""The RQ job that retrains a project's Stable-SAM plugins: ``training.jobs.train_project``.

Enqueued by ``runtime.queue.triggers`` (never called in the web process), run by ``rq worker`` in a
forked work horse. Nothing here touches CUDA at import time, so the worker's parent never
initialises it; the device is chosen inside the job (CUDA when available, else CPU, or
``DEVICE``).

One run, top to bottom:

1. ``mark_started``: the job leaves the project's "queued" slot *before* reading any data, so
   a trigger arriving from now on causes a follow-up run instead of being lost.
2. Fetch the project's annotated tasks and images from Label Studio (``training.ls_dataset``:
   brush and polygon regions -> instance masks); split off a deterministic validation part.
3. Build the served base (``runtime.models``, as the backend resolves it) with the plugins the
   project is served now (its current version, else the default plugins).
4. Evaluate those plugins on the validation part; train with RTS
   (``training.engine.train_plugins``), reporting ``(step, total, loss)`` in ``job.meta``;
   evaluate the new plugins on the same prompts.
5. Write a new version (``runtime.versions``: atomic, manifest last), promoted
   only when its validation score is not worse; the report says why.

A worker killed at any point leaves no partial version (the store's writes are atomic) and the
served version unchanged; RQ retries or fails the job (its ``Retry`` and timeout are set at
enqueue time, ``runtime.queue.jobs.JobOptions``).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rq import get_current_job
from rq.job import Job

from labelstudio.auth import LabelStudioAuth
from labelstudio.client import LabelStudioClient
from labelstudio.errors import LabelStudioError
from labelstudio.trust import base_url_of, origin_of
from runtime.logs import configure_logging
from runtime.models import ModelSpec, resolve_model
from runtime.queue.access import LabelStudioAccess
from runtime.queue.jobs import mark_finished, mark_started, record_failure
from runtime.settings import Settings
from runtime.versions import VersionStore, open_version_store
from training.data import Sample
from training.ls_dataset import load_project_samples, split_train_val

if TYPE_CHECKING:
    from stable_sam import StableSam, StableSamPlugins, StableSamPredictor

logger = logging.getLogger(__name__)

EVAL_SEED = 0
MIN_SAMPLES = 2  # one to train on, one to validate
PROGRESS_INTERVAL_S = 1.0

# Validation prompt kinds (training.evaluation's names; one draw each per object, fixed seed).
EVAL_PROMPTS = ("gt_box", "noisy_box", "points_1", "points_3")


class JobProgress:
    """Writes ``{"phase", "step", "total", "loss"}`` to ``job.meta["progress"]``.

    The training phase's latest ``{"step", "total", "loss"}`` also stays in
    ``job.meta["training"]`` after the phase ends. Saves at most every ``interval_s`` seconds,
    and always on a phase change or the last step, so a fast training loop does not flood
    Redis. ``job=None`` only logs.
    """

    def __init__(self, job: Job | None, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.job = job
        self.interval_s = interval_s
        self._saved_at = 0.0
        self._phase = ""

    def __call__(
        self, phase: str, step: int = 0, total: int = 0, loss: float | None = None
    ) -> None:
        now = time.monotonic()
        changed = phase != self._phase
        if not changed and step < total and now - self._saved_at < self.interval_s:
            return
        self._phase, self._saved_at = phase, now
        progress = {"phase": phase, "step": int(step), "total": int(total)}
        if loss is not None:
            progress["loss"] = round(float(loss), 6)
        if changed:
            logger.info("phase %s (%d/%d)", phase, step, total)
        if self.job is not None:
            self.job.meta["progress"] = progress
            if phase == "training" and total > 0:
                self.job.meta["training"] = {k: v for k, v in progress.items() if k != "phase"}
            self.job.save_meta()


def label_studio_client(
    settings: Settings, access: LabelStudioAccess, project: str
) -> LabelStudioClient:
    """A client for the trusted Label Studio (the rule of ``labelstudio.trust``).

    LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY when configured. What ``/setup`` shared for
    ``project`` (kept in Redis by the web process) fills in only with LABEL_STUDIO_TRUST_SETUP
    on, and only when its URL is on the trusted origin: LABEL_STUDIO_URL, else the URL the web
    process pinned. A token is never sent anywhere else.
    """
    url = base_url_of(settings.label_studio_url) or ""
    token = settings.label_studio_token
    if not (url and token) and settings.label_studio_trust_setup:
        stored = access.of_project(project)
        trusted = url or access.pinned_url() or ""
        if stored is not None and trusted and origin_of(stored[0]) == origin_of(trusted):
            url, token = url or trusted, token or stored[1]
        elif stored is not None:
            logger.warning(
                "project %s: ignoring the Label Studio access /setup shared for %s: the "
                "trusted Label Studio is %s",
                project,
                origin_of(stored[0]),
                origin_of(trusted) or "unknown",
            )
    if not (url and token):
        raise LabelStudioError(
            f"no Label Studio access for project {project}: set LABEL_STUDIO_URL and "
            "LABEL_STUDIO_API_KEY (or LABEL_STUDIO_TRUST_SETUP=true, and connect the backend in "
            "Label Studio: its /setup shares them)"
        )
    return LabelStudioClient(LabelStudioAuth(url, token), settings.download_limits)


# --- evaluation ----------------------------------------------------------------------------


def evaluate_plugins(
    predictor: StableSamPredictor,
    samples: Sequence[Sample],
    plugins: StableSamPlugins | None,
    seed: int = EVAL_SEED,
) -> dict[str, float]:
    """Mask mIoU (percent) per ``EVAL_PROMPTS`` kind on ``samples``, their mean ``robust_miou``
    and the number of ``objects``.

    The evaluation protocol (``training.evaluation``) with one prompt of each kind per object,
    drawn from ``seed`` and each sample's index, so two plugin sets evaluated with the same seed
    see exactly the same prompts; masks as ``predictor`` serves them (its multimask policy).
    Image embeddings come from the predictor's cache.
    """
    from training.evaluation import EvalModel, evaluate, summarize

    model = EvalModel("validation", predictor, plugins)
    scores = evaluate([model], samples, EVAL_PROMPTS, n_prompts=1, seed=seed)[model.key].objects
    result = {f"miou_{kind}": 100.0 * summarize(scores[kind])["miou"] for kind in scores}
    result["robust_miou"] = float(np.mean(list(result.values()))) if result else 0.0
    result["objects"] = float(len(scores.get(EVAL_PROMPTS[0], [])))
    return {k: round(v, 3) for k, v in result.items()}


# --- the run -------------------------------------------------------------------------------


def _build_model(spec: ModelSpec, store: VersionStore, project: str) -> tuple[StableSam, str]:
    """The served base with the plugins ``project`` is served now (its current version, else
    the default plugins); returns (model, their name)."""
    from stable_sam import PluginMismatchError, load_plugins

    model = spec.build(plugins=True)  # with the default plugins
    current = store.current(project)
    if current is not None:
        try:
            load_plugins(model, store.plugin_file(current))
            return model, current.name
        except (PluginMismatchError, OSError, ValueError) as exc:
            logger.warning(
                "project %s: current version %s unusable (%s)", project, current.name, exc
            )
    if spec.default_plugins is not None:
        return model, f"default ({spec.default_plugins.name})"
    return model, "untrained plugins"


def run_training(
    project: str,
    settings: Settings,
    client: LabelStudioClient,
    store: VersionStore,
    progress: JobProgress,
    job_id: str = "",
) -> dict[str, Any]:
    """Fetch, train, evaluate and write a version of ``project``'s plugins; return the report."""
    from stable_sam import EmbeddingCache, StableSamPredictor, save_plugins
    from training.engine import TrainConfig, train_plugins

    started = time.perf_counter()
    report: dict[str, Any] = {"project": project, "job_id": job_id, "version": None}
    report["promoted"] = False

    progress("fetching")
    samples = load_project_samples(
        client, project, progress=lambda done, total: progress("fetching", done, total)
    )
    fetched = time.perf_counter()
    report["samples"] = len(samples)
    report["instances"] = sum(s.num_instances for s in samples)
    if len(samples) < MIN_SAMPLES:
        report["reason"] = (
            f"not trained: {len(samples)} annotated image(s) with brush/polygon masks, "
            f"need at least {MIN_SAMPLES} (one to train on, one to validate)"
        )
        logger.info("project %s: %s", project, report["reason"])
        return report
    train, val = split_train_val(samples, settings.train_val_fraction)
    report.update(train_samples=len(train), val_samples=len(val))

    spec = resolve_model(settings)
    model, start_name = _build_model(spec, store, project)
    report["device"] = str(model.device)
    report["started_from"] = start_name
    # The predictor's default multimask policy, as the backend serves the plugins.
    cache = EmbeddingCache(max_bytes=settings.train_embedding_cache_mb * 1024 * 1024)
    predictor = StableSamPredictor(model, cache=cache)

    progress("evaluating current", 0, len(val))
    current_plugins = copy.deepcopy(model.plugins)
    current_metrics = evaluate_plugins(predictor, val, current_plugins)

    config = TrainConfig(epochs=settings.train_epochs, device=str(model.device))
    progress("training", 0, 0)
    train_started = time.perf_counter()
    result = train_plugins(
        model, train, config, progress=lambda s, t, loss: progress("training", s, t, loss)
    )
    model.plugins.eval()
    train_seconds = time.perf_counter() - train_started

    progress("evaluating new", 0, len(val))
    new_metrics = evaluate_plugins(predictor, val, model.plugins)
    tolerance = settings.train_promote_tolerance
    bar = current_metrics["robust_miou"] - tolerance
    promote = new_metrics["robust_miou"] >= bar
    reason = (
        f"{'promoted' if promote else 'not promoted'}: validation robust mIoU "
        f"{new_metrics['robust_miou']:.2f} {'>=' if promote else '<'} {bar:.2f} (served plugins "
        f"{start_name}: {current_metrics['robust_miou']:.2f}, tolerance {tolerance:g}) on "
        f"{len(val)} image(s), {int(new_metrics['objects'])} object(s)"
    )

    progress("saving")
    summary = result.summary
    metadata = {
        "job_id": job_id,
        "base_model_type": spec.model_type,
        "base_checkpoint": str(spec.checkpoint) if spec.checkpoint else "random-init",
        "started_from": start_name,
        "train_samples": len(train),
        "val_samples": len(val),
        "val_names": [s.name for s in val],
        "device": str(model.device),
        "train_seconds": round(train_seconds, 2),
        "training_summary": summary,
    }
    with tempfile.TemporaryDirectory(prefix="stable-sam-train-") as tmp:
        plugin_file = Path(tmp) / "plugins.safetensors"
        save_plugins(
            model,
            plugin_file,
            {"version": store.next_name(project), "training_summary": summary},
        )
        version = store.write(
            project,
            plugin_file,
            metadata,
            {"new": new_metrics, "current": current_metrics},
            promote=promote,
            reason=reason,
        )
    images_seen = int(summary.get("images", len(train)))
    report.update(
        version=version.name,
        promoted=promote,
        reason=reason,
        metrics={"new": new_metrics, "current": current_metrics},
        seconds={
            "fetch": round(fetched - started, 2),
            "train": round(train_seconds, 2),
            "total": round(time.perf_counter() - started, 2),
        },
        images_per_s=round(images_seen / train_seconds, 3) if train_seconds > 0 else None,
        training_summary=summary,
    )
    logger.info("project %s: %s -> %s", project, version.name, reason)
    return report


def configure_job_process(settings: Settings) -> None:
    """Logging and torch threads, in the work horse."""
    # Inherited from ``training.worker`` (a no-op there); configured here for any other worker.
    configure_logging(settings.log_level)
    if settings.train_torch_threads > 0:
        import torch

        torch.set_num_threads(settings.train_torch_threads)


def train_project(project: str) -> dict[str, Any]:
    """The RQ job: retrain ``project``'s plugins from its Label Studio annotations.

    ``project`` is the numeric project id as a string. Returns the run's report (also in
    ``job.meta["report"]``); raises on failure so that RQ records it and applies the job's
    retry policy.
    """
    job = get_current_job()
    if job is None:
        raise RuntimeError(
            "train_project runs as an RQ job (use runtime.queue.triggers to enqueue it)"
        )
    settings = Settings()
    configure_job_process(settings)
    mark_started(job, project)
    access = LabelStudioAccess(job.connection, settings.training_queue)
    progress = JobProgress(job)
    store = open_version_store(settings)
    try:
        with label_studio_client(settings, access, project) as client:
            report = run_training(project, settings, client, store, progress, job.id)
    except Exception as exc:
        record_failure(job, project, f"{type(exc).__name__}: {exc}")
        logger.exception("project %s: training job %s failed", project, job.id)
        raise
    report["triggers"] = job.meta.get("triggers", 1)
    job.meta["report"] = report
    job.meta["progress"] = {"phase": "done", "step": 1, "total": 1}
    job.save_meta()
    mark_finished(job, project)
    return report
