"""Mapping of usage results to the ECS documents the Elastic integration's seed describes.

One function builds both first observations (revision 0, full counts) and corrections
(revision >= 1, only the differences), so the two can never drift apart. Every document gets a
deterministic id from (dataset, bucket width, bucket start, group, revision): the same id always
stands for the same content, which is what makes re-delivery harmless.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Mapping

from .streams import BASE_COUNTERS, BASE_DIMENSIONS, UsageStreamSpec, get_field

ECS_VERSION = "9.3.0"


@lru_cache(maxsize=65536)
def iso_timestamp(epoch: float) -> str:
    """`2025-01-27T00:00:00.000Z`, the seed's timestamp form (cached: buckets repeat a lot)."""
    dt = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def document_id(dataset: str, width: str, bucket_start: int, group: tuple, revision: int) -> str:
    """Deterministic id: the same bucket, group and revision always give the same id."""
    key = f"{dataset}|{width}|{bucket_start}|{json.dumps(group, separators=(',', ':'))}|{revision}"
    return hashlib.blake2b(key.encode(), digest_size=20).hexdigest()


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
) -> tuple[str, dict]:
    """Build (id, document) for one result of one bucket.

    `counters` are the values to store: the full counts for revision 0, the differences for a
    correction. Dimensions come from `result` (null ones are left out, as the seed's examples do).
    """
    dataset = spec.dataset
    base: dict[str, Any] = {
        "start_time": iso_timestamp(bucket_start),
        "end_time": iso_timestamp(bucket_end),
    }
    stream: dict[str, Any] = {}
    obj = result.get("object")
    if obj is not None:
        base["usage_object_type"] = obj
    for dim in spec.dimensions:
        value = get_field(result, dim)
        if value is None:
            continue
        if dim in BASE_DIMENSIONS:
            base[dim] = value
        else:
            _set_path(stream, spec.renames.get(dim, dim), value)
    for name, value in counters.items():
        if name in BASE_COUNTERS:
            base[name] = value
        else:
            _set_path(stream, spec.renames.get(name, name), value)
    for target, sources in spec.normalized.items():
        present = [counters[s] for s in sources if s in counters]
        if present:
            base[target] = sum(present)
    base["bucket_width"] = width
    base["revision"] = revision

    openai: dict[str, Any] = {"base": base}
    if stream:
        openai[spec.name] = stream
    doc = {
        "@timestamp": base["start_time"],
        "ecs": {"version": ECS_VERSION},
        "data_stream": {"type": "logs", "dataset": dataset, "namespace": namespace},
        "event": {"kind": "metric", "dataset": dataset, "created": created},
        "openai": openai,
        "tags": ["forwarded", spec.tag],
    }
    return document_id(dataset, width, bucket_start, spec.group_key(result), revision), doc


def _set_path(target: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` inside nested dicts (costs keep `amount.value`)."""
    if "." not in dotted:
        target[dotted] = value
        return
    *parents, leaf = dotted.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value
