"""Property-based tests (hypothesis) of what the collector makes of any answer the API reference
allows, and of answers one field off it.

The results, audit events and rate limits are drawn from the reference's own schemas
(`shared/reference/openai-admin-openapi.yaml`, `$ref`s resolved; hypothesis-jsonschema does not run
on the hypothesis these tests use, so the strategies are built here), with the edge values the
schemas allow: empty and non-ASCII strings, 0, negative and 64-bit integers, optional fields absent
or null. Each usage page goes through the HTTP client (`responses`) and the engine. The contract:
every bucket is either stored, its counters summing to the API's, or reported (a bad bucket,
counted, the cursor kept before it); every document stored is one the index templates accept (a
value of each field's mapped type); an event or limit is stored or reported, never a traceback.
The same holds with one field of a result set to a value of another type, or left out.
"""
from __future__ import annotations

import io
import ipaddress
import json
import math
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import pytest
import responses
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_input.audit import BadAuditPage, audit_event
from agent_input.config import Secret
from agent_input.ecs import iso_timestamp
from agent_input.engine import Delivery, UsageCollector
from agent_input.http_client import AdminApiClient
from agent_input.outputs import NdjsonOutput
from agent_input.rate_limits import check_limit, limit_event, trim_limit
from agent_input.state import StateStore
from agent_input.streams import STREAMS_BY_NAME, get_field
from kibana_assets import fields as F

SPEC_PATH = Path(__file__).resolve().parents[3] / "shared" / "reference" / "openai-admin-openapi.yaml"
BASE = "https://api.openai.com"
NOW = 1763892000  # 2025-11-23T10:00:00Z
RESULT_SCHEMAS = {
    "completions": "UsageCompletionsResult", "embeddings": "UsageEmbeddingsResult",
    "moderations": "UsageModerationsResult", "images": "UsageImagesResult",
    "audio_speeches": "UsageAudioSpeechesResult", "audio_transcriptions": "UsageAudioTranscriptionsResult",
    "vector_stores": "UsageVectorStoresResult", "code_interpreter_sessions": "UsageCodeInterpreterSessionsResult",
    "file_search_calls": "UsageFileSearchCallsResult", "web_search_calls": "UsageWebSearchCallsResult",
    "costs": "CostsResult",
}
EXAMPLES = int(os.environ.get("SPEC_EXAMPLES", 12))  # per stream: the whole file stays within a few seconds


# -- the reference's schemas as strategies -------------------------------------------------------
@lru_cache(maxsize=None)
def _spec() -> dict:
    return yaml.safe_load(SPEC_PATH.read_text())


def schema(name: str) -> dict:
    """A component schema with its `$ref`s resolved (the reference's schemas are not recursive)."""
    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(_spec()["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items() if k not in ("discriminator", "example")}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node
    return resolve({"$ref": f"#/components/schemas/{name}"})


TEXT = st.one_of(st.sampled_from(["", " ", "proj_abc", "ünïcødé-名前-🚀", "a" * 1500, "0", "null", "true",
                                  "127.0.0.1"]), st.text(max_size=12))
INTEGER = st.one_of(st.sampled_from([0, 1, -1, 2**31, 2**53 - 1, 2**53, 2**63 - 1, -2**63, 2**64 - 1]),
                    st.integers(-1000, 10**7))
NUMBER = st.one_of(INTEGER, st.sampled_from([0.0, -0.0, 0.1, 1e-9, 0.30000000000000004, 1e308, -1e308]),
                   st.floats(allow_nan=False, allow_infinity=False))


def from_schema(s: dict) -> st.SearchStrategy:
    """Values valid under the (resolved) JSON Schema `s`: the subset the reference's schemas use."""
    if "enum" in s:
        return st.sampled_from(s["enum"])
    if "anyOf" in s or "oneOf" in s:
        return st.one_of([from_schema(x) for x in s.get("anyOf", s.get("oneOf"))])
    kind = s.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        if "minimum" in s or "maximum" in s:
            return st.integers(s.get("minimum"), s.get("maximum"))
        return INTEGER
    if kind == "number":
        return NUMBER
    if kind == "string":
        return TEXT
    if kind == "array":
        return st.lists(from_schema(s.get("items", {})), max_size=3)
    if kind == "object" or "properties" in s:
        props, required = s.get("properties", {}), set(s.get("required", ()))
        return st.fixed_dictionaries({k: from_schema(v) for k, v in props.items() if k in required},
                                     optional={k: from_schema(v) for k, v in props.items() if k not in required})
    return st.recursive(st.none() | st.booleans() | INTEGER | TEXT,
                        lambda inner: st.lists(inner, max_size=2) | st.dictionaries(TEXT, inner, max_size=2),
                        max_leaves=4)


OFF_TYPE = st.sampled_from([None, "", "lots", "12", True, 1.5, -0.5, [], [1], {}, {"a": 1}, 2**64])


@st.composite
def one_field_off(draw, valid: st.SearchStrategy, fields: tuple[str, ...]) -> dict:
    """A valid object with one field (or a field of a nested object) set to another type, or left out."""
    value = json.loads(json.dumps(draw(valid)))
    path = draw(st.sampled_from(sorted(set(fields) | set(value)))).split(".")
    node = value
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if draw(st.integers(0, 3)) == 0:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = draw(OFF_TYPE)
    return value


# -- what the index templates accept -------------------------------------------------------------
def refused(doc: dict, dataset: str) -> list[str]:
    """The leaves of `doc` that its dataset's mappings would refuse (or silently alter)."""
    types = F.field_types(dataset)
    loose = [n for n, t in types.items() if t in ("flattened", "geo_point")]
    out = []
    for path, value in F.flatten({k: v for k, v in doc.items() if k != "_id"}).items():
        kind = types.get(path)
        if kind is None:
            leaf = next((n for n in types if path.startswith(n + ".")), None)
            if leaf is not None and leaf not in loose:
                out.append(f"{path}: an object where {leaf} is a {types[leaf]}")
            elif leaf is None and not any(path.startswith(n + ".") for n in loose):
                out.append(f"{path}: not mapped")
            continue
        for v in value if isinstance(value, list) else [value]:
            if v is None or _fits(kind, v):
                continue
            out.append(f"{path}: {v!r:.40} in a {kind}")
    return out


def _fits(kind: str, v) -> bool:
    if kind == "long":
        return type(v) is int and -2**63 <= v < 2**63 or type(v) is float and v.is_integer()
    if kind == "double":
        return type(v) in (int, float) and math.isfinite(v)
    if kind in ("keyword", "constant_keyword", "match_only_text"):
        return not isinstance(v, (dict, list))
    if kind == "boolean":
        return isinstance(v, bool)
    if kind == "date":
        return isinstance(v, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", v) is not None
    if kind == "ip":
        try:
            ipaddress.ip_address(v)
        except ValueError:
            return False
        return True
    return kind in ("flattened", "geo_point")


# -- one usage poll through the HTTP client ------------------------------------------------------
def poll(stream: str, buckets: list[list], split: bool) -> None:
    """Serve `buckets` (the results of consecutive buckets ending now) as the API would, a bucket
    split across two pages when `split`; poll once and check the contract."""
    spec = STREAMS_BY_NAME[stream]
    width, seconds = ("1d", 86400) if stream == "costs" else ("1m", 60)
    end = NOW // seconds * seconds
    starts = [end - (len(buckets) - i) * seconds for i in range(len(buckets))]
    pages: list[list] = [[]]
    for start, results in zip(starts, buckets):
        if split and len(results) > 1:  # its first half ends a page, its second starts the next
            pages[-1].append((start, results[:1]))
            pages.append([(start, results[1:])])
        else:
            pages[-1].append((start, results))
    bodies = [{"object": "page", "data": [{"object": "bucket", "start_time": s, "end_time": s + seconds, "results": r}
                                          for s, r in page],
               "has_more": i < len(pages) - 1, "next_page": f"page_{i + 1}" if i < len(pages) - 1 else None}
              for i, page in enumerate(pages)]

    def answer(request):
        page = parse_qs(urlparse(request.url).query).get("page", ["page_0"])[0]
        return 200, {"Content-Type": "application/json"}, json.dumps(bodies[int(page.split("_")[1])])

    with tempfile.TemporaryDirectory() as tmp, responses.RequestsMock() as api:
        api.add_callback("GET", BASE + spec.path, callback=answer)
        store, out = StateStore(Path(tmp) / "state"), io.BytesIO()
        client = AdminApiClient(BASE, Secret("sk-admin-" + "x" * 20), sleep=lambda s: None, max_retries=0)
        config = SimpleNamespace(name=stream, bucket_width=width, interval=300, initial_interval=len(buckets) * seconds,
                                 finalization_grace=0, effective_revision_window=0)
        try:
            stats = UsageCollector(spec, config, client, Delivery(store, NdjsonOutput(out)), clock=lambda: NOW).poll(NOW)
            position = store.cursor(stream, width).position
        finally:
            client.close()
            store.close()
    docs = [json.loads(line) for line in out.getvalue().splitlines()]
    for doc in docs:
        assert refused(doc, stream) == [], doc
    reported = {m.group(1) for e in stats.errors for m in [re.search(r"bucket (\S+Z) does not match", e)] if m}
    assert stats.bad_buckets == len(reported) and len(stats.errors) == len(reported), stats.errors
    for start, results in zip(starts, buckets):
        mine = [d for d in docs if d["openai"]["base"]["start_time"] == iso_timestamp(start)]
        if iso_timestamp(start) in reported:
            assert position <= start and not mine, "a reported bucket was stored, or the cursor passed it"
            continue
        for counter in spec.counters:
            sent = [v for r in results for v in [get_field(r, counter)] if v is not None]
            leaf = spec.renames.get(counter, counter)
            got = sum(v for d in mine for v in [get_field(d["openai"]["base"] if counter == "num_model_requests"
                                                          else d["openai"].get(stream, {}), leaf)] if v is not None)
            # floats summed per group, then across groups: off by rounding at the largest magnitude
            slack = 1e-6 + 1e-14 * sum(abs(v) for v in sent)
            assert math.isclose(got, sum(sent), rel_tol=1e-9, abs_tol=slack), (counter, got, sent)
    if not reported:
        assert position == end


def _buckets(results: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(st.lists(results, max_size=4), min_size=1, max_size=3)


@pytest.mark.parametrize("stream", sorted(RESULT_SCHEMAS))
def test_every_result_the_reference_allows_is_stored_or_reported(stream):
    results = from_schema(schema(RESULT_SCHEMAS[stream]))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(buckets=_buckets(results), split=st.booleans())
    def check(buckets, split):
        poll(stream, buckets, split)

    check()


@pytest.mark.parametrize("stream", sorted(RESULT_SCHEMAS))
def test_a_result_one_field_off_the_reference_is_stored_or_reported(stream):
    spec = STREAMS_BY_NAME[stream]
    valid = from_schema(schema(RESULT_SCHEMAS[stream]))
    results = one_field_off(valid, ("object",) + spec.counters + spec.dimensions)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(buckets=_buckets(results), split=st.booleans())
    def check(buckets, split):
        poll(stream, buckets, split)

    check()


AUDIT_FIELDS = ("id", "type", "effective_at", "project", "project.id", "project.name", "actor", "actor.type",
                "actor.session", "actor.session.user", "actor.session.user.id", "actor.session.user.email",
                "actor.session.ip_address", "actor.api_key", "actor.api_key.id", "actor.api_key.type",
                "actor.api_key.user.email", "actor.api_key.service_account.id")


def _audit_events() -> st.SearchStrategy:
    s = schema("AuditLog")
    s["properties"]["effective_at"] = {"type": "integer", "minimum": 0, "maximum": 253402300799}
    valid = from_schema(s)
    return st.one_of(valid, one_field_off(valid, AUDIT_FIELDS))


@settings(max_examples=4 * EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(event=_audit_events())
def test_an_audit_event_is_mapped_to_a_document_the_template_accepts_or_reported(event):
    try:
        doc_id, doc = audit_event(event, preserve_original=True)
    except BadAuditPage:
        return
    assert 0 < len(doc_id.encode()) <= 512, "Elasticsearch refuses this `_id` (and the bulk request with it)"
    # unknown fields pass (check_event) and are mapped dynamically: only a mapped field's type counts
    assert [p for p in refused(json.loads(json.dumps(doc)), "audit") if not p.endswith("not mapped")] == [], doc


LIMIT_FIELDS = ("object", "id", "model", "max_requests_per_1_minute", "max_tokens_per_1_minute",
                "max_images_per_1_minute", "max_requests_per_1_day", "batch_1_day_max_input_tokens")


@settings(max_examples=4 * EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(row=st.one_of(from_schema(schema("ProjectRateLimit")),
                     one_field_off(from_schema(schema("ProjectRateLimit")), LIMIT_FIELDS)),
       project=from_schema(schema("Project")))
def test_a_rate_limit_is_mapped_to_a_document_the_template_accepts_or_reported(row, project):
    if check_limit(row) is not None:
        return
    _, doc = limit_event(trim_limit(row)[0], project, collected=NOW)
    assert refused(json.loads(json.dumps(doc)), "rate_limits") == [], doc
