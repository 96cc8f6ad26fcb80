"""Smoke test of benchmarks/run.py: the whole machinery on tiny inputs. Figures are printed, never
asserted (the machine is shared); only that every figure is produced."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_produces_every_figure(capsys):
    # 256 MB resident in this process: a collector's ru_maxrss must not start from it (on Linux a
    # child's does start from its parent's RSS when spawned directly, hence the spawner)
    ballast = b"\x01" * (256 << 20)
    report = _load().main(["--quick", "--backfill", "1h@1m"])
    del ballast
    printed = capsys.readouterr().out
    for title in ("1. backfills", "2. steady state", "3./4. paths", "mapping + serialization",
                  "NDJSON protocol", "direct output"):
        assert title in printed
    (row,) = report["backfills"]
    assert row["requests"] > 0 and row["events"] > 0 and row["peak_rss_mb"] > 0
    assert row["seed_requests"] >= row["min_requests"] > 0
    assert row["chain"] > 0 and not math.isnan(row["ratio"])
    # the wall time split by the simulator's clock: its three parts add up to it
    parts = row["before_first_s"] + row["api_span_s"] + row["after_last_s"]
    assert min(row["before_first_s"], row["api_span_s"], row["after_last_s"]) > 0 and not math.isnan(row["span_ratio"])
    assert abs(parts - row["wall_s"]) < 0.05 * row["wall_s"] + 0.01
    assert "where the wall time went" in printed
    # measured as an installed collector starts: from bytecode, not compiling its modules each run
    assert report["bytecode"].startswith("collector bytecode compiled") and report["bytecode"] in printed
    assert (ROOT / "agent_input" / "__pycache__").is_dir()
    assert row["peak_rss_mb"] < 200, "the benchmark's own RSS was counted as the collector's"
    assert report["steady"]["requests_per_poll"] > 0
    paths = report["paths"]
    assert paths["mapping"]["events"] > 0 and paths["mapping"]["map_per_s"] > 0
    assert paths["protocol"]["per_s"] > 0
    assert paths["es"]["created"] > 0
