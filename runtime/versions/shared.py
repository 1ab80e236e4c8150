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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from runtime.project_ids import normalize_project_id
from runtime.queue.connection import MALFORMED, transaction
from runtime.versions.base import (
    PLUGIN_SUFFIX,
    PluginVersion,
    VersionStore,
    VersionStoreUnavailableError,
    check_project,
    file_sha256,
    version_name,
)
from runtime.versions.files import atomic_write_bytes, delete_files

logger = logging.getLogger(__name__)

PREFIX = "stable-sam:versions"
PROJECTS_KEY = f"{PREFIX}:projects"
# A plugin file larger than this is refused (ours are ~330 KB; Redis strings stop at 512 MB).
MAX_PLUGIN_BYTES = 64 * 1024 * 1024
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

    def _unavailable(self, exc: Exception) -> VersionStoreUnavailableError:
        kwargs = self._redis.connection_pool.connection_kwargs
        where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
        return VersionStoreUnavailableError(
            f"the versions store in Redis at {where} does not answer ({type(exc).__name__})"
        )

    # --- reading -------------------------------------------------------------------------

    def _versions(self, project: str) -> list[PluginVersion]:
        return list(self._load(project).versions)

    def next_name(self, project: str) -> str:
        return version_name(project, self._load(check_project(project)).next_sequence)

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
            raw = self._redis.get(manifest_key(project))
        except redis.RedisError as exc:
            with self._lock:
                first_failure = time.monotonic() >= self._down_until
                self._down_until = time.monotonic() + RETRY_AFTER_S
            if seen is None:
                raise self._unavailable(exc) from exc
            if first_failure:
                logger.warning("%s; serving the versions read before", self._unavailable(exc))
            return seen
        if seen is not None and seen.raw == raw:
            return seen
        parsed = self._parse(project, raw)
        with self._lock:
            self._seen[project] = parsed
        return parsed

    def _parse(self, project: str, raw: bytes | None) -> _Manifest:
        if raw is None:
            return _Manifest(None, [], 1)
        try:
            data = json.loads(raw)
            versions = [
                PluginVersion.from_manifest_entry(project, entry, self.cache_dir / project)
                for entry in data["versions"]
            ]
            return _Manifest(raw, versions, int(data["next_sequence"]))
        except MALFORMED as exc:
            raise ValueError(
                f"the versions manifest of project {project} in Redis is malformed: {exc}"
            ) from exc

    def plugin_file(self, version: PluginVersion) -> Path:
        path = self.cache_dir / check_project(version.project) / version.path.name
        if path.is_file():
            return path
        try:
            data = self._redis.get(file_key(version.project, version.name))
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        if data is None:
            raise FileNotFoundError(f"plugin file of version {version.name} is gone (pruned?)")
        if file_sha256(data) != version.sha256:
            raise ValueError(
                f"plugin file of version {version.name} in Redis does not match its manifest's "
                "SHA-256"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        self._prune_cache(version.project)
        return path

    def _prune_cache(self, project: str) -> None:
        """Delete this host's copies of versions the manifest no longer lists. Copies newer
        than the manifest read last (another process of this host may have just fetched
        one) are left alone, and so are temp files (their writer may be mid-write)."""
        listed = self._load(project).versions
        if not listed:
            return
        newest = max(_sequence(v.path.name) or 0 for v in listed)
        folder = self.cache_dir / project
        if not folder.is_dir():
            return
        keep = {v.path.name for v in listed}
        keep |= {
            p.name
            for p in folder.glob(f"*{PLUGIN_SUFFIX}")
            if (_sequence(p.name) or newest + 1) > newest
        }
        delete_files(folder, PLUGIN_SUFFIX, keep, temp_files=False)

    # --- writing -------------------------------------------------------------------------

    def write(
        self,
        project: str,
        plugin_path_tmp: str | Path,
        metadata: dict[str, Any],
        metrics: dict[str, Any],
        promote: bool,
        reason: str,
    ) -> PluginVersion:
        check_project(project)
        source = Path(plugin_path_tmp)
        if not source.is_file():
            raise FileNotFoundError(f"plugin file {source} does not exist")
        # Fail before touching anything if the metadata cannot be stored.
        json.dumps({"metadata": metadata, "metrics": metrics})
        data = source.read_bytes()
        if len(data) > MAX_PLUGIN_BYTES:
            raise ValueError(
                f"plugin file {source.name} is {len(data)} bytes, over the {MAX_PLUGIN_BYTES} "
                "a version in Redis may have"
            )
        sha256 = file_sha256(data)
        created = datetime.now(UTC).isoformat(timespec="seconds")

        def body(pipe: Any) -> PluginVersion:
            seen = self._parse(project, pipe.get(manifest_key(project)))
            name = version_name(project, seen.next_sequence)
            version = PluginVersion(
                project=project,
                name=name,
                path=self.cache_dir / project / f"{name}-{sha256[:12]}{PLUGIN_SUFFIX}",
                created=created,
                promoted=bool(promote),
                metrics=dict(metrics),
                reason=reason,
                metadata=dict(metadata),
                sha256=sha256,
            )
            kept = self._prune_list([*seen.versions, version])
            manifest = {
                "project": project,
                "next_sequence": seen.next_sequence + 1,
                "versions": [v.manifest_entry() for v in kept],
            }
            pipe.multi()
            pipe.set(file_key(project, name), data)
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
        atomic_write_bytes(version.path, data)
        self._prune_cache(project)
        logger.info(
            "project %s: wrote version %s to Redis (promoted=%s, reason=%s)",
            project,
            version.name,
            promote,
            reason,
        )
        return version
