"""A corpus of invalid configurations through the real command line: each one gives exit status 2,
a clear line naming the offending key, nothing on stdout, no traceback, and no request."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

KEY = "sk-admin-BADCONFIGCORPUS0123456789"
# Where a config the collector wrongly accepts would send requests: refused at once, never retried.
LOCAL = "url: http://127.0.0.1:9\nmax_retries: 0\n"

# name -> (YAML text, the key the error line must name)
CORPUS = {
    "unknown top-level key": ("url: http://127.0.0.1:9\nurll: x\n", "urll"),
    "unknown data stream": ("data_streams:\n  completion: {}\n", "data_streams.completion"),
    "unknown stream option": ("data_streams:\n  completions:\n    widht: 1m\n", "data_streams.completions.widht"),
    "bad duration": ("data_streams:\n  completions:\n    interval: 5x\n", "data_streams.completions.interval"),
    "negative duration": ("data_streams:\n  audit:\n    interval: -5m\n", "data_streams.audit.interval"),
    "bucket width not allowed": ("data_streams:\n  embeddings:\n    bucket_width: 2m\n",
                                 "data_streams.embeddings.bucket_width"),
    "costs only support 1d": ("data_streams:\n  costs:\n    bucket_width: 1m\n", "data_streams.costs.bucket_width"),
    "grace where there is none": ("data_streams:\n  costs:\n    finalization_grace: 15m\n",
                                  "data_streams.costs.finalization_grace"),
    "enabled is not a bool": ("data_streams:\n  images:\n    enabled: maybe\n", "data_streams.images.enabled"),
    "max_retries not an integer": ("max_retries: many\n", "max_retries"),
    # a number of the wrong type or out of bounds must not be truncated or taken as it is
    "max_retries a fraction": ("url: http://127.0.0.1:9\nmax_retries: 2.5\n", "max_retries"),
    "max_retries negative": ("url: http://127.0.0.1:9\nmax_retries: -1\n", "max_retries"),
    "batch_size 0": (f"{LOCAL}data_streams:\n  audit:\n    batch_size: 0\n", "data_streams.audit.batch_size"),
    "http_timeout not a duration": ("http_timeout: soon\n", "http_timeout"),
    "data_streams not a mapping": ("data_streams: [completions]\n", "data_streams"),
    "missing admin key": ("url: http://127.0.0.1:9\n", "api_key"),
    "api_key_file missing": ("api_key_file: /nonexistent/openai-key\n", "api_key_file"),
    # 100 characters but 300 bytes: the backing index name would be over Elasticsearch's 255 bytes
    "namespace too long in bytes": (f"{LOCAL}namespace: {'日' * 100}\n", "namespace"),
    # beyond any sane bound: passed, then overflowed the scheduler or every request much later
    "interval of millennia": (f"{LOCAL}data_streams:\n  completions:\n    interval: 999999999999999d\n",
                              "data_streams.completions.interval"),
    "http_timeout of millennia": (f"{LOCAL}http_timeout: 99999999999d\n", "http_timeout"),
    "initial_interval of millennia": (f"{LOCAL}data_streams:\n  costs:\n    initial_interval: 999999999999999d\n",
                                      "data_streams.costs.initial_interval"),
    # an empty first window stores no cursor: the stream would collect nothing forever, looking healthy
    "initial_interval 0s": (f"{LOCAL}data_streams:\n  audit:\n    initial_interval: 0s\n",
                            "data_streams.audit.initial_interval"),
    "initial_interval under a bucket": (f"{LOCAL}data_streams:\n  costs:\n    initial_interval: 12h\n",
                                        "data_streams.costs.initial_interval"),
    "initial_interval within the grace": (
        f"{LOCAL}data_streams:\n  embeddings:\n    initial_interval: 5m\n    finalization_grace: 10m\n",
        "data_streams.embeddings.initial_interval"),
    # echoed whole, these took a minute and printed 226 MB (the alias bomb) or a 3 MB line
    "alias bomb": ("".join(f"{a}: &{a} [{', '.join([f'*{p}' if p else 'x'] * 9)}]\n"
                           for p, a in zip([""] + list("abcdefg"), "abcdefgh")) + "ssl_verify: *h\n", "config"),
    "a value of 3 MB": ("ssl_verify: " + "y" * 3_000_000 + "\n", "ssl_verify"),
    "a key of 3 MB": ("data_streams:\n  ? " + "k" * 3_000_000 + "\n  : {}\n", "data_streams.'" + "k" * 45),
    # a path the system refuses outright (ENAMETOOLONG) was a traceback
    "a CA file path too long for the system": (f"{LOCAL}ssl_ca_file: /{'c' * 5000}\n", "ssl_ca_file"),
}


def _run(path, env_key: bool):
    env = dict(os.environ)
    env.pop("OPENAI_ADMIN_KEY", None)
    if env_key:
        env["OPENAI_ADMIN_KEY"] = KEY
    return subprocess.Popen(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(path), "--once",
         "--state-dir", str(path.parent / "state"), "--log-level", "DEBUG"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_every_invalid_config_is_one_clear_line_naming_the_key(tmp_path):
    procs = {}
    for i, (name, (text, key)) in enumerate(CORPUS.items()):
        d = tmp_path / f"c{i}"
        d.mkdir()
        path = d / "openai.yml"
        path.write_text(text)
        # the admin key is in the environment except where its absence is the error
        procs[name] = (_run(path, env_key=(key not in ("api_key",))), key, d)
    problems = []
    for name, (proc, key, d) in procs.items():
        out, err = proc.communicate(timeout=60)
        text = err.decode()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        naming = [ln for ln in lines if ln.startswith((f"{key}:", f"{key} ", f"{key}'", f"{key}."))]
        if proc.returncode != 2:
            problems.append(f"{name}: exit {proc.returncode}, not 2: {text[-300:]}")
        elif "Traceback" in text:
            problems.append(f"{name}: a traceback: {text[-300:]}")
        elif out:
            problems.append(f"{name}: wrote to stdout: {out[:200]!r}")
        elif len(naming) != 1:
            problems.append(f"{name}: expected one line naming {key!r}, got {lines}")
        elif len(lines) > 2:  # the "config error:" header and the one line
            problems.append(f"{name}: more than one problem reported: {lines}")
        elif len(text) > 1000:
            problems.append(f"{name}: {len(text)} characters of error: {text[:300]}")
        elif (d / "state").exists():
            problems.append(f"{name}: the state directory was created before the config was valid")
    assert not problems, "\n".join(problems)


def test_several_problems_are_reported_at_once_each_on_its_line(tmp_path):
    path = tmp_path / "openai.yml"
    path.write_text("urll: x\ndata_streams:\n  completions:\n    interval: 5x\n    bucket_width: 2m\n")
    proc = _run(path, env_key=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = [ln.strip() for ln in err.decode().splitlines()]
    for key in ("urll", "data_streams.completions.interval", "data_streams.completions.bucket_width"):
        assert sum(ln.startswith(f"{key}:") for ln in lines) == 1, (key, lines)


@pytest.mark.parametrize("text", ["url: [unclosed\n", "- just\n- a list\n", "\x00\x01binary",
                                  "url: " + "[" * 5000 + "]" * 5000 + "\n"])  # a RecursionError in PyYAML
def test_unreadable_yaml_is_one_line_too(tmp_path, text):
    path = tmp_path / "openai.yml"
    path.write_text(text)
    proc = _run(path, env_key=True)
    out, err = proc.communicate(timeout=60)
    text_err = err.decode()
    assert proc.returncode == 2, text_err
    assert "Traceback" not in text_err
    assert len([ln for ln in text_err.splitlines() if ln.strip()]) <= 2, text_err
