"""Opt-in real-cluster tests. Skipped unless ES_URL (and, for the installer round trip,
KIBANA_URL) is set; credentials come from ELASTIC_API_KEY or ELASTIC_USERNAME/ELASTIC_PASSWORD,
and ES_CA_CERT / ES_INSECURE=1 control TLS.

- The headroom ES|QL runs on scratch indices holding the hand-computed documents of
  test_headroom.py and must give the reference implementation's numbers.
- Every other query of the bundle runs once, so a verification error (a field type the cluster
  disagrees with, a function 8.18 lacks) shows up here.
- With KIBANA_URL too: install, re-install (all unchanged), uninstall.
"""
from __future__ import annotations

import json
import os
import uuid

import pytest
import requests

from agent_input.config import Secret
from agent_input.http_client import AuthorizationHeader
from kibana_assets import fields as F
from kibana_assets import headroom as H
from kibana_assets import queries as Q
from kibana_assets.installer import Installer, Options, Target, resolve_credentials

ES_URL = os.environ.get("ES_URL")
KIBANA_URL = os.environ.get("KIBANA_URL")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not ES_URL, reason="set ES_URL (and KIBANA_URL) to run the real-cluster tests"),
]


def _session() -> requests.Session:
    s = requests.Session()
    creds = resolve_credentials()
    s.auth = AuthorizationHeader(Secret(creds.header) if creds.header else None)  # not ~/.netrc's
    s.verify = False if os.environ.get("ES_INSECURE") == "1" else (os.environ.get("ES_CA_CERT") or True)
    return s


@pytest.fixture(scope="module")
def scratch():
    """Scratch indices `<prefix><dataset>` with the bundle's mappings and the test documents."""
    from test_headroom import DOCS

    s = _session()
    prefix = f"openai-elastic-test-{uuid.uuid4().hex[:8]}-"
    needed = sorted({F.dataset_of(d) for d in DOCS} | set(Q.HEADROOM_USAGE_DATASETS) | {"rate_limits"})
    try:
        for ds in needed:
            r = s.put(f"{ES_URL}/{prefix}{ds}", json={"mappings": F.mappings(ds)}, timeout=30)
            assert r.status_code == 200, r.text
        lines = []
        for doc in DOCS:
            lines.append(json.dumps({"index": {"_index": prefix + F.dataset_of(doc)}}))
            lines.append(json.dumps(doc))
        r = s.post(f"{ES_URL}/_bulk?refresh=true", data="\n".join(lines) + "\n",
                   headers={"Content-Type": "application/x-ndjson"}, timeout=60)
        assert r.status_code == 200 and not r.json()["errors"], r.text[:2000]
        yield s, Q.Sources(prefix=prefix)
    finally:
        s.delete(f"{ES_URL}/{prefix}*", timeout=30)


def _esql(s, query, params=None):
    body = {"query": query}
    if params:
        body["params"] = params
    r = s.post(f"{ES_URL}/_query", json=body, timeout=60)
    assert r.status_code == 200, f"{r.status_code}: {r.text[:1000]}\n{query}"
    data = r.json()
    names = [c["name"] for c in data["columns"]]
    return [dict(zip(names, row)) for row in data["values"]]


def _same(esql_rows, ref_rows, keys):
    def norm(rows):
        return sorted(({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows),
                      key=lambda r: tuple(str(r[k]) for k in keys))
    assert norm(esql_rows) == norm(ref_rows)


def test_per_project_esql_matches_the_reference(scratch):
    from test_headroom import DOCS

    s, sources = scratch
    rows = _esql(s, Q.headroom_per_project(sources))
    _same(rows, H.per_project(DOCS), ["project_id", "model"])


def test_org_wide_esql_matches_the_reference(scratch):
    from test_headroom import DOCS

    s, sources = scratch
    rows = _esql(s, Q.headroom_org_wide(sources))
    _same(rows, H.org_wide(DOCS), ["model"])


@pytest.mark.parametrize("unit", ["tpm", "rpm"])
def test_rule_rows_match_the_reference_alerts(scratch, unit):
    from test_headroom import DOCS

    s, sources = scratch
    # the rule keeps usage to the last N minutes before NOW(); the fixed documents need a wide one
    rows = _esql(s, Q.headroom_rule(unit, 0.08, sources, usage_minutes=10_000_000))
    assert sorted(r["project_model"] for r in rows) == H.alerts(DOCS, unit, 0.08)


def test_project_failing_rule_rows_match_the_reference():
    """Documents relative to now (the rule compares with NOW()): p failing for 70 minutes after
    its last read, q read throughout, r failed once and went away."""
    import time

    from test_headroom import iso, limit, project_failure

    s = _session()
    prefix = f"openai-elastic-test-{uuid.uuid4().hex[:8]}-"
    now = int(time.time()) // 60 * 60
    docs = [limit(iso(now - 75 * 60), "p", "gpt-4o", tpm=1000), limit(iso(now - 65 * 60), "r", "gpt-4o", tpm=1),
            project_failure(iso(now - 60 * 60), "r")]
    for m in range(0, 75, 5):
        docs += [project_failure(iso(now - m * 60), "p"), limit(iso(now - m * 60), "q", "gpt-4o", tpm=1000)]
    try:
        r = s.put(f"{ES_URL}/{prefix}rate_limits", json={"mappings": F.mappings("rate_limits")}, timeout=30)
        assert r.status_code == 200, r.text
        lines = [line for doc in docs for line in (json.dumps({"index": {"_index": prefix + "rate_limits"}}),
                                                   json.dumps(doc))]
        r = s.post(f"{ES_URL}/_bulk?refresh=true", data="\n".join(lines) + "\n",
                   headers={"Content-Type": "application/x-ndjson"}, timeout=60)
        assert r.status_code == 200 and not r.json()["errors"], r.text[:2000]
        rows = _esql(s, Q.project_limits_failing_rule(Q.Sources(prefix=prefix), stale_after_minutes=60))
        reference = H.projects_failing(docs, now=time.time(), stale_after_minutes=60)
        assert [row["project_id"] for row in rows] == [row["project_id"] for row in reference] == ["p"]
        assert rows[0]["failures"] == reference[0]["failures"] == 15
    finally:
        s.delete(f"{ES_URL}/{prefix}*", timeout=30)


def test_every_bundle_query_is_accepted_by_the_cluster():
    """Against the real data streams' names: a missing index is fine, a verification error is not."""
    s = _session()
    params = [{"_tstart": "2026-01-01T00:00:00Z"}, {"_tend": "2026-12-31T00:00:00Z"}]
    for name, query in Q.all_queries().items():
        body = {"query": query}
        if "?_tstart" in query:
            body["params"] = params
        r = s.post(f"{ES_URL}/_query", json=body, timeout=60)
        if r.status_code == 400 and "Unknown index" in r.text:
            continue
        assert r.status_code == 200 or "verification_exception" not in r.text, f"{name}: {r.text[:500]}"


@pytest.mark.skipif(not KIBANA_URL, reason="set KIBANA_URL as well to run the installer round trip")
def test_install_reinstall_uninstall_round_trip():
    verify = False if os.environ.get("ES_INSECURE") == "1" else (os.environ.get("ES_CA_CERT") or True)
    target = Target(ES_URL, KIBANA_URL, resolve_credentials(), space=os.environ.get("KIBANA_SPACE"), verify=verify)
    first = Installer(target, Options()).install()
    assert first.error is None, first.summary("install")
    second = Installer(target, Options()).install()
    assert second.error is None and set(second.counts()) == {"unchanged"}, second.summary("install")
    gone = Installer(target, Options()).uninstall()
    assert gone.error is None, gone.summary("uninstall")
