"""Config loading and validation: every error kind, all errors at once, the admin key's sources."""
from __future__ import annotations

import dataclasses
import os

import pytest

from agent_input.config import (
    ConfigError,
    Secret,
    StreamConfig,
    config_from_dict,
    load_config,
    parse_duration,
)

KEY = "sk-admin-CONFIGTESTKEY0123456789"
ENV = {"OPENAI_ADMIN_KEY": KEY}


def errors_of(data, env=ENV):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, env=env)
    return info.value


def one_error(data, env=ENV) -> ConfigError:
    exc = errors_of(data, env)
    assert len(exc.errors) == 1, exc.lines()
    return exc


# ---- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30), ("5m", 300), ("24h", 86400), ("1d", 86400), ("0s", 0), ("1h30m", 5400),
    (" 15M ", 900), (45, 45), (0, 0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("digits", ["300", " 5 "])
def test_a_duration_of_digits_in_quotes_asks_for_its_unit(digits):
    """'"300" is not a duration like ... (or an integer number of seconds)' read as contradicting
    itself: 300 is an integer number of seconds. A quoted number (or one from a policy's text
    field) is told to write its unit, or the number unquoted."""
    with pytest.raises(ConfigError) as info:
        parse_duration(digits, "data_streams.audit.interval")
    number = digits.strip()
    assert info.value.message.startswith(f"{digits!r} has no unit: write {number}s for seconds (or the number unquoted)")


@pytest.mark.parametrize("zero", ["0", " 00 "])
def test_a_zero_in_quotes_is_zero_seconds(zero):
    """A quoted "0" was told to write "0s", and "0s" was then refused where a duration must be over
    zero (two lines in turn for one mistake); zero has no unit to ask for, so it is 0, and the
    key's own bound speaks."""
    assert parse_duration(zero, "data_streams.vector_stores.revision_window") == 0
    exc = one_error({"data_streams": {"audit": {"interval": "0"}}})
    assert exc.errors[0].key == "data_streams.audit.interval"
    assert "no unit" not in str(exc) and "greater than 0s" in str(exc)


@pytest.mark.parametrize("zero", ["-0", "-0s", " -00m ", "-0h0m"])
def test_a_minus_zero_in_quotes_is_zero_not_negative(zero):
    """"-0" (or "-0s") was told it is negative, where -0 and -0.0 unquoted are 0, and a key that
    may be 0 (a revision window, a grace) refused it: zero is zero whatever its sign, and the
    key's own bound speaks."""
    assert parse_duration(zero, "data_streams.vector_stores.revision_window") == 0
    assert config_from_dict({"data_streams": {"completions": {"finalization_grace": zero}}},
                            env=ENV).streams["completions"].finalization_grace == 0
    exc = one_error({"data_streams": {"audit": {"interval": zero}}})
    assert exc.errors[0].key == "data_streams.audit.interval"
    assert "negative" not in str(exc) and "greater than 0s" in str(exc)


@pytest.mark.parametrize("negative", [-60.0, -5.5, float("-inf")])
def test_a_negative_float_duration_is_told_it_is_negative(negative):
    """-5.0 got the general "not a duration" line where -5 and "-5.0" are told they are negative."""
    with pytest.raises(ConfigError) as info:
        parse_duration(negative, "data_streams.audit.interval")
    assert " is negative; expected a duration like" in info.value.message


@pytest.mark.parametrize("bad", ["", "5", "5x", "m5", "1.5h", "-5m", "five minutes", True, -3, -1, -60.0, 1.5,
                                 None, [1]])
def test_bad_duration_names_key_and_allowed_form(bad):
    with pytest.raises(ConfigError) as info:
        parse_duration(bad, "data_streams.audit.interval")
    assert info.value.key == "data_streams.audit.interval"
    assert "5m, 24h, 1d" in info.value.message
    assert str(info.value).startswith("data_streams.audit.interval: ")


# ---- ConfigError and Secret -------------------------------------------------------------------


def test_config_error_str_is_key_colon_message():
    e = ConfigError("data_streams.completions.bucket_width", "'2m' is not allowed (allowed: 1m, 1h, 1d)")
    assert str(e) == "data_streams.completions.bucket_width: '2m' is not allowed (allowed: 1m, 1h, 1d)"
    assert isinstance(e, ValueError)
    assert e.lines() == [str(e)]


def test_secret_never_shows():
    s = Secret(KEY)
    assert str(s) == repr(s) == f"{s}" == "***"
    assert s.reveal() == KEY
    assert KEY not in repr(config_from_dict({}, env=ENV))
    assert KEY not in str(config_from_dict({}, env=ENV))
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")


# ---- the happy path ---------------------------------------------------------------------------


def test_full_file(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "c.yml"
    path.write_text(f"""
url: http://127.0.0.1:8080/v1/
proxy_url: http://proxy:3128
ssl_verify: false
ssl_ca_file: {ca}
http_timeout: 10s
max_retries: 3
namespace: prod
preserve_original_event: true
names_refresh_interval: 30m
data_streams:
  completions:
    bucket_width: 1h
    finalization_grace: 15m
    interval: 1m
  embeddings:
    enabled: false
  vector_stores:
    revision_window: 0s
  audit:
    batch_size: 50
  rate_limits:
    include_archived: true
  costs:
    initial_interval: 7d
""")
    c = load_config(path, env=ENV)
    assert c.url == "http://127.0.0.1:8080/v1/"
    assert c.api_key.reveal() == KEY and c.api_key_source == "env"
    assert (c.proxy_url, c.ssl_verify, c.ssl_ca_file) == ("http://proxy:3128", False, str(ca))
    assert (c.http_timeout, c.max_retries, c.namespace) == (10.0, 3, "prod")
    assert c.preserve_original_event is True and c.names_refresh_interval == 1800
    comp = c.streams["completions"]
    assert (comp.bucket_width, comp.bucket_seconds, comp.finalization_grace, comp.interval) == ("1h", 3600, 900, 60)
    assert comp.revision_window is None and comp.effective_revision_window == 86400
    assert c.streams["embeddings"].enabled is False
    assert "embeddings" not in [s.name for s in c.enabled_streams()]
    assert len(c.enabled_streams()) == len(c.streams) - 1
    assert c.streams["vector_stores"].effective_revision_window == 0
    assert c.streams["audit"].batch_size == 50
    assert c.streams["rate_limits"].include_archived is True
    assert c.streams["costs"].initial_interval == 7 * 86400


def test_every_data_stream_present_even_if_unmentioned():
    c = config_from_dict({}, env=ENV)
    assert len(c.streams) == 13
    assert all(isinstance(s, StreamConfig) for s in c.streams.values())
    with pytest.raises(TypeError):
        c.streams["x"] = None  # read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.url = "x"


@pytest.mark.parametrize("width,window", [("1m", 3 * 3600), ("1h", 86400), ("1d", 3 * 86400)])
def test_revision_window_default_per_width(width, window):
    c = config_from_dict({"data_streams": {"images": {"bucket_width": width}}}, env=ENV)
    assert c.streams["images"].revision_window is None
    assert c.streams["images"].effective_revision_window == window


def test_costs_revision_window_default_is_explicit():
    c = config_from_dict({}, env=ENV)
    assert c.streams["costs"].revision_window == 3 * 86400
    assert c.streams["costs"].bucket_width == "1d"


def test_empty_stream_section_and_empty_file(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("data_streams:\n  completions:\n")
    assert load_config(p, env=ENV).streams["completions"].enabled is True
    p.write_text("")
    assert load_config(p, env=ENV).url == "https://api.openai.com"


def test_text_settings_are_stripped():
    """A quoted YAML value or a protocol message may carry spaces around a URL or a namespace."""
    c = config_from_dict({"url": " https://api.example.com ", "namespace": " prod ",
                          "proxy_url": "\thttp://proxy:3128\n"}, env=ENV)
    assert (c.url, c.namespace, c.proxy_url) == ("https://api.example.com", "prod", "http://proxy:3128")


def test_protocol_style_strings_are_accepted():
    c = config_from_dict({"ssl_verify": "false", "max_retries": "2",
                          "data_streams": {"audit": {"batch_size": "10", "enabled": "true"}}}, env=ENV)
    assert c.ssl_verify is False and c.max_retries == 2 and c.streams["audit"].batch_size == 10


# ---- the admin key ----------------------------------------------------------------------------


def test_key_from_config_wins_over_env():
    c = config_from_dict({"api_key": "sk-admin-from-config-0000"}, env=ENV)
    assert c.api_key.reveal() == "sk-admin-from-config-0000" and c.api_key_source == "config"


def test_key_from_file(tmp_path):
    f = tmp_path / "key"
    f.write_text("sk-admin-from-file-000000\n")
    c = config_from_dict({"api_key_file": str(f)}, env={})
    assert c.api_key.reveal() == "sk-admin-from-file-000000" and c.api_key_source == "file"
    assert c.api_key_file == str(f)


def test_key_from_env_is_stripped():
    """An env file or `$(cat key)` may leave a trailing space or line break: not part of the key."""
    c = config_from_dict({}, env={"OPENAI_ADMIN_KEY": "  sk-admin-from-env-0000\n"})
    assert c.api_key.reveal() == "sk-admin-from-env-0000" and c.api_key_source == "env"


def test_a_key_file_holding_more_than_the_key_is_refused_without_showing_it(tmp_path):
    f = tmp_path / "key"
    for text in ("sk-admin-first0000 sk-admin-second000\n", "OPENAI_ADMIN_KEY: sk-admin-yaml0000\n"):
        f.write_text(text)
        e = one_error({"api_key_file": str(f)}, env={})
        assert e.key == "api_key_file" and "only the admin key" in e.message
        assert all(part not in str(e) for part in text.split())


def test_missing_key():
    e = one_error({}, env={})
    assert e.key == "api_key"
    assert "OPENAI_ADMIN_KEY" in e.message and "api_key_file" in e.message


def test_unreadable_key_file(tmp_path):
    e = one_error({"api_key_file": str(tmp_path / "nope")}, env={})
    assert e.key == "api_key_file" and "does not exist" in e.message
    (tmp_path / "empty").write_text("\n")
    e = one_error({"api_key_file": str(tmp_path / "empty")}, env={})
    assert "empty" in e.message
    e = one_error({"api_key_file": str(tmp_path)}, env={})
    assert e.key == "api_key_file" and "cannot read" in e.message
    if os.geteuid() != 0:
        f = tmp_path / "locked"
        f.write_text("sk-admin-x")
        f.chmod(0)
        assert one_error({"api_key_file": str(f)}, env={}).key == "api_key_file"


def test_a_key_file_that_is_not_utf8_says_so_without_its_bytes(tmp_path):
    """It said "cannot read the file: UnicodeDecodeError", where openai-assets says "it is not UTF-8
    text" (a key saved as UTF-16 by an editor, or a binary file named by mistake)."""
    f = tmp_path / "k"
    f.write_bytes("sk-admin-Zq\u00e9secret".encode("utf-16"))
    e = one_error({"api_key_file": str(f)}, env={})
    assert e.key == "api_key_file"
    assert e.message.startswith("cannot read the file: it is not UTF-8 text (")
    assert "secret" not in str(e) and "\\x" not in str(e) and "0x" not in str(e)


def test_key_and_key_file_together(tmp_path):
    f = tmp_path / "k"
    f.write_text("sk-admin-file")
    e = one_error({"api_key": "sk-admin-inline", "api_key_file": str(f)})
    assert e.key == "api_key_file" and "not both" in e.message


def test_es_url_and_es_cloud_id_together_are_refused():
    """Both set: one of them would be silently ignored (the cloud id won, whatever es_url said)."""
    e = one_error({"es_url": "http://127.0.0.1:9200", "es_cloud_id": "deploy:ZXhhbXBsZS5jb20kYSRi"}, env=ENV)
    assert e.key == "es_cloud_id" and "not both" in e.message


def test_key_never_in_errors(tmp_path):
    f = tmp_path / "k"
    f.write_text(f"{KEY} extra words")
    e = errors_of({"api_key_file": str(f), "max_retries": "many"})
    assert KEY not in str(e) and KEY not in repr(e)


# ---- every error kind -------------------------------------------------------------------------


def test_unknown_key_suggests_closest():
    e = one_error({"proxy_ur": "http://x"})
    assert e.key == "proxy_ur" and "did you mean 'proxy_url'?" in e.message and "allowed:" in e.message


def test_unknown_stream_and_stream_var_suggest():
    e = errors_of({"data_streams": {"completion": {}, "audit": {"batchsize": 5}}})
    assert "data_streams.completion: unknown data stream; did you mean 'completions'?" in e.lines()[0]
    assert e.lines()[1].startswith("data_streams.audit.batchsize: unknown setting of audit; did you mean 'batch_size'?")


def test_bucket_width_not_allowed():
    e = one_error({"data_streams": {"completions": {"bucket_width": "2m"}}})
    assert str(e) == "data_streams.completions.bucket_width: '2m' is not allowed (allowed: 1m, 1h, 1d)"
    e = one_error({"data_streams": {"costs": {"bucket_width": "1h"}}})
    assert str(e) == "data_streams.costs.bucket_width: '1h' is not allowed (allowed: 1d)"


@pytest.mark.parametrize("stream", ["code_interpreter_sessions", "vector_stores"])
def test_grace_on_a_stream_without_one(stream):
    e = one_error({"data_streams": {stream: {"finalization_grace": "15m"}}})
    assert e.key == f"data_streams.{stream}.finalization_grace"
    assert "has no finalization grace" in e.message and "completions" in e.message


def test_var_of_another_kind_of_stream():
    e = one_error({"data_streams": {"audit": {"bucket_width": "1m"}}})
    assert e.key == "data_streams.audit.bucket_width" and "allowed: enabled, interval" in e.message


@pytest.mark.parametrize("value", [0, 101, -1, "lots", 5.5, True])
def test_batch_size_range_and_type(value):
    e = one_error({"data_streams": {"rate_limits": {"batch_size": value}}})
    assert e.key == "data_streams.rate_limits.batch_size" and "1..100" in e.message


@pytest.mark.parametrize("data,key", [
    ({"ssl_verify": "yes"}, "ssl_verify"),
    ({"preserve_original_event": 1}, "preserve_original_event"),
    ({"max_retries": "x"}, "max_retries"),
    ({"url": 5}, "url"),
    ({"namespace": ["a"]}, "namespace"),
    ({"http_timeout": "soon"}, "http_timeout"),
    ({"http_timeout": "0s"}, "http_timeout"),
    ({"names_refresh_interval": "1w"}, "names_refresh_interval"),
    ({"names_refresh_interval": "0s"}, "names_refresh_interval"),  # would re-list every name for every page
    ({"data_streams": {"audit": {"enabled": "maybe"}}}, "data_streams.audit.enabled"),
    ({"data_streams": {"completions": {"interval": "0s"}}}, "data_streams.completions.interval"),
    ({"data_streams": {"images": {"revision_window": "-1h"}}}, "data_streams.images.revision_window"),
    ({"data_streams": {"images": {"initial_interval": "yesterday"}}}, "data_streams.images.initial_interval"),
    ({"data_streams": []}, "data_streams"),
    ({"data_streams": {"images": "on"}}, "data_streams.images"),
])
def test_wrong_types(data, key):
    e = one_error(data)
    assert e.key == key, str(e)


@pytest.mark.parametrize("url", ["api.openai.com", "ftp://api.openai.com", "https://", "http://h:99999", "://x",
                                 "http://h:0"])
def test_bad_url(url):
    e = one_error({"url": url})
    assert e.key == "url" and "not a valid URL" in e.message


def test_a_ca_file_this_user_may_not_read_is_said_to_be_unreadable(tmp_path, monkeypatch):
    """A CA bundle that exists but that the collector may not read is named at once, not left to
    fail every TLS handshake later (patched: a root test run reads any file)."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert config_from_dict({"ssl_ca_file": str(ca)}, env=ENV).ssl_ca_file == str(ca)
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **kw: False)
    e = one_error({"ssl_ca_file": str(ca)})
    assert e.key == "ssl_ca_file" and "is not readable" in e.message


def test_bad_proxy_and_ca(tmp_path):
    e = errors_of({"proxy_url": "proxy:3128", "ssl_ca_file": str(tmp_path / "none.pem")})
    assert [x.key for x in e.errors] == ["proxy_url", "ssl_ca_file"]
    assert config_from_dict({"proxy_url": "socks5h://p:1080"}, env=ENV).proxy_url == "socks5h://p:1080"
    e = one_error({"es_ssl_ca_file": str(tmp_path / "es-none.pem")})
    assert e.key == "es_ssl_ca_file" and "not a readable file" in e.message


@pytest.mark.parametrize("ns,fragment", [
    ("my-ns", "'-'"), ("x" * 101, "at most 100"), ("Prod", "lowercase"), ("a b", "' '"), ("_x", "'_'"), ("+x", "'+'"),
    ("team\ud800", "not valid Unicode"),  # a lone surrogate, as JSON "\ud800" decodes: no event could be encoded
    ("日" * 100, "300 bytes long in UTF-8"),  # 100 characters, but no backing index could be named with it
])
def test_bad_namespace(ns, fragment):
    e = one_error({"namespace": ns})
    assert e.key == "namespace" and fragment in e.message


def test_a_huge_namespace_is_quoted_cut_not_whole():
    e = one_error({"namespace": "x" * 3_000_000})
    assert e.key == "namespace" and "3000000 characters" in e.message and len(str(e)) < 700


def test_namespace_100_chars_is_fine():
    assert config_from_dict({"namespace": "x" * 100}, env=ENV).namespace == "x" * 100


def test_namespace_bytes_leave_room_for_the_longest_backing_index_of_every_dataset():
    """Elasticsearch limits index names to 255 bytes, and a backing index
    (.ds-logs-<dataset>-<namespace>-yyyy.MM.dd-000001) holds the namespace: a namespace of
    multi-byte characters passed the 100-character check, then failed when the index was created."""
    from agent_input import audit, rate_limits
    from agent_input.config import global_vars, namespace_max_bytes
    from agent_input.streams import STREAMS_BY_NAME

    limit = namespace_max_bytes()
    datasets = {s.dataset for s in STREAMS_BY_NAME.values()} | {audit.DATASET, rate_limits.DATASET}
    backing = [f".ds-logs-{d}-{'x' * limit}-2026.11.23-000001".encode() for d in datasets]
    assert max(len(b) for b in backing) == 255, "the limit is exactly what the longest dataset leaves"
    ok = "é" * (limit // 2) + "x" * (limit % 2)
    assert len(ok.encode()) == limit and config_from_dict({"namespace": ok}, env=ENV).namespace == ok
    for ns in ("é" * (limit // 2 + 1), "日" * 100):
        e = one_error({"namespace": ns})
        assert e.key == "namespace" and f"is {len(ns.encode())} bytes long in UTF-8 (at most {limit}" in e.message
        assert "\n" not in str(e)
    description = " ".join(global_vars()["namespace"]["description"].split())
    assert f"{limit} bytes" in description, "the manifest states the same limit"


def test_all_errors_reported_at_once():
    e = errors_of({
        "urll": "x",
        "namespace": "a-b",
        "data_streams": {
            "completions": {"bucket_width": "2m", "interval": "5 minutes"},
            "vector_stores": {"finalization_grace": "5m"},
            "audit": {"batch_size": 500},
        },
    }, env={})
    keys = [x.key for x in e.errors]
    assert keys == ["urll", "api_key", "namespace", "data_streams.completions.interval",
                    "data_streams.completions.bucket_width", "data_streams.vector_stores.finalization_grace",
                    "data_streams.audit.batch_size"]
    assert e.key == ""
    assert str(e) == e.message == "\n".join(e.lines())
    assert all(line.startswith(k + ": ") for line, k in zip(str(e).splitlines(), keys))


# ---- the file itself --------------------------------------------------------------------------


def test_file_missing(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yml", env=ENV)
    assert info.value.key == "config" and "does not exist" in info.value.message


def test_file_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env=ENV)
    assert "directory" in info.value.message


def test_a_key_written_twice_is_an_error_not_last_one_wins(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("data_streams:\n  completions:\n    interval: 5m\n    interval: 10m\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert "key 'interval' appears twice" in info.value.message and "line 4" in info.value.message
    # a merge key's values may still be overridden
    p.write_text("base: &b {interval: 5m}\ndata_streams:\n  completions:\n    <<: *b\n    interval: 10m\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert info.value.key == "base" and "appears twice" not in str(info.value)  # only: no such setting


@pytest.mark.parametrize("text, line", [
    ("<<: {namespace: a, namespace: b}\n", 1),
    ("<<:\n  namespace: a\n  namespace: b\n", 3),
    ("<<: [{url: 'http://x'}, {namespace: a, namespace: b}]\n", 1),
    ("data_streams:\n  completions:\n    <<: {<<: {interval: 5m, interval: 10m}}\n", 3),
])
def test_a_key_written_twice_inside_a_merged_mapping_is_an_error(tmp_path, text, line):
    """`<<: {namespace: a, namespace: b}` was accepted silently (namespace b): PyYAML folds a merged
    mapping into the one merging it without constructing it, so the duplicate check never saw it."""
    p = tmp_path / "c.yml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert "appears twice in one mapping" in info.value.message and f"line {line}," in info.value.message


def test_merged_mappings_may_still_override_each_other(tmp_path):
    """What merging is for: the mapping's own keys override merged ones, and two merged mappings
    may hold the same key (which one wins is PyYAML's)."""
    p = tmp_path / "c.yml"
    p.write_text("<<: [{namespace: a}, {namespace: a, url: 'http://127.0.0.1:1'}]\nurl: 'http://127.0.0.1:2'\n")
    config = load_config(p, env=ENV)
    assert config.namespace == "a" and config.url == "http://127.0.0.1:2"


def test_a_mapping_that_merges_may_itself_be_merged_again(tmp_path):
    """A chain of defaults (`embeddings: &fast {<<: *hourly, interval: 5m}`, then `<<: *fast`) was
    refused as "key 'interval' appears twice": PyYAML rewrites a mapping that merges into the
    merged pairs followed by its own, and the duplicate check read that rewrite when it was merged
    again. Each mapping is judged as written, once."""
    p = tmp_path / "c.yml"
    p.write_text("data_streams:\n  completions: &hourly\n    bucket_width: 1h\n    interval: 10m\n"
                 "  embeddings: &fast\n    <<: *hourly\n    interval: 5m\n"
                 "  moderations:\n    <<: *fast\n  images:\n    <<: [*fast, *hourly]\n    interval: 20m\n")
    c = load_config(p, env=ENV)
    assert [c.streams[s].interval for s in ("completions", "embeddings", "moderations", "images")] == [
        600, 300, 300, 1200]
    assert c.streams["moderations"].bucket_width == c.streams["completions"].bucket_width
    # a duplicate written inside a mapping that is merged again is still found, once, at its line
    p.write_text("data_streams:\n  completions: &a {interval: 5m, interval: 10m}\n  embeddings: {<<: *a}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert "key 'interval' appears twice" in info.value.message and "line 2," in info.value.message


def test_a_merge_key_written_twice_is_refused_at_its_line(tmp_path):
    """`{<<: *a, <<: *b}` is a key written twice like any other: PyYAML accepted it and merged both,
    so which of two shared settings won was not what the user wrote. The line names the list form."""
    p = tmp_path / "c.yml"
    p.write_text("data_streams:\n  completions: &a {interval: 5m}\n  images: &b {interval: 10m}\n"
                 "  embeddings:\n    <<: *a\n    <<: *b\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert "key '<<' appears twice" in info.value.message and "line 6," in info.value.message
    assert "<<: [*a, *b]" in info.value.message
    p.write_text("data_streams:\n  completions: &a {interval: 5m}\n  images: &b {bucket_width: 1h}\n"
                 "  embeddings:\n    <<: [*a, *b]\n")
    embeddings = load_config(p, env=ENV).streams["embeddings"]
    assert (embeddings.interval, embeddings.bucket_width) == (300, "1h")


def test_an_unquoted_key_read_as_a_yaml_alias_is_not_echoed(tmp_path):
    """`api_key: *<key>` (a stray * before the key) is a YAML alias: the parser's error named it,
    so a key that does not start with sk- (not caught by the redaction) was printed."""
    p = tmp_path / "c.yml"
    p.write_text("api_key: *adminSECRET0123456789abcdef\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert "adminSECRET0123456789abcdef" not in str(info.value)
    assert "line 1" in info.value.message and "quote the value" in info.value.message


def test_file_not_yaml(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("url: [unclosed\n  namespace: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert info.value.key == "config" and "not valid YAML" in info.value.message and "line" in info.value.message
    # the problem alone: PyYAML's context ("while parsing a flow sequence") is added only to a "but ..."
    assert info.value.message.endswith("is not valid YAML (line 2, column 12): expected ',' or ']', but got ':'"), \
        info.value.message


def test_a_control_character_in_the_file_is_named_with_its_line(tmp_path):
    """PyYAML's ReaderError (a NUL, a BEL: a binary file, a paste from a terminal) has no problem
    nor mark: the line said only "is not valid YAML: syntax error"."""
    p = tmp_path / "c.yml"
    p.write_bytes(b"url: https://api.openai.com\nnamespace: a\x07b\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert info.value.message.endswith("is not valid YAML (line 2, column 13): it holds the control character "
                                       "U+0007, which YAML does not allow"), info.value.message


def test_a_second_yaml_document_is_named_not_only_but_found_another_document(tmp_path):
    """A `---` that starts a second document (two configs pasted into one file): PyYAML puts
    "expected a single document in the stream" in the error's context and only "but found another
    document" in its problem, which was all the line gave."""
    p = tmp_path / "c.yml"
    p.write_text("namespace: a\n---\nnamespace: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert info.value.message.endswith("is not valid YAML (line 2, column 1): expected a single document in the "
                                       "stream, but found another document"), info.value.message


def test_file_not_a_mapping(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("- url\n- namespace\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert "mapping" in info.value.message


def test_file_not_utf8(tmp_path):
    p = tmp_path / "c.yml"
    p.write_bytes(b"url: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert info.value.key == "config"


def test_an_endless_or_huge_config_or_key_file_is_refused_not_read_into_memory(tmp_path):
    """`--config /dev/zero` or `api_key_file: /dev/zero` (or a huge file named by mistake) read it
    whole: every byte of memory, then a MemoryError traceback. A bounded read refuses them.
    Run in a process with 1 GiB of address space and a timeout: were the read unbounded again, the
    test fails (MemoryError) instead of taking the machine's memory."""
    import resource
    import subprocess
    import sys

    p = tmp_path / "c.yml"
    p.write_text("api_key_file: /dev/zero\n")
    script = (
        "from agent_input.config import ConfigError, load_config\n"
        "for path, env in (('/dev/zero', {'OPENAI_ADMIN_KEY': 'sk-admin-x'}), (%r, {})):\n"
        "    try:\n"
        "        load_config(path, env=env)\n"
        "    except ConfigError as exc:\n"
        "        print(exc.key, '|', exc.message)\n" % str(p)
    )

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          preexec_fn=limit_memory)
    assert proc.returncode == 0, proc.stderr[-1500:]
    config_line, key_line = proc.stdout.splitlines()
    assert config_line.startswith("config |") and "larger than 10 MiB" in config_line
    assert key_line.startswith("api_key_file |") and "larger than 64 KiB" in key_line


def test_a_key_file_that_is_a_fifo_nobody_writes_is_refused_not_waited_on_for_ever(tmp_path, monkeypatch):
    """`api_key_file` naming a named pipe (FIFO) that no process writes to: open() blocked for ever,
    so `collect` and `run` hung silently before their first log line. It is given a bounded wait."""
    import agent_input.config as config_module
    monkeypatch.setattr(config_module, "FIFO_WAIT_SECONDS", 0.3)
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    p = tmp_path / "c.yml"
    p.write_text(f"api_key_file: {fifo}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    assert info.value.key == "api_key_file"
    assert "nothing was written to the pipe" in info.value.message


def test_a_key_file_that_is_a_fifo_with_a_writer_is_read(tmp_path):
    """Process substitution (`api_key_file: /dev/fd/63`) and named pipes fed by a secrets helper
    still work: the writer's bytes are read up to its end."""
    import threading
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "w") as fh:
            fh.write("sk-admin-from-a-pipe\n")

    writer = threading.Thread(target=write)
    writer.start()
    p = tmp_path / "c.yml"
    p.write_text(f"api_key_file: {fifo}\n")
    cfg = load_config(p, env={})
    writer.join(5)
    assert cfg.api_key.reveal() == "sk-admin-from-a-pipe"


# ---- bounds and dead windows ------------------------------------------------------------------


@pytest.mark.parametrize("data,key", [
    ({"http_timeout": "99999999999d"}, "http_timeout"),
    ({"http_timeout": "11m"}, "http_timeout"),
    ({"names_refresh_interval": 10**30}, "names_refresh_interval"),
    ({"data_streams": {"completions": {"interval": "999999999999999d"}}}, "data_streams.completions.interval"),
    ({"data_streams": {"costs": {"interval": "8d"}}}, "data_streams.costs.interval"),
    ({"data_streams": {"audit": {"initial_interval": "3651d"}}}, "data_streams.audit.initial_interval"),
    ({"data_streams": {"images": {"finalization_grace": "2d", "initial_interval": "3d"}}},
     "data_streams.images.finalization_grace"),
    ({"data_streams": {"images": {"revision_window": "31d"}}}, "data_streams.images.revision_window"),
    ({"data_streams": {"costs": {"revision_window": 1e300}}}, "data_streams.costs.revision_window"),
])
def test_durations_beyond_their_bound_name_the_key(data, key):
    """A typo'd duration overflowed the scheduler or the HTTP client long after validation."""
    e = one_error(data)
    assert e.key == key and "is too long (at most " in e.message, str(e)


def test_durations_at_their_bound_are_fine():
    c = config_from_dict({"http_timeout": "10m", "names_refresh_interval": "7d", "data_streams": {
        "completions": {"interval": "7d", "initial_interval": "3650d", "finalization_grace": "1d",
                        "revision_window": "30d"}}}, env=ENV)
    assert c.http_timeout == 600 and c.streams["completions"].initial_interval == 3650 * 86400


def test_every_duration_var_has_a_bound_its_default_respects():
    from agent_input.config import data_streams, global_vars

    dvars = [v for v in global_vars().values() if v["type"] == "duration"]
    dvars += [v for ds in data_streams().values() for v in ds["vars"] if v["type"] == "duration"]
    for var in dvars:
        assert "max" in var, var["name"]
        if var["default"] != "":
            assert parse_duration(var["default"]) <= parse_duration(var["max"]), var["name"]


@pytest.mark.parametrize("stream,settings,fragment", [
    ("completions", {"initial_interval": "0s"}, "0s must be at least one bucket width (1m)"),
    ("audit", {"initial_interval": 0}, "greater than 0s"),
    ("costs", {"initial_interval": "0s"}, "0s must be at least one bucket width (1d)"),
    ("costs", {"initial_interval": "12h"}, "12h must be at least one bucket width (1d)"),
    ("completions", {"initial_interval": "2h", "finalization_grace": "1h", "bucket_width": "1d"},
     "2h must be at least one bucket width (1d) longer than finalization_grace (1h)"),
    ("embeddings", {"initial_interval": "5m", "finalization_grace": "10m"},
     "5m must be at least one bucket width (1m) longer than finalization_grace (10m)"),
    ("images", {"initial_interval": "15m", "finalization_grace": "15m"},
     "15m must be at least one bucket width (1m) longer than finalization_grace (15m)"),
])
def test_initial_interval_must_reach_a_whole_bucket_past_the_grace(stream, settings, fragment):
    """Otherwise the first window can hold no whole bucket: no cursor is stored, and every poll at
    the same time of day (a daily costs interval, say) finds it empty and collects nothing."""
    e = one_error({"data_streams": {stream: settings}})
    assert e.key == f"data_streams.{stream}.initial_interval" and fragment in e.message, str(e)


def test_initial_interval_one_bucket_past_the_grace_is_fine():
    c = config_from_dict({"data_streams": {"completions": {"initial_interval": "16m", "finalization_grace": "15m"},
                                           "costs": {"initial_interval": "1d"}}}, env=ENV)
    assert c.streams["completions"].initial_interval == 960 and c.streams["costs"].initial_interval == 86400


# ---- nothing secret echoed --------------------------------------------------------------------


def test_api_key_file_value_is_never_echoed():
    """Users paste the key itself into api_key_file: the error must not print it back."""
    plain = "Zq8xPASTEDKEY0123456789"
    for value in (KEY, plain):
        e = one_error({"api_key_file": value}, env={})
        assert e.key == "api_key_file" and "does not exist" in e.message
        assert value not in str(e), str(e)


@pytest.mark.parametrize("source", ["api_key", "env"])
def test_configured_key_never_echoed_by_another_setting(source):
    """Even a key not shaped like sk-... is redacted when it lands in an echoed value."""
    plain = "Zq8xPLAINKEY0123456789"
    data = {"namespace": plain}
    env = {}
    if source == "api_key":
        data["api_key"] = plain
    else:
        env = {"OPENAI_ADMIN_KEY": plain}
    e = errors_of(data, env=env)
    assert [x.key for x in e.errors] == ["namespace"] and plain not in str(e), str(e)
    e = one_error({"namespace": "sk-admin-ANYKEYSHAPED0123456789"})
    assert "sk-admin-ANYKEYSHAPED0123456789" not in str(e), str(e)


@pytest.mark.parametrize("key,url", [
    ("es_url", "https://elastic:S3cretPassw0rd@es.example.com:92OO"),
    ("proxy_url", "http://proxyuser:S3cretPassw0rd@proxy:80:80"),
    ("url", "api.openai.com:S3cretPassw0rd@x"),
    ("es_url", "https://elastic:S3cret@Passw0rd@es:x"),
])
def test_url_credentials_never_echoed(key, url):
    e = one_error({key: url})
    assert e.key == key and "not a valid URL" in e.message and "***@" in e.message
    assert "S3cret" not in str(e) and "Passw0rd" not in str(e), str(e)


def test_url_passwords_are_redacted_from_logs_once_loaded():
    from agent_input import logs
    from agent_input.config import display_url

    config_from_dict({"proxy_url": "http://u:Pr0xyPassw0rd-cfgtest@proxy:3128"}, env=ENV)
    assert logs.redact("via http://u:Pr0xyPassw0rd-cfgtest@proxy:3128") == "via http://u:***@proxy:3128"
    assert display_url("https://u:p@host:9200/x") == "https://***@host:9200/x"
    assert display_url("https://host:9200/x") == "https://host:9200/x"


def test_a_number_of_thousands_of_digits_is_one_line_cut_short(tmp_path):
    """int() refuses 4,300+ digits with a plain ValueError: it must be the key's error instead."""
    for settings, key in (({"max_retries": "1" * 5000}, "max_retries"),
                          ({"data_streams": {"completions": {"interval": "1" * 5000 + "s"}}},
                           "data_streams.completions.interval")):
        e = one_error(settings)
        assert e.key == key and ("(5000 characters)" in e.message or "(5001 characters)" in e.message)
        assert len(str(e)) < 200
    p = tmp_path / "c.yml"
    p.write_text("max_retries: " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert info.value.key == "config" and "cannot be read" in info.value.message


@pytest.mark.parametrize("settings,env", [
    ({"api_key": "sk-admin-AAAA\nSECRETTAIL"}, {}),
    ({}, {"OPENAI_ADMIN_KEY": "sk-admin-AAAA\x00SECRETTAIL"}),
    ({}, {"OPENAI_ADMIN_KEY": "sk-admin-AAAA\u2026SECRETTAIL"}),  # a pasted placeholder
])
def test_a_key_with_a_line_break_or_odd_character_is_refused_without_showing_it(settings, env):
    """requests would refuse the header and quote it, and its `\\n` escapes the redaction."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(settings, env=env)
    (e,) = info.value.errors
    assert e.key == "api_key" and "SECRETTAIL" not in str(e) and "not shown" in e.message


@pytest.mark.parametrize("url,shown", [
    ("https://elastic:pa@ss@es:9200/x", "https://***@es:9200/x"),   # the last @ of the authority
    ("https://u:pw@es:9200/search?by=a@b.com", "https://***@es:9200/search?by=a@b.com"),  # a query's @ stays
    ("https://elastic:Ab#cd*9@es:9200", "https://***@es:9200"),  # an unencoded # in the password: still hidden
    ("https://elastic:a/b?c@es:9200", "https://***@es:9200"),
    ("es:9200", "es:9200"),
])
def test_display_url_hides_only_the_user_info(url, shown):
    from agent_input.config import display_url

    assert display_url(url) == shown


def test_a_key_file_saved_with_a_bom_is_read(tmp_path):
    p = tmp_path / "key"
    p.write_text("\ufeffsk-admin-abc_DEF-123\n", encoding="utf-8")
    assert config_from_dict({"api_key_file": str(p)}, env={}).api_key.reveal() == "sk-admin-abc_DEF-123"


# ---- what an error line may echo: bounded, encodable ------------------------------------------
BIG = "x" * 3_000_000  # a value a supervisor can send in a config message


@pytest.mark.parametrize("settings,key,shown", [
    ({"ssl_verify": BIG}, "ssl_verify", "(3000000 characters)"),
    ({"ssl_verify": list(range(100_000))}, "ssl_verify", "a list of 100000 items is not a boolean"),
    ({"ssl_verify": {"a": [1, 2]}}, "ssl_verify", "a mapping of 1 key is not a boolean"),
    ({"max_retries": [BIG]}, "max_retries", "a list of 1 item is not an integer"),
    ({"max_retries": 10**4000}, "max_retries", "(4001 digits) is out of range"),
    ({"data_streams": {"completions": {"bucket_width": BIG}}}, "data_streams.completions.bucket_width",
     "(3000000 characters) is not allowed"),
    ({"data_streams": {"audit": {"interval": "-" + BIG}}}, "data_streams.audit.interval",
     "(3000001 characters) is negative"),
    ({"data_streams": {"audit": {"interval": -10**4000}}}, "data_streams.audit.interval", "digits) is negative"),
    ({"http_timeout": [1] * 10}, "http_timeout", "a list of 10 items is not a duration"),
    ({"url": "https://" + BIG + " x"}, "url", "characters) is not a valid URL"),
    ({"ssl_ca_file": "/" + BIG}, "ssl_ca_file", "characters) is not a readable file"),
])
def test_an_echoed_value_is_cut_or_described_never_printed_whole(settings, key, shown):
    """A 3 MB string sent by a supervisor became a 3 MB status line; a list was printed whole."""
    e = one_error(settings)
    assert e.key == key and shown in e.message, str(e)[:300]
    assert len(str(e)) < 300


@pytest.mark.parametrize("data,key", [
    ({"\ud800x": 1}, "'\\ud800x'"),
    ({"data_streams": {"\ud800x": {}}}, "data_streams.'\\ud800x'"),
    ({"data_streams": {"audit": {"inter\udfffval": "5m"}}}, "data_streams.audit.'inter\\udfffval'"),
    ({"data_streams": {"bad\nname": {}}}, "data_streams.'bad\\nname'"),
    ({"data_streams": {BIG: {}}}, "data_streams.'" + "x" * 44),
    ({BIG: 1}, "'" + "x" * 44),
])
def test_an_odd_key_is_quoted_escaped_and_cut_in_its_key_path(data, key):
    """A lone surrogate in a key made the whole rejection unencodable: the supervisor never
    learned why its config was refused."""
    e = one_error(data)
    assert e.key.startswith(key), e.key[:100]
    assert len(str(e)) < 400
    str(e).encode("utf-8")  # no UnicodeEncodeError


# ---- YAML anchors and aliases -------------------------------------------------------------------
ALIAS_BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['x'] * 9)}]\n"
                     for p, a in zip([""] + list("abcdefg"), "abcdefgh")) + "ssl_verify: *h\n"


def test_an_alias_bomb_is_refused_at_once_naming_its_line(tmp_path):
    """Nine lines standing for 43 million values: printing the value took ~55 s and 226 MB."""
    import time

    p = tmp_path / "c.yml"
    p.write_text(ALIAS_BOMB)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert time.monotonic() - started < 5
    e = info.value
    assert e.key == "config" and "aliases stand for more than 10000 values" in e.message, str(e)
    assert "(line 5, column " in e.message  # the first alias past the bound: e's
    assert len(str(e)) < 300


def test_aliases_and_merge_keys_within_bounds_still_work(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("data_streams:\n  completions: &usage {interval: 10m, finalization_grace: 0s}\n"
                 "  embeddings: *usage\n  images: {<<: *usage, interval: 20m}\n")
    c = load_config(p, env=ENV)
    assert c.streams["embeddings"].interval == 600 and c.streams["images"].interval == 1200


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("data_streams: &a\n  completions: *a\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert info.value.key == "config" and "*a refers to the value it is part of" in info.value.message
    assert "line 2" in info.value.message


def test_yaml_nested_thousands_deep_is_an_error_not_a_traceback(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("url: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env=ENV)
    assert info.value.key == "config" and "nested too deeply" in info.value.message


def test_a_plain_key_pasted_elsewhere_is_not_quoted_even_cut():
    """An admin key not shaped like sk-... pasted into another setting: the error line quoted its
    first 45 characters, and the redaction looked for the whole key only."""
    plain = "Zq8xPLAINADMINKEY0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH"  # 61 characters
    es_key = "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="
    for data, env in (({"namespace": plain}, {"OPENAI_ADMIN_KEY": plain}),
                      ({"api_key": plain, "namespace": plain}, {}),
                      ({"namespace": plain, "es_url": plain}, {**ENV, "ELASTIC_API_KEY": plain}),
                      ({"namespace": es_key}, {**ENV, "ELASTIC_PASSWORD": es_key})):
        e = errors_of(data, env=env)
        shown = " ".join(str(x) for x in e.errors)
        assert e.errors and plain[:12] not in shown and es_key[:12] not in shown, shown


def test_aliases_that_stand_for_exactly_the_bound_are_accepted(tmp_path):
    """The bound is on more than MAX_ALIASED_VALUES: aliases standing for exactly that many
    values pass, one more is refused."""
    from agent_input.config import MAX_ALIASED_VALUES

    def aliasing(n_items: int) -> str:  # an alias of a list of n_items stands for n_items + 1 values
        p = tmp_path / f"c{n_items}.yml"
        p.write_text("tags: &a [" + ", ".join(["x"] * n_items) + "]\nmore_tags: *a\n")
        with pytest.raises(ConfigError) as info:  # unknown settings: the file itself was read
            load_config(p, env=ENV)
        return str(info.value)

    accepted = aliasing(MAX_ALIASED_VALUES - 1)
    assert "alias" not in accepted and "unknown setting" in accepted
    assert f"aliases stand for more than {MAX_ALIASED_VALUES} values" in aliasing(MAX_ALIASED_VALUES)


def test_a_file_of_exactly_the_size_limit_is_read_one_byte_more_refused(tmp_path):
    from agent_input.config import FileTooLarge, read_text_file

    p = tmp_path / "f"
    p.write_bytes(b"k" * 2048)
    assert read_text_file(p, 2048) == "k" * 2048
    with pytest.raises(FileTooLarge, match="larger than 1 KiB"):
        read_text_file(p, 2047)


def test_an_empty_value_is_the_manifest_default_as_an_absent_one(tmp_path):
    """Elastic Agent sends a policy's empty fields as "" (and a YAML `key:` with an empty string
    reads the same): each takes the manifest's default, as an absent one does, rather than being
    refused as no integer, duration or boolean, or kept as an empty URL or namespace."""
    empty = {"url": "", "namespace": "", "http_timeout": "", "max_retries": "", "ssl_verify": "",
             "names_refresh_interval": "", "data_streams": {"audit": {"interval": "", "initial_interval": "",
                                                                       "batch_size": "", "enabled": ""}}}
    assert config_from_dict(empty, env=ENV) == config_from_dict({}, env=ENV)
