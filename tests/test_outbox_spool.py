"""The outbox's spool files: a large batch is written to a file of its own before the
transaction that names it, replayed byte for byte, removed on acknowledgement, and never left
behind by a crash in any of the windows between those steps."""
from __future__ import annotations

import io
import sqlite3

import pytest

from agent_input import state as state_mod
from agent_input.engine import Delivery
from agent_input.outputs import NdjsonOutput
from agent_input.state import INLINE_PAYLOAD_LIMIT, Cursor, StateDatabaseError, StateError, StateStore


def _lines(n: int, width: int = 900) -> bytes:
    return b"".join(b'{"_id":"%08d","pad":"%s"}\n' % (i, b"x" * width) for i in range(n))


BIG = _lines(INLINE_PAYLOAD_LIMIT // 900 + 50)  # just over the inline limit
SMALL = _lines(3)


def _commit(store: StateStore, payload: bytes, position: int = 60, observations=()) -> int | None:
    return store.commit_page("completions", "1m", payload=payload, events=payload.count(b"\n"),
                             observations=observations, cursor=Cursor(0, position))


def _spooled(store: StateStore) -> list[str]:
    return sorted(p.name for p in store.spool_dir.iterdir())


def _die(store: StateStore) -> None:
    """The process holding `store` is gone: the kernel drops its lock on the state directory."""
    store._unlock()


def _replayed(store: StateStore) -> bytes:
    out = io.BytesIO()
    Delivery(store, NdjsonOutput(out)).replay_pending()
    return out.getvalue()


def test_large_batch_goes_to_a_spool_file_small_one_stays_inline(tmp_path):
    store = StateStore(tmp_path)
    big, small = _commit(store, BIG), _commit(store, SMALL, 120)
    (name,) = _spooled(store)
    assert (store.spool_dir / name).read_bytes() == BIG
    rows = dict(store._conn().execute("SELECT batch, spool FROM outbox").fetchall())
    assert rows == {big: name, small: None}
    assert [b.payload for b in store.pending()] == [BIG, SMALL]
    store.ack(big)
    assert _spooled(store) == [], "an acknowledged batch's file is removed"
    assert [b.payload for b in store.pending()] == [SMALL]


def test_a_batch_of_exactly_the_inline_limit_stays_inline_and_an_empty_one_is_no_batch(tmp_path):
    """Batches up to INLINE_PAYLOAD_LIMIT bytes stay in sqlite (a file of its own costs two
    fsyncs); a commit without documents (a cursor or mark move) adds nothing to the outbox."""
    store = StateStore(tmp_path)
    line = b'{"_id":"x","pad":"%s"}\n'
    pad = INLINE_PAYLOAD_LIMIT - len(line % b"")
    exact = line % (b"x" * pad)
    assert len(exact) == INLINE_PAYLOAD_LIMIT
    assert _commit(store, exact) is not None and _spooled(store) == []
    assert store.commit_events("audit", b"", 0, {"audit:hwm": "1"}) is None
    assert store.pending_count() == 1 and store.get("audit:hwm") == "1"
    store.close()


def test_the_state_database_syncs_every_commit_to_disk(tmp_path):
    """A page committed is durable before it is emitted (synchronous=FULL in WAL mode): a power
    cut must not lose a cursor move whose documents the output already has."""
    store = StateStore(tmp_path)
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # macOS: the commit reaches the drive, not only its cache (F_FULLFSYNC; no-ops elsewhere)
    assert store._conn().execute("PRAGMA fullfsync").fetchone()[0] == 1
    assert store._conn().execute("PRAGMA checkpoint_fullfsync").fetchone()[0] == 1
    store.close()

def test_unacknowledged_spooled_batch_is_replayed_byte_for_byte_by_a_new_process(tmp_path):
    first = StateStore(tmp_path)
    _commit(first, BIG)
    first.close()
    second = StateStore(tmp_path)  # the restart
    assert _replayed(second) == BIG
    assert second.pending_count() == 0 and _spooled(second) == []


def test_crash_after_the_file_is_written_but_before_the_commit(tmp_path):
    store = StateStore(tmp_path)
    name = store._spool(BIG, BIG.count(b"\n"))  # the file is durable, the process dies here
    assert _spooled(store) == [name]
    _die(store)
    restarted = StateStore(tmp_path)
    assert _replayed(restarted) == b"", "a batch that never committed is not emitted"
    assert _spooled(restarted) == [], "its file is removed at the next start"
    assert restarted.cursor("completions", "1m") is None


def test_crash_after_the_ack_commits_but_before_the_unlink(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    batch = _commit(store, BIG)

    def die(path):
        raise KeyboardInterrupt  # the process is gone between the row's delete and the unlink

    monkeypatch.setattr(state_mod.os, "unlink", die)
    with pytest.raises(KeyboardInterrupt):
        store.ack(batch)
    monkeypatch.undo()
    _die(store)
    restarted = StateStore(tmp_path)
    assert _replayed(restarted) == b"", "an acknowledged batch is not sent again"
    assert _spooled(restarted) == []


def test_failed_transaction_removes_its_file_and_keeps_the_cursor(tmp_path):
    store = StateStore(tmp_path)
    _commit(store, SMALL, 60)

    def bad_observations():
        yield (0, "[]", 0, {"input_tokens": 1})
        raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(StateDatabaseError, match=r"^cannot write state file .*state\.sqlite3: disk I/O error \(is the disk full\?\)$"):
        _commit(store, BIG, 120, observations=bad_observations())
    assert _spooled(store) == []
    assert store.cursor("completions", "1m") == Cursor(0, 60)
    assert [b.payload for b in store.pending()] == [SMALL]


def test_a_missing_spool_file_is_a_clear_error_not_silent_loss(tmp_path):
    store = StateStore(tmp_path)
    batch = _commit(store, BIG)
    (store.spool_dir / _spooled(store)[0]).unlink()
    with pytest.raises(StateError, match=rf"outbox batch {batch} \(completions, \d+ documents\): cannot read .*outbox"):
        _replayed(store)


def test_an_unwritable_outbox_folder_is_a_state_error_and_nothing_commits(tmp_path):
    store = StateStore(tmp_path)
    store.spool_dir.rmdir()
    (tmp_path / "outbox").write_text("not a folder")
    with pytest.raises(StateError, match="cannot write outbox file"):
        _commit(store, BIG)
    assert store.cursor("completions", "1m") is None and store.pending_count() == 0


def test_an_outbox_folder_removed_under_a_running_collector_is_made_again(tmp_path):
    """In steady state only a large batch (a backfill after an outage) uses outbox/, so it can sit
    empty for weeks and be removed by a cleanup of old empty folders (systemd-tmpfiles under
    /var/tmp): every large batch then failed "cannot write outbox file ...: No such file or
    directory" at every poll until the collector was restarted."""
    store = StateStore(tmp_path)
    store.spool_dir.rmdir()
    batch = _commit(store, BIG)
    assert len(_spooled(store)) == 1
    assert [(b.batch, b.payload) for b in store.pending()] == [(batch, BIG)]
    assert store.cursor("completions", "1m") == Cursor(0, 60)

def test_a_new_store_in_the_same_process_never_writes_over_or_removes_a_pending_batch_s_file(tmp_path):
    """A reconfiguration in protocol mode opens a new store on the same directory in the same
    process, while the old engine's spooled batches wait for the supervisor's ack. Spool files were
    named pid-thread-counter with the counter starting again at 0, and the system reuses a thread's
    id for the next thread it starts (the main thread here stands for a new stream thread): the new
    store's first large batch met the name of an old one, its exclusive create failed, and the error
    path removed the OLD batch's file. That batch was lost from the outbox, and every later start
    failed on it ("cannot read")."""
    old = StateStore(tmp_path)
    first = _commit(old, BIG)
    old.close()
    new = StateStore(tmp_path)
    other = BIG.replace(b"x", b"y")
    second = _commit(new, other, 120)
    assert len(_spooled(new)) == 2
    assert [(b.batch, b.payload) for b in new.pending()] == [(first, BIG), (second, other)]


def test_a_spool_name_that_exists_already_is_an_error_that_leaves_that_file_alone(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    first = _commit(store, BIG)
    (taken,) = _spooled(store)
    monkeypatch.setattr(store, "_spool_name", lambda: taken)  # whatever made the name meet another
    with pytest.raises(StateError, match="cannot write outbox file .*exists"):
        _commit(store, BIG.replace(b"x", b"y"), 120)
    assert [(b.batch, b.payload) for b in store.pending()] == [(first, BIG)]
    assert store.cursor("completions", "1m") == Cursor(0, 60)


def test_state_from_before_spooling_is_upgraded_and_its_batches_replayed(tmp_path):
    conn = sqlite3.connect(tmp_path / "state.sqlite3")
    conn.executescript(
        "CREATE TABLE outbox (batch INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,"
        " events INTEGER NOT NULL, payload BLOB NOT NULL);")
    conn.execute("INSERT INTO outbox (stream, events, payload) VALUES (?, ?, ?)",
                 ("completions", BIG.count(b"\n"), BIG))
    conn.commit()
    conn.close()
    store = StateStore(tmp_path)
    assert _replayed(store) == BIG
    _commit(store, BIG)
    assert len(_spooled(store)) == 1


def test_write_transactions_queue_on_the_store_lock_not_in_sqlite(tmp_path, monkeypatch):
    """Stream threads' commits wait on a lock that wakes them when it frees, not in sqlite's busy
    handler (which sleeps up to 100 ms a try): with the lock held, a commit has not begun; once
    released it goes through at once; a failed BEGIN does not keep the lock."""
    import threading

    store = StateStore(tmp_path)
    store._write_lock.acquire()
    done = threading.Event()
    t = threading.Thread(target=lambda: (_commit(store, SMALL), done.set()))
    t.start()
    assert not done.wait(0.3), "a commit went ahead while another held the write lock"
    store._write_lock.release()
    assert done.wait(5)
    t.join()
    assert store.cursor("completions", "1m") == Cursor(0, 60)

    class Locked:
        def execute(self, sql, *args):
            raise sqlite3.OperationalError("database is locked")

    with pytest.raises(StateDatabaseError, match="database is locked"):
        with state_mod._transaction(Locked, store._write_lock):
            pass
    assert store._write_lock.acquire(timeout=1), "a failed BEGIN kept the write lock"
    store._write_lock.release()


def test_a_commit_that_cannot_begin_removes_its_spool_file(tmp_path, monkeypatch):
    """A large batch's file is written before its transaction; one that never began (another
    program's write transaction on the state file outlasting the busy timeout, or the store's own
    lock waited out) left the file behind at every try, until the next start: a poll retried under
    a backup's lock wrote one more page-sized file each time. It goes as a rolled-back one does."""
    import threading

    store = StateStore(tmp_path)
    _commit(store, SMALL, 60)
    monkeypatch.setattr(state_mod, "BUSY_TIMEOUT", 0.2)
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program's write transaction
    for _ in range(2):
        with pytest.raises(StateDatabaseError, match="database is locked"):
            _commit(store, BIG, 120)
    other.execute("ROLLBACK")
    other.close()
    assert _spooled(store) == []
    held = threading.Event()
    release = threading.Event()

    def hold():
        with store._write_lock:
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(5)
    with pytest.raises(StateDatabaseError, match="database is locked"):
        _commit(store, BIG, 120)
    release.set()
    t.join()
    assert _spooled(store) == []
    assert store.cursor("completions", "1m") == Cursor(0, 60)
    _commit(store, BIG, 120)
    assert len(_spooled(store)) == 1 and [b.payload for b in store.pending()] == [SMALL, BIG]
    store.close()


# -- durability order and a failed COMMIT (found by mutation testing) -------------------------------
def test_a_spool_file_and_its_folder_are_fsynced_before_a_row_names_it(tmp_path, monkeypatch):
    import os

    store = StateStore(tmp_path)
    seen = []
    real = state_mod.fsync_dir

    def spy(directory):
        seen.append((os.fspath(directory), store.pending_count()))
        real(directory)

    monkeypatch.setattr(state_mod, "fsync_dir", spy)
    store.commit_page("completions", "1m", payload=BIG, events=BIG.count(b"\n"), observations=(),
                      cursor=Cursor(0, 60))
    assert (os.fspath(store.spool_dir), 0) in seen
    store.close()


def test_a_commit_that_fails_rolls_back_removes_its_spool_file_and_the_store_goes_on(tmp_path):
    class FailingCommit:
        """The store's connection, whose first COMMIT fails (a disk error, a lock)."""

        def __init__(self, conn):
            self._conn, self.fail = conn, 1

        def execute(self, sql, *a):
            if sql == "COMMIT" and self.fail:
                self.fail -= 1
                raise sqlite3.OperationalError("disk I/O error")
            return self._conn.execute(sql, *a)

        def __getattr__(self, name):
            return getattr(self._conn, name)

    store = StateStore(tmp_path)
    store._local.conn = FailingCommit(store._conn())
    with pytest.raises(StateDatabaseError, match="disk I/O error"):
        store.commit_page("completions", "1m", payload=BIG, events=BIG.count(b"\n"), observations=(),
                          cursor=Cursor(0, 60))
    assert _spooled(store) == []
    store.commit_page("completions", "1m", payload=SMALL, events=3, observations=(), cursor=Cursor(0, 120))
    assert store.cursor("completions", "1m") == Cursor(0, 120)
    assert [b.payload for b in store.pending()] == [SMALL]
    store.close()


def test_the_stdout_output_flushes_before_acknowledging():
    raw = io.BytesIO()
    acked = []
    out = NdjsonOutput(io.BufferedWriter(raw, buffer_size=1 << 20))
    out.send("s", b'{"_id":"a"}\n', 1, lambda: acked.append(raw.getvalue()))
    assert acked == [b'{"_id":"a"}\n']


# -- agent_input/durable.py (found by mutation testing) ---------------------------------------------
def test_write_file_fsyncs_the_file_and_fsync_dir_the_folder(tmp_path, monkeypatch):
    import os
    import stat

    from agent_input import durable

    synced = []
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real(fd)

    monkeypatch.setattr(durable.os, "fsync", spy)
    path = tmp_path / "batch.ndjson"
    durable.write_file(path, SMALL)
    assert synced == [("file", path.stat().st_ino)]
    durable.fsync_dir(tmp_path)
    assert synced[1:] == [("dir", tmp_path.stat().st_ino)]


def test_write_file_is_private_exclusive_and_closes_its_descriptor(tmp_path, monkeypatch):
    import os

    from agent_input import durable

    opened = []
    real_open = os.open
    monkeypatch.setattr(durable.os, "open", lambda *a: opened.append(real_open(*a)) or opened[-1])
    old_umask = os.umask(0o022)
    try:
        durable.write_file(tmp_path / "spool", SMALL)
        durable.write_file(tmp_path / "dead-letter", b"x\n", flags=os.O_APPEND | os.O_CREAT, mode=0o640)
        durable.write_file(tmp_path / "dead-letter", b"y\n", flags=os.O_APPEND | os.O_CREAT, mode=0o640)
    finally:
        os.umask(old_umask)
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o600  # events are nobody else's to read
    assert (tmp_path / "dead-letter").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "dead-letter").read_bytes() == b"x\ny\n"
    with pytest.raises(FileExistsError):  # a spool file is never overwritten in place
        durable.write_file(tmp_path / "spool", b"other\n")
    assert (tmp_path / "spool").read_bytes() == SMALL
    assert len(opened) == 3
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed


def test_fsync_dir_passes_a_filesystem_that_cannot_fsync_a_folder_and_raises_a_real_error(tmp_path, monkeypatch):
    """One rule for every writer (the outbox's spool files and the file output alike)."""
    import errno
    import os

    from agent_input import durable

    def failing(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(durable.os, "fsync", failing(errno.EINVAL))
    durable.fsync_dir(tmp_path)  # the filesystem cannot: nothing to do about it
    monkeypatch.setattr(durable.os, "fsync", failing(errno.EIO))
    with pytest.raises(OSError):
        durable.fsync_dir(tmp_path)


class _FakeFcntl:
    """fcntl on macOS, as far as durable.fsync uses it: F_FULLFSYNC, or a filesystem refusing it."""

    def __init__(self, refuse: bool = False):
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse

    def fcntl(self, fd, cmd):
        self.calls.append((fd, cmd))
        if self.refuse:
            raise OSError(45, "Operation not supported")  # ENOTSUP on macOS
        return 0


def test_where_the_system_has_f_fullfsync_every_durable_write_uses_it(tmp_path, monkeypatch):
    """macOS: fsync leaves the data in the drive's cache, which a power cut drops; the outbox's
    spool files, the file output and the dead-letter file are acknowledged only after F_FULLFSYNC."""
    from agent_input import durable, es_output, outputs
    from agent_input.outputs import NdjsonFileOutput

    fake, plain = _FakeFcntl(), []
    monkeypatch.setattr(durable, "fcntl", fake)
    monkeypatch.setattr(durable, "_FULLFSYNC", 51)
    monkeypatch.setattr(durable.os, "fsync", lambda fd: plain.append(fd))
    durable.write_file(tmp_path / "spool", SMALL)
    monkeypatch.setattr(outputs, "fsync_dir", lambda d: None)  # a folder's fsync is not this test's
    monkeypatch.setattr(es_output, "fsync_dir", lambda d: None)
    file_out = NdjsonFileOutput(tmp_path / "events.ndjson")
    file_out.send("s", b'{"_id":"a"}\n', 1, lambda: None)
    file_out.close()
    es_output._append_records(tmp_path / "dead-letter.ndjson", iter([b'{"_id":"b"}\n']))
    assert len(fake.calls) == 3 and all(cmd == 51 for _, cmd in fake.calls)
    assert plain == []  # F_FULLFSYNC did it: no second, weaker sync


def test_a_filesystem_that_refuses_f_fullfsync_gets_a_plain_fsync(tmp_path, monkeypatch):
    from agent_input import durable

    fake, plain = _FakeFcntl(refuse=True), []
    monkeypatch.setattr(durable, "fcntl", fake)
    monkeypatch.setattr(durable, "_FULLFSYNC", 51)
    monkeypatch.setattr(durable.os, "fsync", lambda fd: plain.append(fd))
    durable.write_file(tmp_path / "spool", SMALL)
    assert len(fake.calls) == 1 and len(plain) == 1
