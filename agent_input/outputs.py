"""Where emitted batches go, and when they count as delivered.

An output receives a batch (the exact NDJSON bytes from the outbox) and calls `on_ack` once the
batch is durable at the other end. Only then does the engine drop it from the outbox: that is
the whole delivery guarantee, so an output must never ack early.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

Ack = Callable[[], None]


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
    """NDJSON appended to a file, fsynced before acknowledging.

    A crash can leave the last line half written; opening the file cuts it back to the last
    newline, because the batch it belonged to was never acknowledged and will be re-emitted whole.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_partial_line(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise OutputError(f"cannot open output file {self.path}: {exc.strerror}") from None
        self._lock = threading.Lock()
        self.events = 0

    def send(self, stream: str, payload: bytes, events: int, on_ack: Ack) -> None:
        with self._lock:
            try:
                view = memoryview(payload)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                os.fsync(self._fd)
            except OSError as exc:
                raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
            self.events += events
        on_ack()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _truncate_partial_line(path: Path) -> None:
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
