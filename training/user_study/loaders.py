"""Input loaders for the CLI: Label Studio, the tasks (export file or API), the ground truth."""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

from labelstudio.auth import LabelStudioAuth
from labelstudio.client import LabelStudioClient
from labelstudio.download import DownloadLimits
from labelstudio.errors import LabelStudioError
from training.user_study.ground_truth import GtImage, load_coco, load_mask_folder
from training.user_study.ls_export import read_export_file

logger = logging.getLogger(__name__)

LABEL_STUDIO_TIMEOUT_S = 60.0  # per API request: an export, or an import of 20 files


def study_client(url: str, api_key: str) -> LabelStudioClient:
    """The Label Studio of the study commands (``--ls-url``, ``--api-key``)."""
    return LabelStudioClient(
        LabelStudioAuth(url, api_key), DownloadLimits(timeout_s=LABEL_STUDIO_TIMEOUT_S)
    )


def load_tasks(
    export_path: str | Path | None, client: LabelStudioClient | None, project: int | None
) -> tuple[list[dict[str, Any]], dict[int, str] | None]:
    """Tasks from an export file, or exported through the API; plus user id -> e-mail if known."""
    users = None
    if client is not None:
        try:
            users = client.users()
        except LabelStudioError as exc:  # naming annotators by id still works
            logger.warning(
                "could not list Label Studio users (%s); annotators named by id", exc.detail
            )
    if export_path is not None:
        return read_export_file(export_path), users
    if client is None or project is None:
        raise ValueError("give an export file, or a Label Studio URL and project id")
    return client.export(project), users


def load_ground_truth(
    spec: str | Path, images_dir: str | Path | None = None, only: Collection[str] | None = None
) -> dict[str, GtImage]:
    """A mask folder (a directory) or a COCO instances file (``.json``); ``only``: image keys."""
    path = Path(spec)
    if path.is_dir():
        return load_mask_folder(path, only)
    if path.suffix.lower() == ".json" and path.is_file():
        return load_coco(path, images_dir, only)
    raise FileNotFoundError(f"--gt {spec}: not a mask folder, a COCO .json file, or 'brush'")
