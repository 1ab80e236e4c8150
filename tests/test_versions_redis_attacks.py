"""What someone who can write the Redis of ``VERSIONS_STORE=redis`` can do to the store and the
backend: make masks wrong, but never a 500, a path outside ``VERSIONS_DIR``, an unbounded
download, or a file left behind for ever (found by a review of the two-host change)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

import runtime.versions.shared as shared
from backend.app import create_app
from runtime.settings import Settings
from runtime.versions.shared import RedisVersionStore, file_key, manifest_key
from tests.backend_support import CONFIG, FakeLabelStudio, kp, png_bytes, scene

ENTRY = {
    "name": "stable-sam-p7-v1",
    "file": "stable-sam-p7-v1.safetensors",
    "created": "2026-12-02T00:00:00+00:00",
    "promoted": True,
    "metrics": {},
    "reason": "ok",
    "metadata": {},
    "sha256": hashlib.sha256(b"w").hexdigest(),
}
MALFORMED = {
    "not json": b"{x",
    "metrics null": json.dumps({"next_sequence": 2, "versions": [{**ENTRY, "metrics": None}]}),
    "next_sequence Infinity": b'{"next_sequence": Infinity, "versions": []}',
    "next_sequence 1e400": b'{"next_sequence": 1e400, "versions": []}',
    "entry not an object": json.dumps({"next_sequence": 2, "versions": [7]}),
    "another project's name": json.dumps(
        {"next_sequence": 2, "versions": [{**ENTRY, "name": "stable-sam-p8-v1"}]}
    ),
    "no sha256": json.dumps({"next_sequence": 2, "versions": [{**ENTRY, "sha256": ""}]}),
    "versions not a list": json.dumps({"next_sequence": 2, "versions": {"a": 1}}),
}


@pytest.fixture
def connection(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    yield conn
    conn.flushdb()


@pytest.mark.parametrize("manifest", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_manifest_is_a_value_error_naming_the_project(
    connection: redis.Redis, tmp_path: Path, manifest: bytes
) -> None:
    connection.set(manifest_key("7"), manifest)
    store = RedisVersionStore(connection, tmp_path)
    for _ in range(2):  # parsed once, the same error again
        with pytest.raises(ValueError, match="project 7"):
            store.current("7")
    with pytest.raises(ValueError):
        store.next_name("7")


def test_the_manifest_s_file_field_never_chooses_a_path(
    connection: redis.Redis, tmp_path: Path
) -> None:
    entry = {**ENTRY, "file": "../../../outside.safetensors"}
    connection.set(manifest_key("7"), json.dumps({"next_sequence": 2, "versions": [entry]}))
    connection.set(file_key("7", ENTRY["name"]), b"w")
    store = RedisVersionStore(connection, tmp_path / "copies")
    path = store.plugin_file(store.current("7"))
    assert path.parent == tmp_path / "copies" / "7"
    assert path.name == f"stable-sam-p7-v1-{ENTRY['sha256'][:12]}.safetensors"
    assert [p.name for p in tmp_path.rglob("*outside*")] == []


def test_an_oversized_file_is_refused_without_downloading_it_and_not_asked_again_at_once(
    connection: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared, "MAX_PLUGIN_BYTES", 1000)
    connection.set(manifest_key("7"), json.dumps({"next_sequence": 2, "versions": [ENTRY]}))
    connection.set(file_key("7", ENTRY["name"]), b"x" * 5000)
    store = RedisVersionStore(connection, tmp_path)
    reads: list[int] = []
    real = store._get_bounded

    def counting(key: str, limit: int, what: str) -> bytes | None:
        data = real(key, limit, what)
        reads.append(len(data or b""))
        return data

    monkeypatch.setattr(store, "_get_bounded", counting)
    version = store.current("7")
    reads.clear()
    with pytest.raises(ValueError, match="over 1000 bytes"):
        store.plugin_file(version)
    assert reads == []  # raised inside: nothing over the limit + 1 was returned ...
    connection.set(file_key("7", ENTRY["name"]), b"w")  # ... and the good file is not
    with pytest.raises(ValueError, match="over 1000 bytes"):  # fetched during the back-off
        store.plugin_file(version)
    monkeypatch.setattr(shared, "RETRY_AFTER_S", 0.0)
    store._failed_files.clear()
    assert store.plugin_file(version).read_bytes() == b"w"


def test_an_oversized_manifest_is_malformed(
    connection: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared, "MAX_MANIFEST_BYTES", 100)
    connection.set(manifest_key("7"), b" " * 500)
    with pytest.raises(ValueError, match="over 100 bytes"):
        RedisVersionStore(connection, tmp_path).current("7")


def test_files_the_manifest_does_not_list_are_pruned_from_the_host_s_copies(
    connection: redis.Redis, tmp_path: Path
) -> None:
    store = RedisVersionStore(connection, tmp_path / "copies")
    (tmp_path / "copies" / "7").mkdir(parents=True)
    junk = tmp_path / "copies" / "7" / "junk"
    junk.write_bytes(b"left by an older release")
    source = tmp_path / "p.safetensors"
    source.write_bytes(b"w")
    version = store.write("7", source, {}, {}, True, "ok")
    assert sorted(p.name for p in (tmp_path / "copies" / "7").iterdir()) == [version.path.name]


# --- through the backend --------------------------------------------------------------------


@pytest.fixture
def app(redis_url: str, connection: redis.Redis, tmp_path: Path) -> Iterator[TestClient]:
    with FakeLabelStudio() as ls:
        image, _ = scene(96, 128)
        ls.files["scene.png"] = png_bytes(image)
        settings = Settings(
            label_studio_url=ls.url,
            sam_model_type="mini",
            sam_allow_random_weights=True,
            preload_model=False,
            device="cpu",
            redis_url=redis_url,
            versions_store="redis",
            versions_dir=tmp_path / "versions",
        )
        with TestClient(create_app(settings)) as client:
            yield client


@pytest.mark.parametrize("manifest", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_manifest_never_makes_the_backend_answer_500(
    app: TestClient, connection: redis.Redis, manifest: bytes
) -> None:
    connection.set(manifest_key("7"), manifest)
    connection.sadd(shared.PROJECTS_KEY, "7")
    setup = app.post("/setup", json={"project": "7.1700000000", "schema": CONFIG})
    assert setup.status_code == 200
    default = setup.json()["model_version"]
    assert not default.startswith("stable-sam-p7")  # the default version is served
    body = {
        "tasks": [{"id": 1, "data": {"img": "/public/scene.png"}}],
        "project": "7.1700000000",
        "label_config": CONFIG,
        "params": {"context": {"result": [kp(40, 40, positive=True)]}},
    }
    answer = app.post("/predict", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["model_version"] == default
    one = app.get("/versions", params={"project": "7"})
    assert one.status_code == 502 and one.json()["error"] == "versions_malformed"
    assert app.get("/versions").json() == {"versions": []}  # the others are still listed
    status = app.get("/status/7")
    assert status.status_code == 200
    assert status.json()["current_version"] is None
    assert "project 7" in status.json()["versions_error"]
    assert app.get("/status").status_code == 200


def test_a_version_pruned_between_manifest_and_file_is_looked_up_again(tmp_path: Path) -> None:
    """Another process of the host promoted a newer version and pruned the copy this request
    was about to open: the manifest read again names what to serve."""
    from backend.model_server import ModelServer
    from runtime.versions import PluginVersion

    server = ModelServer(Settings(versions_dir=tmp_path, plugins_enabled=True))
    old = PluginVersion("7", "stable-sam-p7-v1", tmp_path / "x", "t", True, {}, "ok", {}, "0" * 64)
    answers = [old, None]  # the first read names v1, the second (after v1's pruning) nothing

    class Store:
        def current(self, project: str) -> PluginVersion | None:
            return answers.pop(0)

        def plugin_file(self, version: PluginVersion) -> Path:
            raise FileNotFoundError(f"plugin file of version {version.name} is gone (pruned?)")

    server._versions = Store()  # type: ignore[assignment]
    choice = server.plugins_for("7")
    assert choice.plugins is None and choice.model_version == server.spec.version
    assert answers == []  # asked twice
