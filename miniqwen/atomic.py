"""Crash-safe file writes: the one helper every package uses to replace a file atomically."""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def naming(path: str | os.PathLike):
    """Re-raise an ``OSError`` raised inside the block that names no file (a full disk fails a write with "No space
    left on device" and no file name) as the same error naming ``path``, so the one-line message says where."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None] | str | bytes) -> Path:
    """Replace ``path`` so that a crash leaves either the old file or the new one, never a part of either.

    ``write`` is the content (``str`` is written as UTF-8) or a function that writes a file at the temporary path
    it is given (e.g. ``lambda tmp: safetensors.torch.save_file(t, tmp)``). The temporary file lives in the target's
    directory, is fsynced, then moved over the target with ``os.replace`` (atomic on POSIX) and the directory is
    fsynced. A symbolic link is resolved first, so the link stays a link and its target gets the new content.

    The new file keeps the permissions of the file it replaces, or else gets the ones ``open()`` would give a new
    file (0666 less the umask), not the 0600 of a temporary file: a ledger or results shared with a group stay
    readable by it.

    Returns the path written (links resolved). Raises ``OSError`` from the file system, naming ``path`` when the
    system names no file (a full disk); the temporary file is removed on any failure.
    """
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
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
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None or err.filename == str(tmp):  # name the file the caller asked for
            raise OSError(err.errno, err.strerror or str(err), str(target)) from err
        raise
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


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc/self/status``, since 4.7); else
    set and restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
