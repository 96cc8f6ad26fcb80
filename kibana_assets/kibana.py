"""The Kibana side of the bundle: the data view, the dashboards (saved objects) and the rules.

Dashboards are written in the 8.18 saved-object format with every panel a by-value Lens ES|QL
panel, so each one runs a query from `queries.py`; Kibana migrates the objects forward on import
into 9.x. Rules are `.es-query` rules with ES|QL (`searchType: esqlQuery`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import MANAGED_BY, PACKAGE, VERSION
from . import queries as Q

DATA_VIEW_ID = "openai-elastic-logs-openai"
DATA_VIEW_TITLE = "logs-openai.*"
DATA_VIEW_NAME = "OpenAI (openai-elastic)"
TAGS = ["openai", PACKAGE]

# Fixed rule ids (UUID v4, as older Kibana versions require for caller-chosen ids).
RULE_ID_HEADROOM_TPM = "6f1c2a52-3b7e-4c8e-9a51-0e6a1d3f7b01"
RULE_ID_HEADROOM_RPM = "6f1c2a52-3b7e-4c8e-9a51-0e6a1d3f7b02"
RULE_ID_LIMITS_STALE = "6f1c2a52-3b7e-4c8e-9a51-0e6a1d3f7b03"
RULE_ID_PROJECT_LIMITS_FAILING = "6f1c2a52-3b7e-4c8e-9a51-0e6a1d3f7b04"

HEADROOM_RULE_NAME = "[OpenAI] Rate limit headroom low"


# ---------------------------------------------------------------------------------------------
# Ids per Kibana space
#
# Since Kibana 8.0 data views, dashboards and rules are `multiple-isolated` (or `multiple`)
# saved-object types: an id is unique across *all* spaces. Creating one that another space holds
# is a 409 conflict (data views, rules), and `_import` creates it under a new random id instead
# (dashboards), so each install would add a copy. So each space gets its own ids: the default
# space keeps the ids above (existing installs upgrade in place); another space's are derived from
# the space id, the same on every run.

DEFAULT_SPACE = "default"
# uuid5 namespace of the rules' per-space ids (any fixed UUID; never change it: ids would move)
_RULE_ID_NAMESPACE = uuid.UUID("6f1c2a52-3b7e-4c8e-9a51-0e6a1d3f7b00")


def space_id(space: str | None) -> str:
    return space or DEFAULT_SPACE


def object_id(base_id: str, space: str | None) -> str:
    """A saved object's id in `space`: `<space>.<base id>` outside the default space. A space id
    has no `.` (a-z, 0-9, `_`, `-`) and the default space's ids have none, so two (space, asset)
    pairs never share an id."""
    sp = space_id(space)
    return base_id if sp == DEFAULT_SPACE else f"{sp}.{base_id}"


def rule_id(base_id: str, space: str | None) -> str:
    """A rule's id in `space`: outside the default space, a UUID v4-shaped id (older Kibanas take
    only UUID v1/v4 as a caller-chosen rule id) made from uuid5(space, base id)."""
    sp = space_id(space)
    if sp == DEFAULT_SPACE:
        return base_id
    raw = bytearray(uuid.uuid5(_RULE_ID_NAMESPACE, f"{sp}/{base_id}").bytes)
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return str(uuid.UUID(bytes=bytes(raw)))


def data_view_id(space: str | None = None) -> str:
    return object_id(DATA_VIEW_ID, space)


def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of "9.1.3" or "8.18.0-SNAPSHOT"; ValueError, with a message fit for
    the user, for anything else."""
    core = str(text).split("-")[0]
    if not re.fullmatch(r"\d+(\.\d+){0,2}", core):
        raise ValueError(f"{text!r} is not a version like 8.18.0")
    parts = [int(p) for p in core.split(".")[:3]]
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)  # type: ignore[return-value]


def supports_per_row_alerts(kibana_version: str) -> bool:
    """ES|QL `.es-query` rules accept `groupBy: "row"` (one alert per row) from 8.19 and 9.1."""
    v = parse_version(kibana_version)[:2]
    return (8, 19) <= v < (9, 0) or v >= (9, 1)


# ---------------------------------------------------------------------------------------------
# Data view


DATA_VIEW_FIELDS = ("title", "name", "timeFieldName")  # what we set, compare and put back


def data_view(space: str | None = None) -> dict:
    """Body for POST /api/data_views/data_view (create; `override` replaces a data view with our
    title, or our name in newer Kibanas)."""
    return {
        "data_view": {
            "id": data_view_id(space),
            "title": DATA_VIEW_TITLE,
            "name": DATA_VIEW_NAME,
            "timeFieldName": "@timestamp",
        },
        "override": True,
    }


def data_view_update() -> dict:
    """Body for POST /api/data_views/data_view/{id}: puts back the fields of ours that were edited.
    Create's `override` matches an existing data view by title (or name), not id, so it cannot be
    relied on to replace ours once those were changed."""
    want = data_view()["data_view"]
    return {"data_view": {k: want[k] for k in DATA_VIEW_FIELDS}}


def data_view_saved_object(space: str | None = None) -> dict:
    """The same data view as an `index-pattern` saved object, for the exported NDJSON."""
    return {
        "id": data_view_id(space),
        "type": "index-pattern",
        "attributes": {"title": DATA_VIEW_TITLE, "name": DATA_VIEW_NAME, "timeFieldName": "@timestamp"},
        "references": [],
        "coreMigrationVersion": "8.8.0",
        "typeMigrationVersion": "8.0.0",
    }


# ---------------------------------------------------------------------------------------------
# Dashboards


@dataclass(frozen=True)
class Panel:
    title: str
    query: str
    columns: tuple[tuple[str, str], ...]  # (ES|QL column, lens meta type: string|number|date)
    kind: str = "table"  # table | bar | line
    x: str | None = None
    y: tuple[str, ...] = ()
    split: str | None = None
    w: int = 24
    h: int = 12
    description: str = ""


def _adhoc_id(pattern: str) -> str:
    return hashlib.sha256(pattern.encode()).hexdigest()[:32]


def _lens_attributes(panel: Panel, layer_id: str) -> dict:
    adhoc = _adhoc_id(DATA_VIEW_TITLE)
    columns = [
        {"columnId": name, "fieldName": name, "label": name, "customLabel": True, "meta": {"type": t}}
        for name, t in panel.columns
    ]
    if panel.kind == "table":
        vis_type = "lnsDatatable"
        visualization: dict[str, Any] = {
            "layerId": layer_id, "layerType": "data",
            "columns": [{"columnId": name, "isTransposed": False} for name, _ in panel.columns],
            "paging": {"enabled": True, "size": 20},
        }
    else:
        vis_type = "lnsXY"
        series = "bar_stacked" if panel.kind == "bar" else "line"
        layer: dict[str, Any] = {
            "layerId": layer_id, "layerType": "data", "seriesType": series,
            "xAccessor": panel.x, "accessors": list(panel.y),
        }
        if panel.split:
            layer["splitAccessor"] = panel.split
        visualization = {
            "legend": {"isVisible": True, "position": "right"},
            "valueLabels": "hide", "preferredSeriesType": series, "layers": [layer],
        }
    return {
        "title": panel.title,
        "description": panel.description,
        "visualizationType": vis_type,
        "type": "lens",
        "references": [],
        "state": {
            "visualization": visualization,
            "query": {"esql": panel.query},
            "filters": [],
            "datasourceStates": {
                "textBased": {"layers": {layer_id: {
                    "index": adhoc, "query": {"esql": panel.query}, "columns": columns,
                    "timeField": "@timestamp",
                }}},
            },
            "internalReferences": [],
            "adHocDataViews": {adhoc: {
                "id": adhoc, "title": DATA_VIEW_TITLE, "name": DATA_VIEW_TITLE,
                "timeFieldName": "@timestamp", "sourceFilters": [], "fieldFormats": {},
                "runtimeFieldMap": {}, "fieldAttrs": {}, "allowNoIndex": False,
            }},
        },
    }


def _panels_json(panels: list[Panel]) -> str:
    out, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(panels):
        if x + p.w > 48:
            x, y, row_h = 0, y + row_h, 0
        idx = f"p{i + 1}"
        out.append({
            "type": "lens",
            "panelIndex": idx,
            "gridData": {"x": x, "y": y, "w": p.w, "h": p.h, "i": idx},
            "embeddableConfig": {"attributes": _lens_attributes(p, f"layer-{idx}"), "enhancements": {},
                                 "hidePanelTitles": False},
            "title": p.title,
        })
        x += p.w
        row_h = max(row_h, p.h)
    return json.dumps(out, sort_keys=True)


@dataclass(frozen=True)
class Dashboard:
    id: str  # in the space the dashboard was made for (`dashboards(space)`)
    title: str
    description: str
    panels: list[Panel] = field(default_factory=list)
    time_from: str = "now-24h"
    space: str | None = None
    default_id: str = ""  # its id in the default space (what earlier versions used in every space)

    def saved_object(self) -> dict:
        body = {
            "id": self.id,
            "type": "dashboard",
            "attributes": {
                "title": self.title,
                "description": self.description,
                "panelsJSON": _panels_json(self.panels),
                "optionsJSON": json.dumps({"useMargins": True, "syncColors": False, "syncCursor": True,
                                           "syncTooltips": False, "hidePanelTitles": False}),
                "timeRestore": True,
                "timeFrom": self.time_from,
                "timeTo": "now",
                "refreshInterval": {"pause": True, "value": 60000},
                "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(
                    {"query": {"query": "", "language": "kuery"}, "filter": []})},
                "version": 1,
            },
            # a reference to one of our objects must name this space's id: space_references()
            "references": space_references([], self.space),
            "coreMigrationVersion": "8.8.0",
            "typeMigrationVersion": "8.9.0",
        }
        # The installer compares this marker to tell unchanged from updated (Kibana migrates the
        # rest of the object on import, so a byte comparison would always differ).
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        body["attributes"]["description"] = f"{self.description} [{MANAGED_BY} {VERSION} #{digest}]"
        return body


def space_references(references: list[dict], space: str | None) -> list[dict]:
    """`references` (written with the default space's ids) with each reference to one of our saved
    objects given `space`'s id: a dashboard in team-a must point at team-a's data view and
    dashboards, never at the default space's (which that space cannot see)."""
    ours = {DATA_VIEW_ID} | set(DASHBOARD_IDS)
    return [dict(r, id=object_id(r["id"], space)) if r.get("id") in ours else dict(r) for r in references]


def fingerprint_of(saved_object: dict) -> str | None:
    desc = saved_object.get("attributes", {}).get("description") or ""
    marker = f"[{MANAGED_BY} "
    if marker in desc and "#" in desc.rsplit(marker, 1)[1]:
        return desc.rsplit("#", 1)[1].rstrip("]")
    return None


S, N, D = "string", "number", "date"


def _per_project_panel() -> Panel:
    cols = [("project_id", S), ("model", S)] + [
        (c, N) for u in Q.UNITS for c in (f"peak_{u}", f"{u}_limit", f"{u}_utilization")]
    return Panel("Rate limit headroom - per project and model", Q.headroom_per_project(), tuple(cols),
                 w=48, h=14,
                 description="Peak 1-minute usage (summed per minute, corrections included) over the "
                             "limit, per project and model (dated snapshots folded onto the family). "
                             "A limit with no usage shows 0. Needs 1m usage buckets.")


def _org_panel() -> Panel:
    cols = [("model", S)] + [(c, N) for c in Q.ORG_COLUMNS[1:]]
    return Panel("Rate limit headroom - by model (org-wide)", Q.headroom_org_wide(), tuple(cols),
                 w=48, h=12,
                 description="Sum of each project's peak minute over the sum of each project's limit "
                             "(max within the window). Indicative only: limits are enforced per "
                             "project, so use limit (aggregate) and utilization (approx.) for "
                             "comparison and trends.")


DASHBOARD_IDS = ("openai-elastic-usage-overview", "openai-elastic-audit", "openai-elastic-costs",
                 "openai-elastic-rate-limit-headroom")  # in the default space


def dashboards(space: str | None = None) -> list[Dashboard]:
    """The dashboards, with their ids in `space` (see object_id)."""
    u, c, a = Q.usage_panels(), Q.costs_panels(), Q.audit_panels()
    usage = Dashboard(
        "openai-elastic-usage-overview", "[OpenAI] Usage overview",
        "Requests and tokens by model, project, user and key; images, audio, vector stores and code "
        "interpreter. All figures sum the bucket documents, so corrections are included.",
        [
            Panel("Requests over time by stream", u["requests_over_time"],
                  (("t", D), ("requests", N), ("dataset", S)), "bar", "t", ("requests",), "dataset"),
            Panel("Tokens over time by model", u["tokens_over_time_by_model"],
                  (("t", D), ("tokens", N), ("model", S)), "bar", "t", ("tokens",), "model"),
            Panel("By model", u["by_model"], (("model", S), ("requests", N), ("tokens", N), ("images", N))),
            Panel("By project", u["by_project"],
                  (("project_id", S), ("project_name", S), ("requests", N), ("tokens", N))),
            Panel("By user", u["by_user"], (("user_id", S), ("user_email", S), ("requests", N), ("tokens", N))),
            Panel("By API key", u["by_api_key"],
                  (("api_key_id", S), ("api_key_name", S), ("requests", N), ("tokens", N))),
            Panel("Images by size", u["images_by_size"], (("size", S), ("source", S), ("images", N))),
            Panel("Audio: characters and seconds", u["audio"],
                  (("model", S), ("characters", N), ("seconds", N))),
            Panel("Vector store bytes", u["vector_store_bytes"],
                  (("t", D), ("bytes", N), ("project_id", S)), "line", "t", ("bytes",), "project_id"),
            Panel("Code interpreter sessions", u["code_interpreter_sessions"],
                  (("t", D), ("sessions", N), ("project_id", S)), "bar", "t", ("sessions",), "project_id"),
            Panel("File and web search calls", u["tool_calls"],
                  (("project_id", S), ("file_search", N), ("web_search", N))),
        ])
    audit = Dashboard(
        "openai-elastic-audit", "[OpenAI] Audit logs",
        "Organization audit events: actions over time, actors, failed logins, source countries and "
        "IPs, API key lifecycle.",
        [
            Panel("Events over time by action", a["events_over_time"],
                  (("t", D), ("events", N), ("action", S)), "bar", "t", ("events",), "action", w=48),
            Panel("Actors", a["actors"], (("actor", S), ("actor_type", S), ("events", N))),
            Panel("Failed logins and logouts", a["failed_logins"],
                  (("user_email", S), ("ip", S), ("country", S), ("failures", N), ("last_failure", D))),
            Panel("Source countries", a["source_countries"], (("country", S), ("events", N), ("ips", N))),
            Panel("Source IPs", a["source_ips"],
                  (("ip", S), ("asn", N), ("country", S), ("events", N), ("users", N))),
            Panel("API key lifecycle", a["key_lifecycle"],
                  (("@timestamp", D), ("openai.audit.type", S), ("user.email", S),
                   ("openai.audit.project.name", S), ("source.ip", S)), w=48),
        ], time_from="now-7d")
    costs = Dashboard(
        "openai-elastic-costs", "[OpenAI] Costs",
        "Spend over time, by project and by line item (daily buckets; corrections included).",
        [
            Panel("Cost over time", c["cost_over_time"], (("t", D), ("cost", N), ("currency", S)),
                  "bar", "t", ("cost",), "currency", w=48),
            Panel("Cost by project", c["cost_by_project"],
                  (("project_id", S), ("project_name", S), ("currency", S), ("cost", N))),
            Panel("Cost by line item", c["cost_by_line_item"],
                  (("line_item", S), ("unit", S), ("currency", S), ("cost", N), ("quantity", N))),
        ], time_from="now-30d/d")  # 30 whole UTC days (a day is stamped at its start), not 29
    headroom = Dashboard(
        "openai-elastic-rate-limit-headroom", "[OpenAI] Rate limit headroom",
        "How close each project and model is to its rate limits (tokens, requests and images per "
        "minute). Keep the usage streams at bucket_width 1m.",
        [
            _per_project_panel(),
            _org_panel(),
            Panel("Rate limit collection status", Q.limits_freshness(),
                  (("namespace", S), ("event.outcome", S), ("cycles", N), ("last_cycle", D), ("failed_projects", N),
                   ("bad_limits", N)),
                  w=24, h=8),
            Panel("Projects whose limits failed", Q.project_limit_failures(),
                  (("project_id", S), ("project_name", S), ("failures", N), ("last_failure", D)), w=24, h=8,
                  description="Projects whose rate limits could not be read; the reasons are in the "
                              "rate-limits-project-failure documents' error.message."),
        ], time_from="now-15m")
    out = [usage, audit, costs, headroom]
    assert tuple(d.id for d in out) == DASHBOARD_IDS
    return [dataclasses.replace(d, id=object_id(d.id, space), space=space, default_id=d.id) for d in out]


def saved_objects(space: str | None = None) -> list[dict]:
    """Everything for the exported NDJSON: the data view first, then the dashboards."""
    return [data_view_saved_object(space)] + [d.saved_object() for d in dashboards(space)]


def to_ndjson(objects: list[dict]) -> str:
    return "".join(json.dumps(o, sort_keys=True) + "\n" for o in objects)


# ---------------------------------------------------------------------------------------------
# Rules


RULE_INTERVAL_MINUTES = 5  # every rule runs every 5 minutes (the seed's schedule)
# How much longer than --stale-after the headroom rules keep using the last known limits: two rule
# runs, so the stale alert (active from its first run after --stale-after) has taken over before
# the limits leave the headroom rules' look-back, whatever the two rules' phases and a late run.
LIMITS_LOOKBACK_MARGIN_MINUTES = 2 * RULE_INTERVAL_MINUTES
DEFAULT_STALE_HORIZON_MINUTES = 24 * 60


@dataclass(frozen=True)
class RuleOptions:
    headroom_threshold: float = Q.DEFAULT_THRESHOLD
    headroom_window_minutes: int = Q.DEFAULT_USAGE_WINDOW_MINUTES  # usage look-back (22m: the seed's 15m + lag)
    stale_after_minutes: int = Q.DEFAULT_STALE_AFTER_MINUTES
    # the stale rule's time window: it stops firing once the last collection is older than this
    # (a stream turned off), and never fires on a cluster that has no rate-limits collection.
    # None: stale_after + 24h, so the alert stays active for a day.
    stale_horizon_minutes: int | None = None
    enabled: bool = True

    def __post_init__(self):
        if self.stale_window_minutes <= self.stale_after_minutes:
            raise ValueError("the stale horizon must be longer than the stale-after duration")

    @property
    def stale_window_minutes(self) -> int:
        if self.stale_horizon_minutes is None:
            return self.stale_after_minutes + DEFAULT_STALE_HORIZON_MINUTES
        return self.stale_horizon_minutes

    @property
    def limits_lookback_minutes(self) -> int:
        """The headroom rules' time window: limits are used for this long after they stop arriving,
        which outlasts --stale-after by the margin, so the stale rule fires before they age out."""
        return max(self.headroom_window_minutes, self.stale_after_minutes + LIMITS_LOOKBACK_MARGIN_MINUTES)


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    query: str
    window_minutes: int
    interval: str
    alert_delay: int
    per_row: bool  # wants one alert per row (project::model) where Kibana supports it
    description: str = ""
    default_id: str = ""  # its id in the default space (what earlier versions used in every space)

    def params(self, kibana_version: str | None) -> dict:
        per_row = self.per_row and (kibana_version is None or supports_per_row_alerts(kibana_version))
        return {
            "searchType": "esqlQuery",
            "esqlQuery": {"esql": self.query},
            "timeField": "@timestamp",
            "timeWindowSize": self.window_minutes,
            "timeWindowUnit": "m",
            "threshold": [0],
            "thresholdComparator": ">",
            "size": 100,
            "groupBy": "row" if per_row else "all",
            "excludeHitsFromPreviousRun": False,
            "aggType": "count",
        }

    def update_body(self, kibana_version: str | None, actions: list | None = None) -> dict:
        """Body for PUT /api/alerting/rule/{id} (no rule_type_id/consumer/enabled there)."""
        return {
            "name": self.name,
            "tags": list(TAGS),
            "schedule": {"interval": self.interval},
            "params": self.params(kibana_version),
            "actions": actions or [],
            "alert_delay": {"active": self.alert_delay},
        }

    def create_body(self, kibana_version: str | None, enabled: bool = True) -> dict:
        body = self.update_body(kibana_version)
        body.update({"rule_type_id": ".es-query", "consumer": "stackAlerts", "enabled": enabled})
        return body


def rules(options: RuleOptions | None = None, space: str | None = None) -> list[Rule]:
    """The rules, with their ids in `space` (see rule_id)."""
    o = options or RuleOptions()
    every = f"{RULE_INTERVAL_MINUTES}m"
    out = [
        Rule(RULE_ID_HEADROOM_TPM, HEADROOM_RULE_NAME,
             Q.headroom_rule("tpm", o.headroom_threshold, usage_minutes=o.headroom_window_minutes),
             o.limits_lookback_minutes, every, 3, per_row=True,
             description=f"Peak 1-minute token usage >= {o.headroom_threshold:.0%} of the TPM limit per project_id::model."),
        Rule(RULE_ID_HEADROOM_RPM, "[OpenAI] Rate limit RPM headroom low",
             Q.headroom_rule("rpm", o.headroom_threshold, usage_minutes=o.headroom_window_minutes),
             o.limits_lookback_minutes, every, 3, per_row=True,
             description=f"Peak 1-minute requests >= {o.headroom_threshold:.0%} of the RPM limit per project_id::model."),
        Rule(RULE_ID_LIMITS_STALE, "[OpenAI] Rate limits are stale",
             Q.limits_stale_rule(stale_after_minutes=o.stale_after_minutes),
             o.stale_window_minutes, every, 1, per_row=True,
             description="Rate limits were collected in a namespace, but none successfully for "
                         "--stale-after: the headroom rules are working with the last known limits."),
        Rule(RULE_ID_PROJECT_LIMITS_FAILING, "[OpenAI] Rate limits failing for a project",
             Q.project_limits_failing_rule(stale_after_minutes=o.stale_after_minutes),
             o.stale_window_minutes, every, 1, per_row=True,
             description="A project's limits could not be read for --stale-after while it keeps failing: "
                         "the headroom rules are about to lose its last known limits."),
    ]
    return [dataclasses.replace(r, id=rule_id(r.id, space), default_id=r.id) for r in out]
