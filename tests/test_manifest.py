"""manifest.yml is the single source of truth: its shape, and code <-> manifest agreement."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from agent_input import __version__, config as cfg
from agent_input.config import Config, StreamConfig, config_from_dict, load_manifest, parse_duration

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OPENAI_ADMIN_KEY": "sk-admin-test-manifest-0001"}
VAR_KEYS = {"name", "type", "title", "description", "default", "required", "secret", "show_user", "multi"}
TYPES = {"text", "password", "url", "bool", "integer", "duration", "select"}
USAGE = ["completions", "embeddings", "moderations", "images", "audio_speeches", "audio_transcriptions",
         "file_search_calls", "web_search_calls"]
NO_GRACE = ["code_interpreter_sessions", "vector_stores"]


def test_package_header():
    m = load_manifest()
    assert m["name"] == "openai_elastic"
    assert m["type"] == "integration"
    assert m["version"] == "0.1.0" == __version__
    assert m["format_version"]
    assert m["title"]
    assert m["conditions"]["kibana"]["version"] == "^8.18.0 || ^9.0.0"
    (template,) = m["policy_templates"]
    (inp,) = template["inputs"]
    assert inp["type"] == "openai-input"
    assert template["data_streams"] == [d["name"] for d in m["data_streams"]]


def test_pyproject_version_matches():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "0\.1\.0"$', text, re.M)


def _all_vars():
    m = load_manifest()
    for v in m["policy_templates"][0]["inputs"][0]["vars"]:
        yield "global", v
    for ds in m["data_streams"]:
        for v in ds["vars"]:
            yield ds["name"], v


def test_every_var_is_fully_described():
    for where, var in _all_vars():
        missing = VAR_KEYS - set(var)
        assert not missing, f"{where}.{var.get('name')}: missing {missing}"
        assert var["type"] in TYPES, (where, var)
        assert isinstance(var["required"], bool) and isinstance(var["secret"], bool)
        assert isinstance(var["show_user"], bool) and isinstance(var["multi"], bool)
        if var["type"] == "select":
            assert var["options"] and all("value" in o and "text" in o for o in var["options"])
            assert var["default"] in [o["value"] for o in var["options"]]
        if var["type"] == "duration" and var["default"] != "":
            parse_duration(var["default"], f"{where}.{var['name']}")
        if var["type"] == "password":
            assert var["secret"] is True
        if var["secret"]:
            assert var["type"] == "password"


def test_data_streams_shape():
    names = []
    for ds in load_manifest()["data_streams"]:
        names.append(ds["name"])
        assert ds["type"] == "logs"
        assert ds["dataset"] == f"openai.{ds['name']}"
        assert ds["title"]
        assert len({v["name"] for v in ds["vars"]}) == len(ds["vars"]), ds["name"]
    assert sorted(names) == sorted(USAGE + NO_GRACE + ["audit", "rate_limits", "costs"])


def test_stream_var_sets():
    ds = cfg.data_streams()
    usage = ["enabled", "interval", "initial_interval", "bucket_width", "finalization_grace", "revision_window"]
    for name in USAGE:
        assert [v["name"] for v in ds[name]["vars"]] == usage
    for name in NO_GRACE:
        assert [v["name"] for v in ds[name]["vars"]] == [v for v in usage if v != "finalization_grace"]
    assert [v["name"] for v in ds["audit"]["vars"]] == ["enabled", "interval", "initial_interval", "batch_size"]
    assert [v["name"] for v in ds["rate_limits"]["vars"]] == ["enabled", "interval", "batch_size", "include_archived"]
    assert [v["name"] for v in ds["costs"]["vars"]] == ["enabled", "interval", "initial_interval", "bucket_width",
                                                        "revision_window"]
    assert [o["value"] for o in cfg._stream_vars("costs")["bucket_width"]["options"]] == ["1d"]


def test_global_vars_and_defaults():
    g = cfg.global_vars()
    assert list(g) == ["url", "api_key", "api_key_file", "proxy_url", "ssl_verify", "ssl_ca_file", "http_timeout",
                       "max_retries", "namespace", "preserve_original_event", "names_refresh_interval",
                       "es_url", "es_cloud_id", "es_ssl_verify", "es_ssl_ca_file"]
    assert g["url"]["default"] == "https://api.openai.com"
    assert g["api_key"]["type"] == "password" and g["api_key"]["secret"] is True
    assert g["http_timeout"]["default"] == "30s"
    assert g["max_retries"]["default"] == 8
    assert g["namespace"]["default"] == "default"
    assert g["names_refresh_interval"]["default"] == "1h"


def test_every_manifest_var_maps_to_a_field_and_back():
    config_fields = {f.name for f in dataclasses.fields(Config)}
    global_names = set(cfg.global_vars())
    assert global_names <= config_fields, global_names - config_fields
    assert config_fields - cfg.DERIVED_CONFIG_FIELDS == global_names

    stream_fields = {f.name for f in dataclasses.fields(StreamConfig)}
    stream_var_names = {v["name"] for ds in load_manifest()["data_streams"] for v in ds["vars"]}
    assert stream_var_names <= stream_fields, stream_var_names - stream_fields
    assert stream_fields - cfg.DERIVED_STREAM_FIELDS == stream_var_names


def _expected(var):
    """What the loader must produce for a var's manifest default."""
    d = var["default"]
    if d == "":
        return None
    if var["type"] == "duration":
        return parse_duration(d)
    return d


def test_loaded_defaults_equal_manifest_defaults():
    c = config_from_dict({}, env=ENV)
    for name, var in cfg.global_vars().items():
        if name == "api_key":
            continue  # came from the environment
        got = getattr(c, name)
        assert got == _expected(var), name
    for sname, ds in cfg.data_streams().items():
        sc = c.streams[sname]
        for var in ds["vars"]:
            assert getattr(sc, var["name"]) == _expected(var), (sname, var["name"])


def test_a_changed_manifest_default_changes_the_loaded_config(monkeypatch):
    """No default is hard-coded in Python: edit the manifest, get a different Config."""
    m = yaml.safe_load((ROOT / "manifest.yml").read_text())
    inp = m["policy_templates"][0]["inputs"][0]
    inp["vars"] = [dict(v, default="7s") if v["name"] == "http_timeout" else v for v in inp["vars"]]
    for ds in m["data_streams"]:
        if ds["name"] == "audit":
            ds["vars"] = [dict(v, default=42) if v["name"] == "batch_size" else v for v in ds["vars"]]
        if ds["name"] == "completions":
            ds["vars"] = [dict(v, default="2m") if v["name"] == "interval" else v for v in ds["vars"]]
    monkeypatch.setattr(cfg, "load_manifest", lambda: m)
    cfg._all_stream_var_names.cache_clear()
    try:
        c = config_from_dict({}, env=ENV)
    finally:
        cfg._all_stream_var_names.cache_clear()
    assert c.http_timeout == 7.0
    assert c.streams["audit"].batch_size == 42
    assert c.streams["completions"].interval == 120
    assert c.streams["embeddings"].interval == 300


def test_missing_manifest_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cfg, "MANIFEST_PATH", tmp_path / "manifest.yml")
    cfg.load_manifest.cache_clear()
    try:
        try:
            cfg.load_manifest()
        except cfg.ConfigError as exc:
            assert "manifest.yml" in str(exc) and exc.key == "manifest"
        else:
            raise AssertionError("no error")
    finally:
        monkeypatch.undo()
        cfg.load_manifest.cache_clear()
    assert cfg.load_manifest()["name"] == "openai_elastic"


def test_the_manifest_reads_the_same_with_libyaml_as_with_the_python_parser():
    import yaml

    from agent_input.config import MANIFEST_PATH, load_manifest

    assert load_manifest() == yaml.safe_load(MANIFEST_PATH.read_text(encoding="utf-8"))
