"""Logging: stderr only, ECS JSON or text, and the admin key redacted from every part of a record."""
from __future__ import annotations

import datetime
import io
import json
import logging
import os
import time

import pytest

from agent_input import logs
from agent_input.config import Secret

KEY = "sk-admin-LOGTESTKEY-0123456789abcdef"


@pytest.fixture
def stderr():
    """A fake stderr for setup_logging(stream=...); restores the root logger afterwards.

    (Patching sys.stderr in a fixture does not work: pytest swaps it back for the call phase.)
    """
    buf = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield buf
    for h in list(root.handlers):
        if h not in saved_handlers:
            root.removeHandler(h)
    root.setLevel(saved_level)


def test_ecs_lines_on_stderr_only(stderr, capsys):
    logs.setup_logging("INFO", "ecs")  # the real (captured) sys.stderr
    logs.get_logger("agent_input.test").info("polled %d buckets", 3)
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout belongs to events
    line = json.loads(captured.err.strip().splitlines()[-1])
    assert line["message"] == "polled 3 buckets"
    assert line["log.level"] == "info" and line["log"]["logger"] == "agent_input.test"
    # the ECS logging spec allows either form: ecs-logging 2.2+ writes "ecs.version", 2.1 {"ecs": {"version"}}
    assert line.get("ecs.version") or line.get("ecs", {}).get("version")


def test_a_python_warning_is_an_ecs_line_on_the_logging_stream_redacted(stderr, capsys):
    """A library's `warnings.warn` wrote two raw lines to the real stderr: not ECS, not redacted,
    and under `run` past the stream that never blocks."""
    import warnings

    logs.setup_logging("INFO", "ecs", stream=stderr)
    warnings.warn(f"Unverified HTTPS request is being made with {KEY}", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == ""
    line = json.loads(stderr.getvalue().strip().splitlines()[-1])
    assert "Unverified HTTPS request" in line["message"] and KEY not in line["message"]
    assert line["log"]["logger"] == "py.warnings" and line["log.level"] == "warning"


def test_text_format(stderr):
    logs.setup_logging("DEBUG", "text", stream=stderr)
    logs.get_logger("x").debug("hello")
    assert stderr.getvalue().rstrip().endswith("DEBUG   agent_input.x: hello")


def test_auto_is_ecs_when_not_a_tty_and_text_on_a_tty(stderr, monkeypatch):
    logs.setup_logging("INFO", "auto", stream=stderr)
    logging.getLogger("agent_input").info("piped")
    assert json.loads(stderr.getvalue())["message"] == "piped"
    monkeypatch.setattr(stderr, "isatty", lambda: True, raising=False)
    stderr.seek(0), stderr.truncate()
    logs.setup_logging("INFO", "auto", stream=stderr)
    logging.getLogger("agent_input").info("terminal")
    assert stderr.getvalue().strip().endswith("agent_input: terminal")


def test_setup_is_idempotent_and_validates(stderr):
    logs.setup_logging("INFO", "text", stream=stderr)
    logs.setup_logging("INFO", "text", stream=stderr)
    logging.getLogger("agent_input").warning("once")
    assert stderr.getvalue().count("once") == 1
    with pytest.raises(ValueError):
        logs.setup_logging("INFO", "xml", stream=stderr)
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):  # not getLevelName's "Level LOUD"
        logs.setup_logging("LOUD", "text", stream=stderr)


def test_get_logger_namespaces():
    assert logs.get_logger("agent_input.engine").name == "agent_input.engine"
    assert logs.get_logger("engine").name == "agent_input.engine"


@pytest.mark.parametrize("fmt", ["ecs", "text"])
def test_secret_redacted_from_message_args_and_exceptions(stderr, fmt):
    logs.setup_logging("DEBUG", fmt, secrets=[Secret(KEY)], stream=stderr)
    log = logging.getLogger("agent_input.redaction")
    log.info("key is " + KEY)
    log.info("key is %s", KEY)
    log.info("dict %r", {"headers": {"Authorization": f"Bearer {KEY}"}})
    try:
        raise RuntimeError(f"boom with {KEY}")
    except RuntimeError:
        log.exception("failed")
    log.warning("stack", stack_info=True, extra={"note": "x"})
    text = stderr.getvalue()
    assert KEY not in text
    assert text.count("***") >= 4
    if fmt == "ecs":
        records = [json.loads(x) for x in text.splitlines()]
        err = next(r for r in records if r["message"] == "failed")
        assert err["error"]["type"] == "RuntimeError"
        assert KEY not in err["error"]["message"] and "***" in err["error"]["message"]
        assert KEY not in err["error"]["stack_trace"]


@pytest.mark.parametrize("password", ['pa"ss\\w0rd-Zq8', "pässwörd-1234", "tab\tand\nnewline-9"])
def test_a_password_that_json_escapes_is_redacted_from_every_ecs_field(stderr, password):
    """An Elasticsearch or proxy password with a quote, backslash, non-ASCII or control character
    is escaped in the JSON line; redaction must not depend on how it is spelled there."""
    logs.setup_logging("INFO", "ecs", secrets=[password], stream=stderr)
    log = logging.getLogger("agent_input.redaction")
    log.info("plain %s", password)
    log.info("in a dict %r", {"password": password})
    try:
        raise RuntimeError("auth failed for " + password)
    except RuntimeError:
        log.exception("failed")
    log.warning("with extra", extra={"detail": f"user:{password}@es"})

    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    records = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert len(records) == 4
    leaked = [text for r in records for text in strings(r) if password in text]
    assert leaked == []
    err = next(r for r in records if r["message"] == "failed")
    assert err["error"]["message"] == "auth failed for ***"


def test_unregistered_bearer_and_openai_shaped_keys_are_redacted(stderr):
    logs.setup_logging("INFO", "text", stream=stderr)
    other = "sk-proj-UNREGISTERED0123456789"
    logging.getLogger("agent_input").info("Authorization: Bearer abc.def-ghi and %s", other)
    text = stderr.getvalue()
    assert "abc.def-ghi" not in text and other not in text
    assert "Bearer ***" in text
    # the shortest key of that shape (sk- and 8 characters) is one too, registered or not
    assert logs.redact("key sk-a1B2c3D4, ok") == "key ***, ok"


def test_redact_function():
    logs.register_secret("s3cr3t-value")
    logs.register_secret("")  # ignored
    logs.register_secret("ab")  # too short to be a key: ignored (would mangle every line)
    assert logs.redact("x s3cr3t-value y") == "x *** y"
    assert logs.redact("about ab") == "about ab"
    assert logs.redact("other", extra=["other"]) == "***"
    assert logs.redact("") == ""


def test_filter_alone_redacts_message_args_exc_text():
    logs.register_secret(KEY)
    try:
        raise ValueError(KEY)
    except ValueError:
        import sys

        record = logging.LogRecord("n", logging.ERROR, __file__, 1, "a %s b", (KEY,), sys.exc_info())
    record.stack_info = f"Stack (most recent call last):\n  File x, in f\n    call({KEY!r})"
    assert logs.RedactingFilter().filter(record) is True
    assert record.getMessage() == "a *** b"
    assert KEY not in record.exc_text and "***" in record.exc_text
    assert KEY not in record.stack_info and "***" in record.stack_info


# -- found by mutation testing ---------------------------------------------------------------------
def test_bearer_tokens_are_redacted_in_any_case_and_with_base64_characters(stderr):
    logs.setup_logging("INFO", "text", stream=stderr)
    logging.getLogger("agent_input").info("authorization: bearer tok/EN+part==end; AUTHORIZATION: BEARER Up.Per-9")
    text = stderr.getvalue()
    for part in ("tok", "EN+part", "part==end", "Up.Per-9"):
        assert part not in text, text
    assert text.count("***") == 2


def test_a_secret_that_contains_another_is_redacted_whole():
    short, long = "Zq8-inner-pw", "Zq8-inner-pw-and-its-tail-Xk2"
    assert logs.redact(f"a {long} b {short} c", extra=[short, long]) == "a *** b *** c"


def test_short_and_padded_secrets_are_registered():
    logs.register_secret("Pw7-x9")  # a short password is still a password (only < 4 is refused)
    logs.register_secret(" \tpadded-Secret-Q4\n")  # read from a file or an env var with its line break
    assert logs.redact("pw Pw7-x9 end") == "pw *** end"
    assert logs.redact("key=padded-Secret-Q4;") == "key=***;"


def test_setup_logging_registers_secret_objects_not_shaped_like_keys(stderr):
    plain = "Zq8xPLAIN-logs-secret-object-0123"  # neither sk-... nor a bearer token: only registration hides it
    logs.setup_logging("INFO", "ecs", secrets=[Secret(plain)], stream=stderr)
    logging.getLogger("agent_input").info("configured %s", plain)
    assert plain not in stderr.getvalue() and "***" in stderr.getvalue()
    other = "Zq8xPLAIN-logs-register-secret-4567"
    logs.register_secret(Secret(other))
    assert logs.redact(f"x {other}") == "x ***"


def test_urllib3_stays_at_info_when_we_log_at_debug(stderr):
    urllib3 = logging.getLogger("urllib3")
    saved = urllib3.level
    try:
        logs.setup_logging("DEBUG", "text", stream=stderr)
        assert urllib3.level == logging.INFO  # one line per connection otherwise
        logs.setup_logging("WARNING", "text", stream=stderr)
        assert urllib3.level == logging.WARNING
    finally:
        urllib3.setLevel(saved)


def test_the_elasticsearch_clients_own_request_lines_are_left_out_but_at_debug(stderr):
    """elastic_transport logs every request at INFO ("PUT http://es:9200/_bulk [status:200 ...]")
    and a failed one at WARNING ("Node ... has failed for 1 times in a row, putting on 1 second
    timeout"): at the default INFO a collect to Elasticsearch wrote a line per bulk request, and an
    unreachable cluster two raw lines before the collector's own one (which says it, and whose
    retries are its own: the client's are off)."""
    transport = logging.getLogger("elastic_transport.transport")
    logs.setup_logging("INFO", "text", stream=stderr)
    transport.info("PUT http://es:9200/_bulk [status:200 duration:0.004s]")
    logging.getLogger("elastic_transport.node_pool").warning("Node <es> has failed for 1 times in a row")
    transport.error("kept")
    assert "_bulk" not in stderr.getvalue() and "has failed" not in stderr.getvalue()
    assert "kept" in stderr.getvalue()
    logs.setup_logging("DEBUG", "text", stream=stderr)
    transport.info("PUT http://es:9200/_bulk [status:200 duration:0.004s]")
    assert "_bulk" in stderr.getvalue()
    logging.getLogger("elastic_transport").setLevel(logging.NOTSET)


def test_map_strings_reaches_mapping_keys_only_when_asked():
    """The protocol makes every string of a status encodable, its keys too (`keys=True`: a
    supervisor's config may carry a lone surrogate in a key); the log formatter leaves keys be."""
    from agent_input.logs import map_strings

    value = {"a": ["b", {"c": "d", "n": 1}], "e": None}
    assert map_strings(value, str.upper, keys=True) == {"A": ["B", {"C": "D", "N": 1}], "E": None}
    assert map_strings(value, str.upper) == {"a": ["B", {"c": "D", "n": 1}], "e": None}


def test_a_secret_cut_short_is_redacted_too():
    """An error line quotes 45 characters of a value, a body is cut at 200: the cut secret no
    longer matched whole, and its first 45 (or 40) characters went out."""
    from agent_input.logs import redact, register_secret

    plain = "Zq8xPLAINADMINKEY0123456789abcdefghijklmnopqrstuvwxyz"
    register_secret(plain)
    assert redact(f"namespace: {plain[:45]!r}... (61 characters)") == "namespace: '***'... (61 characters)"
    assert redact(f"x {plain[:12]} y") == "x *** y", "12 characters are a prefix"
    assert redact(f"x {plain[:11]} y") == f"x {plain[:11]} y", "under 12 characters is no secret's prefix"
    # an Elasticsearch Authorization value a proxy echoed, cut at 200 characters
    assert redact("<pre>Authorization: ApiKey VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAy") == \
        "<pre>Authorization: ApiKey ***"
    assert redact("Authorization: Basic ZWxhc3RpYzplcy1wYTU1d29yZC1a") == "Authorization: Basic ***"
    register_secret("ZWxhc3RpYzplcy1wYTU1")  # a registered secret inside the token: the token still goes whole
    assert redact("Authorization: Basic ZWxhc3RpYzplcy1wYTU1d29yZC1a") == "Authorization: Basic ***"
    assert redact("uses basic authentication") == "uses basic authentication"


def test_a_url_password_is_redacted_as_written_and_as_sent(tmp_path):
    """`https://user:p%40ss@es` sends the password `p@ss`: an error echoing either form is redacted."""
    from agent_input.config import load_config

    config = tmp_path / "openai.yml"
    config.write_text("api_key: sk-admin-url-password-test-0123456789\n"
                      "es_url: https://elastic:Zq8%40word%2Fx-71@es.example.com:9200\n"
                      "proxy_url: http://proxyuser:Kp2%3Aproxy%25y-88@proxy.example.com:3128\n")
    load_config(config, env={})
    for written, sent in (("Zq8%40word%2Fx-71", "Zq8@word/x-71"), ("Kp2%3Aproxy%25y-88", "Kp2:proxy%y-88")):
        text = logs.redact(f"auth failed as elastic:{sent} (url had {written})")
        assert sent not in text and written not in text, text


def test_an_unread_stderr_costs_log_lines_not_the_thread_that_logs():
    """`run` logs through `UnblockedStream`: while the reader takes nothing, `write` returns at once;
    lines past the limit are dropped, and the count is logged where they were missing."""
    import threading

    class Stuck(io.StringIO):
        def __init__(self):
            super().__init__()
            self.reading = threading.Event()

        def write(self, text):
            self.reading.wait()  # a full pipe: the write waits for the reader
            return super().write(text)

    out = Stuck()
    stream = logs.UnblockedStream(out, limit=100)
    before = time.time()
    for n in range(6):
        stream.write(f"line {n} " + "x" * 30 + "\n")  # 38 characters: two wait, the rest are dropped
    after = time.time()
    time.sleep(0.3)  # the notice is written later: it is stamped when the lines were dropped
    assert not stream.wait_written(0.2)
    out.reading.set()
    assert stream.wait_written(5)
    stream.write("after\n")
    assert stream.wait_written(5)
    lines = out.getvalue().splitlines()
    kept = [line.split()[1] for line in lines if line.startswith("line")]
    assert len(kept) in (2, 3) and kept == sorted(kept)  # the drain thread may have taken line 0 first
    notice = json.loads(lines[len(kept)])
    assert notice["log.level"] == "warning" and notice["message"] == f"{6 - len(kept)} log line(s) dropped: stderr was not read"
    # formatted as every other ECS line (compact, the process and logger fields), stamped to the ms
    assert lines[len(kept)] == json.dumps(notice, separators=(",", ":")) and notice["process"]["pid"] == os.getpid()
    assert notice["log"]["logger"] == "agent_input.logs"
    stamp = datetime.datetime.strptime(notice["@timestamp"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    assert before - 0.001 <= stamp <= after + 0.001
    assert lines[-1] == "after"


def test_the_limit_is_on_what_waits_not_on_all_that_was_ever_written():
    """Written lines leave the limit's count: a long run (more than `limit` characters of logs
    in all) with a stderr that is read keeps every line; the limit itself fits to the character."""
    import threading
    import time

    out = io.StringIO()
    stream = logs.UnblockedStream(out, limit=100)
    for n in range(50):  # 1,900 characters in all, 38 at a time
        stream.write(f"line {n:02d} " + "x" * 29 + "\n")
        began = time.monotonic()
        assert stream.wait_written(5)
        assert time.monotonic() - began < 2.5  # told when the line is written, not at the timeout
    assert out.getvalue().splitlines() == [f"line {n:02d} " + "x" * 29 for n in range(50)]

    class Stuck(io.StringIO):
        def __init__(self):
            super().__init__()
            self.reading = threading.Event()

        def write(self, text):
            self.reading.wait()
            return super().write(text)

    stuck = Stuck()
    stream = logs.UnblockedStream(stuck, limit=100)
    for text in ("a" * 49 + "\n", "b" * 49 + "\n", "c\n"):  # 50 + 50 fit exactly; the third does not
        stream.write(text)
    stuck.reading.set()
    assert stream.wait_written(5)
    lines = stuck.getvalue().splitlines()
    assert lines[:2] == ["a" * 49, "b" * 49] and json.loads(lines[2])["message"].startswith("1 log line(s) dropped")
