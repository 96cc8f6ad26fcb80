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
    encoder; its output is the same compact UTF-8 JSON.
    """
    body = orjson.dumps(doc)
    return b'{"_id":"' + doc_id.encode() + b'",' + body[1:] + b"\n"


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
    build: Any = None                              # compiled flat builder (None for nested specs)


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
        if not plan.nested:
            object.__setattr__(plan, "build", _compile_builder(spec, plan))
        cached = _PLANS[id(spec)] = (spec, plan)
    return cached[1]


def _compile_builder(spec: UsageStreamSpec, plan: _Plan):
    """Straight-line Python for one flat spec: (result, counters) -> (openai.base, openai.<name>).

    Same fields, same order and same null-skipping as the generic loop it replaces, without the
    per-field loop and tuple unpacking: the mapping path runs this once per event.
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


_COMMON: dict[tuple, tuple] = {}


def _common(plan: _Plan, namespace: str, created: str) -> tuple:
    """The parts every document of a dataset/namespace/poll shares; read-only, shared between
    documents (nothing mutates them: `enrich` only adds to openai.base)."""
    key = (plan.dataset, namespace, created)
    parts = _COMMON.get(key)
    if parts is None:
        if len(_COMMON) > 4096:
            _COMMON.clear()
        parts = _COMMON[key] = (
            {"version": ECS_VERSION},
            {"type": "logs", "dataset": plan.dataset, "namespace": namespace},
            {"kind": "metric", "dataset": plan.dataset, "created": created},
            ["forwarded", plan.tag],
        )
    return parts


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
    """Build (id, document) for one result of one bucket.

    `counters` are the values to store: the full counts for revision 0, the differences for a
    correction. Dimensions come from `result` (null ones are left out, as the seed's examples do).
    `group` is `spec.group_key(result)` when the caller has it already (the engine does).

    This runs once per event and is the hot part of the mapping path: the non-nested branch uses
    the spec's precomputed plan and no helper calls.
    """
    plan = _plan(spec)
    start_iso = iso_timestamp(bucket_start)
    if plan.build is not None:
        base: dict[str, Any] = {"start_time": start_iso, "end_time": iso_timestamp(bucket_end)}
        stream = plan.build(result, counters, base)
        base["bucket_width"] = width
        base["revision"] = revision
        ecs_, data_stream, event, tags = _common(plan, namespace, created)
        doc = {
            "@timestamp": start_iso,
            "ecs": ecs_,
            "data_stream": data_stream,
            "event": event,
            "openai": {"base": base, spec.name: stream} if stream else {"base": base},
            "tags": tags,
        }
        if group is None:
            group = tuple(map(result.get, plan.group_by))
        key = b"%s%s|%d|%s|%d" % (plan.id_prefix, width.encode(), bucket_start, orjson.dumps(group), revision)
        return _blake2b(key, digest_size=20).hexdigest(), doc
    dataset = plan.dataset
    base = {"start_time": start_iso, "end_time": iso_timestamp(bucket_end)}
    obj = result.get("object")
    if obj is not None:
        base["usage_object_type"] = obj
    for dim in plan.base_dims:
        value = result.get(dim)
        if value is not None:
            base[dim] = value
    stream: dict[str, Any] = {}
    if plan.nested:
        for dim, leaf in plan.stream_dims:
            value = get_field(result, dim)
            if value is not None:
                _set_path(stream, leaf, value)
        for name, value in counters.items():
            if name in plan.base_counters:
                base[name] = value
            else:
                _set_path(stream, plan.renames.get(name, name), value)
    else:
        get = result.get
        for dim, leaf in plan.stream_dims:
            value = get(dim)
            if value is not None:
                stream[leaf] = value
        if len(counters) == len(plan.counter_leaves):  # every counter present: spec order, no lookups
            for name, leaf in plan.counter_leaves:
                if leaf is None:
                    base[name] = counters[name]
                else:
                    stream[leaf] = counters[name]
        else:
            renames = plan.renames
            for name, value in counters.items():
                if name in plan.base_counters:
                    base[name] = value
                else:
                    stream[renames.get(name, name)] = value
    for target, sources in plan.normalized:
        total = None
        for s in sources:
            if s in counters:
                total = counters[s] if total is None else total + counters[s]
        if total is not None:
            base[target] = total
    base["bucket_width"] = width
    base["revision"] = revision

    openai: dict[str, Any] = {"base": base}
    if stream:
        openai[spec.name] = stream
    doc = {
        "@timestamp": start_iso,
        "ecs": {"version": ECS_VERSION},
        "data_stream": {"type": "logs", "dataset": dataset, "namespace": namespace},
        "event": {"kind": "metric", "dataset": dataset, "created": created},
        "openai": openai,
        "tags": ["forwarded", plan.tag],
    }
    if group is None:
        group = spec.group_key(result) if plan.nested else tuple(map(result.get, plan.group_by))
    key = b"%s%s|%d|%s|%d" % (plan.id_prefix, width.encode(), bucket_start, orjson.dumps(group), revision)
    return _blake2b(key, digest_size=20).hexdigest(), doc


def mapper(spec: UsageStreamSpec, width: str, namespace: str):
    """`usage_event` with one collector's constants bound, called positionally:
    `(bucket_start, bucket_end, result, counters, revision, created, group) -> (id, document)`.

    The engine calls this once per event; keyword arguments, the plan lookup and the shared
    parts' lookup per call were a measurable share of the mapping path. Same documents and ids.
    """
    plan = _plan(spec)
    if plan.build is None:
        def generic(bucket_start, bucket_end, result, counters, revision, created, group=None):
            return usage_event(spec, bucket_start=bucket_start, bucket_end=bucket_end, width=width, result=result,
                               counters=counters, revision=revision, namespace=namespace, created=created,
                               group=group)
        return generic
    build, name, group_by = plan.build, spec.name, plan.group_by
    prefix = plan.id_prefix + width.encode() + b"|"
    dumps, blake2b, iso = orjson.dumps, _blake2b, iso_timestamp
    shared: list = [None, None]  # (created, common parts) of the last call: one poll shares them

    def map_one(bucket_start, bucket_end, result, counters, revision, created, group=None):
        start_iso = iso(bucket_start)
        base = {"start_time": start_iso, "end_time": iso(bucket_end)}
        stream = build(result, counters, base)
        base["bucket_width"] = width
        base["revision"] = revision
        if shared[0] != created:
            shared[1] = _common(plan, namespace, created)
            shared[0] = created
        ecs_, data_stream, event, tags = shared[1]
        doc = {
            "@timestamp": start_iso,
            "ecs": ecs_,
            "data_stream": data_stream,
            "event": event,
            "openai": {"base": base, name: stream} if stream else {"base": base},
            "tags": tags,
        }
        if group is None:
            group = tuple(map(result.get, group_by))
        key = b"%s%d|%s|%d" % (prefix, bucket_start, dumps(group), revision)
        return blake2b(key, digest_size=20).hexdigest(), doc

    return map_one


def _set_path(target: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` inside nested dicts (costs keep `amount.value`)."""
    if "." not in dotted:
        target[dotted] = value
        return
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value
