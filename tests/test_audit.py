"""The audit stream: the seed's example, api-key actors, and exactly-once collection against the
simulator through many pages, an API error mid-way and a restart; the 403 reported once."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent_input.audit import KV_HWM, AuditCollector, audit_event
from agent_input.config import config_from_dict
from agent_input.engine import Delivery
from agent_input.http_client import AdminApiClient, RetriesExhaustedError
from agent_input.outputs import NdjsonFileOutput
from agent_input.state import StateStore
from kibana_assets.fields import undeclared_fields

from conftest import ADMIN_KEY, T0, audit_truth, read_ndjson

SEED = Path(__file__).parent / "fixtures" / "seed"
HOUR = 3600
DAY = 86400
# Set by Elastic Agent / Elasticsearch, not by a collector.
AGENT_FIELDS = ("agent", "elastic_agent", "input")
AGENT_EVENT_FIELDS = ("ingested", "agent_id_status")


def _config(url: str = "http://127.0.0.1:1", **audit):
    return config_from_dict({"url": url, "api_key": ADMIN_KEY, "max_retries": 1,
                             "preserve_original_event": audit.pop("preserve_original_event", False),
                             "data_streams": {"audit": audit}}, env={})


# -- golden ---------------------------------------------------------------------------------------
def test_seed_audit_example_from_its_original_event():
    seed = json.loads((SEED / "audit.json").read_text())
    api = json.loads(seed["event"]["original"])
    doc_id, doc = audit_event(api, namespace=seed["data_stream"]["namespace"], preserve_original=True)

    want = copy.deepcopy(seed)
    for k in AGENT_FIELDS:
        want.pop(k)
    for k in AGENT_EVENT_FIELDS:
        want["event"].pop(k)
    # The seed's test run also set Elastic's `preserve_duplicate_custom_fields`; we always keep the
    # openai.audit.* fields that ECS fields duplicate (the seed's table lists them), so the tag says nothing.
    want["tags"].remove("preserve_duplicate_custom_fields")
    assert doc == want
    assert doc_id == api["id"]
    assert doc["event"]["original"] == seed["event"]["original"]  # byte for byte


def test_event_original_and_its_tag_only_when_preserving():
    seed = json.loads((SEED / "audit.json").read_text())
    _, doc = audit_event(json.loads(seed["event"]["original"]))
    assert "original" not in doc["event"]
    assert doc["tags"] == ["forwarded", "openai-audit"]


API_KEY_EVENT = {  # the reference spec's list example (an api-key actor), with a project
    "id": "audit_log-xxx_yyyymmdd",
    "object": "organization.audit_log",
    "type": "project.archived",
    "effective_at": 1722461446,
    "project": {"id": "proj_abc", "name": "Project example"},
    "actor": {"type": "api_key", "api_key": {"id": "key_abc", "type": "user",
                                             "user": {"id": "user-xxx", "email": "user@example.com"}}},
    "project.archived": {"id": "proj_abc"},
}


def test_api_key_actor_event():
    doc_id, doc = audit_event(API_KEY_EVENT)
    assert doc_id == "audit_log-xxx_yyyymmdd"
    assert doc == {
        "@timestamp": "2024-07-31T21:30:46.000Z",
        "ecs": {"version": "9.3.0"},
        "data_stream": {"type": "logs", "dataset": "openai.audit", "namespace": "default"},
        "event": {"action": "project-archived", "category": ["iam"], "dataset": "openai.audit",
                  "id": "audit_log-xxx_yyyymmdd", "kind": "event", "type": ["change"]},
        "observer": {"product": "OpenAI", "vendor": "OpenAI"},
        "openai": {"audit": {
            "id": "audit_log-xxx_yyyymmdd",
            "object": "organization.audit_log",
            "type": "project.archived",
            "effective_at": "2024-07-31T21:30:46.000Z",
            "project": {"id": "proj_abc", "name": "Project example", "archived": {"id": "proj_abc"}},
            "actor": {"type": "api_key", "api_key": {"id": "key_abc", "type": "user",
                                                     "user": {"id": "user-xxx", "email": "user@example.com"}}},
        }},
        "user": {"domain": "example.com", "email": "user@example.com", "id": "user-xxx"},
        "related": {"user": ["user@example.com", "user-xxx"]},
        "tags": ["forwarded", "openai-audit"],
    }
    assert undeclared_fields(doc) == []


def test_service_account_actor_and_payload_as_sent():
    ev = {
        "id": "audit_log-sa", "object": "organization.audit_log", "type": "api_key.created", "effective_at": 1722461446,
        "actor": {"type": "api_key", "api_key": {"id": "key_svc", "type": "service_account",
                                                 "service_account": {"id": "svc_acct_abc"}}},
        "api_key.created": {"id": "key_new", "data": {"scopes": ["api.model.request"]}},
    }
    _, doc = audit_event(ev)
    assert doc["event"]["action"] == "api_key-created"
    assert doc["openai"]["audit"]["actor"]["api_key"] == {"id": "key_svc", "type": "service_account",
                                                          "service_account": {"id": "svc_acct_abc"}}
    assert doc["openai"]["audit"]["api_key"]["created"] == {"id": "key_new", "data": {"scopes": ["api.model.request"]}}
    assert doc["user"] == {"id": "svc_acct_abc"}
    assert doc["related"] == {"user": ["svc_acct_abc"]}
    assert "source" not in doc and "user_agent" not in doc
    assert undeclared_fields(doc) == []


def test_ip_details_that_are_not_numbers_are_dropped_not_fatal():
    seed = json.loads((SEED / "audit.json").read_text())
    api = json.loads(seed["event"]["original"])
    details = api["actor"]["session"]["ip_address_details"]
    details.update(asn="n/a", latitude="", longitude=None)
    _, doc = audit_event(api)
    assert "as" not in doc["source"] and "location" not in doc["source"]["geo"]
    assert "asn" not in doc["openai"]["audit"]["actor"]["session"]["ip_address_details"]


# -- against the simulator ---------------------------------------------------------------------------
def _collector(sim, state: Path, out: Path, **audit):
    cfg = _config(sim.base_url, batch_size=3, **audit)
    store = StateStore(state)
    output = NdjsonFileOutput(out)
    client = AdminApiClient(sim.base_url, ADMIN_KEY, max_retries=1, backoff_base=0.001, backoff_cap=0.01)
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=sim.now)
    return col, store, output, client


def test_a_day_of_many_pages_with_an_error_and_a_restart_is_stored_exactly_once(simulator, tmp_path):
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    # the 9th page of the first day fails twice in a row: more than the one retry allowed
    simulator.add_fault(FaultRule(kind="500", path="/v1/organization/audit_logs", skip=8, count=2))
    with pytest.raises(RetriesExhaustedError):
        col.poll(T0)
    for c in (output, store, client):
        c.close()

    # restart: a new process on the same state directory, a little later, then steady polling
    now = T0 + 120
    simulator.set_time(now)
    col, store, output, client = _collector(simulator, state, out)
    stats = col.poll(now)
    assert stats.pages > 10, "a day at batch_size 3 takes many pages"
    for _ in range(6):
        now += 300
        simulator.set_time(now)
        col.poll(now)
    for c in (output, store, client):
        c.close()

    lines = read_ndjson(out)
    ids = [d["_id"] for d in lines]
    assert len(ids) == len(set(ids)), "an audit event was emitted twice"
    want = audit_truth(simulator, int(T0 - DAY), int(now))
    assert len(want) > 50
    assert set(ids) == want
    for d in lines[:50]:
        body = {k: v for k, v in d.items() if k != "_id"}
        assert undeclared_fields(body) == [], undeclared_fields(body)
        assert d["event"]["id"] == d["_id"] == d["openai"]["audit"]["id"]


def test_overlap_catches_late_events_without_doubling(simulator, tmp_path):
    """An event OpenAI records late (effective_at just before the mark) is still collected once."""
    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out, initial_interval="2h")
    col.poll(T0)
    hwm = int(store.get(KV_HWM))
    late = {"id": "audit_log-late", "object": "organization.audit_log", "type": "logout.succeeded",
            "effective_at": hwm - 30, "actor": {"type": "session", "session": {"user": {"id": "u", "email": "a@b.c"}}}}
    real = col.client.get_json

    def with_late(path, params):
        body = real(path, params)
        if params["effective_at[gte]"] <= late["effective_at"] <= params["effective_at[lte]"]:
            body = dict(body, data=[late] + body["data"])
        return body

    col.client.get_json = with_late
    simulator.set_time(T0 + 300)
    col.poll(T0 + 300)
    simulator.set_time(T0 + 600)
    col.poll(T0 + 600)
    output.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    assert ids.count("audit_log-late") == 1
    assert len(ids) == len(set(ids))
    for c in (store, client):
        c.close()


class _AuditListing:
    """An in-memory audit log listing: effective_at[gte]/[lte] inclusive, newest first, `after`
    paging, and nothing after the current time."""

    def __init__(self, times):
        self.events = [{"id": f"audit_log-{t}-{n}", "object": "organization.audit_log", "type": "logout.succeeded",
                        "effective_at": t} for n, t in enumerate(times)]
        self.now = 0
        self.slices: list[tuple[int, int]] = []

    def get_json(self, path, params):
        gte, lte = params["effective_at[gte]"], params["effective_at[lte]"]
        if "after" not in params:
            self.slices.append((gte, lte))
        match = sorted((e for e in self.events if gte <= e["effective_at"] <= min(lte, self.now)),
                       key=lambda e: (-e["effective_at"], e["id"]))
        if "after" in params:
            match = match[[e["id"] for e in match].index(params["after"]) + 1:]
        page = match[: params["limit"]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(match) > len(page)}


def test_every_second_of_slices_overlaps_and_close_polls_is_stored_exactly_once(tmp_path):
    """Events at every second around each boundary the collector draws: the last and first second
    of a backfill's slices, the edge of the overlap it re-reads (new mark - 300 s), and polls
    closer together than the overlap. Each is stored once: none skipped, none twice."""
    from agent_input.audit import OVERLAP, SLICE

    start = int(T0) - 13 * HOUR  # initial_interval 13h: three slices, two inner boundaries
    times = [t for b in (start + SLICE, start + 2 * SLICE) for t in range(b - 3, b + 3)]
    times += list(range(int(T0) - OVERLAP - 400, int(T0) + 1500))  # every second around the later polls' marks
    api = _AuditListing(times)
    cfg = _config(batch_size=100, initial_interval="13h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), SimpleNamespace(get_json=api.get_json),
                         Delivery(store, output), clock=lambda: api.now)
    polled = []
    for now in (T0, T0 + 60, T0 + 100, T0 + 200, T0 + 500, T0 + 560, T0 + 1000, T0 + 1299, T0 + 1300):
        api.now = now
        first = len(api.slices)
        col.poll(now)
        polled.append(api.slices[first:])
    output.close()
    ids = [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")]
    want = {e["id"] for e in api.events if e["effective_at"] <= T0 + 1300}
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert set(ids) == want, f"{len(want - set(ids))} events were never stored"
    for slices in polled:  # within a poll, each slice starts the second after the last one ended
        assert all(b[0] == a[1] + 1 for a, b in zip(slices, slices[1:])), slices
    assert len(polled[0]) == 3
    store.close()


def test_forbidden_is_reported_once_and_the_stream_stays_quiet(tmp_path, caplog):
    from agent_input.simulator import Simulator

    sim = Simulator(seed=7, org="small", now=T0, admin_key=ADMIN_KEY, audit_logs_enabled=False)
    sim.base_url = sim.start()
    try:
        col, store, output, client = _collector(sim, tmp_path / "state", tmp_path / "audit.ndjson")
        with caplog.at_level(logging.INFO, logger="agent_input.audit"):
            first = col.poll(T0)
            later = [col.poll(T0 + i * 300) for i in range(1, 5)]
        assert first.requests == 0 and first.errors == [] and first.events == 0
        assert all(s.requests == 0 and not s.errors for s in later)
        assert sim.stats()["by_status"].get(403) == 1 or sim.stats()["by_status"].get("403") == 1
        reports = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(reports) == 1
        msg = reports[0].getMessage()
        assert "enable audit logging" in msg and "Owner" in msg
        assert "audit logging" in col.forbidden
        assert store.get(KV_HWM) is None  # nothing moved
        # once enabled (and the back-off over), collection starts
        sim.audit_logs_enabled = True
        stats = col.poll(T0 + 7 * HOUR)
        assert stats.events > 0 and col.forbidden is None
        for c in (output, store, client):
            c.close()
    finally:
        sim.stop()


def test_a_last_id_that_comes_back_is_an_error_not_the_end_of_the_slice(tmp_path):
    """has_more with a cursor already followed: ending the slice there would move the mark past
    events never read; looping would never end."""
    from agent_input.audit import BadAuditPage

    col, store, output, client = _collector(SimpleNamespace(base_url="http://127.0.0.1:1", now=lambda: T0),
                                            tmp_path / "state", tmp_path / "audit.ndjson")

    def event(i):
        return {"id": f"audit_log-{i}", "object": "organization.audit_log", "type": "logout.succeeded",
                "effective_at": T0 - 100 - i}

    pages = {None: ([event(1), event(2)], "audit_log-2"), "audit_log-2": ([event(3)], "audit_log-3"),
             "audit_log-3": ([event(2)], "audit_log-2")}
    asked = []

    def get_json(path, params):
        asked.append(params.get("after"))
        assert len(asked) < 10, "the slice is looping"
        data, last = pages[params.get("after")]
        return {"object": "list", "data": data, "first_id": data[0]["id"], "last_id": last, "has_more": True}

    col.client.get_json = get_json
    with pytest.raises(BadAuditPage, match="'audit_log-2' came back a second time"):
        col.poll(T0)
    assert asked == [None, "audit_log-2", "audit_log-3"]
    assert store.get(KV_HWM) is None  # nothing passed over
    for c in (output, store, client):
        c.close()
