"""The state directory belongs to one collector at a time: `<state dir>/lock`, held for the life
of a StateStore, refuses a second one (another process, or another store of this process) with
one line naming the holder's pid, before it can remove or write anything."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agent_input.state import LOCK_NAME, Cursor, StateError, StateStore

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
