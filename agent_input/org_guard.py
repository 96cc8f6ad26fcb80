"""Which OpenAI organization a state directory belongs to, and the check that keeps another's key off it.

A state directory's cursors, observations and audit marks describe one organization. Used with a
key of another one (a second config run without `--state-dir` shares the default directory), the
collector read the other organization's buckets against the first one's observations: every group
of the first one in the revision window was "vanished" and brought to zero by corrections, the
other organization's history before the inherited cursors was never read, and its audit log went
on from the first one's marks. Nothing said so.

OpenAI's Admin API has no "who am I" endpoint, but project ids (`proj_...`) are global and projects
are archived, never deleted: the organization's listing with archived projects included holds every
project it ever had. So the state keeps a fingerprint in its `kv` table (`org:projects`): the ids of
the organization's oldest FINGERPRINT_SIZE projects, recorded from the first complete listing. A
later listing that holds none of them is another organization's. The oldest ones, so that new
projects change nothing; a few, so that the state stays small whatever the organization's size.

The listing is the one the name cache makes anyway when the engine starts (`names.NameCache`,
started beside the first usage requests): no request is added before them. Until the check has
passed, nothing is written to the state (`StateStore.write_check`): no outbox batch, so nothing is
delivered, and no cursor, observation, audit mark or rate-limits cycle. A usage page waits for the
name cache's first load anyway, so only audit and rate limits may wait a little longer. Outcomes:

- no fingerprint yet: in a new directory nothing is held, and the listing records it (an
  organization with no project records nothing yet). A directory written by a version before this
  check has none either, but its stored usage observations name projects (`proj_...`) of its
  organization: writes are held until the listing holds at least one of them (then it is
  recorded), and one that holds none is another organization's, refused as below;
- the listing shares a project with the fingerprint: writes go on;
- it shares none: `OrganizationMismatch`, naming the directory; the engine stops before it stored
  or delivered anything (`collect` exits 1 with that line, `run` reports the input `failed`);
- it failed (a 5xx after retries, a 403): the check cannot be done, and the writes are held:
  each write that needs it lists the projects again (at once after the name cache's listing,
  whose client retries little, then at most every RETRY_AFTER seconds) and,
  while that fails, fails its poll with `OrganizationUnverified` (the cursor stays: the poll is
  read again later, nothing is lost; a stream's first poll, with no cursor, keeps its start in
  memory only, for the same process's next poll: a new process, `collect --once`, starts from its
  own later `now`).

One exception to the last: a key that may not list the projects at all (403) never records a
fingerprint, and its directory's second start would look like one from before this check (stored
usage, no fingerprint) and be held for ever, an outage for the right organization. So a new
directory whose first listing is refused (403) is marked (`org:started`); without a fingerprint,
a marked directory whose listing is refused goes on as at its first start, with a warning that
it is not protected. A 5xx still holds it: that listing will work again. A new directory whose
first listing failed otherwise (a 5xx) is not marked: its key could list, and another
organization's key refused the listing is held there, as on an earlier version's directory.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from .http_client import ApiError, PermissionDeniedError
from .paging import STOP_CHECK, DaemonPool, cursor_pages, stopped
from .state import (STATE_VERSION, StateError, StateStore, emptied_state_message, newer_state_message,
                    not_a_directory_message, observed_values_in)

log = logging.getLogger("agent_input.org_guard")

KV_PROJECTS = "org:projects"  # JSON list of the organization's oldest project ids
KV_STARTED = "org:started"  # "1": this check opened the directory new, and its key was refused the listing
FINGERPRINT_SIZE = 16
RETRY_AFTER = 60.0  # seconds between two listings by the check itself, while the check cannot be done
PROJECTS = "/v1/organization/projects"
PAGE_LIMIT = 100
# a refused listing (403) does not pass by itself: what the user has to do, said where the check holds
FORBIDDEN_HINT = ("; let this key list the projects (the refusal names the scope it lacks): a directory an earlier "
                  "version started, or that recorded its organization, waits for that listing")


class OrganizationMismatch(StateError):
    """The admin key reaches another organization than the one the state directory was collected for."""


class OrganizationUnverified(RuntimeError):
    """The check could not be done (the projects listing failed): nothing is stored until it can."""


def fingerprint(projects: Iterable[Mapping[str, Any]]) -> list[str]:
    """The ids of the oldest FINGERPRINT_SIZE projects (by `created_at`, then id)."""
    def created(p: Mapping[str, Any]) -> float:
        value = p.get("created_at")
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("inf")

    ids = sorted(((created(p), p["id"]) for p in projects if _is_id(p.get("id"))))
    out: list[str] = []
    for _, pid in ids:
        if pid not in out:
            out.append(pid)
        if len(out) == FINGERPRINT_SIZE:
            break
    return out


def parse_fingerprint(text: str | None) -> list[str]:
    """The fingerprint as the state holds it (JSON; [] if none, or not one this version can read)."""
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return [v for v in value if _is_id(v)] if isinstance(value, list) else []


def _is_id(value: Any) -> bool:
    """A project id that can be evidence: a string, not empty (two organizations whose listings each
    held a project of id "" shared it, and a key of the one passed for the other's)."""
    return isinstance(value, str) and value != ""


def list_projects(client: Any) -> list[Mapping[str, Any]]:
    """Every project the key lists, archived ones included (ApiError when the listing fails)."""
    return [p for data in cursor_pages(client.get_json, PROJECTS, {"include_archived": True, "limit": PAGE_LIMIT})
            for p in data if isinstance(p, Mapping)]


def listed_ids(projects: Iterable[Mapping[str, Any]]) -> set[str]:
    """The ids a listing names. A project without a string id (the reference requires one) is no
    evidence either way: as a set member a list or object id failed every check ("unhashable"); an
    empty one would be the same project in every organization that listed one."""
    return {p["id"] for p in projects if _is_id(p.get("id"))}


def refusal_reason(state_dir: Any, listed: set, recorded: list[str], seen: list[str]) -> str | None:
    """Why the key's projects (`listed`) are another organization's: none of them is in the
    fingerprint (`recorded`) or, without one (a directory an earlier version wrote), among the
    projects its stored usage names (`seen`). None when one is, or when there is nothing to compare."""
    known = recorded or seen
    if not known or listed.intersection(known):
        return None
    what = "recorded project(s)" if recorded else "project(s) its stored usage names"
    return (f"state directory {state_dir} holds the collection of another OpenAI organization: none of the "
            f"{len(known)} {what} (e.g. {known[0]}) is among the {len(listed)} project(s) this admin key "
            f"lists; nothing was stored or sent. Give each organization its own --state-dir")


class OrganizationGuard:
    """The check, for one engine. `wait()` before every state write; `observe(projects)` or
    `unavailable(reason)` from the first projects listing (the name cache's), or `start()` for a
    listing of its own when there is no name cache."""

    def __init__(self, store: StateStore, *, client_factory: Callable[[], Any] | None = None,
                 stop: threading.Event | None = None, clock: Callable[[], float] = time.monotonic,
                 retry_after: float = RETRY_AFTER):
        self.store = store
        self.recorded = parse_fingerprint(store.get(KV_PROJECTS))
        self._client_factory = client_factory
        self._stop = stop
        self._clock = clock
        self._retry_after = retry_after
        self._lock = threading.Lock()  # one outcome at a time, one listing of its own at a time
        self._decided = threading.Event()  # the first listing has landed (or failed)
        # state from before the fingerprint: the projects its stored usage names stand for it
        self.seen = sorted(store.observed_values("proj_")) if not self.recorded else []
        self.passed = not self.recorded and not self.seen  # nothing to protect yet: nothing is held
        self.new = self.passed
        self.started = store.get(KV_STARTED) is not None
        self.refusal: str | None = None  # the mismatch's message
        self.unverified: str | None = None  # why the check could not be done
        self._retry_at = 0.0

    # -- the listing's outcome -----------------------------------------------------------------
    def observe(self, projects: list[Mapping[str, Any]]) -> None:
        """A complete listing of the key's projects, archived included."""
        with self._lock:
            self._observe(projects)

    def _observe(self, projects: list[Mapping[str, Any]]) -> None:
        if self.refusal is not None:
            return
        listed = listed_ids(projects)
        if projects and not listed:
            # all left out: nothing to decide on, which is not another organization's listing
            self._unavailable(f"it names no project by a string id ({len(projects)} listed)")
            return
        self.refusal = refusal_reason(self.store.directory, listed, self.recorded, self.seen)
        if self.refusal is None:
            found = fingerprint(projects) if not self.recorded else []
            if found and not self._stopped():  # else recorded at a later start (see `_stopped`)
                try:
                    self.store.put_kv(KV_PROJECTS, json.dumps(found))
                    self.recorded = found
                except StateError as exc:  # recorded at a later start; nothing else depends on it
                    log.warning("cannot record the organization's fingerprint: %s", exc)
            self.passed, self.unverified = True, None
        self._decided.set()

    def unavailable(self, reason: str, *, forbidden: bool = False) -> None:
        """The name cache's listing failed (`forbidden`: refused, 403): the check cannot be done
        yet. That client retries little (a name must not hold usage up), so the first write that
        needs the check lists again at once, with the collector's own retries: a short 5xx must
        not hold a whole run."""
        with self._lock:
            self._unavailable(reason, forbidden)
            self._retry_at = self._clock()

    def _unavailable(self, reason: str, forbidden: bool = False) -> None:
        if forbidden and not self.recorded and self.refusal is None and (self.passed or self.started):
            # this key may not list the projects, and never could here: as at the first start
            # that first start: only a refused key is marked (not after a stop: `_stopped`)
            if self.new and not self.started and not self._stopped():
                try:
                    self.store.put_kv(KV_STARTED, "1")
                    self.started = True
                except StateError as exc:  # marked at a later start; nothing else depends on it
                    log.warning("cannot mark the state directory as started with the organization check: %s", exc)
            if not self.passed or not self._decided.is_set():
                log.warning("this admin key may not list the organization's projects (%s): state directory %s "
                            "records no organization, so another organization's key on it would not be "
                            "refused. Let the key read the projects once to record it", reason,
                            self.store.directory)
            self.passed, self.unverified = True, None
        elif not self.passed and self.refusal is None:
            self.unverified = (f"cannot check that this admin key reaches the organization state directory "
                               f"{self.store.directory} was collected for (listing its projects failed: "
                               f"{reason}); nothing is stored until it can" + (FORBIDDEN_HINT if forbidden else ""))
            self._retry_at = self._clock() + self._retry_after
        self._decided.set()

    def _stopped(self) -> bool:
        """Whether the engine was stopped: a listing that answers after it records nothing. `run`
        stops an old config's engine without waiting for its first listing, and a late answer
        recorded that key's organization over the one the new config's key had recorded (the next
        start then refused the new key as another organization's)."""
        return self._stop is not None and self._stop.is_set()

    def reported(self) -> bool:
        """Whether a listing's outcome came in (the name cache calls `unavailable` when its first
        load ended without one)."""
        return self._decided.is_set()

    # -- a listing of its own ------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """List the projects now, in the background (an engine without a name cache)."""
        thread = threading.Thread(target=self._check_in_background, name="org-check", daemon=True)
        thread.start()
        return thread

    def _check_in_background(self) -> None:
        try:
            with self._lock:
                self._check_now()
        except Exception as exc:  # noqa: BLE001 - a stop, or pools shut down: a waiting write lists again
            with self._lock:
                self._unavailable(str(exc) or type(exc).__name__)

    def _check_now(self) -> None:
        """List the projects with a client of its own (under `_lock`)."""
        if self._client_factory is None:
            return

        def listing() -> list[Mapping[str, Any]]:
            client = self._client_factory()
            try:
                return list_projects(client)
            finally:
                client.close()

        # on a daemon thread, waited for until a stop: a projects request that hangs must not hold
        # the stop (or `run`'s next config) for its whole `http_timeout`; its answer is dropped
        pool = DaemonPool(1, "org-check-listing")
        try:
            projects = pool.run(self._stop, "the organization check", PROJECTS, listing)
        except ApiError as exc:
            if self._stop is not None and self._stop.is_set():
                raise
            self._unavailable(str(exc), isinstance(exc, PermissionDeniedError))
            return
        finally:
            pool.shutdown(wait=False)
        self._observe(projects)

    # -- before a write ------------------------------------------------------------------------
    def wait(self) -> None:
        """Return once the check has passed; OrganizationMismatch when it found another
        organization, OrganizationUnverified when it cannot be done (after listing again if the
        last try is RETRY_AFTER old), StoppedError on a stop."""
        if self.passed:
            return
        while not self._decided.wait(STOP_CHECK if self._stop is not None else None):
            if self._stop.is_set():
                raise stopped("the organization check")
        if self.unverified is not None and self.refusal is None:
            with self._lock:
                if not self.passed and self.refusal is None and self._clock() >= self._retry_at:
                    self._check_now()
        if self.passed:
            return
        if self.refusal is not None:
            raise OrganizationMismatch(self.refusal)
        raise OrganizationUnverified(self.unverified or "the organization check did not run")


class Recorded(NamedTuple):
    """What a state directory says of its organization (`read_recorded`)."""

    version: int  # STATE_VERSION of the file; 0 when there is none
    recorded: list[str]  # the fingerprint
    seen: list[str]  # without one: the projects its stored usage names
    started: bool  # this check opened it new with a key refused the listing (KV_STARTED)


def read_recorded(state_dir: Any) -> Recorded:
    """The state version, fingerprint and, without one (a directory an earlier version wrote), the
    projects its stored usage names, read without taking the directory (a collector may be running
    on it): nothing when there is no state file or no tables in it yet. StateError for a file that
    cannot be read (permissions, I/O) or that collect refuses at its start: emptied, or not an
    sqlite database, or a state directory path collect cannot make a directory (a file, a FIFO, a
    link loop)."""
    import sqlite3

    path = Path(state_dir) / "state.sqlite3"
    problem = not_a_directory_message(state_dir)
    if problem is not None:  # collect stops on it with this line
        raise StateError(problem)
    try:
        if not path.is_file():
            if path.exists():  # a folder, a FIFO: collect stops on it (a dangling link it creates)
                raise StateError(f"cannot use state file {path}: not a regular file")
            return Recorded(0, [], [], False)
    except OSError as exc:  # a directory this user may not search (is_file re-raises EACCES)
        raise StateError(f"cannot read state file {path}: {exc.strerror or exc}") from None
    emptied = emptied_state_message(Path(state_dir))
    if emptied is not None:
        raise StateError(emptied)
    # as_uri quotes what a URI would read otherwise (`#`, `?`, `%`, spaces) and writes a Windows
    # path as file:///C:/...: `file:{path}` cut "Team #2/state.sqlite3" at the `#`
    uri = Path(os.path.abspath(path)).as_uri()
    try:
        try:
            return _read_recorded(sqlite3.connect(uri + "?mode=ro", uri=True, timeout=5))
        except sqlite3.OperationalError as exc:
            if "readonly database" not in str(exc) or path.with_name(path.name + "-shm").exists():
                raise
            # a reader who may not write the folder (another user's `check`) cannot make the WAL
            # index a closed database lacks; with no index no connection is open: the file is whole
            return _read_recorded(sqlite3.connect(uri + "?immutable=1", uri=True, timeout=5))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # a file collect made no tables in yet: it makes them
            return Recorded(0, [], [], False)
        # unreadable (permissions, a lock held too long, I/O): not "nothing recorded", which
        # `check` would pass while collect fails on the same file
        raise StateError(f"cannot read state file {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:  # "file is not a database": collect stops on it too
        raise StateError(f"cannot use state file {path}: {exc}") from None


def _read_recorded(conn) -> Recorded:
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        row = conn.execute("SELECT v FROM kv WHERE k=?", (KV_PROJECTS,)).fetchone()
        recorded = parse_fingerprint(row[0] if row else None)
        # as the collector's check reads them (StateStore.observed_values)
        seen = [] if recorded else sorted(observed_values_in(conn, "proj_"))
        started = conn.execute("SELECT 1 FROM kv WHERE k=?", (KV_STARTED,)).fetchone() is not None
    finally:
        conn.close()
    return Recorded(version, recorded, seen, started)


def check_state_dir(client: Any, state_dir: Any) -> tuple[bool, str] | None:
    """`openai-input check`: whether the key reaches the organization `state_dir` was collected
    for (ok, message), or None when the directory records none (nor, from an earlier version, any
    project in its stored usage: collect would record this key's organization at its start)."""
    try:
        version, recorded, seen, started = read_recorded(state_dir)
    except StateError as exc:  # collect refuses the file itself
        return False, str(exc)
    if version > STATE_VERSION:  # collect would refuse the file itself
        return False, newer_state_message(Path(state_dir) / "state.sqlite3", version)
    if not recorded and not seen:
        return None
    try:
        projects = list_projects(client)
    except ApiError as exc:
        if isinstance(exc, PermissionDeniedError) and started and not recorded:  # as OrganizationGuard
            return True, (f"state directory {state_dir} is not checked against this key's organization (listing "
                          f"the projects is refused: {exc}); collect goes on without the check, as it did "
                          "when it started the directory")
        return False, (f"state directory {state_dir}: cannot check that this key reaches its organization "
                       f"(listing the projects failed: {exc}); collect would store nothing until it can"
                       + (FORBIDDEN_HINT if isinstance(exc, PermissionDeniedError) else ""))
    listed = listed_ids(projects)  # as OrganizationGuard reads it
    if projects and not listed:
        return False, (f"state directory {state_dir}: cannot check that this key reaches its organization "
                       f"(the projects listing names no project by a string id: {len(projects)} listed); "
                       "collect would store nothing until it can")
    refused = refusal_reason(state_dir, listed, recorded, seen)  # as OrganizationGuard judges it
    if refused is None:
        return True, f"state directory {state_dir} was collected for this key's organization"
    return False, refused.replace("; nothing was stored or sent", "")
