"""The audit stream: the seed's example, api-key actors, and exactly-once collection against the
simulator through many pages, an API error mid-way and a restart; the 403 reported once."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent_input.audit import KV_HWM, KV_RECENT, AuditCollector, audit_event
from agent_input.config import config_from_dict
from agent_input.ecs import iso_timestamp
from agent_input.engine import Delivery
from agent_input.http_client import AdminApiClient, RetriesExhaustedError
from agent_input.outputs import NdjsonFileOutput
from agent_input.reports import short
from agent_input.state import StateStore
from kibana_assets.fields import undeclared_fields

from conftest import ADMIN_KEY, T0, audit_truth, first_poll_held, read_ndjson, traced_peak

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


@pytest.mark.parametrize("ip", ["", "unknown", "300.1.2.3"])
def test_an_ip_address_elasticsearch_cannot_index_is_left_out_not_fatal(ip):
    """openai.audit.actor.session.ip_address, source.ip and related.ip are mapped `ip`: a value that
    is not an address would make Elasticsearch reject the whole event (the seed's pipeline drops
    empty values). The rest of the event is kept; event.original keeps what OpenAI sent."""
    seed = json.loads((SEED / "audit.json").read_text())
    api = json.loads(seed["event"]["original"])
    api["actor"]["session"]["ip_address"] = ip
    _, doc = audit_event(api, preserve_original=True)
    assert "ip_address" not in doc["openai"]["audit"]["actor"]["session"]
    assert "ip" not in doc.get("source", {})
    assert "ip" not in doc.get("related", {})
    assert doc["user"]["email"] == "muskan.agarwal@crestdata.ai"
    assert json.loads(doc["event"]["original"])["actor"]["session"]["ip_address"] == ip


@pytest.mark.parametrize("ip", ["", "unknown"])
def test_an_unindexable_ip_address_leaves_out_only_the_ip_fields_not_the_geo(ip):
    """Only the `ip`-mapped fields lose the value: the country, city and AS number OpenAI sent
    still reach source.* (the audit dashboard's by-country panel reads source.geo.country_iso_code)."""
    seed = json.loads((SEED / "audit.json").read_text())
    api = json.loads(seed["event"]["original"])
    api["actor"]["session"]["ip_address"] = ip
    _, doc = audit_event(api)
    assert "ip" not in doc["source"] and "ip" not in doc.get("related", {})
    assert doc["source"]["geo"]["country_iso_code"] == "IN" and doc["source"]["geo"]["city_name"] == "Mumbai"
    assert doc["source"]["as"] == {"number": 55256}
    assert undeclared_fields(doc) == []


def test_ipv6_addresses_are_kept():
    seed = json.loads((SEED / "audit.json").read_text())
    api = json.loads(seed["event"]["original"])
    api["actor"]["session"]["ip_address"] = "2001:db8::1"
    _, doc = audit_event(api)
    assert doc["source"]["ip"] == "2001:db8::1" and doc["related"]["ip"] == ["2001:db8::1"]
    assert doc["openai"]["audit"]["actor"]["session"]["ip_address"] == "2001:db8::1"


@pytest.mark.parametrize("lat,lon", [("91.5", "72.8"), ("19.07", "-180.5")])
def test_coordinates_a_geo_point_cannot_hold_are_not_a_location(lat, lon):
    """source.geo.location is a geo_point: Elasticsearch rejects the event for a latitude beyond
    ±90 or a longitude beyond ±180. The numbers stay in ip_address_details (mapped double)."""
    seed = json.loads((SEED / "audit.json").read_text())
    api = json.loads(seed["event"]["original"])
    api["actor"]["session"]["ip_address_details"].update(latitude=lat, longitude=lon)
    _, doc = audit_event(api)
    assert "location" not in doc["source"]["geo"]
    assert doc["source"]["geo"]["city_name"] == "Mumbai"
    assert doc["openai"]["audit"]["actor"]["session"]["ip_address_details"]["latitude"] == float(lat)


@pytest.mark.parametrize("lat,lon", [("90", "180"), ("-90.0", "-180"), ("89.99", "179.5")])
def test_coordinates_on_the_edge_a_geo_point_holds_are_a_location(lat, lon):
    """±90 and ±180 themselves are coordinates a geo_point takes (a pole, the antimeridian): a
    location there is kept, only one beyond them is left out."""
    seed = json.loads((SEED / "audit.json").read_text())
    api = json.loads(seed["event"]["original"])
    api["actor"]["session"]["ip_address_details"].update(latitude=lat, longitude=lon)
    _, doc = audit_event(api)
    assert doc["source"]["geo"]["location"] == {"lat": float(lat), "lon": float(lon)}


@pytest.mark.parametrize("asn,kept", [(2**32 - 1, True), ("AS4294967295", True), (2**32, False), (-1, False)])
def test_an_as_number_is_kept_only_within_its_32_bits(asn, kept):
    """An AS number is 32 bits: 4294967295 is the last one, anything past it is no AS number
    (left out of source.as and ip_address_details, not stored as nonsense)."""
    seed = json.loads((SEED / "audit.json").read_text())
    api = json.loads(seed["event"]["original"])
    api["actor"]["session"]["ip_address_details"]["asn"] = asn
    _, doc = audit_event(api)
    details = doc["openai"]["audit"]["actor"]["session"]["ip_address_details"]
    if kept:
        assert doc["source"]["as"] == {"number": 2**32 - 1} and details["asn"] == 2**32 - 1
    else:
        assert "as" not in doc["source"] and "asn" not in details


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


def test_a_page_without_has_more_fails_the_slice_rather_than_end_it(simulator, tmp_path):
    """The reference requires `has_more`. A page without it (the simulator's invalid_results) was
    read as the end of the listing: the rest of its slice was never read and the mark passed it,
    so those events were lost for good, with only the entry that lacked an id reported."""
    from agent_input.audit import BadAuditPage
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    simulator.add_fault(FaultRule(kind="invalid_results", path="/v1/organization/audit_logs", skip=1, count=1))
    with pytest.raises(BadAuditPage, match="has_more"):
        col.poll(T0)
    # only the first poll's start is kept (where its slice began): the mark did not pass the slice
    assert store.get(KV_HWM) == str(int(T0 - DAY)), "the mark moved past a slice that was not read whole"
    simulator.set_time(T0 + 60)
    col.poll(T0 + 60)
    for c in (output, store, client):
        c.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    assert len(ids) == len(set(ids))
    assert set(ids) == audit_truth(simulator, int(T0 - DAY), int(T0 + 60))


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
        if not params.get("tenant_only") and params["effective_at[gte]"] <= late["effective_at"] <= params["effective_at[lte]"]:
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


def test_a_local_clock_ahead_of_openai_s_loses_no_event(simulator, tmp_path):
    """The collector's clock 10 minutes ahead of OpenAI's (a VM's drifted clock): the mark stops
    at the API's time (its Date header), not at the local one. Before, each poll marked as read
    10 minutes OpenAI had not reached yet, past the 5-minute overlap, and 76 of a day's 78
    events were never stored."""
    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    cfg = _config(simulator.base_url, initial_interval="1h")
    store, output = StateStore(state), NdjsonFileOutput(out)
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1)
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output),
                         clock=lambda: simulator.now() + 600)
    now = T0
    while now <= T0 + DAY:
        simulator.set_time(now)
        col.poll(now + 600)
        assert int(store.get(KV_HWM)) <= now + 1
        now += 300
    output.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    want = audit_truth(simulator, int(T0) - HOUR, int(now - 300))  # the first read: 1h before OpenAI's time
    assert len(want) > 50
    assert len(ids) == len(set(ids)) and set(ids) == want
    for c in (store, client):
        c.close()


@pytest.mark.parametrize("lead", [8 * HOUR, HOUR])
def test_a_first_read_on_a_clock_ahead_starts_initial_interval_before_openai_s_time(simulator, tmp_path, caplog, lead):
    """A first read on a clock 8 hours ahead of OpenAI's, initial_interval 6h: its start lay 2 hours
    in OpenAI's future, the mark was stored there, and every event OpenAI recorded before reaching
    it was never read (the 6 hours asked for, and 3 of the 10 of the 4 hours after the first poll),
    while a new collector (a new config under `run`) took the mark for an earlier version's. Like
    a usage stream's first run, it starts initial_interval before OpenAI's time (the `Date` of its
    first answer) when ahead of it by more than 5 minutes (1 hour: not 5 hours of the 6 asked)."""
    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    cfg = _config(simulator.base_url, initial_interval="6h")
    store, output = StateStore(state), NdjsonFileOutput(out)
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1)
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output),
                         clock=lambda: simulator.now() + lead)
    now = T0
    with caplog.at_level(logging.WARNING, logger="agent_input.audit"):
        while now <= T0 + 4 * HOUR:
            simulator.set_time(now)
            col.poll(now + lead)
            assert int(store.get(KV_HWM)) <= now + 1
            now += 300
    output.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    want = audit_truth(simulator, int(T0) - 6 * HOUR, int(now - 600))
    assert len(want) > 10
    assert len(ids) == len(set(ids))
    assert not want - set(ids), f"{len(want - set(ids))} of {len(want)} events lost"
    assert not [r for r in caplog.records if "is ahead of OpenAI's time" in r.getMessage()]
    for c in (store, client):
        c.close()


@pytest.mark.parametrize("how,later", [("tenant 403", 6 * HOUR), ("tenant 503", HOUR), ("503", 3 * DAY),
                                       ("403", 3 * DAY), ("held", HOUR)])
def test_a_first_read_kept_from_a_failed_first_poll_on_a_clock_ahead_starts_by_openai_s_time(
        simulator, tmp_path, caplog, how, later):
    """A clock 8 hours ahead of OpenAI's, initial_interval 6h, and a first poll that read nothing of
    a scope (the tenant scope refused or failing, the whole log refused or failing, the writes held
    by the organization check): the start it kept was taken on that clock, 2 hours in OpenAI's
    future. The first read from it, hours or days later, started `initial_interval` before that
    later Date, or not earlier at all once OpenAI's time had passed it: the 6 hours asked and 2
    after were never read (a tenant refusal retried 6h later: its events of those 6 hours; the
    log refused 3 days: 8 hours). The kept start is moved back by the clock's lead instead."""
    from agent_input.http_client import ApiError
    from agent_input.org_guard import OrganizationUnverified
    from agent_input.simulator import FaultRule

    lead = 8 * HOUR
    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    cfg = _config(simulator.base_url, initial_interval="6h")
    store, output = StateStore(state), NdjsonFileOutput(out)
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1, backoff_base=0.001, backoff_cap=0.01)
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output),
                         clock=lambda: simulator.now() + lead)
    if how == "held":
        def held():
            raise OrganizationUnverified("listing its projects failed: HTTP 500")

        store.write_check = held
    else:
        simulator.add_fault(FaultRule(kind=how.split()[-1], path="/v1/organization/audit_logs", count=None,
                                      query="tenant_only=true" if how.startswith("tenant") else ""))
    simulator.set_time(T0)
    if how in ("503", "held"):
        with pytest.raises((ApiError, OrganizationUnverified)):
            col.poll(T0 + lead)
    else:
        col.poll(T0 + lead)
    simulator.clear_faults()
    store.write_check = None
    t = int(T0) + later
    simulator.set_time(t)
    with caplog.at_level(logging.WARNING, logger="agent_input.audit"):
        assert col.poll(t + lead).errors == []
    assert col.forbidden is None and col.tenant_refused is None
    output.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    org, tenant = _truth_by_scope(simulator, int(T0) - 6 * HOUR, t - 120)
    assert org and tenant
    assert len(ids) == len(set(ids))
    assert not org - set(ids) and not tenant - set(ids), \
        f"lost {len(org - set(ids))} of {len(org)} organization, {len(tenant - set(ids))} of {len(tenant)} tenant events"
    assert not [r for r in caplog.records if "is ahead of OpenAI's time" in r.getMessage()]
    for c in (store, client):
        c.close()


def test_a_mark_an_earlier_version_set_ahead_of_openai_s_time_loses_no_later_event(simulator, tmp_path):
    """A version before the mark stopped at the API's time, on a clock 2 hours ahead of OpenAI's,
    left the organization scope's mark 2 hours past OpenAI's time. The upgrade waited for OpenAI to
    reach it and read from 5 minutes before it: every event OpenAI recorded in the 2 hours after
    the upgrade but those 5 minutes was never stored. The mark is pulled back by the clock's lead."""
    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    cfg = _config(simulator.base_url, initial_interval="1h")
    store, output = StateStore(state), NdjsonFileOutput(out)
    lead = 2 * HOUR
    store.put_kv(KV_HWM, str(int(T0) + lead + 1))  # its last read, at OpenAI's T0: up to its own clock
    store.put_kv(KV_RECENT, "{}")
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1)
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output),
                         clock=lambda: simulator.now() + lead)
    now = T0 + 300
    while now <= T0 + 4 * HOUR:
        simulator.set_time(now)
        col.poll(now + lead)
        now += 300
    output.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    want = audit_truth(simulator, int(T0) + 1, int(now - 600))
    assert len(want) > 5
    assert len(ids) == len(set(ids))
    assert not want - set(ids), f"{len(want - set(ids))} of {len(want)} events after the upgrade lost"
    for c in (store, client):
        c.close()


def test_a_mark_an_earlier_version_set_ahead_of_a_clock_corrected_since_loses_no_later_event(simulator, tmp_path):
    """The same mark, 2 hours past OpenAI's time, with the clock corrected at the upgrade: the mark
    lay ahead of the local clock too, so no slice was read (and the API's time never asked) until
    the clock reached it, and every event OpenAI recorded in those 2 hours but the last 5 minutes
    was never stored. The API's time is asked, and the mark pulled back to it."""
    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    cfg = _config(simulator.base_url, initial_interval="1h")
    store, output = StateStore(state), NdjsonFileOutput(out)
    lead = 2 * HOUR  # of the clock that earlier version ran on; none now
    store.put_kv(KV_HWM, str(int(T0) + lead + 1))
    store.put_kv(KV_RECENT, "{}")
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1)
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output),
                         clock=lambda: simulator.now())
    now = T0 + 300
    while now <= T0 + 4 * HOUR:
        simulator.set_time(now)
        col.poll(now)
        now += 300
    output.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    want = audit_truth(simulator, int(T0) + 1, int(now - 600))
    assert len(ids) == len(set(ids))
    assert len(want) > 5
    assert not want - set(ids), f"{len(want - set(ids))} of {len(want)} events after the upgrade lost"
    for c in (store, client):
        c.close()


def test_a_mark_an_earlier_version_set_ahead_of_a_clock_corrected_to_behind_openai_s_loses_no_later_event(
        simulator, tmp_path, caplog):
    """The same mark, with the clock corrected past OpenAI's time, to 10 minutes behind it: the mark
    pulled back to the API's time lay still ahead of the local clock, so no slice was read (and the
    mark pulled back again, and said again, at every poll) until the clock reached the old mark, and
    the events OpenAI recorded until then were lost (2 hours: 3 of 9). It is pulled back to the
    local clock at most, and said once."""
    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    cfg = _config(simulator.base_url, initial_interval="1h")
    store, output = StateStore(state), NdjsonFileOutput(out)
    lead, behind = 2 * HOUR, 600
    store.put_kv(KV_HWM, str(int(T0) + lead + 1))
    store.put_kv(KV_RECENT, "{}")
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1)
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output),
                         clock=lambda: simulator.now() - behind)
    now = T0 + 300
    with caplog.at_level(logging.WARNING, logger="agent_input.audit"):
        while now <= T0 + 4 * HOUR:
            simulator.set_time(now)
            col.poll(now - behind)
            now += 300
    output.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    want = audit_truth(simulator, int(T0) + 1, int(now - 600 - behind))
    assert len(ids) == len(set(ids))
    assert len(want) > 5
    assert not want - set(ids), f"{len(want - set(ids))} of {len(want)} events after the upgrade lost"
    assert sum("is ahead of OpenAI's time" in r.getMessage() for r in caplog.records) == 1
    for c in (store, client):
        c.close()


class _DateBehind(AdminApiClient):
    """A client whose answers' `Date` is `behind` seconds behind the API's clock (a proxy's, or a
    load balancer's backend on a slow clock)."""

    behind = 0

    def get_json(self, *args, **kwargs):
        body = super().get_json(*args, **kwargs)
        if self.server_date is not None:
            self.server_date -= self.behind
        return body


def test_a_date_that_goes_back_between_polls_writes_no_event_twice(simulator, tmp_path):
    """Every other poll's `Date` 15 minutes behind (a proxy, or a backend on a slow clock): the mark
    this process stored at the API's time lay more than the overlap past it, and was pulled back as
    if an earlier version had set it, at every such poll, the 10 minutes before it read and written
    again each time (12 hours: 71 events twice, of 50). The pull-back is for a mark this process did
    not store; the mark only waits for the API's time."""
    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    cfg = _config(simulator.base_url, initial_interval="1h")
    store, output = StateStore(state), NdjsonFileOutput(out)
    client = _DateBehind(simulator.base_url, ADMIN_KEY, max_retries=1)
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output),
                         clock=lambda: simulator.now())
    now, polls = T0, 0
    while now <= T0 + 12 * HOUR:
        simulator.set_time(now)
        client.behind = 900 if polls % 2 else 0
        col.poll(now)
        now, polls = now + 300, polls + 1
    output.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    want = audit_truth(simulator, int(T0) - HOUR, int(now - 300 - 900))
    assert len(want) > 20
    assert not want - set(ids)
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} events written twice"
    for c in (store, client):
        c.close()


_EMPTY = {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def _organization_only(get_json):
    """A listing's get_json for an organization without tenant-scoped events: the tenant scope's
    requests (tenant_only=true) list nothing, the others go to `get_json`."""
    return lambda path, params: _EMPTY if params.get("tenant_only") else get_json(path, params)


class _AuditListing:
    """An in-memory audit log listing: effective_at[gte]/[lte] inclusive, newest first, `after`
    paging, and nothing after the current time."""

    def __init__(self, times):
        self.events = [{"id": f"audit_log-{t}-{n}", "object": "organization.audit_log", "type": "logout.succeeded",
                        "effective_at": t} for n, t in enumerate(times)]
        self.now = 0
        self.slices: list[tuple[int, int]] = []

    def get_json(self, path, params):
        if params.get("tenant_only"):  # an organization without tenant-scoped events
            return _EMPTY
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


def test_a_long_backfill_reports_its_progress_as_the_usage_streams_do(tmp_path):
    """`collect` promises every stream's backfill percentage (a terminal's line, else a log line
    or the protocol's status every 30 s). The audit stream reported none: a 30-day audit backfill
    ran for minutes without a word of how far it got."""
    from agent_input.engine import Progress

    reports: list[tuple[str, str]] = []
    api = _AuditListing([int(T0) - 12 * HOUR, int(T0) - HOUR])
    api.now = int(T0)
    cfg = _config(batch_size=100, initial_interval="13h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), SimpleNamespace(get_json=api.get_json), Delivery(store, output),
                         clock=lambda: api.now,
                         progress=Progress(enabled=False, every=0, on_report=lambda s, m: reports.append((s, m))))
    col.poll(T0)
    output.close()
    store.close()
    # after each of the 3 slices but the last, of the organization's events, then of the tenant's
    assert [m[:len("backfill 46%")] for s, m in reports if s == "audit"] == ["backfill 46%", "backfill 92%"] * 2
    assert reports[0][1] == f"backfill 46%, up to {iso_timestamp(int(T0) - 13 * HOUR + 6 * HOUR - 1)}"


def test_a_backfill_that_reaches_the_api_s_own_time_is_done_not_stuck_part_way(tmp_path):
    """OpenAI's clock behind ours: the poll stops at the API's time, and that poll is done. It
    said "backfill 61%" instead, as if it had stopped part way."""
    from agent_input.engine import Progress

    reports: list[tuple[str, str]] = []
    api = _AuditListing([int(T0) - 12 * HOUR, int(T0) - HOUR])
    api.now = int(T0)
    cfg = _config(batch_size=100, initial_interval="13h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    # marks at 13h before (with the overlap): a first read would start 13h before OpenAI's time
    for key in (KV_HWM, "audit:tenant:hwm"):
        store.put_kv(key, str(int(T0) - 13 * HOUR + 300))
    client = SimpleNamespace(get_json=api.get_json, server_date=int(T0) - 5 * HOUR)  # in the 2nd slice
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now,
                         progress=Progress(enabled=False, every=0, on_report=lambda s, m: reports.append((s, m))))
    col.poll(T0)
    output.close()
    store.close()
    assert [m[:len("backfill 46%")] for s, m in reports if s == "audit"] == ["backfill 46%"] * 2


def test_a_first_answer_without_a_date_keeps_the_first_read_where_it_began(tmp_path):
    """A first read whose first answer has no `Date` (a proxy that drops it) stores that slice as
    before; a later slice's answer with one, on a clock an hour ahead of OpenAI's, sent the read
    back by the first-read rule over the slices already stored: their events written a second
    time (24h asked, an hour ahead: 6 of 144 events twice). The rule applies only before anything is stored."""
    lead = HOUR
    api = _AuditListing(list(range(int(T0) - 30 * HOUR, int(T0) - lead, 600)))
    api.now = int(T0) - lead  # OpenAI's time

    def get_json(path, params):
        client.server_date = api.now if api.slices else None  # none on the first slice's answer
        return api.get_json(path, params)

    client = SimpleNamespace(get_json=get_json, server_date=None)
    cfg = _config(batch_size=100, initial_interval="24h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: T0)
    col.poll(T0)
    output.close()
    store.close()
    ids = [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} events written twice"
    assert set(ids) == {e["id"] for e in api.events if e["effective_at"] >= int(T0) - 24 * HOUR}
    assert all(b[0] == a[1] + 1 for a, b in zip(api.slices, api.slices[1:])), api.slices  # none read again


def test_a_date_behind_events_openai_served_is_not_taken_as_openai_s_time(tmp_path):
    """OpenAI serves no event after its own time: a Date a year behind the events served (a proxy's
    clock) was taken as OpenAI's, the first read started a year back and the mark was held at that
    Date, so no event of the 24 hours asked nor any since was ever stored (before the first-read
    rule: the mark held at the first read's start, 240 of 312 lost). Such a Date is ignored, as
    a usage stream ignores a Date behind a bucket it served."""
    api = _AuditListing(list(range(int(T0) - 60 * HOUR, int(T0) + 4 * HOUR, 300)))
    client = SimpleNamespace(get_json=api.get_json, server_date=int(T0) - 365 * DAY)
    cfg = _config(batch_size=100, initial_interval="24h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    now = int(T0)
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: now)
    while now <= T0 + 2 * HOUR:
        api.now = now
        col.poll(now)
        now += 300
    output.close()
    ids = [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")]
    assert len(ids) == len(set(ids))
    assert set(ids) == {e["id"] for e in api.events if T0 - DAY <= e["effective_at"] <= now - 300}
    assert api.slices[0][0] == int(T0) - DAY and int(store.get(KV_HWM)) == now - 300 + 1
    store.close()


def test_a_date_a_second_behind_an_event_openai_s_servers_recorded_is_still_openai_s_time(tmp_path):
    """OpenAI's servers' clocks differ by a second or so: an answer's Date one second behind an
    event it serves was taken for a proxy's and ignored, on a host an hour ahead: the first read was
    not moved back (its first hour never read) and the mark went to the local clock, pulled back
    at the next poll over events already written (3h asked: 97 of 510 lost, 241 twice)."""
    lead, o = HOUR, int(T0)
    api = _AuditListing(sorted(set(range(o - 30 * HOUR, o + 4 * HOUR, 37)) | set(range(o, o + 3 * HOUR, 300))))

    def get_json(path, params):
        client.server_date = api.now - 1  # an event of this second recorded by a server a second ahead
        return api.get_json(path, params)

    client = SimpleNamespace(get_json=get_json, server_date=None)
    cfg = _config(batch_size=100, initial_interval="3h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now + lead)
    for api.now in range(o, o + 2 * HOUR + 1, 300):
        col.poll(api.now + lead)
    output.close()
    store.close()
    ids = [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} events written twice"
    # (the lead measured by that Date is a second more: the read starts a second earlier)
    assert set(ids) == {e["id"] for e in api.events if o - 3 * HOUR - 1 <= e["effective_at"] <= api.now}


def test_the_collection_gives_the_audit_stream_the_progress(tmp_path, monkeypatch):
    """`collect` and `run` build the collectors: the audit stream's backfill reports through the
    same Progress as the usage streams' (it was given none, and said nothing)."""
    from agent_input import app
    from agent_input.engine import Progress

    progress = Progress(enabled=False)
    cfg = _config(initial_interval="1d")
    collection = app.build(cfg, state_dir=tmp_path / "state", output=NdjsonFileOutput(tmp_path / "out.ndjson"),
                           clock=lambda: T0, progress=progress)
    try:
        [audit] = [c for c in collection.engine.collectors if c.name == "audit"]
        assert audit.progress is progress
    finally:
        collection.close()


def test_closing_a_collection_ends_its_listing_collectors_request_threads(simulator, tmp_path):
    """The audit and rate limits collectors ask OpenAI on a daemon thread of their own (a stop does
    not wait for a request that hangs). `run` builds new collectors at every config: the old ones'
    threads, left waiting for a next request, piled up, one per listing stream and config."""
    import threading
    import time

    from agent_input import app

    cfg = config_from_dict({"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 0,
                            "data_streams": {"audit": {"initial_interval": "1h"},
                                             "rate_limits": {"enabled": True}}}, env={})
    before = set(threading.enumerate())
    for _ in range(3):  # three configs, one after another
        collection = app.build(cfg, state_dir=tmp_path / "state", output=NdjsonFileOutput(tmp_path / "out.ndjson"),
                               clock=simulator.now)
        try:
            collection.engine.run(once=True)
        finally:
            collection.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [t.name for t in set(threading.enumerate()) - before if t.name.endswith("-request_0")]
        if not left:
            break
        time.sleep(0.05)
    assert left == [], left


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
        assert store.get(KV_HWM) == str(int(T0 - DAY))  # held where the stream would have started
        # once enabled (and the back-off over), collection starts
        sim.audit_logs_enabled = True
        stats = col.poll(T0 + 7 * HOUR)
        assert stats.events > 0 and col.forbidden is None
        for c in (output, store, client):
            c.close()
    finally:
        sim.stop()


def test_a_key_without_the_audit_scope_at_the_first_start_loses_nothing_once_granted(simulator, tmp_path):
    """A key that lacks api.audit_logs.read at the stream's first start: once the scope is granted
    (and asked again), both scopes are read from where that first start would have begun, not from
    `initial_interval` before the later day (the events of the refused hours were never stored)."""
    from agent_input.audit import FORBIDDEN_RETRY, KV_TENANT_HWM
    from agent_input.simulator import FaultRule

    col, store, output, client = _collector(simulator, tmp_path / "state", tmp_path / "audit.ndjson")
    simulator.add_fault(FaultRule(kind="403", path="/v1/organization/audit_logs", count=None,
                                  message="Missing scopes: api.audit_logs.read."))
    simulator.set_time(T0)
    assert col.poll(T0).events == 0 and col.forbidden
    assert store.get(KV_HWM) == store.get(KV_TENANT_HWM) == str(int(T0 - DAY))
    simulator.clear_faults()
    later = int(T0) + 2 * FORBIDDEN_RETRY  # a day later than the first start, to the second
    simulator.set_time(later)
    col.poll(later)
    for c in (output, store, client):
        c.close()
    ids = [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")]
    org, tenant = _truth_by_scope(simulator, int(T0 - DAY), later - 120)
    assert len(ids) == len(set(ids)) and org <= set(ids) and tenant <= set(ids)


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
    assert store.get(KV_HWM) == str(int(T0 - DAY))  # nothing passed over: the first poll's start kept
    for c in (output, store, client):
        c.close()


# -- bad events: reported, skipped, never blocking the stream -------------------------------------
def _session_event(i, t, **kw):
    ev = {"id": f"audit_log-{i}", "object": "organization.audit_log", "type": "login.succeeded", "effective_at": t,
          "actor": {"type": "session", "session": {"user": {"id": "user-1", "email": "a@b.c"}, "ip_address": "1.2.3.4"}}}
    ev.update(kw)
    return ev


def _bad(i, t, field, value):
    """An event whose dotted `field` holds `value`."""
    ev = _session_event(i, t)
    if field == "actor.api_key":
        ev["actor"] = {"type": "api_key", "api_key": value}
        return ev
    if not field.startswith(("actor.", "project.")):  # a top-level key (the payload's key has dots of its own)
        ev[field] = value
        return ev
    *parents, leaf = field.split(".")
    target = ev
    for p in parents:
        target = target.setdefault(p, {})
    target[leaf] = value
    return ev


BAD_FIELDS = [
    ("actor.session.ip_address_details", "n/a", "`actor.session.ip_address_details` is a string ('n/a'), not an object"),
    ("actor.api_key", {"id": "key_1", "type": "service_account", "service_account": "svc"},
     "`actor.api_key.service_account` is a string ('svc'), not an object"),
    ("effective_at", 1e30, "`effective_at` is a number (1e+30)"),
    ("effective_at", 1722461446.5, "`effective_at` is a number"),
    ("effective_at", 10**20, "`effective_at` is an integer (100000000000000000000)"),
    ("effective_at", -5, "`effective_at` is an integer (-5)"),
    ("effective_at", True, "`effective_at` is a boolean"),
    ("effective_at", "1722461446", "`effective_at` is a string"),
    ("actor", ["session"], "`actor` is an array"),
    ("actor.session", "x", "`actor.session` is a string"),
    ("actor.session.user", 7, "`actor.session.user` is an integer (7)"),
    ("actor.session.user.email", {"a": 1}, "`actor.session.user.email` is an object"),
    ("actor.session.ip_address", 1234, "`actor.session.ip_address` is an integer"),
    ("project", "proj_1", "`project` is a string ('proj_1'), not an object"),
    # openai.audit.project.{id,name} are keywords: an object there had Elasticsearch refuse the event
    ("project.id", {"id": "proj_1"}, "`project.id` is an object ({'id': 'proj_1'}), not a string"),
    ("project.name", ["a", "b"], "`project.name` is an array"),
    ("project.id", 17, "`project.id` is an integer (17), not a string"),
    ("login.succeeded", [1, 2], "`login.succeeded` is an array"),
    ("type", 3, "`type` is an integer (3)"),
    # the id is the document's `_id`: Elasticsearch refuses one empty or over 512 bytes
    ("id", "", "`id` is a string (''), not a document id (1 to 512 bytes"),
    ("id", "é" * 257, "`id` is a string ('ééé"),
    ("type", "a..b", "`type` is a string ('a..b'), not an event type name"),
]


@pytest.mark.parametrize("field,value,why", BAD_FIELDS, ids=[f"{f}={v!r:.20}" for f, v, _ in BAD_FIELDS])
def test_an_event_that_does_not_match_the_reference_is_named_with_its_field(field, value, why):
    from agent_input.audit import BadAuditPage

    with pytest.raises(BadAuditPage) as info:
        audit_event(_bad(1, 1722461446, field, value))
    assert why in str(info.value)


def test_optional_fields_may_be_null_or_absent():
    ev = _session_event(1, 1722461446, project=None, actor=None)
    assert audit_event(ev)[1]["@timestamp"] == "2024-07-31T21:30:46.000Z"
    ev = _session_event(1, 1722461446)
    ev["actor"]["session"]["ip_address_details"] = None
    assert audit_event(ev)[1]["source"] == {"ip": "1.2.3.4"}
    ev["actor"]["session"]["ip_address_details"] = {"asn": 10**400, "latitude": 10**400, "longitude": 1.0}
    doc = audit_event(ev)[1]  # an AS number past 32 bits, a latitude past float's range: dropped, not fatal
    assert doc["source"] == {"ip": "1.2.3.4"}
    assert doc["openai"]["audit"]["actor"]["session"]["ip_address_details"] == {"longitude": 1.0}


def _listing_collector(tmp_path, api):
    cfg = _config(batch_size=2, initial_interval="1h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), SimpleNamespace(get_json=_organization_only(api.get_json)),
                         Delivery(store, output), clock=lambda: api.now)
    return col, store, output


def test_bad_events_are_reported_and_passed_and_the_good_ones_stored(tmp_path, caplog):
    """One malformed event used to fail its whole slice on every poll: the mark never moved and
    the good events around it were never sent."""
    now = int(T0)
    api = _AuditListing([])
    api.events = [_session_event(1, now - 900), _session_event(2, now - 800)]
    api.events += [_bad(10 + n, now - 700 + n, f, v) for n, (f, v, _) in enumerate(BAD_FIELDS)
                   if f != "effective_at"]  # the listing filters on effective_at: those are below
    api.events += [_session_event(3, now - 600), _session_event(4, now - 10)]
    api.now = now
    col, store, output = _listing_collector(tmp_path, api)
    with caplog.at_level(logging.WARNING, logger="agent_input.audit"):
        stats = col.poll(now)
    bad_ids = {e["id"] for e in api.events} - {f"audit_log-{i}" for i in (1, 2, 3, 4)}
    assert stats.events == 4
    assert len(stats.errors) == len(bad_ids)
    for eid in bad_ids:
        assert sum(f"event {short(eid)}" in e for e in stats.errors) == 1, eid
    assert all("does not match the API reference" in e for e in stats.errors)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == len(bad_ids)
    assert store.get(KV_HWM) == str(now + 1)  # passed: an audit event never changes

    # the next poll re-reads the overlap: nothing reported twice, nothing stored twice
    api.events.append(_session_event(5, now + 100))
    api.now = now + 300
    later = col.poll(now + 300)
    assert later.events == 1 and later.errors == []
    output.close()
    ids = [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")]
    assert sorted(ids) == [f"audit_log-{i}" for i in (1, 2, 3, 4, 5)]
    store.close()


def test_a_bad_event_in_the_overlap_is_reported_once_not_at_every_re_read(tmp_path):
    """A skipped event within the last OVERLAP seconds is read again by the next poll: it is
    remembered with the ids emitted there, so that poll neither reports nor stores it."""
    now = int(T0)
    api = _AuditListing([])
    api.events = [_session_event(1, now - 20), _bad(2, now - 10, "actor.session.ip_address_details", "n/a")]
    api.now = now
    col, store, output = _listing_collector(tmp_path, api)
    first = col.poll(now)
    assert first.events == 1 and len(first.errors) == 1 and "audit_log-2" in first.errors[0]
    api.now = now + 60
    later = col.poll(now + 60)  # re-reads [now + 1 - 300, now + 60]: both events again
    assert later.errors == [], "the bad event was reported again by the overlap's re-read"
    assert later.events == 0
    output.close()
    store.close()

def test_effective_at_out_of_range_or_not_whole_is_skipped_not_fatal(tmp_path):
    now = int(T0)
    api = _AuditListing([])
    api.events = [_session_event(1, now - 100), _bad(2, now - 50, "effective_at", 1e30),
                  _bad(3, now - 40, "effective_at", float(now - 40) + 0.5), _session_event(4, now - 30)]

    def unfiltered(path, params):  # a server whose filter lets odd effective_at values through
        return {"object": "list", "data": api.events, "first_id": "audit_log-1", "last_id": "audit_log-4",
                "has_more": False}

    api.get_json = unfiltered
    api.now = now
    col, store, output = _listing_collector(tmp_path, api)
    stats = col.poll(now)
    assert stats.events == 2
    assert sorted(e.split(",")[0] for e in stats.errors) == ["audit: skipped event 'audit_log-2'",
                                                            "audit: skipped event 'audit_log-3'"]
    assert any("`effective_at` is a number (1e+30)" in e for e in stats.errors)
    assert store.get(KV_HWM) == str(now + 1)
    output.close()
    store.close()


def test_entries_without_an_id_are_reported_and_the_rest_stored(tmp_path):
    now = int(T0)
    data = [_session_event(1, now - 100), "garbage", {"type": "login.succeeded", "effective_at": now - 90},
            _session_event(2, now - 80)]

    def get_json(path, params):
        return {"object": "list", "data": data, "first_id": "audit_log-1", "last_id": "audit_log-2", "has_more": False}

    api = SimpleNamespace(get_json=get_json, now=now)
    col, store, output = _listing_collector(tmp_path, api)
    stats = col.poll(now)
    assert stats.events == 2
    assert len(stats.errors) == 2
    assert "skipped an entry" in stats.errors[0] and "'garbage'" in stats.errors[0]
    assert "no string `id`" in stats.errors[1]
    assert store.get(KV_HWM) == str(now + 1)
    output.close()
    store.close()


def test_any_failure_to_map_one_event_is_reported_not_a_failed_slice(tmp_path, monkeypatch):
    """The guard: a shape nobody foresaw (here: mapping raising an arbitrary error for one event,
    or a value the serializer refuses) skips that event only."""
    import agent_input.audit as audit_mod

    now = int(T0)
    api = _AuditListing([])
    api.events = [_session_event(1, now - 100), _session_event(2, now - 90), _session_event(3, now - 80),
                  _session_event(4, now - 70, **{"login.succeeded": {"n": 2**70}})]  # orjson: > 64-bit
    api.now = now
    real = audit_mod.audit_event

    def flaky(ev, **kw):
        if ev["id"] == "audit_log-2":
            raise KeyError("surprise")
        return real(ev, **kw)

    monkeypatch.setattr(audit_mod, "audit_event", flaky)
    col, store, output = _listing_collector(tmp_path, api)
    stats = col.poll(now)
    assert stats.events == 2
    assert len(stats.errors) == 2
    assert "event 'audit_log-2', it could not be mapped: KeyError: 'surprise'" in stats.errors[0]
    assert "event 'audit_log-4', it could not be mapped: TypeError: Integer exceeds 64-bit range" in stats.errors[1]
    assert store.get(KV_HWM) == str(now + 1)
    output.close()
    assert [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")] == ["audit_log-1", "audit_log-3"]
    store.close()


def test_an_effective_at_with_a_zero_fraction_is_the_integer_it_is(tmp_path):
    """The reference is OpenAPI 3.1 (JSON Schema 2020-12), whose `integer` takes 1770616227.0;
    such an event was reported as bad and skipped, never stored."""
    now = int(T0)
    whole = _session_event(1, now - 900)
    whole["effective_at"] = float(now - 900)
    beyond = _session_event(2, now - 800)
    beyond["effective_at"] = 10**12  # a server that ignores effective_at[lte]: bad, never remembered
    api = SimpleNamespace(now=now, get_json=lambda path, params: {"object": "list", "data": [whole, beyond],
                                                         "has_more": False})
    col, store, output = _listing_collector(tmp_path, api)
    stats = col.poll(now)
    output.close()
    docs = read_ndjson(tmp_path / "audit.ndjson")
    assert [d["_id"] for d in docs] == [whole["id"]] and docs[0]["@timestamp"].startswith(iso_timestamp(now - 900)[:19])
    assert len(stats.errors) == 1 and beyond["id"] not in (store.get(KV_RECENT) or "")
    store.close()


def test_a_slice_of_many_events_holds_about_its_payload_not_ten_times_it(tmp_path):
    """A slice's lines were kept in a list until its transaction, each in the buffer orjson made
    it in (4 KiB or more, never shrunk, from orjson 3.12 on), next to every parsed event: 102,000
    events in a 6h slice (171 MB of NDJSON) took the collector to 912 MB of RSS. Each event is
    now let go once mapped and its line appended to one buffer."""
    now = int(T0)
    n = 4000
    events = [_session_event(i, now - 3000 + i // 2, project={"id": "proj_1", "name": "P"}) for i in range(n)]
    events.sort(key=lambda e: (-e["effective_at"], e["id"]))
    pages: dict = {}
    for k in range(0, n, 100):
        page = events[k:k + 100]
        pages[None if k == 0 else events[k - 1]["id"]] = {
            "object": "list", "data": page, "first_id": page[0]["id"], "last_id": page[-1]["id"],
            "has_more": k + 100 < n}
    api = SimpleNamespace(now=now, get_json=_organization_only(
        lambda path, params: copy.deepcopy(pages[params.get("after")])))
    col, store, output = _listing_collector(tmp_path, api)
    stats, peak = traced_peak(lambda: col.poll(now))
    output.close()
    store.close()
    payload = (tmp_path / "audit.ndjson").stat().st_size
    assert stats.events == n and stats.errors == []
    assert peak < 4 * payload, f"peak {peak / 1e6:.1f} MB for {payload / 1e6:.1f} MB of NDJSON"


# -- the two scopes: organization events and tenant-scoped ones (tenant_only=true) ----------------
def _truth_by_scope(sim, start: int, end: int) -> tuple[set[str], set[str]]:
    """(organization ids, tenant-scoped ids) with start <= effective_at <= end."""
    org, tenant = set(), set()
    for hour in range(start // HOUR * HOUR, end + 1, HOUR):
        for e in sim.audit.hour_events(hour):
            if start <= e["effective_at"] <= end:
                (tenant if e["_tenant"] else org).add(e["id"])
    return org, tenant


def test_both_scopes_are_stored_exactly_once_across_restarts(simulator, tmp_path):
    from agent_input.audit import KV_TENANT_HWM, KV_TENANT_RECENT

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    now = int(T0)
    for run in range(3):  # three processes on one state directory, polling every 5 minutes
        col, store, output, client = _collector(simulator, state, out)
        for _ in range(4):
            simulator.set_time(now)
            col.poll(now)
            now += 300
        assert store.get(KV_TENANT_HWM) == str(now - 300 + 1) and store.get(KV_HWM) == store.get(KV_TENANT_HWM)
        assert store.get(KV_TENANT_RECENT) is not None
        for c in (output, store, client):
            c.close()
    docs = read_ndjson(out)
    ids = [d["_id"] for d in docs]
    assert len(ids) == len(set(ids)), "an audit event was emitted twice"
    org, tenant = _truth_by_scope(simulator, int(T0 - DAY), now - 300)
    assert len(tenant) >= 3 and not org & tenant
    assert set(ids) == org | tenant == audit_truth(simulator, int(T0 - DAY), now - 300)
    for d in docs:
        if d["_id"] in tenant:
            etype = d["openai"]["audit"]["type"]
            assert etype.startswith("tenant.") or etype.startswith("role.")
            assert d["user"]["email"] and d["event"]["action"] == etype.replace(".", "-")
            body = {k: v for k, v in d.items() if k != "_id"}
            assert undeclared_fields(body) == [], undeclared_fields(body)


def test_tenant_scope_refused_keeps_the_organization_flowing_and_catches_up_later(simulator, tmp_path, caplog):
    from agent_input.audit import FORBIDDEN_RETRY, KV_TENANT_HWM
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    refuse = FaultRule(kind="403", path="/v1/organization/audit_logs", query="tenant_only=true", count=None)
    simulator.add_fault(refuse)
    now = int(T0)
    with caplog.at_level(logging.INFO, logger="agent_input.audit"):
        for _ in range(6):
            simulator.set_time(now)
            stats = col.poll(now)
            assert stats.errors == [] and stats.requests > 0
            now += 300
    assert simulator.faults.rules()[0]["fired"] == 1, "asked again before FORBIDDEN_RETRY"
    reports = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(reports) == 1 and "tenant-scoped" in reports[0] and "403" in reports[0], reports
    assert "cannot list tenant-scoped audit events" in reports[0]  # the API's reason
    assert col.forbidden is None and col.tenant_refused
    assert store.get(KV_TENANT_HWM) == str(int(T0 - DAY))  # held where the scope would have started
    org, tenant = _truth_by_scope(simulator, int(T0 - DAY), now - 300)
    got = {d["_id"] for d in read_ndjson(out)}
    assert got == org and tenant, "the organization's events flow while the tenant scope is refused"

    # allowed again: still not asked before FORBIDDEN_RETRY has passed, then caught up from its mark
    simulator.clear_faults()
    caplog.clear()
    late = int(T0) + FORBIDDEN_RETRY
    with caplog.at_level(logging.INFO, logger="agent_input.audit"):
        for t in (now, late - 300, late, late + 300):
            simulator.set_time(t)
            col.poll(t)
            if t < late:
                assert col.tenant_refused is not None
    assert col.tenant_refused is None
    assert any("readable again" in r.getMessage() for r in caplog.records)
    for c in (output, store, client):
        c.close()
    docs = read_ndjson(out)
    ids = [d["_id"] for d in docs]
    assert len(ids) == len(set(ids))
    org, tenant = _truth_by_scope(simulator, int(T0 - DAY), late + 300)
    assert set(ids) == org | tenant


def _one_process(simulator, state, out, caplog, now, read):
    """One `collect --once` of audit at `now`: the WARNING-or-worse lines it logged, and
    `read(collector, store)` before it closes."""
    col, store, output, client = _collector(simulator, state, out)
    simulator.set_time(now)
    try:
        with caplog.at_level(logging.DEBUG, logger="agent_input.audit"):
            caplog.clear()
            assert col.poll(now).errors == []
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], read(col, store)
    finally:
        for c in (output, store, client):
            c.close()


def test_a_tenant_refusal_is_remembered_across_processes_and_not_warned_again(simulator, tmp_path, caplog):
    """`collect --once` from cron is a new process every 5 minutes: each warned again about the
    refused tenant scope. The refusal is kept in the state: a new process asks once (a fix is read
    at once) and says nothing when the answer is the same refusal."""
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    simulator.add_fault(FaultRule(kind="403", path="/v1/organization/audit_logs", query="tenant_only=true", count=None))

    def one_process(now):
        return _one_process(simulator, state, out, caplog, now, lambda col, store: col.tenant_refused)

    warned, refused = one_process(int(T0))
    assert len(warned) == 1 and "tenant-scoped" in warned[0] and refused
    for n, later in enumerate((300, 600), start=2):
        warned, refused = one_process(int(T0) + later)
        assert warned == [] and "403" in refused
        assert simulator.faults.rules()[0]["fired"] == n, "a new process did not ask once"
    # allowed within FORBIDDEN_RETRY: the next process reads it at once, and the record is cleared
    simulator.clear_faults()
    warned, refused = one_process(int(T0) + 900)
    assert refused is None and any("readable again" in w for w in warned)
    warned, refused = one_process(int(T0) + 1200)
    assert refused is None and warned == []


def test_an_organization_refusal_is_remembered_across_processes_and_not_logged_again(simulator, tmp_path, caplog):
    """The organization scope's 403 (audit logging off, or not an Owner's key) was kept only in
    memory: `collect --once` from cron logged the ERROR at every run. It is kept in the state like
    the tenant scope's, with each scope's would-be start mark: a new process asks once (the log
    enabled since is read at once, from the marks) and says nothing of the same refusal."""
    from agent_input.audit import KV_TENANT_HWM
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    simulator.add_fault(FaultRule(kind="403", path="/v1/organization/audit_logs", count=None))

    def one_process(now):
        said, (forbidden, marks) = _one_process(
            simulator, state, out, caplog, now,
            lambda col, store: (col.forbidden, (store.get(KV_HWM), store.get(KV_TENANT_HWM))))
        return said, forbidden, marks

    start = str(int(T0 - DAY))
    said, forbidden, marks = one_process(int(T0))
    assert len(said) == 1 and "enable audit logging" in said[0] and forbidden
    assert marks == (start, start)  # each scope held where it would have started
    for n, later in enumerate((300, 600), start=2):
        said, forbidden, marks = one_process(int(T0) + later)
        assert said == [] and "enable audit logging" in forbidden and marks == (start, start)
        assert simulator.faults.rules()[0]["fired"] == n, "a new process did not ask once"
    # enabled within FORBIDDEN_RETRY: the next process reads it at once; the record is cleared
    simulator.clear_faults()
    said, forbidden, _ = one_process(int(T0) + 900)
    assert forbidden is None and any("readable again" in w for w in said)
    said, forbidden, _ = one_process(int(T0) + 1200)
    assert forbidden is None and said == []
    from agent_input.audit import KV_REFUSED

    store = StateStore(state)
    assert store.get(KV_REFUSED) == ""
    store.close()
    org, tenant = _truth_by_scope(simulator, int(T0 - DAY), int(T0) + 1200 - 120)
    assert org <= {d["_id"] for d in read_ndjson(out)}, "the refused days' events were not caught up"


def test_a_refusal_recorded_in_the_future_is_asked_again_at_once(simulator, tmp_path):
    """A clock set back (a refusal stored at a time after `now`): waiting FORBIDDEN_RETRY from the
    record would hold the tenant scope for longer than the retry; it is asked at once instead."""
    import json as _json

    from agent_input.audit import KV_TENANT_REFUSED

    col, store, output, client = _collector(simulator, tmp_path / "state", tmp_path / "audit.ndjson")
    store.commit_events("audit", b"", 0, {KV_TENANT_REFUSED: _json.dumps({"at": int(T0) + 3 * HOUR, "why": "403"})})
    simulator.set_time(T0)
    stats = col.poll(T0)
    assert stats.errors == []
    assert col.tenant_refused is None, "the tenant scope was not asked (the record is in the future)"
    assert store.get(KV_TENANT_REFUSED) == ""
    for c in (output, store, client):
        c.close()


def test_a_rejected_key_on_the_tenant_scope_stops_the_stream_like_the_organization_s(simulator, tmp_path):
    """A 401 is not a failed slice to report and retry: the engine stops the stream and says why."""
    from agent_input.http_client import AuthenticationError
    from agent_input.simulator import FaultRule

    col, store, output, client = _collector(simulator, tmp_path / "state", tmp_path / "audit.ndjson")
    simulator.add_fault(FaultRule(kind="401", path="audit_logs", query="tenant_only=true", count=None))
    with pytest.raises(AuthenticationError):
        col.poll(T0)
    assert store.get(KV_HWM) == str(int(T0) + 1)  # the organization's slices of that poll are stored
    for c in (output, store, client):
        c.close()

def test_a_stop_on_the_tenant_retry_is_not_taken_for_the_scope_being_readable(simulator, tmp_path, caplog):
    from agent_input.audit import FORBIDDEN_RETRY
    from agent_input.simulator import FaultRule

    col, store, output, client = _collector(simulator, tmp_path / "state", tmp_path / "audit.ndjson")
    simulator.add_fault(FaultRule(kind="403", path="audit_logs", query="tenant_only=true", count=None))
    col.poll(T0)
    assert col.tenant_refused
    col.stop.set()  # SIGTERM as the 6-hourly retry comes: nothing is asked
    with caplog.at_level(logging.INFO, logger="agent_input.audit"):
        col.poll(T0 + FORBIDDEN_RETRY)
    assert not any("readable again" in r.getMessage() for r in caplog.records)
    assert col.tenant_refused and simulator.faults.rules()[0]["fired"] == 1
    for c in (output, store, client):
        c.close()


def test_tenant_scope_400_or_404_is_a_refusal_and_a_500_a_failed_slice(simulator, tmp_path):
    from agent_input.audit import KV_TENANT_HWM
    from agent_input.simulator import FaultRule

    col, store, output, client = _collector(simulator, tmp_path / "state", tmp_path / "audit.ndjson")
    simulator.add_fault(FaultRule(kind="404", path="audit_logs", query="tenant_only=true", count=1))
    stats = col.poll(T0)
    assert stats.errors == [] and "404" in col.tenant_refused and store.get(KV_HWM) == str(int(T0) + 1)
    col.tenant_refused = None  # a new process: asks at once
    # the 5xx: after the retry the tenant slice fails, its mark stays; the organization's moved on
    simulator.add_fault(FaultRule(kind="500", path="audit_logs", query="tenant_only=true", count=2))
    simulator.set_time(T0 + 300)
    stats = col.poll(T0 + 300)
    assert len(stats.errors) == 1 and "tenant-scoped events: poll failed, mark kept" in stats.errors[0]
    assert col.tenant_refused is None
    assert store.get(KV_HWM) == str(int(T0) + 301) and store.get(KV_TENANT_HWM) == str(int(T0 - DAY))
    simulator.set_time(T0 + 600)
    assert col.poll(T0 + 600).errors == []
    assert store.get(KV_TENANT_HWM) == str(int(T0) + 601)
    for c in (output, store, client):
        c.close()
    ids = [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")]
    assert len(ids) == len(set(ids))
    assert set(ids) == audit_truth(simulator, int(T0 - DAY), int(T0) + 600)


def test_tenant_scope_400_is_a_refusal_not_a_failed_slice(simulator, tmp_path):
    """A 400 on the tenant listing (an organization that cannot list tenant-scoped events) is a
    refusal, as a 403 or 404 is: warned once, asked again every FORBIDDEN_RETRY, the poll not
    failed, and the organization scope's events stored."""
    from agent_input.audit import FORBIDDEN_RETRY, KV_TENANT_HWM, KV_TENANT_REFUSED
    from agent_input.http_client import BadRequestError

    col, store, output, client = _collector(simulator, tmp_path / "state", tmp_path / "audit.ndjson")
    get_json = client.get_json
    asked = []

    def tenant_400(path, params=None):
        if (params or {}).get("tenant_only"):
            asked.append(params)
            raise BadRequestError(400, "tenant_only is not supported for this organization",
                                  "invalid_request_error", path)
        return get_json(path, params)

    client.get_json = tenant_400
    stats = col.poll(T0)
    assert stats.errors == [] and "400" in col.tenant_refused and len(asked) == 1
    assert json.loads(store.get(KV_TENANT_REFUSED))["why"] == col.tenant_refused
    assert store.get(KV_HWM) == str(int(T0) + 1) and store.get(KV_TENANT_HWM) == str(int(T0 - DAY))
    simulator.set_time(T0 + 300)
    assert col.poll(T0 + 300).errors == [] and len(asked) == 1  # not asked again before FORBIDDEN_RETRY
    for c in (output, store, client):
        c.close()
    ids = [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")]
    assert len(ids) == len(set(ids))
    assert set(ids) == _truth_by_scope(simulator, int(T0 - DAY), int(T0) + 300)[0]
    assert FORBIDDEN_RETRY > 300


def test_an_old_state_directory_goes_on_for_the_organization_and_starts_the_tenant_scope(
        simulator, tmp_path, monkeypatch):
    """A state directory of the version that read only the organization scope (only audit:hwm and
    audit:recent_ids): the organization goes on from its mark, nothing re-emitted; the tenant scope
    starts at now - initial_interval."""
    import agent_input.audit as audit_mod
    from agent_input.audit import KV_TENANT_HWM

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    real = AuditCollector._poll_scope
    with monkeypatch.context() as m:  # the old collector: the organization scope only
        m.setattr(audit_mod, "SCOPES", (audit_mod.ORGANIZATION,))  # nor kept a start for another
        m.setattr(AuditCollector, "_poll_scope",
                  lambda self, scope, now, stats: real(self, scope, now, stats)
                  if scope is audit_mod.ORGANIZATION else None)
        col, store, output, client = _collector(simulator, state, out)
        for t in (T0, T0 + 300):
            simulator.set_time(t)
            col.poll(t)
        assert store.get(KV_TENANT_HWM) is None and store.get(KV_HWM) == str(int(T0) + 301)
        for c in (output, store, client):
            c.close()
    before = [d["_id"] for d in read_ndjson(out)]
    later = int(T0) + 7200  # upgraded two hours later
    simulator.set_time(later)
    col, store, output, client = _collector(simulator, state, out)
    col.poll(later)
    for c in (output, store, client):
        c.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    assert ids[:len(before)] == before
    assert len(ids) == len(set(ids)), "the upgrade re-emitted events"
    org, _ = _truth_by_scope(simulator, int(T0 - DAY), later)
    _, tenant = _truth_by_scope(simulator, later - DAY, later)
    assert tenant and set(ids) == org | tenant


def test_a_busy_log_is_read_in_shorter_slices_each_holding_at_most_the_cap(tmp_path, monkeypatch):
    """A slice is read whole before its one transaction: 100,000 events in 6h took 660 MB. A
    slice that passes MAX_SLICE_EVENTS is read again as its older half, and the slices grow back
    once the log is quiet; every event is still stored exactly once, with the slices contiguous."""
    from agent_input import audit as A

    monkeypatch.setattr(A, "MAX_SLICE_EVENTS", 40)
    now = int(T0)
    busy = list(range(now - 3 * HOUR, now - 3 * HOUR + 300))  # 300 events in 5 minutes
    quiet = list(range(now - 2 * HOUR, now, 600))
    api = _AuditListing(busy + quiet)
    api.now = now
    cfg = _config(batch_size=100, initial_interval="4h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    delivery = Delivery(store, output)
    batches: list[int] = []
    real_commit = delivery.commit_events
    delivery.commit_events = lambda stream, lines, kv: (batches.append(len(lines)), real_commit(stream, lines, kv))[1]
    col = AuditCollector(cfg, cfg.stream("audit"), SimpleNamespace(get_json=api.get_json), delivery,
                         clock=lambda: api.now)
    col.poll(now)
    output.close()
    store.close()
    ids = [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")]
    assert len(ids) == len(set(ids)) and set(ids) == {e["id"] for e in api.events}
    assert max(batches) <= 40, "a slice held more than the cap"
    read_whole = [s for s in api.slices if s[1] >= s[0]]
    kept = []  # the slices that were stored: each starts the second after the previous one
    for gte, lte in read_whole:
        while kept and kept[-1][0] == gte:  # a slice read again as its older half
            kept.pop()
        kept.append((gte, lte))
    assert all(b[0] == a[1] + 1 for a, b in zip(kept, kept[1:])), kept
    assert kept[0][0] == now - 4 * HOUR and kept[-1][1] == now
    assert len(kept) < 30, "the slices grow back once the log is quiet"


def test_a_slice_of_the_overlap_read_in_halves_never_moves_the_mark_back(tmp_path, monkeypatch):
    """A poll starts OVERLAP before the mark; a busy first slice is read again as its older half,
    which ends before the mark. That half's mark was stored as it was: an API error (or a crash,
    or a stop) before the poll's later slices left the mark behind where the previous poll had
    been, and the next poll went back over events no longer among the recent ids: stored twice
    (found by tests/reliability/test_properties.py's audit property)."""
    from agent_input import audit as A
    from agent_input.http_client import ApiError, RetriesExhaustedError

    monkeypatch.setattr(A, "MAX_SLICE_EVENTS", 4)
    p = int(T0)
    api = _AuditListing([p - 400, p - 400] + [p + 5] * 5)  # two before the next overlap, then a burst
    calls = []

    def get_json(path, params):
        calls.append(params)
        if len(calls) == 3:  # the 2nd poll: its whole slice (too many), the older half, then this
            raise RetriesExhaustedError(500, "server error", path=path)
        return api.get_json(path, params)

    cfg = _config(batch_size=100, initial_interval="1h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), SimpleNamespace(get_json=get_json),
                         Delivery(store, output), clock=lambda: api.now)
    api.now = p
    col.poll(p)
    assert store.get(KV_HWM) == str(p + 1)
    calls.clear()
    api.now = p + 10
    with pytest.raises(ApiError):
        col.poll(p + 10)
    assert [(c["effective_at[gte]"], c["effective_at[lte]"]) for c in calls[:2]] == [(p - 299, p + 10),
                                                                                    (p - 299, p - 145)]
    assert store.get(KV_HWM) == str(p + 1), "the mark went back"
    api.now = p + 20
    col.poll(p + 20)
    output.close()
    store.close()
    ids = [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")]
    assert sorted(ids) == sorted(e["id"] for e in api.events), "an event was stored twice, or never"


def test_a_slice_of_exactly_the_cap_is_read_once_not_halved(tmp_path, monkeypatch):
    """Only a slice of MORE than MAX_SLICE_EVENTS events is read again in halves."""
    from agent_input import audit as A

    monkeypatch.setattr(A, "MAX_SLICE_EVENTS", 4)
    now = int(T0)
    api = _AuditListing([now - 400, now - 300, now - 200, now - 100])
    api.now = now
    cfg = _config(batch_size=100, initial_interval="1h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), SimpleNamespace(get_json=api.get_json),
                         Delivery(store, output), clock=lambda: api.now)
    assert col.poll(now).events == 4
    assert api.slices == [(now - HOUR, now)], "a slice of exactly the cap was read again in halves"
    output.close()
    store.close()


def test_initial_interval_raised_while_the_log_was_refused_still_reaches_back(simulator, tmp_path):
    """The marks stored at each scope's would-be start on a 403 held the first read there: an
    initial_interval raised before the log was readable (README's advice for time refused under
    an earlier version) reached nothing, and 2 days' events were missing. Nothing was read from
    those marks, so the raised value still counts, as for a first run."""
    from agent_input.audit import KV_UNREAD
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    simulator.add_fault(FaultRule(kind="403", path="/v1/organization/audit_logs", count=None,
                                  message="Missing scopes: api.audit_logs.read."))
    simulator.set_time(T0)
    col.poll(T0)
    assert col.forbidden and store.get(KV_HWM) == str(int(T0 - DAY))
    for c in (output, store, client):
        c.close()
    simulator.clear_faults()
    later = int(T0) + 600
    col, store, output, client = _collector(simulator, state, out, initial_interval="2d")
    simulator.set_time(later)
    assert col.poll(later).errors == []
    assert _json_loads(store.get(KV_UNREAD)) == {}  # read from now on: a later raise changes nothing
    for c in (output, store, client):
        c.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    org, tenant = _truth_by_scope(simulator, later - 2 * DAY, later - 120)
    assert org <= set(ids) and tenant <= set(ids) and len(ids) == len(set(ids))


def _json_loads(text):
    import json as _json

    return _json.loads(text or "{}")


def test_a_kept_refusal_whose_reason_changed_is_said_again(simulator, tmp_path, caplog):
    """A kept refusal is quiet only when the answer is the same one: a new process refused for
    another reason (audit logging turned off since the key's scope was granted, a 404 instead of a
    403 on the tenant scope) says so, for each scope, or the user acts on a stale reason."""
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    simulator.add_fault(FaultRule(kind="403", path="/v1/organization/audit_logs", count=None,
                                  message="Missing scopes: api.audit_logs.read."))
    said, _ = _one_process(simulator, state, out, caplog, int(T0), lambda col, store: None)
    assert len(said) == 1 and "api.audit_logs.read" in said[0]
    simulator.clear_faults()
    simulator.add_fault(FaultRule(kind="403", path="/v1/organization/audit_logs", count=None,
                                  message="Audit logging is not enabled for this organization."))
    said, forbidden = _one_process(simulator, state, out, caplog, int(T0) + 300, lambda col, store: col.forbidden)
    assert len(said) == 1 and "not enabled" in said[0] and "not enabled" in forbidden, said

    state2 = tmp_path / "state2"
    simulator.clear_faults()
    simulator.add_fault(FaultRule(kind="403", path="/v1/organization/audit_logs", query="tenant_only=true", count=None))
    said, _ = _one_process(simulator, state2, out, caplog, int(T0) + 600, lambda col, store: None)
    assert len(said) == 1 and "403" in said[0]
    simulator.clear_faults()
    simulator.add_fault(FaultRule(kind="404", path="/v1/organization/audit_logs", query="tenant_only=true", count=None))
    said, refused = _one_process(simulator, state2, out, caplog, int(T0) + 900, lambda col, store: col.tenant_refused)
    assert len(said) == 1 and "404" in said[0] and "404" in refused, said


def test_a_stop_before_asking_keeps_the_organization_refusal(simulator, tmp_path, caplog):
    """A process stopped (SIGTERM) before its first poll asked anything has not seen the log
    readable: the kept refusal stays, and no "readable again" is said (the next process would
    otherwise log the same refusal as news)."""
    from agent_input.audit import KV_REFUSED
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    simulator.add_fault(FaultRule(kind="403", path="/v1/organization/audit_logs", count=None))
    _one_process(simulator, state, out, caplog, int(T0), lambda col, store: None)
    col, store, output, client = _collector(simulator, state, out)
    kept = store.get(KV_REFUSED)
    assert kept
    col.stop.set()
    with caplog.at_level(logging.INFO, logger="agent_input.audit"):
        caplog.clear()
        col.poll(T0 + 300)
    assert not any("readable again" in r.getMessage() for r in caplog.records)
    assert store.get(KV_REFUSED) == kept and col.forbidden
    assert simulator.faults.rules()[0]["fired"] == 1
    for c in (output, store, client):
        c.close()


@pytest.mark.parametrize("record", ["null", "[1, 2]", "7", '"403"', '{"at": 5}', "not json"])
def test_a_refusal_record_that_is_not_ours_to_read_is_asked(simulator, tmp_path, record):
    """A refusal record that is not an object with `at` and `why` (another version's, damaged) is
    no refusal: the stream asks and collects rather than fail every poll."""
    from agent_input.audit import KV_REFUSED, KV_TENANT_REFUSED

    col, store, output, client = _collector(simulator, tmp_path / "state", tmp_path / "audit.ndjson")
    store.commit_events("audit", b"", 0, {KV_REFUSED: record, KV_TENANT_REFUSED: record})
    simulator.set_time(T0)
    stats = col.poll(T0)
    assert stats.errors == [] and stats.events > 0
    assert col.forbidden is None and col.tenant_refused is None
    for c in (output, store, client):
        c.close()


def test_an_unread_mark_starts_the_first_read_at_it_without_the_overlap(tmp_path):
    """The first read after a refusal starts at the would-be start, like a first run's (no
    OVERLAP before it: that is before the window asked for); a mark moved since the record was
    written (by a release that does not know it) is an ordinary mark, read from with the overlap."""
    from agent_input.audit import KV_UNREAD, OVERLAP

    api = _AuditListing([])
    cfg = _config(batch_size=100)
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), SimpleNamespace(get_json=api.get_json),
                         Delivery(store, output), clock=lambda: api.now)
    start = int(T0 - DAY)
    store.commit_events("audit", b"", 0, {KV_HWM: str(start), KV_UNREAD: json.dumps({KV_HWM: str(start)})})
    api.now = int(T0) + 600
    col.poll(api.now)
    assert api.slices[0][0] == start
    moved = int(T0) - HOUR  # the record says `start`, the mark is elsewhere: it was read from
    store.commit_events("audit", b"", 0, {KV_HWM: str(moved), KV_UNREAD: json.dumps({KV_HWM: str(start)})})
    api.slices.clear()
    api.now = int(T0) + 900
    col.poll(api.now)
    assert api.slices[0][0] == moved - OVERLAP
    output.close()
    store.close()


@pytest.mark.parametrize("how", ["503", "stop", "tenant 503"])
def test_a_first_poll_that_fails_keeps_each_scope_s_start(simulator, tmp_path, how):
    """A first poll that fails before a scope stored anything, whatever the failure (OpenAI
    answering 503 past the client's retries; a stop mid-slice; only the tenant scope's listing
    failing): the next poll, hours later, reads each scope from where the first one asked. Before,
    only a 403 kept those starts: the next poll began `initial_interval` before its own later
    `now`, and the events of the first window's oldest hours were never stored."""
    from agent_input.audit import KV_TENANT_HWM, KV_UNREAD
    from agent_input.http_client import ApiError, StoppedError
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    if how == "stop":  # the second page of the first slice: a stop while it is awaited
        real, calls = col.client.get_json, []

        def stopped_at_the_second_page(path, params):
            calls.append(params)
            if len(calls) == 2:
                col.stop.set()
                raise StoppedError(None, "stopped while waiting to retry", "stopped", path)
            return real(path, params)

        col.client.get_json = stopped_at_the_second_page
    else:
        simulator.add_fault(FaultRule(kind="503", path="/v1/organization/audit_logs", count=None,
                                      query="tenant_only=true" if how == "tenant 503" else ""))
    simulator.set_time(T0)
    if how == "tenant 503":  # the organization's events are stored; the tenant scope's failure reported
        stats = col.poll(T0)
        assert stats.events > 0 and len(stats.errors) == 1
    else:
        with pytest.raises(ApiError):  # RetriesExhaustedError; StoppedError
            col.poll(T0)
        assert store.get(KV_HWM) == str(int(T0 - DAY))
    assert store.get(KV_TENANT_HWM) == str(int(T0 - DAY))
    assert KV_TENANT_HWM in _json_loads(store.get(KV_UNREAD))  # nothing read from it yet
    for c in (output, store, client):
        c.close()
    simulator.clear_faults()
    _next_poll_reads_each_scope_from_its_start(simulator, *_collector(simulator, state, out), out)  # next start


def _next_poll_reads_each_scope_from_its_start(simulator, col, store, output, client, out):
    """The poll six hours after a failed first one at T0: every event of both scopes from the first
    poll's start on is delivered, once."""
    later = int(T0) + 6 * HOUR
    simulator.set_time(later)
    assert col.poll(later).errors == []
    for c in (output, store, client):
        c.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    org, tenant = _truth_by_scope(simulator, int(T0 - DAY), later - 120)
    assert tenant and org <= set(ids) and tenant <= set(ids) and len(ids) == len(set(ids))


def test_a_first_poll_the_organization_check_holds_starts_each_scope_where_it_asked(simulator, tmp_path):
    """The organization check holding writes (the projects listing failing) at the audit stream's
    first poll stores no mark: the same process's next poll, hours later once the check passes,
    reads each scope from where the held poll asked, not from `initial_interval` before its own
    later `now` (the events of the hours the check was held were never stored)."""
    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    first_poll_held(simulator, store, col.poll)
    assert store.get(KV_HWM) is None  # nothing written while held
    _next_poll_reads_each_scope_from_its_start(simulator, col, store, output, client, out)  # the same process's



@pytest.mark.parametrize("when", ["before the first slice", "after the organization's first slice"])
def test_a_first_poll_cut_short_by_a_stop_keeps_the_start_of_each_scope_not_read(simulator, tmp_path, when):
    """A stop (SIGTERM) that ends the first poll between slices raises nothing: the scopes it had
    not reached yet keep their would-be starts all the same, so the next process reads them from
    there, not from `initial_interval` before its own later `now`."""
    from agent_input.audit import KV_TENANT_HWM

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    if when == "before the first slice":
        col.stop.set()
    else:
        real = col.client.get_json

        def stop_once_answered(path, params):
            col.stop.set()  # the slice's pages are read and stored; no further slice starts
            return real(path, params)

        col.client.get_json = stop_once_answered
    simulator.set_time(T0)
    stats = col.poll(T0)
    assert stats.errors == []
    assert store.get(KV_TENANT_HWM) == str(int(T0 - DAY))
    if when == "before the first slice":
        assert stats.requests == 0 and store.get(KV_HWM) == str(int(T0 - DAY))
    for c in (output, store, client):
        c.close()
    _next_poll_reads_each_scope_from_its_start(simulator, *_collector(simulator, state, out), out)  # next start


def test_first_polls_the_organization_check_holds_twice_start_where_the_first_asked(simulator, tmp_path):
    """Two first polls held in a row, hours apart: the next poll reads from where the first of them
    asked, not the second (whose start is hours later: those hours were never stored)."""
    from agent_input.org_guard import OrganizationUnverified

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    first_poll_held(simulator, store, col.poll)

    def held():
        raise OrganizationUnverified("listing its projects failed: HTTP 500")

    store.write_check = held
    simulator.set_time(int(T0) + 3 * HOUR)
    with pytest.raises(OrganizationUnverified):
        col.poll(int(T0) + 3 * HOUR)
    store.write_check = None
    assert store.get(KV_HWM) is None
    _next_poll_reads_each_scope_from_its_start(simulator, col, store, output, client, out)  # the same process's


def test_after_a_held_first_poll_later_polls_read_from_their_marks_not_the_held_start(simulator, tmp_path):
    """The held poll's start is only where a scope with no mark starts: once a scope has its mark,
    each poll reads from there (with the overlap), never again from the held start, which would
    emit every event since then a second time at every poll."""
    from agent_input.audit import OVERLAP

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    first_poll_held(simulator, store, col.poll)
    for hours in (6, 7, 8):
        simulator.set_time(int(T0) + hours * HOUR)
        assert col.poll(int(T0) + hours * HOUR).errors == []
    mark = int(store.get(KV_HWM))
    real, asked = col.client.get_json, []
    col.client.get_json = lambda path, params: asked.append(params["effective_at[gte]"]) or real(path, params)
    simulator.set_time(int(T0) + 9 * HOUR)
    col.poll(int(T0) + 9 * HOUR)
    assert asked and asked[0] == mark - OVERLAP
    for c in (output, store, client):
        c.close()
    ids = [d["_id"] for d in read_ndjson(out)]
    assert ids and len(ids) == len(set(ids))

def test_a_held_first_poll_then_one_that_fails_stores_the_held_poll_s_start(simulator, tmp_path):
    """A first poll the organization check held, then a poll that fails another way (OpenAI 503
    past the retries) with the check passing: the start it stores is the held poll's, not
    `initial_interval` before its own later `now`, so the next process reads every event."""
    from agent_input.audit import KV_TENANT_HWM
    from agent_input.http_client import ApiError
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    first_poll_held(simulator, store, col.poll)
    simulator.add_fault(FaultRule(kind="503", path="/v1/organization/audit_logs", count=None))
    simulator.set_time(int(T0) + 3 * HOUR)
    with pytest.raises(ApiError):
        col.poll(int(T0) + 3 * HOUR)
    simulator.clear_faults()
    assert store.get(KV_HWM) == store.get(KV_TENANT_HWM) == str(int(T0 - DAY))
    for c in (output, store, client):
        c.close()
    _next_poll_reads_each_scope_from_its_start(simulator, *_collector(simulator, state, out), out)  # next start


@pytest.mark.parametrize("how", ["503", "403"])
def test_a_first_poll_that_fails_while_the_organization_check_holds_keeps_each_scope_s_start(
        simulator, tmp_path, how):
    """The audit stream's first poll failing another way (OpenAI down for every endpoint: 503 past
    the retries; audit logs refused, 403) while the organization check holds writes too: the
    writes that keep each scope's start were held, and the start dropped (logged at debug), so the
    same process's next poll began `initial_interval` before its own later `now`. It is kept in
    memory, as a poll the check itself held."""
    from agent_input.http_client import ApiError
    from agent_input.org_guard import OrganizationUnverified
    from agent_input.simulator import FaultRule

    state, out = tmp_path / "state", tmp_path / "audit.ndjson"
    col, store, output, client = _collector(simulator, state, out)
    simulator.add_fault(FaultRule(kind=how, path="/v1/organization/audit_logs", count=None))

    def held():
        raise OrganizationUnverified("listing its projects failed: HTTP 500")

    store.write_check = held
    simulator.set_time(T0)
    if how == "503":
        with pytest.raises(ApiError):
            col.poll(T0)
    else:  # refused: the stream stays quiet, and asks again 6 hours later
        col.poll(T0)
        assert col.forbidden is not None
    store.write_check = None
    simulator.clear_faults()
    assert store.get(KV_HWM) is None  # nothing written while held
    _next_poll_reads_each_scope_from_its_start(simulator, col, store, output, client, out)  # the same process's


def _dated_organization_client(api, failing=lambda: False):
    """The organization scope of `api` through a client whose answers carry `api.now` as their
    Date; a call for which `failing()` is true fails as OpenAI down past the retries (no Date)."""
    client = SimpleNamespace(server_date=None)

    def get_json(path, params):
        if failing():
            raise RetriesExhaustedError(503, "OpenAI down", path=path)
        answer = _organization_only(api.get_json)(path, params)
        client.server_date = api.now
        return answer

    client.get_json = get_json
    return client


def _held_by_the_check():
    from agent_input.org_guard import OrganizationUnverified

    raise OrganizationUnverified("listing its projects failed: HTTP 500")


@pytest.mark.parametrize("process", ["same", "new"])
def test_a_first_read_moved_back_by_an_answer_s_lead_keeps_that_start_when_its_read_fails(tmp_path, process):
    """A clock a day ahead, 3h asked: the first poll's request fails (no answer, the start kept on
    that clock, 21 hours in OpenAI's future); the next poll's answer gives the lead and the read is
    moved back to 3 hours before OpenAI's time, but asking again fails too. The start kept was still
    the local clock's: with the clock corrected (NTP) before the next poll, nothing moved it back,
    and the read started 3 hours before that later poll's `now`: the 20 minutes between the first
    poll and it (as long as the clock stayed ahead, up to a day) were never read. The start moved
    by the lead an answer gave is kept, by OpenAI's time, and not moved again."""
    now = int(T0)
    api = _AuditListing([now - 2 * HOUR - 50 * 60, now + 600])
    api.now = now
    lead = [DAY]
    cfg = _config(batch_size=10, initial_interval="3h")
    calls = [0]
    fail = [{1}]

    def failing():
        calls[0] += 1
        return calls[0] in fail[0]

    client = _dated_organization_client(api, failing)
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now + lead[0])
    with pytest.raises(RetriesExhaustedError):
        col.poll(api.now + DAY)  # no answer: the start is this clock's, a day ahead
    api.now += 300
    calls[0], fail[0] = 0, {2}  # answered (a day ahead: moved back), asking again fails
    with pytest.raises(RetriesExhaustedError):
        col.poll(api.now + DAY)
    api.now += 900
    lead[0] = 0  # the clock corrected
    calls[0], fail[0] = 0, set()
    if process == "new":
        store.close()
        store = StateStore(tmp_path / "state")
        col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now)
    col.poll(api.now)
    assert min(gte for gte, _ in api.slices[-2:]) == now - 3 * HOUR
    output.close()
    assert sorted(d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")) == sorted(e["id"] for e in api.events)
    store.close()


def test_a_first_read_moved_back_by_an_answer_s_lead_and_held_keeps_that_start(tmp_path):
    """The same with the organization check holding the first poll's writes, a day ahead: its read
    was moved back to 3 hours before OpenAI's time, but the start held in memory was the local
    clock's; corrected before the next poll, that read started 3 hours before its own `now`."""
    from agent_input.org_guard import OrganizationUnverified

    now = int(T0)
    api = _AuditListing([now - 2 * HOUR - 50 * 60, now + 600])
    api.now = now
    lead = [DAY]
    cfg = _config(batch_size=10, initial_interval="3h")
    client = _dated_organization_client(api)
    held = _held_by_the_check
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now + lead[0])
    store.write_check = held
    with pytest.raises(OrganizationUnverified):
        col.poll(api.now + DAY)
    store.write_check = None
    api.now += 1200
    lead[0] = 0  # the clock corrected
    asked = len(api.slices)
    col.poll(api.now)
    assert min(gte for gte, _ in api.slices[asked:]) == now - 3 * HOUR
    output.close()
    assert sorted(d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")) == sorted(e["id"] for e in api.events)
    store.close()


def test_a_first_slice_after_a_held_read_keeps_only_marks_in_the_unread_map(tmp_path):
    """A first read moved back by the clock's lead and held by the organization check, then read:
    its first stored slice keeps the other scope's would-be start, marked by OpenAI's time. That
    mark's kv write went into the unread-marks map as well, under its own key: the map, which
    holds a scope's mark key and its start, then named `audit:start_by_openai` as a mark."""
    from agent_input.audit import KV_UNREAD, SCOPES
    from agent_input.org_guard import OrganizationUnverified

    now = int(T0)
    api = _AuditListing([now - 2 * HOUR])
    api.now = now
    cfg = _config(batch_size=10, initial_interval="3h")
    client = _dated_organization_client(api)
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now + DAY)
    store.write_check = _held_by_the_check
    with pytest.raises(OrganizationUnverified):
        col.poll(api.now + DAY)
    store.write_check = None
    api.now += 300
    col.poll(api.now + DAY)
    output.close()
    assert set(json.loads(store.get(KV_UNREAD) or "{}")) <= {s.kv_hwm for s in SCOPES}
    store.close()


def test_a_start_held_by_openai_s_time_then_kept_by_a_failed_poll_is_not_moved_back_again(tmp_path):
    """A day ahead, 3h asked: the first poll's read, moved back to 3 hours before OpenAI's time, is
    held by the organization check (that start in memory); the next poll's first request fails, and
    it keeps the held start in the state, where the next process moved it back by the day once
    more: read from a day and 3 hours before."""
    from agent_input.org_guard import OrganizationUnverified

    now = int(T0)
    api = _AuditListing([now - 2 * HOUR])
    api.now = now
    cfg = _config(batch_size=10, initial_interval="3h")
    fail = [False]
    client = _dated_organization_client(api, lambda: fail[0])
    held = _held_by_the_check
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now + DAY)
    store.write_check = held
    with pytest.raises(OrganizationUnverified):
        col.poll(api.now + DAY)
    store.write_check, fail[0] = None, True
    api.now += 300
    with pytest.raises(RetriesExhaustedError):
        col.poll(api.now + DAY)
    store.close()
    fail[0], api.now = False, api.now + 300
    store = StateStore(tmp_path / "state")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now + DAY)
    asked = len(api.slices)
    col.poll(api.now + DAY)
    assert min(gte for gte, _ in api.slices[asked:]) == now - 3 * HOUR
    output.close()
    assert [d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")] == [api.events[0]["id"]]
    store.close()


def _two_scopes(now: int, org_times: list[int], tenant_times: list[int]) -> tuple["_AuditListing", "_AuditListing"]:
    """The organization scope's listing and the tenant scope's (its events tenant-scoped), both at `now`."""
    org, tenant = _AuditListing(org_times), _AuditListing(tenant_times)
    for e in tenant.events:
        e["id"], e["type"] = e["id"].replace("audit_log-", "audit_log-t"), "tenant.admin_api_key.created"
    org.now = tenant.now = now
    return org, tenant


def _dated_answer(org, tenant, client, path: str, params: dict) -> dict:
    """The scope's answer `params` ask for, its `Date` (OpenAI's time) on `client`."""
    listing = tenant if params.get("tenant_only") else org
    answer = listing.get_json(path, {k: v for k, v in params.items() if k != "tenant_only"})
    client.server_date = org.now
    return answer


@pytest.mark.parametrize("process", ["same", "new"])
def test_a_tenant_scope_refused_after_a_first_read_moved_back_by_the_lead_keeps_its_start_moved_back(tmp_path,
                                                                                                     process):
    """A clock a day ahead, 3h asked: the organization scope's first read is moved back by the
    lead its answer gave, and its first slice keeps the tenant scope's would-be start on this
    clock (21 hours in OpenAI's future). The tenant scope's first request is refused (403). That
    start was kept as it was: with the clock corrected (NTP) before the tenant scope is asked again
    (at once by a new process, a day and FORBIDDEN_RETRY later by the same one), nothing moved it back, and
    the tenant events of the 3 hours asked and of the time since were never read (as for a read
    that failed, `_keep_starts`, the start is kept moved back by that lead)."""
    from agent_input.audit import FORBIDDEN_RETRY
    from agent_input.http_client import PermissionDeniedError

    now = int(T0)
    org, tenant = _two_scopes(now, [now - 2 * HOUR - 50 * 60, now + 600],
                              [now - 2 * HOUR - 40 * 60, now + 700, now + 2 * HOUR])
    lead = [DAY]
    refuse = [True]
    client = SimpleNamespace(server_date=None)

    def get_json(path, params):
        if params.get("tenant_only") and refuse[0]:
            raise PermissionDeniedError(403, "cannot list tenant-scoped audit events", path=path)
        return _dated_answer(org, tenant, client, path, params)

    client.get_json = get_json
    cfg = _config(batch_size=10, initial_interval="3h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: org.now + lead[0])
    col.poll(org.now + DAY)
    assert col.tenant_refused
    lead[0], refuse[0] = 0, False  # the clock corrected; tenant-scoped events readable
    # asked again at once by a new process, FORBIDDEN_RETRY after the refusal on the clock ahead by the same one
    org.now = tenant.now = now + (900 if process == "new" else DAY + FORBIDDEN_RETRY)
    if process == "new":
        store.close()
        store = StateStore(tmp_path / "state")
        col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: org.now)
    col.poll(org.now)
    assert col.tenant_refused is None
    assert min(gte for gte, _ in tenant.slices) == now - 3 * HOUR
    output.close()
    want = sorted(e["id"] for e in org.events + tenant.events if e["effective_at"] <= org.now - 60)
    assert sorted(d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")) == want
    store.close()


def test_audit_logs_refused_after_a_first_read_moved_back_by_the_lead_keep_the_starts_moved_back(tmp_path):
    """The same for a 403 of the organization scope itself (audit logs refused between two
    requests: a key's scope taken away), once an answer gave a day's lead and the first read was
    moved back: each scope's start is kept moved back, not on the clock a day ahead (corrected
    before the next process asked again: what OpenAI recorded from 3 hours before the first poll
    until then never read)."""
    from agent_input.http_client import PermissionDeniedError

    now = int(T0)
    api = _AuditListing([now - 2 * HOUR - 50 * 60, now + 600])
    api.now = now
    refuse = [False]
    client = SimpleNamespace(server_date=None)

    def get_json(path, params):
        if refuse[0]:
            raise PermissionDeniedError(403, "audit logging is not enabled", path=path)
        refuse[0] = True  # the first answer only; asking again (moved back by its lead) is refused
        answer = _organization_only(api.get_json)(path, params)
        client.server_date = api.now
        return answer

    client.get_json = get_json
    cfg = _config(batch_size=10, initial_interval="3h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now + DAY)
    col.poll(api.now + DAY)
    assert col.forbidden
    store.close()
    api.now += 900
    refuse[0] = False
    client.get_json = lambda path, params: _organization_only(api.get_json)(path, params)
    store = StateStore(tmp_path / "state")  # a new process on the clock corrected: asks again at once
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now)
    col.poll(api.now)
    assert col.forbidden is None
    assert min(gte for gte, _ in api.slices[1:]) == now - 3 * HOUR
    output.close()
    assert sorted(d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")) == sorted(e["id"] for e in api.events)
    store.close()


@pytest.mark.parametrize("gap", [900, 2 * HOUR])
def test_a_first_run_killed_after_a_slice_moved_back_by_the_lead_keeps_the_tenant_start_moved_back(tmp_path, gap):
    """A clock a day ahead, 3h asked: the organization scope's first read is moved back by the lead
    its answer gave, and its first slice keeps the tenant scope's would-be start with it (for a
    first run killed before the tenant scope stores anything). That start was the local clock's,
    21 hours in OpenAI's future: killed there (SIGKILL, a machine restart) and started again with
    the clock corrected (NTP, as a restart does), nothing moved it back, and the tenant events from
    3 hours before the first poll until the restart were never read. It is kept moved back by the
    lead the organization scope's answer gave, by OpenAI's time (not moved again)."""
    import shutil

    now = int(T0)
    org, tenant = _two_scopes(now, [now - 2 * HOUR - 50 * 60, now + 600],
                              [now - 2 * HOUR - 40 * 60, now + 700, now + gap - 60])
    state, killed = tmp_path / "state", tmp_path / "killed"
    client = SimpleNamespace(server_date=None)

    def get_json(path, params):
        if params.get("tenant_only") and not killed.exists():
            shutil.copytree(state, killed)  # the state as a SIGKILL here leaves it
            raise KeyboardInterrupt  # (this process goes no further)
        return _dated_answer(org, tenant, client, path, params)

    client.get_json = get_json
    cfg = _config(batch_size=10, initial_interval="3h")
    store, output = StateStore(state), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: org.now + DAY)
    with pytest.raises(KeyboardInterrupt):
        col.poll(org.now + DAY)
    store.close()
    org.now = tenant.now = now + gap  # started again, the clock corrected
    store = StateStore(killed)
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: org.now)
    col.poll(org.now)
    assert min(gte for gte, _ in tenant.slices) == now - 3 * HOUR
    output.close()
    want = sorted(e["id"] for e in org.events + tenant.events)
    assert sorted(d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")) == want
    store.close()


def test_a_report_shows_a_value_however_wide_in_at_most_200_characters():
    """`reports.clip` cuts to its limit, the "..." included; `short` bounds a value however wide it
    is (ten keys of ten 100-character strings: 200 characters, not the kilobytes its repr is)."""
    from agent_input.reports import clip

    assert clip("x" * 200) == "x" * 200
    assert clip("x" * 201) == "x" * 197 + "..."
    wide = {f"key{i}": ["v" * 100] * 10 for i in range(10)}
    assert len(short(wide)) == 200 and short(wide).endswith("...")


@pytest.mark.parametrize("failure", ["5xx", "403", "stop"])
def test_a_first_slice_failing_after_its_first_dated_page_keeps_the_start_moved_back_by_the_lead(tmp_path, failure):
    """A clock 2 hours ahead, 3h asked, a first slice of two pages: its first page's Date gave the
    clock's lead, but the first read was moved back only once the whole slice was read. The second
    page failing (OpenAI down past the retries, the audit log refused, a stop) kept the start as
    taken on the clock ahead, 1 hour before OpenAI's time: with the clock corrected (NTP) before the
    next process asked again, nothing moved it back, and the event of the first 2 hours asked was
    never read. The first answer's Date moves the read back at once (as a usage stream's first page
    does), and a failure after it keeps the start moved back."""
    from agent_input.http_client import PermissionDeniedError, RetriesExhaustedError, StoppedError

    now = int(T0)
    api = _AuditListing([now - 2 * HOUR - 50 * 60, now - 50 * 60, now - 30 * 60, now - 10 * 60])
    api.now = now
    client = SimpleNamespace(server_date=None)
    answered = [0]
    col = None

    def get_json(path, params):
        if answered[0] == 1:  # the second page of the first slice
            if failure == "5xx":
                raise RetriesExhaustedError(503, "OpenAI down", path=path)
            if failure == "403":
                raise PermissionDeniedError(403, "audit logging is not enabled", path=path)
            col.stop.set()  # (SIGTERM) while the page is asked for: its wait ends at once
            raise StoppedError(None, "stopped while waiting for an answer from OpenAI", "stopped", path)
        answered[0] += 1
        answer = _organization_only(api.get_json)(path, params)
        client.server_date = api.now
        return answer

    client.get_json = get_json
    cfg = _config(batch_size=2, initial_interval="3h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now + 2 * HOUR)
    try:
        col.poll(api.now + 2 * HOUR)
    except (RetriesExhaustedError, StoppedError) as exc:
        assert failure == ("5xx" if isinstance(exc, RetriesExhaustedError) else "stop")
    else:
        assert failure == "403" and col.forbidden
    store.close()
    api.now += 900
    answered[0] = 2  # OpenAI answers again, each answer dated
    store = StateStore(tmp_path / "state")  # a new process on the clock corrected: asks again at once
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now)
    col.poll(api.now)
    assert col.forbidden is None
    output.close()
    assert sorted(d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")) == sorted(e["id"] for e in api.events)
    store.close()


@pytest.mark.parametrize("scope", ["organization", "tenant"])
def test_a_first_request_refused_on_a_clock_ahead_keeps_the_start_moved_back_by_the_refusal_s_date(tmp_path, scope):
    """A clock a day ahead, 3h asked, and the very first request refused (403: audit logging not
    enabled yet, or the tenant scope refused beside a mark of the organization's): no answer gave
    the clock's lead, and each unread scope's would-be start was kept on the clock ahead (21 hours
    in OpenAI's future). With the clock corrected (NTP) before the log was readable, what OpenAI
    recorded from 3 hours before the first poll until then was never read. The refusal's own Date
    gives the lead: the starts are kept moved back by it, as after an answer."""
    from agent_input.http_client import PermissionDeniedError

    now = int(T0)
    api = _AuditListing([now - 2 * HOUR - 50 * 60, now + 600])
    tenant = _AuditListing([now - 2 * HOUR - 40 * 60, now + 700])
    for e in tenant.events:
        e["id"], e["type"] = e["id"].replace("audit_log-", "audit_log-t"), "tenant.admin_api_key.created"
    api.now = tenant.now = now
    refuse = [True]
    client = SimpleNamespace(server_date=None)

    def get_json(path, params):
        refused = params.get("tenant_only") if scope == "tenant" else True
        if refuse[0] and refused:
            error = PermissionDeniedError(403, "audit logging is not enabled", path=path)
            error.server_date = api.now  # OpenAI's Date on the refusal
            raise error
        listing = tenant if params.get("tenant_only") else api
        answer = listing.get_json(path, {k: v for k, v in params.items() if k != "tenant_only"})
        client.server_date = api.now
        return answer

    client.get_json = get_json
    cfg = _config(batch_size=10, initial_interval="3h")
    store, output = StateStore(tmp_path / "state"), NdjsonFileOutput(tmp_path / "audit.ndjson")
    if scope == "tenant":  # the organization scope read before, up to the first poll
        store.put_kv("audit:hwm", str(now - 3 * HOUR))
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now + DAY)
    col.poll(api.now + DAY)
    assert (col.tenant_refused if scope == "tenant" else col.forbidden)
    store.close()
    api.now = tenant.now = now + 900
    refuse[0] = False
    store = StateStore(tmp_path / "state")  # a new process on the clock corrected: asks again at once
    col = AuditCollector(cfg, cfg.stream("audit"), client, Delivery(store, output), clock=lambda: api.now)
    col.poll(api.now)
    assert col.forbidden is None and col.tenant_refused is None
    assert min(gte for gte, _ in tenant.slices) == now - 3 * HOUR
    output.close()
    assert sorted(d["_id"] for d in read_ndjson(tmp_path / "audit.ndjson")) == sorted(
        e["id"] for e in api.events + tenant.events)
    store.close()
