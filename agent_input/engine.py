"""The engine: one scheduler for every collector, one driver for every usage stream.

`UsageCollector` turns a `UsageStreamSpec` plus a `StreamConfig` into polls: it works out the
window (cursor, finalization grace, revision window), pages through the API, compares what it
reads with what it already emitted, and hands each page's documents to `Delivery`, which stores
them in the outbox together with the new cursor before sending them. `Engine` runs every
collector on its own thread and interval; a failing stream reports and carries on (or, for a
rejected key, stops) without touching the others.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Protocol, TextIO

from . import memory
from .config import format_duration
from .ecs import iso_timestamp, mapper, ndjson_line, to_ndjson_line
from .http_client import AuthenticationError, PermissionDeniedError, StoppedError
from .org_guard import OrganizationGuard, OrganizationMismatch, OrganizationUnverified
from .outputs import Output, OutputError
from .paging import PAGE_GATE, DaemonPool, PageFetcher
from .reports import clip, short
from .state import Cursor, Observation, StateError, StateStore, group_json
from .streams import BOOLEAN_DIMENSIONS, WIDTH_SECONDS, UsageStreamSpec, get_field

log = logging.getLogger("agent_input.engine")

Clock = Callable[[], float]


class StreamStopped(Exception):
    """A stream cannot go on (rejected key, missing scope): stop polling it, report why."""


serialize = to_ndjson_line  # one NDJSON line, the deterministic id in the top-level `_id`


class Lines:
    """A batch's NDJSON lines, appended into one buffer as they are made.

    Not a list of the lines: orjson (3.12 on) returns each line in a buffer of 4 KiB or more
    whatever its length, and never shrinks it, so a list of a rate-limits cycle's 171,000 lines
    (5,000 projects; 138 MB of NDJSON) held 700 MB, and an audit slice of 100,000 events as
    much. Appended here, each line's buffer is freed at once."""

    __slots__ = ("buf", "count")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.count = 0

    def append(self, line: bytes) -> None:
        self.buf += line
        self.count += 1

    def __len__(self) -> int:
        return self.count


# -- delivery ---------------------------------------------------------------------------------
class Delivery:
    """Outbox first, then the output; the outbox entry goes only when the output acknowledges."""

    def __init__(self, store: StateStore, output: Output):
        self.store = store
        self.output = output
        self.unremoved: set[int] = set()  # delivered, but their outbox entries could not be deleted

    def replay_pending(self, up_to: int | None = None, drop_orphans: bool = True) -> int:
        """Re-send, byte for byte, every batch a previous run stored but never saw acknowledged
        (those up to batch `up_to`). `drop_orphans` only while no stream thread runs: a batch's
        spool file is written before the row that names it."""
        if drop_orphans:
            self.store.drop_orphans()  # spool files of batches that never committed, or were acked
        n = 0
        for batch in self.store.pending(up_to=up_to):
            self._send(batch.batch, batch.stream, batch.payload, batch.events)
            n += batch.events
        return n

    def commit_page(self, stream: str, width: str, payload: bytes, events: int, **state) -> None:
        batch = self.store.commit_page(stream, width, payload=payload, events=events, **state)
        if batch is not None:
            self._send(batch, stream, payload, events)

    def commit_events(self, stream: str, lines: "Lines | list[bytes]", kv: Mapping[str, str]) -> None:
        events = len(lines)
        if isinstance(lines, Lines):
            payload = bytes(lines.buf)
            lines.buf.clear()  # one copy of the payload at a time
        else:
            payload = b"".join(lines)
        batch = self.store.commit_events(stream, payload, events, kv)
        if batch is not None:
            self._send(batch, stream, payload, events)

    def _send(self, batch: int, stream: str, payload: bytes, events: int) -> None:
        self.output.send(stream, payload, events, lambda: self._ack(batch, stream))

    def _ack(self, batch: int, stream: str) -> None:
        """The output has the batch. A delete from the outbox that fails (a full disk) is said,
        not raised: the page's cursor and documents are stored and delivered, so failing the poll
        ("cursor kept, will retry") said the opposite of what happened. The entry stays and is
        sent again at the next start: a duplicate by `_id`, not a loss."""
        try:
            self.store.ack(batch)
        except StateError as exc:
            self.unremoved.add(batch)
            if getattr(self.output, "reports_ack_failures", False):
                raise  # the protocol's output says it itself: logged, and a `degraded` status
            log.error("%s: batch %d was delivered, but cannot be deleted from the outbox (%s): it is sent again "
                      "at the next start, a duplicate by _id", stream, batch, exc)


# -- collectors -------------------------------------------------------------------------------
KEEP_ERRORS = 20  # the last errors a run's totals keep per stream


@dataclass
class PollStats:
    requests: int = 0  # listing requests answered (a retried one once), used or not
    pages: int = 0  # pages read: not a first run's first page asked again from OpenAI's time
    events: int = 0  # documents committed to the outbox
    corrections: int = 0
    bad_buckets: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: "PollStats") -> None:
        self.requests += other.requests
        self.pages += other.pages
        self.events += other.events
        self.corrections += other.corrections
        self.bad_buckets += other.bad_buckets
        self.errors.extend(other.errors)
        del self.errors[:-KEEP_ERRORS]  # a run's totals: an outage of days must not grow them without end


def delivered_before(exc: BaseException, stats: PollStats) -> BaseException:
    """Note on a poll's exception what it delivered before it raised (pages committed, a cycle
    stored), so that the run's totals (`collect --once`'s summary) count it; `exc` for `raise`."""
    prior = getattr(exc, "delivered", None)
    if isinstance(prior, PollStats) and prior is not stats:
        stats.add(prior)  # a width left behind, polled inside this one
    try:
        exc.delivered = stats  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return exc


class Collector(Protocol):
    name: str
    interval: float

    def poll(self, now: float) -> PollStats: ...


class Names(Protocol):
    """What the engine needs of the name cache (`names.NameCache`)."""

    def ready(self) -> None:
        """Called before a page is worked on: refresh if due, wait out a first load."""

    def enrich_all(self, docs: list[dict]) -> None:
        """Add the names it knows to each document's openai.base; never raises."""


class BadBucket(ValueError):
    """A bucket whose data does not match the API reference; it is reported, not emitted."""


@dataclass
class Progress:
    """Per-stream backfill progress. On a terminal: one self-rewriting line. Otherwise (a log
    file, systemd, a supervisor) a poll that has run `every` seconds says how far it got, every
    `every` seconds: to `on_report(stream, message)` (the protocol's stream status), else as an
    INFO log line. Short polls say nothing."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    enabled: bool | None = None  # the terminal line; None: whether `stream` is a terminal
    on_report: Callable[[str, str], None] | None = None
    every: float = 30.0
    _state: dict = field(default_factory=dict)
    _began: dict = field(default_factory=dict)  # stream -> (when its poll began, when it last said)
    _last: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            self.enabled = bool(isatty and isatty())

    def update(self, stream: str, done: float, total: float, reached: float | None = None) -> None:
        if total <= 0:
            return
        if not self.enabled:
            self._report(stream, done, total, reached)
            return
        with self._lock:
            self._state[stream] = min(100, int(100 * done / total))
            now = time.monotonic()
            if now - self._last < 0.5 and self._state[stream] < 100:
                return
            self._last = now
            line = "  ".join(f"{k} {v}%" for k, v in sorted(self._state.items()))
            self.stream.write(f"\rbackfill: {line}\x1b[K")
            self.stream.flush()

    def _report(self, stream: str, done: float, total: float, reached: float | None) -> None:
        now = time.monotonic()
        with self._lock:
            if done >= total:
                self._began.pop(stream, None)  # this poll is done: the next one counts afresh
                return
            began, said = self._began.setdefault(stream, (now, now))
            if now - said < self.every:
                return
            self._began[stream] = (began, now)
        message = f"backfill {min(99, int(100 * done / total))}%" + (
            f", up to {iso_timestamp(reached)}" if reached is not None else "")
        if self.on_report is not None:
            self.on_report(stream, message)
        else:
            log.info("%s: %s", stream, message)

    def finish(self) -> None:
        """End the progress line, so what is printed next starts on a line of its own."""
        with self._lock:
            if self.enabled and self._state:
                self.stream.write("\n")
                self.stream.flush()
                self._state.clear()


def _pages_left(start: int, end: int, reached: int, pages: int) -> float:
    """How many more pages a stream will need, judged by how far its first `pages - 1` pages
    reached: the page gate serves the longest chain first. Before a stream's first page is
    worked on nothing is known, and it counts as the longest."""
    if pages <= 1 or reached <= start:
        return math.inf
    return (end - reached) * (pages - 1) / (reached - start)


# A local clock this far ahead of or behind OpenAI's (its `Date`) is said (`_final_by_api`).
CLOCK_WARNING = 300


def _floor(ts: float, width: int) -> int:
    return int(math.floor(ts / width)) * width


class PollingCollector:
    """What every collector holds: the client it reads with, the delivery it writes through,
    and when it polls. Subclasses implement `poll(now)` (see `Collector`)."""

    name: str

    def __init__(
        self,
        stream,  # config.StreamConfig
        client,  # http_client.AdminApiClient
        delivery: Delivery,
        *,
        namespace: str = "default",
        stop: threading.Event | None = None,
        clock: Clock = time.time,
        **_: Any,  # what only some collectors take (progress, names)
    ):
        self.stream = stream
        self.client = client
        self.delivery = delivery
        self.store = delivery.store
        self.namespace = namespace
        self.stop = stop or threading.Event()
        self.clock = clock
        self.interval = stream.interval


class ListingCollector(PollingCollector):
    """A collector of a listing endpoint (audit logs, rate limits): it also reads top-level vars
    from the whole `Config` and pages with the stream's `batch_size`. `app.EXTRA_COLLECTORS`
    builds one as `Class(config, stream, client, delivery, client_factory=..., **common)`;
    `client_factory` makes more clients like `client` for worker threads (a session is not shared
    across threads); without one, a collector reads one thing at a time on `client`."""

    def __init__(self, config, stream, client, delivery: Delivery, *,
                 client_factory: Callable[[], Any] | None = None, **common: Any):  # config: config.Config
        super().__init__(stream, client, delivery, **common)
        self.config = config
        self.batch_size = stream.batch_size or 100
        self.client_factory = client_factory
        self._requests: DaemonPool | None = None  # the thread `get_json` asks on, made at the first request

    def get_json(self, path: str, params: Mapping[str, Any]) -> dict:
        """`client.get_json`, asked on the collector's own daemon thread and waited for until a stop,
        which raises StoppedError at once: the request is left to end by itself, its answer
        dropped (nothing of it is stored, and the next poll asks again). Asked on the stream's
        thread, a request that hangs held a SIGTERM (or `run`'s stop, or a new config) for up to
        `http_timeout`, 10 minutes at most."""
        if self._requests is None:
            self._requests = DaemonPool(1, f"{self.name}-request")
        return self._requests.run(self.stop, "an answer from OpenAI", path, self.client.get_json, path, dict(params))

    def close(self) -> None:
        """End `get_json`'s thread (after the request in flight, if any, without waiting for it):
        `run` builds new collectors at each config, and the old ones' threads were left waiting."""
        if self._requests is not None:
            self._requests.shutdown(wait=False, cancel_futures=True)


class UsageCollector(PollingCollector):
    """Drives one usage-like endpoint: windows, grace, revisions, pages, outbox."""

    def __init__(
        self,
        spec: UsageStreamSpec,
        config,  # config.StreamConfig
        client,  # http_client.AdminApiClient
        delivery: Delivery,
        *,
        namespace: str = "default",
        stop: threading.Event | None = None,
        progress: Progress | None = None,
        clock: Clock = time.time,
        names: "Names | None" = None,
    ):
        super().__init__(config, client, delivery, namespace=namespace, stop=stop, clock=clock)
        self.spec = spec
        self.name = spec.name
        self.config = config
        self.progress = progress
        self.names = names
        self.width = config.bucket_width
        self.width_s = WIDTH_SECONDS[self.width]
        self.grace = config.finalization_grace if spec.has_grace else 0
        self.revision_window = config.effective_revision_window
        self._extract = _counter_extractor(spec)
        self._map = mapper(spec, self.width, namespace, for_ndjson=True)
        self._group_key = _group_keyer(spec)
        # every group field is a dimension, which `extract` checks is a str, bool or None
        self._hashable_groups = set(spec.group_by) <= set(spec.dimensions)
        # dimensions the group key leaves out (costs' currency and unit): kept with each
        # observation, so that a group's zeroing correction carries them like its first document
        self._extra_dims = tuple(d for d in spec.dimensions if d not in spec.group_by)
        self._left: list[UsageCollector] | None = None  # widths this stream left, until final
        self._waiting = False  # back to a width still being finished: the change waits for it
        self._told_clock = False  # the warning that this host's clock is far from OpenAI's
        self._clock_teller: UsageCollector = self  # who says it: the stream's collector, for its widths left too
        self._told_origin = False  # the warning that initial_interval reaches before the state's start
        self._unrecorded: Cursor | None = None  # the first poll's start, while no cursor is stored
        # a first poll's start whose writes the organization check held (nothing may be stored):
        # this process's next poll starts there, not `initial_interval` before its own later `now`
        self._held: Cursor | None = None
        # a first run's start asked again from OpenAI's time: a kept or held start (taken on this
        # clock, hours or days before) moved back by the clock's lead (`_poll`), for its `window`
        self._moved: int | None = None
        # the start of a first run asked again from OpenAI's time (`window(by_api=True)`): kept by
        # a failure or a stop (`_kept_by_api_key` in the state too) or held, it is not moved back
        # by the clock's lead again at the next run (once a poll: a day ahead, a day further back
        # at each poll the organization check held or whose listing asked again failed)
        self._by_api: int | None = None

    def _widths_left(self, now: float) -> list["UsageCollector"]:
        """Collectors of the bucket widths this stream was collected at besides its current one,
        polled by its thread before it: each until it is final up to where the next width starts
        (`Cursor.retired_at`).

        A change of `bucket_width` is taken over here, once, in one transaction: the width in use
        goes on up to the first boundary of the new width at or after its cursor, and the new
        width starts there (however long the collector was stopped: a pause loses nothing). Their
        documents never cover the same time, so summing every width stays exact; before, the new
        width started over at `initial_interval` and the panels counted the overlap twice.

        Back to a width the stream left: if the widths used since (the one in use and any in
        between) have collected nothing, the change is undone, whether or not its old range is final
        yet; else, still being finished, the width in use goes on until the old range of this one is
        final, and the change is taken over then (checked at every poll till then).

        A stream nothing was ever read from (its first polls failed, their start kept by
        `_keep_origin`, at one width or at several) has nothing to hand over: a change is its first
        run at the new width, from the kept start floored to the new width's boundary (or from
        further back, should `initial_interval` ask: `window`). The other widths' cursors go."""
        if self._left is not None:
            return self._left
        cursors = self.store.cursors(self.name)
        if cursors and all(self._unread(w, c) for w, c in cursors.items()) and (
                set(cursors) != {self.width} or cursors[self.width].retired_at is not None):
            start = _floor(min(c.origin for c in cursors.values()), self.width_s)
            others = sorted(w for w in cursors if w != self.width)
            self.store.put_cursors(self.name, {self.width: Cursor(start, start, start)}, drop=others)
            asked = _floor(now - self.config.initial_interval, self.width_s)  # further back: `window` reads it
            log.info("%s: bucket width is now %s; nothing was read at %s yet, so %s starts as on a first run, "
                     "from %s", self.name, self.width, ", ".join(others) or self.width, self.width,
                     iso_timestamp(min(start, asked)))
            cursors = {self.width: Cursor(start, start, start)}
        mine = cursors.pop(self.width, None)
        in_use = {w: c for w, c in cursors.items() if c.retired_at is None}
        waiting = False
        # every width that covers time after where this one stopped: the one in use, any in
        # between (1m -> 1h -> 1d -> 1m), which goes on up to where the next one starts, and one
        # that started before it but was taken up again since (1m -> 1h -> 1m, undone, -> 1d -> 1h:
        # 1m goes on to midnight, past where 1h stopped)
        later = ({w: c for w, c in cursors.items() if c.retired_at is None or c.origin >= mine.retired_at
                  or c.retired_at > mine.retired_at}
                 if mine is not None and mine.retired_at is not None else {})
        # (a page with a gap keeps its documents' observations without moving the cursor)
        # Undone, they stop where they started and this width goes on from its cursor: only when
        # that is where they started. A width itself undone before (1h -> 1d -> 1h -> 1d: 1d from
        # midnight, cut back to its start, 1h from 14:00 again) starts after them, and cutting 1h
        # back to 14:00 left 14:00 to midnight to no width (10 hours never read).
        undo = all(c.position <= c.origin and c.origin >= mine.position
                   and self.store.first_observation(self.name, w) is None for w, c in later.items())
        if mine is not None and mine.retired_at is not None and (undo or not _finished(mine)):
            # undone even when this width is final up to where it stopped: taken over instead, its
            # cursor started anew there and none read since, the stream looked never collected
            if undo:
                changed = {w: replace(c, retired_at=c.origin, settled=c.origin) for w, c in later.items()
                           if c.retired_at is None or not _finished(c)}
                changed[self.width] = replace(mine, retired_at=None)
                self.store.put_cursors(self.name, changed)
                cursors.update(changed)
                log.info("%s: bucket width is %s again; %s had collected nothing", self.name, self.width,
                         ", ".join(later) or "none")
            else:
                waiting = True
                if not self._waiting:  # said once; checked again at every poll
                    log.info("%s: bucket width %s takes over once its earlier range, up to %s, is final; "
                             "until then %s goes on", self.name, self.width, iso_timestamp(mine.retired_at),
                             ", ".join(in_use))
        elif in_use or (mine is not None and mine.retired_at is not None):
            w = self.width_s
            reached = max(c.position for c in in_use.values()) if in_use else mine.retired_at
            start = -(-reached // w) * w  # the first boundary of this width at or after it
            if mine is not None and mine.origin < start:
                # this width's cursor starts again at `start`: where the state's collection of the
                # stream began, if it was this width's origin, would be gone with it (`_tell_origin`)
                self._keep_collected_from(mine.origin)
            changed = {width: replace(c, retired_at=start) for width, c in in_use.items()}
            changed[self.width] = Cursor(start, start, start)
            self.store.put_cursors(self.name, changed)
            cursors.update(changed)
            log.info("%s: bucket width is now %s, from %s; %s goes on until then and until final",
                     self.name, self.width, iso_timestamp(start), ", ".join(in_use) or "none")
        left = [
            UsageCollector(self.spec, replace(self.config, bucket_width=width), self.client, self.delivery,
                           namespace=self.namespace, stop=self.stop, clock=self.clock, names=self.names)
            for width, c in cursors.items()
            # in use (while this width waits), or unfinished; never this width, which a change
            # above put back into `cursors` (polled as a width left too, it was read twice a poll)
            if width != self.width and (c.retired_at is None or not _finished(c))
        ]
        for collector in left:
            collector._left = []
            collector._clock_teller = self  # the same stream: its clock WARNING is said once
        self._left, self._waiting = (None if waiting else left), waiting
        return left

    # The window a poll at `now` covers, per the seed's worked example.
    def window(self, now: float, *, by_api: bool = False) -> tuple[Cursor, int, int, int]:
        w = self.width_s
        end = _floor(now - self.grace, w)
        cur = self.store.cursor(self.name, self.width)
        self._unrecorded = None
        asked = _floor(now - self.config.initial_interval, w)
        if self._held is not None:
            asked = min(asked, self._held.origin)
        if self._moved is not None:
            asked = min(asked, self._moved)
        if cur is not None and asked < cur.origin and self._never_read(cur):
            # only a failed first poll's start (`_keep_origin`), nothing read since: a raised
            # initial_interval is still this stream's first run's, and delivers nothing twice
            cur = None
        if cur is None:
            cur = self._unrecorded = Cursor(asked, asked, asked)
            if by_api:
                self._by_api = asked
        elif cur.retired_at is None and not self._told_origin:
            self._tell_origin(now)
        final_before = _floor(now - self.revision_window, w)
        # From the first bucket not read since it became final: after a pause longer than the
        # revision window (an outage, a rejected key, a long interval) the buckets emitted while
        # still revisable are read once more, not left at what they were then.
        if cur.settled is None:
            # A state dir from before `settled`: that version pruned the observations before
            # min(cursor, final_before) at each poll, so the ones it kept are of buckets emitted
            # while still revisable. They are read once more, however long the collector was
            # stopped (an upgrade after a pause longer than the window lost their late revisions).
            first = self.store.first_observation(self.name, self.width)
            resume = max(cur.origin, min(cur.position, final_before, cur.position if first is None else first))
        else:
            # never below `settled`: its buckets' observations are gone, so reading them again
            # (the clock stepped back, a longer revision_window) would emit revision 0 twice
            resume = max(cur.origin, min(cur.position, cur.settled))
        if cur.retired_at is not None:  # a width the stream left: only up to where the next one starts
            end = min(end, cur.retired_at)
        return cur, resume, end, final_before

    def _kept_by_api_key(self) -> str:
        return f"{self.name}:start_by_openai"

    def _taken_by_api(self, origin: int) -> bool:
        """`origin`, a start nothing was read from, was taken by OpenAI's time (a first run's asked
        again from its Date, then kept or held), not on this host's clock."""
        return origin == self._by_api or self.store.get(self._kept_by_api_key()) == str(origin)

    def _collected_from_key(self) -> str:
        return f"{self.name}:collected_from"

    def _keep_collected_from(self, origin: int) -> None:
        kept = self.store.get(self._collected_from_key())
        if kept is None or origin < int(kept):
            self.store.put_kv(self._collected_from_key(), str(origin))

    def _api_time(self, served_from: int | None) -> int | None:
        """OpenAI's time, the `Date` of its last answer; None without one, or with one behind a
        bucket OpenAI has served (starting at `served_from`): it serves none after its own time,
        so that Date is not its clock (a proxy's), and taken as one it kept every bucket since
        revisable, or a first run's start that far back."""
        served = getattr(self.client, "server_date", None)
        if type(served) is not int or (served_from is not None and served < served_from):
            return None
        return served

    def _final_by_api(self, final_before: int, position: int) -> int:
        """`final_before` by OpenAI's clock (the `Date` of its last answer) too: on a host whose
        clock runs ahead of OpenAI's, a bucket the local clock took as past the revision window was
        still revisable for OpenAI (by a day: the bucket in progress itself), emitted once and its
        late revisions never read (6 hours ahead: 11% of a day's tokens lost). A lead or lag of
        more than `CLOCK_WARNING` is said once."""
        served = self._api_time(position - self.width_s)
        if served is None:
            return final_before
        lead = self.clock() - served
        if abs(lead) > CLOCK_WARNING and not self._clock_teller._told_clock:
            self._clock_teller._told_clock = True
            log.warning("%s: this host's clock is %s %s OpenAI's (the Date of its answers): %s; keep the clock "
                        "synchronized (NTP)", self.name, format_duration(int(abs(lead))),
                        "ahead of" if lead > 0 else "behind",
                        "buckets are re-read until final by OpenAI's clock, and the finalization grace is that "
                        "much shorter" if lead > 0 else "the latest buckets are collected that much later")
        return min(final_before, _floor(served - self.revision_window, self.width_s))

    def _tell_origin(self, now: float) -> None:
        """`initial_interval` only sets where a stream's first poll starts: raised later, with
        state in place, it reaches before what was ever collected and nothing is read there.
        Said once per collector (once a start; under `run`, again with each new config, whose
        collectors are built anew), not silently ignored. The collection began at the earliest
        origin of its widths' cursors, or of a width's cursor started again since (kept then)."""
        self._told_origin = True
        kept = self.store.get(self._collected_from_key())
        first = min([c.origin for c in self.store.cursors(self.name).values()] + ([int(kept)] if kept else []))
        asked = _floor(now - self.config.initial_interval, self.width_s)
        if asked < _floor(first, self.width_s):  # (a wider width's flooring alone reaches back by nothing asked)
            log.warning("%s: initial_interval reaches back to %s, but the state directory collected this stream "
                        "from %s on: initial_interval applies to a stream's first run only, so nothing before %s "
                        "is collected (a new state directory would deliver everything after it a second time)",
                        self.name, iso_timestamp(asked), iso_timestamp(first), iso_timestamp(first))

    def poll(self, now: float) -> PollStats:
        stats = PollStats()
        self._unrecorded = None  # set by this poll's `window`, never a previous poll's
        try:
            self._poll(now, stats)
        except BaseException as exc:
            if not isinstance(exc, (OrganizationMismatch, OrganizationUnverified)):
                self._keep_origin()
            elif self._unrecorded is not None:  # writes held: the start is kept here, not in the state
                self._held, self._unrecorded = self._unrecorded, None
            raise delivered_before(exc, stats)
        if self._held is not None and self.store.cursor(self.name, self.width) is not None:
            self._held = None  # stored now
        return stats

    def _keep_origin(self) -> None:
        """A first poll that failed before it stored anything, whatever the failure (refused, 401
        or 403: a key without api.usage.read; a 5xx or 429 after the client's retries, a timeout,
        a page against the API reference, a stop, the outbox refusing): its start is stored, so
        that the next poll, perhaps days later, reads from there rather than from
        `initial_interval` before its own later `now` (the oldest edge of the first window was
        never collected). A first poll that stored a page has its cursor already: left as it is.
        That write held by the organization check (OpenAI down for the projects listing too):
        the start is kept in memory (`_held`), as a poll the check itself held."""
        cur, self._unrecorded = self._unrecorded, None
        try:
            stored = self.store.cursor(self.name, self.width)
            if cur is None or (stored is not None and not (self._never_read(stored) and cur.origin < stored.origin)):
                if stored is not None and stored.origin == self._by_api and self._never_read(stored):
                    # stored by an empty first page, then the listing failed: by OpenAI's time as well
                    self.store.put_kv(self._kept_by_api_key(), str(stored.origin))
                return
            self.store.put_cursors(self.name, {self.width: cur})
            if cur.origin == self._by_api:  # by OpenAI's time already: not moved back again
                self.store.put_kv(self._kept_by_api_key(), str(cur.origin))
        except (OrganizationMismatch, OrganizationUnverified):  # writes held as well: kept here, as in `poll`
            self._held = cur
        except Exception as exc:  # noqa: BLE001 - e.g. the state unusable: the poll's own failure is said
            log.debug("%s: cannot keep the first poll's start: %s", self.name, exc)

    def _never_read(self, cur: Cursor) -> bool:
        """The stream's only cursor is a start nothing was read from (a failed first poll's). A
        stream whose cursors at other widths were never read either has only one by now: a change
        of width moves them to this one (`_widths_left`)."""
        return (cur.retired_at is None and set(self.store.cursors(self.name)) == {self.width}
                and self._unread(self.width, cur))

    def _unread(self, width: str, cur: Cursor) -> bool:
        """Nothing was read from `cur` (the cursor of `width`): it never moved from its origin and
        no observation is kept at that width. A page read stores either: an emitted bucket moves
        the cursor, or (after a gap or a bad bucket) keeps its observations, pruned only as the
        cursor passes them. A cursor from before `settled` (NULL) counts as read."""
        return (cur.position == cur.origin == cur.settled
                and self.store.first_observation(self.name, width) is None)

    def _poll(self, now: float, stats: PollStats, *, again: bool = True) -> PollStats:
        for left in self._widths_left(now):
            stats.add(left.poll(now))
        cur, resume, end, final_before = self.window(now, by_api=not again)
        if resume >= end:
            return stats
        # a first run's start is `initial_interval` before OpenAI's time, not only this host's:
        # ahead by more than initial_interval, it lay in OpenAI's future, and what OpenAI recorded
        # until it got there was never read (by a day, 3h asked: 21 hours of usage lost)
        # (or a start a failed first run kept, `_keep_origin`, nothing read since)
        first_run = again and cur.retired_at is None and cur.position == cur.origin == cur.settled
        restart: int | None = None
        created = iso_timestamp(self.clock())
        seen = self.store.observations(self.name, self.width, resume, end)
        params: dict[str, Any] = {
            "start_time": resume,
            "end_time": end,
            "bucket_width": self.width,
            "limit": self.spec.max_limit[self.width],
        }
        if self.spec.group_by:
            params["group_by"] = list(self.spec.group_by)

        contiguous = resume  # every bucket before this was read and good, in order
        frozen = False
        done: set[int] = set()  # bucket starts handled in this poll
        position = cur.position
        settled = resume
        carry: dict | None = None  # last bucket of a page: it may continue on the next page
        tokens: set[str] = set()  # every next_page of this listing: one seen twice is a loop
        with PageFetcher(self.client, self.spec.path, self.stop) as pages:
            pages.request(params)
            while True:
                # the network wait, never gated; the fetch thread has asked for the next page
                # already if the token was at the end of this one (`guessed`)
                raw, guessed = pages.take()
                stats.requests += 1
                stats.pages += 1
                final_before = self._final_by_api(final_before, position)
                if self.names is not None:
                    self.names.ready()  # the first load is waited for here (not in the gate); a refresh runs apart
                # parse, compare, map: at most PAGE_WORKERS pages at once, the longest chain first
                with PAGE_GATE.slot(_pages_left(resume, end, contiguous, stats.pages)):
                    body = pages.parse(raw)
                    raw = None
                    buckets, has_more, page_token = self._page(body)
                    if first_run:  # (only its first page is looked at)
                        first_run = False
                        served = self._api_time(max((_as_int(b.get("start_time")) for b in buckets
                                                     if isinstance(b, Mapping) and _is_int(_as_int(b.get("start_time")))),
                                                    default=None))
                        # the start past OpenAI's time, or a lead over CLOCK_WARNING: a clock a
                        # second ahead across a boundary alone (a Date has whole seconds) does not
                        # throw a backfill's first pages away, at any width (the lead is the
                        # clocks', not the starts': those differ by a whole bucket, an hour or a day)
                        # A start kept by a failed or held first run (earlier than this poll's
                        # own) was taken on the same clock, hours or days before: moved back by
                        # the lead, not to initial_interval before this later Date, which left
                        # it in OpenAI's future of then (a day ahead, 3h asked, the next run 5
                        # hours later: those 5 hours lost; days later: the whole day ahead)
                        # (not a start taken by OpenAI's time already: asked again from a Date,
                        # then kept or held, it was moved back by the lead once more at each run)
                        moved = None
                        if served is not None and cur.origin < _floor(now - self.config.initial_interval,
                                                                      self.width_s) and not self._taken_by_api(cur.origin):
                            moved = _floor(cur.origin - (int(now) - served), self.width_s)
                        if served is not None and served < now and (
                                resume > served or now - served > CLOCK_WARNING) and min(_floor(
                                served - self.config.initial_interval, self.width_s),
                                resume if moved is None else moved) < resume and (
                                cur is self._unrecorded or self._never_read(cur)):
                            restart = served  # nothing of this listing is used: asked again from OpenAI's time
                            self._moved = moved
                            stats.pages -= 1  # a request made (counted), not a page read
                            break
                        if served is not None:
                            # kept as it is by OpenAI's Date: were this run's writes held or its
                            # listing to fail, the start kept is by OpenAI's time too, not moved
                            # back by a lead the clock took since (a day ahead after it: read from
                            # a day before what initial_interval asked)
                            self._by_api = cur.origin
                    cut_short = has_more and not page_token
                    if cut_short:
                        # the rest of the listing cannot be asked for: this page's whole buckets
                        # are delivered, its last (perhaps continued on the next page) is not,
                        # and the cursor stays before it
                        msg = (f"{self.name}: a page says has_more but gives no next_page; the rest is "
                               f"asked for again next poll")
                        stats.errors.append(msg)
                        log.warning(msg)
                    more = bool(has_more and page_token) and not self.stop.is_set()
                    if more:
                        if page_token in tokens:
                            raise BadPage(f"next_page {page_token!r:.60} came back a second time: the listing "
                                          f"would loop; stopped after {stats.pages} pages")
                        tokens.add(page_token)
                    if more and page_token != guessed:  # not guessed (or wrongly): ask for it now
                        pages.request({**params, "page": page_token})
                    elif not more and guessed is not None:
                        pages.discard()
                    if carry is not None:
                        if buckets and _whole(buckets[0]) and buckets[0].get("start_time") == carry.get("start_time"):
                            merged = dict(buckets[0])
                            merged["results"] = _results(carry) + _results(buckets[0])
                            buckets[0] = merged
                        else:
                            buckets.insert(0, carry)
                        carry = None
                    if cut_short and buckets:
                        buckets.pop()  # after the merge: it may be the carried bucket's continuation
                    elif has_more and page_token and buckets and _whole(buckets[-1]):
                        carry = buckets.pop()  # anything else is reported as a bad bucket below
                    # the page's NDJSON, appended line by line: each encoded line is freed at
                    # once (a list of them kept ~25 MB more heap live across a large backfill)
                    lines = bytearray()
                    events = 0
                    updates: list[tuple] = []  # (bucket start, group JSON, revision, counters, dims)
                    for bucket in buckets:
                        start = None
                        try:
                            start, stop_ = self._check_bucket(bucket, resume, end)
                            if start is None:
                                continue
                            if start in done:
                                raise BadBucket("it appears twice in the listing (not across a page break)")
                            done.add(start)
                            previous = seen.get(start)
                            if previous is None and not frozen and start == contiguous and start < final_before:
                                # final and never emitted: its observations would be pruned when the
                                # cursor moves past it in this page's transaction (most of a backfill)
                                events += self._emit_bucket(bucket, start, stop_, created, lines)
                            else:
                                events += self._diff_bucket(bucket, start, stop_, previous or {}, created, lines,
                                                            updates, stats)
                        except BadBucket as exc:
                            # reported, not stored; the cursor stays before it, so a later poll retries
                            stats.bad_buckets += 1
                            where = f"bucket {iso_timestamp(start)}" if start is not None else "a bucket"
                            msg = f"{self.name}: {where} does not match the API reference, not stored: {exc}"
                            stats.errors.append(msg)
                            log.warning(msg)
                            frozen = True
                            continue
                        if not frozen:
                            if start == contiguous:
                                contiguous = stop_
                            elif start > contiguous:
                                frozen = True  # a gap: the API skipped buckets; ask again next poll
                                msg = (f"{self.name}: the API skipped the buckets from {iso_timestamp(contiguous)} "
                                       f"to {iso_timestamp(start)}; the cursor stays before them")
                                stats.errors.append(msg)
                                log.warning(msg)
                    body = buckets = None  # drop the parsed page before storing and sending
                    payload = bytes(lines)
                    lines = None
                # Store and send outside the gate: their fsyncs need no GIL, and another
                # stream's page can be parsed meanwhile.
                position = max(position, contiguous)
                # final buckets read again in this poll are settled; ones not reached yet keep
                # their observations for the next poll
                settled = max(settled, min(contiguous, final_before))
                prune_before = settled
                if updates and updates[0][0] < prune_before:
                    # a backfill's final buckets: their observations would be pruned in the same
                    # transaction, so they are not written at all (most of a backfill's rows)
                    updates = [u for u in updates if u[0] >= prune_before]
                self.delivery.commit_page(
                    self.name,
                    self.width,
                    payload=payload,
                    events=events,
                    observations=updates,
                    cursor=Cursor(cur.origin, position, settled, cur.retired_at),
                    prune_before=prune_before,
                )
                stats.events += events
                payload = updates = None
                memory.trim()  # hand the page's freed heap back (see agent_input/memory.py)
                if self.progress:
                    self.progress.update(self.name, contiguous - resume, end - resume, contiguous)
                if not more or self.stop.is_set():
                    break  # when stopped mid-way, the carried bucket is re-read next poll
        if restart is not None:
            try:
                if not self.stop.is_set():
                    return self._poll(restart, stats, again=False)
                # stopped before asking again: nothing of the listing was stored, and the next run
                # (hours later, perhaps) went on from its own later start; this one's is kept, by
                # OpenAI's time, as a failed first run's (`_keep_origin`)
                self.window(restart, by_api=True)
                self._keep_origin()
            finally:
                self._moved = None
        return stats

    def _page(self, body: Mapping) -> tuple[list, bool, str | None]:
        if not isinstance(body, Mapping):
            raise BadPage("response is not a JSON object")
        data = body.get("data")
        if not isinstance(data, list):
            raise BadPage("response has no `data` list of buckets")
        has_more = body.get("has_more")
        if not isinstance(has_more, bool):
            # read as "no more", the page's last bucket (perhaps continued on the next page) was
            # taken as whole and the cursor passed it: the rest of its results lost, unsaid
            raise BadPage(f"response has no boolean `has_more` ({has_more!r:.40}): the rest of the listing is unknown")
        token = body.get("next_page")
        return list(data), has_more, token if isinstance(token, str) else None

    def _check_bucket(self, bucket: Any, resume: int, end: int) -> tuple[int | None, int]:
        if not isinstance(bucket, Mapping):
            raise BadBucket("bucket is not an object")
        start, stop_ = _as_int(bucket.get("start_time")), _as_int(bucket.get("end_time"))
        if not _is_int(start) or not _is_int(stop_):
            # each as a report shows a value (a `start_time` of 5,000 characters was a report of 10 kB)
            raise BadBucket(f"start_time/end_time are not integers ({short(start)}, {short(stop_)})")
        if stop_ - start != self.width_s:
            raise BadBucket(f"bucket {start}..{stop_} is not {self.width} wide")
        if start % self.width_s:
            raise BadBucket(f"bucket {start}..{stop_} does not start on a {self.width} boundary")
        if start < resume or stop_ > end:
            return None, stop_  # outside what we asked for (e.g. the bucket in progress)
        if not isinstance(_results(bucket), list):
            raise BadBucket(f"bucket {iso_timestamp(start)} has no results list")
        return start, stop_

    def _emit_bucket(self, bucket: Mapping, start: int, stop_: int, created: str, lines: bytearray) -> int:
        """`_diff_bucket` for a bucket that is final and was never emitted: every group is a first
        observation and none is recorded (the cursor passes it in the same transaction)."""
        if not self._hashable_groups:
            return self._diff_bucket(bucket, start, stop_, {}, created, lines, [], PollStats())
        event = self._map
        out = [event(start, stop_, result, counters, 0, created, group)
               for result, counters, group in self._gather(bucket, by_json=False).values()]
        return self._encode(out, lines)

    def _gather(self, bucket: Mapping, *, by_json: bool) -> dict:
        """A bucket's results by group: key -> (result, counters, group), a group seen twice
        added up rather than one lost. The key is the group's JSON (how observations are stored)
        or, where nothing is looked up, the tuple itself: `extract` has checked every group value
        is a str, bool or None (`_hashable_groups`), so equal tuples are equal JSON.
        A group seen twice in two currencies (`spec.unmergeable`) is bad data: 10 usd and 5 eur
        were stored as 15 usd, unsaid (a result without an amount value has no currency to differ in).
        One in two quantity units (`spec.unit_fields`) is added up with no unit, as the API gives a
        result no single unit applies to: 3 tokens and 3 1000_tokens were stored as 6 tokens (a
        result without a quantity, or with 0, has no unit to differ in)."""
        extract, group_key, unmergeable = self._extract, self._group_key, self.spec.unmergeable
        unit_fields = self.spec.unit_fields
        current: dict = {}
        # (key, counter) of the groups with a result whose quantity is other than 0 (their sum may
        # be 0: 3 tokens and a credit of -3 tokens are in tokens still)
        quantified: set = set()
        for result in _results(bucket):
            counters = extract(result)
            group = group_key(result)
            key = group_json(group) if by_json else group
            same = current.get(key)
            if same is None:
                current[key] = (result, counters, group)
                for _, counter in unit_fields:
                    if counters.get(counter):
                        quantified.add((key, counter))
            else:
                for d in unmergeable:
                    if not self._valued(result, d):
                        # a result without an amount has none to add up in another currency, whatever
                        # currency its amount names (`amount: {"currency": "eur"}`, its value left out or null)
                        continue
                    mine, theirs = get_field(same[0], d), get_field(result, d)
                    if not self._valued(same[0], d):
                        # the group's results so far had no amount: the group's is this one's, in its
                        # currency or in none (then a later priced one is in another)
                        top = d.split(".", 1)[0]
                        current[key] = same = ({**same[0], top: result[top]}, same[1], same[2])
                        continue
                    if mine == theirs:
                        continue
                    raise BadBucket(f"one group has results with `{d}` {mine!r:.20} and {theirs!r:.20}, which "
                                    f"cannot be added up ({_describe(result)})")
                for d, counter in unit_fields:
                    quantity = counters.get(counter)
                    if quantity is None:
                        continue  # no quantity: no unit to differ in (3 tokens beside an amount alone had none)
                    if (key, counter) in quantified:  # a result so far had a quantity other than 0
                        if quantity and same[0].get(d) is not None and same[0].get(d) != result.get(d):
                            current[key] = same = ({**same[0], d: None}, same[1], same[2])
                        continue  # 0 has no unit to differ in (3 tokens beside 0 images)
                    if quantity:  # the group's first quantity other than 0: its unit is the group's
                        quantified.add((key, counter))
                        current[key] = same = ({**same[0], d: result.get(d)}, same[1], same[2])
                    elif counter not in same[1]:  # its first quantity, 0: its unit, until another
                        current[key] = same = ({**same[0], d: result.get(d)}, same[1], same[2])
                    elif same[0].get(d) != result.get(d):  # 0 alone, in two units: none applies, whatever the order
                        current[key] = same = ({**same[0], d: None}, same[1], same[2])
                for k, v in counters.items():
                    same[1][k] = same[1].get(k, 0) + v
        return current

    def _valued(self, result: Mapping, dimension: str) -> bool:
        """`result` has a counter beside `dimension` (costs' `amount.value` beside `amount.currency`).
        The reference leaves a cost result's amount out at will: one without any is no amount in
        another currency, and a group with it and a priced one was held as a bad bucket, the
        cursor with it, for as long as OpenAI answered so."""
        parent = dimension.rpartition(".")[0]
        return any(get_field(result, c) is not None for c in self.spec.counters if c.rpartition(".")[0] == parent)

    def _encode(self, out: list[tuple[str, dict]], lines: bytearray) -> int:
        """Add names to a bucket's documents and append their NDJSON lines; how many."""
        if self.names is not None and out:
            self.names.enrich_all([doc for _, doc in out])
        for _, doc in out:
            lines += ndjson_line(doc)
        return len(out)

    def _diff_bucket(
        self,
        bucket: Mapping,
        start: int,
        stop_: int,
        previous: Mapping[str, Observation],
        created: str,
        lines: bytearray,
        updates: list,
        stats: PollStats,
    ) -> int:
        """Compare a bucket with what was emitted for it; append first observations and
        corrections to `lines`; return how many."""
        spec = self.spec
        current = self._gather(bucket, by_json=True)
        out: list[tuple[str, dict]] = []
        event, append, add_update = self._map, out.append, updates.append
        extra = self._extra_dims
        for key, (result, counters, group) in current.items():
            old = previous.get(key)
            dims = {d: get_field(result, d) for d in extra} if extra else None
            if old is None:
                revision, values = 0, counters
            elif old.dims is not None and dims != old.dims and any(old.counters.values()):
                # a dimension outside the group key changed (costs' currency or quantity unit):
                # the panels sum by it, so a difference under the new one left the old one's
                # total standing (10 usd revised to 9 eur showed 10 usd and -1 eur). The group's
                # documents are zeroed under the old dimensions, and it is emitted whole under
                # the new ones.
                gone = _nested(dict(zip(spec.group_by, group)), dict(old.dims))
                gone["object"] = spec.object_type
                append(event(start, stop_, gone, _difference({k: 0 for k in old.counters}, old.counters),
                             old.revision + 1, created, group))
                revision, values = old.revision + 2, counters
                stats.corrections += 2
            else:
                values = _difference(counters, old.counters)
                if not values:
                    continue
                revision = old.revision + 1
                stats.corrections += 1
            append(event(start, stop_, result, values, revision, created, group))
            add_update((start, key, revision, counters, dims))
        for key, old in previous.items():
            if key in current or not any(old.counters.values()):
                continue
            # the group vanished from a re-read bucket: bring its sum back to zero
            result = _nested(dict(zip(spec.group_by, json.loads(key))), old.dims or {})
            result["object"] = spec.object_type
            zero = {k: 0 for k in old.counters}
            values = _difference(zero, old.counters)
            out.append(self._map(start, stop_, result, values, old.revision + 1, created))
            updates.append((start, key, old.revision + 1, zero, old.dims))
            stats.corrections += 1
        return self._encode(out, lines)


class BadPage(BadBucket):
    """A whole page does not match the API reference."""


def checked_counters(spec: UsageStreamSpec, result: Any) -> dict[str, float]:
    """The reference check of one result: its counters, or BadBucket saying what is wrong."""
    if not isinstance(result, Mapping):
        raise BadBucket(f"a result is not an object: {result!r:.80}")
    kind = result.get("object")
    if kind is not None and not isinstance(kind, str):
        # it is the document's openai.base.usage_object_type (a keyword): an object there made
        # Elasticsearch refuse the whole document
        raise BadBucket(f"`object` is {kind!r:.40}, not a string ({_describe(result)})")
    for parent in spec.parents:
        value = result.get(parent)
        if value is not None and not isinstance(value, Mapping):
            # its fields would read as absent: `amount: 0.06` was a cost stored without its amount
            raise BadBucket(f"`{parent}` is {value!r:.40}, not an object ({_describe(result)})")
    counters: dict[str, float] = {}
    for name in spec.counters:
        value = get_field(result, name)
        if value is None:
            if name in spec.required:
                raise BadBucket(f"result lacks required `{name}` ({_describe(result)})")
            continue
        if not _is_number(value):
            raise BadBucket(f"`{name}` is {value!r:.40}, not a number ({_describe(result)})")
        if not -COUNTER_LIMIT < value < COUNTER_LIMIT:
            raise BadBucket(f"`{name}` is {value!r:.40}, beyond ±2^53 (Kibana would show it rounded, and a "
                            f"sum could pass Elasticsearch's long) ({_describe(result)})")
        if spec.integer_counters and type(value) is not int:
            # a fraction in a `long` field is cut off by Elasticsearch: 1.5 tokens were stored as 1
            if not float(value).is_integer():
                raise BadBucket(f"`{name}` is {value!r:.40}, not an integer ({_describe(result)})")
            value = int(value)  # `5.0`, the same JSON number as 5
        counters[name] = value
    for name in spec.dimensions:
        value = get_field(result, name)
        if value is None:
            continue
        # the reference's type: a string where it wants a boolean (`batch: "yes"`) made Elasticsearch
        # refuse the whole document, and a boolean where it wants a string was stored as "true"
        want, kind = (bool, "a boolean") if name in BOOLEAN_DIMENSIONS else (str, "a string")
        if not isinstance(value, want):
            raise BadBucket(f"`{name}` is {value!r:.40}, not {kind} ({_describe(result)})")
    return counters


def _counter_extractor(spec: UsageStreamSpec) -> Callable[[Any], dict[str, float]]:
    """`result -> counters` for one spec, raising BadBucket on anything the API reference forbids.

    The hot loop of a backfill runs this once per result: plain dicts with flat int counters (int
    or float where the reference's are numbers: costs) and dimensions of the reference's type (or
    None) take the fast path; anything else (nested fields, int subclasses, whole floats, non-finite
    floats, wrong types) goes through the reference check, which raises the message.
    """
    checked = functools.partial(checked_counters, spec)
    if any("." in f for f in spec.counters + spec.dimensions):
        return checked
    # straight-line code per spec (no per-field loop): this runs once per result of a backfill
    src = ["def extract(result):", "    if type(result) is not dict: return checked(result)",
           "    get = result.get", "    t = type(get('object'))",
           "    if t is not str and t is not NoneType: return checked(result)", "    counters = {}"]
    number = "t is int" if spec.integer_counters else "(t is int or t is float)"
    for name in spec.counters:
        missing = "return checked(result)" if name in spec.required else "pass"
        src += [f"    v = get({name!r}); t = type(v)",
                f"    if {number} and {-COUNTER_LIMIT} < v < {COUNTER_LIMIT}: counters[{name!r}] = v",
                f"    elif v is None: {missing}",
                "    else: return checked(result)"]
    for name in spec.dimensions:
        want = "bool" if name in BOOLEAN_DIMENSIONS else "str"
        src += [f"    t = type(get({name!r}))",
                f"    if t is not {want} and t is not NoneType: return checked(result)"]
    src.append("    return counters")
    namespace = {"checked": checked, "NoneType": type(None)}
    exec(compile("\n".join(src), f"<extract {spec.name}>", "exec"), namespace)  # noqa: S102
    return namespace["extract"]


def _group_keyer(spec: UsageStreamSpec) -> Callable[[Mapping], tuple]:
    if any("." in f for f in spec.group_by):
        return spec.group_key
    group_by = spec.group_by
    return lambda result: tuple(map(result.get, group_by))


def _finished(cursor: Cursor) -> bool:
    """A width the stream left that is final up to where the next one starts."""
    return cursor.retired_at is not None and cursor.settled is not None and cursor.settled >= cursor.retired_at


def _whole(bucket: Any) -> bool:
    """A bucket that can be carried to the next page and merged: an object with a results list."""
    return isinstance(bucket, Mapping) and isinstance(_results(bucket), list)


def _nested(result: dict, dims: Mapping[str, Any]) -> dict:
    """`result` with each dotted dimension set where the API puts it (`amount.currency`)."""
    for dotted, value in dims.items():
        *parents, leaf = dotted.split(".")
        node = result
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return result


def _results(bucket: Mapping) -> Any:
    """`results` in the current API; `result` in the older spec the seed was written against."""
    if "results" in bucket:
        return bucket["results"]
    return bucket.get("result")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value: Any) -> Any:
    """A bucket time written as a whole float (`1763895540.0`, the same JSON number) as its int;
    anything else as it is, for the check to judge."""
    return int(value) if type(value) is float and value.is_integer() else value


# A counter's magnitude stays below 2^53: every integer up to it is exact as a double (Kibana,
# ES|QL's doubles), and sums of a few stay inside Elasticsearch's long. No real count is near it.
COUNTER_LIMIT = 2**53


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _describe(result: Mapping) -> str:
    """The result's first string fields, as a bad bucket's report names them: each escaped and cut
    (a model name with a line break or of 5,000 characters, as sent, made the one-line report two
    lines, or one of 5 kB)."""
    dims = [(k, v) for k, v in result.items() if isinstance(v, str)][:4]
    return ", ".join(f"{_as_text(k)}={_as_text(v)}" for k, v in dims) or "no dimensions"


def _as_text(value: Any) -> str:
    text = str(value)
    return clip(text if text.isprintable() else repr(text)[1:-1], 60)


def _difference(new: Mapping[str, float], old: Mapping[str, float]) -> dict[str, float]:
    """Counter-wise new - old, only where it differs (floats rounded to kill binary noise)."""
    out: dict[str, float] = {}
    # in a stable order (new's keys, then old's extras), so a correction's bytes do not depend on
    # the process's string hash seed
    for key in list(new) + [k for k in old if k not in new]:
        delta = new.get(key, 0) - old.get(key, 0)
        if isinstance(delta, float):
            delta = round(delta, 9)
        if delta:
            out[key] = delta
    return out


# -- scheduling -------------------------------------------------------------------------------
StatusCallback = Callable[[str, str, str], None]  # (stream, status, reason)

# How long a thread may hold the GIL while another waits for it, while the engine runs (Python's
# default is 5 ms). A page's commit, a body read or a fetch is a few short steps, each needing
# the GIL back after a system call; behind a thread mapping a page, each step waited out the
# whole interval: commits took 0.3-0.45 s instead of 0.05 s and held up the longest chain
# (docs/performance.md). The mapping thread pays a few more switches.
SWITCH_INTERVAL = 0.001
_switch_lock = threading.Lock()
_switch_users = 0  # engines running in this process
_switch_saved = 0.0  # the interval before the first of them started


@contextlib.contextmanager
def _short_gil_turns():
    """SWITCH_INTERVAL while at least one engine of this process runs; the interval it found
    once the last one ends (engines may overlap: tests, an embedding program)."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, SWITCH_INTERVAL))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


class Engine:
    """Runs every collector on its own thread and interval until stopped (or once)."""

    def __init__(
        self,
        collectors: Iterable[Collector],
        delivery: Delivery,
        *,
        stop: threading.Event | None = None,
        clock: Clock = time.time,
        on_status: StatusCallback | None = None,
        on_poll: Callable[[str, PollStats], None] | None = None,
        guard: OrganizationGuard | None = None,
    ):
        self.collectors = list(collectors)
        # the state directory's organization check (agent_input/org_guard.py): it refuses every
        # write for another organization's key; the first stream that meets the refusal stops the
        # engine, and `run` raises it (nothing was stored or sent)
        self.guard = guard
        self.refused: OrganizationMismatch | None = None
        self._deferred: int | None = None  # the outbox's last batch at start, re-sent once the check passes
        self._deferred_lock = threading.Lock()
        self._replay_error: Exception | None = None  # the held-back batches' re-send failed: `run` raises it
        self.delivery = delivery
        self.stop = stop or threading.Event()
        self.clock = clock
        self.on_status = on_status or (lambda s, st, r: None)
        self.on_poll = on_poll or (lambda s, p: None)
        self.failed: dict[str, str] = {}
        self.totals: dict[str, PollStats] = {c.name: PollStats() for c in self.collectors}

    def run(self, once: bool = False) -> int:
        """Returns the process exit code: 0, or 1 when a stream failed. Raises OrganizationMismatch
        when the key reaches another organization than the state directory's."""
        if self.guard is not None and self.delivery.store.pending_count():
            # the batches left in the outbox are not sent to another organization's output
            # either; only a start with such batches waits for the check here
            try:
                self.guard.wait()
            except OrganizationUnverified as exc:
                # cannot tell yet: they are sent once a stream's write has passed the check, those
                # up to the last one now only (the streams' own batches are sent as they commit)
                self.delivery.store.drop_orphans()  # now, before a stream thread spools a batch
                self._deferred = self.delivery.store.last_batch()
                log.warning("%d batch(es) left in the outbox wait for the organization check: %s",
                            self.delivery.store.pending_count(), exc)
            except StoppedError:  # stopped while the check lists: nothing was sent, the outbox waits
                return 1 if self.failed else 0
        if self._deferred is None:
            self.delivery.replay_pending()
        log.info("collecting %s", ", ".join(c.name for c in self.collectors) or "nothing (no stream enabled)")
        threads = [
            threading.Thread(target=self._loop, args=(c, once), name=f"stream-{c.name}", daemon=True)
            for c in self.collectors
        ]
        with _short_gil_turns():
            for t in threads:
                t.start()
            told = False
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
                    if self.stop.is_set() and not told:
                        told = True
                        log.info("stopping: the pages in flight are finished and stored first")
        if self.refused is not None:
            raise self.refused
        if self._replay_error is not None:  # as a start's re-send raises it (the caller says it)
            raise self._replay_error
        return 1 if self.failed else 0

    def _replay_deferred(self) -> bool:
        """The outbox's batches a start held back while the organization check could not be done,
        once a write has passed it (they are this organization's then): sent by the first stream
        thread that gets here, those up to the start's last batch only, since the streams' own
        later batches are in flight already. Called after a poll that went through (its documents
        are counted first): a re-send that fails (an outbox file gone, the output refusing) is not
        that poll's failure, whose cursor moved; it stops the engine and `run` raises it, as the
        start's re-send does. False then."""
        if self._deferred is None or self.guard is None or not self.guard.passed:
            return self._replay_error is None
        with self._deferred_lock:
            if self._deferred is not None and self._replay_error is None:
                try:
                    self.delivery.replay_pending(up_to=self._deferred, drop_orphans=False)
                except Exception as exc:  # noqa: BLE001 - raised by `run`, once every stream stopped
                    self._replay_error = exc
                    self.stop.set()
                    return False
                self._deferred = None
        return self._replay_error is None

    def _loop(self, collector: Collector, once: bool) -> None:
        self.on_status(collector.name, "starting", "")
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                stats = collector.poll(self.clock())
            except StreamStopped as exc:
                self._count_delivered(collector.name, exc)
                self._fail(collector.name, str(exc))
                return
            except OrganizationMismatch as exc:
                # another organization's key: every stream stops, the caller says it once
                if self.refused is None:
                    self.refused = exc
                self.failed[collector.name] = str(exc)
                self.on_status(collector.name, "failed", str(exc))
                self.stop.set()
                return
            except OutputError as exc:
                self._count_delivered(collector.name, exc)
                self._fail(collector.name, str(exc))
                self.stop.set()
                return
            except Exception as exc:  # noqa: BLE001 - one stream's failure must not stop others
                self._count_delivered(collector.name, exc)
                if self.stop.is_set():  # the cursor is where it was; an error of its own is still said
                    if not isinstance(exc, StoppedError):  # (the stop's own StoppedError is not one)
                        log.error("%s: poll failed while stopping, cursor kept: %s", collector.name,
                                  str(exc) or exc.__class__.__name__)
                    return
                if isinstance(exc, (AuthenticationError, PermissionDeniedError)):
                    self._fail(collector.name, str(exc))
                    return
                reason = str(exc) or exc.__class__.__name__
                log.error("%s: poll failed, cursor kept, will retry: %s", collector.name, reason)
                self.totals[collector.name].add(PollStats(errors=[reason]))
                self.on_status(collector.name, "degraded", reason)
                if once:
                    self.failed[collector.name] = reason
                    return
            else:
                self._add(collector.name, stats)
                self.on_poll(collector.name, stats)
                if stats.events or stats.errors:  # a journal shows the collector at work, not only its stop
                    log.info("%s: %d documents (%d corrections) from %d requests%s", collector.name, stats.events,
                             stats.corrections, stats.requests,
                             f"; {len(stats.errors)} problem(s) reported" if stats.errors else "")
                if not self._replay_deferred():
                    return
                if self.stop.is_set():
                    return  # cut short by the stop: not a clean poll to call healthy
                if stats.errors:
                    self.on_status(collector.name, "degraded", stats.errors[-1])
                else:
                    self.on_status(collector.name, "healthy", "")
                if once:
                    if stats.errors:
                        self.failed.setdefault(collector.name, stats.errors[-1])
                    return
            self.stop.wait(max(0.0, collector.interval - (time.monotonic() - started)))

    def _fail(self, name: str, reason: str) -> None:
        log.error("%s: stopped: %s", name, reason)
        self.failed[name] = reason
        self.on_status(name, "failed", reason)

    def _count_delivered(self, name: str, exc: BaseException) -> None:
        """What a failed poll delivered before it raised (`delivered_before`) is in the totals:
        the failure itself is said apart, so its notes (errors) are not added twice."""
        done = getattr(exc, "delivered", None)
        if isinstance(done, PollStats) and (done.requests or done.events):
            self._add(name, PollStats(done.requests, done.pages, done.events, done.corrections, done.bad_buckets))

    def _add(self, name: str, stats: PollStats) -> None:
        self.totals[name].add(stats)
