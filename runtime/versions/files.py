"""Atomic file writes and the pruning of files a manifest no longer names, for the stores."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``target`` through a temp file in the same folder (fsynced) and ``os.replace``: a
    reader sees the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def is_temp_file(path: Path) -> bool:
    """A temp file of ``atomic_write_bytes`` (its writer may still be writing it)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def delete_files(folder: Path, stale: Callable[[Path], bool]) -> None:
    """Remove the files of ``folder`` that ``stale`` picks (each logged)."""
    for path in folder.iterdir():
        if stale(path):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                path.unlink()
                logger.info("pruned %s", path)
