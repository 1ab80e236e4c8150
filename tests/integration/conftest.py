"""Fixtures of the integration tests that train: a tiny random mini SAM checkpoint, and the
stand-in Label Studio API with five annotated 96 px scenes of project 7 (a module may define
its own fixture of the same name instead)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.label_studio_api import LabelStudioAPI
from bench.processes import tiny_mini_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mini_checkpoint(tmp_path_factory.mktemp("ckpt") / "mini.pth")


@pytest.fixture(scope="module")
def label_studio() -> Iterator[LabelStudioAPI]:
    with LabelStudioAPI(project_id=7, n_tasks=5, size=96) as api:
        yield api
