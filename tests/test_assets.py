"""The asset bundle, offline: fields vs the seed, mappings, templates, pipelines, Kibana objects."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kibana_assets import elasticsearch as E
from kibana_assets import fields as F
from kibana_assets import kibana as K
from kibana_assets import queries as Q
from kibana_assets.cli import main

DATA = Path(__file__).parent / "data"
SEED_TABLES = json.loads((DATA / "seed_fields.json").read_text())["tables"]
SEED_EXAMPLES = json.loads((DATA / "seed_examples.json").read_text())
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

USAGE = ["completions", "embeddings", "moderations", "images", "audio_speeches", "audio_transcriptions",
         "code_interpreter_sessions", "vector_stores", "file_search_calls", "web_search_calls"]


# ---------------------------------------------------------------------------------------------
# Fields: one source of truth


def test_every_dataset_has_a_fields_file():
    assert set(F.datasets()) == set(USAGE) | {"costs", "rate_limits", "audit"}


@pytest.mark.parametrize("dataset", sorted(SEED_TABLES))
def test_types_match_the_seed_table(dataset):
    ours = F.field_types(dataset)
    wrong = {n: (t, ours.get(n)) for n, t in SEED_TABLES[dataset].items() if ours.get(n) != t}
    assert wrong == {}


@pytest.mark.parametrize("dataset", sorted(SEED_EXAMPLES))
def test_seed_example_documents_have_no_undeclared_field(dataset):
    assert F.undeclared_fields(SEED_EXAMPLES[dataset]) == []


def test_seed_extraction_is_current():
    """tests/data holds the seed's tables frozen; when the seed is beside the repo, re-check."""
    seeds = sorted((SHARED / "seeds").glob("002_*.txt")) if SHARED.exists() else []
    if not seeds:
        pytest.skip("shared/seeds not beside the repository; using the frozen extraction")
    text = seeds[0].read_text()
    for ds, table in SEED_TABLES.items():
        for name, ftype in table.items():
            assert f"| {name} |" in text and ftype in text


def test_everything_the_collector_emits_is_declared():
    common = {"@timestamp": "date", "ecs.version": "keyword", "data_stream.type": "constant_keyword",
              "data_stream.dataset": "constant_keyword", "data_stream.namespace": "constant_keyword",
              "event.kind": "keyword", "event.dataset": "constant_keyword", "event.created": "date",
              "event.ingested": "date", "event.module": "constant_keyword", "tags": "keyword",
              "error.message": "match_only_text", "input.type": "keyword"}
    base = {f"openai.base.{n}": "keyword" for n in
            ("project_id", "user_id", "api_key_id", "model", "usage_object_type", "bucket_width",
             "project_name", "user_email", "api_key_name")}
    base.update({f"openai.base.{n}": "long" for n in ("num_model_requests", "usage_tokens", "usage_images", "revision")})
    base.update({"openai.base.start_time": "date", "openai.base.end_time": "date"})
    completions = ["input_tokens", "input_cached_tokens", "input_cache_write_tokens", "input_uncached_tokens",
                   "output_tokens", "input_text_tokens", "output_text_tokens", "input_cached_text_tokens",
                   "input_audio_tokens", "input_cached_audio_tokens", "output_audio_tokens",
                   "input_image_tokens", "input_cached_image_tokens", "output_image_tokens"]
    stream = {
        "completions": {**{f"openai.completions.{c}": "long" for c in completions},
                        "openai.completions.batch": "boolean", "openai.completions.service_tier": "keyword"},
        "embeddings": {"openai.embeddings.input_tokens": "long"},
        "moderations": {"openai.moderations.input_tokens": "long"},
        "images": {"openai.images.images": "long", "openai.images.size": "keyword", "openai.images.source": "keyword"},
        "audio_speeches": {"openai.audio_speeches.characters": "long"},
        "audio_transcriptions": {"openai.audio_transcriptions.seconds": "long"},
        "code_interpreter_sessions": {"openai.code_interpreter_sessions.sessions": "long"},
        "vector_stores": {"openai.vector_stores.usage_bytes": "long"},
        "file_search_calls": {"openai.file_search_calls.num_requests": "long",
                              "openai.file_search_calls.vector_store_id": "keyword"},
        "web_search_calls": {"openai.web_search_calls.num_requests": "long",
                             "openai.web_search_calls.context_level": "keyword"},
    }
    for ds in USAGE:
        want = {**common, **base, **stream[ds]}
        ours = F.field_types(ds)
        assert {n: ours.get(n) for n in want} == want, ds
    costs = F.field_types("costs")
    for n in ("start_time", "end_time", "project_id", "api_key_id", "usage_object_type", "bucket_width",
              "revision", "project_name", "api_key_name"):
        assert costs[f"openai.base.{n}"] == base[f"openai.base.{n}"]
    assert {k: costs[k] for k in ("openai.costs.amount.value", "openai.costs.amount.currency",
                                   "openai.costs.line_item", "openai.costs.quantity_unit",
                                   "openai.costs.quantity")} == {
        "openai.costs.amount.value": "double", "openai.costs.amount.currency": "keyword",
        "openai.costs.line_item": "keyword", "openai.costs.quantity_unit": "keyword",
        "openai.costs.quantity": "double"}
    rl = F.field_types("rate_limits")
    assert rl["openai.base.project_name"] == "keyword"
    assert rl["event.action"] == rl["event.outcome"] == "keyword"
    for n in ("projects", "limits", "failed_projects", "bad_limits"):
        assert rl[f"openai.rate_limits.collection.{n}"] == "long"
    audit = F.field_types("audit")
    assert audit["openai.audit.project.id"] == audit["openai.audit.project.name"] == "keyword"


def test_status_and_audit_payload_documents_are_declared():
    status_doc = {"@timestamp": "2026-05-26T06:40:21Z", "ecs": {"version": "8.17.0"},
                  "data_stream": {"type": "logs", "dataset": "openai.rate_limits", "namespace": "default"},
                  "event": {"kind": "event", "action": "rate-limits-collection", "outcome": "failure",
                            "dataset": "openai.rate_limits", "module": "openai", "created": "2026-05-26T06:40:21Z"},
                  "openai": {"rate_limits": {"collection": {"projects": 3, "limits": 20, "failed_projects": 1}}},
                  "error": {"message": "projects list: 500"}, "tags": ["openai-rate-limits"], "_id": "abc"}
    assert F.undeclared_fields(status_doc) == []
    audit = json.loads(json.dumps(SEED_EXAMPLES["audit"]))
    audit["openai"]["audit"]["api_key.created"] = {"id": "key_1", "data": {"scopes": ["api.model.request"]}}
    audit["openai"]["audit"]["project"] = {"id": "proj_1", "name": "P"}
    assert F.undeclared_fields(audit) == []
    audit["openai"]["audit"]["surprise"] = 1
    assert F.undeclared_fields(audit) == ["openai.audit.surprise"]


def test_audit_declares_one_flattened_field_per_spec_event_type():
    spec_path = SHARED / "reference" / "openai-admin-openapi.yaml"
    declared = {n[len("openai.audit."):] for n, t in F.field_types("audit").items() if t == "flattened"}
    if not spec_path.exists():
        assert "api_key.created" in declared and "login.failed" in declared
        pytest.skip("shared/reference not beside the repository")
    spec = yaml.safe_load(spec_path.read_text())
    assert declared == set(spec["components"]["schemas"]["AuditLogEventType"]["enum"])


def test_one_type_per_field_across_datasets():
    types = F.all_field_types()  # raises on a conflict
    assert types["openai.base.model"] == "keyword"


def _collector_documents():
    """One document per collector stream with every dimension and counter set, built with the
    collector's own mappers, plus rate-limit, collection-status and audit documents."""
    from agent_input import audit, ecs, rate_limits, streams

    docs = []
    for spec in streams.STREAMS_BY_NAME.values():
        result = {"object": spec.object_type}
        for dim in spec.dimensions:
            value = False if dim == "batch" else "x"
            node = result
            *parents, leaf = dim.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        counters = {c: 1 for c in spec.counters}
        _id, doc = ecs.usage_event(spec, bucket_start=1_700_000_000, bucket_end=1_700_000_060, width="1m",
                                   result=result, counters=counters, revision=1, namespace="default",
                                   created="2026-01-01T00:00:00.000Z")
        base = doc["openai"]["base"]  # what names.enrich adds where the id is there
        for id_field, name_field in (("project_id", "project_name"), ("user_id", "user_email"),
                                     ("api_key_id", "api_key_name")):
            if id_field in base:
                base[name_field] = "n"
        docs.append(doc)
    row = {"id": "rl_1", "object": "project.rate_limit", "model": "gpt-4o-mini-2024-07-18",
           "max_requests_per_1_minute": 500, "max_tokens_per_1_minute": 200000,
           "max_images_per_1_minute": 50, "max_audio_megabytes_per_1_minute": 10,
           "max_requests_per_1_day": 10000, "max_tokens_per_1_day": 9000000,
           "batch_1_day_max_input_tokens": 2000000}
    project = {"id": "proj_a", "name": "A", "status": "active"}
    docs.append(rate_limits.limit_event(row, project, collected=1_700_000_000)[1])
    docs.append(rate_limits.status_event(collected=1_700_000_000, projects=1, limits=1, failed_projects=1,
                                         error="projects list: 500")[1])
    entry = json.loads(SEED_EXAMPLES["audit"]["event"]["original"])
    entry["project"] = {"id": "proj_a", "name": "A"}
    entry["login.succeeded"] = {}
    docs.append(audit.audit_event(entry, preserve_original=True)[1])
    key_entry = {"id": "audit_log-2", "type": "api_key.created", "effective_at": 1_700_000_000,
                 "actor": {"type": "api_key", "api_key": {"id": "key_1", "type": "user",
                                                          "user": {"id": "user-1", "email": "a@b.c"}}},
                 "api_key.created": {"id": "key_2", "data": {"scopes": ["api.model.request"]}}}
    docs.append(audit.audit_event(key_entry)[1])
    return docs


def test_collector_documents_are_declared():
    """Every field the collector's mappers can write has a mapping (and the seed's examples too)."""
    docs = _collector_documents() + list(SEED_EXAMPLES.values())
    problems = {F.dataset_of(d): F.undeclared_fields(d) for d in docs}
    assert {k: v for k, v in problems.items() if v} == {}


def test_a_simulated_collection_writes_only_declared_fields(tmp_path):
    """End to end: every stream collected from the simulator (names, corrections, audit, limits)."""
    from agent_input import app
    from agent_input.config import config_from_dict
    from agent_input.outputs import NdjsonFileOutput
    from agent_input.simulator import Simulator

    now = 1763892000.0
    sim = Simulator(seed=3, org="small", now=now, admin_key="sk-admin-fields")
    url = sim.start()
    out = tmp_path / "events.ndjson"
    try:
        config = config_from_dict({"url": url, "api_key": "sk-admin-fields", "max_retries": 1,
                                   "data_streams": {"costs": {"initial_interval": "3d"}}}, env={})
        output = NdjsonFileOutput(out)
        collection = app.build(config, state_dir=tmp_path / "state", output=output, clock=sim.now)
        try:
            assert collection.engine.run(once=True) == 0, collection.engine.failed
            sim.advance(600)  # a second poll: corrections
            assert collection.engine.run(once=True) == 0, collection.engine.failed
        finally:
            collection.close()
            output.close()
    finally:
        sim.stop()
    seen: dict[str, set] = {}
    for line in out.read_bytes().splitlines():
        doc = json.loads(line)
        doc.pop("_id")
        missing = F.undeclared_fields(doc)
        if missing:
            seen.setdefault(F.dataset_of(doc), set()).update(missing)
    assert seen == {}
    datasets = {json.loads(line)["data_stream"]["dataset"] for line in out.read_bytes().splitlines()}
    assert {"openai.audit", "openai.rate_limits", "openai.costs", "openai.completions"} <= datasets


def test_mappings_are_nested_properties_with_keyword_limits():
    m = F.mappings("completions")["properties"]
    assert m["openai"]["properties"]["completions"]["properties"]["batch"] == {"type": "boolean"}
    assert m["openai"]["properties"]["base"]["properties"]["model"] == {"type": "keyword", "ignore_above": 1024}
    assert m["data_stream"]["properties"]["dataset"] == {"type": "constant_keyword"}
    audit = F.mappings("audit")["properties"]
    assert audit["event"]["properties"]["original"] == {"type": "keyword", "index": False, "doc_values": False}
    assert audit["openai"]["properties"]["audit"]["properties"]["api_key"]["properties"]["created"] == {"type": "flattened", "ignore_above": 1024}
    assert audit["source"]["properties"]["geo"]["properties"]["location"] == {"type": "geo_point"}


def test_every_flattened_audit_payload_has_an_ignore_above():
    """An audit payload leaf is indexed as one keyword term: a value past Lucene's 32,766-byte
    term limit had the whole event rejected by Elasticsearch (and dead-lettered)."""
    def leaves(props, prefix=""):
        for name, m in props.items():
            yield from leaves(m["properties"], f"{prefix}{name}.") if "properties" in m else [(prefix + name, m)]

    audit = F.mappings("audit")["properties"]["openai"]["properties"]["audit"]["properties"]
    payloads = [(n, m) for n, m in leaves(audit) if m.get("type") == "flattened"]
    assert len(payloads) > 100
    assert all(m.get("ignore_above") == 1024 for _, m in payloads), [n for n, m in payloads if "ignore_above" not in m]


def test_the_seed_s_units_reach_the_mapping_as_field_meta():
    """The seed gives `seconds` the unit s and `usage_bytes` byte; as Fleet does, the mapping carries
    them in `meta.unit`, which Kibana formats by."""
    seconds = F.mappings("audio_transcriptions")["properties"]["openai"]["properties"]["audio_transcriptions"]
    assert seconds["properties"]["seconds"] == {"type": "long", "meta": {"unit": "s"}}
    stores = F.mappings("vector_stores")["properties"]["openai"]["properties"]["vector_stores"]
    assert stores["properties"]["usage_bytes"] == {"type": "long", "meta": {"unit": "byte"}}


def test_the_pipeline_s_fallback_ecs_version_is_the_collector_s():
    from agent_input import ecs
    from kibana_assets import elasticsearch as E

    (fallback,) = [p["set"] for p in E.ingest_pipeline("completions")["processors"]
                   if p.get("set", {}).get("tag") == "ecs_version"]
    assert fallback["value"] == ecs.ECS_VERSION == "9.3.0"  # the seed's examples


def test_leaf_object_clash_is_rejected(tmp_path, monkeypatch):
    with pytest.raises(F.FieldError):
        F._check_tree("x", {"a.b": {}, "a.b.c": {}})


# ---------------------------------------------------------------------------------------------
# Elasticsearch assets


def _assets():
    return {(a.kind, a.name): a.body for a in E.es_assets()}


@pytest.mark.parametrize("ds", F.datasets())
def test_index_template_per_dataset(ds):
    t = _assets()[("index_template", f"logs-openai.{ds}")]
    assert t["index_patterns"] == [f"logs-openai.{ds}-*"]
    assert t["data_stream"] == {}
    assert t["priority"] > 200
    assert {"package", "version", "managed_by"} <= set(t["_meta"])
    assert f"logs-openai.{ds}@package" in t["composed_of"]
    assert t["composed_of"][-1] == f"logs-openai.{ds}@custom"
    assert t["ignore_missing_component_templates"] == [f"logs-openai.{ds}@custom"]
    assert t["template"]["settings"]["index"]["default_pipeline"] == f"logs-openai.{ds}@pipeline"
    assert "data_stream_options" not in json.dumps(t)  # 8.19+ only
    c = _assets()[("component_template", f"logs-openai.{ds}@package")]
    assert c["template"]["mappings"] == F.mappings(ds)


def test_custom_component_templates_are_left_to_the_user():
    assert not any(name.endswith("@custom") for kind, name in _assets() if kind == "component_template")


def test_retention_defaults_and_alternatives():
    t = _assets()[("index_template", "logs-openai.completions")]["template"]
    assert t["lifecycle"] == {"enabled": True, "data_retention": E.DEFAULT_RETENTION_ALL}
    assert _assets()[("index_template", "logs-openai.rate_limits")]["template"]["lifecycle"]["data_retention"] == "90d"
    custom = E.index_template("audit", E.Retention(default="30d"))
    assert custom["template"]["lifecycle"]["data_retention"] == "30d"
    ilm = E.index_template("audit", E.Retention(ilm_policy="my-policy"))
    assert ilm["template"]["settings"]["index"]["lifecycle"] == {"name": "my-policy"}
    assert ilm["template"]["lifecycle"] == {"enabled": False}
    assert ilm["_meta"]["fingerprint"] != _assets()[("index_template", "logs-openai.audit")]["_meta"]["fingerprint"]


@pytest.mark.parametrize("ds", F.datasets())
def test_default_pipeline(ds):
    p = _assets()[("pipeline", f"logs-openai.{ds}@pipeline")]
    first = p["processors"][0]["set"]
    assert first["field"] == "event.ingested" and first["value"] == "{{{_ingest.timestamp}}}"
    # on_failure records the error and keeps the document (no drop/fail processor anywhere)
    fields = [next(iter(s.values())).get("field") for s in p["on_failure"]]
    assert "error.message" in fields
    assert "drop" not in json.dumps(p) and '"fail"' not in json.dumps(p)
    assert p["processors"][-1]["pipeline"] == {"name": f"logs-openai.{ds}@custom",
                                               "ignore_missing_pipeline": True, "tag": "custom_pipeline"}


def test_rate_limits_pipeline_fills_the_join_keys():
    p = json.dumps(_assets()[("pipeline", "logs-openai.rate_limits@pipeline")])
    assert '"field": "openai.base.model", "copy_from": "openai.rate_limits.model"' in p
    assert '"field": "openai.base.project_id", "copy_from": "openai.rate_limits.project_id"' in p


def test_router_reroutes_by_dataset():
    p = _assets()[("pipeline", E.ROUTER_PIPELINE)]
    reroute = p["processors"][-1]["reroute"]
    assert reroute["dataset"] == ["{{data_stream.dataset}}"]
    assert reroute["namespace"] == ["{{data_stream.namespace}}", "default"]
    assert "destination" not in reroute
    assert set(p["processors"][0]["script"]["params"]["known"]) == {f"openai.{d}" for d in F.datasets()}
    t = _assets()[("index_template", E.ROUTER_TEMPLATE)]
    assert t["index_patterns"] == ["logs-openai-*"] and t["data_stream"] == {}
    assert t["template"]["settings"]["index"]["default_pipeline"] == E.ROUTER_PIPELINE
    # the router's pattern never overlaps a dataset template's
    assert not any(p.startswith("logs-openai-") for ds in F.datasets()
                   for p in _assets()[("index_template", f"logs-openai.{ds}")]["index_patterns"])
    assert E.router_pipeline("prod")["processors"][-1]["reroute"]["namespace"][-1] == "prod"
    # an openai.* dataset this bundle does not know is set back to the generic `openai`, which the
    # reroute's condition does not take: it stays in logs-openai-<namespace>
    script = p["processors"][0]["script"]["source"]
    assert "} else if (d instanceof String && d.startsWith('openai.')) {\n  ctx.data_stream.dataset = 'openai';" in script
    assert reroute["if"].endswith("ctx.data_stream.dataset.startsWith('openai.')")


def test_router_maps_each_collector_tag_back_to_its_dataset():
    """Under Elastic Agent's filestream the dataset fields are overwritten: the router falls back
    to the collector's tag `openai-<dataset with dashes>` (audio_speeches -> openai-audio-speeches),
    skipping the pipelines' own `openai-pipeline-error` tag. Painless does not run here, so the
    expression is pinned and applied in Python to every dataset's tag as the collector writes it."""
    from agent_input.streams import STREAMS_BY_NAME

    p = _assets()[("pipeline", E.ROUTER_PIPELINE)]
    script = p["processors"][0]["script"]["source"]
    known = set(p["processors"][0]["script"]["params"]["known"])
    assert "if (t instanceof String && t.startsWith('openai-') && !t.equals('openai-pipeline-error')) {" in script
    assert "ds = 'openai.' + t.substring(7).replace('-', '_');" in script
    tags = {f"openai.{name}": spec.tag for name, spec in STREAMS_BY_NAME.items()}
    tags.update({"openai.audit": "openai-audit", "openai.rate_limits": "openai-rate-limits"})
    assert set(tags) == known
    for dataset, tag in tags.items():
        assert tag.startswith("openai-") and "openai." + tag[7:].replace("-", "_") == dataset
    assert any("_" in d for d in known), "a dataset with an underscore is what the replace is for"


def test_fingerprints_are_stable_and_content_based():
    a, b = E.es_assets(), E.es_assets()
    assert [x.body["_meta"]["fingerprint"] for x in a] == [x.body["_meta"]["fingerprint"] for x in b]
    assert E.fingerprint(a[0].body) == a[0].body["_meta"]["fingerprint"]


# ---------------------------------------------------------------------------------------------
# Kibana assets


def test_data_view():
    body = K.data_view()["data_view"]
    assert body["title"] == "logs-openai.*" and body["timeFieldName"] == "@timestamp"
    assert K.data_view_saved_object()["type"] == "index-pattern"


def _panels(dashboard_id):
    d = next(d for d in K.dashboards() if d.id == dashboard_id)
    return json.loads(d.saved_object()["attributes"]["panelsJSON"])


def test_dashboards_exist_with_lens_esql_panels():
    ids = {d.id for d in K.dashboards()}
    assert ids == {"openai-elastic-usage-overview", "openai-elastic-audit", "openai-elastic-costs",
                   "openai-elastic-rate-limit-headroom"}
    for d in K.dashboards():
        so = d.saved_object()
        assert so["type"] == "dashboard" and so["attributes"]["timeRestore"] is True
        for p in json.loads(so["attributes"]["panelsJSON"]):
            attrs = p["embeddableConfig"]["attributes"]
            layer = next(iter(attrs["state"]["datasourceStates"]["textBased"]["layers"].values()))
            assert layer["query"]["esql"] == attrs["state"]["query"]["esql"]
            assert layer["index"] in attrs["state"]["adHocDataViews"]
            cols = {c["columnId"] for c in layer["columns"]}
            vis = attrs["state"]["visualization"]
            used = {c["columnId"] for c in vis.get("columns", [])} | {
                a for lyr in vis.get("layers", []) for a in [lyr["xAccessor"], *lyr["accessors"], lyr.get("splitAccessor")] if a}
            assert used <= cols, p["title"]


@pytest.mark.parametrize("panel", [pytest.param(p, id=f"{d.id}:{p.title}") for d in K.dashboards() for p in d.panels])
def test_every_panel_declares_exactly_the_columns_its_query_returns(panel):
    """A Lens ES|QL panel declares its columns; one its query does not return shows empty, and a
    returned one it does not declare is never shown (the collection status panel's namespace
    column was nearly missed that way). Checked on the parsed query, command by command."""
    from kibana_assets import esql

    returned = esql.output_columns(panel.query)
    assert returned is not None, "the query's columns are the index's: end it with STATS or KEEP"
    assert sorted(c for c, _ in panel.columns) == sorted(returned)


@pytest.mark.parametrize("query,want", [
    ("FROM i | STATS n = COUNT(*), MAX(x) BY a, b = c", ["n", "MAX(x)", "a", "b"]),
    ("FROM i | STATS n = COUNT(*) BY a | EVAL n = n * 2, m = 1 | DROP a", ["n", "m"]),
    ("FROM i | STATS n = COUNT(*) BY a | RENAME a AS b | KEEP b, n*", ["b", "n"]),
    ('FROM i | STATS n = COUNT(*) BY pm | DISSECT pm "%{p}::%{m}" | KEEP p, m, n', ["p", "m", "n"]),
    ('FROM i | STATS n = COUNT(*) BY pm | DISSECT pm "%{?x} %{}:%{p->} %{+p/2} %{m}"', ["n", "pm", "p", "m"]),
    ('FROM i | STATS n = COUNT(*) BY pm | DISSECT pm "%{*k}=%{&k}"', None),
    ("FROM i | KEEP a, b | SORT a | LIMIT 5", ["a", "b"]),
    # a plain name wins over a wildcard, wherever it stands
    ("FROM i | STATS a = COUNT(*), b = MAX(x) | KEEP *, a", ["b", "a"]),
    ("FROM i | WHERE a > 1 | EVAL b = 2", None),
])
def test_output_columns_follows_each_command(query, want):
    from kibana_assets import esql

    assert esql.output_columns(query) == want


def test_usage_dashboard_covers_the_issue_list():
    titles = {p["title"] for p in _panels("openai-elastic-usage-overview")}
    for want in ("By model", "By project", "By user", "By API key", "Images by size",
                 "Audio: characters and seconds", "Vector store bytes", "Code interpreter sessions"):
        assert want in titles
    audit = {p["title"] for p in _panels("openai-elastic-audit")}
    assert {"Events over time by action", "Actors", "Failed logins and logouts", "Source countries",
            "Source IPs", "API key lifecycle"} <= audit


def test_the_costs_dashboard_s_default_range_holds_thirty_whole_utc_days():
    """A day's cost is stamped at its start, 00:00 UTC, and the day in progress is never stored: a
    default range of now-30d left the 30th day back's document just outside it, so "the last 30
    days" summed 29 (about 3% under OpenAI's figure for the same days). Rounded to the day, with
    Kibana's time zone at UTC as docs/assets.md asks, the range starts at that day's midnight."""
    import datetime as dt

    attributes = next(d for d in K.dashboards() if d.id == "openai-elastic-costs").saved_object()["attributes"]
    m = re.fullmatch(r"now-(\d+)d(/d)?", attributes["timeFrom"])
    assert m and attributes["timeTo"] == "now"
    for now in (dt.datetime(2026, 12, 2, 9, 26, tzinfo=dt.timezone.utc),
                dt.datetime(2026, 12, 2, 23, 59, tzinfo=dt.timezone.utc),
                dt.datetime(2026, 12, 2, 0, 0, 1, tzinfo=dt.timezone.utc)):
        start = now - dt.timedelta(days=int(m.group(1)))
        if m.group(2):
            start = start.replace(hour=0, minute=0, second=0, microsecond=0)
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        days = [today - dt.timedelta(days=n) for n in range(1, 40)]  # the ended days' documents
        assert len([d for d in days if start <= d <= now]) == 30, now


def test_headroom_dashboard_has_both_seed_panels():
    panels = {p["title"]: p for p in _panels("openai-elastic-rate-limit-headroom")}
    per = panels["Rate limit headroom - per project and model"]
    org = panels["Rate limit headroom - by model (org-wide)"]
    per_cols = [c["columnId"] for c in next(iter(per["embeddableConfig"]["attributes"]["state"]["datasourceStates"]["textBased"]["layers"].values()))["columns"]]
    org_cols = [c["label"] for c in next(iter(org["embeddableConfig"]["attributes"]["state"]["datasourceStates"]["textBased"]["layers"].values()))["columns"]]
    assert per_cols[:2] == ["project_id", "model"] and "tpm_utilization" in per_cols
    assert "TPM limit (aggregate)" in org_cols and "TPM utilization (approx.)" in org_cols
    assert all(any(c.endswith(s) for c in org_cols) for s in ("limit (aggregate)", "utilization (approx.)"))


def test_collection_status_panel_shows_each_collector_apart():
    """One collector per OpenAI organization, told apart by namespace (as the stale rule groups
    them): grouped only by outcome, a collector that kept succeeding hid one that had stopped."""
    panels = {p["title"]: p for p in _panels("openai-elastic-rate-limit-headroom")}
    status = panels["Rate limit collection status"]
    layer = next(iter(status["embeddableConfig"]["attributes"]["state"]["datasourceStates"]["textBased"]["layers"].values()))
    assert [c["columnId"] for c in layer["columns"]][:2] == ["namespace", "event.outcome"]
    assert Q.limits_freshness().splitlines()[-2].endswith("BY namespace = data_stream.namespace, event.outcome")
    # each column sums its own counter of the status documents (bad_limits: limits not stored)
    assert [c["columnId"] for c in layer["columns"]][-2:] == ["failed_projects", "bad_limits"]
    stats = Q.limits_freshness().splitlines()[-2]
    assert "failed_projects = SUM(openai.rate_limits.collection.failed_projects)" in stats
    assert "bad_limits = SUM(openai.rate_limits.collection.bad_limits)" in stats


def test_dashboard_fingerprint_marks_content():
    d = K.dashboards()[0]
    fp = K.fingerprint_of(d.saved_object())
    assert fp and len(fp) == 16
    changed = K.Dashboard(d.id, d.title, d.description + " more", d.panels)
    assert K.fingerprint_of(changed.saved_object()) != fp


def test_headroom_rule_exactly_as_the_seed():
    rule = next(r for r in K.rules() if r.name == "[OpenAI] Rate limit headroom low")
    body = rule.create_body("9.1.0")
    assert body["rule_type_id"] == ".es-query" and body["consumer"] == "stackAlerts"
    assert body["schedule"] == {"interval": "5m"}
    assert body["alert_delay"] == {"active": 3}
    p = body["params"]
    assert p["searchType"] == "esqlQuery" and p["esqlQuery"]["esql"] == Q.headroom_rule("tpm")
    # the usage window (22m: the seed's 15m plus the collector's lag, so that one breaching minute
    # is seen by 3 runs) is inside the query; the rule's window is the limits look-back:
    # --stale-after (60m) + 10m, so the last known limits outlast the stale rule's silence
    assert "| WHERE openai.rate_limits.model IS NOT NULL OR @timestamp >= NOW() - 22 minutes" \
        in p["esqlQuery"]["esql"].splitlines()
    assert (p["timeWindowSize"], p["timeWindowUnit"], p["timeField"]) == (70, "m", "@timestamp")
    assert p["threshold"] == [0] and p["thresholdComparator"] == ">"
    assert p["groupBy"] == "row"
    assert "| WHERE tpm_utilization >= 0.8" in p["esqlQuery"]["esql"].splitlines()


@pytest.mark.parametrize("version,per_row", [("8.18.0", False), ("8.18.3", False), ("8.19.0", True),
                                             ("9.0.4", False), ("9.1.0", True), ("9.2.1", True)])
def test_per_row_grouping_depends_on_kibana_version(version, per_row):
    assert K.supports_per_row_alerts(version) is per_row
    rule = K.rules()[0]
    assert rule.params(version)["groupBy"] == ("row" if per_row else "all")


def test_four_rules_with_fixed_ids():
    rules = K.rules(K.RuleOptions(stale_after_minutes=120))
    assert [r.id for r in rules] == [K.RULE_ID_HEADROOM_TPM, K.RULE_ID_HEADROOM_RPM, K.RULE_ID_LIMITS_STALE,
                                     K.RULE_ID_PROJECT_LIMITS_FAILING]
    stale = rules[2]
    assert stale.window_minutes == 120 + 1440 and stale.params("9.1.0")["groupBy"] == "row"
    assert "event.outcome == \"success\"" in stale.query and "last_success < NOW() - 120 minutes" in stale.query
    failing = rules[3]
    assert failing.window_minutes == 120 + 1440 and failing.params("9.1.0")["groupBy"] == "row"
    assert failing.params("9.0.0")["groupBy"] == "all"
    assert "last_failure >= NOW() - 60 minutes" in failing.query
    assert "COALESCE(last_read, first_failure) < NOW() - 120 minutes" in failing.query
    assert [r.window_minutes for r in rules[:2]] == [130, 130]
    assert "rpm_utilization >= 0.8" in rules[1].query


# ---------------------------------------------------------------------------------------------
# export / validate commands


def test_export_writes_the_whole_bundle(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "out"), "--kibana-version", "8.18.0"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest) == len(E.es_assets()) + 1 + len(K.rules())
    for entry in manifest:
        assert (out / entry["file"]).exists()
    ndjson = (out / "kibana/openai-elastic.ndjson").read_text().splitlines()
    objs = [json.loads(line) for line in ndjson]
    assert [o["type"] for o in objs] == ["index-pattern"] + ["dashboard"] * 4
    rule = json.loads((out / f"kibana/rules/{K.RULE_ID_HEADROOM_TPM}.json").read_text())
    assert rule["params"]["groupBy"] == "all"  # exported for 8.18
    assert "@timestamp >= NOW() - 22 minutes" in rule["params"]["esqlQuery"]["esql"]  # the usage window
    tmpl = json.loads((out / "elasticsearch/index_templates/logs-openai.completions.json").read_text())
    assert tmpl["priority"] == E.TEMPLATE_PRIORITY


def test_validate_command():
    pytest.importorskip("esql_parser")
    result = CliRunner().invoke(main, ["validate"])
    assert result.exit_code == 0, result.output
    assert "bundle valid" in result.output


# ---------------------------------------------------------------------------------------------
# gaps found by mutation testing


def test_pipelines_only_default_what_the_document_lacks():
    """docs/assets.md: the pipeline *defaults* ecs.version and event.module, and copies the rate
    limit's project and model into openai.base.*; none of them overwrites a value the shipper set."""
    for ds in F.datasets():
        sets = {p["set"]["tag"]: p["set"] for p in _assets()[("pipeline", f"logs-openai.{ds}@pipeline")]["processors"]
                if "set" in p}
        assert sets["ecs_version"]["override"] is False
        assert (sets["event_module"]["field"], sets["event_module"]["value"], sets["event_module"]["override"]) == \
            ("event.module", "openai", False)
    sets = {p["set"]["tag"]: p["set"] for p in _assets()[("pipeline", "logs-openai.rate_limits@pipeline")]["processors"]
            if "set" in p}
    assert sets["base_project_id"]["override"] is False and sets["base_model"]["override"] is False


@pytest.mark.parametrize("ds", F.datasets())
def test_pipeline_failure_marks_the_document(ds):
    on_failure = _assets()[("pipeline", f"logs-openai.{ds}@pipeline")]["on_failure"]
    assert {"set": {"field": "event.kind", "value": "pipeline_error"}} in on_failure
    assert {"append": {"field": "tags", "value": "openai-pipeline-error", "allow_duplicates": False}} in on_failure


def test_templates_use_the_builtin_ecs_mappings():
    """`ecs@mappings` first, so ECS fields the bundle does not declare still get their ECS types."""
    for (kind, name), body in _assets().items():
        if kind == "index_template":
            assert body["composed_of"][0] == "ecs@mappings", name


def test_es_assets_come_before_the_templates_that_use_them():
    """Elasticsearch refuses an index template composed of a component template that does not
    exist yet (unless listed in ignore_missing_component_templates)."""
    seen = set()
    for a in E.es_assets():
        if a.kind == "index_template":
            missing = [c for c in a.body["composed_of"] if c not in seen
                       and c not in a.body["ignore_missing_component_templates"] and c not in E.BUILTIN_COMPONENTS]
            assert missing == [], a.name
            assert a.body["template"]["settings"]["index"]["default_pipeline"] in seen, a.name
        seen.add(a.name)


def test_dashboard_fingerprint_covers_the_panels():
    """A panel change must change the marker, or an upgrade would report the dashboard unchanged."""
    d = K.dashboards()[0]
    fp = K.fingerprint_of(d.saved_object())
    p0 = d.panels[0]
    edited = K.Panel(p0.title, p0.query + "\n| LIMIT 10", p0.columns, p0.kind, p0.x, p0.y, p0.split, p0.w, p0.h)
    changed = K.Dashboard(d.id, d.title, d.description, [edited, *d.panels[1:]], d.time_from)
    assert K.fingerprint_of(changed.saved_object()) != fp
    later = K.Dashboard(d.id, d.title, d.description, d.panels, "now-90d")
    assert K.fingerprint_of(later.saved_object()) != fp


def test_rule_alert_delays_and_options():
    rules = K.rules(K.RuleOptions(headroom_window_minutes=45, headroom_threshold=0.7))
    assert [r.alert_delay for r in rules] == [3, 3, 1, 1]
    assert [r.window_minutes for r in rules[:2]] == [70, 70]  # the limits look-back (60m + 10m)
    assert all("@timestamp >= NOW() - 45 minutes" in r.query for r in rules[:2])  # usage: 45m
    wide = K.rules(K.RuleOptions(headroom_window_minutes=120))
    assert [r.window_minutes for r in wide[:2]] == [120, 120]  # never shorter than the usage window
    with pytest.raises(ValueError):
        K.RuleOptions(stale_after_minutes=60, stale_horizon_minutes=60)
    assert "WHERE tpm_utilization >= 0.7" in rules[0].query and "WHERE rpm_utilization >= 0.7" in rules[1].query
    assert rules[0].params(None)["groupBy"] == "row"  # no version given: the newest Kibana's grouping


def test_validate_reports_broken_references(monkeypatch):
    from kibana_assets import validate as V

    real = E.es_assets()

    def broken(*args, **kw):
        out = []
        for a in real:
            if a.kind == "index_template" and a.name == "logs-openai.audit":
                body = json.loads(json.dumps(a.body))
                body["composed_of"].append("logs-openai.audit@nowhere")
                body["template"]["settings"]["index"]["default_pipeline"] = "logs-openai.audit@nowhere"
                a = E.EsAsset(a.kind, a.name, body)
            out.append(a)
        return out

    monkeypatch.setattr(E, "es_assets", broken)
    problems, _ = V.validate_bundle()
    assert "index_template logs-openai.audit: composed_of logs-openai.audit@nowhere is not in the bundle" in problems
    assert "index_template logs-openai.audit: default_pipeline logs-openai.audit@nowhere is not in the bundle" in problems
    assert len(problems) == 2  # ecs@mappings and the optional @custom are fine


def test_validate_reports_a_headroom_rule_without_the_seed_line(monkeypatch):
    from kibana_assets import validate as V

    real = K.rules
    monkeypatch.setattr(K, "rules", lambda options=None: real(K.RuleOptions(headroom_threshold=0.9)))
    problems, _ = V.validate_bundle()
    assert "headroom rule lost its `WHERE tpm_utilization >= 0.8` line" in problems


def test_validate_command_fails_on_a_problem(monkeypatch):
    from kibana_assets import cli

    monkeypatch.setattr(cli, "validate_bundle", lambda: (["something is broken"], ["checked"]))
    result = CliRunner().invoke(main, ["validate"])
    assert result.exit_code == 1
    assert "ERR something is broken" in result.output and "bundle valid" not in result.output


# ---------------------------------------------------------------------------------------------
# Display names are shown, never grouped by (a correction carries the name current when emitted)

NAME_FIELDS = ("openai.base.project_name", "openai.base.user_email", "openai.base.api_key_name")


@pytest.mark.parametrize("name", sorted(Q.all_queries()))
def test_no_panel_groups_by_a_display_name(name):
    """A correction emitted after a rename (or a failed name lookup) would otherwise split one id's
    total over two rows, and a downward revision would show as a negative row."""
    for line in Q.all_queries()[name].splitlines():
        if line.startswith("| STATS") and " BY " in line:
            by = line.split(" BY ", 1)[1]
            assert not any(f in by for f in NAME_FIELDS), line


@pytest.mark.parametrize("panel,id_alias,name_alias", [
    ("usage.by_project", "project_id", "project_name"),
    ("usage.by_user", "user_id", "user_email"),
    ("usage.by_api_key", "api_key_id", "api_key_name"),
    ("costs.cost_by_project", "project_id", "project_name"),
])
def test_named_panels_group_by_id_and_show_the_latest_name(panel, id_alias, name_alias):
    lines = Q.all_queries()[panel].splitlines()
    stats = next(line for line in lines if line.startswith("| STATS"))
    assert f" BY {id_alias} = openai.base.{id_alias}" in stats
    assert f"{name_alias}_key = MAX({name_alias}_key)" in stats
    assert f"| EVAL {name_alias} = SUBSTRING({name_alias}_key, 25)" in lines


def test_latest_name_key_strips_exactly_the_timestamp_prefix():
    """Emulates the ES|QL: DATE_FORMAT("yyyy-MM-dd'T'HH:mm:ss.SSS") is 23 characters, then "|";
    MAX over the keys is the latest emitted name; SUBSTRING is 1-based."""
    from datetime import datetime, timezone

    pre, agg, post = Q.latest_name("openai.base.project_name", "project_name")
    assert "COALESCE(event.created, @timestamp)" in pre and 'CONCAT(' in pre
    start = int(post.rsplit("SUBSTRING(project_name_key, ", 1)[1].rstrip(")"))

    def key(ts, name):
        t = datetime.fromtimestamp(ts, tz=timezone.utc)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}" + "|" + name

    # revision 0 emitted as "Alpha", the correction after the rename as "Beta", one without a name
    keys = [key(1730505600, "Alpha"), key(1730509200.5, "Beta")]  # a null name gives a null key
    assert max(keys)[start - 1:] == "Beta"
    assert key(1730505600, "Zeta|with bar")[start - 1:] == "Zeta|with bar"


# ---------------------------------------------------------------------------------------------
# Levels (vector store bytes) are not flows: never summed over time

LEVEL_FIELDS = ("openai.vector_stores.usage_bytes",)  # the simulator's `level=True` counters


def test_the_only_level_counter_is_vector_store_bytes():
    from agent_input.simulator.usage import STREAMS

    levels = {c for sd in STREAMS.values() if sd.level for c in sd.counters}
    assert levels == {"usage_bytes"}


@pytest.mark.parametrize("name", sorted(Q.all_queries()))
def test_levels_are_summed_per_api_bucket_only(name):
    """Summing usage_bytes per display bucket multiplies the level by the number of API buckets in
    it (~30x over a 24h range). Corrections add up per API bucket start (and width); only then
    does a display bucket take the MAX."""
    lines = Q.all_queries()[name].splitlines()
    for i, line in enumerate(lines):
        if not any(f"SUM({f})" in line for f in LEVEL_FIELDS):
            continue
        assert line.startswith("| STATS") and line.endswith(
            " BY start = @timestamp, width = openai.base.bucket_width, project_id = openai.base.project_id"), line
        assert lines[i + 1] == "| STATS bytes = MAX(bytes) BY t = BUCKET(start, 50, ?_tstart, ?_tend), project_id"


def _kibana_alert_id_fields(query: str) -> list[str]:
    """The alert id columns Kibana 8.19 and 9.1+ take for an ES|QL rule with `groupBy: "row"`
    (stack_alerts' `getAlertIdFields`): the plain column names of the last STATS's BY that the
    query returns. A `name = expression` grouping is not a column in Kibana's AST and is skipped
    (kibana#267816); with none left, every returned column makes up the id."""
    from kibana_assets import esql

    tree, _ = esql.parse(query)
    stats = []

    def walk(node):
        if type(node).__name__ == "StatsCommandContext":
            stats.append(node)
        for child in getattr(node, "children", None) or []:
            walk(child)

    walk(tree)
    columns = esql.output_columns(query) or []
    fields = []
    if stats and stats[-1].fields() is not None:
        for f in stats[-1].fields().field():
            if f.ASSIGN() is None and re.fullmatch(r"[A-Za-z_@][A-Za-z0-9_.@]*", f.getText()):
                fields.append(f.getText())
    fields = [f for f in fields if f in columns]
    return fields or columns


@pytest.mark.parametrize("rule_id,alert_id", [(K.RULE_ID_HEADROOM_TPM, ["project_model"]),
                                              (K.RULE_ID_HEADROOM_RPM, ["project_model"]),
                                              (K.RULE_ID_LIMITS_STALE, ["namespace"]),
                                              (K.RULE_ID_PROJECT_LIMITS_FAILING, ["project_id"])])
def test_per_row_rules_alert_id_is_what_kibana_takes(rule_id, alert_id):
    """A per-row alert's id must not contain a column that changes from run to run (a count, a
    time, minutes since): each run would end the alert and start a new one."""
    pytest.importorskip("esql_parser")
    rule = next(r for r in K.rules() if r.id == rule_id)
    assert rule.per_row and rule.params("8.19.0")["groupBy"] == "row"
    assert _kibana_alert_id_fields(rule.query) == alert_id
