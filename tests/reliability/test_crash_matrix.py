"""Crash consistency as one matrix: SIGKILL at random points during the backfill, during
steady-state polling with late revisions, and during delivery, then restart; for each output
(NDJSON file, the agent protocol with an acknowledging supervisor, the direct Elasticsearch
output into a create-only recording fake) and every stream with a truth: the ten usage streams,
costs and audit. Stored totals (deduplicated by id) must equal the simulator's final truth, and
no id may ever carry two contents. Rate limits are a snapshot, not a sum: their cycles must each be
stored once, every completed run's cycle present with its one collection document."""
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

from conftest import T0, committed_batches, dedupe, read_ndjson
from reliability_helpers import HOUR, SETTLE, _epoch, compare_all, full_config

ES_KEY = "ZXNfY3Jhc2hfbWF0cml4OnNlY3JldA=="
KILLS = 4  # per phase kind below; the slow, exhaustive versions live in tests/test_*.py
# The backfill phase: 24h of 1m buckets from pages of at most 400 results, each request 20 ms late.
# That is about 50 committed batches, commits spread out in time, and completions pages of ~460 KB
# (over the outbox's inline limit: kills also land around their spool files).
BACKFILL, BACKFILL_PAGE_RESULTS, BACKFILL_LATENCY = "24h", 400, 0.02
AFTER_BATCHES = (1, 5)  # a backfill run is killed after this many commits of its own (random)


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
        self.cfg = full_config(sim.base_url, initial=BACKFILL, rate_limits=True)
        # each completed run's rate limits cycle lies in its window: the run's --now to --now plus its
        # wall time (the --now clock runs on at wall speed, and a loaded machine starts the poll late)
        self.completed: list[tuple[int, int]] = []
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

    def committed_batches(self) -> int:
        return committed_batches(self.state)

    def run(self, now: float, *, after_batches: int | None = None, during_delivery: bool = False) -> str:
        """'completed' or 'killed'. A run is killed once it has committed `after_batches` batches
        of its own, or (`during_delivery`) while a delivery is in flight, whichever comes first,
        unless it completes before; with neither, it must complete."""
        self.sim.set_time(now)
        if after_batches is not None:
            target = self.committed_batches() + after_batches
            committed_enough = lambda: self.committed_batches() >= target  # noqa: E731
        else:
            committed_enough = lambda: False  # noqa: E731
        kill_after = 180.0 if after_batches is not None or during_delivery else None
        started = time.monotonic()
        outcome = self._run(now, kill_after, during_delivery, committed_enough)
        if outcome == "completed":
            self.completed.append(run_window(now, time.monotonic() - started))
        return outcome

    def _run(self, now, kill_after, during_delivery, committed_enough) -> str:
        if self.kind == "protocol":
            return self._run_protocol(now, kill_after, during_delivery, committed_enough)
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
            if committed_enough():
                break
            time.sleep(0.003)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            return "killed"
        _, err = proc.communicate()
        assert proc.returncode == 0, err.decode()[-2000:]  # a run that ended before its kill ended well
        return "completed"

    def _run_protocol(self, now, kill_after, during_delivery, committed_enough) -> str:
        from protocol_supervisor import Supervisor

        sup = Supervisor(self.state, now, persisted=self.persisted)
        sup.configure(self.cfg)
        names = [s.name for s in USAGE_STREAMS] + ["costs", "audit", "rate_limits"]
        if kill_after is None:
            sup.wait_polled(names, timeout=180)
            assert sup.stop() == 0, sup.stderr_text()[-2000:]
            return "completed"
        # the process lives on after its poll: a poll that ends before the kill point completed
        if during_delivery:  # events of a batch are on the pipe: kill before/while it is acked
            kill_now = lambda: bool(sup.events())  # noqa: E731
        else:
            kill_now = committed_enough
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline and sup.proc.poll() is None and not kill_now():
            if sup.polled(names):
                assert sup.stop() == 0, sup.stderr_text()[-2000:]
                return "completed"
            time.sleep(0.003)
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
        # 1. the backfill, killed KILLS times at random points, then run to its end (the clock
        #    stands still, so every stream's origin is T0 - initial_interval). Each run is killed
        #    after a random number of its own commits, not after a random time: a fast machine
        #    once finished the whole backfill before the first timed kill, and later "backfill"
        #    kills landed only in runs that had nothing left to do.
        simulator.max_results_per_page, simulator.latency = BACKFILL_PAGE_RESULTS, BACKFILL_LATENCY
        while outcomes["backfill"] < KILLS:
            if d.run(now, after_batches=rng.randint(*AFTER_BATCHES)) != "killed":
                break
            outcomes["backfill"] += 1
        assert outcomes["backfill"] == KILLS, (
            f"the backfill ended after {outcomes['backfill']} kills: it commits too few batches "
            f"for {KILLS} kills of up to {AFTER_BATCHES[1]} commits each")
        d.run(now)
        simulator.latency = 0.0
        # 2. steady state: polls while the simulator revises the last two hours, each killed after
        #    a random number of its ~12 commits (corrections among them); and 3. kills aimed at
        #    delivery: a bulk request in flight, events on the pipe not yet acknowledged, or (the
        #    file) right after the first commit, while its batch is written and acknowledged.
        #    Timed kills landed mostly in the collector's start-up, before it had read its state.
        now += 300
        d.run(now)
        runs = 0
        while outcomes["steady"] + outcomes["delivery"] < KILLS and runs < 30:
            runs += 1
            now += rng.choice((0, 60, 300))
            phase = "delivery" if runs % 2 else "steady"
            if phase == "steady":
                outcome = d.run(now, after_batches=rng.randint(1, 8))
            else:
                outcome = d.run(now, during_delivery=True, after_batches=1 if kind == "ndjson" else None)
            if outcome == "killed":
                outcomes[phase] += 1
        # let every bucket settle and be re-read, without kills
        end_of_test = now + SETTLE + 300
        while now < end_of_test:
            now = min(now + 1800, end_of_test)
            d.run(now)
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
        assert_rate_limit_cycles(docs, d.completed)
    finally:
        d.close()


def test_compare_all_fails_a_collector_that_never_committed_costs(simulator, tmp_path):
    """Costs were compared only when a costs cursor existed: a collector that never collected
    costs (enabled) passed the matrix."""
    store = StateStore(tmp_path / "state")
    try:
        wrong = compare_all(simulator, [], store, end_of_test=T0)
        assert "costs: never committed a cursor" in wrong, wrong
        assert not any(w.startswith("costs") for w in compare_all(simulator, [], store, end_of_test=T0, costs=False))
    finally:
        store.close()


def run_window(now: float, took: float) -> tuple[int, int]:
    """The seconds a run's rate limits cycle can have: its clock starts at `now` and runs at wall
    speed, and the poll takes its cycle when it starts, up to `took` seconds later."""
    return int(now), int(now + took) + 1


def assert_rate_limit_cycles(docs: list[dict], completed: list[tuple[int, int]]) -> None:
    """One collection document per cycle (a cycle is a run's time: a run killed and run again at
    the same time stores it once), every completed run's cycle there (in its `run_window`), a
    success with its limits; none for a time no run had. `docs` are deduplicated, so an id never
    carried two contents."""
    rl = [d for d in docs if d["data_stream"]["dataset"] == "openai.rate_limits"]
    cycles: dict[int, list[dict]] = {}
    limits: dict[int, int] = {}
    for doc in rl:
        t = int(_epoch(doc["@timestamp"]))
        if doc["event"].get("action") == "rate-limits-collection":
            cycles.setdefault(t, []).append(doc)
        elif "model" in doc["openai"]["rate_limits"]:
            limits[t] = limits.get(t, 0) + 1
    assert completed, "no run completed"
    lost = sorted(first for first, last in completed if not any(first <= t <= last for t in cycles))
    assert not lost, f"the rate limits cycles of completed runs at {lost[:3]} have no collection document"
    doubled = {t: len(c) for t, c in cycles.items() if len(c) != 1}
    assert not doubled, f"cycles with more than one collection document: {doubled}"
    assert set(limits) <= set(cycles), "limits of a cycle without its collection document"
    for t, (doc,) in cycles.items():
        collection = doc["openai"]["rate_limits"]["collection"]
        assert doc["event"]["outcome"] == "success" and collection["failed_projects"] == 0, doc
        assert collection["limits"] == limits.get(t, 0) > 0, (t, collection, limits.get(t))


def test_protocol_batches_the_supervisor_never_acknowledged_are_sent_again_after_a_kill(simulator, tmp_path):
    """The matrix's supervisor persists every batch it reads, so a collector that counted a batch
    delivered once written (before the supervisor's ack) lost nothing there. A supervisor that
    dies before acknowledging is the case the outbox is for: every batch it was sent and never
    acknowledged comes again, same ids and content, from the next collector."""
    from protocol_supervisor import Supervisor

    state = tmp_path / "state"
    cfg = full_config(simulator.base_url, initial="2h")
    simulator.set_time(T0)
    first = Supervisor(state, T0, ack=False)
    try:
        first.configure(cfg)
        first.wait_polled([s.name for s in USAGE_STREAMS] + ["costs", "audit"], timeout=120)
    finally:
        first.kill()
    unacked = dedupe(first.persisted)
    assert unacked, "the first collector sent nothing"
    second = Supervisor(state, T0)
    try:
        second.configure(cfg)
        second.wait_polled([s.name for s in USAGE_STREAMS] + ["costs", "audit"], timeout=120)
        assert second.stop() == 0, second.stderr_text()[-2000:]
    finally:
        if second.proc.poll() is None:
            second.kill()
    again = {d["_id"]: d for d in dedupe(second.persisted)}
    missing = [d["_id"] for d in unacked if again.get(d["_id"]) != d]
    assert not missing, f"{len(missing)} of {len(unacked)} unacknowledged documents were not sent again"
