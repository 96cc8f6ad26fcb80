"""Property-based test (hypothesis) of the costs stream against an in-memory costs API: for any
sequence of polls over a few days, each day's answer any mix of results of a few groups (an amount,
none, or one without a value or a currency; int or float values with many decimals, credits, usd or
eur; a quantity (a credit too) or none in tokens or 1000_tokens or no unit; null project or line item), a day's
results split over pages anywhere, revised between polls (values, currency, unit, results appearing
and vanishing), with API errors part-way through a poll, output failures and restarts between
polls, the documents delivered, deduplicated by id and summed per day, group
and currency as the Costs dashboard's ES|QL sums them (`kibana_assets/queries.py` costs_panels:
SUM(openai.costs.amount.value) BY currency; and SUM(openai.costs.quantity) BY unit), equal OpenAI's
latest answer for every day that answer is good; a day with one group in two currencies is
reported and never stored half.

`COSTS_EXAMPLES` asks for more examples (30 by default, a few seconds; a hunt, thousands:
`COSTS_EXAMPLES=3000 pytest -p no:timeout ...`, the suite's 300 s per test being too short)."""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from datetime import datetime

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent_input.config import StreamConfig
from agent_input.engine import Delivery, UsageCollector
from agent_input.state import StateStore
from agent_input.streams import COSTS

from reliability_helpers import Out, poll_steps

EXAMPLES = int(os.environ.get("COSTS_EXAMPLES", 30))

DAY = 86400
HOUR = 3600
T0 = 1763856000 + 5 * HOUR  # 2025-11-23T05:00:00Z
SETTLE = DAY + 12 * HOUR  # OpenAI revises a day for at most this long after its end
WINDOW = 2 * DAY  # the collector's revision window (longer)
# (project_id, line_item), api_key_id null: null ones too, as an ungrouped or unattributed result has
GROUPS = (("proj_a", "gpt-4o, input"), ("proj_a", None), (None, "gpt-4o, input"), ("proj_b", "gpt-4o, output"))
CURRENCIES = ("usd", "eur")
UNITS = ("tokens", "1000_tokens", None)

# Amounts as OpenAI sends them: whole numbers (a JSON int), cents, floats with many decimals, credits
value = st.one_of(st.integers(-500, 5000), st.integers(-10**5, 10**6).map(lambda n: n / 100),
                  st.integers(-10**13, 10**14).map(lambda n: n / 10**10),
                  st.floats(-500, 5000, allow_nan=False, allow_infinity=False))
quantity = st.one_of(st.integers(0, 10**7), st.integers(-3, 3),  # a few, or credits: a sum of 0
                     st.floats(0, 10**6, allow_nan=False, allow_infinity=False))
result_draw = st.tuples(
    st.integers(0, len(GROUPS) - 1),  # its group
    # an amount; or none (the reference leaves out `amount`, or its `value`, at will): no amount at
    # all, a null one, or one with a currency but no value; or a value without a currency (the
    # reference leaves that out too: beside a priced one it is in another currency)
    st.sampled_from(["value"] * 8 + ["none", "none", "null", "currency_only", "currency_only", "no_currency"]),
    value,
    st.integers(0, 11).map(lambda n: n == 0),  # in the other currency than its group's (a bad day)
    st.one_of(st.none(), quantity),  # a quantity, or none
    st.sampled_from(UNITS),
)
# a day's answer: each group's currency, and its results in the order OpenAI lists them
day_draw = st.tuples(st.tuples(*[st.sampled_from(CURRENCIES)] * len(GROUPS)), st.lists(result_draw, max_size=6))
_EMPTY = (("usd",) * len(GROUPS), [])


def _answer(draw) -> list[dict]:
    currencies, results = draw
    out = []
    for g, kind, v, odd, q, unit in results:
        project_id, line_item = GROUPS[g]
        r: dict = {"object": "organization.costs.result", "project_id": project_id, "line_item": line_item,
                   "api_key_id": None}
        currency = currencies[g] if not odd else CURRENCIES[1 - CURRENCIES.index(currencies[g])]
        if kind == "value":
            r["amount"] = {"value": v, "currency": currency}
        elif kind == "null":
            r["amount"] = None
        elif kind == "currency_only":
            r["amount"] = {"currency": currency}
        elif kind == "no_currency":
            r["amount"] = {"value": v}
        if q is not None:
            r["quantity"] = q
        elif unit is not None and odd:
            r["quantity"] = None  # null, as the reference allows, rather than left out
        if q is not None or odd:
            r["quantity_unit"] = unit
        out.append(r)
    return out


def _key(r: dict) -> tuple:
    return (r.get("project_id"), r.get("line_item"), r.get("api_key_id"))


def _good(results: list[dict]) -> bool:
    """No group with amounts in two currencies (the one thing that cannot be added up)."""
    seen: dict[tuple, set] = defaultdict(set)
    for r in results:
        if (r.get("amount") or {}).get("value") is not None:
            seen[_key(r)].add(r["amount"].get("currency"))
    return all(len(c) == 1 for c in seen.values())


def _truth(results: list[dict]) -> tuple[dict, dict]:
    """One day's answer as the dashboard should show it: amount per (group, currency); quantity per
    (group, unit), a group whose results with a quantity differ in unit under no unit (null), as the
    reference says OpenAI gives one no single unit applies to. A quantity of 0 has no unit to differ in
    beside another; a group with quantities of 0 alone is under their unit, or none if they differ."""
    amounts: dict[tuple, float] = defaultdict(float)
    units: dict[tuple, set] = defaultdict(set)  # of the quantities other than 0
    zeros: dict[tuple, set] = defaultdict(set)  # of the quantities of 0
    quantities: dict[tuple, float] = defaultdict(float)
    for r in results:
        amount = r.get("amount") or {}
        if amount.get("value") is not None:
            amounts[_key(r) + (amount.get("currency"),)] += amount["value"]
        if r.get("quantity") is not None:
            (units if r["quantity"] else zeros)[_key(r)].add(r.get("quantity_unit"))
            quantities[_key(r)] += r["quantity"]
    unit = {k: next(iter(u)) if len(u) == 1 else None for k, u in ((k, units[k] or zeros[k]) for k in quantities)}
    by_unit = {k + (unit[k],): v for k, v in quantities.items()}
    return dict(amounts), by_unit


class CostsApi:
    """1d cost buckets from `start_time` to `end_time`, each the day's current answer; pages of at
    most `page` results, a day's results continued on the next page (the same `start_time`) where
    a page ends inside it. Faults: the n-th request of a poll raises."""

    def __init__(self, page: int):
        self.now = T0
        self.days: dict[int, list[dict]] = {}
        self.versions: dict[int, list[list[dict]]] = defaultdict(list)  # every answer a day ever had
        self.page = page
        self.fail_at: int | None = None
        self.calls = 0

    def set(self, day: int, results: list[dict]) -> None:
        self.days[day] = results
        self.versions[day].append(results)

    def revise(self, revisions) -> None:
        """New answers for days still settling: in progress, or ended less than SETTLE ago."""
        for ago, draw in revisions:
            day = self.now // DAY * DAY - ago * DAY
            if day + DAY >= self.now - SETTLE:
                self.set(day, _answer(draw))

    def get_json(self, path, params):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            self.fail_at = None
            raise ConnectionError("injected API failure")
        assert params["bucket_width"] == "1d" and params["group_by"] == ["project_id", "line_item", "api_key_id"]
        day, skip = map(int, (params.get("page") or f"{params['start_time']}:0").split(":"))
        end = min(params["end_time"], self.now // DAY * DAY + DAY)
        buckets, room = [], self.page
        while day < end and room > 0:
            results = self.days.get(day, [])[skip:]
            taken = results[:room]
            buckets.append({"object": "bucket", "start_time": day, "end_time": day + DAY,
                            "results": json.loads(json.dumps(taken))})
            room -= max(1, len(taken))
            if len(taken) < len(results):
                skip += len(taken)
                break
            day, skip = day + DAY, 0
        more = day < end
        return {"object": "page", "data": buckets, "has_more": more, "next_page": f"{day}:{skip}" if more else None}


def _stored(out: Out) -> tuple[dict, dict]:
    """Every id delivered, as Elasticsearch's `create` keeps it (the first wins; no id carries two
    contents), summed as the cost panels sum: amount per (day, group, currency), quantity per
    (day, group, unit)."""
    by_id = out.by_id()
    amounts: dict[int, dict] = defaultdict(lambda: defaultdict(float))
    quantities: dict[int, dict] = defaultdict(lambda: defaultdict(float))
    for doc in by_id.values():
        base, costs = doc["openai"]["base"], doc["openai"].get("costs", {})
        day = int(datetime.fromisoformat(base["start_time"].replace("Z", "+00:00")).timestamp())
        group = (base.get("project_id"), costs.get("line_item"), base.get("api_key_id"))
        amount = costs.get("amount") or {}
        if amount.get("value") is not None:
            amounts[day][group + (amount.get("currency"),)] += amount["value"]
        if costs.get("quantity") is not None:
            quantities[day][group + (costs.get("quantity_unit"),)] += costs["quantity"]
    return amounts, quantities


def _differ(got: dict, want: dict) -> dict:
    """The keys whose sums differ by a ten-thousandth of a cent or more (a key missing is 0)."""
    return {k: (got.get(k, 0), want.get(k, 0)) for k in set(got) | set(want)
            if abs(got.get(k, 0) - want.get(k, 0)) >= TOLERANCE}


# Sums are compared to 1e-6 (a ten-thousandth of a cent), absolutely: what may differ is only
# float noise (a float64 sum of a few amounts under 10^5 is off by ~1e-11) and the rounding of each
# correction to 9 decimals (`_difference`: at most 5e-10 a correction), orders of magnitude below
# it; a result lost, counted twice or under another currency differs by its whole amount. (A
# relative tolerance would let a large day hide a lost small result; rounding both to cents
# would call 0.004999999 and 0.005 two cents apart.)
TOLERANCE = 1e-6

step = st.tuples(
    st.one_of(st.integers(0, 30), st.integers(30, 120)),  # hours to advance: a poll interval, or a pause
    st.lists(st.tuples(st.integers(0, 2), day_draw), max_size=3),  # days revised (days ago, answer)
    st.sampled_from(["poll", "poll", "poll", "api_error", "output_before", "output_after", "restart"]),
    st.integers(1, 4),  # which request of the poll fails
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=st.lists(day_draw, min_size=4, max_size=4), initial=st.integers(1, 3),
       steps=st.lists(step, min_size=1, max_size=8), page=st.integers(1, 12))
# Found by this property: an amount naming eur without a value beside a usd one of its group was
# reported as two currencies, the day never stored; the group's first result naming usd without a
# value, then 0 usd and 1 eur, was stored as 1 eur (the 0 usd not seen as a priced one), unsaid; and
# an amount without a currency after a result without any, then 10 usd, was stored as 15 usd.
@example(history=[_EMPTY,
                  (("usd",) * 4, [(1, "currency_only", 0, True, None, "tokens"), (1, "value", 10, False, 3, "tokens")]),
                  (("usd",) * 4, [(1, "currency_only", 0, False, None, None), (1, "value", 0, False, None, None),
                                  (1, "value", 1, True, None, None)]),
                  (("usd",) * 4, [(2, "none", 0, False, 3, "tokens"), (2, "no_currency", 5, False, None, None),
                                  (2, "value", 10, False, None, None)])],
         initial=3, steps=[(24, [], "poll", 1)], page=12)
def test_stored_costs_sum_to_openai_s_latest_answer_for_every_good_day(history, initial, steps, page):
    api = CostsApi(page)
    for i, draw in enumerate(history):  # the days before the first poll, today's (in progress) last
        api.set(T0 // DAY * DAY - (len(history) - 1 - i) * DAY, _answer(draw))
    out = Out()
    cfg = StreamConfig(name="costs", enabled=True, interval=3600, initial_interval=initial * DAY,
                       bucket_width="1d", finalization_grace=0, revision_window=WINDOW, batch_size=None,
                       include_archived=False)
    with tempfile.TemporaryDirectory() as tmp:
        def start():
            store = StateStore(tmp)
            delivery = Delivery(store, out)
            delivery.replay_pending()  # what Engine.run does first after a (re)start
            return store, UsageCollector(COSTS, cfg, api, delivery, clock=lambda: api.now)

        store, stats = poll_steps(api, out, start, steps, HOUR, api.revise)
        origin = store.cursor("costs", "1d").origin
        store.close()

    amounts, quantities = _stored(out)
    end = api.now // DAY * DAY  # the day in progress is not asked for
    stored_days = {d for d in set(amounts) | set(quantities)
                   if any(abs(v) >= TOLERANCE for v in [*amounts[d].values(), *quantities[d].values()])}
    assert all(origin <= d < end for d in stored_days), "a day stored outside what was asked"
    bad_days = []
    for day in range(origin, end, DAY):
        latest = api.days.get(day, [])
        if _good(latest):
            want_amounts, want_quantities = _truth(latest)
            assert not _differ(amounts.get(day, {}), want_amounts), (day, _differ(amounts.get(day, {}), want_amounts))
            assert not _differ(quantities.get(day, {}), want_quantities), (
                day, _differ(quantities.get(day, {}), want_quantities))
        else:
            bad_days.append(day)
            # never stored half: what is stored of it is nothing, or a good answer it had before, whole
            stored = (amounts.get(day, {}), quantities.get(day, {}))
            candidates = [({}, {})] + [_truth(v) for v in api.versions[day] if _good(v)]
            assert any(not _differ(stored[0], a) and not _differ(stored[1], q) for a, q in candidates), (
                day, stored)
    # the last poll reads every bad day again (the cursor stays before the first one) and reports it
    assert stats.bad_buckets == len(bad_days), (stats.bad_buckets, bad_days, stats.errors)
    assert all("cannot be added up" in e for e in stats.errors), stats.errors
