"""Names, not only ids: project names, user emails and API key names for usage, costs and limits.

One `NameCache` is shared by every stream's collector (thread-safe). It lists the organization's
projects, users and each project's API keys at most once per `names_refresh_interval` (sooner
when documents name an id it lacks: a project or key created since, see EARLY_REFRESH_AFTER) and
`enrich(doc)` adds `openai.base.project_name`, `openai.base.user_email` and
`openai.base.api_key_name` where it knows the id.

Enrichment runs before a document is stored in the outbox, so a replayed batch stays byte for byte
what it was. A lookup never blocks or drops usage data: when a listing fails, the names it would
have given are simply absent (the previous, stale names are kept) and the next attempt is made
after a short back-off (at the next refresh when every failed listing was refused, 403: a scope
the key lacks is not granted in minutes, and each attempt lists everything again). Only the first load makes callers wait (once, bounded by a client with a few
quick retries), so the first poll's documents carry names. A later refresh runs in the background, on one
thread (the first caller to find the cache stale starts it; the others, and that caller, go on at
once with the names they have), and publishes its maps all at once when it ends: a slow or hanging
listing holds up no stream's pages, and a failed one leaves the old names in place.

The first load is published in two steps, so that it holds documents up as little as it can:
projects and every project's API keys first (concurrent, a few round trips deep), then the
organization's users (one cursor chain: 20 pages for 2,000 users, started beside the projects
listing since it needs no project id). A key's listing names its owner: a user's email (the
usage API's `user_id` for that key) or a service account's id (no email to wait for), so most
documents need only the first step; one whose `user_id` neither owns a key nor is a service
account waits for the users, as all of them used to.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping

from .http_client import AdminApiClient, ApiError, PermissionDeniedError, StoppedError
from .paging import PAGE_GATE, STOP_CHECK, DaemonPool, cursor_pages, stopped

log = logging.getLogger("agent_input.names")

PAGE_LIMIT = 100  # the list endpoints' maximum
RETRY_AFTER_FAILURE = 300.0  # seconds before a failed listing is tried again
# retries of one listing request (full jitter, 0.5 s doubling, capped at 2 s: at most 5.5 s of waits,
# unless a 429's Retry-After asks for longer, which is honoured like any request's)
NAMES_MAX_RETRIES = 4
# Users and every project's API keys are listed concurrently: with 50 projects the listings were
# the longest chain of dependent requests in a backfill (71 round trips one after another). The
# first documents wait for the keys (see above), and no page is mapped before them: 64 workers
# list up to 64 projects' keys in one round (16 took four; at 150 ms the large organization's
# names were in at 0.95 s instead of 0.6 s). Once an hour, at most 64 requests at a time.
LISTING_WORKERS = 64
# A project, key or user id that the names do not have (created since the last listing) brings the
# next refresh forward to this long after the last one, once per id: their documents went out
# without names until the hourly refresh.
EARLY_REFRESH_AFTER = 300.0
# How long such an id is remembered as asked for: a deleted key's id, met again within it (usage
# re-read within the revision window), brings nothing more forward; forgotten after it, so that the
# ids of keys deleted over months do not pile up (one early refresh more if it is met again).
ASKED_FOR = 7 * 86400.0
# How long `close()` waits for a listing in flight to end (a request that hangs may take longer:
# its thread is then left to end by itself).
CLOSE_WAIT = 5.0


class _EitherSet:
    """An Event's `is_set()` and `wait()` for "either of these is set" (`stop` may be None)."""

    def __init__(self, stop: threading.Event | None, closed: threading.Event):
        self._stop, self._closed = stop, closed

    def is_set(self) -> bool:
        return self._closed.is_set() or (self._stop is not None and self._stop.is_set())

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            (self._closed if self._stop is None else self._stop).wait(min(left, STOP_CHECK))
        return True


class NameCache:
    def __init__(
        self,
        client: AdminApiClient,
        *,
        refresh_interval: float = 3600.0,
        clock: Callable[[], float] = time.time,
        retry_after_failure: float = RETRY_AFTER_FAILURE,
        client_factory: Callable[[], AdminApiClient] | None = None,
        stop: threading.Event | None = None,
        closed: threading.Event | None = None,
    ):
        self.client = client
        # With a factory, listings run on LISTING_WORKERS threads, each with its own client
        # (a requests.Session is not shared across threads); without one, one after another.
        self._client_factory = client_factory
        self._worker_clients: list[AdminApiClient] = []
        self._worker_local = threading.local()
        self.refresh_interval = float(refresh_interval)
        self.retry_after_failure = min(float(retry_after_failure), self.refresh_interval)
        self.clock = clock
        self._projects: dict[str, str] = {}
        self._users: dict[str, str] = {}
        self._keys: dict[str, str] = {}
        self._service_accounts: frozenset[str] = frozenset()  # key owners that are not users
        # each project's last keys listing that succeeded (names, owners' emails, service accounts):
        # a project whose listing fails keeps its own, and only its own, from the one before
        self._listed_keys: dict[str, tuple[dict[str, str], dict[str, str], set[str]]] = {}
        self._next_refresh: float | None = None  # None: never loaded
        self._listed_at: float | None = None  # when the last refresh ended
        self._asked: dict[str, float] = {}  # ids not named that brought a refresh forward -> when
        self._early = False  # an id not named was met since the last refresh began
        # the kinds of id ("projects", "keys", "users") whose listing the last refresh was refused
        # (403): a refresh sooner cannot name them, so their ids bring none forward; and the
        # projects whose own keys listing was refused (the other projects' new keys still do)
        self._refused: frozenset[str] = frozenset()
        self._refused_key_projects: frozenset[str] = frozenset()
        self._keys_loaded = threading.Event()  # first load: projects and every project's keys are in
        self._all_loaded = threading.Event()  # first load: done (users too), whatever failed
        # One refresh at a time (it also owns the client). A later refresh's thread holds it from
        # the moment it is started until it ends: a plain Lock, released by that thread.
        self._refresh_lock = threading.Lock()
        self._refreshing: threading.Thread | None = None  # the latest background refresh
        self._warming: threading.Thread | None = None  # warm_up's thread
        self._stop = stop  # once set, no background refresh is started
        # set by close(): like stop, for this cache only (`from_config` shares it with its clients)
        self._closed = closed if closed is not None else threading.Event()
        self._halt = _EitherSet(stop, self._closed)  # stop or close
        self._maps_lock = threading.Lock()
        # told the first load's projects listing (or why it failed): the state directory's
        # organization check (`org_guard.OrganizationGuard`) needs no listing of its own
        self.org_guard = None
        self.refreshes = 0
        self.failures: list[str] = []

    @classmethod
    def from_config(cls, config, clock: Callable[[], float] = time.time,
                    stop: threading.Event | None = None) -> "NameCache":
        # A short back-off: a name lookup must never hold usage data up for long. Enough retries to
        # ride out a blip, though (~5 s of back-off at most, once; a 429's Retry-After is honoured
        # as by any request): the first load's names are on the
        # first backfill's documents for good, and its next try comes after a `--once` run ended.
        # the clients' retry waits end on the collector's stop and on close() alike: a closed
        # cache's listing waiting out a 429's Retry-After must not ask again (nor hold close up)
        closed = threading.Event()
        halt = _EitherSet(stop, closed)

        def make() -> AdminApiClient:
            return AdminApiClient.from_config(config, max_retries=min(config.max_retries, NAMES_MAX_RETRIES),
                                              backoff_cap=2.0, stop=halt)

        return cls(make(), refresh_interval=config.names_refresh_interval, clock=clock, client_factory=make,
                   stop=stop, closed=closed)

    def warm_up(self) -> threading.Thread:
        """Start the first load now, in the background, so it overlaps the first usage requests
        instead of starting when the first page is mapped (enrich still waits for it once)."""
        thread = threading.Thread(target=self._warm_up, name="names-warm-up", daemon=True)
        self._warming = thread
        thread.start()
        return thread

    def _warm_up(self) -> None:
        try:
            self.ensure_fresh()
        except Exception as exc:  # noqa: BLE001 - e.g. a --once run that ended first shut the pools down
            # not a traceback from a dying thread: the first `ready()` loads again and says if it fails
            log.debug("names: warm-up ended early: %s", exc)

    def wait_for_refresh(self, timeout: float | None = None) -> bool:
        """Wait for a background refresh to end; True when none is running (any more)."""
        thread = self._refreshing
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def close(self, timeout: float = CLOSE_WAIT) -> None:
        """End the background listings (the warm-up's, a refresh's: no request is started after
        this, listings not begun are dropped), wait up to `timeout` for the ones in flight, and
        close the client. Nothing of the cache asks the API after it (a collection's close, a
        build that failed part way)."""
        self._closed.set()
        deadline = time.monotonic() + timeout
        for thread in (self._warming, self._refreshing):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        self.client.close()

    def _stopping(self) -> bool:
        return self._halt.is_set()

    # -- lookups -------------------------------------------------------------------------------
    def project_name(self, project_id: str | None) -> str | None:
        with self._maps_lock:
            return self._projects.get(project_id) if project_id else None

    def user_email(self, user_id: str | None) -> str | None:
        with self._maps_lock:
            return self._users.get(user_id) if user_id else None

    def api_key_name(self, key_id: str | None) -> str | None:
        with self._maps_lock:
            return self._keys.get(key_id) if key_id else None

    def ready(self) -> None:
        """Start a refresh if due (in the background after the first load) and, during the first
        load, wait for the names documents need first (projects and keys). The engine calls it
        before it takes its page gate, so that the first load's round trips hold up only the
        stream that waits, not every stream's pages."""
        try:
            self.ensure_fresh()
            if not self._all_loaded.is_set():
                self._wait(self._keys_loaded, "project and API key names")
        except StoppedError:
            raise  # the poll ends here, before documents without their names are stored
        except Exception as exc:  # noqa: BLE001 - names must never cost a document
            log.warning("names: refresh failed: %s", exc)

    def _wait(self, loaded: threading.Event, what: str) -> None:
        """Wait for a part of the first load; a stop ends the wait (a listing may hang for up to
        `http_timeout`) with StoppedError."""
        while not loaded.wait(STOP_CHECK if self._stop is not None else None):
            if self._stop.is_set():
                raise stopped(what)

    def enrich(self, doc: dict) -> None:
        """Add the names this cache knows to `doc["openai"]["base"]` (refreshing first if due);
        never raises."""
        self.ready()
        self.enrich_all((doc,))

    def enrich_all(self, docs: Iterable[dict]) -> None:
        """`enrich` for a bucket's documents at once, without the freshness check: the caller
        calls `ready()` first (the engine: once per page, not once per bucket); never raises."""
        try:
            # refresh() swaps whole dicts, never mutates them: one consistent set, read at once
            with self._maps_lock:
                projects, users, keys = self._projects, self._users, self._keys
            unknown: list[tuple[str, str, Any]] = []  # (kind, id, its document's project id)
            for doc in docs:
                base = doc.get("openai", {}).get("base")
                if not isinstance(base, dict):
                    continue
                value = project_id = base.get("project_id")
                name = projects.get(value) if type(value) is str else None
                if name:
                    base["project_name"] = name
                elif type(value) is str and value and value not in projects:
                    unknown.append(("projects", value, project_id))
                value = base.get("user_id")
                if type(value) is str:
                    name = users.get(value)
                    if name is None and not self._all_loaded.is_set() and value not in self._service_accounts:
                        # not a key owner: the organization's users; the page gate (the
                        # engine's, shared by every stream of the process) is not held meanwhile
                        with PAGE_GATE.set_aside():
                            self._wait(self._all_loaded, "user e-mails")
                        users = self._users
                        name = users.get(value)
                    if name:
                        base["user_email"] = name
                    elif value and value not in users and value not in self._service_accounts:
                        unknown.append(("users", value, project_id))
                value = base.get("api_key_id")
                name = keys.get(value) if type(value) is str else None
                if name:
                    base["api_key_name"] = name
                elif type(value) is str and value and value not in keys:
                    unknown.append(("keys", value, project_id))
            if unknown:
                # not the ids of a listing the last refresh was refused (403), which a refresh
                # sooner cannot name: the refusals known now, after any wait for the first users
                # listing above (before it, during the first load, none are known)
                with self._maps_lock:
                    refused, refused_key_projects = self._refused, self._refused_key_projects
                self._refresh_early([i for kind, i, pid in unknown if kind not in refused and not (
                    kind == "keys" and type(pid) is str and pid in refused_key_projects)])
        except StoppedError:
            raise  # stopped while waiting: nothing is stored without its names
        except Exception as exc:  # noqa: BLE001 - enrichment must never cost a document
            log.warning("names: enrichment skipped: %s", exc)

    def _refresh_early(self, ids: list[str]) -> None:
        """Bring the next refresh forward for ids the names lack (each id once per `ASKED_FOR`)."""
        with self._maps_lock:
            new = set(ids).difference(self._asked)
            if not new or self._listed_at is None:
                return  # asked before, or the first load (which lists them) is not over
            now = self.clock()
            self._asked.update(dict.fromkeys(new, now))
            self._early = True
            due = self._listed_at + EARLY_REFRESH_AFTER
            if self._next_refresh is not None and due < self._next_refresh:
                self._next_refresh = due

    # -- refresh -------------------------------------------------------------------------------
    def _due(self, now: float) -> bool:
        """A refresh is due at `now`: its time has come, or the clock went back behind the last
        listing (stepped back, NTP), which waiting for the due time again held for as long as the
        step: a day back, the names of that day's new projects, keys and users were left out."""
        due, listed = self._next_refresh, self._listed_at
        return due is not None and (now >= due or (listed is not None and now < listed))

    def ensure_fresh(self) -> None:
        now = self.clock()
        due = self._next_refresh
        if due is not None and not self._due(now):
            return
        if due is None:
            # First load: one thread runs it (warm_up's, or the first caller); enrich waits for
            # the part it needs (see the module docstring).
            if self._refresh_lock.acquire(blocking=False):
                try:
                    if self._next_refresh is None:
                        self.refresh()
                except StoppedError:
                    raise
                except Exception as exc:  # noqa: BLE001 - not run again at every page of every stream
                    self._refresh_raised(exc)
                finally:
                    self._refresh_lock.release()
            return
        # Stale: start a refresh in the background unless one is already running; this thread,
        # like every other, goes on with the names it has.
        if self._stopping():
            return
        if not self._refresh_lock.acquire(blocking=False):
            return
        started = False
        try:
            if self._due(self.clock()):
                thread = threading.Thread(target=self._refresh_in_background, name="names-refresh",
                                          daemon=True)
                self._refreshing = thread
                thread.start()
                started = True
        finally:
            if not started:
                self._refresh_lock.release()

    def _refresh_in_background(self) -> None:
        """A later refresh, on its own thread, which holds the refresh lock until it ends."""
        try:
            self.refresh()
        except Exception as exc:  # noqa: BLE001 - e.g. the pools were shut down under it
            # not a traceback from a dying thread, and not a new thread for every page either
            self._refresh_raised(exc)
        finally:
            self._refresh_lock.release()

    def _refresh_raised(self, exc: Exception) -> None:
        """A refresh (the first load too) that raised something other than an API error ends as one
        whose listings failed: tried again after `retry_after_failure`. A due time alone left it due
        at every check with the clock stepped back behind the last listing (`_due`), and a first
        load none at all, so every page of every stream ran it again."""
        self.failures = [f"refresh: {exc}"]
        now = self.clock()
        with self._maps_lock:
            self._listed_at, self._next_refresh = now, now + self.retry_after_failure
        log.warning("names: refresh failed, next try in %.0fs: %s", self.retry_after_failure, exc)

    def refresh(self) -> None:
        """List projects, every project's API keys and users; keep what a failed listing had.

        On the first load, projects and keys are published as soon as they are in, with the key
        owners' emails; the users listing, the longest chain, runs alongside and is published when
        it ends. A later refresh publishes everything at once, when it ends."""
        try:
            self._refresh()
        finally:  # nobody waits forever on a first load, whatever happened to it
            guard = self.org_guard
            if guard is not None and not guard.reported():
                guard.unavailable("the first listing of names ended early")
            self._keys_loaded.set()
            self._all_loaded.set()

    def _refresh(self) -> None:
        with self._maps_lock:
            self._early = False  # ids met from here on may be created after this listing
        failed: list[str] = []
        refused = 0  # of them, refused (403): a missing scope, which a retry in minutes does not give
        refused_kinds: set[str] = set()
        refused_key_projects: set[str] = set()
        first = not self._all_loaded.is_set()  # publish in two steps (see the module docstring)

        def list_users() -> dict[str, str]:
            return {u["id"]: u["email"] for u in self._list("/v1/organization/users", {})
                    if isinstance(u.get("id"), str) and isinstance(u.get("email"), str)}

        def list_keys(pid: str) -> tuple[dict[str, str], dict[str, str], set[str]]:
            names, owners, service_accounts = {}, {}, set()
            for k in self._list(f"/v1/organization/projects/{pid}/api_keys", {"owner_project_access": "any"}):
                if isinstance(k.get("id"), str) and isinstance(k.get("name"), str):
                    names[k["id"]] = k["name"]
                owner = k.get("owner")
                if not isinstance(owner, Mapping):
                    continue
                who = owner.get(owner.get("type")) if owner.get("type") in ("user", "service_account") else None
                if not isinstance(who, Mapping) or not isinstance(who.get("id"), str):
                    continue
                if owner["type"] == "service_account":
                    service_accounts.add(who["id"])
                elif isinstance(who.get("email"), str):
                    owners[who["id"]] = who["email"]
            return names, owners, service_accounts

        with self._listings() as run:
            # the users listing is the longest chain and needs no project id: it starts first,
            # beside the projects listing rather than after it
            users_outcome = run([list_users], wait=False)
            projects: dict[str, str] | None = {}
            project_ids: list[str] = []
            listed: list[Mapping] = []
            guard = self.org_guard if first else None
            try:
                for p in self._list("/v1/organization/projects", {"include_archived": True}):
                    if guard is not None:
                        listed.append(p)
                    if isinstance(p.get("id"), str):
                        project_ids.append(p["id"])
                        if isinstance(p.get("name"), str):
                            projects[p["id"]] = p["name"]
            except ApiError as exc:
                failed.append(f"projects: {exc}")
                if isinstance(exc, PermissionDeniedError):
                    refused += 1
                    refused_kinds |= {"projects", "keys"}  # no project, no key listing
                projects = None
                if guard is not None:
                    guard.unavailable(str(exc), forbidden=isinstance(exc, PermissionDeniedError))
            else:
                if guard is not None:
                    guard.observe(listed)  # before a document can wait for the keys below
            key_jobs = [(f"api keys of {pid}", lambda pid=pid: list_keys(pid)) for pid in project_ids]
            # no projects listing: every project's keys as they were; else the listed projects',
            # each from this listing or, where it failed, from its last one (a deleted key, owner
            # or service account goes with the next listing of its project, whatever the others')
            listed_keys = dict(self._listed_keys) if projects is None else {}
            for pid, (label, _), (value, error) in zip(project_ids, key_jobs,
                                                       run([job for _, job in key_jobs])):
                if error is None:
                    listed_keys[pid] = value
                    continue
                failed.append(f"{label}: {error}")
                if isinstance(error, PermissionDeniedError):
                    refused += 1
                    refused_key_projects.add(pid)
                if pid in self._listed_keys:
                    listed_keys[pid] = self._listed_keys[pid]
            keys: dict[str, str] = {}
            owners: dict[str, str] = {}
            service_accounts: set[str] = set()
            for names_, owners_, service_accounts_ in listed_keys.values():
                keys.update(names_)
                owners.update(owners_)
                service_accounts |= service_accounts_
            self._listed_keys = listed_keys  # only this refresh reads or writes it
            # only this refresh swaps the maps: what it publishes is built from what they hold now
            with self._maps_lock:
                new_projects = projects if projects is not None else self._projects
                new_users = {**self._users, **owners}
                new_service_accounts = frozenset(service_accounts)
            if first:
                self._publish(new_projects, keys, new_users, new_service_accounts)
                self._keys_loaded.set()
            ((users, error),) = users_outcome()
        if error is not None:
            failed.append(f"users: {error}")
            if isinstance(error, PermissionDeniedError):
                refused += 1
                refused_kinds.add("users")
        else:
            new_users = {**owners, **users}
        self._publish(new_projects, keys, new_users, new_service_accounts)
        self.refreshes += 1
        now = self.clock()
        if failed:
            # only refusals (a key without a listing's scope, which `check` reports): asked again at
            # the next refresh, not every few minutes (every listing again, and a warning each time)
            only_refused = refused == len(failed)
            wait = self.refresh_interval if only_refused else self.retry_after_failure
            said = only_refused and failed == self.failures  # the same refusals as last time
            self.failures = failed
            # cut short by a stop: the collector stores nothing more, so no document lacks a name
            # (a warning here was a second line after `collect`'s one-line reason for stopping)
            stopping = self._stopping()
            level = logging.DEBUG if stopping or said else logging.WARNING
            log.log(level, "names: %d listing(s) failed, documents may lack names until the next try "
                    "in %.0fs: %s", len(failed), wait, failed[0])
            due = now + wait
        else:
            self.failures = []
            due = now + self.refresh_interval
        # the due time and when it was listed change together: `_refresh_early` reads both
        with self._maps_lock:
            self._listed_at, self._refused = now, frozenset(refused_kinds)
            self._refused_key_projects = frozenset(refused_key_projects)
            if self._asked:
                self._asked = {i: t for i, t in self._asked.items() if now - t < ASKED_FOR}
            if self._early:  # an id not named was met while this refresh ran: it may not have it
                due = min(due, now + EARLY_REFRESH_AFTER)
            self._next_refresh = due
        log.debug("names: %d projects, %d users, %d api keys", len(self._projects), len(self._users),
                  len(self._keys))

    def _publish(self, projects: dict[str, str], keys: dict[str, str], users: dict[str, str],
                 service_accounts: frozenset[str]) -> None:
        """Swap in a whole set of maps at once: a reader sees the old set or the new, never a mix."""
        with self._maps_lock:
            self._projects, self._keys, self._users = projects, keys, users
            self._service_accounts = service_accounts

    @contextmanager
    def _listings(self) -> Iterator[Callable[..., Any]]:
        """`run(jobs, wait=True)`: each job's (result, None) or (None, ApiError), in order; with
        wait=False, a function that waits for them. Concurrent on LISTING_WORKERS threads, each
        with its own client, when the cache has a client factory; one after another otherwise
        (then a job not waited for runs when it is waited for)."""
        def outcome(job: Callable[[], Any]) -> tuple[Any, Any]:
            try:
                return job(), None
            except ApiError as exc:
                return None, exc

        if self._client_factory is None:
            def run_serially(jobs, wait: bool = True):
                return [outcome(job) for job in jobs] if wait else (lambda: [outcome(job) for job in jobs])

            yield run_serially
            return
        pool = DaemonPool(max_workers=LISTING_WORKERS, thread_name_prefix="names", initializer=self._start_worker)

        def run_on_pool(jobs, wait: bool = True):
            futures = [pool.submit(outcome, job) for job in jobs]
            collect = lambda: [f.result() for f in futures]  # noqa: E731
            return collect() if wait else collect

        try:
            yield run_on_pool
        finally:
            # on a stop, listings not started yet are dropped (their futures are cancelled)
            pool.shutdown(wait=True, cancel_futures=self._stopping())
            with self._maps_lock:  # the workers are gone: so are their sessions
                clients, self._worker_clients = self._worker_clients, []
            for c in clients:
                c.close()

    def _start_worker(self) -> None:
        client = self._worker_local.client = self._client_factory()
        with self._maps_lock:
            self._worker_clients.append(client)

    def _worker_client(self) -> AdminApiClient:
        """A listing worker's own client, or the cache's client on any other thread."""
        return getattr(self._worker_local, "client", None) or self.client

    def _list(self, path: str, params: Mapping[str, Any]) -> Iterator[dict]:
        """Every object of a listing; a page that breaks the pagination fails the listing (an
        ApiError, retried after RETRY_AFTER_FAILURE) rather than ending it short without a word."""
        for data in cursor_pages(self._stoppable(self._worker_client().get_json), path,
                                 dict(params, limit=PAGE_LIMIT)):
            yield from (item for item in data if isinstance(item, Mapping))

    def _stoppable(self, get_json: Callable[..., dict]) -> Callable[..., dict]:
        """`get_json`, refusing to start a request once the collector is stopping (or the cache is
        closed): a refresh lists
        every project's keys and every user, and the process waits for its threads at exit."""
        def get(path: str, params: Mapping[str, Any]) -> dict:
            if self._stopping():
                raise stopped("a names listing", path)
            return get_json(path, params)

        return get
