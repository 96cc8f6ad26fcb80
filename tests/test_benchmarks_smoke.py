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
    report = _load().main(["--quick", "--backfill", "1h@1m"])
    printed = capsys.readouterr().out
    for title in ("1. backfills", "2. steady state", "3./4. paths", "mapping + serialization",
                  "NDJSON protocol", "direct output"):
        assert title in printed
    (row,) = report["backfills"]
    assert row["requests"] > 0 and row["events"] > 0 and row["peak_rss_mb"] > 0
    assert row["seed_requests"] >= row["min_requests"] > 0
    assert row["chain"] > 0 and not math.isnan(row["ratio"])
    assert report["steady"]["requests_per_poll"] > 0
    paths = report["paths"]
    assert paths["mapping"]["events"] > 0 and paths["mapping"]["map_per_s"] > 0
    assert paths["protocol"]["per_s"] > 0
    assert paths["es"]["created"] > 0
