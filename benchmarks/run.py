"""Every figure of issue 6 in one command, printed as tables.

    python benchmarks/run.py            # the default run (a few minutes on 2 cores)
    python benchmarks/run.py --quick    # a smoke run on tiny inputs (seconds; used by the tests)
    python benchmarks/run.py --full     # adds the large-org 180d@1d backfill (5-10 minutes, simulator-bound)

What it measures (the simulator always runs in its own process, as the real API would be remote):

1. Backfills of every usage stream (the ten of streams.USAGE_STREAMS) for a large and a small
   organization: 24h at 1m, 15 days at 1h, 180 days at 1d, each with a simulated API latency
   (default 150 ms). The collector is a separate `openai-input collect --once` process, started
   by a small spawner process, so its peak RSS and CPU come from wait4() of that process alone
   (not from this one's RSS, see SPAWNER). Per run: API requests made, what the
   seed's default page sizes (60/24/7 buckets) would need, events, wall time, events/s, peak RSS,
   collector CPU, and the critical path: the longest chain of dependent requests x latency, i.e.
   the most pages any one stream needed, or the name cache's listings if that chain is longer
   (the users' pages beside the projects' and then each project's keys, on
   names.LISTING_WORKERS workers, from the collector's start). The ratio wall / critical path is
   what "streams fetched concurrently" is judged by (target <= 1.3). Each backfill runs twice
   from an empty state: cold, then warm against the simulator's response cache
   (`simulate --cache-responses`), so that the measured run meets an API that answers in its
   simulated latency instead of one that also generates every page on the collector's own two
   cores. The warm run is the figure; the cold one is
   printed beside it. The wall time is also split, by the simulator's record of its first request
   and last answer, into the process before its first request, the API span and the time after
   the last answer.
2. Steady state: after the large-org 24h@1m backfill, one long-lived collector (in this process,
   the simulator still remote) polls every 5 simulated minutes with the default revision window
   (3h at 1m); requests and CPU seconds per poll (the first poll, which loads the name cache, is
   reported apart).
3. The mapping and serialization path alone (API results -> ECS -> NDJSON bytes: the engine's
   compare/extract and ecs.mapper + to_ndjson_line), on one core, over real simulator pages
   of every stream; JSON parsing of the pages is shown apart.
4. The NDJSON protocol path (`openai-input run`: outbox payload -> protocol `event` messages on
   stdout) and the direct Elasticsearch output path (payload -> bulk `create` into a recording
   fake of the bulk API, tests/fake_es.py, in its own process).

Figures are printed, never asserted: the machine is shared, so compare runs on the same load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent_input.streams import MAX_LIMIT, USAGE_STREAMS, WIDTH_SECONDS  # noqa: E402
from agent_input.names import LISTING_WORKERS  # noqa: E402

SEED_DEFAULT_LIMIT = {"1m": 60, "1h": 24, "1d": 7}  # the seed's default page sizes
NOW = 1763892000  # 2026-11-23T10:00:00Z
KEY = "sk-admin-sim"  # the simulator's default admin key
BACKFILLS = {"24h@1m": ("1m", 86400), "15d@1h": ("1h", 15 * 86400), "180d@1d": ("1d", 180 * 86400)}
QUICK_BACKFILLS = {"1h@1m": ("1m", 3600), "2d@1h": ("1h", 2 * 86400), "14d@1d": ("1d", 14 * 86400)}
NAME_PATHS = re.compile(r"^/v1/organization/(projects|users)(/[^/]+/api_keys)?$")


def _names_chain(names_paths: dict[str, int]) -> int:
    """The name cache's chain of dependent requests: the users' pages one after another on one
    of LISTING_WORKERS workers, beside the projects pages (they give the ids) and then every
    project's keys on the other workers. It starts when the collector starts (names.warm_up),
    beside the first usage requests."""
    projects = names_paths.get("/v1/organization/projects", 0)
    users = names_paths.get("/v1/organization/users", 0)
    keys = sum(n for p, n in names_paths.items() if p.endswith("/api_keys"))
    return max(users, projects + math.ceil(keys / (LISTING_WORKERS - 1))) if names_paths else 0


# -- processes -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sim:
    """`openai-input simulate` in its own process."""

    def __init__(self, org: str, latency_ms: int):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent_input.cli", "simulate", "--port", str(self.port), "--seed", "1",
             "--org", org, "--latency-ms", str(latency_ms), "--now", str(NOW), "--cache-responses"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(400):
            try:
                self.get("/_sim/clock")
                return
            except OSError:
                time.sleep(0.05)
        self.close()
        raise SystemExit("the simulator did not start")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        return self.get("/_sim/stats")

    def reset_stats(self) -> dict:
        return self.post("/_sim/stats", {})

    def cpu(self) -> float:
        try:
            import psutil

            t = psutil.Process(self.proc.pid).cpu_times()
            return t.user + t.system
        except Exception:  # noqa: BLE001 - psutil missing or process gone: no figure
            return float("nan")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _delta(before: dict, after: dict) -> dict[str, int]:
    a, b = after.get("by_path", {}), before.get("by_path", {})
    return {p: n - b.get(p, 0) for p, n in a.items() if n - b.get(p, 0)}


def _config(url: str, width: str, initial_s: int, streams=None) -> dict:
    names = streams or [s.name for s in USAGE_STREAMS]
    ds = {s.name: ({"bucket_width": width, "initial_interval": f"{initial_s}s"} if s.name in names
                   else {"enabled": False}) for s in USAGE_STREAMS}
    for other in ("audit", "rate_limits", "costs"):
        ds[other] = {"enabled": False}
    # The simulator builds day buckets from its minutes: a month of a large org's days can take it
    # longer than the collector's default 30 s read timeout. That is the simulator's cost, not
    # OpenAI's, so the benchmark waits for it rather than measuring retries.
    return {"url": url, "api_key": KEY, "http_timeout": "10m", "data_streams": ds}


# -- 1. backfills ----------------------------------------------------------------------------------
# The collector is started by this small process, not by the benchmark itself: on Linux a child's
# ru_maxrss starts from its parent's RSS when it was spawned (exec keeps the old memory's high-water
# mark), and the benchmark holds a large org's steady-state collection by the time the small org
# runs. The spawner also takes the times, so its own start-up is not in them.
SPAWNER = """
import json, os, subprocess, sys, time
t0, spawned = time.perf_counter(), time.time()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
wall, ended = time.perf_counter() - t0, time.time()
sys.stderr.buffer.write(err)
print(json.dumps({"exit": os.waitstatus_to_exitcode(status), "wall": wall, "spawned": spawned, "ended": ended,
                  "maxrss_kb": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime}))
"""


def _collect_once(sim: Sim, cfg: Path, state: Path, out: Path, label: str) -> dict:
    """One `collect --once` backfill from an empty state: its wall time, wait4() usage and the
    simulator's requests and CPU while it ran."""
    sim.post("/_sim/clock", {"now": NOW})  # the same clock: the same answers, from the cache if warm
    before, sim_cpu0 = sim.reset_stats(), sim.cpu()
    # Previous runs' output still being written back by the kernel would land in this run's
    # fsyncs (a large backfill leaves ~1 GB of dirty pages): each run starts with none.
    os.sync()
    spawn = subprocess.run(
        [sys.executable, "-S", "-c", SPAWNER, sys.executable, "-m", "agent_input.cli", "collect", "--config",
         str(cfg), "--once", "--state-dir", str(state), "--output-path", str(out), "--now", str(NOW),
         "--log-level", "ERROR"],
        cwd=ROOT, capture_output=True,
    )
    try:
        run = json.loads(spawn.stdout)
    except ValueError:
        raise SystemExit(f"collector spawner failed ({label}): {spawn.stderr.decode()[-2000:]}") from None
    if run["exit"] != 0:
        raise SystemExit(f"collector failed ({label}): {spawn.stderr.decode()[-2000:]}")
    after = sim.stats()
    # the simulator's wall times of the first request and the last answer (same machine, same
    # clock) split the wall time in three: the process before its first request, the API span,
    # and what the process did after its last answer (the last pages' mapping, commits, exit)
    first, last = after["first_request_at"], after["last_answer_at"]
    return {"wall": run["wall"], "peak_rss_mb": run["maxrss_kb"] / 1024, "cpu": run["cpu"],
            "by_path": _delta(before, after), "sim_cpu": sim.cpu() - sim_cpu0,
            "before_first_s": first - run["spawned"], "api_span_s": last - first,
            "after_last_s": run["ended"] - last}


def backfill(sim: Sim, org: str, name: str, width: str, span: int, latency_ms: int, workdir: Path) -> dict:
    """The backfill twice from an empty state: cold (the simulator generates every page, on the
    collector's two cores) and warm (the same requests answered from the simulator's response
    cache after the simulated latency, as a remote API would). The warm run is the measurement;
    the cold wall time is printed beside it."""
    cfg = workdir / f"{org}-{name}.yml"
    cfg.write_text(yaml.safe_dump(_config(sim.url, width, span)))
    out = workdir / f"{org}-{name}.ndjson"
    state = workdir / f"state-{org}-{name}"
    cold = _collect_once(sim, cfg, workdir / f"cold-state-{org}-{name}", workdir / "cold.ndjson",
                         f"{org} {name}, cold")
    (workdir / "cold.ndjson").unlink()
    run = _collect_once(sim, cfg, state, out, f"{org} {name}")
    by_path, wall = run["by_path"], run["wall"]
    usage_paths = {p: n for p, n in by_path.items() if "/usage/" in p}
    names_paths = {p: n for p, n in by_path.items() if NAME_PATHS.match(p)}
    per_stream = {p.rsplit("/", 1)[1]: n for p, n in usage_paths.items()}
    long_pole, pole_pages = max(per_stream.items(), key=lambda kv: kv[1]) if per_stream else ("-", 0)
    names_chain = _names_chain(names_paths)
    chain = max(pole_pages, names_chain)
    with open(out, "rb") as fh:
        events = sum(1 for _ in fh)
    buckets = span // WIDTH_SECONDS[width]
    critical = chain * latency_ms / 1000
    return {
        "org": org, "backfill": name, "requests": sum(usage_paths.values()),
        "names_requests": sum(names_paths.values()),
        "seed_requests": len(USAGE_STREAMS) * math.ceil(buckets / SEED_DEFAULT_LIMIT[width]),
        "min_requests": len(USAGE_STREAMS) * math.ceil(buckets / MAX_LIMIT[width]),
        "events": events, "wall_s": wall, "events_per_s": events / wall if wall else 0.0,
        "peak_rss_mb": run["peak_rss_mb"], "cpu_s": run["cpu"],
        "sim_cpu_s": run["sim_cpu"], "cold_wall_s": cold["wall"], "cold_sim_cpu_s": cold["sim_cpu"],
        "cold_ratio": cold["wall"] / critical if critical else float("nan"),
        "long_pole": f"{long_pole} ({pole_pages} pages)" if pole_pages >= names_chain else f"names ({names_chain} deep)",
        "usage_chain": pole_pages, "chain": chain, "critical_s": critical,
        "ratio": wall / critical if critical else float("nan"),
        "before_first_s": run["before_first_s"], "api_span_s": run["api_span_s"], "after_last_s": run["after_last_s"],
        "span_ratio": run["api_span_s"] / critical if critical else float("nan"),
        "state": str(state), "config": str(cfg),
    }


# -- 2. steady state -------------------------------------------------------------------------------
def steady_state(sim: Sim, cfg_path: Path, state: str, polls: int, workdir: Path) -> dict:
    from agent_input import app, memory
    from agent_input.config import load_config
    from agent_input.outputs import NdjsonFileOutput

    config = load_config(cfg_path)
    clock = {"now": float(NOW)}
    output = NdjsonFileOutput(workdir / "steady.ndjson")
    memory.tune()  # as the commands do (app.build leaves the process's malloc alone)
    collection = app.build(config, state_dir=state, output=output, clock=lambda: clock["now"])
    rows = []
    try:
        for i in range(polls + 1):
            clock["now"] = NOW + 300 * (i + 1)
            sim.post("/_sim/clock", {"now": clock["now"]})
            before = sim.stats()
            c0, t0 = time.process_time(), time.perf_counter()
            collection.engine.run(once=True)
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            d = _delta(before, sim.stats())
            rows.append({"usage_requests": sum(n for p, n in d.items() if "/usage/" in p),
                         "names_requests": sum(n for p, n in d.items() if NAME_PATHS.match(p)),
                         "cpu_s": cpu, "wall_s": wall})
    finally:
        collection.close()
        output.close()
    events = sum(t.events for t in collection.engine.totals.values())
    corrections = sum(t.corrections for t in collection.engine.totals.values())
    later = rows[1:] or rows
    return {
        "first_poll": rows[0], "polls": len(later),
        "requests_per_poll": sum(r["usage_requests"] + r["names_requests"] for r in later) / len(later),
        "cpu_s_per_poll": sum(r["cpu_s"] for r in later) / len(later),
        "wall_s_per_poll": sum(r["wall_s"] for r in later) / len(later),
        "events": events, "corrections": corrections,
    }


# -- 3./4. in-process paths ------------------------------------------------------------------------
def sample_pages(org: str, hours: int) -> list[tuple[object, bytes]]:
    """One page per usage stream, as the API serves it (bytes), `hours` of 1m buckets."""
    from urllib.parse import urlencode

    from agent_input.simulator import Simulator
    from agent_input.simulator.server import Api

    sim = Simulator(seed=1, org=org, now=NOW)
    api = Api(sim)
    pages = []
    for spec in USAGE_STREAMS:
        q = urlencode([("start_time", NOW - hours * 3600), ("end_time", NOW), ("bucket_width", "1m"),
                       ("limit", 1440)] + [("group_by", g) for g in spec.group_by])
        _, body = api.handle(spec.path, q)
        import orjson

        pages.append((spec, orjson.dumps(body)))
    return pages


def _collector(spec):
    from types import SimpleNamespace

    from agent_input.engine import Delivery, UsageCollector

    cfg = SimpleNamespace(name=spec.name, bucket_width="1m", interval=300, initial_interval=86400,
                          finalization_grace=0, effective_revision_window=3 * 3600)
    return UsageCollector(spec, cfg, None, Delivery(None, None), clock=lambda: NOW)


def _map_pages(parsed) -> list[tuple[str, bytes, int]]:
    from agent_input.engine import PollStats

    out = []
    for spec, col, body in parsed:
        lines = bytearray()
        updates: list = []
        stats = PollStats()
        events = 0
        for b in body["data"]:
            events += col._diff_bucket(b, b["start_time"], b["end_time"], {}, "2026-11-23T10:00:00.000Z", lines,
                                       updates, stats)
        out.append((spec.name, bytes(lines), events))
    return out


def mapping_path(pages, repeat: int) -> dict:
    import orjson

    results = sum(len(b["results"]) for _, raw in pages for b in orjson.loads(raw)["data"])
    best_parse = best_map = float("inf")
    payloads = []
    for _ in range(repeat):
        c0 = time.process_time()
        parsed = [(spec, _collector(spec), orjson.loads(raw)) for spec, raw in pages]
        c1 = time.process_time()
        payloads = _map_pages(parsed)
        c2 = time.process_time()
        best_parse, best_map = min(best_parse, c1 - c0), min(best_map, c2 - c1)
    events = sum(n for _, _, n in payloads)
    return {"results": results, "events": events, "bytes": sum(len(p) for _, p, _ in payloads),
            "parse_per_s": results / best_parse, "map_per_s": events / best_map,
            "both_per_s": events / (best_parse + best_map), "payloads": payloads}


def protocol_path(payloads, repeat: int) -> dict:
    from agent_input.protocol import ProtocolOutput, ProtocolWriter

    fd = os.open(os.devnull, os.O_WRONLY)
    writer = ProtocolWriter(fd)
    out = ProtocolOutput(writer, ack_on_flush=True, max_inflight=1 << 20)
    events = sum(n for _, _, n in payloads)
    best = float("inf")
    try:
        for r in range(repeat):
            c0 = time.process_time()
            for stream, payload, n in payloads:
                # a unique payload each round: the output folds replays of a batch it has in flight
                out.send(stream, payload + b" " * r, n, lambda: None)
            best = min(best, time.process_time() - c0)
    finally:
        writer.close()
    return {"events": events, "per_s": events / best}


def es_path(payloads, repeat: int) -> dict:
    code = ("import sys, time; sys.path.insert(0, %r); from fake_es import FakeElasticsearch; "
            "es = FakeElasticsearch('8.18.0'); print(es.url, flush=True); sys.stdin.read()") % str(ROOT / "tests")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    url = proc.stdout.readline().decode().strip()
    events = sum(n for _, _, n in payloads)
    try:
        from agent_input.es_output import ElasticsearchOutput, make_client

        with tempfile.TemporaryDirectory() as tmp:
            out = ElasticsearchOutput(make_client(url, env={}), state_dir=tmp)
            best_wall = best_cpu = float("inf")
            acked = 0
            for r in range(repeat):
                c0, t0 = time.process_time(), time.perf_counter()
                for stream, payload, n in payloads:
                    if r:  # new ids each round, or the fake would answer 409 for everything
                        payload = payload.replace(b'{"_id":"', b'{"_id":"r%d' % r)
                    out.send(stream, payload, n, lambda: None)
                best_wall = min(best_wall, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            acked = out.created
            out.close()
    finally:
        proc.stdin.close()
        proc.wait(10)
    return {"events": events, "per_s_wall": events / best_wall, "per_s_cpu": events / best_cpu,
            "created": acked}


# -- report ----------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}; load average at the start: {load}")


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = [h for h, _, _ in cols]
    body = [[format(r[k], f) if not isinstance(r[k], str) else r[k] for _, k, f in cols] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def compile_bytecode() -> str:
    """Compile the collector's modules to bytecode first, as `pip install` does for a package it
    installs: a development checkout run with PYTHONDONTWRITEBYTECODE set (as CI shells often
    are) has none, and each measured process would compile ~16 modules from source (~50 ms of
    its start-up) that no installed collector compiles. Returns what the report says of it."""
    import compileall

    ok = compileall.compile_dir(str(ROOT / "agent_input"), quiet=1)
    if not ok:
        return "could not compile the collector's bytecode: start-up includes compiling it"
    note = " (PYTHONDONTWRITEBYTECODE is set here)" if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""
    return f"collector bytecode compiled before measuring, as an installed package has it{note}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny inputs: a smoke run of the whole machinery")
    ap.add_argument("--latency-ms", type=int, default=150, help="simulated API latency per request")
    ap.add_argument("--org", action="append", choices=["large", "small"], help="default: large and small")
    ap.add_argument("--backfill", action="append", help="default: 24h@1m 15d@1h 180d@1d")
    ap.add_argument("--skip", action="append", default=[], choices=["backfill", "steady", "paths"])
    ap.add_argument("--full", action="store_true",
                    help="also the large-org 180d@1d backfill (simulator-bound: 5-10 minutes)")
    args = ap.parse_args(argv)
    scenarios = QUICK_BACKFILLS if args.quick else BACKFILLS
    if args.backfill:
        scenarios = {k: v for k, v in {**BACKFILLS, **QUICK_BACKFILLS}.items() if k in args.backfill}
    orgs = args.org or (["small"] if args.quick else ["large", "small"])
    # The simulator builds hour and day buckets from its minutes: a large-org 180-day backfill costs
    # it ~20x the 15-day one (about 5 minutes of simulator CPU here), so it runs only with --full.
    skip = set() if (args.full or args.backfill or args.quick) else {("large", "180d@1d")}
    latency = 20 if args.quick and args.latency_ms == 150 else args.latency_ms
    report: dict = {"machine": machine(), "latency_ms": latency, "bytecode": compile_bytecode()}
    print(f"openai-elastic benchmarks{' (--quick)' if args.quick else ''}: {report['machine']}")
    print(f"usage streams: {len(USAGE_STREAMS)}; simulated API latency {latency} ms; simulator and collector "
          f"in separate processes; {report['bytecode']}\n", flush=True)

    with tempfile.TemporaryDirectory(prefix="openai-bench-") as tmp:
        work = Path(tmp)
        rows: list[dict] = []
        steady = None
        if "backfill" not in args.skip:
            for org in orgs:
                sim = Sim(org, latency)
                try:
                    for name, (width, span) in scenarios.items():
                        if (org, name) in skip:
                            continue
                        rows.append(backfill(sim, org, name, width, span, latency, work))
                        print(f"  {org} {name}: done in {rows[-1]['wall_s']:.1f}s", file=sys.stderr, flush=True)
                    first = next((r for r in rows if r["org"] == org and r["backfill"].endswith("@1m")), None)
                    if first is not None and "steady" not in args.skip and (org == "large" or args.quick):
                        steady = steady_state(sim, Path(first["config"]), first["state"], 2 if args.quick else 4,
                                              work)
                        steady["org"] = org
                finally:
                    sim.close()
            report["backfills"] = rows
            print("1. backfills (all usage streams; requests = usage API requests; (seed) = what the seed's "
                  "default page sizes need;\n   critical = longest chain of dependent requests x latency; "
                  "RSS/CPU of the collector process; sim CPU = the simulator's;\n   measured against the "
                  "simulator's response cache, warmed by an identical cold run, whose wall time is the 'cold' columns)")
            print(table(rows, [("org", "org", ""), ("backfill", "backfill", ""), ("requests", "requests", "d"),
                               ("(seed)", "seed_requests", "d"), ("names", "names_requests", "d"),
                               ("events", "events", "d"), ("wall s", "wall_s", ".1f"),
                               ("events/s", "events_per_s", ",.0f"), ("peak RSS MB", "peak_rss_mb", ".0f"),
                               ("CPU s", "cpu_s", ".1f"), ("sim CPU s", "sim_cpu_s", ".1f"),
                               ("long pole", "long_pole", ""), ("critical s", "critical_s", ".1f"),
                               ("wall/critical", "ratio", ".2f"), ("cold wall s", "cold_wall_s", ".1f"),
                               ("cold sim CPU s", "cold_sim_cpu_s", ".1f"), ("cold/critical", "cold_ratio", ".2f")]))
            print("   where the wall time went, by the simulator's clock: the collector process before its first "
                  "request\n   (interpreter, imports, config, state), the API span (first request to last answer), "
                  "and after the\n   last answer (the last pages' mapping and commits, exit)")
            print(table(rows, [("org", "org", ""), ("backfill", "backfill", ""), ("wall s", "wall_s", ".2f"),
                               ("before 1st request s", "before_first_s", ".2f"),
                               ("API span s", "api_span_s", ".2f"), ("after last answer s", "after_last_s", ".2f"),
                               ("critical s", "critical_s", ".2f"), ("wall/critical", "ratio", ".2f"),
                               ("API span/critical", "span_ratio", ".2f")]))
            print()
        if steady is not None:
            report["steady"] = steady
            f = steady["first_poll"]
            print(f"2. steady state ({steady['org']} org, 5-minute polls, default revision window 3h at 1m, "
                  f"{steady['polls']} polls after the backfill):")
            print(f"   per poll: {steady['requests_per_poll']:.1f} requests, {steady['cpu_s_per_poll']:.2f} CPU s, "
                  f"{steady['wall_s_per_poll']:.2f} s wall; first poll (loads the name cache): "
                  f"{f['usage_requests']} usage + {f['names_requests']} name requests, {f['cpu_s']:.2f} CPU s; "
                  f"{steady['events']} events of which {steady['corrections']} corrections\n")
        if "paths" not in args.skip:
            hours = 1 if args.quick else 3
            repeat = 2 if args.quick else 5
            pages = sample_pages("small" if args.quick else "large", hours)
            m = mapping_path(pages, repeat)
            p = protocol_path(m["payloads"], repeat)
            e = es_path(m["payloads"][:3] if args.quick else m["payloads"], 1 if args.quick else 2)
            report["paths"] = {"mapping": {k: v for k, v in m.items() if k != "payloads"}, "protocol": p, "es": e}
            print(f"3./4. paths, one thread, best of {repeat} ({m['events']} events from one {hours}h@1m page of "
                  f"each usage stream, {m['bytes'] / 1e6:.1f} MB NDJSON):")
            print(table([
                {"path": "parse pages (orjson, results/s)", "rate": m["parse_per_s"], "t": ""},
                {"path": "mapping + serialization (events/s, one core)", "rate": m["map_per_s"], "t": ">= 100,000"},
                {"path": "parse + mapping + serialization", "rate": m["both_per_s"], "t": ""},
                {"path": "NDJSON protocol: payload -> event messages (CPU)", "rate": p["per_s"], "t": ""},
                {"path": "direct output: bulk create into recording fake ES (wall)", "rate": e["per_s_wall"], "t": ""},
                {"path": "direct output, collector side CPU only", "rate": e["per_s_cpu"], "t": ""},
            ], [("path", "path", ""), ("events/s", "rate", ",.0f"), ("target", "t", "")]))
    return report


if __name__ == "__main__":
    main()
