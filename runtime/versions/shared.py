"""Per-project plugin versions in Redis, seen by every host of a deployment
(``VERSIONS_STORE=redis``).

Every process of a deployment already shares one Redis (the training queue), and a plugin file
is ~330 KB, so versions live there instead of on a shared disk or an extra object store. Keys::

    stable-sam:versions:<project>:manifest       JSON: next_sequence and the versions, oldest first
    stable-sam:versions:<project>:file:<name>    the plugin file's bytes
    stable-sam:versions:projects                 the set of projects that have versions

``write`` is one WATCH/MULTI transaction on the manifest: the new file, the new manifest and the
deletion of pruned files are applied together or not at all, so a reader sees the old manifest
or the new one with every file it names, and two writers of a project never get one name.

Reading ``current`` costs one GET of the manifest (parsed again only when its bytes changed), so
every replica serves a promoted version from its next request on, without a restart. A plugin
file is copied once to this host's ``cache_dir`` (checked against its SHA-256) and read from
there. While Redis does not answer, the manifest last read is served (and Redis is asked again
after ``RETRY_AFTER_S``), so predictions go on with the versions they had.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from labelstudio.errors import quoted
from runtime.project_ids import normalize_project_id
from runtime.queue.connection import MALFORMED, transaction
from runtime.versions.base import (
    PLUGIN_SUFFIX,
    NewFile,
    PluginVersion,
    VersionStore,
    VersionStoreUnavailableError,
    check_project,
    file_sha256,
    next_sequence_of,
    version_name,
)
from runtime.versions.files import atomic_write_bytes, delete_files, is_temp_file

logger = logging.getLogger(__name__)

PREFIX = "stable-sam:versions"
PROJECTS_KEY = f"{PREFIX}:projects"
# A plugin file larger than this is refused, written or read (ours are ~330 KB); a manifest
# larger than this is malformed (one of 5 versions is ~2 KB). Reads fetch at most one byte
# more, so whoever can write Redis cannot make a host download more.
MAX_PLUGIN_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
# After Redis failed to answer, serve what was read before for this long before asking again.
RETRY_AFTER_S = 5.0


def manifest_key(project: str) -> str:
    return f"{PREFIX}:{project}:manifest"


def file_key(project: str, name: str) -> str:
    return f"{PREFIX}:{project}:file:{name}"


@dataclass
class _Manifest:
    raw: bytes | None
    versions: list[PluginVersion]
    next_sequence: int
    error: ValueError | None = None  # a malformed manifest: raised again until it changes


def copy_name(name: str, sha256: str) -> str:
    """This host's file name for the copy of version ``name`` (checked names only)."""
    return f"{name}-{sha256[:12]}{PLUGIN_SUFFIX}"


def _sequence(file_name: str) -> int | None:
    """The sequence number in a cached file's name (``stable-sam-p7-v12-<sha>.safetensors``)."""
    try:
        return int(file_name.rsplit("-v", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


class RedisVersionStore(VersionStore):
    """Plugin versions of every project in the Redis of ``connection``; local copies of the
    plugin files under ``cache_dir`` (one folder per project)."""

    def __init__(self, connection: redis.Redis, cache_dir: str | Path, keep: int = 5) -> None:
        super().__init__(keep)
        self._redis = connection
        self.cache_dir = Path(cache_dir)
        self._seen: dict[str, _Manifest] = {}
        self._lock = threading.Lock()
        self._down_until = 0.0
        # (project, name, sha256) -> (monotonic time to try again, the error): a file that
        # could not be fetched is not downloaded again on every request.
        self._failed_files: dict[tuple[str, str, str], tuple[float, Exception]] = {}

    def _unavailable(self, exc: Exception) -> VersionStoreUnavailableError:
        kwargs = self._redis.connection_pool.connection_kwargs
        where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
        return VersionStoreUnavailableError(
            f"the versions store in Redis at {where} does not answer ({type(exc).__name__})"
        )

    # --- reading -------------------------------------------------------------------------

    def _versions(self, project: str) -> list[PluginVersion]:
        manifest = self._load(project)
        if manifest.error is not None:
            raise manifest.error
        return list(manifest.versions)

    def _get_bounded(self, key: str, limit: int, what: str) -> bytes | None:
        """The value of ``key`` (``None`` if absent), refused (``ValueError``) when over
        ``limit`` bytes without fetching more than ``limit + 1``."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(key)
            pipe.getrange(key, 0, limit)
            exists, data = pipe.execute()
        if not exists:
            return None
        if len(data) > limit:
            raise ValueError(f"{what} in Redis is over {limit} bytes")
        return data

    def next_name(self, project: str) -> str:
        manifest = self._load(check_project(project))
        if manifest.error is not None:
            raise manifest.error
        return version_name(project, manifest.next_sequence)

    def projects(self) -> list[str]:
        try:
            members = self._redis.smembers(PROJECTS_KEY)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        names = {m.decode("utf-8", "replace") for m in members}
        return sorted((n for n in names if normalize_project_id(n) == n), key=int)

    def _load(self, project: str) -> _Manifest:
        with self._lock:
            seen = self._seen.get(project)
            if seen is not None and time.monotonic() < self._down_until:
                return seen
        try:
            raw = self._get_bounded(
                manifest_key(project), MAX_MANIFEST_BYTES, f"the manifest of project {project}"
            )
        except ValueError as exc:
            raw, error = b"", exc
        except redis.RedisError as exc:
            with self._lock:
                first_failure = time.monotonic() >= self._down_until
                self._down_until = time.monotonic() + RETRY_AFTER_S
            if seen is None:
                raise self._unavailable(exc) from exc
            if first_failure:
                logger.warning("%s; serving the versions read before", self._unavailable(exc))
            return seen
        else:
            error = None
        if seen is not None and seen.raw == raw:
            return seen
        if error is not None:
            parsed = _Manifest(raw, [], 1, error)
        else:
            try:
                parsed = self._parse(project, raw)
            except ValueError as exc:
                logger.error("%s", exc)
                parsed = _Manifest(raw, [], 1, exc)
        with self._lock:
            self._seen[project] = parsed
        return parsed

    def _parse(self, project: str, raw: bytes | None) -> _Manifest:
        if raw is None:
            return _Manifest(None, [], 1)
        try:
            data = json.loads(raw)
            entries = data.get("versions") if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise ValueError("versions must be a list")
            versions = []
            for entry in entries:
                # The copy's name is this host's, from the checked name and hash, never the
                # entry's "file": whoever writes Redis does not choose a path here.
                sha = entry.get("sha256") if isinstance(entry, dict) else None
                name = entry.get("name") if isinstance(entry, dict) else None
                if not isinstance(sha, str) or not sha:
                    raise ValueError(f"version {quoted(str(name))} has no sha256")
                version = PluginVersion.from_manifest_entry(
                    project, entry, self.cache_dir / project, file=copy_name(str(name), sha)
                )
                versions.append(version)
            return _Manifest(raw, versions, next_sequence_of(data))
        except (*MALFORMED, OverflowError) as exc:
            raise ValueError(
                f"the versions manifest of project {project} in Redis is malformed: {exc}"
            ) from exc

    def plugin_file(self, version: PluginVersion) -> Path:
        project = check_project(version.project)
        path = self.cache_dir / project / copy_name(version.name, version.sha256)
        if path.is_file():
            return path
        key = (project, version.name, version.sha256)
        with self._lock:
            failed = self._failed_files.get(key)
        if failed is not None and time.monotonic() < failed[0]:
            raise failed[1]
        try:
            data = self._get_bounded(
                file_key(project, version.name), MAX_PLUGIN_BYTES, f"the file of {version.name}"
            )
            if data is None:
                raise FileNotFoundError(f"plugin file of version {version.name} is gone (pruned?)")
            if file_sha256(data) != version.sha256:
                raise ValueError(
                    f"plugin file of version {version.name} in Redis does not match its "
                    "manifest's SHA-256"
                )
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        except (ValueError, FileNotFoundError) as exc:
            with self._lock:
                self._failed_files = {
                    k: v for k, v in self._failed_files.items() if v[0] > time.monotonic()
                }
                self._failed_files[key] = (time.monotonic() + RETRY_AFTER_S, exc)
            raise
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        self._prune_cache(project)
        return path

    def _prune_cache(self, project: str) -> None:
        """Delete this host's copies of versions the manifest no longer lists, and anything
        else in the folder but temp files (their writer may be mid-write). Copies newer than
        the manifest read last (another process of this host may have just fetched one) are
        left alone."""
        manifest = self._load(project)
        folder = self.cache_dir / project
        if manifest.error is not None or not manifest.versions or not folder.is_dir():
            return
        newest = max(_sequence(v.path.name) or 0 for v in manifest.versions)
        keep = {v.path.name for v in manifest.versions}

        def stale(path: Path) -> bool:
            sequence = _sequence(path.name) if path.suffix == PLUGIN_SUFFIX else None
            newer = sequence is not None and sequence > newest
            return not (path.name in keep or is_temp_file(path) or newer)

        delete_files(folder, stale)

    # --- writing -------------------------------------------------------------------------

    def _add(
        self, project: str, new: NewFile, make: Callable[[str, Path], PluginVersion]
    ) -> PluginVersion:
        if len(new.data) > MAX_PLUGIN_BYTES:
            raise ValueError(
                f"plugin file {new.source.name} is {len(new.data)} bytes, over the "
                f"{MAX_PLUGIN_BYTES} a version in Redis may have"
            )

        def body(pipe: Any) -> PluginVersion:
            seen = self._parse(project, pipe.get(manifest_key(project)))
            name = version_name(project, seen.next_sequence)
            version = make(name, self.cache_dir / project / copy_name(name, new.sha256))
            kept = self._prune_list([*seen.versions, version])
            manifest = {
                "project": project,
                "next_sequence": seen.next_sequence + 1,
                "versions": [v.manifest_entry() for v in kept],
            }
            pipe.multi()
            pipe.set(file_key(project, name), new.data)
            pipe.set(manifest_key(project), json.dumps(manifest))
            kept_names = {v.name for v in kept}
            for old in seen.versions:
                if old.name not in kept_names:
                    pipe.delete(file_key(project, old.name))
            pipe.sadd(PROJECTS_KEY, project)
            return version

        try:
            version, _ = transaction(
                self._redis, [manifest_key(project)], body, f"writing a version of {project}"
            )
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        # This host's copy, so that the writer (the training job) needs no download.
        version.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(version.path, new.data)
        self._prune_cache(project)
        return version
