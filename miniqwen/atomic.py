"""Crash-safe file writes: the one helper every package uses to replace a file atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None] | str | bytes) -> Path:
    """Replace ``path`` so that a crash leaves either the old file or the new one, never a part of either.

    ``write`` is the content (``str`` is written as UTF-8) or a function that writes a file at the temporary path
    it is given (e.g. ``lambda tmp: safetensors.torch.save_file(t, tmp)``). The temporary file lives in the target's
    directory, is fsynced, then moved over the target with ``os.replace`` (atomic on POSIX) and the directory is
    fsynced. A symbolic link is resolved first, so the link stays a link and its target gets the new content.

    Returns the path written (links resolved). Raises ``OSError`` from the file system; the temporary file is
    removed on any failure.
    """
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        if callable(write):
            os.close(fd)
            write(tmp)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(write.encode("utf-8") if isinstance(write, str) else write)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return target
