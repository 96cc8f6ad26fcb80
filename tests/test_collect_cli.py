"""`openai-input collect` as a user runs it: until stopped, progress only on a terminal, and a
rejected key stops only its own stream."""
from __future__ import annotations

import io
import logging
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


USAGE_PATH = "/v1/organization/usage/completions"


def _wait_for_polls(simulator, proc, polls: int) -> None:
    """Wait until `collect` (the `_config` one: completions only, one page a poll) has asked for
    the usage page `polls` times: every poll before the last has then stored its documents. Not
    the simulator's request count: the first load of the names (users, projects, each project's
    keys) is counted there too, and a stop while the first page waits for it stores nothing of
    that page (the next start asks again). Under load a signal sent at 3 requests (users,
    projects, the first page) landed there: no document written, 3 runs in 45 of both signals'
    test with -n 2 beside a CPU hog."""
    deadline = time.monotonic() + 60
    while simulator.stats()["by_path"].get(USAGE_PATH, 0) < polls:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, f"no {polls} polls in 60 s: {simulator.stats()['by_path']}"
        time.sleep(0.1)


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
    _wait_for_polls(simulator, proc, 3)  # several polls
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr and stdout == b""  # events went to the file
    assert read_ndjson(out), "the first poll's documents were written"
    store = StateStore(state)
    assert store.pending_count() == 0, "everything emitted was acknowledged before exit"
    assert store.cursor("completions", "1m") is not None


def test_a_second_signal_during_the_first_ones_stop_does_not_hang_the_stop():
    """A stop signal's handler sets the stop event, which takes the event's lock; a second signal
    landing while the first one's set() holds it (two SIGINTs 0.4 ms apart, as `timeout` sends
    them to the process and its group) ran the handler again on the same thread: it waited for
    that lock for ever, and so did every stream thread. 4 of 25 such stops hung."""
    from agent_input.cli import _install_stop_handlers

    class SignalledDuringSet(threading.Event):
        def set(self):
            with self._cond:  # what Event.set holds when the second signal's handler runs
                if not getattr(self, "interrupted", False):
                    self.interrupted = True
                    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
                self._flag = True
                self._cond.notify_all()

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = SignalledDuringSet()
    try:
        _install_stop_handlers(stop)
        first = threading.Thread(target=signal.getsignal(signal.SIGTERM), args=(signal.SIGTERM, None),
                                 daemon=True)
        first.start()
        first.join(10)
        assert not first.is_alive(), "the second signal's handler waits for ever on the stop event's lock"
        assert stop.wait(10) and stop.interrupted
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def test_a_signal_while_the_main_thread_holds_the_stop_event_s_lock_does_not_hang():
    """`run`'s main thread sets the stop event itself: a SIGTERM handled while it is inside
    set() (the handler runs on that same thread) waited for the event's lock for ever. The
    handler takes no lock; the event is set once the lock is free."""
    from agent_input.cli import _install_stop_handlers

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = threading.Event()
    try:
        _install_stop_handlers(stop)
        handler = signal.getsignal(signal.SIGTERM)
        with stop._cond:  # what the interrupted thread holds inside Event.set()
            done = threading.Event()
            t = threading.Thread(target=lambda: (handler(signal.SIGTERM, None), done.set()), daemon=True)
            t.start()
            assert done.wait(10), "the handler waited for the stop event's lock"
        assert stop.wait(10)
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


@pytest.mark.parametrize("command", ["collect", "run", "simulate"])
def test_a_command_run_in_process_gives_the_signals_back_when_it_returns(monkeypatch, tmp_path, command):
    """collect, run and simulate take SIGINT/SIGTERM for their stop and kept them after they
    returned: in a process that goes on (CliRunner, an embedding program, this test suite) Ctrl-C
    and SIGTERM then only set a finished command's stop event, and a relay thread per command
    polled on for ever. After test_no_home_directory_and_no_state_dir_is_one_usage_line_not_a_traceback
    had run, pytest itself ignored Ctrl-C and `timeout`'s SIGTERM."""
    import socket

    from click.testing import CliRunner

    from agent_input.cli import main

    _no_home(monkeypatch)  # collect and run stop at their default state directory, after taking the signals
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config("http://127.0.0.1:9")))
    if command == "run":  # run takes fd 1 for the protocol: keep the test runner's
        import agent_input.protocol as protocol

        monkeypatch.setattr(protocol.ProtocolWriter, "take_stdout",
                            classmethod(lambda cls: cls(os.open(os.devnull, os.O_WRONLY))))
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    before = set(threading.enumerate())
    try:
        with socket.socket() as busy:  # simulate stops at a port in use
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            args = {"collect": ["collect", "--config", str(cfg), "--once"], "run": ["run"],
                    "simulate": ["simulate", "--port", str(busy.getsockname()[1])]}[command]
            result = CliRunner().invoke(main, args, input="")
        assert result.exit_code in (1, 2), (result.output, result.exception)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == saved
        relays = lambda: [t for t in set(threading.enumerate()) - before if t.name == "stop-signals"]  # noqa: E731
        deadline = time.monotonic() + 10
        while relays() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not relays(), "the command's signal relay thread outlived it"
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
        root.handlers[:] = handlers
        root.setLevel(level)


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


def _collect_once(cfg, tmp_path) -> subprocess.CompletedProcess:
    """`collect --once` at T0 into tmp_path's state and events file, without the environment's key."""
    return subprocess.run(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
         "--state-dir", str(tmp_path / "state"), "--output-path", str(tmp_path / "events.ndjson"),
         "--now", str(T0), "--log-level", "CRITICAL"],
        capture_output=True, env={k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}, timeout=120)


def test_once_exits_1_and_its_summary_names_the_stream_that_failed(simulator, tmp_path):
    """A --once run (cron, CI) reports a failed stream in its exit status and in its summary."""
    from agent_input.simulator import FaultRule

    simulator.add_fault(FaultRule(kind="403", path="/v1/organization/usage/embeddings", count=None))
    config = _config(simulator.base_url)
    config["data_streams"]["embeddings"] = {"enabled": True, "initial_interval": "1h"}
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump({**config, "max_retries": 0}))
    proc = _collect_once(cfg, tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    rows = {ln.split()[0]: ln for ln in err.splitlines() if ln.strip()}
    assert "stream" in rows and "documents" in rows["stream"]
    assert "failed: " in rows["embeddings"] and "403" in rows["embeddings"], err
    assert rows["completions"].rstrip().endswith("ok"), err
    assert read_ndjson(tmp_path / "events.ndjson"), "the healthy stream's documents were still written"


def test_once_summary_counts_the_429s_and_the_seconds_waited(simulator, tmp_path):
    """A 429 storm is visible where a cron job's owner looks: the summary row, not only the
    per-retry WARNING lines."""
    from agent_input.simulator import FaultRule

    simulator.add_fault(FaultRule(kind="429", path="/v1/organization/usage/completions", count=2, retry_after=1))
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config(simulator.base_url)))
    proc = _collect_once(cfg, tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    rows = {ln.split()[0]: ln.split() for ln in err.splitlines() if ln.strip()}
    header = rows["stream"]
    assert header[4] == "throttled"
    assert rows["completions"][4:7] == ["2", "(2s", "waited)"], err
    assert rows["completions"][-1] == "ok", err


def test_a_continuous_run_prints_no_summary(simulator, tmp_path):
    """The per-stream table is for --once; a service's stderr stays its logs."""
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config(simulator.base_url)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--state-dir",
         str(tmp_path / "state"), "--output-path", str(tmp_path / "events.ndjson"), "--now", str(T0),
         "--log-level", "ERROR"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"})
    _wait_for_polls(simulator, proc, 2)  # a poll done: a summary would have its row
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"documents" not in stderr and b"completions" not in stderr, stderr.decode()


def _collect_until_the_output_opens(tmp_path, monkeypatch, *args, config=None):
    """`collect` in process up to the output it opens: what it was asked for, or its error."""
    from click.testing import CliRunner

    from agent_input.cli import main

    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(config or _config("http://127.0.0.1:9")))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # the in-process run installs no handlers
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return CliRunner().invoke(main, ["collect", "--config", str(cfg), "--once", "--state-dir",
                                         str(tmp_path / "state"), "--log-level", "CRITICAL", *args],
                                  env={"OPENAI_ADMIN_KEY": None})
    finally:  # the run set up logging to the runner's stderr, closed now
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.handlers[:] = handlers
        root.setLevel(level)


def test_output_options_that_cannot_apply_are_refused(tmp_path, monkeypatch):
    result = _collect_until_the_output_opens(tmp_path, monkeypatch, "--rotate-bytes", "1000")
    assert result.exit_code == 1 and "--rotate-bytes needs --output-path" in result.output, result.output
    result = _collect_until_the_output_opens(tmp_path, monkeypatch, "--output", "elasticsearch",
                                             "--es-url", "http://127.0.0.1:9", "--output-path", str(tmp_path / "x"))
    assert result.exit_code == 1 and "are for --output ndjson, not elasticsearch" in result.output, result.output
    # forgetting --output elasticsearch (or --rotate-bytes) must not quietly write NDJSON (or never rotate)
    for args, says in ((("--es-url", "http://127.0.0.1:9"), "--es-url/--es-ca-file are for --output elasticsearch"),
                       (("--es-ca-file", str(tmp_path / "ca.pem")), "--es-url/--es-ca-file are for --output elasticsearch"),
                       (("--output-path", str(tmp_path / "e.ndjson"), "--rotate-keep", "10"),
                        "--rotate-keep needs --rotate-bytes")):
        result = _collect_until_the_output_opens(tmp_path, monkeypatch, *args)
        assert result.exit_code == 1 and says in result.output, (args, result.output)
    assert not (tmp_path / "e.ndjson").exists()


def test_output_defaults_and_flags_reach_the_output(tmp_path, monkeypatch):
    """--rotate-keep defaults to 5; --es-ca-file wins over the config's es_ssl_ca_file."""
    from agent_input import es_output, outputs

    seen = {}

    def capture(name):
        def fake(*args, **kwargs):
            seen[name] = (args, kwargs)
            raise outputs.OutputError(f"{name} captured")
        return fake

    monkeypatch.setattr(outputs, "NdjsonFileOutput", capture("file"))
    monkeypatch.setattr(es_output, "make_client", capture("es"))
    result = _collect_until_the_output_opens(tmp_path, monkeypatch, "--output-path", str(tmp_path / "e.ndjson"),
                                             "--rotate-bytes", "4096")
    assert "file captured" in result.output
    stop = seen["file"][1].pop("stop")  # ends the wait for a FIFO's reader
    assert seen["file"][1] == {"rotate_bytes": 4096, "rotate_keep": 5} and not stop.is_set()
    config_ca, flag_ca = tmp_path / "config-ca.pem", tmp_path / "flag-ca.pem"
    for f in (config_ca, flag_ca):
        f.write_text("-----BEGIN CERTIFICATE-----\n")
    config = {**_config("http://127.0.0.1:9"), "es_url": "https://es.example:9200", "es_ssl_ca_file": str(config_ca)}
    result = _collect_until_the_output_opens(tmp_path, monkeypatch, "--output", "elasticsearch", config=config)
    assert "es captured" in result.output and seen["es"][1]["ca_file"] == str(config_ca)
    result = _collect_until_the_output_opens(tmp_path, monkeypatch, "--output", "elasticsearch",
                                             "--es-ca-file", str(flag_ca), config=config)
    assert seen["es"][1]["ca_file"] == str(flag_ca)


def test_es_url_flag_wins_over_the_configs_cloud_id(tmp_path, monkeypatch):
    """--es-url on the command line overrides the config's es_cloud_id, as it does es_url."""
    from agent_input import es_output, outputs

    seen = {}

    def capture(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise outputs.OutputError("es captured")

    monkeypatch.setattr(es_output, "make_client", capture)
    config = {**_config("http://127.0.0.1:9"), "es_cloud_id": "deploy:ZXhhbXBsZS5jb20kYSRi"}
    result = _collect_until_the_output_opens(tmp_path, monkeypatch, "--output", "elasticsearch",
                                             "--es-url", "http://127.0.0.1:9200", config=config)
    assert "es captured" in result.output, result.output
    assert seen["args"] == ("http://127.0.0.1:9200",) and seen["kwargs"]["cloud_id"] is None
    result = _collect_until_the_output_opens(tmp_path, monkeypatch, "--output", "elasticsearch", config=config)
    assert seen["args"] == (None,) and seen["kwargs"]["cloud_id"] == "deploy:ZXhhbXBsZS5jb20kYSRi"


def test_default_state_dir_follows_xdg_state_home(monkeypatch, tmp_path):
    from pathlib import Path

    from agent_input.cli import _default_state_dir

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert _default_state_dir() == str(tmp_path / "xdg" / "openai-input")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert _default_state_dir() == str(Path.home() / ".local" / "state" / "openai-input")


def _no_home(monkeypatch):
    """A container's arbitrary user: no $HOME and no passwd entry, so there is no home directory."""
    from pathlib import Path

    def home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(home))


@pytest.mark.parametrize("command", ["collect", "run"])
def test_no_home_directory_and_no_state_dir_is_one_usage_line_not_a_traceback(monkeypatch, tmp_path, command):
    """Started without --state-dir by a user with no home (OpenShift's random uid, a bare
    `docker run --user`), collect and run died with a RuntimeError traceback from Path.home()."""
    from click.testing import CliRunner

    from agent_input.cli import main

    _no_home(monkeypatch)
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config("http://127.0.0.1:9")))
    args = (["collect", "--config", str(cfg), "--once", "--output-path", str(tmp_path / "events.ndjson")]
            if command == "collect" else ["run"])
    if command == "run":  # run takes fd 1 for the protocol: keep the test runner's
        import agent_input.protocol as protocol

        monkeypatch.setattr(protocol.ProtocolWriter, "take_stdout",
                            classmethod(lambda cls: cls(os.open(os.devnull, os.O_WRONLY))))
    result = CliRunner().invoke(main, args, input="")
    assert result.exit_code == 2, (result.output, result.exception)
    assert "no home directory for the default state directory: give --state-dir" in result.output
    assert not isinstance(result.exception, RuntimeError)


def test_now_without_an_offset_is_utc(monkeypatch):
    """`--now 2026-11-23T10:00:00` is the same instant on every machine, whatever its time zone."""
    from datetime import datetime, timezone

    from agent_input.cli import _parse_now

    if not hasattr(time, "tzset"):
        pytest.skip("no time.tzset on this platform")
    utc = datetime(2026, 11, 23, 10, tzinfo=timezone.utc).timestamp()
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        for text in ("2026-11-23T10:00:00", "2026-11-23T10:00:00Z", "2026-11-23T05:00:00-05:00", str(utc)):
            assert _parse_now(text) == utc, text
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e20", "-5", "0001-01-01T00:00:00"])
def test_a_now_that_is_no_time_is_refused(text):
    """`--now nan` was accepted; then every stream failed every poll: "cannot convert float NaN to integer"."""
    import click

    from agent_input.cli import _parse_now

    with pytest.raises(click.BadParameter, match="not a time from 1970 to 9999"):
        _parse_now(text)


@pytest.mark.parametrize("text, now", [("0", 0), ("1970-01-01T00:00:00Z", 0), ("253402300799", 253402300799),
                                       ("9999-12-31T23:59:59Z", 253402300799)])
def test_a_now_at_either_end_of_the_range_is_taken(text, now):
    """The help says from 1970 to 9999: its first and last seconds are times too."""
    from agent_input.cli import _parse_now

    assert _parse_now(text) == now


@pytest.mark.parametrize("command", ["collect", "run", "simulate"])
def test_a_now_that_is_no_time_is_one_usage_line_before_anything_starts(tmp_path, command):
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config("http://127.0.0.1:9")))
    args = {"collect": ["--config", str(cfg), "--once", "--state-dir", str(tmp_path / "state")],
            "run": ["--state-dir", str(tmp_path / "state")], "simulate": ["--port", "0"]}[command]
    proc = subprocess.run([sys.executable, "-m", "agent_input.cli", command, *args, "--now", "nan"],
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "Invalid value for '--now': 'nan' is not a time from 1970 to 9999" in err, err
    assert not (tmp_path / "state").exists()


def test_demo_shows_every_usage_total_equal_to_the_simulators_final_truth(tmp_path):
    """`openai-input demo`, the first thing a user runs: each usage-like dataset's settled total
    next to OpenAI's (the simulator's) final one, and a note for audit and rate limits."""
    from agent_input.streams import STREAMS_BY_NAME

    out = tmp_path / "demo.ndjson"
    proc = subprocess.run([sys.executable, "-m", "agent_input.cli", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"})
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("backfill")}
    assert set(STREAMS_BY_NAME) | {"audit", "rate_limits"} <= set(rows), proc.stdout
    for name, spec in STREAMS_BY_NAME.items():
        row = rows[name]
        assert f"{spec.counters[0]}: " in row and row.endswith(" exact"), row
        got, final = row.split(f"{spec.counters[0]}: ")[1].rsplit(" ", 1)[0].split(" / ")
        assert got == final and got not in ("0", "0.0"), row
        assert ("." in got) == (name == "costs"), f"an amount to the cent, a count whole: {row}"
    assert "audit events: " in rows["audit"] and "limits: " in rows["rate_limits"]
    assert sum(int(rows[n].split()[2]) for n in STREAMS_BY_NAME) > 0, "the second poll brings late revisions"
    assert len(read_ndjson(out)) == sum(int(rows[n].split()[1]) for n in rows if n in set(STREAMS_BY_NAME) | {"audit", "rate_limits"})


def test_a_second_collector_on_the_same_state_dir_stops_at_once_with_one_line(tmp_path):
    """Two collectors on one --state-dir both emitted every page, and the second's start-up could
    delete the first's outbox files; now the second stops before it touches the state or output."""
    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    running = StateStore(state)  # the first collector
    out.write_bytes(b'{"_id":"a"}\n{"_id":"b","half-writ')  # its output, a batch being written
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump({**_config("http://127.0.0.1:9"), "max_retries": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
         "--state-dir", str(state), "--output-path", str(out), "--log-level", "CRITICAL"],
        capture_output=True, env={k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}, timeout=60)
    running.close()
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip() == f"openai-input: state directory {state} is in use by another collector (pid {os.getpid()})"
    assert out.read_bytes() == b'{"_id":"a"}\n{"_id":"b","half-writ', "the first collector's output was touched"


PREVIOUS_RUN = """
import os, sys
from agent_input.state import StateStore, Cursor
s = StateStore(sys.argv[1])
s._conn().execute("PRAGMA wal_autocheckpoint=0")
s.commit_page("completions", "1m", payload=b'{"_id":"x1","a":1}\\n', events=1, observations=[], cursor=Cursor(0, 0))
for i in range(20):
    s.commit_events("audit", b"", 0, {f"k{i}": "v" * 3000})
os._exit(0)  # killed: its write-ahead log is not checkpointed
"""


def test_a_full_disk_while_re_sending_is_one_line_and_the_batch_is_kept(tmp_path):
    """The restarted collector re-sends a kept batch, and deleting it from the outbox fails (the
    disk is full: here, a file size limit below the state's write-ahead log). It was a
    sqlite3.OperationalError traceback, then a failed run saying the batch was not delivered; it
    was: the closing line says so, and that it is sent again at the next start."""
    import resource

    state, out = tmp_path / "state", tmp_path / "events.ndjson"
    subprocess.run([sys.executable, "-c", PREVIOUS_RUN, str(state)], check=True, timeout=60)
    assert (state / "state.sqlite3-wal").stat().st_size > 40000
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump({**_config("http://127.0.0.1:9"), "max_retries": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
         "--state-dir", str(state), "--output-path", str(out), "--log-level", "CRITICAL"],
        capture_output=True, env={k: v for k, v in os.environ.items() if k != "OPENAI_ADMIN_KEY"}, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000)))
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err  # 1: the API (port 9) refuses the poll
    assert err.splitlines()[-1] == (f"1 batch(es) were delivered but could not be deleted from the outbox ({state}): "
                                    "they are sent again at the next start, duplicates by _id"), err
    assert "not delivered yet" not in err and "Restore the missing file" not in err
    assert read_ndjson(out) == [{"_id": "x1", "a": 1}]
    store = StateStore(state)
    assert [b.payload for b in store.pending()] == [b'{"_id":"x1","a":1}\n'], "the batch must stay in the outbox"
    store.close()


def test_demo_reports_a_state_error_in_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from agent_input import app
    from agent_input.cli import main
    from agent_input.state import StateError

    def full(*a, **kw):
        raise StateError("cannot write state file /tmp/x/state.sqlite3: disk I/O error (is the disk full?)")

    monkeypatch.setattr(app, "build", full)
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo.ndjson")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().splitlines()[-1] == ("openai-input: cannot write state file /tmp/x/state.sqlite3: "
                                                       "disk I/O error (is the disk full?)")


def test_demo_out_under_a_file_says_so_in_one_line(tmp_path):
    """`demo --out` whose folder cannot be made (a file stands there; a read-only disk) was a
    FileExistsError/OSError traceback, and the simulator had already started."""
    from click.testing import CliRunner

    from agent_input.cli import main

    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "demo.ndjson"
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().splitlines() == [f"openai-input: cannot write the demo's events to {out}: a file is in the way of its folder"]


def test_collect_started_with_stdout_closed_says_so_in_one_line(tmp_path):
    """`collect >&-` without --output-path: sys.stdout is None, and the ndjson output was an
    AttributeError traceback; now one line, exit 1, before any request."""
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config("http://127.0.0.1:9")))
    proc = subprocess.run([sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
                           "--state-dir", str(tmp_path / "state")],
                          stderr=subprocess.PIPE, text=True, timeout=60, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("openai-input: stdout is closed: nothing can receive the events "
                                                    "(give --output-path, or run it with stdout open)")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("argv", [["agent_input.cli", "--help"], ["agent_input.cli", "--version"],
                                  ["kibana_assets.cli", "validate"]])
def test_a_full_stdout_is_one_line_not_a_traceback(argv):
    """`openai-input --help > file-on-a-full-disk`: click.echo's OSError (ENOSPC) was a traceback;
    click handles only EPIPE."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", *argv], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    prog = "openai-assets" if argv[0].startswith("kibana") else "openai-input"
    assert proc.returncode == 1
    assert proc.stderr == f"{prog}: cannot write to stdout: No space left on device\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_batches_left_from_a_run_before_that_cannot_be_resent_are_counted_at_exit(tmp_path):
    """The outbox of a run before is re-sent first; an output that refuses it (stdout on a full
    disk) ended with only "cannot write events: ...", not how many batches wait in the outbox, as
    the closing line says when a stream's batch is refused."""
    store = StateStore(tmp_path / "state")
    store.commit_events("completions", b'{"_id":"a"}\n', 1, {})
    store.commit_events("completions", b'{"_id":"b"}\n', 1, {})
    store.close()
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config("http://127.0.0.1:9")))
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
                               "--state-dir", str(tmp_path / "state"), "--log-level", "ERROR"],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "openai-input: cannot write events: [Errno 28] No space left on device; 2 batch(es) not delivered yet "
        f"wait in the outbox ({tmp_path / 'state'}) and are sent first at the next start")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_log_disk_does_not_fail_a_once_run_that_delivered_everything(simulator, tmp_path):
    """stderr on a full disk (`2>>/var/log/openai.log`): the closing summary's click.echo raised
    OSError out of `collect --once`, which exited 1 (a traceback nobody could read) although
    every stream had collected and every batch was delivered."""
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(_config(simulator.base_url)))
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once", "--state-dir",
             str(tmp_path / "state"), "--output-path", str(tmp_path / "events.ndjson"), "--now", str(T0)],
            stdout=subprocess.PIPE, stderr=full, timeout=120)
    assert proc.returncode == 0
    assert read_ndjson(tmp_path / "events.ndjson")
    assert StateStore(tmp_path / "state").pending_count() == 0


@pytest.mark.parametrize("case", ["usage-page-after-delivered-ones", "rate-limits-refused", "audit-slice-after-stored-ones"])
def test_once_summary_counts_what_a_failed_stream_delivered_before_it_failed(simulator, tmp_path, case):
    """A stream that delivered documents and then failed (a later page's 5xx; a rate-limits cycle
    stored, then stopped for a missing scope; an audit slice stored, the next one's 5xx) showed 0 documents and 0 requests in the summary,
    while the events file held its documents: the summary is what a cron job's owner reconciles."""
    from agent_input.simulator import FaultRule

    config = _config(simulator.base_url)
    if case == "rate-limits-refused":
        config["data_streams"]["completions"] = {"enabled": False}
        config["data_streams"]["rate_limits"] = {"enabled": True}
        simulator.add_fault(FaultRule(kind="403", path="*/rate_limits", count=None,
                                      message="Missing scopes: api.management.read"))
        stream, dataset = "rate_limits", "openai.rate_limits"
    elif case == "audit-slice-after-stored-ones":  # 6h slices of 2 days: the second fails for good
        config["data_streams"]["completions"] = {"enabled": False}
        config["data_streams"]["audit"] = {"enabled": True, "initial_interval": "2d"}
        simulator.add_fault(FaultRule(kind="500", path="audit_logs", skip=1, count=None))
        stream, dataset = "audit", "openai.audit"
    else:  # two pages (1,440 one-minute buckets each): the second fails for good
        config["data_streams"]["completions"] = {"initial_interval": "2d"}
        simulator.add_fault(FaultRule(kind="500", path="usage/completions", skip=1, count=None))
        stream, dataset = "completions", "openai.completions"
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump({**config, "max_retries": 0}))
    proc = _collect_once(cfg, tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    written = sum(1 for d in read_ndjson(tmp_path / "events.ndjson") if d["data_stream"]["dataset"] == dataset)
    assert written > 0, err
    row = next(ln for ln in err.splitlines() if ln.split()[:1] == [stream])
    assert f" {written:,} " in f" {row} " or f" {written} " in f" {row} ", (written, err)


@pytest.mark.parametrize("stopped, waits", [(True, [0]), (False, [None])])
def test_a_stopped_collection_does_not_wait_for_the_name_cache_s_listing(stopped, waits):
    """A SIGTERM to `collect`: a projects listing that hung held its exit up 5 s (the name cache's
    close waits that long for a listing in flight). Once the stop is set the collection's close
    waits for none; without a stop the cache's own wait stands."""
    import threading
    from types import SimpleNamespace

    from agent_input.app import Collection

    got = []

    class Names:
        def close(self, timeout=None):
            got.append(timeout)

    stop = threading.Event()
    if stopped:
        stop.set()
    Collection(SimpleNamespace(stop=stop, collectors=[]), SimpleNamespace(close=lambda: None), [], Names()).close()
    assert got == waits
