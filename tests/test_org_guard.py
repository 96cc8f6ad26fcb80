"""The state directory's organization check (agent_input/org_guard.py), without a simulator: the
fingerprint's choice of projects and the guard's judgement of a listing."""
from __future__ import annotations

import os
import threading

import pytest

from agent_input.http_client import StoppedError
from agent_input.org_guard import (FINGERPRINT_SIZE, KV_PROJECTS, OrganizationGuard, OrganizationMismatch,
                                   fingerprint)
from agent_input.state import StateError, StateStore


def _projects(n: int, base: int = 1_700_000_000, prefix: str = "proj_a") -> list[dict]:
    return [{"id": f"{prefix}{i:03d}", "created_at": base + i} for i in range(n)]


def test_the_fingerprint_is_the_16_oldest_projects_oldest_first():
    """16, the oldest: an organization's newest projects change nothing, and the state stays small."""
    assert FINGERPRINT_SIZE == 16
    listed = _projects(40)[::-1]  # the listing's order (newest first) does not matter
    assert fingerprint(listed) == [f"proj_a{i:03d}" for i in range(16)]


def test_projects_without_a_creation_time_come_after_the_dated_ones():
    """A project whose `created_at` is missing (or not a number) is not taken for the oldest:
    it would stand in the fingerprint before the organization's real oldest projects."""
    undated = [{"id": "proj_undated"}, {"id": "proj_bool", "created_at": True}, {"id": "proj_text", "created_at": "1"}]
    dated = _projects(16)
    assert fingerprint(undated + dated) == [p["id"] for p in dated]
    assert fingerprint(undated + dated[:2]) == ["proj_a000", "proj_a001", "proj_bool", "proj_text", "proj_undated"]
    assert fingerprint([{"id": 5}, {"name": "x"}, dated[0], dated[0]]) == ["proj_a000"]


def _guard(tmp_path, recorded: list[str] | None = None, **kwargs) -> OrganizationGuard:
    store = StateStore(tmp_path / "state")
    if recorded is not None:
        import json

        store.put_kv(KV_PROJECTS, json.dumps(recorded))
    return OrganizationGuard(store, **kwargs)


def test_a_listing_that_holds_one_recorded_project_is_the_same_organization(tmp_path):
    """Sharing one project is enough: the listing need not hold every recorded one."""
    recorded = [p["id"] for p in _projects(16)]
    guard = _guard(tmp_path, recorded)
    guard.observe([{"id": recorded[7], "created_at": 1}, *_projects(30, prefix="proj_b")])
    guard.wait()
    assert guard.passed and guard.refusal is None
    assert guard.store.get(KV_PROJECTS) is not None and guard.recorded == recorded  # not re-recorded
    guard.store.close()


def test_a_project_whose_id_is_not_a_string_is_left_out_of_the_check(tmp_path):
    """The reference's `Project.id` is a string; one listed as a list or an object (or a number)
    made the check fail with "unhashable type", and with it every stream's every poll, while the
    listing said so. It is left out: the other projects decide, as they would without it."""
    recorded = [p["id"] for p in _projects(3)]
    guard = _guard(tmp_path, recorded)
    guard.observe([{"id": ["proj_x"]}, {"id": {"a": 1}}, {"id": 5}, {"id": recorded[1], "created_at": 1}])
    guard.wait()
    assert guard.passed and guard.refusal is None
    guard.store.close()
    other = _guard(tmp_path / "other", recorded)
    other.observe([{"id": [recorded[0]]}, *_projects(2, prefix="proj_b")])
    with pytest.raises(OrganizationMismatch):
        other.wait()
    other.store.close()


def test_a_project_whose_id_is_empty_is_no_evidence_of_the_same_organization(tmp_path):
    """An empty id (the reference's `Project.id` is a non-empty identifier) was evidence like any:
    recorded in the fingerprint, it made a listing of another organization that also named a
    project "" pass as the same one. It is neither recorded nor compared."""
    assert fingerprint([{"id": "", "created_at": 1}, *_projects(2)]) == ["proj_a000", "proj_a001"]
    guard = _guard(tmp_path, ["", "proj_a000"])  # a fingerprint an earlier version recorded
    assert guard.recorded == ["proj_a000"]
    guard.observe([{"id": "", "created_at": 1}, *_projects(2, prefix="proj_b")])
    with pytest.raises(OrganizationMismatch):
        guard.wait()
    guard.store.close()


def test_a_listing_whose_every_project_lacks_a_string_id_is_no_evidence_of_another_organization(tmp_path):
    """Projects listed, none with a string id (the reference's `Project.id`): left out, they left
    nothing to decide on, and the check took the key for another organization's ("none of the 3
    recorded project(s) is among the 0 project(s) this admin key lists"), a refusal that holds
    every stream until a restart and tells the user to give the key another --state-dir. Such a
    listing cannot be checked: nothing is stored until a later listing can be, as for a failed one."""
    from agent_input.org_guard import OrganizationUnverified

    recorded = [p["id"] for p in _projects(3)]
    now = [0.0]
    guard = _guard(tmp_path, recorded, clock=lambda: now[0], retry_after=30)
    guard.observe([{"id": {"id": recorded[0]}, "created_at": 1}, {"id": [recorded[1]]}])
    with pytest.raises(OrganizationUnverified, match="no project"):
        guard.wait()
    assert guard.refusal is None
    guard.observe([{"id": recorded[2], "created_at": 1}])  # a later listing decides
    guard.wait()
    assert guard.passed
    guard.store.close()


@pytest.mark.parametrize("listing, ok", [
    ([{"id": ["proj_x"]}, {"id": {"a": 1}}, {"id": "proj_a001", "created_at": 1}], True),
    ([{"id": ["proj_a000"]}, {"id": "proj_b000", "created_at": 1}], False),
    ([{"id": ["proj_a000"]}, {"id": 5}], False),
])
def test_check_leaves_out_a_project_whose_id_is_not_a_string_as_collect_does(tmp_path, listing, ok):
    """`openai-input check` judges the listing "as OrganizationGuard judges it", but still took
    every id as listed: a list id failed it ("check failed: unhashable type: 'list'") where collect
    goes on. Such projects are left out as collect leaves them out; when none is left, the key
    cannot be checked (not another organization's)."""
    import json

    from agent_input.org_guard import check_state_dir

    store = StateStore(tmp_path / "state")
    store.put_kv(KV_PROJECTS, json.dumps([p["id"] for p in _projects(3)]))
    store.close()

    class Listing:
        def get_json(self, path, params):
            return {"object": "list", "data": listing, "has_more": False, "first_id": None, "last_id": None}

    passed, message = check_state_dir(Listing(), tmp_path / "state")
    assert passed is ok
    assert ("another OpenAI organization" in message) is (listing[1].get("id") == "proj_b000"), message
    if listing[1].get("id") == 5:
        assert "cannot check" in message and "no project by a string id" in message, message


def test_a_refusal_is_not_lifted_by_a_later_listing(tmp_path):
    """Once another organization's key was found, the engine stops: a later listing (the check's
    own, say) does not turn it into a pass."""
    recorded = [p["id"] for p in _projects(3)]
    guard = _guard(tmp_path, recorded)
    guard.observe(_projects(3, prefix="proj_b"))
    guard.observe(_projects(3))
    with pytest.raises(OrganizationMismatch):
        guard.wait()
    guard.store.close()


def test_a_stop_during_the_check_s_own_listing_is_a_stop_not_an_unverified_check(tmp_path):
    """A write waiting for the check's own listing when the collector is stopped ends as a stop
    (the engine says nothing of it), not as "cannot check the organization", which the stream
    logs as a failed poll."""
    stop = threading.Event()

    class Client:
        def get_json(self, path, params):
            stop.set()
            raise StoppedError(None, "stopped while waiting for a page", "stopped", path)

        def close(self):
            pass

    guard = _guard(tmp_path, ["proj_a000"], client_factory=Client, stop=stop, clock=lambda: 100.0)
    guard.unavailable("HTTP 503")  # the name cache's listing failed: the first write lists again
    with pytest.raises(StoppedError):
        guard.wait()
    assert not guard.passed and guard.refusal is None  # a stop is no outcome
    guard.store.close()


def test_a_stop_does_not_wait_for_the_check_s_own_listing_that_hangs(tmp_path):
    """The check's own listing (the name cache's failed: the first write lists again) ran on the
    stream's thread: a projects request that hung held the stop, or `run`'s next config, for up to
    `http_timeout` (30 s in a soak, where `--ack-timeout` was 2 s). It is waited for until a stop,
    then left to end by itself, its answer dropped."""
    import time

    stop, release, asked, closed = threading.Event(), threading.Event(), threading.Event(), threading.Event()

    class Client:
        def get_json(self, path, params):
            asked.set()
            release.wait(10)
            return {"data": [{"id": "proj_a000"}], "has_more": False}

        def close(self):
            closed.set()

    guard = _guard(tmp_path, ["proj_a000"], client_factory=Client, stop=stop, clock=lambda: 100.0)
    guard.unavailable("HTTP 503")
    threading.Thread(target=lambda: asked.wait(5) and stop.set(), daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(StoppedError):
            guard.wait()
        took = time.monotonic() - started
    finally:
        release.set()
    assert took < 5, f"the stop waited {took:.1f}s for the hung listing"
    assert closed.wait(5), "the listing's client is closed once its request ends"
    assert not guard.passed and guard.store.get(KV_PROJECTS) == '["proj_a000"]'
    guard.store.close()


@pytest.mark.parametrize("started, forbidden, passes", [
    (True, True, True),  # the check started it, and this key never could list: as at that start
    (True, False, False),  # a 5xx: that listing will work again, wait for it
    (False, True, False),  # an earlier version's directory: nobody checked its organization yet
])
def test_a_refused_listing_passes_only_a_directory_the_check_started(tmp_path, started, forbidden, passes):
    import time

    from agent_input.org_guard import KV_STARTED, OrganizationUnverified

    store = StateStore(tmp_path / "state")
    with store._transaction() as conn:  # stored usage naming a project: something to protect
        conn.execute("INSERT INTO observations VALUES ('completions', '1m', 1700000000, "
                     "'[\"proj_x\", \"gpt-4o\"]', 0, '{}', NULL)")
    if started:
        store.put_kv(KV_STARTED, "1")
    guard = OrganizationGuard(store, clock=time.monotonic)
    assert not guard.passed and guard.seen == ["proj_x"]
    guard.unavailable("permission denied (403)" if forbidden else "500", forbidden=forbidden)
    if passes:
        guard.wait()
        assert guard.passed and guard.store.get(KV_PROJECTS) is None  # nothing recorded
    else:
        with pytest.raises(OrganizationUnverified):
            guard.wait()
    store.close()


def test_a_refused_listing_holds_a_started_directory_once_it_recorded_its_organization(tmp_path):
    """The pass for a refused listing (403) is for a directory that records no organization: one
    the check started with a key refused the listing, then recorded (the key was let list the
    projects once), is held again when a key is refused it, as any recorded directory is. Passing
    it let another organization's key without the projects scope write into it unchecked."""
    from agent_input.org_guard import KV_STARTED, OrganizationUnverified

    guard = _guard(tmp_path, [p["id"] for p in _projects(3)], clock=lambda: 100.0)
    guard.store.put_kv(KV_STARTED, "1")
    guard = OrganizationGuard(guard.store, clock=lambda: 100.0)
    assert guard.started and guard.recorded
    guard.unavailable("permission denied (403)", forbidden=True)
    with pytest.raises(OrganizationUnverified):
        guard.wait()
    assert not guard.passed
    guard.store.close()


@pytest.mark.parametrize("forbidden", [True, False])
def test_only_a_refused_listing_is_told_to_let_the_key_list_the_projects(tmp_path, forbidden):
    """The hold's message says what lifts it: for a refused listing (403), letting the key list the
    projects; a 5xx will work again by itself, and telling the user to change the key's scopes for
    it sends them looking for a permission they already have."""
    from agent_input.org_guard import FORBIDDEN_HINT, OrganizationUnverified

    guard = _guard(tmp_path, [p["id"] for p in _projects(3)], clock=lambda: 100.0)
    guard.unavailable("permission denied (403)" if forbidden else "HTTP 503", forbidden=forbidden)
    with pytest.raises(OrganizationUnverified) as raised:
        guard.wait()
    assert (FORBIDDEN_HINT in str(raised.value)) is forbidden
    assert str(raised.value).endswith("nothing is stored until it can" + (FORBIDDEN_HINT if forbidden else ""))
    guard.store.close()


@pytest.mark.parametrize("recorded", [False, True])
def test_check_passes_a_refused_listing_only_where_collect_would(tmp_path, recorded):
    """`openai-input check` judges a refused listing (403) as the collector's check does: a
    directory the check started with a key refused the listing goes on unchecked, but once that
    directory recorded its organization collect holds it, and check must say so, not "OK"."""
    import json

    from agent_input.http_client import PermissionDeniedError
    from agent_input.org_guard import FORBIDDEN_HINT, KV_STARTED, check_state_dir

    store = StateStore(tmp_path / "state")
    with store._transaction() as conn:  # stored usage naming a project: something to protect
        conn.execute("INSERT INTO observations VALUES ('completions', '1m', 1700000000, "
                     "'[\"proj_x\", \"gpt-4o\"]', 0, '{}', NULL)")
    store.put_kv(KV_STARTED, "1")
    if recorded:
        store.put_kv(KV_PROJECTS, json.dumps(["proj_x"]))
    store.close()

    class Refused:
        def get_json(self, path, params):
            raise PermissionDeniedError(403, "insufficient permissions", path=path)

    ok, message = check_state_dir(Refused(), tmp_path / "state")
    assert ok is not recorded
    assert (FORBIDDEN_HINT in message) is recorded


@pytest.mark.parametrize("error, passes", [("no such table: kv", None),
                                            ("unable to open database file", False),
                                            ("disk I/O error", False)])
def test_check_says_a_state_file_it_cannot_read_is_unreadable_not_that_it_records_nothing(
        tmp_path, monkeypatch, error, passes):
    """Any sqlite OperationalError read as "nothing recorded": `check --state-dir` run as a user
    who cannot read the state file (or on a failing disk) passed the directory as one collect
    would start afresh, while collect fails on it. Only a file with no tables yet is that."""
    import sqlite3

    from agent_input import org_guard

    StateStore(tmp_path / "state").close()

    def connect(*args, **kwargs):
        raise sqlite3.OperationalError(error)

    monkeypatch.setattr(sqlite3, "connect", connect)
    result = org_guard.check_state_dir(object(), tmp_path / "state")
    if passes is None:
        assert result is None
    else:
        ok, message = result
        assert ok is False and error in message and "state.sqlite3" in message


def test_check_reads_a_closed_state_file_it_may_read_but_whose_folder_it_may_not_write(tmp_path, monkeypatch):
    """Another user's `check` (file readable, folder not writable) on a directory no collector has
    open: a read-only connection must make the WAL index (`-shm`) a closed database lacks, and
    sqlite says "attempt to write a readonly database". The file is whole then: read it as is."""
    import json
    import sqlite3

    from agent_input import org_guard

    store = StateStore(tmp_path / "state")
    store.put_kv(org_guard.KV_PROJECTS, json.dumps(["proj_x"]))
    store.close()
    assert not (tmp_path / "state" / "state.sqlite3-shm").exists()
    real, uris = sqlite3.connect, []

    def connect(database, *args, **kwargs):
        uris.append(database.rsplit("?", 1)[-1])
        if database.endswith("?mode=ro"):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    assert org_guard.read_recorded(tmp_path / "state").recorded == ["proj_x"]
    assert uris == ["mode=ro", "immutable=1"]
    # an index there (a collector may have the file open, its last writes in the WAL): not read as is
    (tmp_path / "state" / "state.sqlite3-shm").write_bytes(b"")
    with pytest.raises(StateError, match="readonly database"):
        org_guard.read_recorded(tmp_path / "state")


def test_check_fails_a_state_file_that_is_a_folder(tmp_path):
    """`state.sqlite3` a folder: check said the directory records nothing (check OK) while collect
    fails on it ("unable to open database file"). A link to nothing is still nothing recorded:
    collect creates the file through it."""
    from agent_input import org_guard

    path = tmp_path / "state" / "state.sqlite3"
    path.mkdir(parents=True)
    ok, message = org_guard.check_state_dir(object(), tmp_path / "state")
    assert ok is False and "not a regular file" in message and str(path) in message
    path.rmdir()
    path.symlink_to(tmp_path / "gone")
    assert org_guard.check_state_dir(object(), tmp_path / "state") is None


@pytest.mark.parametrize("thing", ["link loop", "fifo", "file", "dangling link", "path through a file"])
def test_check_fails_a_state_dir_path_collect_cannot_make_a_directory(tmp_path, thing):
    """`check --state-dir loopA` (loopA -> loopB -> loopA) said "check OK" while collect stops on it:
    Path.is_file and exists read ELOOP (and ENOTDIR, a path through a file) as nothing there. Check
    now fails with collect's own line."""
    from agent_input import org_guard

    state = tmp_path / "state"
    if thing == "link loop":
        state.symlink_to(tmp_path / "loop")
        (tmp_path / "loop").symlink_to(state)
    elif thing == "fifo":
        os.mkfifo(state)
    elif thing == "file":
        state.write_text("not a folder")
    elif thing == "dangling link":
        state.symlink_to(tmp_path / "gone")
    else:
        (tmp_path / "file").write_text("not a folder")
        state = tmp_path / "file" / "state"
    with pytest.raises(StateError) as collect:
        StateStore(state)
    ok, message = org_guard.check_state_dir(object(), state)
    assert ok is False and message == str(collect.value)
    assert message.startswith(f"cannot create state directory {state}: ")


def test_check_says_a_state_directory_it_may_not_search_is_unreadable(tmp_path, monkeypatch):
    """`check --state-dir` as a user who may not search the directory (or its parent): Path.is_file
    re-raises EACCES, and the PermissionError left check through its catch-all as "check failed:
    [Errno 13] Permission denied: '.../state.sqlite3'" instead of the state dir's own line."""
    import pathlib

    from agent_input import org_guard

    StateStore(tmp_path / "state").close()
    path = tmp_path / "state" / "state.sqlite3"
    real = pathlib.Path.stat

    def stat(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    ok, message = org_guard.check_state_dir(object(), tmp_path / "state")
    assert ok is False and message == f"cannot read state file {path}: Permission denied"


def test_check_does_not_call_a_state_directory_it_may_not_stat_taken_by_something_else(tmp_path, monkeypatch):
    """A state directory this user may not reach (EACCES on the directory itself) is unreadable, not
    "something else has that name": the state file's own read says Permission denied."""
    import os

    from agent_input import org_guard
    from agent_input.state import not_a_directory_message

    StateStore(tmp_path / "state").close()
    state = tmp_path / "state"
    real = os.stat

    def stat(p, *args, **kwargs):
        if str(p).startswith(str(state)):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert not_a_directory_message(state) is None
    ok, message = org_guard.check_state_dir(object(), state)
    assert ok is False and message == f"cannot read state file {state / 'state.sqlite3'}: Permission denied"


@pytest.mark.parametrize("outcome", ["observe", "refused"])
def test_a_listing_that_answers_after_the_stop_records_nothing_in_the_state_directory(tmp_path, outcome):
    """`run` stops the old config's engine without waiting for its first projects listing (the
    name cache's, or the check's own): a listing that answered later recorded that config's
    organization (or marked the directory started) over what the new config's key had recorded,
    and the next start refused the new key as another organization's. A stopped guard stores
    nothing; the next start lists again."""
    from agent_input.org_guard import KV_STARTED

    stop = threading.Event()
    store = StateStore(tmp_path / "state")
    guard = OrganizationGuard(store, stop=stop)
    stop.set()
    if outcome == "observe":
        guard.observe(_projects(3, prefix="proj_old"))
        assert store.get(KV_PROJECTS) is None and guard.recorded == []
    else:
        guard.unavailable("permission denied (403)", forbidden=True)
        assert store.get(KV_STARTED) is None
    store.close()


def test_a_fingerprint_holding_other_values_than_ids_is_judged_by_its_ids(tmp_path):
    """`org:projects` as another program (or a hand edit) left it, with numbers or objects among
    the ids: only its string ids count. An object among them made the judgement of a listing
    fail with a TypeError (unhashable) instead of passing or refusing the key."""
    recorded = [{"id": "proj_a000"}, 7, None, "proj_a001"]
    guard = _guard(tmp_path, recorded)
    assert guard.recorded == ["proj_a001"]
    guard.observe(_projects(3))
    guard.wait()
    assert guard.passed and guard.refusal is None
    guard.store.close()
    other = _guard(tmp_path / "other", recorded)
    other.observe(_projects(3, prefix="proj_b"))
    with pytest.raises(OrganizationMismatch, match="e.g. proj_a001"):
        other.wait()
    other.store.close()


def test_a_check_that_cannot_be_done_lists_again_at_most_every_retry_after(tmp_path):
    """While the projects listing fails, each write that needs the check lists again (at once after
    the name cache's failed listing), then not before `retry_after` has passed: every stream's
    every poll listing all the organization's projects again would hammer an API already failing."""
    from agent_input.http_client import RetriesExhaustedError
    from agent_input.org_guard import OrganizationUnverified

    now = [100.0]
    listings = []
    failing = [True]

    class Client:
        def get_json(self, path, params):
            listings.append(now[0])
            if failing[0]:
                raise RetriesExhaustedError(503, "Service Unavailable", path=path)
            data = _projects(2)
            return {"object": "list", "data": data, "first_id": data[0]["id"], "last_id": data[-1]["id"],
                    "has_more": False}

        def close(self):
            pass

    guard = _guard(tmp_path, [p["id"] for p in _projects(3)], client_factory=Client, stop=threading.Event(),
                   clock=lambda: now[0], retry_after=60.0)
    guard.unavailable("HTTP 503")
    with pytest.raises(OrganizationUnverified):
        guard.wait()  # lists again at once, with the collector's own client
    assert listings == [100.0]
    now[0] = 159.0
    with pytest.raises(OrganizationUnverified):
        guard.wait()
    assert listings == [100.0], "listed again before retry_after"
    now[0], failing[0] = 160.0, False
    guard.wait()
    assert listings == [100.0, 160.0] and guard.passed
    guard.store.close()


def test_an_organization_whose_recorded_projects_are_all_archived_since_is_still_recognised(tmp_path):
    """Projects are archived, never deleted: the fingerprint's oldest projects are the likeliest to
    be archived later. The check lists the archived ones too (the API leaves them out unless
    asked), so an organization whose recorded projects were all archived is not refused as another."""
    recorded = _projects(3)
    active = _projects(5, base=1_800_000_000, prefix="proj_new")

    class Client:  # as the API: archived projects only with include_archived
        def get_json(self, path, params):
            data = active + (recorded if str(params.get("include_archived")).lower() == "true" else [])
            return {"object": "list", "data": data, "first_id": data[0]["id"], "last_id": data[-1]["id"],
                    "has_more": False}

        def close(self):
            pass

    guard = _guard(tmp_path, [p["id"] for p in recorded], client_factory=Client, stop=threading.Event())
    guard.start().join(10)
    guard.wait()
    assert guard.passed and guard.refusal is None
    guard.store.close()


def test_another_organization_found_by_the_check_s_own_listing_after_a_failed_one_is_a_mismatch(tmp_path):
    """The name cache's listing failed (the check could not be done), then the check's own
    listing found another organization's projects: that is a mismatch, which stops the engine
    naming the directory, not "cannot check" again (which holds it, retrying for ever)."""
    class Client:
        def get_json(self, path, params):
            data = _projects(3, prefix="proj_b")
            return {"object": "list", "data": data, "first_id": data[0]["id"], "last_id": data[-1]["id"],
                    "has_more": False}

        def close(self):
            pass

    guard = _guard(tmp_path, [p["id"] for p in _projects(3)], client_factory=Client, stop=threading.Event(),
                   clock=lambda: 100.0)
    guard.unavailable("HTTP 503")
    with pytest.raises(OrganizationMismatch, match="holds the collection of another OpenAI organization"):
        guard.wait()
    with pytest.raises(OrganizationMismatch):
        guard.wait()
    guard.store.close()
