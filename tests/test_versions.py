"""runtime.versions: atomic per-project plugin versions, promotion and pruning, in the local
folder store and the Redis store (one contract, run on both), and what only one of them does."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from runtime.queue.connection import redis_connection
from runtime.versions import (
    MANIFEST,
    LocalVersionStore,
    VersionStore,
    VersionStoreUnavailableError,
    check_project,
)
from runtime.versions.shared import PREFIX, RedisVersionStore, file_key, manifest_key

# make_store(host="a", keep=5): a store on the shared backing (one folder; one Redis), with
# this host's own files (the Redis store's copies) under tmp_path/<host>.
MakeStore = Callable[..., VersionStore]


@pytest.fixture(params=["local", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    if request.param == "local":
        yield lambda host="a", keep=5: LocalVersionStore(tmp_path / "versions", keep=keep)
        return
    connection = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    connection.flushdb()
    yield lambda host="a", keep=5: RedisVersionStore(
        redis.Redis.from_url(request.getfixturevalue("redis_url")), tmp_path / host, keep=keep
    )
    connection.flushdb()


def _plugin_file(tmp_path: Path, content: bytes, name: str = "new.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_empty_store_has_no_current_and_no_versions(make_store: MakeStore) -> None:
    store = make_store()
    assert store.current("7") is None
    assert store.list("7") == []
    assert store.list() == []
    assert store.projects() == []
    assert store.next_name("7") == "stable-sam-p7-v1"


def test_write_promoted_version_becomes_current(tmp_path: Path, make_store: MakeStore) -> None:
    store = make_store()
    version = store.write(
        "7", _plugin_file(tmp_path, b"weights-1"), {"base": "mini"}, {"miou": 0.8}, True, "first"
    )
    assert store.current("7") == version
    assert store.plugin_file(version).read_bytes() == b"weights-1"
    assert version.metrics == {"miou": 0.8}
    assert version.metadata == {"base": "mini"}
    assert version.name == "stable-sam-p7-v1"
    assert version.sha256 == hashlib.sha256(b"weights-1").hexdigest()


def test_not_promoted_version_is_listed_but_not_current(
    tmp_path: Path, make_store: MakeStore
) -> None:
    store = make_store()
    first = store.write("7", _plugin_file(tmp_path, b"a"), {}, {"miou": 0.8}, True, "first")
    worse = store.write("7", _plugin_file(tmp_path, b"b"), {}, {"miou": 0.5}, False, "worse")
    assert store.current("7") == first
    assert [v.name for v in store.list("7")] == [first.name, worse.name]
    assert store.list("7")[1].reason == "worse"
    assert store.next_name("7") == "stable-sam-p7-v3"


def test_projects_are_independent(tmp_path: Path, make_store: MakeStore) -> None:
    store = make_store()
    a = store.write("7", _plugin_file(tmp_path, b"a"), {}, {}, True, "ok")
    b = store.write("12", _plugin_file(tmp_path, b"b"), {}, {}, True, "ok")
    assert store.current("7") == a
    assert store.current("12") == b
    assert {v.name for v in store.list()} == {a.name, b.name}
    assert store.projects() == ["7", "12"]
    assert store.plugin_file(a).read_bytes() == b"a"
    assert store.plugin_file(b).read_bytes() == b"b"


def test_prune_keeps_newest_and_the_current_version(tmp_path: Path, make_store: MakeStore) -> None:
    store = make_store(keep=2)
    served = store.write("7", _plugin_file(tmp_path, b"0"), {}, {}, True, "ok")
    written = [
        store.write("7", _plugin_file(tmp_path, str(i).encode()), {}, {}, False, "worse")
        for i in range(4)
    ]
    names = [v.name for v in store.list("7")]
    assert names == [served.name, "stable-sam-p7-v4", "stable-sam-p7-v5"]
    assert store.current("7") == served
    assert store.plugin_file(served).read_bytes() == b"0"
    for pruned in written[:2]:
        with pytest.raises(FileNotFoundError):
            store.plugin_file(pruned)


def test_names_are_never_reused_after_pruning(tmp_path: Path, make_store: MakeStore) -> None:
    store = make_store(keep=1)
    names = [
        store.write("7", _plugin_file(tmp_path, b"x"), {}, {}, True, "ok").name for _ in range(3)
    ]
    assert names == ["stable-sam-p7-v1", "stable-sam-p7-v2", "stable-sam-p7-v3"]
    assert [v.name for v in store.list("7")] == ["stable-sam-p7-v3"]


def test_a_second_store_sees_new_versions(tmp_path: Path, make_store: MakeStore) -> None:
    # Two processes on one host (local), or two hosts that share only Redis.
    writer, reader = make_store("a"), make_store("b")
    assert reader.current("7") is None
    v1 = writer.write("7", _plugin_file(tmp_path, b"1"), {}, {}, True, "ok")
    assert (reader.current("7").name, reader.current("7").sha256) == (v1.name, v1.sha256)
    v2 = writer.write("7", _plugin_file(tmp_path, b"2"), {}, {}, True, "ok")
    assert (reader.current("7").name, reader.current("7").sha256) == (v2.name, v2.sha256)
    assert reader.plugin_file(reader.current("7")).read_bytes() == b"2"


def test_concurrent_writers_get_distinct_names_and_lose_nothing(
    tmp_path: Path, make_store: MakeStore
) -> None:
    stores = [make_store("a", keep=50), make_store("b", keep=50)]
    barrier = threading.Barrier(2)
    written: list[str] = []

    def write_many(store: VersionStore, tag: str) -> None:
        barrier.wait()
        for i in range(10):
            path = _plugin_file(tmp_path, f"{tag}{i}".encode(), f"{tag}{i}.safetensors")
            written.append(store.write("7", path, {"tag": tag}, {}, True, "ok").name)

    threads = [
        threading.Thread(target=write_many, args=(s, t)) for s, t in zip(stores, "ab", strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    listed = stores[0].list("7")
    assert sorted(written) == sorted(v.name for v in listed)
    assert {v.name for v in listed} == {f"stable-sam-p7-v{i}" for i in range(1, 21)}
    for version in listed:
        assert stores[1].plugin_file(version).read_bytes().decode()[0] == version.metadata["tag"]


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
    store = LocalVersionStore(tmp_path / "versions")

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


def test_unserialisable_metadata_is_refused_before_anything_is_written(
    tmp_path: Path, make_store: MakeStore
) -> None:
    store = make_store()
    with pytest.raises(TypeError):
        store.write("7", _plugin_file(tmp_path, b"x"), {"bad": object()}, {}, True, "ok")
    assert store.list("7") == []
    assert store.projects() == []
    assert [p.name for p in tmp_path.rglob("*.safetensors")] == ["new.safetensors"]


@pytest.mark.parametrize("project", ["../etc", "7.1700000000", "", "a"])
def test_non_numeric_project_ids_are_refused(
    tmp_path: Path, make_store: MakeStore, project: str
) -> None:
    with pytest.raises(ValueError):
        check_project(project)
    store = make_store()
    with pytest.raises(ValueError):
        store.current(project)
    with pytest.raises(ValueError):
        store.write(project, _plugin_file(tmp_path, b"x"), {}, {}, True, "ok")


def _slow_writer(root: str, plugin: str) -> None:
    """Child process: start writing a version, then get killed mid-copy (see the test)."""
    import runtime.versions.files as files

    real_fsync = os.fsync

    def fsync_then_hang(fd: int) -> None:
        real_fsync(fd)
        time.sleep(60)

    files.os.fsync = fsync_then_hang  # type: ignore[attr-defined]
    LocalVersionStore(root).write("7", plugin, {}, {}, True, "killed run")


def test_writer_killed_mid_write_leaves_previous_version_served(tmp_path: Path) -> None:
    root = tmp_path / "versions"
    store = LocalVersionStore(root)
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

    fresh = LocalVersionStore(root)
    assert fresh.current("7") == served
    assert [v.name for v in fresh.list("7")] == [served.name]
    assert json.loads((folder / MANIFEST).read_text())["versions"][0]["name"] == served.name
    # The next write works normally and removes the killed writer's temp file.
    nxt = fresh.write("7", _plugin_file(tmp_path, b"next"), {}, {}, True, "ok")
    assert fresh.current("7") == nxt
    assert nxt.name == "stable-sam-p7-v2"
    assert not list(folder.glob(".*.tmp"))


# --- the Redis store only ------------------------------------------------------------------


@pytest.fixture
def redis_store(tmp_path: Path, redis_url: str) -> Iterator[RedisVersionStore]:
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield RedisVersionStore(connection, tmp_path / "host-a")
    connection.flushdb()


def test_redis_store_keeps_one_local_copy_per_listed_version(
    tmp_path: Path, redis_store: RedisVersionStore
) -> None:
    reader = RedisVersionStore(redis_store._redis, tmp_path / "host-b", keep=2)
    writer = RedisVersionStore(redis_store._redis, tmp_path / "host-a", keep=2)
    for i in range(4):
        writer.write("7", _plugin_file(tmp_path, f"w{i}".encode()), {}, {}, True, "ok")
        reader.plugin_file(reader.current("7"))
    copies = sorted(p.name for p in (tmp_path / "host-b" / "7").iterdir())
    assert copies == sorted(v.path.name for v in reader.list("7"))
    # Pruned versions are gone from Redis too: only the kept files are stored.
    keys = sorted(k.decode() for k in redis_store._redis.keys(f"{PREFIX}:7:file:*"))
    assert keys == sorted(file_key("7", v.name) for v in reader.list("7"))


def test_redis_store_refuses_a_file_whose_bytes_do_not_match_the_manifest(
    tmp_path: Path, redis_store: RedisVersionStore
) -> None:
    version = redis_store.write("7", _plugin_file(tmp_path, b"good"), {}, {}, True, "ok")
    redis_store._redis.set(file_key("7", version.name), b"tampered")
    other_host = RedisVersionStore(redis_store._redis, tmp_path / "host-b")
    with pytest.raises(ValueError, match="SHA-256"):
        other_host.plugin_file(other_host.current("7"))
    assert not list((tmp_path / "host-b").rglob("*.safetensors"))


def test_redis_store_malformed_manifest_is_a_value_error_naming_the_project(
    redis_store: RedisVersionStore,
) -> None:
    redis_store._redis.set(manifest_key("7"), b"{not json")
    with pytest.raises(ValueError, match="project 7"):
        redis_store.current("7")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_store_serves_what_it_read_while_redis_is_down(tmp_path: Path) -> None:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("this test starts (and stops) its own redis-server: install redis-server")
    port = _free_port()
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    process = subprocess.Popen([*command, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        connection = redis_connection(f"redis://127.0.0.1:{port}/0")
        deadline = time.monotonic() + 10
        while True:
            try:
                connection.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        store = RedisVersionStore(connection, tmp_path / "host")
        served = store.write("7", _plugin_file(tmp_path, b"w"), {}, {}, True, "ok")
        assert store.current("7") == served
    finally:
        process.kill()
        process.wait()
    # Redis is gone: the manifest read before is still served (predictions go on) ...
    assert store.current("7") == served
    assert store.plugin_file(served).read_bytes() == b"w"
    # ... a project never read cannot be answered, and nothing can be written.
    with pytest.raises(VersionStoreUnavailableError, match=f"127.0.0.1:{port}/0"):
        store.current("8")
    with pytest.raises(VersionStoreUnavailableError):
        store.write("7", _plugin_file(tmp_path, b"x"), {}, {}, True, "ok")
    with pytest.raises(VersionStoreUnavailableError):
        store.projects()
