"""What a plugin version is, and the store interface every process reads versions through.

A version is one trained Stable-SAM plugin file of one project plus its metadata and validation
metrics, listed in the project's manifest (oldest first). Two stores implement the interface:
``runtime.versions.local`` (a folder on one host's disk, the default) and
``runtime.versions.shared`` (Redis, which every host of a deployment already shares). Both
promote atomically (a reader sees the old manifest or the whole new one, and every file it
names), prune by the same rule, and never reuse a name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labelstudio.errors import quoted
from runtime.project_ids import normalize_project_id

logger = logging.getLogger(__name__)

PLUGIN_SUFFIX = ".safetensors"
_NAME = re.compile(r"stable-sam-p[0-9]+-v[0-9]{1,12}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Validation metrics written before the training job named its prompt kinds as the evaluation
# protocol does (``training.evaluation``: points_1, not 1_point); read with today's names.
_RENAMED_METRICS = {"miou_1_point": "miou_points_1", "miou_3_points": "miou_points_3"}


@dataclass(frozen=True)
class NewFile:
    """A plugin file being written as a version: where it came from, its bytes and hash."""

    source: Path
    data: bytes
    sha256: str


class VersionStoreUnavailableError(OSError):
    """The store cannot be read now (e.g. its Redis does not answer) and nothing was read
    before; an ``OSError``, so callers treat it as an unreadable folder."""


@dataclass(frozen=True)
class PluginVersion:
    """One trained plugin version of one project.

    ``name`` is the Label Studio ``model_version`` string; ``path`` the ``.safetensors`` plugin
    file on this host (for a shared store: where ``VersionStore.plugin_file`` puts its local
    copy); ``created`` an ISO-8601 UTC time; ``promoted`` whether it was (or is) the served
    version; ``metrics`` validation metrics; ``reason`` why it was or was not promoted;
    ``metadata`` what the training job recorded (base model, data counts, train config);
    ``sha256`` the plugin file's content hash ("" in manifests written before it was recorded).
    """

    project: str
    name: str
    path: Path
    created: str
    promoted: bool
    metrics: dict[str, Any]
    reason: str
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (for ``/status`` and reports); ``path`` as a string."""
        view = {"project": self.project, **self.manifest_entry(), "path": str(self.path)}
        del view["file"]
        return view

    def manifest_entry(self) -> dict[str, Any]:
        """The version as its manifest lists it (the file by name: stores place files)."""
        return {
            "name": self.name,
            "file": self.path.name,
            "created": self.created,
            "promoted": self.promoted,
            "metrics": self.metrics,
            "reason": self.reason,
            "metadata": self.metadata,
            "sha256": self.sha256,
        }

    @classmethod
    def from_manifest_entry(
        cls, project: str, entry: Any, folder: Path, file: str | None = None
    ) -> PluginVersion:
        """The version a manifest entry describes, its file ``file`` (default: the entry's own
        ``file``, a plain file name) under ``folder``. ``ValueError`` naming what is wrong for
        an entry that is not what ``manifest_entry`` writes."""
        if not isinstance(entry, dict):
            raise ValueError(f"a version entry must be an object, got {type(entry).__name__}")
        name = entry.get("name")
        if (
            not isinstance(name, str)
            or not _NAME.fullmatch(name)
            or not name.startswith(f"stable-sam-p{project}-v")
        ):
            raise ValueError(f"version name {quoted(str(name))} is not one of project {project}")
        sha256 = entry.get("sha256", "")
        if not isinstance(sha256, str) or (sha256 and not _SHA256.fullmatch(sha256)):
            raise ValueError(f"version {name}: sha256 is not 64 hex digits")
        if file is None:
            file = entry.get("file")
            if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
                raise ValueError(f"version {name}: file must be a plain file name")
        for key in ("metrics", "metadata"):
            if not isinstance(entry.get(key, {}), dict):
                raise ValueError(f"version {name}: {key} must be an object")
        if not isinstance(entry.get("created"), str):
            raise ValueError(f"version {name}: created must be a string")
        return cls(
            project=project,
            name=name,
            path=folder / file,
            created=entry["created"],
            promoted=bool(entry.get("promoted")),
            metrics=_current_metric_names(entry.get("metrics", {})),
            reason=str(entry.get("reason", "")),
            metadata=dict(entry.get("metadata", {})),
            sha256=sha256,
        )


def next_sequence_of(data: Any) -> int:
    """A manifest's ``next_sequence``: a positive integer (JSON also allows 1e400 or
    Infinity, which Python reads as floats), else ``ValueError``."""
    value = data.get("next_sequence") if isinstance(data, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 10**12:
        raise ValueError(f"next_sequence must be a positive integer, got {quoted(str(value))}")
    return value


def version_name(project: str, sequence: int) -> str:
    """The ``model_version`` string of the ``sequence``-th version of ``project``."""
    return f"stable-sam-p{project}-v{sequence}"


def check_project(project: str) -> str:
    """Return ``project`` if it is a canonical Label Studio project id ("7"), else raise
    ``ValueError``.

    Project ids become folder names and Redis keys, so anything but the one spelling of
    ``runtime.project_ids.normalize_project_id`` is refused: "07" would be a second project 7.
    """
    if not isinstance(project, str) or normalize_project_id(project) != project:
        raise ValueError(
            f"project must be a canonical numeric Label Studio project id, got {quoted(str(project))}"
        )
    return project


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _current_metric_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` (nested dicts, e.g. ``{"new": {...}, "current": {...}}``) with every key of
    ``_RENAMED_METRICS`` under its new name; values unchanged."""
    return {
        _RENAMED_METRICS.get(key, key): _current_metric_names(value)
        if isinstance(value, dict)
        else value
        for key, value in metrics.items()
    }


class VersionStore(ABC):
    """Plugin versions of every project, ``keep`` newest kept per project.

    Pruning keeps the ``keep`` newest versions plus the current (newest promoted) one, so the
    served version is never deleted even when several newer runs were not promoted.
    """

    def __init__(self, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep

    # --- reading -------------------------------------------------------------------------

    def current(self, project: str) -> PluginVersion | None:
        """The newest promoted version of ``project``, or ``None`` if it has none."""
        for version in reversed(self.list(project)):
            if version.promoted:
                return version
        return None

    def list(self, project: str | None = None) -> list[PluginVersion]:
        """Versions of ``project`` (oldest first; ``ValueError`` for a malformed manifest), or
        of every project when ``None``, where a malformed project hides only itself (logged)."""
        if project is not None:
            return self._versions(check_project(project))
        versions: list[PluginVersion] = []
        for name in self.projects():
            try:
                versions.extend(self._versions(name))
            except ValueError as exc:
                logger.error("versions of project %s left out: %s", name, exc)
        return versions

    @abstractmethod
    def _versions(self, project: str) -> list[PluginVersion]:
        """The manifest's versions of ``project`` (a checked id), oldest first."""

    @abstractmethod
    def projects(self) -> list[str]:
        """Projects that have versions, in numeric order."""

    @abstractmethod
    def next_name(self, project: str) -> str:
        """The name the next ``write`` of ``project`` would get now."""

    @abstractmethod
    def plugin_file(self, version: PluginVersion) -> Path:
        """A file on this host holding ``version``'s plugins (``FileNotFoundError`` once the
        version was pruned)."""

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
        """Add a new version of ``project`` from the plugin file at ``plugin_path_tmp``.

        The file is copied (the caller keeps and may delete its temp file). ``metadata`` and
        ``metrics`` must be JSON-serialisable. Returns the new version; it is served from the
        moment this returns if ``promote`` is true.
        """
        check_project(project)
        source = Path(plugin_path_tmp)
        if not source.is_file():
            raise FileNotFoundError(f"plugin file {source} does not exist")
        # Fail before touching anything if the metadata cannot be stored.
        json.dumps({"metadata": metadata, "metrics": metrics})
        data = source.read_bytes()  # plugin files are ~330 KB
        new = NewFile(source, data, file_sha256(data))
        created = datetime.now(UTC).isoformat(timespec="seconds")

        def make(name: str, path: Path) -> PluginVersion:
            return PluginVersion(
                project=project,
                name=name,
                path=path,
                created=created,
                promoted=bool(promote),
                metrics=dict(metrics),
                reason=reason,
                metadata=dict(metadata),
                sha256=new.sha256,
            )

        version = self._add(project, new, make)
        logger.info(
            "project %s: wrote version %s to the %s (promoted=%s, reason=%s)",
            project,
            version.name,
            type(self).__name__,
            promote,
            reason,
        )
        return version

    @abstractmethod
    def _add(
        self, project: str, new: NewFile, make: Callable[[str, Path], PluginVersion]
    ) -> PluginVersion:
        """Store ``new`` as ``project``'s next version, ``make(name, path)`` (``path``: where
        this host reads it), atomically with the manifest; prune; return the version."""

    def _prune_list(self, versions: list[PluginVersion]) -> list[PluginVersion]:
        newest = versions[-self.keep :]
        current = next((v for v in reversed(versions) if v.promoted), None)
        keep_names = {v.name for v in newest}
        if current is not None:
            keep_names.add(current.name)
        return [v for v in versions if v.name in keep_names]
