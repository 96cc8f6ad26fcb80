"""Shared by the reliability suite: truth for every stream with a truth (usage, costs, audit)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from datetime import datetime

from agent_input.outputs import OutputError
from agent_input.streams import STREAMS_BY_NAME, USAGE_STREAMS

from conftest import ADMIN_KEY, audit_truth, stored_totals, truth_totals

HOUR, DAY = 3600, 86400
SETTLE = 2 * HOUR  # the simulator revises a minute for at most 2 hours
COSTS_SETTLE = 2 * DAY  # and a cost day for at most 2 days after it ends


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def full_config(url: str, *, initial: str = "1h", audit: bool = True, costs: bool = True, rate_limits: bool = False,
                **top) -> dict:
    """Every stream that has a truth: the ten usage streams (1m), costs (1d) and audit; and
    `rate_limits` when asked (a snapshot, not a sum: `compare_all` has nothing to compare, but a
    crash must not lose or double a cycle, and nothing it writes may hold a secret)."""
    streams = {s.name: {"initial_interval": initial} for s in USAGE_STREAMS}
    streams["costs"] = {"enabled": costs, "initial_interval": "5d"}
    streams["audit"] = {"enabled": audit, "initial_interval": "6h"}
    streams["rate_limits"] = {"enabled": rate_limits}
    cfg = {"url": url, "api_key": ADMIN_KEY, "max_retries": 3, "data_streams": streams}
    cfg.update(top)
    return cfg


def cost_totals_stored(docs, start: int, end: int) -> dict[tuple, float]:
    spec = STREAMS_BY_NAME["costs"]
    out: dict[tuple, float] = defaultdict(float)
    for d in docs:
        if d["data_stream"]["dataset"] != spec.dataset:
            continue
        t = _epoch(d["openai"]["base"]["start_time"])
        if not start <= t < end:
            continue
        base, sec = d["openai"]["base"], d["openai"].get("costs", {})
        key = tuple(base.get(g) if g in ("project_id", "api_key_id") else sec.get(g) for g in spec.group_by)
        out[key] += (sec.get("amount") or {}).get("value", 0) or 0
    return {k: v for k, v in out.items() if abs(v) > 1e-9}


def cost_totals_truth(sim, start: int, end: int) -> dict[tuple, float]:
    spec = STREAMS_BY_NAME["costs"]
    raw = sim.truth("costs", start, end, "1d", spec.group_by)
    return {k: v["amount"] for k, v in raw.items() if abs(v.get("amount", 0)) > 1e-9}


def compare_all(sim, docs, store, *, end_of_test: float, audit_since: float | None = None,
                costs: bool = True) -> list[str]:
    """Every mismatch between deduplicated stored documents and the simulator's truth. `costs`: the
    stream was enabled (`full_config`'s default), so a collector that never committed a costs
    cursor is a mismatch, not a stream left out."""
    wrong: list[str] = []
    settled = int(end_of_test - SETTLE) // 60 * 60
    for spec in USAGE_STREAMS:
        cur = store.cursor(spec.name, "1m")
        if cur is None:
            wrong.append(f"{spec.name}: never committed a cursor")
            continue
        got = stored_totals(docs, spec.name, cur.origin, settled)
        want = truth_totals(sim, spec.name, cur.origin, settled)
        if not want:
            wrong.append(f"{spec.name}: the simulator produced no usage")
        elif got != want:
            bad = [k for k in set(got) | set(want) if got.get(k) != want.get(k)]
            wrong.append(f"{spec.name}: {len(bad)} groups differ, e.g. {bad[:1]} {got.get(bad[0])} != {want.get(bad[0])}")
    cur = store.cursor("costs", "1d")
    if cur is None:
        if costs:
            wrong.append("costs: never committed a cursor")
    else:
        cost_end = int(end_of_test - COSTS_SETTLE) // DAY * DAY - DAY
        got, want = cost_totals_stored(docs, cur.origin, cost_end), cost_totals_truth(sim, cur.origin, cost_end)
        if not want:
            wrong.append("costs: no settled cost days to compare")
        elif set(got) != set(want) or any(not math.isclose(got[k], want[k], rel_tol=1e-9, abs_tol=1e-6) for k in want):
            wrong.append(f"costs: stored {sum(got.values()):.6f} != truth {sum(want.values()):.6f}")
    if audit_since is not None:
        got_ids = {d["_id"] for d in docs if d["data_stream"]["dataset"] == "openai.audit"}
        # events of the last few minutes may still be on their way (the collector's own lag)
        want_ids = audit_truth(sim, int(audit_since), int(end_of_test - 600))
        missing = want_ids - got_ids
        if missing:
            wrong.append(f"audit: {len(missing)} of {len(want_ids)} events missing")
        extra = got_ids - audit_truth(sim, int(audit_since) - DAY, int(end_of_test))
        if extra:
            wrong.append(f"audit: {len(extra)} events that the API never had")
    return wrong


class Out:
    """An output for the property tests: keeps every payload it is sent; `fail` set to "before"
    fails the next send with nothing written, "after" writes it and fails before the ack (a crash
    between the two)."""

    def __init__(self):
        self.delivered: list[bytes] = []
        self.fail: str | None = None  # "before": nothing written; "after": written, never acked

    def send(self, stream, payload, events, on_ack):
        mode, self.fail = self.fail, None
        if mode == "before":
            raise OutputError("injected: output down")
        self.delivered.append(payload)
        if mode == "after":
            raise OutputError("injected: crash before the ack")
        on_ack()

    def close(self):
        pass

    def by_id(self) -> dict[str, dict]:
        """Every document delivered, by id, as Elasticsearch's `create` keeps it (the first wins),
        asserting that no id was ever delivered with other content."""
        by_id: dict[str, dict] = {}
        for payload in self.delivered:
            for line in payload.splitlines():
                doc = json.loads(line)
                prev = by_id.setdefault(doc["_id"], doc)
                assert prev == doc, "one id, two contents"
        return by_id


def poll_steps(api, out: Out, start, steps, unit: int, revise):
    """Drive a property test's steps: each (units of time to advance by `unit` seconds, the
    revisions handed to `revise`, an action, where an API error strikes): a poll, a restart before
    it, a poll whose request fails part-way, or whose output fails before or after writing (the
    process then dies, and the restart re-sends the outbox); then a last clean restart and poll.
    `start()` opens the store and the collector as a (re)start does. The store (still open) and
    the last poll's stats."""
    store, col = start()
    for amount, revisions, action, fail_at in steps:
        api.now += amount * unit
        revise(revisions)
        api.calls = 0
        if action == "restart":
            store.close()
            store, col = start()
            action = "poll"
        if action == "api_error":
            api.fail_at = fail_at
        elif action.startswith("output_"):
            out.fail = action.split("_")[1]
        try:
            col.poll(api.now)
        except (ConnectionError, OutputError):
            if action.startswith("output_"):
                store.close()
                store, col = start()  # the process died: the restart re-sends the outbox
        api.fail_at, out.fail = None, None  # a fault belongs to its poll (armed but maybe not reached)
    store.close()
    store, col = start()
    return store, col.poll(api.now)
