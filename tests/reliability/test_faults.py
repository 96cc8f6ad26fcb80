"""Fault injection from the simulator into the real client and engine: 429 storms (Retry-After
honoured and counted), 5xx bursts, connection resets, responses slower than the timeout, a page of
malformed JSON, a page whose results violate the spec, a rate limits page whose items do (its paging
intact). Every good bucket or limit is delivered, each bad one is reported with what was wrong, nothing crashes, and the cursor never moves past a bucket that was
not delivered.

Reads are made 2h after the buckets end (finalization grace) with no revision window, so what is
read is final and nothing is re-read later: a bucket the cursor skipped would stay missing."""
from __future__ import annotations

import io
import json
import threading
import time
from types import SimpleNamespace

import pytest

from agent_input.engine import Delivery, Engine, UsageCollector
from agent_input.http_client import AdminApiClient, ApiError
from agent_input.outputs import NdjsonOutput
from agent_input.simulator import FaultRule
from agent_input.state import StateStore
from agent_input.streams import STREAMS_BY_NAME

from conftest import ADMIN_KEY, T0, dedupe, stored_totals, truth_totals

STREAMS = ("completions", "embeddings")
START, END = int(T0 - 4 * 3600), int(T0 - 2 * 3600)


class Harness:
    def __init__(self, sim, tmp_path, *, timeout: float = 5.0, max_retries: int = 4):
        self.sim = sim
        sim.max_results_per_page = 40  # several pages per stream: faults can hit a middle one
        self.sleeps: list[float] = []
        self.store = StateStore(tmp_path / "state")
        self.out = io.BytesIO()
        self.delivery = Delivery(self.store, NdjsonOutput(self.out))
        self.clients, self.collectors = [], []
        for name in STREAMS:
            client = AdminApiClient(sim.base_url, ADMIN_KEY, timeout=timeout, max_retries=max_retries,
                                    backoff_base=0.01, backoff_cap=0.02, sleep=self.sleeps.append)
            cfg = SimpleNamespace(name=name, bucket_width="1m", interval=300, initial_interval=4 * 3600,
                                  finalization_grace=2 * 3600, effective_revision_window=0)
            self.clients.append(client)
            self.collectors.append(UsageCollector(STREAMS_BY_NAME[name], cfg, client, self.delivery,
                                                  clock=sim.now))

    def poll_all(self) -> list:
        """Each stream once, as the engine would: an exception is a failed poll, not a crash."""
        results = []
        for c in self.collectors:
            try:
                results.append(c.poll(T0))
            except ApiError as exc:
                results.append(exc)
        return results

    def docs(self) -> list[dict]:
        return dedupe([json.loads(line) for line in self.out.getvalue().splitlines()])

    def delivered_starts(self, stream: str) -> set[int]:
        from datetime import datetime

        ds = STREAMS_BY_NAME[stream].dataset
        return {int(datetime.fromisoformat(d["openai"]["base"]["start_time"].replace("Z", "+00:00")).timestamp())
                for d in self.docs() if d["data_stream"]["dataset"] == ds}

    def assert_cursor_never_past_undelivered(self):
        """Every bucket with usage below a stream's cursor has been delivered."""
        for name in STREAMS:
            cur = self.store.cursor(name, "1m")
            if cur is None:
                continue
            busy = {b for b in range(START, cur.position, 60)
                    if truth_totals(self.sim, name, b, b + 60)}
            missing = busy - self.delivered_starts(name)
            assert not missing, f"{name}: cursor at {cur.position} is past undelivered buckets {sorted(missing)[:3]}"

    def assert_truth(self):
        self.sim.clear_faults()
        for _ in range(3):
            self.poll_all()
        docs = self.docs()
        for name in STREAMS:
            assert self.store.cursor(name, "1m").position == END
            assert stored_totals(docs, name, START, END) == truth_totals(self.sim, name, START, END), name
        assert self.store.pending_count() == 0

    def close(self):
        for c in self.clients:
            c.close()
        self.store.close()


@pytest.fixture
def h(simulator, tmp_path):
    harness = Harness(simulator, tmp_path)
    yield harness
    harness.close()


def test_429_storm_retry_after_is_honoured_and_counted(h):
    h.sim.add_fault(FaultRule(kind="429", path="usage/completions", count=4, retry_after=3))
    stats = h.poll_all()
    assert not any(isinstance(s, Exception) for s in stats)
    client = h.clients[0]
    assert client.stats.throttled == 4 and client.stats.retries == 4
    assert client.stats.retry_after_seconds_total == 12
    assert h.sleeps.count(3) == 4, "every Retry-After was slept in full"
    h.assert_truth()


def test_a_stop_ends_a_retry_after_wait_at_once_and_keeps_the_cursor(simulator, tmp_path):
    """OpenAI may ask for minutes (Retry-After) and the client retries eight times: a stop (SIGTERM,
    the agent's stop) must not wait that out, and must not be reported as a failed poll."""
    simulator.add_fault(FaultRule(kind="429", path="usage/completions", skip=1, count=None, retry_after=600))
    stop = threading.Event()
    store = StateStore(tmp_path / "state")
    delivery = Delivery(store, NdjsonOutput(io.BytesIO()))
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=8, stop=stop)
    cfg = SimpleNamespace(name="completions", bucket_width="1m", interval=300, initial_interval=4 * 3600,
                          finalization_grace=2 * 3600, effective_revision_window=0)
    simulator.max_results_per_page = 40
    engine = Engine([UsageCollector(STREAMS_BY_NAME["completions"], cfg, client, delivery, clock=simulator.now,
                                    stop=stop)], delivery, stop=stop, clock=simulator.now)
    runner = threading.Thread(target=engine.run, daemon=True)
    runner.start()
    deadline = time.monotonic() + 30
    while not simulator.stats()["by_status"].get("429") and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    runner.join(30)  # a liveness bound only: the wait it cuts short is 600 s
    assert not runner.is_alive(), "the stop waited for Retry-After"
    assert engine.failed == {} and engine.totals["completions"].errors == []
    assert client.stats.retry_after_seconds_total == 600  # the one wait that was begun
    first_page_end = store.cursor("completions", "1m").position
    assert START < first_page_end < END  # the first page is kept; nothing past the throttled one
    client.close()
    store.close()


def test_429_storm_longer_than_the_retries_keeps_the_cursor(h):
    h.sim.add_fault(FaultRule(kind="429", path="usage/completions", skip=1, count=50, retry_after=1))
    first = h.poll_all()
    assert isinstance(first[0], ApiError) and "throttled" in str(first[0])
    assert h.clients[0].stats.throttled == 5  # 1 try + 4 retries
    h.assert_cursor_never_past_undelivered()
    h.assert_truth()


@pytest.mark.parametrize("kind", ["500", "502", "503"])
def test_5xx_burst_is_retried(h, kind):
    h.sim.add_fault(FaultRule(kind=kind, path="usage/", skip=1, count=3))
    assert not any(isinstance(s, Exception) for s in h.poll_all())
    assert sum(c.stats.retries for c in h.clients) == 3
    h.assert_truth()


def test_connection_resets_are_retried(h):
    h.sim.add_fault(FaultRule(kind="reset", path="usage/", skip=2, count=3))
    assert not any(isinstance(s, Exception) for s in h.poll_all())
    assert sum(c.stats.retries for c in h.clients) == 3
    h.assert_truth()


def test_responses_slower_than_the_timeout_are_retried(simulator, tmp_path):
    h = Harness(simulator, tmp_path, timeout=0.3)
    try:
        simulator.add_fault(FaultRule(kind="slow", path="usage/embeddings", skip=1, count=2, delay=1.0))
        assert not any(isinstance(s, Exception) for s in h.poll_all())
        assert h.clients[1].stats.retries == 2
        h.assert_truth()
    finally:
        h.close()


def test_a_malformed_json_page_fails_the_poll_and_keeps_the_cursor(h):
    h.sim.add_fault(FaultRule(kind="malformed_json", path="usage/completions", skip=2, count=1))
    first = h.poll_all()
    assert isinstance(first[0], ApiError) and "not JSON" in str(first[0])
    assert not isinstance(first[1], Exception)
    # the first two pages were stored; the cursor stops where the bad page began
    assert START < h.store.cursor("completions", "1m").position < END
    h.assert_cursor_never_past_undelivered()
    h.assert_truth()


def test_a_page_violating_the_spec_reports_each_bad_bucket_and_delivers_the_rest(h):
    h.sim.add_fault(FaultRule(kind="invalid_results", path="usage/completions", skip=1, count=1))
    first = h.poll_all()
    stats = first[0]
    assert stats.bad_buckets == 1
    assert any("not integers" in e or "not a number" in e or "lacks required" in e for e in stats.errors), stats.errors
    h.assert_cursor_never_past_undelivered()
    # the good buckets of that page and of the following pages were delivered in the same poll
    delivered = h.delivered_starts("completions")
    busy = {b for b in range(START, END, 60) if truth_totals(h.sim, "completions", b, b + 60)}
    assert len(busy - delivered) <= 1, "only the bad bucket may be missing"
    h.assert_truth()


def test_a_bad_bucket_is_logged_with_what_was_wrong_and_fails_a_once_run(h, caplog):
    """`collect` shows a bad bucket only through the log and the exit status: the log names the
    bucket and the fault (the summary row says only "1 bad bucket(s)"), and `--once` exits 1."""
    h.sim.add_fault(FaultRule(kind="invalid_results", path="usage/completions", skip=1, count=1))
    engine = Engine(h.collectors, h.delivery, clock=lambda: T0)
    with caplog.at_level("WARNING", logger="agent_input.engine"):
        assert engine.run(once=True) == 1
    assert "completions" in engine.failed and "does not match the API reference" in engine.failed["completions"]
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("completions: ") and "does not match the API reference" in m and
               ("not integers" in m or "not a number" in m or "lacks required" in m) for m in logged), logged


def test_results_with_nulls_wrong_types_and_missing_fields_are_named(h, monkeypatch):
    """The engine's own report for each kind of spec violation in a result."""
    col = h.collectors[0]
    base = {"object": "organization.usage.completions.result", "input_tokens": 1, "output_tokens": 2,
            "num_model_requests": 1, "project_id": "p", "user_id": None, "api_key_id": None,
            "model": "m", "batch": False}
    from agent_input.engine import BadBucket

    cases = {
        "null required": (dict(base, input_tokens=None), "lacks required `input_tokens`"),
        "missing required": ({k: v for k, v in base.items() if k != "output_tokens"}, "lacks required `output_tokens`"),
        "string counter": (dict(base, num_model_requests="3"), "`num_model_requests` is '3', not a number"),
        "bool counter": (dict(base, input_tokens=True), "not a number"),
        "nan counter": (dict(base, input_tokens=float("nan")), "not a number"),
        "dimension not a string": (dict(base, project_id=7), "`project_id` is 7, not a string"),
        "result not an object": ([1, 2], "a result is not an object"),
    }
    for name, (result, message) in cases.items():
        with pytest.raises(BadBucket, match=".*") as info:
            col._extract(result)
        assert message in str(info.value), (name, str(info.value))


def test_the_engine_reports_and_carries_on(h):
    """Through Engine.run: a failing stream is degraded with its reason, the other is healthy."""
    h.sim.add_fault(FaultRule(kind="500", path="usage/completions", count=None))
    statuses = []
    engine = Engine(h.collectors, h.delivery, clock=lambda: T0,
                    on_status=lambda s, st, r: statuses.append((s, st, r)))
    assert engine.run(once=True) == 1
    assert ("embeddings", "healthy", "") in statuses
    assert any(s == "completions" and st == "degraded" and "500" in r for s, st, r in statuses), statuses
    kept = h.store.cursor("completions", "1m")  # only the first poll's start: the next one reads from it
    assert kept is not None and kept.origin == kept.position == kept.settled
    h.assert_truth()


def test_a_cost_day_violating_the_spec_is_reported_with_what_was_wrong(simulator, tmp_path):
    """Costs go through the same bucket checks as usage but nest their counter (`amount.value`):
    the bad day is reported with its fault, the cursor stays before it, and it is read again."""
    simulator.max_results_per_page = 40
    store = StateStore(tmp_path / "state")
    out = io.BytesIO()
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1, backoff_base=0.01, backoff_cap=0.02)
    cfg = SimpleNamespace(name="costs", bucket_width="1d", interval=3600, initial_interval=5 * 86400,
                          finalization_grace=0, effective_revision_window=0)
    col = UsageCollector(STREAMS_BY_NAME["costs"], cfg, client, Delivery(store, NdjsonOutput(out)),
                         clock=simulator.now)
    try:
        simulator.add_fault(FaultRule(kind="invalid_results", path="costs", count=1))
        stats = col.poll(T0)
        assert stats.bad_buckets == 1
        assert any(e.startswith("costs: ") and "does not match the API reference" in e and "not integers" in e
                   for e in stats.errors), stats.errors
        cur = store.cursor("costs", "1d")
        assert cur is None or cur.position == cur.origin, "the cursor moved past the bad day"
        assert col.poll(T0).bad_buckets == 0  # read again, and stored
        assert any(b'"openai.costs"' in line for line in out.getvalue().splitlines())
    finally:
        client.close()
        store.close()


def test_a_rate_limits_429_storm_is_counted_in_the_stream_s_figures(simulator, tmp_path):
    """The limits are read on worker clients of their own: their 429s and Retry-After waits must
    reach the stream's client, which `collect --once`'s summary reads."""
    from agent_input.config import config_from_dict
    from agent_input.rate_limits import RateLimitsCollector

    cfg = config_from_dict({"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 2,
                            "data_streams": {"rate_limits": {}}}, env={})
    store = StateStore(tmp_path / "state")

    def client():
        return AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=4, backoff_base=0.001,
                              backoff_cap=0.002, sleep=lambda s: None)

    main = client()
    col = RateLimitsCollector(cfg, cfg.stream("rate_limits"), main, Delivery(store, NdjsonOutput(io.BytesIO())),
                              clock=simulator.now, client_factory=client)
    try:
        simulator.add_fault(FaultRule(kind="429", path="*/rate_limits", count=4, retry_after=2))
        stats = col.poll(T0)
        assert not stats.errors, stats.errors
        assert main.stats.throttled == 4 and main.stats.retry_after_seconds_total == 8
    finally:
        main.close()
        store.close()


def test_rate_limits_violating_the_spec_are_reported_and_the_rest_of_the_listing_stored(simulator, tmp_path,
                                                                                         monkeypatch):
    """Issue 6 for rate limits: a page of one project's limits whose items break the reference (one
    without `id`, one with "lots" for an integer; the page's paging intact: `invalid_items`) is
    reported item by item with the project, the limit and the field, the cycle counts them, and
    every other limit (of that page, the project's next pages and the other projects) is stored."""
    from agent_input import rate_limits
    from agent_input.config import config_from_dict
    from agent_input.rate_limits import RateLimitsCollector
    from agent_input.simulator.org import rate_limit_rows

    monkeypatch.setattr(rate_limits, "LIMITS_PAGE", 5)  # several pages per project: fault a middle one
    cfg = config_from_dict({"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 1,
                            "data_streams": {"rate_limits": {}}}, env={})
    store = StateStore(tmp_path / "state")
    out = io.BytesIO()
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1, backoff_base=0.01, backoff_cap=0.02)
    col = RateLimitsCollector(cfg, cfg.stream("rate_limits"), client, Delivery(store, NdjsonOutput(out)),
                              clock=simulator.now)
    projects = [p for p in simulator.org.projects if p.status == "active"]
    target = projects[0]
    rows = rate_limit_rows(simulator.org, target)
    assert len(rows) > 10
    bad_ids = {rows[5]["id"], rows[6]["id"]}  # the second page's first two items
    try:
        simulator.add_fault(FaultRule(kind="invalid_items", path=f"*/projects/{target.id}/rate_limits", skip=1,
                                      count=1))
        stats = col.poll(T0)
        docs = [json.loads(line) for line in out.getvalue().splitlines()]
        (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
        collection = status["openai"]["rate_limits"]["collection"]
        assert status["event"]["outcome"] == "success"
        assert collection["bad_limits"] == 2 and collection["failed_projects"] == 0, collection
        stored = {(d["openai"]["rate_limits"]["project_id"], d["openai"]["rate_limits"]["id"])
                  for d in docs if "model" in d["openai"]["rate_limits"]}
        want = {(p.id, r["id"]) for p in projects for r in rate_limit_rows(simulator.org, p)}
        assert stored == want - {(target.id, i) for i in bad_ids}
        assert collection["limits"] == len(stored)
        text = "\n".join(stats.errors)
        assert f"project {target.id}: limit #6 does not match the API reference" in text and "`id`" in text, text
        assert (f"project {target.id}: limit {rows[6]['id']!r} does not match the API reference, not stored: "
                "`max_requests_per_1_minute` is a string ('lots'), not an integer") in text, text
        assert len(stats.errors) == 2
        # the next cycle, without the fault, stores them and is clean
        out.truncate(0)
        out.seek(0)
        clean = col.poll(T0 + 300)
        assert clean.errors == []
        docs = [json.loads(line) for line in out.getvalue().splitlines()]
        assert {(d["openai"]["rate_limits"]["project_id"], d["openai"]["rate_limits"]["id"])
                for d in docs if "model" in d["openai"]["rate_limits"]} == want
    finally:
        client.close()
        store.close()


def test_an_audit_event_violating_the_spec_is_reported_with_its_id_and_the_field_at_fault(tmp_path):
    """README: an audit event that does not match the API reference is reported with its id and
    the field at fault, and the events around it are stored."""
    from test_audit import BAD_FIELDS, _AuditListing, _bad, _listing_collector, _session_event

    now = int(T0)
    api = _AuditListing([])
    api.now = now
    field, value, why = BAD_FIELDS[0]
    api.events = [_session_event(1, now - 900), _bad(2, now - 800, field, value), _session_event(3, now - 700)]
    col, store, output = _listing_collector(tmp_path, api)
    try:
        stats = col.poll(now)
        assert stats.events == 2
        (error,) = stats.errors
        assert "audit_log-2" in error and why in error, error
    finally:
        output.close()
        store.close()


@pytest.mark.parametrize("path", ["/v1/organization/audit_logs", "*/rate_limits", "/v1/organization/projects"])
def test_sigterm_while_an_audit_rate_limits_or_projects_request_hangs_exits_at_once(simulator, tmp_path, path):
    """Audit pages, the projects listing and the projects' rate limits were asked on the stream's
    thread (the limits on a ThreadPoolExecutor's, joined at exit), which the engine waits for: a
    SIGTERM while OpenAI sat on one exited only when the request ended (http_timeout: 30 s by
    default, up to 10 minutes). The stop now leaves the request in flight: nothing of it is stored,
    and a restart delivers exactly the truth (every stream, audit, one rate limits cycle per run)."""
    import os
    import subprocess
    import sys

    import yaml

    from agent_input.state import StateStore
    from conftest import read_ndjson, sigterm_once_asked
    from reliability_helpers import HOUR, SETTLE, compare_all, full_config
    from test_crash_matrix import assert_rate_limit_cycles, run_window

    simulator.set_time(T0)
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(full_config(simulator.base_url, initial="2h", rate_limits=True)))
    state, out = tmp_path / "state", tmp_path / "out.ndjson"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}

    def collect(now: float, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--state-dir", str(state),
             "--output-path", str(out), "--now", str(now), "--log-level", "ERROR", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    rule = FaultRule(kind="slow", path=path, count=None, delay=60)
    simulator.add_fault(rule)
    proc = collect(T0)
    err, took = sigterm_once_asked(proc, rule, settle=0.5)
    assert proc.returncode == 0, err.decode()[-2000:]  # README: a stop exits 0
    assert took < 5.0, f"the stop waited {took:.1f} s for the {path} request that hung"
    simulator.clear_faults()
    completed: list[tuple[int, int]] = []
    now, end_of_test = T0, T0 + SETTLE + 300
    while True:
        simulator.set_time(now)
        started = time.monotonic()
        run = collect(now, "--once")
        _, err = run.communicate(timeout=180)
        assert run.returncode == 0, err.decode()[-2000:]
        completed.append(run_window(now, time.monotonic() - started))
        if now >= end_of_test:
            break
        now = min(now + 1800, end_of_test)
    docs = dedupe(read_ndjson(out))
    store = StateStore(state)
    try:
        assert store.pending_count() == 0
        wrong = compare_all(simulator, docs, store, end_of_test=end_of_test, audit_since=T0 - 6 * HOUR)
    finally:
        store.close()
    assert not wrong, wrong
    assert_rate_limit_cycles(docs, completed)
