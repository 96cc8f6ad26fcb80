"""The state store's own failures, each one line for the user and never a loss:

- the state directory belongs to one collector at a time: a flock on the directory, held for
  the life of a StateStore (`<state dir>/lock` names the holder's pid), refuses a second one (another process, or another store of this process) with
  one line naming the holder's pid, before it can remove or write anything;
- sqlite failing (a full disk, another program's write lock) is a StateDatabaseError naming the
  state file, with what was being written rolled back and the outbox kept."""
from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys

import pytest

from agent_input.engine import Delivery, Engine, PollStats
from agent_input.outputs import NdjsonOutput
from agent_input import state as state_module
from agent_input.state import LOCK_NAME, Cursor, StateDatabaseError, StateError, StateStore

OPEN_STORE = "import sys; from agent_input.state import StateStore; StateStore(sys.argv[1]); print('opened')"


def _open_elsewhere(state) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", OPEN_STORE, str(state)], capture_output=True, text=True,
                          timeout=60)


def test_a_second_store_on_the_same_directory_is_refused_with_the_holders_pid(tmp_path):
    state = tmp_path / "state"
    store = StateStore(state)
    other = _open_elsewhere(state)
    assert other.returncode == 1 and "opened" not in other.stdout
    assert f"StateError: state directory {state} is in use by another collector (pid {os.getpid()})" \
        in other.stderr
    with pytest.raises(StateError, match=rf"^state directory .* is in use by another collector \(pid {os.getpid()}\)$"):
        StateStore(state)  # a second store of the same process too: it would run its own start-up
    assert (state / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    store.close()
    assert _open_elsewhere(state).stdout.strip() == "opened", "close releases the directory"
    StateStore(state).close()


def test_deleting_the_lock_file_does_not_let_a_second_collector_in(tmp_path):
    """`lock` holds a pid and looks like a stale pid file: cleaning it up let a second collector
    take the directory. The flock is on the directory itself; the file only names the holder."""
    state = tmp_path / "state"
    store = StateStore(state)
    (state / LOCK_NAME).unlink()
    other = _open_elsewhere(state)
    assert other.returncode == 1 and "in use by another collector (pid unknown)" in other.stderr
    store.close()
    assert _open_elsewhere(state).returncode == 0


def test_a_refused_collector_removes_nothing_of_the_running_ones(tmp_path):
    """The running collector has written a batch's spool file, not yet committed: a second
    collector's start-up (`drop_orphans`) used to delete it."""
    state = tmp_path / "state"
    store = StateStore(state)
    payload = b"".join(b'{"_id":"%06d","pad":"%s"}\n' % (i, b"x" * 900) for i in range(400))
    name = store._spool(payload, 400)
    with pytest.raises(StateError, match="in use by another collector"):
        StateStore(state).drop_orphans()
    assert (store.spool_dir / name).read_bytes() == payload
    store.commit_page("completions", "1m", payload=payload, events=400, observations=(), cursor=Cursor(0, 60))
    assert [b.payload for b in store.pending()] == [payload]
    store.close()


def test_the_lock_goes_with_a_process_that_dies(tmp_path):
    state = tmp_path / "state"
    killed = subprocess.run([sys.executable, "-c", "import os, sys; from agent_input.state import StateStore; "
                             "StateStore(sys.argv[1]); os.kill(os.getpid(), 9)", str(state)], timeout=60)
    assert killed.returncode == -9
    StateStore(state).close()  # no stale lock: a new collector starts


def test_a_store_that_fails_to_open_releases_the_directory(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.sqlite3").write_bytes(b"this is not an sqlite database, not even close" * 100)
    for _ in range(2):  # the second attempt meets the same error, not "in use" by the first
        with pytest.raises(StateError, match="cannot use state file"):
            StateStore(state)


def test_an_engine_that_fails_to_build_releases_the_directory(tmp_path, monkeypatch):
    """`run` builds a new engine for each config: one whose build failed must not keep the lock."""
    from agent_input import app
    from agent_input.config import config_from_dict
    from agent_input.outputs import NdjsonOutput

    def broken(*a, **kw):
        raise StateError("cannot build")

    monkeypatch.setattr(app, "_build", broken)
    config = config_from_dict({"url": "http://127.0.0.1:1", "api_key": "sk-admin-test-0123456789abcdef"}, env={})
    with pytest.raises(StateError, match="cannot build"):
        app.build(config, state_dir=tmp_path / "state", output=NdjsonOutput(open(os.devnull, "wb")))
    StateStore(tmp_path / "state").close()


# -- sqlite errors ----------------------------------------------------------------------------------
LINE = b'{"_id":"a1","data_stream":{"dataset":"openai.completions"}}\n'


def _write_locked(store: StateStore, monkeypatch) -> sqlite3.Connection:
    """Another program (`sqlite3 state.sqlite3`, say) holds a write transaction; the store gives up
    after 50 ms instead of its 30 s busy timeout."""
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(state_module, "BUSY_TIMEOUT", 0.05)
    return holder


def test_an_ack_that_cannot_write_is_a_state_error_and_the_batch_stays(tmp_path, monkeypatch):
    """Delivery.replay_pending acks on the main thread: sqlite3.OperationalError escaped `collect`
    as a traceback."""
    store = StateStore(tmp_path / "state")
    batch = store.commit_page("completions", "1m", payload=LINE, events=1, observations=(), cursor=Cursor(0, 60))
    holder = _write_locked(store, monkeypatch)
    with pytest.raises(StateDatabaseError, match=rf"^cannot write state file {store.path}: database is locked "
                                                 r"\(another program holds a write transaction on it\)$"):
        store.ack(batch)
    holder.rollback()
    assert [b.batch for b in store.pending()] == [batch], "the batch must stay in the outbox"
    store.ack(batch)  # once the lock is gone
    assert store.pending_count() == 0
    store.close()


def test_a_commit_that_cannot_begin_is_a_state_error_and_nothing_moves(tmp_path, monkeypatch):
    store = StateStore(tmp_path / "state")
    holder = _write_locked(store, monkeypatch)
    with pytest.raises(StateDatabaseError, match="cannot write state file .*: database is locked"):
        store.commit_page("completions", "1m", payload=LINE, events=1, observations=(), cursor=Cursor(0, 60))
    holder.rollback()
    assert store.cursor("completions", "1m") is None and store.pending_count() == 0
    store.close()


def test_streams_queued_behind_another_programs_write_lock_give_up_together(tmp_path, monkeypatch):
    """Each stream thread waits for the store's write lock, then for sqlite's: every one of them
    waited a whole busy timeout more after the one before it gave up, so with another program
    holding a write transaction a `--once` run of 13 streams (or a SIGTERM) took 13 x 30 s. The
    wait is counted from when a commit starts waiting, so they all give up after one timeout."""
    import threading
    import time

    store = StateStore(tmp_path / "state")
    holder = _write_locked(store, monkeypatch)
    monkeypatch.setattr(state_module, "BUSY_TIMEOUT", 0.5)
    errors = []

    def commit(n):
        try:
            store.commit_page(f"s{n}", "1m", payload=LINE, events=1, observations=(), cursor=Cursor(0, 60))
        except StateDatabaseError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=commit, args=(n,)) for n in range(6)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - started
    holder.rollback()
    assert len(errors) == 6 and all("database is locked" in e for e in errors), errors
    assert elapsed < 1.5, f"the commits gave up one after another ({elapsed:.1f}s for 6 x 0.5s)"
    store.commit_page("s0", "1m", payload=LINE, events=1, observations=(), cursor=Cursor(0, 60))  # lock gone
    assert store.cursor("s0", "1m") == Cursor(0, 60)
    store.close()


class _Malformed:
    """The store's connection, on a state file that went bad under it."""

    def execute(self, sql, *args):
        raise sqlite3.DatabaseError("database disk image is malformed")


def test_start_up_reads_that_fail_are_state_errors_and_remove_nothing(tmp_path):
    store = StateStore(tmp_path / "state")
    payload = b"".join(b'{"_id":"%06d","pad":"%s"}\n' % (i, b"x" * 900) for i in range(400))
    store.commit_page("completions", "1m", payload=payload, events=400, observations=(), cursor=Cursor(0, 60))
    spooled = sorted(store.spool_dir.iterdir())
    real = store._conn()
    store._local.conn = _Malformed()
    for start_up in (store.drop_orphans, lambda: list(store.pending()),
                     lambda: Delivery(store, NdjsonOutput(io.BytesIO())).replay_pending()):
        with pytest.raises(StateDatabaseError, match=rf"^cannot read state file {store.path}: database disk "
                                                     "image is malformed$"):
            start_up()
    assert sorted(store.spool_dir.iterdir()) == spooled, "a batch's file was removed"
    store._local.conn = real
    store.close()


def test_stream_reads_that_fail_are_state_errors_not_raw_sqlite_errors(tmp_path):
    """A stream's reads (its cursors, what it emitted, its kv state) on a state file gone bad give
    the same one line naming the file as the writes do, not a bare sqlite3.DatabaseError."""
    store = StateStore(tmp_path / "state")
    real = store._conn()
    store._local.conn = _Malformed()
    for read in (lambda: store.cursor("completions", "1m"), lambda: store.cursors("completions"),
                 lambda: store.observations("completions", "1m", 0, 60), store.pending_count,
                 lambda: store.get("audit.cursor")):
        with pytest.raises(StateDatabaseError, match=rf"^cannot read state file {store.path}: database disk "
                                                     "image is malformed$"):
            read()
    store._local.conn = real
    store.close()


def test_a_stream_whose_commit_fails_does_not_advance_and_is_reported(tmp_path):
    """On a stream thread a failed commit is that stream's failure (kept cursor, nothing emitted,
    retried at its next poll; `--once` exits 1 naming the state file), never the others'."""
    store = StateStore(tmp_path / "state")
    out = io.BytesIO()
    delivery = Delivery(store, NdjsonOutput(out))

    def disk_error():
        yield (0, "[]", 0, {"input_tokens": 1})
        raise sqlite3.OperationalError("disk I/O error")

    class Completions:
        name, interval = "completions", 60.0

        def poll(self, now):
            delivery.commit_page("completions", "1m", LINE, 1, observations=disk_error(), cursor=Cursor(0, 60))
            return PollStats(events=1)

    class Embeddings:
        name, interval = "embeddings", 60.0

        def poll(self, now):
            delivery.commit_page("embeddings", "1m", LINE.replace(b"a1", b"e1"), 1, observations=(),
                                 cursor=Cursor(0, 60))
            return PollStats(events=1)

    statuses = []
    engine = Engine([Completions(), Embeddings()], delivery, on_status=lambda *s: statuses.append(s))
    assert engine.run(once=True) == 1
    assert engine.failed["completions"] == (f"cannot write state file {store.path}: disk I/O error "
                                            "(is the disk full?)")
    assert ("completions", "degraded", engine.failed["completions"]) in statuses
    assert store.cursor("completions", "1m") is None, "a stream that failed to commit must not advance"
    assert store.cursor("embeddings", "1m") == Cursor(0, 60) and "embeddings" not in engine.failed
    assert out.getvalue() == LINE.replace(b"a1", b"e1"), "only the committed page is emitted"
    assert store.pending_count() == 0
    store.close()


def _open_files_under(directory) -> list[str]:
    """The files under `directory` this process holds open (Linux: /proc/self/fd)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return sorted(found)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_closing_a_store_closes_the_connections_of_every_thread_that_used_it(tmp_path):
    """Each thread has its own sqlite connection, and close() closed only the caller's: a
    connection is freed only by a full garbage collection (its statement cache refers back to
    it), so every `run` reconfiguration left the old engine's, its streams' and the ack reader's
    connections open (100 configs: 16 open files became 57). An ack of a batch sent before the
    close (still acknowledgeable across a reconfiguration) works and leaves nothing open either."""
    import gc
    import threading

    gc.disable()  # what is open is what close() left, not what a collection happened to free
    try:
        store = StateStore(tmp_path / "state")
        batches: list = []

        def commit() -> None:
            batches.append(store.commit_events("audit", b'{"_id":"a"}\n', 1, {"k": "v"}))

        workers = [threading.Thread(target=commit) for _ in range(3)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert store.get("k") == "v"
        assert any(p.endswith("state.sqlite3") for p in _open_files_under(tmp_path))
        store.close()
        assert _open_files_under(tmp_path) == []

        late = threading.Thread(target=store.ack, args=(batches[0],))  # the ack reader, after the close
        late.start()
        late.join()
        assert _open_files_under(tmp_path) == []
        again = StateStore(tmp_path / "state")
        assert [b.batch for b in again.pending()] == sorted(batches[1:])
        again.close()
    finally:
        gc.enable()


class _CloseFirst:
    """A store's write lock, with the store's close getting it just before the next write does
    (once): what `run`'s reconfiguration does to a write from another thread."""

    def __init__(self, store: StateStore):
        self.store, self.lock, self.armed = store, store._write_lock, True

    def acquire(self, *args, **kwargs):
        if self.armed:
            self.armed = False
            self.store.close()
        return self.lock.acquire(*args, **kwargs)

    def release(self):
        self.lock.release()

    def __enter__(self):
        self.acquire()

    def __exit__(self, *exc):
        self.release()


def _close_just_before_the_write_lock(store: StateStore) -> _CloseFirst:
    store._write_lock = _CloseFirst(store)
    return store._write_lock


def test_an_ack_the_store_s_close_comes_just_before_deletes_its_batch_all_the_same(tmp_path):
    """`run` closes the old engine's store at a reconfiguration while the ack reader deletes that
    engine's acknowledged batches. The ack took its thread's connection, then queued for the write
    lock; the close got the lock first and closed that connection: "Cannot operate on a closed
    database", the batch left in the outbox and sent again by the next process though
    acknowledged and drained (the soak, seed 2611: 24 moderations events)."""
    store = StateStore(tmp_path / "state")
    batch = store.commit_events("moderations", b'{"_id":"a"}\n', 1, {"k": "v"})
    close_first = _close_just_before_the_write_lock(store)
    store.ack(batch)
    assert not close_first.armed, "the close must have come between"
    assert _open_files_under(tmp_path) == []
    again = StateStore(tmp_path / "state")
    assert again.pending_count() == 0
    again.close()


def test_a_key_the_store_s_close_comes_just_before_is_stored_on_a_connection_of_its_own(tmp_path):
    """The organization check records its fingerprint (`put_kv`) from the name cache's listing
    thread, which a stop does not wait for: its write could take the thread's connection, then
    queue for the write lock while the collection's close took the lock and closed that
    connection ("Cannot operate on a closed database"), or used it while close() was still
    closing it, outside the lock: a segfault in a stress of put_kv against close. Like `ack`, the
    connection is taken once the write lock is held, and closed again after a close."""
    store = StateStore(tmp_path / "state")
    store.put_kv("a", "1")  # this thread has its connection
    close_first = _close_just_before_the_write_lock(store)
    store.put_kv("b", "2")
    assert not close_first.armed, "the close must have come between"
    assert _open_files_under(tmp_path) == []
    again = StateStore(tmp_path / "state")
    assert (again.get("a"), again.get("b")) == ("1", "2")
    again.close()


def test_a_state_file_cut_to_0_bytes_is_refused_in_one_line_not_taken_for_a_new_one(tmp_path):
    """sqlite takes an empty file for a new database: after a bad restore the collector started
    afresh without a word, its outbox gone, and re-emitted revision 0 of buckets already emitted
    (the same ids with other counts, which `create` drops: totals stayed low)."""
    store = StateStore(tmp_path / "state")
    store.commit_page("completions", "1m", payload=LINE, events=1, observations=(), cursor=Cursor(0, 60))
    store.close()
    os.truncate(store.path, 0)
    with pytest.raises(StateError, match=rf"^state file {store.path} is empty \(0 bytes: truncated, or restored "
                                         r"from a bad backup\), so its cursors and unacknowledged batches are "
                                         rf"gone\. Restore it .*, or move {tmp_path / 'state'} aside"):
        StateStore(tmp_path / "state")
    assert os.path.getsize(store.path) == 0, "the emptied file must be left as it is"
    StateStore(tmp_path / "state2").close()  # a new directory is no emptied one


def test_an_empty_state_file_from_a_crash_inside_the_first_open_starts_afresh(tmp_path):
    """A crash between sqlite creating the file and writing its header leaves 0 bytes, and no
    `outbox/` yet: nothing was collected, so that directory still opens."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.sqlite3").write_bytes(b"")
    store = StateStore(tmp_path / "state")
    assert store.cursor("completions", "1m") is None and store.spool_dir.is_dir()
    store.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_state_directory_removed_under_a_running_collector_stops_its_commits_in_one_line(tmp_path, how):
    """sqlite writes on into a state file that has no name left (a cleanup removed the state
    directory) or that another file replaced: every later cursor and batch was stored where no
    start would find it, silently, and the next start began afresh from initial_interval."""
    import shutil

    directory = tmp_path / "state"
    store = StateStore(directory)
    store.commit_page("completions", "1m", payload=LINE, events=1, observations=(), cursor=Cursor(0, 60))
    if how == "deleted":
        shutil.rmtree(directory)
    else:
        (tmp_path / "restored").write_bytes(store.path.read_bytes())
        os.replace(tmp_path / "restored", store.path)
    for commit in (lambda: store.commit_page("completions", "1m", payload=LINE, events=1, observations=(),
                                             cursor=Cursor(0, 120)),
                   lambda: store.commit_events("audit", LINE, 1, {"audit:hwm": "60"}),
                   lambda: store.put_cursors("completions", {"1d": Cursor(0, 86400)})):
        with pytest.raises(StateDatabaseError, match=rf"^state file {store.path} was {how} while the collector "
                                                     "was running: nothing more is stored or emitted"):
            commit()
    store.close()


@pytest.mark.skipif(not hasattr(os, "sysconf") or sys.platform != "linux", reason="uses RLIMIT_NOFILE")
def test_a_thread_that_cannot_open_its_connection_for_lack_of_descriptors_says_so(tmp_path):
    """`ulimit -n 32` with every stream on: a stream thread's own sqlite connection cannot be
    opened (EMFILE), which sqlite words "unable to open database file", and the hint sent the user
    to the file's permissions ("is it readable and writable?") instead of the open-files limit."""
    script = f'''
import os, resource, threading
from agent_input.state import StateStore, StateError
store = StateStore({str(tmp_path / "state")!r})
store.cursor("completions", "1m")
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
out = []
def read():
    try:
        store.cursor("completions", "1m")
    except StateError as exc:
        out.append(str(exc))
t = threading.Thread(target=read); t.start(); t.join()
print(out[0] if out else "no error")
'''
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: __import__("resource").setrlimit(
                              __import__("resource").RLIMIT_NOFILE, (64, 64)))
    assert proc.stdout.strip() == (f"cannot read state file {tmp_path / 'state' / 'state.sqlite3'}: unable to "
                                   "open database file (too many open files: raise the collector's limit, "
                                   "`ulimit -n` or systemd's LimitNOFILE)"), proc.stdout + proc.stderr


def test_a_state_file_a_newer_version_wrote_is_refused_untouched_and_an_older_one_is_stamped(tmp_path):
    """A downgrade: an older collector opened a newer version's state file without noticing and
    ran on a layout it did not know. The file carries its version in sqlite's user_version now;
    one stamped higher is refused in one line before anything in it changes. A file from before
    the stamp (0) is migrated and stamped."""
    state = tmp_path / "state"
    store = StateStore(state)
    store.close()
    with sqlite3.connect(state / "state.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == state_module.STATE_VERSION
        db.execute("PRAGMA user_version=0")  # what a version before the stamp left
    StateStore(state).close()
    with sqlite3.connect(state / "state.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == state_module.STATE_VERSION
        db.execute(f"PRAGMA user_version={state_module.STATE_VERSION + 1}")
        db.execute("CREATE TABLE future (x)")
    before = (state / "state.sqlite3").read_bytes()
    with pytest.raises(StateError) as refused:
        StateStore(state)
    assert "written by a newer openai-input" in str(refused.value) and "\n" not in str(refused.value)
    assert (state / "state.sqlite3").read_bytes() == before
    elsewhere = _open_elsewhere(state)  # the refused store let go of the directory's lock
    assert elsewhere.returncode != 0 and "written by a newer openai-input" in elsewhere.stderr


def test_a_delivered_batch_whose_outbox_delete_fails_is_said_not_a_failed_poll(tmp_path, monkeypatch, caplog):
    """On a full disk the page's commit went through and the output took the batch, then deleting
    it from the outbox failed: the poll failed with "cursor kept, will retry" although the cursor
    had moved and the documents were delivered. The batch is said to be delivered and kept, to be
    sent again at the next start (a duplicate by _id)."""
    store, out = StateStore(tmp_path / "state"), io.BytesIO()
    delivery = Delivery(store, NdjsonOutput(out))

    def full(batch):
        raise StateDatabaseError("cannot write state file x: disk I/O error (is the disk full?)")

    monkeypatch.setattr(store, "ack", full)
    delivery.commit_events("audit", [b'{"_id":"a"}\n'], {"audit:mark": "1"})  # no exception: it was delivered
    assert out.getvalue() == b'{"_id":"a"}\n' and store.get("audit:mark") == "1"
    assert len(delivery.unremoved) == 1 and store.pending_count() == 1
    said = [r for r in caplog.records if "was delivered, but cannot be deleted from the outbox" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "ERROR"
    store.close()


def test_a_refused_write_check_stores_nothing_of_any_kind(tmp_path):
    """`write_check` (the organization check) runs before every write of collected data: a page,
    an audit or rate-limits batch, a change of bucket width's cursors. Refused, none of them leaves
    a row, nor a large batch's file in outbox/."""
    store = StateStore(tmp_path / "state")
    store.commit_page("completions", "1m", payload=LINE, events=1, observations=(), cursor=Cursor(0, 60))
    rows = _rows(store)

    def refuse():
        raise StateError("another organization")

    store.write_check = refuse
    big = b'{"_id":"big","pad":"' + b"x" * (state_module.INLINE_PAYLOAD_LIMIT + 10) + b'"}\n'
    for write in (lambda: store.commit_page("completions", "1m", payload=big, events=1, observations=(),
                                            cursor=Cursor(0, 120)),
                  lambda: store.commit_events("audit", big, 1, {"audit:mark": "1"}),
                  lambda: store.put_cursors("completions", {"1h": Cursor(0, 3600)})):
        with pytest.raises(StateError, match="another organization"):
            write()
    assert _rows(store) == rows and not list(store.spool_dir.iterdir())
    store.close()


def _rows(store: StateStore) -> dict:
    with sqlite3.connect(store.path) as db:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in ("cursors", "outbox", "kv")}


def test_a_state_directory_replaced_by_a_file_stops_its_commits_in_one_line(tmp_path):
    """The state file's path now goes through a file (ENOTDIR): as gone as a deleted one."""
    import shutil

    directory = tmp_path / "state"
    store = StateStore(directory)
    shutil.rmtree(directory)
    directory.write_text("not a directory")
    with pytest.raises(StateDatabaseError, match=rf"^state file {store.path} was deleted while the collector"):
        store.commit_events("audit", LINE, 1, {"audit:hwm": "60"})
    store.close()


def test_pending_up_to_a_batch_leaves_the_later_ones_out(tmp_path):
    """The batches a start held back are re-sent up to the start's last one only: the streams'
    own later batches are already on their way (re-sent again, they are duplicates)."""
    store = StateStore(tmp_path / "state")
    batches = [store.commit_events("audit", LINE, 1, {}) for _ in range(3)]
    assert [b.batch for b in store.pending(up_to=batches[1])] == batches[:2]
    assert [b.batch for b in store.pending()] == batches
    store.close()


def test_a_commit_queued_behind_another_thread_waits_one_busy_timeout_in_all(tmp_path, monkeypatch):
    """The busy timeout counts from when a commit starts waiting: the wait for the store's own
    write lock and then for sqlite's add up to one timeout, not one each."""
    import threading
    import time

    store = StateStore(tmp_path / "state")
    monkeypatch.setattr(state_module, "BUSY_TIMEOUT", 0.6)

    def hold(seconds):
        with store._write_lock:
            time.sleep(seconds)

    def commit_time() -> float:
        started = time.monotonic()
        with pytest.raises(StateDatabaseError, match="database is locked"):
            store.commit_page("completions", "1m", payload=LINE, events=1, observations=(), cursor=Cursor(0, 60))
        return time.monotonic() - started

    # another thread holds the store's lock longer than the timeout: the commit gives up at it
    holder = threading.Thread(target=hold, args=(2.0,))
    holder.start()
    time.sleep(0.05)
    assert commit_time() < 1.5
    holder.join()
    # then another program holds sqlite's lock: what is left of the timeout, not a whole one more
    program = _write_locked(store, monkeypatch)
    monkeypatch.setattr(state_module, "BUSY_TIMEOUT", 1.0)
    holder = threading.Thread(target=hold, args=(0.6,))
    holder.start()
    time.sleep(0.05)
    assert commit_time() < 1.4
    holder.join()
    program.rollback()
    assert store.cursor("completions", "1m") is None
    store.close()


def test_an_output_that_reports_ack_failures_itself_is_given_the_failed_delete(tmp_path, monkeypatch):
    """The protocol's output says a failed outbox delete itself (logged, and a `degraded` status):
    it gets the StateError, and the batch is still counted as delivered but kept."""
    store, out = StateStore(tmp_path / "state"), io.BytesIO()

    class Reporting(NdjsonOutput):
        reports_ack_failures = True

    delivery = Delivery(store, Reporting(out))

    def full(batch):
        raise StateDatabaseError("cannot write state file x: disk I/O error (is the disk full?)")

    monkeypatch.setattr(store, "ack", full)
    with pytest.raises(StateDatabaseError, match="disk I/O error"):
        delivery.commit_events("audit", [b'{"_id":"a"}\n'], {"audit:mark": "1"})
    assert out.getvalue() == b'{"_id":"a"}\n' and len(delivery.unremoved) == 1 and store.pending_count() == 1
    store.close()


@pytest.mark.parametrize("thing", ["file", "fifo", "link loop"])
def test_a_state_dir_path_that_is_a_file_is_one_line_naming_it(tmp_path, thing):
    """What stands there was said as "File exists" (`run --state-dir` on a FIFO, or a link loop,
    which click's own directory check lets through), as if the directory were there."""
    if thing == "file":
        (tmp_path / "state").write_text("not a folder")
    elif thing == "fifo":
        os.mkfifo(tmp_path / "state")
    else:
        (tmp_path / "state").symlink_to(tmp_path / "loop")
        (tmp_path / "loop").symlink_to(tmp_path / "state")
    with pytest.raises(StateError, match=rf"^cannot create state directory {tmp_path / 'state'}: something else has "
                                         r"that name \(a file, a FIFO, a device, or a link to no directory\)$"):
        StateStore(tmp_path / "state")


def test_a_state_dir_on_a_file_system_without_flock_opens_with_a_warning(tmp_path, monkeypatch, caplog):
    """NFS without a lock daemon: flock fails with ENOLCK. The store opens (the collector runs), and
    the user is told to make sure no other collector shares the folder; any other flock error refuses."""
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(state_module.fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="agent_input.state"):
        store = StateStore(tmp_path / "state")
    assert "cannot be locked (No locks available): make sure no other collector uses it" in caplog.text
    store.commit_page("completions", "1m", payload=b'{"_id":"a"}\n', events=1, observations=(), cursor=Cursor(0, 60))
    assert [b.payload for b in store.pending()] == [b'{"_id":"a"}\n']
    store.close()

    def broken(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(state_module.fcntl, "flock", broken)
    with pytest.raises(StateError, match=r"^cannot lock state directory .*: Input/output error$"):
        StateStore(tmp_path / "other")


def test_an_unopenable_state_file_with_no_descriptors_left_says_so(tmp_path, monkeypatch):
    """sqlite's "unable to open database file" is also what running out of file descriptors looks
    like: the message then names the limit to raise, not the file's permissions."""
    import errno
    from pathlib import Path

    exc = sqlite3.OperationalError("unable to open database file")
    path = Path("/s/state.sqlite3")
    assert state_module._sqlite_message(path, "open", exc) == f"cannot open state file {path}: {exc}"
    real_open = os.open

    def exhausted(name, flags, *a):
        if name == os.devnull:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(name, flags, *a)

    monkeypatch.setattr(state_module.os, "open", exhausted)
    assert state_module._sqlite_message(path, "open", exc) == (
        f"cannot open state file {path}: {exc} (too many open files: raise the collector's limit, `ulimit -n` "
        "or systemd's LimitNOFILE)")


def test_a_flock_refused_with_eacces_is_another_collector_not_a_broken_lock(tmp_path, monkeypatch):
    """Some systems answer a lock held elsewhere with EACCES rather than EWOULDBLOCK (POSIX allows
    either): that is a collector in the way, said as such, not "cannot lock"."""
    import errno

    def held(fd, op):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(state_module.fcntl, "flock", held)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / LOCK_NAME).write_text("4242\n")
    with pytest.raises(StateError, match=r"^state directory .* is in use by another collector \(pid 4242\)$"):
        StateStore(tmp_path / "state")


def test_a_batch_acknowledged_while_the_outbox_is_re_sent_is_left_out(tmp_path):
    """`pending` reads each batch when its turn comes: one the supervisor acknowledged meanwhile
    (an earlier engine's batch, acked while a new engine re-sends the outbox) is not sent again,
    nor does its missing row end the re-send."""
    store = StateStore(tmp_path / "state")
    batches = [store.commit_events("audit", LINE, 1, {}) for _ in range(3)]
    sent = []
    for b in store.pending():
        sent.append(b.batch)
        if b.batch == batches[0]:
            store.ack(batches[1])
    assert sent == [batches[0], batches[2]]
    store.close()


def test_a_state_file_emptied_beside_a_write_ahead_log_is_refused_too(tmp_path):
    """A collector killed leaves its write-ahead log (not checkpointed); the state file then cut
    to 0 bytes (a bad restore of that file alone) was let through, as if sqlite would read the
    pages from the log: it does not, it deletes the log of a database with no pages. The
    collector started afresh without a word, its cursors and outbox gone."""
    state = tmp_path / "state"
    killed = ("import os, sys\nfrom agent_input.state import StateStore, Cursor\ns = StateStore(sys.argv[1])\n"
              "s.commit_page('completions', '1m', payload=b'{\"_id\":\"a\"}\\n', events=1, observations=(), "
              "cursor=Cursor(0, 60))\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", killed, str(state)], check=True, timeout=60)
    assert (state / "state.sqlite3-wal").stat().st_size > 0
    os.truncate(state / "state.sqlite3", 0)
    with pytest.raises(StateError, match=r"^state file .* is empty \(0 bytes"):
        StateStore(state)
    assert os.path.getsize(state / "state.sqlite3") == 0 and (state / "state.sqlite3-wal").stat().st_size > 0


def test_a_state_file_from_the_first_release_gets_the_columns_added_since_and_goes_on(tmp_path):
    """The first release's tables had no `settled`/`retired_at` cursor columns, no observation
    `dims` and no outbox `spool`: such a file is given them, its cursors read as they were (NULL
    settled: counted as read) and its observations kept, then written with the new columns."""
    (tmp_path / "state").mkdir()
    with sqlite3.connect(tmp_path / "state" / "state.sqlite3") as db:
        db.executescript(
            "CREATE TABLE cursors (stream TEXT NOT NULL, width TEXT NOT NULL, origin INTEGER NOT NULL,"
            " position INTEGER NOT NULL, PRIMARY KEY (stream, width));"
            "CREATE TABLE observations (stream TEXT NOT NULL, width TEXT NOT NULL, bucket_start INTEGER NOT NULL,"
            " grp TEXT NOT NULL, revision INTEGER NOT NULL, counters TEXT NOT NULL,"
            " PRIMARY KEY (stream, width, bucket_start, grp));"
            "CREATE TABLE outbox (batch INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,"
            " events INTEGER NOT NULL, payload BLOB NOT NULL);"
            "CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT NOT NULL);"
            "INSERT INTO cursors VALUES ('completions', '1m', 0, 120);"
            "INSERT INTO observations VALUES ('completions', '1m', 60, '[\"proj_1\"]', 0, '{\"input_tokens\": 5}');")
    store = StateStore(tmp_path / "state")
    assert store.cursor("completions", "1m") == Cursor(0, 120, None, None)
    (obs,) = store.observations("completions", "1m", 0, 120)[60].values()
    assert obs.revision == 0 and obs.counters == {"input_tokens": 5} and obs.dims is None
    store.commit_page("completions", "1m", payload=LINE, events=1, observations=[(120, '["proj_1"]', 0, {"n": 1},
                                                                                  {"currency": "usd"})],
                      cursor=Cursor(0, 180, settled=120, retired_at=None))
    assert store.cursor("completions", "1m") == Cursor(0, 180, 120, None)
    assert store.observations("completions", "1m", 120, 180)[120]['["proj_1"]'].dims == {"currency": "usd"}
    store.close()
