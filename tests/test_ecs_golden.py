"""Golden tests: the API results behind each seed example map to the seed's example document.

The seed's examples predate some fields its own tables document (usage_tokens, usage_images) and
ours (revision, bucket_width); those are checked separately. Fields set by the agent or by time
(`event.ingested`, `event.created`, `event.agent_id_status`) are excepted.
"""
import copy
import json
from datetime import datetime
from pathlib import Path

import pytest

from agent_input.ecs import document_id, usage_event
from agent_input.streams import SEED_USAGE_STREAMS, STREAMS_BY_NAME

SEED = Path(__file__).parent / "fixtures" / "seed"


def _ts(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def _dims(base, *names):
    return {n: base.get(n) for n in names}


# What OpenAI's usage API sent for each seed example (1d buckets, as the seed's examples are).
def api_result(name: str, seed_doc: dict) -> dict:
    base = seed_doc["openai"]["base"]
    own = seed_doc["openai"].get(name, {})
    result = {"object": base["usage_object_type"]}
    if "num_model_requests" in base:
        result["num_model_requests"] = base["num_model_requests"]
    result.update(_dims(base, "project_id", "user_id", "api_key_id", "model"))
    if name == "code_interpreter_sessions":
        result["num_sessions"] = own["sessions"]
        for k in ("user_id", "api_key_id", "model"):
            result.pop(k)
    elif name == "vector_stores":
        result["usage_bytes"] = own["usage_bytes"]
        for k in ("user_id", "api_key_id", "model"):
            result.pop(k)
    else:
        result.update(own)
    return result


OURS = {"revision", "bucket_width", "usage_tokens", "usage_images"}
TIME_DEPENDENT = {"ingested", "created", "agent_id_status"}


@pytest.mark.parametrize("name", SEED_USAGE_STREAMS)
def test_seed_example_maps_exactly(name):
    seed_doc = json.loads((SEED / f"{name}.json").read_text())
    spec = STREAMS_BY_NAME[name]
    base = seed_doc["openai"]["base"]
    result = api_result(name, seed_doc)
    doc_id, doc = usage_event(
        spec,
        bucket_start=_ts(base["start_time"]),
        bucket_end=_ts(base["end_time"]),
        width="1d",
        result=result,
        counters={c: result[c] for c in spec.counters if c in result},
        revision=0,
        namespace="default",
        created="2025-01-28T21:56:17.149Z",
    )
    ours = copy.deepcopy(doc)
    for f in OURS:
        ours["openai"]["base"].pop(f, None)
    expected = copy.deepcopy(seed_doc)
    for f in TIME_DEPENDENT:
        expected["event"].pop(f, None)
        ours["event"].pop(f, None)
    assert ours == expected
    assert doc["openai"]["base"]["revision"] == 0
    assert doc["openai"]["base"]["bucket_width"] == "1d"
    assert doc_id == document_id(spec.dataset, "1d", _ts(base["start_time"]), spec.group_key(result), 0)
    # and a correction's: `document_id` is the mapper's id for every revision, not only the first
    correction_id, _ = usage_event(spec, bucket_start=_ts(base["start_time"]), bucket_end=_ts(base["end_time"]),
                                   width="1d", result=result, counters={}, revision=2, namespace="default",
                                   created="2025-01-28T21:56:17.149Z")
    assert correction_id != doc_id
    assert correction_id == document_id(spec.dataset, "1d", _ts(base["start_time"]), spec.group_key(result), 2)


@pytest.mark.parametrize("name", ["completions", "images"])
def test_null_dimensions_are_left_out_of_a_flat_streams_document(name):
    """An ungrouped result (or one whose user is unknown) has its dimensions null: the seed's
    examples leave such fields out, on openai.base and openai.<stream> alike."""
    spec = STREAMS_BY_NAME[name]
    result = {"object": f"organization.usage.{name}.result", **{d: None for d in spec.dimensions},
              **{c: 3 for c in spec.counters}}
    _, doc = usage_event(spec, bucket_start=0, bucket_end=60, width="1m", result=result,
                         counters={c: 3 for c in spec.counters}, revision=0, namespace="default", created="x")
    base, own = doc["openai"]["base"], doc["openai"].get(name, {})
    assert None not in base.values() and None not in own.values(), doc["openai"]
    assert not set(spec.dimensions) & set(base) and not set(spec.dimensions) & set(own)


def test_normalized_fields():
    """usage_tokens = input + output for completions (input already holds audio/cached tokens)."""
    spec = STREAMS_BY_NAME["completions"]
    result = {"object": "organization.usage.completions.result", "input_tokens": 1000,
              "input_audio_tokens": 50, "input_cached_tokens": 400, "output_tokens": 500,
              "output_audio_tokens": 50, "num_model_requests": 5}
    _, doc = usage_event(spec, bucket_start=0, bucket_end=60, width="1m", result=result,
                         counters={k: v for k, v in result.items() if k != "object"},
                         revision=0, namespace="default", created="x")
    assert doc["openai"]["base"]["usage_tokens"] == 1500
    images = STREAMS_BY_NAME["images"]
    _, doc = usage_event(images, bucket_start=0, bucket_end=60, width="1m",
                         result={"object": "organization.usage.images.result", "images": 3,
                                 "num_model_requests": 2, "size": "1024x1024", "source": "image.edit"},
                         counters={"images": 3, "num_model_requests": 2}, revision=0,
                         namespace="default", created="x")
    assert doc["openai"]["base"]["usage_images"] == 3
    assert doc["openai"]["images"] == {"images": 3, "size": "1024x1024", "source": "image.edit"}


def test_every_documented_completions_field_is_mapped():
    spec = STREAMS_BY_NAME["completions"]
    example = {"object": "organization.usage.completions.result", "input_tokens": 5000,
               "input_cached_tokens": 1800, "input_cache_write_tokens": 200,
               "input_uncached_tokens": 3000, "output_tokens": 1000, "input_text_tokens": 2500,
               "output_text_tokens": 800, "input_cached_text_tokens": 1500,
               "input_audio_tokens": 300, "input_cached_audio_tokens": 100,
               "output_audio_tokens": 100, "input_image_tokens": 200,
               "input_cached_image_tokens": 200, "output_image_tokens": 100,
               "num_model_requests": 5, "project_id": "proj_abc", "user_id": "user-abc",
               "api_key_id": "key_abc", "model": "gpt-4o-mini-2024-07-18", "batch": False,
               "service_tier": "default"}
    _, doc = usage_event(spec, bucket_start=0, bucket_end=60, width="1m", result=example,
                         counters={c: example[c] for c in spec.counters}, revision=0,
                         namespace="default", created="x")
    comp = doc["openai"]["completions"]
    base = doc["openai"]["base"]
    for key, value in example.items():
        if key == "object":
            assert base["usage_object_type"] == value
        elif key in ("project_id", "user_id", "api_key_id", "model", "num_model_requests"):
            assert base[key] == value
        else:
            assert comp[key] == value, key
    assert base["usage_tokens"] == 6000


@pytest.mark.parametrize("name", SEED_USAGE_STREAMS + ("costs",))
def test_the_engines_ndjson_documents_encode_to_the_same_bytes(name):
    """`mapper(..., for_ndjson=True)` + `ndjson_line` (the engine's path) gives the very bytes
    `to_ndjson_line` gives for the plain document, names added or not."""
    from agent_input.ecs import mapper, ndjson_line, to_ndjson_line

    spec = STREAMS_BY_NAME[name]
    if name == "costs":
        result = {"object": "organization.costs.result", "amount": {"value": 1.5, "currency": "usd"},
                  "line_item": "gpt-4o, input", "project_id": "proj_1", "api_key_id": None}
    else:
        result = api_result(name, json.loads((SEED / f"{name}.json").read_text()))
    plain, fast = mapper(spec, "1m", "default"), mapper(spec, "1m", "default", for_ndjson=True)
    for created in ("2026-11-23T10:00:00.000Z", "2026-11-23T10:05:00.000Z"):  # the shared parts change
        for revision in (0, 2):
            args = (1_700_000_040, 1_700_000_100, result, _counters(spec, result), revision, created)
            plain_id, plain_doc = plain(*args)
            fast_id, fast_doc = fast(*args)
            assert fast_id == plain_id == fast_doc["_id"]
            for doc in (plain_doc, fast_doc):
                doc["openai"]["base"]["project_name"] = "Project One"
            assert ndjson_line(fast_doc) == to_ndjson_line(plain_id, plain_doc)


def _counters(spec, result):
    from agent_input.engine import checked_counters

    return checked_counters(spec, result)


def test_event_created_follows_each_poll_of_a_long_lived_mapper():
    """The engine keeps one mapper per stream for its whole life: the shared parts are cached per
    `created`, and a later poll's documents must carry that poll's time, not the first poll's."""
    import orjson

    from agent_input.ecs import mapper, ndjson_line

    spec = STREAMS_BY_NAME["embeddings"]
    result = {"object": "organization.usage.embeddings.result", "input_tokens": 7, "num_model_requests": 1,
              "project_id": "proj_1"}
    for for_ndjson in (False, True):
        map_one = mapper(spec, "1m", "default", for_ndjson=for_ndjson)
        for created in ("2026-11-23T10:00:00.000Z", "2026-11-23T10:05:00.000Z", "2026-11-23T10:00:00.000Z"):
            _, doc = map_one(1_700_000_040, 1_700_000_100, result, {"input_tokens": 7, "num_model_requests": 1},
                             0, created)
            event = orjson.loads(ndjson_line(doc))["event"] if for_ndjson else doc["event"]
            assert event["created"] == created, (for_ndjson, created)


def test_iso_timestamp_keeps_milliseconds():
    """event.created comes from a float clock: its milliseconds are kept (truncated, not rounded)."""
    from agent_input.ecs import iso_timestamp

    assert iso_timestamp(1_700_000_000) == "2023-11-14T22:13:20.000Z"
    assert iso_timestamp(1_700_000_000.1239) == "2023-11-14T22:13:20.123Z"
    assert iso_timestamp(1_700_000_000.9999) == "2023-11-14T22:13:20.999Z"


def test_usage_event_keeps_each_namespace_apart():
    spec = STREAMS_BY_NAME["embeddings"]
    result = {"object": "organization.usage.embeddings.result", "input_tokens": 7, "num_model_requests": 1}
    for namespace in ("default", "prod", "default"):
        _, doc = usage_event(spec, bucket_start=0, bucket_end=60, width="1m", result=result,
                             counters={"input_tokens": 7, "num_model_requests": 1}, revision=0,
                             namespace=namespace, created="x")
        assert doc["data_stream"]["namespace"] == namespace


def test_a_document_from_usage_event_is_its_own():
    """usage_event's documents are the caller's to change (a test, a program adding a tag): one
    changed must not change the next ones of the same stream, width and namespace. The mappers
    were cached process-wide and shared their `ecs`, `data_stream`, `event` and `tags` objects."""
    spec = STREAMS_BY_NAME["embeddings"]
    result = {"object": "organization.usage.embeddings.result", "input_tokens": 7, "num_model_requests": 1}

    def event():
        return usage_event(spec, bucket_start=0, bucket_end=60, width="1m", result=result,
                           counters={"input_tokens": 7, "num_model_requests": 1}, revision=0,
                           namespace="default", created="2026-01-01T00:00:00.000Z")[1]

    first = event()
    pristine = copy.deepcopy(first)
    first["tags"].append("mine")
    first["event"]["outcome"] = "failure"
    first["data_stream"]["namespace"] = "prod"
    first["ecs"]["version"] = "1.0.0"
    assert event() == pristine


def test_every_usage_dimension_is_grouped_by():
    """The usage API fills a result's dimension only when the request groups by it (otherwise it adds
    the groups together and leaves it null: a priority tier's spend, or a web search's context level,
    could not be told apart)."""
    from agent_input.streams import USAGE_STREAMS

    for spec in USAGE_STREAMS:
        assert set(spec.group_by) == set(spec.dimensions), spec.name
    assert {"batch", "service_tier"} <= set(STREAMS_BY_NAME["completions"].group_by)
    assert "context_level" in STREAMS_BY_NAME["web_search_calls"].group_by


@pytest.mark.parametrize("name", ["embeddings", "moderations"])
def test_usage_tokens_of_input_only_streams(name):
    """Headroom queries sum openai.base.usage_tokens: embeddings and moderations have input tokens only."""
    spec = STREAMS_BY_NAME[name]
    _, doc = usage_event(spec, bucket_start=0, bucket_end=60, width="1m",
                         result={"object": spec.object_type, "input_tokens": 42, "num_model_requests": 2},
                         counters={"input_tokens": 42, "num_model_requests": 2}, revision=0,
                         namespace="default", created="x")
    assert doc["openai"]["base"]["usage_tokens"] == 42
