"""Secret hygiene: with the admin key and Elasticsearch credentials set, run check, collect (NDJSON
and the direct Elasticsearch output) and run (the agent protocol) at DEBUG level with faults
injected and wrong credentials, then search everything that was written (stdout, stderr, the
state directories, output and dead-letter files) for the secrets, plain or base64-encoded."""
from __future__ import annotations

import base64
import os
import subprocess
import sys

import yaml

from agent_input.simulator import FaultRule

from conftest import ADMIN_KEY, T0
from reliability_helpers import full_config

ES_API_KEY = "ZXNfc2VjcmV0X2lkOmVzX3NlY3JldF9rZXlfOTg3NjU0"
ES_USER, ES_PASSWORD = "elastic", 'es-pa"ss\\wörd-Zq8tR4mW2xY7'  # a quote, a backslash, non-ASCII: JSON escapes it
PROXY_PASSWORD = "proxy-password-Hn3kV9pL"
PLAIN_KEY = "Zq8xPLAINADMINKEY0123456789"  # a configured key not shaped like sk-...


def _secrets() -> dict[str, bytes]:
    """Each secret as written plainly, and as a JSON string would spell it (escaped quotes and
    backslashes, \\uXXXX for non-ASCII): an ECS log line or a JSON file may hold it either way."""
    import json

    basic = base64.b64encode(f"{ES_USER}:{ES_PASSWORD}".encode())
    plain = {"admin key": ADMIN_KEY.encode(), "ES API key": ES_API_KEY.encode(),
             "ES password": ES_PASSWORD.encode(), "ES basic auth header": basic,
             "admin key (base64)": base64.b64encode(ADMIN_KEY.encode())}
    escaped = {f"{what} (JSON-escaped{'' if ascii_only else ', UTF-8'})": json.dumps(
        secret.decode(), ensure_ascii=ascii_only)[1:-1].encode() for what, secret in plain.items()
        for ascii_only in (True, False)}
    return {**plain, **{k: v for k, v in escaped.items() if v not in plain.values()}}


def _cli(args, env_extra, cwd) -> tuple[int, bytes, bytes]:
    env = dict(os.environ)
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-m", "agent_input.cli", *args], capture_output=True, env=env,
                          cwd=cwd, timeout=180)
    return proc.returncode, proc.stdout, proc.stderr


def test_no_secret_in_anything_written(simulator, tmp_path):
    from fake_es import FakeElasticsearch

    written: dict[str, bytes] = {}
    env = {"OPENAI_ADMIN_KEY": ADMIN_KEY, "ELASTIC_API_KEY": ES_API_KEY, "ELASTIC_USERNAME": ES_USER,
           "ELASTIC_PASSWORD": ES_PASSWORD}
    cfg = full_config(simulator.base_url, rate_limits=True)
    cfg.pop("api_key")  # from OPENAI_ADMIN_KEY, as in production
    cfg["max_retries"] = 2
    cfg_path = tmp_path / "openai.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    faults = [FaultRule(kind="429", count=3, retry_after=1), FaultRule(kind="500", path="usage/", count=2),
              FaultRule(kind="reset", path="usage/", skip=3, count=1),
              FaultRule(kind="malformed_json", path="usage/images", count=1),
              FaultRule(kind="invalid_results", path="usage/embeddings", count=1),
              # rate limits: a project whose limits fail (its failure document quotes the error) and
              # limits that do not match the reference (reported, quoting the values)
              FaultRule(kind="404", path="*/rate_limits", count=1),
              FaultRule(kind="invalid_items", path="*/rate_limits", skip=1, count=1)]

    def arm():
        simulator.clear_faults()
        for f in faults:
            simulator.add_fault(FaultRule(**{k: v for k, v in f.to_dict().items() if k != "fired"}))

    # check, with faults, then with a wrong admin key (the 401 explanation must not echo either key)
    arm()
    written["check stdout"], written["check stderr"] = _cli(
        ["check", "--config", str(cfg_path), "--log-level", "DEBUG"], env, tmp_path)[1:]
    wrong = dict(env, OPENAI_ADMIN_KEY=ADMIN_KEY[:-4] + "WXYZ")
    written["check 401 stdout"], written["check 401 stderr"] = _cli(
        ["check", "--config", str(cfg_path), "--log-level", "DEBUG"], wrong, tmp_path)[1:]

    # collect to NDJSON with faults
    arm()
    simulator.set_time(T0)
    _, written["collect stdout"], written["collect stderr"] = _cli(
        ["collect", "--config", str(cfg_path), "--once", "--state-dir", str(tmp_path / "state-ndjson"),
         "--output-path", str(tmp_path / "events.ndjson"), "--now", str(T0), "--log-level", "DEBUG"], env, tmp_path)

    # collect into Elasticsearch (API key), with bulk faults; then with a wrong password
    es = FakeElasticsearch("8.18.0", auth=f"ApiKey {ES_API_KEY}")
    try:
        es.fail_requests = [429, 503]
        arm()
        _, written["es stdout"], written["es stderr"] = _cli(
            ["collect", "--config", str(cfg_path), "--once", "--state-dir", str(tmp_path / "state-es"),
             "--output", "elasticsearch", "--es-url", es.url, "--now", str(T0), "--log-level", "DEBUG"],
            env, tmp_path)
        assert es.docs, "nothing reached the fake cluster: the run did not exercise the output"
        basic_env = {k: v for k, v in env.items() if k != "ELASTIC_API_KEY"}
        _, written["es 401 stdout"], written["es 401 stderr"] = _cli(
            ["collect", "--config", str(cfg_path), "--once", "--state-dir", str(tmp_path / "state-es401"),
             "--output", "elasticsearch", "--es-url", es.url, "--now", str(T0), "--log-level", "DEBUG"],
            basic_env, tmp_path)
    finally:
        es.close()

    # run: the agent protocol, the admin key inside the config message
    from protocol_supervisor import Supervisor

    arm()
    sup = Supervisor(tmp_path / "state-run", T0, log_level="DEBUG")
    sup.configure(full_config(simulator.base_url, rate_limits=True))
    sup.wait_polled(["completions", "costs", "audit", "rate_limits"], timeout=120)
    sup.stop()
    import json

    written["run stdout"] = json.dumps(sup.messages).encode()
    written["run stderr"] = sup.stderr_text().encode()

    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "openai.yml":  # the config is the user's own file
            written[str(path.relative_to(tmp_path))] = path.read_bytes()
    assert len(written) > 12
    assert any(b"429" in v for k, v in written.items() if "stderr" in k), "the faults were not exercised"
    assert b"rate-limits-project-failure" in written["events.ndjson"], "the rate limits faults were not exercised"
    assert b"does not match the API reference" in written["collect stderr"]

    leaks = [f"{what} in {where}" for where, data in written.items() for what, secret in _secrets().items()
             if secret in data]
    assert not leaks, leaks


def test_no_secret_in_config_errors(tmp_path):
    """A key pasted into the wrong setting, or credentials in a URL with a typo, are never echoed
    by the config error lines (which still name the key)."""
    cases = {
        "key pasted as api_key_file": (f"api_key_file: {ADMIN_KEY}\n", {}, "api_key_file", ADMIN_KEY),
        "env key pasted as namespace": (f"namespace: {ADMIN_KEY}\n", {"OPENAI_ADMIN_KEY": ADMIN_KEY},
                                        "namespace", ADMIN_KEY),
        "plain config key as namespace": (f"api_key: {PLAIN_KEY}\nnamespace: {PLAIN_KEY}\n", {},
                                          "namespace", PLAIN_KEY),
        "plain env key as namespace": (f"namespace: {PLAIN_KEY}\n", {"OPENAI_ADMIN_KEY": PLAIN_KEY},
                                       "namespace", PLAIN_KEY),
        "es_url password, bad port": (f"es_url: https://{ES_USER}:{ES_PASSWORD}@es.example.com:92OO\n",
                                      {"OPENAI_ADMIN_KEY": ADMIN_KEY}, "es_url", ES_PASSWORD),
        "proxy_url password, bad port": (f"proxy_url: http://proxyuser:{PROXY_PASSWORD}@proxy:80:80\n",
                                         {"OPENAI_ADMIN_KEY": ADMIN_KEY}, "proxy_url", PROXY_PASSWORD),
    }
    base = {k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}
    leaks = []
    for i, (name, (text, env, key, secret)) in enumerate(cases.items()):
        cfg = tmp_path / f"c{i}.yml"
        cfg.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "agent_input.cli", "check", "--config", str(cfg)],
                              capture_output=True, env={**base, **env}, cwd=tmp_path, timeout=60)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and f"  {key}: ".encode() in proc.stderr, (name, out)
        if secret.encode() in out:
            leaks.append(f"{name}: {out.decode()}")
    assert not leaks, "\n".join(leaks)


def test_no_url_password_in_check_output(tmp_path):
    """`check` echoes the API URL it probes: without the user:password@ of a proxying gateway."""
    cfg = tmp_path / "openai.yml"
    cfg.write_text(f"url: http://gateway:{PROXY_PASSWORD}@127.0.0.1:9\nmax_retries: 0\nhttp_timeout: 2s\n")
    env = {**os.environ, "OPENAI_ADMIN_KEY": ADMIN_KEY}
    code, out, err = _cli(["check", "--config", str(cfg), "--log-level", "DEBUG"], env, tmp_path)
    assert b"config OK" in out, (out, err)
    assert PROXY_PASSWORD.encode() not in out + err, (out + err).decode()


def test_no_secret_in_what_the_installer_prints_or_exports(tmp_path):
    """openai-assets with ES credentials set: a 401, an unreachable host named with a password in
    its URL, a key with a line break in it, a dry run and an exported bundle print or write no
    credential."""
    import responses
    from click.testing import CliRunner

    from kibana_assets.cli import main

    es = "http://127.0.0.1:9200"
    env = {"ELASTIC_API_KEY": ES_API_KEY, "ELASTIC_USERNAME": "", "ELASTIC_PASSWORD": ""}
    basic = {"ELASTIC_API_KEY": "", "ELASTIC_USERNAME": ES_USER, "ELASTIC_PASSWORD": ES_PASSWORD}
    written: dict[str, bytes] = {}

    def assets(name, *args, env):
        result = CliRunner().invoke(main, list(args), env=env)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        written[name] = (result.output + (result.stderr if result.stderr_bytes is not None else "")).encode()
        return result

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, es + "/", status=401, json={"error": {"type": "security_exception",
                                                                     "reason": "unable to authenticate"}})
        assert assets("401 api key", "install", "--es-url", es, "--skip-kibana", env=env).exit_code == 3
        assert assets("401 basic", "install", "--es-url", es, "--skip-kibana", "--dry-run", env=basic).exit_code == 3
    url = f"http://{ES_USER}:{ES_PASSWORD}@127.0.0.1:1"
    assert assets("password in URL", "install", "--es-url", url, "--skip-kibana", env=basic).exit_code == 2
    two_lines = tmp_path / "api.key"
    two_lines.write_text(ES_API_KEY[:20] + "\n" + ES_API_KEY[20:] + "\n")
    assert assets("key file with a line break", "uninstall", "--es-url", es, "--skip-kibana",
                  "--api-key-file", str(two_lines), env=env).exit_code == 2
    assert assets("export", "export", str(tmp_path / "bundle"), env=basic).exit_code == 0
    for path in (tmp_path / "bundle").rglob("*"):
        if path.is_file():
            written[str(path.relative_to(tmp_path))] = path.read_bytes()
    assert len(written) > 10

    secrets = {**_secrets(), "first part of a split key": ES_API_KEY[:20].encode()}
    leaks = [f"{what} in {where}" for where, data in written.items() for what, secret in secrets.items()
             if secret in data]
    assert not leaks, leaks


def test_no_environment_proxy_password_in_check_output(tmp_path):
    """A proxy from HTTPS_PROXY/HTTP_PROXY (requests applies it where proxy_url is not set) is as
    secret as proxy_url: urllib3 quotes a malformed one whole ("Failed to parse: http://u:p@..."),
    and that text reaches the probe lines and the retry warnings."""
    cfg = tmp_path / "openai.yml"
    cfg.write_text("url: http://127.0.0.1:9\nmax_retries: 0\nhttp_timeout: 2s\n")
    proxy = f"http://proxyuser:{PROXY_PASSWORD}@127.0.0.1:99999"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(OPENAI_ADMIN_KEY=ADMIN_KEY, HTTPS_PROXY=proxy, HTTP_PROXY=proxy, ALL_PROXY=proxy)
    code, out, err = _cli(["check", "--config", str(cfg), "--log-level", "DEBUG"], env, tmp_path)
    assert code == 1 and b"invalid URL or proxy" in out, (out + err).decode()
    assert PROXY_PASSWORD.encode() not in out + err, (out + err).decode()
