"""The project-wide box conversion: its RQ jobs, and ``python -m training.conversion``.

A run (``runtime.queue.conversion``) turns every task of a project whose annotations or
predictions hold rectangles into one mask prediction per object, of the model version the
project was served with when the run started, written back to Label Studio. Two jobs, both on
CONVERT_QUEUE, run by ``python -m training.worker`` on any number of machines:

- ``plan_conversion(run_id)``: checks the labeling config (a ``RectangleLabels`` whose labels a
  ``BrushLabels`` or ``PolygonLabels`` offers: else the run fails, with the reason), pages
  through the project's task ids and enqueues one ``convert_chunk`` per CONVERT_CHUNK_TASKS.
- ``convert_chunk(run_id, index, task_ids)``: builds the model once, then per task: fetch it
  (annotations and predictions), convert its boxes (``runtime.box_masks``, as the batch
  ``/predict`` does), store the prediction, delete the task's other predictions of the same
  model version, record the outcome. A task whose image cannot be had, or that is gone, is
  recorded as failed with the reason and the chunk goes on; Label Studio unreachable fails the
  job, which RQ retries (CONVERT_RETRIES): the retry skips the tasks recorded done.

Why a task is never written twice: the new prediction is stored *before* the old ones of the
same version are deleted, and the old ones are those the task held when fetched. A worker
killed between the two leaves two; the retry fetches the task again, stores one and deletes
both others. Re-running a project replaces its predictions the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from rq import get_current_job
from rq.job import Job

from labelstudio.client import LabelStudioClient
from labelstudio.errors import ImageDecodeBusyError, LabelConfigError, LabelStudioError
from labelstudio.label_config import LabelConfig, parse_label_config
from runtime.box_masks import BoxConverter
from runtime.image_cache import ImageLoader
from runtime.logs import configure_logging
from runtime.models import resolve_model, served_model_version
from runtime.project_ids import normalize_project_id
from runtime.queue.access import LabelStudioAccess
from runtime.queue.connection import redis_connection
from runtime.queue.conversion import (
    ACTIVE,
    PLANNING,
    QUEUED,
    ConversionRunningError,
    Conversions,
    InvalidChunkTasksError,
    check_chunk_tasks,
)
from runtime.settings import Settings
from runtime.versions import open_version_store
from training.jobs import configure_job_process, label_studio_client

logger = logging.getLogger(__name__)

# Errors loading a task's image that are the backend's own trouble (Label Studio refusing our
# token, the decode budget full): the chunk is retried for them; any other fails only the task.
RETRIED_IMAGE_ERRORS = (LabelStudioError, ImageDecodeBusyError)


class ConversionJobError(RuntimeError):
    """A conversion job cannot go on (the model version is gone, the run is unknown)."""


def _current_job() -> Job:
    job = get_current_job()
    if job is None:
        raise RuntimeError("conversion jobs run on an RQ worker (POST /convert enqueues them)")
    return job


def _last_attempt(job: Job) -> bool:
    return not job.retries_left


def _client(settings: Settings, job: Job, project: str) -> LabelStudioClient:
    return label_studio_client(
        settings, LabelStudioAccess(job.connection, settings.training_queue), project
    )


def project_config(client: LabelStudioClient, project: str) -> tuple[LabelConfig, list[str]]:
    """The project's labeling config and what a conversion will leave out of it;
    ``LabelConfigError`` when nothing of it can be converted."""
    config = parse_label_config(str(client.project(project).get("label_config") or ""))
    return config, config.box_conversion_warnings()


# --- the plan job ----------------------------------------------------------------------------


def plan_conversion(run_id: str) -> dict[str, Any]:
    """The RQ job that splits a run into chunk jobs (see the module docstring)."""
    job = _current_job()
    settings = Settings()
    configure_job_process(settings)
    conversions = Conversions.from_settings(settings, job.connection)
    run = conversions.run(run_id)
    if run is None or run["state"] not in (QUEUED, PLANNING):
        logger.info("conversion run %s: nothing to plan (%s)", run_id, run and run["state"])
        return {"run_id": run_id, "state": run["state"] if run else "unknown"}
    project = run["project"]
    if not conversions.mark_planning(run_id):  # cancelled meanwhile
        return {"run_id": run_id, "state": (conversions.run(run_id) or {}).get("state")}
    try:
        client = _client(settings, job, project)
    except LabelStudioError as exc:  # no Label Studio access configured: no retry brings one
        return _fail_run(conversions, run_id, exc.detail)
    try:
        with client:
            try:
                _, warnings = project_config(client, project)
            except LabelConfigError as exc:  # bad input: no retry makes it better
                return _fail_run(conversions, run_id, exc.detail)
            conversions.set_warnings(run_id, warnings)
            chunks = conversions.plan(run_id, lambda: client.task_ids(project))
    except Exception as exc:
        if _last_attempt(job):
            detail = (
                exc.detail if isinstance(exc, LabelStudioError) else f"{type(exc).__name__}: {exc}"
            )
            conversions.fail(run_id, f"planning failed: {detail}")
        raise
    tasks = sum(len(c) for c in chunks)
    logger.info(
        "conversion run %s: %d tasks of project %s in %d chunks",
        run_id, tasks, project, len(chunks),
    )  # fmt: skip
    return {"run_id": run_id, "tasks": tasks, "chunks": len(chunks)}


def _fail_run(conversions: Conversions, run_id: str, error: str) -> dict[str, Any]:
    conversions.fail(run_id, error)
    logger.warning("conversion run %s failed: %s", run_id, error)
    return {"run_id": run_id, "state": "failed", "error": error}


# --- the chunk job ---------------------------------------------------------------------------


def _converter(
    settings: Settings, project: str, model_version: str, images: ImageLoader
) -> BoxConverter:
    """The model ``model_version`` names, as the backend serves it: the base with the default
    plugins, or with the project's version of that name."""
    from stable_sam import EmbeddingCache, StableSamPredictor, load_plugins

    spec = resolve_model(settings)
    spec.check()
    model = spec.build()
    if model_version != spec.version:
        store = open_version_store(settings)
        version = next((v for v in store.list(project) if v.name == model_version), None)
        if version is None or not settings.plugins_enabled:
            raise ConversionJobError(
                f"model version {model_version} is not served here: not the default "
                f"({spec.version}) nor a plugin version of project {project} in VERSIONS_DIR "
                "(pruned by VERSIONS_KEEP?); start the conversion again"
            )
        load_plugins(model, store.plugin_file(version))
    cache = EmbeddingCache(max_bytes=settings.train_embedding_cache_mb * 1024 * 1024)
    return BoxConverter(
        StableSamPredictor(model, cache=cache),
        None,  # the model's own plugins, loaded above
        model_version,
        images,
        max_boxes=settings.max_regions,
        polygon_tolerance_px=settings.polygon_tolerance_px,
        polygon_min_part_px=settings.polygon_min_part_px,
    )


def convert_task(
    client: LabelStudioClient,
    converter: BoxConverter,
    config: LabelConfig,
    conversions: Conversions,
    run_id: str,
    task_id: int,
) -> str:
    """Convert one task, store its prediction, record the outcome; return it. Raises what the
    chunk must be retried for (Label Studio unreachable)."""
    try:
        task = client.task(task_id)
    except LabelStudioError as exc:
        if exc.answered != 404:
            raise
        conversions.record_task(run_id, task_id, "failed", "the task no longer exists (HTTP 404)")
        return "failed"
    converted = converter.convert(task, config)
    if isinstance(converted.error, RETRIED_IMAGE_ERRORS):
        raise converted.error
    if converted.error is not None:
        conversions.record_task(run_id, task_id, "failed", converted.reason)
        return "failed"
    if converted.answer is None:
        conversions.record_task(
            run_id, task_id, "skipped", converted.reason, boxes_skipped=converted.skipped
        )
        return "skipped"
    answer = converted.answer
    created = client.create_prediction(
        task_id, answer["result"], answer["model_version"], score=answer["score"]
    )
    held = task.get("predictions")
    for old in held if isinstance(held, list) else []:
        if (
            isinstance(old, dict)
            and old.get("model_version") == answer["model_version"]
            and isinstance(old.get("id"), int)
            and old["id"] != created.get("id")
        ):
            try:
                client.delete_prediction(old["id"])
            except LabelStudioError as exc:
                if exc.answered != 404:  # deleted meanwhile: what we wanted
                    raise
    conversions.record_task(
        run_id, task_id, "done",
        objects=converted.objects, boxes=converted.boxes, boxes_skipped=converted.skipped,
    )  # fmt: skip
    return "done"


def convert_chunk(run_id: str, index: int, task_ids: list[int]) -> dict[str, Any]:
    """The RQ job that converts one chunk of a run's tasks (see the module docstring)."""
    job = _current_job()
    settings = Settings()
    configure_job_process(settings)
    conversions = Conversions.from_settings(settings, job.connection)
    run = conversions.run(run_id)
    report: dict[str, Any] = {"run_id": run_id, "chunk": index, "tasks": len(task_ids)}
    if run is None or run["state"] not in ACTIVE:
        report["state"] = run["state"] if run else "unknown"
        logger.info("conversion run %s chunk %d: not run (%s)", run_id, index, report["state"])
        return report
    project, model_version = run["project"], run["model_version"]
    recorded = conversions.outcomes(run_id, task_ids)
    todo = [t for t in task_ids if recorded.get(t) not in ("done", "skipped")]
    outcomes: dict[str, int] = {}
    started = time.perf_counter()
    try:
        if todo:
            with _client(settings, job, project) as client:
                images = ImageLoader(settings, client.auth)
                try:
                    config, _ = project_config(client, project)
                    converter = _converter(settings, project, model_version, images)
                    for task_id in todo:
                        if not conversions.is_active(run_id):
                            report["state"] = "cancelled"
                            break
                        outcome = convert_task(
                            client, converter, config, conversions, run_id, task_id
                        )
                        outcomes[outcome] = outcomes.get(outcome, 0) + 1
                finally:
                    images.close()
    except (LabelConfigError, ConversionJobError) as exc:  # no retry makes these better
        reason = exc.detail if isinstance(exc, LabelConfigError) else str(exc)
        _fail_remaining(conversions, run_id, task_ids, reason)
        conversions.fail(run_id, reason)  # the other chunks would fail alike: they stop
        logger.warning("conversion run %s failed: %s", run_id, reason)
    except Exception as exc:
        if _last_attempt(job):
            _fail_remaining(
                conversions, run_id, task_ids,
                f"chunk failed after its last attempt: {type(exc).__name__}: {exc}",
            )  # fmt: skip
            conversions.finish_chunk(run_id, index)
        logger.exception("conversion run %s chunk %d failed", run_id, index)
        raise
    conversions.finish_chunk(run_id, index)
    report.update(
        outcomes=outcomes,
        already_recorded=len(task_ids) - len(todo),
        seconds=round(time.perf_counter() - started, 2),
    )
    logger.info("conversion run %s chunk %d: %s", run_id, index, report)
    return report


def _fail_remaining(
    conversions: Conversions, run_id: str, task_ids: Sequence[int], reason: str
) -> None:
    """Record as failed the chunk's tasks that have no outcome yet."""
    recorded = conversions.outcomes(run_id, task_ids)
    for task_id in task_ids:
        if recorded.get(task_id) not in ("done", "skipped"):
            conversions.record_task(run_id, task_id, "failed", reason)


# --- the CLI ---------------------------------------------------------------------------------


def _print(view: dict[str, Any] | None) -> None:
    print(json.dumps(view, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.conversion",
        description="Turn a Label Studio project's boxes into mask predictions, on the RQ "
        "workers (settings from the environment: REDIS_URL, CONVERT_*, LABEL_STUDIO_*; see the "
        "README). The same as POST /convert, GET and DELETE /convert/<project>.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start a conversion run of a project")
    start.add_argument("--project", required=True)
    start.add_argument("--chunk-tasks", type=int, help="tasks per job (CONVERT_CHUNK_TASKS)")
    start.add_argument("--wait", action="store_true", help="follow the run until it ends")
    for name, text in (("status", "the project's latest run"), ("cancel", "cancel its run")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--project", required=True)
        if name == "status":
            command.add_argument("--wait", action="store_true", help="until the run ends")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level)
    project = normalize_project_id(args.project)
    if project is None:
        parser.error("--project: a numeric Label Studio project id")
    try:
        check_chunk_tasks(getattr(args, "chunk_tasks", None))
    except InvalidChunkTasksError as exc:
        parser.error(str(exc).replace("chunk_tasks", "--chunk-tasks", 1))
    conversions = Conversions.from_settings(settings, redis_connection(settings.redis_url, 2, 10))
    if args.command == "cancel":
        view = conversions.cancel(project)
    elif args.command == "status":
        view = conversions.latest(project)
    else:
        store = open_version_store(settings)
        version = served_model_version(settings, resolve_model(settings), store, project)
        try:
            view = conversions.start(project, version, args.chunk_tasks)
        except ConversionRunningError as exc:
            print(f"error: {exc}: cancel it first", file=sys.stderr)
            _print(exc.view)
            return 2
    if view is None:
        print(f"error: project {project} has no conversion run", file=sys.stderr)
        return 1
    if getattr(args, "wait", False):
        view = _follow(conversions, view["run_id"])
    _print(view)
    return 0 if view["state"] not in ("failed", "incomplete") else 1


def _follow(conversions: Conversions, run_id: str, interval_s: float = 2.0) -> dict[str, Any]:
    """Print the run's progress until it is no longer active; return its last status."""
    while True:
        view = conversions.status(run_id)
        assert view is not None
        print(
            f"{view['state']}: {view['done']} done, {view['skipped']} skipped, "
            f"{view['failed']} failed of {view['tasks'] if view['tasks'] is not None else '?'}",
            file=sys.stderr,
        )
        if view["state"] not in ACTIVE:
            return view
        time.sleep(interval_s)


if __name__ == "__main__":
    sys.exit(main())
