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
from typing import Any, Callable, Iterator, Mapping

from .http_client import AdminApiClient, ApiError

log = logging.getLogger("agent_input.names")

PAGE_LIMIT = 100  # the list endpoints' maximum
RETRY_AFTER_FAILURE = 300.0  # seconds before a failed listing is tried again


class NameCache:
    def __init__(
        self,
        client: AdminApiClient,
        *,
        refresh_interval: float = 3600.0,
        clock: Callable[[], float] = time.time,
        retry_after_failure: float = RETRY_AFTER_FAILURE,
    ):
        self.client = client
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
        client = AdminApiClient.from_config(config, max_retries=min(config.max_retries, 2), backoff_cap=2.0)
        return cls(client, refresh_interval=config.names_refresh_interval, clock=clock)

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
            with self._maps_lock:
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
        users: dict[str, str] | None = {}
        try:
            for u in self._list("/v1/organization/users", {}):
                if isinstance(u.get("id"), str) and isinstance(u.get("email"), str):
                    users[u["id"]] = u["email"]
        except ApiError as exc:
            failed.append(f"users: {exc}")
            users = None
        keys: dict[str, str] = {}
        keys_complete = projects is not None
        for pid in project_ids:
            try:
                for k in self._list(f"/v1/organization/projects/{pid}/api_keys", {"owner_project_access": "any"}):
                    if isinstance(k.get("id"), str) and isinstance(k.get("name"), str):
                        keys[k["id"]] = k["name"]
            except ApiError as exc:
                failed.append(f"api keys of {pid}: {exc}")
                keys_complete = False
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

    def _list(self, path: str, params: Mapping[str, Any]) -> Iterator[dict]:
        """Every object of a cursor-paginated list (`limit`, `after`, `has_more`, `last_id`)."""
        query: dict[str, Any] = dict(params, limit=PAGE_LIMIT)
        seen: set[str] = set()
        while True:
            body = self.client.get_json(path, query)
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
