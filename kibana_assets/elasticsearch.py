"""The Elasticsearch side of the bundle: component and index templates, ingest pipelines.

Every asset is a plain `(name, body)` pair; the installer PUTs it and compares the
`_meta.fingerprint` it finds with the one it would write to report created/updated/unchanged.

Naming (one set per dataset `<ds>`):

- component template `logs-openai.<ds>@package`: the mappings generated from `fields/<ds>.yml`;
- component template `logs-openai.<ds>@custom`: *not installed*, left to the user and listed in
  `ignore_missing_component_templates` so the index template works without it;
- index template `logs-openai.<ds>` for `logs-openai.<ds>-*`, `data_stream: {}`, priority 250
  (Fleet installs its integration templates at 200, so ours win when both exist);
- ingest pipeline `logs-openai.<ds>@pipeline` set as `index.default_pipeline`. Not versioned in its
  name: an upgrade updates it in place, so existing write indices pick the change up at once and no
  stale pipelines pile up. It calls `logs-openai.<ds>@custom` last, if the user made one.

Plus the routing pair for shipping every dataset through one generic data stream:
index template `logs-openai` for `logs-openai-*` whose default pipeline `logs-openai@router`
reroutes each document to `logs-openai.<dataset>-<namespace>` by its dataset.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from agent_input.ecs import ECS_VERSION

from . import MANAGED_BY, PACKAGE, VERSION
from . import fields as F

# Above Fleet's integration templates (200) and the built-in `logs` template (100).
TEMPLATE_PRIORITY = 250
# Built-in component templates present on 8.18+ and 9.x; give undeclared ECS fields ECS types.
BUILTIN_COMPONENTS = ("ecs@mappings",)
ROUTER_PIPELINE = "logs-openai@router"
ROUTER_TEMPLATE = "logs-openai"
ROUTER_PATTERN = "logs-openai-*"
ROUTER_CUSTOM = "logs-openai@custom"

DEFAULT_RETENTION = {"rate_limits": "90d"}  # everything else: DEFAULT_RETENTION_ALL
DEFAULT_RETENTION_ALL = "400d"


def meta(extra: dict | None = None) -> dict:
    m = {"package": PACKAGE, "version": VERSION, "managed_by": MANAGED_BY}
    if extra:
        m.update(extra)
    return m


def fingerprint(body: Any) -> str:
    """Content hash of an asset body, ignoring any fingerprint already in its `_meta`."""
    body = copy.deepcopy(body)
    if isinstance(body, dict) and isinstance(body.get("_meta"), dict):
        body["_meta"].pop("fingerprint", None)
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def with_fingerprint(body: dict) -> dict:
    body = copy.deepcopy(body)
    body.setdefault("_meta", {})["fingerprint"] = fingerprint(body)
    return body


def with_content_fingerprint(template: dict) -> dict:
    """A template's body with `_meta.content_fingerprint`: the hash of all but its `_meta`, what
    applies to a backing index. `_meta.fingerprint` changes with the bundle's version too, at
    every upgrade; this one only when the mappings or settings do (the installer rolls the data
    streams over then, and only then)."""
    template = copy.deepcopy(template)
    template["_meta"]["content_fingerprint"] = fingerprint({k: v for k, v in template.items() if k != "_meta"})
    return with_fingerprint(template)


@dataclass(frozen=True)
class Retention:
    """Where retention comes from.

    Default: data stream lifecycle (`template.lifecycle.data_retention`), per dataset.
    `ilm_policy` switches every template to an existing ILM policy instead (and disables the
    data stream lifecycle in the template so ILM is the only manager)."""

    default: str = DEFAULT_RETENTION_ALL
    per_dataset: dict = field(default_factory=lambda: dict(DEFAULT_RETENTION))
    ilm_policy: str | None = None

    def for_dataset(self, ds: str) -> str:
        return self.per_dataset.get(ds, self.default)


def pipeline_name(ds: str) -> str:
    return f"logs-openai.{ds}@pipeline"


def component_template_name(ds: str) -> str:
    return f"logs-openai.{ds}@package"


def custom_component_name(ds: str) -> str:
    return f"logs-openai.{ds}@custom"


def index_template_name(ds: str) -> str:
    return f"logs-openai.{ds}"


def component_template(ds: str) -> dict:
    return with_content_fingerprint({
        "template": {"mappings": F.mappings(ds)},
        "_meta": meta({"dataset": f"openai.{ds}", "fields": f"kibana_assets/fields/{ds}.yml"}),
    })


def index_template(ds: str, retention: Retention) -> dict:
    settings: dict[str, Any] = {"index": {"default_pipeline": pipeline_name(ds)}}
    template: dict[str, Any] = {"settings": settings}
    if retention.ilm_policy:
        settings["index"]["lifecycle"] = {"name": retention.ilm_policy}
        template["lifecycle"] = {"enabled": False}
    else:
        template["lifecycle"] = {"enabled": True, "data_retention": retention.for_dataset(ds)}
    return with_content_fingerprint({
        "index_patterns": [f"logs-openai.{ds}-*"],
        "data_stream": {},
        "priority": TEMPLATE_PRIORITY,
        "composed_of": [*BUILTIN_COMPONENTS, component_template_name(ds), custom_component_name(ds)],
        "ignore_missing_component_templates": [custom_component_name(ds)],
        "template": template,
        "_meta": meta({"dataset": f"openai.{ds}"}),
    })


def ingest_pipeline(ds: str) -> dict:
    """What belongs server-side: event.ingested, a few consistency fixes, and an on_failure that
    records the error and keeps the document instead of rejecting it."""
    processors: list[dict] = [
        {"set": {"field": "event.ingested", "value": "{{{_ingest.timestamp}}}",
                 "tag": "set_event_ingested"}},
        # for documents that arrive without one (another shipper): the collector's own, as in the seed
        {"set": {"field": "ecs.version", "value": ECS_VERSION, "override": False, "tag": "ecs_version"}},
        {"set": {"field": "event.module", "value": "openai", "override": False, "tag": "event_module"}},
    ]
    if ds == "rate_limits":
        # The headroom queries join on openai.base.{project_id,model}; fill them from the limit.
        processors += [
            {"set": {"field": "openai.base.project_id", "copy_from": "openai.rate_limits.project_id",
                     "override": False, "ignore_empty_value": True, "tag": "base_project_id",
                     "if": "ctx.openai?.rate_limits?.project_id != null"}},
            {"set": {"field": "openai.base.model", "copy_from": "openai.rate_limits.model",
                     "override": False, "ignore_empty_value": True, "tag": "base_model",
                     "if": "ctx.openai?.rate_limits?.model != null"}},
        ]
    processors.append({"pipeline": {"name": f"logs-openai.{ds}@custom", "ignore_missing_pipeline": True,
                                    "tag": "custom_pipeline"}})
    return with_fingerprint({
        "description": f"openai.{ds}: event.ingested and failure capture (managed by {MANAGED_BY})",
        "processors": processors,
        "on_failure": [
            {"set": {"field": "event.kind", "value": "pipeline_error"}},
            {"append": {"field": "error.message",
                        "value": "Processor {{{_ingest.on_failure_processor_type}}} with tag "
                                 "{{{_ingest.on_failure_processor_tag}}} in pipeline "
                                 "{{{_ingest.on_failure_pipeline}}} failed with message: "
                                 "{{{_ingest.on_failure_message}}}"}},
            {"append": {"field": "tags", "value": "openai-pipeline-error", "allow_duplicates": False}},
        ],
        "_meta": meta({"dataset": f"openai.{ds}"}),
    })


# Painless: pick the target dataset. Elastic Agent's filestream input overwrites data_stream.*
# and event.dataset with its own dataset (e.g. `openai`), so fall back to the collector's tag
# `openai-<dataset with dashes>`. A dataset this bundle does not know (a newer collector's) is set
# back to `openai`, the generic stream's own: the reroute below would otherwise send it to a data
# stream without our templates. It stays in logs-openai-<namespace>, as docs/assets.md says.
_ROUTER_SCRIPT = """
String ds = null;
def d = ctx.data_stream?.dataset;
if (d instanceof String && d.startsWith('openai.')) { ds = d; }
if (ds == null) {
  def e = ctx.event?.dataset;
  if (e instanceof String && e.startsWith('openai.')) { ds = e; }
}
if (ds == null && ctx.tags instanceof List) {
  for (def t : ctx.tags) {
    if (t instanceof String && t.startsWith('openai-') && !t.equals('openai-pipeline-error')) {
      ds = 'openai.' + t.substring(7).replace('-', '_');
      break;
    }
  }
}
if (ds != null && params.known.contains(ds)) {
  if (ctx.data_stream == null) { ctx.data_stream = new HashMap(); }
  ctx.data_stream.dataset = ds;
  ctx.data_stream.type = 'logs';
} else if (d instanceof String && d.startsWith('openai.')) {
  ctx.data_stream.dataset = 'openai';
}
""".strip()


def router_pipeline(default_namespace: str = "default") -> dict:
    known = [f"openai.{ds}" for ds in F.datasets()]
    return with_fingerprint({
        "description": "Routes openai-elastic documents shipped into logs-openai-<namespace> to "
                       f"logs-openai.<dataset>-<namespace> (managed by {MANAGED_BY})",
        "processors": [
            {"script": {"lang": "painless", "source": _ROUTER_SCRIPT, "params": {"known": known},
                        "tag": "pick_dataset"}},
            {"reroute": {
                "tag": "reroute_openai",
                "if": "ctx.data_stream?.dataset instanceof String && ctx.data_stream.dataset.startsWith('openai.')",
                "dataset": ["{{data_stream.dataset}}"],
                "namespace": ["{{data_stream.namespace}}", default_namespace],
            }},
        ],
        "on_failure": [
            {"append": {"field": "error.message", "value": "{{{_ingest.on_failure_message}}}"}},
        ],
        "_meta": meta(),
    })


def router_index_template() -> dict:
    return with_content_fingerprint({
        "index_patterns": [ROUTER_PATTERN],
        "data_stream": {},
        "priority": TEMPLATE_PRIORITY,
        "composed_of": [*BUILTIN_COMPONENTS, ROUTER_CUSTOM],
        "ignore_missing_component_templates": [ROUTER_CUSTOM],
        "template": {
            "settings": {"index": {"default_pipeline": ROUTER_PIPELINE}},
            # Only documents the router could not place stay here; keep them briefly.
            "lifecycle": {"enabled": True, "data_retention": "7d"},
        },
        "_meta": meta({"purpose": "generic shipping target rerouted by " + ROUTER_PIPELINE}),
    })


@dataclass(frozen=True)
class EsAsset:
    kind: str  # component_template | index_template | pipeline
    name: str
    body: dict

    @property
    def path(self) -> str:
        return {
            "component_template": "/_component_template/",
            "index_template": "/_index_template/",
            "pipeline": "/_ingest/pipeline/",
        }[self.kind] + self.name

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


def es_assets(retention: Retention | None = None, default_namespace: str = "default") -> list[EsAsset]:
    """Every Elasticsearch asset in install order (pipelines and component templates before the
    index templates that reference them)."""
    retention = retention or Retention()
    out: list[EsAsset] = []
    for ds in F.datasets():
        out.append(EsAsset("pipeline", pipeline_name(ds), ingest_pipeline(ds)))
        out.append(EsAsset("component_template", component_template_name(ds), component_template(ds)))
    out.append(EsAsset("pipeline", ROUTER_PIPELINE, router_pipeline(default_namespace)))
    for ds in F.datasets():
        out.append(EsAsset("index_template", index_template_name(ds), index_template(ds, retention)))
    out.append(EsAsset("index_template", ROUTER_TEMPLATE, router_index_template()))
    return out
