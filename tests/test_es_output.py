"""Contract tests of the direct Elasticsearch output against a recording fake of the bulk API that
enforces create-only semantics on `_id` (tests/fake_es.py); the done-when SIGKILL test; and an
opt-in test against a real cluster (ES_URL)."""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml

from agent_input.engine import serialize
from agent_input.es_output import ElasticsearchOutput, check_cluster, make_client
from agent_input.outputs import OutputError
from agent_input.streams import USAGE_STREAMS

from conftest import ADMIN_KEY, T0, committed_batches, dedupe, stored_totals, truth_totals, wait_for_commits
from fake_es import FakeElasticsearch

API_KEY = "ZXNfYXBpX2tleV9zZWNyZXQ6dGVzdHRlc3Q="  # what ELASTIC_API_KEY holds (encoded id:key)
ENV = {"ELASTIC_API_KEY": API_KEY}
AUTH = f"ApiKey {API_KEY}"


def _doc(i: int, dataset: str = "openai.completions", namespace: str = "default", **extra) -> tuple[str, dict]:
    return f"{dataset}-{i:04d}", {
        "@timestamp": "2026-11-23T09:00:00.000Z",
        "data_stream": {"type": "logs", "dataset": dataset, "namespace": namespace},
        "event": {"dataset": dataset, "kind": "metric"},
        "openai": {"base": {"num_model_requests": i}},
        **extra,
    }


def _payload(docs) -> bytes:
    return b"".join(serialize(i, d) for i, d in docs)


@pytest.fixture
def fake():
    es = FakeElasticsearch("8.18.0", auth=AUTH)
    yield es
    es.close()


def _output(url, tmp_path, **kw) -> ElasticsearchOutput:
    kw.setdefault("initial_backoff", 0.01)
    kw.setdefault("max_backoff", 0.05)
    return ElasticsearchOutput(make_client(url, env=ENV), state_dir=tmp_path, **kw)


class Acks:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


# -- compatibility headers --------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["8.18.0", "8.19.3", "9.0.0", "9.2.1"])
def test_works_with_8_18_and_9_x_and_sends_compatible_with_8(tmp_path, version):
    es = FakeElasticsearch(version, auth=AUTH)
    try:
        out = _output(es.url, tmp_path)
        assert check_cluster(out.client) == version
        ack = Acks()
        out.send("completions", _payload([_doc(1), _doc(2)]), 2, ack)
        assert ack.n == 1 and len(es.docs) == 2
        for req in es.requests:
            assert req["headers"]["accept"] == "application/vnd.elasticsearch+json; compatible-with=8"
            if req["method"] == "POST":
                assert req["headers"]["content-type"] == "application/vnd.elasticsearch+x-ndjson; compatible-with=8"
    finally:
        es.close()


def test_a_serverless_project_is_not_warned_about_as_an_old_version(tmp_path, caplog):
    """Elastic Cloud Serverless reports `build_flavor: serverless` and a version number that is not
    its feature level (8.11.0 for years): every start warned that it was older than 8.18, the
    oldest version tested, and sent nothing differently."""
    es = FakeElasticsearch("8.11.0", auth=AUTH)
    es.build_flavor = "serverless"
    try:
        out = _output(es.url, tmp_path)
        with caplog.at_level(logging.WARNING, logger="agent_input.es_output"):
            assert check_cluster(out.client) == "serverless (reports 8.11.0)"
        assert not [r for r in caplog.records if "older than" in r.getMessage()]
        ack = Acks()
        out.send("completions", _payload([_doc(1)]), 1, ack)
        assert ack.n == 1 and len(es.docs) == 1
    finally:
        es.close()


def test_the_fake_refuses_what_a_real_8_x_server_refuses(fake):
    """Without the pinned headers the installed 9.x client is refused by 8.x (the reason for it)."""
    import elasticsearch

    if not elasticsearch.__versionstr__.startswith("9."):
        pytest.skip("the installed client is not 9.x")
    plain = elasticsearch.Elasticsearch(fake.url, api_key=API_KEY)
    with pytest.raises(elasticsearch.BadRequestError) as exc:
        plain.info()
    assert "media_type_header_exception" in str(exc.value)


# -- create-only with the deterministic id ----------------------------------------------------------
def test_create_ops_into_the_dataset_data_stream_with_the_id_stripped_from_the_source(fake, tmp_path):
    out = _output(fake.url, tmp_path, namespace="ignored")
    docs = [_doc(1), _doc(2, "openai.embeddings", "team")]
    ack = Acks()
    out.send("completions", _payload(docs), 2, ack)
    assert ack.n == 1
    assert fake.indices() == {"logs-openai.completions-default", "logs-openai.embeddings-team"}
    assert fake.docs[("logs-openai.completions-default", docs[0][0])] == docs[0][1]
    assert not fake.violations
    # delivered again (a replay after a crash): every create is a 409, counted, not an error
    again = Acks()
    out.send("completions", _payload(docs), 2, again)
    assert again.n == 1 and out.duplicates == 2 and out.created == 2 and out.rejected == 0
    assert fake.conflicts == 2 and not fake.violations


# -- retries ------------------------------------------------------------------------------------------
def test_partial_bulk_failures_are_retried_per_item(fake, tmp_path):
    out = _output(fake.url, tmp_path)
    docs = [_doc(i) for i in range(6)]
    fake.item_faults = {docs[1][0]: [429, 429], docs[4][0]: [503]}
    ack = Acks()
    out.send("completions", _payload(docs), 6, ack)
    assert ack.n == 1 and len(fake.docs) == 6 and out.created == 6
    bulk = [r for r in fake.requests if r["path"].startswith("/_bulk")]
    assert len(bulk) == 3  # all six, then the two failures, then the one still at 429


def test_a_stop_during_a_429_storm_is_not_slept_through_by_the_bulk_helper(fake, tmp_path, monkeypatch):
    """The bulk helper retries a 429 with time.sleep (1 + 2 + 4 s by its defaults), deaf to a stop:
    SIGTERM then waited up to 7 s more than the request in flight (Docker stops at 10 s). By
    default the output makes every retry wait itself, on the stop."""
    from elasticsearch.helpers import actions

    helper_sleeps: list[float] = []
    monkeypatch.setattr(actions.time, "sleep", lambda seconds: helper_sleeps.append(seconds))
    stop = threading.Event()
    out = ElasticsearchOutput(make_client(fake.url, env=ENV), state_dir=tmp_path, stop=stop,
                              sleep=lambda seconds: stop.set())
    docs = [_doc(i) for i in range(3)]
    fake.item_faults = {docs[1][0]: [429] * 10}
    ack = Acks()
    out.send("completions", _payload(docs), 3, ack)
    assert helper_sleeps == [], "the bulk helper slept through the stop"
    assert ack.n == 0 and len(fake.docs) == 2, "the document still at 429 keeps the batch in the outbox"
    stop.clear()
    fake.item_faults = {}
    out.send("completions", _payload(docs), 3, ack)
    assert ack.n == 1 and len(fake.docs) == 3


@pytest.mark.parametrize("status", [429, 503, 507])
def test_item_failures_that_outlast_the_helpers_retries_are_retried_not_dead_lettered(fake, tmp_path, status):
    """With the bulk helper's own retries spent (max_retries=0), a document still answered 429 or
    503 is sent again by the output's loop: never dead-lettered, the batch acked once stored."""
    out = _output(fake.url, tmp_path, max_retries=0)
    docs = [_doc(i) for i in range(3)]
    fake.item_faults = {docs[1][0]: [status] * 3}
    ack = Acks()
    out.send("completions", _payload(docs), 3, ack)
    assert ack.n == 1 and len(fake.docs) == 3 and out.created == 3 and out.rejected == 0
    assert not (tmp_path / "dead-letter.ndjson").exists()


def test_a_stop_while_other_streams_hold_every_request_slot_gives_up_the_batch(fake, tmp_path):
    """max_concurrent requests are in flight for other streams (a slow cluster): a stop does not
    wait for them before this batch gives up, unacknowledged."""
    stop = threading.Event()
    out = _output(fake.url, tmp_path, stop=stop, max_concurrent=1)
    assert out._slots.acquire(timeout=1)  # another stream's request, in flight for long
    ack = Acks()
    sender = threading.Thread(target=out.send, args=("completions", _payload([_doc(1)]), 1, ack), daemon=True)
    sender.start()
    time.sleep(0.3)
    stop.set()
    sender.join(5)
    assert not sender.is_alive(), "the stop waited for another stream's request slot"
    assert ack.n == 0 and not fake.docs
    out._slots.release()

def test_a_stop_during_a_retry_wait_leaves_the_batch_unacknowledged(fake, tmp_path):
    stop = threading.Event()
    out = _output(fake.url, tmp_path, stop=stop, sleep=lambda seconds: stop.set(), max_retries=0)
    fake.fail_requests = [503] * 5
    ack = Acks()
    out.send("completions", _payload([_doc(1), _doc(2)]), 2, ack)
    assert ack.n == 0 and not fake.docs, "a batch not stored must stay in the outbox"


def test_a_document_refused_with_403_stops_the_output_not_dead_lettered(fake, tmp_path):
    """A per-item 403 (the key lacks the privilege on that data stream) is the credentials' fault:
    every document would be dead-lettered by the same cause."""
    out = _output(fake.url, tmp_path)
    docs = [_doc(1), _doc(2)]
    fake.item_faults = {docs[0][0]: [403]}
    ack = Acks()
    with pytest.raises(OutputError, match="refused the credentials.*index privileges on logs-openai.completions"):
        out.send("completions", _payload(docs), 2, ack)
    assert ack.n == 0 and out.rejected == 0
    assert not (tmp_path / "dead-letter.ndjson").exists()


@pytest.mark.parametrize("status, error", [
    (404, {"type": "index_not_found_exception", "reason": "no such index [logs-openai.embeddings-team] and "
           "[action.auto_create_index] ([logs-openai.c*]) doesn't match", "index": "logs-openai.embeddings-team"}),
    (400, {"type": "invalid_index_name_exception", "reason": "Invalid index name [.ds-logs-openai.embeddings-team-"
           "2026.11.23-000001], index name is too long, (256 > 255)"}),
    (400, {"type": "index_closed_exception", "reason": "closed", "index": "logs-openai.embeddings-team"}),
    (403, {"type": "cluster_block_exception", "reason": "index [.ds-logs-openai.embeddings-team-2026.11.23-000001] "
           "blocked by: [FORBIDDEN/8/index write (api)];"}),
    # a 404 is about the target whatever its type says: never the document's fault
    (404, {"type": "resource_not_found_exception", "reason": "no such target [logs-openai.embeddings-team]"}),
])
def test_an_item_error_about_the_index_stops_the_output_instead_of_dead_lettering(fake, tmp_path, status, error):
    """The cluster refusing the index (auto-creation not allowed, a name it does not take, a closed
    or blocked index) answers so for every document bound for it: dead-lettering them would empty
    the outbox into the dead-letter file and move the cursor on; the batch waits for the fix."""
    out = _output(fake.url, tmp_path)
    refused = "logs-openai.embeddings-team"
    fake.refuse_index = lambda index: (status, error) if index == refused else None
    docs = [_doc(1), _doc(2, "openai.embeddings", "team"), _doc(3)]
    ack = Acks()
    with pytest.raises(OutputError) as info:
        out.send("completions", _payload(docs), 3, ack)
    message = str(info.value)
    assert f"cannot write to {refused} (HTTP {status}: {error['type']}" in message and "outbox" in message
    assert "\n" not in message and "refused the credentials" not in message
    assert ack.n == 0 and out.rejected == 0 and not (tmp_path / "dead-letter.ndjson").exists()
    fake.refuse_index = None  # fixed (auto-creation allowed, block lifted...): the kept batch goes through
    out.send("completions", _payload(docs), 3, ack)
    assert ack.n == 1 and len(fake.docs) == 3 and out.rejected == 0


def test_a_missing_ingest_pipeline_stops_the_output_and_says_to_install_the_assets(fake, tmp_path):
    """Without the assets, an index template naming `logs-openai.<ds>@pipeline` gets every document
    refused with an `illegal_argument_exception` whose reason is the only mark of it: dead-lettering
    them would empty the outbox into the dead-letter file."""
    out = _output(fake.url, tmp_path)
    fake.refuse_index = lambda index: (400, {"type": "illegal_argument_exception",
                                             "reason": "pipeline with id [logs-openai.completions@pipeline] does not exist"})
    ack = Acks()
    with pytest.raises(OutputError) as info:
        out.send("completions", _payload([_doc(1), _doc(2)]), 2, ack)
    message = str(info.value)
    assert "cannot write to logs-openai.completions-default" in message and "openai-assets install" in message
    assert "logs-openai.completions@pipeline" in message and "outbox" in message
    assert ack.n == 0 and out.rejected == 0 and not (tmp_path / "dead-letter.ndjson").exists()
    # an illegal_argument_exception about the document itself is still the document's
    fake.refuse_index = lambda index: (400, {"type": "illegal_argument_exception",
                                             "reason": "field [x] of type [long] cannot take [pipeline]"})
    out.send("completions", _payload([_doc(3)]), 1, ack)
    assert ack.n == 1 and out.rejected == 1


@pytest.mark.parametrize("interruption", ["index refused", "stop"])
def test_a_batch_stopped_part_way_dead_letters_its_rejected_document_once_in_all(fake, tmp_path, interruption):
    """The rejected document of a batch that stops part way (an index-level error after it, a stop
    during a retry wait) is rejected again when the kept batch is sent again: it must be in the
    dead-letter file once, not once per sending."""
    stop = threading.Event()
    kw = {"stop": stop, "sleep": lambda seconds: stop.set(), "max_retries": 0} if interruption == "stop" else {}
    out = _output(fake.url, tmp_path, **kw)
    docs = [_doc(1, bad="x"), _doc(2, "openai.embeddings"), _doc(3)]
    fake.reject = lambda src: {"type": "document_parsing_exception", "reason": "bad"} if "bad" in src else None
    if interruption == "stop":
        fake.item_faults = {docs[1][0]: [503]}
    else:
        fake.refuse_index = lambda index: ((404, {"type": "index_not_found_exception", "reason": "no such index"})
                                           if "embeddings" in index else None)
    ack = Acks()
    try:
        out.send("completions", _payload(docs), 3, ack)
    except OutputError:
        assert interruption == "index refused"
    assert ack.n == 0 and not (tmp_path / "dead-letter.ndjson").exists()
    fake.refuse_index = None
    stop.clear()
    out.send("completions", _payload(docs), 3, ack)  # the kept batch, at the next start
    assert ack.n == 1 and len(fake.docs) == 2
    dead = (tmp_path / "dead-letter.ndjson").read_text().splitlines()
    assert [json.loads(line)["_id"] for line in dead] == [docs[0][0]] and out.rejected == 1


def test_an_item_403_security_exception_is_about_the_credentials(fake, tmp_path):
    out = _output(fake.url, tmp_path)
    fake.refuse_index = lambda index: (403, {"type": "security_exception", "reason": "action [indices:data/write/"
                                             "bulk[s]] is unauthorized for API key id [x] on indices [" + index + "]"})
    ack = Acks()
    with pytest.raises(OutputError, match="refused the credentials.*index privileges on logs-openai.completions"):
        out.send("completions", _payload([_doc(1)]), 1, ack)
    assert ack.n == 0 and out.rejected == 0 and not (tmp_path / "dead-letter.ndjson").exists()


def test_whole_request_429_and_5xx_and_connection_errors_are_retried(fake, tmp_path):
    out = _output(fake.url, tmp_path)
    fake.fail_requests = [503, 429, 502, 507]  # every 5xx, not only those of RETRY_STATUS
    ack = Acks()
    out.send("completions", _payload([_doc(1)]), 1, ack)
    assert ack.n == 1 and len(fake.docs) == 1


def test_each_retry_waits_longer_up_to_max_backoff(fake, tmp_path):
    """The output's own loop backs off exponentially from initial_backoff to max_backoff: a retry
    that does not wait hammers a cluster that is already refusing (429) or down (503)."""
    waits: list[float] = []
    out = _output(fake.url, tmp_path, initial_backoff=1.0, max_backoff=3.0, attempts=10, sleep=waits.append)
    fake.fail_requests = [503, 429, 503, 502]
    ack = Acks()
    out.send("completions", _payload([_doc(1)]), 1, ack)
    assert ack.n == 1 and len(fake.docs) == 1
    assert waits == [1.0, 2.0, 3.0, 3.0]

def test_patience_runs_out_with_a_clear_error_and_no_ack(fake, tmp_path):
    out = _output(fake.url, tmp_path, max_retries=1, attempts=2)
    fake.fail_requests = [503] * 10
    ack = Acks()
    with pytest.raises(OutputError, match=r"did not take 1 of 1 completions documents after 2 attempts.*outbox"):
        out.send("completions", _payload([_doc(1)]), 1, ack)
    assert ack.n == 0


def test_a_cluster_that_refuses_the_first_request_says_why_not_only_the_error_type(tmp_path, caplog):
    """`GET /` answered with an error (here a cluster past 9.x refusing compatible-with=8): the line
    named the error type alone ("Elasticsearch answered 400: media_type_header_exception"), not
    Elasticsearch's reason. An 8.17 cluster is warned about, and still used."""
    es = FakeElasticsearch("10.0.0", auth=AUTH)
    try:
        with pytest.raises(OutputError) as refused:
            check_cluster(_output(es.url, tmp_path).client)
        assert str(refused.value).startswith("Elasticsearch answered 400: media_type_header_exception: ")
        assert "Accept version must be either version 10 or 9, but found 8" in str(refused.value)
    finally:
        es.close()
    es = FakeElasticsearch("8.17.2", auth=AUTH)
    try:
        with caplog.at_level(logging.WARNING, logger="agent_input.es_output"):
            assert check_cluster(_output(es.url, tmp_path).client) == "8.17.2"
        assert "Elasticsearch 8.17.2 is older than 8.18" in caplog.text
    finally:
        es.close()


@pytest.mark.parametrize("version", ["8.18.0", "9.0.0", "9.3.1"])
def test_a_supported_version_is_not_warned_about(tmp_path, caplog, version):
    """8.18 up to every 9.x are the versions tested: none is said to be too old or too new."""
    es = FakeElasticsearch(version, auth=AUTH)
    try:
        with caplog.at_level(logging.WARNING, logger="agent_input.es_output"):
            assert check_cluster(_output(es.url, tmp_path).client) == version
        assert not [r.getMessage() for r in caplog.records if r.name == "agent_input.es_output"]
    finally:
        es.close()

@pytest.mark.parametrize("status, location, shown", [
    (301, "https://es.example:9200/", "https://es.example:9200/"),
    # any 3xx; a Location's user info is not echoed, nor a long one whole
    (300, "https://proxy-user:proxy-pw@es.example/" + "p" * 300, "https://***@es.example/" + "p" * 177),
])
def test_a_url_that_redirects_says_so_and_where_not_none(tmp_path, status, location, shown):
    """A proxy in front of the cluster redirecting http:// to https:// (301 with a Location, no
    body): the client does not follow it, and the line read "Elasticsearch answered 301: None"."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(OutputError) as refused:
            check_cluster(make_client(url, env=ENV))
        assert str(refused.value) == (f"Elasticsearch at {url} answered {status}, a redirect to {shown}, "
                                      "which the client does not follow: give the URL it redirects to"), str(refused.value)
    finally:
        server.shutdown()
        server.server_close()

def test_sigterm_while_the_cluster_sits_on_the_first_request_exits_at_once(simulator, tmp_path):
    """`collect --output elasticsearch` asks the cluster `GET /` before it starts; a cluster (or a
    proxy in front of it) that takes the connection and never answers held a SIGTERM for the whole
    request timeout (60 s): nothing is collected yet, so the stop can end the wait at once."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"url": simulator.base_url, "api_key": ADMIN_KEY}))
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}
    env["ELASTIC_API_KEY"] = "ZXM6c2VjcmV0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--state-dir", str(tmp_path / "state"),
         "--output", "elasticsearch", "--es-url", f"http://127.0.0.1:{listener.getsockname()[1]}", "--now", str(T0)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    conn = None
    try:
        listener.settimeout(30)
        conn, _ = listener.accept()  # taken, never answered
        conn.settimeout(30)
        request = b""
        while b"\r\n\r\n" not in request:  # the whole request is in: it waits for the answer now
            chunk = conn.recv(65536)
            assert chunk, "the collector closed the connection before its request was whole"
            request += chunk
        assert request.startswith(b"GET / "), request[:200]
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - started
    finally:
        if conn is not None:
            conn.close()
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert took < 5.0, f"the stop waited {took:.1f} s for Elasticsearch's answer"

def test_unreachable_cluster_is_one_clear_line(tmp_path):
    client = make_client("http://user:pw-in-url@127.0.0.1:9/es", env=ENV)
    with pytest.raises(OutputError, match="cannot reach Elasticsearch at http://127.0.0.1:9/es: ") as refused:
        check_cluster(client)
    assert "pw-in-url" not in str(refused.value)
    out = ElasticsearchOutput(client, state_dir=tmp_path, initial_backoff=0.01, max_backoff=0.01, attempts=2)
    with pytest.raises(OutputError, match="did not take"):
        out.send("completions", _payload([_doc(1)]), 1, Acks())


def test_a_whole_request_408_is_retried_like_429_and_5xx_and_nothing_is_dead_lettered(fake, tmp_path):
    out = _output(fake.url, tmp_path)
    fake.fail_requests = [408, 408]
    ack = Acks()
    out.send("completions", _payload([_doc(i) for i in range(3)]), 3, ack)
    assert ack.n == 1 and len(fake.docs) == 3 and out.created == 3 and out.rejected == 0
    assert not (tmp_path / "dead-letter.ndjson").exists()


def _with_items(change):
    return lambda answer: {**answer, "items": change(answer["items"])}


def _each_result(change):
    return _with_items(lambda items: [{op: change(result) for op, result in item.items()} for item in items])


@pytest.mark.parametrize("mangle, says", [
    (lambda answer: {"took": 1, "errors": False}, "the bulk answer has no `items`"),
    (_with_items(lambda items: items[:1]), "the bulk answer lists 1 item for 3 documents"),
    (_with_items(lambda items: items + items[:2]), "the bulk answer lists 5 items for 3 documents"),
    (_with_items(lambda items: None), "the bulk answer's `items` is null, not a list"),
    (_with_items(lambda items: [1, 2, 3]), "item 1 of the bulk answer is not an {operation: result} object"),
    (_with_items(lambda items: [{} for _ in items]), "item 1 of the bulk answer is not an {operation: result} object"),
    (_each_result(lambda result: {**result, "status": str(result["status"])}),
     "item 1 of the bulk answer has no numeric `status`"),
    (_each_result(lambda result: {k: v for k, v in result.items() if k != "status"}),
     "item 1 of the bulk answer has no numeric `status`"),
    (_each_result(lambda result: {**result, "_id": "zzz" + result["_id"]}),
     "the bulk answer names documents that were not sent (_id 'zzzopenai.completions-0000')"),
    (lambda answer: [1, 2], "the bulk answer is a list, not a JSON object"),
    (lambda answer: b"<html><body>hello</body></html>", "the bulk answer is not valid JSON"),
])
def test_a_malformed_bulk_answer_is_a_plain_reason_and_the_batch_is_kept(fake, tmp_path, mangle, says):
    """A proxy or a broken cluster answering 200 with something else than a bulk answer used to be
    reported as "(KeyError: 'items')", "(TypeError: ...)" or "()" (fewer items, unknown ids)."""
    out = _output(fake.url, tmp_path, max_retries=0, attempts=2)
    fake.mangle = mangle
    docs = [_doc(i) for i in range(3)]
    ack = Acks()
    with pytest.raises(OutputError) as info:
        out.send("completions", _payload(docs), 3, ack)
    message = str(info.value)
    assert f"after 2 attempts ({says}); they stay in the outbox" in message, message
    assert "Error" not in message and "\n" not in message
    assert ack.n == 0 and out.rejected == 0 and not (tmp_path / "dead-letter.ndjson").exists()
    fake.mangle = None  # a proper answer again: the kept batch is settled
    out.send("completions", _payload(docs), 3, ack)
    assert ack.n == 1 and len(fake.docs) == 3 and out.rejected == 0


def test_documents_a_bulk_answer_leaves_out_are_named_with_any_client(tmp_path):
    """The shape is checked by make_client's transport; with another client, documents missing
    from the answer are still a plain reason, not "()"."""
    import elasticsearch

    es = FakeElasticsearch(elasticsearch.__versionstr__.split(".")[0] + ".0.0", auth=AUTH)
    try:
        out = ElasticsearchOutput(elasticsearch.Elasticsearch(es.url, api_key=API_KEY), state_dir=tmp_path,
                                  max_retries=0, attempts=2, initial_backoff=0.01)
        es.mangle = _with_items(lambda items: items[:1])
        with pytest.raises(OutputError, match=r"not take 1 of 3 .*\(the bulk answer has no item for 1 of 2 documents\); they"):
            out.send("completions", _payload([_doc(i) for i in range(3)]), 3, Acks())
    finally:
        es.close()


# -- whole-request refusals: nothing reached Elasticsearch, so nothing is dead-lettered ---------------
@pytest.mark.parametrize("status", [400, 401, 403, 404, 405])
def test_a_refused_bulk_request_stops_with_status_and_url_and_keeps_the_batch(fake, tmp_path, status):
    out = _output(fake.url, tmp_path)
    fake.fail_requests = [status]
    payload = _payload([_doc(i) for i in range(3)])
    ack = Acks()
    with pytest.raises(OutputError, match=rf"HTTP {status} from {re.escape(fake.url)}/_bulk.*outbox"):
        out.send("completions", payload, 3, ack)
    assert ack.n == 0 and out.rejected == 0 and not fake.docs
    assert not (tmp_path / "dead-letter.ndjson").exists()
    assert len([r for r in fake.requests if r["path"].startswith("/_bulk")]) == 1, "a configuration problem is not retried"
    out.send("completions", payload, 3, ack)  # fixed (URL, proxy, key): the batch, still in the outbox, goes through
    assert ack.n == 1 and len(fake.docs) == 3


def test_a_whole_request_413_is_split_into_smaller_requests_and_nothing_is_dead_lettered(fake, tmp_path):
    out = _output(fake.url, tmp_path)
    fake.fail_requests = [413]
    ack = Acks()
    out.send("completions", _payload([_doc(i) for i in range(3)]), 3, ack)
    assert ack.n == 1 and len(fake.docs) == 3 and out.rejected == 0
    assert not (tmp_path / "dead-letter.ndjson").exists()
    assert len([r for r in fake.requests if r["path"].startswith("/_bulk")]) == 3  # 3 refused, then 2 and 1


def test_a_passing_failure_while_splitting_a_413_is_retried_not_taken_for_a_limit_below_every_document(
        fake, tmp_path):
    """Two documents refused alone (413) while the only other request met a 503: nothing was judged,
    so the limit is not known to be below ordinary documents; the batch is retried, not the output
    stopped with 'refused even single documents'."""
    out = _output(fake.url, tmp_path)
    # 3 documents refused (413), then 2 of them (413) and the third (503), then each of the 2 alone
    fake.fail_requests = [413, 413, 503, 413, 413]
    ack = Acks()
    out.send("completions", _payload([_doc(i) for i in range(3)]), 3, ack)
    assert ack.n == 1 and len(fake.docs) == 3 and out.rejected == 0
    assert not (tmp_path / "dead-letter.ndjson").exists()

def test_a_proxy_body_limit_splits_down_to_one_document_and_dead_letters_only_one_too_large_alone(fake, tmp_path):
    fake.max_body_bytes = 1500  # about four documents; the proxy answers 413 with an HTML page
    out = _output(fake.url, tmp_path)
    big = _doc(99, blob="x" * 4000)
    docs = [_doc(i) for i in range(20)]
    ack = Acks()
    out.send("completions", _payload(docs[:10] + [big] + docs[10:]), 21, ack)
    assert ack.n == 1 and len(fake.docs) == 20 and out.created == 20 and out.rejected == 1
    assert big[0] not in {i for _idx, i in fake.docs} and not fake.violations
    dead = [json.loads(line) for line in (tmp_path / "dead-letter.ndjson").read_text().splitlines()]
    assert [d["_id"] for d in dead] == [big[0]] and dead[0]["status"] == 413
    assert "too large" in dead[0]["error"] and dead[0]["document"] == big[1]
    assert len([r for r in fake.requests if r["path"].startswith("/_bulk")]) < 30


def test_a_limit_below_every_document_stops_with_the_batch_kept_instead_of_dead_lettering_it(fake, tmp_path):
    """A proxy that refuses even one ordinary document is a setting to fix: dead-lettering every
    document of every batch would empty the outbox into the dead-letter file."""
    fake.max_body_bytes = 50
    out = _output(fake.url, tmp_path)
    ack = Acks()
    with pytest.raises(OutputError, match="refused even single documents as too large"):
        out.send("completions", _payload([_doc(i) for i in range(500)]), 500, ack)
    assert ack.n == 0 and out.rejected == 0 and not (tmp_path / "dead-letter.ndjson").exists()
    assert len([r for r in fake.requests if r["path"].startswith("/_bulk")]) < 30  # not each document alone
    fake.max_body_bytes = 0  # the limit raised: the kept batch goes through
    out.send("completions", _payload([_doc(i) for i in range(500)]), 500, ack)
    assert ack.n == 1 and len(fake.docs) == 500


def test_per_item_failures_count_as_getting_through_when_one_document_is_too_large(fake, tmp_path):
    """Documents answered with a 503 each reached Elasticsearch: the limit is not below them, so the
    one document refused alone is dead-lettered and the others retried, not the output stopped."""
    fake.max_body_bytes = 1500
    out = _output(fake.url, tmp_path, max_retries=1)
    docs = [_doc(i) for i in range(20)]
    fake.item_faults = {d[0]: [503] * 3 for d in docs}
    big = _doc(99, blob="x" * 4000)
    ack = Acks()
    out.send("completions", _payload(docs + [big]), 21, ack)
    assert ack.n == 1 and len(fake.docs) == 20 and out.rejected == 1


# -- permanent rejections ---------------------------------------------------------------------------
def _send_one_bad_of_three(fake, tmp_path):
    """A batch of three documents whose second has a mapping conflict, sent with ECS logs captured:
    (output, docs, acks, the log text)."""
    from agent_input.logs import setup_logging

    buf = io.StringIO()
    setup_logging("INFO", "ecs", stream=buf)
    out = _output(fake.url, tmp_path)
    docs = [_doc(1), _doc(2, bad="not-a-number"), _doc(3)]
    fake.reject = lambda src: ({"type": "document_parsing_exception",
                                "reason": "[1:2] failed to parse field [bad] of type [long]"}
                               if "bad" in src else None)
    ack = Acks()
    out.send("completions", _payload(docs), 3, ack)
    return out, docs, ack, buf.getvalue()


def test_a_mapping_error_is_dead_lettered_with_id_and_dataset_and_the_rest_delivered(fake, tmp_path):
    out, docs, ack, logged = _send_one_bad_of_three(fake, tmp_path)
    assert ack.n == 1, "a permanently rejected document must not block the batch"
    assert len(fake.docs) == 2 and out.rejected == 1
    dead = [json.loads(line) for line in (tmp_path / "dead-letter.ndjson").read_text().splitlines()]
    assert len(dead) == 1
    assert dead[0]["_id"] == docs[1][0] and dead[0]["dataset"] == "openai.completions"
    assert dead[0]["_index"] == "logs-openai.completions-default"
    assert dead[0]["error"]["type"] == "document_parsing_exception"
    assert dead[0]["document"] == docs[1][1]
    assert docs[1][0] in logged and "openai.completions" in logged and "document_parsing_exception" in logged


def test_documents_rejected_alike_are_one_error_line_per_batch_with_a_count(fake, tmp_path):
    """A mapping conflict on every document of a dataset lasts until someone fixes the template:
    one ERROR line per rejected document per batch buried every other line of the log (241 lines
    per completions batch of the simulator's small organization). Documents rejected for the same
    cause are one line per batch, with their count and the first ids; each still has its record."""
    from agent_input.logs import setup_logging

    buf = io.StringIO()
    setup_logging("INFO", "ecs", stream=buf)
    out = _output(fake.url, tmp_path)
    docs = [_doc(i, bad="x") for i in range(40)] + [_doc(i, "openai.embeddings", other="y") for i in range(3)]
    fake.reject = lambda src: ({"type": "document_parsing_exception", "reason": "failed to parse field [bad]"}
                               if "bad" in src else
                               {"type": "strict_dynamic_mapping_exception", "reason": "[other] not allowed"}
                               if "other" in src else None)
    ack = Acks()
    out.send("completions", _payload(docs), len(docs), ack)
    assert ack.n == 1 and out.rejected == 43
    assert len((tmp_path / "dead-letter.ndjson").read_text().splitlines()) == 43
    errors = [json.loads(line)["message"] for line in buf.getvalue().splitlines() if '"log.level":"error"' in line]
    assert len(errors) == 2, errors
    parsing = next(e for e in errors if "document_parsing_exception" in e)
    assert "40 openai.completions documents" in parsing and docs[0][0] in parsing and docs[39][0] not in parsing
    assert docs[2][0] in parsing and docs[3][0] not in parsing  # the first three ids
    assert "1 openai.embeddings" not in errors[1] and "3 openai.embeddings documents" in errors[1]


def test_the_dead_letter_file_is_bounded_when_a_dataset_is_rejected_for_days(fake, tmp_path, caplog):
    """A mapping conflict on every document of one dataset, left for days, added each of its
    documents (about 1.5 KB each) to dead-letter.ndjson for ever: the state directory's disk filled.
    Once it has reached `dead_letter_max_bytes` the file is moved to dead-letter.ndjson.1 (the older
    one goes), with a WARNING, so each holds at most the cap and a batch's records, whole."""
    import logging

    out = _output(fake.url, tmp_path, dead_letter_max_bytes=4000)
    fake.reject = lambda src: {"type": "document_parsing_exception", "reason": "bad"} if "bad" in src else None
    ack = Acks()
    with caplog.at_level(logging.WARNING, logger="agent_input.es_output"):
        for batch in range(20):
            docs = [_doc(batch * 10 + i, bad="x" * 100) for i in range(5)]
            out.send("completions", _payload(docs), len(docs), ack)
    assert ack.n == 20 and out.rejected == 100
    current, older = tmp_path / "dead-letter.ndjson", tmp_path / "dead-letter.ndjson.1"
    batch_bytes = len(current.read_text().splitlines()[0]) * 5 + 100  # the file reaches the cap, then one batch more
    assert current.stat().st_size < 4000 + batch_bytes and older.stat().st_size < 4000 + batch_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dead-letter.ndjson", "dead-letter.ndjson.1"]
    for path in (current, older):
        assert all(json.loads(line)["status"] == 400 for line in path.read_text().splitlines())
    last = json.loads(current.read_text().splitlines()[-1])
    assert last["_id"] == _doc(194)[0], "the newest records are kept"
    assert any("dead-letter.ndjson.1" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_document_kept_in_a_failure_store_is_said_and_counted_not_taken_as_created(fake, tmp_path):
    """Elasticsearch 9.2+ turns the failure store on for new logs-*-* data streams: a document
    with a mapping conflict is answered 201 with "failure_store": "used" and kept in
    `<data stream>::failures`, outside every dashboard's sums. Before, it was counted as created
    and nothing said so: the totals came out low in silence."""
    fake.failure_store = True
    out, docs, ack, logged = _send_one_bad_of_three(fake, tmp_path)
    assert ack.n == 1 and len(fake.docs) == 2 and len(fake.failures) == 1
    assert (out.created, out.failure_stored, out.rejected) == (2, 1, 0)
    assert not (tmp_path / "dead-letter.ndjson").exists(), "Elasticsearch keeps it: no second copy"
    warnings = [line for line in logged.splitlines() if "failure store" in line]
    assert len(warnings) == 1 and '"log.level":"warn' in warnings[0].replace(" ", ""), warnings
    assert docs[1][0] in warnings[0] and "logs-openai.completions-default::failures" in warnings[0]


def test_a_batch_with_documents_both_in_a_failure_store_and_rejected_dead_letters_the_rejected(fake, tmp_path):
    """A batch whose answer mixes a document kept in a failure store and one rejected for good
    (its target has no failure store: here the fake's index outside `logs-*-*`): the rejected one
    is still written to the dead-letter file before the batch is acknowledged."""
    fake.failure_store = True
    out = _output(fake.url, tmp_path)
    fake.reject = lambda src: {"type": "document_parsing_exception", "reason": "bad"} if "bad" in src else None
    docs = [_doc(1, bad="x"), _doc(2, namespace="no-store", bad="x"), _doc(3)]
    ack = Acks()
    out.send("completions", _payload(docs), 3, ack)
    assert ack.n == 1 and (out.failure_stored, out.rejected) == (1, 1)
    dead = [json.loads(line) for line in (tmp_path / "dead-letter.ndjson").read_text().splitlines()]
    assert [d["_id"] for d in dead] == [docs[1][0]]

def test_a_dead_letter_record_is_fsynced_before_the_batch_is_acknowledged(fake, tmp_path, monkeypatch):
    """The acknowledgement removes the batch from the outbox: the rejected document's only copy is
    then its dead-letter record, which must be on disk first."""
    import agent_input.es_output as es_mod

    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        return real_fsync(fd)

    monkeypatch.setattr(es_mod.os, "fsync", fsync)
    out = _output(fake.url, tmp_path)
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"} if "bad" in src else None
    out.send("completions", _payload([_doc(1), _doc(2, bad="x")]), 2, lambda: events.append("ack"))
    dead = str(tmp_path / "dead-letter.ndjson")
    assert events == [f"fsync {dead}", f"fsync {tmp_path}", "ack"], events  # its creation too
    out.send("completions", _payload([_doc(3, bad="x")]), 1, lambda: events.append("ack"))
    assert events[3:] == [f"fsync {dead}", "ack"], events  # appended to: the folder has its name


def test_a_dead_letter_file_made_again_after_its_rotation_has_its_name_fsynced_before_the_ack(
        fake, tmp_path, monkeypatch):
    """Once the file reached its cap it is moved to dead-letter.ndjson.1 and the next batch's records
    go to a new dead-letter.ndjson: the records were fsynced, but not the folder that names the new
    file, so a power loss could leave no file at all while the batch was acknowledged (gone from
    the outbox): the rejected documents' only copy lost, at every rotation."""
    import agent_input.es_output as es_mod

    events: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(es_mod.os, "fsync", lambda fd: events.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    out = _output(fake.url, tmp_path, dead_letter_max_bytes=100)
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"} if "bad" in src else None
    out.send("completions", _payload([_doc(1, bad="x")]), 1, lambda: events.append("ack"))
    events.clear()
    out.send("completions", _payload([_doc(2, bad="x")]), 1, lambda: events.append("ack"))
    assert (tmp_path / "dead-letter.ndjson.1").exists()
    dead = str(tmp_path / "dead-letter.ndjson")
    # the rename's folder fsync, the records', then the new file's name, and only then the ack
    assert events == [str(tmp_path), dead, str(tmp_path), "ack"], events

def test_a_dead_letter_file_whose_first_append_failed_has_its_name_fsynced_at_the_retry(fake, tmp_path, monkeypatch):
    """The folder's fsync (or the records' write, a full disk) failing at the append that created
    the file: the batch is not acknowledged and the file is cut back, empty but there. The retry
    found it there (no O_EXCL creation) and acknowledged the batch without fsyncing the folder:
    its name was never made durable, and a power loss could take the rejected documents' only copy."""
    import errno

    import agent_input.es_output as es_mod
    from agent_input.outputs import OutputError

    events: list[str] = []
    fail = [True]

    def fsync_dir(d):
        if fail.pop() if fail else False:
            raise OSError(errno.EIO, "Input/output error")
        events.append(f"fsync_dir {d}")

    monkeypatch.setattr(es_mod, "fsync_dir", fsync_dir)
    out = _output(fake.url, tmp_path)
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"} if "bad" in src else None
    with pytest.raises(OutputError):
        out.send("completions", _payload([_doc(1, bad="x")]), 1, lambda: events.append("ack"))
    assert events == [] and (tmp_path / "dead-letter.ndjson").read_bytes() == b""  # cut back, not acknowledged
    out.send("completions", _payload([_doc(1, bad="x")]), 1, lambda: events.append("ack"))
    assert events == [f"fsync_dir {tmp_path}", "ack"], events
    assert len((tmp_path / "dead-letter.ndjson").read_text().splitlines()) == 1  # written once


def test_a_batchs_dead_letter_records_are_one_write_and_one_fsync(fake, tmp_path, monkeypatch):
    """Each record was opened, checked for a crash's fragment, written and fsynced on its own: a
    completions batch of 5,000 documents rejected alike (a mapping conflict) cost 5,000 fsyncs
    (2 s on this machine's disk, tens of seconds on a slow one) before the stream could go on, in
    every batch for as long as the conflict lasted. The batch's records are one append and one
    fsync, all or nothing: a write that fails part way leaves none of them."""
    import agent_input.es_output as es_mod

    fsyncs: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(es_mod.os, "fsync", lambda fd: fsyncs.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    out = _output(fake.url, tmp_path)
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"} if "bad" in src else None
    docs = [_doc(i, bad="x") for i in range(50)] + [_doc(50)]
    ack = Acks()
    out.send("completions", _payload(docs), len(docs), ack)
    assert ack.n == 1 and out.rejected == 50
    assert fsyncs == [str(tmp_path / "dead-letter.ndjson"), str(tmp_path)], len(fsyncs)  # (and its creation)
    assert [json.loads(line)["_id"] for line in (tmp_path / "dead-letter.ndjson").read_text().splitlines()] == \
        [d[0] for d in docs[:50]]


def test_an_unwritable_dead_letter_file_keeps_the_batch(fake, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "dead-letter.ndjson").mkdir()  # a directory where the file should be
    out = _output(fake.url, tmp_path / "ro")
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"}
    ack = Acks()
    with pytest.raises(OutputError, match="cannot be written"):
        out.send("completions", _payload([_doc(1)]), 1, ack)
    assert ack.n == 0


@pytest.mark.parametrize("make, why", [
    # failed on its first seek, an io.UnsupportedOperation without strerror: "...: None"
    (os.mkfifo, "it is not a regular file (a FIFO or a device)"),
    (os.mkdir, "Is a directory"),
])
def test_a_dead_letter_path_that_is_not_a_file_says_why_and_keeps_the_batch(fake, tmp_path, make, why):
    make(tmp_path / "dead-letter.ndjson")
    out = _output(fake.url, tmp_path)
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"}
    ack = Acks()
    with pytest.raises(OutputError) as info:
        out.send("completions", _payload([_doc(1)]), 1, ack)
    assert ack.n == 0
    assert str(info.value).endswith(f"cannot be written to {tmp_path / 'dead-letter.ndjson'}: {why}; "
                                    "the batch stays in the outbox"), str(info.value)


def test_a_tls_error_without_a_cause_is_described_without_none():
    from elastic_transport import TlsError

    from agent_input.es_output import _describe_exc

    assert _describe_exc(TlsError("TLS error")) == "TlsError: TLS error"


def test_a_dead_letter_write_that_fails_part_way_is_cut_back_and_the_batch_kept(fake, tmp_path, monkeypatch):
    """A full disk (or a file-size limit) may take part of a record before failing: the fragment
    must not stay, or the record appended at the retry is glued onto it and both are unreadable."""
    out = _output(fake.url, tmp_path)
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"} if "bad" in src else None
    first, second = _doc(1, bad=1), _doc(2, bad="x" * 3000)
    out.send("completions", _payload([first]), 1, Acks())
    real_write = os.write

    def half_then_full(fd, data):
        if second[0].encode() in bytes(data):
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(27, "File too large")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    ack = Acks()
    with pytest.raises(OutputError, match=rf"{second[0]}.*cannot be written.*File too large.*stays in the outbox"):
        out.send("completions", _payload([second]), 1, ack)
    monkeypatch.setattr(os, "write", real_write)
    assert ack.n == 0
    dead_letter = tmp_path / "dead-letter.ndjson"
    assert [json.loads(line)["_id"] for line in dead_letter.read_bytes().splitlines()] == [first[0]]
    out.send("completions", _payload([second]), 1, ack)  # space again: the kept batch is dead-lettered whole
    assert ack.n == 1
    dead = [json.loads(line) for line in dead_letter.read_bytes().splitlines()]
    assert [d["_id"] for d in dead] == [first[0], second[0]] and dead[1]["document"] == second[1]


def test_a_partial_dead_letter_line_left_by_a_crash_is_cut_back_before_the_next_record(fake, tmp_path):
    out = _output(fake.url, tmp_path)
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"}
    out.send("completions", _payload([_doc(1)]), 1, Acks())
    dead_letter = tmp_path / "dead-letter.ndjson"
    whole = dead_letter.read_bytes()
    with open(dead_letter, "ab") as fh:  # what a SIGKILL in the middle of a write leaves
        fh.write(whole[:-40])
    out.send("completions", _payload([_doc(2)]), 1, Acks())
    dead = [json.loads(line) for line in dead_letter.read_bytes().splitlines()]
    assert [d["_id"] for d in dead] == [_doc(1)[0], _doc(2)[0]]



def test_a_dead_letter_file_of_exactly_the_cap_is_moved_before_the_next_batch(fake, tmp_path):
    """`dead_letter_max_bytes` is where the file is full: one that has reached it (not only gone
    past it) is moved to dead-letter.ndjson.1 before the next batch's records."""
    out = _output(fake.url, tmp_path)
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"} if "bad" in src else None
    out.send("completions", _payload([_doc(1, bad="x")]), 1, Acks())
    current = tmp_path / "dead-letter.ndjson"
    out.dead_letter_max_bytes = current.stat().st_size  # exactly at the cap
    out.send("completions", _payload([_doc(2, bad="x")]), 1, Acks())
    older = tmp_path / "dead-letter.ndjson.1"
    assert [json.loads(line)["_id"] for line in older.read_text().splitlines()] == [_doc(1)[0]]
    assert [json.loads(line)["_id"] for line in current.read_text().splitlines()] == [_doc(2)[0]]


def test_a_crash_s_fragment_is_cut_back_before_the_dead_letter_file_is_moved(fake, tmp_path):
    """A record half written by a crash at the end of a full file is cut back before the file is
    moved to dead-letter.ndjson.1: that file, too, only ever holds whole records (its batch was
    never acknowledged and dead-letters its documents again into the new file)."""
    out = _output(fake.url, tmp_path, dead_letter_max_bytes=100)
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"} if "bad" in src else None
    out.send("completions", _payload([_doc(1, bad="x")]), 1, Acks())
    current = tmp_path / "dead-letter.ndjson"
    whole = current.read_bytes()
    with open(current, "ab") as fh:  # what a SIGKILL in the middle of a write leaves
        fh.write(whole[:-40])
    out.send("completions", _payload([_doc(2, bad="x")]), 1, Acks())
    older = (tmp_path / "dead-letter.ndjson.1").read_bytes()
    assert older == whole, "the fragment went along into dead-letter.ndjson.1"
    assert [json.loads(line)["_id"] for line in current.read_text().splitlines()] == [_doc(2)[0]]


def test_a_large_batch_s_dead_letter_records_are_written_in_slices_not_one_write_each(fake, tmp_path, monkeypatch):
    """A batch's records are written in slices of about 1 MiB: neither joined whole (a batch can
    hold 138 MB) nor one write per record once the first slice is written."""
    import agent_input.es_output as es_mod

    writes: list[int] = []
    real_write_all = es_mod.write_all
    monkeypatch.setattr(es_mod, "write_all", lambda fd, data: writes.append(len(data)) or real_write_all(fd, data))
    out = _output(fake.url, tmp_path)
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"} if "bad" in src else None
    docs = [_doc(i, bad="x" * 20_000) for i in range(150)]  # about 3 MB of records
    ack = Acks()
    out.send("completions", _payload(docs), len(docs), ack)
    assert ack.n == 1 and out.rejected == 150
    total = (tmp_path / "dead-letter.ndjson").stat().st_size
    assert sum(writes) == total and 2 <= len(writes) <= total // es_mod._WRITE_BYTES + 1, writes
    assert max(writes) < es_mod._WRITE_BYTES + 30_000


def test_a_batch_whose_dead_letter_write_fails_says_how_many_documents_it_holds_back(fake, tmp_path):
    """The error names the first rejected document and how many others the batch holds back."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "dead-letter.ndjson").mkdir()  # a directory where the file should be
    out = _output(fake.url, tmp_path / "ro")
    fake.reject = lambda src: {"type": "mapper_parsing_exception", "reason": "nope"}
    with pytest.raises(OutputError, match=rf"{_doc(1)[0]} \(mapper_parsing_exception: nope\) and 2 other "
                                          r"document\(s\) and they cannot be written"):
        out.send("completions", _payload([_doc(1), _doc(2), _doc(3)]), 3, Acks())


# -- auth -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("password", ["s3cret-pass-word", "pässwörd-€-пароль"])
def test_basic_auth_and_wrong_credentials(tmp_path, password):
    """A password with any character works: encoded as UTF-8, as Elasticsearch (and curl, and the
    asset installer) do; the client's own (user, password) encoding is ASCII-only."""
    from agent_input.logs import registered_secrets

    user = "elastic"
    es = FakeElasticsearch("9.1.0", auth="Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        good = make_client(es.url, env={"ELASTIC_USERNAME": user, "ELASTIC_PASSWORD": password})
        assert check_cluster(good) == "9.1.0"
        assert base64.b64encode(f"{user}:{password}".encode()).decode() in registered_secrets()
        bad = make_client(es.url, env={"ELASTIC_USERNAME": user, "ELASTIC_PASSWORD": "wrong-password"})
        with pytest.raises(OutputError, match=r"refused the credentials \(401\)"):
            check_cluster(bad)
        out = ElasticsearchOutput(bad, state_dir=tmp_path)
        with pytest.raises(OutputError, match="refused the credentials"):
            out.send("completions", _payload([_doc(1)]), 1, Acks())
        with pytest.raises(OutputError, match="set both"):
            make_client(es.url, env={"ELASTIC_USERNAME": user})
    finally:
        es.close()


def test_credentials_in_the_url_are_used_and_not_called_missing(caplog):
    """`--es-url https://user:password@host` authenticates (the client sends the URL's user and
    password), yet the output warned 'no Elasticsearch credentials: sending requests without auth'."""
    import logging

    user, password = "elastic", "url-pass-word"
    es = FakeElasticsearch("9.1.0", auth="Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        url = es.url.replace("http://", f"http://{user}:{password}@")
        with caplog.at_level(logging.WARNING, logger="agent_input.es_output"):
            client = make_client(url, env={})
        assert check_cluster(client) == "9.1.0"
        assert not any("without auth" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="agent_input.es_output"):
            make_client(es.url, env={})
        assert any("without auth" in r.getMessage() for r in caplog.records)
    finally:
        es.close()


@pytest.mark.parametrize("env, says", [
    ({"ELASTIC_API_KEY": "c2VjcmV0LWtleS1k\nby1ub3QtcHJpbnQ="}, "ELASTIC_API_KEY contains a line break"),
    ({"ELASTIC_API_KEY": "c2VjcmV0LWtleS1k by1ub3QtcHJpbnQ="}, "ELASTIC_API_KEY contains a space"),
    ({"ELASTIC_API_KEY": "c2VjcmV0LWtleS1k\x01by1ub3QtcHJpbnQ="}, "ELASTIC_API_KEY contains a control character"),
    ({"ELASTIC_API_KEY": "c2VjcmV0LWtleS1k…"}, "ELASTIC_API_KEY contains a non-ASCII character"),
    ({"ELASTIC_USERNAME": "elastic", "ELASTIC_PASSWORD": "c2VjcmV0LWtleS1k\nsecond-line"},
     "ELASTIC_PASSWORD contains a line break"),
    ({"ELASTIC_USERNAME": "ela:stic", "ELASTIC_PASSWORD": "c2VjcmV0LWtleS1k"}, "ELASTIC_USERNAME contains a colon"),
])
def test_a_credential_unusable_in_a_header_is_refused_without_showing_it(env, says):
    """A key pasted with a line break (wrapped, or two keys) used to reach the HTTP library, whose
    error quoted the header with the key in it, escaped where redaction could not find it."""
    with pytest.raises(OutputError) as info:
        make_client("http://127.0.0.1:9", env=env)
    assert str(info.value).startswith(says)
    assert "c2VjcmV0LWtleS1k" not in str(info.value) and "second-line" not in str(info.value)


def test_credentials_are_never_logged(fake, tmp_path):
    from agent_input.logs import redact, setup_logging

    buf = io.StringIO()
    setup_logging("DEBUG", "ecs", stream=buf)
    password = "pw-" + uuid.uuid4().hex
    make_client(fake.url, env={"ELASTIC_USERNAME": "u", "ELASTIC_PASSWORD": password})
    out = _output(fake.url, tmp_path)
    out.send("completions", _payload([_doc(1)]), 1, Acks())
    import logging

    logging.getLogger("agent_input.test").error("leak? %s %s", API_KEY, password)
    text = buf.getvalue()
    assert API_KEY not in text and password not in text
    assert redact(f"x {API_KEY} y") == "x *** y"


def test_cloud_id_sets_the_host(tmp_path):
    cloud_id = "deploy:" + base64.b64encode(b"eu-west-1.aws.found.io:443$abcdef$ghijkl").decode()
    client = make_client(None, cloud_id=cloud_id, env=ENV)
    node = next(iter(client.transport.node_pool.all()))
    assert node.config.host == "abcdef.eu-west-1.aws.found.io" and node.config.scheme == "https"
    with pytest.raises(OutputError, match="needs --es-url"):
        make_client(None, env={})


def test_an_explicit_url_wins_over_the_elastic_cloud_id_variable():
    """ELASTIC_CLOUD_ID in the environment (set for other Elastic tools) only stands in for a
    missing URL: it never sends the events to another cluster than --es-url / es_url names."""
    cloud_id = "deploy:" + base64.b64encode(b"eu-west-1.aws.found.io:443$abcdef$ghijkl").decode()
    client = make_client("http://127.0.0.1:9200", env={**ENV, "ELASTIC_CLOUD_ID": cloud_id})
    node = next(iter(client.transport.node_pool.all()))
    assert (node.config.host, node.config.port, node.config.scheme) == ("127.0.0.1", 9200, "http")
    client = make_client(None, env={**ENV, "ELASTIC_CLOUD_ID": cloud_id})
    assert next(iter(client.transport.node_pool.all())).config.host == "abcdef.eu-west-1.aws.found.io"


# -- TLS --------------------------------------------------------------------------------------------
@pytest.fixture
def tls_files(tmp_path):
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run = lambda *a: subprocess.run(["openssl", *map(str, a)], check=True, capture_output=True)  # noqa: E731
    try:
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
            "-subj", "/CN=test-ca")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
        run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
            "-days", "2", "-extfile", ext)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make test certificates here: {exc}")
    return ca, cert, key


def test_tls_verification_is_on_by_default_and_a_ca_file_is_honoured(tls_files, tmp_path):
    ca, cert, key = tls_files
    es = FakeElasticsearch("9.1.0", auth=AUTH, certfile=str(cert), keyfile=str(key))
    try:
        with pytest.raises(OutputError, match="cannot reach Elasticsearch.*(certificate|SSL|TLS)"):
            check_cluster(make_client(es.url, env=ENV))
        client = make_client(es.url, ca_file=str(ca), env=ENV)
        assert check_cluster(client) == "9.1.0"
        assert check_cluster(make_client(es.url, verify=False, env=ENV)) == "9.1.0"
        with pytest.raises(OutputError, match="not a readable file"):
            make_client(es.url, ca_file=str(tmp_path / "missing.pem"), env=ENV)
    finally:
        es.close()


def test_a_tls_failure_says_why_and_what_to_give_not_only_tls_error(tls_files, tmp_path):
    """A cluster with a certificate of its own CA (Elasticsearch 8's default security) and no
    --es-ca-file, or a CA file that holds no certificate: both said only "cannot reach
    Elasticsearch at ...: TlsError: TLS error", the cause left in the exception's __cause__."""
    ca, cert, key = tls_files
    es = FakeElasticsearch("9.1.0", auth=AUTH, certfile=str(cert), keyfile=str(key))
    try:
        with pytest.raises(OutputError) as unverified:
            check_cluster(make_client(es.url, env=ENV))
        assert "CERTIFICATE_VERIFY_FAILED" in str(unverified.value), str(unverified.value)
        assert str(unverified.value).endswith("give --es-ca-file (or es_ssl_ca_file) the CA that signed the "
                                              "cluster's certificate"), str(unverified.value)
        not_a_ca = tmp_path / "not-a-ca.pem"
        not_a_ca.write_text("not a certificate\n")
        with pytest.raises(OutputError) as unread:
            check_cluster(make_client(es.url, ca_file=str(not_a_ca), env=ENV))
        assert "no certificate or crl found" in str(unread.value), str(unread.value)
        assert "give --es-ca-file" not in str(unread.value)  # its CA file is the problem, not a missing one
    finally:
        es.close()


# -- backpressure -----------------------------------------------------------------------------------
def test_bounded_requests_and_concurrency_when_the_cluster_is_slow(fake, tmp_path):
    fake.delay = 0.05
    out = _output(fake.url, tmp_path, chunk_size=50, max_concurrent=1)
    acks = Acks()
    threads = [threading.Thread(target=out.send, args=(f"s{t}", _payload([_doc(t * 1000 + i) for i in range(120)]),
                                                       120, acks)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert acks.n == 4 and len(fake.docs) == 480
    assert fake.max_items <= 50, "a bulk request carries at most chunk_size documents"
    assert fake.max_active == 1, "at most max_concurrent bulk requests are in flight"


def test_a_stop_during_the_last_attempt_is_a_stop_not_patience_run_out(fake, tmp_path):
    """A stop while the last allowed request is in flight ends delivery quietly (the batch not
    acknowledged, sent again at the next start), as on any other attempt: not an OutputError saying
    that Elasticsearch did not take the documents."""
    stop = threading.Event()
    out = _output(fake.url, tmp_path, attempts=1, stop=stop)
    docs = [_doc(1)]
    fake.item_faults = {docs[0][0]: [503]}
    fake.mangle = lambda answer: (stop.set(), answer)[1]  # the stop arrives during the request
    ack = Acks()
    out.send("completions", _payload(docs), 1, ack)
    assert ack.n == 0 and not fake.docs and out.rejected == 0


def test_a_stop_ends_a_slow_clusters_delivery_after_the_request_in_flight(fake, tmp_path):
    """SIGTERM while a slow cluster takes a batch of many requests and other streams wait for a
    request slot: the request in flight finishes, nothing more is sent, nothing is acknowledged."""
    import time

    fake.delay = 0.5
    stop = threading.Event()
    out = _output(fake.url, tmp_path, chunk_size=10, max_concurrent=1, stop=stop)
    acks = Acks()
    threads = [threading.Thread(target=out.send, args=(f"s{t}", _payload([_doc(t * 1000 + i) for i in range(60)]),
                                                       60, acks)) for t in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # the first request is in flight; 23 more wait
    stop.set()
    started = time.monotonic()
    for t in threads:
        t.join(30)
    assert time.monotonic() - started < 2, "a stop waits for the request in flight only"
    assert acks.n == 0, "a batch not wholly stored stays in the outbox"
    assert len(fake.docs) <= 20


# -- the command line -------------------------------------------------------------------------------
def _cli_config(url: str, streams=("completions",), initial="1h", **top) -> dict:
    ds = {s.name: ({"initial_interval": initial} if s.name in streams else {"enabled": False}) for s in USAGE_STREAMS}
    for other in ("audit", "rate_limits", "costs"):
        ds[other] = {"enabled": False}
    return {"url": url, "api_key": ADMIN_KEY, "max_retries": 2, "data_streams": ds, **top}


def _collect(cfg, state, now, *extra, env_extra=ENV) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("OPENAI_ADMIN_KEY", None)
    env.update(env_extra)
    return subprocess.Popen(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once", "--state-dir",
         str(state), "--output", "elasticsearch", "--now", str(now), "--log-level", "ERROR", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_collect_output_elasticsearch_with_es_url_from_the_flag_or_the_config(simulator, fake, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_cli_config(simulator.base_url)))
    p = _collect(cfg, tmp_path / "s1", T0, "--es-url", fake.url)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    assert out == b"" and fake.docs and "created" in err.decode()
    assert fake.indices() == {"logs-openai.completions-default"}
    cfg.write_text(yaml.safe_dump(_cli_config(simulator.base_url, es_url=fake.url)))
    p = _collect(cfg, tmp_path / "s2", T0)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    assert f"0 created, {len(fake.docs)} already there (409)" in err.decode()
    assert API_KEY not in err.decode() and ADMIN_KEY not in err.decode()
    assert "not delivered" not in err.decode()
    p = _collect(cfg, tmp_path / "s3", T0, env_extra={"ELASTIC_API_KEY": "wrong"})
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "refused the credentials" in err.decode() and "Traceback" not in err.decode()
    # delivery stops part way (the assets not installed): the summary's documents were collected,
    # not delivered, and the closing lines say where they wait
    fake.refuse_index = lambda index: (400, {"type": "illegal_argument_exception",
                                             "reason": f"pipeline with id [{index}@pipeline] does not exist"})
    p = _collect(cfg, tmp_path / "s4", T0)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err.decode()
    assert f"batch(es) not delivered yet wait in the outbox ({tmp_path / 's4'})" in err.decode(), err.decode()


@pytest.mark.slow
def test_sigkill_at_random_points_then_restart_gives_truth_in_the_cluster(simulator, fake, tmp_path):
    from agent_input.state import StateStore

    rng = random.Random(1123)
    streams = [s.name for s in USAGE_STREAMS]
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_cli_config(simulator.base_url, streams=streams, es_url=fake.url)))
    state = tmp_path / "state"
    fake.item_faults = {}
    now = T0
    kills = runs = 0
    while kills < 20 and runs < 60:
        runs += 1
        simulator.set_time(now)
        fake.fail_requests = [503] if rng.random() < 0.3 else []  # and a flaky cluster on top
        # killed after a random number of its own commits (timed kills landed mostly in start-up)
        target = committed_batches(state) + rng.randint(1, 6)
        p = _collect(cfg, state, now)
        if wait_for_commits(state, target, lambda: p.poll() is None):
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate()
        now += rng.choice((0, 60, 300))
    assert kills >= 20
    end_of_test = now + 2 * 3600 + 600
    while now <= end_of_test:
        simulator.set_time(now)
        p = _collect(cfg, state, now)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
        now += 900
    assert not fake.violations, fake.violations[:5]
    docs = dedupe(fake.stored())
    settled = int(end_of_test - 2 * 3600) // 60 * 60
    store = StateStore(state)
    assert store.pending_count() == 0
    for spec in USAGE_STREAMS:
        origin = store.cursor(spec.name, "1m").origin
        assert stored_totals(docs, spec.name, origin, settled) == truth_totals(simulator, spec.name, origin, settled), spec.name
    store.close()


# -- a real cluster, opt-in -------------------------------------------------------------------------
@pytest.mark.cluster
@pytest.mark.skipif(not os.environ.get("ES_URL"),
                    reason="set ES_URL (and ELASTIC_API_KEY or ELASTIC_USERNAME/ELASTIC_PASSWORD, "
                           "ES_CA_FILE for TLS) to run against a real 8.18+/9.x cluster")
def test_real_cluster_create_then_409(tmp_path):
    client = make_client(os.environ["ES_URL"], ca_file=os.environ.get("ES_CA_FILE") or None)
    version = check_cluster(client)
    ns = "oetest" + uuid.uuid4().hex[:8]
    out = ElasticsearchOutput(client, state_dir=tmp_path, namespace=ns, initial_backoff=0.5)
    docs = [_doc(i, "openai.completions", ns) for i in range(3)]
    acks = Acks()
    out.send("completions", _payload(docs), 3, acks)
    out.send("completions", _payload(docs), 3, acks)
    try:
        assert acks.n == 2 and out.created == 3 and out.duplicates == 3 and out.rejected == 0, version
    finally:
        client.options(ignore_status=404).indices.delete_data_stream(name=f"logs-openai.completions-{ns}")


@pytest.mark.parametrize("url,says", [
    ("es:9200", "must start with http:// or https://"),
    ("http://elastic:S3cret-pw@es:notaport", "has an invalid port"),
    ("http://[::1", "cannot be parsed"),
])
def test_a_bad_es_url_is_one_line_without_its_password(url, says):
    """--es-url is given on the command line, not checked with the config: the client's own error
    would quote it whole, password included."""
    with pytest.raises(OutputError) as info:
        make_client(url, env=ENV)
    assert says in str(info.value) and "S3cret-pw" not in str(info.value)


def test_a_proxy_answer_echoing_the_api_key_is_redacted_before_it_is_cut():
    """A proxy's 400 page quoting the request's headers was cut to 200 characters and then
    redacted: the cut key no longer matched whole and 40 of its 60 characters went out."""
    from types import SimpleNamespace

    from agent_input.es_output import _reason, _refused
    from agent_input.logs import register_secret

    key = "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="
    register_secret(key)
    page = "<html>" + "x" * 150 + f"<pre>Authorization: ApiKey {key}</pre></html>"
    exc = SimpleNamespace(status_code=400, message=page, meta=None)
    assert key[:12] not in str(_refused(exc, {"_index": "logs-openai.completions-default"}))
    assert key[:12] not in _reason({"error": {"type": "x", "reason": "y" * 480 + key}})


def test_a_large_batch_is_parsed_a_part_at_a_time_and_dead_letters_once_at_the_end(fake, tmp_path, monkeypatch):
    """A rate-limits cycle (171,000 documents at 5,000 projects) or an audit slice is one outbox
    batch: parsed whole it took the collector to 1.2 GB of RSS. It is parsed and settled a part at
    a time, and still acknowledged once, its rejected documents dead-lettered only once it is
    all settled (a stop in a later part re-sends the whole batch at the next start)."""
    import agent_input.es_output as es_output

    monkeypatch.setattr(es_output, "SEND_PART_LINES", 3, raising=False)
    stop = threading.Event()
    out = _output(fake.url, tmp_path, stop=stop, sleep=lambda seconds: stop.set(), max_retries=0)
    parsed: list[int] = []
    parse = out._parse
    monkeypatch.setattr(out, "_parse", lambda stream, payload: parsed.append(payload.count(b"\n")) or
                        parse(stream, payload))
    docs = [_doc(i, bad="x") if i == 1 else _doc(i) for i in range(8)]
    fake.reject = lambda src: {"type": "document_parsing_exception", "reason": "bad"} if "bad" in src else None
    fake.item_faults = {docs[7][0]: [503]}  # the last part cannot be settled before the stop
    ack = Acks()
    out.send("completions", _payload(docs), len(docs), ack)
    assert parsed == [3, 3, 2]
    assert ack.n == 0 and not (tmp_path / "dead-letter.ndjson").exists()
    stop.clear()
    out.send("completions", _payload(docs), len(docs), ack)  # the kept batch, at the next start
    assert ack.n == 1 and len(fake.docs) == 7
    dead = (tmp_path / "dead-letter.ndjson").read_text().splitlines()
    assert [json.loads(line)["_id"] for line in dead] == [docs[1][0]] and out.rejected == 1


def test_collect_says_how_many_documents_a_failure_store_kept(simulator, fake, tmp_path):
    """The closing line of `collect --output elasticsearch` counts the documents Elasticsearch
    9.2+ kept in a failure store: they are neither created nor dead-lettered."""
    fake.failure_store = True
    fake.reject = lambda src: {"type": "document_parsing_exception", "reason": "failed to parse"}
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_cli_config(simulator.base_url, es_url=fake.url)))
    p = _collect(cfg, tmp_path / "s", T0)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    assert fake.failures and not fake.docs
    assert f"0 created, 0 already there (409), 0 rejected, {len(fake.failures)} kept in a failure store" \
        in err.decode()


@pytest.mark.parametrize("line", [b'[1, 2]', b'"text"', b'{"no_id": 1}', b'{not json',
                                  # an `_id` that is no string: a list or object raised TypeError
                                  # (unhashable) out of the output, a number or null was sent on
                                  b'{"_id": [1]}', b'{"_id": {"a": 1}}', b'{"_id": 5}', b'{"_id": null}',
                                  # nested past the parser's recursion limit: RecursionError
                                  b'[' * 100_000 + b']' * 100_000])
def test_an_outbox_line_that_is_no_document_is_one_clear_error(fake, tmp_path, line):
    """A corrupted outbox line that is JSON but no object (an array) raised TypeError out of the
    output (list.pop("_id")), a traceback where every other bad line is one clear error; so did
    one whose `_id` was a list or an object (a dict key), and a number or null was sent on."""
    out = _output(fake.url, tmp_path)
    ack = Acks()
    with pytest.raises(OutputError, match=r"outbox line 2 is not a JSON document with an `_id`"):
        out.send("completions", _payload([_doc(1)]) + line + b"\n", 2, ack)
    assert ack.n == 0 and not fake.docs
