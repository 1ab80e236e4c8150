"""Per-project plugin versions in a folder on this host's disk (``VERSIONS_STORE=local``).

Layout under ``root``::

    <project>/manifest.json            the list of versions, newest last (written last)
    <project>/<name>.safetensors       one plugin file per version
    <project>/.lock                    serialises writers of that project

``write`` copies the new plugin file in under a temporary name, fsyncs it, ``os.replace``-s it
into place and only then replaces the manifest the same way; old versions are pruned after the
manifest no longer lists them. So a reader that goes through the manifest never sees a partial
plugin file, and a writer killed at any point leaves the previous manifest (and every file it
names) intact.

Readers are lock-free: ``current`` and ``list`` re-read a manifest only when its inode or mtime
changed, so the backend can call ``current(project)`` on every prediction.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.project_ids import normalize_project_id
from runtime.versions.base import (
    PLUGIN_SUFFIX,
    NewFile,
    PluginVersion,
    VersionStore,
    check_project,
    next_sequence_of,
    version_name,
)
from runtime.versions.files import atomic_write_bytes, delete_files, is_temp_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class _CachedManifest:
    stamp: tuple[int, int, int]  # (inode, mtime_ns, size)
    versions: list[PluginVersion]
    next_sequence: int


class LocalVersionStore(VersionStore):
    """Plugin versions of every project under the folder ``root``."""

    def __init__(self, root: str | Path, keep: int = 5) -> None:
        super().__init__(keep)
        self.root = Path(root)
        self._cache: dict[str, _CachedManifest] = {}
        self._cache_lock = threading.Lock()

    # --- reading -------------------------------------------------------------------------

    def _versions(self, project: str) -> list[PluginVersion]:
        return list(self._load(project).versions)

    def next_name(self, project: str) -> str:
        return version_name(project, self._load(check_project(project)).next_sequence)

    def projects(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [
            p.name
            for p in self.root.iterdir()
            if normalize_project_id(p.name) == p.name and (p / MANIFEST).is_file()
        ]
        return sorted(found, key=int)

    def plugin_file(self, version: PluginVersion) -> Path:
        if not version.path.is_file():
            raise FileNotFoundError(f"plugin file of version {version.name} is gone (pruned?)")
        return version.path

    def _load(self, project: str) -> _CachedManifest:
        path = self.root / check_project(project) / MANIFEST
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
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = data.get("versions", []) if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise ValueError("versions must be a list")
            versions = [
                PluginVersion.from_manifest_entry(project, entry, path.parent) for entry in entries
            ]
            if "next_sequence" not in data:  # manifests before it was recorded
                data["next_sequence"] = len(versions) + 1
            loaded = _CachedManifest(stamp, versions, next_sequence_of(data))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"the versions manifest {path} is malformed: {exc}") from exc
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

    def _add(
        self, project: str, new: NewFile, make: Callable[[str, Path], PluginVersion]
    ) -> PluginVersion:
        with self._project_lock(project) as folder:
            manifest = self._load(project)
            sequence = manifest.next_sequence
            name = version_name(project, sequence)
            target = folder / f"{name}{PLUGIN_SUFFIX}"
            atomic_write_bytes(target, new.data)
            version = make(name, target)
            kept = self._prune_list([*manifest.versions, version])
            self._write_manifest(folder, kept, sequence + 1)
            # Versions pruned from the manifest, and temp files of writers killed mid-write
            # (this one holds the project's lock: no other is writing).
            keep = {v.path.name for v in kept}
            delete_files(
                folder,
                lambda p: (p.suffix == PLUGIN_SUFFIX and p.name not in keep) or is_temp_file(p),
            )
        return version

    def _write_manifest(
        self, folder: Path, versions: list[PluginVersion], next_sequence: int
    ) -> None:
        data = {
            "project": folder.name,
            "next_sequence": next_sequence,
            "versions": [v.manifest_entry() for v in versions],
        }
        atomic_write_bytes(folder / MANIFEST, json.dumps(data, indent=2).encode("utf-8"))
