"""`openai-input run`: the agent protocol, NDJSON control messages on stdin, events on stdout.

The specification is docs/protocol.md; this module is its implementation:

- `ProtocolWriter` owns the real stdout (fd 1 is re-pointed at stderr at start-up, so nothing but
  protocol messages can ever reach the supervisor's pipe) and writes one JSON object per line.
- `ProtocolOutput` is the engine's `Output`: each outbox batch becomes `event` messages numbered
  with a protocol batch id; the outbox entry is confirmed when an `ack` for that id arrives (or,
  with `--ack-on-flush`, as soon as the lines are written and flushed). At most `max_inflight`
  batches wait for acks; after that the collectors block (backpressure), their pages stay on disk.
- `Runner` reads stdin on its own thread, validates `config` messages with
  `config.config_from_dict`, (re)builds the engine through `app.build` (the old engine first
  finishes its in-flight page), turns engine status into `status` messages, and stops gracefully
  on `stop`, end of stdin, SIGTERM or SIGINT.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue
import select
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import orjson

from .durable import write_all
from .outputs import Ack, OutputError

log = logging.getLogger("agent_input.protocol")

PROTOCOL_VERSION = 1
STREAM_STATES = ("starting", "healthy", "degraded", "failed")
INPUT_STATES = ("configuring", "healthy", "degraded", "failed", "stopping", "stopped")


class StdoutClosed(OutputError):
    """The supervisor closed our stdout: nobody can receive events any more."""


class ProtocolWriter:
    """Writes protocol messages, one JSON object per line, to a private duplicate of stdout."""

    def __init__(self, fd: int):
        self.fd = fd
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self._stopping: threading.Event | None = None  # see `give_up_on`
        self._grace = 0.0
        self._stop_seen: float | None = None
        try:  # a pipe or socket can be left unread: its writes wait in steps that can give up
            mode = os.fstat(fd).st_mode
            self._waitable = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
        except OSError:
            self._waitable = False

    def give_up_on(self, stopping: threading.Event, grace: float, *more: threading.Event) -> None:
        """Once `stopping` (or one of `more`) is set, a write the reader leaves waiting for `grace`
        seconds is given up (StdoutClosed, and stdout counts as closed): a supervisor that no longer
        reads stdout cannot hold a stop up for ever. The batch cut short stays in the outbox."""
        self._stopping = _AnyOf(stopping, *more) if more else stopping
        self._grace = grace

    @classmethod
    def take_stdout(cls) -> "ProtocolWriter":
        """Keep fd 1 for ourselves and point fd 1 (and sys.stdout) at stderr, so a stray print from
        any library can only end up in the logs, never in the supervisor's event stream."""
        import sys

        if sys.stdout is None:  # started with stdout closed: fd 1 is no pipe of the supervisor's
            os.dup2(2, 1)
            sys.stdout = sys.stderr
            writer = cls(os.open(os.devnull, os.O_WRONLY))
            writer.closed.set()  # the run loop sees the reader gone: it stops, as documented
            return writer
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        private = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(private)

    def write(self, *messages: Mapping[str, Any]) -> None:
        data = b"".join(orjson.dumps(m) + b"\n" for m in messages)
        self.write_bytes(data)

    def write_bytes(self, data: bytes | bytearray) -> None:
        with self._lock:
            if self.closed.is_set():
                raise StdoutClosed("stdout is closed")
            try:
                if self._waitable:
                    self._write_waiting(data)
                else:
                    write_all(self.fd, data)
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.EBADF, errno.ECONNRESET):
                    self.closed.set()
                    raise StdoutClosed("stdout was closed by the reader") from None
                raise OutputError(f"cannot write to stdout: {exc.strerror}") from None

    def reader_gone(self) -> bool:
        """Whether the reader closed stdout, found out without writing (a pipe or socket whose
        reader went away polls as an error or hang-up): the run loop asks between writes, which
        can be minutes apart while every stream waits for its next poll."""
        if not self.closed.is_set() and self._waitable:
            poller = select.poll()
            poller.register(self.fd, 0)  # POLLERR and POLLHUP are always reported
            if poller.poll(0):
                self.closed.set()
        return self.closed.is_set()

    def _write_waiting(self, data: bytes) -> None:
        """`write_all`, in steps of at most PIPE_BUF bytes, each once the pipe has room for it (a
        blocking write of that much then never blocks), looking at `_stopping` while it waits."""
        view = memoryview(data)
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while view:
            if not poller.poll(200):
                if self._stopping is not None and self._stopping.is_set():
                    now = time.monotonic()
                    self._stop_seen = self._stop_seen or now
                    if now - self._stop_seen >= self._grace:
                        self.closed.set()
                        raise StdoutClosed(f"stdout was not read for {self._grace:g}s after the stop")
                continue
            self._stop_seen = None  # the reader took some: the grace is for one wait, not the stop's whole time
            view = view[os.write(self.fd, view[:select.PIPE_BUF]):]

    def status(self, scope: str, status: str, message: str = "", **extra: Any) -> None:
        """A status message; never raises (a closed stdout is noticed by the run loop)."""
        from .logs import redact

        msg: dict[str, Any] = {"type": "status", "scope": scope, "status": status}
        msg.update(extra)
        msg["message"] = redact(message)
        try:
            self.write(msg)
            return
        except OutputError:
            return
        except TypeError as exc:  # orjson.JSONEncodeError: text that is not UTF-8 (a lone surrogate)
            reason = exc
        # The supervisor still has to learn why: send it again with such text escaped (\ud800).
        try:
            self.write(_encodable(msg))
        except OutputError:
            pass
        except TypeError as exc:  # a value that is not JSON at all; logged, not fatal
            log.error("status message %s/%s not sent: %s (first: %s): %s", scope, status, exc, reason,
                      _encodable(msg["message"]))

    def close(self) -> None:
        with self._lock:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.closed.set()


class _AnyOf:
    """Set when any of its events is."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def _some(values: list, shown: int = 5) -> str:
    """The first `shown` of `values`, each bounded (`reports.short`), and how many more."""
    from .reports import short

    text = ", ".join(short(v) for v in values[:shown])
    return text + (f" and {len(values) - shown} more" if len(values) > shown else "")


def _line_number(payload: bytes, seq: int) -> int:
    """The line number in `payload` of its `seq`-th (from 0) line that is not blank."""
    for n, line in enumerate(payload.splitlines(), 1):
        if line.strip():
            if not seq:
                return n
            seq -= 1
    return 0


def _encodable(value: Any) -> Any:
    """`value` (a message, or any JSON value in it) with every string made encodable as UTF-8:
    what cannot be (a lone surrogate, as a supervisor's JSON may carry) is written as `\\udXXX`."""
    from .logs import map_strings

    return map_strings(value, lambda text: text.encode("utf-8", "backslashreplace").decode("utf-8"), keys=True)


@dataclass
class _Inflight:
    batch: int
    key: bytes
    stream: str
    callbacks: list[Ack] = field(default_factory=list)
    engine: int = 0  # the engine (see `ProtocolOutput.resume`) that sent it


class ProtocolOutput:
    """The engine's `Output` in protocol mode (see the module doc)."""

    # an acknowledged batch whose outbox delete fails is this output's to report (`ack`: logged
    # and a `degraded` status): `Delivery` lets the error through to it
    reports_ack_failures = True

    def __init__(self, writer: ProtocolWriter, *, ack_on_flush: bool = False, max_inflight: int = 32,
                 namespace: str = "default", on_status: Callable[[str, str, str], None] | None = None):
        self.writer = writer
        self.on_status = on_status
        self.ack_on_flush = ack_on_flush
        self.max_inflight = max(1, max_inflight)
        self.namespace = namespace
        self._cond = threading.Condition()
        self._inflight: dict[int, _Inflight] = {}
        self._by_key: dict[bytes, int] = {}
        self._next = 1
        self._interrupted = False
        self._deleting = 0  # acknowledged batches whose outbox entries are being deleted
        # Acknowledged batches an engine's outbox re-send may still meet: the re-send reads a row,
        # then sends it, and an ack of the batch can land in between (or its delete still run).
        # key -> its delete is done. Kept for a batch sent before the current engine started until
        # the next engine starts; forgotten at once for the current engine's own (never re-sent).
        self._acked: dict[bytes, bool] = {}
        self._engine = 0
        self.events = 0
        self.acked_batches = 0

    # -- Output ----------------------------------------------------------------------------------
    def send(self, stream: str, payload: bytes, events: int, on_ack: Ack) -> None:
        key = hashlib.sha256(payload).digest()
        with self._cond:
            existing = self._by_key.get(key)
            if existing is not None:  # a replay of a batch the supervisor has not acked yet
                self._inflight[existing].callbacks.append(on_ack)
                return
            acked = key in self._acked
            if acked:  # a replay of a batch the supervisor acked since the re-send read it
                self._deleting += 1
        if acked:
            self._confirm(None, stream, [on_ack])
            return
        with self._cond:
            while len(self._inflight) >= self.max_inflight and not self._interrupted:
                self._cond.wait(0.5)
            if self._interrupted:
                return  # not sent, not acked: it stays in the outbox for the next engine
            batch = self._next
            self._next += 1
            self._inflight[batch] = _Inflight(batch, key, stream, [on_ack], self._engine)
            self._by_key[key] = batch
        try:
            self.writer.write_bytes(self._encode(batch, stream, payload))
        except OutputError:
            with self._cond:
                self._forget(batch)
            raise
        with self._cond:
            self.events += events
        if self.ack_on_flush:
            self.ack(batch)

    def close(self) -> None:
        pass

    # -- acknowledgements ------------------------------------------------------------------------
    def ack(self, batch: int) -> bool:
        """Confirm a batch: its outbox entries are deleted. False when the id is not in flight.

        A delete that fails (e.g. sqlite "database is locked") is reported, never raised: the
        caller is the stdin reader, which must go on. The entry stays in the outbox and is sent
        again (same ids, same content) at the next start or reconfiguration: a duplicate, not a loss."""
        with self._cond:
            entry = self._forget(batch)
            if entry is None:
                return False
            self._deleting += 1  # `wait_drained` waits for the delete too, not only the ack
            self._acked[entry.key] = False
        try:
            self._confirm(batch, entry.stream, entry.callbacks)
        finally:
            with self._cond:
                self.acked_batches += 1
                if entry.engine == self._engine:
                    self._acked.pop(entry.key, None)
                else:
                    self._acked[entry.key] = True
        return True

    def _confirm(self, batch: int | None, stream: str, callbacks: list[Ack]) -> None:
        """Run an acknowledged batch's outbox deletes (`_deleting` was counted up for them)."""
        try:
            for cb in callbacks:
                try:
                    cb()
                except Exception as exc:  # noqa: BLE001 - see `ack`
                    from .logs import redact

                    which = "batch" if batch is None else f"batch {batch}"
                    reason = (f"acknowledged {which} could not be deleted from the outbox, it is sent again "
                              f"at the next start: {redact(str(exc)) or type(exc).__name__}")
                    log.error("%s: %s", stream, reason)
                    if self.on_status is not None:
                        self.on_status(stream, "degraded", reason)
        finally:
            with self._cond:
                self._deleting -= 1
                self._cond.notify_all()

    def _forget(self, batch: int) -> _Inflight | None:
        entry = self._inflight.pop(batch, None)
        if entry is not None:
            self._by_key.pop(entry.key, None)
            self._cond.notify_all()
        return entry

    def inflight(self) -> int:
        with self._cond:
            return len(self._inflight)

    def wait_drained(self, timeout: float, acks_ended: threading.Event | None = None) -> bool:
        """Every batch sent acknowledged and its outbox entry deleted (False on timeout): a process
        that stopped between the ack and the delete would send the batch again at its next start.
        Nobody can ack once stdout is closed (asked of the pipe: nothing is written while this
        waits, so no write finds it out), nor once `acks_ended` is set (the end of stdin, read
        after every ack before it was handled): no waiting for acks then, only for deletes under way."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight or self._deleting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if not self._deleting and (self.writer.reader_gone()
                                           or (acks_ended is not None and acks_ended.is_set())):
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def interrupt(self) -> None:
        """Wake senders blocked on backpressure: they return without sending (engine stopping)."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def resume(self) -> None:
        """A new engine starts: senders are no longer interrupted, and an acknowledged batch whose
        outbox delete is done can no longer be met by its outbox re-send."""
        with self._cond:
            self._interrupted = False
            self._engine += 1
            self._acked = {key: done for key, done in self._acked.items() if not done}

    def _encode(self, batch: int, stream: str, payload: bytes) -> bytearray:
        """The batch's event messages, appended into one buffer as they are made (a list of them,
        then joined, held 3x the result at the peak: a rate-limits cycle can be 100+ MB)."""
        lines = [line for line in payload.splitlines() if line.strip()]
        out = bytearray()
        for seq, line in enumerate(lines):
            try:
                doc = orjson.loads(line)  # orjson: this path runs once per event
                doc_id = doc.pop("_id")
                if not isinstance(doc_id, str):
                    raise TypeError(doc_id)
            except (ValueError, KeyError, AttributeError, TypeError):
                # a corrupted outbox line (every line the collector writes is an object with a string
                # `_id`): one clear error, as the Elasticsearch output's, and the batch no longer in
                # flight (a TypeError or JSONDecodeError left it there, its slot taken and every
                # re-send of it dropped unsaid as a replay of a batch in flight)
                n = _line_number(payload, seq)
                raise OutputError(f"{stream}: outbox line {n} is not a JSON document with an `_id`") from None
            ds = doc.get("data_stream") if isinstance(doc.get("data_stream"), dict) else {}
            dataset = ds.get("dataset") or f"openai.{stream}"
            namespace = ds.get("namespace") or self.namespace
            msg = {
                "type": "event",
                "batch": batch,
                "seq": seq,
                "batch_size": len(lines),
                "stream": stream,
                "dataset": dataset,
                "index": f"{ds.get('type') or 'logs'}-{dataset}-{namespace}",
                "id": doc_id,
                "document": doc,
            }
            try:
                out += orjson.dumps(msg)
            except TypeError:  # orjson's JSONEncodeError: nested past 254 levels, which it parses up to 1024
                n = _line_number(payload, seq)
                raise OutputError(f"{stream}: outbox line {n} is not a JSON document with an `_id`") from None
            out += b"\n"
        return out


# ----------------------------------------------------------------------------------------------
class Runner:
    """The `run` loop: control messages in, engine (re)configuration, graceful stop."""

    def __init__(
        self,
        writer: ProtocolWriter,
        *,
        state_dir: str,
        clock: Callable[[], float] = time.time,
        ack_on_flush: bool = False,
        ack_timeout: float = 10.0,
        max_inflight: int = 32,
        stdin=None,
        env: Mapping[str, str] = os.environ,
    ):
        import sys

        self.writer = writer
        self.state_dir = state_dir
        self.clock = clock
        self.ack_timeout = ack_timeout
        self.env = env
        if stdin is None and sys.stdin is None:  # started with stdin closed (`<&-`): Python leaves it None
            import io

            log.warning("stdin is closed: no config can arrive; stopping as at the end of stdin")
            stdin = io.BytesIO()
        self.stdin = stdin if stdin is not None else sys.stdin.buffer
        self.output = ProtocolOutput(writer, ack_on_flush=ack_on_flush, max_inflight=max_inflight,
                                     on_status=self._on_status)
        self.control: queue.Queue = queue.Queue()
        self.collection = None
        self.engine_thread: threading.Thread | None = None
        self.engine_stop: threading.Event | None = None
        self.revision = 0
        self.config_id: Any = None
        self._stream_status: dict[str, str] = {}
        # set by the stdin reader as soon as it reads `stop` or the end of stdin, before the run
        # loop gets to it: the loop itself can be waiting to write a status (a config's) to a
        # stdout nobody reads, and the stop has to end that wait (`ProtocolWriter.give_up_on`)
        self.stop_read = threading.Event()
        self.stdin_ended = threading.Event()  # the stdin reader is done: every ack it read was handled
        # the current engine's end was said: this loop read its `engine-ended`, or its thread said
        # it stopped on an error (`_run_engine`)
        self._engine_ended = False

    # -- stdin -----------------------------------------------------------------------------------
    def _read_stdin(self) -> None:
        """Reads until end of stdin, then queues `eof`; no line can end this thread early (a dead
        reader would leave later acks, `stop` and the end of stdin unread: a hung process)."""
        n = 0
        try:
            for raw in self.stdin:
                n += 1
                try:
                    self._dispatch(raw, n)
                except Exception as exc:  # noqa: BLE001 - a malformed line is never fatal
                    log.error("input line %d could not be handled, skipped: %s", n,
                              str(exc)[:200] or type(exc).__name__)
        except (OSError, ValueError) as exc:
            log.error("cannot read stdin: %s", exc)
        finally:
            self.stdin_ended.set()  # no ack can come any more: a stop waits for none (`wait_drained`)
            self.stop_read.set()
            self.control.put(("eof", None))

    def _dispatch(self, raw: bytes, n: int) -> None:
        line = raw.strip()
        if not line:
            return
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
            log.warning("input line %d is not JSON, skipped: %s", n, str(exc)[:200])
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            log.warning("input line %d is not a message object with a \"type\", skipped", n)
            return
        kind = msg["type"]
        if kind == "ack":
            self._ack(msg, n)
        elif kind in ("config", "stop"):
            if kind == "stop":
                self.stop_read.set()
            self.control.put((kind, msg))
        else:
            log.warning("input line %d has unknown message type %r, skipped (known: config, ack, stop)",
                        n, kind[:40])

    def _ack(self, msg: dict, n: int) -> None:
        batches = msg.get("batches") if "batches" in msg else [msg.get("batch")]
        if not isinstance(batches, list) or not batches:
            log.warning("input line %d: ack needs \"batch\" (an integer) or \"batches\" (a list), skipped", n)
            return
        # one line per kind of problem, its values bounded: an ack of thousands of ids, or of a
        # megabyte string, is still a short line (a long one is dropped whole by the stderr queue)
        bad, unknown = [], []
        for b in batches:
            if not isinstance(b, int) or isinstance(b, bool):
                bad.append(b)
            elif not self.output.ack(b):
                unknown.append(b)
        if bad:
            log.warning("input line %d: ack of %s skipped: batch ids are integers", n, _some(bad))
        if unknown:
            log.warning("input line %d: ack of batch%s %s ignored: not awaiting an ack "
                        "(already acked, or sent by an earlier process)", n, "es" if len(unknown) > 1 else "",
                        _some(unknown))

    # -- configuration ---------------------------------------------------------------------------
    def _configure(self, msg: dict) -> None:
        from .config import ConfigError, config_from_dict
        from .logs import redact, register_secret

        data = msg.get("config")
        cid = msg.get("id")
        if isinstance(data, dict) and isinstance(data.get("api_key"), str):
            register_secret(data["api_key"])  # before any message could echo it
        problems: list[ConfigError] = []
        try:
            orjson.dumps(cid)
        except TypeError as exc:  # echoed in every status about this config, so it has to encode
            problems.append(ConfigError("id", f"cannot be echoed in a status message: {exc} (integers fit "
                                              "in 64 bits, strings are UTF-8, nesting is at most 254 deep)"))
            cid = None
        try:
            if not isinstance(data, dict):
                raise ConfigError("config", "the config message needs a \"config\" object (the config file's settings)")
            config = config_from_dict(data, env=self.env)
        except ConfigError as exc:
            problems.extend(exc.errors)
        except Exception as exc:  # noqa: BLE001 - a validation bug must reject the config, not end the process
            log.error("config validation failed unexpectedly: %s: %.200s", type(exc).__name__, redact(str(exc)))
            problems.append(ConfigError("config", f"could not be validated ({type(exc).__name__}); see the log"))
        if problems:
            text = redact("; ".join(map(str, problems)))
            log.error("config rejected: %s", text)
            # the old config runs only while its engine does: one whose every stream stopped, or
            # that stopped on an error, is no longer running (the input said `failed`). Told by the
            # engine's `engine-ended` as this loop read it, or by the engine's thread as it said the
            # error, not by its thread being alive: the thread queues that message, then ends, and a
            # config read in between is after the `failed`
            if self.collection is not None and not self._engine_ended:
                self.writer.status("input", "degraded",
                                   f"config rejected, still running revision {self.revision}: {text}",
                                   config_id=cid, revision=self.revision)
            else:
                self.writer.status("input", "failed", f"config rejected, waiting for a valid one: {text}",
                                   config_id=cid, revision=self.revision)
            return
        self.writer.status("input", "configuring", "applying a new config", config_id=cid,
                           revision=self.revision + 1)
        if self.writer.closed.is_set():  # given up after a stop, or the reader is gone: no new engine
            return
        self._stop_engine()
        self.revision += 1
        self.config_id = cid
        self.output.namespace = config.namespace
        self._start_engine(config)

    def _start_engine(self, config) -> None:
        """Input `healthy` once the engine is built, before its thread can report a failure; `failed`
        (and no engine) when it cannot be built, e.g. an unusable state dir."""
        from . import app
        from .engine import Progress
        from .state import StateError

        stop = threading.Event()
        self.output.resume()
        try:
            collection = app.build(config, state_dir=self.state_dir, output=self.output, stop=stop,
                                   clock=self.clock, on_status=self._on_status,
                                   progress=Progress(enabled=False, on_report=self._on_progress))
        except (StateError, OutputError) as exc:
            self.writer.status("input", "failed", f"cannot start revision {self.revision}: {exc}",
                               config_id=self.config_id, revision=self.revision)
            log.error("cannot start revision %d: %s", self.revision, exc)
            return
        self.collection, self.engine_stop = collection, stop
        self._engine_ended = False
        names = ", ".join(c.name for c in collection.engine.collectors)
        self.writer.status("input", "healthy", f"running revision {self.revision} ({names or 'no streams'})",
                           config_id=self.config_id, revision=self.revision)
        self.engine_thread = threading.Thread(target=self._run_engine, args=(collection,), name="engine",
                                              daemon=True)
        self.engine_thread.start()

    def _run_engine(self, collection) -> None:
        """Queues `engine-ended` with whether the failure was already reported (an exception says
        more than the run loop's "every stream stopped")."""
        reported = False
        try:
            collection.engine.run(once=False)
        except StdoutClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - reported, never a traceback on stdout
            from .logs import redact

            log.error("engine stopped: %s", redact(str(exc)) or type(exc).__name__)
            if collection is self.collection:
                # before the `failed` is out: a config the loop reads after it, before this thread's
                # `engine-ended`, said "still running revision N"
                self._engine_ended = True
            self.writer.status("input", "failed", f"engine stopped: {exc}", config_id=self.config_id,
                               revision=self.revision)
            reported = True
        self.control.put(("engine-ended", (collection, reported)))

    def _stop_engine(self) -> None:
        if self.collection is None:
            return
        assert self.engine_stop is not None and self.engine_thread is not None
        self.engine_stop.set()
        self.output.interrupt()
        self.engine_thread.join()
        try:
            # no wait for the old name cache's listing in flight (its daemon thread ends by itself)
            self.collection.close(names_wait=0)
        except Exception:  # noqa: BLE001
            pass
        self.collection = None
        self.engine_thread = None

    def _on_status(self, stream: str, status: str, reason: str) -> None:
        self._stream_status[stream] = status
        self.writer.status("stream", status, reason, stream=stream, revision=self.revision)

    def _on_progress(self, stream: str, message: str) -> None:
        """A long poll's progress (a backfill) as the stream's status message, every 30 s: a stream
        otherwise says `starting` with no word for as long as its first backfill runs. A stream
        that is degraded or failed keeps saying why."""
        status = self._stream_status.get(stream, "starting")
        if status in ("starting", "healthy"):
            self.writer.status("stream", status, message, stream=stream, revision=self.revision)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, stop_signal: threading.Event) -> int:
        reader = threading.Thread(target=self._read_stdin, name="stdin", daemon=True)
        reader.start()
        self.writer.give_up_on(stop_signal, self.ack_timeout, self.stop_read)
        self.writer.status("input", "starting", f"openai-input protocol {PROTOCOL_VERSION}: waiting for a config",
                           protocol=PROTOCOL_VERSION)
        reason = "stop requested"
        while True:
            if self.writer.reader_gone():
                log.warning("stdout was closed by the reader; stopping")
                self._stop_engine()
                self.output.wait_drained(self.ack_timeout)  # no ack can come: only a delete under way
                return 0
            if stop_signal.is_set():
                reason = "signal"
                break
            try:
                kind, msg = self.control.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "config":
                self._configure(msg)
            elif kind == "stop":
                stop_signal.set()  # from here on, a write nobody reads is given up (`give_up_on`)
                break
            elif kind == "eof":
                reason = "end of stdin"
                stop_signal.set()
                break
            elif kind == "engine-ended":
                collection, reported = msg
                if collection is self.collection:
                    self._engine_ended = True
                if collection is self.collection and not reported and not self.writer.closed.is_set():
                    failed = collection.engine.failed
                    why = "; ".join(f"{k}: {v}" for k, v in failed.items()) or "no data stream is enabled"
                    self.writer.status("input", "failed", f"every stream stopped: {why}", config_id=self.config_id,
                                       revision=self.revision)
        self.writer.status("input", "stopping", f"{reason}: finishing the page in flight")
        self._stop_engine()
        # not only while a batch is in flight: an ack the stdin reader took just before may still
        # be deleting its batch, and a process that exits under the delete sends it again
        if not self.output.ack_on_flush:
            if not self.output.wait_drained(self.ack_timeout, self.stdin_ended) and self.output.inflight():
                log.info("%d batches were not acknowledged; they are sent again at the next start",
                         self.output.inflight())
        self.writer.status("input", "stopped", "")
        return 0
