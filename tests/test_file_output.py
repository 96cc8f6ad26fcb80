"""The NDJSON file output for Elastic Agent's filestream: size-based rotation that never leaves a
partial line behind, and the agent policy in docs/elastic-agent.md."""
from __future__ import annotations

import fnmatch
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
from pathlib import Path

import pytest
import yaml

from agent_input.engine import serialize
from agent_input.outputs import NdjsonFileOutput, OutputError
from agent_input.streams import USAGE_STREAMS

from conftest import ADMIN_KEY, T0, dedupe, stored_totals, truth_totals

ROOT = Path(__file__).resolve().parents[1]


def _batch(start: int, n: int) -> bytes:
    return b"".join(serialize(f"id{i:05d}", {"n": i, "pad": "x" * 40}) for i in range(start, start + n))


def _lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path.name} ends with a partial line"
    return [json.loads(line) for line in data.splitlines()]


def test_rotation_keeps_n_whole_files_and_never_splits_a_batch(tmp_path):
    path = tmp_path / "events.ndjson"
    out = NdjsonFileOutput(path, rotate_bytes=2000, rotate_keep=3)
    acks = []
    for b in range(12):
        out.send("s", _batch(b * 10, 10), 10, lambda: acks.append(1))
    out.close()
    assert len(acks) == 12 and out.rotations >= 4
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["events.ndjson", "events.ndjson.1", "events.ndjson.2", "events.ndjson.3"]
    for f in files:
        docs = _lines(f)
        assert f.stat().st_size <= 2000 or len(docs) == 10  # only an oversized single batch may exceed it
        assert len(docs) % 10 == 0, "a batch was split across files"
    # newest last: .3 < .2 < .1 < active, contiguous
    order = [d["n"] for f in reversed(files[1:]) for d in _lines(f)] + [d["n"] for d in _lines(files[0])]
    assert order == list(range(order[0], 120))


def test_a_file_may_grow_to_exactly_the_rotation_size(tmp_path):
    """--rotate-bytes N is the most a file holds: a batch that brings it to exactly N bytes stays in
    it; only one that would take it past N starts a new file."""
    path = tmp_path / "e.ndjson"
    one = _batch(0, 1)
    out = NdjsonFileOutput(path, rotate_bytes=2 * len(one))
    out.send("s", one, 1, lambda: None)
    out.send("s", _batch(1, 1), 1, lambda: None)
    assert out.rotations == 0 and path.stat().st_size == 2 * len(one)
    out.send("s", _batch(2, 1), 1, lambda: None)
    out.close()
    assert out.rotations == 1 and [d["n"] for d in _lines(out.rotated_path(1))] == [0, 1]

def test_a_batch_larger_than_the_limit_gets_its_own_file(tmp_path):
    path = tmp_path / "e.ndjson"
    out = NdjsonFileOutput(path, rotate_bytes=100, rotate_keep=2)
    out.send("s", _batch(0, 5), 5, lambda: None)
    out.send("s", _batch(5, 5), 5, lambda: None)
    out.close()
    assert len(_lines(path)) == 5 and len(_lines(tmp_path / "e.ndjson.1")) == 5


def test_a_crash_mid_line_is_cut_back_at_open_and_rotation_keeps_going(tmp_path):
    path = tmp_path / "e.ndjson"
    out = NdjsonFileOutput(path, rotate_bytes=1500, rotate_keep=5)
    out.send("s", _batch(0, 10), 10, lambda: None)
    out.close()
    with open(path, "ab") as fh:  # what a SIGKILL in the middle of a write leaves
        fh.write(_batch(10, 3)[:-37])
    out = NdjsonFileOutput(path, rotate_bytes=1500, rotate_keep=5)
    # whole lines of the unacknowledged batch may stay (it is re-emitted: same ids), never a partial one
    assert [d["n"] for d in _lines(path)] == list(range(12))
    out.send("s", _batch(10, 10), 10, lambda: None)
    out.close()
    for f in tmp_path.iterdir():
        _lines(f)


@pytest.mark.parametrize("whole,tail", [(1, 70_000), (1, 65_536), (0, 70_000)])
def test_a_crash_s_partial_line_longer_than_a_read_or_with_no_line_before_it_is_cut_back_at_open(tmp_path, whole, tail):
    """The walk back to the last newline goes on past a 64 KiB read, and finds one that ends the
    read before (a partial line of exactly 64 KiB); a file holding nothing but a partial line (a
    crash in its first write) is emptied, not left with it at its head."""
    path = tmp_path / "e.ndjson"
    fragment = b'{"n": 99, "pad": "'
    path.write_bytes(_batch(0, whole) + fragment + b"y" * (tail - len(fragment)))
    out = NdjsonFileOutput(path)
    out.send("s", _batch(whole, 2), 2, lambda: None)
    out.close()
    assert [d["n"] for d in _lines(path)] == list(range(whole + 2))


def test_a_failed_write_is_cut_back_at_once(tmp_path, monkeypatch):
    path = tmp_path / "e.ndjson"
    out = NdjsonFileOutput(path)
    out.send("s", _batch(0, 2), 2, lambda: None)
    real_write = os.write
    calls = []

    def half_then_enospc(fd, data):
        if not calls:
            calls.append(1)
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    acked = []
    with pytest.raises(OutputError, match="No space left"):
        out.send("s", _batch(2, 4), 4, lambda: acked.append(1))
    monkeypatch.setattr(os, "write", real_write)
    assert not acked
    assert [d["n"] for d in _lines(path)] == [0, 1]
    out.close()


def test_bad_rotation_options_are_clear_errors(tmp_path):
    with pytest.raises(OutputError, match="rotate bytes"):
        NdjsonFileOutput(tmp_path / "x", rotate_bytes=0)
    with pytest.raises(OutputError, match="rotate keep"):
        NdjsonFileOutput(tmp_path / "x", rotate_bytes=10, rotate_keep=0)


def test_a_huge_rotate_keep_rotates_at_once(tmp_path):
    """`--rotate-keep 99999999999999999999` looped over every number up to it at each rotation:
    the collector hung on its first rotation. Only the files there are are shifted now."""
    path = tmp_path / "events.ndjson"
    (tmp_path / "events.ndjson.2").write_text('{"old": 2}\n')
    (tmp_path / "events.ndjson.x").write_text("not a rotated file\n")
    out = NdjsonFileOutput(path, rotate_bytes=100, rotate_keep=10**20)

    def send() -> None:
        for n in range(3):
            out.send("s", _batch(n, 1), 1, lambda: None)

    # on a thread: the regression is a hang, which must fail this test, not hold the suite up for ever
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(5)
    assert not sender.is_alive(), "the first rotation did not finish within 5 s"
    out.close()
    assert [d["n"] for d in _lines(path)] == [2]
    assert [d["n"] for d in _lines(tmp_path / "events.ndjson.1")] == [1]
    assert [d["n"] for d in _lines(tmp_path / "events.ndjson.2")] == [0]
    assert _lines(tmp_path / "events.ndjson.4") == [{"old": 2}]  # shifted twice, kept
    assert (tmp_path / "events.ndjson.x").read_text() == "not a rotated file\n"


# -- the collector with a rotating file, killed at random points -------------------------------------
def _cfg(url: str) -> dict:
    ds = {s.name: {"initial_interval": "1h"} for s in USAGE_STREAMS}
    for other in ("audit", "rate_limits", "costs"):
        ds[other] = {"enabled": False}
    return {"url": url, "api_key": ADMIN_KEY, "max_retries": 2, "data_streams": ds}


def test_collect_with_rotation_killed_at_random_points_leaves_only_whole_lines_with_ids(simulator, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(_cfg(simulator.base_url)))
    out = tmp_path / "out" / "events.ndjson"
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}
    rng = random.Random(7)
    now = T0

    def run(timeout):
        simulator.set_time(now)
        p = subprocess.Popen([sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
                              "--state-dir", str(state), "--output-path", str(out), "--rotate-bytes", "200000",
                              "--rotate-keep", "1000", "--now", str(now), "--log-level", "ERROR"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            _, err = p.communicate(timeout=timeout)
            return p.returncode, err
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.communicate()
            return None, b""

    for _ in range(6):
        run(rng.uniform(0.3, 1.0))
        now += rng.choice((0, 60))
    end = now + 2 * 3600 + 600
    while now <= end:
        code, err = run(120)
        assert code == 0, err.decode()
        now += 1800
    files = sorted(out.parent.iterdir())
    assert len(files) > 2, "expected the file to rotate"
    docs = []
    for f in files:
        for d in _lines(f):
            assert re.fullmatch(r"[0-9a-f]{16,64}", d["_id"])
            docs.append(d)
    docs = dedupe(docs)
    from agent_input.state import StateStore

    store = StateStore(state)
    settled = int(end - 2 * 3600) // 60 * 60
    for spec in USAGE_STREAMS:
        origin = store.cursor(spec.name, "1m").origin
        assert stored_totals(docs, spec.name, origin, settled) == truth_totals(simulator, spec.name, origin, settled)
    store.close()


# -- docs/elastic-agent.md -------------------------------------------------------------------------
def _policy() -> dict:
    text = (ROOT / "docs" / "elastic-agent.md").read_text()
    m = re.search(r"<!-- policy:filestream -->\s*```yaml\n(.*?)```", text, re.S)
    assert m, "docs/elastic-agent.md lost its marked policy snippet"
    return yaml.safe_load(m.group(1))


def test_the_agent_policy_snippet_parses_and_names_the_router_pipeline():
    from kibana_assets.elasticsearch import ROUTER_PATTERN, ROUTER_PIPELINE

    policy = _policy()
    (inp,) = [i for i in policy["inputs"] if i["type"] == "filestream"]
    (stream,) = inp["streams"]
    ndjson = [p["ndjson"] for p in stream["parsers"] if "ndjson" in p][0]
    assert ndjson["document_id"] == "_id"
    assert ndjson["target"] == "" and ndjson["overwrite_keys"] is True and ndjson["expand_keys"] is True
    assert stream["pipeline"] == ROUTER_PIPELINE
    target = f"{stream['data_stream']['type']}-{stream['data_stream']['dataset']}-{inp['data_stream']['namespace']}"
    assert fnmatch.fnmatch(target, ROUTER_PATTERN), "the shipping data stream must get the router as default pipeline"
    # the paths pick up the active file and its rotations, as NdjsonFileOutput names them
    (pattern,) = stream["paths"]
    out = NdjsonFileOutput.__new__(NdjsonFileOutput)
    out.path = Path("/var/lib/openai-input/events.ndjson")
    for p in (out.path, out.rotated_path(1), out.rotated_path(12)):
        assert fnmatch.fnmatch(str(p), pattern)
    assert stream["id"] and inp["id"]


def test_the_documented_collect_command_uses_options_that_exist():
    from click.testing import CliRunner

    from agent_input.cli import main

    text = (ROOT / "docs" / "elastic-agent.md").read_text()
    help_text = CliRunner().invoke(main, ["collect", "--help"]).output
    for opt in set(re.findall(r"(--[a-z][a-z-]+)", text)):
        if opt in ("--help",):
            continue
        assert opt in help_text or opt in CliRunner().invoke(main, ["run", "--help"]).output, opt


def test_a_first_batch_larger_than_the_limit_does_not_rotate_the_empty_file(tmp_path):
    """An empty file is not rotated away before a batch larger than --rotate-bytes: that would put
    an empty file in `.1` and drop the oldest rotated one (here the only one, with its records)."""
    path = tmp_path / "e.ndjson"
    path.with_name("e.ndjson.1").write_bytes(_batch(0, 5))  # a former run's rotated file
    path.touch()  # and its new file, empty
    out = NdjsonFileOutput(path, rotate_bytes=100, rotate_keep=1)
    out.send("s", _batch(5, 5), 5, lambda: None)
    out.close()
    assert out.rotations == 0
    assert [d["n"] for d in _lines(path)] == [5, 6, 7, 8, 9]
    assert [d["n"] for d in _lines(tmp_path / "e.ndjson.1")] == [0, 1, 2, 3, 4]


def test_a_batch_on_stdout_is_flushed_before_it_is_acknowledged():
    """NdjsonOutput acks a batch once it has left the process: a batch still in the stream's buffer
    when the ack deleted it from the outbox is lost with a crash (or is never read by the pipe)."""
    import io

    from agent_input.outputs import NdjsonOutput

    raw = io.BytesIO()
    out = NdjsonOutput(io.BufferedWriter(raw, buffer_size=1 << 20))
    seen_at_ack = []
    payload = _batch(0, 3)
    out.send("s", payload, 3, lambda: seen_at_ack.append(raw.getvalue()))
    assert seen_at_ack == [payload] and out.events == 3

def test_a_batch_is_fsynced_before_it_is_acknowledged(tmp_path, monkeypatch):
    from agent_input import outputs

    out = NdjsonFileOutput(tmp_path / "events.ndjson")  # (creating it fsyncs the folder)
    order = []
    real = os.fsync
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: (order.append("fsync"), real(fd))[1])
    out.send("s", b'{"_id":"a"}\n', 1, lambda: order.append("ack"))
    out.close()
    assert order == ["fsync", "ack"]


# -- the file deleted or replaced behind the collector's back ---------------------------------------
def test_a_deleted_output_file_is_created_again_and_no_batch_is_acknowledged_into_the_void(tmp_path, caplog):
    path = tmp_path / "events.ndjson"
    out = NdjsonFileOutput(path)
    out.send("s", _batch(0, 2), 2, lambda: None)
    path.unlink()  # a cleanup job, or `rm` of a file thought to be rotated
    acks = []
    with caplog.at_level(logging.WARNING, logger="agent_input.outputs"):
        out.send("s", _batch(2, 3), 3, lambda: acks.append(1))
        out.send("s", _batch(5, 1), 1, lambda: acks.append(1))
    out.close()
    assert acks == [1, 1]
    assert [d["n"] for d in _lines(path)] == [2, 3, 4, 5]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "deleted" in warnings[0] and str(path) in warnings[0], warnings


def test_a_file_moved_away_by_logrotate_is_left_behind_for_the_file_at_the_path(tmp_path, caplog):
    path = tmp_path / "events.ndjson"
    out = NdjsonFileOutput(path)
    out.send("s", _batch(0, 2), 2, lambda: None)
    os.rename(path, tmp_path / "events.ndjson-20250101")  # logrotate without copytruncate ...
    out.send("s", _batch(2, 2), 2, lambda: None)  # ... the path is missing: a new file
    os.rename(path, tmp_path / "events.ndjson-20250102")
    path.write_bytes(_batch(100, 1))  # ... with `create`: an empty (here: not empty) file in its place
    with caplog.at_level(logging.WARNING, logger="agent_input.outputs"):
        out.send("s", _batch(4, 2), 2, lambda: None)
    out.close()
    assert [d["n"] for d in _lines(tmp_path / "events.ndjson-20250101")] == [0, 1]
    assert [d["n"] for d in _lines(tmp_path / "events.ndjson-20250102")] == [2, 3]
    assert [d["n"] for d in _lines(path)] == [100, 4, 5]
    assert out.reopens == 2 and any("replaced" in r.getMessage() for r in caplog.records)


def test_a_deleted_file_with_rotation_starts_a_new_file_and_rotates_it_later(tmp_path):
    path = tmp_path / "e.ndjson"
    out = NdjsonFileOutput(path, rotate_bytes=300, rotate_keep=2)
    out.send("s", _batch(0, 2), 2, lambda: None)
    path.unlink()
    acks = []
    for b in range(1, 5):  # the first would have needed a rotation of the deleted file
        out.send("s", _batch(b * 2, 2), 2, lambda: acks.append(1))
    out.close()
    assert len(acks) == 4 and out.rotations >= 1
    kept = [d["n"] for f in ("e.ndjson.2", "e.ndjson.1", "e.ndjson") if (tmp_path / f).exists()
            for d in _lines(tmp_path / f)]
    assert kept == list(range(kept[0], 10)) and kept[0] >= 2


def test_a_file_deleted_during_the_write_gets_the_batch_again_before_the_ack(tmp_path, monkeypatch):
    from agent_input import outputs

    path = tmp_path / "events.ndjson"
    out = NdjsonFileOutput(path)
    real = os.fsync
    deleted = []

    def delete_once(fd):
        if not deleted:
            deleted.append(1)
            path.unlink()  # between the check of the path and the fsync
        return real(fd)

    monkeypatch.setattr(outputs.os, "fsync", delete_once)
    acks = []
    out.send("s", _batch(0, 3), 3, lambda: acks.append(1))
    out.close()
    assert acks == [1] and deleted
    assert [d["n"] for d in _lines(path)] == [0, 1, 2]


def test_a_new_file_has_its_folder_fsynced_before_any_batch_is_acknowledged(tmp_path, monkeypatch):
    from agent_input import outputs

    synced = []
    real = outputs.fsync_dir
    monkeypatch.setattr(outputs, "fsync_dir", lambda d: (synced.append(Path(d)), real(d))[1])
    path = tmp_path / "new" / "events.ndjson"
    out = NdjsonFileOutput(path)
    assert synced == [path.parent]
    out.send("s", _batch(0, 1), 1, lambda: None)
    path.unlink()
    out.send("s", _batch(1, 1), 1, lambda: None)
    out.close()
    assert synced == [path.parent, path.parent]
    NdjsonFileOutput(path).close()  # an existing file: nothing new to make durable
    assert len(synced) == 2


# -- a FIFO or a character device as --output-path --------------------------------------------------
def test_a_fifo_is_written_batch_by_batch_once_a_reader_has_it(tmp_path, monkeypatch):
    import threading

    from agent_input import outputs

    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    real = os.fsync

    def like_a_pipe(fd):  # what Linux says to fsync(2) on a pipe; other systems may not
        if os.path.samestat(os.fstat(fd), os.stat(fifo)):
            raise OSError(22, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(outputs.os, "fsync", like_a_pipe)
    out = NdjsonFileOutput(fifo)  # opens once the reader has
    acks = []
    for b in range(3):
        out.send("s", _batch(b * 4, 4), 4, lambda: acks.append(1))
    out.close()
    reader.join(10)
    assert acks == [1, 1, 1] and out.events == 12
    assert [json.loads(line)["n"] for line in got[0].splitlines()] == list(range(12))
    assert fifo.exists() and not list(tmp_path.glob("events.fifo.*"))


def test_a_fifo_whose_reader_is_slow_holds_the_batch_back_and_drops_nothing(tmp_path):
    """The FIFO is opened non-blocking (to wait for a reader without hanging) and then made
    blocking: a batch larger than the pipe's buffer waits for a slow reader instead of failing
    with EAGAIN once the buffer is full."""
    import threading
    import time

    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    got = []

    def slow_reader():
        with open(fifo, "rb") as fh:
            time.sleep(0.3)  # the writer fills the pipe's 64 KiB meanwhile
            got.append(fh.read())

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    out = NdjsonFileOutput(fifo)
    payload = _batch(0, 3000)
    assert len(payload) > 3 * 65536
    acks = []
    out.send("s", payload, 3000, lambda: acks.append(1))
    out.close()
    reader.join(10)
    assert acks == [1] and got == [payload]


def test_a_fifo_that_cannot_be_opened_is_a_clear_error_not_a_wait_for_a_reader(tmp_path, monkeypatch):
    """Only ENXIO (no reader yet) is waited on; any other error opening the FIFO (here EACCES, which
    root never gets from the file's mode) is the output's error at once."""
    import errno
    import threading

    from agent_input import outputs

    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    real = os.open

    def refused(path, flags, *mode):
        if str(path) == str(fifo):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, flags, *mode)

    monkeypatch.setattr(outputs.os, "open", refused)
    stop = threading.Event()
    threading.Timer(3, stop.set).start()  # (a wait would end here, with another message)
    with pytest.raises(OutputError) as err:
        NdjsonFileOutput(fifo, stop=stop)
    stop.set()
    assert str(err.value) == f"cannot open output file {fifo}: {os.strerror(errno.EACCES)}"


def test_a_closed_stdout_is_the_output_s_error_not_a_traceback():
    """A closed stream raises ValueError (not OSError) on write: NdjsonOutput says it as an
    OutputError, and acknowledges nothing."""
    import io

    from agent_input.outputs import NdjsonOutput

    stream = io.BytesIO()
    stream.close()
    acks = []
    with pytest.raises(OutputError, match="cannot write events: I/O operation on closed file"):
        NdjsonOutput(stream).send("s", _batch(0, 1), 1, lambda: acks.append(1))
    assert acks == []

def test_dev_stdout_as_a_pipe_gets_the_events(tmp_path):
    code = ("import sys; from agent_input.outputs import NdjsonFileOutput\n"
            "out = NdjsonFileOutput('/dev/stdout')\n"
            "out.send('s', b'{\"_id\":\"a\"}\\n', 1, lambda: print('acked', file=sys.stderr))\n"
            "out.close()\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    assert p.returncode == 0 and p.stdout == b'{"_id":"a"}\n' and p.stderr == b"acked\n", p.stderr.decode()


def test_rotation_of_a_fifo_is_refused_in_one_line_without_waiting_for_a_reader(tmp_path):
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError) as err:
        NdjsonFileOutput(fifo, rotate_bytes=1000)  # no reader: a blocking open would hang here
    assert str(err.value) == f"cannot rotate {fifo}: it is a pipe (FIFO), not a regular file (leave out --rotate-bytes)"


def test_a_path_that_cannot_take_lines_is_refused_with_a_reason(tmp_path):
    import socket

    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(OutputError, match="it is a socket") as err:
            NdjsonFileOutput(sock_path)
    assert "None" not in str(err.value) and "\n" not in str(err.value)


def test_a_stop_ends_the_wait_for_a_fifo_reader(tmp_path):
    """A blocking open of a FIFO nobody reads is retried after every signal: SIGTERM and SIGINT
    set the stop, and the collector went on waiting until a SIGKILL."""
    import threading
    import time

    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(OutputError, match="stopped while waiting for a reader"):
        NdjsonFileOutput(fifo, stop=stop)
    assert time.monotonic() - started < 3


def test_collect_stopped_while_its_fifo_has_no_reader_exits_0(tmp_path):
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    cfg = tmp_path / "c.yml"
    cfg.write_text("url: http://127.0.0.1:9\n")
    proc = subprocess.Popen([sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--state-dir",
                             str(tmp_path / "state"), "--output-path", str(fifo)],
                            env={**os.environ, "OPENAI_ADMIN_KEY": "sk-admin-fifo-test-000000"},
                            stderr=subprocess.PIPE, text=True)
    try:
        # until it says it waits for a reader: a SIGTERM before that (a sleep of 1.5 s was not long
        # enough for a loaded machine to start it) finds no handler and tests nothing of the FIFO
        silent = threading.Timer(60, proc.kill)  # one that never says so is killed: EOF ends the wait
        silent.start()
        said = next((line for line in iter(proc.stderr.readline, "") if "waiting for a reader" in line), None)
        silent.cancel()
        assert said, "the collector never said it was waiting for a reader"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()  # on a failure: never left waiting on its FIFO
    assert proc.returncode == 0 and "stopped while waiting for a reader" in err


def test_rotation_of_a_symbolic_link_is_refused_and_the_link_left_alone(tmp_path):
    """`--output-path /dev/stdout --rotate-bytes N` with stdout redirected to a file: /dev/stdout
    is a link to /proc/self/fd/1, which os.stat follows to a regular file. Rotation renamed the
    link itself (to /dev/stdout.1, then dropped it as the oldest) and created a plain file in its
    place: /dev/stdout was gone for every program on the host."""
    target = tmp_path / "stdout-file"
    target.write_bytes(b"")
    link = tmp_path / "stdout"
    link.symlink_to(target)
    with pytest.raises(OutputError) as err:
        NdjsonFileOutput(link, rotate_bytes=100, rotate_keep=2)
    assert str(err.value) == (f"cannot rotate {link}: it is a symbolic link (to {target}), and rotation would "
                              "move the link, not the file (give the file's own path, or leave out --rotate-bytes)")
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["stdout", "stdout-file"]
    out = NdjsonFileOutput(link)  # without rotation a link is written through, as before
    out.send("s", _batch(0, 3), 3, lambda: None)
    out.close()
    assert link.is_symlink() and len(_lines(target)) == 3


def test_a_character_device_takes_the_batches_and_a_closed_output_refuses_them(tmp_path):
    """/dev/null (or /dev/stdout on a terminal): opened for appending as it is, each batch acked;
    a send after close is a clear OutputError, never a write to a reused descriptor."""
    out = NdjsonFileOutput("/dev/null")
    acks = []
    out.send("completions", _batch(0, 3), 3, lambda: acks.append(1))
    assert acks == [1] and out.events == 3
    out.close()
    out.close()  # twice: nothing left to close
    with pytest.raises(OutputError, match=r"^cannot write /dev/null: the output is closed$"):
        out.send("completions", _batch(3, 1), 1, lambda: acks.append(1))
    assert acks == [1]


def test_an_output_path_under_a_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match=rf"^cannot open output file {tmp_path / 'f' / 'events.ndjson'}: "):
        NdjsonFileOutput(tmp_path / "f" / "events.ndjson")
