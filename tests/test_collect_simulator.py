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
from agent_input.engine import Delivery, UsageCollector
from agent_input.http_client import AdminApiClient
from agent_input.outputs import NdjsonFileOutput
from agent_input.state import StateStore
from agent_input.streams import STREAMS_BY_NAME, USAGE_STREAMS

from conftest import (ADMIN_KEY, T0, committed_batches, dedupe, read_ndjson, stored_totals, truth_totals,
                      wait_for_commits)

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
