"""One source of truth for fields: `<dataset>.yml` files here generate every mapping.

Each dataset file names its data stream (`dataset: openai.<name>`), the shared groups it includes
(`_common`, `_usage`) and its own fields (`name`, `type`, `description`, optional mapping extras
such as `index: false`). `mappings(dataset)` turns them into an Elasticsearch `mappings` object;
`undeclared_fields(doc)` lists the leaf fields of a document that no mapping declares.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

FIELDS_DIR = Path(__file__).parent

# Mapping keys a field entry may carry besides name/type/description.
_MAPPING_EXTRAS = ("index", "doc_values", "ignore_above", "scaling_factor")
# Every keyword gets this ignore_above unless the field says otherwise (as Fleet packages do).
KEYWORD_IGNORE_ABOVE = 1024


class FieldError(ValueError):
    """A fields file is inconsistent (duplicate field, conflicting type, object/leaf clash)."""


@functools.lru_cache(maxsize=None)
def _load(name: str) -> dict:
    path = FIELDS_DIR / f"{name}.yml"
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def datasets() -> list[str]:
    """Short dataset names (`completions`, ...) in a stable order: every `*.yml` not starting with `_`."""
    return sorted(p.stem for p in FIELDS_DIR.glob("*.yml") if not p.stem.startswith("_"))


def dataset_title(name: str) -> str:
    return _load(name).get("title", name)


@functools.lru_cache(maxsize=None)
def fields(name: str) -> tuple[dict, ...]:
    """All field definitions of one dataset (its includes first), each field once."""
    doc = _load(name)
    out: dict[str, dict] = {}
    for group in doc.get("include", []):
        for f in _load(group)["fields"]:
            out[f["name"]] = dict(f)
    for f in doc.get("fields", []):
        prev = out.get(f["name"])
        if prev is not None and prev["type"] != f["type"]:
            raise FieldError(f"{name}: {f['name']} declared as {prev['type']} and {f['type']}")
        out[f["name"]] = dict(f)
    _check_tree(name, out)
    return tuple(out.values())


def field_types(name: str) -> dict[str, str]:
    """`{dotted name: type}` for one dataset."""
    return {f["name"]: f["type"] for f in fields(name)}


def all_field_types() -> dict[str, str]:
    """`{dotted name: type}` over every dataset; raises when two datasets disagree on a type
    (a field must have one type across `logs-openai.*` or ES|QL reports it as unsupported)."""
    out: dict[str, str] = {}
    for ds in datasets():
        for fname, ftype in field_types(ds).items():
            if out.setdefault(fname, ftype) != ftype:
                raise FieldError(f"{fname} is {out[fname]} in one dataset and {ftype} in {ds}")
    return out


def _check_tree(name: str, flds: Mapping[str, dict]) -> None:
    leaves = set(flds)
    for leaf in leaves:
        parts = leaf.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix in leaves:
                raise FieldError(f"{name}: {prefix} is a leaf but {leaf} needs it as an object")


def _leaf_mapping(f: Mapping[str, Any]) -> dict:
    m: dict[str, Any] = {"type": f["type"]}
    if f["type"] == "keyword" and f.get("index", True) is not False:
        m["ignore_above"] = f.get("ignore_above", KEYWORD_IGNORE_ABOVE)
    elif f["type"] == "flattened":
        # each leaf of an audit payload is a keyword term: one longer than Lucene's 32,766 bytes
        # had the whole event rejected (dead-lettered); above this it is kept in _source, unindexed
        m["ignore_above"] = f.get("ignore_above", KEYWORD_IGNORE_ABOVE)
    for key in _MAPPING_EXTRAS:
        if key in f and key not in m:
            m[key] = f[key]
    if "unit" in f:  # as Fleet maps a field's unit: Kibana formats seconds and bytes by it
        m["meta"] = {"unit": str(f["unit"])}
    return m


def mappings(name: str) -> dict:
    """The Elasticsearch `mappings` object for one dataset (nested `properties`)."""
    props: dict[str, Any] = {}
    for f in fields(name):
        node = props
        parts = f["name"].split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {"properties": {}})["properties"]
        node[parts[-1]] = _leaf_mapping(f)
    return {"properties": props}


# ---------------------------------------------------------------------------------------------
# Checking documents against the declarations


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaf values of a document by dotted path. Lists of objects are walked; lists of scalars
    are leaves. Keys that contain dots (`api_key.created`) are split like Elasticsearch does."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "."))
        elif isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
            for v in value:
                if isinstance(v, Mapping):
                    out.update(flatten(v, path + "."))
        else:
            out[path] = value
    return out


# Metadata the shipping side puts at the top level and Elasticsearch lifts out of the source.
_METADATA_KEYS = {"_id", "_index", "_op_type"}


def dataset_of(doc: Mapping[str, Any]) -> str | None:
    """Short dataset name of a document (`completions`) from data_stream.dataset or event.dataset."""
    flat = flatten(doc)
    for key in ("data_stream.dataset", "event.dataset"):
        value = flat.get(key)
        if isinstance(value, str) and value.startswith("openai."):
            return value[len("openai."):]
    return None


def undeclared_fields(doc: Mapping[str, Any], dataset: str | None = None) -> list[str]:
    """Dotted leaf paths of `doc` that the dataset's mappings do not declare.

    A path below a `flattened` field counts as declared (the flattened field indexes it), and so
    do `lat`/`lon` below a `geo_point`.
    `dataset` defaults to the document's own `data_stream.dataset`; a document whose dataset is
    unknown reports every leaf.
    """
    dataset = dataset or dataset_of(doc)
    declared = field_types(dataset) if dataset in datasets() else {}
    flattened_roots = [n for n, t in declared.items() if t in ("flattened", "geo_point")]
    missing = []
    for path in flatten({k: v for k, v in doc.items() if k not in _METADATA_KEYS}):
        if path in declared:
            continue
        if any(path.startswith(root + ".") for root in flattened_roots):
            continue
        missing.append(path)
    return sorted(missing)


def iter_field_refs(names: Iterable[str]) -> list[str]:
    """Names in `names` that no dataset declares (for checking ES|QL field references)."""
    known = all_field_types()
    return [n for n in names if n not in known]
