"""Per-project Stable-SAM plugin versions: the store interface (``base``), a folder on this
host (``local``, the default) and Redis shared by every host (``shared``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime.versions.base import (
    PLUGIN_SUFFIX,
    PluginVersion,
    VersionStore,
    VersionStoreUnavailableError,
    check_project,
    version_name,
)
from runtime.versions.local import MANIFEST, LocalVersionStore

# Under VERSIONS_DIR, where a host keeps its copies of the plugin files of a Redis store.
REDIS_COPIES = "from-redis"

if TYPE_CHECKING:
    from runtime.settings import Settings


def open_version_store(settings: Settings) -> VersionStore:
    """The store ``VERSIONS_STORE`` names: ``local`` (``VERSIONS_DIR``) or ``redis``
    (``REDIS_URL``, with this host's copies of the plugin files under ``VERSIONS_DIR``)."""
    if settings.versions_store == "redis":
        from runtime.queue.connection import redis_connection
        from runtime.versions.shared import RedisVersionStore

        return RedisVersionStore(
            redis_connection(settings.redis_url),
            settings.versions_dir / REDIS_COPIES,
            settings.versions_keep,
        )
    return LocalVersionStore(settings.versions_dir, keep=settings.versions_keep)


__all__ = [
    "MANIFEST",
    "PLUGIN_SUFFIX",
    "REDIS_COPIES",
    "LocalVersionStore",
    "PluginVersion",
    "VersionStore",
    "VersionStoreUnavailableError",
    "check_project",
    "open_version_store",
    "version_name",
]
