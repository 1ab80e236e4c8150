"""The model the settings describe: SAM base, default plugins, and the version name it is
served as.

The backend serves it and the training job trains on it; both resolve it here, so that a job
trains the very base the backend serves, with the plugins it serves by default.

- Base: SAM_CHECKPOINT if set; else, for a type the repository ships
  (``stable_sam.build.SHIPPED_FILES``), its shipped checkpoint; else random weights, allowed
  only with SAM_ALLOW_RANDOM_WEIGHTS (benchmarks, tests).
- Default plugins: SAM_PLUGINS when it names a file; else, on a shipped base, its shipped
  plugins; else freshly initialised ones. SAM_PLUGINS=none serves plain SAM (a training job
  still starts from the default plugins).
- Version name (``model_version`` when a project has no version of its own):
  ``stable-sam-<base>-<plugins>`` or, for plain SAM, ``sam-<base>``. The shipped files are
  named by a short hash of their content, so that new shipped weights give a new version.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.settings import Settings
from runtime.versions import PluginVersion, VersionStore

if TYPE_CHECKING:
    from stable_sam import StableSam
    from stable_sam.build import DefaultModelPaths

logger = logging.getLogger(__name__)


class ModelConfigError(ValueError):
    """The settings name weights that are not there (or none, without random weights)."""


@functools.lru_cache(maxsize=8)
def _file_fingerprint(path: Path, mtime_ns: int, size: int) -> str:
    from stable_sam import file_sha256

    return file_sha256(path)[:8]


def file_fingerprint(path: Path) -> str:
    """The first 8 hex digits of the file's SHA-256 (cached per path, mtime and size)."""
    stat = path.stat()
    return _file_fingerprint(path.resolve(), stat.st_mtime_ns, stat.st_size)


@dataclass(frozen=True)
class ModelSpec:
    """The served model: what to build it from and the version name it is served as."""

    model_type: str
    # The base's weights; None: random weights.
    checkpoint: Path | None
    # The plugins served (and trained from) by default; None: freshly initialised ones.
    default_plugins: Path | None
    # False: plain SAM (SAM_PLUGINS=none).
    plugins_enabled: bool
    allow_random_weights: bool
    # torch device (DEVICE); None: CUDA when available, else CPU.
    device: str | None
    version: str

    def check(self) -> None:
        """Raise ``ModelConfigError`` unless the files to build from are there."""
        if self.checkpoint is None and not self.allow_random_weights:
            raise ModelConfigError(
                f"no weights for SAM_MODEL_TYPE={self.model_type}: set SAM_CHECKPOINT "
                "(or SAM_ALLOW_RANDOM_WEIGHTS=true for benchmarks and tests)"
            )
        if self.checkpoint is not None and not self.checkpoint.is_file():
            raise ModelConfigError(f"SAM_CHECKPOINT not found: {self.checkpoint}")
        if self.default_plugins is not None and not self.default_plugins.is_file():
            raise ModelConfigError(f"SAM_PLUGINS file not found: {self.default_plugins}")

    def build(self, plugins: bool | None = None) -> StableSam:
        """The model on ``device`` with the default plugins installed; ``plugins`` (default:
        ``plugins_enabled``) False builds plain SAM. ``ModelConfigError`` when ``check`` fails."""
        from stable_sam import build_stable_sam

        self.check()
        with_plugins = self.plugins_enabled if plugins is None else plugins
        if self.checkpoint is None:
            logger.warning("building %s with RANDOM weights (benchmark/test)", self.model_type)
        return build_stable_sam(
            self.model_type,
            self.checkpoint,
            plugins=with_plugins,
            plugin_checkpoint=self.default_plugins if with_plugins else None,
            device=self.device,
        )


def resolve_model(settings: Settings, defaults: DefaultModelPaths | None = None) -> ModelSpec:
    """The model ``settings`` describe (no model is built; the shipped files are hashed once).

    ``defaults``: where the shipped model lives (``stable_sam.default_model_paths``: of the
    settings' model type when the repository ships one, else the embedded default) unless given.
    """
    if defaults is None:
        from stable_sam import default_model_paths
        from stable_sam.build import SHIPPED_FILES

        shipped = settings.sam_model_type in SHIPPED_FILES
        defaults = default_model_paths(settings.sam_model_type if shipped else None)
    choice = settings.sam_plugins.strip()
    plugin_file = Path(choice) if choice.lower() not in ("default", "none") else None
    checkpoint = settings.sam_checkpoint
    shipped_plugins = False
    shipped_base = checkpoint is None and settings.sam_model_type == defaults.model_type
    if shipped_base and defaults.base_checkpoint.is_file():
        checkpoint = defaults.base_checkpoint
        if plugin_file is None and defaults.plugin_checkpoint.is_file():
            plugin_file, shipped_plugins = defaults.plugin_checkpoint, True

    if settings.sam_checkpoint is not None:
        base_tag = f"{settings.sam_model_type}-{settings.sam_checkpoint.stem}"
    elif checkpoint is not None:  # the shipped base
        # With plugins, the plugin tag's hash covers the base too (plugins name their base).
        base_tag = defaults.model_type
        if not settings.plugins_enabled:
            base_tag += f"-{file_fingerprint(checkpoint)}"
    else:
        base_tag = f"{settings.sam_model_type}-random"
    if not settings.plugins_enabled:
        version = f"sam-{base_tag}"
    else:
        if shipped_plugins:
            plugin_tag = f"default-{file_fingerprint(defaults.plugin_checkpoint)}"
        elif plugin_file is not None:
            plugin_tag = plugin_file.stem
        else:
            plugin_tag = "untrained"
        version = f"stable-sam-{base_tag}-{plugin_tag}"
    return ModelSpec(
        model_type=settings.sam_model_type,
        checkpoint=checkpoint,
        default_plugins=plugin_file,
        plugins_enabled=settings.plugins_enabled,
        allow_random_weights=settings.sam_allow_random_weights,
        device=None if settings.device == "auto" else settings.device,
        version=version,
    )


def project_version(
    settings: Settings, store: VersionStore, project: str | None
) -> PluginVersion | None:
    """The plugin version ``project`` is served with (its newest promoted one), if plugins are
    on and it has one; an unreadable store is logged and counts as none."""
    if project is None or not settings.plugins_enabled:
        return None
    try:
        return store.current(project)
    except (OSError, ValueError) as exc:
        logger.warning("cannot read plugin versions of project %s: %s", project, exc)
        return None


def served_model_version(
    settings: Settings, spec: ModelSpec, store: VersionStore, project: str | None
) -> str:
    """What ``/setup`` and every prediction of ``project`` report as ``model_version``."""
    version = project_version(settings, store, project)
    return version.name if version is not None else spec.version
