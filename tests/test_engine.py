"""The usage engine against an in-memory API: windows, grace, revisions, errors, bad data."""
import json
import re
import logging
from datetime import datetime, timezone
from types import SimpleNamespace

import orjson
import pytest

from agent_input.ecs import iso_timestamp
from agent_input.engine import BadPage, Delivery, UsageCollector
from agent_input.outputs import NdjsonOutput
from agent_input.streams import STREAMS_BY_NAME

from conftest import dedupe

import io
import os
import time


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp())


class FakeApi:
    """Serves completions buckets from `self.data[bucket_start] -> list of results`."""

    def __init__(self, width=60, page_buckets=1440):
        self.data: dict[int, list[dict]] = {}
        self.calls: list[dict] = []
        self.width = width
        self.page_buckets = page_buckets
        self.fail_next: Exception | None = None
        self.fail_on: tuple[int, Exception] | None = None  # (n, error): the n-th request raises it
        self.override: dict | None = None

    def get_json(self, path, params):
        self.calls.append(dict(params))
        if self.fail_on is not None and len(self.calls) == self.fail_on[0]:
            raise self.fail_on[1]
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if self.override is not None:
            return self.override
        start = int(params.get("page") or params["start_time"])
        end = params["end_time"]
        buckets = []
        t = start
        while t < end and len(buckets) < self.page_buckets:
            buckets.append({"object": "bucket", "start_time": t, "end_time": t + self.width,
                            "results": [dict(r) for r in self.data.get(t, [])]})
            t += self.width
        more = t < end
        return {"object": "page", "data": buckets, "has_more": more,
                "next_page": str(t) if more else None}


def result(tokens, model="gpt-4o-mini", requests=1, **kw):
    r = {"object": "organization.usage.completions.result", "input_tokens": tokens,
         "output_tokens": 0, "num_model_requests": requests, "project_id": "p1",
         "user_id": None, "api_key_id": None, "model": model, "batch": False}
    r.update(kw)
    return r


def stream_config(**kw):
    cfg = dict(name="completions", bucket_width="1m", interval=300, initial_interval=86400,
               finalization_grace=0, effective_revision_window=3 * 3600)
    cfg.update(kw)
    return SimpleNamespace(**cfg)


@pytest.fixture
def harness(tmp_path):
    from agent_input.state import StateStore

    def make(api=None, **cfg):
        api = api or FakeApi()
        store = StateStore(tmp_path / "state")
        out = io.BytesIO()
        delivery = Delivery(store, NdjsonOutput(out))
        col = UsageCollector(STREAMS_BY_NAME["completions"], stream_config(**cfg), api, delivery,
                             clock=lambda: 0)
        return SimpleNamespace(api=api, store=store, out=out, collector=col)

    return make


def docs(out: io.BytesIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_seed_grace_example(harness):
    """Start 10:00, 24h initial, 15m grace, 5m interval: 10:00 yesterday to 9:45, then 9:45 to 9:50."""
    h = harness(finalization_grace=900, effective_revision_window=0)
    h.collector.poll(ts("2026-11-23T10:00:00"))
    first = h.api.calls[0]
    assert first["start_time"] == ts("2026-11-22T10:00:00")
    assert first["end_time"] == ts("2026-11-23T09:45:00")
    assert first["limit"] == 1440 and first["bucket_width"] == "1m"
    assert first["group_by"] == ["project_id", "user_id", "api_key_id", "model", "batch", "service_tier"]
    h.collector.poll(ts("2026-11-23T10:05:00"))
    second = h.api.calls[1]
    assert second["start_time"] == ts("2026-11-23T09:45:00")
    assert second["end_time"] == ts("2026-11-23T09:50:00")


def test_current_bucket_never_emitted(harness):
    h = harness()
    now = ts("2026-11-23T10:00:30")
    h.api.data[ts("2026-11-23T09:59:00")] = [result(5)]
    h.api.data[ts("2026-11-23T10:00:00")] = [result(7)]  # in progress
    h.collector.poll(now)
    assert h.api.calls[0]["end_time"] == ts("2026-11-23T10:00:00")
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [5]


def test_a_bucket_past_the_asked_end_time_is_not_emitted(harness):
    """An API that answers past `end_time` (the bucket in progress, or one still inside the
    finalization grace): that bucket is not emitted and the cursor stops at the end asked for."""

    class PastEnd(FakeApi):
        asked: list[int] = []

        def get_json(self, path, params):
            self.asked.append(params["end_time"])
            return super().get_json(path, {**params, "end_time": params["end_time"] + 2 * self.width})

    h = harness(PastEnd(), finalization_grace=60)
    now = ts("2026-11-23T10:00:30")
    h.api.data[ts("2026-11-23T09:58:00")] = [result(5)]
    h.api.data[ts("2026-11-23T09:59:00")] = [result(6)]  # within the grace
    h.api.data[ts("2026-11-23T10:00:00")] = [result(7)]  # in progress
    h.collector.poll(now)
    assert set(h.api.asked) == {ts("2026-11-23T09:59:00")}
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [5]
    assert h.store.cursor("completions", "1m").position == ts("2026-11-23T09:59:00")


def test_revisions_emit_differences_and_sum_to_latest(harness):
    h = harness()
    b = ts("2026-11-23T09:58:00")
    h.api.data[b] = [result(100, requests=2)]
    h.collector.poll(ts("2026-11-23T10:00:00"))
    h.api.data[b] = [result(130, requests=3)]
    h.collector.poll(ts("2026-11-23T10:05:00"))
    h.collector.poll(ts("2026-11-23T10:10:00"))  # unchanged: nothing new
    h.api.data[b] = [result(150, requests=3)]
    h.collector.poll(ts("2026-11-23T10:15:00"))
    got = docs(h.out)
    assert [d["openai"]["base"]["revision"] for d in got] == [0, 1, 2]
    assert sum(d["openai"]["completions"]["input_tokens"] for d in got) == 150
    assert sum(d["openai"]["base"].get("num_model_requests", 0) for d in got) == 3
    assert sum(d["openai"]["base"]["usage_tokens"] for d in got) == 150
    assert got[1]["openai"]["completions"] == {"input_tokens": 30, "batch": False}
    assert len({d["_id"] for d in got}) == 3


def test_vanished_group_is_corrected_to_zero(harness):
    h = harness()
    b = ts("2026-11-23T09:58:00")
    h.api.data[b] = [result(100, model="a"), result(50, model="b")]
    h.collector.poll(ts("2026-11-23T10:00:00"))
    h.api.data[b] = [result(120, model="a")]
    h.collector.poll(ts("2026-11-23T10:05:00"))
    per_model = {}
    for d in docs(h.out):
        m = d["openai"]["base"]["model"]
        per_model[m] = per_model.get(m, 0) + d["openai"]["completions"].get("input_tokens", 0)
    assert per_model == {"a": 120, "b": 0}


def test_a_vanished_group_is_zeroed_once_not_again_at_every_poll(harness):
    """Once its correction brought a vanished group to zero, a later re-read of the bucket that
    still lacks it emits nothing for it (an empty correction at each poll of the revision window
    was a document a poll, each under a new revision)."""
    h = harness()
    b = ts("2026-11-23T09:58:00")
    h.api.data[b] = [result(100, model="a"), result(50, model="b")]
    h.collector.poll(ts("2026-11-23T10:00:00"))
    h.api.data[b] = [result(100, model="a")]
    h.collector.poll(ts("2026-11-23T10:05:00"))
    assert len(docs(h.out)) == 3  # two first observations, b's correction to zero
    h.collector.poll(ts("2026-11-23T10:10:00"))
    h.collector.poll(ts("2026-11-23T10:15:00"))
    assert len(docs(h.out)) == 3


def test_a_counter_a_re_read_result_no_longer_has_is_corrected_to_zero(harness):
    """An optional counter (input_cached_tokens) the first read had and the re-read lacks: the
    correction takes it back to zero, as for a vanished group, rather than leave it standing."""
    h = harness()
    b = ts("2026-11-23T09:58:00")
    h.api.data[b] = [result(100, input_cached_tokens=40)]
    h.collector.poll(ts("2026-11-23T10:00:00"))
    h.api.data[b] = [result(100)]
    h.collector.poll(ts("2026-11-23T10:05:00"))
    got = docs(h.out)
    assert [d["openai"]["base"]["revision"] for d in got] == [0, 1]
    assert got[1]["openai"]["completions"].get("input_cached_tokens") == -40
    assert sum(d["openai"]["completions"].get("input_tokens", 0) for d in got) == 100


def test_buckets_older_than_revision_window_are_final(harness):
    h = harness(effective_revision_window=3600)
    b = ts("2026-11-23T08:00:00")
    h.api.data[b] = [result(1)]
    h.collector.poll(ts("2026-11-23T08:30:00"))
    h.collector.poll(ts("2026-11-23T10:00:00"))  # 08:00 ended 1h59m ago: outside the window
    h.api.data[b] = [result(2)]  # a change after it was final is not asked for again
    h.collector.poll(ts("2026-11-23T10:05:00"))
    assert sum(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == 1
    assert h.api.calls[2]["start_time"] == ts("2026-11-23T09:00:00")  # the last poll's final_before
    # final buckets are pruned from the observations
    assert b not in h.store.observations("completions", "1m", 0, 2**40)


def test_a_pause_longer_than_the_revision_window_still_reads_revisable_buckets_once_more(harness):
    """08:00 was read at 08:30, inside its revision window, and the collector did not poll again
    until 10:00 (stopped, a rejected key, a long interval): 08:00 is read once more, now final, so
    a revision made meanwhile is not lost. Before, the poll resumed at the cursor (08:30)."""
    h = harness(effective_revision_window=3600)
    b = ts("2026-11-23T08:00:00")
    h.api.data[b] = [result(1)]
    h.collector.poll(ts("2026-11-23T08:30:00"))
    assert h.store.cursor("completions", "1m").settled == ts("2026-11-23T07:30:00")
    h.api.data[b] = [result(2)]  # revised at 08:45, inside the window; nobody polled
    h.collector.poll(ts("2026-11-23T10:00:00"))
    assert sum(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == 2
    assert h.api.calls[1]["start_time"] == ts("2026-11-23T07:30:00")
    assert h.store.cursor("completions", "1m").settled == ts("2026-11-23T09:00:00")
    assert b not in h.store.observations("completions", "1m", 0, 2**40)


def test_a_state_dir_from_before_settled_still_reads_revisable_buckets_after_a_long_pause(harness):
    """An upgrade: the state was written by a version without `settled` (NULL), which kept the
    observations of the buckets it emitted while revisable. The collector was stopped longer than
    the revision window (for the upgrade, overnight): those buckets are read once more, as with a
    newer state. Before, the poll resumed at the cursor and their late revisions were lost."""
    from dataclasses import replace as _replace

    h = harness(effective_revision_window=3600)
    b = ts("2026-11-23T08:00:00")
    h.api.data[b] = [result(1)]
    h.collector.poll(ts("2026-11-23T08:30:00"))
    cur = h.store.cursor("completions", "1m")
    h.store.put_cursors("completions", {"1m": _replace(cur, settled=None)})  # as the older version left it
    h.api.data[b] = [result(2)]  # revised at 08:45, inside the window; nobody polled
    h.collector.poll(ts("2026-11-23T10:00:00"))
    assert sum(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == 2
    assert h.api.calls[1]["start_time"] == b
    assert h.store.cursor("completions", "1m").settled == ts("2026-11-23T09:00:00")
    contents: dict = {}
    for d in docs(h.out):
        contents.setdefault(d["_id"], set()).add(json.dumps(d["openai"]["completions"], sort_keys=True))
    assert all(len(c) == 1 for c in contents.values()), "one id, two contents"


def test_a_poll_stopped_part_way_keeps_the_observations_it_did_not_reach(harness):
    """A re-read that fails after its first page must not prune what it has not read again."""
    api = FakeApi(page_buckets=10)
    h = harness(api, effective_revision_window=3600, initial_interval=3600)
    start = ts("2026-11-23T08:00:00")
    for i in range(30):
        api.data[start + 60 * i] = [result(1)]
    h.collector.poll(ts("2026-11-23T08:30:00"))  # 08:00-08:29 read, all revisable
    for i in range(30):
        api.data[start + 60 * i] = [result(3)]
    api.fail_on = (len(api.calls) + 2, RuntimeError("503 after retries"))
    with pytest.raises(RuntimeError):
        h.collector.poll(ts("2026-11-23T10:00:00"))  # first page (07:30-07:39) then the failure
    h.collector.poll(ts("2026-11-23T10:05:00"))
    assert sum(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == 90


def test_api_error_keeps_cursor(harness):
    """The seed's 2.2.0 bug: an API error must neither drop nor rewind the cursor."""
    h = harness(effective_revision_window=0)
    h.collector.poll(ts("2026-11-23T10:00:00"))
    before = h.store.cursor("completions", "1m")
    h.api.fail_next = RuntimeError("boom")
    with pytest.raises(RuntimeError):
        h.collector.poll(ts("2026-11-23T10:05:00"))
    assert h.store.cursor("completions", "1m") == before
    h.collector.poll(ts("2026-11-23T10:10:00"))
    assert h.api.calls[-1]["start_time"] == before.position
    assert h.store.cursor("completions", "1m").position == ts("2026-11-23T10:10:00")


def test_error_on_second_page_keeps_first_page_and_resumes(harness):
    api = FakeApi(page_buckets=10)
    h = harness(api, effective_revision_window=0, initial_interval=3600)
    now = ts("2026-11-23T10:00:00")
    for i in range(60):
        api.data[now - 3600 + 60 * i] = [result(1)]
    api.fail_on = (3, RuntimeError("503 after retries"))
    with pytest.raises(RuntimeError):
        h.collector.poll(now)
    h.collector.poll(now + 60)
    got = docs(h.out)
    assert sum(d["openai"]["completions"]["input_tokens"] for d in got) == 60
    assert len({d["_id"] for d in got}) == len(got)


def test_next_page_is_requested_while_the_current_one_is_stored_one_request_at_a_time(harness):
    """A stream's chain of pages costs the API's latency, not latency plus the work per page:
    page N+1 is on the wire while page N is stored and sent, never two requests at once."""
    import threading
    import time

    api = FakeApi(page_buckets=10)
    h = harness(api, effective_revision_window=0, initial_interval=3600)
    now = ts("2026-11-23T10:00:00")
    for i in range(60):
        api.data[now - 3600 + 60 * i] = [result(1)]
    real, requested = api.get_json, []
    in_flight = {"now": 0, "max": 0}
    lock = threading.Lock()
    next_requested = threading.Event()

    def get_json(path, params):
        with lock:
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
            requested.append(params.get("page"))
            if len(requested) >= 2:
                next_requested.set()
        time.sleep(0.01)
        with lock:
            in_flight["now"] -= 1
        return real(path, params)

    api.get_json = get_json
    overlapped = []

    class SlowOutput:
        def send(self, stream, payload, events, on_ack):
            # the first page's send waits for the second page's request: only a pipelined
            # engine has made it by then
            if not overlapped:
                overlapped.append(next_requested.wait(timeout=5))
            h.out.write(payload)
            on_ack()

    h.collector.delivery.output = SlowOutput()
    h.collector.poll(now)
    assert overlapped == [True], "page 2 was not requested until page 1 had been sent"
    assert in_flight["max"] == 1, "never more than one request in flight per stream"
    assert len(requested) == 6
    assert sum(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == 60


class FakeRawApi(FakeApi):
    """FakeApi as AdminApiClient serves it: bytes from `get_raw`, parsed by `parse`."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.raw_calls: list[str | None] = []

    def get_raw(self, path, params):
        self.raw_calls.append(params.get("page"))
        return orjson.dumps(self.get_json(path, params))

    def parse(self, content, path=""):
        return orjson.loads(content)


def _hour_of_minutes(api, now):
    for i in range(60):
        api.data[now - 3600 + 60 * i] = [result(1)]


def test_pages_are_read_ahead_while_the_page_gate_is_held_up_to_a_bound(harness):
    """The long pole's chain must not queue behind other streams' pages: the token at the end of
    each raw page is read and the next page requested while the page gate is held elsewhere, up
    to PAGES_AHEAD pages beyond the one waiting for the gate; one request at a time throughout."""
    import threading

    from agent_input import paging

    api = FakeRawApi(page_buckets=5)  # 12 pages
    assert paging.PAGES_AHEAD < 11
    h = harness(api, effective_revision_window=0, initial_interval=3600)
    now = ts("2026-11-23T10:00:00")
    _hour_of_minutes(api, now)
    in_flight = {"now": 0, "max": 0}
    lock = threading.Lock()
    real = api.get_raw

    def get_raw(path, params):
        with lock:
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
        time.sleep(0.01)
        try:
            return real(path, params)
        finally:
            with lock:
                in_flight["now"] -= 1

    api.get_raw = get_raw
    pages = [None] + [str(now - 3600 + 5 * 60 * i) for i in range(1, 12)]
    paging.PAGE_GATE.acquire()  # another stream's page is being worked on
    try:
        t = threading.Thread(target=h.collector.poll, args=(now,))
        t.start()
        deadline = time.monotonic() + 5
        while len(api.raw_calls) < 1 + paging.PAGES_AHEAD and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)  # time enough for a request beyond the bound, if one were made
        assert api.raw_calls == pages[: 1 + paging.PAGES_AHEAD], "pages 2.. waited for the gate, or no bound"
    finally:
        paging.PAGE_GATE.release()
    t.join(5)
    assert api.raw_calls == pages, "one request per page, none wasted"
    assert in_flight["max"] == 1, "never more than one request in flight per stream"
    assert sum(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == 60


def test_a_wrongly_guessed_token_costs_one_request_not_data(harness, monkeypatch):
    from agent_input import paging

    api = FakeRawApi(page_buckets=20)
    h = harness(api, effective_revision_window=0, initial_interval=3600)
    now = ts("2026-11-23T10:00:00")
    _hour_of_minutes(api, now)
    real_peek = paging.PageFetcher.peek_token
    monkeypatch.setattr(paging.PageFetcher, "peek_token", lambda self, raw: "bogus" if real_peek(self, raw) else None)
    real = api.get_json

    def get_json(path, params):
        if params.get("page") == "bogus":  # what the API says to a token it never gave
            raise ValueError("400 invalid page token")
        return real(path, params)

    api.get_json = get_json
    stats = h.collector.poll(now)
    assert stats.pages == 3 and not stats.errors
    assert api.raw_calls.count("bogus") == 2  # guessed after pages 1 and 2; the last page has no token
    assert [c for c in api.raw_calls if c != "bogus"] == [None, str(now - 2400), str(now - 1200)]
    ids = [d["_id"] for d in docs(h.out)]
    assert len(ids) == len(set(ids)) == 60


def test_the_last_page_asks_for_nothing_more(harness):
    api = FakeRawApi(page_buckets=60)
    h = harness(api, effective_revision_window=0, initial_interval=3600)
    now = ts("2026-11-23T10:00:00")
    _hour_of_minutes(api, now)
    h.collector.poll(now)
    assert api.raw_calls == [None]


def test_a_name_load_is_waited_for_outside_the_page_gate(harness):
    """A stream waiting for the name cache's first load must not hold the page gate: the other
    streams' pages go on being parsed and stored meanwhile."""
    import threading

    from agent_input import paging

    loaded = threading.Event()
    waiting = threading.Event()

    class SlowNames:
        def ready(self):
            waiting.set()
            loaded.wait(5)

        def enrich_all(self, docs):
            for doc in docs:
                doc["openai"]["base"]["project_name"] = "Project One"

    api = FakeRawApi()
    h = harness(api, effective_revision_window=0, initial_interval=3600)
    h.collector.names = SlowNames()
    now = ts("2026-11-23T10:00:00")
    _hour_of_minutes(api, now)
    t = threading.Thread(target=h.collector.poll, args=(now,))
    t.start()
    try:
        assert waiting.wait(5)
        assert paging.PAGE_GATE.acquire(timeout=5), "the page gate was held while names loaded"
        paging.PAGE_GATE.release()
    finally:
        loaded.set()
        t.join(5)
    out = docs(h.out)
    assert len(out) == 60 and {d["openai"]["base"]["project_name"] for d in out} == {"Project One"}


def test_bucket_split_across_pages_is_merged(harness):
    h = harness(effective_revision_window=0, initial_interval=120)
    now = ts("2026-11-23T10:00:00")
    b = now - 120
    pages = [
        {"object": "page", "data": [{"object": "bucket", "start_time": b, "end_time": b + 60,
                                     "results": [result(1, model="a")]}],
         "has_more": True, "next_page": "p2"},
        {"object": "page", "data": [{"object": "bucket", "start_time": b, "end_time": b + 60,
                                     "results": [result(2, model="b")]},
                                    {"object": "bucket", "start_time": b + 60, "end_time": b + 120,
                                     "results": []}],
         "has_more": False, "next_page": None},
    ]
    h.api.get_json = lambda path, params: pages[1] if params.get("page") else pages[0]
    h.collector.poll(now)
    got = docs(h.out)
    assert sorted(d["openai"]["base"]["model"] for d in got) == ["a", "b"]
    assert all(d["openai"]["base"]["revision"] == 0 for d in got)


def test_bad_bucket_reported_good_ones_kept_cursor_not_past_it(harness):
    h = harness(effective_revision_window=0, initial_interval=300)
    now = ts("2026-11-23T10:00:00")
    bad = now - 180
    for t in range(now - 300, now, 60):
        h.api.data[t] = [result(1)]
    h.api.data[bad] = [result(None)]
    stats = h.collector.poll(now)
    assert stats.bad_buckets == 1 and "input_tokens" in stats.errors[0]
    assert len(docs(h.out)) == 4
    assert h.store.cursor("completions", "1m").position == bad
    h.api.data[bad] = [result(1)]
    h.collector.poll(now + 60)
    got = docs(h.out)
    assert sum(d["openai"]["completions"]["input_tokens"] for d in got) == 5  # five buckets of 1
    assert len({d["_id"] for d in got}) == len(got)


def test_older_result_key_accepted(harness):
    h = harness(effective_revision_window=0, initial_interval=60)
    now = ts("2026-11-23T10:00:00")
    h.api.override = {"object": "page", "data": [{"object": "bucket", "start_time": now - 60,
                      "end_time": now, "result": [result(9, extra_unknown_field=1)]}],
                      "has_more": False, "next_page": None}
    h.collector.poll(now)
    (doc,) = docs(h.out)
    assert doc["openai"]["completions"]["input_tokens"] == 9
    assert "extra_unknown_field" not in json.dumps(doc)


def test_a_bucket_time_written_as_a_whole_float_is_taken_as_its_integer(harness):
    """`"start_time": 1763895540.0` is the same instant as 1763895540 (JSON has one number type,
    and the audit stream takes it): it was a bad bucket, holding the cursor at every poll."""
    h = harness(effective_revision_window=0, initial_interval=60)
    now = ts("2026-11-23T10:00:00")
    h.api.override = {"object": "page", "data": [{"object": "bucket", "start_time": float(now - 60),
                      "end_time": float(now), "results": [result(9)]}], "has_more": False, "next_page": None}
    stats = h.collector.poll(now)
    assert stats.bad_buckets == 0, stats.errors
    (doc,) = docs(h.out)
    assert doc["openai"]["base"]["start_time"] == "2026-11-23T09:59:00.000Z"
    assert h.store.cursor("completions", "1m").position == now
    # the same bucket as an integer later is the same document, not a second one
    h.api.override["data"][0].update(start_time=now - 60, end_time=now)
    h.collector.poll(now + 30)
    assert len(docs(h.out)) == 1


def test_a_bucket_time_with_a_fraction_is_still_a_bad_bucket(harness):
    h = harness(effective_revision_window=0, initial_interval=60)
    now = ts("2026-11-23T10:00:00")
    h.api.override = {"object": "page", "data": [{"object": "bucket", "start_time": now - 59.5,
                      "end_time": now + 0.5, "results": [result(9)]}], "has_more": False, "next_page": None}
    stats = h.collector.poll(now)
    assert stats.bad_buckets == 1 and "not integers" in stats.errors[0]


def test_outbox_replayed_identically_after_crash(harness, tmp_path):
    h = harness(effective_revision_window=0)
    now = ts("2026-11-23T10:00:00")
    h.api.data[now - 60] = [result(4)]

    class Crash(Exception):
        pass

    class DyingOutput:
        def send(self, stream, payload, events, on_ack):
            raise Crash()

    h.collector.delivery.output = DyingOutput()
    with pytest.raises(Crash):
        h.collector.poll(now)
    assert h.store.pending_count() == 1
    stored = next(h.store.pending()).payload
    out = io.BytesIO()
    delivery = Delivery(h.store, NdjsonOutput(out))
    assert delivery.replay_pending() == 1
    assert out.getvalue() == stored
    assert h.store.pending_count() == 0


def test_page_gate_lets_the_longest_chain_in_first_then_in_arrival_order():
    import threading

    from agent_input.paging import PageGate

    gate = PageGate(1)
    assert gate.acquire(5)
    order, started = [], []

    def wait(name, priority):
        started.append(name)
        with gate.slot(priority):
            order.append(name)

    threads = []
    for name, priority in [("short", 1.0), ("long", 20.0), ("first page", float("inf")), ("short too", 1.0)]:
        t = threading.Thread(target=wait, args=(name, priority))
        t.start()
        threads.append(t)
        while len(started) < len(threads) or len(gate._waiters) < len(threads):
            time.sleep(0.001)
    gate.release()
    for t in threads:
        t.join(5)
    assert order == ["first page", "long", "short", "short too"]
    assert gate.acquire(timeout=0) and not gate.acquire(timeout=0.01)  # one slot, and it is free again
    gate.release()
    with pytest.raises(ValueError):
        gate.release()


def test_a_timed_out_waiter_leaves_the_line():
    from agent_input.paging import PageGate

    gate = PageGate(1)
    gate.acquire()
    assert gate.acquire(100, timeout=0.01) is False
    gate.release()
    assert gate._waiters == [] and gate.acquire(timeout=0)


def test_set_aside_outside_a_slot_does_nothing_and_a_slot_s_end_leaves_none_held():
    """`set_aside` outside the thread's slot (before one, after one, or while another thread holds
    one) must neither release nor take a slot: released anyway, it freed another thread's slot."""
    import threading

    from agent_input.paging import PageGate

    gate = PageGate(1)
    with gate.set_aside():  # never in a slot
        pass
    with gate.slot(5.0):
        pass
    with gate.set_aside():  # after one: the slot's end leaves nothing held
        pass
    assert gate._free == 1
    held, done = threading.Event(), threading.Event()

    def other():
        with gate.slot(1.0):
            held.set()
            done.wait(5)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert held.wait(5)
        with gate.set_aside():  # this thread holds no slot: the other thread's is not given away
            assert gate.acquire(timeout=0) is False
        assert gate.acquire(timeout=0) is False
    finally:
        done.set()
        t.join(5)
    assert gate.acquire(timeout=0) and not gate.acquire(timeout=0)


def test_set_aside_gives_the_slot_away_each_time_and_takes_it_back_at_the_slot_s_priority():
    """Inside a slot, each `set_aside` lets another thread in, and the block's caller goes on
    only once it holds the slot again, ahead of the waiters of a lower priority than its slot's."""
    import threading

    from agent_input.paging import PageGate

    gate = PageGate(1)
    order = []

    def page(name, priority, started):
        started.set()
        with gate.slot(priority):
            order.append(name)

    with gate.slot(10.0):
        for _ in range(2):  # a second set_aside in the same slot gives it away again
            with gate.set_aside():
                assert gate.acquire(timeout=0), "the slot was not given away"
                low, started = threading.Thread(target=page, args=("low", 1.0, s := threading.Event())), s
                low.start()
                assert started.wait(5)
                while not gate._waiters:
                    time.sleep(0.001)
                back = threading.Timer(0.2, gate.release)  # the other page ends while this one waits
                back.start()
            # this thread was let in first: the low one still waits, and the slot is held here
            assert order == [] and gate._free == 0 and len(gate._waiters) == 1
            back.join(5)
            with gate.set_aside():  # nested in the slot, once more: given away once
                low.join(5)
                assert order == ["low"]
                with gate.set_aside():
                    pass
            order.clear()
    assert gate._free == 1 and gate.acquire(timeout=0) and not gate.acquire(timeout=0)


def test_pages_left_is_judged_by_how_far_the_pages_so_far_reached():
    from agent_input.engine import _pages_left

    assert _pages_left(0, 1000, 0, 1) == float("inf")  # nothing worked on yet
    assert _pages_left(0, 1000, 100, 1) == float("inf")  # no page worked on to judge by (not 0 left)
    assert _pages_left(0, 1000, 100, 2) == 9  # one page reached a tenth of the window
    assert _pages_left(0, 1000, 500, 3) == 2  # two pages reached half
    assert _pages_left(0, 1000, 1000, 5) == 0


def test_a_final_never_emitted_bucket_gives_the_same_bytes_without_observations(harness):
    """The backfill path (`_emit_bucket`) and the compare path (`_diff_bucket`) emit the same
    documents, byte for byte, a repeated group added up, null dimensions left out."""
    from agent_input.engine import PollStats

    h = harness(effective_revision_window=0)
    b = ts("2026-11-23T08:00:00")
    bucket = {"object": "bucket", "start_time": b, "end_time": b + 60, "results": [
        result(5, model="a"), result(7, model="b", user_id="u1"), result(11, model="a"), result(1, batch=None)]}
    created = "2026-11-23T10:00:00.000Z"
    fast = bytearray()
    assert h.collector._emit_bucket(bucket, b, b + 60, created, fast) == 3
    slow, updates = bytearray(), []
    assert h.collector._diff_bucket(bucket, b, b + 60, {}, created, slow, updates, PollStats()) == 3
    assert bytes(fast) == bytes(slow)
    assert [json.loads(x)["openai"]["completions"]["input_tokens"] for x in bytes(fast).splitlines()] == [16, 7, 1]


def test_a_backfill_records_observations_only_inside_the_revision_window(harness):
    h = harness(effective_revision_window=3600)
    now = ts("2026-11-23T10:00:00")
    for minute in range(0, 180):
        h.api.data[now - 3 * 3600 + 60 * minute] = [result(1, model="a"), result(2, model="b")]
    h.collector.poll(now)
    seen = h.store.observations("completions", "1m", 0, 2**40)
    assert sorted(seen) == [now - 3600 + 60 * m for m in range(60)]
    assert sum(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == 3 * 180
    h.api.data[now - 120] = [result(1, model="a"), result(4, model="b")]  # a revision inside the window
    h.collector.poll(now + 300)
    assert sum(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == 3 * 180 + 2


def test_the_engine_hands_the_gil_over_sooner_while_it_runs_and_restores_it():
    import sys

    from agent_input import engine as engine_mod

    seen = []

    class Probe:
        name, interval = "probe", 60

        def poll(self, now):
            seen.append(sys.getswitchinterval())
            return engine_mod.PollStats()

    before = sys.getswitchinterval()
    delivery = SimpleNamespace(replay_pending=lambda: 0)
    assert engine_mod.Engine([Probe()], delivery).run(once=True) == 0
    assert seen == [pytest.approx(min(before, engine_mod.SWITCH_INTERVAL))]
    assert sys.getswitchinterval() == before


def test_overlapping_engines_leave_the_gil_interval_as_they_found_it():
    """A starts, B starts, A ends (B still runs on the short interval), B ends (the original)."""
    import sys
    import threading

    from agent_input import engine as engine_mod

    class Blocking:
        interval = 60

        def __init__(self, name):
            self.name, self.polling, self.go = name, threading.Event(), threading.Event()

        def poll(self, now):
            self.polling.set()
            assert self.go.wait(5)
            return engine_mod.PollStats()

    before = sys.getswitchinterval()
    short = pytest.approx(min(before, engine_mod.SWITCH_INTERVAL))
    delivery = SimpleNamespace(replay_pending=lambda: 0)
    a, b = Blocking("a"), Blocking("b")
    runs = [threading.Thread(target=engine_mod.Engine([c], delivery).run, kwargs={"once": True}) for c in (a, b)]
    try:
        runs[0].start()
        assert a.polling.wait(5)
        runs[1].start()
        assert b.polling.wait(5)
        a.go.set()
        runs[0].join(5)
        assert sys.getswitchinterval() == short, "A's end restored the interval under B"
    finally:
        a.go.set()
        b.go.set()
        for t in runs:
            t.join(5)
    assert sys.getswitchinterval() == before


def test_a_next_page_token_that_comes_back_stops_the_poll_instead_of_looping(harness):
    """An API bug that hands back a token already followed would otherwise make a poll (and
    `--once`) run forever, re-sending the same documents each lap."""
    h = harness(effective_revision_window=0, initial_interval=180)
    now = ts("2026-11-23T10:00:00")
    b = now - 180
    pages = {
        None: {"object": "page", "data": [{"object": "bucket", "start_time": b, "end_time": b + 60,
                                           "results": [result(1)]}], "has_more": True, "next_page": "p2"},
        "p2": {"object": "page", "data": [{"object": "bucket", "start_time": b + 60, "end_time": b + 120,
                                           "results": [result(1)]}], "has_more": True, "next_page": "p3"},
        "p3": {"object": "page", "data": [{"object": "bucket", "start_time": b + 120, "end_time": b + 180,
                                           "results": [result(1)]}], "has_more": True, "next_page": "p2"},
    }
    asked = []

    def get_json(path, params):
        asked.append(params.get("page"))
        assert len(asked) < 10, "the poll is looping"
        return pages[params.get("page")]

    h.api.get_json = get_json
    with pytest.raises(BadPage, match="'p2' came back a second time"):
        h.collector.poll(now)
    assert asked == [None, "p2", "p3"]
    # what came before the loop is kept; p3 and the bucket p2 carried into it are read again next poll
    assert h.store.cursor("completions", "1m").position == b + 60
    assert sum(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == 1


def test_cursor_pages_follows_last_id_and_refuses_a_loop_a_missing_list_and_no_end():
    from agent_input.paging import cursor_pages

    class Bad(Exception):
        pass

    def listing(pages):
        def get_json(path, params):
            return pages[params.get("after")]
        return get_json

    two = {None: {"data": [1], "has_more": True, "last_id": "a"}, "a": {"data": [2], "has_more": False}}
    assert list(cursor_pages(listing(two), "/p", {}, Bad)) == [[1], [2]]
    loop = {None: {"data": [1], "has_more": True, "last_id": "a"}, "a": {"data": [2], "has_more": True, "last_id": "a"}}
    with pytest.raises(Bad, match="'a' came back a second time"):
        list(cursor_pages(listing(loop), "/p", {}, Bad))
    with pytest.raises(Bad, match="no `data` list"):
        list(cursor_pages(listing({None: {"has_more": False}}), "/p", {}, Bad))
    # has_more is required: a page without it (or with no id to go on from) is not the end of the
    # listing, or the audit mark would pass over the pages never read
    for cut in ({"data": [1]}, {"data": [1], "has_more": None}, {"data": [1], "has_more": "false"},
                {"data": [], "has_more": True}):
        with pytest.raises(Bad, match="has_more"):
            list(cursor_pages(listing({None: cut, "a": {"data": [2], "has_more": False}}), "/p", {}, Bad))
    # of the reference's types: a has_more that is not a boolean ("false", 1) is not read as one by
    # its truth, and a last_id that is not a string (7) is not gone on from
    for wrong, says in (({"data": [1], "has_more": "false", "last_id": "a"}, "no boolean `has_more`"),
                        ({"data": [1], "has_more": 1, "last_id": "a"}, "no boolean `has_more`"),
                        ({"data": [{"id": 7}], "has_more": True, "last_id": 7}, "no `last_id`")):
        with pytest.raises(Bad, match=says):
            list(cursor_pages(listing({None: wrong, "a": {"data": [2], "has_more": False}}), "/p", {}, Bad))
    endless = {None: {"data": [0], "has_more": True, "last_id": "x0"}}
    endless.update({f"x{i}": {"data": [i], "has_more": True, "last_id": f"x{i + 1}"} for i in range(10)})
    with pytest.raises(Bad, match="more than 5 pages"):
        list(cursor_pages(listing(endless), "/p", {}, Bad, max_pages=5))


# -- cursor edges found by mutation testing ---------------------------------------------------------
def test_the_observation_at_the_revision_windows_edge_is_kept_on_a_catch_up_poll(harness):
    """A poll that catches up after a held cursor drops the observations it would prune, but not
    the one of the bucket at final_before: without it, the next poll re-emits that bucket as a
    first observation (same id, maybe other content)."""
    h = harness(effective_revision_window=180, initial_interval=600)
    now = ts("2026-11-23T10:00:00")
    for t in range(now - 600, now + 3600, 60):
        h.api.data[t] = [result(1)]
    bad = now - 180  # the first bucket of the revision window
    h.api.data[bad] = [result(None)]
    h.collector.poll(now)  # now-120 and now-60 emitted with observations; the cursor held at `bad`
    assert h.store.cursor("completions", "1m").position == bad
    h.api.data[bad] = [result(1)]
    h.api.data[now - 120] = [result(2)]  # revised: below the next poll's final_before
    later = now + 600
    h.collector.poll(later)
    n = len(docs(h.out))
    h.collector.poll(later + 30)  # the same minute: re-reads [final_before, end), nothing changed
    got = docs(h.out)
    assert len(got) == n, "a bucket already emitted came out again"
    assert len({d["_id"] for d in got}) == len(got)


def test_an_entry_that_is_not_a_bucket_holds_the_cursor_and_the_buckets_after_it(harness):
    """A page with a stray element (not an object) among its buckets: reported, the cursor stays
    before it, and the buckets after it are compared, not sent down the backfill path that
    records nothing, so the next poll does not emit them twice."""
    h = harness(effective_revision_window=0, initial_interval=180)
    now = ts("2026-11-23T10:00:00")
    b = [{"object": "bucket", "start_time": t, "end_time": t + 60, "results": [result(1)]}
         for t in range(now - 180, now, 60)]
    h.api.override = {"object": "page", "data": [b[0], 42, b[1], b[2]], "has_more": False, "next_page": None}
    stats = h.collector.poll(now)
    assert stats.bad_buckets == 1
    assert h.store.cursor("completions", "1m").position == b[1]["start_time"]
    h.api.override = {"object": "page", "data": b, "has_more": False, "next_page": None}
    h.collector.poll(now + 1)
    got = docs(h.out)
    assert len({d["_id"] for d in got}) == len(got) == 3


@pytest.mark.parametrize("width, seconds, limit", [("1m", 60, 1440), ("1h", 3600, 168), ("1d", 86400, 31)])
def test_every_width_asks_for_the_most_buckets_a_page_can_hold(harness, width, seconds, limit):
    """The API's page maxima per width: the defaults (60/24/7) made backfills many times slower."""
    h = harness(FakeApi(width=seconds), bucket_width=width, initial_interval=40 * 86400)
    h.collector.poll(ts("2026-11-23T10:00:00"))
    assert h.api.calls[0]["bucket_width"] == width and h.api.calls[0]["limit"] == limit


def test_only_a_missing_required_counter_makes_a_bucket_bad(harness):
    """completions requires input_tokens, output_tokens and num_model_requests; the per-modality
    counters are optional (left out of the document, not a bad bucket)."""
    h = harness(effective_revision_window=0, initial_interval=300)
    now = ts("2026-11-23T10:00:00")
    h.api.data[now - 300] = [result(1, requests=None)]
    h.api.data[now - 240] = [result(2, output_tokens=None)]
    h.api.data[now - 180] = [result(3)]  # no input_cached_tokens and friends: fine
    stats = h.collector.poll(now)
    assert stats.bad_buckets == 2
    assert any("num_model_requests" in e for e in stats.errors) and any("output_tokens" in e for e in stats.errors)
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [3]


def test_a_bad_bucket_inside_the_revision_window_never_moves_the_cursor_back(harness):
    h = harness(effective_revision_window=600, initial_interval=600)
    now = ts("2026-11-23T10:00:00")
    for t in range(now - 600, now + 600, 60):
        h.api.data[t] = [result(1)]
    h.collector.poll(now)
    assert h.store.cursor("completions", "1m").position == now
    h.api.data[now - 300] = [result(None)]  # re-read inside the window, now bad
    h.collector.poll(now + 60)
    assert h.store.cursor("completions", "1m").position >= now


def test_an_answer_for_a_dropped_read_ahead_chain_never_reaches_the_engine():
    """The fetch thread guessed page X; the parsed page named Y, so the chain restarted while X
    was on its way. X's late answer must be dropped, not taken as Y (its last bucket would be
    merged with Y's first)."""
    import threading

    from agent_input.paging import PageFetcher

    class SlowClient:
        def __init__(self):
            self.release_x = threading.Event()
            self.fetching_x = threading.Event()

        def get_raw(self, path, params):
            page = params.get("page")
            if page is None:  # the first page, whose tail names "X" (the guess)
                return b'{"object":"page","data":[1],"has_more":true,"next_page":"X"}'
            if page == "X":
                self.fetching_x.set()
                self.release_x.wait(5)
                return b'{"object":"page","data":["from X"],"has_more":false,"next_page":null}'
            return b'{"object":"page","data":["from Y"],"has_more":false,"next_page":null}'

        def parse(self, raw, path):
            return orjson.loads(raw)

    client = SlowClient()
    with PageFetcher(client, "/x") as pages:
        pages.request({})
        raw, guessed = pages.take()
        assert guessed == "X"
        assert client.fetching_x.wait(5)
        pages.request({"page": "Y"})  # the parsed page said "Y": the chain restarts
        client.release_x.set()  # X's answer arrives after the restart
        raw, _ = pages.take()
        assert pages.parse(raw)["data"] == ["from Y"]



def test_sigterm_while_a_usage_page_request_hangs_exits_at_once(simulator, tmp_path):
    """A stop leaves a page request in flight to end by itself (`PageFetcher.take` gives up on
    the stop), but the fetch thread was a ThreadPoolExecutor's, which the interpreter joins at
    exit: `collect` stopped by SIGTERM while OpenAI sat on a usage page exited only when the
    request ended (http_timeout: 30 s by default, up to 10 minutes; systemd's stop timeout may
    SIGKILL it first), having logged that it was stopping."""
    import subprocess
    import sys

    import yaml

    from agent_input.simulator import FaultRule

    from conftest import ADMIN_KEY, T0, sigterm_once_asked

    rule = FaultRule(kind="slow", path="/v1/organization/usage/completions", count=None, delay=30)
    simulator.add_fault(rule)
    streams = {name: {"enabled": False} for name in STREAMS_BY_NAME if name != "completions"}
    streams["audit"] = streams["rate_limits"] = {"enabled": False}
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"url": simulator.base_url, "api_key": ADMIN_KEY, "data_streams": streams}))
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--state-dir",
         str(tmp_path / "state"), "--output-path", str(tmp_path / "out.ndjson"), "--now", str(T0),
         "--log-level", "ERROR"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err, took = sigterm_once_asked(proc, rule)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert took < 5.0, f"the exit waited {took:.1f} s for the page request that hung"

# -- agent_input/memory.py (found by mutation testing) ----------------------------------------------
def test_malloc_is_tuned_once_with_glibc_s_options_and_trimmed(monkeypatch):
    import platform

    from agent_input import memory

    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append(("mallopt", option, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))
            return 1

    monkeypatch.setattr(memory, "_libc", FakeLibc())
    monkeypatch.setattr(memory, "_tuned", False)
    assert memory.tune() is True
    # M_ARENA_MAX (-8) = 1 and M_MMAP_THRESHOLD (-3) = 256 KiB, from glibc's malloc.h
    assert calls == [("mallopt", -8, 1), ("mallopt", -3, 256 * 1024)]
    assert memory.tune() is True and len(calls) == 2, "tuned once per process"
    memory.trim()
    assert calls[2:] == [("malloc_trim", 0)]
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        monkeypatch.setattr(memory, "_libc", None)
        assert memory._load() is not None, "glibc has mallopt and malloc_trim"



def test_building_a_collection_leaves_the_process_s_malloc_alone_the_commands_tune_it(tmp_path, monkeypatch):
    """The malloc options are the process's, for good: `collect`, `demo` and `run` set them, a
    program that builds a collection (an embedding one, a test) keeps its own. `app.build` set them."""
    from click.testing import CliRunner

    from agent_input import app, memory
    from agent_input.cli import main
    from agent_input.config import config_from_dict, data_streams
    from agent_input.outputs import NdjsonFileOutput
    from agent_input.state import StateError

    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

        def malloc_trim(self, pad):
            return 1

    monkeypatch.setattr(memory, "_libc", FakeLibc())
    monkeypatch.setattr(memory, "_tuned", False)
    config = config_from_dict({"url": "http://127.0.0.1:9", "api_key": "sk-admin-test-0123456789abcdef",
                               "data_streams": {n: {"enabled": False} for n in data_streams()}}, env={})
    output = NdjsonFileOutput(tmp_path / "out.ndjson")
    app.build(config, state_dir=tmp_path / "state", output=output).close()
    output.close()
    assert calls == [], "app.build changed the process's malloc options"

    def full(*a, **kw):
        raise StateError("cannot write state file: disk I/O error")

    monkeypatch.setattr(app, "build", full)
    CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo.ndjson")])
    assert calls == [(-8, 1), (-3, 256 * 1024)], "the demo command tunes malloc"
    # `collect` too (its build refused the same way: the options are set before it)
    monkeypatch.setattr(memory, "_tuned", False)
    calls.clear()
    cfg = tmp_path / "c.yml"
    cfg.write_text("url: http://127.0.0.1:9\napi_key: sk-admin-test-0123456789abcdef\n")
    CliRunner().invoke(main, ["collect", "--config", str(cfg), "--state-dir", str(tmp_path / "s2"),
                              "--output-path", str(tmp_path / "c.ndjson")])
    assert calls == [(-8, 1), (-3, 256 * 1024)], "the collect command tunes malloc"
    # and `run` (its protocol runner a stub here: the command ends the process with os._exit)
    from agent_input import protocol

    class Stub:
        def __init__(self, *a, **kw):
            pass

        def run(self, stop):
            return 0

        def close(self):
            pass

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(memory, "_tuned", False)
    calls.clear()
    monkeypatch.setattr(protocol.ProtocolWriter, "take_stdout", classmethod(lambda cls: Stub()))
    monkeypatch.setattr(protocol, "Runner", Stub)
    monkeypatch.setattr(os, "_exit", leave)
    CliRunner().invoke(main, ["run", "--state-dir", str(tmp_path / "s3")])
    assert calls == [(-8, 1), (-3, 256 * 1024)], "the run command tunes malloc"


def test_ssl_verify_off_is_warned_about_once_per_collection_not_once_per_client(tmp_path, caplog):
    """Every stream, the name cache and the organization check have an HTTP client of their own:
    the warning was logged by each (14 lines for one setting)."""
    from agent_input import app
    from agent_input.config import config_from_dict
    from agent_input.outputs import NdjsonFileOutput

    config = config_from_dict({"url": "http://127.0.0.1:9", "api_key": "sk-admin-test-0123456789abcdef",
                               "ssl_verify": False}, env={})
    output = NdjsonFileOutput(tmp_path / "out.ndjson")
    with caplog.at_level(logging.WARNING):
        collection = app.build(config, state_dir=tmp_path / "state", output=output)
        clients = len(collection.clients)
        collection.close()
    output.close()
    warned = [r for r in caplog.records if "verification is off" in r.getMessage()]
    assert clients > 1 and len(warned) == 1, (clients, [r.getMessage() for r in warned])

# ---- a listing that breaks the API reference part way: the good buckets still go out ------------


class PagedApi:
    """Serves scripted pages: `pages[i]` is the list of buckets of page i (any JSON at all)."""

    def __init__(self, pages, has_more=None, tokens=None):
        self.pages, self.calls = pages, []
        self.has_more = has_more or [i < len(pages) - 1 for i in range(len(pages))]
        self.tokens = tokens or [str(i + 1) if more else None for i, more in enumerate(self.has_more)]

    def get_json(self, path, params):
        self.calls.append(dict(params))
        i = int(params.get("page") or 0)
        return {"object": "page", "data": self.pages[i], "has_more": self.has_more[i], "next_page": self.tokens[i]}


NOW = ts("2026-11-23T10:00:00")
M = [NOW - 600 + 60 * i for i in range(10)]  # 09:50 ... 09:59


def bucket(start, tokens=1, **kw):
    return {"object": "bucket", "start_time": start, "end_time": start + 60, "results": [result(tokens, **kw)]}


def poll_paged(harness, api):
    h = harness(api, effective_revision_window=3600, initial_interval=600)
    stats = h.collector.poll(NOW)
    return h, stats, {d["openai"]["base"]["start_time"]: d for d in docs(h.out)}


@pytest.mark.parametrize("bad", ["oops", "null results"])
def test_a_bad_last_bucket_of_a_page_is_reported_and_the_next_page_delivered(harness, bad):
    """The last bucket of a page is carried to the next one (it may continue there); one that is
    not an object with a results list was used before its check and failed every poll."""
    if bad == "oops":
        api = PagedApi([[bucket(M[0]), bucket(M[1]), "oops"], [bucket(M[3]), bucket(M[4])]])
    else:  # a bucket split over the page break, its first part without results
        split = {"object": "bucket", "start_time": M[2], "end_time": M[2] + 60, "results": None}
        api = PagedApi([[bucket(M[0]), bucket(M[1]), split], [bucket(M[2]), bucket(M[3]), bucket(M[4])]])
    h, stats, by_start = poll_paged(harness, api)
    assert stats.bad_buckets == 1 and len(api.calls) == 2
    assert all(iso_timestamp(m) in by_start for m in (M[0], M[1], M[3], M[4]))
    assert h.store.cursor("completions", "1m").position == M[2]  # stays before the bad one


def test_a_bucket_twice_in_one_listing_is_reported_not_emitted_twice(harness):
    api = PagedApi([[bucket(M[0]), bucket(M[1], 10), bucket(M[1], 7), bucket(M[2])]])
    h, stats, _ = poll_paged(harness, api)
    ids = [d["_id"] for d in docs(h.out)]
    assert len(ids) == len(set(ids)) == 3, "one id, one content"
    assert stats.bad_buckets == 1 and "appears twice" in stats.errors[0]
    assert sum(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == 12


@pytest.mark.parametrize("value", [2**64 - 1, 2**53, -(2**53), 1e300])
def test_a_counter_beyond_2_53_is_a_bad_bucket_not_a_failed_poll(harness, value):
    api = PagedApi([[bucket(M[0]), bucket(M[1], value), bucket(M[2])]])
    h, stats, by_start = poll_paged(harness, api)
    assert stats.bad_buckets == 1 and "2^53" in stats.errors[0]
    assert sorted(by_start) == [iso_timestamp(M[0]), iso_timestamp(M[2])]


@pytest.mark.parametrize("token", [None, 7, ""])
def test_has_more_without_a_next_page_is_reported_and_the_rest_asked_for_again(harness, token):
    """Before, a missing token ended the listing as if it were complete: 09:53 onwards was never
    asked for, and the status said ok."""
    api = PagedApi([[bucket(M[0]), bucket(M[1]), bucket(M[2])]], has_more=[True], tokens=[token])
    h, stats, by_start = poll_paged(harness, api)
    assert stats.errors and "no next_page" in stats.errors[0]
    assert sorted(by_start) == [iso_timestamp(M[0]), iso_timestamp(M[1])]  # the last may go on
    assert h.store.cursor("completions", "1m").position == M[2]
    h.collector.poll(NOW + 60)
    assert api.calls[-1]["start_time"] <= M[2]


def test_a_gap_or_an_unaligned_bucket_is_reported(harness):
    api = PagedApi([[bucket(M[0]), bucket(M[2]), bucket(M[3] + 30)]])
    h, stats, by_start = poll_paged(harness, api)
    assert any("skipped the buckets" in e for e in stats.errors)
    assert stats.bad_buckets == 1 and any("boundary" in e for e in stats.errors)
    assert h.store.cursor("completions", "1m").position == M[1]


def test_has_more_without_a_next_page_on_the_carried_bucket_s_continuation(harness):
    """The page cut short holds only the rest of the bucket carried from the page before: that
    bucket is not delivered half (it is final, and would never be read again)."""
    api = PagedApi([[bucket(M[0]), bucket(M[1], model="a")], [bucket(M[1], model="b")]],
                   has_more=[True, True], tokens=["1", None])
    h, stats, by_start = poll_paged(harness, api)
    assert sorted(by_start) == [iso_timestamp(M[0])] and stats.errors
    assert h.store.cursor("completions", "1m").position == M[1]


def test_a_clock_stepped_back_never_reuses_an_id_for_other_content(harness):
    """Buckets before `settled` have no observations left: reading them again (the clock stepped
    back, or a longer revision_window) would emit revision 0 again under its old id."""
    h = harness(effective_revision_window=3 * 3600)
    x = ts("2026-11-23T09:00:00")
    h.api.data[x] = [result(100)]
    h.collector.poll(ts("2026-11-23T09:30:00"))
    h.api.data[x] = [result(130)]
    h.collector.poll(ts("2026-11-23T10:30:00"))
    h.collector.poll(ts("2026-11-23T12:05:00"))  # 09:00 final (3h window), read once more, pruned
    h.collector.poll(ts("2026-11-23T11:25:00"))  # the clock steps back 40 minutes: 09:00 revisable again
    h.api.data[x] = [result(140)]
    h.collector.poll(ts("2026-11-23T11:30:00"))
    contents: dict = {}
    for d in docs(h.out):
        contents.setdefault(d["_id"], set()).add(json.dumps(d["openai"]["completions"], sort_keys=True))
    assert all(len(c) == 1 for c in contents.values()), "one id, two contents"


class WidthApi:
    """Any bucket width, summed from `minutes[start] -> tokens` (one group)."""

    def __init__(self):
        self.minutes: dict[int, int] = {}

    def get_json(self, path, params):
        width = {"1m": 60, "1h": 3600, "1d": 86400}[params["bucket_width"]]
        start, end = int(params.get("page") or params["start_time"]), params["end_time"]
        data = [{"object": "bucket", "start_time": t, "end_time": t + width,
                 "results": [result(n)] if (n := sum(v for m, v in self.minutes.items() if t <= m < t + width))
                 else []} for t in range(start, end, width)]
        return {"object": "page", "data": data, "has_more": False, "next_page": None}


def _minutes_delivered_through(tmp_path, plan, days: int, lo: int, hi: int) -> int:
    """Polls of completions at the bucket widths of `plan` ((time, width), a restart with the
    config of the moment each) over an API with 1 token in every minute of `days` days from the
    day before 2026-11-23; the tokens delivered in [lo, hi), deduplicated by `_id`."""
    from dataclasses import replace as _replace

    from agent_input.config import StreamConfig
    from agent_input.state import StateStore

    api, day = WidthApi(), ts("2026-11-23T00:00:00")
    for m in range(day - 86400, day + days * 86400, 60):
        api.minutes[m] = 1
    out = io.BytesIO()
    base = StreamConfig(name="completions", enabled=True, interval=300, initial_interval=4 * 3600,
                        bucket_width=plan[0][1], finalization_grace=0, revision_window=3 * 3600, batch_size=None,
                        include_archived=False)
    for now, width in plan:
        store = StateStore(tmp_path / "state")
        UsageCollector(STREAMS_BY_NAME["completions"], _replace(base, bucket_width=width), api,
                       Delivery(store, NdjsonOutput(out)), clock=lambda: now).poll(now)
        store.close()
    got = {}
    for d in docs(out):
        got.setdefault(d["_id"], d)
    return sum(d["openai"]["completions"]["input_tokens"] for d in got.values()
               if lo <= ts(d["openai"]["base"]["start_time"][:19]) < hi)


def test_back_to_a_width_still_being_finished_loses_nothing(tmp_path, caplog):
    """1h up to 10:00, 1d from 10:10 (so 1h goes on to midnight), back to 1h at 12:00: the 1d
    width has collected nothing yet, so the change is undone and 1h goes on from its own cursor.
    Before, 1h was started over at midnight and 10:00-midnight was never collected."""
    caplog.set_level("INFO", logger="agent_input.engine")
    day = ts("2026-11-23T00:00:00")
    plan = [(day + 10 * 3600, "1h"), (day + 10 * 3600 + 600, "1d"), *[(day + h * 3600, "1h") for h in range(12, 48)]]
    lo, hi = day + 6 * 3600, day + 44 * 3600
    assert _minutes_delivered_through(tmp_path, plan, 2, lo, hi) == (hi - lo) // 60
    # undone at once (1d's cursor never moved from its origin), not waited out
    assert any("bucket width is 1h again; 1d had collected nothing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("hour_collects", [True, False])
def test_back_to_a_width_through_a_third_one_counts_no_time_twice(tmp_path, caplog, hour_collects):
    """1m until 10:10, then 1h (1m goes on to 11:00), then 1d (1h goes on to midnight), then 1m
    again while its range is still revisable and 1d has collected nothing: undoing the change
    must also undo 1h's range. Before, 1m went on from 11:00 while 1h still covered 11:00 to
    midnight, and those 13 hours were delivered twice (3720 minutes for 2940). With 1h having
    read nothing either, the change is undone at once, 1m's own observations (it is still
    revisable) notwithstanding; with 1h's 11:00 bucket read, 1m waits to be final."""
    caplog.set_level("INFO", logger="agent_input.engine")
    day = ts("2026-11-23T00:00:00")
    hour = day + (12 if hour_collects else 10) * 3600  # at 12:00, 1h has its 11:00 bucket
    plan = [(day + 10 * 3600 + 300, "1m"), (day + 10 * 3600 + 600, "1h"), (hour + 900, "1h"),
            (hour + 1200, "1d"), (hour + 1800, "1m"), *[(day + h * 3600, "1m") for h in range(13, 60)]]
    lo, hi = day + 7 * 3600, day + 56 * 3600
    assert _minutes_delivered_through(tmp_path, plan, 3, lo, hi) == (hi - lo) // 60
    undone = [r for r in caplog.records if "bucket width is 1m again; 1h, 1d had collected nothing"
              in r.getMessage() or "bucket width is 1m again; 1d, 1h had collected nothing" in r.getMessage()]
    assert bool(undone) is not hour_collects, [r.getMessage() for r in caplog.records]


def _width_changes(tmp_path, api):
    """A completions stream over two days of one-token minutes (`api`, a WidthApi), first polled
    at 1m at 10:05 with initial_interval 4h. Returns `collector(width, **changes)`, which builds
    it again as a new start with another config would, and that clock, `t`."""
    from dataclasses import replace as _replace

    from agent_input.config import StreamConfig
    from agent_input.state import StateStore

    day = ts("2026-11-23T00:00:00")
    for m in range(day - 86400, day + 86400, 60):
        api.minutes[m] = 1
    store, out = StateStore(tmp_path / "state"), io.BytesIO()
    base = StreamConfig(name="completions", enabled=True, interval=300, initial_interval=4 * 3600,
                        bucket_width="1m", finalization_grace=0, revision_window=3 * 3600, batch_size=None,
                        include_archived=False)
    t = day + 10 * 3600 + 300

    def collector(width, **changes):
        return UsageCollector(STREAMS_BY_NAME["completions"], _replace(base, bucket_width=width, **changes), api,
                              Delivery(store, NdjsonOutput(out)), clock=lambda: t)

    collector("1m").poll(t)
    return collector, t


def test_back_to_a_width_whose_change_was_undone_while_another_width_went_on_counts_no_time_twice(tmp_path):
    """1m, 1h at 10:30 (1m goes on to 11:00), back to 1m at 10:31 (undone: 1h's range is empty at
    11:00), 1d at 10:36 (1m goes on to midnight), then 1h at 11:36: 1d had read nothing, so that
    change was undone, but 1m, which started before 1h's 11:00 and goes on past it, was not counted
    among the widths used since. 1h went on from 11:00 while 1m covered 11:00 to midnight: those
    13 hours were delivered twice (found by tests/soak_protocol.py, bucket widths replaced under run)."""
    day = ts("2026-11-23T00:00:00")
    h = 3600
    plan = [(day + 10 * h, "1m"), (day + 10 * h + 1800, "1h"), (day + 10 * h + 1860, "1m"),
            (day + 10 * h + 2160, "1d"), (day + 11 * h + 2160, "1h"), *[(day + t * h, "1h") for t in range(12, 80)]]
    lo, hi = day + 6 * h, day + 3 * 86400
    assert _minutes_delivered_through(tmp_path, plan, 4, lo, hi) == (hi - lo) // 60


def test_a_change_back_to_a_width_itself_undone_leaves_no_time_unread(tmp_path):
    """1m at 10:05, 1h at 10:10 (from 11:00), 1d at 10:15 (from midnight; 1h goes on until then),
    1h at 10:20 (1d read nothing: undone), 1d again at 10:25: 1h had read nothing either and was
    cut back to where it started, 11:00, while 1d went on from midnight, where it had started:
    11:00 to midnight was read at no width (tests/soak_protocol.py --seed 2611, audio_speeches a
    third of the truth)."""
    day = ts("2026-11-23T00:00:00")
    plan = [(day + 10 * 3600 + 300 * (i + 1), w) for i, w in enumerate(("1m", "1h", "1d", "1h", "1d"))]
    plan += [(day + 86400 + t * 3600, "1d") for t in range(4, 60, 4)]
    lo, hi = day + 6 * 3600 + 300, day + 2 * 86400
    assert _minutes_delivered_through(tmp_path, plan, 4, lo, hi) == (hi - lo) // 60


@pytest.mark.parametrize("back", [False, True])
def test_a_changed_width_is_asked_for_once_a_poll(tmp_path, back):
    """1m, then 1h from 10:10 (1m goes on to 11:00), in one process polled every hour; or back
    to 1m at once, undoing the change. The width now set was also taken for one of the widths
    left: a second collector of it polled inside every poll of the process, every window asked
    for twice (the revision window read again, the rate limit spent twice)."""

    class Counting(WidthApi):
        calls: list

        def get_json(self, path, params):
            self.calls.append(params["bucket_width"])
            return super().get_json(path, params)

    api = Counting()
    api.calls = []
    collector, t = _width_changes(tmp_path, api)
    if back:
        collector("1h").poll(t + 300)
    c = collector("1m" if back else "1h")
    for hour in range(1, 5):
        api.calls.clear()
        c.poll(t + hour * 3600)
        # (1h's first bucket, 11:00, is asked for once it has ended)
        assert api.calls.count(c.width) == (1 if back or hour > 1 else 0), api.calls


def test_a_wider_width_s_flooring_is_not_taken_for_a_raised_initial_interval(tmp_path, caplog):
    """A 1m first run at 10:05 with initial_interval 4h starts at 06:05; polled at 1h from 10:15,
    `initial_interval` floored to the hour asks from 06:00, before 06:05, only because of the
    flooring: it was not raised, and the WARNING that it reaches before the collection was false."""
    collector, t = _width_changes(tmp_path, WidthApi())
    with caplog.at_level(logging.WARNING, logger="agent_input"):
        collector("1h").poll(t + 600)
    assert "initial_interval reaches back" not in caplog.text
    raised = collector("1h", initial_interval=5 * 3600)
    with caplog.at_level(logging.WARNING, logger="agent_input"):
        raised.poll(t + 900)  # raised by an hour: said
    assert "initial_interval reaches back to 2026-11-23T05:00:00" in caplog.text


def test_an_initial_interval_raised_with_state_in_place_is_said_not_silently_ignored(tmp_path, caplog):
    """initial_interval sets where a stream's first poll starts; raised from 24h to 30d on a state
    directory that holds a backfill, nothing before the first start is read. Before, nothing said
    so: the operator waited for 30 days of history that never came."""
    from agent_input.state import StateStore

    store, out = StateStore(tmp_path / "state"), io.BytesIO()
    now = ts("2026-11-23T10:00:00")
    # (a restart within the first start's minute asks for exactly where the state begins: not said)
    for initial, then in ((86400, now), (86400, now + 20), (86400, now + 300), (30 * 86400, now + 600),
                          (30 * 86400, now + 900)):
        caplog.clear()
        collector = UsageCollector(STREAMS_BY_NAME["completions"], stream_config(initial_interval=initial),
                                   FakeApi(), Delivery(store, NdjsonOutput(out)), clock=lambda: then)
        collector.poll(then)
        collector.poll(then + 60)
        said = [r for r in caplog.records if "initial_interval" in r.getMessage()]
        if initial == 86400:
            assert not said
        else:
            assert len(said) == 1 and said[0].levelname == "WARNING"
            assert "2026-11-22T10:00:00" in said[0].getMessage()  # where the state's collection began



def test_a_changed_bucket_width_is_not_taken_for_a_raised_initial_interval(tmp_path, caplog):
    """The state's collection of a stream begins at its first width's origin: the width in use
    since a change starts later, and comparing initial_interval with it warned at every start
    after a width change although initial_interval never changed."""
    day = ts("2026-11-23T00:00:00")
    plan = [(day + 10 * 3600, "1m"), (day + 10 * 3600 + 600, "1h"), (day + 10 * 3600 + 900, "1h"),
            (day + 12 * 3600, "1h")]
    _minutes_delivered_through(tmp_path, plan, 1, day, day + 86400)
    assert not [r for r in caplog.records if "initial_interval" in r.getMessage()]

def test_back_to_a_finished_width_is_not_taken_for_a_raised_initial_interval(tmp_path, caplog):
    """1m from 06:05 (a first run at 10:05, initial_interval 4h), 1h from 10:15 (1m goes on to
    11:00), back to 1m at 14:10 once 1m is final and 1h has read up to 14:00: 1m starts again at
    14:00, its cursor's origin with it, and the state's collection was taken to begin at 1h's
    11:00. initial_interval, never changed, asked from 10:10: a WARNING at every start that
    nothing before 11:00 is collected, though 06:05-11:00 was (tests/soak_protocol.py, 1d with a
    2d initial_interval, 1h, 1d again: "collected this stream from" two days late)."""
    day = ts("2026-11-23T00:00:00")
    plan = [(day + 10 * 3600 + 300, "1m"), (day + 10 * 3600 + 900, "1h"), (day + 12 * 3600 + 300, "1h"),
            (day + 14 * 3600 + 600, "1m"), (day + 14 * 3600 + 900, "1m")]
    lo, hi = day + 6 * 3600 + 300, day + 14 * 3600
    with caplog.at_level(logging.WARNING, logger="agent_input"):
        assert _minutes_delivered_through(tmp_path, plan, 1, lo, hi) == (hi - lo) // 60
    assert not [r.getMessage() for r in caplog.records if "initial_interval" in r.getMessage()]


@pytest.mark.parametrize("width, origin", [("1h", "2026-11-23T08:00:00"), ("1m", "2026-11-23T08:30:00"),
                                           ("1d", "2026-11-23T00:00:00")])
def test_widths_never_read_from_are_one_first_run_at_the_width_now_set(tmp_path, caplog, width, origin):
    """What an earlier version left after a 1m first poll at 10:30 failed (start 08:30 kept) and a
    1h one failed after a change to 1h: a 1m cursor retired at 09:00 and a 1h one at 09:00, neither
    read. At 1h, at 1m again or at 1d, it is the stream's first run at that width, from 08:30
    floored to its boundary: one cursor, every minute from there delivered once, no WARNING.
    Before, 1m went on to 09:00 and 1h from there (1d: 1h until midnight) and a WARNING claimed
    a collection."""
    from agent_input.config import StreamConfig
    from agent_input.state import Cursor, StateStore

    caplog.set_level("INFO", logger="agent_input.engine")
    api, day = WidthApi(), ts("2026-11-23T00:00:00")
    for m in range(day - 86400, day + 3 * 86400, 60):
        api.minutes[m] = 1
    store, out = StateStore(tmp_path / "state"), io.BytesIO()
    kept, hour = ts("2026-11-23T08:30:00"), ts("2026-11-23T09:00:00")
    store.put_cursors("completions", {"1m": Cursor(kept, kept, kept, hour), "1h": Cursor(hour, hour, hour)})
    base = StreamConfig(name="completions", enabled=True, interval=300, initial_interval=2 * 3600,
                        bucket_width=width, finalization_grace=0, revision_window=3 * 3600, batch_size=None,
                        include_archived=False)
    now = day + 50 * 3600  # the next day's 02:00: 1d's first day is final
    UsageCollector(STREAMS_BY_NAME["completions"], base, api, Delivery(store, NdjsonOutput(out)),
                   clock=lambda: now).poll(now)
    got = {d["_id"]: d for d in docs(out)}
    assert len(got) == len(docs(out))
    assert {d["openai"]["base"]["bucket_width"] for d in got.values()} == {width}
    assert min(d["openai"]["base"]["start_time"] for d in got.values()) == iso_timestamp(ts(origin))
    end = _floor_to(now, {"1m": 60, "1h": 3600, "1d": 86400}[width])
    assert sum(d["openai"]["completions"]["input_tokens"] for d in got.values()) == (end - ts(origin)) // 60
    assert set(store.cursors("completions")) == {width}
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def _floor_to(t: int, width: int) -> int:
    return t // width * width


class HangingApi:
    """A request that never answers (an API that hangs for up to http_timeout)."""

    def __init__(self):
        self.release = __import__("threading").Event()

    def get_json(self, path, params):
        self.release.wait(30)
        raise RuntimeError("released")


def test_a_stop_ends_the_wait_for_a_hanging_page(harness):
    """Before, a stop (or a new config) waited for the request in flight: up to http_timeout, 10
    minutes at most, and the supervisor killed the process."""
    import threading

    from agent_input.http_client import StoppedError

    api = HangingApi()
    h = harness(api)
    h.collector.stop = stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(StoppedError):
        h.collector.poll(NOW)
    assert time.monotonic() - started < 3
    # nothing read: only the first poll's start is kept, for the next poll to read from
    start = h.store.cursor("completions", "1m")
    assert start is not None and start.origin == start.position == start.settled and h.out.getvalue() == b""
    api.release.set()


def test_a_stop_ends_the_wait_for_the_first_names():
    import threading

    from agent_input.http_client import StoppedError
    from agent_input.names import NameCache

    api, stop = HangingApi(), threading.Event()
    cache = NameCache(api, stop=stop)
    threading.Thread(target=cache.ready, daemon=True).start()  # takes the first load, hangs in it
    time.sleep(0.2)
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(StoppedError):
        cache.ready()
    assert time.monotonic() - started < 3
    api.release.set()


def test_progress_off_a_terminal_reports_a_long_poll_every_so_often(caplog):
    """Under systemd, Docker or a supervisor there is no terminal: a backfill of many hours said
    nothing at all (the stream stayed `starting` with no word). A poll that has run `every`
    seconds now says how far it got, to `on_report` or the log."""
    from agent_input.engine import Progress

    said: list = []
    progress = Progress(stream=io.StringIO(), on_report=lambda s, m: said.append((s, m)), every=0)
    progress.update("completions", 25, 100, ts("2026-11-23T04:00:00"))
    progress.update("completions", 100, 100, ts("2026-11-23T10:00:00"))  # done: nothing to say
    assert said == [("completions", "backfill 25%, up to 2026-11-23T04:00:00.000Z")]
    quiet = Progress(stream=io.StringIO(), on_report=lambda s, m: said.append((s, m)))
    quiet.update("completions", 25, 100)  # a poll that has not run 30 s yet
    assert len(said) == 1
    with caplog.at_level("INFO", logger="agent_input.engine"):
        Progress(stream=io.StringIO(), every=0).update("embeddings", 1, 2, ts("2026-11-23T04:00:00"))
    assert "embeddings: backfill 50%, up to 2026-11-23T04:00:00.000Z" in caplog.text


def test_protocol_progress_is_the_stream_status_message_unless_it_is_degraded(tmp_path):
    from agent_input.protocol import ProtocolWriter, Runner

    r, w = os.pipe()
    runner = Runner(ProtocolWriter(w), state_dir=str(tmp_path), stdin=io.BytesIO())
    runner._on_status("completions", "starting", "")
    runner._on_progress("completions", "backfill 40%")
    runner._on_status("embeddings", "degraded", "a bucket does not match")
    runner._on_progress("embeddings", "backfill 10%")
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        lines = [json.loads(x) for x in fh.read().splitlines()]
    assert [(m["stream"], m["status"], m["message"]) for m in lines] == [
        ("completions", "starting", ""), ("completions", "starting", "backfill 40%"),
        ("embeddings", "degraded", "a bucket does not match")]


def test_a_run_s_totals_keep_the_last_errors_only():
    """An outage of days appended every failed poll's error to the run's totals, never read."""
    from agent_input.engine import KEEP_ERRORS, PollStats

    totals = PollStats()
    for i in range(KEEP_ERRORS * 5):
        totals.add(PollStats(requests=1, errors=[f"error {i}"]))
    assert totals.requests == KEEP_ERRORS * 5 and totals.errors[-1] == f"error {KEEP_ERRORS * 5 - 1}"
    assert len(totals.errors) == KEEP_ERRORS


def test_a_poll_cut_short_by_a_stop_is_not_reported_healthy():
    import threading

    from agent_input.engine import Engine, PollStats

    stop, said = threading.Event(), []

    class Stopping:
        name, interval = "completions", 300

        def poll(self, now):
            stop.set()  # a stop arrives while the page in flight is finished
            return PollStats(requests=1)

    delivery = SimpleNamespace(replay_pending=lambda: 0)
    Engine([Stopping()], delivery, stop=stop, on_status=lambda *a: said.append(a)).run()
    assert [s for _, s, _ in said] == ["starting"]


def test_a_poll_that_fails_for_another_reason_while_stopping_is_logged_not_swallowed(caplog):
    """SIGTERM lands while a stream stores its page and the store fails (a full disk): only the
    stop's own StoppedError is quiet; any other error is logged, not dropped with the stop."""
    import threading

    from agent_input.engine import Engine
    from agent_input.http_client import StoppedError
    from agent_input.state import StateDatabaseError

    stop = threading.Event()

    class Failing:
        interval = 300

        def __init__(self, name, exc):
            self.name, self.exc = name, exc

        def poll(self, now):
            stop.set()
            raise self.exc

    delivery = SimpleNamespace(replay_pending=lambda: 0)
    disk = StateDatabaseError("cannot write state file s: disk I/O error (is the disk full?)")
    stopped = StoppedError(None, "stopped while waiting for a page", "stopped", "/x")
    with caplog.at_level("INFO", logger="agent_input.engine"):
        Engine([Failing("completions", disk), Failing("costs", stopped)], delivery, stop=stop).run()
    assert "completions" in caplog.text and "disk I/O error (is the disk full?)" in caplog.text
    assert "waiting for a page" not in caplog.text


def test_a_poll_that_emits_or_meets_a_problem_logs_one_info_line(caplog):
    """Under systemd a continuous collect logged nothing until it stopped: the journal could not
    tell a working collector from a stuck one."""
    from agent_input.engine import Engine, PollStats

    class Once:
        name, interval = "completions", 300

        def poll(self, now):
            return PollStats(requests=2, events=10, corrections=3)

    delivery = SimpleNamespace(replay_pending=lambda: 0)
    with caplog.at_level("INFO", logger="agent_input.engine"):
        Engine([Once()], delivery).run(once=True)
    assert "collecting completions" in caplog.text
    assert "completions: 10 documents (3 corrections) from 2 requests" in caplog.text


class _HeldGuard:
    """An organization check that cannot be done at the start, and passes when `passed` is set."""

    def __init__(self):
        self.passed = False

    def wait(self):
        from agent_input.org_guard import OrganizationUnverified

        raise OrganizationUnverified("the projects listing failed (503)")


class _Hooked:
    """A stream whose poll runs `body` on its own thread."""

    interval = 60.0

    def __init__(self, name, body):
        self.name, self.body = name, body

    def poll(self, now):
        from agent_input.engine import PollStats

        self.body()
        return PollStats()


class _RecordingOutput:
    def __init__(self, hold=None):
        self.sent: list[tuple[str, bytes]] = []
        self.hold = hold or (lambda stream: None)

    def send(self, stream, payload, events, on_ack):
        self.sent.append((stream, payload))
        self.hold(stream)
        on_ack()

    def close(self):
        pass


def _with_a_batch_held_back(tmp_path):
    from agent_input.state import StateStore

    store = StateStore(tmp_path)
    store.commit_events("audit", b'{"_id":"left-over"}\n', 1, {})  # the outbox at the start
    return store


def test_the_held_back_re_send_leaves_out_a_stream_s_batch_in_flight(tmp_path, monkeypatch):
    """The start's batches wait for the organization check; the first stream past it re-sends
    them (those up to the start's last batch) while another stream's own new batch is committed
    and still being sent: that one is not sent a second time."""
    import threading

    from agent_input import engine as engine_mod

    store = _with_a_batch_held_back(tmp_path)
    in_flight, replayed = threading.Event(), threading.Event()

    def hold(stream):  # a's batch is committed (its row in the outbox) and being sent
        if threading.current_thread().name == "stream-a":
            in_flight.set()
            assert replayed.wait(10)

    output = _RecordingOutput(hold=hold)
    delivery = engine_mod.Delivery(store, output)
    guard = _HeldGuard()

    def b_passes_the_check():
        assert in_flight.wait(10)
        guard.passed = True

    engine = engine_mod.Engine([_Hooked("a", lambda: delivery.commit_events("a", [b'{"_id":"a1"}\n'], {})),
                                _Hooked("b", b_passes_the_check)], delivery, guard=guard)
    real = engine._replay_deferred

    def replay_then_release():
        try:
            return real()
        finally:
            if guard.passed:
                replayed.set()

    monkeypatch.setattr(engine, "_replay_deferred", replay_then_release)
    assert engine.run(once=True) == 0
    assert sorted(output.sent) == [("a", b'{"_id":"a1"}\n'), ("audit", b'{"_id":"left-over"}\n')]
    assert store.pending_count() == 0


def test_the_held_back_re_send_leaves_a_stream_s_half_written_batch_file_alone(tmp_path, monkeypatch):
    """A stream writes its large batch's outbox file before the row that names it: the held-back
    re-send, run meanwhile on another stream's thread, must not take that file for an orphan
    (orphans go at the start only, before any stream thread runs)."""
    import threading

    from agent_input import engine as engine_mod
    from agent_input.state import INLINE_PAYLOAD_LIMIT

    store = _with_a_batch_held_back(tmp_path)
    spooled, replayed = threading.Event(), threading.Event()
    files_after_replay: list[list[str]] = []
    real_spool = store._spool

    def spool_then_wait(payload, events):
        name = real_spool(payload, events)
        if threading.current_thread().name == "stream-a":
            spooled.set()
            assert replayed.wait(10)
        return name

    monkeypatch.setattr(store, "_spool", spool_then_wait)
    output = _RecordingOutput()
    delivery = engine_mod.Delivery(store, output)
    guard = _HeldGuard()
    big = [b'{"_id":"a%06d","pad":"%s"}\n' % (i, b"x" * 900) for i in range(INLINE_PAYLOAD_LIMIT // 900 + 50)]

    def b_passes_the_check():
        assert spooled.wait(10)
        guard.passed = True

    engine = engine_mod.Engine([_Hooked("a", lambda: delivery.commit_events("a", list(big), {})),
                                _Hooked("b", b_passes_the_check)], delivery, guard=guard)
    real = engine._replay_deferred

    def replay_then_release():
        try:
            return real()
        finally:
            if guard.passed and not replayed.is_set():
                files_after_replay.append(os.listdir(store.spool_dir))
                replayed.set()

    monkeypatch.setattr(engine, "_replay_deferred", replay_then_release)
    assert engine.run(once=True) == 0
    assert len(files_after_replay[0]) == 1, "stream a's batch file was removed before its row was written"
    assert sorted(s for s, _ in output.sent) == ["a", "audit"]
    assert store.pending_count() == 0


def test_delivered_before_keeps_what_an_inner_poll_delivered_and_counts_it_once():
    """A width left behind polled inside the stream's poll delivered pages, then failed: what it
    delivered is in the outer poll's note (the run's totals count it); the same note made again
    with the same stats adds nothing twice."""
    from agent_input.engine import PollStats, delivered_before

    exc = RuntimeError("a later page's 5xx")
    inner = PollStats(requests=2, pages=2, events=30)
    assert delivered_before(exc, inner) is exc and exc.delivered is inner
    outer = PollStats(requests=1, pages=1, events=5)
    delivered_before(exc, outer)
    assert exc.delivered is outer and (outer.requests, outer.pages, outer.events) == (3, 3, 35)
    delivered_before(exc, outer)
    assert (outer.requests, outer.pages, outer.events) == (3, 3, 35)


@pytest.mark.parametrize("kind", ["stream-stopped", "output", "api-5xx", "refused", "requests-only"])
def test_a_failed_poll_s_delivered_part_is_in_the_run_s_totals_once(kind):
    """What a poll delivered before it failed is counted in the totals (collect --once's summary),
    whichever way it failed, requests made without a document too; its notes (errors) are not
    added beside the failure's own."""
    from agent_input.engine import Engine, PollStats, StreamStopped, delivered_before
    from agent_input.http_client import ApiError, PermissionDeniedError
    from agent_input.outputs import OutputError

    exc = {"stream-stopped": StreamStopped("cannot go on"), "output": OutputError("disk full"),
           "api-5xx": ApiError(500, "server error"), "refused": PermissionDeniedError(403, "Missing scopes: a.b"),
           "requests-only": ApiError(502, "bad gateway")}[kind]
    done = PollStats(requests=3, pages=3, events=0 if kind == "requests-only" else 40,
                     errors=["rate_limits: skipped 2 projects"])

    class Failing:
        name, interval = "completions", 300

        def poll(self, now):
            raise delivered_before(exc, done)

    engine = Engine([Failing()], SimpleNamespace(replay_pending=lambda: 0))
    engine.run(once=True)
    totals = engine.totals["completions"]
    assert (totals.requests, totals.pages, totals.events) == (3, 3, done.events)
    assert "rate_limits: skipped 2 projects" not in totals.errors
    assert "completions" in engine.failed


def test_a_first_poll_whose_writes_the_organization_check_holds_keeps_no_start(harness):
    """The organization check holding writes fails the first poll's page: its start is not kept
    either (the check is not asked again for it), and a first poll failing otherwise keeps it."""
    from agent_input.org_guard import OrganizationUnverified
    from agent_input.state import Cursor

    h = harness(effective_revision_window=3600, initial_interval=600)
    asked = []

    def held():
        asked.append(1)
        raise OrganizationUnverified("the projects listing failed")

    h.store.write_check = held
    with pytest.raises(OrganizationUnverified):
        h.collector.poll(NOW)
    assert asked == [1] and h.store.cursor("completions", "1m") is None
    h.store.write_check = None

    def failing(path, params):
        raise RuntimeError("the page could not be read")

    h.collector.client = SimpleNamespace(get_json=failing)
    with pytest.raises(RuntimeError):
        h.collector.poll(NOW)
    assert h.store.cursor("completions", "1m") == Cursor(NOW - 600, NOW - 600, NOW - 600)


def test_back_to_a_finished_width_the_widths_since_never_read_from_is_no_first_run(tmp_path, caplog):
    """1m from 06:05 (initial_interval 4h), 1h from 10:10 (1m goes on to 11:00), 1m finished at
    11:20 (revision_window 15m) while 1h has read nothing yet, then 1m again at 11:25, a poll that
    fails (OpenAI answering 503), and a restart at 11:30. The change back was taken over at 11:00
    with a new 1m cursor there, nothing read at either width since: the restart took the stream
    for one never collected and read it again from initial_interval (07:30), every minute of
    07:30-11:00 delivered a second time (twice in the panels once a rollover came between)."""
    from dataclasses import replace as _replace

    from agent_input.config import StreamConfig
    from agent_input.state import StateStore

    class Outage(WidthApi):
        down = False

        def get_json(self, path, params):
            if self.down:
                raise RuntimeError("503 Service Unavailable")
            return super().get_json(path, params)

    caplog.set_level("INFO", logger="agent_input.engine")
    api, day = Outage(), ts("2026-11-23T00:00:00")
    for m in range(day - 86400, day + 86400, 60):
        api.minutes[m] = 1
    out = io.BytesIO()
    base = StreamConfig(name="completions", enabled=True, interval=300, initial_interval=4 * 3600,
                        bucket_width="1m", finalization_grace=0, revision_window=900, batch_size=None,
                        include_archived=False)
    for now, width, down in ((day + 10 * 3600 + 300, "1m", False), (day + 10 * 3600 + 600, "1h", False),
                             (day + 11 * 3600 + 1200, "1h", False), (day + 11 * 3600 + 1500, "1m", True),
                             (day + 11 * 3600 + 1800, "1m", False), (day + 12 * 3600, "1m", False)):
        store, api.down = StateStore(tmp_path / "state"), down
        try:
            UsageCollector(STREAMS_BY_NAME["completions"], _replace(base, bucket_width=width), api,
                           Delivery(store, NdjsonOutput(out)), clock=lambda: now).poll(now)
        except RuntimeError:
            assert down
        store.close()
    first = [d for d in docs(out) if d["openai"]["base"].get("revision", 0) == 0]
    ids = [d["_id"] for d in first]
    assert len(ids) == len(set(ids)), "a bucket's first document delivered twice"
    lo, hi = day + 6 * 3600 + 300, day + 12 * 3600
    assert sum(d["openai"]["completions"]["input_tokens"] for d in first
               if lo <= ts(d["openai"]["base"]["start_time"][:19]) < hi) == (hi - lo) // 60
    assert not [r for r in caplog.records if "first run" in r.getMessage()]


@pytest.mark.parametrize("body, why", [([], "not a JSON object"), ({"object": "page", "has_more": False}, "no `data` list"),
                                       ({"object": "page", "data": {"0": 1}}, "no `data` list"),
                                       ({"object": "page", "data": [], "next_page": None}, "no boolean `has_more`"),
                                       ({"object": "page", "data": [], "has_more": "false", "next_page": None},
                                        "no boolean `has_more`")])
def test_a_page_that_is_not_a_page_fails_the_poll_and_keeps_the_cursor(harness, body, why):
    h = harness(effective_revision_window=0, initial_interval=180)
    now = ts("2026-11-23T10:00:00")
    h.api.override = body
    with pytest.raises(BadPage, match=why):
        h.collector.poll(now)
    assert docs(h.out) == [] and h.store.cursor("completions", "1m").position == now - 180  # the start, kept
    h.api.override = None
    h.api.data[now - 180] = [result(1)]
    h.collector.poll(now + 1)
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [1]


def test_a_bucket_of_another_width_is_a_bad_bucket_that_holds_the_cursor(harness):
    """An hour-wide bucket in a 1m stream: reported, nothing of it emitted, the cursor stays before it."""
    h = harness(effective_revision_window=0, initial_interval=180)
    now = ts("2026-11-23T10:00:00")
    b = [{"object": "bucket", "start_time": t, "end_time": t + 60, "results": [result(1)]}
         for t in range(now - 180, now, 60)]
    wide = dict(b[1], end_time=b[1]["start_time"] + 3600)
    h.api.override = {"object": "page", "data": [b[0], wide, b[2]], "has_more": False, "next_page": None}
    stats = h.collector.poll(now)
    assert stats.bad_buckets == 1 and "is not 1m wide" in stats.errors[0]
    assert h.store.cursor("completions", "1m").position == b[1]["start_time"]
    h.api.override = {"object": "page", "data": b, "has_more": False, "next_page": None}
    h.collector.poll(now + 1)
    got = docs(h.out)
    assert len({d["_id"] for d in got}) == len(got) == 3


def test_back_to_a_width_the_width_since_delivered_a_page_with_a_gap_from_is_not_undone(tmp_path):
    """1m from 06:05 (initial_interval 4h), 1h from 10:10 (1m goes on to 11:00, final at 14:00:
    revision_window 3h), 1h's first page at 13:10 skips 11:00 but has 12:00 (delivered, its
    observation kept, the cursor still at 11:00: a gap), then 1m again at 13:15. 1h had read
    something: the change back waits for 1m's old range, 1h goes on. Taken for a width that had
    collected nothing, it was undone: 1h dropped at 11:00 and 1m read 12:00-13:00 again, those
    minutes delivered twice (once in 1h's 12:00 bucket)."""
    from dataclasses import replace as _replace

    from agent_input.config import StreamConfig
    from agent_input.state import StateStore

    class Gap(WidthApi):
        skip: set[int] = set()

        def get_json(self, path, params):
            page = super().get_json(path, params)
            page["data"] = [b for b in page["data"] if b["start_time"] not in self.skip]
            return page

    api, day = Gap(), ts("2026-11-23T00:00:00")
    for m in range(day - 86400, day + 86400, 60):
        api.minutes[m] = 1
    out = io.BytesIO()
    base = StreamConfig(name="completions", enabled=True, interval=300, initial_interval=4 * 3600,
                        bucket_width="1m", finalization_grace=0, revision_window=3 * 3600, batch_size=None,
                        include_archived=False)
    plan = ((10 * 3600 + 300, "1m", set()), (10 * 3600 + 600, "1h", set()), (13 * 3600 + 600, "1h", {day + 11 * 3600}),
            (13 * 3600 + 900, "1m", set()), (14 * 3600 + 1800, "1m", set()), (16 * 3600, "1m", set()),
            (18 * 3600, "1m", set()))
    for at, width, skip in plan:
        now = day + at
        store, api.skip = StateStore(tmp_path / "state"), skip
        UsageCollector(STREAMS_BY_NAME["completions"], _replace(base, bucket_width=width), api,
                       Delivery(store, NdjsonOutput(out)), clock=lambda: now).poll(now)
        if (width, skip) == ("1h", {day + 11 * 3600}):
            assert store.cursor("completions", "1h").position == day + 11 * 3600  # the gap: not moved
            assert store.first_observation("completions", "1h") == day + 12 * 3600
        store.close()
    ids = [d["_id"] for d in docs(out)]
    assert len(ids) == len(set(ids))
    lo, hi = day + 6 * 3600 + 300, day + 17 * 3600
    tokens = {}
    for d in docs(out):
        start = ts(d["openai"]["base"]["start_time"][:19])
        if lo <= start < hi:
            tokens[d["openai"]["base"]["bucket_width"]] = (tokens.get(d["openai"]["base"]["bucket_width"], 0)
                                                           + d["openai"]["completions"]["input_tokens"])
    assert sum(tokens.values()) == (hi - lo) // 60, tokens
    assert tokens["1h"] == 3 * 60  # 11:00-14:00: 1h went on until 1m's old range was final (14:00)


def test_a_page_without_has_more_is_not_taken_for_the_last_one(harness):
    """The reference requires `has_more`. A page without it was read as the listing's last: its
    last bucket, whose other results were on the next page, was emitted as whole, the cursor
    passed it, and the rest of it was never asked for, with nothing said. It fails the poll as a
    page without `data` does; the cursor stays and the next poll reads the whole bucket."""
    h = harness(effective_revision_window=0, initial_interval=60)
    now = ts("2026-11-23T10:00:00")
    bucket = {"object": "bucket", "start_time": now - 60, "end_time": now}
    pages = {None: {"object": "page", "data": [dict(bucket, results=[result(5, model="a")])], "next_page": "p2"},
             "p2": {"object": "page", "data": [dict(bucket, results=[result(7, model="b")])], "has_more": False,
                    "next_page": None}}
    h.api.get_json = lambda path, params: pages[params.get("page")]
    with pytest.raises(BadPage, match="no boolean `has_more`"):
        h.collector.poll(now)
    assert docs(h.out) == [] and h.store.cursor("completions", "1m").position == now - 60
    pages[None]["has_more"] = True
    h.collector.poll(now + 1)
    assert sorted(d["openai"]["completions"]["input_tokens"] for d in docs(h.out)) == [5, 7]


@pytest.mark.parametrize("field, value, says", [
    ("batch", "yes", "`batch` is 'yes', not a boolean"),  # Elasticsearch's `boolean` refused the document
    ("batch", 1, "`batch` is 1, not a boolean"),
    ("project_id", True, "`project_id` is True, not a string"),  # was stored as the keyword "true"
    ("service_tier", False, "`service_tier` is False, not a string"),
])
def test_a_dimension_of_another_type_than_the_reference_s_is_a_bad_bucket(harness, field, value, says):
    """Each dimension has the reference's type: `batch` a boolean, the others strings (or null). A
    boolean passed for any of them and a string for `batch`: `batch: "yes"` made Elasticsearch
    refuse the whole document (mapped `boolean`), after the cursor had passed it."""
    h = harness(effective_revision_window=0, initial_interval=180)
    now = ts("2026-11-23T10:00:00")
    h.api.data[now - 180] = [result(1)]
    h.api.data[now - 120] = [result(2, **{field: value})]
    h.api.data[now - 60] = [result(3, batch=True, service_tier="priority")]
    stats = h.collector.poll(now)
    assert stats.bad_buckets == 1 and says in stats.errors[0]
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [1, 3]
    assert h.store.cursor("completions", "1m").position == now - 120  # before it: read again
    # the slow path (a result that is not a plain dict) judges alike
    from agent_input.engine import BadBucket, checked_counters
    with pytest.raises(BadBucket, match=re.escape(says)):
        checked_counters(STREAMS_BY_NAME["completions"], result(2, **{field: value}))
    assert checked_counters(STREAMS_BY_NAME["completions"], result(3, batch=True))["input_tokens"] == 3


@pytest.mark.parametrize("value", [{"type": "completions"}, ["organization.usage.completions.result"], 5])
def test_a_result_whose_object_is_not_a_string_is_a_bad_bucket(harness, value):
    """A result's `object` is its document's openai.base.usage_object_type, a keyword: an object
    there made Elasticsearch refuse the whole document after the cursor had passed it. The
    reference's `object` is a string; anything else is reported and read again."""
    h = harness(effective_revision_window=0, initial_interval=120)
    now = ts("2026-11-23T10:00:00")
    h.api.data[now - 120] = [result(1)]
    h.api.data[now - 60] = [result(2, object=value)]
    stats = h.collector.poll(now)
    assert stats.bad_buckets == 1 and "`object` is" in stats.errors[0] and "not a string" in stats.errors[0]
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [1]
    assert h.store.cursor("completions", "1m").position == now - 60
    h.api.data[now - 60] = [result(2, object=None)]  # absent or null: the document only lacks it
    h.collector.poll(now + 1)
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [1, 2]


def test_a_counter_with_a_fraction_is_a_bad_bucket_and_a_whole_float_its_integer(harness):
    """The reference's usage counters are integers, mapped `long`: Elasticsearch cut 1.5 tokens
    to 1 and the stored sums fell short of OpenAI's, with nothing said. A fraction is a bad bucket,
    reported and read again; `7.0` is the same JSON number as 7 and is taken as it. Costs' amounts
    and quantities are numbers: a fraction there is their value."""
    h = harness(effective_revision_window=0, initial_interval=180)
    now = ts("2026-11-23T10:00:00")
    h.api.data[now - 180] = [result(1)]
    h.api.data[now - 120] = [result(1.5)]
    h.api.data[now - 60] = [result(7.0, output_tokens=2.0)]
    stats = h.collector.poll(now)
    assert stats.bad_buckets == 1 and "`input_tokens` is 1.5, not an integer" in stats.errors[0]
    got = docs(h.out)
    assert [d["openai"]["completions"]["input_tokens"] for d in got] == [1, 7]
    assert type(got[1]["openai"]["completions"]["input_tokens"]) is int and got[1]["openai"]["base"]["usage_tokens"] == 9
    assert h.store.cursor("completions", "1m").position == now - 120
    from agent_input.engine import checked_counters
    cost = {"object": "organization.costs.result", "amount": {"value": 0.25, "currency": "usd"}, "quantity": 1.5}
    assert checked_counters(STREAMS_BY_NAME["costs"], cost) == {"amount.value": 0.25, "quantity": 1.5}


class SkewedApi(FakeApi):
    """Buckets up to OpenAI's own `now` (the one in progress included, as the real API does), and
    that time in `server_date`, as the client keeps it from the `Date` header."""

    def __init__(self, now: int):
        super().__init__()
        self.now = now

    @property
    def server_date(self) -> int:
        return self.now

    def get_json(self, path, params):
        end = min(params["end_time"], self.now // self.width * self.width + self.width)
        if end <= int(params.get("page") or params["start_time"]):
            return super().get_json(path, {**params, "end_time": int(params.get("page") or params["start_time"])})
        return super().get_json(path, {**params, "end_time": end})


def test_a_bad_bucket_s_report_is_one_short_line_whatever_the_result_s_strings(harness, caplog):
    """A bad bucket's report names the result by its first string fields, which were written as
    the API sent them: a model name with a line break made the one-line report two (the second
    reading as a line of its own in the text log), one of 5,000 characters a report of 5 kB.
    They are escaped and cut; the report still names the field that is wrong."""
    h = harness(effective_revision_window=0, initial_interval=60)
    now = ts("2026-11-23T10:00:00")
    h.api.data[now - 60] = [result(1.5, model="gpt-4o\nERROR forged line " + "x" * 5000)]
    with caplog.at_level(logging.WARNING, logger="agent_input.engine"):
        stats = h.collector.poll(now)
    assert stats.bad_buckets == 1
    (report,) = stats.errors
    assert "`input_tokens` is 1.5, not an integer" in report and "model=gpt-4o\\nERROR forged" in report
    assert "\n" not in report and len(report) < 400, report
    assert [r.getMessage() for r in caplog.records if "does not match" in r.getMessage()] == [report]


@pytest.mark.parametrize("field,value", [("start_time", "x\n" * 3000), ("end_time", list(range(3000)))])
def test_a_bad_bucket_time_s_report_is_one_short_line(harness, caplog, field, value):
    """A bucket time that is not an integer was named whole in the report: a `start_time` of 3,000
    lines was a WARNING of 9 kB (an `end_time` array of 3,000 numbers, 17 kB). It is cut."""
    h = harness(effective_revision_window=0, initial_interval=60)
    now = ts("2026-11-23T10:00:00")
    bucket = {"object": "bucket", "start_time": now - 60, "end_time": now, "results": [result(9)]}
    bucket[field] = value
    h.api.override = {"object": "page", "data": [bucket], "has_more": False, "next_page": None}
    with caplog.at_level(logging.WARNING, logger="agent_input.engine"):
        stats = h.collector.poll(now)
    assert stats.bad_buckets == 1
    (report,) = stats.errors
    assert "start_time/end_time are not integers" in report
    assert "\n" not in report and len(report) < 300, report[:300]
    assert [r.getMessage() for r in caplog.records if "does not match" in r.getMessage()] == [report]


@pytest.mark.parametrize("lead", [2 * 3600, 6 * 3600, 86400])
def test_a_host_clock_ahead_of_openai_s_takes_no_bucket_as_final_before_openai_does(harness, caplog, lead):
    """The revision window is OpenAI's: 6 hours ahead (3h window), the local clock took the
    minutes OpenAI had just served, the one in progress among them, as final, emitted once and
    never read again; their late revisions were lost."""
    api = SkewedApi(ts("2026-11-23T10:00:30"))
    h = harness(api, effective_revision_window=3 * 3600, initial_interval=2 * 86400)
    skew = [lead]
    h.collector.clock = lambda: api.now + skew[0]
    x = ts("2026-11-23T09:59:00")
    api.data[x] = [result(5)]
    api.data[x + 60] = [result(2)]  # in progress
    with caplog.at_level(logging.WARNING, logger="agent_input.engine"):
        h.collector.poll(api.now + lead)
    api.now += 1800  # both revised by OpenAI within its revision window
    api.data[x] = [result(8)]
    api.data[x + 60] = [result(9)]
    h.collector.poll(api.now + lead)
    api.now += 4 * 3600  # the clocks agree again, past the revision window
    skew[0] = 0
    h.collector.poll(api.now)
    by_bucket: dict = {}
    for d in dedupe(docs(h.out)):
        start = d["openai"]["base"]["start_time"]
        by_bucket[start] = by_bucket.get(start, 0) + d["openai"]["completions"]["input_tokens"]
    assert by_bucket == {iso_timestamp(x): 8, iso_timestamp(x + 60): 9}
    assert h.store.cursor("completions", "1m").settled >= x + 120
    said = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
    assert len(said) == 1 and "ahead of OpenAI's" in said[0] and "NTP" in said[0]


@pytest.mark.parametrize("lead", [6 * 3600, 86400])
def test_a_bucket_first_read_after_the_first_run_on_a_clock_ahead_is_read_again_while_openai_may_revise_it(
        harness, lead):
    """Past the first run (whose start is asked again from OpenAI's time), a bucket read for the first
    time on a host hours ahead is final by OpenAI's revision window, not the host's: taken as final
    by the host's, it was emitted once, the cursor settled past it, and its revision never read."""
    api = SkewedApi(ts("2026-11-23T10:00:30"))
    h = harness(api, effective_revision_window=3 * 3600, initial_interval=2 * 86400)
    h.collector.clock = lambda: api.now + lead
    x = ts("2026-11-23T10:10:00")
    h.collector.poll(api.now + lead)  # the first run: nothing at x yet
    api.now += 1800
    api.data[x] = [result(5)]
    h.collector.poll(api.now + lead)  # x read for the first time
    api.now += 1800
    api.data[x] = [result(7)]  # revised by OpenAI, well inside its revision window
    h.collector.poll(api.now + lead)
    assert sum(d["openai"]["completions"]["input_tokens"] for d in dedupe(docs(h.out))) == 7


def test_a_host_clock_far_from_openai_s_is_said_once_by_a_stream_that_changed_width(tmp_path, caplog):
    """1m, then 1h from 10:10 (1m goes on to 11:00), on a host 2 hours ahead of OpenAI's Date:
    the width left, polled inside the stream's poll, is the same stream, yet it said the WARNING
    as well: twice for one stream."""

    class Dated(WidthApi):
        server_date = ts("2026-11-23T10:10:00")

    api = Dated()
    collector, t = _width_changes(tmp_path, api)
    hourly = collector("1h")
    with caplog.at_level(logging.WARNING, logger="agent_input.engine"):
        for later in (600, 900, 1200):
            hourly.clock = lambda later=later: t + 2 * 3600 + later
            api.server_date = t + later
            hourly.poll(t + 2 * 3600 + later)
    said = [r.getMessage() for r in caplog.records if "this host's clock" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("completions: ") and "2h ahead of" in said[0], said


def test_a_host_clock_within_minutes_of_openai_s_is_not_warned_about(harness, caplog):
    api = SkewedApi(ts("2026-11-23T10:00:30"))
    h = harness(api)
    skew = [60]
    h.collector.clock = lambda: api.now + skew[0]
    api.data[ts("2026-11-23T09:59:00")] = [result(5)]
    with caplog.at_level(logging.WARNING, logger="agent_input.engine"):
        h.collector.poll(api.now + 60)
        skew[0] = -60
        h.collector.poll(api.now - 60)
    assert not [r for r in caplog.records if "clock" in r.getMessage()]


# (OpenAI's Date on the very second its latest bucket starts: that bucket is served, and the Date
# is still OpenAI's clock, not a proxy's behind what it served)
@pytest.mark.parametrize("lead,openai_now", [(2 * 3600, "10:00:30"), (86400, "10:00:30"), (2 * 3600, "10:00:00")])
def test_a_first_run_on_a_host_clock_ahead_of_openai_s_starts_initial_interval_before_openai_s_time(
        harness, lead, openai_now):
    """A day ahead with a 3h initial_interval, the first run started 21 hours in OpenAI's future:
    nothing there to read, and what OpenAI recorded until it reached that start was never read."""
    api = SkewedApi(ts(f"2026-11-23T{openai_now}"))
    h = harness(api, initial_interval=3 * 3600)
    skew = [lead]
    h.collector.clock = lambda: api.now + skew[0]
    early, late = ts("2026-11-23T07:30:00"), ts("2026-11-23T11:00:00")
    api.data[early] = [result(5)]
    api.data[late] = [result(7)]  # recorded after the first run, before OpenAI reaches its old start
    h.collector.poll(api.now + lead)
    assert h.store.cursor("completions", "1m").origin == ts("2026-11-23T07:00:00")
    api.now += 4 * 3600  # the clocks agree again
    skew[0] = 0
    h.collector.poll(api.now)
    by_bucket = {d["openai"]["base"]["start_time"]: d["openai"]["completions"]["input_tokens"]
                 for d in dedupe(docs(h.out))}
    assert by_bucket == {iso_timestamp(early): 5, iso_timestamp(late): 7}


def test_a_first_run_a_second_ahead_of_openai_s_clock_across_a_boundary_is_not_asked_again(harness):
    """A Date has whole seconds: a host a second ahead across a minute's boundary put the start a
    bucket after initial_interval before OpenAI's time, and the first listing (a backfill's first
    pages) was thrown away and asked again for that one minute, which the asked range leaves
    out by the same second on a host in step."""
    api = SkewedApi(ts("2026-11-23T10:00:59"))
    h = harness(api, initial_interval=3 * 3600)
    h.collector.clock = lambda: api.now + 1
    h.collector.poll(api.now + 1)
    assert [c["start_time"] for c in api.calls] == [ts("2026-11-23T07:01:00")]
    assert h.store.cursor("completions", "1m").origin == ts("2026-11-23T07:01:00")


@pytest.mark.parametrize("width", ["1h", "1d"])
def test_a_first_run_in_step_with_openai_s_clock_across_an_hour_or_day_boundary_is_not_asked_again(harness, width):
    """The lead was judged by the two starts, which differ by a whole bucket across a boundary: at
    1h or 1d a host less than a second ahead of a Date (whole seconds) at midnight threw its first
    listing away and asked it again from an hour or a day further back."""
    w = {"1h": 3600, "1d": 86400}[width]
    midnight = ts("2026-11-23T00:00:00")
    api = SkewedApi(midnight - 1)  # OpenAI's Date 23:59:59, this host at 00:00:00.4
    api.width = w
    h = harness(api, bucket_width=width, initial_interval=3 * w, effective_revision_window=w)
    h.collector.clock = lambda: midnight + 0.4
    h.collector.poll(midnight + 0.4)
    assert [c["start_time"] for c in api.calls] == [midnight - 3 * w]
    assert h.store.cursor("completions", width).origin == midnight - 3 * w


@pytest.mark.parametrize("lead", [90, 400])
def test_a_first_run_whose_start_is_past_openai_s_time_or_that_far_ahead_is_asked_again(harness, lead):
    """The start past OpenAI's time (1m asked, 90 s ahead) would never read the usage between;
    a lead over CLOCK_WARNING is put right however short the initial_interval asked."""
    api = SkewedApi(ts("2026-11-23T10:00:30"))
    h = harness(api, initial_interval=60 if lead == 90 else 3 * 3600)
    h.collector.clock = lambda: api.now + lead
    h.collector.poll(api.now + lead)
    starts = [c["start_time"] for c in api.calls]
    assert len(starts) == 2 and starts[1] == _floor_to(api.now - (60 if lead == 90 else 3 * 3600), 60)


def test_a_date_behind_buckets_openai_served_is_not_taken_as_openai_s_clock(harness, caplog):
    """OpenAI serves no bucket after its own time: a Date a year behind the buckets served (a
    proxy's clock) would have started a first run a year back, and kept every bucket since
    revisable, re-read at every poll."""

    class StaleDate(SkewedApi):
        server_date = ts("2025-11-23T10:00:00")

    api = StaleDate(ts("2026-11-23T10:00:30"))
    h = harness(api, initial_interval=3 * 3600, effective_revision_window=3 * 3600)
    h.collector.clock = lambda: api.now
    api.data[ts("2026-11-23T09:00:00")] = [result(5)]
    with caplog.at_level(logging.WARNING, logger="agent_input.engine"):
        h.collector.poll(api.now)
        api.now += 4 * 3600
        h.collector.poll(api.now)
    cur = h.store.cursor("completions", "1m")
    assert cur.origin == ts("2026-11-23T07:00:00") and cur.settled == ts("2026-11-23T11:00:00")
    api.now += 300
    h.collector.poll(api.now)
    assert api.calls[-1]["start_time"] == ts("2026-11-23T11:00:00")  # not from 07:00 again
    assert not [r for r in caplog.records if "clock" in r.getMessage()]


@pytest.mark.parametrize("later", [0, 5 * 3600, 3 * 86400])
def test_a_start_a_failed_first_run_kept_on_a_host_clock_ahead_is_moved_back_by_the_lead(harness, later):
    """The start a failed first run kept was taken on the local clock, a day ahead (07:00 the next
    day, 3h asked). The next run at once went on from there, in OpenAI's future, and lost what came
    before it; 5 hours later it was asked again from initial_interval before its own Date (12:00):
    the 5 hours between never read; 3 days later it was not asked again at all, and the day the
    kept start lay in OpenAI's future was never read. It is moved back by the lead."""
    api = SkewedApi(ts("2026-11-23T10:00:30"))
    h = harness(api, initial_interval=3 * 3600)
    h.collector.clock = lambda: api.now + 86400
    early = ts("2026-11-23T07:30:00")
    api.data[early] = [result(5)]
    api.fail_on = (1, ConnectionError("OpenAI down"))
    with pytest.raises(ConnectionError):
        h.collector.poll(api.now + 86400)  # no answer, so no Date: the start is the local clock's
    assert h.store.cursor("completions", "1m").origin == ts("2026-11-24T07:00:00")
    api.now += later
    h.collector.poll(api.now + 86400)
    assert h.store.cursor("completions", "1m").origin == ts("2026-11-23T07:00:00")
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [5]


@pytest.mark.parametrize("lead", [86400, 0])
@pytest.mark.parametrize("how", ["stop", "failed", "held"])
def test_a_start_kept_as_a_first_run_is_asked_again_is_moved_back_by_the_lead_once(harness, how, lead):
    """A first run a day ahead (3h asked) threw its first listing away to ask again from OpenAI's
    time (07:00), and was stopped before it asked, or the listing asked again failed, or its
    writes were held by the organization check. That start was kept by OpenAI's time, moved back
    already, and the next run 5 hours later moved it back by the lead once more: it read from
    07:00 the day before, 27 hours, a bucket of 12:00 that day delivered though never asked for.
    It is not moved back again (nor kept on this host's clock: the next run, on a clock set right
    meanwhile, would read from 07:00 that day's morrow, the day between lost)."""
    import threading

    from agent_input.org_guard import OrganizationUnverified

    api = SkewedApi(ts("2026-11-23T10:00:30"))
    h = harness(api, initial_interval=3 * 3600)
    h.collector.clock = lambda: api.now + 86400
    h.collector.stop = stop = threading.Event()
    api.data[ts("2026-11-23T07:30:00")] = [result(5)]
    api.data[ts("2026-11-22T12:00:00")] = [result(7)]  # a day before the start asked
    answer = api.get_json

    def stopped_as_it_answers(path, params):
        page = answer(path, params)
        stop.set()
        return page

    def held():
        raise OrganizationUnverified("the projects listing failed")

    if how == "stop":
        api.get_json = stopped_as_it_answers
        h.collector.poll(api.now + 86400)
    else:
        if how == "failed":
            api.fail_on = (2, ConnectionError("OpenAI down"))
        else:
            h.store.write_check = held
        with pytest.raises((ConnectionError, OrganizationUnverified)):
            h.collector.poll(api.now + 86400)
    assert len(api.calls) == 1 + (how != "stop")
    api.get_json, api.fail_on, h.store.write_check = answer, None, None
    api.now += 5 * 3600
    h.collector.stop = threading.Event()
    h.collector.clock = lambda: api.now + lead
    h.collector.poll(api.now + lead)
    assert h.store.cursor("completions", "1m").origin == ts("2026-11-23T07:00:00")
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [5]


def test_a_first_run_stopped_before_it_asked_again_from_openai_s_time_keeps_that_start(harness):
    """A stop (SIGTERM) as the first answer of a first run a day ahead came: the listing was thrown
    away to be asked again, nothing was stored, and the next run, 5 hours later, started from its
    own later start, the 5 hours before it never read."""
    import threading

    api = SkewedApi(ts("2026-11-23T10:00:30"))
    h = harness(api, initial_interval=3 * 3600)
    h.collector.clock = lambda: api.now + 86400
    h.collector.stop = stop = threading.Event()
    early = ts("2026-11-23T07:30:00")
    api.data[early] = [result(5)]
    answer = api.get_json

    def stopped_as_it_answers(path, params):
        page = answer(path, params)
        stop.set()
        return page

    api.get_json = stopped_as_it_answers
    h.collector.poll(api.now + 86400)
    assert len(api.calls) == 1
    assert h.store.cursor("completions", "1m").origin == ts("2026-11-23T07:00:00")
    api.get_json, api.now = answer, api.now + 5 * 3600
    h.collector.stop = threading.Event()
    h.collector.poll(api.now + 86400)
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [5]


def test_a_first_run_asked_again_counts_the_request_but_not_the_page_thrown_away(harness):
    """The first listing of a first run asked again from OpenAI's time is a request made (the
    `requests` of `collect --once`'s summary and the poll's INFO line), but none of its page is
    used: it was counted among the poll's pages read too (the page gate's estimate of the pages
    left, a looping listing's 'stopped after N pages'), and its documents are not counted."""
    api = SkewedApi(ts("2026-11-23T10:00:30"))
    h = harness(api, initial_interval=3 * 3600)
    h.collector.clock = lambda: api.now + 400
    api.data[ts("2026-11-23T07:30:00")] = [result(5)]
    api.data[ts("2026-11-23T07:10:00")] = [result(3)]  # only in the listing asked again
    stats = h.collector.poll(api.now + 400)
    assert len(api.calls) == 2
    assert (stats.requests, stats.pages) == (2, 1)
    assert stats.events == len(docs(h.out)) == 2


@pytest.mark.parametrize("how", ["failed", "held", "stopped"])
def test_a_start_kept_by_openai_s_time_is_not_moved_back_by_the_lead_again(harness, how):
    """A first run a day ahead (3h asked) asks again from 07:00 by OpenAI's Date; that listing
    failed, the organization check held its writes, or a stop came first: the start kept (or held)
    is by OpenAI's time already, yet each next run moved it back by the day's lead once more, a
    day further back at every poll (3 polls: 3 days more than asked, read from 2026-11-20). A
    kept start is a run's of `collect --once` too: a new process each time."""
    import threading
    from agent_input.org_guard import OrganizationUnverified

    api = SkewedApi(ts("2026-11-23T10:00:30"))
    api.data[ts("2026-11-23T07:30:00")] = [result(5)]
    answer = api.get_json
    runs = []

    def refused(path, params):
        page = answer(path, params)
        if how == "stopped":
            runs[-1].collector.stop.set()
        elif how == "failed" and params["start_time"] < ts("2026-11-24T00:00:00"):  # asked again: fails
            raise ConnectionError("OpenAI down")
        return page

    def held(*args, **kwargs):
        raise OrganizationUnverified("the organization cannot be verified")

    api.get_json = refused
    for _ in range(3):
        if how != "held" or not runs:  # held: kept in memory, by the process that goes on
            if runs:
                runs[-1].store.close()
            runs.append(harness(api, initial_interval=3 * 3600))
        h = runs[-1]
        h.collector.clock = lambda: api.now + 86400
        h.collector.stop = threading.Event()
        if how == "held":
            h.collector.delivery.commit_page = held
        try:
            h.collector.poll(api.now + 86400)
        except (ConnectionError, OrganizationUnverified):
            pass
        api.now += 300
    api.get_json = answer
    if how == "held":
        h = runs[-1]
        del h.collector.delivery.commit_page
    else:
        runs[-1].store.close()
        h = harness(api, initial_interval=3 * 3600)
    h.collector.clock = lambda: api.now + 86400
    h.collector.stop = threading.Event()
    h.collector.poll(api.now + 86400)
    assert min(c["start_time"] for c in api.calls) == ts("2026-11-23T07:00:00")
    assert h.store.cursor("completions", "1m").origin == ts("2026-11-23T07:00:00")
    delivered = [d for run in {id(r): r for r in runs + [h]}.values() for d in docs(run.out)]
    assert [d["openai"]["completions"]["input_tokens"] for d in delivered] == [5]


@pytest.mark.parametrize("how", ["held", "failed"])
def test_a_start_a_first_run_kept_with_the_clocks_in_step_is_not_moved_back_by_a_later_lead(harness, how):
    """A first run with the clocks in step (3h asked, OpenAI's Date agreeing) reads its first page,
    and the organization check holds its writes (or its listing's next page fails, its first page
    empty of buckets). That start was checked against OpenAI's Date, yet the next run, its clock
    stepped a day ahead, took it for one kept on a clock ahead and moved it back by the day: read
    from a day before the 3 hours asked."""
    from agent_input.org_guard import OrganizationUnverified

    api = SkewedApi(ts("2026-11-23T10:00:30"))
    api.data[ts("2026-11-23T07:30:00")] = [result(5)]
    h = harness(api, initial_interval=3 * 3600)
    lead = [0]
    h.collector.clock = lambda: api.now + lead[0]
    if how == "held":
        def held():
            raise OrganizationUnverified("the organization cannot be verified")

        h.store.write_check = held
    else:
        api.override = {"object": "page", "data": [], "has_more": True, "next_page": str(api.now)}
        api.fail_on = (2, ConnectionError("OpenAI down"))
    with pytest.raises((OrganizationUnverified, ConnectionError)):
        h.collector.poll(api.now)
    h.store.write_check, api.override, api.fail_on = None, None, None
    api.now += 300
    lead[0] = 86400  # the host's clock stepped a day ahead
    if how == "failed":  # kept in the state: a new process (`collect --once`) as well
        h.store.close()
        h = harness(api, initial_interval=3 * 3600)
        h.collector.clock = lambda: api.now + lead[0]
    h.collector.poll(api.now + 86400)
    assert min(c["start_time"] for c in api.calls) == ts("2026-11-23T07:00:00")
    assert h.store.cursor("completions", "1m").origin == ts("2026-11-23T07:00:00")
    assert [d["openai"]["completions"]["input_tokens"] for d in docs(h.out)] == [5]
