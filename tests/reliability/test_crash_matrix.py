"""Crash consistency as one matrix: SIGKILL at random points during the backfill, during
steady-state polling with late revisions, and during delivery, then restart; for each output
(NDJSON file, the agent protocol with an acknowledging supervisor, the direct Elasticsearch
output into a create-only recording fake) and every stream with a truth: the ten usage streams,
costs and audit. Stored totals (deduplicated by id) must equal the simulator's final truth, and
no id may ever carry two contents. Rate limits are a snapshot, not a sum, and are left out."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import orjson
import pytest
import yaml

from agent_input.state import INLINE_PAYLOAD_LIMIT, StateStore
from agent_input.streams import USAGE_STREAMS

from conftest import T0, dedupe, read_ndjson
from reliability_helpers import HOUR, SETTLE, _epoch, compare_all, full_config

ES_KEY = "ZXNfY3Jhc2hfbWF0cml4OnNlY3JldA=="
KILLS = 4  # per phase kind below; the slow, exhaustive versions live in tests/test_*.py


def _collect(cfg, state, now, output: str, extra=(), env_extra=None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("OPENAI_ADMIN_KEY", None)
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once", "--state-dir",
         str(state), "--now", str(now), "--log-level", "ERROR", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


class Driver:
    """Runs one collector of the given output kind at `now`, optionally killing it."""

    def __init__(self, kind: str, sim, tmp_path):
        self.kind, self.sim, self.tmp = kind, sim, tmp_path
        self.state = tmp_path / "state"
        # 6h of backfill: the completions batch is larger than the outbox's inline limit, so
        # kills also land around its spool file; steady-state batches stay inline
        self.cfg = full_config(sim.base_url, initial="6h")
        self.cfg_path = tmp_path / "config.yml"
        self.cfg_path.write_text(yaml.safe_dump(self.cfg))
        self.out = tmp_path / "events.ndjson"
        self.persisted: list[dict] = []
        self.es = None
        if kind == "elasticsearch":
            from fake_es import FakeElasticsearch

            self.es = FakeElasticsearch("8.18.0", auth=f"ApiKey {ES_KEY}")
            self.es.delay = 0.02  # a bulk request takes a moment: kills land inside delivery too

    def close(self):
        if self.es is not None:
            self.es.close()

    def run(self, now: float, kill_after: float | None, during_delivery: bool = False) -> str:
        """'completed' or 'killed'."""
        self.sim.set_time(now)
        if self.kind == "protocol":
            return self._run_protocol(now, kill_after, during_delivery)
        if self.kind == "ndjson":
            proc = _collect(self.cfg_path, self.state, now, "ndjson", ["--output-path", str(self.out)])
        else:
            proc = _collect(self.cfg_path, self.state, now, "elasticsearch",
                            ["--output", "elasticsearch", "--es-url", self.es.url], {"ELASTIC_API_KEY": ES_KEY})
        if kill_after is None:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err.decode()[-2000:]
            return "completed"
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline and proc.poll() is None:
            if during_delivery and self.es is not None and self.es.active > 0:
                break  # a bulk request is in flight right now
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            return "killed"
        proc.communicate()
        return "completed"

    def _run_protocol(self, now, kill_after, during_delivery) -> str:
        from protocol_supervisor import Supervisor

        sup = Supervisor(self.state, now, persisted=self.persisted)
        sup.configure(self.cfg)
        names = [s.name for s in USAGE_STREAMS] + ["costs", "audit"]
        if kill_after is None:
            sup.wait_polled(names, timeout=180)
            assert sup.stop() == 0, sup.stderr_text()[-2000:]
            return "completed"
        try:
            if during_delivery:  # events of a batch are on the pipe: kill before/while it is acked
                sup.wait_for(lambda: sup.events(), timeout=kill_after)
            else:
                sup.wait_for(lambda: sup.proc.poll() is not None, timeout=kill_after)
        except AssertionError:
            pass
        killed = sup.proc.poll() is None
        if killed:
            sup.proc.send_signal(signal.SIGKILL)
        sup.kill()
        return "killed" if killed else "completed"

    def stored(self) -> list[dict]:
        if self.kind == "ndjson":
            return dedupe(read_ndjson(self.out))
        if self.kind == "protocol":
            return dedupe(self.persisted)
        assert not self.es.violations, self.es.violations[:3]
        return dedupe(self.es.stored())


@pytest.mark.parametrize("kind", ["ndjson", "protocol", "elasticsearch"])
def test_sigkill_matrix_backfill_steady_state_delivery(simulator, tmp_path, kind):
    rng = random.Random(f"crash-{kind}")
    d = Driver(kind, simulator, tmp_path)
    try:
        now = T0
        outcomes = {"backfill": 0, "steady": 0, "delivery": 0}
        # 1. the backfill, killed at random points until one run gets through (the clock stands
        #    still, so every stream's origin is T0 - initial_interval)
        while outcomes["backfill"] < KILLS:
            if d.run(now, rng.uniform(0.3, 1.6)) == "killed":
                outcomes["backfill"] += 1
        d.run(now, None)
        # 2. steady state: 5-minute polls while the simulator revises the last two hours,
        #    killed at random points; and 3. kills aimed at delivery (a bulk request or an
        #    unacknowledged batch in flight)
        now += 300
        started = time.monotonic()
        d.run(now, None)
        poll_s = time.monotonic() - started  # one undisturbed poll: kills then land inside one
        runs = 0
        while outcomes["steady"] + outcomes["delivery"] < KILLS and runs < 30:
            runs += 1
            now += rng.choice((0, 60, 300))
            phase = "delivery" if runs % 2 else "steady"
            if d.run(now, rng.uniform(0.1, max(0.3, 0.9 * poll_s)), during_delivery=(phase == "delivery")) == "killed":
                outcomes[phase] += 1
        # let every bucket settle and be re-read, without kills
        end_of_test = now + SETTLE + 300
        while now < end_of_test:
            now = min(now + 1800, end_of_test)
            d.run(now, None)
        assert outcomes["backfill"] >= KILLS and outcomes["steady"] + outcomes["delivery"] >= KILLS, outcomes
        docs = d.stored()
        backfill_bytes = sum(len(orjson.dumps(doc)) for doc in docs if doc["data_stream"]["dataset"] ==
                             "openai.completions" and _epoch(doc["openai"]["base"]["start_time"]) < T0)
        assert backfill_bytes > INLINE_PAYLOAD_LIMIT, "the backfill must go through a spool file"
        store = StateStore(d.state)
        try:
            assert store.pending_count() == 0, "batches left in the outbox after clean runs"
            wrong = compare_all(simulator, docs, store, end_of_test=end_of_test, audit_since=T0 - 6 * HOUR)
        finally:
            store.close()
        assert not wrong, wrong
    finally:
        d.close()
