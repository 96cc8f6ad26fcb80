"""Names, not only ids: project names, user emails and API key names for usage, costs and limits.

One `NameCache` is shared by every stream's collector (thread-safe). It lists the organization's
projects, users and each project's API keys at most once per `names_refresh_interval` and
`enrich(doc)` adds `openai.base.project_name`, `openai.base.user_email` and
`openai.base.api_key_name` where it knows the id.

Enrichment runs before a document is stored in the outbox, so a replayed batch stays byte for byte
what it was. A lookup never blocks or drops usage data: when a listing fails, the names it would
have given are simply absent (the previous, stale names are kept) and the next attempt is made
after a short back-off. Only the first load makes callers wait (once, bounded by a client with few
retries), so the first poll's documents carry names; later refreshes happen on whichever thread
finds the cache stale while the others go on with the names they have.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping

from .http_client import AdminApiClient, ApiError

log = logging.getLogger("agent_input.names")

PAGE_LIMIT = 100  # the list endpoints' maximum
RETRY_AFTER_FAILURE = 300.0  # seconds before a failed listing is tried again
# Users and every project's API keys are listed concurrently: with 50 projects the listings were
# the longest chain of dependent requests in a backfill (71 round trips one after another).
LISTING_WORKERS = 8


class NameCache:
    def __init__(
        self,
        client: AdminApiClient,
        *,
        refresh_interval: float = 3600.0,
        clock: Callable[[], float] = time.time,
        retry_after_failure: float = RETRY_AFTER_FAILURE,
        client_factory: Callable[[], AdminApiClient] | None = None,
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
        self._next_refresh: float | None = None  # None: never loaded
        self._refresh_lock = threading.Lock()  # one refresh at a time (it also owns the client)
        self._maps_lock = threading.Lock()
        self.refreshes = 0
        self.failures: list[str] = []

    @classmethod
    def from_config(cls, config, clock: Callable[[], float] = time.time) -> "NameCache":
        # Few retries and a short back-off: a name lookup must never hold usage data up for long.
        def make() -> AdminApiClient:
            return AdminApiClient.from_config(config, max_retries=min(config.max_retries, 2), backoff_cap=2.0)

        return cls(make(), refresh_interval=config.names_refresh_interval, clock=clock, client_factory=make)

    def warm_up(self) -> threading.Thread:
        """Start the first load now, in the background, so it overlaps the first usage requests
        instead of starting when the first page is mapped (enrich still waits for it once)."""
        thread = threading.Thread(target=self.ensure_fresh, name="names-warm-up", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.client.close()

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

    def enrich(self, doc: dict) -> None:
        """Add the names this cache knows to `doc["openai"]["base"]`; never raises."""
        try:
            self.ensure_fresh()
            base = doc.get("openai", {}).get("base")
            if not isinstance(base, dict):
                return
            # refresh() swaps whole dicts, never mutates them: reading without the lock is safe
            for id_field, name_field, names in (
                ("project_id", "project_name", self._projects),
                ("user_id", "user_email", self._users),
                ("api_key_id", "api_key_name", self._keys),
            ):
                value = base.get(id_field)
                name = names.get(value) if isinstance(value, str) else None
                if name:
                    base[name_field] = name
        except Exception as exc:  # noqa: BLE001 - enrichment must never cost a document
            log.warning("names: enrichment skipped: %s", exc)

    # -- refresh -------------------------------------------------------------------------------
    def ensure_fresh(self) -> None:
        now = self.clock()
        due = self._next_refresh
        if due is not None and now < due:
            return
        if due is None:
            # First load: wait for it (once), so the first documents carry names.
            with self._refresh_lock:
                if self._next_refresh is None:
                    self.refresh()
            return
        # Stale: refresh unless another thread is already at it (then go on with what we have).
        if self._refresh_lock.acquire(blocking=False):
            try:
                if self._next_refresh is not None and self.clock() >= self._next_refresh:
                    self.refresh()
            finally:
                self._refresh_lock.release()

    def refresh(self) -> None:
        """List projects, users and every project's API keys; keep what a failed listing had."""
        failed: list[str] = []
        projects: dict[str, str] | None = {}
        project_ids: list[str] = []
        try:
            for p in self._list("/v1/organization/projects", {"include_archived": True}):
                if isinstance(p.get("id"), str):
                    project_ids.append(p["id"])
                    if isinstance(p.get("name"), str):
                        projects[p["id"]] = p["name"]
        except ApiError as exc:
            failed.append(f"projects: {exc}")
            projects = None

        def list_users() -> dict[str, str]:
            return {u["id"]: u["email"] for u in self._list("/v1/organization/users", {})
                    if isinstance(u.get("id"), str) and isinstance(u.get("email"), str)}

        def list_keys(pid: str) -> dict[str, str]:
            return {k["id"]: k["name"]
                    for k in self._list(f"/v1/organization/projects/{pid}/api_keys", {"owner_project_access": "any"})
                    if isinstance(k.get("id"), str) and isinstance(k.get("name"), str)}

        jobs: list[tuple[str, Callable[[], dict[str, str]]]] = [("users", list_users)]
        jobs += [(f"api keys of {pid}", lambda pid=pid: list_keys(pid)) for pid in project_ids]
        outcomes = self._run_listings(jobs)
        users: dict[str, str] | None = None
        keys: dict[str, str] = {}
        keys_complete = projects is not None
        for (label, _), (value, error) in zip(jobs, outcomes):
            if error is not None:
                failed.append(f"{label}: {error}")
                keys_complete = keys_complete and label == "users"
            elif label == "users":
                users = value
            else:
                keys.update(value)
        with self._maps_lock:
            if projects is not None:
                self._projects = projects
            if users is not None:
                self._users = users
            if keys_complete:
                self._keys = keys
            else:  # keep the keys of projects that could not be listed this time
                self._keys = {**self._keys, **keys}
        self.refreshes += 1
        now = self.clock()
        if failed:
            self.failures = failed
            log.warning("names: %d listing(s) failed, documents may lack names until the next try "
                        "in %.0fs: %s", len(failed), self.retry_after_failure, failed[0])
            self._next_refresh = now + self.retry_after_failure
        else:
            self.failures = []
            self._next_refresh = now + self.refresh_interval
        log.debug("names: %d projects, %d users, %d api keys", len(self._projects), len(self._users),
                  len(self._keys))

    def _run_listings(self, jobs: list[tuple[str, Callable[[], dict[str, str]]]]) -> list[tuple[Any, Any]]:
        """(result, None) or (None, ApiError) per job, in order; concurrently when possible."""
        def run(job: Callable[[], dict[str, str]]) -> tuple[Any, Any]:
            try:
                return job(), None
            except ApiError as exc:
                return None, exc

        if self._client_factory is None or len(jobs) < 2:
            return [run(job) for _, job in jobs]
        try:
            with ThreadPoolExecutor(max_workers=LISTING_WORKERS, thread_name_prefix="names",
                                    initializer=self._start_worker) as pool:
                return list(pool.map(run, [job for _, job in jobs]))
        finally:  # the workers are gone: so are their sessions
            with self._maps_lock:
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
        """Every object of a cursor-paginated list (`limit`, `after`, `has_more`, `last_id`)."""
        query: dict[str, Any] = dict(params, limit=PAGE_LIMIT)
        seen: set[str] = set()
        while True:
            body = self._worker_client().get_json(path, query)
            data = body.get("data")
            if not isinstance(data, list):
                return
            for item in data:
                if isinstance(item, Mapping):
                    yield item
            last = body.get("last_id") or (data[-1].get("id") if data and isinstance(data[-1], Mapping) else None)
            if not body.get("has_more") or not data or not isinstance(last, str) or last in seen:
                return
            seen.add(last)
            query["after"] = last
