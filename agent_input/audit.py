"""The `audit` data stream: OpenAI's organization audit log as ECS events.

The log has two scopes, and the API lists them apart (the reference's `tenant_only`): the
organization's events (no `tenant_only`), and the tenant-scoped ones (`tenant_only=true`:
`tenant.admin_api_key.created`, `role.bound_to_resource`, ..., listed only that way). The collector
reads both, each as a `Scope` with its own high-water mark and recent ids in the state store:
`audit:hwm`/`audit:recent_ids` for the organization (the keys from before there were two, so an
existing state directory goes on where it was), `audit:tenant:hwm`/`audit:tenant:recent_ids` for
the tenant scope (which starts at `now - initial_interval` when it has no mark, after an upgrade
too). One poll reads the organization scope, then the tenant scope, each the same way
(`_poll_scope`).

The API lists events **newest first** with `after` cursors, so an `after` position is no use as a
durable cursor: events older than it may still be unread. The collector therefore keeps a
high-water mark instead, `hwm` = every event of the scope with `effective_at < hwm` is durable:

1. A poll at `now` covers `[hwm - overlap, now - lag]` (no further than the API's own time, the
   `Date` of its last answer, when that is behind `now`), cut into closed time slices of at most
   `SLICE` seconds, oldest slice first. A slice found to hold more than `MAX_SLICE_EVENTS` events
   is let go and read again as its older half (and the slices grow back once the log is quieter),
   so a busy log never holds more than that in memory. A slice of the overlap so halved ends
   before the stored mark, which stays where it was (a mark never goes back).
2. A slice is read completely (`effective_at[gte]`/`effective_at[lte]`, `limit` = batch_size,
   `after` = the previous page's `last_id` until `has_more` is false), whatever order the pages
   come in.
3. Its events, the scope's new high-water mark (slice end + 1) and the ids seen in the overlap are
   stored in ONE transaction (`StateStore.commit_events`), before anything is emitted.

An API error or a crash in the middle of a slice leaves the mark at the slice start: the slice is
read again from scratch and nothing of it was stored yet, so nothing is lost and nothing doubled.
A scope's first poll that fails (or is stopped) before storing a slice stores its start as the
mark (`_keep_starts`), so the next poll reads from there, not from its own later `now`; one the
organization check holds may store nothing, and keeps that start in memory (`_held_start`).
The overlap re-reads the last few minutes to catch events OpenAI records late; the ids already
emitted there are remembered and skipped (and the document id is the audit log id anyway, so a
re-emission would be a harmless duplicate).

A 403 on the organization scope (audit logging not enabled, or the key is not an Organization
Owner's) is reported once, with what to enable, and the stream goes quiet (both scopes): it asks
again every `FORBIDDEN_RETRY` seconds, silently. The refusal is kept in the state
(`audit:refused`: when and why, with each scope's would-be start mark), so a collector started
again (`collect --once` from cron) asks once (a fix is read at once) and does not report the same
refusal again.

The tenant scope refused (a 403, or a 400/404: the organization or the key cannot list tenant
events) is reported once as a warning with the reason; the organization scope goes on collecting,
and the tenant scope is asked again every `FORBIDDEN_RETRY` seconds with its mark where it was
(stored at its would-be start if it had none), so it catches up once allowed. The refusal is kept
in the state (`audit:tenant:refused`: when and why), so a collector started again (`collect
--once` from cron) asks once and does not warn of the same refusal again. Any other failure of
the tenant scope (5xx after retries, a malformed page) fails its slice as for the organization
(mark kept, read again next poll) and is reported in the poll's errors, after the organization's
slices of that poll were stored. A failure of the organization scope ends the poll (like before):
the tenant scope waits for the next.

An event that does not match the API reference (a field of the wrong type, an `effective_at` that is
not a whole Unix time between 1970 and 9999, an entry with no id), or that fails to map for any
other reason, is reported (the stream's status and a warning, with its id and what was wrong) and
skipped; the others of its slice are stored and the mark moves past it. Unlike a usage bucket, an
audit event never changes once written, so reading it again could not fix it: holding the mark
before it would only stop the audit stream for good.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .ecs import ECS_VERSION, iso_timestamp
from .engine import CLOCK_WARNING, Lines, ListingCollector, PollStats, Progress, delivered_before, serialize
from .http_client import (ApiError, AuthenticationError, BadRequestError, NotFoundError, PermissionDeniedError,
                          StoppedError, explain)
from .org_guard import OrganizationMismatch, OrganizationUnverified
from .paging import cursor_pages
from .reports import JSON_TYPE, clip as _clip, short as _short, wrong

log = logging.getLogger("agent_input.audit")

PATH = "/v1/organization/audit_logs"
DATASET = "openai.audit"
SLICE = 6 * 3600  # the most one transaction covers (bounds memory and the re-read after a crash)
OVERLAP = 300  # re-read this much before the high-water mark: events recorded late
LAG = 0  # how far behind `now` a poll stops (seconds)
FORBIDDEN_RETRY = 6 * 3600  # after a 403, ask again this rarely (and say nothing unless it changes)
MAX_PAGES_PER_SLICE = 100_000  # a safety net against a server that never ends a listing
# The most events one slice holds before it is read again as two halves: a slice is read whole
# (newest first) before its transaction, and a 6h slice of 100,000 events took 660 MB.
MAX_SLICE_EVENTS = 20_000

MAX_EFFECTIVE_AT = 253402300799  # 9999-12-31T23:59:59Z: the last second an ISO date can name
TYPE_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
# The event's id is its document's `_id`, which Elasticsearch refuses empty or over 512 bytes
MAX_ID_BYTES = 512

KV_HWM = "audit:hwm"  # the organization scope's keys: the ones from before there were two scopes
KV_RECENT = "audit:recent_ids"
KV_TENANT_HWM = "audit:tenant:hwm"
KV_TENANT_RECENT = "audit:tenant:recent_ids"
KV_TENANT_REFUSED = "audit:tenant:refused"  # {"at": unix seconds, "why": ...} while refused; "" once readable
KV_REFUSED = "audit:refused"  # the same for the organization scope (the whole stream): its 403
# {mark key: value}: marks stored at a scope's would-be start while it was refused, nothing read from
# them yet, so an initial_interval raised meanwhile still reaches further back (as a first run's does)
KV_UNREAD = "audit:unread_marks"
# {mark key: value}: unread marks that are a first read's start moved back by the clock's lead an
# answer gave (by OpenAI's time), kept when reading from there failed: not moved back again
KV_BY_OPENAI = "audit:start_by_openai"


@dataclass(frozen=True)
class Scope:
    """One listing of the audit log that the collector reads on its own mark."""

    name: str
    kv_hwm: str
    kv_recent: str
    params: Mapping[str, Any] = field(default_factory=dict)  # added to every request of the scope


ORGANIZATION = Scope("organization", KV_HWM, KV_RECENT)
TENANT = Scope("tenant", KV_TENANT_HWM, KV_TENANT_RECENT, {"tenant_only": "true"})
SCOPES = (ORGANIZATION, TENANT)


def _recall(text: str | None) -> tuple[float, str] | None:
    """A refusal record (`KV_REFUSED`, `KV_TENANT_REFUSED`): (when, why), or None when there is
    none (never refused, cleared once readable, or not ours to read)."""
    try:
        record = json.loads(text or "{}")
        return float(record["at"]), str(record["why"])
    except (ValueError, TypeError, KeyError):
        return None


class BadAuditPage(ValueError):
    """An audit page that does not match the API reference."""


class AuditCollector(ListingCollector):
    """The Collector for `openai.audit` (see engine.Collector)."""

    name = "audit"

    def __init__(self, config, stream, *args: Any, progress: Progress | None = None, **kwargs: Any):
        super().__init__(config, stream, *args, **kwargs)
        self.progress = progress  # a backfill's progress, slice by slice, as the usage streams'
        self.initial_interval = stream.initial_interval or 86400
        self.preserve_original = bool(getattr(config, "preserve_original_event", False))
        self.forbidden: str | None = None  # the 403 explanation, while audit logs are not readable
        self._forbidden_until = 0.0
        self._refusal_read = False  # the state's record of the organization scope's 403, read at the first poll
        self.tenant_refused: str | None = None  # why, while tenant-scoped events cannot be listed
        self._tenant_retry_at = 0.0
        self._tenant_refusal_read = False  # the state's record of a refusal, read at the first poll
        self._reading = False  # the poll under way went on to read the log (not quiet after a refusal)
        # a first poll's start whose writes the organization check held (nothing may be stored):
        # this process's next poll starts each scope with no mark there (`_poll_scope`)
        self._held_start: int | None = None
        self._held_by_openai = False  # that start was moved back by an answer's lead: not moved again
        self._own_marks: set[str] = set()  # the marks (their keys) this process has stored a slice at
        self._moved: dict[str, int] = {}  # this poll's first reads moved back by an answer's lead: mark key -> start
        self._lead: int | None = None  # that lead

    # -- polling -------------------------------------------------------------------------------
    def poll(self, now: float) -> PollStats:
        stats = PollStats()
        self._reading = False
        self._moved, self._lead = {}, None
        try:
            self._poll(now, stats)
        except BaseException as exc:  # slices stored before it are delivered: counted in the totals
            if self._reading and not isinstance(exc, (OrganizationMismatch, OrganizationUnverified)):
                self._keep_starts(now)
            elif self._reading:  # writes held by the organization check: the start is kept here
                self._hold_start(now)
            raise delivered_before(exc, stats)
        if self._reading and self.stop.is_set():  # cut short by a stop: a scope not read yet keeps its start
            self._keep_starts(now)
        return stats

    def _hold_start(self, now: float) -> None:
        """The organization check holds the writes that would keep the starts of scopes with no
        mark: kept in memory instead (`_held_start`), for this process's next poll."""
        start = int(now - self.initial_interval)
        if self._lead is not None:  # moved back by the lead an answer of this poll gave (`_moved_starts`)
            start = min([max(0, start - self._lead), *self._moved.values()])
        if self._held_start is None or start < self._held_start:
            self._held_start = start
            self._held_by_openai = self._lead is not None

    def _keep_starts(self, now: float) -> None:
        """A first poll that failed (a 5xx or 429 after the client's retries, a timeout, a page
        against the API reference, a stop, the outbox refusing) before a scope stored anything:
        that scope's would-be start is stored, as on a 403 (`_forbid`), so that the next poll
        reads from there, not from `initial_interval` before its own later `now` (the oldest edge
        of the first window was never read). A scope with a mark (slices stored) is left as is."""
        try:
            kv = self._would_be_starts(SCOPES, now)
            kv.update(self._moved_starts(kv))
            if kv:
                self.delivery.commit_events(self.name, [], kv)
        except (OrganizationMismatch, OrganizationUnverified):  # held: kept in memory, as a held poll's
            self._hold_start(now)
        except Exception as exc:  # noqa: BLE001 - e.g. the state unusable: the poll's own failure is said
            log.debug("audit: cannot keep where the stream starts: %s", exc)

    def _poll(self, now: float, stats: PollStats) -> PollStats:
        if not self._refusal_read:
            self._recall_refusal(now)
        if self.forbidden is not None and now < self._forbidden_until:
            return stats
        self._reading = True
        try:
            self._poll_scope(ORGANIZATION, now, stats)
        except PermissionDeniedError as exc:
            self._forbid(exc, now)
            return stats
        if self.forbidden is not None and stats.requests:  # (not a stop before asking)
            log.warning("audit: audit logs are readable again; collecting")
            self.forbidden = None
            self.delivery.commit_events(self.name, [], {KV_REFUSED: ""})
        if not self._tenant_refusal_read:
            self._recall_tenant_refusal(now)
        if self.tenant_refused is None or now >= self._tenant_retry_at:
            asked = stats.requests
            try:
                self._poll_scope(TENANT, now, stats)
            except (PermissionDeniedError, NotFoundError, BadRequestError) as exc:
                self._refuse_tenant(exc, now)
            except (ApiError, BadAuditPage) as exc:
                if isinstance(exc, (StoppedError, AuthenticationError)):
                    raise
                # the organization scope's slices of this poll are stored: report, don't lose them
                msg = f"audit: tenant-scoped events: poll failed, mark kept, will retry: {exc}"
                log.error("%s", msg)
                stats.errors.append(msg)
                self._keep_starts(now)  # a first read that failed: its start (no mark yet) is kept
            else:
                if self.tenant_refused is not None and stats.requests > asked:  # not a stop before asking
                    log.warning("audit: tenant-scoped events are readable again; collecting from where they stopped")
                    self.tenant_refused = None
                    self.delivery.commit_events(self.name, [], {KV_TENANT_REFUSED: ""})
        return stats

    def _recall_refusal(self, now: float) -> None:
        """The organization scope's 403 as an earlier process recorded it (`collect --once` from
        cron): asked again at once (a key fixed, or the log enabled, since is read now), but the
        same refusal again is not news: the ERROR is not logged at every run."""
        self._refusal_read = True
        why = self._recalled(KV_REFUSED, "audit logs")
        if why is not None:
            self.forbidden, self._forbidden_until = why, now

    def _recall_tenant_refusal(self, now: float) -> None:
        """The same for the tenant scope: asked again at once, a refusal with the same reason is
        not news (debug), and an answer is ("readable again")."""
        self._tenant_refusal_read = True
        why = self._recalled(KV_TENANT_REFUSED, "tenant-scoped events")
        if why is not None:
            self.tenant_refused, self._tenant_retry_at = why, now

    def _recalled(self, key: str, what: str) -> str | None:
        """The reason of the refusal an earlier process recorded under `key`, or None."""
        recalled = _recall(self.store.get(key))
        if recalled is None:
            return None
        at, why = recalled
        log.debug("audit: %s refused at %s: %s; asked again now", what, iso_timestamp(at), why)
        return why

    def _poll_scope(self, scope: "Scope", now: float, stats: PollStats) -> None:
        """Read one scope from its high-water mark to `now - LAG`, slice by slice, each slice's
        events and the scope's new mark stored in one transaction."""
        end = int(now) - LAG  # inclusive upper bound of this poll
        hwm_text = self.store.get(scope.kv_hwm)
        unread = self._unread_marks()
        by_openai = False  # a start moved back by an answer's lead already (`_moved_starts`)
        if hwm_text is not None and unread.get(scope.kv_hwm) == hwm_text:
            # a refusal's would-be start that nothing was read from: this is still the scope's
            # first read, and an initial_interval raised since reaches further back (no overlap)
            by_openai = self._json_kv(KV_BY_OPENAI).get(scope.kv_hwm) == hwm_text
            hwm, hwm_text = min(int(hwm_text), int(now - self.initial_interval)), None
            by_openai = by_openai and hwm == int(unread[scope.kv_hwm])
        else:
            hwm = int(hwm_text) if hwm_text is not None else int(now - self.initial_interval)
            if hwm_text is None and self._held_start is not None:  # a first poll the organization check held
                hwm = min(hwm, self._held_start)
                by_openai = self._held_by_openai and hwm == self._held_start
        # ids already emitted whose effective_at lies in the overlap, with that effective_at
        recent: dict[str, int] = _load_recent(self.store.get(scope.kv_recent))
        start = max(0, hwm - OVERLAP) if hwm_text is not None else hwm
        first = start  # where this poll began, for its progress
        length = SLICE  # shorter while the log is busier than MAX_SLICE_EVENTS a slice
        # A mark ahead of the API's time is pulled back once (below), and only a mark this process
        # has not stored yet: its own never pass the API's time, and one behind a `Date` that went
        # back (a proxy's, a backend's on a slow clock) was pulled back again at every such poll,
        # the events of the minutes before it written again each time.
        rewound = hwm_text is None or scope.kv_hwm in self._own_marks
        # a scope's first read: it starts `initial_interval` before OpenAI's time
        first_read = hwm_text is None and not by_openai
        others_kept = hwm_text is not None  # a first read's first slice also keeps the other scopes' starts
        if not rewound and start > end and not self.stop.is_set():
            # A mark ahead of the local clock too (corrected since an earlier version set the mark
            # on it ahead of OpenAI's): no slice to read, and waiting for the clock to reach the
            # mark skipped what OpenAI records until then. A read of one second asks the API's time.
            self._read_slice(scope, end, end, stats, None)
            rewound = True
            served_to = getattr(self.client, "server_date", None)
            if type(served_to) is int and start > served_to:
                hwm = self._pulled_back(scope, hwm, hwm_text, served_to, now)
                start = first = max(0, hwm - OVERLAP)
        while start <= end and not self.stop.is_set():
            slice_end = min(end, start + length - 1)
            if length == SLICE and end - slice_end < OVERLAP:  # no tiny last slice: one request less
                slice_end = end
            # a first read's first answer already says whether its start moves back (below): a
            # failure of the slice's later pages keeps that start moved back too (`_keep_starts`)
            read = self._read_slice(scope, start, slice_end, stats,
                                    MAX_SLICE_EVENTS if slice_end > start else None,
                                    (lambda evs, at=start: self._moved_back(at, self._served_to(evs), now) is not None)
                                    if first_read else None)
            if read is None:  # too many events for one slice: read it again as its older half
                length = max(1, (slice_end - start + 1) // 2)
                log.info("audit: more than %d %s events between %s and %s; reading %ds slices",
                         MAX_SLICE_EVENTS, scope.name, iso_timestamp(start), iso_timestamp(slice_end), length)
                continue
            events, bad = read
            if len(events) < MAX_SLICE_EVENTS // 4:
                length = min(SLICE, length * 2)
            # A local clock ahead of OpenAI's: the API has not reached slice_end yet, and events it
            # records meanwhile would fall behind the mark (and the overlap, once more than 5
            # minutes ahead) for good. The mark stops at the API's own time (its Date header).
            served_to = self._served_to(events)
            if first_read and type(served_to) is int:
                # A first read's start is `initial_interval` before OpenAI's time, not only this
                # host's (as a usage stream's first run): on a clock ahead by more than the
                # initial_interval it lay in OpenAI's future, the mark was stored there, and what
                # OpenAI recorded until it reached it was never read (8 hours ahead, 6h asked: the
                # 6 hours before and the 2 after the first poll). Nothing of this slice is stored.
                # The start is moved back by the clock's lead, not set to `initial_interval` before
                # this answer's Date: a start kept by a refusal, a failed or a held first poll was
                # taken on the same clock, hours or days earlier, and set to `initial_interval`
                # before this later Date it still lay in OpenAI's future of then (tenant-scoped
                # events refused, 8 hours ahead, 6h asked: the 6 hours asked and the 2 after lost).
                asked = self._moved_back(start, served_to, now)
                if asked is not None:
                    hwm = start = first = self._moved[scope.kv_hwm] = asked
                    self._lead = int(now) - served_to
                    length = SLICE
                    first_read = False
                    continue
            # Only before anything is stored: a first answer without a Date (as before the rule)
            # stored its slice, and a later one's Date sent the read back over it, the events of
            # the slices stored before written a second time.
            first_read = False
            if not rewound and type(served_to) is int and start > served_to:
                # A stored mark more than the overlap ahead of the API's own time: an earlier
                # version marked its reads up to the local clock, ahead of OpenAI's (this one stores
                # none there: a start a refusal or failed first read kept is a first read's, moved
                # back by the lead above), and waiting
                # for OpenAI to reach that mark skipped for good the events it records until then
                # (after the upgrade too). Back by the local clock's lead (where that version's
                # last read ended, if it ran on this clock), and to the API's time at most.
                rewound = True
                hwm = self._pulled_back(scope, hwm, hwm_text, served_to, now)
                start = first = max(0, hwm - OVERLAP)
                continue
            rewound = True
            behind = type(served_to) is int and served_to < slice_end
            if behind:
                slice_end = max(start - 1, served_to)
            new_hwm = slice_end + 1
            keep_from = new_hwm - OVERLAP
            lines = Lines()
            next_recent = {i: t for i, t in recent.items() if t >= keep_from}
            for what in bad:
                self._skip(stats, "an entry", BadAuditPage(what))
            # each event is let go once mapped: a slice can hold 100,000 events
            for eid in sorted(events, key=lambda i: _order(events[i])):
                ev = events.pop(eid)
                if eid in recent:
                    continue  # emitted by an earlier slice or poll (the overlap)
                # Any failure to map this one event is bad data of this event: reported and
                # skipped, never a failure of the slice (that would hold the mark forever).
                try:
                    doc_id, doc = audit_event(ev, namespace=self.namespace,
                                              preserve_original=self.preserve_original)
                    line = serialize(doc_id, doc)
                except Exception as exc:  # noqa: BLE001 - an unforeseen shape must not block the stream
                    if not isinstance(exc, BadAuditPage):
                        log.debug("audit: mapping event %s failed", _short(eid), exc_info=True)
                    self._skip(stats, f"event {_short(eid)}", exc)
                    t = ev.get("effective_at")
                    if type(t) is int and keep_from <= t <= slice_end:
                        next_recent[eid] = t  # the overlap's re-read skips it without a second report
                    continue
                lines.append(line)
                if ev["effective_at"] >= keep_from:
                    next_recent[eid] = ev["effective_at"]
            # The stored mark never goes back: a slice of the overlap read again in halves ends
            # before it, and a mark stored there (then a crash, an API error or a stop before the
            # poll's later slices) sent the next poll back over events of the previous poll that
            # `recent` no longer holds: each emitted a second time.
            kv = {scope.kv_hwm: str(max(new_hwm, hwm)),
                  scope.kv_recent: json.dumps(next_recent, sort_keys=True, separators=(",", ":"))}
            popped = unread.pop(scope.kv_hwm, None) is not None  # read from now on
            keeping = not others_kept
            if not others_kept:
                # A scope's first mark holds the other scopes that have none at their would-be
                # start too: a first run killed between the organization scope's first slice and
                # the tenant scope's (SIGKILL, a crash, a machine restart) left the tenant scope
                # to start `initial_interval` before the next start, and its events of the time
                # in between were never read (a failed or stopped poll keeps them: `_keep_starts`).
                others_kept = True
                others = self._would_be_starts([s for s in SCOPES if s is not scope], now)
                others.pop(KV_UNREAD, None)  # written below, with this scope's own mark gone from it
                if others:
                    unread.update((s.kv_hwm, others[s.kv_hwm]) for s in SCOPES if s.kv_hwm in others)
                    popped = True
                    kv.update(others)
            if popped:
                kv[KV_UNREAD] = json.dumps(unread, sort_keys=True)
            if keeping and self._lead is not None:
                # this first read moved back by the lead its answer gave: the other scopes' starts
                # kept with it, taken on the local clock, are moved back by it too, by OpenAI's time
                # (killed before they store anything and started again with the clock corrected,
                # NTP as a restart does, nothing moved them back: what lay between never read)
                kv.update(self._moved_starts(kv))
            self.delivery.commit_events(self.name, lines, kv)
            if type(served_to) is int:  # a mark kept to the API's time (without one, checked again)
                self._own_marks.add(scope.kv_hwm)
            stats.events += len(lines)
            recent = next_recent
            start = new_hwm
            if self.progress is not None:  # done once the last slice is stored (or the API's time reached)
                self.progress.update(self.name, end + 1 - first if behind else start - first, end + 1 - first,
                                     slice_end)
            if behind:
                break  # the rest is in the API's future: the next poll reads it

    def _served_to(self, events: Mapping[str, Mapping]) -> int | None:
        """OpenAI's time: the `Date` of its last answer, whose `events` were read; None without one."""
        served_to = getattr(self.client, "server_date", None)
        if type(served_to) is int and any(type(ev.get("effective_at")) is int
                                          and ev["effective_at"] > served_to + OVERLAP
                                          for ev in events.values()):
            # behind an event OpenAI served (it serves none after its own time): not its clock
            # but a proxy's, as for a usage stream (`_api_time`). Taken as OpenAI's time, a Date
            # a year behind started a first read a year back and held the mark there, every
            # event since never read. A second or two behind is OpenAI's own servers' clocks
            # differing: ignored for that, a first read on a host an hour ahead was not moved
            # back (its first hour never read) and the mark went to the local clock, pulled
            # back at the next poll over events already written (3h asked: 97 of 510 lost,
            # 241 twice). Within the overlap the Date is harmless: what lies past it is kept
            # in `recent` and skipped when read again.
            return None
        return served_to

    @staticmethod
    def _moved_back(start: int, served_to: int | None, now: float) -> int | None:
        """Where a first read from `start` starts instead, moved back by the clock's lead over
        OpenAI's time `served_to`: None when it stays (no Date, or a lead of a few seconds)."""
        if type(served_to) is not int:
            return None
        asked = start - (int(now) - served_to)
        if asked < start and (start > served_to or now - served_to > CLOCK_WARNING):
            return max(0, asked)
        return None

    @staticmethod
    def _pulled_back(scope: "Scope", hwm: int, hwm_text: str, served_to: int, now: float) -> int:
        """A stored mark ahead of the API's time `served_to`, pulled back by the local clock's lead
        (where the earlier version's last read ended, if it ran on this clock), to the API's time at
        most (a clock corrected since: all this version can tell), and to the local clock's at most:
        a poll reads no further than that, so a mark left past it (a clock corrected to behind
        OpenAI's) read nothing, and lost the same events, until the clock reached the old mark."""
        pulled = max(0, min(served_to + 1, int(now) - LAG + 1, hwm - max(0, int(now) - served_to)))
        log.warning("audit: the %s scope's mark %s is ahead of OpenAI's time %s (set on a clock ahead "
                    "of OpenAI's, by an earlier version): reading again from %s", scope.name,
                    iso_timestamp(int(hwm_text)), iso_timestamp(served_to), iso_timestamp(pulled))
        return pulled

    @staticmethod
    def _skip(stats: PollStats, which: str, exc: Exception) -> None:
        if isinstance(exc, BadAuditPage):
            why = f"it does not match the API reference: {exc}"
        else:
            why = f"it could not be mapped: {type(exc).__name__}: {_clip(str(exc))}"
        msg = f"audit: skipped {which}, {why}; not stored, and passed (an audit event never changes)"
        stats.errors.append(msg)
        log.warning(msg)

    def _unread_marks(self) -> dict[str, str]:
        return self._json_kv(KV_UNREAD)

    def _json_kv(self, key: str) -> dict[str, str]:
        try:
            value = json.loads(self.store.get(key) or "{}")
        except ValueError:
            return {}
        return {k: v for k, v in value.items() if isinstance(v, str)} if isinstance(value, dict) else {}

    def _moved_starts(self, kv: Mapping[str, str]) -> dict[str, str]:
        """The kv writes that keep, for each scope nothing was read from, its start moved back by
        the lead an answer of this poll gave (the start a first read was moved back to, or the
        would-be start on the local clock, `kv`'s or one kept before, moved by that lead) rather
        than the start on the local clock: were the clock corrected (NTP) before the next poll,
        nothing moved that back, and what lay between was never read (a day ahead, 3h asked: the
        time between the two polls, up to the day). Marked by OpenAI's time (KV_BY_OPENAI): not
        moved back again."""
        if self._lead is None:
            return {}
        unread = json.loads(kv[KV_UNREAD]) if KV_UNREAD in kv else self._unread_marks()
        by_openai = json.loads(kv[KV_BY_OPENAI]) if KV_BY_OPENAI in kv else self._json_kv(KV_BY_OPENAI)
        out: dict[str, str] = {}
        for scope in SCOPES:
            key = scope.kv_hwm
            mark = kv.get(key, self.store.get(key))
            if mark is None or unread.get(key) != mark:
                continue  # read from already (this poll stored a slice of it)
            if key in self._moved:
                start = self._moved[key]
            elif by_openai.get(key) == mark:
                continue
            else:
                start = max(0, int(mark) - self._lead)
            out[key] = unread[key] = by_openai[key] = str(start)
        if out:
            out[KV_UNREAD] = json.dumps(unread, sort_keys=True)
            out[KV_BY_OPENAI] = json.dumps(by_openai, sort_keys=True)
        return out

    def _would_be_starts(self, scopes: Iterable["Scope"], now: float) -> dict[str, str]:
        """The kv writes that hold each of `scopes` without a mark at its would-be start, and
        record those marks as unread (KV_UNREAD)."""
        unread = self._unread_marks()
        start = int(now - self.initial_interval)
        if self._held_start is not None:  # a first poll the organization check held: from there
            start = min(start, self._held_start)
        marks = {scope.kv_hwm: str(start)
                 for scope in scopes if self.store.get(scope.kv_hwm) is None}
        if not marks:
            return {}
        kv = {**marks, KV_UNREAD: json.dumps({**unread, **marks}, sort_keys=True)}
        if self._held_by_openai and start == self._held_start:
            # moved back by an answer's lead already: not moved again (`_moved_starts`)
            kv[KV_BY_OPENAI] = json.dumps({**self._json_kv(KV_BY_OPENAI), **marks}, sort_keys=True)
        return kv

    def _forbid(self, exc: PermissionDeniedError, now: float) -> None:
        why = explain(exc, "audit_logs", self.config)
        first = self.forbidden != why  # new, or its reason changed: said; the same again is not news
        # A scope with no mark yet is held where it would have started: once the log is readable
        # (a key given api.audit_logs.read days later) it is caught up from there, not from
        # `initial_interval` before that later day, which never read the refused days' events.
        kv = self._would_be_starts(SCOPES, now)
        self._lead_of_refusal(exc, now)
        kv.update(self._moved_starts(kv))  # a 403 after an answer gave the clock's lead (`_refuse_tenant`)
        self.forbidden = why
        self._forbidden_until = now + FORBIDDEN_RETRY
        # the refusal is kept too (as the tenant scope's is): a process started again (`collect
        # --once` from cron) asks once, and does not log the same refusal again
        kv[KV_REFUSED] = json.dumps({"at": int(now), "why": self.forbidden})
        try:
            self.delivery.commit_events(self.name, [], kv)
        except StoppedError:
            raise
        except (OrganizationMismatch, OrganizationUnverified):  # held: the start kept in memory
            self._hold_start(now)
        except Exception as exc_kv:  # noqa: BLE001 - e.g. the state unusable: next time
            log.debug("audit: cannot keep the refusal and where the stream starts: %s", exc_kv)
        if first:
            log.error("audit: %s; the audit stream stays quiet and asks again every %dh",
                      self.forbidden, FORBIDDEN_RETRY // 3600)
        else:
            log.debug("audit: still forbidden: %s", self.forbidden)

    def _lead_of_refusal(self, exc: ApiError, now: float) -> None:
        """The clock's lead a refusal's own `Date` gives, where no answer of this poll gave one: a
        403 to the very first request (audit logging not enabled yet, a key without the scope, the
        tenant scope refused beside a mark of the organization's) kept the would-be start on a
        clock hours ahead, and with the clock corrected (NTP) before the log was readable what
        OpenAI recorded from `initial_interval` before its time of the first poll until that start
        was never read."""
        if self._lead is None and self._moved_back(int(now - self.initial_interval), exc.server_date, now) is not None:
            self._lead = int(now) - exc.server_date  # type: ignore[operator]

    def _refuse_tenant(self, exc: ApiError, now: float) -> None:
        first = self.tenant_refused != str(exc)  # new, or its reason changed
        # where the scope would have started: kept, so that it catches up from there once allowed
        # (not from `initial_interval` before that later day)
        kv = {KV_TENANT_REFUSED: json.dumps({"at": int(now), "why": str(exc)}), **self._would_be_starts([TENANT], now)}
        # moved back by the lead an answer of this poll gave (the organization scope's first read
        # kept this scope's start on the local clock): as a failed read's (`_keep_starts`), else
        # with the clock corrected before it is asked again the time in between was never read
        self._lead_of_refusal(exc, now)
        kv.update(self._moved_starts(kv))
        self.delivery.commit_events(self.name, [], kv)
        self.tenant_refused = str(exc)
        self._tenant_retry_at = now + FORBIDDEN_RETRY
        if first:
            log.warning("audit: tenant-scoped events (tenant.*, role.bound_to_resource, ...) cannot be listed: %s; "
                        "organization events go on being collected, and the tenant ones are asked for again "
                        "every %dh and caught up from where they stopped", self.tenant_refused,
                        FORBIDDEN_RETRY // 3600)
        else:
            log.debug("audit: tenant-scoped events still refused: %s", self.tenant_refused)

    def _read_slice(self, scope: "Scope", gte: int, lte: int, stats: PollStats,
                    max_events: int | None = None, moves: Callable[[dict[str, dict]], bool] | None = None
                    ) -> tuple[dict[str, dict], list[str]] | None:
        """Every event of `scope` with gte <= effective_at <= lte, by id (pages newest first, any
        order), and what was wrong with each entry that is not an object with a string `id`; None
        as soon as there are more than `max_events` (what was read is let go). `moves`: a first
        read's check of its first page (its Date gives the clock's lead): when it says the read
        moves back, that page's events alone, the rest not asked for (as a usage stream's first
        page: the start kept moved back were a later page to fail, not on the clock ahead)."""
        params: dict[str, Any] = {"effective_at[gte]": gte, "effective_at[lte]": lte, "limit": self.batch_size,
                                  **scope.params}
        events: dict[str, dict] = {}
        bad: list[str] = []
        for data in cursor_pages(self.get_json, PATH, params, lambda what: BadAuditPage(f"{PATH}: {what}"),
                                 MAX_PAGES_PER_SLICE):
            stats.requests += 1
            stats.pages += 1
            for ev in data:
                if not isinstance(ev, Mapping) or not isinstance(ev.get("id"), str):
                    bad.append(f"no string `id`: {_short(ev)}")
                    continue
                ev = dict(ev)
                t = ev.get("effective_at")
                if type(t) is float and t.is_integer() and 0 <= t <= MAX_EFFECTIVE_AT:  # the reference's integer
                    ev["effective_at"] = int(t)
                events[ev["id"]] = ev
            if max_events is not None and len(events) > max_events:
                return None
            if moves is not None and moves(events):
                return events, bad
            moves = None
        return events, bad


def _load_recent(text: str | None) -> dict[str, int]:
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def _wrong(path: str, value: Any, want: str) -> BadAuditPage:
    return BadAuditPage(wrong(path, value, want))


def _want(event: Mapping, key: str, path: str, kind: type) -> Any:
    """event[key] if it is absent/null (None) or of `kind`; else BadAuditPage naming `path`."""
    value = event.get(key)
    if value is None:
        return None
    if kind is Mapping:
        if not isinstance(value, Mapping):
            raise _wrong(path, value, "an object")
    elif not isinstance(value, kind) or isinstance(value, bool):
        raise _wrong(path, value, JSON_TYPE.get(kind, kind.__name__))
    return value


def check_event(event: Any) -> None:
    """BadAuditPage, naming the field, unless `event` has the shape the API reference's `AuditLog`
    gives it (optional fields may be absent or null; `ip_address_details`, which the reference
    does not list but the API sends, must be an object). Unknown fields and event types pass."""
    if not isinstance(event, Mapping):
        raise _wrong("entry", event, "an object")
    if not isinstance(event.get("id"), str):
        raise _wrong("id", event.get("id"), "a string")
    if not event["id"] or len(event["id"].encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise _wrong("id", event["id"], f"a document id (1 to {MAX_ID_BYTES} bytes; it is the event's `_id`)")
    etype = event.get("type")
    if not isinstance(etype, str) or not TYPE_NAME.fullmatch(etype):
        raise _wrong("type", etype, "an event type name")
    t = event.get("effective_at")
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= MAX_EFFECTIVE_AT:
        raise _wrong("effective_at", t, "a whole Unix time in seconds between 1970 and 9999")
    project = _want(event, "project", "project", Mapping)
    if project is not None:
        # mapped keywords: an object there made Elasticsearch refuse the whole event
        _want(project, "id", "project.id", str)
        _want(project, "name", "project.name", str)
    _want(event, etype, etype, Mapping)
    actor = _want(event, "actor", "actor", Mapping)
    if actor is None:
        return
    _want(actor, "type", "actor.type", str)
    session = _want(actor, "session", "actor.session", Mapping)
    if session is not None:
        _want(session, "ip_address", "actor.session.ip_address", str)
        _want(session, "ip_address_details", "actor.session.ip_address_details", Mapping)
        _check_user(session, "actor.session.user")
    api_key = _want(actor, "api_key", "actor.api_key", Mapping)
    if api_key is not None:
        _want(api_key, "id", "actor.api_key.id", str)
        _want(api_key, "type", "actor.api_key.type", str)
        _check_user(api_key, "actor.api_key.user")
        account = _want(api_key, "service_account", "actor.api_key.service_account", Mapping)
        if account is not None:
            _want(account, "id", "actor.api_key.service_account.id", str)


def _check_user(parent: Mapping, path: str) -> None:
    user = _want(parent, "user", path, Mapping)
    if user is not None:
        _want(user, "id", path + ".id", str)
        _want(user, "email", path + ".email", str)


def _order(ev: Mapping) -> tuple:
    t = ev.get("effective_at")
    return (t if isinstance(t, (int, float)) and not isinstance(t, bool) else 0, str(ev.get("id")))


# -- ECS mapping ------------------------------------------------------------------------------
def audit_event(event: Mapping[str, Any], *, namespace: str = "default",
                preserve_original: bool = False) -> tuple[str, dict]:
    """(document id, ECS document) for one audit log entry, as the seed's audit example shows.

    The id is the audit log id: re-reading an event can only ever produce the same document.
    An event that does not match the API reference raises BadAuditPage (see `check_event`).
    """
    check_event(event)
    eid = event["id"]
    etype = event["type"]
    ts = iso_timestamp(event["effective_at"])

    audit: dict[str, Any] = {}
    for key, value in event.items():
        if value is None or key == etype:
            continue
        if key == "actor" and isinstance(value, Mapping):
            audit["actor"] = _actor(value)
        elif key == "effective_at":
            audit["effective_at"] = ts
        else:
            audit[key] = _copy(value)
    payload = event.get(etype)
    if isinstance(payload, Mapping) and payload:
        _set_path(audit, etype, _copy(payload))

    doc: dict[str, Any] = {
        "@timestamp": ts,
        "ecs": {"version": ECS_VERSION},
        "data_stream": {"type": "logs", "dataset": DATASET, "namespace": namespace},
        "event": {
            "action": etype.replace(".", "-"),
            "category": ["iam"],
            "dataset": DATASET,
            "id": eid,
            "kind": "event",
            "type": ["change"],
        },
        "observer": {"product": "OpenAI", "vendor": "OpenAI"},
        "openai": {"audit": audit},
    }
    if preserve_original:
        doc["event"]["original"] = json.dumps(event, separators=(",", ":"), sort_keys=True, ensure_ascii=False)

    actor = audit.get("actor") or {}
    session = actor.get("session") if isinstance(actor.get("session"), Mapping) else None
    api_key = actor.get("api_key") if isinstance(actor.get("api_key"), Mapping) else None
    user: Mapping = {}
    related_ip: list[str] = []
    if session:
        user = session.get("user") or {}
        ip = session.get("ip_address")  # a valid address or absent (`_actor`)
        source: dict[str, Any] = {}
        if isinstance(ip, str) and ip:
            source["ip"] = ip
            related_ip.append(ip)
        # without a usable address OpenAI's own details still say where: only the `ip` fields go
        details = session.get("ip_address_details")
        if isinstance(details, Mapping):
            if isinstance(details.get("asn"), int):
                source["as"] = {"number": details["asn"]}
            geo = _geo(details)
            if geo:
                source["geo"] = geo
        if source:
            doc["source"] = source
        if isinstance(session.get("ja3"), str):
            doc["tls"] = {"client": {"ja3": session["ja3"]}}
        if isinstance(session.get("user_agent"), str):
            doc["user_agent"] = {"original": session["user_agent"]}
    elif api_key:
        user = api_key.get("user") or {}
        service_account = api_key.get("service_account") or {}
        if not user and isinstance(service_account.get("id"), str):
            user = {"id": service_account["id"]}
    related_user: list[str] = []
    ecs_user: dict[str, Any] = {}
    email = user.get("email") if isinstance(user, Mapping) else None
    uid = user.get("id") if isinstance(user, Mapping) else None
    if isinstance(email, str) and email:
        ecs_user["email"] = email
        related_user.append(email)
        if "@" in email:
            ecs_user["domain"] = email.rsplit("@", 1)[1]
    if isinstance(uid, str) and uid:
        ecs_user["id"] = uid
        related_user.append(uid)
    if ecs_user:
        doc["user"] = dict(sorted(ecs_user.items()))
    related: dict[str, list[str]] = {}
    if related_ip:
        related["ip"] = related_ip
    if related_user:
        related["user"] = related_user
    if related:
        doc["related"] = related
    tags = ["forwarded", "openai-audit"]
    if preserve_original:
        tags.insert(0, "preserve_original_event")
    doc["tags"] = tags
    return eid, doc


def _actor(actor: Mapping[str, Any]) -> dict:
    out = _copy(actor)
    session = out.get("session")
    if isinstance(session, dict) and "ip_address" in session and not _is_ip(session["ip_address"]):
        # mapped `ip` (as source.ip and related.ip): a value that is no address ("", "unknown")
        # would make Elasticsearch reject the whole event; event.original keeps what was sent
        del session["ip_address"]
    if isinstance(session, dict) and isinstance(session.get("ip_address_details"), dict):
        details = session["ip_address_details"]
        for key, conv in (("asn", _to_int), ("latitude", _to_float), ("longitude", _to_float)):
            if key in details:
                value = conv(details[key])
                if value is None:
                    details.pop(key)
                else:
                    details[key] = value
    return out


def _geo(details: Mapping[str, Any]) -> dict:
    geo: dict[str, Any] = {}
    if isinstance(details.get("city"), str):
        geo["city_name"] = details["city"]
    if isinstance(details.get("country"), str):
        geo["country_iso_code"] = details["country"]
    lat, lon = details.get("latitude"), details.get("longitude")
    # a geo_point refuses (and with it the whole event) a latitude beyond ±90 or longitude beyond ±180
    if isinstance(lat, float) and isinstance(lon, float) and abs(lat) <= 90 and abs(lon) <= 180:
        geo["location"] = {"lat": lat, "lon": lon}
    if isinstance(details.get("region_code"), str):
        geo["region_iso_code"] = details["region_code"]
    if isinstance(details.get("region"), str):
        geo["region_name"] = details["region"]
    return geo


def _is_ip(value: Any) -> bool:
    """An IPv4 or IPv6 address, as a field mapped `ip` accepts it."""
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _to_int(value: Any) -> int | None:
    """An AS number (32 bits), from a number or a string such as `AS15169`; None if it is none."""
    if isinstance(value, bool):
        return None
    if not isinstance(value, int):
        try:
            value = int(str(value).strip().upper().removeprefix("AS"))
        except ValueError:
            return None
    return value if 0 <= value < 2**32 else None


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer past float's range
        return None
    return f if f == f and abs(f) != float("inf") else None


def _copy(value: Any) -> Any:
    """A deep copy of JSON data without nulls (the seed's documents leave null fields out)."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _set_path(target: dict, dotted: str, value: Any) -> None:
    """openai.audit.<type> with the type's dots as object levels (`api_key.created` nests under
    `api_key`, next to nothing else: Elasticsearch would expand the dotted key the same way)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            nxt = target[part] = {}
        target = nxt
    if isinstance(target.get(leaf), dict) and isinstance(value, dict):
        target[leaf].update(value)
    else:
        target[leaf] = value


factory = AuditCollector  # app.EXTRA_COLLECTORS builds it as engine.ListingCollector says
