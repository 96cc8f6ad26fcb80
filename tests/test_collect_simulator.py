"""Done-when tests of the collector core against the simulator: exact totals through late
revisions with grace 0s and 15m, and SIGKILL at random points with a restart."""
from __future__ import annotations

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
from agent_input.streams import USAGE_STREAMS

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
