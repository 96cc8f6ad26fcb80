"""AdminApiClient: URLs and params, typed errors, retries with backoff and Retry-After, redaction."""
from __future__ import annotations

import email.utils
import io
import logging
import random
import re
import time

import pytest
import requests
import responses

from agent_input.config import Secret, config_from_dict
from agent_input.http_client import (
    AdminApiClient,
    ApiError,
    AuthenticationError,
    BadRequestError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RetriesExhaustedError,
    TransportError,
    parse_retry_after,
    server_date,
    probe_api,
)

KEY = "sk-admin-HTTPTESTKEY-abcdefghijklmnop"
BASE = "https://api.openai.com"
PATH = "/v1/organization/usage/completions"
URL = BASE + PATH
OK = {"object": "page", "data": [], "has_more": False, "next_page": None}


def err(message, code=None, type_="invalid_request_error"):
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class FakeSleep:
    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, seconds):
        self.calls.append(seconds)


@pytest.fixture
def sleep():
    return FakeSleep()


@pytest.fixture
def client(sleep):
    c = AdminApiClient(BASE, Secret(KEY), sleep=sleep, max_retries=3, rng=random.Random(7))
    yield c
    c.close()


# ---- URLs, params, headers --------------------------------------------------------------------


@pytest.mark.parametrize("base", ["https://api.openai.com", "https://api.openai.com/", "https://api.openai.com/v1",
                                  "https://api.openai.com/v1/"])
@responses.activate
def test_base_url_forms(base):
    responses.get(URL, json=OK)
    c = AdminApiClient(base, KEY, sleep=FakeSleep())
    assert c.get_json(PATH) == OK
    if base.rstrip("/").endswith("/v1"):
        assert c.get_json(PATH[3:]) == OK  # a path without /v1 also works against a /v1 base
    assert responses.calls[0].request.url == URL


@responses.activate
def test_base_url_with_prefix_path():
    responses.get("http://127.0.0.1:9/proxy/v1/organization/costs", json=OK)
    c = AdminApiClient("http://127.0.0.1:9/proxy/", KEY, sleep=FakeSleep())
    assert c.get_json("/v1/organization/costs") == OK


@responses.activate
def test_params_lists_repeated_bools_lowercase_none_dropped(client):
    responses.get(URL, json=OK)
    client.get_json(PATH, {"start_time": 1700000000, "group_by": ["project_id", "model"], "batch": True,
                           "page": None})
    req = responses.calls[0].request
    assert req.url == URL + "?start_time=1700000000&group_by=project_id&group_by=model&batch=true"
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["User-Agent"].startswith("openai-elastic/")
    assert req.headers["Accept"] == "application/json"  # not requests' */*


@responses.activate
def test_from_config():
    responses.get("http://127.0.0.1:8080/v1/organization/projects", json=OK)
    config = config_from_dict({"url": "http://127.0.0.1:8080/v1", "max_retries": 2, "http_timeout": "5s",
                               "proxy_url": "http://proxy:3128"}, env={"OPENAI_ADMIN_KEY": KEY})
    c = AdminApiClient.from_config(config, sleep=FakeSleep())
    assert (c.max_retries, c.timeout) == (2, 5.0)
    assert c.session.proxies["https"] == "http://proxy:3128"
    c.session.proxies.clear()
    assert c.get_json("/v1/organization/projects") == OK


def test_tls_options():
    c = AdminApiClient(BASE, KEY, ca_file="/etc/ca.pem")
    assert c.session.verify == "/etc/ca.pem"
    assert AdminApiClient(BASE, KEY, verify=False).session.verify is False
    assert AdminApiClient(BASE, KEY).session.verify is True


def test_ssl_verify_off_is_not_a_warning_at_every_request(tmp_path):
    """urllib3 warns InsecureRequestWarning at every request to an unverified host (its filter for
    SecurityWarnings is "always"); since the commands' logs capture Python warnings, ssl_verify:
    false was a WARNING line per request, every poll, beside the collection's one line that says
    it. The commands' logging set-up silences it (the client itself changes no process setting)."""
    import warnings

    from agent_input.logs import setup_logging
    from conftest import tls_server

    buf = io.StringIO()
    with tls_server(tmp_path, b'{"object": "page", "data": [], "has_more": false}') as url:
        with warnings.catch_warnings():  # the process's filters and showwarning, restored after
            setup_logging("INFO", "ecs", stream=buf)  # as the commands log: Python warnings captured
            client = AdminApiClient(url, KEY, verify=False, max_retries=0)
            for _ in range(3):
                client.get_json("/v1/organization/projects", {})
            client.close()
    assert "InsecureRequestWarning" not in buf.getvalue() and "Unverified HTTPS" not in buf.getvalue()


# ---- the configuration wins over the environment ------------------------------------------------
# requests reads HTTPS_PROXY, REQUESTS_CA_BUNDLE and ~/.netrc for each request and lets them
# override what is set on the session.


@pytest.fixture
def netrc_default(tmp_path, monkeypatch):
    """A netrc whose `default` entry matches every host, as $NETRC (requests reads it like ~/.netrc)."""
    path = tmp_path / "netrc"
    path.write_text("default login someone password netrc-password-1234\n")
    path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(path))
    return "netrc-password-1234"


@responses.activate
def test_a_netrc_entry_does_not_replace_the_admin_key(client, netrc_default):
    """Without an auth object requests puts a matching netrc entry's basic auth in place of the
    Authorization header: the API would answer 401 and the netrc password would have gone out."""
    responses.get(URL, json=OK)
    assert client.get_json(PATH) == OK
    assert responses.calls[0].request.headers["Authorization"] == f"Bearer {KEY}"
    assert "Authorization" not in client.session.headers and "***" in repr(client._auth)


@responses.activate
def test_configured_tls_settings_win_over_requests_ca_bundle(monkeypatch, tmp_path):
    bundle = tmp_path / "env-ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    responses.get(URL, json=OK)
    for kwargs, want in (({"verify": False}, False), ({"ca_file": "/etc/ca.pem"}, "/etc/ca.pem"),
                         ({}, str(bundle))):  # nothing configured: the environment's bundle applies
        c = AdminApiClient(BASE, KEY, **kwargs)
        c.get_json(PATH)
        assert responses.calls[-1].request.req_kwargs["verify"] == want, kwargs


def test_a_configured_proxy_wins_over_the_environment(simulator, monkeypatch):
    """proxy_url is used even when HTTP(S)_PROXY names another proxy (here a closed port)."""
    from conftest import ADMIN_KEY

    port, targets = _socks5_proxy()
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    c = AdminApiClient(simulator.base_url, ADMIN_KEY, proxy_url=f"socks5h://127.0.0.1:{port}", max_retries=0)
    assert c.get_json("/v1/organization/projects", {"limit": 1})["object"] == "list" and len(targets) == 1
    c.close()
    bare = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0)  # none configured: the environment's
    with pytest.raises(RetriesExhaustedError, match="proxy"):
        bare.get_json("/v1/organization/projects", {"limit": 1})
    bare.close()


# ---- typed errors, no retry on 4xx -------------------------------------------------------------


@responses.activate
def test_401_is_authentication_error_not_retried(client, sleep):
    responses.get(URL, status=401, json=err("Incorrect API key provided: sk-admin-****mnop.", "invalid_api_key"))
    with pytest.raises(AuthenticationError) as info:
        client.get_json(PATH)
    e = info.value
    assert (e.status, e.code, e.path) == (401, "invalid_api_key", PATH)
    assert str(e).startswith("the admin key was rejected (401 invalid_api_key): Incorrect API key provided")
    assert len(responses.calls) == 1 and sleep.calls == []
    assert client.stats.errors == 1 and client.stats.retries == 0


@responses.activate
def test_403_names_the_missing_scope_not_retried(client, sleep):
    responses.get(URL, status=403, json=err(
        "You have insufficient permissions for this operation. Missing scopes: api.usage.read. Check that you "
        "have the correct role in your organization (Reader, Writer, Owner)."))
    with pytest.raises(PermissionDeniedError) as info:
        client.get_json(PATH)
    assert info.value.missing_scope == "api.usage.read"
    assert str(info.value).startswith("the key lacks the api.usage.read scope (403")
    assert len(responses.calls) == 1 and sleep.calls == []


@responses.activate
def test_403_without_scope(client):
    responses.get(URL, status=403, json=err("Audit logging is not enabled for this organization."))
    with pytest.raises(PermissionDeniedError) as info:
        client.get_json(PATH)
    assert info.value.missing_scope is None
    assert "permission denied" in str(info.value) and "Audit logging" in str(info.value)


@responses.activate
def test_a_refusal_carries_the_date_openai_gave_it(client):
    """A 403 of a first read is OpenAI's answer too: its `Date` gives the clock's lead, which the
    audit stream keeps its refused starts moved back by (`AuditCollector._lead_of_refusal`)."""
    responses.get(URL, status=403, json=err("Audit logging is not enabled for this organization."),
                  headers={"Date": email.utils.formatdate(1_000_020.0, usegmt=True)})
    with pytest.raises(PermissionDeniedError) as info:
        client.get_json(PATH)
    assert info.value.server_date == 1_000_020
    responses.replace(responses.GET, URL, status=403, json=err("Audit logging is not enabled for this organization."))
    with pytest.raises(PermissionDeniedError) as info:
        client.get_json(PATH)
    assert info.value.server_date is None


@pytest.mark.parametrize("body", [
    {"json": err("Access to api.openai.com is denied by your network's policy.")},
    {"body": "<html><title>403 Forbidden</title>Blocked: https://api.openai.com/v1/organization</html>"},
])
@responses.activate
def test_403_naming_the_api_host_is_not_a_missing_scope(client, body):
    """A 403 whose text names the API's host (a proxy's block page, a message with a link) was read
    as the key lacking "the api.openai.com scope": check and the logs sent the user after a scope
    that does not exist, and the rate limits stream stopped as for a missing scope."""
    responses.get(URL, status=403, **body)
    with pytest.raises(PermissionDeniedError) as info:
        client.get_json(PATH)
    assert info.value.missing_scope is None
    assert info.value.refusal == "permission denied"
    assert "api.openai.com scope" not in str(info.value)


@pytest.mark.parametrize("message, scope", [
    ("Blocked: see https://api.proxy.corp/deny", None),  # a host without a known top-level domain, then a path
    ("Access to api.openai.com is refused: this key needs api.organization.read.", "api.organization.read"),
    ("This key needs api.conversations.read.", "api.conversations.read"),  # ".co" inside a scope's word
])
def test_403_scope_tokens_beside_host_names(message, scope):
    """A host name is skipped for the scope after it; a word that merely starts like a top-level
    domain is still a scope, and a token that runs into a URL path is not."""
    error = PermissionDeniedError(403, message, None, PATH)
    assert error.missing_scope == scope


@responses.activate
def test_404_and_400_not_retried(client, sleep):
    responses.get(URL, status=404, json=err("Project not found", "not_found"))
    with pytest.raises(NotFoundError) as info:
        client.get_json(PATH)
    assert info.value.status == 404 and "Project not found" in str(info.value)
    responses.replace(responses.GET, URL, status=400, json=err("Invalid value for 'limit'", "invalid_value"))
    with pytest.raises(BadRequestError) as info:
        client.get_json(PATH)
    assert info.value.code == "invalid_value" and "limit" in info.value.message
    responses.replace(responses.GET, URL, status=422, body="unprocessable")
    with pytest.raises(BadRequestError) as info:
        client.get_json(PATH)
    assert "unprocessable" in str(info.value)
    assert sleep.calls == [] and len(responses.calls) == 3
    assert all(isinstance(e, ApiError) for e in (NotFoundError(1, "x"), BadRequestError(1, "x")))


@pytest.mark.parametrize("body,ctype", [("<html>oops</html>", "text/html"), ("[1, 2]", "application/json"),
                                        ("", "application/json")])
@responses.activate
def test_malformed_body(client, body, ctype):
    responses.get(URL, body=body, content_type=ctype)
    with pytest.raises(MalformedResponseError) as info:
        client.get_json(PATH)
    assert info.value.status == 200 and PATH in str(info.value)


@pytest.mark.parametrize("body,reason", [
    # orjson words a reason its own way, and its words changed: the older of each pair is the floor's
    (b'{"object": "page", "data": [{"n": NaN}]}', r"unexpected character(, expected a JSON value)? at character 34"),
    (b'{"object": "page", "data": ["\xff"]}', r"not valid UTF-8\)"),
    (b'{"object": "page", "data": ' + b"[" * 2000 + b"]" * 2000 + b"}",
     r"(depth limit|array and object recursion depth) exceeded"),
    (b'{"object": "page", "data": [', r"unexpected end of data at character 28"),
])
@responses.activate
def test_a_body_that_is_not_json_is_reported_with_the_parsers_reason(client, body, reason):
    """The error showed only the body's start, which looks fine: `{"object": "page", ...`."""
    responses.get(URL, body=body, content_type="application/json")
    with pytest.raises(MalformedResponseError) as info:
        client.get_json(PATH)
    assert re.search(r"response is not JSON \(" + reason, str(info.value)), str(info.value)
    assert len(str(info.value)) < 400


def test_the_installed_orjson_has_a_nesting_limit():
    """The depth case above holds only for orjson 3.9.15 and later: before it (CVE-2024-27454)
    `loads` recursed without a limit, and a 200 body nested a million deep (a broken gateway)
    killed the installed collector with a segmentation fault, exit 139, no line saying why.
    `pip install` keeps an older orjson that the declared floor admits (a shared venv, a
    distribution's package), so the floor must exclude those versions."""
    from pathlib import Path

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    (orjson_req,) = [r for r in map(Requirement, tomllib.loads(text)["project"]["dependencies"]) if r.name == "orjson"]
    assert not orjson_req.specifier.contains("3.9.14"), orjson_req
    assert orjson_req.specifier.contains("3.9.15"), orjson_req


@responses.activate
def test_a_secret_cut_by_the_bodys_quoted_start_is_not_shown_in_part(client):
    """The error quotes a non-JSON body's first 120 bytes, and was redacted after the cut: a
    registered secret the cut fell inside left its first characters, too few for the prefix rule."""
    from agent_input.logs import register_secret

    secret = "GatewayEchoedSecret-0123456789abcdef"
    register_secret(secret)
    start = b"<html>proxy says: " + b"." * (120 - 18 - 10)
    responses.get(URL, body=start + secret.encode() + b"</html>", content_type="text/html")
    with pytest.raises(MalformedResponseError) as info:
        client.get_json(PATH)
    assert secret[:10] not in str(info.value) and "***" in str(info.value), str(info.value)


@responses.activate
def test_a_secret_cut_by_an_error_bodys_quoted_start_is_not_shown_in_part(client):
    """An error answer that is not JSON (a proxy's or gateway's page) is quoted to its first 200
    characters, and was redacted after that cut: a registered secret the cut fell inside kept up
    to 11 characters, too few for the prefix rule, in the error check prints and collect logs."""
    from agent_input.logs import register_secret

    secret = "GatewayEchoedErrSecret-0123456789abcdef"
    register_secret(secret)
    start = "<html>gateway says: " + "." * (200 - 20 - 10)
    responses.get(URL, body=start + secret + "</html>", status=400, content_type="text/html")
    with pytest.raises(BadRequestError) as info:
        client.get_json(PATH)
    assert secret[:10] not in str(info.value) and "***" in str(info.value), str(info.value)


# ---- retries ------------------------------------------------------------------------------------


@responses.activate
def test_429_with_retry_after_seconds_then_ok(client, sleep):
    responses.get(URL, status=429, headers={"Retry-After": "7"}, json=err("Rate limit reached", "rate_limit_exceeded"))
    responses.get(URL, status=429, headers={"retry-after-ms": "1500"}, json=err("Rate limit reached"))
    responses.get(URL, json=OK)
    assert client.get_json(PATH) == OK
    assert sleep.calls == [7.0, 1.5]
    s = client.stats
    assert (s.requests, s.retries, s.throttled, s.retry_after_seconds_total, s.errors) == (3, 2, 2, 8.5, 0)


@responses.activate
def test_retry_after_http_date(client, sleep):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    responses.get(URL, status=503, headers={"Retry-After": when}, body="busy")
    responses.get(URL, json=OK)
    assert client.get_json(PATH) == OK
    assert 27 <= sleep.calls[0] <= 31


def test_parse_retry_after_forms():
    now = lambda: 1_000_000.0  # noqa: E731
    assert parse_retry_after({}, now) is None
    assert parse_retry_after({"Retry-After": "12"}, now) == 12.0
    assert parse_retry_after({"Retry-After": "-3"}, now) == 0.0
    date = email.utils.formatdate(1_000_020.0, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now) == 20.0
    past = email.utils.formatdate(999_000.0, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, now) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}, now) is None
    assert parse_retry_after({"retry-after-ms": "250", "Retry-After": "9"}, now) == 0.25
    # an unreadable retry-after-ms does not hide a readable Retry-After
    assert parse_retry_after({"retry-after-ms": "soon", "Retry-After": "9"}, now) == 9.0


@responses.activate
def test_the_api_s_clock_is_kept_from_a_2xx_date_header(client):
    """`server_date`: the audit collector never marks as read a time the API has not reached, and
    the usage engine reads its clock from here (a fake of the client sets it directly)."""
    assert client.server_date is None
    responses.get(URL, status=503, headers={"Date": email.utils.formatdate(1_700_000_999, usegmt=True)})
    responses.get(URL, json=OK, headers={"Date": email.utils.formatdate(1_700_000_000, usegmt=True)})
    client.get_json(PATH)
    assert client.server_date == 1_700_000_000  # the answer's, not the retried error's


def test_a_retry_after_date_without_a_known_zone_is_gmt_whatever_the_host_zone(monkeypatch):
    """HTTP dates are GMT (RFC 9110), but `-0000` makes Python's parser return a naive time, which
    .timestamp() read in the host's zone: on a UTC+10 host a 20 s wait became 0 (or 10 h + 20 s)."""
    import time as time_module

    monkeypatch.setenv("TZ", "Australia/Sydney")
    time_module.tzset()
    try:
        now = lambda: 1_000_000.0  # noqa: E731
        date = email.utils.formatdate(1_000_020.0).replace("+0000", "-0000")  # 'Mon, 12 Jan 1970 13:47:00 -0000'
        assert date.endswith("-0000")
        assert parse_retry_after({"Retry-After": date}, now) == 20.0
        assert server_date({"Date": date}) == 1_000_020
    finally:
        monkeypatch.delenv("TZ")
        time_module.tzset()


@responses.activate
def test_a_stop_ends_a_retry_after_wait_at_once():
    """The module's promise: a stop (SIGTERM, the agent's) never waits out a Retry-After of
    minutes. The wait is on the stop event itself, not a sleep checked after it."""
    import threading

    from agent_input.http_client import StoppedError

    responses.get(URL, status=429, headers={"Retry-After": "3600"}, json=err("Rate limit reached"))
    stop = threading.Event()
    c = AdminApiClient(BASE, KEY, stop=stop, max_retries=3, sleep=lambda s: pytest.fail("slept without the stop"))
    raised: list[BaseException] = []

    def call():
        try:
            c.get_json(PATH)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            raised.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    threading.Timer(0.2, stop.set).start()
    caller.join(60)  # a liveness bound, not a speed figure: the wait it ends is an hour
    assert not caller.is_alive(), "the stop did not end the Retry-After wait"
    assert len(raised) == 1 and isinstance(raised[0], StoppedError), raised
    assert len(responses.calls) == 1  # not asked again after the stop


@responses.activate
def test_retry_after_is_capped(sleep):
    c = AdminApiClient(BASE, KEY, sleep=sleep, retry_after_cap=60)
    responses.get(URL, status=429, headers={"Retry-After": "86400"})
    responses.get(URL, json=OK)
    c.get_json(PATH)
    assert sleep.calls == [60]
    # the seconds counted are the seconds waited, not the day the server asked for
    assert c.stats.retry_after_seconds_total == 60 and c.stats.throttled == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@responses.activate
def test_5xx_retried_with_exponential_full_jitter(status, sleep):
    c = AdminApiClient(BASE, KEY, sleep=sleep, max_retries=6, backoff_base=1.0, backoff_cap=8.0,
                       rng=random.Random(1))
    for _ in range(6):
        responses.get(URL, status=status, body="upstream error")
    responses.get(URL, json=OK)
    assert c.get_json(PATH) == OK
    ceilings = [1, 2, 4, 8, 8, 8]
    assert len(sleep.calls) == 6
    assert all(0 <= d <= cap for d, cap in zip(sleep.calls, ceilings)), sleep.calls
    assert c.stats.retries == 6 and c.stats.throttled == 0


@responses.activate
def test_retries_exhausted(client, sleep):
    responses.get(URL, status=429, json=err("Rate limit reached for requests", "rate_limit_exceeded"))
    with pytest.raises(RetriesExhaustedError) as info:
        client.get_json(PATH)
    e = info.value
    assert e.status == 429 and "still throttled after 3 retries" in str(e) and "Rate limit reached" in str(e)
    assert len(responses.calls) == 4 and len(sleep.calls) == 3
    assert client.stats.throttled == 4 and client.stats.errors == 1


@responses.activate
def test_connection_errors_and_timeouts_retried(client, sleep):
    responses.get(URL, body=requests.exceptions.ConnectionError("Connection refused"))
    responses.get(URL, body=requests.exceptions.ReadTimeout("read timed out"))
    responses.get(URL, json=OK)
    assert client.get_json(PATH) == OK
    assert len(sleep.calls) == 2 and client.stats.retries == 2


def _serve_raw(answers):
    """A one-answer-per-connection HTTP server on loopback; returns (url, server socket)."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        for raw in answers:
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(raw)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}", server


def _get_from(answers, sleep, max_retries=3):
    """GET PATH from a loopback server giving `answers` (raw HTTP) in turn: (body, client stats)."""
    url, server = _serve_raw(answers)
    c = AdminApiClient(url, Secret(KEY), sleep=sleep, max_retries=max_retries)
    try:
        return c.get_json(PATH), c.stats
    finally:
        c.close()
        server.close()


@pytest.mark.parametrize("status", [200, 503])
def test_a_connection_cut_mid_body_is_retried(sleep, status):
    """The connection drops after the headers and part of the body (a proxy or load balancer
    giving up): the read fails, for a page as for an error body, and the request is sent again."""
    import json as json_

    full = json_.dumps(OK).encode()
    body, stats = _get_from([  # a short body, then close: the client's read of the rest fails
        b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"da" % status,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(full), full)], sleep)
    assert body == OK and len(sleep.calls) == 1 and stats.retries == 1


def _gzip_answer(status: int, body: bytes) -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, len(body), body))


@pytest.mark.parametrize("status", [200, 503])
def test_a_corrupt_gzip_body_is_retried_then_reported(sleep, status):
    """A body declared gzip that does not inflate (a broken proxy): asked again like a cut
    connection, and when it never inflates a clear error names it, never a raw requests exception."""
    import gzip
    import json as json_

    corrupt = b"\x1f\x8b\x08\x00garbage-not-deflate" * 4
    good = gzip.compress(json_.dumps(OK).encode())
    body, stats = _get_from([_gzip_answer(status, corrupt), _gzip_answer(200, good)], sleep)
    assert body == OK and len(sleep.calls) == 1 and stats.retries == 1

    with pytest.raises(RetriesExhaustedError) as info:
        _get_from([_gzip_answer(200, corrupt)] * 2, sleep, max_retries=1)
    assert info.value.code == "decoding_error" and "decoding error" in str(info.value)


@responses.activate
def test_connection_errors_exhausted(client, sleep):
    responses.get(URL, body=requests.exceptions.ConnectTimeout("connect timed out"))
    with pytest.raises(RetriesExhaustedError) as info:
        client.get_json(PATH)
    assert info.value.status is None and "timed out" in str(info.value)
    assert len(sleep.calls) == 3


@responses.activate
def test_tls_error_not_retried(client, sleep):
    responses.get(URL, body=requests.exceptions.SSLError("certificate verify failed"))
    with pytest.raises(TransportError) as info:
        client.get_json(PATH)
    assert "certificate verify failed" in str(info.value) and sleep.calls == []


def test_real_connection_refused_is_quick_and_typed(sleep):
    c = AdminApiClient("http://127.0.0.1:9", KEY, sleep=sleep, max_retries=1, timeout=2)
    with pytest.raises(RetriesExhaustedError) as info:
        c.get_json(PATH)
    assert "connection" in str(info.value).lower() and KEY not in str(info.value)


# ---- redaction ----------------------------------------------------------------------------------


@responses.activate
def test_key_never_in_errors_repr_or_debug_logs(caplog, sleep):
    c = AdminApiClient(BASE, Secret(KEY), sleep=sleep, max_retries=1)
    assert KEY not in repr(c)
    # A server that echoes the key back (in the message and a bearer header) must not leak it.
    responses.get(URL, status=401, json=err(f"Incorrect API key provided: {KEY}", "invalid_api_key"))
    responses.get(BASE + "/v1/organization/costs", status=500, body=f"Authorization: Bearer {KEY}")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AuthenticationError) as a:
            c.get_json(PATH)
        with pytest.raises(RetriesExhaustedError) as b:
            c.get_json("/v1/organization/costs")
    for e in (a.value, b.value):
        assert KEY not in str(e) and KEY not in repr(e) and KEY not in e.message
        assert "***" in str(e)
    assert "Bearer ***" in caplog.text
    assert KEY not in caplog.text
    assert any(r.levelno == logging.DEBUG and "GET" in r.getMessage() for r in caplog.records)


# ---- check's probes -----------------------------------------------------------------------------


@responses.activate
def test_probe_api_one_request_per_enabled_kind(client):
    config = config_from_dict({"data_streams": {"completions": {"enabled": False}}},
                              env={"OPENAI_ADMIN_KEY": KEY})
    responses.get(BASE + "/v1/organization/usage/embeddings", json=OK)
    responses.get(BASE + "/v1/organization/costs", json=OK)
    responses.get(BASE + "/v1/organization/audit_logs", status=403, json=err("Audit logging is disabled."))
    responses.get(BASE + "/v1/organization/projects", json=OK)
    responses.get(BASE + "/v1/organization/users", json=OK)
    results = probe_api(client, config, now=1_700_000_000)
    assert [(r.name, r.ok) for r in results] == [("usage", True), ("costs", True), ("audit_logs", False),
                                                 ("projects", True), ("users", True)]
    assert "enable audit logging" in results[2].message
    assert all("limit=1" in call.request.url for call in responses.calls)


def _socks5_proxy() -> tuple[int, list]:
    """A minimal SOCKS5 proxy (no auth, CONNECT) on loopback; its list records each target."""
    import socket
    import struct
    import threading

    targets: list = []
    server = socket.create_server(("127.0.0.1", 0))

    def relay(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            b.close()

    def serve(conn):
        conn.recv(262)  # greeting: version, methods
        conn.sendall(b"\x05\x00")  # no authentication
        _ver, _cmd, _rsv, atyp = conn.recv(4)
        host = conn.recv(conn.recv(1)[0]).decode() if atyp == 3 else socket.inet_ntoa(conn.recv(4))
        (port,) = struct.unpack("!H", conn.recv(2))
        targets.append((host, port))
        upstream = socket.create_connection((host, port))
        conn.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", 0))
        threading.Thread(target=relay, args=(upstream, conn), daemon=True).start()
        relay(conn, upstream)

    def accept():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1], targets


def test_a_socks_proxy_url_is_used_not_refused(simulator):
    """proxy_url accepts socks5:// and socks5h://; requests needs PySocks for them (requests[socks])."""
    from conftest import ADMIN_KEY

    port, targets = _socks5_proxy()
    c = AdminApiClient(simulator.base_url, ADMIN_KEY, proxy_url=f"socks5h://127.0.0.1:{port}", max_retries=0)
    body = c.get_json("/v1/organization/projects", {"limit": 1})
    assert body["object"] == "list" and targets and targets[0][1] == int(simulator.base_url.rsplit(":", 1)[1])
    c.close()


@responses.activate
def test_an_error_body_whose_error_is_a_string_is_its_message(client):
    """{"error": "..."} (a proxy's or an older API's shape): the string is the message, not the raw body."""
    responses.get(URL, status=400, json={"error": "start_time must be in the past"})
    with pytest.raises(BadRequestError) as info:
        client.get_json(PATH)
    assert info.value.message == "start_time must be in the past" and info.value.code is None


@responses.activate
def test_an_error_body_with_an_empty_message_says_the_status_text(client):
    """OpenAI's error object with `message: ""` (or null): the status' reason stands for it, not
    a bare "error" that tells a user nothing."""
    responses.get(URL, status=404, json={"error": {"message": "", "type": "invalid_request_error", "code": None}})
    with pytest.raises(NotFoundError) as info:
        client.get_json(PATH)
    assert info.value.message == "Not Found"


@responses.activate
def test_probe_api_says_a_usage_403_without_a_scope_is_permission_denied(client):
    """A usage 403 that names no scope: check's line is '403: permission denied (OpenAI's words)',
    not the audit hint nor a scope that does not exist, and the later probes still run."""
    config = config_from_dict({"data_streams": {"audit": {"enabled": False}}}, env={"OPENAI_ADMIN_KEY": KEY})
    responses.get(BASE + "/v1/organization/usage/completions", status=403,
                  json=err("You have insufficient permissions for this operation."))
    responses.get(BASE + "/v1/organization/costs", json=OK)
    responses.get(BASE + "/v1/organization/projects", json=OK)
    responses.get(BASE + "/v1/organization/users", json=OK)
    results = probe_api(client, config, now=1_700_000_000)
    assert results[0].name == "usage" and not results[0].ok
    assert results[0].message == "403: permission denied (You have insufficient permissions for this operation.)"
    assert [r.ok for r in results[1:]] == [True, True, True]
