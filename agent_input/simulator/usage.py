"""Usage and costs data: per-minute generation, late revisions, aggregation into buckets.

Each (stream, minute) is generated independently from a hash of (seed, stream, minute), so any
window can be served without generating the ones before it. A generated minute is a list of *rows*,
one per distinct full dimension tuple, each with its final counter components, the fraction of the
final value visible when the minute ends (``p_end``) and its settle time ``S`` (seconds after the
bucket end at which the final value is reached; ``S <= MAX_SETTLE``).

What the API shows at time ``t`` for a row is ``floor(final * frac(t - minute_start))`` per
component: 0 before the minute starts, rising linearly to ``p_end`` during the minute (the bucket in
progress is served with partial counts), then rising concavely to 1 at ``minute_end + S``. The
function is non-decreasing in ``t`` and every component is floored separately, so derived totals
(``input_tokens`` = cached + cache-write + uncached, …) stay exact sums of their parts at every
instant, and hour/day buckets are exactly the sums of their minutes' visible values.
"""
from __future__ import annotations

import math
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from operator import itemgetter
from typing import Callable

from .org import ORG_EPOCH, ApiKey, Organization, h64

MINUTE = 60
HOUR = 3600
DAY = 86400
WIDTHS = {"1m": MINUTE, "1h": HOUR, "1d": DAY}
#: limit (default, max) per bucket width, per the reference spec.
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
#: A minute bucket is final at most this long after it ends (busy buckets); most settle in 2-10 min.
MAX_SETTLE = 2 * HOUR
#: Costs settle within this long after the day ends.
COSTS_MAX_SETTLE = 2 * DAY

IMAGE_SIZES = ("256x256", "512x512", "1024x1024", "1792x1792", "1024x1792")
IMAGE_SOURCES = ("image.generation", "image.edit", "image.variation")
CONTEXT_LEVELS = ("low", "medium", "high")


def _derive_completions(c: tuple) -> tuple:
    it, ia, ii, ct, ca, ci, cw, ot, oa, oi, n = c
    uncached = it + ia + ii
    cached = ct + ca + ci
    return (uncached + cached + cw, cached, cw, uncached, ot + oa + oi, it, ot, ct, ia, ca, oa, ii, ci, oi, n)


@dataclass(frozen=True)
class StreamDef:
    name: str
    object: str
    dims: tuple[str, ...]  # the full dimension tuple of a row, in result order
    group_by: tuple[str, ...]  # what the spec allows in group_by
    filters: dict  # query param -> dim
    components: tuple[str, ...]  # stored per row
    counters: tuple[str, ...]  # result integer fields, in result order
    derive: Callable[[tuple], tuple] | None = None
    level: bool = False  # a storage level (vector_stores): max over time instead of sum
    rate: float = 1.0  # mean active rows per minute at peak for traffic=1 (large org scales up)


STREAMS: dict[str, StreamDef] = {s.name: s for s in (
    StreamDef(
        "completions", "organization.usage.completions.result",
        ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier"),
        ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier"),
        {"project_ids": "project_id", "user_ids": "user_id", "api_key_ids": "api_key_id", "models": "model",
         "batch": "batch"},
        ("it", "ia", "ii", "ct", "ca", "ci", "cw", "ot", "oa", "oi", "n"),
        ("input_tokens", "input_cached_tokens", "input_cache_write_tokens", "input_uncached_tokens",
         "output_tokens", "input_text_tokens", "output_text_tokens", "input_cached_text_tokens",
         "input_audio_tokens", "input_cached_audio_tokens", "output_audio_tokens", "input_image_tokens",
         "input_cached_image_tokens", "output_image_tokens", "num_model_requests"),
        _derive_completions, rate=6.0),
    StreamDef("embeddings", "organization.usage.embeddings.result",
              ("project_id", "user_id", "api_key_id", "model"), ("project_id", "user_id", "api_key_id", "model"),
              {"project_ids": "project_id", "user_ids": "user_id", "api_key_ids": "api_key_id", "models": "model"},
              ("input_tokens", "num_model_requests"), ("input_tokens", "num_model_requests"), rate=2.5),
    StreamDef("moderations", "organization.usage.moderations.result",
              ("project_id", "user_id", "api_key_id", "model"), ("project_id", "user_id", "api_key_id", "model"),
              {"project_ids": "project_id", "user_ids": "user_id", "api_key_ids": "api_key_id", "models": "model"},
              ("input_tokens", "num_model_requests"), ("input_tokens", "num_model_requests"), rate=1.5),
    StreamDef("images", "organization.usage.images.result",
              ("project_id", "user_id", "api_key_id", "model", "size", "source"),
              ("project_id", "user_id", "api_key_id", "model", "size", "source"),
              {"project_ids": "project_id", "user_ids": "user_id", "api_key_ids": "api_key_id", "models": "model",
               "sizes": "size", "sources": "source"},
              ("images", "num_model_requests"), ("images", "num_model_requests"), rate=0.8),
    StreamDef("audio_speeches", "organization.usage.audio_speeches.result",
              ("project_id", "user_id", "api_key_id", "model"), ("project_id", "user_id", "api_key_id", "model"),
              {"project_ids": "project_id", "user_ids": "user_id", "api_key_ids": "api_key_id", "models": "model"},
              ("characters", "num_model_requests"), ("characters", "num_model_requests"), rate=0.6),
    StreamDef("audio_transcriptions", "organization.usage.audio_transcriptions.result",
              ("project_id", "user_id", "api_key_id", "model"), ("project_id", "user_id", "api_key_id", "model"),
              {"project_ids": "project_id", "user_ids": "user_id", "api_key_ids": "api_key_id", "models": "model"},
              ("seconds", "num_model_requests"), ("seconds", "num_model_requests"), rate=0.6),
    StreamDef("code_interpreter_sessions", "organization.usage.code_interpreter_sessions.result",
              ("project_id",), ("project_id",), {"project_ids": "project_id"},
              ("num_sessions",), ("num_sessions",), rate=0.5),
    StreamDef("vector_stores", "organization.usage.vector_stores.result",
              ("project_id",), ("project_id",), {"project_ids": "project_id"},
              ("usage_bytes",), ("usage_bytes",), level=True),
    StreamDef("file_search_calls", "organization.usage.file_searches.result",
              ("project_id", "user_id", "api_key_id", "vector_store_id"),
              ("project_id", "user_id", "api_key_id", "vector_store_id"),
              {"project_ids": "project_id", "user_ids": "user_id", "api_key_ids": "api_key_id",
               "vector_store_ids": "vector_store_id"},
              ("num_requests",), ("num_requests",), rate=0.8),
    StreamDef("web_search_calls", "organization.usage.web_searches.result",
              ("project_id", "user_id", "api_key_id", "model", "context_level"),
              ("project_id", "user_id", "api_key_id", "model", "context_level"),
              {"project_ids": "project_id", "user_ids": "user_id", "api_key_ids": "api_key_id", "models": "model",
               "context_levels": "context_level"},
              ("num_model_requests", "num_requests"), ("num_model_requests", "num_requests"), rate=0.8),
)}

COSTS_GROUP_BY = ("project_id", "line_item", "api_key_id")
COSTS_DIMS = ("project_id", "line_item", "api_key_id")  # rows also carry a quantity unit


def diurnal(ts: float) -> float:
    """Traffic shape over the UTC day: a trough around 04:00, a peak around 16:00."""
    h = (ts % DAY) / HOUR
    return 0.25 + 0.75 * (0.5 - 0.5 * math.cos((h - 4.0) / 24.0 * 2 * math.pi))


def frac(e: float, p_end: float, settle: float) -> float:
    """Visible fraction of a minute row, e seconds after the minute started."""
    if e <= 0:
        return 0.0
    if e < MINUTE:
        return p_end * e / MINUTE
    x = (e - MINUTE) / settle if settle > 0 else 1.0
    if x >= 1:
        return 1.0
    return p_end + (1.0 - p_end) * (1.0 - (1.0 - x) ** 2)


class UsageModel:
    """Generates and caches the organization's per-minute usage rows, per stream, and daily costs."""

    def __init__(self, org: Organization, cache_minutes: int = 3000):
        self.org = org
        self.seed = org.seed
        self.cache_minutes = cache_minutes
        self._caches: dict[str, OrderedDict] = {s: OrderedDict() for s in list(STREAMS) + ["costs"]}
        self._locks = {s: threading.Lock() for s in self._caches}
        self._pools: dict[str, tuple[list, list]] = {}
        self._agg_cache: OrderedDict = OrderedDict()
        self._agg_lock = threading.Lock()
        # Traffic scale: the number of keys sets how many groups are active (≈ n_keys/80 per stream rate).
        self._scale = max(1.0, len(org.active_keys) / 20.0) * org.spec.traffic
        self._build_pools()

    # ------------------------------------------------------------------------------ pools
    def _key_dims(self, k: ApiKey) -> tuple[str, str, str]:
        return (k.project_id, self.org.key_user_id(k), k.id)

    def _build_pools(self) -> None:
        org = self.org
        rng = random.Random(h64(self.seed, "pools"))
        keys = org.active_keys or org.keys
        ms = org.models_by_stream

        def pool(entries: list[tuple[tuple, float]]) -> tuple[list, list]:
            vals, cum, acc = [], [], 0.0
            for v, w in entries:
                acc += w
                vals.append(v)
                cum.append(acc)
            return vals, cum

        def some_keys(share: float, eligible=None) -> list:
            """Keys using a stream: each with probability `share`, but at least three (the busiest)."""
            cand = [k for k in keys if eligible is None or eligible(k)]
            chosen = [k for k in cand if rng.random() < share]
            for k in cand:  # keys are in descending weight order
                if len(chosen) >= min(3, len(cand)):
                    break
                if k not in chosen:
                    chosen.append(k)
            return chosen

        def pick_models(models, n):
            if not models:
                return []
            return rng.sample(models, min(len(models), n))

        # completions: (key, model, batch, tier)
        entries = []
        for k in keys:
            kd = self._key_dims(k)
            for j, m in enumerate(pick_models(ms.get("completions", []), 1 + rng.randrange(3))):
                w = k.weight / (1 + j)
                tier = "default"
                r = rng.random()
                if m.family.startswith("o") and r < 0.3:
                    tier = "flex"
                elif r < 0.1:
                    tier = "priority"
                elif r < 0.15:
                    tier = "scale"
                entries.append(((kd + (m.name, False, tier), m), w))
                if rng.random() < 0.25:
                    entries.append(((kd + (m.name, True, "default"), m), w * 0.3))
                if tier != "default" and rng.random() < 0.5:
                    entries.append(((kd + (m.name, False, "default"), m), w * 0.5))
        self._pools["completions"] = pool(entries)

        for stream in ("embeddings", "moderations", "audio_speeches", "audio_transcriptions"):
            entries = []
            share = {"embeddings": 0.5, "moderations": 0.4, "audio_speeches": 0.15, "audio_transcriptions": 0.15}[stream]
            for k in some_keys(share):
                for m in pick_models(ms.get(stream, []), 1 + (rng.random() < 0.3)):
                    entries.append(((self._key_dims(k) + (m.name,), m), k.weight))
            self._pools[stream] = pool(entries)

        entries = []
        for k in some_keys(0.2):
            for m in pick_models(ms.get("images", []), 1 + (rng.random() < 0.3)):
                if m.name == "dall-e-2":
                    combos = [(s, src) for s in ("256x256", "512x512", "1024x1024") for src in IMAGE_SOURCES]
                elif m.name == "dall-e-3":
                    combos = [(s, "image.generation") for s in ("1024x1024", "1792x1792", "1024x1792")]
                else:
                    combos = [(s, src) for s in ("1024x1024", "1024x1792") for src in ("image.generation", "image.edit")]
                for size, src in rng.sample(combos, min(len(combos), 1 + rng.randrange(3))):
                    entries.append(((self._key_dims(k) + (m.name, size, src), m), k.weight))
        self._pools["images"] = pool(entries)

        proj_weight: dict[str, float] = {}
        for k in keys:
            proj_weight[k.project_id] = proj_weight.get(k.project_id, 0.0) + k.weight
        entries = [(((pid,), None), w) for pid, w in proj_weight.items() if rng.random() < 0.7]
        if not entries and proj_weight:
            pid = max(proj_weight, key=proj_weight.get)
            entries = [(((pid,), None), proj_weight[pid])]
        self._pools["code_interpreter_sessions"] = pool(entries)

        entries = []
        for k in some_keys(0.4, lambda k: bool(org.projects_by_id[k.project_id].vector_stores)):
            p = org.projects_by_id[k.project_id]
            if p.vector_stores:
                for vs in rng.sample(p.vector_stores, min(2, len(p.vector_stores))):
                    entries.append(((self._key_dims(k) + (vs,), None), k.weight))
        self._pools["file_search_calls"] = pool(entries)

        entries = []
        for k in some_keys(0.3):
            for m in pick_models(ms.get("completions", []), 1):
                lvl = CONTEXT_LEVELS[rng.randrange(3)]
                entries.append(((self._key_dims(k) + (m.name, lvl), m), k.weight))
        self._pools["web_search_calls"] = pool(entries)

        # vector store levels per project: (base bytes, growth per hour)
        self._vs_levels = {}
        for vs, pid in org.vector_stores:
            base, growth = self._vs_levels.get(pid, (0, 0))
            self._vs_levels[pid] = (base + 5_000_000 + h64(self.seed, "vsb", vs) % 900_000_000,
                                    growth + h64(self.seed, "vsg", vs) % 200_000)

    # ------------------------------------------------------------------------------ generation
    def burst(self, minute: int) -> float:
        """Org-wide bursts: ~6% of 10-minute blocks carry 1.8-3.5x traffic."""
        b = h64(self.seed, "burst", minute // 600)
        if b % 100 < 6:
            return 1.8 + (b >> 8) % 170 / 100.0
        return 1.0

    def minute_rows(self, stream: str, minute: int) -> list:
        """Rows of one minute: [(dims tuple, final components tuple, p_end, settle)], deterministic."""
        cache = self._caches[stream]
        lock = self._locks[stream]
        with lock:
            rows = cache.get(minute)
            if rows is not None:
                cache.move_to_end(minute)
                return rows
        rows = self._generate(stream, minute)
        with lock:
            cache[minute] = rows
            while len(cache) > self.cache_minutes:
                cache.popitem(last=False)
        return rows

    def _generate(self, stream: str, minute: int) -> list:
        sd = STREAMS[stream]
        if sd.level:
            level = []
            hours = (minute - ORG_EPOCH) // HOUR
            for pid, (base, growth) in self._vs_levels.items():
                level.append(((pid,), (base + growth * max(0, hours),), 1.0, 0.0))
            return level
        vals, cum = self._pools[stream]
        if not vals:
            return []
        rng = random.Random(h64(self.seed, stream, minute))
        burst = self.burst(minute)
        lam = sd.rate * self._scale * diurnal(minute) * burst
        n = int(lam + rng.gauss(0.0, math.sqrt(lam)) + 0.5)
        if n <= 0:
            return []
        busy = burst > 1.5
        picks = rng.choices(vals, cum_weights=cum, k=n)
        merged: dict[tuple, list] = {}
        rnd = rng.random
        for dims, m in picks:
            comps = self._components(stream, m, rng, busy)
            cur = merged.get(dims)
            if cur is None:
                merged[dims] = comps
            else:
                for i, v in enumerate(comps):
                    cur[i] += v
        rows = []
        for dims, comps in merged.items():
            r = rnd()
            if busy and r < 0.35:
                settle = 1800.0 + rnd() * (MAX_SETTLE - 1800.0)
            elif r < 0.04:
                settle = 600.0 + rnd() * 3000.0
            else:
                settle = 60.0 + rnd() * 540.0
            rows.append((dims, tuple(comps), 0.5 + 0.45 * rnd(), settle))
        return rows

    def _components(self, stream: str, m, rng: random.Random, busy: bool) -> list:
        rnd = rng.random
        if stream == "completions":
            return _completion_comps(m, rnd, 4.0 if not busy else 12.5)
        if stream in ("embeddings", "moderations"):
            n = 1 + int(rng.expovariate(0.3 if not busy else 0.1))
            return [int(n * m.avg_in * (0.3 + 1.4 * rnd())) + n, n]
        if stream == "images":
            n = 1 + int(rng.expovariate(1.0))
            return [n * (1 + (rnd() < 0.2) * rng.randrange(1, 4)), n]
        if stream == "audio_speeches":
            n = 1 + int(rng.expovariate(0.7))
            return [int(n * (50 + 900 * rnd())), n]
        if stream == "audio_transcriptions":
            n = 1 + int(rng.expovariate(0.7))
            return [int(n * (3 + 240 * rnd())), n]
        if stream == "code_interpreter_sessions":
            return [1 + int(rng.expovariate(0.8))]
        if stream == "file_search_calls":
            return [1 + int(rng.expovariate(0.3))]
        if stream == "web_search_calls":
            n = 1 + int(rng.expovariate(0.4))
            return [n, n + int(rng.expovariate(0.5))]
        raise KeyError(stream)

    # ------------------------------------------------------------------------------ buckets
    @staticmethod
    def _matcher(sd: StreamDef, filters: dict[str, set]) -> Callable[[tuple], bool] | None:
        checks = [(sd.dims.index(dim), vals) for dim, vals in filters.items()]
        if not checks:
            return None

        def ok(dims: tuple) -> bool:
            for i, vals in checks:
                if dims[i] not in vals:
                    return False
            return True
        return ok

    def bucket_groups(self, stream: str, start: int, width: int, now: float, group_by: tuple[str, ...],
                      filters: dict[str, set], final: bool = False) -> dict[tuple, list]:
        """Aggregated components per group key for the bucket [start, start+width) as seen at `now`
        (or final values). Groups whose visible components are all zero are left out."""
        sd = STREAMS[stream]
        settled = final or now >= start + width + MAX_SETTLE
        ckey = None
        if settled and width > MINUTE:
            # A settled hour/day bucket never changes again: keep its aggregate.
            ckey = (stream, start, width, group_by, tuple(sorted((k, frozenset(v)) for k, v in filters.items())))
            with self._agg_lock:
                hit = self._agg_cache.get(ckey)
                if hit is not None:
                    self._agg_cache.move_to_end(ckey)
                    return {k: list(v) for k, v in hit.items()}
        final = settled
        idx = [sd.dims.index(g) for g in group_by]
        if not idx:
            keyf = lambda d: ()  # noqa: E731
        elif len(idx) == 1:
            i0 = idx[0]
            keyf = lambda d: (d[i0],)  # noqa: E731
        else:
            keyf = itemgetter(*idx)
        match = self._matcher(sd, filters)
        acc: dict[tuple, list] = {}
        last = start + width if final else min(start + width, int(now // MINUTE * MINUTE) + MINUTE)
        ncomp = len(sd.components)
        level = sd.level
        for minute in range(start, last, MINUTE):
            e = now - minute
            macc = {} if sd.level else acc
            for dims, fin, p_end, settle in self.minute_rows(stream, minute):
                if match is not None and not match(dims):
                    continue
                if final or level or e >= MINUTE + settle:
                    vis = fin  # a storage level is shown whole from the minute's start
                else:
                    f = frac(e, p_end, settle)
                    vis = [int(x * f) for x in fin]
                    if not any(vis):
                        continue
                key = keyf(dims)
                cur = macc.get(key)
                if cur is None:
                    macc[key] = list(vis)
                else:
                    for i in range(ncomp):
                        cur[i] += vis[i]
            if sd.level:
                for key, v in macc.items():
                    cur = acc.get(key)
                    if cur is None or v[0] > cur[0]:
                        acc[key] = v
        if ckey is not None:
            with self._agg_lock:
                self._agg_cache[ckey] = {k: tuple(v) for k, v in acc.items()}
                while len(self._agg_cache) > 256:
                    self._agg_cache.popitem(last=False)
        return acc

    def results(self, stream: str, groups: dict[tuple, list], group_by: tuple[str, ...]) -> list[dict]:
        """Result objects, in a deterministic order (the order groups first appear in the bucket)."""
        sd = STREAMS[stream]
        derive = sd.derive
        fields = ("object",) + sd.counters + sd.dims
        obj = (sd.object,)
        pos = {g: i for i, g in enumerate(group_by)}
        src = [pos.get(d, -1) for d in sd.dims]
        if src == list(range(len(sd.dims))):
            dimvals = lambda key: key  # noqa: E731 - grouped by every dimension, in order
        else:
            def dimvals(key, src=src):
                return tuple([key[j] if j >= 0 else None for j in src])
        out = []
        append = out.append
        for key, comps in groups.items():
            vals = derive(comps) if derive else comps
            append(dict(zip(fields, (*obj, *vals, *dimvals(key)))))
        return out

    # ------------------------------------------------------------------------------ costs
    def cost_rows(self, day: int) -> list:
        """Rows of one day: [((project_id, line_item, api_key_id), (micro_usd, quantity), unit, p_end, settle)]."""
        cache = self._caches["costs"]
        with self._locks["costs"]:
            rows = cache.get(day)
            if rows is not None:
                return rows
        rows = self._generate_costs(day)
        with self._locks["costs"]:
            cache[day] = rows
            while len(cache) > 400:
                cache.popitem(last=False)
        return rows

    _PRICES = {  # per unit, in micro-USD
        "input": (0.15, "tokens"), "output": (0.6, "tokens"), "cached input": (0.075, "tokens"),
    }

    def _generate_costs(self, day: int) -> list:
        org = self.org
        rng = random.Random(h64(self.seed, "costs", day))
        rnd = rng.random
        d = 1.0 + 0.6 * rnd()
        merged: dict[tuple, list] = {}
        units: dict[tuple, str] = {}
        keys = org.active_keys or org.keys
        active_share = min(1.0, 8.0 / max(1, len(keys)) + 0.3)
        for k in keys:
            if rnd() > active_share:
                continue
            scale = k.weight * d * 1000.0
            for m in org.models_by_stream.get("completions", [])[: 1 + rng.randrange(3)]:
                big = 4.0 if m.family in ("gpt-4o", "gpt-4.1", "o3") else 1.0
                for kind, (price, unit) in self._PRICES.items():
                    if kind == "cached input" and rnd() < 0.5:
                        continue
                    qty = int(scale * (200 + 20000 * rnd()) * (0.4 if kind == "output" else 1.0))
                    _add(merged, units, (k.project_id, f"{m.name}, {kind}", k.id),
                         int(qty * price * big), qty, unit)
            if rnd() < 0.3:
                em = (org.models_by_stream.get("embeddings") or [None])[0]
                if em is not None:
                    qty = int(scale * 5000 * rnd()) + 1
                    _add(merged, units, (k.project_id, em.name, k.id), int(qty * 0.02), qty, "tokens")
            if rnd() < 0.1:
                im = (org.models_by_stream.get("images") or [None])[0]
                if im is not None:
                    qty = 1 + rng.randrange(40)
                    _add(merged, units, (k.project_id, im.name, k.id), qty * 40000, qty, "images")
            if rnd() < 0.05:
                qty = 1 + rng.randrange(2000)
                _add(merged, units, (k.project_id, "web search tool calls", k.id), qty * 10000, qty, "")
        for pid, (base, _g) in self._vs_levels.items():
            gib_h = int(base / 2 ** 30 * 24) + 1
            _add(merged, units, (pid, "vector store storage", None), gib_h * 4166, gib_h, "gibibyte_hours")
        rows = []
        for dims, (amount, qty) in merged.items():
            settle = 2 * HOUR + rnd() * (COSTS_MAX_SETTLE - 2 * HOUR)
            rows.append((dims, (max(1, amount), qty), units[dims] or None, 0.6 + 0.3 * rnd(), settle))
        return rows

    def cost_groups(self, day: int, now: float, group_by: tuple[str, ...], filters: dict[str, set],
                    final: bool = False) -> dict[tuple, list]:
        """Costs per group for the day bucket: key -> [micro_usd, quantity, unit or None]."""
        idx = [COSTS_DIMS.index(g) for g in group_by]
        e = now - day
        pf = filters.get("project_id")
        kf = filters.get("api_key_id")
        acc: dict[tuple, list] = {}
        if not final and e <= 0:
            return acc
        for dims, fin, unit, p_end, settle in self.cost_rows(day):
            if pf is not None and dims[0] not in pf:
                continue
            if kf is not None and dims[2] not in kf:
                continue
            if final or e >= DAY + settle:
                amount, qty = fin
            else:
                if e < DAY:
                    f = p_end * e / DAY
                else:
                    x = (e - DAY) / settle
                    f = p_end + (1 - p_end) * (1 - (1 - x) ** 2)
                amount, qty = int(fin[0] * f), int(fin[1] * f)
                if amount == 0:
                    continue
            key = tuple(dims[i] for i in idx)
            cur = acc.get(key)
            if cur is None:
                acc[key] = [amount, qty, unit]
            else:
                cur[0] += amount
                cur[1] += qty
                if cur[2] != unit:
                    cur[2] = None
        return acc

    @staticmethod
    def cost_results(groups: dict[tuple, list], group_by: tuple[str, ...]) -> list[dict]:
        out = []
        with_qty = "line_item" in group_by
        for key in sorted(groups, key=_sort_key):
            amount, qty, unit = groups[key]
            r = {
                "object": "organization.costs.result",
                "amount": {"value": round(amount / 1e6, 6), "currency": "usd"},
                "line_item": None,
                "project_id": None,
                "api_key_id": None,
                "quantity": qty if with_qty and unit else None,
                "quantity_unit": unit if with_qty else None,
            }
            r.update(zip(group_by, key))
            out.append(r)
        return out


def _completion_comps(m, rnd, mean_requests: float) -> list:
    """Final components of one (key, model, batch, tier) pick: input/output split by modality."""
    n = 1 + int(-mean_requests * math.log(1.0 - rnd()))
    total_in = int(n * m.avg_in * (0.3 + 1.4 * rnd()))
    out = int(n * m.avg_out * (0.3 + 1.4 * rnd()))
    r = rnd()
    cached = int(total_in * r * 0.857) if r < 0.7 else 0  # ~70% of picks hit the cache
    r = rnd()
    cw = int(total_in * r * 0.266) if r < 0.3 else 0
    unc = total_in - cached - cw
    if m.audio:
        a = 0.3 + 0.5 * rnd()
        ia, ca, oa = int(unc * a), int(cached * a), int(out * (0.4 + 0.4 * rnd()))
    else:
        a = 0.0
        ia = ca = oa = 0
    ii = ci = oi = 0
    if m.vision:
        r = rnd()
        if r < 0.25:
            i = r * 1.2 * (1 - a)
            ii, ci = int(unc * i), int(cached * i)
        if r > 0.97:
            oi = int(out * 0.5 * rnd())
    return [unc - ia - ii, ia, ii, cached - ca - ci, ca, ci, cw, out - oa - oi, oa, oi, n]


def _add(merged: dict, units: dict, dims: tuple, amount: int, qty: int, unit: str) -> None:
    cur = merged.get(dims)
    if cur is None:
        merged[dims] = [amount, qty]
        units[dims] = unit
    else:
        cur[0] += amount
        cur[1] += qty


def _sort_key(key: tuple) -> tuple:
    return tuple("" if v is None else str(v) for v in key)


def align(ts: int, width: int) -> int:
    return ts // width * width


__all__ = ["STREAMS", "StreamDef", "UsageModel", "WIDTHS", "LIMITS", "MAX_SETTLE", "COSTS_MAX_SETTLE",
           "frac", "align"]
