"""Files that readers never see half-written, and the stamps a watcher compares.

``write_atomically`` is how every key, certificate, bundle and CRL reaches the disk, in the CA and
in the sidecar: a temporary file next to the target, created with its final mode (so a key is 0600
from its first byte), fsynced, then renamed over the target (or hard-linked to it, which refuses
to overwrite), and the directory fsynced. Nothing here knows about certificates.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

PUBLIC_MODE = 0o644
KEY_MODE = 0o600


def write_temporary(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new file next to ``path`` with ``mode`` from its first byte, fsynced; its name.

    On any failure (or cancellation) the temporary file is removed before the exception propagates.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def fsync_directory(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int = PUBLIC_MODE, replace: bool = True) -> None:
    """Write ``path`` so that readers see the old content or the new, never a part of it.

    ``replace=True`` renames over an existing file; ``replace=False`` hard-links the new file into
    place and raises FileExistsError if ``path`` exists (it is never overwritten).
    """
    temporary = write_temporary(path, data, mode)
    try:
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)


@dataclass(frozen=True)
class FileStamp:
    """What a watcher compares to notice that a file changed (or was replaced by a rename)."""

    mtime_ns: int
    size: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    @classmethod
    def now(cls, path: Path) -> FileStamp | None:
        """The file's stamp now (``stat`` follows symlinks, so a Kubernetes ``..data`` swap shows); None if missing."""
        try:
            return cls.of(os.stat(path))
        except OSError:
            return None
