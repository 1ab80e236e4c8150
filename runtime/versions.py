"""Per-project Stable-SAM plugin versions on disk.

Layout under ``root``::

    <project>/manifest.json            the list of versions, newest last (written last)
    <project>/<name>.safetensors       one plugin file per version
    <project>/.lock                    serialises writers of that project

A version is a plugin file plus its metadata and validation metrics. ``write`` copies the new
plugin file in under a temporary name, fsyncs it, ``os.replace``-s it into place and only then
replaces the manifest the same way; old versions are pruned after the manifest no longer lists
them. So a reader that goes through the manifest never sees a partial plugin file, and a writer
killed at any point leaves the previous manifest (and every file it names) intact.

Readers are lock-free: ``current`` and ``list`` re-read a manifest only when its inode or mtime
changed, so the backend can call ``current(project)`` on every prediction.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from labelstudio.errors import quoted
from runtime.project_ids import normalize_project_id

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PLUGIN_SUFFIX = ".safetensors"
# Validation metrics written before the training job named its prompt kinds as the evaluation
# protocol does (``training.evaluation``: points_1, not 1_point); read with today's names.
_RENAMED_METRICS = {"miou_1_point": "miou_points_1", "miou_3_points": "miou_points_3"}


@dataclass(frozen=True)
class PluginVersion:
    """One trained plugin version of one project.

    ``name`` is the Label Studio ``model_version`` string; ``path`` the ``.safetensors`` plugin
    file; ``created`` an ISO-8601 UTC time; ``promoted`` whether it was (or is) the served
    version; ``metrics`` validation metrics; ``reason`` why it was or was not promoted;
    ``metadata`` what the training job recorded (base model, data counts, train config).
    """

    project: str
    name: str
    path: Path
    created: str
    promoted: bool
    metrics: dict[str, Any]
    reason: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (for ``/status`` and reports); ``path`` as a string."""
        return {
            "project": self.project,
            "name": self.name,
            "path": str(self.path),
            "created": self.created,
            "promoted": self.promoted,
            "metrics": self.metrics,
            "reason": self.reason,
            "metadata": self.metadata,
        }


def version_name(project: str, sequence: int) -> str:
    """The ``model_version`` string of the ``sequence``-th version of ``project``."""
    return f"stable-sam-p{project}-v{sequence}"


def check_project(project: str) -> str:
    """Return ``project`` if it is a canonical Label Studio project id ("7"), else raise
    ``ValueError``.

    Project ids become directory names, so anything but the one spelling of
    ``runtime.project_ids.normalize_project_id`` is refused: "07" would be a second folder of
    project 7.
    """
    if not isinstance(project, str) or normalize_project_id(project) != project:
        raise ValueError(
            f"project must be a canonical numeric Label Studio project id, got {quoted(str(project))}"
        )
    return project


def _current_metric_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` (nested dicts, e.g. ``{"new": {...}, "current": {...}}``) with every key of
    ``_RENAMED_METRICS`` under its new name; values unchanged."""
    return {
        _RENAMED_METRICS.get(key, key): _current_metric_names(value)
        if isinstance(value, dict)
        else value
        for key, value in metrics.items()
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(target: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write ``target`` through a temp file in the same folder (filled by ``fill``, fsynced)
    and ``os.replace``: a reader sees the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    _atomic_write(target, lambda out: out.write(data))


def _atomic_copy(source: Path, target: Path) -> None:
    def fill(out: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, out)

    _atomic_write(target, fill)


@dataclass
class _CachedManifest:
    stamp: tuple[int, int, int]  # (inode, mtime_ns, size)
    versions: list[PluginVersion]
    next_sequence: int


class VersionStore:
    """Plugin versions of every project under ``root``, ``keep`` newest kept per project.

    Pruning keeps the ``keep`` newest versions plus the current (newest promoted) one, so the
    served version is never deleted even when several newer runs were not promoted.
    """

    def __init__(self, root: str | Path, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self._cache: dict[str, _CachedManifest] = {}
        self._cache_lock = threading.Lock()

    # --- reading -------------------------------------------------------------------------

    def current(self, project: str) -> PluginVersion | None:
        """The newest promoted version of ``project``, or ``None`` if it has none."""
        for version in reversed(self._load(project).versions):
            if version.promoted:
                return version
        return None

    def list(self, project: str | None = None) -> list[PluginVersion]:
        """Versions of ``project`` (oldest first), or of every project when ``None``."""
        if project is not None:
            return list(self._load(project).versions)
        versions: list[PluginVersion] = []
        for name in self.projects():
            versions.extend(self._load(name).versions)
        return versions

    def next_name(self, project: str) -> str:
        """The name the next ``write`` of ``project`` will get (one writer per project)."""
        return version_name(project, self._load(project).next_sequence)

    def projects(self) -> list[str]:
        """Projects that have a manifest, in numeric order."""
        if not self.root.is_dir():
            return []
        found = [
            p.name
            for p in self.root.iterdir()
            if normalize_project_id(p.name) == p.name and (p / MANIFEST).is_file()
        ]
        return sorted(found, key=int)

    def _manifest_path(self, project: str) -> Path:
        return self.root / check_project(project) / MANIFEST

    def _load(self, project: str) -> _CachedManifest:
        path = self._manifest_path(project)
        try:
            st = path.stat()
        except FileNotFoundError:
            return _CachedManifest((0, 0, 0), [], 1)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            cached = self._cache.get(project)
            if cached is not None and cached.stamp == stamp:
                return cached
        # os.replace swaps the whole file, so this read sees one complete manifest.
        data = json.loads(path.read_text(encoding="utf-8"))
        versions = [
            PluginVersion(
                project=project,
                name=entry["name"],
                path=path.parent / entry["file"],
                created=entry["created"],
                promoted=bool(entry["promoted"]),
                metrics=_current_metric_names(entry.get("metrics", {})),
                reason=str(entry.get("reason", "")),
                metadata=dict(entry.get("metadata", {})),
            )
            for entry in data.get("versions", [])
        ]
        loaded = _CachedManifest(stamp, versions, int(data.get("next_sequence", len(versions) + 1)))
        with self._cache_lock:
            self._cache[project] = loaded
        return loaded

    # --- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _project_lock(self, project: str) -> Iterator[Path]:
        folder = self.root / check_project(project)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a+") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield folder
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def write(
        self,
        project: str,
        plugin_path_tmp: str | Path,
        metadata: dict[str, Any],
        metrics: dict[str, Any],
        promote: bool,
        reason: str,
    ) -> PluginVersion:
        """Add a new version of ``project`` from the plugin file at ``plugin_path_tmp``.

        The file is copied (the caller keeps and may delete its temp file). ``metadata`` and
        ``metrics`` must be JSON-serialisable. Returns the new version; it is served from the
        moment this returns if ``promote`` is true.
        """
        source = Path(plugin_path_tmp)
        if not source.is_file():
            raise FileNotFoundError(f"plugin file {source} does not exist")
        # Fail before touching anything if the metadata cannot be stored.
        json.dumps({"metadata": metadata, "metrics": metrics})
        with self._project_lock(project) as folder:
            manifest = self._load(project)
            sequence = manifest.next_sequence
            name = version_name(project, sequence)
            target = folder / f"{name}{PLUGIN_SUFFIX}"
            _atomic_copy(source, target)
            version = PluginVersion(
                project=project,
                name=name,
                path=target,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                promoted=bool(promote),
                metrics=dict(metrics),
                reason=reason,
                metadata=dict(metadata),
            )
            kept = self._prune_list([*manifest.versions, version])
            self._write_manifest(folder, kept, sequence + 1)
            self._delete_unlisted(folder, kept)
        logger.info(
            "project %s: wrote version %s (promoted=%s, reason=%s)", project, name, promote, reason
        )
        return version

    def _prune_list(self, versions: list[PluginVersion]) -> list[PluginVersion]:
        newest = versions[-self.keep :]
        current = next((v for v in reversed(versions) if v.promoted), None)
        keep_names = {v.name for v in newest}
        if current is not None:
            keep_names.add(current.name)
        return [v for v in versions if v.name in keep_names]

    def _write_manifest(
        self, folder: Path, versions: list[PluginVersion], next_sequence: int
    ) -> None:
        data = {
            "project": folder.name,
            "next_sequence": next_sequence,
            "versions": [
                {
                    "name": v.name,
                    "file": v.path.name,
                    "created": v.created,
                    "promoted": v.promoted,
                    "metrics": v.metrics,
                    "reason": v.reason,
                    "metadata": v.metadata,
                }
                for v in versions
            ],
        }
        _atomic_write_bytes(folder / MANIFEST, json.dumps(data, indent=2).encode("utf-8"))

    def _delete_unlisted(self, folder: Path, kept: list[PluginVersion]) -> None:
        """Remove plugin files (and stray temp files) the manifest no longer names."""
        keep_files = {v.path.name for v in kept}
        for path in folder.iterdir():
            stale_plugin = path.suffix == PLUGIN_SUFFIX and path.name not in keep_files
            stale_temp = path.name.startswith(".") and path.name.endswith(".tmp")
            if stale_plugin or stale_temp:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                logger.info("pruned %s", path)
