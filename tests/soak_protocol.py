"""A soak of `openai-input run` (docs/protocol.md) against the simulator, over simulated hours or days.

The collector and the simulator share one accelerated clock (`SPEED` simulated seconds per wall
second, from the machine-wide monotonic clock), so a `run` process lives through many polls,
late revisions and day boundaries in a few minutes. A seeded random script drives it the way a
supervisor may: configs replaced every few polls (streams enabled and disabled, bucket widths,
revision windows, a wrong key and back), acks prompt, delayed or withheld, requests hung at the
moment of a replacement, faults and latency, SIGKILL and a restart on the same state directory,
stops with acks withheld. At the end every stream runs until it settles, and the check is:

- what the supervisor acknowledged, de-duplicated by id as Elasticsearch would, sums to the
  simulator's final truth for every usage stream, costs and audit; vector_stores, a level, bucket
  by bucket at whatever width each was read (the buckets tiling the compared range once);
- no id acknowledged in a life that ended drained (graceful stop, every ack in) is sent again;
- the process's threads, open files and RSS come back to where they were after a burst of
  replacements (with requests hung at some of them) once the hung requests ended;
- every stop ends within `--ack-timeout` and a margin; nothing but JSON lines on stderr, no traceback,
  no audit mark taken for an earlier version's (no earlier version wrote the state);
- with `--skew` (this host's clock ahead of or behind OpenAI's, the simulator's `Date`, constant or
  stepped): the totals as above, compared up to where both clocks are; over 5 minutes every usage
  stream says so in a WARNING, once per config; under, none does (but one ahead by no more than the
  skew and `--speed` times RESPONSE_LAG: the wall time an answer takes from its Date to the collector).

The simulator's `Date` is the soak's clock (the simulated time, whole seconds, as OpenAI's), so
without `--skew` the two clocks agree as on a host kept by NTP, but for the wall time of a request
times `--speed`.

    python tests/soak_protocol.py [--seed 1] [--hours 26] [--speed 600] [--widths 1m,1h,1d] [--graces 0,5m,30m]
                                  [--skew=-900,6:7200] [--audit-refusals]

Exit status 0 when every check holds; the findings otherwise (and always a summary) on stdout.
With `--workdir`, what was acknowledged and each life's stderr are kept there.
`tests/test_protocol.py` runs a short one (`slow`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import ADMIN_KEY, audit_truth, dedupe, stored_totals, truth_totals  # noqa: E402
from protocol_supervisor import Supervisor  # noqa: E402

from agent_input.simulator import FaultRule, Simulator  # noqa: E402
from agent_input.state import StateStore  # noqa: E402
from agent_input.streams import STREAMS_BY_NAME, USAGE_STREAMS  # noqa: E402

HOUR, DAY = 3600, 86400
# 2026-11-23T06:00Z: a first window of 6h starts at midnight, a day boundary for every width
START = 1763877600.0
WRONG_KEY = "sk-admin-wrong-0123456789abcdef"
USAGE = [s.name for s in USAGE_STREAMS]
ACK_TIMEOUT = 2.0
STOP_MARGIN = 8.0  # seconds beyond --ack-timeout a stop may take: the page in flight, the exit
# Wall seconds an answer may take from the simulator's Date (stamped as it answers) to the collector
# reading its clock: on this clock `--speed` times longer. The collector takes a Date that far
# behind its clock as its clock being ahead, so a loaded machine makes a clock WARNING of a host
# whose clock agrees (seed 5 at --speed 1200, load 10 on 2 CPUs: "9m25s ahead", 0.47 s; 4 runs in 7).
RESPONSE_LAG = 2.0

# `run` with its --now clock running at the soak's speed from the soak's monotonic origin, plus
# the host's skew (--skew: [[from simulated time, seconds ahead of OpenAI's clock], ...])
BOOT = (
    "import json, os, sys, time\n"
    "import agent_input.app as app\n"
    "m0, speed = float(os.environ['SOAK_M0']), float(os.environ['SOAK_SPEED'])\n"
    "steps = json.loads(os.environ.get('SOAK_SKEW') or '[[0, 0]]')\n"
    "def skewed(t):\n"
    "    return t + [s for at, s in steps if at <= t][-1]\n"
    "app.fixed_clock = lambda start: (lambda: skewed(start + (time.monotonic() - m0) * speed))\n"
    "from agent_input.cli import main\n"
    "sys.argv[0] = 'openai-input'\n"
    "main()\n"
)


class Clock:
    def __init__(self, start: float, speed: float):
        self.start, self.speed, self.m0 = start, speed, time.monotonic()

    def __call__(self) -> float:
        return self.start + (time.monotonic() - self.m0) * self.speed

    def wall(self, sim_seconds: float) -> float:
        return sim_seconds / self.speed


def parse_skew(text: str, start: float = START) -> list[list[float]]:
    """`--skew`: seconds this host's clock is ahead of OpenAI's (negative: behind), constant
    (`3600`) or stepped (`-900,6:7200`: 15 minutes behind, from simulated hour 6 two hours ahead),
    as [[from simulated time, seconds], ...] (the BOOT clock's `SOAK_SKEW`)."""
    steps = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        at, _, seconds = part.rpartition(":")
        steps.append([start + float(at or 0) * HOUR, float(seconds)])
    if not steps or steps[0][0] != start:
        steps.insert(0, [start, 0.0])
    return sorted(steps)


def skew_at(steps: list[list[float]], t: float) -> float:
    return [s for at, s in steps if at <= t][-1]


def stated_lead(message: str) -> float | None:
    """The seconds a clock WARNING says this host's clock is ahead of OpenAI's (negative: behind)."""
    from agent_input.config import parse_duration

    match = re.search(r"this host's clock is (\w+) (ahead of|behind) ", message)
    if match is None:
        return None
    return parse_duration(match.group(1)) * (1 if match.group(2) == "ahead of" else -1)


class SoakSimulator(Simulator):
    def __init__(self, clock: Clock, **kwargs):
        super().__init__(now=clock.start, running_clock=False, **kwargs)
        self._soak_clock = clock

    def now(self) -> float:
        return self._soak_clock()


class SoakSupervisor(Supervisor):
    """Persists a batch only when it acknowledges it; acks now, after a delay, or not (held)."""

    def __init__(self, state_dir, clock: Clock, persisted: list, life: int, skew: list | None = None):
        self.mode, self.delay = "ack", 0.0
        self.held: dict[int, list[dict]] = {}
        self.due: list[tuple[float, int]] = []
        self.life = life
        self.killed = False  # ended by the soak's SIGKILL
        self.acked_ids: list[str] = []
        super().__init__(state_dir, clock.start, persisted=persisted, args=("--ack-timeout", str(ACK_TIMEOUT)),
                         python_args=("-c", BOOT), env={"SOAK_M0": repr(clock.m0), "SOAK_SPEED": repr(clock.speed),
                              "SOAK_SKEW": json.dumps(skew or [[clock.start, 0]])})
        self._acker = threading.Thread(target=self._ack_due, daemon=True)
        self._acker.start()

    def batch_complete(self, batch: int, docs: list[dict]) -> None:
        self.complete.append(batch)
        self.held[batch] = docs
        if self.mode == "ack":
            self._release(batch)
        elif self.mode == "delay":
            self.due.append((time.monotonic() + self.delay, batch))

    def _release(self, batch: int) -> None:
        docs = self.held.pop(batch, None)
        if docs is None:
            return
        self.persisted.extend(docs)  # persist first, then ack
        self.acked_ids.extend(d["_id"] for d in docs)
        if self.send({"type": "ack", "batch": batch}):
            self.acked.append(batch)

    def _ack_due(self) -> None:
        while self.proc.poll() is None:
            time.sleep(0.05)
            with self._cond:
                now = time.monotonic()
                for when, batch in [d for d in self.due if d[0] <= now]:
                    self.due.remove((when, batch))
                    self._release(batch)

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        with self._cond:
            self.mode, self.delay = mode, delay
            if mode == "ack":
                self.release_all()

    def release_all(self) -> None:
        with self._cond:
            self.due.clear()
            for batch in sorted(self.held):
                self._release(batch)


def proc_sample(pid: int) -> dict:
    fds = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        fds[target.split(":")[0] if ":" in target else os.path.basename(target)] += 1
    out = {"threads": len(os.listdir(f"/proc/{pid}/task")), "fds": sum(fds.values()), "fd_kinds": dict(fds),
           "thread_names": Counter()}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as fh:
                out["thread_names"][fh.read().strip()] += 1
        except OSError:
            pass
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
    return out


class Soak:
    def __init__(self, args, workdir: str):
        self.args = args
        self.rng = random.Random(args.seed)
        self.clock = Clock(START, args.speed)
        self.sim = SoakSimulator(self.clock, seed=args.seed, org="small", admin_key=ADMIN_KEY, latency=args.latency)
        self.url = self.sim.start()
        self.state = os.path.join(workdir, "state")
        self.widths = args.widths.split(",")
        self.skew = parse_skew(args.skew)
        self.clock_warnings: Counter = Counter()  # (life, stream): the WARNINGs that the clock is off
        self.clock_leads: dict[tuple, list] = defaultdict(list)  # (life, stream): the leads they said
        self.configs_in_life: Counter = Counter()
        self.graces = [g for g in args.graces.split(",") if g]
        self.persisted: list[dict] = []
        self.findings: list[str] = []
        self.notes: Counter = Counter()
        self.samples: list[dict] = []
        self.stop_times: list[float] = []
        self.hung_waits: list[float] = []
        self.cid = 0
        self.life = 0
        # the stream settings a stream last had (kept for the final phase: no width hand-over there)
        self.last: dict[str, dict] = {}
        self.drained_ids: set[str] = set()  # acked in a life that ended with a drained stop
        self.redelivered_after_drain: Counter = Counter()
        self.burst: tuple[dict, dict] | None = None
        self.first_enabled: dict[str, float] = {}  # sim time a config first enabled a stream with the right key
        # sim time by which an audit poll went through: a first poll before it that the organization
        # check held (a wrong key, the projects listing failing) keeps its start in memory only, and a
        # new config starts from its own `now` (docs/ARCHITECTURE.md), so the compared range starts here
        self.audit_read_by: float | None = None

    # -- configs ---------------------------------------------------------------------------------
    def stream_cfg(self, name: str, enabled: bool, keep: bool = False) -> dict:
        if keep and name in self.last:
            return {**self.last[name], "enabled": enabled}
        if name in USAGE:
            width = self.rng.choice(self.widths)
            # the first window holds at least one whole bucket (the config loader's rule)
            cfg = {"interval": "1s", "initial_interval": "1d" if width == "1d" else "6h", "bucket_width": width}
            window = self.rng.choice((None, "3h", "5h"))
            if window:
                cfg["revision_window"] = window
            grace = self.rng.choice(self.graces) if STREAMS_BY_NAME[name].has_grace and self.graces else None
            if grace in ("0", "none"):  # (the string "0" is no duration the config loader takes: an int is)
                if grace == "0":
                    cfg["finalization_grace"] = 0
            elif grace:
                cfg["finalization_grace"] = grace
                if width == "1d":  # a first window of a whole day after the grace
                    cfg["initial_interval"] = "2d"
        elif name == "costs":
            cfg = {"interval": "1s", "initial_interval": "5d"}
        elif name == "audit":
            cfg = {"interval": "1s", "initial_interval": "6h", "batch_size": self.rng.choice((20, 100))}
        else:
            cfg = {"interval": "2s"}
        cfg["enabled"] = enabled
        if enabled:
            self.last[name] = cfg
        return cfg

    def config(self, *, final: bool = False, key: str = ADMIN_KEY) -> dict:
        ds = {}
        for name in [*USAGE, "costs", "audit", "rate_limits"]:
            if final:
                ds[name] = self.stream_cfg(name, name != "rate_limits", keep=True)
            else:
                ds[name] = self.stream_cfg(name, self.rng.random() < 0.6)
            if ds[name]["enabled"] and key == ADMIN_KEY:
                self.first_enabled.setdefault(name, self.clock())
        return {"url": self.url, "api_key": key, "max_retries": 2, "http_timeout": 30, "data_streams": ds}

    def send_config(self, sup: SoakSupervisor, cfg: dict) -> int:
        self.cid += 1
        self.configs_in_life[sup.life] += 1
        mark = len(sup.messages)
        sup.configure(cfg, cid=self.cid)
        return mark

    def wait_revision(self, sup: SoakSupervisor, mark: int, timeout: float = 30.0) -> dict:
        cid = self.cid
        status = sup.wait_for(lambda: [m for m in sup.messages[mark:] if m["type"] == "status" and m["scope"] == "input"
                                     and m.get("config_id") == cid and m["status"] in ("healthy", "failed")],
                            timeout, f"config {cid} to be applied")[0]
        if "config rejected" in status["message"]:
            self.findings.append(f"life {sup.life}: the soak's config {cid} was rejected: {status['message']}")
        return status

    # -- a life: one process --------------------------------------------------------------------
    def start(self) -> SoakSupervisor:
        self.life += 1
        return SoakSupervisor(self.state, self.clock, self.persisted, self.life, self.skew)

    def host(self, t: float) -> float:
        """The collector's clock at the simulator's (OpenAI's) time `t`."""
        return t + skew_at(self.skew, t)

    def check_stderr(self, sup: SoakSupervisor) -> None:
        text = sup.stderr_text()
        if self.args.workdir:  # kept for a look at a finding
            with open(os.path.join(self.args.workdir, f"life-{sup.life}.stderr"), "w") as fh:
                fh.write(text)
        if "Traceback" in text:
            i = text.index("Traceback")
            self.findings.append(f"life {sup.life}: traceback on stderr: {text[i:i + 1500]}")
        for raw in sup.stderr:
            if raw.strip():
                try:
                    json.loads(raw)
                except ValueError:
                    self.findings.append(f"life {sup.life}: a stderr line is not JSON: {raw[:300]!r}")
                    break
        # A SIGKILL can land in the middle of a line's write (one written in pieces into a full
        # pipe): stdout then ends in its first part, without its newline; that is the kill's
        bad = [line for line in sup.bad_lines if line.endswith(b"\n") or not sup.killed]
        if bad:
            self.findings.append(f"life {sup.life}: non-protocol stdout lines: {bad[:2]}")
        for raw in sup.stderr:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if rec.get("log.level") in ("error", "critical"):
                self.notes[f"error log: {str(rec.get('message'))[:90]}"] += 1
            message = str(rec.get("message"))
            if "by an earlier version" in message:  # no earlier version wrote this state directory
                self.findings.append(f"life {sup.life}: {message[:300]}")
            if "this host's clock is" in message:
                self.clock_warnings[(sup.life, message.split(":")[0])] += 1
                self.clock_leads[(sup.life, message.split(":")[0])].append(stated_lead(message))
                self.notes["clock warnings"] += 1

    def note_redeliveries(self, sup: SoakSupervisor) -> None:
        for m in sup.events():
            if m["id"] in self.drained_ids:
                self.redelivered_after_drain[m["stream"]] += 1

    def timed_stop(self, sup: SoakSupervisor, what: str) -> None:
        started = time.monotonic()
        try:
            code = sup.stop(timeout=ACK_TIMEOUT + 60)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            self.findings.append(f"life {sup.life}: {what}: no exit 60 s past --ack-timeout")
            sup.kill()
            return
        took = time.monotonic() - started
        self.stop_times.append(took)
        if code != 0:
            self.findings.append(f"life {sup.life}: {what}: exit {code}")
        if took > ACK_TIMEOUT + STOP_MARGIN:
            self.findings.append(f"life {sup.life}: {what}: the stop took {took:.1f}s (--ack-timeout {ACK_TIMEOUT:g})")
        statuses = [m["status"] for m in sup.statuses("input")]
        if statuses[-1:] != ["stopped"]:
            self.findings.append(f"life {sup.life}: {what}: last input status {statuses[-1:]}")

    def sample(self, sup: SoakSupervisor, why: str) -> None:
        if self.audit_read_by is None and any(m.get("stream") == "audit" and m["status"] == "healthy"
                                              for m in sup.statuses("stream")):
            self.audit_read_by = self.clock()
        try:
            s = proc_sample(sup.proc.pid)
        except OSError:
            return
        s.update(life=sup.life, why=why, sim=self.clock())
        if self.args.verbose:
            print(json.dumps(s), flush=True)
        self.samples.append(s)

    def hang_then_replace(self, sup: SoakSupervisor, cfg: dict) -> None:
        """A request of a running stream hangs (longer than the soak waits for anything); a new
        config arrives while it does: the new revision must run at once."""
        path = self.hang(sup)
        started = time.monotonic()
        mark = self.send_config(sup, cfg)
        status = self.wait_revision(sup, mark, timeout=self.args.hang + 30)
        took = time.monotonic() - started
        self.hung_waits.append(took)
        if took > 5:
            self.findings.append(f"life {sup.life}: a replacement while {path} hung took {took:.1f}s to apply "
                                 f"({status['status']})")

    def hang(self, sup: SoakSupervisor) -> str:
        """A request of a running stream (or of the names, the organization check) hangs
        `--hang` seconds; returns once it does (or after 5 s)."""
        running = [n for n, v in self.last.items() if n in USAGE and v.get("enabled")]
        path = "usage/" + self.rng.choice(running) if running and self.rng.random() < 0.7 else \
            self.rng.choice(("projects", "costs", "audit_logs", "users"))
        rule = FaultRule(kind="slow", path=path, delay=self.args.hang, count=1)
        self.sim.add_fault(rule)
        deadline = time.monotonic() + 5
        while rule.to_dict()["fired"] == 0 and time.monotonic() < deadline and sup.proc.poll() is None:
            time.sleep(0.02)
        if rule.to_dict()["fired"] == 0:
            self.notes["hang not reached"] += 1
        else:
            self.notes["hang reached"] += 1
            time.sleep(0.2)
        return path

    def audit_refusal(self, tenant: bool | None = None) -> None:
        """A 403 of the organization scope (audit logging not enabled), or of the tenant scope alone
        (tenant_only=true: a 403 or a 404), for 1-3 requests."""
        tenant = self.rng.random() < 0.5 if tenant is None else tenant
        kind = self.rng.choice(("403", "404")) if tenant else "403"
        self.sim.add_fault(FaultRule(kind=kind, path="audit_logs", count=self.rng.randint(1, 3),
                                     query="tenant_only=true" if tenant else ""))
        self.notes["fault audit refusal " + ("tenant" if tenant else "organization")] += 1

    def random_fault(self) -> None:
        if self.args.audit_refusals and self.rng.random() < 0.4:
            return self.audit_refusal()
        kind = self.rng.choice(("429", "500", "503", "reset", "malformed_json", "slow"))
        path = self.rng.choice(("usage/", "costs", "audit_logs", "projects", "users", "*/rate_limits"))
        self.sim.add_fault(FaultRule(kind=kind, path=path, count=self.rng.randint(1, 3), delay=1.0, retry_after=1))

    def run_life(self) -> None:
        if self.args.audit_refusals:  # a first read refused, of either scope, then at random
            if self.life < 2:
                self.audit_refusal(tenant=self.life == 1)
            elif self.rng.random() < 0.5:
                self.audit_refusal()
        sup = self.start()
        drained = False
        try:
            mark = self.send_config(sup, self.config())
            self.wait_revision(sup, mark)
            self.sample(sup, "start")
            wrong = False
            for _ in range(self.rng.randint(3, 8)):
                time.sleep(self.rng.uniform(1.0, 3.5))
                if sup.proc.poll() is not None:
                    self.findings.append(f"life {sup.life}: the process exited by itself ({sup.proc.returncode})")
                    return
                action = self.rng.choices(("replace", "hang", "acks", "fault", "wrong"), (5, 2, 2, 2, 1))[0]
                if wrong:  # a wrong key is followed by the right one
                    action, wrong = "replace", False
                if action == "wrong":
                    wrong = True
                    mark = self.send_config(sup, self.config(key=WRONG_KEY))
                    self.wait_revision(sup, mark)
                elif action == "replace":
                    mark = self.send_config(sup, self.config())
                    self.wait_revision(sup, mark)
                elif action == "hang":
                    self.hang_then_replace(sup, self.config())
                elif action == "acks":
                    mode = self.rng.choice(("ack", "delay", "withhold"))
                    sup.set_mode(mode, self.rng.uniform(0.2, 2.0))
                elif action == "fault":
                    self.random_fault()
                self.notes[f"action {action}"] += 1
                time.sleep(0.5)
                self.sample(sup, action)
            end = self.rng.choices(("stop", "withheld-stop", "hung-stop", "kill"), (3, 2, 2, 2))[0]
            self.notes[f"end {end}"] += 1
            if end == "kill":
                sup.killed = True
                sup.proc.send_signal(signal.SIGKILL)
                sup.kill()
            elif end == "hung-stop":
                sup.set_mode("ack")
                self.hang(sup)
                self.timed_stop(sup, "a stop while a request hung")
            elif end == "withheld-stop":
                sup.set_mode("withhold")
                self.timed_stop(sup, "a stop with acks withheld")
            else:
                sup.set_mode("ack")
                self.timed_stop(sup, "a stop")
                drained = sup.proc.returncode == 0
        finally:
            if sup.proc.poll() is None:
                sup.kill()
            self.note_redeliveries(sup)
            self.check_stderr(sup)
        if drained:
            self.drained_ids.update(sup.acked_ids)

    def final(self) -> float:
        """Every stream at its last settings, acks on, no faults, until everything read is final."""
        self.sim.clear_faults()
        sup = self.start()
        try:
            mark = self.send_config(sup, self.config(final=True))
            self.wait_revision(sup, mark)
            streams = [n for n in [*USAGE, "costs", "audit"]]
            sup.wait_for(lambda: sup.polled(streams, after=mark), 180, "a poll of every stream")
            self.replacement_burst(sup, streams)
            until = self.clock() + self.args.settle * HOUR
            while self.clock() < until and sup.proc.poll() is None:
                time.sleep(0.5)
                if len(self.samples) % 5 == 0:
                    self.sample(sup, "final")
            self.sample(sup, "final")
            end_now = self.clock()
            time.sleep(self.clock.wall(20 * 60))  # a poll after end_now
            sup.wait_for(lambda: not sup.partial and not sup.held, 30, "every batch acknowledged")
            self.timed_stop(sup, "the final stop")
        finally:
            if sup.proc.poll() is None:
                sup.kill()
            self.note_redeliveries(sup)
            self.check_stderr(sup)
        return end_now

    # -- the checks ------------------------------------------------------------------------------
    def compare(self, end_now: float) -> None:
        docs = dedupe(self.persisted)
        if self.args.workdir:  # kept for a look at a finding
            with open(os.path.join(self.args.workdir, "acknowledged.ndjson"), "w") as fh:
                fh.writelines(json.dumps(d) + "\n" for d in docs)
        largest = max(("1m", "1h", "1d").index(w) for w in self.widths)
        align = (60, HOUR, DAY)[largest]
        # what is read and final by both clocks: a host behind OpenAI reads up to its own time only
        read_to = min(end_now, self.host(end_now))
        end = int(read_to - 4 * HOUR) // align * align
        store = StateStore(self.state)
        try:
            for spec in USAGE_STREAMS:
                cursors = store.cursors(spec.name)
                if not cursors:
                    self.notes[f"{spec.name} never ran"] += 1
                    continue
                origin = min(c.origin for c in cursors.values())
                if spec.name == "vector_stores":
                    self.compare_levels(docs, spec, origin, end, sorted(cursors))
                    continue
                got = stored_totals(docs, spec.name, origin, end)
                want = truth_totals(self.sim, spec.name, origin, end)
                if got != want:
                    keys = sorted(set(got) | set(want), key=str)
                    bad = [(k, got.get(k), want.get(k)) for k in keys if got.get(k) != want.get(k)]
                    self.findings.append(f"{spec.name} [{origin}, {end}) widths {sorted(cursors)}: {len(bad)} of "
                                         f"{len(keys)} groups differ from the truth, e.g. {bad[:2]}")
                self.notes[f"compared {spec.name}: {sum(sum(v.values()) for v in want.values()):.0f}"] += 1
            costs = store.cursors("costs")
            if costs:
                origin = min(c.origin for c in costs.values())
                cend = int(read_to - 2 * DAY - HOUR) // DAY * DAY
                spec = STREAMS_BY_NAME["costs"]
                got: dict[tuple, float] = defaultdict(float)
                for d in docs:
                    if d["data_stream"]["dataset"] != "openai.costs":
                        continue
                    base = d["openai"]["base"]
                    from datetime import datetime

                    t = datetime.fromisoformat(base["start_time"].replace("Z", "+00:00")).timestamp()
                    if origin <= t < cend:
                        key = (base.get("project_id"), d["openai"]["costs"].get("line_item"), base.get("api_key_id"))
                        got[key] += (d["openai"]["costs"].get("amount") or {}).get("value") or 0.0
                want = self.sim.truth("costs", origin, cend, "1d", spec.group_by)
                bad = [k for k in set(got) | set(want)
                       if not math.isclose(got.get(k, 0.0), want.get(k, {}).get("amount", 0.0), rel_tol=1e-9, abs_tol=1e-6)]
                if bad or not want:
                    self.findings.append(f"costs [{origin}, {cend}): {len(bad)} of {len(want)} groups differ, e.g. "
                                         f"{[(k, got.get(k), want.get(k)) for k in bad[:2]]}")
                self.notes[f"compared costs: {len(want)} groups over {(cend - origin) // DAY} days"] += 1
        finally:
            store.close()
        audit = {d["_id"] for d in docs if d["data_stream"]["dataset"] == "openai.audit"}
        if audit:
            # the first audit read starts initial_interval before this host's time, or before
            # OpenAI's with this host ahead of it by more than CLOCK_WARNING (and a margin) all along
            # (else compared from this host's time, or OpenAI's once that is past it)
            from agent_input.engine import CLOCK_WARNING

            read_by = self.audit_read_by or end_now
            ahead = min(s for _, s in self.skew) > CLOCK_WARNING + max(60.0, self.args.speed * 0.2)
            lo = int(read_by - 6 * HOUR if ahead else min(self.host(read_by) - 6 * HOUR, read_by))
            hi = int(read_to - 30 * 60)
            want = audit_truth(self.sim, lo, hi)
            inside = audit & audit_truth(self.sim, int(START - 2 * DAY), int(end_now) + HOUR)
            missing, extra = want - audit, audit - inside
            if missing:
                when = {e["id"]: e["effective_at"] for h in range(lo // HOUR * HOUR, hi + HOUR, HOUR)
                        for e in self.sim.audit.hour_events(h)}
                self.notes["audit missing at (s after lo)"] = sorted(int(when[i]) - lo for i in missing)[:10]
            if missing or extra:
                self.findings.append(f"audit: {len(missing)} of {len(want)} events missing, {len(extra)} not in the "
                                     f"simulator's log, e.g. {sorted(missing)[:2]} {sorted(extra)[:2]}")
            self.notes[f"compared audit: {len(want)} events"] += 1
        if self.redelivered_after_drain:
            self.findings.append(f"events acknowledged before a drained stop sent again by a later process: "
                                 f"{dict(self.redelivered_after_drain)}")

    def check_clock_warnings(self) -> None:
        """A skew over 5 minutes (CLOCK_WARNING) is said once per stream (per config: each builds
        its collectors anew), and every usage stream that ran says it; none is said otherwise.
        A margin either side: a wall stall is `--speed` times longer on this clock."""
        from agent_input.engine import CLOCK_WARNING

        skews = [abs(s) for _, s in self.skew]
        margin = max(60.0, self.args.speed * 0.2)
        if max(skews) < CLOCK_WARNING - margin:
            # ahead by a skew and an answer's lag at most (RESPONSE_LAG), a loaded machine's, not a false one
            lag = self.args.speed * RESPONSE_LAG
            false = {k: leads for k, leads in self.clock_leads.items()
                     if not all(lead is not None and any(0 <= lead - s <= lag for _, s in self.skew) for lead in leads)}
            if false:
                self.findings.append(f"clock WARNINGs with a skew of at most {max(skews):g}s (an answer's lag explains "
                                     f"one ahead by up to {lag:g}s more), leads said: {false}")
        if min(skews) > CLOCK_WARNING + margin:
            twice = {k: n for k, n in self.clock_warnings.items() if n > self.configs_in_life[k[0]]}
            if twice:
                self.findings.append(f"a clock WARNING said more than once per stream and config: {twice} "
                                     f"(configs per life {dict(self.configs_in_life)})")
            store = StateStore(self.state)
            try:
                ran = {spec.name for spec in USAGE_STREAMS if store.cursors(spec.name)}
            finally:
                store.close()
            silent = ran - {stream for _, stream in self.clock_warnings}
            if silent:
                self.findings.append(f"no clock WARNING from {sorted(silent)} with a skew of {min(skews):g}s or more")

    def compare_levels(self, docs: list[dict], spec, origin: int, end: int, widths: list[str]) -> None:
        """vector_stores is a level, not a flow (the seed's `usage_bytes`, "vector stores usage in
        bytes"; the simulator's hour or day bucket is the highest level of its minutes): a sum over
        buckets of mixed widths means nothing, so every API bucket is compared on its own. The
        documents of one bucket (start, end, project; corrections add up, as the panel sums them)
        give that bucket's level at its width, and the buckets, whatever their widths, tile
        [origin, end) once: none missing, none read at two widths."""
        from datetime import datetime

        def ts(text: str) -> int:
            return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())

        got: dict[tuple[int, int], dict[tuple, int]] = defaultdict(lambda: defaultdict(int))
        for d in docs:
            if d["data_stream"]["dataset"] != spec.dataset:
                continue
            base = d["openai"]["base"]
            s, e = ts(base["start_time"]), ts(base["end_time"])
            if origin <= s and e <= end:
                key = tuple(base.get(g) for g in spec.group_by)
                got[(s, e)][key] += d["openai"].get("vector_stores", {}).get("usage_bytes") or 0
        names = {60: "1m", HOUR: "1h", DAY: "1d"}
        wrong, gaps, at = [], [], origin
        for s, e in sorted(got):
            if s != at:
                gaps.append((at, s))
            at = max(at, e)
            want = {k: v["usage_bytes"] for k, v in
                    self.sim.truth(spec.name, s, e, names.get(e - s, "?"), spec.group_by).items() if v["usage_bytes"]}
            have = {k: v for k, v in got[(s, e)].items() if v}
            if have != want:
                wrong.append((s, names.get(e - s), have, want))
        if at != end:
            gaps.append((at, end))
        if wrong or gaps or not got:
            self.findings.append(f"vector_stores [{origin}, {end}) widths {widths}: {len(wrong)} of {len(got)} buckets "
                                 f"differ from the level, e.g. {wrong[:1]}; {len(gaps)} gaps or overlaps, e.g. "
                                 f"{gaps[:2]}")
        by_width = Counter(names.get(e - s) for s, e in got)
        self.notes[f"compared vector_stores levels: {dict(sorted(by_width.items()))} buckets"] += 1

    def replacement_burst(self, sup: SoakSupervisor, streams: list[str]) -> None:
        """The same config replaced `--burst` times, a request hung at every third replacement:
        once the hung requests have ended by themselves, the process holds what it held before."""
        time.sleep(1.0)
        before = proc_sample(sup.proc.pid)
        for i in range(self.args.burst):
            if i % 3 == 2:
                self.hang_then_replace(sup, self.config(final=True))
            else:
                mark = self.send_config(sup, self.config(final=True))
                self.wait_revision(sup, mark)
                time.sleep(self.rng.uniform(0.1, 0.6))
            self.sample(sup, "burst")
        time.sleep(self.args.hang + 1.0)  # the hung requests end, their answers dropped
        mark = self.send_config(sup, self.config(final=True))
        self.wait_revision(sup, mark)
        sup.wait_for(lambda: sup.polled(streams, after=mark), 180, "a poll of every stream after the burst")
        # a leak never goes back; a stream's poll still running on a loaded machine does: the
        # fewest threads and files seen while waiting up to 20 s for them to come back
        slack = {"threads": 2, "fds": 4, "rss_mb": 40}
        deadline = time.monotonic() + 20.0
        after = proc_sample(sup.proc.pid)
        while time.monotonic() < deadline and any(after[k] > before[k] + slack[k] for k in ("threads", "fds")):
            time.sleep(0.5)
            now = proc_sample(sup.proc.pid)
            if (now["threads"], now["fds"]) < (after["threads"], after["fds"]):
                after = now
        self.burst = (before, after)
        # Each client's session keeps one connection to the simulator (HTTP/1.1) once it has made a
        # request, and `before` can come first: a 1d stream has nothing to ask until its day ends
        # (seed 50321, --widths 1d: 3 sockets before, 11 after, one per stream, all of the live
        # engine). Sockets are no leak up to one per client (each stream's, the names', the
        # organization check's); the connections of hung requests left behind would be more.
        clients = len(streams) + 2
        before_s, after_s = before["fd_kinds"].get("socket", 0), after["fd_kinds"].get("socket", 0)
        if after_s > max(before_s, clients) + 2:
            self.findings.append(f"sockets grew over {self.args.burst + 1} replacements of one config: {before_s} "
                                 f"before, {after_s} after ({clients} clients)")
        slack["fds"] += min(max(after_s, before_s), clients) - min(before_s, clients)  # those sockets
        for what in ("threads", "fds", "rss_mb"):
            if after[what] > before[what] + slack[what]:
                self.findings.append(f"{what} grew over {self.args.burst + 1} replacements of one config: "
                                     f"{before[what]} before, {after[what]} after ({before} -> {after})")

    def run(self) -> int:
        wall0 = time.monotonic()
        until = START + self.args.hours * HOUR
        try:
            while self.clock() < until:
                self.run_life()
            end_now = self.final()
            self.compare(end_now)
            self.check_clock_warnings()
        finally:
            self.sim.stop()
        print(json.dumps({
            "seed": self.args.seed, "lives": self.life, "configs": self.cid,
            "simulated_hours": round((self.clock() - START) / HOUR, 1), "wall_s": round(time.monotonic() - wall0),
            "events_acked": len(self.persisted), "stop_s_max": round(max(self.stop_times, default=0), 2),
            "hung_replacement_s_max": round(max(self.hung_waits, default=0), 2),
            "threads": [min(s["threads"] for s in self.samples), max(s["threads"] for s in self.samples)],
            "fds": [min(s["fds"] for s in self.samples), max(s["fds"] for s in self.samples)],
            "rss_mb": [round(min(s["rss_mb"] for s in self.samples)), round(max(s["rss_mb"] for s in self.samples))],
            "burst": {k: [b[k] for b in self.burst] for k in ("threads", "fds", "rss_mb")} if self.burst else None,
            "notes": dict(sorted(self.notes.items())),
        }, indent=1))
        for f in self.findings:
            print("FINDING:", f)
        return 1 if self.findings else 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hours", type=float, default=26, help="simulated hours of lives before the final phase")
    p.add_argument("--speed", type=float, default=600, help="simulated seconds per wall second")
    p.add_argument("--widths", default="1m,1h,1d", help="the bucket widths a config may pick")
    p.add_argument("--graces", default="", help="the finalization graces a config may pick (0 or none: no grace)")
    p.add_argument("--settle", type=float, default=5, help="simulated hours of the final phase")
    p.add_argument("--hang", type=float, default=20, help="wall seconds a hung request hangs")
    p.add_argument("--burst", type=int, default=20, help="replacements of one config in the final phase")
    p.add_argument("--latency", type=float, default=0.002, help="simulator latency per request (s)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--skew", default="0", help="seconds this host's clock is ahead of OpenAI's (the simulator's; "
                   "negative: behind), constant (3600) or stepped (--skew=-900,6:7200: from simulated hour 6 on, 2h "
                   "ahead); over 5 minutes, each stream's WARNING is checked")
    p.add_argument("--audit-refusals", action="store_true",
                   help="audit refusals among the faults: a 403 of the organization scope or of the tenant scope "
                        "alone, at the first two lives' start, at half the others' and in 40%% of the random faults")
    p.add_argument("--verbose", action="store_true", help="print each resource sample")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import tempfile

    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        return Soak(args, args.workdir or tmp).run()


if __name__ == "__main__":
    sys.exit(main())
