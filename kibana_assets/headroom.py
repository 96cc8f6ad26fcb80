"""A pure-Python reference implementation of the rate limit headroom semantics.

It states, in plain code, what the ES|QL in `queries.py` computes (see that module's docstring
for the rules). Tests pin it with hand-computed cases and, when a cluster is configured, compare
it with the ES|QL results on the same documents.

Documents are ECS documents as the collector emits them (nested or dotted keys both work).
"""
from __future__ import annotations

import re
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from .fields import flatten
from .queries import HEADROOM_USAGE_DATASETS, SNAPSHOT_SUFFIX_REGEX, UNITS

_SUFFIX = re.compile(SNAPSHOT_SUFFIX_REGEX)


def normalize_model(model: str) -> str:
    """Strip a trailing dated snapshot suffix: gpt-4o-mini-2024-07-18 -> gpt-4o-mini."""
    return _SUFFIX.sub("", model)


def _minute(ts: Any) -> datetime:
    if isinstance(ts, (int, float)):
        dt = datetime.fromtimestamp(ts / 1000 if ts > 1e11 else ts, tz=timezone.utc)
    else:
        dt = datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
    return dt.replace(second=0, microsecond=0)


def _dataset(flat: Mapping[str, Any]) -> str | None:
    ds = flat.get("data_stream.dataset") or flat.get("event.dataset")
    return ds[len("openai."):] if isinstance(ds, str) and ds.startswith("openai.") else None


def per_project(docs: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Rows `{project_id, model, peak_<u>, <u>_limit, <u>_utilization}` for u in tpm/rpm/ipm."""
    used: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # (pm, minute) -> u -> sum
    used_seen: dict[tuple, set] = defaultdict(set)  # which units had a non-null value
    limits: dict[tuple, dict[str, int]] = defaultdict(dict)
    keys: set[tuple] = set()
    for doc in docs:
        flat = flatten(doc)
        ds = _dataset(flat)
        if ds not in (*HEADROOM_USAGE_DATASETS, "rate_limits"):
            continue
        width = flat.get("openai.base.bucket_width")
        if width not in (None, "1m"):
            continue
        project = flat.get("openai.base.project_id")
        if project is None:
            project = flat.get("openai.rate_limits.project_id")
        model = flat.get("openai.base.model")
        if model is None:
            model = flat.get("openai.rate_limits.model")
        if project is None or model is None:
            continue  # e.g. the collection status documents
        pm = (project, normalize_model(model))
        keys.add(pm)
        minute = _minute(flat["@timestamp"])
        for u, (usage_field, limit_field, _) in UNITS.items():
            v = flat.get(usage_field)
            if v is not None:
                used[(pm, minute)][u] += v
                used_seen[(pm, minute)].add(u)
            lim = flat.get(limit_field)
            if lim is not None:
                limits[pm][u] = max(limits[pm].get(u, lim), lim)
    rows = []
    for pm in sorted(keys):
        lim = limits.get(pm, {})
        if not lim:
            continue  # usage without any limit: nothing to divide by
        row: dict[str, Any] = {"project_id": pm[0], "model": pm[1]}
        for u in UNITS:
            peaks = [used[k][u] for k in used if k[0] == pm and u in used_seen[k]]
            peak = max(peaks) if peaks else 0
            limit = lim.get(u)
            row[f"peak_{u}"] = peak
            row[f"{u}_limit"] = limit
            row[f"{u}_utilization"] = round(peak / limit, 4) if limit else None
        rows.append(row)
    return rows


def org_wide(docs: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Rows per model: sum of per-project peaks (only projects with a limit for the unit),
    `limit (aggregate)` = sum of per-project limits, `utilization (approx.)` = their ratio."""
    from .queries import org_limit_column, org_usage_column, org_utilization_column

    by_model: dict[str, dict[str, Any]] = {}
    for row in per_project(docs):
        agg = by_model.setdefault(row["model"], {"model": row["model"]})
        for u in UNITS:
            if row[f"{u}_limit"] is None:
                agg.setdefault(org_usage_column(u), None)
                agg.setdefault(org_limit_column(u), None)
                continue
            agg[org_usage_column(u)] = (agg.get(org_usage_column(u)) or 0) + row[f"peak_{u}"]
            agg[org_limit_column(u)] = (agg.get(org_limit_column(u)) or 0) + row[f"{u}_limit"]
    out = []
    for model in sorted(by_model):
        agg = by_model[model]
        for u in UNITS:
            used, limit = agg.get(org_usage_column(u)), agg.get(org_limit_column(u))
            agg[org_utilization_column(u)] = round(used / limit, 4) if used is not None and limit else None
        out.append(agg)
    return out


def alerts(docs: Iterable[Mapping[str, Any]], unit: str = "tpm", threshold: float = 0.8) -> list[str]:
    """Alert ids (`project_id::model`) the headroom rule would report for these documents."""
    return sorted(
        f"{r['project_id']}::{r['model']}"
        for r in per_project(docs)
        if r[f"{unit}_utilization"] is not None and r[f"{unit}_utilization"] >= threshold
    )
