"""The original image of a study task: a local folder, the ground truth, or Label Studio.

Models are prompted on the **original** image, never on the highlighted copy the annotators
saw. Lookup order for an image key (file stem): ``images_dir/<key>.<ext>``; the path the ground
truth recorded; the task's ``original_image`` URL where its data has one (for tasks imported
by hand), else its ``image`` URL, downloaded and decoded by the Label Studio adapter
(``LabelStudioClient.image``: as the browser shows it, EXIF applied). ``collect`` uploads only
the highlighted copies, so its studies need the original images on disk (``--images`` or the
ground truth's ``images/``); a highlighted copy is used only with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from labelstudio.client import LabelStudioClient
from training.data import IMAGE_SUFFIXES, read_rgb
from training.user_study.ground_truth import GtImage
from training.user_study.ls_export import IMAGE_KEY, ORIGINAL_IMAGE_KEY, image_key_for

logger = logging.getLogger(__name__)


class OriginalImages:
    """``images(image_key) -> (H, W, 3) uint8 RGB`` (see the module docstring)."""

    def __init__(
        self,
        gt: Mapping[str, GtImage],
        images_dir: str | Path | None = None,
        client: LabelStudioClient | None = None,
        task_data: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        self.gt = gt
        self.files: dict[str, Path] = {}
        if images_dir is not None:
            for p in sorted(Path(images_dir).iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    self.files.setdefault(p.stem, p)
        self.client = client
        self.task_data: dict[str, tuple[int, Mapping[str, Any]]] = {}
        for task_id, data in (task_data or {}).items():
            self.task_data.setdefault(image_key_for(data), (task_id, data))

    def __call__(self, image_key: str) -> np.ndarray:
        path = self.files.get(image_key)
        if path is None and image_key in self.gt:
            path = self.gt[image_key].image_path
        if path is not None:
            return read_rgb(path)
        task = self.task_data.get(image_key)
        if self.client is not None and task is not None:
            task_id, data = task
            url = data.get(ORIGINAL_IMAGE_KEY)
            if not url:
                url = data.get(IMAGE_KEY)
                if data.get("highlight") not in (None, "", "none"):
                    logger.warning(
                        "image %s: no original in the task, using the highlighted one", image_key
                    )
            return self.client.image(str(url), task_id)
        raise FileNotFoundError(
            f"image {image_key}: not in --images, not recorded by the ground truth, and no Label Studio to fetch it from"
        )
