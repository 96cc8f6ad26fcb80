"""`openai-input check --config FILE`: config errors exit 2 with no request; probes exit 1 on failure."""
from __future__ import annotations

import logging
import re

import pytest
import responses
from click.testing import CliRunner

from agent_input.cli import main

KEY = "sk-admin-CHECKTESTKEY-0123456789"
BASE = "https://api.openai.com"
OK = {"object": "page", "data": [], "has_more": False, "next_page": None}


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


# The listings check asks beside the streams' own endpoints (the names and the state directory's
# organization check need them): `run` answers them OK unless the test registered them itself.
NAME_PROBES = {
    "projects": f"{BASE}/v1/organization/projects",
    "users": f"{BASE}/v1/organization/users",
    "api_keys": re.compile(rf"{re.escape(BASE)}/v1/organization/projects/[^/]+/api_keys"),
}


def names_ok() -> None:
    """Register the name listings' probes as OK (an empty page), each unless the test did already."""
    def taken(url) -> bool:
        for r in responses.registered():
            if isinstance(url, str) and r.url == url:
                return True
            if not isinstance(url, str) and (isinstance(r.url, str) and url.fullmatch(r.url.split("?")[0])
                                             or getattr(r.url, "pattern", None) == url.pattern):
                return True
        return False

    for url in NAME_PROBES.values():
        if not taken(url):
            responses.get(url, json=OK)


@pytest.fixture(autouse=True)
def _forget_unused_registrations():
    """`run` registers the name probes also in a test that does not activate `responses`: they
    must not carry over into the next test."""
    yield
    responses.reset()


def probed(*kinds: str) -> list[str]:
    """The paths of the requests made, but those of the name probes (unless named in `kinds`)."""
    skip = [u for k, u in NAME_PROBES.items() if k not in kinds]
    return [c.request.url.split("?")[0] for c in responses.calls
            if not any(u == c.request.url.split("?")[0] if isinstance(u, str) else u.fullmatch(
                c.request.url.split("?")[0]) for u in skip)]


def stderr(result) -> str:
    """What the command wrote to stderr. click 8.2+ always keeps it apart (`output` has both); 8.1's
    default CliRunner mixes it into `output` and has no `stderr`: there, the whole output."""
    try:
        return result.stderr
    except ValueError:  # click < 8.2: "stderr not separately captured"
        return result.output


def run(tmp_path, text, env=None):
    cfg = tmp_path / "c.yml"
    cfg.write_text(text)
    env = {"OPENAI_ADMIN_KEY": KEY} if env is None else env
    # check looks at collect's default state directory: this machine's own, unless it is moved
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg-state"), **env}
    names_ok()
    return CliRunner().invoke(main, ["check", "--config", str(cfg)], env=env, catch_exceptions=False)


def only(*names):
    """A config enabling only the named data streams."""
    from agent_input.config import data_streams

    lines = ["data_streams:"]
    for n in data_streams():
        lines.append(f"  {n}: {{enabled: {'true' if n in names else 'false'}}}")
    return "\n".join(lines) + "\n"


@responses.activate
def test_config_errors_exit_2_without_a_request(tmp_path):
    result = run(tmp_path, "namespace: a-b\ndata_streams:\n  completions:\n    bucket_width: 2m\n", env={})
    assert result.exit_code == 2
    assert "openai-input: config error:" in stderr(result)
    assert "namespace: 'a-b' must not contain '-'" in stderr(result)
    assert "data_streams.completions.bucket_width: '2m' is not allowed (allowed: 1m, 1h, 1d)" in stderr(result)
    assert "api_key: no admin key" in stderr(result)
    assert "Traceback" not in result.output
    assert len(responses.calls) == 0


def test_missing_config_file_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["check", "--config", str(tmp_path / "nope.yml")], env={"OPENAI_ADMIN_KEY": KEY})
    assert result.exit_code == 2 and "does not exist" in stderr(result)


def test_no_key_option_on_the_command_line():
    result = CliRunner().invoke(main, ["check", "--help"])
    assert "--api-key" not in result.output and "--key" not in result.output


@responses.activate
def test_all_probes_ok(tmp_path):
    for path in ("usage/completions", "costs", "audit_logs", "projects/proj_1/rate_limits"):
        responses.get(f"{BASE}/v1/organization/{path}", json=OK)
    responses.get(f"{BASE}/v1/organization/projects", json={**OK, "data": [{"id": "proj_1"}]})
    result = run(tmp_path, "")
    assert result.exit_code == 0, result.output
    # audit: both scopes; the projects, their first one's limits and API keys, the users
    assert result.output.count(": OK") == 8 and "check OK" in result.output
    assert all("limit=1" in c.request.url for c in responses.calls)
    assert len(responses.calls) == 8 and "tenant_only=true" in responses.calls[3].request.url
    assert [c.request.url.split("?")[0].removeprefix(BASE) for c in responses.calls[4:]] == [
        "/v1/organization/projects", "/v1/organization/projects/proj_1/rate_limits",
        "/v1/organization/projects/proj_1/api_keys", "/v1/organization/users"]
    probes = [line for line in result.output.splitlines() if line.startswith("  ")]
    assert len({line.index("/v1/") for line in probes}) == 1, "the probes' paths line up:\n" + "\n".join(probes)


@responses.activate
def test_tenant_scoped_audit_events_not_listable_is_said_not_a_failure(tmp_path):
    """The audit stream reads a second scope (tenant_only=true); an organization or key that
    cannot list it gets a warning from the collector and the organization's events only. `check`
    said OK without asking, so a user could not learn it before collecting."""
    from responses import matchers

    responses.get(f"{BASE}/v1/organization/audit_logs", status=400, json={"error": {
        "message": "This organization cannot list tenant-scoped audit events.", "type": "invalid_request_error",
        "param": "tenant_only", "code": "tenant_audit_logs_not_available"}},
        match=[matchers.query_param_matcher({"limit": "1", "tenant_only": "true"})])
    responses.get(f"{BASE}/v1/organization/audit_logs", json=OK, match=[matchers.query_param_matcher({"limit": "1"})])
    result = run(tmp_path, only("audit"))
    assert result.exit_code == 0, result.output
    assert "cannot list tenant-scoped audit events" in result.output and "warning: tenant-scoped" in result.output
    assert "check OK" in result.output and len(probed()) == 2


@responses.activate
def test_only_enabled_kinds_are_probed(tmp_path):
    responses.get(f"{BASE}/v1/organization/usage/vector_stores", json=OK)
    result = run(tmp_path, only("vector_stores"))
    assert result.exit_code == 0, result.output
    # and the listings its names and the state directory's organization check need
    assert probed("projects", "users") == [f"{BASE}/v1/organization/usage/vector_stores",
                                           f"{BASE}/v1/organization/projects", f"{BASE}/v1/organization/users"]


@responses.activate
def test_401_bad_key(tmp_path):
    responses.get(f"{BASE}/v1/organization/usage/completions", status=401, json={
        "error": {"message": "Incorrect API key provided: sk-admin-****6789.", "type": "invalid_request_error",
                  "param": None, "code": "invalid_api_key"}})
    result = run(tmp_path, only("completions", "audit"))
    assert result.exit_code == 1
    assert "401: the admin key was rejected — check OPENAI_ADMIN_KEY" in result.output
    assert "skipped: the admin key was rejected" in result.output  # audit not asked again
    assert len(responses.calls) == 1
    assert KEY not in result.output and "Traceback" not in result.output


@responses.activate
def test_401_names_the_key_file(tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY)
    responses.get(f"{BASE}/v1/organization/usage/completions", status=401,
                  json={"error": {"message": "bad", "type": "x", "param": None, "code": "invalid_api_key"}})
    result = run(tmp_path, f"api_key_file: {keyfile}\n" + only("completions"), env={})
    assert result.exit_code == 1 and f"check the key in {keyfile}" in result.output


@responses.activate
def test_403_missing_usage_scope(tmp_path):
    responses.get(f"{BASE}/v1/organization/usage/completions", status=403, json={"error": {
        "message": "You have insufficient permissions for this operation. Missing scopes: api.usage.read.",
        "type": "invalid_request_error", "param": None, "code": None}})
    responses.get(f"{BASE}/v1/organization/projects", json=OK)
    result = run(tmp_path, only("completions", "rate_limits"))
    assert result.exit_code == 1
    assert "403: the key lacks the api.usage.read scope" in result.output
    assert "projects     /v1/organization/projects: OK" in result.output
    assert "check FAILED" in stderr(result)


@responses.activate
def test_server_errors_are_retried_briefly_then_reported(tmp_path, monkeypatch):
    from agent_input.http_client import AdminApiClient

    sleeps: list[float] = []
    original = AdminApiClient.from_config.__func__
    monkeypatch.setattr(AdminApiClient, "from_config",
                        classmethod(lambda cls, c, **kw: original(cls, c, sleep=sleeps.append, **kw)))
    responses.get(f"{BASE}/v1/organization/usage/completions", status=503, body="unavailable")
    result = run(tmp_path, only("completions"))
    assert result.exit_code == 1
    assert "unreachable: still failing after 2 retries" in result.output
    assert len(probed()) == 3
    assert len(sleeps) == 2 and all(0 <= d <= 2.0 for d in sleeps)


@responses.activate
def test_no_home_directory_skips_the_default_state_directory_s_check(tmp_path, monkeypatch):
    """Without a home (no $HOME, no passwd entry: a container's arbitrary uid) there is no default
    state directory to look at: check turned every probe's OK into "check failed: Could not
    determine home directory", exit 1; it now checks what it can and says OK."""
    from pathlib import Path

    def home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(home))
    for path in ("usage/completions", "costs", "audit_logs", "projects"):
        responses.get(f"{BASE}/v1/organization/{path}", json=OK)
    result = run(tmp_path, "", env={"OPENAI_ADMIN_KEY": KEY, "XDG_STATE_HOME": None, "HOME": None})
    assert result.exit_code == 0, result.output
    assert "check OK" in result.output and "state dir" not in result.output


def test_bad_log_level_is_a_usage_error_not_a_traceback(tmp_path):
    """`--log-level FOO` raised a ValueError from logging set-up."""
    cfg = tmp_path / "c.yml"
    cfg.write_text("")
    result = CliRunner().invoke(main, ["check", "--config", str(cfg), "--log-level", "FOO"],
                                env={"OPENAI_ADMIN_KEY": KEY})
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Invalid value for '--log-level'" in stderr(result) and "Traceback" not in result.output
    assert CliRunner().invoke(main, ["check", "--config", str(cfg), "--log-level", "debug"],
                              env={}).exit_code == 2  # lower case is accepted (then: no admin key)


def test_an_unexpected_error_is_one_redacted_line_and_exit_1(tmp_path, monkeypatch):
    """Whatever goes wrong in a probe, `check` says so in one line, without the key, and fails."""
    from agent_input import http_client

    def broken(client, config):
        raise RuntimeError(f"proxy said no to Authorization: Bearer {KEY}")
        yield  # pragma: no cover

    monkeypatch.setattr(http_client, "probe_api", broken)
    result = run(tmp_path, only("completions"))
    assert result.exit_code == 1
    assert "check failed: proxy said no" in result.output and KEY not in result.output


def test_a_key_in_the_url_is_not_echoed(tmp_path):
    result = run(tmp_path, f"url: https://127.0.0.1:9/v1?api_key={KEY}\nmax_retries: 0\n" + only("completions"))
    assert "config OK" in result.output and KEY not in result.output


@responses.activate
def test_a_key_that_lists_projects_but_not_their_limits_fails_check(tmp_path):
    """check asked only for the projects: a key without access to the limits passed, and the
    rate_limits stream then failed every cycle."""
    responses.get(f"{BASE}/v1/organization/projects", json={"object": "list", "data": [{"id": "proj_1"}],
                                                           "has_more": False})
    responses.get(f"{BASE}/v1/organization/projects/proj_1/rate_limits", status=403, json={"error": {
        "message": "You have insufficient permissions for this operation. Missing scopes: api.management.read.",
        "type": "invalid_request_error", "param": None, "code": None}})
    result = run(tmp_path, only("rate_limits"))
    assert result.exit_code == 1
    assert "403: the key lacks the api.management.read scope" in result.output


def refused(scope: str) -> dict:
    return {"error": {"message": f"You have insufficient permissions for this operation. Missing scopes: {scope}.",
                      "type": "invalid_request_error", "param": None, "code": None}}


@responses.activate
@pytest.mark.parametrize("listing, scope, lost", [
    ("users", "api.organization.users.read", "usage documents lack openai.base.user_email"),
    ("projects/proj_1/api_keys", "api.management.read", "usage and costs documents lack openai.base.api_key_name"),
])
def test_a_refused_name_listing_is_a_warning_naming_the_scope_and_what_is_lost(tmp_path, listing, scope, lost):
    """check never asked for the users or a project's API keys: a key without their scope got
    "check OK", and the collector's documents then lacked those names with only a log line to say so."""
    responses.get(f"{BASE}/v1/organization/usage/completions", json=OK)
    responses.get(f"{BASE}/v1/organization/projects", json={**OK, "data": [{"id": "proj_1"}]})
    responses.get(f"{BASE}/v1/organization/{listing}", status=403, json=refused(scope))
    result = run(tmp_path, only("completions"))
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if f"/v1/organization/{listing}:" in line)
    assert f"warning: 403: the key lacks the {scope} scope, so {lost}" in line, line
    assert "check OK" in result.output


@responses.activate
@pytest.mark.parametrize("streams", [("completions",), ("audit",)])
def test_a_refused_projects_listing_is_probed_and_a_warning_without_rate_limits(tmp_path, streams):
    """Without rate limits check did not list the projects at all, although the names and the state
    directory's organization check need them: a key that may not list them got "check OK"."""
    responses.get(f"{BASE}/v1/organization/projects", status=403, json=refused("api.organization.projects.read"))
    responses.get(f"{BASE}/v1/organization/usage/completions", json=OK)
    responses.get(f"{BASE}/v1/organization/audit_logs", json=OK)
    result = run(tmp_path, only(*streams))
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "/v1/organization/projects:" in line)
    assert "warning: 403: the key lacks the api.organization.projects.read scope" in line, line
    assert "the state directory cannot be tied to its organization" in line
    assert ("openai.base.project_name" in line) == (streams == ("completions",))
    assert "check OK" in result.output


@responses.activate
def test_a_refused_projects_listing_still_fails_check_for_the_rate_limits(tmp_path):
    responses.get(f"{BASE}/v1/organization/projects", status=403, json=refused("api.organization.projects.read"))
    result = run(tmp_path, only("rate_limits"))
    assert result.exit_code == 1, result.output
    assert "403: the key lacks the api.organization.projects.read scope" in result.output
    assert "warning" not in result.output and "check FAILED" in stderr(result)


def test_the_tests_do_not_depend_on_the_developers_environment():
    """The README has a user export OPENAI_ADMIN_KEY and ELASTIC_API_KEY, and the real-cluster tests
    want ES_URL, KIBANA_URL and ELASTIC_USERNAME/ELASTIC_PASSWORD: from such a shell (or CI job) a
    test that means "no key given" or "no --es-url" found them (CliRunner's env only adds to
    os.environ) and failed; a proxy in the environment took the simulator's requests. All 6 failed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OPENAI_ADMIN_KEY": "sk-admin-fromshell-0123456789abcdef", "ES_URL": "http://127.0.0.1:9",
           "KIBANA_URL": "http://127.0.0.1:9", "ELASTIC_USERNAME": "elastic", "ELASTIC_PASSWORD": "changeme",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    tests = ["tests/test_cli_check.py::test_config_errors_exit_2_without_a_request",
             "tests/test_cli_check.py::test_bad_log_level_is_a_usage_error_not_a_traceback",
             "tests/test_installer.py::test_missing_urls_and_credentials_files",
             "tests/test_installer.py::test_a_netrc_entry_never_replaces_or_adds_credentials",
             "tests/test_installer.py::test_without_kibana_url_is_one_line_before_any_request",
             "tests/test_collect_cli.py::test_once_exits_1_and_its_summary_names_the_stream_that_failed"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]


@responses.activate
def test_costs_alone_probes_the_api_key_names_its_documents_carry(tmp_path):
    """costs documents carry openai.base.api_key_name (and the project's name): with costs the only
    stream enabled, a key that may not list a project's API keys is still a warning, with OpenAI's
    own reason."""
    responses.get(f"{BASE}/v1/organization/costs", json=OK)
    responses.get(f"{BASE}/v1/organization/projects", json={**OK, "data": [{"id": "proj_1"}]})
    responses.get(f"{BASE}/v1/organization/projects/proj_1/api_keys", status=403, json=refused("api.management.read"))
    result = run(tmp_path, only("costs"))
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "/api_keys:" in line)
    assert "warning: 403: the key lacks the api.management.read scope" in line
    assert "(You have insufficient permissions for this operation. Missing scopes: api.management.read.)" in line


@responses.activate
def test_a_name_listing_not_found_is_a_failure_not_a_warning(tmp_path):
    """Only a refusal (403) of a name listing is what the collector goes on without: a 404 (a
    wrong url, a proxy) fails check as any other probe's."""
    responses.get(f"{BASE}/v1/organization/usage/completions", json=OK)
    responses.get(f"{BASE}/v1/organization/users", status=404,
                  json={"error": {"message": "Not found", "type": "invalid_request_error", "param": None, "code": None}})
    result = run(tmp_path, only("completions"))
    assert result.exit_code == 1, result.output
    line = next(line for line in result.output.splitlines() if "/v1/organization/users:" in line)
    assert "warning" not in line and "check FAILED" in stderr(result)


@responses.activate
def test_ssl_verify_off_is_said_by_check(tmp_path, caplog):
    """The warning moved from each HTTP client to `app.build` (once per collection): check, which
    builds no collection, no longer said that it talked to OpenAI without verifying its certificate."""
    responses.get(f"{BASE}/v1/organization/usage/completions", json=OK)
    with caplog.at_level(logging.WARNING):
        result = run(tmp_path, "ssl_verify: false\n" + only("completions"))
    assert result.exit_code == 0, result.output
    warned = [r for r in caplog.records if "verification is off (ssl_verify: false)" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]


def _check_process(simulator, tmp_path, **popen):
    """`openai-input check` as a process of its own, against the simulator (a closed stderr or a
    reader that goes away cannot be had under CliRunner, which replaces both streams)."""
    import os
    import subprocess
    import sys

    from conftest import ADMIN_KEY

    cfg = tmp_path / "c.yml"
    cfg.write_text(f"url: {simulator.base_url}\napi_key: {ADMIN_KEY}\n" + only("completions"))
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}
    return subprocess.Popen([sys.executable, "-m", "agent_input.cli", "check", "--config", str(cfg),
                             "--state-dir", str(tmp_path / "state")], env=env, **popen)


def test_check_with_stderr_closed_still_checks(simulator, tmp_path):
    """`check 2>&-` (Python leaves sys.stderr None) died in its logging set-up on
    `sys.stderr.isatty()`: exit 1 with nothing on stdout, the traceback lost with stderr."""
    import os
    import subprocess

    proc = _check_process(simulator, tmp_path, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert b"check OK" in out


def test_a_reader_that_goes_away_is_not_a_failed_check(simulator, tmp_path):
    """`check | head -1`: the lines after the first meet a closed pipe. The BrokenPipeError was
    caught as a probe's failure and reported "openai-input: check failed: [Errno 32] Broken pipe",
    as if the key or the API were at fault."""
    import subprocess

    proc = _check_process(simulator, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"config OK")
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert b"check failed" not in err and b"Traceback" not in err, err.decode()


@responses.activate
def test_an_answer_that_is_not_an_openai_list_fails_check_as_collect_fails_on_it(tmp_path):
    """`url` at a service that answers every path 200 with some other JSON object (a gateway's
    status page, another API): check said OK for each probe, and collect then failed every poll
    with "response has no `data` list of buckets"."""
    for url in (f"{BASE}/v1/organization/usage/completions", *NAME_PROBES.values()):
        responses.get(url, json={"status": "ok"})
    result = run(tmp_path, only("completions"))
    assert result.exit_code == 1, result.output
    assert "check OK" not in result.output
    assert ("/v1/organization/usage/completions: the answer has no `data` list, as OpenAI's lists have: is "
            f"`url` the OpenAI API ({BASE})?") in result.output, result.output


def test_only_an_echo_to_stdout_is_stdout_s_failure(monkeypatch):
    """A write to stderr that fails (its reader gone) is not worded "cannot write to stdout", nor
    does it send stdout's unwritten lines to /dev/null: only click.echo's writes to stdout are."""
    import sys

    import click

    from agent_input.cli import _raised_by_echo_to_stdout

    class Broken:
        encoding = "utf-8"

        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def isatty(self):
            return False

    outcomes = []
    for name, err in (("stderr", True), ("stdout", False)):
        monkeypatch.setattr(sys, name, Broken())
        with pytest.raises(OSError) as info:
            click.echo("x", err=err)
        outcomes.append(_raised_by_echo_to_stdout(info.value))
    assert outcomes == [False, True]
    assert _raised_by_echo_to_stdout(OSError(5, "I/O error")) is False
