"""Durable file-system steps shared by everything that must survive a crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by path (a directory: so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably (mode 0600 for a new file).

    Temporary file in the same folder, fsync, ``os.replace``, fsync of the
    folder: a crash leaves the old content or the new, never a mix.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)
