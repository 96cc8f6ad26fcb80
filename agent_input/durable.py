"""Durable file writes, shared by everything that must not acknowledge before the disk has it:
the outbox's spool files, the NDJSON file output, the dead-letter file and the protocol pipe."""
from __future__ import annotations

import os
from pathlib import Path


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
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a file's creation, rename or removal in `directory` durable (OSError when it could not)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
