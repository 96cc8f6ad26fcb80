"""`openai-input collect` as a user runs it: until stopped, progress only on a terminal, and a
rejected key stops only its own stream."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from agent_input.engine import Delivery, Engine, PollStats, Progress
from agent_input.http_client import AuthenticationError
from agent_input.outputs import NdjsonOutput
from agent_input.state import StateStore

from conftest import ADMIN_KEY, T0, read_ndjson


def _config(url: str) -> dict:
    streams = {n: {"enabled": False} for n in ("audit", "rate_limits", "costs", "embeddings", "moderations",
                                                 "images", "audio_speeches", "audio_transcriptions",
                                                 "code_interpreter_sessions", "vector_stores",
                                                 "file_search_calls", "web_search_calls")}
    streams["completions"] = {"initial_interval": "1h", "interval": "1s"}
    return {"url": url, "api_key": ADMIN_KEY, "data_streams": streams}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_collect_runs_until_stopped_then_flushes_saves_and_exits_0(simulator, tmp_path, sig):
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config(simulator.base_url)))
    out, state = tmp_path / "events.ndjson", tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--state-dir", str(state),
         "--output-path", str(out), "--now", str(T0), "--log-level", "ERROR"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and simulator.stats()["requests"] < 3:  # several polls
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.1)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr and stdout == b""  # events went to the file
    assert read_ndjson(out), "the first poll's documents were written"
    store = StateStore(state)
    assert store.pending_count() == 0, "everything emitted was acknowledged before exit"
    assert store.cursor("completions", "1m") is not None


def test_progress_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress(stream=stream)
        p.update("completions", 50, 100)
        p.update("embeddings", 100, 100)
        p.finish()
    assert "backfill:" in tty.getvalue() and "completions" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    assert pipe.getvalue() == ""


def test_collect_keeps_stderr_clean_when_piped(simulator, tmp_path):
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config(simulator.base_url)))
    proc = subprocess.run(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
         "--state-dir", str(tmp_path / "state"), "--now", str(T0), "--log-level", "ERROR"],
        capture_output=True, env={k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"backfill:" not in proc.stderr and b"\r" not in proc.stderr
    assert all(line.startswith(b'{"_id":"') for line in proc.stdout.splitlines())


def test_a_rejected_key_stops_only_its_stream(tmp_path):
    class Rejected:
        name, interval, polls = "audit", 0.01, 0

        def poll(self, now):
            self.polls += 1
            raise AuthenticationError(401, "Incorrect API key provided", "invalid_api_key", "/v1/organization/audit_logs")

    class Healthy:
        name, interval, polls = "completions", 0.01, 0

        def poll(self, now):
            self.polls += 1
            return PollStats()

    rejected, healthy = Rejected(), Healthy()
    statuses: list[tuple[str, str]] = []
    stop = threading.Event()
    engine = Engine([rejected, healthy], Delivery(StateStore(tmp_path / "s"), NdjsonOutput(io.BytesIO())),
                    stop=stop, on_status=lambda s, st, r: statuses.append((s, st)))
    runner = threading.Thread(target=engine.run)
    runner.start()
    deadline = time.monotonic() + 10
    while healthy.polls < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    runner.join(10)
    assert rejected.polls == 1, "a rejected key is not retried forever"
    assert healthy.polls >= 5, "the other stream kept polling"
    assert ("audit", "failed") in statuses and "401" in engine.failed["audit"]
    assert ("completions", "healthy") in statuses


def test_a_lost_outbox_file_is_one_clear_line_with_what_to_do(tmp_path):
    """An unacknowledged batch whose file is gone made every start end in a StateError traceback."""
    from agent_input.state import Cursor

    state = tmp_path / "state"
    store = StateStore(state)
    line = b'{"_id":"x","data_stream":{"dataset":"openai.completions"},"a":"' + b"y" * 400 + b'"}\n'
    store.commit_page("completions", "1m", payload=line * 1000, events=1000, observations=[], cursor=Cursor(0, 0))
    (spool,) = list(store.spool_dir.iterdir())
    spool.unlink()
    store.close()
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump({**_config("http://127.0.0.1:9"), "max_retries": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
         "--state-dir", str(state), "--output-path", str(tmp_path / "events.ndjson"), "--log-level", "CRITICAL"],
        capture_output=True, env={k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}, timeout=60)
    err = proc.stderr.decode()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 1 and "Traceback" not in err and len(lines) == 1, err
    assert spool.name in err and "Restore the missing file" in err and "aside" in err


def test_bad_log_level_is_a_usage_error_not_a_traceback(tmp_path):
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config("http://127.0.0.1:9")))
    proc = subprocess.run(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
         "--state-dir", str(tmp_path / "state"), "--log-level", "FOO"], capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and "Invalid value for '--log-level'" in err, err
    assert not (tmp_path / "state").exists()
