"""Mapping of usage results to the ECS documents the Elastic integration's seed describes.

One function builds both first observations (revision 0, full counts) and corrections
(revision >= 1, only the differences), so the two can never drift apart. Every document gets a
deterministic id from (dataset, bucket width, bucket start, group, revision): the same id always
stands for the same content, which is what makes re-delivery harmless.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Mapping

import orjson

from .streams import BASE_COUNTERS, BASE_DIMENSIONS, UsageStreamSpec, get_field

ECS_VERSION = "9.3.0"


@lru_cache(maxsize=65536)
def iso_timestamp(epoch: float) -> str:
    """`2025-01-27T00:00:00.000Z`, the seed's timestamp form (cached: buckets repeat a lot)."""
    dt = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def document_id(dataset: str, width: str, bucket_start: int, group: tuple, revision: int) -> str:
    """Deterministic id: the same bucket, group and revision always give the same id."""
    key = b"%s|%s|%d|%s|%d" % (dataset.encode(), width.encode(), bucket_start, orjson.dumps(group), revision)
    return _blake2b(key, digest_size=20).hexdigest()


_blake2b = hashlib.blake2b


def to_ndjson_line(doc_id: str, doc: Mapping[str, Any]) -> bytes:
    """One NDJSON line with the deterministic id in the top-level `_id` key.

    orjson: this runs once per event and is most of the mapping path's cost with the stdlib
    encoder; its output is the same compact UTF-8 JSON. The id goes into a shallow copy of the
    document rather than being spliced into the encoded bytes: half the time per event.
    """
    line = {"_id": doc_id}
    line.update(doc)
    return _dumps(line, option=_NEWLINE)


_dumps, _NEWLINE = orjson.dumps, orjson.OPT_APPEND_NEWLINE


@dataclass(frozen=True)
class _Plan:
    """Where each result field of a spec goes, worked out once per spec, not per event."""

    base_dims: tuple[str, ...]
    stream_dims: tuple[tuple[str, str], ...]      # (result field, ECS leaf under openai.<name>)
    base_counters: frozenset[str]
    renames: Mapping[str, str]
    normalized: tuple[tuple[str, tuple[str, ...]], ...]
    nested: bool                                   # some field is a dotted path (costs)
    dataset: str
    tag: str
    group_by: tuple[str, ...]
    id_prefix: bytes                               # b"<dataset>|": the constant head of every id key
    counter_leaves: tuple[tuple[str, str | None], ...]  # (counter, stream leaf or None for openai.base)
    # (result, counters, base) -> openai.<name>; fills `base` too. Compiled for flat specs.
    build: Any = None


_PLANS: dict[int, tuple[UsageStreamSpec, _Plan]] = {}  # id(spec) -> (spec kept alive, plan)


def _plan(spec: UsageStreamSpec) -> _Plan:
    cached = _PLANS.get(id(spec))
    if cached is None:
        plan = _Plan(
            base_dims=tuple(d for d in spec.dimensions if d in BASE_DIMENSIONS),
            stream_dims=tuple((d, spec.renames.get(d, d)) for d in spec.dimensions if d not in BASE_DIMENSIONS),
            base_counters=frozenset(c for c in spec.counters if c in BASE_COUNTERS),
            renames=spec.renames,
            normalized=tuple(spec.normalized.items()),
            nested=any("." in f for f in spec.dimensions + spec.counters + spec.group_by),
            dataset=spec.dataset,
            tag=spec.tag,
            group_by=spec.group_by,
            id_prefix=spec.dataset.encode() + b"|",
            counter_leaves=tuple((c, None if c in BASE_COUNTERS else spec.renames.get(c, c)) for c in spec.counters),
        )
        build = _nested_builder(plan) if plan.nested else _compile_builder(spec, plan)
        object.__setattr__(plan, "build", build)
        cached = _PLANS[id(spec)] = (spec, plan)
    return cached[1]


def _compile_builder(spec: UsageStreamSpec, plan: _Plan):
    """Straight-line Python for one flat spec: (result, counters, base) -> openai.<name>.

    The same fields, order and null-skipping as `_nested_builder`, without its per-field loops
    and path splitting: the mapping path runs this once per event.
    """
    src = ["def build(result, counters, base):", "    get = result.get", "    cget = counters.get",
           "    v = get('object')", "    if v is not None: base['usage_object_type'] = v"]
    for dim in plan.base_dims:
        src += [f"    v = get({dim!r})", f"    if v is not None: base[{dim!r}] = v"]
    src.append("    stream = {}")
    for dim, leaf in plan.stream_dims:
        src += [f"    v = get({dim!r})", f"    if v is not None: stream[{leaf!r}] = v"]
    src.append("    if len(counters) == %d:" % len(plan.counter_leaves))
    for name, leaf in plan.counter_leaves:
        target = "base" if leaf is None else "stream"
        src.append(f"        {target}[{(name if leaf is None else leaf)!r}] = counters[{name!r}]")
    src.append("    else:")
    src.append("        for name, value in counters.items():")
    src.append("            if name in BASE_COUNTERS: base[name] = value")
    src.append("            else: stream[RENAMES.get(name, name)] = value")
    for target, sources in plan.normalized:
        src.append("    total = None")
        for s_ in sources:
            src += [f"    v = cget({s_!r})", "    if v is not None: total = v if total is None else total + v"]
        src.append(f"    if total is not None: base[{target!r}] = total")
    src.append("    return stream")
    namespace = {"BASE_COUNTERS": plan.base_counters, "RENAMES": plan.renames}
    exec(compile("\n".join(src), f"<ecs builder {spec.name}>", "exec"), namespace)  # noqa: S102
    return namespace["build"]


def _nested_builder(plan: _Plan):
    """The plain builder, for specs with dotted fields (costs' `amount.value`)."""

    def build(result: Mapping[str, Any], counters: Mapping[str, Any], base: dict) -> dict:
        obj = result.get("object")
        if obj is not None:
            base["usage_object_type"] = obj
        for dim in plan.base_dims:
            value = get_field(result, dim)
            if value is not None:
                base[dim] = value
        stream: dict[str, Any] = {}
        for dim, leaf in plan.stream_dims:
            value = get_field(result, dim)
            if value is not None:
                _set_path(stream, leaf, value)
        for name, value in counters.items():
            if name in plan.base_counters:
                base[name] = value
            else:
                _set_path(stream, plan.renames.get(name, name), value)
        for target, sources in plan.normalized:
            present = [counters[s] for s in sources if s in counters]
            if present:
                base[target] = sum(present)
        return stream

    return build


def mapper(spec: UsageStreamSpec, width: str, namespace: str, *, for_ndjson: bool = False):
    """Map results of one stream, width and namespace to ECS documents:
    `(bucket_start, bucket_end, result, counters, revision, created, group=None) -> (id, document)`.

    `counters` are the values to store: the full counts for revision 0, the differences for a
    correction. Dimensions come from `result` (null ones are left out, as the seed's examples do).
    `group` is `spec.group_key(result)` when the caller has it already (the engine does).
    The parts every document of one poll shares (`ecs`, `data_stream`, `event`, `tags`) are one
    read-only object per poll: nothing mutates them (`enrich` only adds to openai.base).

    `for_ndjson`: documents made only to be encoded by `ndjson_line` (the engine's): the id is
    also their first key, `_id`, and the shared parts are encoded once per poll (orjson
    fragments) instead of once per document. Only openai.base is a plain dict to add names to.
    """
    plan = _plan(spec)
    build, name = plan.build, spec.name
    group_key = spec.group_key if plan.nested else (lambda result, g=plan.group_by: tuple(map(result.get, g)))
    prefix = plan.id_prefix + width.encode() + b"|"
    dumps, blake2b, iso = orjson.dumps, _blake2b, iso_timestamp
    shared: list = [None, None]  # (created, common parts) of the last call: one poll shares them

    def common(created: str) -> tuple:
        if shared[0] != created:
            parts = (
                {"version": ECS_VERSION},
                {"type": "logs", "dataset": plan.dataset, "namespace": namespace},
                {"kind": "metric", "dataset": plan.dataset, "created": created},
                ["forwarded", plan.tag],
            )
            shared[1] = tuple(orjson.Fragment(dumps(p)) for p in parts) if for_ndjson else parts
            shared[0] = created
        return shared[1]

    def map_one(bucket_start, bucket_end, result, counters, revision, created, group=None):
        start_iso = iso(bucket_start)
        base = {"start_time": start_iso, "end_time": iso(bucket_end)}
        stream = build(result, counters, base)
        base["bucket_width"] = width
        base["revision"] = revision
        ecs_, data_stream, event, tags = common(created)
        if group is None:
            group = group_key(result)
        key = b"%s%d|%s|%d" % (prefix, bucket_start, dumps(group), revision)
        doc_id = blake2b(key, digest_size=20).hexdigest()
        doc = {"_id": doc_id} if for_ndjson else {}
        doc["@timestamp"] = start_iso
        doc["ecs"] = ecs_
        doc["data_stream"] = data_stream
        doc["event"] = event
        doc["openai"] = {"base": base, name: stream} if stream else {"base": base}
        doc["tags"] = tags
        return doc_id, doc

    return map_one


def ndjson_line(doc: Mapping[str, Any]) -> bytes:
    """The NDJSON line of a document from `mapper(..., for_ndjson=True)`: `to_ndjson_line`'s
    bytes without its copy, the id being in the document already."""
    return _dumps(doc, option=_NEWLINE)


def usage_event(
    spec: UsageStreamSpec,
    *,
    bucket_start: int,
    bucket_end: int,
    width: str,
    result: Mapping[str, Any],
    counters: Mapping[str, Any],
    revision: int,
    namespace: str,
    created: str,
    group: tuple | None = None,
) -> tuple[str, dict]:
    """Build (id, document) for one result of one bucket: `mapper` with keyword arguments.

    The document is the caller's own: a mapper of its own each call (the spec's plan is cached),
    since a mapper's documents share their `ecs`, `data_stream`, `event` and `tags` objects (a
    process-wide cache of mappers let one caller's change to them reach every later document)."""
    map_one = mapper(spec, width, namespace)
    return map_one(bucket_start, bucket_end, result, counters, revision, created, group)


def _set_path(target: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` inside nested dicts (costs keep `amount.value`)."""
    if "." not in dotted:
        target[dotted] = value
        return
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value
