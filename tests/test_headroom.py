"""Headroom semantics: the pure-Python reference pinned by hand-computed cases, and the ES|QL
that renders it into the panels and rules (parsed with the official grammar)."""
from __future__ import annotations

import re

import pytest

from kibana_assets import headroom as H
from kibana_assets import kibana as K
from kibana_assets import queries as Q

T0 = "2026-05-26T06:40:00.000Z"
T1 = "2026-05-26T06:41:00.000Z"
T2 = "2026-05-26T06:42:00.000Z"


def usage(ds, ts, project, model, tokens=None, requests=0, images=None, revision=0, width="1m"):
    base = {"project_id": project, "model": model, "num_model_requests": requests, "revision": revision}
    if width is not None:
        base["bucket_width"] = width
    if tokens is not None:
        base["usage_tokens"] = tokens
    if images is not None:
        base["usage_images"] = images
    return {"@timestamp": ts, "data_stream": {"dataset": f"openai.{ds}"}, "openai": {"base": base}}


def limit(ts, project, model, tpm=None, rpm=None, ipm=None):
    rl = {"project_id": project, "model": model}
    for k, v in (("max_tokens_per_1_minute", tpm), ("max_requests_per_1_minute", rpm),
                 ("max_images_per_1_minute", ipm)):
        if v is not None:
            rl[k] = v
    return {"@timestamp": ts, "data_stream": {"dataset": "openai.rate_limits"}, "openai": {"rate_limits": rl}}


def status(ts, outcome="success", namespace=None):
    ds = {"dataset": "openai.rate_limits", **({"namespace": namespace} if namespace else {})}
    return {"@timestamp": ts, "data_stream": ds,
            "event": {"kind": "event", "action": "rate-limits-collection", "outcome": outcome},
            "openai": {"rate_limits": {"collection": {"projects": 2, "limits": 5, "failed_projects": 0}}}}


# Hand-computed scenario (numbers worked out in the comments)
DOCS = [
    # proj_a, gpt-4o-mini (dated snapshot in usage, family + snapshot limits, equal numbers)
    usage("completions", T0, "proj_a", "gpt-4o-mini-2024-07-18", tokens=100_000, requests=40),
    usage("completions", T0, "proj_a", "gpt-4o-mini-2024-07-18", tokens=30_000, requests=10),  # other user
    usage("completions", T1, "proj_a", "gpt-4o-mini-2024-07-18", tokens=120_000, requests=20),
    # a correction for T1: +50_000 tokens, +5 requests -> T1 = 170_000 tokens / 25 requests
    usage("completions", T1, "proj_a", "gpt-4o-mini-2024-07-18", tokens=50_000, requests=5, revision=1),
    limit(T0, "proj_a", "gpt-4o-mini", tpm=200_000, rpm=500),
    limit(T0, "proj_a", "gpt-4o-mini-2024-07-18", tpm=200_000, rpm=500),
    # proj_b, gpt-4o-mini: peak at T2 = 60_000 tokens; limit 100_000
    usage("completions", T2, "proj_b", "gpt-4o-mini", tokens=60_000, requests=6),
    limit(T1, "proj_b", "gpt-4o-mini", tpm=100_000, rpm=100),
    # proj_a, omni-moderation: limit, no usage -> 0% row
    limit(T0, "proj_a", "omni-moderation", tpm=10_000, rpm=1_000),
    # proj_a, gpt-image-1: images against images/min; dated usage, family limit
    usage("images", T0, "proj_a", "gpt-image-1-2025-04-23", images=4, requests=4),
    usage("images", T1, "proj_a", "gpt-image-1-2025-04-23", images=3, requests=3),
    limit(T0, "proj_a", "gpt-image-1", rpm=50, ipm=5),
    # usage without any limit: dropped
    usage("embeddings", T0, "proj_c", "text-embedding-3-small", tokens=999, requests=1),
    # hourly bucket: ignored (would smear the peak)
    usage("completions", T0, "proj_b", "gpt-4o-mini", tokens=10_000_000, requests=1000, width="1h"),
    # collection status document: ignored
    status(T0),
]


def by_key(rows):
    return {(r["project_id"], r["model"]): r for r in rows}


def test_normalization_strips_only_a_trailing_date():
    assert H.normalize_model("gpt-4o-mini-2024-07-18") == "gpt-4o-mini"
    assert H.normalize_model("gpt-image-1-2025-04-23") == "gpt-image-1"
    assert H.normalize_model("omni-moderation-2024-09-26") == "omni-moderation"
    assert H.normalize_model("gpt-4o") == "gpt-4o"
    assert H.normalize_model("text-moderation:2023-10-25") == "text-moderation:2023-10-25"
    assert H.normalize_model("o1-2024-12-17-preview") == "o1-2024-12-17-preview"


def test_per_project_hand_computed():
    rows = by_key(H.per_project(DOCS))
    assert set(rows) == {("proj_a", "gpt-4o-mini"), ("proj_b", "gpt-4o-mini"),
                         ("proj_a", "omni-moderation"), ("proj_a", "gpt-image-1")}
    a = rows[("proj_a", "gpt-4o-mini")]
    # T0 = 100k + 30k = 130k, T1 = 120k + 50k (correction) = 170k -> peak 170k over MAX limit 200k
    assert a["peak_tpm"] == 170_000 and a["tpm_limit"] == 200_000 and a["tpm_utilization"] == 0.85
    # requests: T0 = 50, T1 = 25 -> peak 50 / 500 (not 1000: MAX, never SUM, of family + snapshot)
    assert a["peak_rpm"] == 50 and a["rpm_limit"] == 500 and a["rpm_utilization"] == 0.1
    assert a["ipm_limit"] is None and a["ipm_utilization"] is None
    b = rows[("proj_b", "gpt-4o-mini")]
    assert (b["peak_tpm"], b["tpm_limit"], b["tpm_utilization"]) == (60_000, 100_000, 0.6)
    assert (b["peak_rpm"], b["rpm_utilization"]) == (6, 0.06)
    m = rows[("proj_a", "omni-moderation")]
    assert (m["peak_tpm"], m["tpm_utilization"], m["rpm_utilization"]) == (0, 0.0, 0.0)
    img = rows[("proj_a", "gpt-image-1")]
    assert (img["peak_ipm"], img["ipm_limit"], img["ipm_utilization"]) == (4, 5, 0.8)
    assert (img["peak_rpm"], img["rpm_utilization"]) == (4, 0.08)
    assert img["tpm_limit"] is None


def test_org_wide_sums_per_project_peaks_and_limits():
    rows = {r["model"]: r for r in H.org_wide(DOCS)}
    mini = rows["gpt-4o-mini"]
    # per-project peaks 170k (T1) + 60k (T2): different minutes, summed anyway (upper bound)
    assert mini[Q.org_usage_column("tpm")] == 230_000
    assert mini[Q.org_limit_column("tpm")] == 300_000
    assert mini[Q.org_utilization_column("tpm")] == round(230_000 / 300_000, 4) == 0.7667
    assert mini[Q.org_limit_column("rpm")] == 600 and mini[Q.org_usage_column("rpm")] == 56
    assert rows["omni-moderation"][Q.org_utilization_column("tpm")] == 0.0
    assert rows["gpt-image-1"][Q.org_utilization_column("ipm")] == 0.8
    assert rows["gpt-image-1"][Q.org_limit_column("tpm")] is None


def test_limit_changing_within_window_is_stabilized_as_max():
    docs = [usage("completions", T0, "p", "m", tokens=50), limit(T0, "p", "m", tpm=100), limit(T1, "p", "m", tpm=400)]
    (row,) = H.per_project(docs)
    assert (row["tpm_limit"], row["tpm_utilization"]) == (400, 0.125)


def test_batch_usage_does_not_count_against_the_per_minute_limits():
    """OpenAI's Batch API has limits of its own (`batch_1_day_max_input_tokens`, the queue),
    separate from the per-minute ones: a batch job finishing a million tokens in a minute is not
    TPM or RPM pressure. Completions are grouped by `batch`, so its documents are left out."""
    batch = usage("completions", T0, "p", "gpt-4o-mini-2024-07-18", tokens=1_000_000, requests=500)
    batch["openai"]["completions"] = {"batch": True}
    sync = usage("completions", T0, "p", "gpt-4o-mini-2024-07-18", tokens=20_000, requests=20)
    sync["openai"]["completions"] = {"batch": False}
    docs = [batch, sync, usage("completions", T1, "p", "gpt-4o-mini", tokens=30_000, requests=30),  # no batch field
            limit(T0, "p", "gpt-4o-mini", tpm=200_000, rpm=500)]
    (row,) = H.per_project(docs)
    assert (row["peak_tpm"], row["peak_rpm"]) == (30_000, 30)
    assert H.alerts(docs) == [] and H.alerts(docs, "rpm") == []
    assert H.alerts(docs, now=T1, usage_minutes=15) == []
    # a batch group's corrections (revision >= 1, the same group key) are left out as well
    fix = usage("completions", T1, "p", "gpt-4o-mini-2024-07-18", tokens=900_000, requests=400, revision=1)
    fix["openai"]["completions"] = {"batch": True}
    (row,) = H.per_project([*docs, fix])
    assert (row["peak_tpm"], row["peak_rpm"]) == (30_000, 30)
    for q in (Q.headroom_per_project(), Q.headroom_org_wide(), Q.headroom_rule("tpm"), Q.headroom_rule("rpm")):
        assert "| WHERE openai.completions.batch IS NULL OR openai.completions.batch == false" in q.splitlines()


def test_corrections_can_lower_a_minute():
    docs = [usage("completions", T0, "p", "m", tokens=90), usage("completions", T0, "p", "m", tokens=-30, revision=1),
            usage("completions", T1, "p", "m", tokens=70), limit(T0, "p", "m", tpm=100)]
    (row,) = H.per_project(docs)
    assert row["peak_tpm"] == 70  # T0 is 60 after the correction, T1 is 70


def test_alert_ids_are_project_model():
    assert H.alerts(DOCS) == ["proj_a::gpt-4o-mini"]
    assert H.alerts(DOCS, threshold=0.6) == ["proj_a::gpt-4o-mini", "proj_b::gpt-4o-mini"]
    assert H.alerts(DOCS, unit="rpm", threshold=0.08) == ["proj_a::gpt-4o-mini", "proj_a::gpt-image-1"]


# ---------------------------------------------------------------------------------------------
# The ES|QL rendering


def test_queries_are_rendered_from_one_definition():
    per_project, rule = Q.headroom_per_project(), Q.headroom_rule("tpm")
    core = "\n".join(Q._per_project_core(Q.DEFAULT_SOURCES))
    assert core in per_project and core in Q.headroom_org_wide()
    rule_core = "\n".join(Q._per_project_core(Q.DEFAULT_SOURCES, usage_minutes=22))
    assert rule_core in rule and rule_core in Q.headroom_rule("rpm")
    rules = {r.name: r for r in K.rules()}
    assert rules[K.HEADROOM_RULE_NAME].query == rule
    panels = {p.title: p.query for d in K.dashboards() for p in d.panels}
    assert panels["Rate limit headroom - per project and model"] == per_project
    assert panels["Rate limit headroom - by model (org-wide)"] == Q.headroom_org_wide()


def test_headroom_query_semantics_in_text():
    q = Q.headroom_per_project()
    regex = '"-[0-9]{4}-[0-9]{2}-[0-9]{2}$"'
    # normalization applied to the one model column both sides feed (usage and limits)
    assert f"REPLACE(COALESCE(openai.base.model, openai.rate_limits.model), {regex}, \"\")" in q
    assert "SUM(openai.base.usage_tokens)" in q  # usage summed per minute (corrections)
    assert "BY project_model, minute" in q
    assert "MAX(openai.rate_limits.max_tokens_per_1_minute)" in q
    assert "SUM(openai.rate_limits" not in q  # limits never summed per project
    assert "COALESCE(peak_tpm, 0)" in q  # 0% rows
    assert "audio_megabytes" not in q


def test_rule_has_the_seed_tuning_line():
    q = Q.headroom_rule("tpm")
    assert "| WHERE tpm_utilization >= 0.8" in q.splitlines()
    assert Q.headroom_rule("tpm", 0.9).count("WHERE tpm_utilization >= 0.9") == 1
    assert "| WHERE rpm_utilization >= 0.8" in Q.headroom_rule("rpm").splitlines()
    with pytest.raises(ValueError):
        Q.headroom_rule("audio")


def test_org_wide_columns_are_labelled_aggregate_and_approx():
    q = Q.headroom_org_wide()
    for u in Q.UNITS:
        assert f"`{Q.org_limit_column(u)}`" in q and f"`{Q.org_utilization_column(u)}`" in q
    assert all("limit (aggregate)" in Q.org_limit_column(u) for u in Q.UNITS)
    assert all("utilization (approx.)" in Q.org_utilization_column(u) for u in Q.UNITS)


def test_a_limit_that_dropped_within_the_window_still_counts_at_its_max():
    docs = [usage("completions", T0, "p", "m", tokens=50), limit(T0, "p", "m", tpm=400), limit(T1, "p", "m", tpm=100)]
    (row,) = H.per_project(docs)
    assert (row["tpm_limit"], row["tpm_utilization"]) == (400, 0.125)  # MAX, not the latest


def test_reference_reads_event_dataset_and_epoch_timestamps():
    """Documents without data_stream.dataset fall back to event.dataset; epoch milliseconds and
    seconds land in the same minute as the ISO time."""
    t0_ms = 1779777600000  # 2026-05-26T06:40:00Z
    assert H._minute(t0_ms) == H._minute(t0_ms // 1000) == H._minute(T0)
    doc = usage("completions", t0_ms + 30_000, "p", "m", tokens=40)
    doc["event"] = {"dataset": doc.pop("data_stream")["dataset"]}
    docs = [doc, usage("completions", T0, "p", "m", tokens=50), limit(T0, "p", "m", tpm=100)]
    (row,) = H.per_project(docs)
    assert row["peak_tpm"] == 90  # one minute: 40 + 50


def test_headroom_core_semantics_in_text():
    """The ES|QL lines behind each rule of the queries module docstring (no cluster needed)."""
    core = Q._per_project_core(Q.DEFAULT_SOURCES)
    # 3. only 1m buckets; documents without a width (and the limit documents) count
    assert '| WHERE openai.base.bucket_width IS NULL OR openai.base.bucket_width == "1m"' in core
    assert "       minute = DATE_TRUNC(1 minute, @timestamp)" in core
    assert "| WHERE project_id IS NOT NULL AND model IS NOT NULL" in core
    # 4. the peak minute (MAX of the per-minute sums); 5. limits MAX, never MIN or SUM
    stats = [line for line in core if line.startswith("| STATS")]
    assert len(stats) == 2 and stats[1].endswith(" BY project_model")
    for u in Q.UNITS:
        assert f"peak_{u} = MAX({u}_used)" in stats[1] and f"{u}_limit = MAX({u}_lim)" in stats[1]
    # 7. a row for every project and model with a limit for any unit
    assert "| WHERE tpm_limit IS NOT NULL OR rpm_limit IS NOT NULL OR ipm_limit IS NOT NULL" in core
    # 6. utilization in floating point: ES|QL divides two integers as an integer (0.85 -> 0)
    for u in Q.UNITS:
        ratio = f"{u}_utilization = ROUND(TO_DOUBLE(peak_{u}) / {u}_limit, 4)"
        assert ratio in Q.headroom_per_project() and ratio in Q.headroom_rule(u)
    org = Q.headroom_org_wide()
    assert f"ROUND(TO_DOUBLE(`{Q.org_usage_column('tpm')}`) / `{Q.org_limit_column('tpm')}`, 4)" in org
    # 8. org-wide: only projects with a limit for the unit add their peak
    for u in Q.UNITS:
        assert f"{u}_counted = CASE({u}_limit IS NOT NULL, peak_{u})" in org
    # the panel lists the tightest first
    assert "| SORT tpm_utilization DESC NULLS LAST, rpm_utilization DESC NULLS LAST, project_id, model" \
        in Q.headroom_per_project().splitlines()


def test_stale_rule_needs_a_collection_in_its_window():
    """An ungrouped STATS gives one row (of nulls) over no rows: the final WHERE requires a
    collection in the window, so a cluster without rate-limits data, or a stream turned off longer
    than the horizon ago, gives no row instead of firing forever."""
    lines = Q.limits_stale_rule().splitlines()
    assert lines[1] == '| WHERE event.action == "rate-limits-collection"'
    stats = next(line for line in lines if line.startswith("| STATS"))
    assert stats.endswith(" BY namespace"), "one row (alert) per collector"
    assert any(line.startswith("| EVAL ") and line.endswith(", namespace = data_stream.namespace") for line in lines)
    assert "last_success = MAX(success_at)" in stats
    assert "last_collection = MAX(@timestamp)" in stats
    assert "| WHERE last_collection IS NOT NULL AND (last_success IS NULL OR last_success < NOW() - 60 minutes)" in lines
    assert "NOW() - 90 minutes" in Q.limits_stale_rule(stale_after_minutes=90)


MIN = 60
NOW = 1767225600  # 2026-01-01T00:00:00Z


def iso(t):
    from datetime import datetime, timezone
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def test_stale_model_fires_only_after_a_collection_went_stale():
    ok = lambda t: status(iso(t))  # noqa: E731
    fail = lambda t: status(iso(t), "failure")  # noqa: E731
    stale = lambda docs: H.limits_stale(docs, now=NOW, stale_after_minutes=60)  # noqa: E731
    assert stale([]) == []  # never collected (fresh install) or the stream is off: no alert
    assert stale([ok(NOW - 30 * MIN)]) == []
    assert stale([ok(NOW - 61 * MIN)]) != []  # the collector stopped writing
    (row,) = stale([ok(NOW - 90 * MIN), fail(NOW - 30 * MIN), fail(NOW - 25 * MIN)])
    assert row["failed_collections"] == 2
    assert stale([fail(NOW - 5 * MIN)])[0]["last_success"] is None  # failing from the first cycle
    # only the documents in the rule's time window reach it: the window (the horizon) bounds it
    rule = next(r for r in K.rules() if r.id == K.RULE_ID_LIMITS_STALE)
    assert rule.window_minutes == 60 + 24 * 60


def test_rule_model_keeps_the_last_known_limit_and_prefers_a_recent_one():
    use = lambda t, tokens: usage("completions", iso(t), "p", "m", tokens=tokens)  # noqa: E731
    lim = lambda t, tpm: limit(iso(t), "p", "m", tpm=tpm)  # noqa: E731
    kw = {"now": NOW, "usage_minutes": 15}
    # limits stopped 40 minutes ago: the rule still compares usage with the last known limit
    (row,) = H.per_project([lim(NOW - 40 * MIN, 1000), use(NOW - 5 * MIN, 900)], **kw)
    assert (row["peak_tpm"], row["tpm_limit"], row["tpm_utilization"]) == (900, 1000, 0.9)
    # a limit inside the usage window wins over an older (higher) one: the seed's MAX over 15m
    (row,) = H.per_project([lim(NOW - 40 * MIN, 5000), lim(NOW - 10 * MIN, 1000), use(NOW - 5 * MIN, 900)], **kw)
    assert row["tpm_limit"] == 1000
    # usage older than the usage window does not count, even though the documents reach the rule
    (row,) = H.per_project([lim(NOW - 10 * MIN, 1000), use(NOW - 20 * MIN, 990), use(NOW - 5 * MIN, 100)], **kw)
    assert row["peak_tpm"] == 100
    # without now/usage_minutes (the panels): the seed's semantics, every document given counts
    (row,) = H.per_project([lim(NOW - 40 * MIN, 5000), lim(NOW - 10 * MIN, 1000), use(NOW - 20 * MIN, 990)])
    assert (row["tpm_limit"], row["peak_tpm"]) == (5000, 990)


def test_rule_model_takes_the_max_of_the_usage_window_and_of_the_latest_minute():
    """The ES|QL it models: a limit lowered *inside* the usage window still counts at its MAX
    there (the seed's stabilization, COALESCE's first argument), and the last known limit is the
    MAX of the latest minute that has one (the family and a dated snapshot collapse onto one key,
    and MAX over the packed minute+limit picks the highest of that minute), whatever the order of
    the documents."""
    lim = lambda t, tpm, model="m": limit(iso(t), "p", model, tpm=tpm)  # noqa: E731
    use = usage("completions", iso(NOW - 5 * MIN), "p", "m", tokens=900)
    kw = {"now": NOW, "usage_minutes": 15}
    (row,) = H.per_project([lim(NOW - 12 * MIN, 2000), lim(NOW - 8 * MIN, 1000), use], **kw)
    assert row["tpm_limit"] == 2000
    # the window's first minute is in it (`@timestamp >= NOW() - 15 minutes`), usage and limit alike
    edge = [lim(NOW - 15 * MIN, 1000), usage("completions", iso(NOW - 15 * MIN), "p", "m", tokens=950)]
    (row,) = H.per_project([lim(NOW - 40 * MIN, 5000), *edge], **kw)
    assert (row["peak_tpm"], row["tpm_limit"]) == (950, 1000)
    latest = [lim(NOW - 60 * MIN, 5000), lim(NOW - 30 * MIN, 800), lim(NOW - 30 * MIN, 1000, "m-2024-08-06")]
    for docs in (latest, latest[::-1]):
        (row,) = H.per_project([*docs, use], **kw)
        assert (row["tpm_limit"], row["tpm_utilization"]) == (1000, 0.9)


def test_the_packed_last_known_limit_keeps_the_latest_minute_and_its_limit():
    """The rules pack each minute's limit behind the minute (`TO_LONG(minute) / 60000 *
    LIMIT_AT_SCALE + limit`) so that MAX gives the latest minute's. A limit reaching the scale
    would spill into the minute: a later minute with a lower limit would lose to an earlier one
    with a higher limit, and `% LIMIT_AT_SCALE` would return a wrong limit. OpenAI's per-minute
    limits reach hundreds of millions of tokens (and custom ones more): keep ample room, and the
    packed value inside a signed long for this century."""
    def pack(minute_ms, lim):
        return minute_ms // 60000 * Q.LIMIT_AT_SCALE + lim

    biggest = 10**10  # 10 billion per minute: far above any limit OpenAI publishes
    t = 4102444800000  # 2100-01-01T00:00:00Z
    assert pack(t + 60000, 1) > pack(t, biggest)
    assert pack(t, biggest) % Q.LIMIT_AT_SCALE == biggest
    assert pack(t, Q.LIMIT_AT_SCALE - 1) < 2**63


def test_rule_query_text_matches_the_rule_model():
    q = Q.headroom_rule("tpm", usage_minutes=15).splitlines()
    assert "| WHERE openai.rate_limits.model IS NOT NULL OR @timestamp >= NOW() - 15 minutes" in q
    for u, (_, field, _) in Q.UNITS.items():
        assert any(f"{u}_recent = CASE(@timestamp >= NOW() - 15 minutes, {field})" in line for line in q)
        # else the latest limit of the look-back: packed behind its minute, MAX, unpacked
        assert any(f"{u}_lim_at = CASE({u}_lim IS NOT NULL, TO_LONG(minute) / 60000 * {Q.LIMIT_AT_SCALE} + {u}_lim)"
                   in line for line in q)
        assert any(f"{u}_limit_last = MAX({u}_lim_at)" in line for line in q)
        assert any(f"{u}_limit = COALESCE({u}_limit_recent, {u}_limit_last % {Q.LIMIT_AT_SCALE})" in line for line in q)
    # the panels keep the seed's semantics: the dashboard time range is the window for both sides
    assert "NOW()" not in Q.headroom_per_project() and "NOW()" not in Q.headroom_org_wide()


def test_rate_limits_default_interval_is_five_minutes():
    """The coverage test below collects every COLLECTION_INTERVAL_MIN minutes: the default."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "manifest.yml").read_text()
    block = text[text.index("  - name: rate_limits"):]
    block = block[:block.index("\n  - name: ", 5)]
    assert "*interval_5m" in block and "default: 5m" in text[text.index("&interval_5m"):][:200]
    assert COLLECTION_INTERVAL_MIN == 5


COLLECTION_INTERVAL_MIN = 5  # the rate_limits stream's default interval (manifest.yml)


def _window(docs):
    """`window(now, minutes)`: the documents a rule run at `now` with that time window sees."""
    stamps = [(H._time(d["@timestamp"]).timestamp(), d) for d in docs]
    return lambda now, minutes: [d for ts, d in stamps if now - minutes * MIN <= ts <= now]


def _watched(docs, head, watch_rule, watch, unit="tpm"):
    """For a never-silent check: the headroom rule's alerts and a watching rule's rows at `now`
    (its Python model `watch`), each over the documents its own time window sees, and
    `silent(alert, watched)`: the minutes after NOW (each minute for the first 2 h, where the
    hand-over happens, then every 30 until the horizon) at which the headroom rule does not alert
    `alert` and the watching rule's run one schedule interval earlier (whatever the phase of the
    two schedules) has no row `watched(rows)` accepts."""
    o, every, window = K.RuleOptions(), K.RULE_INTERVAL_MINUTES, _window(docs)

    def alerts(now):
        return H.alerts(window(now, head.window_minutes), unit, now=now, usage_minutes=o.headroom_window_minutes)

    def rows(now):
        return watch(window(now, watch_rule.window_minutes), now=now, stale_after_minutes=o.stale_after_minutes)

    def silent(alert, watched):
        minutes = [*range(0, 120), *range(120, o.stale_window_minutes - every, 30)]
        return [m for m in minutes if not watched(rows(NOW + (m - every) * MIN)) and alert not in alerts(NOW + m * MIN)]

    return alerts, rows, silent


@pytest.mark.parametrize("unit", ["tpm", "rpm"])
def test_with_the_defaults_a_stalled_collection_is_never_silent(unit):
    """The seed's weakness: limits stop arriving, the headroom rule goes silent. Limits are
    collected every 5 minutes until `stop`; usage stays at 95% of the limit throughout. At every
    minute until the stale alert's horizon, either the headroom rule (its window = the limits
    look-back) still alerts, or the stale rule has fired on a run at most one schedule interval
    earlier (whatever the phase of the two 5-minute schedules)."""
    rules = {r.id: r for r in K.rules()}
    head = rules[K.RULE_ID_HEADROOM_TPM if unit == "tpm" else K.RULE_ID_HEADROOM_RPM]
    stale_rule = rules[K.RULE_ID_LIMITS_STALE]
    o = K.RuleOptions()
    stop = NOW
    docs = []
    for t in range(stop - 3 * 60 * MIN, stop + 1, COLLECTION_INTERVAL_MIN * MIN):
        docs += [limit(iso(t), "p", "gpt-4o", tpm=10_000, rpm=100), status(iso(t))]
    for t in range(stop - 3 * 60 * MIN, stop + 3 * 60 * MIN, MIN):
        docs.append(usage("completions", iso(t), "p", "gpt-4o-2024-08-06", tokens=9_500, requests=95))
    headroom_alerts, stale, silent = _watched(docs, head, stale_rule, H.limits_stale, unit)
    assert headroom_alerts(stop) == ["p::gpt-4o"] and stale(stop) == []
    assert silent("p::gpt-4o", bool) == []
    # the stale alert does end: a stream turned off stops alerting after the horizon
    assert stale(stop + (o.stale_window_minutes + 1) * MIN) == []


def test_the_last_known_limit_is_the_latest_not_the_highest_in_the_look_back():
    """A project's limit lowered (an admin edited it), then limits stop arriving: once none is
    left in the usage window, the rule compares usage with the limit that arrived last, not with
    the higher one from before the change that is still in its look-back. With the MAX, a project
    at 95% of its real limit read 47.5% for 45 minutes, and the rule's alert delay never passed
    before the stale rule took over, 70 minutes without an alert."""
    use = lambda t: usage("completions", iso(t), "p", "gpt-4o", tokens=9_500, requests=95)  # noqa: E731
    lim = lambda t, tpm: limit(iso(t), "p", "gpt-4o", tpm=tpm, rpm=100)  # noqa: E731
    docs = [lim(NOW - m * MIN, 20_000) for m in range(60, 30, -5)] + [lim(NOW - m * MIN, 10_000) for m in (30, 25)]
    docs += [use(NOW - m * MIN) for m in range(0, 5)]
    (row,) = H.per_project(docs, now=NOW, usage_minutes=15)
    assert (row["tpm_limit"], row["tpm_utilization"]) == (10_000, 0.95)
    # the panels keep the seed's MAX over the dashboard's time range
    (row,) = H.per_project(docs)
    assert row["tpm_limit"] == 20_000
    # minute by minute: the headroom rule or the stale rule, never neither
    rules = {r.id: r for r in K.rules()}
    head, stale_rule = rules[K.RULE_ID_HEADROOM_TPM], rules[K.RULE_ID_LIMITS_STALE]
    stop = NOW
    docs = []
    for t in range(stop - 3 * 60 * MIN, stop + 1, COLLECTION_INTERVAL_MIN * MIN):
        docs += [limit(iso(t), "p", "gpt-4o", tpm=20_000 if t < stop - 30 * MIN else 10_000), status(iso(t))]
    for t in range(stop - 3 * 60 * MIN, stop + 3 * 60 * MIN, MIN):
        docs.append(usage("completions", iso(t), "p", "gpt-4o", tokens=9_500))
    _, _, silent = _watched(docs, head, stale_rule, H.limits_stale)
    assert silent("p::gpt-4o", bool) == []


def test_a_stopped_collector_is_not_hidden_by_another_organization_s():
    """Two organizations, one collector each (namespaces `orga` and `orgb`), limits every 5
    minutes. `orgb`'s collector stops at `stop`; `orga`'s goes on succeeding. Its projects' usage
    stays at 95% of the limit: at every minute, either the headroom rule still alerts for `orgb`'s
    project or the stale rule fired for `orgb`. An ungrouped stale rule saw `orga`'s successes
    and stayed quiet, while the headroom rule lost `orgb`'s limits after 70 minutes."""
    rules = {r.id: r for r in K.rules()}
    head, stale_rule = rules[K.RULE_ID_HEADROOM_TPM], rules[K.RULE_ID_LIMITS_STALE]
    assert stale_rule.params("9.1.0")["groupBy"] == "row"  # one alert per namespace
    stop = NOW
    docs = []
    for t in range(stop - 3 * 60 * MIN, stop + 30 * 60 * MIN, COLLECTION_INTERVAL_MIN * MIN):
        docs += [limit(iso(t), "pa", "gpt-4o", tpm=10_000), status(iso(t), namespace="orga")]
        if t <= stop:
            docs += [limit(iso(t), "pb", "gpt-4o", tpm=10_000), status(iso(t), namespace="orgb")]
    for t in range(stop - 3 * 60 * MIN, stop + 30 * 60 * MIN, MIN):
        docs.append(usage("completions", iso(t), "pb", "gpt-4o", tokens=9_500, requests=95))
    headroom_alerts, stale, silent = _watched(docs, head, stale_rule, H.limits_stale)
    namespaces = lambda rows: [r["namespace"] for r in rows]  # noqa: E731
    assert headroom_alerts(stop) == ["pb::gpt-4o"] and stale(stop) == []
    assert silent("pb::gpt-4o", lambda rows: "orgb" in namespaces(rows)) == []
    assert namespaces(stale(stop + 2 * 60 * MIN)) == ["orgb"]  # only the collector that stopped


def project_failure(ts, project):
    return {"@timestamp": ts, "data_stream": {"dataset": "openai.rate_limits"},
            "event": {"kind": "event", "action": "rate-limits-project-failure", "outcome": "failure"},
            "openai": {"rate_limits": {"project_id": project}}, "error": {"message": "HTTP 500"}}


def test_project_failing_model_fires_for_a_project_that_keeps_failing_not_one_that_went_away():
    fail = lambda t, p="p": project_failure(iso(t), p)  # noqa: E731
    lim = lambda t, p="p": limit(iso(t), p, "gpt-4o", tpm=1000)  # noqa: E731
    failing = lambda docs: [r["project_id"] for r in H.projects_failing(docs, now=NOW, stale_after_minutes=60)]  # noqa: E731,E501
    # read 65 minutes ago, failing every 5 minutes since: fires
    assert failing([lim(NOW - 65 * MIN)] + [fail(NOW - m * MIN) for m in range(0, 65, 5)]) == ["p"]
    # read 50 minutes ago: the headroom rules still have its limits, not yet
    assert failing([lim(NOW - 50 * MIN)] + [fail(NOW - m * MIN) for m in range(0, 50, 5)]) == []
    # failing since the first cycle in the window, never read: fires once failing for 60 minutes
    assert failing([fail(NOW - m * MIN) for m in range(0, 70, 5)]) == ["p"]
    assert failing([fail(NOW - m * MIN) for m in range(0, 55, 5)]) == []
    # failed once, 60 minutes ago, and gone (deleted between the listing and its limits): no alert
    assert failing([lim(NOW - 65 * MIN), fail(NOW - 60 * MIN)]) == []
    # recovered: read again after the failures
    assert failing([fail(NOW - m * MIN) for m in range(10, 90, 5)] + [lim(NOW - 5 * MIN)]) == []
    # other projects read fine (the cycle succeeds) do not fire; status and limit-less docs are ignored
    docs = [lim(NOW - m * MIN, "q") for m in range(0, 90, 5)] + [status(iso(NOW))]
    assert failing(docs + [fail(NOW - m * MIN) for m in range(0, 90, 5)]) == ["p"]
    row = H.projects_failing([lim(NOW - 65 * MIN)] + [fail(NOW - m * MIN) for m in range(0, 65, 5)],
                             now=NOW, stale_after_minutes=60)[0]
    assert row["failures"] == 13 and row["last_read"] == H._time(iso(NOW - 65 * MIN))


def test_project_failing_model_counts_a_failure_exactly_half_of_stale_after_ago():
    """The query keeps `last_failure >= NOW() - 30 minutes` (stale-after 60): a failure exactly
    that long ago still counts as recent, in the reference as in the ES|QL."""
    fail = lambda t: project_failure(iso(t), "p")  # noqa: E731
    docs = [limit(iso(NOW - 65 * MIN), "p", "gpt-4o", tpm=1000), fail(NOW - 60 * MIN), fail(NOW - 30 * MIN)]
    assert [r["project_id"] for r in H.projects_failing(docs, now=NOW, stale_after_minutes=60)] == ["p"]
    docs[-1] = fail(NOW - 30 * MIN - 1)
    assert H.projects_failing(docs, now=NOW, stale_after_minutes=60) == []


def test_project_failing_query_text_matches_its_model():
    q = Q.project_limits_failing_rule(stale_after_minutes=60).splitlines()
    assert q[0] == "FROM logs-openai.rate_limits-*"
    assert '| WHERE openai.rate_limits.model IS NOT NULL OR event.action == "rate-limits-project-failure"' in q
    assert any('failed_at = CASE(event.action == "rate-limits-project-failure", @timestamp)' in line and
               "read_at = CASE(openai.rate_limits.model IS NOT NULL, @timestamp)" in line for line in q)
    stats = next(line for line in q if line.startswith("| STATS"))
    assert stats.endswith(" BY project_id"), "the alert id is the project"
    for part in ("last_failure = MAX(failed_at)", "first_failure = MIN(failed_at)", "last_read = MAX(read_at)"):
        assert part in stats
    assert ("| WHERE project_id IS NOT NULL AND last_failure >= NOW() - 30 minutes "
            "AND COALESCE(last_read, first_failure) < NOW() - 60 minutes") in q


def test_with_the_defaults_a_project_whose_limits_keep_failing_is_never_silent():
    """One project's limits fail from `stop` on while the others are read (every cycle a
    success, so the stale rule never fires); its usage stays at 95% of its limit. At every minute
    until the rule's horizon, either the headroom rule still alerts for it with its last known
    limits, or the per-project failing rule fired on a run at most one schedule interval earlier."""
    rules = {r.id: r for r in K.rules()}
    head, failing_rule = rules[K.RULE_ID_HEADROOM_TPM], rules[K.RULE_ID_PROJECT_LIMITS_FAILING]
    stop = NOW
    docs = []
    for t in range(stop - 3 * 60 * MIN, stop + 30 * 60 * MIN, COLLECTION_INTERVAL_MIN * MIN):
        docs += [limit(iso(t), "q", "gpt-4o", tpm=10_000), status(iso(t))]
        docs.append(limit(iso(t), "p", "gpt-4o", tpm=10_000) if t <= stop else project_failure(iso(t), "p"))
    for t in range(stop - 3 * 60 * MIN, stop + 30 * 60 * MIN, MIN):
        docs.append(usage("completions", iso(t), "p", "gpt-4o", tokens=9_500, requests=95))
    headroom_alerts, failing, silent = _watched(docs, head, failing_rule, H.projects_failing)
    projects = lambda rows: [r["project_id"] for r in rows]  # noqa: E731
    assert headroom_alerts(stop) == ["p::gpt-4o"] and failing(stop) == []
    assert silent("p::gpt-4o", lambda rows: "p" in projects(rows)) == []
    assert all(projects(failing(stop + m * MIN)) == ["p"] for m in range(65, 24 * 60, 60)), "it stays active"


def test_failed_logins_panel_counts_only_failures():
    q = Q.audit_panels()["failed_logins"]
    assert '| WHERE openai.audit.type IN ("login.failed", "logout.failed")' in q.splitlines()


def test_key_lifecycle_panel_lists_every_api_key_event_type():
    """Every created/updated/deleted type of an API key in OpenAI's audit log (one declared
    flattened field each, pinned to the API reference by test_assets), admin and project keys too."""
    from kibana_assets import fields as F

    declared = {n[len("openai.audit."):] for n, t in F.field_types("audit").items() if t == "flattened"}
    key_types = {t for t in declared if t.rsplit(".", 1)[0].endswith("api_key")}
    assert {"api_key.created", "api_key.deleted", "tenant.admin_api_key.deleted"} <= key_types
    where = next(line for line in Q.audit_panels()["key_lifecycle"].splitlines() if line.startswith("| WHERE"))
    listed = set(re.findall(r'"([^"]+)"', where))
    assert listed == key_types


@pytest.mark.parametrize("name", sorted(set(Q.usage_panels()) | set(Q.costs_panels())))
def test_usage_and_cost_panels_sum_every_figure(name):
    """The dashboards' promise: every figure sums the bucket documents (corrections carry only the
    difference), so a field is aggregated with SUM, never COUNT (documents, not requests) or MAX."""
    query = {**Q.usage_panels(), **Q.costs_panels()}[name]
    aggs = re.findall(r"\b([A-Z_]+)\((openai\.[a-z0-9_.]+)\)", query)
    assert aggs, "no figure found"
    assert [f for f, _ in aggs if f != "SUM"] == [], aggs


# ES|QL returns 1,000 rows when a query has no LIMIT after its last STATS (its implicit LIMIT)
ESQL_IMPLICIT_LIMIT = 1000
TIME_SERIES_PANELS = sorted(n for n, q in Q.all_queries().items() if "BUCKET(" in q)


def _rows_returned(query: str) -> int:
    """How many rows ES|QL returns at most: the LIMIT after the last STATS, else its implicit one."""
    tail = query.split("| STATS ")[-1]
    limits = re.findall(r"^\| LIMIT (\d+)$", tail, re.M)
    return int(limits[-1]) if limits else ESQL_IMPLICIT_LIMIT


def test_the_over_time_panels_are_found():
    assert {"usage.vector_store_bytes", "usage.code_interpreter_sessions", "usage.requests_over_time",
            "costs.cost_over_time", "audit.events_over_time"} <= set(TIME_SERIES_PANELS)


@pytest.mark.parametrize("name", TIME_SERIES_PANELS)
def test_over_time_panels_return_every_series_of_every_display_bucket(name):
    """An over-time panel returns a row per display bucket (BUCKET's target, 50) and series
    (project, model, action, ...), sorted by time. Without a LIMIT, ES|QL cut the rows at 1,000:
    the latest buckets of a 50-project organization's last 24 hours (vector store bytes: 1,666
    rows; code interpreter sessions: 1,454) were missing, 8 to 10 hours of the chart. The panels
    ask for Q.TIME_SERIES_ROWS, the most ES|QL returns: 200 series in every bucket."""
    query = Q.all_queries()[name]
    assert "BUCKET(@timestamp, 50, ?_tstart, ?_tend)" in query or "BUCKET(start, 50, ?_tstart, ?_tend)" in query
    assert _rows_returned(query) >= 50 * 200
    assert _rows_returned(query) == Q.TIME_SERIES_ROWS == 10_000


def test_the_per_project_panel_returns_every_pair_with_a_limit():
    """The headroom table has a row for every (project, model) with a limit, 0% when unused. Its
    LIMIT 1,000 cut the large demo organization's 1,260 pairs (50 projects), the least used
    first, models near only their images/min limit among them (not in the SORT)."""
    query = Q.headroom_per_project()
    assert _rows_returned(query) == Q.PER_PROJECT_ROWS == 10_000


esql = pytest.importorskip("kibana_assets.esql", reason="esql-parser is not installed")


@pytest.mark.parametrize("name", sorted(Q.all_queries()))
def test_every_query_parses_and_references_mapped_fields(name):
    from kibana_assets.validate import query_problems

    assert query_problems(name, Q.all_queries()[name]) == []


def test_parser_rejects_broken_esql_and_unknown_fields():
    from kibana_assets.validate import query_problems

    with pytest.raises(esql.EsqlSyntaxError):
        esql.parse("FROM x | STATS BY BY")
    bad = "FROM logs-openai.completions-*\n| STATS x = SUM(openai.base.no_such_field)"
    assert query_problems("bad", bad) == ["bad: references openai.base.no_such_field, which no dataset it reads maps"]
    # a field of another dataset does not count
    other = "FROM logs-openai.costs-*\n| STATS x = SUM(openai.base.usage_tokens)"
    assert query_problems("other", other)
    # nor one mapped on another dataset of the FROM only: without that one's data stream, ES|QL
    # fails the query ("Unknown column"; the usage overview's audio and tool call panels did)
    some = "FROM logs-openai.completions-*, logs-openai.embeddings-*\n| STATS x = SUM(openai.completions.input_tokens)"
    assert query_problems("some", some) == [
        "some: references openai.completions.input_tokens, which embeddings does not map:"
        " ES|QL fails (Unknown column) while no data stream that maps it exists"]
    # the limits too: each dataset of the FROM, whatever its namespace (no field is exempt)
    limits = ("FROM logs-openai.rate_limits-orga, logs-openai.costs-orga\n"
              "| STATS x = MAX(openai.rate_limits.max_tokens_per_1_minute)")
    assert query_problems("limits", limits) == [
        "limits: references openai.rate_limits.max_tokens_per_1_minute, which costs does not map:"
        " ES|QL fails (Unknown column) while no data stream that maps it exists"]
    # a data stream the assets do not define (a typo) is a problem, not a FileNotFoundError
    typo = "FROM logs-openai.completion-*\n| STATS x = SUM(openai.base.usage_tokens)"
    assert query_problems("typo", typo) == [
        "typo: reads logs-openai.completion, a data stream no fields file defines",
        "typo: references openai.base.usage_tokens, which no dataset it reads maps"]


def test_field_references_follow_the_columns_each_command_creates_in_order():
    """A column a RENAME, GROK or unassigned aggregate creates is not a source field (validate
    reported one as a field no dataset maps), and a name read before the command that creates it
    is one: RENAME's old name, or a WHERE before the EVAL (ES|QL fails it: Unknown column), were
    passed without a check."""
    from kibana_assets.validate import query_problems

    src = "FROM logs-openai.completions-*\n"
    ok = {
        "rename": "| RENAME openai.base.model AS m\n| STATS t = SUM(openai.base.usage_tokens) BY m",
        "rename_assign": "| RENAME m = openai.base.model\n| STATS t = SUM(openai.base.usage_tokens) BY m",
        "grok": "| GROK openai.base.model \"%{WORD:family}-%{GREEDYDATA:rest}\"\n| STATS c = COUNT(*) BY family",
        "unassigned": "| STATS SUM(openai.base.usage_tokens) BY openai.base.model\n"
                      "| SORT `SUM(openai.base.usage_tokens)` DESC",
        "reassigned": "| EVAL openai.base.model = CONCAT(openai.base.model, \"!\")\n| KEEP openai.base.model",
    }
    for name, tail in ok.items():
        assert query_problems(name, src + tail) == [], name
    bad = {
        "rename_old": ("| RENAME openai.base.no_such AS m\n| KEEP m", "openai.base.no_such"),
        "before": ("| WHERE tokens > 0\n| EVAL tokens = openai.base.usage_tokens", "tokens"),
    }
    for name, (tail, ref) in bad.items():
        assert query_problems(name, src + tail) == [f"{name}: references {ref}, which no dataset it reads maps"]


def test_field_references_follow_each_command_s_own_order_and_patterns():
    """A command reads its input before the column it creates exists (`EVAL x = x + 1`, `GROK x
    "%{WORD:x}"` read the source's x); an unassigned aggregate is named after its text as written
    (spaces kept); DISSECT's `->` and GROK's `:type` are not part of the column's name."""
    from kibana_assets.validate import query_problems

    src = "FROM logs-openai.completions-*\n"
    ok = {
        "spaced": "| STATS SUM( openai.base.usage_tokens )\n| SORT `SUM( openai.base.usage_tokens )`",
        "dissect": "| DISSECT openai.base.model \"%{family->}-%{size}\"\n| STATS c = COUNT(*) BY family, size",
        "grok_type": "| GROK openai.base.model \"%{WORD:family}-%{NUMBER:size:int}\"\n| STATS c = COUNT(*) BY family, size",
    }
    for name, tail in ok.items():
        assert query_problems(name, src + tail) == [], name
    bad = {
        "eval_self": "| EVAL tokens = tokens + 1\n| KEEP tokens",
        "grok_self": "| GROK tokens \"%{NUMBER:tokens}\"\n| KEEP tokens",
        "dissect_self": "| DISSECT tokens \"%{tokens}\"\n| KEEP tokens",
    }
    for name, tail in bad.items():
        assert query_problems(name, src + tail) == [f"{name}: references tokens, which no dataset it reads maps"]


def test_field_references_follow_the_columns_each_command_leaves():
    """After a STATS only its aggregates and groups are columns, after a KEEP only what it kept; a
    DROP or RENAME takes its names away; and each KEEP or DROP name or pattern must match a column.
    ES|QL fails each bad query here ("Unknown column", "No matches found for pattern"); validate
    passed them all, reading any name not created before as a source field and never checking
    KEEP or DROP."""
    from kibana_assets.validate import query_problems

    src = "FROM logs-openai.completions-*\n"
    ok = {
        "stats_keep": "| STATS c = COUNT(*) BY m = openai.base.model\n| KEEP c*, m\n| SORT c DESC",
        "keep_pattern": "| KEEP @timestamp, openai.base.*\n| WHERE openai.base.usage_tokens > 0",
        "drop_then_eval": "| STATS c = COUNT(*) BY m = openai.base.model\n| DROP m\n| EVAL m = \"x\"\n| KEEP m, c",
        "eval_in_order": "| EVAL a = openai.base.usage_tokens, b = a + 1\n| STATS SUM(b)",
    }
    for name, tail in ok.items():
        assert query_problems(name, src + tail) == [], name
    gone = {
        "after_stats": ("| STATS c = COUNT(*) BY m = openai.base.model\n| WHERE openai.base.usage_tokens > 0",
                        "openai.base.usage_tokens", "is", "STATS"),
        "after_keep": ("| KEEP openai.base.model\n| WHERE openai.base.usage_tokens > 0", "openai.base.usage_tokens", "is", "KEEP"),
        "after_keep_pattern": ("| KEEP openai.base.*\n| WHERE event.action == \"x\"", "event.action", "is", "KEEP"),
        "after_drop": ("| DROP openai.base.model\n| STATS c = COUNT(*) BY openai.base.model", "openai.base.model", "is", "DROP"),
        "after_rename": ("| RENAME openai.base.model AS m\n| WHERE openai.base.model == \"x\"", "openai.base.model", "is", "RENAME"),
        "stats_drop": ("| STATS c = COUNT(*) BY m = openai.base.model\n| DROP m\n| SORT m", "m", "is", "DROP"),
        "as_written": ("| STATS SUM( openai.base.usage_tokens )\n| SORT `SUM(openai.base.usage_tokens)`",
                       "SUM(openai.base.usage_tokens)", "is", "STATS"),
        "keep_after_stats": ("| STATS c = COUNT(*) BY openai.base.model\n| KEEP c, openai.base.usage_tokens",
                             "openai.base.usage_tokens", "is", "STATS"),
        "pattern_after_stats": ("| STATS c = COUNT(*) BY openai.base.model\n| DROP openai.base.usage*", "openai.base.usage*",
                                "matches", "STATS"),
    }
    for name, (tail, ref, verb, after) in gone.items():
        assert query_problems(name, src + tail) == [
            f"{name}: references {ref}, which {verb} no column after the {after} before it: ES|QL fails (Unknown column)"], name
    unmapped = {
        "keep": ("| KEEP @timestamp, openai.base.no_such", "openai.base.no_such"),
        "drop": ("| DROP openai.base.no_such", "openai.base.no_such"),
        "keep_pattern": ("| KEEP openai.base.no_such*", "openai.base.no_such*"),
    }
    for name, (tail, ref) in unmapped.items():
        assert query_problems(name, src + tail) == [f"{name}: references {ref}, which no dataset it reads maps"], name
    # a pattern too must match on each dataset read
    both = "FROM logs-openai.completions-*, logs-openai.embeddings-*\n| KEEP @timestamp, openai.completions.input_*"
    assert query_problems("both", both) == [
        "both: references openai.completions.input_*, which embeddings does not map:"
        " ES|QL fails (Unknown column) while no data stream that maps it exists"]


def test_every_panel_and_rule_query_is_valid():
    from kibana_assets.validate import validate_bundle

    problems, notes = validate_bundle()
    assert problems == []
    assert any("ES|QL queries parse" in n for n in notes)


def test_the_headroom_dashboard_lists_the_projects_whose_limits_failed():
    headroom = next(d for d in K.dashboards() if d.id == "openai-elastic-rate-limit-headroom")
    panel = next(p for p in headroom.panels if p.title == "Projects whose limits failed")
    lines = panel.query.splitlines()
    assert '| WHERE event.action == "rate-limits-project-failure"' in lines
    assert any(line.startswith("| STATS failures = COUNT(*)") and line.endswith("BY project_id = openai.rate_limits.project_id")
               for line in lines), "one row per project id, its latest name shown"


@pytest.mark.parametrize("interval", [5, 20, 30])
def test_a_project_failing_every_cycle_stays_alerting_up_to_half_of_stale_after(interval):
    """The failing rule needs a failure within half of --stale-after to call a project still
    failing, so a project that fails every cycle of a `rate_limits` interval up to that bound is
    active at every rule run once it fires (no recovery and new alert per cycle); above it, it
    is not, which is why `--stale-after` must be at least twice the interval."""
    stale_after = 60
    docs = [limit(iso(NOW), "p", "gpt-4o", tpm=1000)]
    docs += [project_failure(iso(t), "p") for t in range(NOW + interval * MIN, NOW + 10 * 60 * MIN, interval * MIN)]

    def fires(minute):
        now = NOW + minute * MIN
        seen = [d for d in docs if H._time(d["@timestamp"]).timestamp() <= now]
        return H.projects_failing(seen, now=now, stale_after_minutes=stale_after) != []

    first = next(m for m in range(0, 3 * 60) if fires(m))
    assert first <= stale_after + interval
    assert all(fires(m) for m in range(first, 8 * 60)), "recovered while still failing"


def test_the_stale_after_help_asks_for_twice_the_rate_limits_interval():
    from click.testing import CliRunner

    from kibana_assets.cli import main

    out = CliRunner().invoke(main, ["install", "--help"]).output
    assert "at least twice the rate_limits" in " ".join(out.split())


@pytest.mark.parametrize("unit", Q.UNITS)
def test_each_rule_returns_the_columns_its_reference_rows_have(unit):
    """An alert shows the rule's columns: the headroom rule's are the reference's per-project row
    (`per_project`: the limit beside the peak, or the utilization cannot be checked) plus the alert
    id; the failing rule's are `projects_failing`'s row, with the minutes since the last read."""
    from kibana_assets import esql

    assert esql.output_columns(Q.headroom_rule(unit)) == [
        "project_model", "project_id", "model", f"peak_{unit}", f"{unit}_limit", f"{unit}_utilization"]
    assert sorted(esql.output_columns(Q.project_limits_failing_rule())) == sorted(
        ["project_id", "last_read", "minutes_since_read", "last_failure", "failures"])


def _headroom_queries():
    """Every query the headroom panels and rules run, by name."""
    headroom = next(d for d in K.dashboards() if d.id == "openai-elastic-rate-limit-headroom")
    from kibana_assets.validate import datasets_of_query

    out = {f"panel {p.title}": p.query for p in headroom.panels
           if set(Q.HEADROOM_USAGE_DATASETS) <= set(datasets_of_query(p.query))}
    rules = {r.id: r for r in K.rules()}
    for rid in (K.RULE_ID_HEADROOM_TPM, K.RULE_ID_HEADROOM_RPM):
        out[f"rule {rules[rid].name}"] = rules[rid].query
    return out


@pytest.mark.parametrize("name", sorted(_headroom_queries()))
def test_every_field_a_headroom_query_names_is_mapped_on_each_dataset_it_reads(name):
    """ES|QL fails a query naming a column that no index it reads maps ("Unknown column"). The
    headroom reads six usage data streams and rate_limits, of which any may not exist yet (a
    stream disabled or never used; a fresh organization with limits but no usage): each field it
    names must resolve on each of them alone, so each one is mapped on every dataset of the FROM.
    `openai.completions.batch` was mapped only on completions: an organization with embeddings
    usage and no completions stream had failing headroom panels and rules. The limits
    (`openai.rate_limits.*`) were mapped only on rate_limits: with the rate_limits stream disabled,
    or before its first cycle, the panels and rules failed instead of returning no row."""
    from kibana_assets import fields as F
    from kibana_assets.validate import datasets_of_query

    query = _headroom_queries()[name]
    read = datasets_of_query(query)
    assert sorted(read) == sorted([*Q.HEADROOM_USAGE_DATASETS, "rate_limits"])
    unresolved = []
    for ref in esql.field_references(query):
        unresolved += [(ref, ds) for ds in read if ref not in F.field_types(ds)]
    assert unresolved == []


USAGE_INTERVAL_MIN = 5  # the usage streams' default interval (manifest.yml)
POLL_SECONDS = 10  # a poll's own duration and the index refresh, before a bucket is searchable


def _runs_seeing_one_breaching_minute(window_minutes, poll_wait, run_phase, late_shift=0):
    """The longest streak of consecutive headroom rule runs (every 5 minutes, each 0, 5 or 20 s late)
    that alert on a single breaching minute M (95% of the TPM limit; every other minute 10%). The
    bucket [M, M+1m) is in the index only once it closed, at the collector's first poll from M+1m
    on (`poll_wait` later, below one USAGE_INTERVAL_MIN), plus POLL_SECONDS: up to 6m10s after M.
    A run sees it from then until M leaves the usage window (`NOW() - window`)."""
    rule = next(r for r in K.rules(K.RuleOptions(headroom_window_minutes=window_minutes))
                if r.id == K.RULE_ID_HEADROOM_TPM)
    m = NOW
    lag = MIN + poll_wait + POLL_SECONDS
    docs = [(t, limit(iso(t), "p", "gpt-4o", tpm=10_000, rpm=100))  # (searchable from, document)
            for t in range(m - 90 * MIN, m + 60 * MIN, COLLECTION_INTERVAL_MIN * MIN)]
    docs += [(t + lag, usage("completions", iso(t), "p", "gpt-4o", tokens=9_500 if t == m else 1_000))
             for t in range(m - 30 * MIN, m + 40 * MIN, MIN)]
    streak = best = 0
    for k in range(8):
        now = m + run_phase + k * K.RULE_INTERVAL_MINUTES * MIN + RUN_LATE[(k + late_shift) % len(RUN_LATE)]
        seen = [d for at, d in docs
                if at <= now and now - rule.window_minutes * MIN <= H._time(d["@timestamp"]).timestamp() <= now]
        fired = H.alerts(seen, "tpm", now=now, usage_minutes=window_minutes) == ["p::gpt-4o"]
        streak = streak + 1 if fired else 0
        best = max(best, streak)
    return best


POLL_WAITS = (0, 100, 200, USAGE_INTERVAL_MIN * MIN - 1)  # from the bucket's close to the next poll
RUN_PHASES = range(3, K.RULE_INTERVAL_MINUTES * MIN, 10)
RUN_LATE = (0, 5, 20)  # seconds a run starts late: Kibana's task manager, NOW() at query time


def _worst(window_minutes):
    return min(_runs_seeing_one_breaching_minute(window_minutes, w, r, s)
               for w in POLL_WAITS for r in RUN_PHASES for s in range(len(RUN_LATE)))


def test_one_breaching_minute_fires_the_headroom_rule_on_its_own():
    """The seed: "one breaching minute stays in view across the three consecutive runs that the
    alertDelay of 3 requires". With its 15-minute usage window it does not: the minute reaches the
    index up to one usage interval plus the bucket's minute after it began, so it is in view for
    15 minutes less that lag, two runs, and never alerts. The default window (22m) keeps it in
    view of 3 runs whatever the phases of the collector's polls and the rule's runs; 21m would
    leave no room for the seconds a poll takes and a run starts late."""
    o = K.RuleOptions()
    head = next(r for r in K.rules() if r.id == K.RULE_ID_HEADROOM_TPM)
    assert head.alert_delay == 3 and head.interval == f"{K.RULE_INTERVAL_MINUTES}m"
    assert o.headroom_window_minutes == Q.DEFAULT_USAGE_WINDOW_MINUTES == 22
    assert f"@timestamp >= NOW() - {o.headroom_window_minutes} minutes" in head.query
    assert _worst(15) < head.alert_delay and _worst(21) < head.alert_delay
    assert _worst(o.headroom_window_minutes) >= head.alert_delay


def test_a_limit_stored_without_a_field_past_the_bound_reads_as_no_limit_for_that_unit():
    """A limit whose `max_requests_per_1_minute` was past ±2^53 is stored without it (the
    collector's `trim_limit`): its TPM still counts, and no RPM limit is read as a limit of 0 (no
    row of 100% or more, no RPM alert)."""
    from agent_input.rate_limits import check_limit, limit_event, trim_limit

    row = {"object": "project.rate_limit", "id": "rl-1", "model": "m", "max_requests_per_1_minute": 2**60,
           "max_tokens_per_1_minute": 1000}
    assert check_limit(row) is None
    _, doc = limit_event(trim_limit(row)[0], {"id": "p"}, collected=int(NOW))
    docs = [doc, usage("completions", iso(NOW - 5 * MIN), "p", "m", tokens=900, requests=50)]
    for kw in ({}, {"now": NOW, "usage_minutes": 15}):  # the panels, the rules
        (r,) = H.per_project(docs, **kw)
        assert (r["tpm_limit"], r["tpm_utilization"]) == (1000, 0.9)
        assert (r["peak_rpm"], r["rpm_limit"], r["rpm_utilization"]) == (50, None, None)
        assert H.alerts(docs, "rpm", **kw) == [] and H.alerts(docs, "tpm", **kw) == ["p::m"]


def test_kibana_s_appended_alert_limit_keeps_the_most_breaching_rows():
    """Kibana's Elasticsearch query rule runs an ES|QL rule as `<query> | limit <N>`, N being its
    alerts-per-run cap (`xpack.alerting.rules.run.alerts.max`, 1,000 by default), and ES|QL keeps
    the smaller LIMIT: a LIMIT of the rule's own would change nothing (docs/assets.md, *At most
    1,000 alerts a run*). What it keeps is what the rule sorts first: the highest utilization, so
    an organization past the cap loses the least breaching pairs, never the worst."""
    from kibana_assets.esql import parse

    for rule in K.rules():
        parse(rule.query + "\n| limit 1000")  # as Kibana runs it
        assert not any(line.startswith("| LIMIT") for line in rule.query.splitlines()), rule.name
    for unit in ("tpm", "rpm"):
        lines = Q.headroom_rule(unit).splitlines()
        assert lines[-2] == f"| SORT {unit}_utilization DESC" and lines[-1].startswith("| KEEP ")
