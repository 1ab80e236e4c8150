"""runtime.versions.VersionStore: atomic per-project plugin versions, promotion and pruning."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from runtime.versions import MANIFEST, VersionStore, check_project


def _plugin_file(tmp_path: Path, content: bytes, name: str = "new.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_empty_store_has_no_current_and_no_versions(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "versions")
    assert store.current("7") is None
    assert store.list("7") == []
    assert store.list() == []


def test_write_promoted_version_becomes_current(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "versions")
    version = store.write(
        "7", _plugin_file(tmp_path, b"weights-1"), {"base": "mini"}, {"miou": 0.8}, True, "first"
    )
    assert store.current("7") == version
    assert version.path.read_bytes() == b"weights-1"
    assert version.metrics == {"miou": 0.8}
    assert version.metadata == {"base": "mini"}
    assert version.name == "stable-sam-p7-v1"


def test_not_promoted_version_is_listed_but_not_current(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "versions")
    first = store.write("7", _plugin_file(tmp_path, b"a"), {}, {"miou": 0.8}, True, "first")
    worse = store.write("7", _plugin_file(tmp_path, b"b"), {}, {"miou": 0.5}, False, "worse")
    assert store.current("7") == first
    assert [v.name for v in store.list("7")] == [first.name, worse.name]
    assert store.list("7")[1].reason == "worse"


def test_projects_are_independent(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "versions")
    a = store.write("7", _plugin_file(tmp_path, b"a"), {}, {}, True, "ok")
    b = store.write("12", _plugin_file(tmp_path, b"b"), {}, {}, True, "ok")
    assert store.current("7") == a
    assert store.current("12") == b
    assert {v.name for v in store.list()} == {a.name, b.name}
    assert store.projects() == ["7", "12"]


def test_prune_keeps_newest_and_the_current_version(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "versions", keep=2)
    served = store.write("7", _plugin_file(tmp_path, b"0"), {}, {}, True, "ok")
    for i in range(4):
        store.write("7", _plugin_file(tmp_path, str(i).encode()), {}, {}, False, "worse")
    names = [v.name for v in store.list("7")]
    assert names == [served.name, "stable-sam-p7-v4", "stable-sam-p7-v5"]
    files = sorted(p.name for p in (tmp_path / "versions" / "7").glob("*.safetensors"))
    assert files == sorted(f"{n}.safetensors" for n in names)
    assert store.current("7") == served


def test_names_are_never_reused_after_pruning(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "versions", keep=1)
    names = [
        store.write("7", _plugin_file(tmp_path, b"x"), {}, {}, True, "ok").name for _ in range(3)
    ]
    assert names == ["stable-sam-p7-v1", "stable-sam-p7-v2", "stable-sam-p7-v3"]
    assert [v.name for v in store.list("7")] == ["stable-sam-p7-v3"]


def test_a_second_store_on_the_same_root_sees_new_versions(tmp_path: Path) -> None:
    writer = VersionStore(tmp_path / "versions")
    reader = VersionStore(tmp_path / "versions")
    assert reader.current("7") is None
    v1 = writer.write("7", _plugin_file(tmp_path, b"1"), {}, {}, True, "ok")
    assert reader.current("7") == v1
    v2 = writer.write("7", _plugin_file(tmp_path, b"2"), {}, {}, True, "ok")
    assert reader.current("7") == v2


def test_a_manifest_with_the_old_prompt_kind_names_loads_with_the_new_ones(
    tmp_path: Path,
) -> None:
    # As the training job wrote it before its prompt kinds were named points_1 / points_3.
    old = {"miou_gt_box": 61.0, "miou_1_point": 40.5, "miou_3_points": 52.0, "robust_miou": 51.2}
    folder = tmp_path / "versions" / "7"
    folder.mkdir(parents=True)
    (folder / "stable-sam-p7-v1.safetensors").write_bytes(b"weights")
    entry = {
        "name": "stable-sam-p7-v1",
        "file": "stable-sam-p7-v1.safetensors",
        "created": "2025-01-01T00:00:00+00:00",
        "promoted": True,
        "metrics": {"new": old, "current": {**old, "miou_1_point": 39.0}},
        "reason": "promoted",
        "metadata": {"val_samples": 2},
    }
    manifest = {"project": "7", "next_sequence": 2, "versions": [entry]}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    store = VersionStore(tmp_path / "versions")

    current = store.current("7")
    assert current is not None
    expected = {"miou_gt_box": 61.0, "miou_points_1": 40.5, "miou_points_3": 52.0}
    assert current.metrics["new"] == {**expected, "robust_miou": 51.2}
    assert current.metrics["current"]["miou_points_1"] == 39.0
    assert current.to_dict()["metrics"] == current.metrics
    # The next write stores the old version under the new names too.
    store.write("7", _plugin_file(tmp_path, b"v2"), {}, {"new": {}}, False, "worse")
    rewritten = json.loads((folder / MANIFEST).read_text())["versions"][0]["metrics"]
    assert rewritten == current.metrics


def test_unserialisable_metadata_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "versions")
    with pytest.raises(TypeError):
        store.write("7", _plugin_file(tmp_path, b"x"), {"bad": object()}, {}, True, "ok")
    assert store.list("7") == []
    assert not list((tmp_path / "versions" / "7").glob("*.safetensors"))


@pytest.mark.parametrize("project", ["../etc", "7.1700000000", "", "a"])
def test_non_numeric_project_ids_are_refused(tmp_path: Path, project: str) -> None:
    with pytest.raises(ValueError):
        check_project(project)
    with pytest.raises(ValueError):
        VersionStore(tmp_path).current(project)


def _slow_writer(root: str, plugin: str) -> None:
    """Child process: start writing a version, then get killed mid-copy (see the test)."""
    import runtime.versions as versions

    real_fsync = os.fsync

    def fsync_then_hang(fd: int) -> None:
        real_fsync(fd)
        time.sleep(60)

    versions.os.fsync = fsync_then_hang  # type: ignore[attr-defined]
    VersionStore(root).write("7", plugin, {}, {}, True, "killed run")


def test_writer_killed_mid_write_leaves_previous_version_served(tmp_path: Path) -> None:
    root = tmp_path / "versions"
    store = VersionStore(root)
    served = store.write("7", _plugin_file(tmp_path, b"good"), {}, {}, True, "ok")
    big = _plugin_file(tmp_path, os.urandom(1 << 20), "big.safetensors")

    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_slow_writer, args=(str(root), str(big)))
    child.start()
    deadline = time.monotonic() + 20
    folder = root / "7"
    while not list(folder.glob(".*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(folder.glob(".*.tmp")), "the writer never started its temp file"
    os.kill(child.pid, signal.SIGKILL)
    child.join()

    fresh = VersionStore(root)
    assert fresh.current("7") == served
    assert [v.name for v in fresh.list("7")] == [served.name]
    assert json.loads((folder / MANIFEST).read_text())["versions"][0]["name"] == served.name
    # The next write works normally and removes the killed writer's temp file.
    nxt = fresh.write("7", _plugin_file(tmp_path, b"next"), {}, {}, True, "ok")
    assert fresh.current("7") == nxt
    assert nxt.name == "stable-sam-p7-v2"
    assert not list(folder.glob(".*.tmp"))
