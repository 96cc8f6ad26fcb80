"""Process-level tests of `openai-input run` (docs/protocol.md): the real process, spoken to over
its stdin/stdout by a test supervisor — configure, receive, acknowledge, reconfigure, kill and
restart, stop — plus the done-when test: SIGKILL at random points, restart, exactly the truth."""
from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import sqlite3
import threading
import time

import pytest

from agent_input.state import StateError, StateStore
from agent_input.streams import USAGE_STREAMS

from conftest import ADMIN_KEY, T0, committed_batches, dedupe, stored_totals, traced_peak, truth_totals, wait_for_commits
from protocol_supervisor import InProcess, Supervisor

HOUR = 3600
SETTLE = 2 * HOUR
TWO = ("completions", "embeddings")


def _config(url: str, streams=TWO, initial: str = "1h", interval: str = "5m", **top) -> dict:
    ds = {}
    for spec in USAGE_STREAMS:
        ds[spec.name] = ({"initial_interval": initial, "interval": interval} if spec.name in streams
                         else {"enabled": False})
    for other in ("audit", "rate_limits", "costs"):
        ds[other] = {"enabled": False}
    return {"url": url, "api_key": ADMIN_KEY, "max_retries": 2, "data_streams": ds, **top}


def _wait_until_full(proc, pipe, deadline: float) -> None:
    """Wait until `pipe` (the collector's end of it unread by the test) is full: less than a page
    (PIPE_BUF, an atomic write) free and nothing more written to it over 0.2 s, so the collector's
    next write to it blocks."""
    import fcntl
    import sys
    import termios

    size = fcntl.fcntl(pipe.fileno(), 1032)  # F_GETPIPE_SZ
    last = -1
    while True:
        unread = bytearray(4)
        fcntl.ioctl(pipe.fileno(), termios.FIONREAD, unread)
        n = int.from_bytes(unread, sys.byteorder)
        if n == last and n > size - 4096:
            return
        assert time.monotonic() < deadline and proc.poll() is None, f"the pipe did not fill ({n} of {size} bytes)"
        last = n
        time.sleep(0.2)


def _pending(state) -> int:
    store = StateStore(state)
    try:
        return store.pending_count()
    finally:
        store.close()


def _assert_clean_streams(sup: Supervisor) -> None:
    assert not sup.bad_lines, f"non-protocol lines on stdout: {sup.bad_lines[:3]}"
    for raw in sup.stderr:
        if raw.strip():
            json.loads(raw)  # every log line is ECS JSON
    assert ADMIN_KEY not in sup.stderr_text()
    assert all(ADMIN_KEY not in json.dumps(m) for m in sup.messages)
    assert "Traceback" not in sup.stderr_text()


def test_configure_receive_acknowledge_stop(simulator, tmp_path):
    state = tmp_path / "state"
    sup = Supervisor(state, T0, log_level="INFO")
    sup.configure(_config(simulator.base_url), cid="policy-1")
    sup.wait_polled(TWO)
    events = sup.events()
    assert events, "no events"
    for m in events:
        assert set(m) == {"type", "batch", "seq", "batch_size", "stream", "dataset", "index", "id", "document"}
        assert m["dataset"] == f"openai.{m['stream']}"
        assert m["index"] == f"logs-openai.{m['stream']}-default"
        assert re.fullmatch(r"[0-9a-f]{16,64}", m["id"])
        assert "_id" not in m["document"]
        assert m["document"]["data_stream"]["dataset"] == m["dataset"]
    streams_status = {(m["stream"], m["status"]) for m in sup.statuses("stream")}
    assert {("completions", "starting"), ("completions", "healthy"), ("embeddings", "healthy")} <= streams_status
    inputs = [m["status"] for m in sup.statuses("input")]
    assert inputs[:3] == ["starting", "configuring", "healthy"]
    assert sup.statuses("input")[2]["config_id"] == "policy-1"
    assert sup.stop() == 0
    assert [m["status"] for m in sup.statuses("input")][-2:] == ["stopping", "stopped"]
    _assert_clean_streams(sup)
    assert _pending(state) == 0, "every acknowledged batch must have left the outbox"
    ids = [m["id"] for m in events]
    assert len(ids) == len(set(ids))
    by_batch: dict[int, list[dict]] = {}
    for m in events:
        by_batch.setdefault(m["batch"], []).append(m)
    for batch in by_batch.values():  # seq numbers a batch's events 0 .. batch_size-1, once each
        assert sorted(m["seq"] for m in batch) == list(range(batch[0]["batch_size"]))


def test_bad_config_is_rejected_while_the_old_one_runs_then_reconfigure(simulator, tmp_path):
    state = tmp_path / "state"
    sup = Supervisor(state, T0)
    sup.configure(_config(simulator.base_url, streams=("completions",), interval="1s"))
    sup.wait_polled(["completions"], revision=1)
    bad = _config(simulator.base_url, streams=("completions",))
    bad["data_streams"]["completions"]["bucket_width"] = "2m"
    bad["namespace"] = "Bad-NS"
    sup.configure(bad, cid="bad")
    rejected = sup.wait_for(lambda: [m for m in sup.statuses("input") if m.get("config_id") == "bad"],
                            what="the rejection")[0]
    assert rejected["status"] == "degraded"
    assert "data_streams.completions.bucket_width" in rejected["message"] and "namespace" in rejected["message"]
    assert "still running revision 1" in rejected["message"]
    # the old config keeps polling (interval 1s)
    mark = len(sup.messages)
    sup.wait_polled(["completions"], revision=1, after=mark)
    # a good config reconfigures without a restart: new stream, new namespace
    mark = len(sup.messages)
    sup.configure(_config(simulator.base_url, streams=TWO, namespace="team"), cid="good")
    sup.wait_polled(TWO, revision=2, after=mark)
    later = [m for m in sup.messages[mark:] if m["type"] == "event"]
    assert {m["index"] for m in later if m["stream"] == "embeddings"} == {"logs-openai.embeddings-team"}
    assert sup.proc.poll() is None
    assert sup.stop() == 0
    _assert_clean_streams(sup)


def test_unacknowledged_batches_come_back_identical_after_kill(simulator, tmp_path):
    state = tmp_path / "state"
    first = Supervisor(state, T0, ack=False)
    first.configure(_config(simulator.base_url, streams=("completions",)))
    first.wait_polled(["completions"])
    sent = {m["id"]: m["document"] for m in first.events()}
    first.kill()
    assert _pending(state) > 0
    second = Supervisor(state, T0)
    second.configure(_config(simulator.base_url, streams=("completions",)))
    second.wait_polled(["completions"])
    again = {m["id"]: m["document"] for m in second.events()}
    assert set(sent) <= set(again), "unacknowledged events must be re-emitted"
    assert all(again[i] == d for i, d in sent.items()), "a re-emitted id must carry the same content"
    assert second.stop() == 0
    assert _pending(state) == 0


def test_ack_on_flush_counts_writing_as_delivery(simulator, tmp_path):
    state = tmp_path / "state"
    sup = Supervisor(state, T0, ack=False, args=["--ack-on-flush"])
    sup.configure(_config(simulator.base_url, streams=("completions",)))
    sup.wait_polled(["completions"])
    assert sup.events()
    assert sup.stop() == 0
    assert _pending(state) == 0


def test_without_acks_the_outbox_keeps_the_batches(simulator, tmp_path):
    state = tmp_path / "state"
    sup = Supervisor(state, T0, ack=False, args=["--ack-timeout", "0.2"])
    sup.configure(_config(simulator.base_url, streams=("completions",)))
    sup.wait_polled(["completions"])
    assert sup.stop() == 0
    assert _pending(state) == len({m["batch"] for m in sup.events()})


def test_malformed_input_lines_are_reported_and_skipped(simulator, tmp_path):
    sup = Supervisor(tmp_path / "state", T0)
    for junk in (b"not json", b"[1,2]", b'{"no":"type"}', b'{"type":"dance"}', b'{"type":"ack"}',
                 b'{"type":"ack","batch":"x"}', b'{"type":"ack","batch":999}', b'{"type":"config"}',
                 b'{"type":"config","config":[1]}', b"\xff\xfe"):
        assert sup.send(junk)
    sup.configure(_config(simulator.base_url, streams=("completions",)))
    sup.wait_polled(["completions"])
    assert sup.proc.poll() is None
    assert sup.stop() == 0
    err = sup.stderr_text()
    assert "input line 1 is not JSON" in err and "unknown message type 'dance'" in err
    assert "ack of batch 999 ignored" in err
    _assert_clean_streams(sup)


def test_stdout_closed_by_the_reader_ends_the_process_cleanly(simulator, tmp_path):
    sup = Supervisor(tmp_path / "state", T0, ack=False)
    sup.configure(_config(simulator.base_url, streams=("completions",), interval="1s"))
    sup.wait_for(lambda: sup.events(), what="a first event")
    sup.proc.stdout.close()
    code = sup.proc.wait(timeout=30)
    assert code == 0
    sup._err.join(5)
    assert "Traceback" not in sup.stderr_text()
    assert "stdout was closed by the reader" in sup.stderr_text()


@pytest.mark.parametrize("how", ["sigterm", "stop", "eof", "config+stop", "bad-config+eof", "config+sigterm",
                                 "config+stop-open"])
def test_a_supervisor_that_stops_reading_stdout_cannot_hold_a_stop_up(simulator, tmp_path, how):
    """The pipe fills during a backfill and the supervisor no longer reads it: a stop still ends
    the process within about --ack-timeout, the batches it could not send kept in the outbox.
    A config sent before the stop (valid or not) has its status to write to that full pipe: the
    stop that follows it on stdin still ends the process (it used to wait for ever behind it)."""
    import subprocess
    import sys

    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "agent_input.cli", "run", "--state-dir", str(state),
                             "--now", str(T0), "--ack-timeout", "1", "--log-level", "WARNING"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        cfg = _config(simulator.base_url, streams=tuple(s.name for s in USAGE_STREAMS), initial="6h")
        proc.stdin.write(json.dumps({"type": "config", "config": cfg}).encode() + b"\n")
        proc.stdin.flush()
        assert wait_for_commits(state, 2, lambda: proc.poll() is None, timeout=60), "the backfill did not start"
        # stdout was never read: its pipe is full and a stream is blocked writing to it
        _wait_until_full(proc, proc.stdout, time.monotonic() + 30)
        if how.startswith(("config+", "bad-config+")):
            again = cfg if how.startswith("config+") else {"url": 1}
            proc.stdin.write(json.dumps({"type": "config", "config": again}).encode() + b"\n")
            proc.stdin.flush()
            time.sleep(0.5)
            how = how.split("+")[1]
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            if how.startswith("stop"):
                proc.stdin.write(b'{"type": "stop"}\n')
            if how == "stop-open":  # the stop alone, stdin left open: no end of stdin to help it
                proc.stdin.flush()
            else:
                proc.stdin.close()
        started = time.monotonic()
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{how}: still running 15 s later, blocked on a stdout nobody reads")
        assert code == 0 and time.monotonic() - started < 10
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _pending(state) > 0  # what the supervisor did not take is sent again at the next start


def test_a_supervisor_that_does_not_read_stderr_does_not_stall_the_collector(simulator, tmp_path):
    """stderr's pipe full (nobody reads the logs): the collector goes on sending and taking acks,
    lines that do not fit are dropped and counted, and a stop (even SIGTERM) still ends it. Logging
    to the full pipe used to block every thread that logged, the stdin reader and the stop too."""
    import fcntl
    import subprocess
    import sys
    import termios
    import threading

    env = {k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "agent_input.cli", "run", "--state-dir", str(tmp_path / "state"),
                             "--now", str(T0), "--log-level", "DEBUG"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    messages: list[dict] = []

    def read_and_ack() -> None:
        for line in proc.stdout:
            msg = json.loads(line)
            messages.append(msg)
            if msg["type"] == "event" and msg["seq"] == msg["batch_size"] - 1:
                proc.stdin.write(json.dumps({"type": "ack", "batch": msg["batch"]}).encode() + b"\n")
                proc.stdin.write(b"not json: one more warning for the stdin reader to log\n")
                proc.stdin.flush()

    def stderr_full() -> bool:
        size = fcntl.fcntl(proc.stderr.fileno(), 1032)  # F_GETPIPE_SZ
        unread = bytearray(4)
        fcntl.ioctl(proc.stderr.fileno(), termios.FIONREAD, unread)
        return int.from_bytes(unread, sys.byteorder) >= size // 2  # lines do not fill its pages to the byte

    def polls() -> int:
        return sum(1 for m in list(messages) if m["type"] == "status" and m["status"] == "healthy"
                   and m["scope"] == "stream")

    reader = threading.Thread(target=read_and_ack, daemon=True)
    try:
        reader.start()
        proc.stdin.write(json.dumps({"type": "config", "config": _config(simulator.base_url, interval="1s")}).encode()
                         + b"\n" + b"not json: a warning to log\n" * 300)  # ~150 KB of warnings on stderr
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not stderr_full():
            assert time.monotonic() < deadline and proc.poll() is None, "stderr's pipe did not fill"
            time.sleep(0.1)
        time.sleep(1)  # the rest of the 150 KB: the pipe is full now
        then = polls()
        deadline = time.monotonic() + 15
        while polls() < then + 4:  # polls every second go on, and their batches are acknowledged
            assert time.monotonic() < deadline, "the collector stalled on a full stderr"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=10) == 0
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM did not end a collector whose stderr is full")
        reader.join(5)
        assert [m["status"] for m in messages if m["type"] == "status" and m["scope"] == "input"][-1] == "stopped"
        for line in proc.stderr.read().splitlines():
            json.loads(line)  # what was written is whole ECS lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stdout_closed_while_every_stream_waits_for_its_next_poll_ends_the_process(simulator, tmp_path):
    """Between polls (interval 5m) nothing is written: the closed stdout is noticed all the same."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "agent_input.cli", "run", "--state-dir", str(tmp_path / "state"),
                             "--now", str(T0), "--ack-on-flush", "--log-level", "WARNING"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(json.dumps({"type": "config", "config": _config(simulator.base_url)}).encode() + b"\n")
        proc.stdin.flush()
        polled = set()
        while polled != set(TWO):
            msg = json.loads(proc.stdout.readline())
            if msg["type"] == "status" and msg["scope"] == "stream" and msg["status"] == "healthy":
                polled.add(msg["stream"])
        proc.stdout.close()  # the supervisor goes away; stdin stays open
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 10 s after its stdout was closed")
        assert code == 0
        assert b"stdout was closed by the reader" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_end_of_stdin_and_sigterm_stop_gracefully(simulator, tmp_path):
    a = Supervisor(tmp_path / "a", T0)
    a.configure(_config(simulator.base_url, streams=("completions",)))
    a.wait_polled(["completions"])
    a.proc.stdin.close()
    assert a.wait() == 0
    assert a.statuses("input")[-1]["status"] == "stopped"
    b = Supervisor(tmp_path / "b", T0)
    b.configure(_config(simulator.base_url, streams=("completions",)))
    b.wait_polled(["completions"])
    b.proc.send_signal(signal.SIGTERM)
    assert b.wait() == 0
    assert b.statuses("input")[-1]["status"] == "stopped"


def test_a_closed_stdin_is_the_end_of_stdin_not_a_traceback(tmp_path):
    """`run <&-` (a supervisor that gives no stdin): Python leaves sys.stdin None, and the Runner
    took `sys.stdin.buffer` from it, an AttributeError traceback and exit 1 before any status."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "agent_input.cli", "run", "--state-dir", str(tmp_path / "state"),
                           "--ack-timeout", "1"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"Traceback" not in proc.stderr
    assert b"stdin is closed" in proc.stderr
    statuses = [json.loads(line)["status"] for line in proc.stdout.splitlines()]
    assert statuses == ["starting", "stopping", "stopped"]


def test_failed_stream_is_reported(simulator, tmp_path):
    sup = Supervisor(tmp_path / "state", T0)
    cfg = _config(simulator.base_url, streams=("completions",))
    cfg["api_key"] = "sk-admin-wrong-key-0000000000"
    sup.configure(cfg)
    failed = sup.wait_for(lambda: [m for m in sup.statuses("stream") if m["status"] == "failed"],
                          what="a failed status")[0]
    assert failed["stream"] == "completions" and failed["message"]
    assert "sk-admin-wrong-key-0000000000" not in json.dumps(sup.messages) + sup.stderr_text()
    assert sup.stop() == 0


def test_a_rejected_key_fails_rate_limits_on_a_directory_that_recorded_its_organization(simulator, tmp_path):
    """The admin key rotated to one OpenAI rejects (401): rate limits, whose projects listing is
    refused, is `failed` like every stream (docs/protocol.md), not `degraded` for ever because the
    organization check, listing with the same key, held the write of its failure document."""
    cfg = _config(simulator.base_url, streams=())
    cfg["data_streams"]["rate_limits"] = {}
    with Supervisor(tmp_path / "state", T0) as sup:
        sup.configure(cfg, cid="a")
        sup.wait_polled(["rate_limits"], revision=1)  # the organization is recorded
        assert sup.stop() == 0
    cfg["api_key"] = "sk-admin-revoked-key-0000000000"
    with Supervisor(tmp_path / "state", T0 + HOUR) as sup:
        sup.configure(cfg, cid="b")
        said = sup.wait_for(lambda: [m for m in sup.statuses("stream") if m["status"] in ("failed", "degraded")],
                            what="the stream's outcome")[0]
        assert (said["stream"], said["status"]) == ("rate_limits", "failed"), said
        assert "the admin key was rejected (401" in said["message"]
        sup.wait_for(lambda: [m for m in sup.statuses("input") if m["status"] == "failed"
                              and "every stream stopped" in m["message"]], what="the input failed")
        assert sup.stop() == 0
        _assert_clean_streams(sup)
        assert "sk-admin-revoked-key-0000000000" not in json.dumps(sup.messages) + sup.stderr_text()


def test_a_deeply_nested_input_line_is_skipped_not_fatal(tmp_path):
    with Supervisor(tmp_path / "state", T0) as sup:
        assert sup.send(b"[" * 200_000)  # json.loads: RecursionError, not ValueError
        assert sup.send(b'{"type":"ack","batch":' + b"[" * 5000 + b"]" * 5000 + b"}")
        assert sup.stop(timeout=10) == 0, "the stdin reader must outlive a malformed line"
    err = sup.stderr_text()
    assert "input line 1 is not JSON" in err and "input line 2 is not JSON" in err
    assert [m["status"] for m in sup.statuses("input")] == ["starting", "stopping", "stopped"]
    _assert_clean_streams(sup)


def _event_line(doc_id: str) -> bytes:
    doc = {"_id": doc_id, "data_stream": {"dataset": "openai.audit", "namespace": "default"}}
    return json.dumps(doc).encode() + b"\n"


def test_an_ack_whose_outbox_delete_fails_is_reported_and_the_batch_kept(tmp_path, caplog):
    """The delete of an acknowledged batch fails (sqlite "database is locked" after the busy
    timeout): reported, later acks still work, and the batch stays in the outbox to be sent again."""
    state = tmp_path / "state"
    store = StateStore(state)
    first, second = (store.commit_events("audit", _event_line(i), 1, {}) for i in ("a1", "a2"))

    def locked() -> None:
        raise sqlite3.OperationalError("database is locked")

    run = InProcess(state, tmp_path / "stdout")
    try:
        run.runner.output.send("audit", _event_line("a1"), 1, locked)  # protocol batch 1
        run.runner.output.send("audit", _event_line("a2"), 1, lambda: store.ack(second))  # batch 2
        run.start()
        run.send({"type": "ack", "batch": 1})
        run.send({"type": "ack", "batch": 2})
        assert run.stop() == 0, "the stdin reader must outlive a failed outbox delete"
    finally:
        run.close()
    assert [b.batch for b in store.pending()] == [first], "the unconfirmed batch stays, the other is gone"
    store.close()
    degraded = [m for m in run.statuses("stream") if m["status"] == "degraded"]
    assert len(degraded) == 1 and degraded[0]["stream"] == "audit"
    assert "batch 1" in degraded[0]["message"] and "database is locked" in degraded[0]["message"]
    assert "database is locked" in caplog.text
    assert run.statuses("input")[-1]["status"] == "stopped"


def _acks_delete_nothing(tmp_path, *acks: dict) -> None:
    """`run` with one batch awaiting its ack (protocol batch 1) given `acks`: the batch stays."""
    state = tmp_path / "state"
    store = StateStore(state)
    batch = store.commit_events("audit", _event_line("a1"), 1, {})
    run = InProcess(state, tmp_path / "stdout", ack_timeout=0.1)
    try:
        run.runner.output.send("audit", _event_line("a1"), 1, lambda: store.ack(batch))  # protocol batch 1
        run.start()
        for ack in acks:
            run.send(ack)
        assert run.stop() == 0
    finally:
        run.close()
    assert [b.batch for b in store.pending()] == [batch]
    store.close()


def test_an_ack_of_true_is_not_an_ack_of_batch_1(tmp_path, caplog):
    """JSON `true` is a Python int: taken as batch 1, it would delete a batch never delivered."""
    _acks_delete_nothing(tmp_path, {"type": "ack", "batch": True}, {"type": "ack", "batches": [True, 1.0]})
    assert "input line 1: ack of True skipped: batch ids are integers" in caplog.text
    assert "input line 2: ack of True, 1.0 skipped: batch ids are integers" in caplog.text


def test_an_ack_without_batches_or_of_an_unknown_batch_is_a_warning_and_nothing_is_deleted(tmp_path, caplog):
    """{"type":"ack"} with no batch, an empty or non-list "batches", or a batch nobody awaits: each
    skipped with one warning naming the input line; the outbox keeps its batch."""
    _acks_delete_nothing(tmp_path, {"type": "ack", "batches": []}, {"type": "ack", "batches": "1"},
                         {"type": "ack", "batches": [7]})
    assert caplog.text.count('ack needs "batch" (an integer) or "batches" (a list), skipped') == 2
    assert "input line 1: ack needs" in caplog.text and "input line 2: ack needs" in caplog.text
    assert "input line 3: ack of batch 7 ignored: not awaiting an ack" in caplog.text


def test_an_ack_of_huge_or_many_ids_is_one_short_warning_line_each_kind(tmp_path, caplog):
    """An ack of a 3 MB string, or of thousands of ids, was quoted whole, one line per id: a line
    past the stderr queue's megabyte was dropped whole ("stderr was not read"), and thousands of
    lines drowned the log. Each kind of problem is one line, its values bounded, with a count."""
    _acks_delete_nothing(tmp_path, {"type": "ack", "batch": "x" * 3_000_000},
                         {"type": "ack", "batches": [{"k": "y" * 1000}] * 2000 + list(range(100, 3100))})
    lines = [r.getMessage() for r in caplog.records if r.name == "agent_input.protocol" and "input line" in r.getMessage()]
    assert len(lines) == 3, lines
    assert all(len(line) < 1000 for line in lines), [len(line) for line in lines]
    assert lines[0].startswith("input line 1: ack of 'xxxx") and lines[0].endswith("skipped: batch ids are integers")
    assert "and 1995 more skipped: batch ids are integers" in lines[1]
    assert lines[2].startswith("input line 2: ack of batches 100, 101, 102, 103, 104 and 2995 more ignored: "
                               "not awaiting an ack")


def test_a_backfill_s_progress_is_the_stream_s_status_message_unless_it_says_why_it_is_degraded(tmp_path):
    """Every 30 s of a long poll, the stream's status repeats with the progress as its message
    (starting or healthy); a degraded or failed stream's status keeps its reason instead."""
    from agent_input.protocol import ProtocolWriter, Runner

    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        runner = Runner(ProtocolWriter(fd), state_dir=str(tmp_path / "state"), stdin=io.BytesIO(b""), env={})
        runner._on_progress("completions", "backfill 10%")
        runner._on_status("costs", "healthy", "")
        runner._on_progress("costs", "backfill 20%, up to 2026-11-20T00:00:00.000Z")
        runner._on_status("audit", "degraded", "HTTP 503")
        runner._on_progress("audit", "backfill 30%")
    finally:
        os.close(fd)
    said = [(m["stream"], m["status"], m["message"]) for m in map(json.loads, (tmp_path / "out").read_bytes().splitlines())
            if m["type"] == "status" and m["scope"] == "stream"]
    assert said == [("completions", "starting", "backfill 10%"), ("costs", "healthy", ""),
                    ("costs", "healthy", "backfill 20%, up to 2026-11-20T00:00:00.000Z"),
                    ("audit", "degraded", "HTTP 503")]


def test_acks_that_arrive_after_stop_are_waited_for(tmp_path):
    """On `stop`, the runner waits up to --ack-timeout for the batches in flight, and for their
    outbox deletes: a supervisor that acknowledges them meanwhile spares them a second delivery at
    the next start."""
    state = tmp_path / "state"
    store = StateStore(state)
    batch = store.commit_events("audit", _event_line("a1"), 1, {})
    run = InProcess(state, tmp_path / "stdout", ack_timeout=30)

    def slow_delete():  # the runner must wait for the delete as well as for the ack
        time.sleep(0.3)
        store.ack(batch)

    try:
        run.runner.output.send("audit", _event_line("a1"), 1, slow_delete)
        run.start()
        run.send({"type": "stop"})
        run.wait_for(lambda: [m for m in run.statuses("input") if m["status"] == "stopping"], what="stopping")
        time.sleep(0.3)  # the runner is waiting for the ack now, not gone
        assert run._thread.is_alive(), "the runner stopped without waiting for the batch in flight"
        run.send({"type": "ack", "batch": 1})
        assert run.stop() == 0
    finally:
        run.close()
    assert list(store.pending()) == []
    store.close()


class _HeldDelete:
    """A Runner on a real stdin pipe, its one batch in flight acknowledged, whose outbox delete on
    the stdin reader is under way and held until `release` is set."""

    def __init__(self, tmp_path, stdout_fd: int):
        from agent_input.protocol import ProtocolWriter, Runner

        state = tmp_path / "state"
        self.store = store = StateStore(state)
        batch = store.commit_events("audit", _event_line("a1"), 1, {})
        deleting, self.release = threading.Event(), threading.Event()

        def slow_delete():
            deleting.set()
            self.release.wait(60)  # a liveness bound: the test releases it
            store.ack(batch)

        stdin_r, self.stdin_w = os.pipe()
        runner = Runner(ProtocolWriter(stdout_fd), state_dir=str(state), stdin=os.fdopen(stdin_r, "rb"), env={},
                        ack_timeout=30)
        runner.output.send("audit", _event_line("a1"), 1, slow_delete)
        self.signal = threading.Event()
        self.thread = threading.Thread(target=runner.run, args=(self.signal,), daemon=True)
        self.thread.start()
        os.write(self.stdin_w, b'{"type": "ack", "batch": 1}\n')
        assert deleting.wait(10)

    def waits_for_the_delete(self, why: str) -> None:
        time.sleep(0.5)
        assert self.thread.is_alive(), why
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()

    def close(self) -> None:
        """Ends the runner if a check failed first; the acknowledged batch's delete is done."""
        self.release.set()
        os.close(self.stdin_w)
        self.thread.join(10)
        assert list(self.store.pending()) == []
        self.store.close()


def test_a_stop_waits_for_the_delete_of_a_batch_acked_as_it_stops(tmp_path):
    """A SIGTERM while the ack of the last batch in flight was being deleted from the outbox (no
    batch left in flight, its delete under way on the stdin reader): the stop asked only whether a
    batch was in flight, did not wait, and the process exited under the delete, the acknowledged
    batch sent again at the next start. It waits for the delete, as for one after the stop."""
    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT, 0o600)
    held = _HeldDelete(tmp_path, fd)
    try:
        held.signal.set()  # SIGTERM
        held.waits_for_the_delete("the stop did not wait for the outbox delete under way")
    finally:
        held.close()
        os.close(fd)


@pytest.mark.parametrize("stopped", [False, True])
def test_a_supervisor_that_acks_then_closes_stdout_has_the_ack_s_delete_done(tmp_path, stopped):
    """The supervisor acks the last batch and closes stdout (stdin still open): nobody can take
    more, so nothing is waited for but the delete under way on the stdin reader. It was not: the
    run loop (`stopped` False), or the stop's wait for acks, returned as soon as stdout was closed
    and the process exited under the delete, the acknowledged batch sent again at the next start."""
    out_r, out_w = os.pipe()
    out = os.fdopen(out_r, "rb")
    held = _HeldDelete(tmp_path, out_w)
    said: list[dict] = []

    def until_stopping():  # the supervisor reads stdout until the input says `stopping`
        for line in out:
            said.append(json.loads(line))
            if said[-1].get("status") == "stopping":
                return

    try:
        if stopped:  # SIGTERM: the stop waits for the delete under way
            held.signal.set()
            # stdout closes once the stop has begun: after a sleep (0.3 s, the run loop asks every
            # 0.2 s) a loaded machine could find stdout closed in the run loop first, untested the stop's wait
            reader = threading.Thread(target=until_stopping, daemon=True)
            reader.start()
            reader.join(30)
            assert said and said[-1]["status"] == "stopping"
        out.close()  # the supervisor closes stdout
        held.waits_for_the_delete("the process stopped under the outbox delete of an acknowledged batch")
    finally:
        held.close()
        os.close(out_w)


def test_at_the_end_of_stdin_the_stop_waits_for_no_ack(tmp_path, caplog):
    """Nobody can ack once stdin is closed (the agent stopping the process that way, or after a
    `stop`): the runner stops without waiting out --ack-timeout (an hour here) for a batch in
    flight, which stays in the outbox for the next start."""
    caplog.set_level("INFO", logger="agent_input.protocol")
    state = tmp_path / "state"
    store = StateStore(state)
    batch = store.commit_events("audit", _event_line("a1"), 1, {})
    for stop_first in (False, True):
        run = InProcess(state, tmp_path / "stdout", ack_timeout=3600)
        try:
            run.runner.output.send("audit", _event_line("a1"), 1, lambda: store.ack(batch))
            run.start()
            if stop_first:
                run.send({"type": "stop"})
                run.wait_for(lambda: [m for m in run.statuses("input") if m["status"] == "stopping"],
                             what="stopping")
            run.close()  # the end of stdin (joins the runner for up to 10 s)
            assert not run._thread.is_alive(), "the stop waited for acks that can no longer come"
            assert run.code == 0 and run.statuses("input")[-1]["status"] == "stopped"
        finally:
            run.close()
    assert [b.batch for b in store.pending()] == [batch]
    store.close()
    assert caplog.text.count("1 batches were not acknowledged; they are sent again at the next start") == 2


def test_stdout_closed_while_the_stop_waits_for_acks_ends_the_wait(tmp_path):
    """A supervisor that closes stdout while the stop waits for acks (stdin still open) is gone:
    the run loop notices a closed stdout between polls, but the stop's wait looked only at a write
    having failed, and none is made while it waits, so it waited out --ack-timeout (an hour
    here) for acks nobody would send. The batch in flight stays in the outbox for the next start."""
    from agent_input.protocol import ProtocolWriter, Runner

    state = tmp_path / "state"
    store = StateStore(state)
    batch = store.commit_events("audit", _event_line("a1"), 1, {})
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    runner = Runner(ProtocolWriter(out_w), state_dir=str(state), stdin=os.fdopen(stdin_r, "rb"), env={},
                    ack_timeout=3600)
    said: list[dict] = []

    def supervisor():  # reads stdout until the input says `stopping`, then closes it
        with os.fdopen(out_r, "rb") as out:
            for line in out:
                said.append(json.loads(line))
                if said[-1].get("status") == "stopping":
                    return

    reader = threading.Thread(target=supervisor, daemon=True)
    reader.start()
    runner.output.send("audit", _event_line("a1"), 1, lambda: store.ack(batch))
    thread = threading.Thread(target=runner.run, args=(threading.Event(),), daemon=True)
    thread.start()
    try:
        os.write(stdin_w, b'{"type": "stop"}\n')
        reader.join(30)
        assert said and said[-1]["status"] == "stopping"
        thread.join(10)
        assert not thread.is_alive(), "the stop waited for acks from a supervisor that closed stdout"
    finally:
        os.close(stdin_w)  # the end of stdin: a runner still waiting stops
        thread.join(10)
        os.close(out_w)
    assert [b.batch for b in store.pending()] == [batch]
    store.close()


def test_a_batch_whose_write_fails_is_not_acknowledged(tmp_path):
    """stdout fails mid-batch: the batch is forgotten as in flight, but never acknowledged, so it
    stays in the outbox for the next start."""
    from agent_input.outputs import OutputError
    from agent_input.protocol import ProtocolOutput, ProtocolWriter, StdoutClosed

    class BrokenWriter(ProtocolWriter):
        def write_bytes(self, data):
            raise StdoutClosed("stdout was closed by the reader")

    output = ProtocolOutput(BrokenWriter(-1))
    acked = []
    with pytest.raises(OutputError):
        output.send("audit", _event_line("a1"), 1, lambda: acked.append(1))
    assert acked == [] and output.inflight() == 0


def test_a_send_cut_short_by_a_stop_is_neither_written_nor_acknowledged(tmp_path):
    """A collector blocked on backpressure (max_inflight batches unacknowledged) when the engine
    stops: its batch was never written, so it must stay in the outbox (no ack) for the next start."""
    import threading

    from agent_input.protocol import ProtocolOutput, ProtocolWriter

    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    output = ProtocolOutput(ProtocolWriter(fd), max_inflight=1)
    acked: list[str] = []
    try:
        output.send("audit", _event_line("a1"), 1, lambda: acked.append("a1"))  # in flight, unacked
        blocked = threading.Thread(target=output.send,
                                   args=("audit", _event_line("a2"), 1, lambda: acked.append("a2")))
        blocked.start()
        time.sleep(0.3)
        assert blocked.is_alive(), "the second batch should wait for an ack (backpressure)"
        output.interrupt()
        blocked.join(10)
        assert not blocked.is_alive()
    finally:
        os.close(fd)
    assert acked == [], "a batch the supervisor never received was acknowledged"
    assert b"a2" not in (tmp_path / "stdout").read_bytes()
    assert output.ack(1) and acked == ["a1"]


def test_a_replayed_batch_in_flight_is_confirmed_by_the_one_ack(tmp_path):
    """A new engine (a reconfigure) re-sends a batch the supervisor has not acknowledged yet: it is
    not written twice, and the supervisor's ack of it confirms both senders' outbox entries."""
    from agent_input.protocol import ProtocolOutput, ProtocolWriter

    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    output = ProtocolOutput(ProtocolWriter(fd))
    acked: list[str] = []
    try:
        output.send("audit", _event_line("a1"), 1, lambda: acked.append("first"))
        output.send("audit", _event_line("a1"), 1, lambda: acked.append("replay"))
    finally:
        os.close(fd)
    assert (tmp_path / "stdout").read_bytes().count(b'"a1"') == 1
    assert output.ack(1)
    assert acked == ["first", "replay"]


def test_a_batch_acked_while_a_new_engine_re_sends_the_outbox_is_skipped_not_an_error(tmp_path):
    """A reconfigure: the new engine re-sends the outbox while the supervisor acknowledges what
    the old engine had sent. An ack landing between the re-send's read of the outbox rows and its
    read of a later batch removed that batch's row and spool file: the start failed with "outbox
    batch N: cannot read ..." (the input `failed` until the next config), and an inline batch
    acked the same way was written to the supervisor a second time."""
    import threading

    from agent_input.engine import Delivery
    from agent_input.protocol import ProtocolOutput, ProtocolWriter
    from agent_input.state import INLINE_PAYLOAD_LIMIT, Cursor

    def lines(tag: str, n: int) -> bytes:
        return b"".join(_event_line(f"{tag}{i:06d}-" + "x" * 900) for i in range(n))

    batches = [lines("a", 3), lines("b", INLINE_PAYLOAD_LIMIT // 900 + 50), lines("c", 3)]  # b: spooled
    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    output = ProtocolOutput(ProtocolWriter(fd))
    old = StateStore(tmp_path / "state")
    for i, payload in enumerate(batches):
        Delivery(old, output).commit_page("audit", "1m", payload, payload.count(b"\n"), observations=(),
                                          cursor=Cursor(0, 60 * (i + 1)))
    old.close()  # the old engine stopped; its three batches are in flight (protocol batches 1-3)
    assert len(os.listdir(tmp_path / "state" / "outbox")) == 1
    new = StateStore(tmp_path / "state")
    real_send, sent = output.send, []

    def send(stream, payload, events, on_ack):
        real_send(stream, payload, events, on_ack)
        sent.append(payload)
        if len(sent) == 1:  # the stdin reader's acks of the old engine's 2nd and 3rd batches land now
            reader = threading.Thread(target=lambda: [output.ack(2), output.ack(3)])
            reader.start()
            reader.join()

    written = _replay_with(output, send, new, fd, tmp_path / "stdout")
    assert sent == batches[:1]
    for tag in "abc":
        assert written.count(f'"{tag}000000-'.encode()) == 1
    assert output.ack(1) and new.pending_count() == 0
    assert os.listdir(tmp_path / "state" / "outbox") == []


def test_a_batch_acked_just_after_the_re_send_read_its_row_is_not_written_again(tmp_path):
    """A reconfigure: the new engine re-sends the outbox, and the supervisor's ack of an old batch
    still in flight lands after the re-send read that batch's row but before it reached the output
    (or while the ack's outbox delete was still running). The output no longer knew the batch, and
    wrote it to the supervisor a second time under a new batch id: a duplicate of every event
    within one process (seen in about 1 run in 4 driving `run` with the supervisor acknowledging
    during the reconfiguration)."""
    import threading

    from agent_input.engine import Delivery
    from agent_input.protocol import ProtocolOutput, ProtocolWriter
    from agent_input.state import Cursor

    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    output = ProtocolOutput(ProtocolWriter(fd))
    old = StateStore(tmp_path / "state")
    Delivery(old, output).commit_page("audit", "1m", _event_line("a1"), 1, observations=(), cursor=Cursor(0, 60))
    old.close()  # the old engine stopped; its batch is in flight (protocol batch 1)
    output.resume()  # the new engine starts
    new = StateStore(tmp_path / "state")
    real_send = output.send

    def send(stream, payload, events, on_ack):
        # the row was read; the stdin reader's ack of batch 1 lands now, before the output has it
        reader = threading.Thread(target=output.ack, args=(1,))
        reader.start()
        reader.join()
        real_send(stream, payload, events, on_ack)

    written = _replay_with(output, send, new, fd, tmp_path / "stdout")
    assert written.count(b'"a1"') == 1, "an acknowledged batch was written to the supervisor again"
    assert output.inflight() == 0 and new.pending_count() == 0


def test_an_old_engine_s_acknowledged_batch_is_forgotten_once_the_next_engine_starts(tmp_path):
    """The output keeps an old engine's acknowledged batch only while the outbox re-send of the
    engine after it may meet it: from the engine after that on, its record is dropped (kept for
    ever, it grew with every reconfiguration, and a new batch with the same bytes was deleted from
    the outbox without being written)."""
    from agent_input.protocol import ProtocolOutput, ProtocolWriter

    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    output, acked = ProtocolOutput(ProtocolWriter(fd)), []
    try:
        output.send("audit", _event_line("a1"), 1, lambda: acked.append(1))  # engine 0's batch 1
        output.resume()  # engine 1: its re-send may still meet batch 1
        assert output.ack(1) and acked == [1]
        output.send("audit", _event_line("a1"), 1, lambda: acked.append(2))  # that re-send: not written
        assert acked == [1, 2] and output.inflight() == 0
        output.resume()  # engine 2: batch 1 cannot come back from engine 1's re-send any more
        output.send("audit", _event_line("a1"), 1, lambda: acked.append(3))
        assert output.inflight() == 1 and acked == [1, 2]  # written, waiting for its own ack
        written = (tmp_path / "stdout").read_bytes()
    finally:
        os.close(fd)
    assert written.count(b'"a1"') == 2


def test_a_batch_whose_ack_is_still_deleting_when_the_next_engine_starts_is_not_written_again(tmp_path):
    """An old engine's batch acknowledged just before a reconfiguration, its outbox delete still
    running when the new engine starts and re-sends the outbox (which read the batch's row before
    the delete): that re-send is confirmed by the ack, not written to the supervisor again."""
    import threading

    from agent_input.protocol import ProtocolOutput, ProtocolWriter

    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    output, deleting, deleted, acked = ProtocolOutput(ProtocolWriter(fd)), threading.Event(), threading.Event(), []

    def slow_delete():
        deleting.set()
        deleted.wait(10)
        acked.append("old")

    try:
        output.send("audit", _event_line("a1"), 1, slow_delete)  # engine 0's batch 1
        reader = threading.Thread(target=output.ack, args=(1,))  # the stdin reader's ack
        reader.start()
        assert deleting.wait(10)
        output.resume()  # the new engine starts while batch 1's delete runs
        output.send("audit", _event_line("a1"), 1, lambda: acked.append("re-send"))
        deleted.set()
        reader.join(10)
        written = (tmp_path / "stdout").read_bytes()
    finally:
        deleted.set()
        os.close(fd)
    assert written.count(b'"a1"') == 1, "an acknowledged batch was written to the supervisor again"
    assert sorted(acked) == ["old", "re-send"] and output.inflight() == 0


def test_a_connection_reset_on_stdout_is_the_reader_gone_not_a_write_error(tmp_path, monkeypatch):
    """A supervisor on a socket that goes away may reset the connection (ECONNRESET): that is
    stdout closed (the run loop stops), like EPIPE, not an output error to retry for ever."""
    import errno

    import agent_input.protocol as protocol_mod
    from agent_input.protocol import ProtocolWriter, StdoutClosed

    def reset(fd, data):
        raise OSError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))

    monkeypatch.setattr(protocol_mod, "write_all", reset)
    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    writer = ProtocolWriter(fd)
    try:
        with pytest.raises(StdoutClosed):
            writer.write({"type": "status"})
        assert writer.closed.is_set() and writer.reader_gone()
    finally:
        os.close(fd)


def test_a_pipe_whose_reader_closed_is_stdout_closed_not_a_write_error():
    """A write to a pipe the supervisor closed fails with EPIPE (Python ignores SIGPIPE): that is
    StdoutClosed and stdout counts as closed, so the engine ends quietly and the run loop stops,
    not an output error the engine reports as its failure."""
    from agent_input.protocol import ProtocolWriter, StdoutClosed

    read_end, write_end = os.pipe()
    os.close(read_end)
    writer = ProtocolWriter(write_end)
    try:
        with pytest.raises(StdoutClosed):
            writer.write({"type": "status"})
        assert writer.closed.is_set()
    finally:
        os.close(write_end)


def test_an_event_goes_to_the_data_stream_its_document_names(tmp_path):
    """A batch is encoded with its document's own data_stream (a batch left in the outbox by a
    config with another namespace keeps it), the output's namespace only standing in for a
    document without one."""
    from agent_input.protocol import ProtocolOutput, ProtocolWriter

    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    output = ProtocolOutput(ProtocolWriter(fd), namespace="now")
    old = {"_id": "a1", "data_stream": {"dataset": "openai.audit", "namespace": "before"}}
    bare = {"_id": "a2"}
    try:
        output.send("audit", (json.dumps(old) + "\n" + json.dumps(bare) + "\n").encode(), 2, lambda: None)
    finally:
        os.close(fd)
    events = [json.loads(line) for line in (tmp_path / "stdout").read_bytes().splitlines()]
    assert [(m["id"], m["dataset"], m["index"]) for m in events] == [
        ("a1", "openai.audit", "logs-openai.audit-before"), ("a2", "openai.audit", "logs-openai.audit-now")]

def test_waiting_for_acks_at_a_stop_ends_at_once_when_stdout_is_closed(tmp_path):
    """Nobody can ack once stdout is closed: the stop does not wait the whole ack_timeout."""
    from agent_input.protocol import ProtocolOutput, ProtocolWriter

    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    writer = ProtocolWriter(fd)
    output = ProtocolOutput(writer)
    try:
        output.send("audit", _event_line("a1"), 1, lambda: None)
        writer.closed.set()  # the reader went away
        started = time.monotonic()
        assert output.wait_drained(10) is False
        assert time.monotonic() - started < 2, "the stop waited for acks nobody can send"
    finally:
        os.close(fd)

def test_a_config_id_that_cannot_be_echoed_is_rejected_and_the_old_config_runs(simulator, tmp_path):
    nested: list = []
    for _ in range(300):
        nested = [nested]
    with Supervisor(tmp_path / "state", T0) as sup:
        cfg = _config(simulator.base_url, streams=("completions",))
        sup.configure(cfg, cid="good")
        sup.wait_for(lambda: [m for m in sup.statuses("input") if m["status"] == "healthy"], what="revision 1")
        sup.configure(cfg, cid=2**70)  # orjson encodes 64-bit integers at most ...
        sup.configure(cfg, cid=nested)  # ... and 254 levels of nesting
        def rejections():
            found = [m for m in sup.statuses("input") if "rejected" in m["message"]]
            return found if len(found) == 2 else None

        rejected = sup.wait_for(rejections, 10, "two rejections")
        assert sup.proc.poll() is None, "a bad config never stops the process"
        assert sup.stop() == 0
    assert [m["status"] for m in rejected] == ["degraded", "degraded"]
    assert all("still running revision 1" in m["message"] and "id: " in m["message"] for m in rejected)
    assert "64-bit" in rejected[0]["message"] and "nest" in rejected[1]["message"].lower()
    assert all(m["config_id"] is None for m in rejected)
    _assert_clean_streams(sup)


def test_an_engine_that_cannot_start_is_failed_not_healthy(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with Supervisor(blocker / "state", T0) as sup:
        sup.configure({"url": "http://127.0.0.1:1", "api_key": ADMIN_KEY}, cid="c1")
        sup.wait_for(lambda: [m for m in sup.statuses("input") if m["status"] == "failed"], what="failed")
        assert sup.stop() == 0
    inputs = sup.statuses("input")
    assert [m["status"] for m in inputs] == ["starting", "configuring", "failed", "stopping", "stopped"]
    assert "state directory" in inputs[2]["message"] and "Not a directory" in inputs[2]["message"]
    assert inputs[2]["config_id"] == "c1" and inputs[2]["revision"] == 1
    _assert_clean_streams(sup)


def test_a_config_whose_every_stream_stopped_is_failed_under_its_own_id(tmp_path):
    """The input `failed` "every stream stopped" is a status about the running config: it echoes
    that config's `id`, as its `healthy` and an "engine stopped" failure do (docs/protocol.md).
    It said `config_id: null`: a supervisor could not tell which of its configs had failed."""
    run = InProcess(tmp_path / "state", tmp_path / "stdout").start()
    try:
        for cid in ("policy-1", "policy-2"):
            run.send({"type": "config", "id": cid, "config": _config("http://127.0.0.1:1", streams=())})
            run.wait_for(lambda: [m for m in run.statuses("input") if m["status"] == "failed"
                                  and "every stream stopped" in m["message"] and m["revision"] == int(cid[-1])],
                         what=f"{cid} to end")
        assert run.stop() == 0
    finally:
        run.close()
    failed = [m for m in run.statuses("input") if m["status"] == "failed"]
    assert [(m["revision"], m["config_id"]) for m in failed] == [(1, "policy-1"), (2, "policy-2")]


def _bad_config_after_the_first_ended(run, first: dict, ended: str, release: threading.Event) -> dict:
    """Revision 1 (`first`) ends, the input `failed` with `ended` in its message; then a config is
    rejected (a bad namespace). Its status, asserted `failed` "waiting for a valid one": nothing
    runs. `release` lets a held engine thread go on once the rejection is said."""
    try:
        run.send({"type": "config", "id": "policy-1", "config": first})
        run.wait_for(lambda: [m for m in run.statuses("input") if m["status"] == "failed"
                              and ended in m["message"]], what="revision 1 to end")
        run.send({"type": "config", "id": "policy-2", "config": {**_config("http://127.0.0.1:1"), "namespace": "BAD"}})
        said = run.wait_for(lambda: [m for m in run.statuses("input") if m.get("config_id") == "policy-2"],
                            what="the rejection")[0]
        release.set()
        assert run.stop() == 0
    finally:
        release.set()
        run.close()
    assert said["status"] == "failed", said
    assert said["message"].startswith("config rejected, waiting for a valid one: namespace: 'BAD'")
    return said


@pytest.mark.parametrize("lingering", [False, True])
def test_a_bad_config_after_every_stream_stopped_is_failed_not_still_running(tmp_path, monkeypatch, lingering):
    """Every stream of revision 1 stopped (input `failed`), then a config is rejected: nothing
    runs, so the input stays `failed` "waiting for a valid one"; it said `degraded` "still
    running revision 1", as if the supervisor's old config were collecting. `lingering`: the
    engine's thread queues `engine-ended`, then ends, and a config rejected after the loop read
    that message, with the thread not yet ended, said `degraded` by the thread being alive."""
    from agent_input.protocol import Runner

    release = threading.Event()
    if lingering:
        original = Runner._run_engine

        def linger(self, collection):
            original(self, collection)  # queues `engine-ended`
            release.wait(10)  # the thread not ended yet

        monkeypatch.setattr(Runner, "_run_engine", linger)
    run = InProcess(tmp_path / "state", tmp_path / "stdout").start()
    said = _bad_config_after_the_first_ended(run, _config("http://127.0.0.1:1", streams=()), "every stream stopped",
                                             release)
    assert said["revision"] == 1


def test_a_bad_config_after_the_engine_said_it_stopped_on_an_error_is_failed(tmp_path, monkeypatch):
    """An engine that raises says `failed` "engine stopped: ..." from its own thread, then queues
    `engine-ended` for the loop: a config rejected in between (the supervisor answering that
    `failed` with a config it cannot apply, read before the loop got to the message) said
    `degraded` "still running revision 1", after the input had said it stopped."""
    import queue as queue_module

    from agent_input import app

    class Engine:
        collectors: list = []
        failed: dict = {}

        def run(self, once=False):
            raise RuntimeError("cannot read spool")

    class Collection:
        engine = Engine()

        def close(self):
            pass

    release = threading.Event()

    class Control(queue_module.Queue):
        def put(self, item, *args, **kwargs):
            if item[0] == "engine-ended":
                release.wait(10)  # the engine thread between its `failed` and its `engine-ended`
            super().put(item, *args, **kwargs)

    monkeypatch.setattr(app, "build", lambda *a, **kw: Collection())
    run = InProcess(tmp_path / "state", tmp_path / "stdout")
    run.runner.control = Control()
    run.start()
    _bad_config_after_the_first_ended(run, _config("http://127.0.0.1:1"), "engine stopped", release)


def test_a_state_dir_in_use_by_another_collector_fails_the_config_until_it_is_free(tmp_path):
    state = tmp_path / "state"
    other = StateStore(state)  # another collector holds the directory
    run = InProcess(state, tmp_path / "stdout").start()
    try:
        run.send({"type": "config", "id": "c1", "config": _config("http://127.0.0.1:1", streams=())})
        run.wait_for(lambda: [m for m in run.statuses("input") if m["status"] == "failed"], what="failed")
        other.close()
        run.send({"type": "config", "id": "c2", "config": _config("http://127.0.0.1:1", streams=())})
        run.wait_for(lambda: [m for m in run.statuses("input") if m["status"] == "healthy"], what="healthy")
        assert run.stop() == 0
    finally:
        run.close()
    inputs = run.statuses("input")
    assert [m["status"] for m in inputs][:3] == ["starting", "configuring", "failed"]
    assert inputs[2]["message"] == (f"cannot start revision 1: state directory {state} is in use by another "
                                    f"collector (pid {os.getpid()})")
    assert [m["config_id"] for m in inputs if m["status"] == "healthy"] == ["c2"]


def test_an_engine_that_raises_is_reported_once_with_its_error(tmp_path, monkeypatch):
    from agent_input import app

    class Engine:
        collectors: list = []
        failed: dict = {}

        def run(self, once=False):
            raise StateError("outbox batch 3 (completions, 10 documents): cannot read spool: No such file "
                             f"(key {ADMIN_KEY})")

    class Collection:
        engine = Engine()

        def close(self):
            pass

    monkeypatch.setattr(app, "build", lambda *a, **kw: Collection())
    run = InProcess(tmp_path / "state", tmp_path / "stdout").start()
    try:
        run.send({"type": "config", "id": "c1", "config": {"url": "http://127.0.0.1:1", "api_key": ADMIN_KEY}})
        run.wait_for(lambda: run.runner.engine_thread is not None and not run.runner.engine_thread.is_alive(),
                     what="the engine to end")
        assert run.stop() == 0  # queued after the engine's end: the loop has handled both
    finally:
        run.close()
    failed = [m for m in run.statuses("input") if m["status"] == "failed"]
    assert len(failed) == 1, failed
    assert "engine stopped" in failed[0]["message"] and "cannot read spool" in failed[0]["message"]
    assert all(ADMIN_KEY not in json.dumps(m) for m in run.messages()), "a status message carried the key"
    statuses = [m["status"] for m in run.statuses("input")]
    assert "healthy" not in statuses[statuses.index("failed"):]


@pytest.mark.slow
def test_sigkill_at_random_points_with_an_acknowledging_supervisor_gives_truth(simulator, tmp_path):
    rng = random.Random(5)
    state = tmp_path / "state"
    persisted: list[dict] = []
    streams = [s.name for s in USAGE_STREAMS]
    cfg = _config(simulator.base_url, streams=streams, initial="1h")
    now = T0
    kills = runs = 0
    while kills < 20 and runs < 40:
        runs += 1
        simulator.set_time(now)
        # killed after a random number of its own commits: a timed kill landed as often in
        # start-up, or after the poll while the process idled, as inside the poll
        target = committed_batches(state) + rng.randint(1, 6)
        sup = Supervisor(state, now, persisted=persisted)
        sup.configure(cfg)
        if wait_for_commits(state, target, lambda: sup.proc.poll() is None and not sup.polled(streams), 120):
            sup.proc.send_signal(signal.SIGKILL)
            kills += 1
        sup.kill()
        now += rng.choice((0, 60, 300))
    assert kills >= 20
    end_of_test = now + SETTLE + 600
    while now <= end_of_test:
        simulator.set_time(now)
        sup = Supervisor(state, now, persisted=persisted)
        sup.configure(cfg)
        sup.wait_polled(streams, timeout=120)
        assert sup.stop() == 0, sup.stderr_text()[-2000:]
        now += 900
    assert _pending(state) == 0
    docs = dedupe(persisted)
    settled = int(end_of_test - SETTLE) // 60 * 60
    store = StateStore(state)
    wrong = []
    for spec in USAGE_STREAMS:
        # The first poll that commits fixes where a stream starts (now - initial_interval); a run
        # killed before that commit leaves the origin to a later run with a later clock.
        origin = store.cursor(spec.name, "1m").origin
        assert T0 - HOUR <= origin <= T0
        got = stored_totals(docs, spec.name, origin, settled)
        want = truth_totals(simulator, spec.name, origin, settled)
        assert want, f"{spec.name}: the simulator produced no usage"
        if got != want:
            wrong.append(f"{spec.name}: {_diff(got, want)}")
    store.close()
    assert not wrong, wrong


def _diff(got: dict, want: dict) -> str:
    keys = sorted(set(got) | set(want), key=str)
    bad = [(k, got.get(k), want.get(k)) for k in keys if got.get(k) != want.get(k)]
    return f"{len(bad)} of {len(keys)} groups differ, e.g. {bad[:1]}"


def test_a_config_that_breaks_validation_is_rejected_and_the_process_goes_on(tmp_path, monkeypatch):
    """Validation raising something other than ConfigError (a bug, or Python's own limits such as
    int() of 4,300+ digits) must reject that config, not end the process."""
    from agent_input import config as config_module

    def broken(data, env=None):
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    run = InProcess(tmp_path / "state", tmp_path / "stdout").start()
    try:
        monkeypatch.setattr(config_module, "config_from_dict", broken)
        run.send({"type": "config", "id": "c1", "config": {"url": "http://127.0.0.1:1", "api_key": ADMIN_KEY}})
        run.wait_for(lambda: any(m["status"] == "failed" for m in run.statuses("input")), what="the rejection")
        assert run.runner.engine_thread is None
        assert run.stop() == 0  # still reading stdin: the stop is handled
    finally:
        run.close()
    (failed,) = [m for m in run.statuses("input") if m["status"] == "failed"]
    assert "could not be validated (ValueError)" in failed["message"]


def test_a_config_whose_validation_breaks_on_its_key_does_not_log_the_key(tmp_path, monkeypatch, caplog):
    """The config message's api_key is registered for redaction before validation: a validation
    that raises with the key in its text (not a ConfigError, which hides it itself) is logged
    without it. A key of its own, and not shaped `sk-...` (which is redacted by its shape alone):
    ADMIN_KEY is registered by every other test."""
    import uuid

    from agent_input import config as config_module

    key = f"admin{uuid.uuid4().hex}"

    def broken(data, env=None):
        raise ValueError(f"cannot read {data['api_key']!r}")

    run = InProcess(tmp_path / "state", tmp_path / "stdout").start()
    try:
        monkeypatch.setattr(config_module, "config_from_dict", broken)
        run.send({"type": "config", "id": "c1", "config": {"url": "http://127.0.0.1:1", "api_key": key}})
        run.wait_for(lambda: any(m["status"] == "failed" for m in run.statuses("input")), what="the rejection")
        assert run.stop() == 0
    finally:
        run.close()
    assert "config validation failed unexpectedly: ValueError: cannot read" in caplog.text
    assert key not in caplog.text and key[:12] not in caplog.text
    assert key not in (tmp_path / "stdout").read_text()

def test_a_status_with_text_that_is_not_utf8_is_sent_escaped_not_dropped(tmp_path, caplog):
    """A lone surrogate (JSON "\\ud800" from the supervisor) made orjson refuse the whole status:
    the supervisor never learned why its config was rejected."""
    import os

    from agent_input.protocol import ProtocolWriter

    path = tmp_path / "out.ndjson"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    writer = ProtocolWriter(fd)
    writer.status("input", "failed", "config rejected: data_streams.\ud800x: unknown data stream",
                  config_id="c\udfff", errors=["a\ud800"])
    writer.close()
    (msg,) = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert msg["status"] == "failed" and msg["scope"] == "input"
    assert msg["message"] == "config rejected: data_streams.\\ud800x: unknown data stream"
    assert msg["config_id"] == "c\\udfff" and msg["errors"] == ["a\\ud800"]
    assert not [r for r in caplog.records if "not sent" in r.getMessage()]


def test_a_config_with_a_surrogate_key_or_a_huge_value_is_rejected_in_a_short_status(tmp_path):
    huge = "z" * 3_000_000
    with Supervisor(tmp_path / "state", T0) as sup:
        sup.configure({"api_key": ADMIN_KEY, "data_streams": {"\ud800x": {}}}, cid="c1")
        sup.configure({"api_key": ADMIN_KEY, "namespace": "default", "ssl_verify": huge}, cid="c2")

        def rejections():
            found = [m for m in sup.statuses("input") if "rejected" in m["message"]]
            return found if len(found) == 2 else None

        first, second = sup.wait_for(rejections, 20, "two rejections")
        assert sup.stop() == 0
    assert first["config_id"] == "c1" and "data_streams.'\\ud800x': unknown data stream" in first["message"]
    assert second["config_id"] == "c2" and "ssl_verify: 'zzz" in second["message"]
    assert "(3000000 characters) is not a boolean" in second["message"] and len(second["message"]) < 300
    assert "not sent" not in sup.stderr_text()
    _assert_clean_streams(sup)


def test_encoding_a_large_batch_holds_about_its_messages_not_three_times_them(tmp_path):
    """A rate-limits cycle of thousands of projects is one batch: its event messages were kept in
    a list and then joined (3x the result at the peak here; 630 MB of RSS for a cycle of 171,000
    documents). They now go into one buffer as they are made (2x: the payload's lines and it)."""
    from agent_input.protocol import ProtocolOutput, ProtocolWriter

    n = 20_000
    payload = b"".join(_event_line(f"doc-{i:06d}") for i in range(n))
    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    try:
        output = ProtocolOutput(ProtocolWriter(fd))
        encoded, peak = traced_peak(lambda: output._encode(1, "rate_limits", payload))
    finally:
        os.close(fd)
    assert encoded.count(b"\n") == n and b'"batch_size":20000' in encoded
    assert peak < 2.5 * len(encoded), f"encoding took {peak / len(encoded):.1f}x its result"


def test_after_a_stop_a_supervisor_still_reading_slowly_gets_the_whole_batch():
    """The grace after a stop is for a write the reader leaves waiting that long: it was counted
    from the first wait after the stop, so a supervisor that read steadily, a pipe-full every
    0.3 s, was cut off a second later in the middle of a line (a truncated message)."""
    import threading

    from agent_input.protocol import ProtocolWriter

    r, w = os.pipe()
    writer = ProtocolWriter(w)
    stop = threading.Event()
    writer.give_up_on(stop, 1.0)
    data = (b'{"x":"' + b"a" * 1000 + b'"}\n') * 640  # ten pipe-fulls
    got = bytearray()

    def supervisor():
        while True:
            time.sleep(0.3)
            chunk = os.read(r, 65536)
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=supervisor)
    reader.start()
    stop.set()
    try:
        writer.write_bytes(data)
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    assert bytes(got) == data and not writer.closed.is_set()


def test_run_started_with_stdout_closed_stops_cleanly_without_a_traceback(tmp_path):
    """`openai-input run >&-`: Python leaves sys.stdout None, and take_stdout's flush of it was an
    AttributeError traceback; now it is the documented "the reader closed stdout": exit 0."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "agent_input.cli", "run", "--state-dir", str(tmp_path / "s")],
                          input=b'{"type": "stop"}\n', stderr=subprocess.PIPE, timeout=60,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"Traceback" not in proc.stderr and b"stdout was closed" in proc.stderr


@pytest.mark.parametrize("value, why", [("nan", "nan is not a number of seconds"),
                                        ("-1", "-1.0 is not in the range 0<=x<=3600"),
                                        ("inf", "inf is not in the range 0<=x<=3600"),
                                        ("1e308", "1e+308 is not in the range 0<=x<=3600"),
                                        ("3600.5", "3600.5 is not in the range 0<=x<=3600")])
def test_an_ack_timeout_that_is_no_time_is_refused_at_start(tmp_path, value, why):
    """`--ack-timeout nan` was taken: at a stop with batches unacknowledged the process spun at full
    CPU for ever, SIGTERM included (a deadline of NaN is never reached). `inf` or 1e308 waited for
    ever the same way (the batches are safe in the outbox: an hour is the most a stop waits)."""
    import subprocess
    import sys

    # a process with a timeout: were the value taken, `run` would start and wait on its input
    proc = subprocess.run([sys.executable, "-m", "agent_input.cli", "run", "--state-dir", str(tmp_path / "s"),
                           "--ack-timeout", value], stdin=subprocess.PIPE, capture_output=True, timeout=60)
    assert proc.returncode == 2 and f"Invalid value for '--ack-timeout': {why}" in proc.stderr.decode()
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_reconfigurations_do_not_leave_state_files_open(tmp_path):
    """Every config builds a new state store; the old one's connections (the engine thread's,
    the streams') stayed open until a full garbage collection: a supervisor that reconfigures
    often saw the process's open files climb."""
    import gc

    state = tmp_path / "state"

    def open_state_files() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}").startswith(str(state))
            except OSError:
                pass
        return n

    gc.disable()
    run = InProcess(state, tmp_path / "stdout").start()
    try:
        counts = []
        for i in range(1, 6):
            run.send({"type": "config", "id": i, "config": _config("http://127.0.0.1:1", streams=())})
            run.wait_for(lambda: [m for m in run.statuses("input") if m["status"] == "failed"
                                  and m.get("revision") == i and "every stream stopped" in m["message"]],
                         what=f"revision {i} to run and end")
            counts.append(open_state_files())
        assert run.stop() == 0
    finally:
        run.close()
        gc.enable()
    assert counts == [counts[0]] * 5, counts


def test_a_reconfiguration_with_another_organization_s_key_is_failed_and_a_corrected_one_runs(simulator, tmp_path):
    """`run` keeps one state directory across configs: a new key that reaches another organization
    is checked again and refused (input `failed`, nothing sent or stored), and the process goes on
    to take a corrected config."""
    from agent_input.simulator import Simulator

    other_key = "sk-admin-other-org-0123456789abcdef"
    other = Simulator(seed=8, org="small", now=T0, admin_key=other_key)
    other.base_url = other.start()
    state = tmp_path / "state"
    sup = Supervisor(state, T0)
    try:
        sup.configure(_config(simulator.base_url, streams=("completions",)), cid="a")
        sup.wait_polled(["completions"], revision=1)
        sent = len(sup.events())
        wrong = _config(other.base_url, streams=("completions",))
        wrong["api_key"] = other_key
        sup.configure(wrong, cid="b")
        failed = sup.wait_for(lambda: [m for m in sup.statuses("input")
                                       if m["status"] == "failed" and m.get("revision") == 2], what="a refusal")[0]
        assert f"state directory {state} holds the collection of another OpenAI organization" in failed["message"]
        assert "its own --state-dir" in failed["message"]
        assert len(sup.events()) == sent, "nothing of the other organization may be sent"
        assert sup.proc.poll() is None
        mark = len(sup.messages)
        sup.configure(_config(simulator.base_url, streams=("completions",), initial="1h"), cid="a-again")
        sup.wait_polled(["completions"], revision=3, after=mark)
        assert sup.stop() == 0
        assert other_key not in json.dumps(sup.messages) + sup.stderr_text()
        assert "Traceback" not in sup.stderr_text()
    finally:
        other.stop()


def test_a_reconfiguration_does_not_wait_for_the_old_name_cache_s_listing(tmp_path):
    """`run` closes the old collection on the protocol loop at each new config: the name cache's
    close waits up to 5 s for a listing in flight, so a hanging names listing held every new
    revision (and a stop queued behind it) 5 s. The old cache's result is thrown away: no wait."""
    import io
    import threading

    from agent_input.app import Collection
    from agent_input.protocol import ProtocolWriter, Runner

    waits = []

    class Names:
        def close(self, timeout=5.0):
            waits.append(timeout)

    class Engine:
        pass

    class Store:
        def close(self):
            pass

    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        runner = Runner(ProtocolWriter(fd), state_dir=str(tmp_path / "state"), stdin=io.BytesIO(b""))
        runner.collection = Collection(Engine(), Store(), [], Names())
        runner.engine_stop, runner.engine_thread = threading.Event(), threading.Thread(target=lambda: None)
        runner.engine_thread.start()
        runner._stop_engine()
    finally:
        os.close(fd)
    assert waits == [0] and runner.collection is None


def _replay_with(output, send, store, fd: int, stdout) -> bytes:
    """The new engine's outbox re-send through `output` whose `send` is hooked; what the supervisor read."""
    from agent_input.engine import Delivery

    output.send = send
    try:
        Delivery(store, output).replay_pending()
        return stdout.read_bytes()
    finally:
        os.close(fd)


@pytest.mark.slow
def test_a_soak_of_replacements_faults_acks_and_kills_gives_truth_and_stays_bounded(tmp_path, capsys):
    """`tests/soak_protocol.py` in short: a `run` process on a clock 1200x the wall's through
    some 15 simulated hours of configs replaced every few polls (streams, bucket widths, revision
    windows, a wrong key and back), acks delayed and withheld, requests hung at a replacement,
    faults, SIGKILLs and stops; then every usage stream, costs and audit equal the simulator's
    truth, no id acknowledged before a drained stop comes again, a burst of replacements leaves no
    thread or file behind, and every stop ends within --ack-timeout. The full soak:
    `python tests/soak_protocol.py --hours 26` (minutes; any seed)."""
    import soak_protocol

    code = soak_protocol.main(["--seed", "5", "--hours", "3", "--speed", "1200", "--widths", "1m,1h",
                               "--settle", "4", "--hang", "4", "--burst", "6", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out


@pytest.mark.parametrize("grace", ["0", "none", "5m"])
def test_the_soak_s_graces_give_configs_run_takes(grace):
    """`--graces 0` (its help: "0 or none: no grace") put the string '0' in the config, which is no
    duration the loader takes: every config that picked it was rejected, and the soak's streams
    ran on the config before (found by `--graces 0,5m,30m`)."""
    import random

    import soak_protocol

    from agent_input.config import config_from_dict

    soak = object.__new__(soak_protocol.Soak)
    soak.rng, soak.widths, soak.graces, soak.last = random.Random(1), ["1m", "1h", "1d"], [grace], {}
    soak.first_enabled, soak.clock, soak.url = {}, lambda: soak_protocol.START, "http://127.0.0.1:1"
    for _ in range(5):
        cfg = soak.config()
        config = config_from_dict(cfg, env={})
        graces = {s.finalization_grace for s in config.enabled_streams()
                  if s.name in soak_protocol.USAGE and soak_protocol.STREAMS_BY_NAME[s.name].has_grace}
        assert graces <= ({300} if grace == "5m" else {0})


@pytest.mark.parametrize("said, false", [("9m25s ahead of", False), ("40m ahead of", False),
                                          ("41m ahead of", True), ("6m behind", True)])
def test_the_soak_takes_a_clock_warning_an_answer_s_lag_explains_for_none_under_its_skew(said, false):
    """At --speed 1200 an answer 0.47 s from the simulator's Date to the collector reading its clock
    (a loaded machine) is 9m25s: the collector said its clock was that far ahead, and the short
    soak's check that no clock WARNING comes under 5 minutes of skew failed 4 runs in 7 under load.
    A lead ahead by up to RESPONSE_LAG wall seconds at --speed is an answer's lag; more, or behind,
    is a false WARNING still."""
    import argparse
    from collections import Counter, defaultdict
    from types import SimpleNamespace

    import soak_protocol

    line = json.dumps({"log.level": "warning", "message": f"completions: this host's clock is {said} OpenAI's (the "
                       "Date of its answers): ...; keep the clock synchronized (NTP)"}).encode() + b"\n"
    sup = SimpleNamespace(life=2, stderr=[line], bad_lines=[], stderr_text=lambda: line.decode())
    soak = object.__new__(soak_protocol.Soak)
    soak.args = argparse.Namespace(workdir=None, speed=1200.0)
    soak.skew, soak.findings, soak.notes = soak_protocol.parse_skew("0"), [], Counter()
    soak.clock_warnings, soak.clock_leads = Counter(), defaultdict(list)
    soak.check_stderr(sup)
    assert soak.clock_warnings == {(2, "completions"): 1}
    soak.check_clock_warnings()
    assert bool(soak.findings) == false, soak.findings


@pytest.mark.parametrize("killed, line, finding", [
    (True, b'{"type":"event","batch":68,"seq":40,"document":{"openai":{"revision"', False),
    (True, b'{"type":"event","batch":68,"seq":40,"document":{"openai":{"revision"\n', True),
    (False, b'{"type":"event","batch":68,"seq":40,"document":{"openai":{"revision"', True)])
def test_the_soak_takes_a_line_its_sigkill_cut_for_the_kill_s_not_the_protocol_s(killed, line, finding):
    """A life the soak ends with SIGKILL can be killed in the middle of writing an event line
    (one written in pieces into a full pipe): stdout ends in that line's first part, without its
    newline, and the soak reported it as a "non-protocol stdout line" (seed 35023, --skew 28800,
    the process killed while writing an embeddings event). Cut so, at the end of a killed life's
    stdout, it is the kill's; a whole line that is no protocol message, or a cut one in a life
    not killed, is a finding still."""
    import argparse
    from collections import Counter, defaultdict
    from types import SimpleNamespace

    import soak_protocol

    sup = SimpleNamespace(life=1, stderr=[], bad_lines=[line], stderr_text=lambda: "", killed=killed)
    soak = object.__new__(soak_protocol.Soak)
    soak.args = argparse.Namespace(workdir=None, speed=600.0)
    soak.findings, soak.notes = [], Counter()
    soak.clock_warnings, soak.clock_leads = Counter(), defaultdict(list)
    soak.check_stderr(sup)
    assert bool(soak.findings) == finding, soak.findings


def test_the_soak_s_skew_is_constant_or_stepped():
    import soak_protocol

    start, hour = soak_protocol.START, 3600
    assert soak_protocol.parse_skew("0") == [[start, 0.0]]
    steps = soak_protocol.parse_skew("-900,6:7200")
    assert [soak_protocol.skew_at(steps, start + h * hour) for h in (0, 5.9, 6, 30)] == [-900, -900, 7200, 7200]
    assert soak_protocol.parse_skew("3:600") == [[start, 0.0], [start + 3 * hour, 600.0]]


@pytest.mark.parametrize("line", [b'[1, 2]', b'"text"', b'{not json', b'{"no_id": 1}', b'{"_id": [1]}', b'{"_id": 5}',
                                  # nested past 254 levels: orjson parses it (up to 1024) but cannot
                                  # write it back, and its TypeError was raised from the event's encoding
                                  b'{"_id": "a3", "a": ' + b'[' * 300 + b']' * 300 + b'}',
                                  b'[' * 2000 + b']' * 2000])  # past 1024: not parsed
def test_an_outbox_line_that_is_no_document_is_one_clear_error_and_leaves_no_batch_in_flight(tmp_path, line):
    """A corrupted outbox line raised TypeError or JSONDecodeError out of the protocol output ("pop
    expected at most 1 argument", naming no line), and its batch stayed in flight: its slot taken
    for good (with max_inflight 1 every later send waited for ever) and every re-send of it (the
    next engine's) dropped unsaid as a replay of a batch in flight. It is the Elasticsearch
    output's one clear error, and the batch is forgotten, unacknowledged. So is a line nested 300
    deep, which orjson reads but cannot write back ("Recursion limit reached", a TypeError)."""
    from agent_input.outputs import OutputError
    from agent_input.protocol import ProtocolOutput, ProtocolWriter

    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    output = ProtocolOutput(ProtocolWriter(fd), max_inflight=1)
    acked: list[int] = []
    payload = _event_line("a1") + b"\n" + line + b"\n"
    try:
        for _ in range(2):  # sent again (a restart's re-send): said again, not dropped as in flight
            with pytest.raises(OutputError, match=r"^audit: outbox line 3 is not a JSON document with an `_id`$"):
                output.send("audit", payload, 2, lambda: acked.append(1))
            assert output.inflight() == 0
        output.send("audit", _event_line("a2"), 1, lambda: acked.append(2))  # not held up by a lost slot
    finally:
        os.close(fd)
    assert acked == [] and b"a1" not in (tmp_path / "stdout").read_bytes()
