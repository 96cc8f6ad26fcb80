"""Shared fixtures: a simulator on loopback and helpers to read collected NDJSON."""
from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent_input.streams import STREAMS_BY_NAME, get_field

# 2026-11-23T10:00:00Z: a fixed, minute-aligned start so tests are reproducible.
T0 = 1763892000.0
ADMIN_KEY = "sk-admin-test-0123456789abcdef"


# What the programs read from the environment: a developer's shell (the README has them export
# OPENAI_ADMIN_KEY and ELASTIC_API_KEY), a CI job set up for the real-cluster tests (ES_URL,
# KIBANA_URL, ELASTIC_USERNAME/ELASTIC_PASSWORD) or a machine behind a proxy must not change what
# a test sees. Tests that want one set it themselves (monkeypatch, a subprocess's or CliRunner's env).
HOST_ENV = ("OPENAI_ADMIN_KEY", "ELASTIC_API_KEY", "ELASTIC_USERNAME", "ELASTIC_PASSWORD", "ELASTIC_CLOUD_ID",
            "ES_URL", "KIBANA_URL", "XDG_STATE_HOME", "NETRC", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
            "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def _no_host_environment(request, monkeypatch):
    """Each test starts without the variables above; the opt-in real-cluster tests keep them."""
    if request.node.get_closest_marker("cluster") is None:
        for name in HOST_ENV:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _restore_logging():
    """`setup_logging` (collect, check and demo run in process by CliRunner; the output tests that
    read the ECS lines) puts a handler on the root logger and sets its level and urllib3's; 13
    tests left them: every later test's records (down to DEBUG after
    test_credentials_are_never_logged) were formatted into a finished test's stream."""
    import logging

    root, urllib3 = logging.getLogger(), logging.getLogger("urllib3")
    handlers, levels = list(root.handlers), (root.level, urllib3.level)
    yield
    for h in list(root.handlers):
        if h not in handlers and not type(h).__module__.startswith("_pytest"):
            root.removeHandler(h)
    root.setLevel(levels[0])
    urllib3.setLevel(levels[1])
    logging.captureWarnings(False)


def started_simulator(seed: int = 7, admin_key: str = ADMIN_KEY):
    """A small organization's simulator at T0, serving on a free port (`base_url`); stop it after."""
    from agent_input.simulator import Simulator

    sim = Simulator(seed=seed, org="small", now=T0, admin_key=admin_key)
    sim.base_url = sim.start()
    return sim


@pytest.fixture
def simulator():
    sim = started_simulator()
    yield sim
    sim.stop()


def read_ndjson(path: Path) -> list[dict]:
    docs = []
    with open(path, "rb") as fh:
        for line in fh:
            docs.append(json.loads(line))
    return docs


def dedupe(docs: list[dict]) -> list[dict]:
    """What an index with create-only `_id`s would keep; fails if one id carries two contents."""
    by_id: dict[str, dict] = {}
    for d in docs:
        prev = by_id.setdefault(d["_id"], d)
        assert prev == d, f"id {d['_id']} was emitted with different content"
    return list(by_id.values())


def stored_totals(docs: list[dict], stream: str, start: int, end: int) -> dict[tuple, dict[str, float]]:
    """Sum of stored documents per group (the spec's group_by), like a dashboard would."""
    from datetime import datetime

    spec = STREAMS_BY_NAME[stream]
    out: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for d in docs:
        if d["data_stream"]["dataset"] != spec.dataset:
            continue
        base = d["openai"]["base"]
        t = datetime.fromisoformat(base["start_time"].replace("Z", "+00:00")).timestamp()
        if not (start <= t < end):
            continue
        section = d["openai"].get(stream, {})
        key = []
        for g in spec.group_by:
            leaf = spec.renames.get(g, g)
            key.append(base.get(g) if g in ("project_id", "user_id", "api_key_id", "model") else section.get(leaf))
        for c in spec.counters:
            leaf = spec.renames.get(c, c)
            v = base.get(c) if c == "num_model_requests" else get_field(section, leaf)
            if v:
                out[tuple(key)][c] += v
    return {k: {c: v for c, v in vals.items() if v} for k, vals in out.items() if any(vals.values())}


def truth_totals(sim, stream: str, start: int, end: int) -> dict[tuple, dict[str, float]]:
    spec = STREAMS_BY_NAME[stream]
    raw = sim.truth(stream, start, end, "1m", spec.group_by)
    return {k: {c: v for c, v in vals.items() if v and c in spec.counters}
            for k, vals in raw.items() if any(vals.get(c) for c in spec.counters)}


def audit_truth(sim, start: int, end: int) -> set[str]:
    """Ids of every audit event with start <= effective_at <= end, from the simulator's own log."""
    ids: set[str] = set()
    hour = start // 3600 * 3600
    while hour <= end:
        ids.update(e["id"] for e in sim.audit.hour_events(hour) if start <= e["effective_at"] <= end)
        hour += 3600
    return ids


def first_poll_held(simulator, store, poll, raises=None) -> None:
    """A first poll at T0 while the organization check holds every write (its projects listing
    failing): it raises (OrganizationUnverified, or `raises` when the poll fails another way
    first), and the check is lifted after it."""
    import pytest

    from agent_input.org_guard import OrganizationUnverified

    def held():
        raise OrganizationUnverified("listing its projects failed: HTTP 500")

    store.write_check = held
    simulator.set_time(T0)
    with pytest.raises(raises or OrganizationUnverified):
        poll(T0)
    store.write_check = None


def committed_batches(state_dir: Path) -> int:
    """How many batches a collector's state store has ever committed (its outbox's AUTOINCREMENT
    sequence), read beside the running collector: the progress that crash tests aim their kills
    at, the same however fast this machine runs the collector. 0 before the store exists."""
    import sqlite3

    try:
        conn = sqlite3.connect(f"file:{Path(state_dir) / 'state.sqlite3'}?mode=ro", uri=True, timeout=0.05)
        try:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet, or busy for a moment: no progress seen
        return 0
    return row[0] if row else 0


def wait_for_commits(state_dir: Path, target: int, alive, timeout: float = 180.0) -> bool:
    """Wait until the store has committed `target` batches in all (True: kill now) or `alive()`
    turns false first (False: the run ended by itself)."""
    import time

    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        if committed_batches(state_dir) >= target:
            return True
        time.sleep(0.003)
    return False


def traced_peak(fn):
    """(fn(), the peak of the Python memory allocated while it ran), by tracemalloc."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@contextmanager
def tls_server(tmp_path: Path, body: bytes):
    """An HTTPS server on loopback with a self-signed certificate, answering every GET with the
    JSON `body`; yields its URL (skips the test where openssl cannot make a certificate)."""
    import ssl
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate here: {exc}")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def sigterm_once_asked(proc, rule, settle: float = 0.3) -> tuple[bytes, float]:
    """SIGTERM to `proc` once the simulator's `rule` (a `slow` fault) has held a request of it
    `settle` seconds: (its stderr, the seconds it took to exit after the signal)."""
    import signal
    import subprocess
    import time

    try:
        deadline = time.monotonic() + 30
        while rule.to_dict()["fired"] == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert rule.to_dict()["fired"] >= 1, f"{rule.path} was never asked for"
        time.sleep(settle)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=90)
        return err, time.monotonic() - started
    except subprocess.TimeoutExpired:
        raise AssertionError("the stop waited more than 90 s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
