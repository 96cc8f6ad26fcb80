"""The collector's durable state: cursors, observations inside the revision window, the outbox.

Why sqlite: one file, transactions, in the standard library. The rule it enforces is the one
Singer and Filebeat's cursor inputs live by: a page's documents, what they say about each bucket
and the cursor that moves past them are written in ONE transaction, before anything is emitted.
A crash after that re-emits the stored bytes identically; a crash before it recomputes from the
old cursor, and the old observations, so no id can ever be reused for different content.

A large batch's bytes are not put into sqlite itself: they go to a file of their own in the
`outbox/` folder beside it, written and fsynced before the transaction that names the file. In
sqlite a backfill's ~300 MB of NDJSON was written twice (WAL, then checkpoint) and freed again
on acknowledgement, which cost a third of the collector's CPU and 50 MB of RSS
(docs/performance.md); a spool file is written once and unlinked. A file no row names (a crash
between the write and the commit, or between the acknowledgement and the unlink) is removed
when the collector next starts.

One collector per state directory: a store holds an exclusive flock on the directory (its pid
written in `<state dir>/lock`) from when it opens until `close`, so a second collector on the same directory
stops at its start with a StateError naming the first one's pid, before it removes any file or
opens its output.
"""
from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import orjson

from .durable import fsync_dir, write_file

try:
    import fcntl
except ImportError:  # not a POSIX system: the state directory is not locked (see `_lock_directory`)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("agent_input.state")

SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (
    stream TEXT NOT NULL, width TEXT NOT NULL,
    origin INTEGER NOT NULL,      -- first bucket start ever asked for: never re-read before it
    position INTEGER NOT NULL,    -- start of the first bucket not yet emitted
    settled INTEGER,              -- every bucket before it was read after it was final (NULL: older state)
    retired_at INTEGER,           -- the stream moved to another width here: read up to it only (NULL: active)
    PRIMARY KEY (stream, width)
);
CREATE TABLE IF NOT EXISTS observations (
    stream TEXT NOT NULL, width TEXT NOT NULL, bucket_start INTEGER NOT NULL,
    grp TEXT NOT NULL,            -- JSON of the group key
    revision INTEGER NOT NULL,
    counters TEXT NOT NULL,       -- JSON of the counts emitted so far (sum of all revisions)
    dims TEXT,                    -- JSON of the dimensions outside the group (costs' currency), or NULL
    PRIMARY KEY (stream, width, bucket_start, grp)
);
CREATE TABLE IF NOT EXISTS outbox (
    batch INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    events INTEGER NOT NULL,
    payload BLOB NOT NULL,        -- the exact NDJSON lines to emit, `_id` first (empty if spooled)
    spool TEXT                    -- or the name of the file in outbox/ that holds them
);
CREATE TABLE IF NOT EXISTS kv (
    k TEXT PRIMARY KEY, v TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Cursor:
    origin: int
    position: int
    # Every bucket before `settled` was read at least once after it became final (older than the
    # revision window). Between it and `position`, buckets were emitted while OpenAI could still
    # revise them: the next poll reads them again, however long ago the last one was. None: a
    # state directory from before this was kept.
    settled: int | None = None
    # The stream's bucket width changed: this width is read up to here (and re-read until final),
    # the new one from here on, so their documents never cover the same time. None: in use.
    retired_at: int | None = None


@dataclass(frozen=True)
class Observation:
    revision: int
    counters: Mapping[str, float]
    dims: Mapping[str, str | bool | None] | None = None  # what the group key leaves out (costs' currency)


@dataclass(frozen=True)
class PendingBatch:
    batch: int
    stream: str
    events: int
    payload: bytes


# The layout and meaning of the state file, in sqlite's `user_version`: a version that reads a
# file stamped higher refuses it rather than misread a newer layout (a downgrade). Files from before
# the stamp (0) are migrated in place. Raise it with any change an older version would misread.
STATE_VERSION = 1


def observed_values_in(conn: sqlite3.Connection, prefix: str, limit: int = 200) -> set[str]:
    """`StateStore.observed_values` on a connection of its own (`check` reads the state read-only,
    without taking the directory)."""
    pattern = '%"' + prefix.replace("%", "").replace("_", "\\_") + "%"
    rows = conn.execute("SELECT grp FROM observations WHERE grp LIKE ? ESCAPE '\\' LIMIT ?", (pattern, limit))
    found: set[str] = set()
    for (grp,) in rows:
        try:
            values = orjson.loads(grp)
        except orjson.JSONDecodeError:
            continue
        found.update(v for v in (values if isinstance(values, list) else [])
                     if isinstance(v, str) and v.startswith(prefix))
    return found


def newer_state_message(path: Path, found: int) -> str:
    """Why a state file stamped by a newer version is not used (see STATE_VERSION)."""
    return (f"state file {path} was written by a newer openai-input (state version {found}; this one reads up "
            f"to {STATE_VERSION}): run that version or a later one, or move {path.parent} aside to start afresh "
            "(the streams then read again from initial_interval)")


def not_a_directory_message(directory: str | Path) -> str | None:
    """Why `directory` cannot be made the state directory, as StateStore says it, or None: its name
    taken by something else (a file, a FIFO, a device, a link to nothing or a link loop), or a path
    through a file. Read without creating anything, for `check`: Path.is_file and exists read a
    link loop (ELOOP) or a path through a file (ENOTDIR) as "nothing there", "nothing recorded"."""
    directory = Path(directory)
    try:
        if stat.S_ISDIR(os.stat(directory).st_mode):
            return None
    except FileNotFoundError:
        if not os.path.islink(directory):
            return None  # nothing there yet: collect creates it
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            if exc.errno == errno.ENOTDIR:
                return f"cannot create state directory {directory}: {exc.strerror}"
            return None  # (permissions) the state file's own read says it
    return (f"cannot create state directory {directory}: something else has that name (a file, a FIFO, a device, "
            "or a link to no directory)")


def emptied_state_message(directory: Path) -> str | None:
    """Why the state file of `directory` is refused as emptied, or None. `outbox/` is made only
    once the file has its schema, so an empty file beside it was emptied; without it (a crash
    inside the very first open) there was nothing in it to lose. A write-ahead log beside the
    empty file does not save it: sqlite never reads one beside a database of no pages, it
    deletes it (the file gets its header before anything goes to the log: `PRAGMA journal_mode=WAL`)."""
    path = Path(directory) / "state.sqlite3"
    try:
        if path.stat().st_size or not (Path(directory) / "outbox").is_dir():
            return None
    except OSError:
        return None  # a new state directory (no file yet), or one sqlite will say is unusable
    return (f"state file {path} is empty (0 bytes: truncated, or restored from a bad backup), so its "
            f"cursors and unacknowledged batches are gone. Restore it from a backup, or move {Path(directory)} "
            "aside to start afresh (the streams then read again from initial_interval)")


# Batches up to this size stay inline in sqlite (a steady-state poll's handful of documents); a
# file of its own costs two fsyncs (file and folder), which only pays off for large batches.
INLINE_PAYLOAD_LIMIT = 256 * 1024

# How long a write transaction waits for another program's write lock on the state file (sqlite's
# busy timeout), counted from when it starts waiting: the stream threads queue for the store's own
# write lock first, and each waiting out the whole timeout again after the one before it made ten
# streams' failed commits take minutes (a `--once` run, or a SIGTERM, waited 13 x 30 s).
BUSY_TIMEOUT = 30.0
SPOOL_SUFFIX = ".ndjson"


class StateError(RuntimeError):
    """The state directory cannot be used (unwritable, corrupt, locked by another collector)."""


class StateDatabaseError(StateError):
    """sqlite could not read or write the state file (disk full, I/O error, locked by another
    program). Nothing is lost: what was being written is rolled back, what is in the outbox stays
    there; a later attempt, once the cause is gone, goes on from there."""


LOCK_NAME = "lock"  # `<state dir>/lock`: the pid of the collector that holds the directory's flock


def group_json(group: tuple) -> str:
    return orjson.dumps(group).decode()


class StateStore:
    """Thread-safe: one sqlite connection per thread, WAL journal, short busy waits."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # "File exists" said nothing of what is wrong with it
            raise StateError(not_a_directory_message(self.directory) or f"cannot create state directory "
                             f"{self.directory}: something else has that name") from None
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.directory}: {exc.strerror}") from None
        # One collector per state directory, for as long as this store is open: a second one would
        # emit the same pages again and, at its start, remove the first one's outbox files that are
        # written but not yet committed (`drop_orphans`).
        self._lock_file = _lock_directory(self.directory)
        try:
            self._open()
        except BaseException:
            self._unlock()
            raise

    def _open(self) -> None:
        self.path = self.directory / "state.sqlite3"
        self.spool_dir = self.directory / "outbox"
        self._local = threading.local()
        # Every connection opened, whichever thread uses it: `close` closes them all. A connection
        # is not freed with its thread (its statement cache refers back to it), only by a full
        # garbage collection, so each `run` reconfiguration left the old store's open until then.
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        # Write transactions queue here, not in sqlite: a connection that finds the database
        # locked sleeps in sqlite's busy handler (up to 100 ms a try, not woken when the lock
        # frees), which made ten streams' page commits wait up to 1.2 s (docs/performance.md).
        # sqlite's own lock still guards against another process.
        self._write_lock = threading.Lock()
        # Spool file names: this store's own token, then a count. Not the thread's id with a count
        # from 0: a new store in the same process (a reconfiguration) met the names of the old
        # one's files still waiting for an ack, the system reusing the ids of ended threads.
        self._spool_token = os.urandom(6).hex()
        self._spool_names = itertools.count()
        # Called before every write of collected data (a batch, a cursor, a mark); raises to refuse
        # it. The engine's organization check (`org_guard`): nothing is written for another
        # organization's key.
        self.write_check: Callable[[], None] | None = None
        self._refuse_emptied_state()
        try:
            conn = self._conn()
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > STATE_VERSION:  # before anything here changes it
                raise StateError(newer_state_message(self.path, found))
            conn.executescript(SCHEMA)
            # columns added since the first release, for a state dir from before them
            for table, column in (("outbox", "spool TEXT"), ("cursors", "settled INTEGER"),
                                  ("cursors", "retired_at INTEGER"), ("observations", "dims TEXT")):
                if column.split()[0] not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            if found < STATE_VERSION:
                conn.execute(f"PRAGMA user_version={STATE_VERSION}")
            identity = os.stat(self.path)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"cannot use state file {self.path}: {exc}") from None
        except OSError as exc:
            raise StateError(f"cannot use state file {self.path}: {exc.strerror}") from None
        self._identity = (identity.st_dev, identity.st_ino)
        try:  # after the state file has its schema: see `_refuse_emptied_state`
            self.spool_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create outbox folder {self.spool_dir}: {exc.strerror}") from None

    def _refuse_emptied_state(self) -> None:
        """A state file cut to 0 bytes (a backup restored badly, a truncation) is a new, empty
        database to sqlite: the collector started afresh from `initial_interval` without a word, its
        unacknowledged batches gone, and emitted revision 0 of buckets again under ids that already
        carried other counts (kept by `create`: the stored totals stayed low). See
        `emptied_state_message`."""
        message = emptied_state_message(self.directory)
        if message is not None:
            raise StateError(message)

    def _still_there(self) -> None:
        """Inside a write transaction that moves state on: the state file is still the one at its
        path. Deleted (the state directory removed by a cleanup) or replaced under the open
        connections, it took every later commit with it without an error: cursors and outbox
        written where no start would find them, the next start afresh from initial_interval."""
        try:
            at_path = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            at_path = None
        except OSError:
            return  # cannot look (a folder made unsearchable): sqlite still writes to its open file
        if at_path is None or (at_path.st_dev, at_path.st_ino) != self._identity:
            raise StateDatabaseError(
                f"state file {self.path} was {'deleted' if at_path is None else 'replaced'} while the "
                "collector was running: nothing more is stored or emitted; restart the collector (it goes on "
                "from the state file then at that path, or afresh without one)")

    def _sqlite(self, doing: str) -> "_sqlite_errors":
        """Turns a sqlite3.Error in its block into a StateDatabaseError naming the state file."""
        return _sqlite_errors(self.path, doing)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # used by this thread only; `close` (once the threads are done) closes it from its own
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # macOS: a commit is on the drive, not in its cache (durable.fsync says why); no-ops elsewhere
            conn.execute("PRAGMA fullfsync=ON")
            conn.execute("PRAGMA checkpoint_fullfsync=ON")
            # 512 KiB page cache per connection (default 2 MiB): there is one connection per
            # stream thread and the outbox blobs passing through would fill every one of them
            conn.execute("PRAGMA cache_size=-512")
            with self._conns_lock:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close every thread's connection and release the state directory (for another collector,
        or this process's next store). Called once the threads that used the store are done; an
        ack after it (a batch sent before a reconfiguration) opens a connection for that ack only."""
        try:
            with self._write_lock, self._conns_lock:  # not under a transaction in flight (a late ack)
                conns, self._conns = self._conns, []
                self._local = threading.local()  # a thread that uses the store again connects anew
                self._closed = True
            for conn in conns:
                conn.close()
        finally:
            self._unlock()

    def _release_if_closed(self) -> None:
        """After `close`: this thread's connection goes at once, not at a later `close`."""
        if self._closed:
            with self._conns_lock:
                conn = getattr(self._local, "conn", None)
                self._local.conn = None
                if conn is not None and conn in self._conns:
                    self._conns.remove(conn)
            if conn is not None:
                conn.close()

    def _unlock(self) -> None:
        lock, self._lock_file = self._lock_file, None
        if lock is not None:
            lock.close()

    # -- cursors -----------------------------------------------------------------------------
    def cursor(self, stream: str, width: str) -> Cursor | None:
        with self._sqlite("read"):
            row = self._conn().execute(
                "SELECT origin, position, settled, retired_at FROM cursors WHERE stream=? AND width=?", (stream, width)
            ).fetchone()
        return Cursor(*row) if row else None

    def cursors(self, stream: str) -> dict[str, Cursor]:
        """The stream's cursor of every bucket width it was ever collected at."""
        with self._sqlite("read"):
            rows = self._conn().execute(
                "SELECT width, origin, position, settled, retired_at FROM cursors WHERE stream=?", (stream,)).fetchall()
        return {width: Cursor(*rest) for width, *rest in rows}

    def put_cursors(self, stream: str, cursors: Mapping[str, Cursor], drop: Iterable[str] = ()) -> None:
        """Set several of a stream's cursors at once (a change of bucket width), deleting those of
        the widths in `drop` in the same transaction."""
        self._check_write()
        with self._transaction() as conn:
            self._still_there()
            conn.executemany("DELETE FROM cursors WHERE stream=? AND width=?", [(stream, w) for w in drop])
            conn.executemany(
                "INSERT OR REPLACE INTO cursors (stream, width, origin, position, settled, retired_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(stream, w, c.origin, c.position, c.settled, c.retired_at) for w, c in cursors.items()])

    # -- observations ------------------------------------------------------------------------
    def observations(self, stream: str, width: str, start: int, end: int) -> dict[int, dict[str, Observation]]:
        """What was emitted per bucket start in [start, end), by group JSON."""
        out: dict[int, dict[str, Observation]] = {}
        with self._sqlite("read"):
            rows = self._conn().execute(
                "SELECT bucket_start, grp, revision, counters, dims FROM observations "
                "WHERE stream=? AND width=? AND bucket_start>=? AND bucket_start<?",
                (stream, width, start, end),
            ).fetchall()
        for bucket_start, grp, revision, counters, dims in rows:
            out.setdefault(bucket_start, {})[grp] = Observation(revision, json.loads(counters),
                                                                json.loads(dims) if dims else None)
        return out

    def first_observation(self, stream: str, width: str) -> int | None:
        """The earliest bucket start with an observation (None: none kept)."""
        with self._sqlite("read"):
            row = self._conn().execute(
                "SELECT MIN(bucket_start) FROM observations WHERE stream=? AND width=?", (stream, width)).fetchone()
        return row[0] if row else None

    # -- the one transaction -----------------------------------------------------------------
    def commit_page(
        self,
        stream: str,
        width: str,
        *,
        payload: bytes,
        events: int,
        observations: Iterable[tuple],  # (bucket start, group JSON, revision, counters[, dims])
        cursor: Cursor,
        prune_before: int | None = None,
    ) -> int | None:
        """Store a page's outbox batch, observations and cursor atomically; return the batch id
        (None when the page produced no documents, only a cursor move)."""
        self._check_write()
        spool = self._spool(payload, events)
        with self._transaction(spool) as conn:
            self._still_there()
            batch = _insert_batch(conn, stream, payload, events, spool)
            conn.executemany(
                "INSERT OR REPLACE INTO observations (stream, width, bucket_start, grp, revision, counters, dims) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (stream, width, o[0], o[1], o[2], orjson.dumps(o[3]).decode(),  # compact JSON, as json.dumps gave
                     orjson.dumps(o[4]).decode() if len(o) > 4 and o[4] else None)
                    for o in observations
                ),
            )
            conn.execute(
                "INSERT OR REPLACE INTO cursors (stream, width, origin, position, settled, retired_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (stream, width, cursor.origin, cursor.position, cursor.settled, cursor.retired_at),
            )
            if prune_before is not None:
                conn.execute(
                    "DELETE FROM observations WHERE stream=? AND width=? AND bucket_start<?",
                    (stream, width, prune_before),
                )
        return batch

    # -- outbox ------------------------------------------------------------------------------
    def pending(self, up_to: int | None = None) -> Iterator[PendingBatch]:
        """Unacknowledged batches, oldest first (re-emitted at start-up, byte for byte); up to
        batch `up_to` only, when given. Each is read when its turn comes, and one
        acknowledged by then is left out: in protocol mode the supervisor acks what an earlier engine
        of this process sent while a new one re-sends the outbox (a reconfiguration), and that ack
        removes the row, then its spool file."""
        sql = "SELECT batch FROM outbox WHERE 1"
        args: tuple = ()
        if up_to is not None:
            sql += " AND batch<=?"
            args += (up_to,)
        with self._sqlite("read"):
            batches = [row[0] for row in self._conn().execute(sql + " ORDER BY batch", args)]
        for batch in batches:
            row = self._pending_row(batch)
            if row is None:
                continue  # acknowledged since the list was read
            name, events, payload, spool = row
            if spool is not None:
                try:
                    payload = (self.spool_dir / spool).read_bytes()
                except OSError as exc:
                    if isinstance(exc, FileNotFoundError) and self._pending_row(batch) is None:
                        continue  # acknowledged between the row's read and the file's
                    raise StateError(
                        f"outbox batch {batch} ({name}, {events} documents): cannot read "
                        f"{self.spool_dir / spool}: {exc.strerror}"
                    ) from None
            yield PendingBatch(batch, name, events, bytes(payload))

    def _pending_row(self, batch: int) -> tuple | None:
        with self._sqlite("read"):
            return self._conn().execute(
                "SELECT stream, events, payload, spool FROM outbox WHERE batch=?", (batch,)).fetchone()

    def ack(self, batch: int) -> None:
        """The output has the batch durably: drop it from the outbox (row first, then its file:
        a crash in between leaves a file no row names, removed at the next start)."""
        try:
            # (the ack reader deletes the old engine's batches while a reconfiguration closes it)
            with self._transaction() as conn:
                row = conn.execute("SELECT spool FROM outbox WHERE batch=?", (batch,)).fetchone()
                conn.execute("DELETE FROM outbox WHERE batch=?", (batch,))
        finally:
            self._release_if_closed()
        if row and row[0]:
            _unlink(self.spool_dir / row[0])

    def drop_orphans(self) -> int:
        """Remove outbox files no row names. Only the collector that owns the state calls this,
        at start-up, before any stream writes (a file being written is not yet named)."""
        try:
            files = {p.name for p in self.spool_dir.iterdir() if p.name.endswith(SPOOL_SUFFIX)}
        except OSError:
            return 0
        with self._sqlite("read"):
            named = {r[0] for r in self._conn().execute("SELECT spool FROM outbox WHERE spool IS NOT NULL")}
        orphans = files - named
        for name in orphans:
            _unlink(self.spool_dir / name)
        return len(orphans)

    def last_batch(self) -> int | None:
        """The newest batch in the outbox (None when it is empty)."""
        with self._sqlite("read"):
            return self._conn().execute("SELECT MAX(batch) FROM outbox").fetchone()[0]

    def pending_count(self) -> int:
        with self._sqlite("read"):
            return self._conn().execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    # -- small keyed state for other collectors (audit cursor, name caches) ------------------
    def get(self, key: str) -> str | None:
        with self._sqlite("read"):
            row = self._conn().execute("SELECT v FROM kv WHERE k=?", (key,)).fetchone()
        return row[0] if row else None

    def commit_events(self, stream: str, payload: bytes, events: int, kv: Mapping[str, str]) -> int | None:
        """Outbox batch plus key/value state (e.g. an audit cursor) in one transaction."""
        self._check_write()
        spool = self._spool(payload, events)
        with self._transaction(spool) as conn:
            self._still_there()
            batch = _insert_batch(conn, stream, payload, events, spool)
            conn.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", kv.items())
        return batch

    def observed_values(self, prefix: str, limit: int = 200) -> set[str]:
        """Up to `limit` distinct group values starting with `prefix` (`proj_`) in the stored
        observations: what the state holds of an organization before it kept a fingerprint."""
        with self._sqlite("read"):
            return observed_values_in(self._conn(), prefix, limit)

    def put_kv(self, key: str, value: str) -> None:
        """One key of the state's own bookkeeping (not collected data: no `write_check`). The
        organization check writes it from the name cache's listing thread, which a stop does not
        wait for: like `ack`, its connection is closed again after a `close`."""
        try:
            with self._transaction() as conn:
                conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, value))
        finally:
            self._release_if_closed()

    def _check_write(self) -> None:
        if self.write_check is not None:
            self.write_check()

    # -- spool files -------------------------------------------------------------------------
    def _spool(self, payload: bytes, events: int) -> str | None:
        """Write a large batch to its own durable file before the transaction that names it."""
        if not events or len(payload) <= INLINE_PAYLOAD_LIMIT:
            return None
        name = self._spool_name()
        path = self.spool_dir / name
        try:
            try:
                write_file(path, payload)
            except FileNotFoundError:
                # outbox/ was removed under the running collector (a cleanup of old empty folders:
                # in steady state only a large batch uses it): made again, as at the start, rather
                # than failing every large batch until a restart
                self.spool_dir.mkdir(exist_ok=True)
                fsync_dir(self.directory)
                write_file(path, payload)
            fsync_dir(self.spool_dir)  # the file's name is durable before a row can point at it
        except FileExistsError:  # another batch's file (the create is exclusive): not this one's to remove
            raise StateError(f"cannot write outbox file {path}: it exists already") from None
        except OSError as exc:
            _unlink(path)
            raise StateError(f"cannot write outbox file {path}: {exc.strerror}") from None
        return name

    def _spool_name(self) -> str:
        return f"{os.getpid()}-{self._spool_token}-{next(self._spool_names)}{SPOOL_SUFFIX}"

    def _transaction(self, spool: str | None = None) -> "_transaction":
        """A write transaction (BEGIN IMMEDIATE .. COMMIT) under the store's write lock, on this
        thread's connection (`with ... as conn`); rolled back, and its spool file removed, on any
        error. The connection is taken once the lock is held: `close` (a reconfiguration under
        `run`, while the ack reader or the name cache's listing thread still writes) closes every
        connection under that lock, and one taken before the queue for it could be closed before
        its transaction began ("Cannot operate on a closed database"), or while in use."""
        return _transaction(self._conn, self._write_lock,
                            on_rollback=(lambda: _unlink(self.spool_dir / spool)) if spool else None,
                            path=self.path)


def _insert_batch(conn: sqlite3.Connection, stream: str, payload: bytes, events: int,
                  spool: str | None) -> int | None:
    """An outbox row for a non-empty batch (inside the caller's transaction)."""
    if not events:
        return None
    return conn.execute(
        "INSERT INTO outbox (stream, events, payload, spool) VALUES (?, ?, ?, ?)",
        (stream, events, b"" if spool else payload, spool),
    ).lastrowid


def _unlink(path: Path) -> None:
    """Remove a spool file if it is there; one left behind is removed at the next start."""
    try:
        os.unlink(path)
    except OSError:
        pass


class _DirectoryLock:
    """An exclusive flock on the state directory itself (its own file descriptor): a file in it
    could be deleted (`lock` holds a pid and looks like a stale pid file) and let a second
    collector in. `lock` only tells another collector whose lock it met."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)  # closing the descriptor releases the flock


def _lock_directory(directory: Path) -> _DirectoryLock | None:
    """The state directory, exclusively flock-ed, with this process's pid in `<directory>/lock`;
    None where there is no flock. Another holder (another process, or another open store of this
    one) is a StateError naming its pid. The lock goes at `close`, or when the process dies."""
    if fcntl is None:
        log.debug("no fcntl on this platform: state directory %s is not locked", directory)
        return None
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise StateError(f"cannot open state directory {directory}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StateError(f"state directory {directory} is in use by another collector "
                             f"({_lock_holder(directory / LOCK_NAME)})") from None
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL):
            log.warning("state directory %s cannot be locked (%s): make sure no other collector uses it",
                        directory, exc.strerror)
            return None
        raise StateError(f"cannot lock state directory {directory}: {exc.strerror}") from None
    try:
        (directory / LOCK_NAME).write_text(f"{os.getpid()}\n")  # no fsync: a message, not state
    except OSError:
        pass  # the pid is only for another collector's message
    return _DirectoryLock(fd)


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_bytes()[:32].decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


_SQLITE_HINTS = {
    "SQLITE_FULL": "is the disk full?",
    "SQLITE_IOERR": "is the disk full?",
    "SQLITE_BUSY": "another program holds a write transaction on it",
    "SQLITE_LOCKED": "another program holds a write transaction on it",
    "SQLITE_READONLY": "is it writable?",
    "SQLITE_CANTOPEN": "is it readable and writable?",
}


def _sqlite_message(path: Path, doing: str, exc: sqlite3.Error) -> str:
    """E.g. "cannot write state file X: disk I/O error (is the disk full?)"."""
    name = getattr(exc, "sqlite_errorname", "") or ""  # Python 3.11+
    hint = next((h for code, h in _SQLITE_HINTS.items() if name == code or name.startswith(code + "_")), None)
    if (name.startswith("SQLITE_CANTOPEN") or "unable to open" in str(exc)) and _out_of_descriptors():
        hint = "too many open files: raise the collector's limit, `ulimit -n` or systemd's LimitNOFILE"
    elif hint is None:
        text = str(exc)
        hint = ("is the disk full?" if "disk I/O error" in text or "disk is full" in text else
                "another program holds a write transaction on it" if "is locked" in text else None)
    return f"cannot {doing} state file {path}: {exc}" + (f" ({hint})" if hint else "")


def _out_of_descriptors() -> bool:
    """Whether this process cannot open a file now (EMFILE/ENFILE): sqlite reports that as
    "unable to open database file", the same words as a file it may not read."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    return False


class _sqlite_errors:
    """sqlite3.Error in the block becomes a StateDatabaseError (a one-line message, no traceback)."""

    def __init__(self, path: Path, doing: str):
        self.path = path
        self.doing = doing

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, sqlite3.Error):
            raise StateDatabaseError(_sqlite_message(self.path, self.doing, exc)) from None
        return False


class _transaction:
    """sqlite3.Error anywhere in it (BEGIN, the statements, COMMIT) is rolled back and raised as
    StateDatabaseError naming the state file: the callers (a stream thread, the start-up replay,
    an ack) report one line, and nothing the transaction wrote counts."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], lock: threading.Lock, on_rollback=None,
                 path: Path | None = None):
        self.conn: sqlite3.Connection | None = None
        self.connect = connect  # called once the lock is held
        self.lock = lock
        self.on_rollback = on_rollback
        self.path = path

    def __enter__(self):
        started = time.monotonic()
        if not self.lock.acquire(timeout=BUSY_TIMEOUT):  # another thread waited out the lock before us
            self._discard()
            raise self._error(sqlite3.OperationalError("database is locked"))
        try:
            self.conn = self.connect()
            # what is left of the wait, not a whole busy timeout more after the queue for the lock
            left = BUSY_TIMEOUT - (time.monotonic() - started)
            self.conn.execute(f"PRAGMA busy_timeout={max(0, int(left * 1000))}")
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            self.lock.release()
            # nothing began, and nothing will name the spool file: a BEGIN another program's lock
            # held off (or a connection that could not open) left a large batch's file at each try
            self._discard()
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from None
            raise
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                try:
                    self.conn.execute("COMMIT")
                except sqlite3.Error as commit_exc:  # not committed: nothing may name the spool file
                    self._rollback()
                    raise self._error(commit_exc) from None
                return False
            self._rollback()
            if issubclass(exc_type, sqlite3.Error):
                raise self._error(exc) from None
            return False
        finally:
            self.lock.release()

    def _error(self, exc: sqlite3.Error) -> StateDatabaseError:
        return StateDatabaseError(_sqlite_message(self.path or Path("state.sqlite3"), "write", exc))

    def _rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction left to roll back (COMMIT failed and sqlite ended it)
        self._discard()

    def _discard(self) -> None:
        if self.on_rollback is not None:
            self.on_rollback()
