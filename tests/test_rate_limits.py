"""The rate_limits stream: the seed's example, a multi-page project list with one project failing,
idempotent cycles, and the status document the stale-limits rule reads."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent_input.config import config_from_dict
from agent_input.ecs import iso_timestamp
from agent_input.engine import Delivery
from agent_input.http_client import AdminApiClient, PermissionDeniedError
from agent_input.outputs import NdjsonFileOutput
from agent_input.rate_limits import RateLimitsCollector, limit_event, status_event
from agent_input.state import StateStore
from kibana_assets.fields import undeclared_fields

from conftest import ADMIN_KEY, T0, read_ndjson, traced_peak

SEED = Path(__file__).parent / "fixtures" / "seed"


def _ts(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def test_seed_rate_limits_example():
    seed = json.loads((SEED / "rate_limits.json").read_text())
    rl = seed["openai"]["rate_limits"]
    injected = ("project_id", "project_name", "project_status", "collected_at")
    row = {k: v for k, v in rl.items() if k not in injected}  # what /rate_limits sent
    project = {"id": rl["project_id"], "object": "organization.project", "name": rl["project_name"],
               "status": rl["project_status"], "created_at": 1711471533, "archived_at": None}
    doc_id, doc = limit_event(row, project, collected=_ts(rl["collected_at"]),
                              namespace=seed["data_stream"]["namespace"])
    want = copy.deepcopy(seed)
    for k in ("ingested", "agent_id_status"):
        want["event"].pop(k)
    # ours: the join keys the headroom queries use, in the seed's own field table
    want["openai"]["base"] = {"model": rl["model"], "project_id": rl["project_id"], "project_name": rl["project_name"]}
    assert doc == want
    assert undeclared_fields(doc) == []
    # deterministic: the same cycle gives the same id; another cycle or project another one
    assert limit_event(row, project, collected=_ts(rl["collected_at"]))[0] == doc_id
    assert limit_event(row, project, collected=_ts(rl["collected_at"]) + 300)[0] != doc_id
    assert limit_event(row, dict(project, id="proj_b"), collected=_ts(rl["collected_at"]))[0] != doc_id
    # the limit's own id, not its model: two limits of one model in a project are two documents
    assert limit_event(dict(row, id="rl-other"), project, collected=_ts(rl["collected_at"]))[0] != doc_id


def test_optional_limit_fields_only_when_present():
    row = {"object": "project.rate_limit", "id": "rl-ada", "model": "ada", "max_requests_per_1_minute": 600,
           "max_tokens_per_1_minute": 150000, "max_images_per_1_minute": None}
    _, doc = limit_event(row, {"id": "p", "name": "P", "status": "active"}, collected=1_700_000_000)
    assert set(doc["openai"]["rate_limits"]) == {"object", "id", "model", "max_requests_per_1_minute",
                                                 "max_tokens_per_1_minute", "project_id", "project_name",
                                                 "project_status", "collected_at"}


@pytest.mark.parametrize("name, status", [(7, None), ({"en": "P"}, ["active"])])
def test_a_project_name_or_status_that_is_not_a_string_is_left_out(name, status):
    """`project_name` and `project_status` are keywords: a number or an object from the listing
    would make Elasticsearch refuse the whole limit document (a mapping conflict)."""
    from agent_input.rate_limits import project_failure_event

    project = {"id": "proj_1", "name": name, "status": status}
    row = {"id": "rl-gpt-4o", "model": "gpt-4o", "max_requests_per_1_minute": 10}
    _, doc = limit_event(row, project, collected=int(T0))
    _, failure = project_failure_event(project, "404", collected=int(T0))
    for fields in (doc["openai"]["rate_limits"], failure["openai"]["rate_limits"]):
        assert fields["project_id"] == "proj_1"
        assert "project_name" not in fields and "project_status" not in fields
    assert "project_name" not in doc["openai"]["base"]

def test_a_project_failure_document_never_carries_the_key():
    """A failure's reason may quote what the API sent (a limit's value, an error body): the
    document that goes to Elasticsearch has it redacted, like every log line."""
    from agent_input.rate_limits import project_failure_event

    reason = f"none of its 1 limit(s) matches the API reference (first: limit #1: `model` is {ADMIN_KEY!r})"
    _, doc = project_failure_event({"id": "proj_1", "name": "P"}, reason, collected=int(T0))
    text = json.dumps(doc)
    assert "sk-admin" not in text and ADMIN_KEY[-8:] not in text
    assert doc["error"]["message"].startswith("none of its 1 limit(s) matches the API reference")

def test_status_document_fields():
    _, ok = status_event(collected=1_700_000_000, projects=3, limits=90, failed_projects=1, error=None)
    assert ok["event"] == {"kind": "event", "action": "rate-limits-collection", "outcome": "success",
                           "dataset": "openai.rate_limits", "created": "2023-11-14T22:13:20.000Z"}
    assert ok["openai"]["rate_limits"]["collection"] == {"projects": 3, "limits": 90, "failed_projects": 1,
                                                           "bad_limits": 0}
    assert "error" not in ok
    _, bad = status_event(collected=1_700_000_000, projects=0, limits=0, failed_projects=0, error="boom")
    assert bad["event"]["outcome"] == "failure" and bad["error"] == {"message": "boom"}
    assert undeclared_fields(ok) == [] and undeclared_fields(bad) == []


def _collector(sim, state: Path, out: Path, **stream):
    cfg = config_from_dict({"url": sim.base_url, "api_key": ADMIN_KEY, "max_retries": 1,
                            "data_streams": {"rate_limits": stream}}, env={})
    store = StateStore(state)
    output = NdjsonFileOutput(out)
    client = AdminApiClient(sim.base_url, ADMIN_KEY, max_retries=1, backoff_base=0.001, backoff_cap=0.01)
    col = RateLimitsCollector(cfg, cfg.stream("rate_limits"), client, Delivery(store, output), clock=sim.now,
                              client_factory=lambda: AdminApiClient(sim.base_url, ADMIN_KEY, max_retries=1,
                                                                    backoff_base=0.001, backoff_cap=0.01))
    return col, (output, store, client)


@pytest.mark.parametrize("refusal", ["404", "403"])
def test_multi_page_projects_with_one_refused_yield_every_other_projects_limits(simulator, tmp_path, refusal):
    """One project's limits not found, or not readable with this key (403 on that project only),
    is that project skipped and counted, not the stream stopped."""
    from agent_input.simulator import FaultRule
    from agent_input.simulator.org import rate_limit_rows

    org = simulator.org
    projects = org.projects  # include_archived: every project
    assert len(projects) >= 4
    broken = projects[1]
    simulator.add_fault(FaultRule(kind=refusal, path=f"/v1/organization/projects/{broken.id}/rate_limits",
                                  count=None))
    out = tmp_path / "limits.ndjson"
    col, closing = _collector(simulator, tmp_path / "state", out, batch_size=2, include_archived=True)
    stats = col.poll(T0)
    for c in closing:
        c.close()
    assert stats.requests == 3 + len(projects) - 1, "3 pages of projects, then one per readable project"
    assert any(broken.id in e for e in stats.errors)

    docs = read_ndjson(out)
    status = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    limits = [d for d in docs if d["event"]["kind"] == "metric"]
    assert len(status) == 1
    assert status[0]["event"]["outcome"] == "success"
    assert status[0]["openai"]["rate_limits"]["collection"] == {
        "projects": len(projects) - 1, "limits": len(limits), "failed_projects": 1, "bad_limits": 0}
    # the project that failed has a document of its own, for the per-project failing rule
    (failure,) = [d for d in docs if d["event"].get("action") == "rate-limits-project-failure"]
    assert failure["event"]["outcome"] == "failure" and failure["@timestamp"] == iso_timestamp(T0)
    assert failure["openai"]["rate_limits"] == {"project_id": broken.id, "project_name": broken.name,
                                                "project_status": broken.status}
    assert refusal in failure["error"]["message"] and ADMIN_KEY not in json.dumps(failure)
    assert undeclared_fields(failure) == []
    for p in projects:
        got = {d["openai"]["rate_limits"]["id"]: d for d in limits if d["openai"]["rate_limits"]["project_id"] == p.id}
        if p is broken:
            assert got == {}
            continue
        want = {r["id"]: r for r in rate_limit_rows(org, p)}
        assert set(got) == set(want), p.id
        for rid, d in got.items():
            rl = d["openai"]["rate_limits"]
            assert {k: rl[k] for k in want[rid]} == want[rid]
            assert rl["project_name"] == p.name and rl["project_status"] == p.status
            assert d["openai"]["base"] == {"model": want[rid]["model"], "project_id": p.id, "project_name": p.name}
            assert d["@timestamp"] == iso_timestamp(T0) == d["event"]["created"]
            assert rl["collected_at"] == iso_timestamp(T0).replace(".000Z", "Z")
    assert len({d["_id"] for d in docs}) == len(docs)


def test_every_project_failing_is_a_failed_cycle_with_one_failure_document_each(simulator, tmp_path):
    """No project's limits read: the cycle is a failure (the stale-limits rule's signal), and each
    project has its own failure document (ids apart: a shared id is one document in the index)."""
    from agent_input.simulator import FaultRule

    org = simulator.org
    projects = [p for p in org.projects if p.archived_at is None]
    assert len(projects) >= 2
    # an API error quoting a key: the failure document's message is redacted like a log line
    simulator.add_fault(FaultRule(kind="404", path="*/rate_limits", count=None,
                                  message="no such project (key sk-proj-abcdefghijklmnop)"))
    out = tmp_path / "limits.ndjson"
    col, closing = _collector(simulator, tmp_path / "state", out)
    stats = col.poll(T0)
    for c in closing:
        c.close()
    docs = read_ndjson(out)
    (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    assert status["event"]["outcome"] == "failure"
    assert f"all {len(projects)} project(s) failed" in status["error"]["message"]
    assert any(f"all {len(projects)} project(s) failed" in e for e in stats.errors)
    failures = [d for d in docs if d["event"].get("action") == "rate-limits-project-failure"]
    assert {d["openai"]["rate_limits"]["project_id"] for d in failures} == {p.id for p in projects}
    assert len({d["_id"] for d in failures}) == len(projects), "two projects' failures share a document id"
    for d in failures:
        assert "sk-proj-abcdefghijklmnop" not in d["error"]["message"] and "***" in d["error"]["message"]

SCOPE_403 = ("You have insufficient permissions for this operation. Missing scopes: api.management.read. Check "
             "that you have the correct role in your organization.")


def test_projects_refused_alike_are_one_warning_per_cycle_with_their_count_and_scope(simulator, tmp_path, caplog):
    """A key without the limits' scope logged one WARNING per project per cycle (5,000 lines every
    5 minutes for a large organization): projects that fail alike are one line, with the count,
    the scope and the first ids; each still has its failure document (the per-project rule's data)."""
    import logging

    from agent_input.simulator import FaultRule

    projects = [p for p in simulator.org.projects if p.archived_at is None]
    assert len(projects) >= 4
    # every project's limits but one (the first request) are refused
    simulator.add_fault(FaultRule(kind="403", path="*/rate_limits", count=None, skip=1, message=SCOPE_403))
    out = tmp_path / "limits.ndjson"
    col, closing = _collector(simulator, tmp_path / "state", out)
    with caplog.at_level(logging.WARNING, logger="agent_input.rate_limits"):
        stats = col.poll(T0)
    for c in closing:
        c.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "agent_input.rate_limits"]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"rate_limits: skipped {len(projects) - 1} projects (")
    assert "the key lacks the api.management.read scope (403)" in lines[0]
    assert lines[0].split(":")[1].count("proj_") == min(3, len(projects) - 1)  # the first few ids
    assert stats.errors == lines
    docs = read_ndjson(out)
    failures = [d for d in docs if d["event"].get("action") == "rate-limits-project-failure"]
    assert len(failures) == len(projects) - 1
    assert all("api.management.read" in d["error"]["message"] for d in failures)
    (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    assert status["event"]["outcome"] == "success"
    assert status["openai"]["rate_limits"]["collection"]["failed_projects"] == len(projects) - 1


def test_every_project_refused_for_a_missing_scope_stops_the_stream_naming_it_once(simulator, tmp_path, caplog):
    """Every project's limits refused for the same missing scope is the key's refusal, not the
    projects': the stream stops as when the projects listing is refused (`failed`, naming the
    scope, said once), after storing the cycle's failure documents; it logged a WARNING per
    project and an ERROR at every cycle, for ever."""
    import logging
    import threading

    from agent_input import app
    from agent_input.simulator import FaultRule

    projects = [p for p in simulator.org.projects if p.archived_at is None]
    simulator.add_fault(FaultRule(kind="403", path="*/rate_limits", count=None, message=SCOPE_403))
    out = tmp_path / "limits.ndjson"
    from agent_input.config import data_streams

    streams = {n: {"enabled": n == "rate_limits"} for n in data_streams()}
    cfg = config_from_dict({"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 0,
                            "data_streams": streams}, env={})
    output = NdjsonFileOutput(out)
    stop = threading.Event()
    collection = app.build(cfg, state_dir=tmp_path / "state", output=output, clock=simulator.now, stop=stop)
    runner = threading.Thread(target=collection.engine.run, kwargs={"once": False})
    try:
        with caplog.at_level(logging.WARNING):
            runner.start()
            runner.join(20)  # it ends by itself: its only stream stopped
            stopped_by_itself = not runner.is_alive()
            stop.set()
            runner.join()
    finally:
        collection.close()
        output.close()
    assert stopped_by_itself, "the stream went on polling"
    failed = collection.engine.failed["rate_limits"]
    assert "the key lacks the api.management.read scope" in failed and f"({len(projects)} project(s))" in failed
    said = [r for r in caplog.records if r.name.startswith("agent_input") and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in said] == [f"rate_limits: stopped: {failed}"]
    docs = read_ndjson(out)
    failures = [d for d in docs if d["event"].get("action") == "rate-limits-project-failure"]
    assert {d["openai"]["rate_limits"]["project_id"] for d in failures} == {p.id for p in projects}
    (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    assert status["event"]["outcome"] == "failure" and "api.management.read" in status["error"]["message"]


def test_same_cycle_is_idempotent_and_archived_projects_are_opt_in(simulator, tmp_path):
    out1, out2 = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    col, closing = _collector(simulator, tmp_path / "s1", out1)
    col.poll(T0)
    assert col.poll(T0).events == 0  # the same cycle again on the same state: already stored
    for c in closing:
        c.close()
    col, closing = _collector(simulator, tmp_path / "s2", out2)
    col.poll(T0)
    for c in closing:
        c.close()
    assert out1.read_bytes() == out2.read_bytes()  # same ids, same bytes
    active = {p.id for p in simulator.org.projects if p.archived_at is None}
    got = {d["openai"]["rate_limits"]["project_id"] for d in read_ndjson(out1) if d["event"]["kind"] == "metric"}
    assert got == active


def test_project_list_failure_is_a_failure_status_document(simulator, tmp_path):
    from agent_input.simulator import FaultRule

    simulator.add_fault(FaultRule(kind="500", path="/v1/organization/projects", count=5))
    out = tmp_path / "limits.ndjson"
    col, closing = _collector(simulator, tmp_path / "state", out)
    stats = col.poll(T0)
    assert stats.errors and "cannot list projects" in stats.errors[-1]
    simulator.clear_faults()
    simulator.set_time(T0 + 300)
    col.poll(T0 + 300)
    for c in closing:
        c.close()
    status = [d for d in read_ndjson(out) if d["event"].get("action") == "rate-limits-collection"]
    assert [s["event"]["outcome"] for s in status] == ["failure", "success"]
    assert "cannot list projects" in status[0]["error"]["message"]
    assert status[0]["openai"]["rate_limits"]["collection"] == {"projects": 0, "limits": 0, "failed_projects": 0,
                                                                 "bad_limits": 0}


def test_missing_scope_writes_a_failure_and_stops_the_stream(tmp_path):
    from agent_input.simulator import Simulator

    sim = Simulator(seed=7, org="small", now=T0, admin_key="sk-admin-other", restricted_key=ADMIN_KEY)
    sim.base_url = sim.start()
    try:
        out = tmp_path / "limits.ndjson"
        col, closing = _collector(sim, tmp_path / "state", out)
        with pytest.raises(PermissionDeniedError):
            col.poll(T0)
        for c in closing:
            c.close()
        (status,) = read_ndjson(out)
        assert status["event"]["outcome"] == "failure"
    finally:
        sim.stop()


def test_a_last_id_that_comes_back_is_reported_not_taken_as_the_end(tmp_path):
    """Ending the projects listing at a repeated cursor would leave projects out without a word."""
    col, closing = _collector(SimpleNamespace(base_url="http://127.0.0.1:1", now=lambda: T0),
                              tmp_path / "state", tmp_path / "limits.ndjson")
    pages = {None: (["proj_a", "proj_b"], "proj_b"), "proj_b": (["proj_c"], "proj_b")}
    asked = []

    def get_json(path, params):
        if path.endswith("/rate_limits"):
            return {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
        asked.append(params.get("after"))
        assert len(asked) < 10, "the listing is looping"
        ids, last = pages[params.get("after")]
        return {"object": "list", "data": [{"id": i, "object": "organization.project", "name": i,
                                            "created_at": 0, "status": "active"} for i in ids],
                "first_id": ids[0], "last_id": last, "has_more": True}

    col.client.get_json = get_json
    stats = col.poll(T0)
    assert asked == [None, "proj_b"]
    assert stats.errors and "'proj_b' came back a second time" in stats.errors[-1]
    for c in closing:
        c.close()


def _before_each_listing(col, hook) -> None:
    """Run `hook(path)` before each listing the collector starts (it may raise, or set the stop)."""
    real = col._list

    def listing(path, params, stats, *client):
        hook(path)
        return real(path, params, stats, *client)

    col._list = listing


def test_a_stop_part_way_stores_nothing_and_is_no_failed_cycle(simulator, tmp_path):
    """A graceful stop (or a new config) in the middle of a cycle stored the limits read so far
    and a `failure` status document: every policy change added a failure to the rate-limit
    failure panels, and an incomplete set of limits."""
    import threading

    from agent_input.http_client import StoppedError

    out = tmp_path / "limits.ndjson"
    col, closing = _collector(simulator, tmp_path / "state", out)
    col.stop = threading.Event()
    _before_each_listing(col, lambda path: path != "/v1/organization/projects" and col.stop.set())
    with pytest.raises(StoppedError):
        col.poll(T0)
    for c in closing:
        c.close()
    assert not out.exists() or read_ndjson(out) == []
    col, closing = _collector(simulator, tmp_path / "state", out)
    col.poll(T0)  # the same cycle, whole, at the next start
    for c in closing:
        c.close()
    docs = read_ndjson(out)
    assert docs[-1]["event"]["outcome"] == "success" and len(docs) > 1


def test_a_key_rejected_part_way_is_a_failed_cycle(simulator, tmp_path):
    from agent_input.http_client import AuthenticationError

    out = tmp_path / "limits.ndjson"
    col, closing = _collector(simulator, tmp_path / "state", out)
    seen: list = []

    def reject_the_second_project(path):
        if path.endswith("/rate_limits"):
            seen.append(path)
            if len(seen) == 2:
                raise AuthenticationError(401, "the admin key was rejected", "invalid_api_key", path)

    _before_each_listing(col, reject_the_second_project)
    with pytest.raises(AuthenticationError):
        col.poll(T0)
    for c in closing:
        c.close()
    assert read_ndjson(out)[-1]["event"]["outcome"] == "failure"


def test_a_key_rejected_on_the_limits_stops_taking_the_cycle_s_projects(simulator, tmp_path):
    """A key revoked after the projects listing: the first rejection ends the cycle (its projects
    not taken yet are dropped), one failure document, not one for every project asked with a key
    that no longer works."""
    from agent_input.http_client import AuthenticationError

    out = tmp_path / "limits.ndjson"
    col, closing = _collector(simulator, tmp_path / "state", out)

    def reject(path):
        if path.endswith("/rate_limits"):
            raise AuthenticationError(401, "the admin key was rejected", "invalid_api_key", path)

    _before_each_listing(col, reject)
    with pytest.raises(AuthenticationError):
        col.poll(T0)
    for c in closing:
        c.close()
    docs = read_ndjson(out)
    failures = [d for d in docs if d["event"].get("action") == "rate-limits-project-failure"]
    (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    projects = [p for p in simulator.org.projects if p.status == "active"]
    assert len(projects) >= 2 and len(failures) == 1 and len(docs) == 2
    assert status["openai"]["rate_limits"]["collection"]["failed_projects"] == 1
    # the status document says why and how far the cycle got, not "all 1 project(s) failed"
    assert status["error"]["message"] == (f"stopped after 0 of {len(projects)} project(s): the admin key was "
                                          "rejected (401 invalid_api_key): the admin key was rejected")


def test_a_cycle_of_many_projects_holds_about_its_payload_not_ten_times_it(tmp_path):
    """A cycle's lines were kept in a list until the cycle's one transaction, each in the buffer
    orjson made it in (4 KiB or more, never shrunk, from orjson 3.12 on): 5,000 projects' 171,000
    limits (138 MB of NDJSON) took the collector to 874 MB of RSS. The cycle now costs about
    twice its payload."""
    from agent_input.outputs import NdjsonOutput
    from agent_input.simulator import Simulator
    from agent_input.simulator.org import rate_limit_rows

    sim = Simulator(seed=3, org="small", now=T0)
    rows = rate_limit_rows(sim.org, sim.org.projects[0])
    n = 150
    projects = [{"id": f"proj_{i:04d}", "object": "organization.project", "name": f"Project {i}",
                 "created_at": 0, "status": "active"} for i in range(n)]
    listing = {"object": "list", "data": projects, "first_id": projects[0]["id"], "last_id": projects[-1]["id"],
               "has_more": False}
    limits = {"object": "list", "data": rows, "first_id": rows[0]["id"], "last_id": rows[-1]["id"],
              "has_more": False}
    cfg = config_from_dict({"url": "http://127.0.0.1:1", "api_key": ADMIN_KEY,
                            "data_streams": {"rate_limits": {}}}, env={})
    store = StateStore(tmp_path / "state")
    with open(tmp_path / "limits.ndjson", "wb") as fh:
        output = NdjsonOutput(fh)
        client = SimpleNamespace(get_json=lambda path, params: limits if path.endswith("/rate_limits") else listing)
        col = RateLimitsCollector(cfg, cfg.stream("rate_limits"), client, Delivery(store, output), clock=lambda: T0)
        stats, peak = traced_peak(lambda: col.poll(T0))
    store.close()
    payload = (tmp_path / "limits.ndjson").stat().st_size
    assert stats.events == n * len(rows) + 1 and payload > 3_000_000
    assert peak < 3 * payload, f"peak {peak / 1e6:.1f} MB for {payload / 1e6:.1f} MB of NDJSON"


def test_projects_limits_are_read_concurrently_each_worker_on_its_own_client(simulator, tmp_path, monkeypatch):
    """One project after another, a cycle of 5,000 projects took twelve minutes at 150 ms a
    request against a 5-minute interval. The limits are read on up to LIMITS_WORKERS threads, each
    with its own client (closed at the end of the cycle), and come out in the projects' order."""
    import threading

    from agent_input import rate_limits as R

    calls: list[tuple[str, int]] = []
    closed: list[int] = []
    real_get, real_close = AdminApiClient.get_json, AdminApiClient.close
    # the first two limits requests wait for each other: one worker taking every project before
    # the others start (4 small projects) cannot pass, and one at a time breaks the barrier
    both_in_flight = threading.Barrier(2, timeout=10)
    first_two = iter(range(2))

    def get_json(self, path, params=None, **kw):
        calls.append((threading.current_thread().name, id(self), path))
        if path.endswith("/rate_limits") and next(first_two, None) is not None:
            both_in_flight.wait()
        return real_get(self, path, params, **kw)

    monkeypatch.setattr(AdminApiClient, "get_json", get_json)
    monkeypatch.setattr(AdminApiClient, "close", lambda self: (closed.append(id(self)), real_close(self))[1])
    monkeypatch.setattr(R, "LIMITS_WORKERS", 3)
    out = tmp_path / "limits.ndjson"
    col, closing = _collector(simulator, tmp_path / "state", out, include_archived=True)
    stats = col.poll(T0)
    for c in closing:
        c.close()
    limit_calls = [c for c in calls if c[2].endswith("/rate_limits")]
    projects = simulator.org.projects
    assert len(limit_calls) == len(projects) and stats.requests == len(projects) + 1
    assert {name.split("_")[0] for name, _, _ in limit_calls} == {"rate-limits"}
    workers = {client for _, client, _ in limit_calls}
    assert 1 < len(workers) <= 3 and id(col.client) not in workers
    assert workers <= set(closed), "each worker's client is closed when the cycle ends"
    docs = [d for d in read_ndjson(out) if d["event"]["kind"] == "metric"]
    order = [p.id for p in projects]
    seen = [d["openai"]["rate_limits"]["project_id"] for d in docs]
    assert sorted(set(seen), key=order.index) == list(dict.fromkeys(seen)), "documents in the projects' order"


def test_the_workers_429s_count_in_the_stream_s_throttled_figure(simulator, tmp_path):
    """`collect --once`'s summary row reads the stream's client's counts (429s, Retry-After
    seconds); the projects' limits are read on the workers' own clients, whose 429s were lost
    with them: a cycle throttled three times said `throttled 0`."""
    from agent_input.simulator import FaultRule

    simulator.add_fault(FaultRule(kind="429", path="*/rate_limits", count=3, retry_after=1))
    col, closing = _collector(simulator, tmp_path / "state", tmp_path / "limits.ndjson")
    stats = col.poll(T0)
    for c in closing:
        c.close()
    assert not stats.errors and simulator.stats()["faults"] == {"429": 3}
    assert col.client.stats.throttled == 3
    assert col.client.stats.retry_after_seconds_total == 3.0


def test_projects_refused_for_different_scopes_are_a_line_each_and_do_not_stop_the_stream(simulator, tmp_path,
                                                                                         caplog):
    """Only one missing scope refusing every project is the key's refusal: projects refused for
    two different scopes are two lines, each naming its scope, and the stream goes on (a failed
    cycle), not stopped naming one scope as if it were the only one missing."""
    import logging

    from agent_input.simulator import FaultRule

    projects = [p for p in simulator.org.projects if p.archived_at is None]
    assert len(projects) >= 3
    simulator.add_fault(FaultRule(kind="403", path=f"projects/{projects[0].id}/rate_limits", count=None,
                                  message=SCOPE_403.replace("api.management.read", "api.projects.read")))
    simulator.add_fault(FaultRule(kind="403", path="*/rate_limits", count=None, message=SCOPE_403))
    out = tmp_path / "limits.ndjson"
    col, closing = _collector(simulator, tmp_path / "state", out)
    with caplog.at_level(logging.WARNING, logger="agent_input.rate_limits"):
        stats = col.poll(T0)  # no raise: the stream is not stopped
    for c in closing:
        c.close()
    lines = sorted(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert len(lines) == 2, lines
    assert any("api.projects.read" in ln and projects[0].id in ln and "api.management.read" not in ln for ln in lines)
    assert any(f"skipped {len(projects) - 1} projects" in ln and "api.management.read" in ln for ln in lines)
    assert any("the rate limits of all" in e for e in stats.errors)


def test_alike_failures_are_the_same_kind_status_and_scope_and_only_one_scope_stops():
    """The grouping of failures into one line (and the stop): the same missing scope is alike
    whatever the code; other failures are alike only with the same status and code; a 403 that
    names no scope (a project's own restriction) or a mix of kinds is no reason to stop."""
    from agent_input.http_client import NotFoundError
    from agent_input.rate_limits import _alike, _refused_for_a_scope

    def scope(s, code=None):
        return PermissionDeniedError(403, f"Missing scopes: {s}.", code, "/p")

    assert _alike(scope("api.management.read", "a")) == _alike(scope("api.management.read", "b"))
    assert _alike(scope("api.management.read")) != _alike(scope("api.projects.read"))
    assert _alike(PermissionDeniedError(403, "not allowed")) != _alike(scope("api.management.read"))
    assert _alike(NotFoundError(404, "gone", "project_not_found")) != _alike(NotFoundError(404, "gone", "other"))

    def grouped(*errors):
        refusals: dict = {}
        for n, exc in enumerate(errors):
            refusals.setdefault(_alike(exc), []).append((f"proj_{n}", exc))
        return _refused_for_a_scope(refusals)

    stop = grouped(scope("api.management.read"), scope("api.management.read"))
    assert stop is not None and stop.missing_scope == "api.management.read" and "(2 project(s))" in stop.message
    assert grouped(PermissionDeniedError(403, "not allowed"), PermissionDeniedError(403, "not allowed")) is None
    assert grouped(scope("api.management.read"), NotFoundError(404, "gone")) is None
    assert grouped(scope("api.management.read"), scope("api.projects.read")) is None


def test_a_line_for_projects_failed_alike_names_their_count_and_first_ids():
    from agent_input.http_client import NotFoundError
    from agent_input.rate_limits import SKIPPED_IDS_SHOWN, _skipped

    exc = PermissionDeniedError(403, "Missing scopes: api.management.read.", None, "/p")
    assert _skipped([("proj_a", exc)]) == f"rate_limits: skipped project proj_a: {exc}"
    two = _skipped([("proj_a", exc), ("proj_b", exc)])
    assert two.startswith("rate_limits: skipped 2 projects (proj_a, proj_b): the key lacks the api.management.read")
    ids = [f"proj_{n}" for n in range(SKIPPED_IDS_SHOWN + 1)]
    shown = _skipped([(p, exc) for p in ids[:SKIPPED_IDS_SHOWN]])
    assert f"({', '.join(ids[:SKIPPED_IDS_SHOWN])})" in shown and "..." not in shown
    more = _skipped([(p, exc) for p in ids])
    assert f"({', '.join(ids[:SKIPPED_IDS_SHOWN])}, ...)" in more and ids[-1] not in more
    gone = NotFoundError(404, "not found", None, "/p")
    assert _skipped([("proj_a", gone), ("proj_b", gone)]) == f"rate_limits: skipped 2 projects (proj_a, proj_b): first: {gone}"


class _BadListing:
    """Projects and limits as given, one page each (issue 6: bad API data)."""

    def __init__(self, projects: list, limits: dict[str, list]):
        self.projects, self.limits = projects, limits

    def get_json(self, path, params):
        data = self.projects if path.endswith("/projects") else self.limits[path.split("/")[-2]]
        return {"object": "list", "data": data, "has_more": False}


def _refused_row_cycle(tmp_path, row, caplog):
    """A cycle of two projects: proj_a's one limit `row`, refused, proj_b's one good limit. Only
    proj_b's is stored, the cycle is a success of one project read, and proj_a has a failure
    document (the per-project rule's). The cycle's stats and that document."""
    projects = [{"id": "proj_a", "name": "A"}, {"id": "proj_b", "name": "B"}]
    stats, docs = _bad_data_cycle(tmp_path, projects, {"proj_a": [row], "proj_b": [_row("rl-1", "m1")]}, caplog)
    assert [d["openai"]["rate_limits"]["id"] for d in docs if "model" in d["openai"]["rate_limits"]] == ["rl-1"]
    (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    assert status["event"]["outcome"] == "success"
    assert status["openai"]["rate_limits"]["collection"] == {"projects": 1, "limits": 1, "failed_projects": 1,
                                                             "bad_limits": 1}
    (failure,) = [d for d in docs if d["event"].get("action") == "rate-limits-project-failure"]
    assert failure["openai"]["rate_limits"]["project_id"] == "proj_a"
    return stats, failure


def _bad_data_cycle(tmp_path, projects, limits, caplog):
    cfg = config_from_dict({"url": "http://127.0.0.1:1", "api_key": ADMIN_KEY,
                            "data_streams": {"rate_limits": {}}}, env={})
    store = StateStore(tmp_path / "state")
    out = tmp_path / "rl.ndjson"
    output = NdjsonFileOutput(out)
    col = RateLimitsCollector(cfg, cfg.stream("rate_limits"), _BadListing(projects, limits),
                              Delivery(store, output), clock=lambda: T0)
    try:
        with caplog.at_level("WARNING", logger="agent_input.rate_limits"):
            stats = col.poll(T0)
    finally:
        output.close()
        store.close()
    return stats, read_ndjson(out)


def _row(rid, model, **limits):
    return {"object": "project.rate_limit", "id": rid, "model": model, "max_requests_per_1_minute": 5,
            "max_tokens_per_1_minute": 100, **limits}


def test_bad_limits_and_a_project_without_id_are_reported_and_the_good_rows_stored(tmp_path, caplog):
    """A project without `id`, a limit without `id`, and a limit of "lots" (a string where the
    reference and the `long` mapping want an integer) were dropped or stored without a word: no
    error, no log line, and a clean cycle (`failed_projects: 0`)."""
    projects = [{"id": "proj_a", "name": "A", "status": "active"}, {"name": "no id", "status": "active"}]
    rows = [_row("rl-1", "m1"), {k: v for k, v in _row("x", "m2").items() if k != "id"},
            _row("rl-3", "m3", max_requests_per_1_minute="lots"), _row("rl-4", "m4")]
    stats, docs = _bad_data_cycle(tmp_path, projects, {"proj_a": rows}, caplog)
    stored = [d["openai"]["rate_limits"] for d in docs if "model" in d["openai"]["rate_limits"]]
    assert [r["id"] for r in stored] == ["rl-1", "rl-4"]  # the good rows of the page
    assert all(type(r["max_requests_per_1_minute"]) is int for r in stored)
    text = "\n".join(stats.errors)
    assert "a project of the listing has no string `id`" in text and "'no id'" in text, text
    assert "project proj_a: limit #2 does not match the API reference, not stored: it lacks required `id`" in text
    assert ("project proj_a: limit 'rl-3' does not match the API reference, not stored: "
            "`max_requests_per_1_minute` is a string ('lots'), not an integer") in text
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(logged) == 3 and all(m in stats.errors for m in logged), logged
    (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    assert status["event"]["outcome"] == "success"  # proj_a's other limits are fresh
    assert status["openai"]["rate_limits"]["collection"] == {"projects": 1, "limits": 2, "failed_projects": 1,
                                                             "bad_limits": 2}
    assert all(undeclared_fields(d) == [] for d in docs)


@pytest.mark.parametrize("field,value,why", [
    ("max_tokens_per_1_minute", "150000", "`max_tokens_per_1_minute` is a string ('150000'), not an integer"),
    ("max_images_per_1_minute", 2.5, "`max_images_per_1_minute` is a number (2.5), not an integer"),
    ("max_requests_per_1_day", True, "`max_requests_per_1_day` is a boolean (True), not an integer"),
    ("batch_1_day_max_input_tokens", {"v": 1}, "`batch_1_day_max_input_tokens` is an object ({'v': 1}), not an integer"),
    ("max_tokens_per_1_minute", False, "`max_tokens_per_1_minute` is a boolean (False), not an integer"),
    ("object", 5, "`object` is an integer (5), not a string"),
    ("model", 7, "`model` is an integer (7), not a string"),
    ("model", None, "it lacks required `model`"),
    ("id", ["a"], "`id` is an array (['a']), not a string"),
])
def test_each_kind_of_bad_limit_is_named_with_its_field_and_type(tmp_path, caplog, field, value, why):
    """ProjectRateLimit: `id` and `model` strings, every limit an integer. A project none of whose
    limits could be stored is a failed project with a failure document (the per-project rule)."""
    row = _row("rl-x", "mx")
    row[field] = value
    stats, failure = _refused_row_cycle(tmp_path, row, caplog)
    assert any(e.startswith("rate_limits: project proj_a: ") and why in e for e in stats.errors), stats.errors
    assert "none of its 1 limit(s) matches the API reference" in failure["error"]["message"]
    assert why in failure["error"]["message"]


@pytest.mark.parametrize("field,value,why", [
    ("max_tokens_per_1_minute", 2**60, "is an integer (1152921504606846976), not within ±2^53"),
    ("max_tokens_per_1_minute", 2**53, "is an integer (9007199254740992), not within ±2^53"),
    ("max_requests_per_1_day", -2**53, "is an integer (-9007199254740992), not within ±2^53"),
    ("max_tokens_per_1_day", 2.0**60, "is a number (1.152921504606847e+18), not within ±2^53"),
])
def test_a_limit_past_the_bound_leaves_out_only_that_field(tmp_path, caplog, field, value, why):
    """A value at or past ±2^53 (Kibana would show it rounded) dropped the whole limit: its
    per-minute limits too, which the headroom panels and rules then lacked, and a project of that
    one limit became a failed project. Now only the field at fault is left out, said with the
    project, the model and the field, and counted in `bad_limits`."""
    row = _row("rl-x", "mx", **{field: value})
    projects = [{"id": "proj_a", "name": "A"}, {"id": "proj_b", "name": "B"}]
    stats, docs = _bad_data_cycle(tmp_path, projects, {"proj_a": [row], "proj_b": [_row("rl-1", "m1")]}, caplog)
    stored = {d["openai"]["rate_limits"]["id"]: d["openai"]["rate_limits"] for d in docs
              if "model" in d["openai"]["rate_limits"]}
    assert set(stored) == {"rl-x", "rl-1"}
    assert field not in stored["rl-x"]
    assert stored["rl-x"]["max_requests_per_1_minute"] == 5 and stored["rl-x"]["model"] == "mx"
    if field != "max_tokens_per_1_minute":
        assert stored["rl-x"]["max_tokens_per_1_minute"] == 100
    (line,) = stats.errors
    assert line.startswith("rate_limits: project proj_a: limit 'rl-x' of model 'mx': ") and why in line, line
    assert f"`{field}`" in line and "stored without it" in line, line
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [line]
    (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    assert status["event"]["outcome"] == "success"
    assert status["openai"]["rate_limits"]["collection"] == {"projects": 2, "limits": 2, "failed_projects": 0,
                                                             "bad_limits": 1}
    assert not [d for d in docs if d["event"].get("action") == "rate-limits-project-failure"]
    assert all(undeclared_fields(d) == [] for d in docs)


def test_a_limit_past_the_bound_beside_a_wrong_field_is_not_stored(tmp_path, caplog):
    """A limit that is wrong otherwise too (a string limit) is still left out whole, said once."""
    row = _row("rl-x", "mx", max_tokens_per_1_day=2**60, max_requests_per_1_minute="lots")
    stats, docs = _bad_data_cycle(tmp_path, [{"id": "proj_a"}], {"proj_a": [row, _row("rl-1", "m1")]}, caplog)
    assert [d["openai"]["rate_limits"]["id"] for d in docs if "model" in d["openai"]["rate_limits"]] == ["rl-1"]
    (line,) = stats.errors
    assert "limit 'rl-x' does not match the API reference, not stored: `max_requests_per_1_minute` is a string" in line



def test_a_limit_with_every_limit_past_the_bound_is_not_stored_and_its_project_fails(tmp_path, caplog):
    """A limit each of whose limits is past ±2^53 was stored with none left (`id` and `model`
    alone): no headroom panel or rule reads such a document, yet it counted as a stored limit, so a
    project of that one limit was a read one, with no failure document for the per-project rule.
    It is not stored, as a bad limit, and such a project is a failed one again."""
    row = _row("rl-x", "mx", max_requests_per_1_minute=2**60, max_tokens_per_1_minute=2**53)
    stats, failure = _refused_row_cycle(tmp_path, row, caplog)
    (line,) = stats.errors
    assert line.startswith("rate_limits: project proj_a: limit 'rl-x' does not match the API reference, not "
                           "stored: `max_requests_per_1_minute` is an integer (1152921504606846976), not within "
                           "±2^53"), line
    assert "`max_tokens_per_1_minute` is an integer (9007199254740992)" in line and "stored without" not in line
    assert "\n" not in line


@pytest.mark.parametrize("row", [
    {"object": "project.rate_limit", "id": "rl-x", "model": "mx"},
    {"id": "rl-x", "model": "mx", "max_requests_per_1_minute": None, "max_tokens_per_1_minute": None},
])
def test_a_limit_that_has_no_limit_at_all_is_not_stored_and_its_project_fails(tmp_path, caplog, row):
    """A limit without any limit (the reference requires two) was stored as `id` and `model` alone,
    which no headroom panel or rule reads, and counted as a stored limit: a project of such limits
    was a read one, with no failure document for the per-project rule, as 1202b6d found of a limit
    left with none once those past ±2^53 were left out. It is a bad limit, and its project fails."""
    stats, failure = _refused_row_cycle(tmp_path, row, caplog)
    (line,) = stats.errors
    assert line == ("rate_limits: project proj_a: limit 'rl-x' does not match the API reference, not stored: "
                    "it has no limit (the reference requires `max_requests_per_1_minute` and "
                    "`max_tokens_per_1_minute`)"), line


def test_limits_the_reference_allows_are_stored_as_before(tmp_path, caplog):
    """Optional limits absent or null, an integral float (JSON 600.0), and no `object` are fine."""
    rows = [{"id": "rl-1", "model": "m1", "max_requests_per_1_minute": 600.0},
            _row("rl-2", "m2", max_images_per_1_minute=None, max_tokens_per_1_day=9_000_000),
            _row("rl-3", "m3", max_tokens_per_1_minute=2**53 - 1, max_requests_per_1_day=-(2**53 - 1))]
    stats, docs = _bad_data_cycle(tmp_path, [{"id": "proj_a"}], {"proj_a": rows}, caplog)
    assert stats.errors == [] and not caplog.records
    assert sum("model" in d["openai"]["rate_limits"] for d in docs) == 3


def test_a_project_refused_for_a_scope_beside_projects_of_bad_limits_does_not_stop_the_stream(tmp_path, caplog,
                                                                                           monkeypatch):
    """Projects whose listing was answered, with limits none of which could be stored (or without
    an id in the projects listing), count as failed, but they were not refused: one project refused
    for a missing scope beside them stopped the stream, saying the key lacks the scope and that
    'every project's rate limits were refused (1 project(s))'."""
    real = _BadListing.get_json

    def get_json(self, path, params):
        if "/proj_a/" in path:
            raise PermissionDeniedError(403, "Missing scopes: api.management.read.", None, path)
        return real(self, path, params)

    monkeypatch.setattr(_BadListing, "get_json", get_json)
    projects = [{"id": "proj_a"}, {"id": "proj_b"}, {"name": "no id"}]
    limits = {"proj_b": [_row("rl-1", "m1", max_tokens_per_1_minute="lots")]}
    stats, docs = _bad_data_cycle(tmp_path, projects, limits, caplog)  # no PermissionDeniedError raised
    (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    assert status["event"]["outcome"] == "failure"
    assert "the rate limits of all 3 project(s) failed" in status["error"]["message"]
    assert "every project" not in status["error"]["message"]
    assert any("skipped project proj_a" in e for e in stats.errors), stats.errors


def test_the_largest_limits_within_the_bound_are_stored(tmp_path, caplog):
    """±(2^53 - 1) is the last integer Kibana shows as sent: stored, not reported."""
    rows = [_row("rl-1", "m1", max_tokens_per_1_day=2**53 - 1), _row("rl-2", "m2", max_tokens_per_1_day=-(2**53 - 1))]
    stats, docs = _bad_data_cycle(tmp_path, [{"id": "proj_a"}], {"proj_a": rows}, caplog)
    assert stats.errors == []
    assert sorted(d["openai"]["rate_limits"]["max_tokens_per_1_day"] for d in docs
                  if "model" in d["openai"]["rate_limits"]) == [-(2**53 - 1), 2**53 - 1]


def test_exactly_as_many_bad_limits_as_are_shown_make_no_and_more_line(tmp_path, caplog):
    rows = [_row(f"rl-{j}", f"m{j}", max_tokens_per_1_minute="many") for j in range(5)] + [_row("rl-ok", "m9")]
    stats, _ = _bad_data_cycle(tmp_path, [{"id": "proj_a"}], {"proj_a": rows}, caplog)
    assert len(stats.errors) == 5 and not any("more bad limit" in e for e in stats.errors), stats.errors


def test_a_cycle_with_every_limit_bad_fails_and_reports_a_bounded_number_of_lines(tmp_path, caplog):
    """An API that changed a limit's type: every project fails (the stale rule's failure), and the
    cycle says so in a few lines, not one per limit."""
    projects = [{"id": f"proj_{i}"} for i in range(4)]
    limits = {p["id"]: [_row(f"rl-{j}", f"m{j}", max_tokens_per_1_minute="many") for j in range(5)]
              for p in projects}
    stats, docs = _bad_data_cycle(tmp_path, projects, limits, caplog)
    (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    assert status["event"]["outcome"] == "failure"
    assert "the rate limits of all 4 project(s) failed" in status["error"]["message"]
    assert status["openai"]["rate_limits"]["collection"] == {"projects": 0, "limits": 0, "failed_projects": 4,
                                                             "bad_limits": 20}
    assert len(stats.errors) == 7  # 5 limits, "and 15 more", the failed cycle
    assert "and 15 more bad limit(s) or project(s)" in stats.errors[5]
    assert not any("model" in d["openai"]["rate_limits"] for d in docs)


def test_an_entry_of_the_projects_listing_that_is_not_an_object_is_reported(tmp_path, caplog):
    stats, docs = _bad_data_cycle(tmp_path, ["proj_z", {"id": "proj_a"}], {"proj_a": [_row("rl-1", "m1")]}, caplog)
    assert any("a project of the listing has no string `id` ('proj_z')" in e for e in stats.errors), stats.errors
    (status,) = [d for d in docs if d["event"].get("action") == "rate-limits-collection"]
    assert status["openai"]["rate_limits"]["collection"]["failed_projects"] == 1


def test_workers_whose_client_cannot_be_made_read_the_limits_on_the_stream_s_client(simulator, tmp_path):
    """A worker whose own client `client_factory` could not make (a DaemonPool initializer that
    raised) reads its projects' limits on the stream's client: every project is still read, not
    an AttributeError for each project (found by mutating the fallback: no test failed)."""
    out = tmp_path / "limits.ndjson"
    col, closing = _collector(simulator, tmp_path / "state", out, include_archived=True)

    def factory():
        raise OSError("no client for you")

    col.client_factory = factory
    stats = col.poll(T0)
    for c in closing:
        c.close()
    assert not stats.errors, stats.errors
    (status,) = [d for d in read_ndjson(out) if d["event"].get("action") == "rate-limits-collection"]
    assert status["openai"]["rate_limits"]["collection"]["projects"] == len(simulator.org.projects)
