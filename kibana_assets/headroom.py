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
from .queries import HEADROOM_USAGE_DATASETS, PROJECT_FAILURE_ACTION, SNAPSHOT_SUFFIX_REGEX, UNITS

_SUFFIX = re.compile(SNAPSHOT_SUFFIX_REGEX)


def normalize_model(model: str) -> str:
    """Strip a trailing dated snapshot suffix: gpt-4o-mini-2024-07-18 -> gpt-4o-mini."""
    return _SUFFIX.sub("", model)


def _time(ts: Any) -> datetime:
    if isinstance(ts, datetime):
        return ts
    if isinstance(ts, (int, float)):
        return datetime.fromtimestamp(ts / 1000 if ts > 1e11 else ts, tz=timezone.utc)
    return datetime.fromisoformat(str(ts).replace("Z", "+00:00"))


def _minute(ts: Any) -> datetime:
    return _time(ts).replace(second=0, microsecond=0)


def _dataset(flat: Mapping[str, Any]) -> str | None:
    ds = flat.get("data_stream.dataset") or flat.get("event.dataset")
    return ds[len("openai."):] if isinstance(ds, str) and ds.startswith("openai.") else None


def per_project(docs: Iterable[Mapping[str, Any]], *, now: Any = None,
                usage_minutes: int | None = None) -> list[dict]:
    """Rows `{project_id, model, peak_<u>, <u>_limit, <u>_utilization}` for u in tpm/rpm/ipm.

    `docs` are the documents in the window (the panel's time range, or the rule's limits
    look-back). With `now` and `usage_minutes` (the rules): usage only from
    `[now - usage_minutes, ...]`, and per unit the MAX limit of those minutes if any, else the
    limit of the latest minute that has one (the last known limits; not the MAX of all limit
    documents given, which read a limit lowered before the limits stopped at its old value)."""
    since = None
    if usage_minutes is not None:
        since = _time(now).timestamp() - usage_minutes * 60
    used: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # (pm, minute) -> u -> sum
    used_seen: dict[tuple, set] = defaultdict(set)  # which units had a non-null value
    latest: dict[tuple, dict[str, tuple]] = defaultdict(dict)  # u -> (minute, MAX limit of that minute)
    recent_limits: dict[tuple, dict[str, int]] = defaultdict(dict)
    keys: set[tuple] = set()
    for doc in docs:
        flat = flatten(doc)
        ds = _dataset(flat)
        if ds not in (*HEADROOM_USAGE_DATASETS, "rate_limits"):
            continue
        width = flat.get("openai.base.bucket_width")
        if width not in (None, "1m"):
            continue
        if flat.get("openai.completions.batch") is True:
            continue  # Batch API usage: limited by the batch queue, not per minute
        recent = since is None or _time(flat["@timestamp"]).timestamp() >= since
        if not recent and flat.get("openai.rate_limits.model") is None:
            continue  # usage older than the usage window
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
                last = latest[pm].get(u)
                if last is None or (minute, lim) > last:
                    latest[pm][u] = (minute, lim)
                if recent:
                    recent_limits[pm][u] = max(recent_limits[pm].get(u, lim), lim)
    rows = []
    for pm in sorted(keys):
        # per unit: the MAX of the usage window (for the panels, every document is in it), else
        # (the rules) the latest limit
        known = {u: v for u, (_, v) in latest.get(pm, {}).items()} if since is not None else {}
        lim = {**known, **recent_limits.get(pm, {})}
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


def alerts(docs: Iterable[Mapping[str, Any]], unit: str = "tpm", threshold: float = 0.8, *,
           now: Any = None, usage_minutes: int | None = None) -> list[str]:
    """Alert ids (`project_id::model`) the headroom rule would report for these documents (those in
    the rule's time window; `now` and `usage_minutes` as in `per_project`)."""
    return sorted(
        f"{r['project_id']}::{r['model']}"
        for r in per_project(docs, now=now, usage_minutes=usage_minutes)
        if r[f"{unit}_utilization"] is not None and r[f"{unit}_utilization"] >= threshold
    )


def limits_stale(docs: Iterable[Mapping[str, Any]], *, now: Any, stale_after_minutes: int) -> list[dict]:
    """The rows the stale-limits rule returns for the documents in its time window: one per
    namespace (`data_stream.namespace`, one per collector) in which a rate-limits collection ran
    but none succeeded in the last `stale_after_minutes`; none for a namespace without any
    collection (stream off, or never on)."""
    seen: dict[Any, dict] = {}
    for doc in docs:
        flat = flatten(doc)
        if flat.get("event.action") != "rate-limits-collection":
            continue
        ts = _time(flat["@timestamp"])
        row = seen.setdefault(flat.get("data_stream.namespace"), {
            "namespace": flat.get("data_stream.namespace"), "last_success": None,
            "failed_collections": 0, "last_collection": None})
        row["last_collection"] = ts if row["last_collection"] is None else max(row["last_collection"], ts)
        if flat.get("event.outcome") == "success":
            row["last_success"] = ts if row["last_success"] is None else max(row["last_success"], ts)
        elif flat.get("event.outcome") == "failure":
            row["failed_collections"] += 1
    since = _time(now).timestamp() - stale_after_minutes * 60
    return [row for _, row in sorted(seen.items(), key=lambda kv: str(kv[0]))
            if row["last_success"] is None or row["last_success"].timestamp() < since]


def projects_failing(docs: Iterable[Mapping[str, Any]], *, now: Any, stale_after_minutes: int) -> list[dict]:
    """The rows the per-project failing rule returns for the documents in its time window (see
    `queries.project_limits_failing_rule`): projects that failed within `stale_after_minutes // 2`
    and whose last limits read (else first failure) is older than `stale_after_minutes`."""
    seen: dict[str, dict] = {}
    for doc in docs:
        flat = flatten(doc)
        pid = flat.get("openai.rate_limits.project_id")
        failed = flat.get("event.action") == PROJECT_FAILURE_ACTION
        read = flat.get("openai.rate_limits.model") is not None
        if pid is None or not (failed or read):
            continue
        ts = _time(flat["@timestamp"])
        row = seen.setdefault(pid, {"project_id": pid, "last_read": None, "last_failure": None,
                                    "first_failure": None, "failures": 0})
        if failed:
            row["failures"] += 1
            row["last_failure"] = ts if row["last_failure"] is None else max(row["last_failure"], ts)
            row["first_failure"] = ts if row["first_failure"] is None else min(row["first_failure"], ts)
        if read:
            row["last_read"] = ts if row["last_read"] is None else max(row["last_read"], ts)
    now_ts = _time(now).timestamp()
    recent = max(1, stale_after_minutes // 2)
    return sorted(
        (row for row in seen.values()
         if row["last_failure"] is not None and row["last_failure"].timestamp() >= now_ts - recent * 60
         and (row["last_read"] or row["first_failure"]).timestamp() < now_ts - stale_after_minutes * 60),
        key=lambda r: r["project_id"])
