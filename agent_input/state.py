"""The collector's durable state: cursors, observations inside the revision window, the outbox.

Why sqlite: one file, transactions, in the standard library. The rule it enforces is the one
Singer and Filebeat's cursor inputs live by: a page's documents, what they say about each bucket
and the cursor that moves past them are written in ONE transaction, before anything is emitted.
A crash after that re-emits the stored bytes identically; a crash before it recomputes from the
old cursor, and the old observations, so no id can ever be reused for different content.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (
    stream TEXT NOT NULL, width TEXT NOT NULL,
    origin INTEGER NOT NULL,      -- first bucket start ever asked for: never re-read before it
    position INTEGER NOT NULL,    -- start of the first bucket not yet emitted
    PRIMARY KEY (stream, width)
);
CREATE TABLE IF NOT EXISTS observations (
    stream TEXT NOT NULL, width TEXT NOT NULL, bucket_start INTEGER NOT NULL,
    grp TEXT NOT NULL,            -- JSON of the group key
    revision INTEGER NOT NULL,
    counters TEXT NOT NULL,       -- JSON of the counts emitted so far (sum of all revisions)
    PRIMARY KEY (stream, width, bucket_start, grp)
);
CREATE TABLE IF NOT EXISTS outbox (
    batch INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    events INTEGER NOT NULL,
    payload BLOB NOT NULL         -- the exact NDJSON lines to emit, `_id` first
);
CREATE TABLE IF NOT EXISTS kv (
    k TEXT PRIMARY KEY, v TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Cursor:
    origin: int
    position: int


@dataclass(frozen=True)
class Observation:
    revision: int
    counters: Mapping[str, float]


@dataclass(frozen=True)
class PendingBatch:
    batch: int
    stream: str
    events: int
    payload: bytes


class StateError(RuntimeError):
    """The state directory cannot be used (unwritable, corrupt, locked by another collector)."""


def group_json(group: tuple) -> str:
    return orjson.dumps(group).decode()


class StateStore:
    """Thread-safe: one sqlite connection per thread, WAL journal, short busy waits."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.directory}: {exc.strerror}") from None
        self.path = self.directory / "state.sqlite3"
        self._local = threading.local()
        try:
            self._conn().executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StateError(f"cannot use state file {self.path}: {exc}") from None

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # 512 KiB page cache per connection (default 2 MiB): there is one connection per
            # stream thread and the outbox blobs passing through would fill every one of them
            conn.execute("PRAGMA cache_size=-512")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- cursors -----------------------------------------------------------------------------
    def cursor(self, stream: str, width: str) -> Cursor | None:
        row = self._conn().execute(
            "SELECT origin, position FROM cursors WHERE stream=? AND width=?", (stream, width)
        ).fetchone()
        return Cursor(*row) if row else None

    # -- observations ------------------------------------------------------------------------
    def observations(self, stream: str, width: str, start: int, end: int) -> dict[int, dict[str, Observation]]:
        """What was emitted per bucket start in [start, end), by group JSON."""
        out: dict[int, dict[str, Observation]] = {}
        rows = self._conn().execute(
            "SELECT bucket_start, grp, revision, counters FROM observations "
            "WHERE stream=? AND width=? AND bucket_start>=? AND bucket_start<?",
            (stream, width, start, end),
        )
        for bucket_start, grp, revision, counters in rows:
            out.setdefault(bucket_start, {})[grp] = Observation(revision, json.loads(counters))
        return out

    # -- the one transaction -----------------------------------------------------------------
    def commit_page(
        self,
        stream: str,
        width: str,
        *,
        payload: bytes,
        events: int,
        observations: Iterable[tuple[int, str, int, Mapping[str, float]]],
        cursor: Cursor,
        prune_before: int | None = None,
    ) -> int | None:
        """Store a page's outbox batch, observations and cursor atomically; return the batch id
        (None when the page produced no documents, only a cursor move)."""
        conn = self._conn()
        with _transaction(conn):
            batch = _insert_batch(conn, stream, payload, events)
            conn.executemany(
                "INSERT OR REPLACE INTO observations VALUES (?, ?, ?, ?, ?, ?)",
                (
                    (stream, width, b, g, r, orjson.dumps(c).decode())  # compact JSON, as json.dumps gave
                    for b, g, r, c in observations
                ),
            )
            conn.execute(
                "INSERT OR REPLACE INTO cursors VALUES (?, ?, ?, ?)",
                (stream, width, cursor.origin, cursor.position),
            )
            if prune_before is not None:
                conn.execute(
                    "DELETE FROM observations WHERE stream=? AND width=? AND bucket_start<?",
                    (stream, width, prune_before),
                )
        return batch

    # -- outbox ------------------------------------------------------------------------------
    def pending(self, stream: str | None = None) -> Iterator[PendingBatch]:
        """Unacknowledged batches, oldest first (re-emitted at start-up, byte for byte)."""
        sql = "SELECT batch, stream, events, payload FROM outbox"
        args: tuple = ()
        if stream is not None:
            sql += " WHERE stream=?"
            args = (stream,)
        for row in self._conn().execute(sql + " ORDER BY batch", args).fetchall():
            yield PendingBatch(row[0], row[1], row[2], bytes(row[3]))

    def ack(self, batch: int) -> None:
        """The output has the batch durably: drop it from the outbox."""
        conn = self._conn()
        with _transaction(conn):
            conn.execute("DELETE FROM outbox WHERE batch=?", (batch,))

    def pending_count(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    # -- small keyed state for other collectors (audit cursor, name caches) ------------------
    def get(self, key: str) -> str | None:
        row = self._conn().execute("SELECT v FROM kv WHERE k=?", (key,)).fetchone()
        return row[0] if row else None

    def commit_events(self, stream: str, payload: bytes, events: int, kv: Mapping[str, str]) -> int | None:
        """Outbox batch plus key/value state (e.g. an audit cursor) in one transaction."""
        conn = self._conn()
        with _transaction(conn):
            batch = _insert_batch(conn, stream, payload, events)
            conn.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", kv.items())
        return batch


def _insert_batch(conn: sqlite3.Connection, stream: str, payload: bytes, events: int) -> int | None:
    """An outbox row for a non-empty batch (inside the caller's transaction)."""
    if not events:
        return None
    return conn.execute(
        "INSERT INTO outbox (stream, events, payload) VALUES (?, ?, ?)", (stream, events, payload)
    ).lastrowid


class _transaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
