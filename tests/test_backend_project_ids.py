"""One spelling per Label Studio project id: ``normalize_project_id`` and the version store."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.project_ids import MAX_PROJECT_ID, normalize_project_id
from runtime.versions import LocalVersionStore, check_project


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, "7"),
        ("7", "7"),
        ("07", "7"),
        ("007", "7"),
        (" 12 ", "12"),
        ("7.1700000000", "7"),
        ("007.1700000000", "7"),
        ({"id": 7, "token": "x"}, "7"),
        ({"id": "07"}, "7"),
        (0, "0"),
        ("000", "0"),
        (MAX_PROJECT_ID, str(MAX_PROJECT_ID)),
        (str(MAX_PROJECT_ID), str(MAX_PROJECT_ID)),
        ("0" * 30 + "7", "7"),  # leading zeros do not count towards the 19 digits
    ],
)
def test_project_ids_have_one_canonical_spelling(value, expected):
    assert normalize_project_id(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        " ",
        ".",
        "-3",
        -3,
        True,
        False,
        7.0,
        "seven",
        "../etc",
        "7a",
        "٣",  # ARABIC-INDIC DIGIT THREE: str.isdigit() and int() accept it
        "１２",  # FULLWIDTH digits
        "²",
        MAX_PROJECT_ID + 1,
        str(MAX_PROJECT_ID + 1),
        "9" * 20,
        pytest.param("9" * 5000, id="5000-digit-str"),  # over Python's int-string limit
        pytest.param(10**5000, id="5000-digit-int"),
        {"id": None},
        {"title": "no id"},
        [7],
    ],
)
def test_anything_else_is_no_project_id(value):
    assert normalize_project_id(value) is None


@pytest.mark.parametrize("project", ["07", "٣", "9" * 20, "7.1"])
def test_the_version_store_refuses_a_non_canonical_folder_name(tmp_path: Path, project: str):
    with pytest.raises(ValueError, match="canonical"):
        check_project(project)
    with pytest.raises(ValueError):
        LocalVersionStore(tmp_path).current(project)


def test_the_version_store_lists_only_canonical_project_folders(tmp_path: Path):
    for name in ("7", "07", "٣"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text('{"versions": []}')
    assert LocalVersionStore(tmp_path).projects() == ["7"]
