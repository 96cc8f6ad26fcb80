"""Property-based tests (hypothesis) of the cursor and revision logic against an in-memory API:
for any sequence of polls, late revisions, API errors part-way through a poll, output failures
(before or after the bytes went out) and restarts, the delivered documents, deduplicated by id,
sum to the API's latest counts for every bucket and group; no id ever carries two contents.
Pauses between successful polls may be longer than the revision window (the collector stopped,
a rejected key, a long interval): the API's promise is only that it revises a bucket within
SETTLE of its end."""
from __future__ import annotations

import json
import tempfile
from types import SimpleNamespace

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent_input.engine import Delivery, UsageCollector
from agent_input.outputs import OutputError
from agent_input.state import StateStore
from agent_input.streams import STREAMS_BY_NAME

from reliability_helpers import Out, poll_steps

W = 60
T0 = 1763892000
WINDOW = 30 * 60  # revision window
SETTLE = 10 * 60  # the fake API revises a bucket for at most 10 minutes after it ends
GROUPS = ("a", "b", "c")
WIDTHS = {"1m": 60, "1h": 3600}


class Api:
    """Completions buckets up to `now` (the bucket in progress included, as the real API does)."""

    def __init__(self, page_buckets: int):
        self.now = T0
        self.data: dict[int, dict[str, int]] = {}  # bucket start -> model -> input_tokens
        self.page_buckets = page_buckets
        self.fail_at: int | None = None  # the n-th request of the next poll raises
        self.calls = 0

    def revise(self, revisions, oldest: int) -> None:
        """Late revisions `(minutes ago, group, value)`, only of minutes still settling (and not
        before `oldest`, where the history starts)."""
        for age, group, value in revisions:
            b = (self.now - age * W) // W * W - W
            if b >= self.now - SETTLE - W and b >= oldest:
                self.data.setdefault(b, {})[group] = value

    def get_json(self, path, params):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            self.fail_at = None
            raise ConnectionError("injected API failure")
        width = WIDTHS[params["bucket_width"]]
        start = int(params.get("page") or params["start_time"])
        end = min(params["end_time"], self.now // width * width + width)
        buckets, t = [], start
        while t < end and len(buckets) < self.page_buckets:
            groups: dict[str, int] = {}
            for minute in range(t, t + width, W):  # a wider bucket is the sum of its minutes
                for m, v in self.data.get(minute, {}).items():
                    groups[m] = groups.get(m, 0) + v
            results = [{"object": "organization.usage.completions.result", "input_tokens": v, "output_tokens": 0,
                        "num_model_requests": 1, "project_id": "p", "user_id": None, "api_key_id": None,
                        "model": m, "batch": False} for m, v in sorted(groups.items()) if v]
            buckets.append({"object": "bucket", "start_time": t, "end_time": t + width, "results": results})
            t += width
        more = t < end
        return {"object": "page", "data": buckets, "has_more": more, "next_page": str(t) if more else None}


step = st.tuples(
    st.one_of(st.integers(0, 12), st.integers(25, 120)),  # minutes to advance: a poll interval, or a pause
    st.lists(st.tuples(st.integers(0, 12), st.sampled_from(GROUPS), st.integers(0, 50)), max_size=4),  # revisions
    st.sampled_from(["poll", "poll", "api_error", "output_before", "output_after", "restart"]),
    st.integers(1, 4),  # which request of the poll fails
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=14), page_buckets=st.integers(1, 8),
       initial=st.integers(1, 40))
def test_delivered_sums_equal_the_truth(steps, page_buckets, initial):
    api = Api(page_buckets)
    for b in range(T0 - initial * W - W, T0, W):  # some history before the first poll
        api.data[b] = {g: (b // W * 7 + i) % 13 for i, g in enumerate(GROUPS)}
    out = Out()
    cfg = SimpleNamespace(name="completions", bucket_width="1m", interval=300, initial_interval=initial * W,
                          finalization_grace=0, effective_revision_window=WINDOW)
    with tempfile.TemporaryDirectory() as tmp:
        def start():
            store = StateStore(tmp)
            delivery = Delivery(store, out)
            delivery.replay_pending()  # what Engine.run does first after a (re)start
            return store, UsageCollector(STREAMS_BY_NAME["completions"], cfg, api, delivery, clock=lambda: api.now)

        store, _ = poll_steps(api, out, start, steps, W, lambda revisions: api.revise(revisions, T0 - initial * W - W))
        origin = store.cursor("completions", "1m").origin
        end = api.now // W * W
        store.close()

    got: dict[tuple[int, str], int] = {}
    for b, doc in _delivered(out):
        key = (b, doc["openai"]["base"]["model"])
        got[key] = got.get(key, 0) + doc["openai"]["completions"].get("input_tokens", 0)
    got = {k: v for k, v in got.items() if v}
    want = {(b, g): v for b, groups in api.data.items() if origin <= b < end for g, v in groups.items() if v}
    assert got == want


def _delivered(out: "Out") -> list[tuple[int, dict]]:
    """(bucket start, document) of every id delivered, as Elasticsearch's `create` keeps them (the
    first wins), asserting that no id was ever delivered with other content."""
    from datetime import datetime

    by_id = out.by_id()
    return [(int(datetime.fromisoformat(d["openai"]["base"]["start_time"].replace("Z", "+00:00")).timestamp()), d)
            for d in by_id.values()]


# late revisions (minutes ago, group, value)
_revisions = st.lists(st.tuples(st.integers(0, 12), st.sampled_from(GROUPS), st.integers(0, 50)), max_size=4)
width_step = st.tuples(
    # minutes to advance: a poll interval, or a pause; or to a boundary that matters to a width
    # change: the next hour plus some minutes (past the revision-window edge of the hour a change to
    # 1h starts at, or before the first 1h bucket after it ends), or that window edge itself
    st.one_of(st.integers(0, 12), st.integers(25, 150), st.tuples(st.just("hour"), st.integers(0, 80)),
              st.tuples(st.just("edge"), st.integers(0, 2))),
    _revisions,
    # before the poll: nothing, a restart, or a restart with another bucket_width (the config's)
    st.sampled_from([None, None, "restart", "1m", "1h", "1m", "1h"]),
    # the n-th request of the poll fails (or none does): a change or a restart whose first poll
    # fails leaves cursors that read nothing yet, which the next start must not take for a first run
    # (the first request most often: the poll then reads nothing at all)
    st.one_of(st.none(), st.just(1), st.integers(1, 4)),
)

# A round trip, the timing of 699ae9f's bug: a change to the other width ("swap"); a poll at the
# revision-window edge of the hour it starts at (or some minutes into the next hour), where the
# width left is final up to there and the new one, whose first bucket has not ended, has read
# nothing; then, a few minutes on, back to the width left, that poll most often failing at once.
width_round_trip = st.tuples(
    st.tuples(st.one_of(st.integers(0, 12), st.integers(25, 150)),
              _revisions, st.just("swap"), st.one_of(st.none(), st.integers(1, 4))),
    st.tuples(st.one_of(st.tuples(st.just("edge"), st.integers(0, 2)), st.tuples(st.just("hour"), st.integers(0, 80))),
              _revisions, st.sampled_from([None, None, "restart"]), st.none()),
    st.tuples(st.integers(0, 12), _revisions, st.just("swap"), st.one_of(st.just(1), st.just(1), st.integers(1, 4))),
)
# a round trip counts as three steps; the whole is cut to at most 12, as before round trips
width_steps = st.lists(st.one_of(width_step.map(lambda s: [s]), width_round_trip.map(list)), min_size=1,
                       max_size=8).map(lambda parts: [s for part in parts for s in part][:12])


def _advance(now: int, minutes, window: int) -> int:
    """The clock after a width_step's advance from `now`."""
    if isinstance(minutes, int):
        return now + minutes * W
    kind, n = minutes
    hour = now // 3600 * 3600 + 3600  # the next hour boundary
    return hour + n * W if kind == "hour" else hour + window + n * W


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=width_steps, page_buckets=st.integers(1, 8),
       initial_hours=st.integers(1, 3), first=st.sampled_from(sorted(WIDTHS)),
       window=st.sampled_from([SETTLE + 5 * W, WINDOW]), grace=st.sampled_from([0, 0, 15 * 60]))
# (a short revision_window or a grace: a width left is final sooner, or the new one reads later,
# so more often the one is final while the other has read nothing; the window stays longer than
# SETTLE, a revision exactly SETTLE after a bucket's end would be missed)
# 699ae9f: 1m read, 1h from the next hour, 1m final up to there while 1h has read nothing (35
# minutes past it), 1m again with a failed poll: the restart after took the stream for a first run
@example(steps=[(5, [], None, None), (5, [], "1h", None), (85, [], None, None), (0, [], "1m", 1)],
         page_buckets=8, initial_hours=2, first="1m", window=WINDOW, grace=0)
def test_changing_the_bucket_width_keeps_delivered_sums_equal_to_the_truth(steps, page_buckets, initial_hours, first,
                                                                           window, grace):
    """The same, with the stream's bucket_width changed back and forth between polls (a restart
    with another config), a change's or a restart's first poll failing too: every minute is
    delivered once, at one width or the other, and its latest count; no id is sent twice (there is
    no output fault here to re-send one), none carries two contents, and no minute is in two first
    observations of a group (one per width)."""
    from agent_input.config import StreamConfig

    api = Api(page_buckets)
    history = T0 - initial_hours * 3600 - 3600
    times = [T0]
    for s in steps:
        times.append(_advance(times[-1], s[0], window))
    # usage in every minute, before the first poll and after it (a minute read twice is seen)
    for b in range(history, times[-1] + 4 * (WINDOW + SETTLE), W):
        api.data[b] = {g: (b // W * 7 + i) % 13 for i, g in enumerate(GROUPS)}
    out = Out()
    width = first
    origin = None  # where the collection began: the earliest origin any cursor ever had
    with tempfile.TemporaryDirectory() as tmp:
        def start():
            store = StateStore(tmp)
            delivery = Delivery(store, out)
            delivery.replay_pending()
            cfg = StreamConfig(name="completions", enabled=True, interval=300, initial_interval=initial_hours * 3600,
                               bucket_width=width, finalization_grace=grace, revision_window=window, batch_size=None,
                               include_archived=False)
            return store, UsageCollector(STREAMS_BY_NAME["completions"], cfg, api, delivery, clock=lambda: api.now)

        def began(origin):
            return min([c.origin for c in store.cursors("completions").values()]
                       + ([origin] if origin is not None else []), default=None)

        store, col = start()
        for now, (_, revisions, event, fail_at) in zip(times[1:], steps):
            api.now = now
            api.revise(revisions, history)
            api.calls = 0
            if event is not None:
                width = {"1m": "1h", "1h": "1m"}[width] if event == "swap" else event if event in WIDTHS else width
                store.close()
                store, col = start()
            api.fail_at = fail_at
            try:
                col.poll(api.now)
            except ConnectionError:
                pass
            api.fail_at = None
            origin = began(origin)
        # no more revisions: polls until every width left is final and the last hours are in
        for _ in range(4):
            api.now += WINDOW + SETTLE
            store.close()
            store, col = start()
            col.poll(api.now)
            origin = began(origin)
        end = api.now // 3600 * 3600 - 3600
        store.close()

    sent = [json.loads(line)["_id"] for payload in out.delivered for line in payload.splitlines()]
    assert len(sent) == len(set(sent)), "an id sent twice"
    got: dict[str, int] = {}
    firsts: dict[tuple[int, str], str] = {}  # (minute, group) -> the first observation's id covering it
    for b, doc in _delivered(out):
        base = doc["openai"]["base"]
        model = base["model"]
        if base.get("revision", 0) == 0:
            for minute in range(b, b + WIDTHS[base["bucket_width"]], W):
                prev = firsts.setdefault((minute, model), doc["_id"])
                assert prev == doc["_id"], f"minute {minute} of {model} in two first observations"
        if origin <= b < end:
            got[model] = got.get(model, 0) + doc["openai"]["completions"].get("input_tokens", 0)
    want: dict[str, int] = {}
    for b, groups in api.data.items():
        if origin <= b < end:
            for g, v in groups.items():
                want[g] = want.get(g, 0) + v
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in want.items() if v}


# -- the audit log: two scopes, late events, bursts, refusals, crashes ------------------------------
HOUR = 3600
LATE = 299  # the most an audit event is recorded after its effective_at (the collector re-reads 300 s)
OVERLAP_EDGE = 330  # events this close to a poll's now fall in the next poll's overlap
AUDIT_SPAN = 40 * HOUR  # how far the steps take the clock; the collector's initial_interval covers it


class Crash(Exception):
    """The process dies here: the collector object is dropped, a new one starts on the state dir."""


class AuditApi:
    """The audit log listing as tests/test_audit.py's _AuditListing, with both scopes: newest first,
    `after` paging, effective_at[gte]/[lte] inclusive; an event is listed only once recorded
    (`effective_at` + its delay, at most LATE). Faults: a 5xx-like ApiError or a Crash on the n-th
    request of a poll, a 403 on a scope while it is refused."""

    def __init__(self):
        self.now = T0
        self.events: list[dict] = []  # with `_tenant`, `_seen_at` and `_bad`, which the listing leaves out
        self.fail_at: int | None = None
        self.crash_at: int | None = None
        self.refuse: set[str] = set()  # "organization", "tenant"
        self.calls = 0

    def get_json(self, path, params):
        from agent_input.http_client import PermissionDeniedError, RetriesExhaustedError

        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            self.crash_at = None
            raise Crash("injected: the process died waiting for the API")
        if self.fail_at is not None and self.calls >= self.fail_at:
            self.fail_at = None
            raise RetriesExhaustedError(500, "injected: server error", path=path)
        tenant = params.get("tenant_only") == "true"
        if ("tenant" if tenant else "organization") in self.refuse:
            raise PermissionDeniedError(403, "injected: refused", path=path)
        gte, lte = params["effective_at[gte]"], params["effective_at[lte]"]
        match = sorted((e for e in self.events if e["_tenant"] == tenant and e["_seen_at"] <= self.now
                        and gte <= e["effective_at"] <= lte), key=lambda e: (-e["effective_at"], e["id"]))
        if "after" in params:
            match = match[[e["id"] for e in match].index(params["after"]) + 1:]
        page = [{k: v for k, v in e.items() if not k.startswith("_")} for e in match[:params["limit"]]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(match) > len(page)}

    def add(self, after: int, spec) -> None:
        """Events of one draw between `after` (exclusive) and `self.now`: one, a burst in one
        second, or a burst spread over a minute."""
        position, kind, count, tenant, delay, bad = spec
        if self.now <= after:
            return
        # a position >= 0 is anywhere in the step; one < 0 is that many seconds before now + 1
        t0 = after + 1 + position % (self.now - after) if position >= 0 else max(after + 1, self.now + 1 + position)
        for i in range(1 if kind == "one" else count):
            t = min(self.now, t0 + (i * 37 % 60 if kind == "minute" else 0))
            n = len(self.events)
            ev = {"id": f"audit_log-{'t' if tenant else 'o'}{n}", "object": "organization.audit_log",
                  "type": "a..b" if bad else "login.succeeded", "effective_at": t,
                  "_tenant": tenant, "_seen_at": t + (delay * (i + 1)) % (LATE + 1), "_bad": bad}
            self.events.append(ev)


class AuditOut:
    """Records (id, effective_at, the clock when sent) of every line sent, duplicates included. A
    batch sent but never acknowledged ("after") is sent again by the next process byte for byte:
    that replay is the outbox's at-least-once, counted once here; anything else twice is a bug."""

    def __init__(self, api: AuditApi):
        self.api = api
        self.lines: list[tuple[str, int, int]] = []
        self.unacked: list[bytes] = []
        self.fail: str | None = None  # "before": nothing written; "after": written, never acked
        self.fail_at = 1  # the n-th batch of the poll fails
        self.sends = 0

    def send(self, stream, payload, events, on_ack):
        self.sends += 1
        mode = self.fail if self.sends >= self.fail_at else None
        if mode:
            self.fail = None
        if mode == "before":
            raise OutputError("injected: output down")
        if payload in self.unacked:
            self.unacked.remove(payload)  # the replay of a batch written before the crash
        else:
            for line in payload.splitlines():
                doc = json.loads(line)
                from datetime import datetime

                t = int(datetime.fromisoformat(doc["@timestamp"].replace("Z", "+00:00")).timestamp())
                self.lines.append((doc["_id"], t, self.api.now))
        if mode == "after":
            self.unacked.append(payload)
            raise OutputError("injected: crash before the ack")
        on_ack()

    def close(self):
        pass


audit_event_draw = st.tuples(
    st.one_of(st.integers(0, 10**6),  # where: anywhere between the last step and now,
              st.integers(-OVERLAP_EDGE, -1), st.sampled_from([-300, -299, -298, -1])),  # or close to now
    st.sampled_from(["one", "one", "second", "minute"]),  # one event, a burst in a second, or in a minute
    st.integers(2, 30),  # a burst's size
    st.booleans(),  # tenant-scoped
    st.one_of(st.integers(0, LATE), st.just(LATE)),  # how late it is recorded
    st.integers(0, 9).map(lambda n: n == 0),  # one in ten does not match the API reference
)
audit_step = st.tuples(
    st.one_of(st.integers(0, 120), st.integers(120, HOUR), st.integers(HOUR, 8 * HOUR)),  # seconds to advance
    st.lists(audit_event_draw, max_size=3),
    st.sampled_from(["poll", "poll", "poll", "api_error", "crash_api", "crash_before", "crash_after",
                     "refuse_tenant", "allow_tenant", "refuse_org", "allow_org", "restart"]),
    st.integers(1, 12),  # which request (or batch) of the poll fails
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(audit_step, min_size=1, max_size=14), history=st.lists(audit_event_draw, max_size=4),
       batch_size=st.integers(1, 5), max_slice=st.integers(8, 16))
# Found by this property only after ~1,000 random examples, so pinned: the poll's first slice (the
# overlap) holds more than max_slice events and is read in halves; an API error after its older
# half must not leave the mark at that half's end (a5b242e), or the next poll sends
# audit_log-o1 a second time.
@example(steps=[(0, [], "poll", 1),
                (300, [(0, "one", 2, False, 299, True), (0, "one", 2, False, 299, False),
                       (0, "one", 2, False, 0, True)], "poll", 1),
                (1, [(0, "second", 8, False, 299, True), (0, "one", 2, False, 299, True)], "poll", 1),
                (299, [], "api_error", 5)],
         history=[], batch_size=3, max_slice=8)
def test_audit_delivers_every_event_exactly_once(steps, history, batch_size, max_slice):
    """For any sequence of polls, late events, bursts, API errors, refusals of either scope and
    crashes (from the API or the output, at any request or batch), after a settle every good event
    of both scopes was sent exactly once (duplicates counted, not folded), no bad one at all, and
    none before the clock reached its effective_at."""
    from unittest import mock

    from agent_input import audit
    from agent_input.audit import AuditCollector
    from agent_input.config import config_from_dict

    api = AuditApi()
    for spec in history:
        api.add(T0 - HOUR, spec)
    out = AuditOut(api)
    cfg = config_from_dict({"url": "http://127.0.0.1:1", "api_key": "sk-admin-test-0123456789abcdef",
                            "data_streams": {"audit": {"batch_size": batch_size, "initial_interval": "3d"}}},
                           env={})
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(audit, "MAX_SLICE_EVENTS", max_slice):
        def start():
            store = StateStore(tmp)
            delivery = Delivery(store, out)
            delivery.replay_pending()  # what Engine.run does first after a (re)start
            return store, AuditCollector(cfg, cfg.stream("audit"), api, delivery, clock=lambda: api.now)

        store, col = start()
        for seconds, events, action, n in steps:
            before, api.now = api.now, min(api.now + seconds, T0 + AUDIT_SPAN)
            for spec in events:
                api.add(before, spec)
            api.calls, out.sends = 0, 0
            if action == "restart":
                store.close()
                store, col = start()
            elif action.startswith(("refuse_", "allow_")):
                scope = "tenant" if action.endswith("tenant") else "organization"
                (api.refuse.add if action.startswith("refuse") else api.refuse.discard)(scope)
            elif action == "api_error":
                api.fail_at = n
            elif action == "crash_api":
                api.crash_at = n
            elif action.startswith("crash_"):
                out.fail, out.fail_at = action.split("_")[1], n
            try:
                col.poll(api.now)
            except (Crash, OutputError):
                store.close()
                store, col = start()  # the process died: the next one re-sends the outbox
            except audit.ApiError:
                pass  # the organization scope failed: reported by the engine, the next poll reads again
            api.fail_at, api.crash_at, out.fail = None, None, None  # a fault belongs to its poll
        # settle: every event recorded, refusals lifted and their back-off over, one clean poll
        api.refuse.clear()
        api.now += audit.FORBIDDEN_RETRY + LATE + 1
        col.poll(api.now)
        store.close()

    sent = [eid for eid, _, _ in out.lines]
    twice = sorted({eid for eid in sent if sent.count(eid) > 1})
    assert not twice, f"sent more than once: {twice}"
    want = {e["id"] for e in api.events if not e["_bad"]}
    assert set(sent) == want, (f"never sent: {sorted(want - set(sent))}, "
                               f"sent but bad: {sorted(set(sent) - want)}")
    early = [(eid, t, now) for eid, t, now in out.lines if t > now]
    assert not early, f"sent before its effective_at: {early}"
    assert not out.unacked
