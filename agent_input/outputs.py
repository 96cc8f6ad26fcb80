"""Where emitted batches go, and when they count as delivered.

An output receives a batch (the exact NDJSON bytes from the outbox) and calls `on_ack` once the
batch is durable at the other end. Only then does the engine drop it from the outbox: that is
the whole delivery guarantee, so an output must never ack early.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

from .durable import fsync, fsync_dir, truncate_partial_line, write_all

Ack = Callable[[], None]

log = logging.getLogger("agent_input.outputs")


class Output(Protocol):
    def send(self, stream: str, payload: bytes, events: int, on_ack: Ack) -> None: ...

    def close(self) -> None: ...


class OutputError(RuntimeError):
    """The output cannot take events (closed pipe, unwritable file)."""


class NdjsonOutput:
    """NDJSON on a byte stream (stdout): a written and flushed batch counts as delivered.

    That is the plain-pipe contract; a supervisor that acknowledges explicitly uses the agent
    protocol instead.
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._lock = threading.Lock()
        self.events = 0

    def send(self, stream: str, payload: bytes, events: int, on_ack: Ack) -> None:
        with self._lock:
            try:
                self._stream.write(payload)
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError) as exc:
                raise OutputError(f"cannot write events: {exc}") from None
            self.events += events
        on_ack()

    def close(self) -> None:
        with self._lock:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                pass


class NdjsonFileOutput:
    """NDJSON appended to a file, fsynced before acknowledging; optionally rotated by size.

    A crash can leave the last line half written; opening the file cuts it back to the last
    newline, because the batch it belonged to was never acknowledged and will be re-emitted whole.
    A write that fails part-way is cut back the same way at once.

    Rotation (`rotate_bytes`): before a batch that would take the file past `rotate_bytes`, the
    file is renamed `<name>.1` (older ones shift to `.2` ... `.<rotate_keep>`, the oldest is
    dropped) and a new file is started. It happens only between batches, after the previous
    batch was fsynced, so a rotated file only ever holds whole lines; a batch is never split
    across files, so one larger than `rotate_bytes` gets a file of its own.

    The path is checked before every batch: when the open file was deleted or moved away behind
    the collector's back (a cleanup job, logrotate without copytruncate), the path is opened again
    (created when missing) and the batch goes there, with a warning. A batch is never acknowledged
    while the file it went to has no name left (deleted during the write): it is written again to
    the file now at the path. Creating a file fsyncs its folder, so an acknowledged batch's file
    survives a power cut.

    A FIFO or a character device (`/dev/stdout` when stdout is a pipe) is written the same way,
    minus what only a regular file has: no cut-back, no rotation (`rotate_bytes` is refused), no
    following of the path, and an fsync the device cannot do (EINVAL) is not an error: a batch
    written whole counts as delivered, as on stdout. A FIFO is opened once a reader has it open.
    """

    def __init__(self, path: str | Path, rotate_bytes: int | None = None, rotate_keep: int = 5,
                 stop: threading.Event | None = None):
        self.path = Path(path)
        self._stop = stop  # ends the wait for a FIFO's reader (SIGTERM would not end a blocking open)
        if rotate_bytes is not None and rotate_bytes <= 0:
            raise OutputError(f"rotate bytes must be greater than 0, not {rotate_bytes}")
        if rotate_keep < 1:
            raise OutputError(f"rotate keep must be at least 1, not {rotate_keep}")
        self.rotate_bytes = rotate_bytes
        self.rotate_keep = rotate_keep
        self.rotations = 0
        self._fd = -1
        self._regular = True
        self.reopens = 0
        try:
            self._open()
        except OSError as exc:
            raise OutputError(f"cannot open output file {self.path}: {_reason(exc)}") from None
        self._lock = threading.Lock()
        self.events = 0

    def _open(self) -> bool:
        """Open the file at `path` for appending: a partial last line is cut back; a missing file
        (and folder) is created, and the folder fsynced so the new name is durable. True when it
        created the file."""
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            self._open_special(mode)
            return False
        if self.rotate_bytes and self.path.is_symlink():
            # rotation renames `path`: a link (/dev/stdout -> /proc/self/fd/1 with stdout in a file)
            # would be moved away, and dropped as the oldest, with a plain file left in its place
            raise OutputError(f"cannot rotate {self.path}: it is a symbolic link (to {os.readlink(self.path)}), "
                              "and rotation would move the link, not the file (give the file's own path, "
                              "or leave out --rotate-bytes)")
        self._regular = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_partial_line(self.path)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            fd = os.open(self.path, flags | os.O_EXCL, 0o640)
            created = True
        except FileExistsError:
            fd = os.open(self.path, flags, 0o640)
            created = False
        self._fd = fd
        self._size = os.fstat(fd).st_size
        if created:
            fsync_dir(self.path.parent)
        return created

    def _open_special(self, mode: int) -> None:
        """A FIFO or a character device: appended to as it is (nothing to cut back or create)."""
        kind = "a pipe (FIFO)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode) else None
        if kind is None:
            what = "a socket" if stat.S_ISSOCK(mode) else "a block device" if stat.S_ISBLK(mode) else "not a file"
            raise OutputError(f"cannot write {self.path}: it is {what}; give a regular file, a FIFO or "
                              "a character device such as /dev/stdout")
        if self.rotate_bytes:
            raise OutputError(f"cannot rotate {self.path}: it is {kind}, not a regular file "
                              "(leave out --rotate-bytes)")
        flags = os.O_WRONLY | os.O_APPEND
        if stat.S_ISFIFO(mode):
            fd = self._open_fifo(flags)
            os.set_blocking(fd, True)  # a slow reader holds the collector back, never drops a batch
        else:
            fd = os.open(self.path, flags)
        self._fd = fd
        self._regular = False
        self._size = 0

    def _open_fifo(self, flags: int) -> int:
        """Open a FIFO once a reader has it open, saying so rather than hang silently; a stop ends
        the wait (a blocking open is retried after a signal, so SIGTERM alone never would)."""
        told = False
        while True:
            try:
                return os.open(self.path, flags | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
            if not told:
                log.info("waiting for a reader to open the FIFO %s", self.path)
                told = True
            if self._stop is not None and self._stop.wait(0.2):
                raise OutputError(f"stopped while waiting for a reader to open the FIFO {self.path}")
            if self._stop is None:
                time.sleep(0.2)

    def _replaced(self) -> str | None:
        """Why the open file is no longer the one at `path` (None while it still is)."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return "was deleted or moved away"
        mine = os.fstat(self._fd)
        if (at_path.st_dev, at_path.st_ino) != (mine.st_dev, mine.st_ino):
            return "was replaced by another file (moved away, e.g. by a log rotation tool)"
        return None

    def _follow_path(self) -> None:
        """Reopen `path` when the open file was deleted or replaced: writing on would hand batches
        to a file nobody reads (or nobody can: a deleted one), and acknowledge them."""
        if not self._regular:
            return  # a FIFO or device is not rotated or replaced by anyone: its readers hold it
        why = self._replaced()
        if why is None:
            return
        os.close(self._fd)
        self._fd = -1
        created = self._open()
        self.reopens += 1
        log.warning("output file %s %s while the collector was writing to it; writing to %s",
                    self.path, why, "a new file created at that path" if created else "the file now at that path")

    def rotated_path(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        # the rotated files there are, from one listing of the folder: a loop over 1..rotate_keep
        # asking each name would hold the collector up for ever at `--rotate-keep 99999999999999`
        prefix = self.path.name + "."
        present = []
        with os.scandir(self.path.parent) as entries:
            for entry in entries:
                suffix = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
                if suffix.isascii() and suffix.isdigit() and suffix[0] != "0" and int(suffix) < self.rotate_keep:
                    present.append(int(suffix))
        for n in sorted(present, reverse=True):
            os.replace(self.rotated_path(n), self.rotated_path(n + 1))  # replaces (drops) the oldest
        try:
            os.replace(self.path, self.rotated_path(1))
        except FileNotFoundError:
            pass  # deleted since the batch before: nothing to keep, a new file is started all the same
        self._open()  # creates the new file and fsyncs the folder: the renames and the new name
        self.rotations += 1

    def send(self, stream: str, payload: bytes, events: int, on_ack: Ack) -> None:
        with self._lock:
            if self._fd < 0:
                raise OutputError(f"cannot write {self.path}: the output is closed")
            for _ in range(_WRITE_ATTEMPTS):
                try:
                    self._follow_path()
                except OSError as exc:
                    raise OutputError(f"cannot reopen {self.path}: {_reason(exc)}") from None
                try:
                    if self.rotate_bytes and self._size and self._size + len(payload) > self.rotate_bytes:
                        self._rotate()
                except OSError as exc:
                    raise OutputError(f"cannot rotate {self.path}: {_reason(exc)}") from None
                before = self._size
                try:
                    write_all(self._fd, payload)
                    if self._regular:
                        fsync(self._fd)
                        unlinked = os.fstat(self._fd).st_nlink == 0
                    else:
                        _fsync_if_it_can(self._fd)
                        unlinked = False
                except OSError as exc:
                    if self._regular:
                        try:  # never leave a partial line behind: cut back to where the batch began
                            os.ftruncate(self._fd, before)
                        except OSError:
                            pass  # the next open cuts it back to the last newline instead
                    raise OutputError(f"cannot write {self.path}: {_reason(exc)}") from None
                self._size = before + len(payload)
                if not unlinked:
                    break
                # deleted while the batch was being written: it is nowhere now; write it again
            else:
                raise OutputError(f"cannot write {self.path}: it was deleted {_WRITE_ATTEMPTS} times "
                                  "while a batch was being written to it")
            self.events += events
        on_ack()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


_WRITE_ATTEMPTS = 3


def _reason(exc: OSError) -> str:
    """An OSError's reason for a one-line message (some, like io.UnsupportedOperation, have no strerror)."""
    return exc.strerror or str(exc) or type(exc).__name__


def _fsync_if_it_can(fd: int) -> None:
    """fsync a FIFO or device: a pipe or terminal cannot (EINVAL), and has nothing to make durable."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS):
            raise
