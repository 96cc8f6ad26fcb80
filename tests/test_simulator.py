"""The OpenAI Admin API simulator: spec conformance, pagination, revisions, truth, auth, faults, control."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from openapi_schema_validator import OAS31Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from agent_input.simulator import MAX_SETTLE, STREAMS, FaultRule, OrgSpec, Simulator

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-admin-openapi.yaml"
NOW = 1763892000.0  # 2025-11-23T10:00:00Z
KEY = "sk-admin-sim-test-key"
WIDTH_LIMITS = {"1m": (60, 1440, 60), "1h": (24, 168, 3600), "1d": (7, 31, 86400)}


# ------------------------------------------------------------------------------------ fixtures
def _without_discriminators(node):
    """The schema with every `discriminator` dropped. In OpenAPI 3.1 it is only a hint: `oneOf` alone
    decides. openapi-schema-validator before 0.9 resolved it, and the spec's has no mapping, so its
    implicit one (the `object` value as a schema name, "organization.usage.completions.result")
    named no schema and every bucket's results were "could not be resolved"."""
    if isinstance(node, dict):
        return {k: _without_discriminators(v) for k, v in node.items() if k != "discriminator"}
    if isinstance(node, list):
        return [_without_discriminators(v) for v in node]
    return node


@pytest.fixture(scope="module")
def spec():
    return yaml.safe_load(SPEC_PATH.read_text())


@pytest.fixture(scope="module")
def validate(spec):
    schema = _without_discriminators(spec)
    registry = Registry().with_resource("urn:spec", Resource.from_contents(schema, default_specification=DRAFT202012))
    cache = {}

    def check(name: str, body) -> None:
        v = cache.get(name)
        if v is None:
            v = cache[name] = OAS31Validator({"$ref": f"urn:spec#/components/schemas/{name}"}, registry=registry)
        errors = list(v.iter_errors(body))
        assert not errors, f"{name}: {errors[0].message} at {list(errors[0].absolute_path)}"

    return check


@pytest.fixture(scope="module")
def sim():
    s = Simulator(seed=3, org="small", now=NOW, admin_key=KEY, restricted_key="sk-restricted-key-1")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http():
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {KEY}"
        yield session


def get(http, sim, path, params=None, **kw):
    return http.get(sim.base_url + "/v1/organization/" + path, params=params, timeout=30, **kw)


def usage_all(http, sim, stream, params):
    """Follow next_page; return (buckets, requests made)."""
    buckets, n, page = [], 0, None
    while True:
        p = dict(params)
        if page:
            p["page"] = page
        r = get(http, sim, f"usage/{stream}", p)
        assert r.status_code == 200, r.text
        body = r.json()
        buckets += body["data"]
        n += 1
        if not body["has_more"]:
            assert body["next_page"] is None
            return buckets, n
        page = body["next_page"]


def by_group(results, fields):
    return {tuple(r[f] for f in fields): r for r in results}


# ------------------------------------------------------------------------------------ spec conformance
@pytest.mark.parametrize("stream", sorted(STREAMS))
def test_usage_responses_validate_for_widths_group_bys_and_filters(http, sim, validate, stream):
    sd = STREAMS[stream]
    org = sim.org
    key = org.active_keys[0]
    for width, n in (("1m", 4), ("1h", 3), ("1d", 2)):
        span = WIDTH_LIMITS[width][2]
        start = (int(NOW) - n * span) // span * span
        for gb in ((), sd.group_by, sd.group_by[:1], sd.group_by[-1:]):
            params = {"start_time": start, "bucket_width": width, "limit": n + 1, "group_by": list(gb)}
            r = get(http, sim, f"usage/{stream}", params)
            assert r.status_code == 200, r.text
            body = r.json()
            validate("UsageResponse", body)
            assert [b["start_time"] for b in body["data"]] == [start + i * span for i in range(n + 1)]
            for b in body["data"]:
                for res in b["results"]:
                    assert res["object"] == sd.object
                    for dim in sd.dims:
                        assert dim in res
                        if dim not in gb:
                            assert res[dim] is None
                if not gb:
                    assert len(b["results"]) <= 1
        # every filter the spec lists is accepted, with `name[]` too
        filt = {"project_ids": key.project_id, "user_ids": key.owner_id, "api_key_ids": key.id,
                "models": org.models[0].name, "batch": "false", "sizes[]": "1024x1024",
                "sources": "image.generation", "context_levels": "medium",
                "vector_store_ids": org.vector_stores[0][0]}
        params = {"start_time": int(NOW) - 3600, "bucket_width": "1h", "group_by[]": list(sd.group_by)}
        for name, value in filt.items():
            if name.rstrip("[]") in sd.filters:
                params[name] = value
        r = get(http, sim, f"usage/{stream}", params)
        assert r.status_code == 200, r.text
        validate("UsageResponse", r.json())


def test_usage_filters_restrict_results(http, sim):
    params = {"start_time": int(NOW) - 3 * 3600, "bucket_width": "1h", "group_by": ["project_id", "batch", "model"]}
    allb = [res for b in get(http, sim, "usage/completions", params).json()["data"] for res in b["results"]]
    pid = next(r["project_id"] for r in allb if r["batch"])
    assert {r["project_id"] for r in allb} > {pid}
    some = get(http, sim, "usage/completions", {**params, "project_ids": [pid], "batch": "true"}).json()["data"]
    rows = [res for b in some for res in b["results"]]
    assert rows and all(r["project_id"] == pid and r["batch"] is True for r in rows)
    model = allb[0]["model"]
    rows = [res for b in get(http, sim, "usage/completions", {**params, "models": model}).json()["data"]
            for res in b["results"]]
    assert rows and {r["model"] for r in rows} == {model}


def test_quiet_buckets_are_returned_empty(http, sim):
    r = get(http, sim, "usage/completions", {"start_time": int(NOW) - 600, "bucket_width": "1m",
                                             "project_ids": "proj_nope"})
    data = r.json()["data"]
    assert len(data) == 11 and all(b["results"] == [] for b in data)  # 10 past + the one in progress


def test_costs_validate_and_group(http, sim, validate):
    start = int(NOW) // 86400 * 86400 - 5 * 86400
    for gb in ((), ("project_id",), ("line_item",), ("project_id", "line_item", "api_key_id")):
        r = get(http, sim, "costs", {"start_time": start, "group_by": list(gb), "limit": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        validate("UsageResponse", body)
        assert len(body["data"]) == 6 and not body["has_more"]  # 5 full days and today so far
        for b in body["data"]:
            assert b["end_time"] - b["start_time"] == 86400
            for res in b["results"]:
                assert res["amount"]["currency"] == "usd" and res["amount"]["value"] > 0
                for dim in ("project_id", "line_item", "api_key_id"):
                    assert (res[dim] is None) == (dim not in gb) or dim == "api_key_id"
                if "line_item" not in gb:
                    assert res["quantity"] is None
    r = get(http, sim, "costs", {"start_time": start})
    assert len(r.json()["data"]) == 6  # default limit 7 covers it
    assert get(http, sim, "costs", {"start_time": start, "bucket_width": "1h"}).status_code == 400
    assert get(http, sim, "costs", {"start_time": start, "group_by": "model"}).status_code == 400


def test_list_endpoints_validate_and_paginate(http, sim, validate):
    org = sim.org
    # projects
    body = get(http, sim, "projects", {"limit": 100}).json()
    validate("ProjectListResponse", body)
    assert all(p["status"] == "active" for p in body["data"])
    allp = get(http, sim, "projects", {"limit": 100, "include_archived": "true"}).json()["data"]
    assert len(allp) == len(org.projects) > len(body["data"])
    assert any(p["status"] == "archived" and p["archived_at"] for p in allp)
    pages, after = [], None
    while True:
        b = get(http, sim, "projects", {"limit": 2, "include_archived": "true", **({"after": after} if after else {})}).json()
        validate("ProjectListResponse", b)
        pages += b["data"]
        if not b["has_more"]:
            break
        after = b["last_id"]
    assert pages == allp
    validate("Project", get(http, sim, f"projects/{allp[0]['id']}").json())
    # users
    users, after = [], None
    while True:
        b = get(http, sim, "users", {"limit": 7, **({"after": after} if after else {})}).json()
        validate("UserListResponse", b)
        users += b["data"]
        if not b["has_more"]:
            break
        after = b["last_id"]
    assert len(users) == len(org.users) and len({u["email"] for u in users}) == len(users)
    one = get(http, sim, "users", {"emails": users[3]["email"]}).json()["data"]
    assert [u["id"] for u in one] == [users[3]["id"]]
    # per project: rate limits, api keys, users, service accounts
    for p in allp:
        rl = get(http, sim, f"projects/{p['id']}/rate_limits", {"limit": 100}).json()
        validate("ProjectRateLimitListResponse", rl)
        rows = {r["model"]: r for r in rl["data"]}
        assert rows["gpt-4o-mini"]["max_tokens_per_1_minute"] == rows["gpt-4o-mini-2024-07-18"]["max_tokens_per_1_minute"]
        assert "max_images_per_1_minute" in rows["dall-e-3"] and "max_images_per_1_minute" not in rows["gpt-4o"]
        paged, after = [], None
        while True:
            b = get(http, sim, f"projects/{p['id']}/rate_limits", {"limit": 10, **({"after": after} if after else {})}).json()
            paged += b["data"]
            if not b["has_more"]:
                break
            after = b["last_id"]
        assert paged == rl["data"]
        keys = get(http, sim, f"projects/{p['id']}/api_keys", {"limit": 100}).json()
        validate("ProjectApiKeyListResponse", keys)
        for k in keys["data"]:
            assert k["owner"]["type"] in ("user", "service_account")
        every = {k["id"]: k for k in get(http, sim, f"projects/{p['id']}/api_keys",
                                          {"limit": 100, "owner_project_access": "any"}).json()["data"]}
        assert len(every) == len(org.projects_by_id[p["id"]].keys)
        for access in ("active", "inactive"):
            some = get(http, sim, f"projects/{p['id']}/api_keys", {"limit": 100, "owner_project_access": access})
            assert {k["id"] for k in some.json()["data"]} == {i for i, k in every.items() if k["owner_project_access"] == access}
        # omitted: membership-based visibility leaves out the keys whose owner has no access
        assert {k["id"] for k in keys["data"]} == {i for i, k in every.items() if k["owner_project_access"] == "active"}
        if p["status"] == "active":
            validate("ProjectUserListResponse", get(http, sim, f"projects/{p['id']}/users").json())
            validate("ProjectServiceAccountListResponse", get(http, sim, f"projects/{p['id']}/service_accounts").json())
        else:
            r = get(http, sim, f"projects/{p['id']}/users")
            assert r.status_code == 400
            validate("ErrorResponse", r.json())
    owners = {k.owner_type for k in org.keys}
    assert owners == {"user", "service_account"}
    r = get(http, sim, "projects/proj_missing/rate_limits")
    assert r.status_code == 404
    validate("ErrorResponse", r.json())


def test_audit_logs_validate_filter_and_paginate(http, sim, validate):
    lo, hi = int(NOW) - 2 * 86400, int(NOW) - 3600
    events, after, n = [], None, 0
    while True:
        params = {"effective_at[gte]": lo, "effective_at[lte]": hi, "limit": 100}
        if after:
            params["after"] = after
        b = get(http, sim, "audit_logs", params).json()
        validate("ListAuditLogsResponse", b)
        events += b["data"]
        n += 1
        if not b["has_more"]:
            break
        after = b["last_id"]
    assert n >= 2 and len(events) > 100
    assert len({e["id"] for e in events}) == len(events)
    times = [e["effective_at"] for e in events]
    assert times == sorted(times, reverse=True) and lo <= min(times) and max(times) <= hi
    small_pages = _all_audit(http, sim, {"effective_at[gte]": lo, "effective_at[lte]": hi}, limit=37)
    assert small_pages == events
    # `before` returns the page just newer than an id
    mid = events[50]["id"]
    b = get(http, sim, "audit_logs", {"effective_at[gte]": lo, "effective_at[lte]": hi, "before": mid,
                                      "limit": 10}).json()
    assert b["data"] == events[40:50]
    # the object param's other encodings, and exclusive bounds
    bare = get(http, sim, "audit_logs", {"gt": events[-1]["effective_at"], "lt": hi + 1, "limit": 100}).json()["data"]
    assert bare == [e for e in events[:100] if e["effective_at"] > events[-1]["effective_at"]][:100]
    types = {e["type"] for e in events}
    assert {"login.succeeded", "api_key.created"} <= types
    actors = {e["actor"]["type"] for e in events}
    assert actors == {"session", "api_key"}
    assert {e["actor"]["api_key"]["type"] for e in events if e["actor"]["type"] == "api_key"} == {"user", "service_account"}
    s = next(e for e in events if e["actor"]["type"] == "session")["actor"]["session"]
    assert {"ip_address", "ip_address_details", "ja3", "ja4", "user_agent", "user"} <= set(s)
    assert isinstance(s["ip_address_details"]["asn"], str) and float(s["ip_address_details"]["latitude"])
    only = get(http, sim, "audit_logs", {"event_types[]": ["api_key.created"], "effective_at[gte]": lo, "limit": 100}).json()["data"]
    assert only and all(e["type"] == "api_key.created" and "project" in e for e in only)
    for e in only:
        assert e["api_key.created"]["data"]["scopes"]
    # nothing after now
    assert all(e["effective_at"] <= NOW for e in get(http, sim, "audit_logs", {"limit": 100}).json()["data"])


def _all_audit(http, sim, params, limit: int = 100):
    events, after = [], None
    while True:
        r = get(http, sim, "audit_logs", {**params, "limit": limit, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        b = r.json()
        events += b["data"]
        if not b["has_more"]:
            return events
        after = b["last_id"]


def test_audit_logs_tenant_only_splits_the_two_scopes(http, sim, validate):
    """Organization events without tenant_only (or with false), tenant-scoped ones with true; the
    two are disjoint and together are the simulator's whole log (what audit_truth counts)."""
    from agent_input.simulator.audit import TENANT_SEQ_BASE, decode_id, tenant_scoped

    lo, hi = int(NOW) - 3 * 86400, int(NOW)
    org = _all_audit(http, sim, {"effective_at[gte]": lo, "effective_at[lte]": hi})
    assert org == _all_audit(http, sim, {"effective_at[gte]": lo, "effective_at[lte]": hi, "tenant_only": "false"})
    tenant = _all_audit(http, sim, {"effective_at[gte]": lo, "effective_at[lte]": hi, "tenant_only": "true"})
    b = get(http, sim, "audit_logs", {"effective_at[gte]": lo, "tenant_only": "true", "limit": 100}).json()
    validate("ListAuditLogsResponse", b)
    assert len(tenant) >= 5 and len(org) > 10 * len(tenant)
    assert not any(tenant_scoped(e["type"]) for e in org)
    assert all(tenant_scoped(e["type"]) for e in tenant)
    assert {"tenant.admin_api_key.created", "role.bound_to_resource"} & {e["type"] for e in tenant}
    for e in tenant:
        assert isinstance(e[e["type"]], dict) and e[e["type"]]["id"]
        assert e["actor"]["type"] == "session" and e["actor"]["session"]["user"]["email"]
        assert decode_id(e["id"])[1] >= TENANT_SEQ_BASE > decode_id(org[0]["id"])[1]
    times = [e["effective_at"] for e in tenant]
    assert times == sorted(times, reverse=True)
    assert not {e["id"] for e in org} & {e["id"] for e in tenant}
    truth = set()
    for h in range(lo // 3600 * 3600, hi + 1, 3600):
        truth |= {e["id"] for e in sim.audit.hour_events(h) if lo <= e["effective_at"] <= hi}
    assert truth == {e["id"] for e in org} | {e["id"] for e in tenant}
    # pages of one scope: small pages give the same list
    small = _all_audit(http, sim, {"effective_at[gte]": lo, "effective_at[lte]": hi, "tenant_only": "true"}, limit=2)
    assert small == tenant
    # event_types still filter within the scope; an organization type with tenant_only is a 400
    one = tenant[0]["type"]
    only = _all_audit(http, sim, {"effective_at[gte]": lo, "tenant_only": "true", "event_types[]": [one]})
    assert only == [e for e in tenant if e["type"] == one]
    assert _all_audit(http, sim, {"effective_at[gte]": lo, "event_types[]": [one]}) == []
    r = get(http, sim, "audit_logs", {"tenant_only": "true", "event_types[]": ["login.succeeded", one]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "event_types"
    validate("ErrorResponse", r.json())
    for bad in ("yes", "2", "maybe"):
        r = get(http, sim, "audit_logs", {"tenant_only": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tenant_only"
        validate("ErrorResponse", r.json())


def test_a_fault_rule_with_a_query_hits_only_requests_that_carry_it(http, sim, validate):
    try:
        sim.add_fault(FaultRule("403", path="audit_logs", query="tenant_only=true", count=None))
        assert get(http, sim, "audit_logs", {"limit": 1}).status_code == 200
        assert get(http, sim, "audit_logs", {"limit": 1, "tenant_only": "false"}).status_code == 200
        r = get(http, sim, "audit_logs", {"limit": 1, "tenant_only": "true"})
        assert r.status_code == 403 and "tenant-scoped" in r.json()["error"]["message"]
        validate("ErrorResponse", r.json())
        assert sim.faults.rules()[0]["query"] == "tenant_only=true"
    finally:
        sim.clear_faults()
    assert get(http, sim, "audit_logs", {"limit": 1, "tenant_only": "true"}).status_code == 200


def test_a_refused_key_gets_its_401_before_a_fault_only_an_allowed_caller_gets(http, sim):
    """OpenAI answers a key it refuses with 401 before any 403, 404 or 429 it gives an allowed caller:
    the simulator answered a wrong key with an audit 403 fault (a soak's config with a wrong key took
    audit logging for not enabled), and used up the fault a later request with the right key was to
    get. A 5xx comes whatever the key, as a gateway's does."""
    url = sim.base_url + "/v1/organization/audit_logs"
    wrong = {"Authorization": "Bearer sk-admin-this-is-wrong-123456"}
    try:
        sim.add_fault(FaultRule("403", path="audit_logs"))
        r = requests.get(url, params={"limit": 1}, headers=wrong, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = get(http, sim, "audit_logs", {"limit": 1})  # the fault is still there for the right key
        assert r.status_code == 403 and r.json()["error"]["code"] == "audit_logs_not_enabled"
        sim.add_fault(FaultRule("503", path="audit_logs"))
        assert requests.get(url, params={"limit": 1}, headers=wrong, timeout=10).status_code == 503
    finally:
        sim.clear_faults()


# ------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("width", ["1m", "1h", "1d"])
def test_limit_defaults_and_bounds(http, sim, validate, width):
    default, maximum, span = WIDTH_LIMITS[width]
    start = int(NOW) - (maximum + 5) * span
    body = get(http, sim, "usage/embeddings", {"start_time": start, "bucket_width": width}).json()
    assert len(body["data"]) == default and body["has_more"]
    body = get(http, sim, "usage/embeddings", {"start_time": start, "bucket_width": width, "limit": maximum}).json()
    assert len(body["data"]) == maximum and body["has_more"]
    for bad in (0, maximum + 1, "x"):
        r = get(http, sim, "usage/embeddings", {"start_time": start, "bucket_width": width, "limit": bad})
        assert r.status_code == 400
        validate("ErrorResponse", r.json())
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_parameter_errors(http, sim, validate):
    for params in ({}, {"start_time": "soon"}, {"start_time": 1, "bucket_width": "5m"},
                   {"start_time": 1, "group_by": "size"}, {"start_time": 100, "end_time": 50},
                   {"start_time": int(NOW) - 600, "page": "garbage"}):
        r = get(http, sim, "usage/completions", params)
        assert r.status_code == 400, params
        validate("ErrorResponse", r.json())
    assert get(http, sim, "usage/completions", {}).json()["error"]["param"] == "start_time"
    for path, limit in (("costs?start_time=1", 181), ("audit_logs", 101), ("projects", 101), ("users", 0)):
        assert get(http, sim, path, {"limit": limit}).status_code == 400
    r = get(http, sim, "usage/nonsense", {"start_time": 1})
    assert r.status_code == 404
    validate("ErrorResponse", r.json())


@pytest.mark.parametrize("path,params", [
    ("usage/completions", {"start_time": f"{int(NOW) - 3600}.0"}),
    ("usage/completions", {"start_time": "1e9"}),
    ("usage/completions", {"start_time": "1_763_888_400"}),
    ("usage/completions", {"start_time": int(NOW) - 3600, "end_time": f"{int(NOW)}.0"}),
    ("usage/completions", {"start_time": int(NOW) - 3600, "bucket_width": "1m", "limit": "60.0"}),
    ("costs", {"start_time": f"{int(NOW) - 86400}.0"}),
    ("audit_logs", {"effective_at[gte]": f"{int(NOW) - 3600}.0"}),
    ("projects", {"limit": "10.0"}),
])
def test_an_integer_parameter_written_as_a_decimal_is_refused(http, sim, validate, path, params):
    """The reference types these `integer`: a collector sending `end_time=1763892000.0` (a float
    time passed on) must fail here as it would against OpenAI, not pass unnoticed."""
    r = get(http, sim, path, params)
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    assert r.json()["error"]["code"] == "invalid_type"


@pytest.mark.parametrize("stream,name,good", [
    ("images", "sizes", "1024x1024"), ("images", "sources", "image.edit"),
    ("web_search_calls", "context_levels", "high"),
])
def test_a_filter_value_outside_the_reference_enum_is_refused(http, sim, validate, stream, name, good):
    params = {"start_time": int(NOW) - 3600, "bucket_width": "1h"}
    assert get(http, sim, f"usage/{stream}", {**params, name: good}).status_code == 200
    for bad in ("bogus", [good, "bogus"]):
        r = get(http, sim, f"usage/{stream}", {**params, name: bad})
        assert r.status_code == 400, r.text
        validate("ErrorResponse", r.json())
        assert r.json()["error"]["param"] == name


def test_the_last_page_of_a_list_says_has_more_false(http, sim):
    users = get(http, sim, "users", {"limit": 100}).json()["data"]
    n = len(users)
    body = get(http, sim, "users", {"limit": n}).json()
    assert len(body["data"]) == n and body["has_more"] is False
    body = get(http, sim, "users", {"limit": 2, "after": users[n - 3]["id"]}).json()
    assert body["data"] == users[n - 2:] and body["has_more"] is False
    body = get(http, sim, "users", {"limit": 2, "after": users[n - 4]["id"]}).json()
    assert body["data"] == users[n - 3:n - 1] and body["has_more"] is True
    pid = sim.org.projects[0].id
    rl = get(http, sim, f"projects/{pid}/rate_limits", {"limit": 100}).json()["data"]
    body = get(http, sim, f"projects/{pid}/rate_limits", {"limit": 3, "before": rl[3]["id"]}).json()
    assert body["data"] == rl[:3] and body["has_more"] is False
    body = get(http, sim, f"projects/{pid}/rate_limits", {"limit": 3, "before": rl[4]["id"]}).json()
    assert body["data"] == rl[1:4] and body["has_more"] is True


def test_a_page_cursor_of_another_stream_or_a_forged_one_is_refused(http, sim, validate):
    from agent_input.simulator.server import _page_token

    params = {"start_time": int(NOW) - 3600, "bucket_width": "1m", "limit": 10}
    token = get(http, sim, "usage/completions", params).json()["next_page"]
    assert get(http, sim, "usage/completions", {**params, "page": token}).status_code == 200
    r = get(http, sim, "usage/embeddings", {**params, "page": token})
    assert r.status_code == 400 and r.json()["error"]["param"] == "page"
    validate("ErrorResponse", r.json())
    forged = _page_token("completions", "1m", int(NOW) - 3600 + 30)  # not on a bucket boundary
    assert get(http, sim, "usage/completions", {**params, "page": forged}).status_code == 400


def test_default_width_is_1d_and_future_buckets_are_not_returned(http, sim):
    body = get(http, sim, "usage/completions", {"start_time": int(NOW) - 2 * 86400, "end_time": int(NOW) + 5 * 86400}).json()
    starts = [b["start_time"] for b in body["data"]]
    assert starts == [int(NOW) // 86400 * 86400 - 2 * 86400 + i * 86400 for i in range(3)]
    assert not body["has_more"]
    body = get(http, sim, "usage/completions", {"start_time": int(NOW) + 60, "bucket_width": "1m"}).json()
    assert body["data"] == [] and body["has_more"] is False


# ------------------------------------------------------------------------------------ pagination
def test_pages_concatenate_to_one_big_request(http, validate):
    big = Simulator(seed=5, org="small", now=NOW, admin_key=KEY)
    tiny = Simulator(seed=5, org="small", now=NOW, admin_key=KEY, max_results_per_page=25)
    big.start(), tiny.start()
    try:
        gb = ["project_id", "user_id", "api_key_id", "model", "batch"]
        params = {"start_time": int(NOW) - 6 * 3600, "end_time": int(NOW) - 60, "bucket_width": "1m", "limit": 1440,
                  "group_by": gb}
        one, n1 = usage_all(http, big, "completions", params)
        paged, n2 = usage_all(http, tiny, "completions", params)
        assert n1 == 1 and n2 > 10
        assert paged == one
        assert len(one) == 6 * 60 - 1
        # a page never exceeds the budget unless it holds a single bucket
        r = get(http, tiny, "usage/completions", params).json()
        assert sum(len(b["results"]) for b in r["data"]) <= 25 or len(r["data"]) == 1
        validate("UsageResponse", r)
        # paging by limit gives the same buckets
        by_limit, n3 = usage_all(http, big, "completions", {**params, "limit": 50})
        assert by_limit == one and n3 == 8
        # costs paginate by budget too
        cp = {"start_time": int(NOW) - 20 * 86400, "group_by": ["project_id", "line_item", "api_key_id"], "limit": 30}
        a = get(http, big, "costs", cp).json()
        pages, page = [], None
        while True:
            b = get(http, tiny, "costs", {**cp, **({"page": page} if page else {})}).json()
            pages += b["data"]
            if not b["has_more"]:
                break
            page = b["next_page"]
        assert pages == a["data"]
    finally:
        big.stop(), tiny.stop()


# ------------------------------------------------------------------------------------ revisions and truth
def _minute_groups(sim, stream, start, end, gb, now):
    """{(minute, group): counters} as the API shows them at `now` (direct, no HTTP)."""
    sim.set_time(now)
    out = {}
    for b in sim.api.usage(stream, _params(start, end, "1m", gb))["data"]:
        for res in b["results"]:
            out[(b["start_time"],) + tuple(res[g] for g in gb)] = {c: res[c] for c in STREAMS[stream].counters}
    return out


def _params(start, end, width, gb, **extra):
    from urllib.parse import urlencode

    from agent_input.simulator.server import Params

    return Params(urlencode({"start_time": start, "end_time": end, "bucket_width": width, "limit": 1440,
                             "group_by": list(gb), **extra}, doseq=True))


@pytest.mark.parametrize("stream", ["completions", "embeddings", "images", "code_interpreter_sessions"])
def test_revisions_are_monotone_and_reach_truth_within_two_hours(stream):
    sim = Simulator(seed=11, org="small", now=NOW)
    gb = STREAMS[stream].group_by
    start, end = int(NOW) - 1800, int(NOW)  # 30 minutes, the last one just ended
    prev: dict = {}
    changed_late = 0
    for dt in (0, 30, 60, 120, 300, 600, 1200, 1800, 3600, 5400, MAX_SETTLE, MAX_SETTLE + 60):
        cur = _minute_groups(sim, stream, start, end, gb, NOW + dt)
        for k, v in prev.items():
            assert k in cur, "a group vanished"
            assert all(cur[k][c] >= v[c] for c in v), "a counter went down"
            if dt > 1200 and cur[k] != v:
                changed_late += 1
        prev = cur
    # at end + 2h every minute is final: it equals truth
    truth = sim.truth(stream, start, end, "1m", ())
    final_total = {c: sum(v[c] for v in prev.values()) for c in STREAMS[stream].counters}
    assert final_total == truth[()]
    later = _minute_groups(sim, stream, start, end, gb, NOW + MAX_SETTLE + 3600)
    assert later == prev


def test_busy_buckets_settle_late_but_never_after_two_hours():
    sim = Simulator(seed=2, org="large", now=NOW)
    model = sim.usage
    # find a burst block in the day before NOW
    burst_minute = next(m for m in range(int(NOW) - 86400, int(NOW), 600) if model.burst(m) > 1.5)
    settles = [s for m in range(burst_minute, burst_minute + 600, 60)
               for _d, _f, _p, s in model.minute_rows("completions", m)]
    assert max(settles) > 1800 and max(settles) <= MAX_SETTLE
    assert max(settles) > 3600, "a busy bucket is revised for up to two hours"
    quiet = [s for _d, _f, _p, s in model.minute_rows("completions", int(NOW) - 86400 + 4 * 3600)]
    assert sorted(quiet)[len(quiet) // 2] <= 600  # most groups are final within ~10 minutes


def test_quiet_minutes_are_visibly_final_about_ten_minutes_after_they_end():
    """The per-row settle time reaches the API: most groups show their final counts 10 minutes after
    their minute ends, and not before the minute has ended."""
    sim = Simulator(seed=11, org="small", now=NOW)
    gb = STREAMS["completions"].group_by
    start, end = int(NOW) - 86400 + 4 * 3600, int(NOW) - 86400 + 4 * 3600 + 1800  # the 04:00 trough
    final = _minute_groups(sim, "completions", start, end, gb, end + MAX_SETTLE + 60)
    ten_after = _minute_groups(sim, "completions", start, end, gb, end + 600)
    at_end = _minute_groups(sim, "completions", start, end, gb, end)
    same = sum(ten_after.get(k) == v for k, v in final.items())
    assert final and same >= 0.8 * len(final), (same, len(final))
    last = {k: v for k, v in final.items() if k[0] == end - 60}  # the minute that has just ended
    assert last and sum(at_end.get(k) == v for k, v in last.items()) < 0.5 * len(last)


def test_hour_and_day_buckets_are_sums_of_visible_minutes(http, sim):
    sim.set_time(NOW + 1234)  # mid-revision for the latest minutes, in-progress hour
    try:
        for stream in ("completions", "images", "web_search_calls"):
            gb = STREAMS[stream].group_by
            hour0 = int(NOW) // 3600 * 3600 - 3600
            h = get(http, sim, f"usage/{stream}", {"start_time": hour0, "bucket_width": "1h", "group_by": list(gb),
                                                   "limit": 3}).json()["data"]
            assert len(h) == 2  # the previous hour and the one in progress (NOW is at :00)
            for hb in h:
                mins, _ = usage_all(http, sim, stream, {"start_time": hb["start_time"], "end_time": hb["end_time"],
                                                       "bucket_width": "1m", "group_by": list(gb), "limit": 60})
                sums: dict = {}
                for b in mins:
                    for res in b["results"]:
                        key = tuple(res[g] for g in gb)
                        acc = sums.setdefault(key, dict.fromkeys(STREAMS[stream].counters, 0))
                        for c in acc:
                            acc[c] += res[c]
                got = {tuple(r[g] for g in gb): {c: r[c] for c in STREAMS[stream].counters} for r in hb["results"]}
                assert got == sums
        # and a day bucket (no group_by) equals the sum of its 24 hour buckets
        d0 = int(NOW) // 86400 * 86400 - 86400
        day = get(http, sim, "usage/completions", {"start_time": d0, "limit": 1}).json()["data"][0]["results"][0]
        hours = get(http, sim, "usage/completions", {"start_time": d0, "bucket_width": "1h", "limit": 24}).json()["data"]
        assert day["input_tokens"] == sum(b["results"][0]["input_tokens"] for b in hours if b["results"])
    finally:
        sim.set_time(NOW)


def test_in_progress_bucket_is_partial(http, sim):
    sim.set_time(NOW + 30)
    try:
        r = get(http, sim, "usage/completions", {"start_time": int(NOW), "bucket_width": "1m"}).json()
        assert len(r["data"]) == 1 and r["data"][0]["start_time"] == int(NOW)
        part = r["data"][0]["results"][0]["num_model_requests"] if r["data"][0]["results"] else 0
        final = sim.truth("completions", int(NOW), int(NOW) + 60)[()]["num_model_requests"]
        assert part < final
    finally:
        sim.set_time(NOW)


def test_completions_counters_are_internally_consistent(http, sim):
    gb = STREAMS["completions"].group_by
    for width, limit in (("1m", 120), ("1d", 2)):
        data = get(http, sim, "usage/completions", {"start_time": int(NOW) - 7200, "bucket_width": width,
                                                    "group_by": list(gb), "limit": limit}).json()["data"]
        rows = [r for b in data for r in b["results"]]
        assert rows
        for r in rows:
            assert r["input_tokens"] == r["input_cached_tokens"] + r["input_cache_write_tokens"] + r["input_uncached_tokens"]
            assert r["input_uncached_tokens"] == r["input_text_tokens"] + r["input_audio_tokens"] + r["input_image_tokens"]
            assert r["input_cached_tokens"] == (r["input_cached_text_tokens"] + r["input_cached_audio_tokens"]
                                                + r["input_cached_image_tokens"])
            assert r["output_tokens"] == r["output_text_tokens"] + r["output_audio_tokens"] + r["output_image_tokens"]
        assert any(r["batch"] for r in rows) and any(r["batch"] is False for r in rows)
        assert len({r["service_tier"] for r in rows}) > 1


def test_truth_equals_a_late_enough_fetch(http, sim):
    start, end = int(NOW) - 3 * 3600, int(NOW) - 3600
    sim.set_time(end + MAX_SETTLE + 60)
    try:
        for stream in sorted(STREAMS):
            gb = ("project_id",) + (("model",) if "model" in STREAMS[stream].group_by else ())
            buckets, _ = usage_all(http, sim, stream, {"start_time": start, "end_time": end, "bucket_width": "1m",
                                                       "group_by": list(gb), "limit": 1440})
            sums: dict = {}
            for b in buckets:
                for r in b["results"]:
                    acc = sums.setdefault(tuple(r[g] for g in gb), dict.fromkeys(STREAMS[stream].counters, 0))
                    for c in acc:
                        acc[c] += r[c]
            assert sums == sim.truth(stream, start, end, "1m", gb), stream
        # costs settle within two days
        d0 = int(NOW) // 86400 * 86400 - 4 * 86400
        sim.set_time(d0 + 3 * 86400)
        body = get(http, sim, "costs", {"start_time": d0, "end_time": d0 + 86400, "group_by": ["project_id"]}).json()
        got = {(r["project_id"],): {"amount": r["amount"]["value"]} for r in body["data"][0]["results"]}
        want = sim.truth("costs", d0, d0 + 86400, "1d", ("project_id",))
        assert got.keys() == want.keys()
        assert all(abs(got[k]["amount"] - want[k]["amount"]) < 1e-6 for k in got)
    finally:
        sim.set_time(NOW)


def test_costs_revise_upwards_over_two_days(http, sim):
    d0 = int(NOW) // 86400 * 86400 - 5 * 86400
    seen = []
    try:
        for t in (d0 + 3600, d0 + 43200, d0 + 86400, d0 + 86400 + 6 * 3600, d0 + 2 * 86400, d0 + 3 * 86400 + 1):
            sim.set_time(t)
            r = get(http, sim, "costs", {"start_time": d0, "end_time": d0 + 86400}).json()["data"][0]["results"]
            seen.append(r[0]["amount"]["value"] if r else 0)
    finally:
        sim.set_time(NOW)
    assert seen == sorted(seen) and seen[0] < seen[-1]
    assert abs(seen[-1] - sim.truth("costs", d0, d0 + 86400, "1d")[()]["amount"]) < 1e-6


def test_vector_stores_is_a_level(http, sim):
    h0 = int(NOW) - 3 * 3600
    hour = get(http, sim, "usage/vector_stores", {"start_time": h0, "bucket_width": "1h", "limit": 1,
                                                  "group_by": "project_id"}).json()["data"][0]["results"]
    mins = get(http, sim, "usage/vector_stores", {"start_time": h0, "bucket_width": "1m", "limit": 60,
                                                  "group_by": "project_id"}).json()["data"]
    assert hour
    for r in hour:
        levels = [x["usage_bytes"] for b in mins for x in b["results"] if x["project_id"] == r["project_id"]]
        assert r["usage_bytes"] == max(levels)
    # the minute in progress shows the whole level, not a partial one
    sim.set_time(NOW + 1)
    try:
        cur = get(http, sim, "usage/vector_stores", {"start_time": int(NOW), "bucket_width": "1m"}).json()["data"]
        assert cur[0]["results"][0]["usage_bytes"] == sim.truth("vector_stores", int(NOW), int(NOW) + 60)[()]["usage_bytes"]
    finally:
        sim.set_time(NOW)


# ------------------------------------------------------------------------------------ auth
def test_auth_errors(sim, validate):
    url = sim.base_url + "/v1/organization/usage/completions"
    params = {"start_time": int(NOW) - 60}
    r = requests.get(url, params=params, timeout=10)
    assert r.status_code == 401
    validate("ErrorResponse", r.json())
    wrong = "sk-admin-this-is-wrong-123456"
    r = requests.get(url, params=params, headers={"Authorization": f"Bearer {wrong}"}, timeout=10)
    assert r.status_code == 401 and wrong not in r.text
    assert r.json()["error"]["code"] == "invalid_api_key" and "sk-ad***56" in r.json()["error"]["message"]
    r = requests.get(url, params=params, headers={"Authorization": "Bearer sk-restricted-key-1"}, timeout=10)
    assert r.status_code == 403 and "api.usage.read" in r.json()["error"]["message"]
    validate("ErrorResponse", r.json())
    r = requests.get(sim.base_url + "/v1/organization/projects", headers={"Authorization": "Bearer sk-restricted-key-1"},
                     timeout=10)
    assert r.status_code == 403 and "api.organization.projects.read" in r.json()["error"]["message"]


def test_audit_logging_disabled_gives_403(validate):
    s = Simulator(seed=1, now=NOW, admin_key=KEY, audit_logs_enabled=False)
    url = s.start()
    try:
        r = requests.get(url + "/v1/organization/audit_logs", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 403 and "not enabled" in r.json()["error"]["message"]
        validate("ErrorResponse", r.json())
        requests.post(url + "/_sim/config", json={"audit_logs_enabled": True}, timeout=10)
        r = requests.get(url + "/v1/organization/audit_logs", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 200
    finally:
        s.stop()


# ------------------------------------------------------------------------------------ faults
def test_fault_kinds(http, sim, validate):
    path = "usage/embeddings"
    params = {"start_time": int(NOW) - 300, "bucket_width": "1m"}
    try:
        sim.add_fault(FaultRule("429", path="/v1/organization/usage/embeddings", count=2, retry_after=3))
        for _ in range(2):
            r = get(http, sim, path, params)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) == 3
            validate("ErrorResponse", r.json())
        assert get(http, sim, path, params).status_code == 200
        for kind in ("500", "502", "503"):
            sim.add_fault(FaultRule(kind, path="usage/embeddings"))
            r = get(http, sim, path, params)
            assert r.status_code == int(kind)
            assert "Retry-After" not in r.headers  # a 5xx exercises the client's own back-off
            validate("ErrorResponse", r.json())
        sim.add_fault(FaultRule("503", path="usage/embeddings", message="custom outage"))
        assert get(http, sim, path, params).json()["error"]["message"] == "custom outage"
        sim.add_fault(FaultRule("reset", path="usage/"))
        with pytest.raises(requests.ConnectionError):
            get(http, sim, path, params)
        sim.add_fault(FaultRule("slow", path="usage/embeddings", delay=0.5))
        t = time.monotonic()
        assert get(http, sim, path, params).status_code == 200
        assert time.monotonic() - t >= 0.5
        sim.add_fault(FaultRule("malformed_json", path="usage/embeddings"))
        r = get(http, sim, path, params)
        assert r.status_code == 200
        with pytest.raises(ValueError):
            json.loads(r.text)
        sim.add_fault(FaultRule("invalid_results", path="usage/embeddings"))
        r = get(http, sim, path, params)
        assert r.status_code == 200
        with pytest.raises(AssertionError):
            validate("UsageResponse", r.json())
        first = r.json()["data"][0]["results"][0]  # the results themselves break the spec, not only the bucket
        assert first["input_tokens"] is None and isinstance(first["num_model_requests"], str)
        pid = sim.org.projects[1].id
        sim.add_fault(FaultRule("404", path=f"*/projects/{pid}/rate_limits", count=None))
        for _ in range(2):
            assert get(http, sim, f"projects/{pid}/rate_limits").status_code == 404
        assert get(http, sim, f"projects/{sim.org.projects[0].id}/rate_limits").status_code == 200
        sim.clear_faults()
        assert get(http, sim, f"projects/{pid}/rate_limits").status_code == 200
        # skip: the third matching request fails
        sim.add_fault(FaultRule("500", path="projects", skip=2))
        codes = [get(http, sim, "projects").status_code for _ in range(4)]
        assert codes == [200, 200, 500, 200]
        sim.add_fault(FaultRule("invalid_results", path="projects"))
        with pytest.raises(AssertionError):
            validate("ProjectListResponse", get(http, sim, "projects").json())
        assert sim.stats()["faults"]["429"] == 2
        assert sim.stats()["by_status"]["429"] == 2  # what tests wait on to know a 429 was served
    finally:
        sim.clear_faults()


def test_invalid_items_break_a_list_s_items_and_keep_its_paging(http, sim, validate):
    """`invalid_results` on a list endpoint also drops `has_more`, so a collector's page-level check
    fires and its item-level reports are never reached: `invalid_items` breaks the items only."""
    pid = sim.org.projects[0].id
    path = f"projects/{pid}/rate_limits"
    want = get(http, sim, path, {"limit": 3}).json()
    assert want["has_more"] is True and len(want["data"]) == 3
    sim.add_fault(FaultRule("invalid_items", path=f"*/projects/{pid}/rate_limits"))
    try:
        got = get(http, sim, path, {"limit": 3}).json()
        with pytest.raises(AssertionError):
            validate("ProjectRateLimitListResponse", got)
        assert "id" not in got["data"][0] and got["data"][1]["max_requests_per_1_minute"] == "lots"
        assert got["data"][2] == want["data"][2]
        assert {k: got[k] for k in ("has_more", "first_id", "last_id")} == {
            k: want[k] for k in ("has_more", "first_id", "last_id")}
        # the next page is still there, untouched (count=1)
        nxt = get(http, sim, path, {"limit": 3, "after": got["last_id"]}).json()
        validate("ProjectRateLimitListResponse", nxt)
    finally:
        sim.clear_faults()


def test_a_reset_fault_is_a_tcp_reset(sim):
    """Not a polite close: the client sees ECONNRESET, as when a proxy or the API drops it."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(sim.base_url)
    sim.add_fault(FaultRule("reset", path="usage/"))
    try:
        with socket.create_connection((u.hostname, u.port), timeout=10) as conn:
            conn.sendall(f"GET /v1/organization/usage/completions?start_time=1 HTTP/1.1\r\nHost: x\r\n"
                         f"Authorization: Bearer {KEY}\r\n\r\n".encode())
            with pytest.raises(ConnectionResetError):
                conn.recv(1024)
    finally:
        sim.clear_faults()


def test_fault_rule_counts_probabilities_and_bounds():
    from agent_input.simulator.faults import FaultSet

    assert FaultRule("429", retry_after=0).retry_after == 1  # the spec's Retry-After is >= 1
    assert FaultRule("429", retry_after=-5).retry_after == 1
    everything = FaultRule("500")
    assert everything.matches("/v1/organization/usage/completions") and everything.matches("/v1/organization/users")

    def fired(rule, n=400):
        faults = FaultSet(4)
        faults.add(rule)
        return sum(faults.pick("/v1/organization/users") is not None for _ in range(n))

    assert 15 < fired(FaultRule("503", path="users", probability=0.1, count=None)) < 70
    assert 330 < fired(FaultRule("503", path="users", probability=0.9, count=None)) < 385
    assert fired(FaultRule("503", path="users", probability=0.5, count=3)) == 3  # count still caps the total
    assert fired(FaultRule("503", path="users", count=0)) == 0


def test_probabilistic_faults_are_seeded():
    def run():
        s = Simulator(seed=9, now=NOW, admin_key=KEY)
        s.add_fault(FaultRule("503", path="users", probability=0.5, count=None))
        url = s.start()
        try:
            with requests.Session() as h:
                h.headers["Authorization"] = f"Bearer {KEY}"
                return [h.get(url + "/v1/organization/users", timeout=10).status_code for _ in range(20)]
        finally:
            s.stop()
    a, b = run(), run()
    assert a == b and 503 in a and 200 in a


# ------------------------------------------------------------------------------------ determinism
def test_determinism_by_seed(http):
    def snapshot(seed):
        s = Simulator(seed=seed, org=OrgSpec(n_projects=4, n_users=9, n_keys=8), now=NOW, admin_key=KEY)
        s.start()
        try:
            out = []
            for path, params in (("usage/completions", {"start_time": int(NOW) - 900, "bucket_width": "1m",
                                                        "group_by": ["api_key_id", "model"], "limit": 20}),
                                 ("costs", {"start_time": int(NOW) - 3 * 86400, "group_by": "line_item"}),
                                 ("audit_logs", {"limit": 50}), ("users", {"limit": 100}),
                                 ("projects", {"include_archived": "true"})):
                out.append(get(http, s, path, params).json())
            return out
        finally:
            s.stop()
    a, b, c = snapshot(1), snapshot(1), snapshot(2)
    assert a == b
    assert a != c


# ------------------------------------------------------------------------------------ control interface
def test_a_control_request_missing_a_parameter_is_answered_400_naming_it(sim):
    """`GET /_sim/truth` without `start`/`end` (simulate --help lists the endpoint) closed the
    connection with no answer and a traceback on the simulator's stderr."""
    r = requests.get(sim.base_url + "/_sim/truth", params={"stream": "completions"}, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "start" and "start" in r.json()["error"]["message"]
    assert requests.get(sim.base_url + "/_sim/clock", timeout=10).status_code == 200


def test_a_truth_range_too_long_to_sum_is_answered_400_not_a_thread_held_for_ever(sim):
    """`GET /_sim/truth` sums bucket by bucket: end=10^23 held the request's thread for ever."""
    for start, end in ((0, 10 ** 23), (0, 3 * 366 * 86400), (100, 50), (-60, 60)):
        r = requests.get(sim.base_url + "/_sim/truth", params={"stream": "completions", "start": start, "end": end},
                         timeout=10)
        assert r.status_code == 400 and "span at most" in r.text, (start, end, r.text)
    end = int(sim.now()) // 86400 * 86400
    r = requests.get(sim.base_url + "/_sim/truth", params={"stream": "completions", "start": end - 30 * 86400,
                                                           "end": end, "bucket_width": "1d"}, timeout=30)
    assert r.status_code == 200 and r.json()


def test_a_clock_out_of_range_is_answered_400_and_leaves_the_clock_alone(sim):
    """POST /_sim/clock with a time no timestamp can hold (1e30, Infinity, NaN, or an advance that
    gets there) was taken: that request and every later one, the API's included, then failed with
    a dropped connection and a traceback, until the simulator was restarted."""
    before = requests.get(sim.base_url + "/_sim/clock", timeout=10).json()["now"]
    for body in ('{"now": 1e30}', '{"now": Infinity}', '{"now": NaN}', '{"now": -1e30}', '{"advance": 1e30}'):
        r = requests.post(sim.base_url + "/_sim/clock", data=body, timeout=10)
        assert r.status_code == 400 and "now" in r.json()["error"], (body, r.text)
    assert requests.get(sim.base_url + "/_sim/clock", timeout=10).json()["now"] == before
    assert requests.get(sim.base_url + "/v1/organization/projects", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).ok


def test_control_interface(sim):
    base = sim.base_url
    assert requests.get(base + "/_sim/clock", timeout=10).json() == {"now": NOW}
    try:
        assert requests.post(base + "/_sim/clock", json={"now": NOW + 600}, timeout=10).json() == {"now": NOW + 600}
        assert sim.now() == NOW + 600
        requests.post(base + "/_sim/clock", json={"advance": 60}, timeout=10)
        assert sim.now() == NOW + 660
    finally:
        sim.set_time(NOW)
    rules = requests.post(base + "/_sim/faults", json=[{"kind": "503", "path": "users", "count": 1}], timeout=10).json()
    assert rules[0]["kind"] == "503"
    r = requests.get(base + "/v1/organization/users", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 503
    requests.post(base + "/_sim/faults", json=[{"kind": "503", "path": "users"}], timeout=10)
    assert requests.post(base + "/_sim/faults", json=[], timeout=10).json() == []
    r = requests.get(base + "/v1/organization/users", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200
    assert requests.post(base + "/_sim/faults", json=[{"kind": "nope"}], timeout=10).status_code == 400
    start, end = int(NOW) - 7200, int(NOW) - 3600
    t = requests.get(base + "/_sim/truth", params={"stream": "completions", "start": start, "end": end,
                                                   "bucket_width": "1m", "group_by": "project_id,model"}, timeout=10).json()
    want = sim.truth("completions", start, end, "1m", ("project_id", "model"))
    assert {(g["group"]["project_id"], g["group"]["model"]): g["totals"] for g in t} == want
    t = requests.get(base + "/_sim/truth", params={"stream": "costs", "start": start - 86400, "end": end}, timeout=10).json()
    assert t and set(t[0]["totals"]) == {"amount"}
    stats = requests.get(base + "/_sim/stats", timeout=10).json()
    assert stats["requests"] > 0 and stats["by_status"]["200"] > 0 and stats["faults"]["503"] >= 1
    assert "/v1/organization/users" in stats["by_path"]
    assert stats["first_request_at"] <= stats["last_answer_at"] <= time.time()
    stats = requests.post(base + "/_sim/stats", json={}, timeout=10).json()
    assert stats["requests"] == 0 and stats["by_path"] == {} and stats["first_request_at"] is None
    before = time.time()
    requests.get(base + "/v1/organization/users", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    stats = requests.get(base + "/_sim/stats", timeout=10).json()
    assert before <= stats["first_request_at"] <= stats["last_answer_at"] <= time.time()
    assert stats["requests"] == 1  # the control requests are not counted


@pytest.mark.parametrize("fault", [None, "503", "reset"])
def test_an_answer_is_in_the_stats_before_the_client_has_it(monkeypatch, fault):
    """A client that reads /_sim/stats right after its answer (or its reset) finds the request's
    span recorded: the span is written before the answer goes out, not after (it once raced)."""
    from agent_input.simulator import server

    recorded = server.Simulator._served

    def slow(self, arrived, done):  # widen the window an answer-then-record order would leave
        time.sleep(0.05)
        recorded(self, arrived, done)

    monkeypatch.setattr(server.Simulator, "_served", slow)
    s = Simulator(seed=1, org="small", now=NOW, admin_key=KEY)
    base = s.start()
    try:
        if fault:
            s.add_fault(FaultRule(kind=fault, count=1))
        try:
            requests.get(base + "/v1/organization/users", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        except requests.exceptions.ConnectionError:
            assert fault == "reset"
        stats = requests.get(base + "/_sim/stats", timeout=10).json()
    finally:
        s.stop()
    assert stats["first_request_at"] is not None and stats["first_request_at"] <= stats["last_answer_at"]


def test_cli_simulate_serves_until_interrupted(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "agent_input.cli", "simulate", "--port", "0", "--seed", "4",
                             "--now", "2025-11-23T10:00:00Z"], stderr=subprocess.PIPE, text=True)
    try:
        url = key = None
        deadline = time.monotonic() + 20
        while (url is None or key is None) and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "listening on " in line:
                url = line.split("listening on ")[1].split()[0]
            if line.startswith("OPENAI_ADMIN_KEY="):
                key = line.strip().split("=", 1)[1]
        assert url and key
        assert requests.get(url + "/_sim/clock", timeout=10).json() == {"now": NOW}
        r = requests.get(url + "/v1/organization/projects", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 200
    finally:
        proc.send_signal(2)  # SIGINT, like Ctrl-C: a clean stop wherever it lands, exit 0
        try:
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_large_org_day_at_1m_has_the_issue_s_shape(http):
    """The large organization's size and traffic (its speed is a benchmark figure, not a test)."""
    s = Simulator(seed=1, org="large", now=NOW, admin_key=KEY)
    s.start()
    try:
        assert len(s.org.users) == 2000 and len(s.org.keys) == 500 and len(s.org.models) == 20
        assert len(s.org.projects) == 50
        buckets, n = usage_all(http, s, "completions", {
            "start_time": int(NOW) - 86400, "end_time": int(NOW), "bucket_width": "1m", "limit": 1440,
            "group_by": ["project_id", "user_id", "api_key_id", "model", "batch"]})
        per_minute = [len(b["results"]) for b in buckets]
        assert len(buckets) == 1440 and n > 1
        assert 10 <= max(per_minute) <= 400 and sum(per_minute) / 1440 >= 20
    finally:
        s.stop()


def test_response_cache_answers_repeats_from_memory_for_the_same_clock_and_config(http):
    s = Simulator(seed=3, org="small", now=NOW, admin_key=KEY, cache_responses=True)
    s.start()
    calls = []
    real = s.api.handle
    s.api.handle = lambda path, query: calls.append(path) or real(path, query)
    params = {"start_time": int(NOW) - 3600, "bucket_width": "1m", "limit": 60, "group_by": ["model"]}
    try:
        first, again = get(http, s, "usage/completions", params), get(http, s, "usage/completions", params)
        assert first.status_code == again.status_code == 200
        assert first.content == again.content and len(calls) == 1, "the repeat is served from memory"
        assert s.stats()["by_path"]["/v1/organization/usage/completions"] == 2, "still counted"
        assert get(http, s, "usage/completions", {**params, "limit": 30}).status_code == 200
        assert len(calls) == 2, "another query is another answer"
        # a fault applies even to a request whose answer is cached, and is never cached itself
        http.post(s.base_url + "/_sim/faults", json=[{"kind": "malformed_json", "path": "usage/completions",
                                                      "skip": 1, "count": 1}], timeout=10)
        assert get(http, s, "usage/completions", params).content == first.content  # cached again
        n = len(calls)
        broken = get(http, s, "usage/completions", params)
        with pytest.raises(ValueError):
            broken.json()
        assert get(http, s, "usage/completions", params).content == first.content
        assert len(calls) == n + 1, "only the faulty answer was computed"
        # moving the clock changes the answer: nothing from before is served
        http.post(s.base_url + "/_sim/clock", json={"now": NOW + 600}, timeout=10)
        n = len(calls)
        later = get(http, s, "usage/completions", params)
        assert len(calls) == n + 1 and later.json()["data"] != first.json()["data"]
        http.post(s.base_url + "/_sim/clock", json={"now": NOW}, timeout=10)
        assert get(http, s, "usage/completions", params).content == first.content
        assert len(calls) == n + 1, "back at the first clock: the first answer, from memory"
        # a config change (here: page size) empties it
        http.post(s.base_url + "/_sim/config", json={"max_results_per_page": 5000}, timeout=10)
        get(http, s, "usage/completions", params)
        assert len(calls) == n + 2
    finally:
        s.stop()


def test_response_cache_is_off_by_default_and_bounded():
    from agent_input.simulator.server import ResponseCache

    assert Simulator(seed=3, org="small", now=NOW)._responses.enabled is False
    cache = ResponseCache(True, max_bytes=10)
    cache.put("/a", "", NOW, b"12345")
    cache.put("/b", "", NOW, b"123456")  # over the bound: the oldest goes
    assert cache.get("/a", "", NOW) is None and cache.get("/b", "", NOW) == b"123456"
    cache.put("/c", "", NOW, b"x" * 11)  # larger than the whole bound: not kept
    assert cache.get("/c", "", NOW) is None and cache.get("/b", "", NOW) == b"123456"


def test_the_server_is_quiet_for_a_client_that_went_away_and_loud_for_its_own_bug(capsys):
    """Crash tests kill collectors mid-request: those resets are expected. A simulator bug is not,
    and must not vanish as a silently dropped connection."""
    from agent_input.simulator.server import _Server

    server = object.__new__(_Server)  # handle_error needs no socket
    for error in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(32, "Broken pipe")):
        try:
            raise error
        except OSError:
            server.handle_error(None, ("127.0.0.1", 1))
    assert capsys.readouterr().err == ""
    try:
        raise KeyError("a bug in a handler")
    except KeyError:
        server.handle_error(None, ("127.0.0.1", 1))
    assert "KeyError: 'a bug in a handler'" in capsys.readouterr().err


def test_an_audit_rate_the_ids_cannot_number_is_refused_when_the_simulator_is_made():
    """Above ~2,700 events an hour the audit ids' sequence runs into the tenant events' range:
    each listing of such an hour failed (a dropped connection) instead of one clear error."""
    from dataclasses import replace

    from agent_input.simulator import OrgSpec, Simulator

    with pytest.raises(ValueError, match="audit_events_per_hour 17000 is more than the simulated audit ids"):
        Simulator(seed=1, org=replace(OrgSpec(), audit_events_per_hour=17000.0))
    Simulator(seed=1, org=replace(OrgSpec(), audit_events_per_hour=2500.0))


@pytest.mark.parametrize("taken", [True, False])
def test_cli_simulate_on_a_taken_or_impossible_port_says_so_in_one_line(taken):
    """A port in use (another simulator still running) or past 65535 was an OSError traceback."""
    import socket

    from click.testing import CliRunner

    from agent_input.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1] if taken else 70000
        result = CliRunner().invoke(main, ["simulate", "--port", str(port)])
    assert result.exit_code == (1 if taken else 2), result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, OSError)
    if taken:
        assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in result.output
    else:
        assert "70000 is not in the range 0<=x<=65535" in result.output


@pytest.mark.parametrize("value", ["-5", "600001", "99999999999999999999"])
def test_cli_simulate_refuses_a_negative_or_endless_latency(value):
    """`simulate --latency-ms -5` was taken (a negative added latency: nonsense the simulator slept
    as none), and a huge one made every request's sleep fail (OverflowError) or never end."""
    from click.testing import CliRunner

    from agent_input.cli import main

    result = CliRunner().invoke(main, ["simulate", "--port", "0", "--latency-ms", value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--latency-ms': {value} is not in the range 0<=x<=600000" in result.output
