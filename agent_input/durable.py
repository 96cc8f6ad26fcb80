"""Durable file writes, shared by everything that must not acknowledge before the disk has it:
the outbox's spool files, the NDJSON file output, the dead-letter file and the protocol pipe."""
from __future__ import annotations

import errno
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows, where the collector does not run (docs/elastic-agent.md)
    fcntl = None  # type: ignore[assignment]

# macOS: fsync(2) hands the data to the drive, whose own cache a power loss can still drop;
# F_FULLFSYNC asks the drive to flush it (Apple's fsync(2) man page). Elsewhere fsync is enough.
_FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", None)


def fsync(fd: int) -> None:
    """Make what was written to `fd` durable (OSError when it could not): F_FULLFSYNC where the
    system has it, else (or on a filesystem that refuses it) os.fsync."""
    if _FULLFSYNC is not None:
        try:
            fcntl.fcntl(fd, _FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def write_all(fd: int, data: bytes) -> None:
    """`os.write` until every byte is taken: a pipe or a full disk may take less per call."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path: Path, data: bytes, *, flags: int = os.O_CREAT | os.O_EXCL, mode: int = 0o600) -> None:
    """Write `data` to `path` and fsync it before returning (OSError when it could not)."""
    fd = os.open(path, os.O_WRONLY | flags, mode)
    try:
        write_all(fd, data)
        fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a file's creation, rename or removal in `directory` durable (OSError when it could not).
    A filesystem that cannot fsync a folder at all (EINVAL, ENOTSUP) leaves the name's durability
    to itself: that is not an error of the write."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def truncate_partial_line(path: Path) -> None:
    """Cut an NDJSON file back to its last newline: what a crash in the middle of a write leaves
    behind belongs to a batch that was never acknowledged (OSError when it could not)."""
    if not path.exists():
        return
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        # walk back to the last newline
        pos = size
        chunk = 65536
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            data = fh.read(pos - start)
            idx = data.rfind(b"\n")
            if idx >= 0:
                fh.truncate(start + idx + 1)
                return
            pos = start
        fh.truncate(0)
