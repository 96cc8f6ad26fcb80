"""Offline validation of the bundle (`openai-assets validate`; the tests run the same checks)."""
from __future__ import annotations

import json
import re

from . import elasticsearch as E
from . import fields as F
from . import kibana as K
from . import queries as Q

_FROM = re.compile(r"^FROM\s+(.+)$", re.MULTILINE)


def datasets_of_query(query: str) -> list[str]:
    """Short dataset names a query reads (`FROM logs-openai.<ds>-*, ...`)."""
    m = _FROM.search(query)
    if not m:
        return []
    out = []
    for src in m.group(1).split(","):
        src = src.strip()
        mm = re.match(r"logs-openai\.([a-z_]+)-", src)
        if mm:
            out.append(mm.group(1))
    return out


def query_problems(name: str, query: str) -> list[str]:
    """Syntax errors, references to fields that a dataset the query reads does not map, and names
    read where no column has them.

    ES|QL fails a query naming a column that no index it reads maps ("Unknown column"), and any
    data stream of a FROM may not exist yet (a stream disabled or never used): a field the query
    names must be mapped on *each* dataset it reads, so that it resolves on any one of them alone.
    (Elasticsearch reads a field another index maps as null there: mapping it is enough.) A KEEP
    or DROP pattern must match a field there. After a STATS only its aggregates and groups are
    columns, and after a KEEP only those it kept; a DROP or RENAME takes its names away: a name
    read after those fails ("Unknown column", "No matches found for pattern") mapped or not."""
    from . import esql  # needs esql-parser

    try:
        walk = esql.columns(query)
    except esql.EsqlSyntaxError as exc:
        return [f"{name}: ES|QL syntax: {exc}"]
    read = datasets_of_query(query)
    problems = [f"{name}: reads logs-openai.{ds}, a data stream no fields file defines"
                for ds in read if ds not in F.datasets()]
    read = [ds for ds in read if ds in F.datasets()]
    types = {ds: F.field_types(ds) for ds in read}
    for r in walk.refs:
        missing = [ds for ds in read if not any(esql.name_matches(f, r) for f in types[ds])]
        if not read or len(missing) == len(read):
            problems.append(f"{name}: references {r}, which no dataset it reads maps")
        elif missing:
            problems.append(f"{name}: references {r}, which {', '.join(missing)} {'does' if len(missing) == 1 else 'do'}"
                            " not map: ES|QL fails (Unknown column) while no data stream that maps it exists")
    problems += [f"{name}: references {r}, which {'matches' if '*' in r else 'is'} no column after the {after} before it:"
                 " ES|QL fails (Unknown column)" for r, after in walk.missing]
    return problems


def panel_queries() -> dict[str, str]:
    out = {}
    for d in K.dashboards():
        for p in json.loads(d.saved_object()["attributes"]["panelsJSON"]):
            state = p["embeddableConfig"]["attributes"]["state"]
            out[f"{d.id}/{p['title']}"] = state["query"]["esql"]
    return out


def validate_bundle() -> tuple[list[str], list[str]]:
    problems: list[str] = []
    notes: list[str] = []
    try:
        types = F.all_field_types()
        notes.append(f"{len(F.datasets())} datasets, {len(types)} distinct fields, one type each")
    except F.FieldError as exc:
        problems.append(str(exc))
    assets = E.es_assets()
    components = {a.name for a in assets if a.kind == "component_template"}
    pipelines = {a.name for a in assets if a.kind == "pipeline"}
    for a in assets:
        if a.kind == "index_template":
            for c in a.body["composed_of"]:
                if c not in components and c not in a.body.get("ignore_missing_component_templates", []) \
                        and c not in E.BUILTIN_COMPONENTS:
                    problems.append(f"{a.label}: composed_of {c} is not in the bundle")
            pipe = a.body["template"]["settings"]["index"]["default_pipeline"]
            if pipe not in pipelines:
                problems.append(f"{a.label}: default_pipeline {pipe} is not in the bundle")
    notes.append(f"{len(assets)} Elasticsearch assets reference only bundled or built-in parts")
    queries = dict(Q.all_queries())
    queries.update({f"panel {k}": v for k, v in panel_queries().items()})
    queries.update({f"rule {r.name}": r.query for r in K.rules()})
    try:
        for name, q in queries.items():
            problems += query_problems(name, q)
        notes.append(f"{len(queries)} ES|QL queries parse, name only fields mapped on each dataset they read"
                     " and read no column a command before them removed")
    except ImportError:
        notes.append("ES|QL grammar check skipped: pip install esql-parser")
    headroom = next(r for r in K.rules() if r.name == K.HEADROOM_RULE_NAME)
    if "WHERE tpm_utilization >= 0.8" not in headroom.query:
        problems.append("headroom rule lost its `WHERE tpm_utilization >= 0.8` line")
    return problems, notes
