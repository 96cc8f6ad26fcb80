"""Done-when tests of the collector core against the simulator: exact totals through late
revisions with grace 0s and 15m, and SIGKILL at random points with a restart."""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent_input.config import config_from_dict
from agent_input.ecs import iso_timestamp
from agent_input.engine import Delivery, UsageCollector
from agent_input.http_client import AdminApiClient
from agent_input.outputs import NdjsonFileOutput
from agent_input.state import Cursor, StateStore
from agent_input.streams import STREAMS_BY_NAME, USAGE_STREAMS

from conftest import (ADMIN_KEY, T0, committed_batches, dedupe, first_poll_held, read_ndjson, started_simulator,
                      stored_totals, truth_totals, wait_for_commits)

HOUR = 3600
SETTLE = 2 * HOUR  # the simulator revises a minute bucket for at most 2 hours


def _config(url: str, grace: str, initial: str = "2h"):
    streams = {}
    for spec in USAGE_STREAMS:
        s = {"initial_interval": initial}
        if spec.has_grace:
            s["finalization_grace"] = grace
        streams[spec.name] = s
    for other in ("audit", "rate_limits", "costs"):
        streams[other] = {"enabled": False}
    return {"url": url, "api_key": ADMIN_KEY, "max_retries": 2, "data_streams": streams}


@pytest.mark.parametrize("grace", ["0s", "15m"])
def test_sums_equal_final_truth_through_late_revisions(simulator, tmp_path, grace):
    config = config_from_dict(_config(simulator.base_url, grace), env={})
    store = StateStore(tmp_path / "state")
    out = tmp_path / "events.ndjson"
    output = NdjsonFileOutput(out)
    delivery = Delivery(store, output)
    collectors = []
    for spec in USAGE_STREAMS:
        client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=2)
        collectors.append(UsageCollector(spec, config.stream(spec.name), client, delivery,
                                         clock=simulator.now))
    now = T0
    end_of_test = T0 + 3 * HOUR + 600
    corrections = 0
    while now <= end_of_test:
        simulator.set_time(now)
        for c in collectors:
            corrections += c.poll(now).corrections
        now += 300
    output.close()
    docs = dedupe(read_ndjson(out))
    assert corrections > 0, "the simulator should have revised buckets after first emission"
    origin = int(T0 - 2 * HOUR)
    settled = int(end_of_test - SETTLE) // 60 * 60
    for spec in USAGE_STREAMS:
        got = stored_totals(docs, spec.name, origin, settled)
        want = truth_totals(simulator, spec.name, origin, settled)
        assert want, f"{spec.name}: the simulator produced no usage"
        assert got == want, f"{spec.name}: stored sums differ from OpenAI's final counts"


def _completions(simulator, store, out, spec=None, initial="2h"):
    config = config_from_dict(_config(simulator.base_url, "0s", initial), env={})
    output = NdjsonFileOutput(out)
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=2)
    spec = spec or STREAMS_BY_NAME["completions"]
    return UsageCollector(spec, config.stream("completions"), client, Delivery(store, output),
                          clock=simulator.now), output


def test_completions_keep_openai_s_service_tiers_apart(simulator, tmp_path):
    """Grouped by service_tier, each tier's tokens stay their own (a priority tier costs more);
    without it the API adds the tiers together and leaves the field null."""
    out = tmp_path / "events.ndjson"
    collector, output = _completions(simulator, StateStore(tmp_path / "state"), out, initial="4h")
    simulator.set_time(T0 + SETTLE)
    collector.poll(T0 + SETTLE)  # the buckets of the two hours before T0 are final by now
    output.close()
    origin = int(T0 - 2 * HOUR)
    docs = [d for d in dedupe(read_ndjson(out)) if d["openai"]["base"]["start_time"] < "2025-11-23T10:00"]
    assert T0 == 1763892000  # 2025-11-23T10:00:00Z
    tiers: dict = {}
    for d in docs:
        tier = d["openai"]["completions"].get("service_tier")
        tiers[tier] = tiers.get(tier, 0) + d["openai"]["completions"]["input_tokens"]
    want = {k[0]: v["input_tokens"]
            for k, v in simulator.truth("completions", origin, int(T0), "1m", ("service_tier",)).items()
            if v.get("input_tokens")}
    assert len(want) > 1 and None not in tiers
    assert tiers == want


@pytest.mark.parametrize("kind", ["403", "401"])
def test_a_first_poll_refused_403_keeps_its_start_for_when_the_scope_is_granted(simulator, tmp_path, kind):
    """A key without api.usage.read at the stream's first start: once the scope is granted, hours
    later, the stream collects from where that first start asked, not from `initial_interval`
    before the day it was granted (the refused hours were lost, every total low). A key refused
    outright (401: revoked, mistyped) and fixed later keeps its start the same way."""
    from agent_input.http_client import AuthenticationError, PermissionDeniedError
    from agent_input.simulator.faults import FaultRule

    out = tmp_path / "events.ndjson"
    store = StateStore(tmp_path / "state")
    simulator.add_fault(FaultRule(kind=kind, path="usage/completions", count=None,
                                  message="Missing scopes: api.usage.read."))
    collector, output = _completions(simulator, store, out)
    simulator.set_time(T0)
    with pytest.raises(PermissionDeniedError if kind == "403" else AuthenticationError):
        collector.poll(T0)
    simulator.clear_faults()
    collector, output = _completions(simulator, store, out)  # the next start, the scope granted
    later = T0 + 4 * HOUR
    simulator.set_time(later)
    collector.poll(later)
    output.close()
    origin, settled = int(T0 - 2 * HOUR), int(later - SETTLE)
    docs = dedupe(read_ndjson(out))
    assert stored_totals(docs, "completions", origin, settled) == truth_totals(simulator, "completions", origin,
                                                                              settled)


@pytest.mark.parametrize("how", ["503", "stop"])
def test_a_first_poll_that_fails_keeps_its_start_for_the_next(simulator, tmp_path, how):
    """A first poll that fails before it stores anything, whatever the failure (OpenAI answering
    503 past the client's retries; a stop, Ctrl-C or a `run` reconfiguration, while its first page
    is awaited): the next poll, an hour later, reads from where the first one asked. Before, only a
    401/403 kept that start: the next poll began `initial_interval` before its own later `now`,
    and the first window's oldest hour was never read (every total low)."""
    import threading

    from agent_input.http_client import ApiError
    from agent_input.simulator.faults import FaultRule

    out = tmp_path / "events.ndjson"
    store = StateStore(tmp_path / "state")
    collector, output = _completions(simulator, store, out)
    simulator.set_time(T0)
    if how == "503":
        simulator.add_fault(FaultRule(kind="503", path="usage/completions", count=None))
    else:  # the first page takes long, and the collector is stopped meanwhile
        simulator.add_fault(FaultRule(kind="slow", path="usage/completions", count=None, delay=1.5))
        threading.Timer(0.3, collector.stop.set).start()
    with pytest.raises(ApiError):  # RetriesExhaustedError; StoppedError
        collector.poll(T0)
    output.close()
    simulator.clear_faults()
    assert not out.exists() or read_ndjson(out) == []  # nothing delivered
    docs = _next_poll_reads_from(simulator, *_completions(simulator, store, out), out, int(T0 - 2 * HOUR))
    assert len(docs) == len(read_ndjson(out)), "a document was delivered twice"


def _next_poll_reads_from(simulator, collector, output, out, origin):
    """The poll an hour after a failed first one at T0: its documents begin at `origin` (the first
    poll's start) and their totals equal the simulator's from there."""
    later = T0 + HOUR + SETTLE
    simulator.set_time(later)
    collector.poll(later)
    output.close()
    settled = int(later - SETTLE)
    docs = dedupe(read_ndjson(out))
    assert min(d["openai"]["base"]["start_time"] for d in docs) == iso_timestamp(origin)
    assert stored_totals(docs, "completions", origin, settled) == truth_totals(simulator, "completions", origin,
                                                                              settled)
    return docs


def test_a_first_poll_the_organization_check_holds_starts_where_it_asked(simulator, tmp_path):
    """The organization check holding writes (the projects listing failing) at a stream's first
    poll stores nothing, not even its start: the same process's next poll, an hour later once the
    check passes, reads from where the held poll asked. It used to start `initial_interval`
    before its own later `now`: the hour the check was held was never read (every total low)."""
    out = tmp_path / "events.ndjson"
    store = StateStore(tmp_path / "state")
    collector, output = _completions(simulator, store, out)
    first_poll_held(simulator, store, collector.poll)
    assert store.cursor("completions", "1m") is None  # nothing written while held
    _next_poll_reads_from(simulator, collector, output, out, int(T0 - 2 * HOUR))  # the same process's


def test_a_first_poll_that_fails_while_the_organization_check_holds_keeps_its_start(simulator, tmp_path):
    """OpenAI down for every endpoint at a stream's first poll: the usage page fails (503 past the
    retries) and keeping its start is a write the organization check holds too (the projects
    listing failing as well). That start was dropped (logged at debug): the same process's next
    poll, once OpenAI answers, began `initial_interval` before its own later `now` (totals low).
    It is kept in memory, as a poll the check itself held."""
    from agent_input.http_client import ApiError
    from agent_input.simulator.faults import FaultRule

    out = tmp_path / "events.ndjson"
    store = StateStore(tmp_path / "state")
    collector, output = _completions(simulator, store, out)
    simulator.add_fault(FaultRule(kind="503", path="usage/completions", count=None))
    first_poll_held(simulator, store, collector.poll, raises=ApiError)
    simulator.clear_faults()
    assert store.cursor("completions", "1m") is None  # nothing written while held
    _next_poll_reads_from(simulator, collector, output, out, int(T0 - 2 * HOUR))  # the same process's


def test_initial_interval_raised_while_the_first_polls_are_refused_still_applies(simulator, tmp_path, caplog):
    """A refused first poll keeps its start; nothing was read from it, so an initial_interval
    raised before the key works (the upgrade note's advice) is still the first run's: it reaches
    further back, a refused start raising it keeps that, and no WARNING claims a collection."""
    from agent_input.http_client import PermissionDeniedError
    from agent_input.simulator.faults import FaultRule

    out = tmp_path / "events.ndjson"
    store = StateStore(tmp_path / "state")
    simulator.add_fault(FaultRule(kind="403", path="usage/completions", count=None,
                                  message="Missing scopes: api.usage.read."))
    for at, initial in ((T0, "2h"), (T0 + HOUR, "6h")):  # refused, then refused with it raised
        collector, output = _completions(simulator, store, out, initial=initial)
        simulator.set_time(at)
        with pytest.raises(PermissionDeniedError):
            collector.poll(at)
    simulator.clear_faults()
    later = T0 + HOUR + SETTLE
    collector, output = _completions(simulator, store, out, initial="2h")  # granted (lowered again)
    simulator.set_time(later)
    collector.poll(later)
    output.close()
    origin, settled = int(T0 + HOUR - 6 * HOUR), int(later - SETTLE)
    docs = dedupe(read_ndjson(out))
    assert stored_totals(docs, "completions", origin, settled) == truth_totals(simulator, "completions", origin,
                                                                              settled)
    assert "initial_interval reaches back" not in caplog.text


@pytest.mark.parametrize("raised", [True, False])
def test_a_width_changed_while_nothing_was_read_yet_is_a_first_run_at_the_new_width(
        simulator, tmp_path, caplog, raised):
    """A 1m first poll at 10:30 gets 503s: its start, 08:30, is kept, nothing was read. Then
    bucket_width becomes 1h (initial_interval raised from 2h to 6h, or left at 2h). Nothing was
    collected at 1m, so there is nothing to hand over: it is the stream's first run, at 1h.
    Before, the change was taken over as for a width with data: 1m was read from 08:30 up to 09:00,
    1h from 09:00, a raised initial_interval was ignored and a WARNING claimed the state directory
    had collected the stream from 08:30.

    Without a raise the kept start is honoured at the new width, floored to its boundary (08:00),
    not rounded up (09:00) nor dropped for `initial_interval` before the later `now` (09:30): both
    would lose 08:30-09:30, never read. Reading from 08:00 delivers nothing twice, since nothing
    was delivered at 1m, and a whole first hour beats a half hour of minutes kept apart."""
    from agent_input.http_client import ApiError
    from agent_input.simulator.faults import FaultRule

    caplog.set_level("INFO", logger="agent_input.engine")
    out = tmp_path / "events.ndjson"
    store = StateStore(tmp_path / "state")
    first = T0 + 1800  # 10:30; initial_interval 2h: the start is 08:30
    simulator.add_fault(FaultRule(kind="503", path="usage/completions", count=None))
    collector, output = _completions(simulator, store, out, initial="2h")
    simulator.set_time(first)
    with pytest.raises(ApiError):
        collector.poll(first)
    output.close()
    simulator.clear_faults()
    assert store.cursors("completions") == {"1m": Cursor(int(T0 - 5400), int(T0 - 5400), int(T0 - 5400))}

    cfg = _config(simulator.base_url, "0s", "6h" if raised else "2h")
    cfg["data_streams"]["completions"]["bucket_width"] = "1h"
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=2)
    output = NdjsonFileOutput(out)
    collector = UsageCollector(STREAMS_BY_NAME["completions"], config_from_dict(cfg, env={}).stream("completions"),
                               client, Delivery(store, output), clock=simulator.now)
    later = first + HOUR  # 11:30: 6h reaches back to 05:00 (05:30 floored), 2h to 09:00
    now = later
    while now <= later + SETTLE + HOUR:
        simulator.set_time(now)
        collector.poll(now)
        now += 1800
    output.close()
    client.close()
    origin = int(T0 - 5 * HOUR) if raised else int(T0 - 2 * HOUR)  # 05:00, or 08:30 floored to 08:00
    settled = int(now - SETTLE) // HOUR * HOUR
    delivered = read_ndjson(out)
    docs = dedupe(delivered)
    assert len(docs) == len(delivered), "a document was delivered twice"
    assert {d["openai"]["base"]["bucket_width"] for d in docs} == {"1h"}, "minutes read from a never-read start"
    assert min(d["openai"]["base"]["start_time"] for d in docs) == iso_timestamp(origin)
    assert stored_totals(docs, "completions", origin, settled) == truth_totals(simulator, "completions", origin,
                                                                              settled)
    assert set(store.cursors("completions")) == {"1h"}
    assert "initial_interval reaches back" not in caplog.text
    assert "collected this stream" not in caplog.text


def test_a_group_by_that_gains_a_field_keeps_the_stored_totals_exact(simulator, tmp_path):
    """An upgrade that adds service_tier to the completions group_by re-reads the revision window
    under new group keys: each old group is brought to zero and each new one first emitted, so the
    sums stay OpenAI's and no id is reused for other content."""
    store, out = StateStore(tmp_path / "state"), tmp_path / "events.ndjson"
    new = STREAMS_BY_NAME["completions"]
    old = dataclasses.replace(new, group_by=tuple(g for g in new.group_by if g != "service_tier"))
    before, output = _completions(simulator, store, out, old)
    simulator.set_time(T0)
    before.poll(T0)
    output.close()
    after, output = _completions(simulator, store, out, new)
    now = T0 + 300
    while now <= T0 + SETTLE:
        simulator.set_time(now)
        after.poll(now)
        now += 1800
    output.close()
    docs = dedupe(read_ndjson(out))
    assert any("service_tier" not in d["openai"]["completions"] for d in docs), "the old grouping was stored"
    origin, settled = int(T0 - 2 * HOUR), int(T0)
    assert stored_totals(docs, "completions", origin, settled) == truth_totals(simulator, "completions", origin,
                                                                              settled)


def test_a_changed_bucket_width_hands_over_at_a_boundary_and_sums_stay_exact(simulator, tmp_path):
    """1m, then 1h, then 1m again, with state kept: each width covers its own time, so summing
    every document (as the usage panels do) gives OpenAI's figures. Before, the new width started
    over at initial_interval: the overlap was counted twice (1.9x in the bug hunt's run)."""
    store, out = StateStore(tmp_path / "state"), tmp_path / "events.ndjson"

    def run(width, initial, since, until):
        cfg = _config(simulator.base_url, "0s", initial)
        cfg["data_streams"]["embeddings"]["bucket_width"] = width
        config = config_from_dict(cfg, env={})
        output = NdjsonFileOutput(out)
        client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=2)
        collector = UsageCollector(STREAMS_BY_NAME["embeddings"], config.stream("embeddings"), client,
                                   Delivery(store, output), clock=simulator.now)
        now = since
        while now <= until:
            simulator.set_time(now)
            collector.poll(now)
            now += 300
        output.close()
        client.close()
        return now

    now = run("1m", "2h", T0 + 1530, T0 + 3 * HOUR)  # 10:25:30: the 1m cursor stops inside an hour
    now = run("1h", "8h", now, T0 + 7 * HOUR)
    cursors = store.cursors("embeddings")
    assert cursors["1m"].retired_at == cursors["1h"].origin == int(T0 + 3 * HOUR)  # 1m at 12:55, on to 13:00
    run("1m", "24h", now, T0 + 12 * HOUR)
    cursors = store.cursors("embeddings")
    assert cursors["1h"].retired_at == cursors["1m"].origin and cursors["1m"].retired_at is None
    docs = dedupe(read_ndjson(out))
    spans = sorted((d["openai"]["base"]["start_time"], d["openai"]["base"]["bucket_width"]) for d in docs)
    assert [w for _, w in spans].count("1h") and [w for _, w in spans].count("1m")
    hours = {t[:13] for t, w in spans if w == "1h"}
    assert not any(w == "1m" and t[:13] in hours for t, w in spans), "a minute inside an hour also stored as 1h"
    origin, settled = int(T0 + 1530 - 2 * HOUR) // 60 * 60, int(T0 + 12 * HOUR - SETTLE) // 3600 * 3600
    assert stored_totals(docs, "embeddings", origin, settled) == truth_totals(simulator, "embeddings", origin,
                                                                             settled)


def _run_collector(cfg: Path, state: Path, out: Path, now: float) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("OPENAI_ADMIN_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
         "--state-dir", str(state), "--output-path", str(out), "--now", str(now),
         "--log-level", "ERROR"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )


@pytest.mark.slow
def test_sigkill_at_random_points_then_restart_gives_truth(simulator, tmp_path):
    rng = random.Random(20261123)
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config(simulator.base_url, "0s", initial="1h")))
    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    now = T0
    simulator.set_time(now)
    assert _run_collector(cfg, state, out, now).wait(timeout=120) == 0
    # then polls, each killed after a random number of its own commits (a poll commits about
    # ten): timed kills landed mostly in the collector's start-up, before it had read its state
    kills = runs = 0
    while kills < 20 and runs < 60:
        runs += 1
        simulator.set_time(now)
        target = committed_batches(state) + rng.randint(1, 6)
        proc = _run_collector(cfg, state, out, now)
        if wait_for_commits(state, target, lambda: proc.poll() is None):
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
        now += rng.choice((0, 60, 300))
    # then let it run to completion until every bucket has settled and been re-read
    end_of_test = now + SETTLE + 600
    while now <= end_of_test:
        simulator.set_time(now)
        proc = _run_collector(cfg, state, out, now)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        now += 900
    assert kills >= 20, f"only {kills} runs were killed; the test needs at least 20"
    docs = dedupe(read_ndjson(out))
    origin = int(T0 - HOUR)
    settled = int(end_of_test - SETTLE) // 60 * 60
    for spec in USAGE_STREAMS:
        assert stored_totals(docs, spec.name, origin, settled) == truth_totals(simulator, spec.name, origin, settled), spec.name



def test_a_first_run_killed_between_the_audit_scopes_keeps_the_tenant_scope_s_start(simulator, tmp_path):
    """A first run killed (SIGKILL, a crash) after the audit organization scope stored its first
    slice and before the tenant scope stored anything: the next start, 6 hours later, read the
    tenant scope from `initial_interval` before its own time, and the tenant events of the first
    window's oldest 6 hours were never read (the organization's were: its mark was stored)."""
    import sqlite3
    import time

    from agent_input.simulator import FaultRule

    cfg = tmp_path / "config.yml"
    streams = {s.name: {"enabled": False} for s in USAGE_STREAMS}
    streams.update(costs={"enabled": False}, rate_limits={"enabled": False}, audit={"initial_interval": "24h"})
    cfg.write_text(yaml.safe_dump({"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 2,
                                   "data_streams": streams}))
    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    # the tenant scope's listing hangs: the run is killed once the organization scope has its mark
    simulator.add_fault(FaultRule(kind="slow", path="audit_logs", query="tenant_only=true", delay=60, count=None))
    simulator.set_time(T0)
    proc = _run_collector(cfg, state, out, T0)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with sqlite3.connect(state / "state.sqlite3") as db:
                    if db.execute("SELECT 1 FROM kv WHERE k='audit:hwm'").fetchone():
                        break
            except sqlite3.Error:
                pass
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.communicate()
    simulator.clear_faults()
    later = T0 + 6 * HOUR
    simulator.set_time(later)
    proc = _run_collector(cfg, state, out, later)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    got = {d["_id"] for d in read_ndjson(out)}
    first_start = T0 - 24 * HOUR
    oldest = [e["id"] for h in range(int(first_start) // HOUR * HOUR, int(first_start + 6 * HOUR), HOUR)
              for e in simulator.audit.hour_events(h)
              if e["_tenant"] and first_start <= e["effective_at"] < first_start + 6 * HOUR]
    assert oldest, "the simulated organization needs tenant events in the first window's oldest hours"
    assert [i for i in oldest if i not in got] == []


# ------------------------------------------------------------------------------------ requests vs the reference
SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-admin-openapi.yaml"


def _reference_operations() -> list[tuple]:
    import re

    spec = yaml.safe_load(SPEC_PATH.read_text())
    ops = []
    for path, item in spec["paths"].items():
        if "get" in item:
            pattern = re.compile("^/v1" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")
            ops.append((pattern, path, {p["name"]: p for p in item["get"].get("parameters", []) if p["in"] == "query"}))
    return ops


def _limit_bounds(param: dict, query: dict) -> tuple[int, int]:
    """The bounds the reference's `limit` description gives (per bucket_width for usage)."""
    import re

    text = param.get("description", "")
    width = query.get("bucket_width") or "1d"  # the usage endpoints' default
    per_width = dict((w, int(m)) for w, m in re.findall(r"bucket_width=(\w+)`: default: \d+, max: (\d+)", text))
    if per_width:
        return 1, per_width[width]
    m = re.search(r"between 1 and (\d+)", text)
    return 1, int(m.group(1)) if m else 2**31


def _reference_problems(ops, path: str, query: str) -> list[str]:
    """What in one request the reference does not declare: the path, a parameter's name, type,
    enum value or `limit` bound."""
    import re
    from urllib.parse import parse_qsl

    op = next(((p, params) for pattern, p, params in ops if pattern.match(path)), None)
    if op is None:
        return [f"{path}: not in the reference"]
    ref_path, declared = op
    pairs = parse_qsl(query, keep_blank_values=True)
    problems = []
    for name, value in pairs:
        param = declared.get(name)
        schema = None
        if param is not None:
            schema = param["schema"]
            if schema.get("type") == "array":
                schema = schema["items"]
        else:  # an object parameter's member, effective_at[gte]
            m = re.fullmatch(r"(\w+)\[(\w+)\]", name)
            if m and m.group(1) in declared and declared[m.group(1)]["schema"].get("type") == "object":
                schema = declared[m.group(1)]["schema"]["properties"].get(m.group(2))
        if schema is None:
            problems.append(f"{ref_path}: `{name}` is not a parameter of it")
            continue
        kind = schema.get("type")
        if kind == "integer" and not re.fullmatch(r"-?[0-9]+", value):
            problems.append(f"{ref_path}: `{name}={value}` is not an integer")
        elif kind == "boolean" and value not in ("true", "false"):
            problems.append(f"{ref_path}: `{name}={value}` is not a boolean")
        elif "enum" in schema and value not in schema["enum"]:
            problems.append(f"{ref_path}: `{name}={value}` is not one of {schema['enum']}")
        elif name == "limit" and kind == "integer":
            lo, hi = _limit_bounds(param, dict(pairs))
            if not lo <= int(value) <= hi:
                problems.append(f"{ref_path}: `limit={value}` is outside {lo}..{hi}")
    for name, param in declared.items():
        if param.get("required") and name not in dict(pairs):
            problems.append(f"{ref_path}: required `{name}` is missing")
    return problems


@pytest.mark.parametrize("width", ["1m", "1h", "1d"])
def test_every_request_the_collector_makes_is_one_the_reference_declares(simulator, tmp_path, width):
    """The simulator takes what OpenAI may refuse (any unknown parameter, `name[]` for `name`), so
    the collector's own requests are held to the reference: every stream, both audit scopes, the
    name lookups, the rate limits and `check`'s probes, at each bucket width."""
    from agent_input import app
    from agent_input.http_client import probe_api

    seen: list[tuple[str, str]] = []
    handle = simulator.api.handle
    simulator.api.handle = lambda path, query: seen.append((path, query)) or handle(path, query)
    streams = {s.name: {"bucket_width": width, "initial_interval": "1d"} for s in USAGE_STREAMS}
    streams.update(costs={"initial_interval": "10d"}, audit={"initial_interval": "1d"},
                   rate_limits={"include_archived": True})
    config = config_from_dict({"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 0,
                               "data_streams": streams}, env={})
    collection = app.build(config, state_dir=tmp_path / "state", output=NdjsonFileOutput(tmp_path / "out.ndjson"),
                           clock=simulator.now)
    try:
        assert collection.engine.run(once=True) == 0
        simulator.advance(1800)
        assert collection.engine.run(once=True) == 0
    finally:
        collection.close()
    with AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0) as client:
        assert all(r.ok for r in probe_api(client, config, now=simulator.now()))
    ops = _reference_operations()
    problems = sorted({p for path, query in seen for p in _reference_problems(ops, path, query)})
    assert not problems, "\n".join(problems)
    called = {next(p for pattern, p, _ in ops if pattern.match(path)) for path, _ in seen}
    assert called >= {"/organization/usage/completions", "/organization/costs", "/organization/audit_logs",
                      "/organization/projects", "/organization/projects/{project_id}/rate_limits",
                      "/organization/projects/{project_id}/api_keys", "/organization/users"}
    assert any("tenant_only=true" in q for p, q in seen if p.endswith("/audit_logs"))


def test_the_request_check_finds_what_the_reference_does_not_declare():
    ops = _reference_operations()
    ok = "start_time=1&end_time=61&bucket_width=1m&limit=1440&group_by=project_id&group_by=service_tier"
    assert _reference_problems(ops, "/v1/organization/usage/completions", ok) == []
    for query, why in (("end_time=60", "required `start_time` is missing"),
                       ("start_time=1.0", "`start_time=1.0` is not an integer"),
                       ("start_time=1&bucket_width=1h&limit=169", "`limit=169` is outside 1..168"),
                       ("start_time=1&limit=32", "`limit=32` is outside 1..31"),
                       ("start_time=1&group_by=size", "`group_by=size` is not one of"),
                       ("start_time=1&group_by[]=model", "`group_by[]` is not a parameter of it"),
                       ("start_time=1&batch=1", "`batch=1` is not a boolean")):
        problems = _reference_problems(ops, "/v1/organization/usage/completions", query)
        assert any(why in p for p in problems), (query, problems)
    assert _reference_problems(ops, "/v1/organization/costs", "start_time=1&bucket_width=1h")
    assert _reference_problems(ops, "/v1/organization/costs", "start_time=1&limit=181")
    assert not _reference_problems(ops, "/v1/organization/audit_logs", "effective_at[gte]=1&limit=100&tenant_only=true")
    assert _reference_problems(ops, "/v1/organization/audit_logs", "effective_at[after]=1")
    assert _reference_problems(ops, "/v1/organization/projects", "limit=101")
    assert _reference_problems(ops, "/v1/organization/nothing", "")


# -- a state directory used with another organization's key --------------------------------------
OTHER_KEY = "sk-admin-other-org-0123456789abcdef"


@pytest.fixture
def other_org():
    """A second organization (another seed: other projects, users, usage) with its own key."""
    sim = started_simulator(seed=8, admin_key=OTHER_KEY)
    yield sim
    sim.stop()


def _org_config(url: str, key: str, *, usage: bool = True, rate_limits: bool = True, max_retries: int = 1) -> dict:
    streams = {s.name: {"enabled": False} for s in USAGE_STREAMS}
    if usage:
        streams["completions"] = {"initial_interval": "2h"}
    streams.update(audit={"initial_interval": "2h"}, rate_limits={"enabled": rate_limits}, costs={"enabled": usage})
    return {"url": url, "api_key": key, "max_retries": max_retries, "data_streams": streams}


def _collect_with(sim, key: str, state: Path, out: Path, *, usage: bool = True, rate_limits: bool = True,
                  max_retries: int = 1) -> int:
    """One `run(once=True)` of every stream, as `collect --once` builds it."""
    from agent_input import app

    config = config_from_dict(_org_config(sim.base_url, key, usage=usage, rate_limits=rate_limits,
                                          max_retries=max_retries), env={})
    output = NdjsonFileOutput(out)
    collection = app.build(config, state_dir=state, output=output, clock=sim.now)
    try:
        return collection.engine.run(once=True)
    finally:
        collection.close()
        output.close()


def _state_rows(state: Path) -> dict:
    import sqlite3

    with sqlite3.connect(state / "state.sqlite3") as db:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall())
                for t in ("cursors", "observations", "outbox", "kv")}


@pytest.mark.parametrize("usage", [True, False], ids=["with-names", "audit-and-limits-only"])
def test_another_organization_s_key_on_a_state_directory_is_refused_before_anything_is_written(
        simulator, other_org, tmp_path, usage):
    """The default --state-dir is shared by every config: a second organization's collector on it
    read its own buckets against the first one's observations and brought every group of the
    first one in the revision window to zero (425 negative corrections), inherited its cursors
    (its own history never read) and its audit marks, without a word."""
    from agent_input.state import StateError

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    assert _collect_with(simulator, ADMIN_KEY, state, out, usage=usage) == 0
    delivered, before = out.read_bytes(), _state_rows(state)
    assert delivered
    simulator.advance(300)
    other_org.set_time(simulator.now())
    try:
        _collect_with(other_org, OTHER_KEY, state, out, usage=usage)
        refusal = None
    except StateError as exc:  # org_guard.OrganizationMismatch
        refusal = str(exc)
    assert out.read_bytes() == delivered, "nothing of the other organization may be delivered"
    assert _state_rows(state) == before, "no cursor, observation, mark or batch may be written"
    assert refusal and refusal.startswith(f"state directory {state} holds the collection of another OpenAI "
                                          f"organization") and "its own --state-dir" in refusal, refusal
    # the right key goes on as before; the other organization in a directory of its own too
    assert _collect_with(simulator, ADMIN_KEY, state, out, usage=usage) == 0
    assert _collect_with(other_org, OTHER_KEY, tmp_path / "other", tmp_path / "other.ndjson", usage=usage) == 0
    if usage:
        docs = dedupe(read_ndjson(out))
        start, end = int(T0 - 2 * HOUR), int(T0)
        got = stored_totals(docs, "completions", start, end)
        assert got and all(v.get("input_tokens", 0) > 0 for v in got.values()), "a group was brought to zero"
        mine = {p.id for p in simulator.org.projects}
        assert {d["openai"].get("base", {}).get("project_id") for d in docs} - {None} <= mine


def _as_an_earlier_version_left_it(state: Path) -> str | None:
    """Take the organization check's keys out of a state directory, as a version from before the
    check left it: no fingerprint, no mark of a start with the check. The fingerprint it held."""
    from agent_input.org_guard import KV_PROJECTS, KV_STARTED

    store = StateStore(state)
    recorded = store.get(KV_PROJECTS)
    with store._transaction() as conn:
        conn.execute("DELETE FROM kv WHERE k IN (?, ?)", (KV_PROJECTS, KV_STARTED))
    store.close()
    return recorded


def test_a_state_directory_from_before_the_check_is_fingerprinted_not_refused(simulator, other_org, tmp_path):
    from agent_input.org_guard import KV_PROJECTS, OrganizationMismatch

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    assert _collect_with(simulator, ADMIN_KEY, state, out) == 0
    recorded = _as_an_earlier_version_left_it(state)
    assert recorded and 0 < len(yaml.safe_load(recorded)) <= 16
    simulator.advance(300)
    assert _collect_with(simulator, ADMIN_KEY, state, out) == 0  # the same organization: recorded again
    store = StateStore(state)
    assert store.get(KV_PROJECTS) == recorded
    store.close()
    other_org.set_time(simulator.now())
    with pytest.raises(OrganizationMismatch):
        _collect_with(other_org, OTHER_KEY, state, out)


def test_a_state_directory_from_before_the_check_is_refused_to_another_organization(simulator, other_org, tmp_path):
    """State an earlier version wrote has no fingerprint, but its stored usage names the projects
    of its organization: another organization's key, which lists none of them, is refused, not
    given the directory (its first listing would have recorded the wrong fingerprint)."""
    from agent_input.org_guard import KV_PROJECTS, OrganizationMismatch

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    assert _collect_with(simulator, ADMIN_KEY, state, out) == 0
    _as_an_earlier_version_left_it(state)
    store = StateStore(state)
    assert store.observed_values("proj_") <= {p.id for p in simulator.org.projects}
    store.close()
    delivered, before = out.read_bytes(), _state_rows(state)
    simulator.advance(300)
    other_org.set_time(simulator.now())
    with pytest.raises(OrganizationMismatch, match="project.s. its stored usage names"):
        _collect_with(other_org, OTHER_KEY, state, out)
    assert out.read_bytes() == delivered and _state_rows(state) == before
    assert _collect_with(simulator, ADMIN_KEY, state, out) == 0  # its own organization goes on


def test_a_projects_listing_that_fails_holds_the_writes_until_the_check_can_be_done(simulator, tmp_path):
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    assert _collect_with(simulator, ADMIN_KEY, state, out) == 0
    delivered, before = out.read_bytes(), _state_rows(state)
    simulator.advance(300)
    simulator.add_fault(FaultRule(kind="500", path="*/organization/projects", count=None))
    assert _collect_with(simulator, ADMIN_KEY, state, out) == 1
    assert out.read_bytes() == delivered and _state_rows(state) == before
    simulator.clear_faults()  # the next poll checks, and collects what the failed one held back
    assert _collect_with(simulator, ADMIN_KEY, state, out) == 0
    assert len(out.read_bytes()) > len(delivered)


def test_a_key_that_may_not_list_the_projects_is_not_held_from_its_directory_s_second_start(
        simulator, tmp_path, caplog):
    """A key refused the projects listing (403) collected fine at a new directory's first start
    (nothing to protect yet) but recorded no fingerprint; from the second start on, the directory
    looked like one from before the check (stored usage, no fingerprint), and every poll was held
    for ever: an outage for the right organization. It goes on as at its first start, and says
    the directory is not protected; `check` says so too, and passes."""
    import logging

    from click.testing import CliRunner

    from agent_input.cli import main
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    simulator.add_fault(FaultRule(kind="403", path="*/organization/projects", count=None))
    with caplog.at_level(logging.WARNING, logger="agent_input.org_guard"):  # (rate limits list the projects)
        assert _collect_with(simulator, ADMIN_KEY, state, out, rate_limits=False) == 0
        first = out.read_bytes()
        simulator.advance(600)
        assert _collect_with(simulator, ADMIN_KEY, state, out, rate_limits=False) == 0
    assert len(out.read_bytes()) > len(first)
    warned = [r.getMessage() for r in caplog.records if "may not list the organization's projects" in r.getMessage()]
    assert len(warned) == 2 and "would not be refused" in warned[0], warned
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_org_config(simulator.base_url, ADMIN_KEY, rate_limits=False)))
    result = CliRunner().invoke(main, ["check", "--config", str(cfg), "--state-dir", str(state)])
    assert f"state directory {state} is not checked against this key's organization" in result.output
    assert "collect goes on without the check" in result.output


def test_check_with_a_rejected_key_does_not_go_on_to_the_state_directory(simulator, tmp_path):
    """A probe that failed already says what is wrong (and a rejected key skips the rest): the
    state directory's organization is not asked for with that key, which would be one more
    request and one more line about the same rejection."""
    from click.testing import CliRunner

    from agent_input.cli import main

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    assert _collect_with(simulator, ADMIN_KEY, state, out, rate_limits=False) == 0  # it records its organization
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_org_config(simulator.base_url, "sk-admin-NOT-THIS-ORGS-KEY-0123456789",
                                              rate_limits=False)))
    result = CliRunner().invoke(main, ["check", "--config", str(cfg), "--state-dir", str(state)])
    assert result.exit_code == 1 and "401: the admin key was rejected" in result.output, result.output
    assert "state dir" not in result.output, result.output


def test_a_directory_from_before_the_check_is_still_held_while_the_listing_is_refused(simulator, tmp_path):
    """The exception above is for directories the check started: one an earlier version wrote
    holds usage of an organization nobody has checked yet, and waits for a listing."""
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    assert _collect_with(simulator, ADMIN_KEY, state, out, rate_limits=False) == 0
    _as_an_earlier_version_left_it(state)
    delivered, before = out.read_bytes(), _state_rows(state)
    simulator.advance(300)
    simulator.add_fault(FaultRule(kind="403", path="*/organization/projects", count=None))
    assert _collect_with(simulator, ADMIN_KEY, state, out, rate_limits=False) == 1
    assert out.read_bytes() == delivered and _state_rows(state) == before


def test_a_directory_held_because_the_listing_is_refused_says_what_to_do(simulator, tmp_path):
    """An earlier version's directory whose key may not list the projects (403) is held for good:
    `collect` and `check` said only "nothing is stored until it can", and a 403 never goes away by
    itself. Both name what lifts it: the key listing the projects."""
    from click.testing import CliRunner

    from agent_input.cli import main
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    assert _collect_with(simulator, ADMIN_KEY, state, out, rate_limits=False) == 0
    _as_an_earlier_version_left_it(state)
    simulator.advance(300)
    simulator.add_fault(FaultRule(kind="403", path="*/organization/projects", count=None))
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_org_config(simulator.base_url, ADMIN_KEY, rate_limits=False)))
    ran = CliRunner().invoke(main, ["collect", "--once", "--config", str(cfg), "--state-dir", str(state),
                                    "--output-path", str(out), "--now", str(int(simulator.now()))])
    checked = CliRunner().invoke(main, ["check", "--config", str(cfg), "--state-dir", str(state)])
    for result in (ran, checked):
        assert result.exit_code == 1
        assert "let this key list the projects (the refusal names the scope it lacks)" in result.output, result.output


def test_a_new_directory_whose_first_listing_failed_is_not_left_open_to_a_refused_key(
        simulator, other_org, tmp_path):
    """The exception above is for a key refused the listing from the directory's first start on.
    Every new directory was marked as started with the check, whatever its first listing did: one
    whose first listing met a 5xx (the name cache retries little) recorded no fingerprint, and
    another organization's key refused the listing (403) then passed on it, with a warning only,
    and brought the first organization's groups to zero in its own output (616 documents)."""
    from agent_input.org_guard import KV_STARTED
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    simulator.add_fault(FaultRule(kind="500", path="*/organization/projects", count=None))
    assert _collect_with(simulator, ADMIN_KEY, state, out, rate_limits=False) == 0
    assert KV_STARTED not in dict(_state_rows(state)["kv"])  # the key was not refused: no exception for it
    simulator.clear_faults()
    before = _state_rows(state)
    simulator.advance(600)
    other_org.set_time(simulator.now())
    other_org.add_fault(FaultRule(kind="403", path="*/organization/projects", count=None))
    assert _collect_with(other_org, OTHER_KEY, state, tmp_path / "b.ndjson", rate_limits=False) == 1
    assert not (tmp_path / "b.ndjson").read_bytes() and _state_rows(state) == before


def test_collect_once_with_another_organization_s_key_exits_1_with_one_line(simulator, other_org, tmp_path):
    state, out = tmp_path / "state", tmp_path / "events.ndjson"

    def collect(sim, key: str) -> subprocess.CompletedProcess:
        cfg = tmp_path / "config.yml"
        cfg.write_text(yaml.safe_dump(_org_config(sim.base_url, key)))
        return subprocess.run(
            [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once", "--state-dir",
             str(state), "--output-path", str(out), "--now", str(T0), "--log-level", "WARNING"],
            capture_output=True, env={k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}, timeout=120)

    first = collect(simulator, ADMIN_KEY)
    assert first.returncode == 0, first.stderr.decode()
    delivered = out.read_bytes()
    refused = collect(other_org, OTHER_KEY)
    err = refused.stderr.decode()
    assert refused.returncode == 1, err
    mine = sorted(simulator.org.projects, key=lambda p: (p.created_at, p.id))
    assert err.splitlines() == [f"openai-input: state directory {state} holds the collection of another OpenAI "
                                f"organization: none of the {len(mine)} recorded project(s) (e.g. {mine[0].id}) is "
                                f"among the {len(other_org.org.projects)} project(s) this admin key lists; nothing "
                                f"was stored or sent. Give each organization its own --state-dir"], err
    assert OTHER_KEY not in err and out.read_bytes() == delivered


def _collected_with_a_batch_left_over(simulator, other_org, tmp_path) -> Path:
    """A state directory of the first organization whose outbox holds a batch the output had not
    acknowledged when the collector stopped (`{"_id":"left-over"}`); the other one's clock set."""
    state = tmp_path / "state"
    assert _collect_with(simulator, ADMIN_KEY, state, tmp_path / "a.ndjson") == 0
    store = StateStore(state)
    store.commit_events("audit", b'{"_id":"left-over"}\n', 1, {})
    store.close()
    other_org.set_time(simulator.now())
    return state


def test_batches_left_in_the_outbox_are_not_sent_to_another_organization_s_output(simulator, other_org, tmp_path):
    from agent_input.org_guard import OrganizationMismatch

    state = _collected_with_a_batch_left_over(simulator, other_org, tmp_path)
    with pytest.raises(OrganizationMismatch):
        _collect_with(other_org, OTHER_KEY, state, tmp_path / "b.ndjson")
    assert not (tmp_path / "b.ndjson").read_bytes()
    assert len(_state_rows(state)["outbox"]) == 1  # still waiting, for this organization's next start
    assert _collect_with(simulator, ADMIN_KEY, state, tmp_path / "a2.ndjson") == 0
    assert b'"left-over"' in (tmp_path / "a2.ndjson").read_bytes()


def test_batches_left_in_the_outbox_are_not_sent_by_a_config_with_no_stream_enabled(simulator, other_org, tmp_path):
    """With every stream disabled the engine was built without the check: the start re-sent the
    first organization's left-over batch to the other organization's output without a look."""
    from agent_input import app
    from agent_input.org_guard import OrganizationMismatch

    state = _collected_with_a_batch_left_over(simulator, other_org, tmp_path)

    def run_with_no_stream(sim, key: str, out: Path) -> int:
        settings = _org_config(sim.base_url, key)
        settings["data_streams"] = {name: {"enabled": False} for name in settings["data_streams"]}
        output = NdjsonFileOutput(out)
        collection = app.build(config_from_dict(settings, env={}), state_dir=state, output=output, clock=sim.now)
        try:
            return collection.engine.run(once=True)
        finally:
            collection.close()
            output.close()

    with pytest.raises(OrganizationMismatch):
        run_with_no_stream(other_org, OTHER_KEY, tmp_path / "b.ndjson")
    assert not (tmp_path / "b.ndjson").read_bytes()
    assert len(_state_rows(state)["outbox"]) == 1
    assert run_with_no_stream(simulator, ADMIN_KEY, tmp_path / "a2.ndjson") == 0  # its own organization's
    assert (tmp_path / "a2.ndjson").read_bytes().count(b'"left-over"') == 1


def test_batches_left_in_the_outbox_wait_while_the_check_cannot_be_done(simulator, other_org, tmp_path):
    """With the projects listing refused (403), the check cannot be done: the start re-sent the
    outbox anyway, so one organization's left-over batch went to another organization's output
    and was acknowledged there, lost to its own. It waits now, and goes out once a write of this
    run has passed the check."""
    from agent_input.simulator import FaultRule

    state = _collected_with_a_batch_left_over(simulator, other_org, tmp_path)
    other_org.add_fault(FaultRule(kind="403", path="*/organization/projects", count=None))
    assert _collect_with(other_org, OTHER_KEY, state, tmp_path / "b.ndjson") == 1
    assert b'"left-over"' not in (tmp_path / "b.ndjson").read_bytes()
    assert len(_state_rows(state)["outbox"]) == 1
    # its own organization, while the listing fails for the first write only: sent after the check
    simulator.add_fault(FaultRule(kind="403", path="*/organization/projects", count=1))
    assert _collect_with(simulator, ADMIN_KEY, state, tmp_path / "a2.ndjson") == 0
    assert (tmp_path / "a2.ndjson").read_bytes().count(b'"left-over"') == 1
    assert not _state_rows(state)["outbox"]


@pytest.mark.parametrize("spool_gone", [False, True], ids=["sent", "outbox-file-gone"])
def test_batches_held_back_at_the_start_are_sent_by_the_first_stream_past_the_check(
        simulator, tmp_path, monkeypatch, caplog, spool_gone):
    """The check fails at the start (the names' listing and the start's own try), then passes at
    a stream's first write: the held-back batch goes out from that stream's thread. A re-send
    that failed there (its outbox file gone) failed every stream's poll instead, each "poll
    failed, cursor kept, will retry" with 0 documents, though every poll had delivered its pages
    and moved its cursor; it is raised by `run`, as the start's re-send raises it."""
    import logging

    from agent_input import app
    from agent_input.org_guard import OrganizationGuard
    from agent_input.simulator import FaultRule
    from agent_input.state import StateError

    monkeypatch.setitem(OrganizationGuard.__init__.__kwdefaults__, "retry_after", 0.0)  # a write lists again
    state = tmp_path / "state"
    assert _collect_with(simulator, ADMIN_KEY, state, tmp_path / "a.ndjson") == 0
    store = StateStore(state)  # a batch the output had not acknowledged; large: in a file of its own
    store.commit_events("audit", b'{"_id":"left-over","pad":"' + b"x" * 300_000 + b'"}\n', 1, {})
    spool = _state_rows(state)["outbox"][0][-1]
    store.close()
    if spool_gone:
        (state / "outbox" / spool).unlink()
    simulator.advance(600)
    simulator.add_fault(FaultRule(kind="403", path="*/organization/projects", count=2))
    config = config_from_dict(_org_config(simulator.base_url, ADMIN_KEY), env={})
    output = NdjsonFileOutput(tmp_path / "a2.ndjson")
    collection = app.build(config, state_dir=state, output=output, clock=simulator.now)
    try:
        if spool_gone:
            with pytest.raises(StateError, match="cannot read .*" + spool):
                collection.engine.run(once=True)
        else:
            assert collection.engine.run(once=True) == 0
    finally:
        collection.close()
        output.close()
    assert any("wait for the organization check" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if "poll failed" in r.getMessage()]
    if not spool_gone:  # (when the re-send fails, the streams still polling stop where they are, by timing)
        assert collection.engine.totals["completions"].events > 0  # delivered, and counted
    assert (tmp_path / "a2.ndjson").read_bytes().count(b'"left-over"') == (0 if spool_gone else 1)
    assert len(_state_rows(state)["outbox"]) == (1 if spool_gone else 0)


def test_check_says_whether_the_key_reaches_the_state_directory_s_organization(simulator, other_org, tmp_path):
    from click.testing import CliRunner

    from agent_input.cli import main

    state = tmp_path / "state"
    assert _collect_with(simulator, ADMIN_KEY, state, tmp_path / "events.ndjson") == 0

    def check(sim, key: str):
        cfg = tmp_path / "config.yml"
        cfg.write_text(yaml.safe_dump(_org_config(sim.base_url, key)))
        return CliRunner().invoke(main, ["check", "--config", str(cfg), "--state-dir", str(state)])

    ok = check(simulator, ADMIN_KEY)
    assert ok.exit_code == 0 and f"state directory {state} was collected for this key's organization" in ok.output
    refused = check(other_org, OTHER_KEY)
    assert refused.exit_code == 1, refused.output
    assert f"state directory {state} holds the collection of another OpenAI organization" in refused.output
    assert "its own --state-dir" in refused.output
    fresh = CliRunner().invoke(main, ["check", "--config", str(tmp_path / "config.yml"), "--state-dir",
                                      str(tmp_path / "new")])
    assert fresh.exit_code == 0 and "state dir" not in fresh.output and not (tmp_path / "new").exists()
    import sqlite3

    from agent_input.state import STATE_VERSION

    with sqlite3.connect(state / "state.sqlite3") as db:  # as a newer version leaves it: collect refuses it
        db.execute(f"PRAGMA user_version={STATE_VERSION + 1}")
    newer = check(simulator, ADMIN_KEY)
    assert newer.exit_code == 1 and "was written by a newer openai-input" in newer.output, newer.output


def test_check_on_a_state_directory_from_before_the_check_refuses_another_organization_s_key(
        simulator, other_org, tmp_path):
    """The upgrade steps run `check` before the first start: on a directory an earlier version
    wrote (no fingerprint yet) it said "check OK" for another organization's key, which collect
    then refuses. It judges by the projects the stored usage names, as collect does."""
    from click.testing import CliRunner

    from agent_input.cli import main
    from agent_input.org_guard import KV_PROJECTS

    state = tmp_path / "state"
    assert _collect_with(simulator, ADMIN_KEY, state, tmp_path / "events.ndjson") == 0
    _as_an_earlier_version_left_it(state)
    before = _state_rows(state)

    def check(sim, key: str):
        cfg = tmp_path / "config.yml"
        cfg.write_text(yaml.safe_dump(_org_config(sim.base_url, key)))
        return CliRunner().invoke(main, ["check", "--config", str(cfg), "--state-dir", str(state)])

    refused = check(other_org, OTHER_KEY)
    assert refused.exit_code == 1, refused.output
    assert f"state directory {state} holds the collection of another OpenAI organization" in refused.output
    assert "project(s) its stored usage names" in refused.output
    ok = check(simulator, ADMIN_KEY)
    assert ok.exit_code == 0 and f"state directory {state} was collected for this key's organization" in ok.output
    assert _state_rows(state) == before  # check records nothing: collect does, at its start


def test_check_s_report_survives_a_stdout_that_cannot_encode_the_state_directory_s_name(simulator, tmp_path):
    """stdout in a legacy code page (Windows' cp1252 when piped or redirected, a Latin-1 locale):
    check's line naming a state directory "Données 状态" raised UnicodeEncodeError, and check said
    "check failed: 'charmap' codec can't encode ...", exit 1, for a key and directory that were fine."""
    state = tmp_path / "Données 状态"
    assert _collect_with(simulator, ADMIN_KEY, state, tmp_path / "events.ndjson") == 0
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_org_config(simulator.base_url, ADMIN_KEY)))
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    proc = subprocess.run([sys.executable, "-m", "agent_input.cli", "check", "--config", str(cfg),
                           "--state-dir", str(state)], capture_output=True, env=env, timeout=120)
    out = proc.stdout.decode("cp1252")
    assert proc.returncode == 0, (out, proc.stderr.decode("cp1252", "replace"))
    assert "Données \\u72b6\\u6001 was collected for this key's organization" in out and "check OK" in out


@pytest.mark.parametrize("name", ["a#b", "why?", "100%25", "Données 状态"])
def test_check_reads_the_organization_of_a_state_directory_whose_path_has_uri_characters(tmp_path, name):
    """`check` opened the state file as the URI `file:<path>?mode=ro`, unquoted: a `#`, `?` or `%XX`
    in the path (a folder named "Team #2") cut it short, the file was "not there", and check said
    nothing about the organization (nor about a newer version's file) instead of judging it."""
    from agent_input.org_guard import KV_PROJECTS, read_recorded
    from agent_input.state import STATE_VERSION

    state = tmp_path / name
    store = StateStore(state)
    store.put_kv(KV_PROJECTS, '["proj_a", "proj_b"]')
    store.close()
    assert read_recorded(state) == (STATE_VERSION, ["proj_a", "proj_b"], [], False)


@pytest.mark.parametrize("damage", ["emptied", "not-a-database"])
def test_check_fails_on_a_state_file_collect_refuses(simulator, tmp_path, damage):
    """A state file cut to 0 bytes, or one that is not an sqlite database, is refused by collect
    at its start; `check` read nothing from it and said "check OK" (as it did for a newer version's
    file before it said that collect refuses it)."""
    from click.testing import CliRunner

    from agent_input.cli import main
    from agent_input.state import StateError

    state = tmp_path / "state"
    assert _collect_with(simulator, ADMIN_KEY, state, tmp_path / "events.ndjson") == 0
    for left in state.glob("state.sqlite3-*"):
        left.unlink()
    (state / "state.sqlite3").write_bytes(b"" if damage == "emptied" else b"not sqlite " * 500)
    with pytest.raises(StateError) as refused:  # what collect says at its start
        StateStore(state)
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_org_config(simulator.base_url, ADMIN_KEY)))
    result = CliRunner().invoke(main, ["check", "--config", str(cfg), "--state-dir", str(state)])
    assert result.exit_code == 1, result.output
    assert str(refused.value) in result.output and "check OK" not in result.output


def test_a_short_5xx_on_the_name_cache_s_projects_listing_does_not_hold_a_whole_run(simulator, tmp_path):
    """The name cache's listing retries little (two retries, 2 s back-off: a name must not hold
    usage up), and the check took its failure for the collector's: a blip of six 5xx, which the
    collector's own retries ride out, held every write of a `collect --once` on a directory with a
    fingerprint (exit 1, nothing stored), while a new directory collected everything."""
    from agent_input import app
    from agent_input.simulator import FaultRule

    def collect(out: Path) -> int:
        settings = _org_config(simulator.base_url, ADMIN_KEY)
        del settings["max_retries"]  # the default
        output = NdjsonFileOutput(out)
        collection = app.build(config_from_dict(settings, env={}), state_dir=tmp_path / "state", output=output,
                               clock=simulator.now)
        try:
            return collection.engine.run(once=True)
        finally:
            collection.close()
            output.close()

    assert collect(tmp_path / "a.ndjson") == 0
    simulator.advance(300)
    simulator.add_fault(FaultRule(kind="500", path="*/organization/projects", count=6))
    assert collect(tmp_path / "b.ndjson") == 0
    assert (tmp_path / "b.ndjson").read_bytes()


def test_a_short_5xx_blip_on_the_projects_listing_does_not_leave_the_first_backfill_unnamed(simulator, tmp_path):
    """The first load of the names is the only one that holds pages up, and it gave up after three
    attempts (about a second): a 503 on the projects listing for three requests left every
    document of a new directory's first backfill without a project or key name, for good (the
    next try was five minutes later, after a `--once` run had ended). It rides out a short blip."""
    import json

    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    simulator.add_fault(FaultRule(kind="503", path="*/organization/projects", count=4))
    # the default max_retries (8): the streams' own requests would ride out far more than this
    assert _collect_with(simulator, ADMIN_KEY, state, out, rate_limits=False, max_retries=8) == 0
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    usage = [d for d in docs if d.get("openai", {}).get("base", {}).get("project_id")]
    assert usage, "the backfill delivered no usage with a project"
    assert all(d["openai"]["base"].get("project_name") for d in usage)
