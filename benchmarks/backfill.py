"""Backfill benchmark: the collector against the simulator on loopback, in separate processes.

Prints, per scenario, the API requests made (and what the seed's default page sizes would need),
wall time, events per second and the collector's peak RSS. Run: `python benchmarks/backfill.py`
(add `--latency-ms 150` to simulate OpenAI's latency, `--org small` for a small organization).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent_input.streams import MAX_LIMIT, USAGE_STREAMS  # noqa: E402

DEFAULT_LIMIT = {"1m": 60, "1h": 24, "1d": 7}
NOW = 1763892000  # 2026-11-23T10:00:00Z
SCENARIOS = {"24h@1m": ("1m", "24h", 86400), "15d@1h": ("1h", "15d", 15 * 86400), "180d@1d": ("1d", "180d", 180 * 86400)}
KEY = "sk-admin-sim"  # the simulator's default admin key


def start_simulator(org: str, latency_ms: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_input.cli", "simulate", "--port", str(port), "--seed", "1",
         "--org", org, "--latency-ms", str(latency_ms), "--now", str(NOW)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/_sim/clock", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("simulator did not start")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sim_requests(url: str) -> int:
    return int(json.loads(urllib.request.urlopen(url + "/_sim/stats").read())["requests"])


def run(scenario: str, url: str, workdir: Path) -> dict:
    width, initial, span = SCENARIOS[scenario]
    streams = {s.name: {"bucket_width": width, "initial_interval": initial} for s in USAGE_STREAMS}
    for other in ("audit", "rate_limits", "costs"):
        streams[other] = {"enabled": False}
    cfg = workdir / f"{scenario}.yml"
    cfg.write_text(yaml.safe_dump({"url": url, "api_key": KEY, "data_streams": streams}))
    out = workdir / f"{scenario}.ndjson"
    before = sim_requests(url)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "agent_input.cli", "collect", "--config", str(cfg), "--once",
         "--state-dir", str(workdir / f"state-{scenario}"), "--output-path", str(out),
         "--now", str(NOW), "--log-level", "ERROR"],
        cwd=ROOT, stderr=subprocess.PIPE,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"collector failed: {proc.stderr.decode()[-2000:]}")
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(out, "rb") as fh:
        events = sum(1 for _ in fh)
    buckets = span // {"1m": 60, "1h": 3600, "1d": 86400}[width]
    return {
        "scenario": scenario,
        "requests": sim_requests(url) - before,
        "seed_requests": len(USAGE_STREAMS) * math.ceil(buckets / DEFAULT_LIMIT[width]),
        "min_requests": len(USAGE_STREAMS) * math.ceil(buckets / MAX_LIMIT[width]),
        "events": events,
        "wall_s": wall,
        "events_per_s": events / wall if wall else 0.0,
        "peak_rss_mb": rss_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--org", default="large", choices=["small", "large"])
    ap.add_argument("--latency-ms", type=int, default=0)
    ap.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    args = ap.parse_args()
    sim, url = start_simulator(args.org, args.latency_ms)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [run(s, url, Path(tmp)) for s in (args.scenario or list(SCENARIOS))]
    finally:
        sim.terminate()
        sim.wait()
    print(f"org={args.org} latency={args.latency_ms}ms streams={len(USAGE_STREAMS)} cpu={os.cpu_count()}")
    print(f"{'scenario':<9}{'requests':>9}{'(seed)':>8}{'events':>10}{'wall s':>9}{'events/s':>11}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['scenario']:<9}{r['requests']:>9}{r['seed_requests']:>8}{r['events']:>10}"
              f"{r['wall_s']:>9.1f}{r['events_per_s']:>11.0f}{r['peak_rss_mb']:>13.0f}")


if __name__ == "__main__":
    main()
