"""Costs, the two search-call streams and id-to-name enrichment.

Golden tests map the reference spec's example results; against the simulator, costs converge to its
final amounts through revisions over three simulated days, and names come from the projects, users
and project API keys endpoints without ever costing a document when a lookup fails."""
from __future__ import annotations

import math
import threading
import time
from collections import defaultdict

import pytest

from agent_input.config import config_from_dict
from agent_input.ecs import usage_event
from agent_input.engine import BadBucket, Delivery, UsageCollector, checked_counters
from agent_input.http_client import AdminApiClient
from agent_input.names import NameCache
from agent_input.outputs import NdjsonFileOutput
from agent_input.state import StateStore
from agent_input.streams import COSTS, STREAMS_BY_NAME
from kibana_assets.fields import undeclared_fields

from conftest import ADMIN_KEY, T0, dedupe, read_ndjson

DAY = 86400
START = 1730419200  # 2024-11-01, the spec's costs example
CREATED = "2024-11-05T00:00:00.000Z"


def _event(spec, result, counters=None, revision=0, width="1d"):
    from agent_input.streams import get_field

    counters = counters or {c: get_field(result, c) for c in spec.counters if get_field(result, c) is not None}
    return usage_event(spec, bucket_start=START, bucket_end=START + DAY, width=width, result=result,
                       counters=counters, revision=revision, namespace="default", created=CREATED)


def _envelope(dataset):
    return {
        "@timestamp": "2024-11-01T00:00:00.000Z",
        "ecs": {"version": "9.3.0"},
        "data_stream": {"type": "logs", "dataset": dataset, "namespace": "default"},
        "event": {"kind": "metric", "dataset": dataset, "created": CREATED},
        "tags": ["forwarded", "openai-" + dataset.split(".")[1].replace("_", "-")],
    }


BASE = {"start_time": "2024-11-01T00:00:00.000Z", "end_time": "2024-11-02T00:00:00.000Z"}


def test_costs_result():
    result = {"object": "organization.costs.result", "amount": {"value": 0.06, "currency": "usd"},
              "line_item": "gpt-4o-mini-2024-07-18, input", "project_id": "proj_abc", "api_key_id": "key_abc",
              "quantity": 400000.0, "quantity_unit": "tokens"}
    doc_id, doc = _event(COSTS, result)
    assert doc == {**_envelope("openai.costs"), "openai": {
        "base": {**BASE, "usage_object_type": "organization.costs.result", "project_id": "proj_abc",
                 "api_key_id": "key_abc", "bucket_width": "1d", "revision": 0},
        "costs": {"line_item": "gpt-4o-mini-2024-07-18, input", "amount": {"currency": "usd", "value": 0.06},
                  "quantity_unit": "tokens", "quantity": 400000.0},
    }}
    assert undeclared_fields(doc) == []
    # a correction carries only the difference, under the same nesting
    _, corr = _event(COSTS, result, counters={"amount.value": 0.015}, revision=1)
    assert corr["openai"]["costs"]["amount"] == {"currency": "usd", "value": 0.015}
    assert "quantity" not in corr["openai"]["costs"] and corr["openai"]["base"]["revision"] == 1
    assert COSTS.widths == ("1d",) and COSTS.max_limit == {"1d": 180}


def test_costs_ungrouped_result_with_nulls():
    """The spec's own example: no grouping, every dimension and the quantity null."""
    result = {"object": "organization.costs.result", "amount": {"value": 0.06, "currency": "usd"},
              "line_item": None, "project_id": None, "api_key_id": None, "quantity": None, "quantity_unit": None}
    _, doc = _event(COSTS, result)
    assert doc["openai"]["costs"] == {"amount": {"currency": "usd", "value": 0.06}}
    assert set(doc["openai"]["base"]) == {"start_time", "end_time", "usage_object_type", "bucket_width", "revision"}


def test_a_cost_result_without_an_amount_is_stored_not_refused():
    """The reference requires only `object` of a costs result; refusing one without `amount` would
    hold the costs cursor at that day for as long as OpenAI sends it."""
    result = {"object": "organization.costs.result", "line_item": "Web search", "project_id": "proj_abc",
              "quantity": 12.0, "quantity_unit": "calls"}
    assert checked_counters(COSTS, result) == {"quantity": 12.0}
    _, doc = _event(COSTS, result)
    assert "amount" not in doc["openai"]["costs"] and doc["openai"]["costs"]["quantity"] == 12.0
    with pytest.raises(BadBucket, match="not a number"):
        checked_counters(COSTS, dict(result, amount={"value": "12", "currency": "usd"}))
    assert checked_counters(COSTS, dict(result, amount=None)) == {"quantity": 12.0}  # null: as absent


@pytest.mark.parametrize("amount", [0.06, "0.06", [0.06, "usd"]])
def test_a_cost_result_whose_amount_is_not_an_object_is_refused_not_stored_without_it(amount):
    """The reference's `amount` is an object ({value, currency}); one that is not was read as no
    amount at all: the day's cost stored without it (and its currency), with nothing said."""
    result = {"object": "organization.costs.result", "amount": amount, "line_item": "Web search",
              "project_id": "proj_abc", "quantity": 12.0, "quantity_unit": "calls"}
    with pytest.raises(BadBucket, match=r"`amount` is .*, not an object"):
        checked_counters(COSTS, result)


def test_file_search_result():
    spec = STREAMS_BY_NAME["file_search_calls"]
    result = {"object": "organization.usage.file_searches.result", "num_requests": 2, "project_id": "proj_abc",
              "user_id": "user-abc", "api_key_id": "key_abc", "vector_store_id": "vs_abc"}
    _, doc = _event(spec, result)
    assert doc == {**_envelope("openai.file_search_calls"), "openai": {
        "base": {**BASE, "usage_object_type": "organization.usage.file_searches.result", "project_id": "proj_abc",
                 "user_id": "user-abc", "api_key_id": "key_abc", "bucket_width": "1d", "revision": 0},
        "file_search_calls": {"vector_store_id": "vs_abc", "num_requests": 2},
    }}
    assert undeclared_fields(doc) == []
    assert spec.object_type == result["object"]


def test_web_search_result():
    spec = STREAMS_BY_NAME["web_search_calls"]
    result = {"object": "organization.usage.web_searches.result", "num_model_requests": 2, "num_requests": 2,
              "project_id": "proj_abc", "user_id": "user-abc", "api_key_id": "key_abc",
              "model": "gpt-4o-mini-2024-07-18", "context_level": "medium"}
    _, doc = _event(spec, result)
    assert doc == {**_envelope("openai.web_search_calls"), "openai": {
        "base": {**BASE, "usage_object_type": "organization.usage.web_searches.result", "project_id": "proj_abc",
                 "user_id": "user-abc", "api_key_id": "key_abc", "model": "gpt-4o-mini-2024-07-18",
                 "num_model_requests": 2, "bucket_width": "1d", "revision": 0},
        "web_search_calls": {"context_level": "medium", "num_requests": 2},
    }}
    assert undeclared_fields(doc) == []
    assert spec.object_type == result["object"]


class _Scripted:
    """A client that answers each request with the next scripted body."""

    def __init__(self, bodies):
        self.bodies = list(bodies)

    def get_json(self, path, params):
        return self.bodies.pop(0)


def test_a_vanished_cost_group_is_corrected_to_zero_with_the_costs_object(tmp_path):
    cfg = config_from_dict({"url": "http://127.0.0.1:1", "api_key": ADMIN_KEY,
                            "data_streams": {"costs": {"initial_interval": "2d"}}}, env={})
    now = START + 2 * DAY + 3600
    row = {"object": "organization.costs.result", "amount": {"value": 1.1, "currency": "usd"},
           "line_item": "x", "project_id": "p", "api_key_id": "k", "quantity": 3.0, "quantity_unit": "tokens"}

    def page(results_by_day):
        return {"object": "page", "has_more": False, "next_page": None, "data": [
            {"object": "bucket", "start_time": START + i * DAY, "end_time": START + (i + 1) * DAY, "results": r}
            for i, r in enumerate(results_by_day)]}

    store = StateStore(tmp_path / "s")
    out = tmp_path / "c.ndjson"
    output = NdjsonFileOutput(out)
    col = UsageCollector(COSTS, cfg.stream("costs"), _Scripted([page([[row], []]), page([[], []])]),
                         Delivery(store, output), clock=lambda: now)
    col.poll(now)
    stats = col.poll(now + 60)
    output.close()
    store.close()
    assert stats.corrections == 1
    first, zero = read_ndjson(out)
    assert zero["openai"]["base"]["usage_object_type"] == "organization.costs.result"
    assert zero["openai"]["costs"]["amount"]["value"] == -1.1 and zero["openai"]["costs"]["quantity"] == -3.0
    assert zero["openai"]["base"]["revision"] == 1 and zero["openai"]["costs"]["line_item"] == "x"
    # the dimensions outside the group key too: the cost panels sum by currency (and unit), so a
    # correction without them would leave the usd total where it was
    for field in ("currency", "quantity_unit"):
        assert _leaf(zero["openai"]["costs"], field) == _leaf(first["openai"]["costs"], field) is not None, field


def _costs_run(tmp_path, bodies):
    """Polls a costs collector once per scripted body (two days from START); its documents and stats."""
    cfg = config_from_dict({"url": "http://127.0.0.1:1", "api_key": ADMIN_KEY,
                            "data_streams": {"costs": {"initial_interval": "2d"}}}, env={})
    now = START + 2 * DAY + 3600
    store, out = StateStore(tmp_path / "s"), tmp_path / "c.ndjson"
    output = NdjsonFileOutput(out)
    col = UsageCollector(COSTS, cfg.stream("costs"), _Scripted(bodies), Delivery(store, output), clock=lambda: now)
    stats = [col.poll(now + 60 * i) for i in range(len(bodies))]
    output.close()
    store.close()
    return read_ndjson(out), stats


def _costs_page(results_by_day):
    return {"object": "page", "has_more": False, "next_page": None, "data": [
        {"object": "bucket", "start_time": START + i * DAY, "end_time": START + (i + 1) * DAY, "results": r}
        for i, r in enumerate(results_by_day)]}


def _cost_row(value, currency="usd", **kw):
    return {"object": "organization.costs.result", "amount": {"value": value, "currency": currency},
            "line_item": "x", "project_id": "p", "api_key_id": "k", "quantity": 3.0, "quantity_unit": "tokens", **kw}


def test_one_group_in_two_currencies_is_reported_not_added_up(tmp_path):
    """Results of one group are added up (a group seen twice is not one lost), but amounts in two
    currencies cannot be: 10 usd and 5 eur were stored as one document of 15 usd, unsaid."""
    docs, (stats,) = _costs_run(tmp_path, [_costs_page([[_cost_row(10.0), _cost_row(5.0, "eur")],
                                                        [_cost_row(1.0), _cost_row(2.0)]])])
    assert stats.bad_buckets == 1 and "`amount.currency` 'usd' and 'eur'" in stats.errors[0]
    # the other day's group seen twice in one currency is still added up
    assert [(d["openai"]["base"]["start_time"], d["openai"]["costs"]["amount"]) for d in docs] == [
        ("2024-11-02T00:00:00.000Z", {"currency": "usd", "value": 3.0})]


@pytest.mark.parametrize("first", [True, False])
def test_a_result_without_an_amount_is_added_up_with_a_priced_one_of_its_group(tmp_path, first):
    """The reference leaves a cost result's `amount` out at will (`required_counters`): one of a
    group beside a priced one has no amount in another currency, yet the day was reported as two
    currencies (`'usd' and None`), not stored, and the cursor held before it for as long as OpenAI
    answered so. Its quantity is added up, and the group's amount keeps its currency, whichever
    result came first."""
    free = {k: v for k, v in _cost_row(0.0).items() if k != "amount"}
    day = [free, _cost_row(10.0)] if first else [_cost_row(10.0), free]
    docs, (stats,) = _costs_run(tmp_path, [_costs_page([day, [_cost_row(2.0)]])])
    assert stats.bad_buckets == 0, stats.errors
    assert sorted((d["openai"]["base"]["start_time"], d["openai"]["costs"]["amount"], d["openai"]["costs"]["quantity"])
                  for d in docs) == [("2024-11-01T00:00:00.000Z", {"currency": "usd", "value": 10.0}, 6.0),
                                     ("2024-11-02T00:00:00.000Z", {"currency": "usd", "value": 2.0}, 3.0)]
    # an amount without a currency beside a priced one is still two currencies, not one sum
    unpriced = _cost_row(5.0)
    del unpriced["amount"]["currency"]
    docs, (stats,) = _costs_run(tmp_path / "b", [_costs_page([[_cost_row(10.0), unpriced], []])])
    assert stats.bad_buckets == 1 and "'usd' and None" in stats.errors[0] and not docs


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("value", ["left out", None])
def test_a_result_with_a_currency_but_no_amount_is_added_up_with_a_priced_one(tmp_path, first, value):
    """An amount naming a currency without a value (the reference requires neither) has no amount
    in that currency either: beside a priced one of its group in another currency the day was
    reported as two currencies ('eur' and 'usd'), not stored, and the cursor held before it. It is
    added up as a result without an amount is, the group keeping its priced results' currency."""
    unpriced = _cost_row(0.0, "eur")
    if value == "left out":
        del unpriced["amount"]["value"]
    else:
        unpriced["amount"]["value"] = value
    day = [unpriced, _cost_row(10.0)] if first else [_cost_row(10.0), unpriced]
    docs, (stats,) = _costs_run(tmp_path, [_costs_page([day, [_cost_row(2.0)]])])
    assert stats.bad_buckets == 0, stats.errors
    assert sorted((d["openai"]["base"]["start_time"], d["openai"]["costs"]["amount"], d["openai"]["costs"]["quantity"])
                  for d in docs) == [("2024-11-01T00:00:00.000Z", {"currency": "usd", "value": 10.0}, 6.0),
                                     ("2024-11-02T00:00:00.000Z", {"currency": "usd", "value": 2.0}, 3.0)]


def test_an_amount_without_a_currency_after_a_result_without_an_amount_is_still_not_added_up(tmp_path):
    """An amount without a currency beside a priced one is two currencies (above), but after a
    result of its group without any amount it was taken for one of no amount too: the group kept
    that first result, amount-less, so a later usd one became the group's currency and the 5 of no
    currency was stored as part of 15 usd, unsaid. The group's amount is the first priced result's,
    currency or none, and the usd one after it is in another."""
    free = {k: v for k, v in _cost_row(0.0).items() if k != "amount"}
    unpriced = _cost_row(5.0)
    del unpriced["amount"]["currency"]
    docs, (stats,) = _costs_run(tmp_path, [_costs_page([[free, unpriced, _cost_row(10.0)], []])])
    assert stats.bad_buckets == 1 and "None and 'usd'" in stats.errors[0] and not docs


@pytest.mark.parametrize("amount", [{"currency": "eur"}, {"value": None, "currency": "eur"}])
@pytest.mark.parametrize("first", [True, False])
def test_an_amount_without_a_value_is_no_amount_in_its_currency(tmp_path, amount, first):
    """The reference leaves an amount's `value` out too: an amount that names a currency (eur) but
    has no value beside a priced result of its group in usd was reported as two currencies
    ('usd' and 'eur'), the day not stored and the cursor held before it for as long as OpenAI
    answered so. It has no amount to add up in another currency: its quantity is added up, and the
    group's amount is the priced results' (usd), whichever came first."""
    unvalued = {**_cost_row(0.0), "amount": amount}
    day = [unvalued, _cost_row(10.0)] if first else [_cost_row(10.0), unvalued]
    # first a result in the unvalued one's currency (usd here), then one in another: still two
    # currencies, whatever the group's first result named
    mixed = [{**_cost_row(0.0), "amount": {**amount, "currency": "usd"}}, _cost_row(2.0), _cost_row(1.0, "eur")]
    docs, (stats,) = _costs_run(tmp_path, [_costs_page([day, mixed])])
    assert stats.bad_buckets == 1 and "'usd' and 'eur'" in stats.errors[0], stats.errors
    assert [(d["openai"]["base"]["start_time"], d["openai"]["costs"]["amount"], d["openai"]["costs"]["quantity"])
            for d in docs] == [("2024-11-01T00:00:00.000Z", {"currency": "usd", "value": 10.0}, 6.0)]


def test_one_group_in_two_quantity_units_is_added_up_with_no_unit(tmp_path):
    """The cost panels sum quantities by unit: 3 tokens and 3 1000_tokens of one group in one day
    were stored as one document of 6 tokens, unsaid. The reference leaves `quantity_unit` null where
    no single unit applies to a result: the group's amounts are added up (they are one currency)
    and its unit left null, rather than the day (and every later one) held as bad data."""
    day = [_cost_row(10.0), _cost_row(5.0, quantity_unit="1000_tokens"), _cost_row(1.0)]
    docs, (stats,) = _costs_run(tmp_path, [_costs_page([day, [_cost_row(1.0), _cost_row(2.0)]])])
    assert stats.bad_buckets == 0, stats.errors
    assert sorted((d["openai"]["base"]["start_time"], d["openai"]["costs"].get("quantity_unit"),
                   d["openai"]["costs"]["quantity"], d["openai"]["costs"]["amount"]["value"]) for d in docs) == [
        ("2024-11-01T00:00:00.000Z", None, 9.0, 16.0), ("2024-11-02T00:00:00.000Z", "tokens", 6.0, 3.0)]


@pytest.mark.parametrize("quantity", ["none", "zero"])
@pytest.mark.parametrize("first", [True, False])
def test_a_result_without_a_quantity_leaves_its_group_s_unit_alone(tmp_path, first, quantity):
    """A result without a quantity (the reference leaves it out) beside one of 3 tokens in its group
    made the group's `quantity_unit` null, as if the 3 were in two units: the cost by line item
    panel showed 3 of no unit. It has no unit to differ in; nor has one of 0 images, which nulled
    it the same way; two results with quantities in two units still have none."""
    amount_only = {k: v for k, v in _cost_row(1.0).items() if k not in ("quantity", "quantity_unit")}
    if quantity == "zero":
        amount_only.update(quantity=0, quantity_unit="images")
    day = [amount_only, _cost_row(10.0)] if first else [_cost_row(10.0), amount_only]
    day2 = [amount_only, _cost_row(1.0), _cost_row(1.0, quantity_unit="1000_tokens")]
    docs, (stats,) = _costs_run(tmp_path, [_costs_page([day, day2])])
    assert stats.bad_buckets == 0, stats.errors
    assert sorted((d["openai"]["base"]["start_time"], d["openai"]["costs"].get("quantity_unit"),
                   d["openai"]["costs"]["quantity"], d["openai"]["costs"]["amount"]["value"]) for d in docs) == [
        ("2024-11-01T00:00:00.000Z", "tokens", 3.0, 11.0), ("2024-11-02T00:00:00.000Z", None, 6.0, 3.0)]


def test_a_day_an_earlier_version_stored_with_no_unit_is_moved_whole_to_its_unit_when_re_read(tmp_path):
    """README, *Upgrading*: a version before 7bb7399 and 5f70a82 stored a group of 3 tokens beside 0
    images (or beside a result without a quantity) with `quantity_unit` null. Its first poll after the
    upgrade, within the revision window, reads the day again: the group is zeroed under no unit and
    stored whole under tokens, the panels' sums per unit and currency right, nothing added twice."""
    earlier = [_cost_row(10.0, quantity_unit=None)]  # what that version stored: 10 usd, 3 of no unit
    now = [_cost_row(10.0), _cost_row(0.0, quantity=0, quantity_unit="images")]
    docs, (_, stats) = _costs_run(tmp_path, [_costs_page([earlier, []]), _costs_page([now, []])])
    assert _panel_sums(docs, "quantity_unit") == {("x", "tokens"): {"cost": 10.0, "quantity": 3.0}}
    assert _panel_sums(docs, "currency") == {("x", "usd"): {"cost": 10.0, "quantity": 3.0}}
    assert len(dedupe(docs)) == len(docs) and stats.corrections == 2


def test_a_group_whose_quantities_add_up_to_0_in_one_unit_still_has_that_unit(tmp_path):
    """A group's unit is that of its results with a quantity other than 0, whatever they add up to:
    3 tokens and a credit of -3 tokens, then 5 images, were stored as 5 images, the 0 they had
    added up to so far taken for no quantity at all; it is two units, stored with none. 3 tokens
    and -3 tokens alone are still 0 tokens."""
    credited = [_cost_row(10.0), _cost_row(-10.0, quantity=-3.0), _cost_row(1.0, quantity=5.0, quantity_unit="images")]
    even = [_cost_row(10.0), _cost_row(-10.0, quantity=-3.0), _cost_row(1.0, quantity=0.0, quantity_unit="images")]
    docs, (stats,) = _costs_run(tmp_path, [_costs_page([credited, even])])
    assert stats.bad_buckets == 0, stats.errors
    assert sorted((d["openai"]["base"]["start_time"], d["openai"]["costs"].get("quantity_unit"),
                   d["openai"]["costs"]["quantity"], d["openai"]["costs"]["amount"]["value"]) for d in docs) == [
        ("2024-11-01T00:00:00.000Z", None, 5.0, 1.0), ("2024-11-02T00:00:00.000Z", "tokens", 0.0, 1.0)]


def test_a_group_of_quantities_of_0_alone_has_the_same_unit_whatever_their_order(tmp_path):
    """A group whose results all have a quantity of 0, in two units, took its first result's unit:
    a re-read listing them in another order moved the group to the other unit (zeroed under one,
    emitted again under the other) though nothing changed. 0 in two units has none that applies;
    0 in one unit is under that unit, whatever else is listed beside it without a quantity."""
    amount_only = {k: v for k, v in _cost_row(1.0).items() if k not in ("quantity", "quantity_unit")}
    zeros = [_cost_row(1.0, quantity=0.0), _cost_row(1.0, quantity=0.0, quantity_unit="images")]
    docs, (_, stats) = _costs_run(tmp_path / "a", [_costs_page([zeros, [amount_only, zeros[0]]]),
                                                   _costs_page([zeros[::-1], [zeros[0], amount_only]])])
    assert stats.corrections == 0, docs
    assert sorted((d["openai"]["base"]["start_time"], d["openai"]["costs"].get("quantity_unit"),
                   d["openai"]["costs"]["quantity"]) for d in docs) == [
        ("2024-11-01T00:00:00.000Z", None, 0.0), ("2024-11-02T00:00:00.000Z", "tokens", 0.0)]


def test_a_day_re_read_with_its_results_in_another_order_gives_no_correction(tmp_path):
    """One group's amounts are added up in the order the API lists them, and floats do not add up
    the same in every order (0.1 + 0.2 + 0.3 is 0.6000000000000001, 0.3 + 0.2 + 0.1 is 0.6): a day
    re-read with its results reordered is unchanged, not a correction of -1e-16 at every poll."""
    day = [_cost_row(0.1), _cost_row(0.2), _cost_row(0.3)]
    docs, (_, stats) = _costs_run(tmp_path, [_costs_page([day, []]), _costs_page([day[::-1], []])])
    assert stats.corrections == 0 and len(docs) == 1
    assert docs[0]["openai"]["costs"]["amount"]["value"] == pytest.approx(0.6)


def _panel_sums(docs, by):
    """What the cost panels show: documents summed per (line item, `by` leaf under openai.costs)."""
    sums: dict[tuple, dict] = defaultdict(lambda: defaultdict(float))
    for d in docs:
        costs = d["openai"]["costs"]
        row = sums[(costs.get("line_item"), _leaf(costs, by))]
        row["cost"] += costs.get("amount", {}).get("value", 0)
        row["quantity"] += costs.get("quantity", 0)
    return {k: dict(v) for k, v in sums.items() if any(v.values())}


@pytest.mark.parametrize("revised,by,want", [
    # 10 usd revised to 9 eur: the panels showed 10 usd and -1 eur
    (_cost_row(9.0, "eur"), "currency", {("x", "eur"): {"cost": 9.0, "quantity": 3.0}}),
    # the same amount under another unit: nothing was emitted, the line item stayed in tokens
    (_cost_row(10.0, quantity_unit="1000_tokens"), "quantity_unit",
     {("x", "1000_tokens"): {"cost": 10.0, "quantity": 3.0}}),
])
def test_a_day_revised_into_another_currency_or_unit_moves_the_group_whole(tmp_path, revised, by, want):
    """The cost panels sum by currency (and unit); the group key leaves them out. A re-read day whose
    group changed currency or unit zeroes the group under the old ones and emits it whole under the
    new, rather than a difference under the new one."""
    docs, (_, stats) = _costs_run(tmp_path, [_costs_page([[_cost_row(10.0)], []]), _costs_page([[revised], []])])
    assert _panel_sums(docs, by) == want
    assert len(dedupe(docs)) == len(docs) and stats.corrections == 2
    assert [d["openai"]["base"]["revision"] for d in docs] == [0, 1, 2]


def test_a_group_back_in_another_currency_after_it_vanished_is_one_document_not_an_empty_zeroing_too(tmp_path):
    """A group zeroed when it vanished has nothing left under its old currency to take back: back
    in another one, it is emitted whole under it, without an empty correction under the old one."""
    docs, (_, _, stats) = _costs_run(tmp_path, [_costs_page([[_cost_row(10.0)], []]), _costs_page([[], []]),
                                                _costs_page([[_cost_row(9.0, "eur")], []])])
    assert [(d["openai"]["base"]["revision"], d["openai"]["costs"]["amount"]) for d in docs] == [
        (0, {"currency": "usd", "value": 10.0}), (1, {"currency": "usd", "value": -10.0}),
        (2, {"currency": "eur", "value": 9.0})]
    assert stats.corrections == 1


def _leaf(doc, name):
    """The value of the first key `name` anywhere in `doc`."""
    for key, value in doc.items():
        if key == name:
            return value
        if isinstance(value, dict) and (found := _leaf(value, name)) is not None:
            return found
    return None


def test_costs_converge_to_final_amounts_through_revisions(simulator, tmp_path):
    cfg = config_from_dict({"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 1,
                            "data_streams": {"costs": {"initial_interval": "4d"}}}, env={})
    assert cfg.stream("costs").effective_revision_window == 3 * DAY
    store = StateStore(tmp_path / "state")
    out = tmp_path / "costs.ndjson"
    output = NdjsonFileOutput(out)
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1)
    col = UsageCollector(COSTS, cfg.stream("costs"), client, Delivery(store, output), clock=simulator.now)
    now, corrections = T0, 0
    while now <= T0 + 3 * DAY:
        simulator.set_time(now)
        corrections += col.poll(now).corrections
        now += 6 * 3600
    final_now = now - 6 * 3600
    for c in (output, store, client):
        c.close()
    docs = dedupe(read_ndjson(out))
    assert corrections > 0, "costs should have been revised after they were first read"
    origin = int(T0 - 4 * DAY) // DAY * DAY
    settled_end = int(final_now - 3 * DAY) // DAY * DAY + DAY  # days that ended >= 2 days ago and were re-read
    got: dict[tuple, float] = defaultdict(float)
    for d in docs:
        base = d["openai"]["base"]
        start = int(__import__("datetime").datetime.fromisoformat(base["start_time"].replace("Z", "+00:00")).timestamp())
        if origin <= start < settled_end:
            key = (base.get("project_id"), d["openai"]["costs"].get("line_item"), base.get("api_key_id"))
            got[key] += d["openai"]["costs"]["amount"]["value"]
            assert d["openai"]["costs"]["amount"]["currency"] == "usd" or base["revision"] > 0
    want = simulator.truth("costs", origin, settled_end, "1d", COSTS.group_by)
    assert want
    assert set(got) == set(want)
    for key, v in want.items():
        assert math.isclose(got[key], v["amount"], rel_tol=1e-9, abs_tol=1e-6), key


def test_a_first_costs_poll_failing_with_503s_keeps_its_start(simulator, tmp_path):
    """OpenAI answering 503 past the client's retries at the costs stream's first poll: the next
    poll, a day later, reads from the day the first one asked for. Before, only a 401/403 kept
    that start, and the next poll began `initial_interval` before its own later day: the first
    window's oldest day of spend was never read."""
    from agent_input.http_client import ApiError
    from agent_input.simulator import FaultRule

    cfg = config_from_dict({"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 1,
                            "data_streams": {"costs": {"initial_interval": "2d"}}}, env={})
    store, out = StateStore(tmp_path / "state"), tmp_path / "costs.ndjson"

    def collector():
        client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1, backoff_base=0.001)
        output = NdjsonFileOutput(out)
        return UsageCollector(COSTS, cfg.stream("costs"), client, Delivery(store, output),
                              clock=simulator.now), output, client

    col, output, client = collector()
    simulator.add_fault(FaultRule(kind="503", path="/v1/organization/costs", count=None))
    simulator.set_time(T0)
    with pytest.raises(ApiError):
        col.poll(T0)
    output.close()
    client.close()
    simulator.clear_faults()
    col, output, client = collector()
    later = T0 + 3 * DAY
    simulator.set_time(later)
    col.poll(later)
    output.close()
    client.close()
    origin = int(T0 - 2 * DAY) // DAY * DAY
    final = int(later - 2 * DAY) // DAY * DAY  # the simulator's costs settle within 2 days
    got: dict[tuple, float] = defaultdict(float)
    for d in dedupe(read_ndjson(out)):
        base = d["openai"]["base"]
        start = int(__import__("datetime").datetime.fromisoformat(base["start_time"].replace("Z", "+00:00")).timestamp())
        if start < final:
            assert start >= origin
            key = (base.get("project_id"), d["openai"]["costs"].get("line_item"), base.get("api_key_id"))
            got[key] += d["openai"]["costs"]["amount"]["value"]
    want = simulator.truth("costs", origin, final, "1d", COSTS.group_by)
    assert want and set(got) == set(want)
    for key, v in want.items():
        assert math.isclose(got[key], v["amount"], rel_tol=1e-9, abs_tol=1e-6), key
    store.close()


# -- names ------------------------------------------------------------------------------------
def _doc(**base):
    return {"openai": {"base": dict(base)}}


def test_names_from_projects_users_and_api_keys(simulator):
    org = simulator.org
    key = next(k for k in org.keys if k.owner_type == "user")
    cache = NameCache(AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=1), clock=simulator.now)
    doc = _doc(project_id=key.project_id, user_id=key.owner_id, api_key_id=key.id)
    cache.enrich(doc)
    assert doc["openai"]["base"]["project_name"] == org.projects_by_id[key.project_id].name
    assert doc["openai"]["base"]["user_email"] == org.users_by_id[key.owner_id].email
    assert doc["openai"]["base"]["api_key_name"] == key.name
    archived = next(p for p in org.projects if p.archived_at is not None)
    d2 = _doc(project_id=archived.id, user_id="svc_acct_unknown")
    cache.enrich(d2)
    assert d2["openai"]["base"] == {"project_id": archived.id, "user_id": "svc_acct_unknown",
                                    "project_name": archived.name}
    # cached: no request until the refresh interval has passed
    before = simulator.stats()["requests"]
    for _ in range(20):
        cache.enrich(_doc(project_id=key.project_id))
    assert simulator.stats()["requests"] == before
    simulator.advance(3601)
    cache.enrich(_doc(project_id=key.project_id))  # starts the refresh in the background
    assert cache.wait_for_refresh(30)
    assert simulator.stats()["requests"] > before and cache.refreshes == 2
    cache.close()


def test_a_failed_lookup_never_costs_a_document(simulator):
    from agent_input.simulator import FaultRule

    org = simulator.org
    key = next(k for k in org.keys if k.owner_type == "user")
    simulator.add_fault(FaultRule(kind="500", path="/v1/organization/users", count=None))
    cache = NameCache(AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0), clock=simulator.now)
    owners = {k.owner_id for k in org.keys}
    keyless = next(u for u in org.users if u.id not in owners)
    doc = _doc(project_id=key.project_id, user_id=key.owner_id, api_key_id=key.id)
    cache.enrich(doc)
    base = doc["openai"]["base"]
    assert base["project_name"] == org.projects_by_id[key.project_id].name and base["api_key_name"] == key.name
    assert base["user_email"] == org.users_by_id[key.owner_id].email, "the key's listing names its owner"
    d_keyless = _doc(project_id=key.project_id, user_id=keyless.id)
    cache.enrich(d_keyless)
    assert "user_email" not in d_keyless["openai"]["base"], "only the users listing knows this one"
    # the whole API down: documents go out as they are, and the engine's wait does not raise
    simulator.add_fault(FaultRule(kind="reset", count=None))
    simulator.advance(3 * 3600)
    cache.ready()
    assert cache.wait_for_refresh(60) and cache.refreshes == 2 and cache.failures
    d2 = _doc(project_id=key.project_id, user_id=key.owner_id, api_key_id=key.id)
    cache.enrich(d2)
    assert d2["openai"]["base"]["project_name"] == org.projects_by_id[key.project_id].name  # stale names kept
    assert d2["openai"]["base"]["user_email"] == org.users_by_id[key.owner_id].email
    assert d2["openai"]["base"]["api_key_name"] == key.name, "no project listed: every key name is kept"
    cache.close()


def test_a_failed_listing_is_tried_again_after_the_short_back_off(simulator):
    """A listing that failed is tried again after RETRY_AFTER_FAILURE (never later than the
    refresh interval), not only at the next hourly refresh; a success clears the failures."""
    from agent_input.names import RETRY_AFTER_FAILURE
    from agent_input.simulator import FaultRule

    org = simulator.org
    keyless = next(u for u in org.users if u.id not in {k.owner_id for k in org.keys})
    for refresh_interval, back_off in ((3600, RETRY_AFTER_FAILURE), (60, 60)):
        simulator.add_fault(FaultRule(kind="500", path="/v1/organization/users", count=1))
        cache = NameCache(AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0),
                          refresh_interval=refresh_interval, clock=simulator.now)
        doc = _doc(user_id=keyless.id)
        cache.enrich(doc)
        assert "user_email" not in doc["openai"]["base"] and any("users" in f for f in cache.failures)
        simulator.advance(back_off + 1)
        cache.ready()  # starts the retry in the background
        assert cache.wait_for_refresh(30)
        doc = _doc(user_id=keyless.id)
        cache.enrich(doc)
        assert doc["openai"]["base"].get("user_email") == keyless.email, refresh_interval
        assert cache.refreshes == 2 and cache.failures == []
        cache.close()


def test_a_refused_listing_is_asked_again_at_the_next_refresh_and_said_once(simulator, caplog):
    """A key without a listing's scope (403: `check` warns that the names it gives are lost) is
    refused at every try: the whole set of listings (71 requests in a large organization) used to
    be made again every RETRY_AFTER_FAILURE, each time with a WARNING, all day long. A refusal is
    asked again at the next refresh, said at WARNING once; a short failure still backs off briefly."""
    import logging

    from agent_input.names import RETRY_AFTER_FAILURE
    from agent_input.simulator import FaultRule

    simulator.add_fault(FaultRule(kind="403", path="/v1/organization/users", count=None,
                                  message="Missing scopes: api.organization.users.read."))
    cache = NameCache(AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0), clock=simulator.now)
    with caplog.at_level(logging.DEBUG, logger="agent_input.names"):
        cache.ready()
        assert cache.refreshes == 1 and any("users" in f for f in cache.failures)
        for _ in range(12):  # an hour of polls, one every 5 minutes
            simulator.advance(RETRY_AFTER_FAILURE + 1)
            cache.ready()
            assert cache.wait_for_refresh(30)
        assert cache.refreshes == 2, "refused listings are asked again at the next refresh"
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "listing(s) failed" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    key = next(k for k in simulator.org.keys if k.owner_type == "user")
    assert cache.project_name(key.project_id) and cache.api_key_name(key.id) == key.name
    # a 5xx beside the refusal: the short back-off again
    simulator.add_fault(FaultRule(kind="500", path="/v1/organization/projects", count=1))
    simulator.advance(3601)
    cache.ready()
    assert cache.wait_for_refresh(30) and cache.refreshes == 3
    simulator.advance(RETRY_AFTER_FAILURE + 1)
    cache.ready()
    assert cache.wait_for_refresh(30) and cache.refreshes == 4
    cache.close()


def test_a_project_or_key_created_after_a_listing_is_named_within_minutes_not_an_hour(simulator):
    """Usage of a project or key the last listing did not have (created since) brings the next
    refresh forward to EARLY_REFRESH_AFTER after the last one: its documents used to go out without
    names until the hourly refresh. An id no listing has (a deleted key) asks for it once only."""
    from agent_input.names import EARLY_REFRESH_AFTER
    from agent_input.simulator.org import ApiKey, Project

    org = simulator.org
    cache = NameCache(AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0), clock=simulator.now)
    cache.ready()
    user = org.users[0]
    project = Project(id="proj_created_later", name="Created later", created_at=int(simulator.now()),
                      archived_at=None, users=[(user.id, "owner", int(simulator.now()))])
    key = ApiKey(id="key_created_later", name="fresh", project_id=project.id, owner_type="user", owner_id=user.id,
                 created_at=int(simulator.now()), weight=1.0, redacted_value="sk-proj-ab***cdef")
    project.keys.append(key.id)
    org.projects.append(project)
    org.projects_by_id[project.id] = project
    org.keys.append(key)
    org.keys_by_id[key.id] = key

    def names():
        doc = _doc(project_id=project.id, api_key_id=key.id, user_id=user.id)
        cache.ready()
        assert cache.wait_for_refresh(30)
        cache.enrich_all([doc])
        return doc["openai"]["base"].get("project_name"), doc["openai"]["base"].get("api_key_name")

    assert names() == (None, None) and cache.refreshes == 1  # not listed yet: asks for an early refresh
    simulator.advance(EARLY_REFRESH_AFTER + 1)
    names()  # starts it
    assert names() == ("Created later", "fresh") and cache.refreshes == 2
    for _ in range(3):  # an id no listing has asks once, not every few minutes
        cache.enrich_all([_doc(api_key_id="key_deleted")])
        simulator.advance(EARLY_REFRESH_AFTER + 1)
        names()
    assert cache.refreshes == 3
    cache.close()


@pytest.mark.parametrize("refused, doc", [
    ("/v1/organization/users", lambda i: _doc(user_id=f"user_not_listed_{i}")),
    ("/v1/organization/projects", lambda i: _doc(project_id=f"proj_not_listed_{i}", api_key_id=f"key_{i}")),
])
def test_ids_of_a_refused_listing_do_not_bring_refreshes_forward(simulator, refused, doc):
    """A key refused a listing (403, a scope `check` warns about) is asked again at the next
    refresh, not every few minutes. But every id that listing would have named is unknown, and
    each new one brought the next refresh, every listing again, forward to 5 minutes: a day of
    users (or projects) met for the first time re-listed everything up to 12 times an hour."""
    from agent_input.names import EARLY_REFRESH_AFTER
    from agent_input.simulator import FaultRule

    simulator.add_fault(FaultRule(kind="403", path=refused, count=None, message="Missing scopes: api.x.read."))
    cache = NameCache(AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0), clock=simulator.now)
    cache.ready()
    assert cache.refreshes == 1 and cache.failures
    for i in range(12):  # an hour: a document of an id not seen before every 5 minutes
        cache.enrich_all([doc(i)])
        simulator.advance(EARLY_REFRESH_AFTER + 1)
        cache.ready()
        assert cache.wait_for_refresh(30)
    assert cache.refreshes == 2, "only the regular refresh"
    cache.close()


def test_one_projects_refused_keys_listing_leaves_the_other_projects_new_keys_named_within_minutes(simulator):
    """A key refused one project's API keys listing (403) marked every key id as one no early
    refresh could name: a key created in any other project went out unnamed until the hourly
    refresh. Only the refused project's key ids bring nothing forward now."""
    from agent_input.names import EARLY_REFRESH_AFTER
    from agent_input.simulator import FaultRule
    from agent_input.simulator.org import ApiKey

    org = simulator.org
    refused = org.projects[0]
    other = next(p for p in org.projects[1:] if p.archived_at is None)
    simulator.add_fault(FaultRule(kind="403", path=f"/v1/organization/projects/{refused.id}/api_keys",
                                  count=None, message="Missing scopes: api.management.read."))
    cache = NameCache(AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0), clock=simulator.now)
    cache.ready()
    assert cache.refreshes == 1 and any(refused.id in f for f in cache.failures)

    def key_name(project_id: str, key_id: str):
        doc = _doc(project_id=project_id, api_key_id=key_id)
        cache.ready()
        assert cache.wait_for_refresh(30)
        cache.enrich_all([doc])
        return doc["openai"]["base"].get("api_key_name")

    # the refused project's unknown key ids: an hour of them brings no refresh forward
    for i in range(12):
        assert key_name(refused.id, f"key_in_refused_{i}") is None
        simulator.advance(EARLY_REFRESH_AFTER + 1)
    cache.ready()
    assert cache.wait_for_refresh(30) and cache.refreshes == 2, "only the regular refresh"
    # a key created in another project since the last listing: named within minutes
    key = ApiKey(id="key_created_later", name="fresh", project_id=other.id, owner_type="user",
                 owner_id=org.users[0].id, created_at=int(simulator.now()), weight=1.0,
                 redacted_value="sk-proj-ab***cdef")
    other.keys.append(key.id)
    org.keys.append(key)
    org.keys_by_id[key.id] = key
    assert key_name(other.id, key.id) is None
    simulator.advance(EARLY_REFRESH_AFTER + 1)
    key_name(other.id, key.id)  # starts the early refresh
    assert key_name(other.id, key.id) == "fresh" and cache.refreshes == 3
    cache.close()


def _enrich_while_the_first_users_listing_is_held(refused: str, page: list[dict]) -> NameCache:
    """A first load whose `refused` listing answers 403 and whose users listing is held until
    `page` (enriched on another thread) waits for it; the cache once both are over."""
    from agent_input.http_client import PermissionDeniedError

    now, api = [1000.0], _EarlyApi()
    api.error, api.failing = PermissionDeniedError, {refused}
    listing = threading.Event()
    real = api.get_json

    def get_json(path, params):
        if path.endswith("/organization/users"):
            listing.wait(30)  # until the page below waits for it
        return real(path, params)

    api.get_json = get_json
    cache = _early_cache(api, now)
    warm = cache.warm_up()
    assert cache._keys_loaded.wait(30)
    waited = threading.Thread(target=cache.enrich_all, args=(page,))
    waited.start()
    time.sleep(0.2)
    listing.set()
    waited.join(30)
    warm.join(30)
    return cache


def test_a_user_id_met_while_the_refused_users_listing_ran_brings_no_refresh_forward():
    """A page waiting for the first users listing read which listings were refused before the
    wait, when none had been yet: the users listing refused (403) during the wait, its user ids
    still brought the next refresh, every listing again, forward to 5 minutes."""
    cache = _enrich_while_the_first_users_listing_is_held("/organization/users", [_doc(user_id="user-not-listed")])
    assert cache._refused == {"users"}
    assert cache._next_refresh == 1000.0 + 3600 and cache._asked == {}


def test_ids_of_a_refused_listing_met_before_a_page_waits_for_the_users_bring_no_refresh_forward():
    """The same page, an earlier document (or the same one's project id) read before the wait: a
    key of a project whose keys listing is refused (403) was asked for with the refusals known
    before the wait (none), and brought every listing forward to 5 minutes once the wait ended."""
    page = [_doc(project_id="proj-1", api_key_id="key-of-a-refused-project"), _doc(user_id="user-member")]
    cache = _enrich_while_the_first_users_listing_is_held("/projects/proj-1/api_keys", page)
    assert cache._refused_key_projects == {"proj-1"}
    assert page[1]["openai"]["base"]["user_email"] == "member@example.com"  # it did wait for the users
    assert cache._next_refresh == 1000.0 + 3600 and cache._asked == {}


def test_a_refresh_keeps_the_key_names_of_a_project_whose_listing_failed(simulator):
    from agent_input.simulator import FaultRule

    org = simulator.org
    cache = NameCache(AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0), clock=simulator.now)
    cache.refresh()
    broken = next(p.id for p in org.projects if any(k.project_id == p.id for k in org.keys))
    simulator.add_fault(FaultRule(kind="500", path=f"/v1/organization/projects/{broken}/api_keys", count=None))
    simulator.advance(3601)
    cache.ready()
    assert cache.wait_for_refresh(30)
    assert cache.refreshes == 2 and any(f"api keys of {broken}" in f for f in cache.failures)
    assert all(cache.api_key_name(k.id) == k.name for k in org.keys if k.project_id == broken)
    cache.close()


def test_a_project_whose_keys_listing_keeps_failing_keeps_only_its_own_keys(simulator):
    """One project whose keys listing fails at every refresh (a 403 on it, say) made every listing
    incomplete: the keys, owners and service accounts of every project were then merged into the
    old ones for good, so a key deleted in any other project kept its name (and its memory) for the
    process's life. The failing project keeps its last listed keys; the others follow their listing."""
    from agent_input.simulator import FaultRule

    org = simulator.org
    cache = NameCache(AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0), clock=simulator.now)
    cache.refresh()
    with_keys = [p for p in org.projects if p.keys]
    broken, other = with_keys[0], with_keys[1]
    simulator.add_fault(FaultRule(kind="403", path=f"/v1/organization/projects/{broken.id}/api_keys",
                                  count=None, message="Missing scopes: api.management.read."))
    deleted = org.keys_by_id[other.keys[0]]
    other.keys.remove(deleted.id)
    assert cache.api_key_name(deleted.id) == deleted.name
    for refreshes in (2, 3):
        simulator.advance(3601)
        cache.ready()
        assert cache.wait_for_refresh(30) and cache.refreshes == refreshes
        assert any(f"api keys of {broken.id}" in f for f in cache.failures)
        assert all(cache.api_key_name(k) == org.keys_by_id[k].name for k in broken.keys), "kept"
        assert cache.api_key_name(deleted.id) is None, "gone with its project's listing"
        assert all(cache.api_key_name(k) == org.keys_by_id[k].name for k in other.keys)
    cache.close()


def test_api_keys_are_listed_whatever_their_owners_project_access(simulator):
    """Without owner_project_access=any the endpoint applies membership-based visibility and may
    leave enabled keys out (e.g. a key whose owner left the project): their names would be missing."""
    asked = []

    class Recording(AdminApiClient):
        def get_json(self, path, params=None):
            asked.append((path, dict(params or {})))
            return super().get_json(path, params)

    cache = NameCache(Recording(simulator.base_url, ADMIN_KEY, max_retries=0), clock=simulator.now)
    cache.refresh()
    key_listings = [params for path, params in asked if path.endswith("/api_keys")]
    assert key_listings and all(p.get("owner_project_access") == "any" for p in key_listings)
    assert all(p.get("include_archived") is True for path, p in asked if path.endswith("/organization/projects"))
    cache.close()


def _cache_calling_before_each_listing(simulator, before) -> NameCache:
    """A NameCache on worker clients whose every GET first calls `before(path)` (to hold one up)."""
    class Hooked(AdminApiClient):
        def get_json(self, path, params=None):
            before(path)
            return super().get_json(path, params)

    def factory():
        return Hooked(simulator.base_url, ADMIN_KEY, max_retries=0)

    return NameCache(factory(), clock=simulator.now, client_factory=factory)


def _cache_holding_the_users_listing(simulator):
    """A name cache whose users listing waits for the returned event (set it before joining)."""
    import threading

    release = threading.Event()

    def hold_users(path):
        if path.endswith("/organization/users"):
            assert release.wait(30), "the test never released the users listing"

    return _cache_calling_before_each_listing(simulator, hold_users), release


def test_first_load_holds_a_document_up_only_for_the_names_it_needs(simulator):
    """Projects and keys (with their owners' emails) are published before the users listing,
    the longest chain, ends; only a document whose user owns no key waits for that listing."""
    import threading

    org = simulator.org
    cache, release = _cache_holding_the_users_listing(simulator)
    warm = cache.warm_up()
    key = next(k for k in org.keys if k.owner_type == "user")
    cache.ready()  # what the engine waits for before its page gate: projects and keys, not users
    assert not release.is_set() and warm.is_alive()
    assert cache.api_key_name(key.id) == key.name and cache.project_name(key.project_id)
    owner_doc = _doc(project_id=key.project_id, user_id=key.owner_id, api_key_id=key.id)
    cache.enrich(owner_doc)  # returns while the users listing is still held back
    assert not release.is_set() and warm.is_alive()
    assert owner_doc["openai"]["base"]["user_email"] == org.users_by_id[key.owner_id].email
    assert owner_doc["openai"]["base"]["api_key_name"] == key.name

    robot = next(k for k in org.keys if k.owner_type == "service_account")
    robot_doc = _doc(project_id=robot.project_id, user_id=robot.owner_id, api_key_id=robot.id)
    robot_enrich = threading.Thread(target=cache.enrich, args=(robot_doc,))
    robot_enrich.start()
    robot_enrich.join(10)
    assert not robot_enrich.is_alive(), "a service account has no email: it must not wait for the users"
    assert "user_email" not in robot_doc["openai"]["base"] and robot_doc["openai"]["base"]["api_key_name"] == robot.name

    keyless = next(u for u in org.users if u.id not in {k.owner_id for k in org.keys})
    keyless_doc = _doc(project_id=key.project_id, user_id=keyless.id)
    waiting = threading.Thread(target=cache.enrich, args=(keyless_doc,))
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive(), "a user who owns no key waits for the users listing"
    release.set()
    waiting.join(30)
    warm.join(30)
    assert keyless_doc["openai"]["base"]["user_email"] == keyless.email
    assert all(cache.user_email(u.id) == u.email for u in org.users)
    cache.close()



def test_a_page_waiting_for_the_users_listing_lets_other_pages_through_the_gate(simulator):
    """A document whose user owns no key (a deleted key's, or every user while the api_keys
    listings are refused) waits for the users listing while its page is worked on, in the page
    gate that every stream of the process shares: it held that gate the whole wait, so every
    other stream, and every other collector of the process (another organization's), stopped
    behind one listing. The wait now sets the gate aside, and takes it back before it goes on."""
    import threading

    from agent_input.paging import PAGE_GATE

    org = simulator.org
    cache, release = _cache_holding_the_users_listing(simulator)
    warm = cache.warm_up()
    cache.ready()
    key = next(k for k in org.keys if k.owner_type == "user")
    keyless = next(u for u in org.users if u.id not in {k.owner_id for k in org.keys})
    keyless_doc = _doc(project_id=key.project_id, user_id=keyless.id)
    in_gate_again = threading.Event()

    def work_on_a_page():  # as the engine does: enrich_all inside the page gate
        with PAGE_GATE.slot(1.0):
            cache.enrich_all([keyless_doc])
            in_gate_again.set()

    page = threading.Thread(target=work_on_a_page)
    page.start()
    try:
        page.join(0.5)
        assert page.is_alive(), "the document waits for the users listing"
        assert PAGE_GATE.acquire(timeout=5), "the page gate was held while the users listing ran"
        PAGE_GATE.release()
    finally:
        release.set()
    page.join(30)
    warm.join(30)
    assert in_gate_again.is_set() and not page.is_alive()
    assert keyless_doc["openai"]["base"]["user_email"] == keyless.email
    assert PAGE_GATE.acquire(timeout=1), "the slot was given back once"
    PAGE_GATE.release()
    cache.close()


def test_build_wires_every_stream_and_names(simulator, tmp_path):
    """What `openai-input demo` runs: every data stream registered, usage and costs carry names."""
    from agent_input import app

    cfg = config_from_dict({"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 1,
                            "data_streams": {n: {"initial_interval": "1h"} for n in
                                             ("completions", "embeddings", "moderations", "images",
                                              "audio_speeches", "audio_transcriptions", "file_search_calls",
                                              "web_search_calls", "code_interpreter_sessions",
                                              "vector_stores", "audit")}}, env={})
    out = tmp_path / "all.ndjson"
    output = NdjsonFileOutput(out)
    collection = app.build(cfg, state_dir=tmp_path / "state", output=output, clock=simulator.now)
    try:
        assert collection.engine.run(once=True) == 0, collection.engine.failed
    finally:
        collection.close()
        output.close()
    docs = read_ndjson(out)
    datasets = {d["data_stream"]["dataset"].split(".", 1)[1] for d in docs}
    assert {"audit", "rate_limits", "costs", "completions"} <= datasets
    assert {c.name for c in collection.engine.collectors} == set(cfg.streams)
    usage = [d for d in docs if d["event"]["kind"] == "metric" and "start_time" in d["openai"]["base"]]
    named = [d for d in usage if d["openai"]["base"].get("project_name")]
    assert usage and len(named) == len([d for d in usage if d["openai"]["base"].get("project_id")])
    assert any("api_key_name" in d["openai"]["base"] for d in usage)
    assert any("user_email" in d["openai"]["base"] for d in usage)
    for d in docs[:2000]:
        assert undeclared_fields({k: v for k, v in d.items() if k != "_id"}) == []


def test_build_gives_each_stream_its_own_client_and_the_clock_and_close_releases_everything(
        simulator, tmp_path, monkeypatch):
    """Found by mutation testing: app.build's wiring beyond which collectors exist."""
    import time

    from agent_input import app
    from agent_input.state import StateStore as Store

    closed = []
    for cls in (AdminApiClient, Store):
        real = cls.close
        monkeypatch.setattr(cls, "close", lambda self, real=real: (closed.append(self), real(self))[1])
    from agent_input import memory

    tuned = []
    monkeypatch.setattr(memory, "tune", lambda: tuned.append(True) or True)
    # a stream this version has no collector for is skipped, and the streams after it still run
    monkeypatch.delitem(app.EXTRA_COLLECTORS, "audit")
    wanted = ("completions", "embeddings", "audit", "rate_limits", "costs")
    base = {"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 1}
    every = [s.name for s in config_from_dict(base, env={}).enabled_streams()]
    cfg = config_from_dict({**base, "data_streams": {n: {"enabled": n in wanted} for n in every}}, env={})
    output = NdjsonFileOutput(tmp_path / "out.ndjson")
    collection = app.build(cfg, state_dir=tmp_path / "state", output=output, clock=simulator.now)
    collectors = collection.engine.collectors
    assert tuned == [], "the process's malloc is the commands' to tune, not app.build's"
    assert [c.name for c in collectors] == ["completions", "embeddings", "rate_limits", "costs"]
    assert all(c.clock == simulator.now for c in collectors)  # a --now replay reaches every collector
    assert len({id(c.client) for c in collectors}) == len(collectors), "sessions are not shared across threads"
    names = collectors[0].names
    assert names is not None and names.client in collection.clients
    # a listing collector can make clients of its own for worker threads (rate limits' projects)
    worker = collectors[2].client_factory()
    assert isinstance(worker, AdminApiClient) and worker is not collectors[2].client
    worker.close()
    collection.close()
    output.close()
    assert collection.store in closed
    assert {id(c) for c in [names.client, *(c.client for c in collectors)]} <= {id(c) for c in closed}
    # --now: starts at the given time and then runs at wall speed
    clock = app.fixed_clock(1000.0)
    first = clock()
    time.sleep(0.02)
    assert 1000.0 <= first < clock() < 1010.0


def test_a_collection_closed_while_the_names_load_asks_nothing_more(simulator, tmp_path):
    """`Collection.close()` closed the clients but left the names' warm-up listing every project's
    keys on 64 workers, with clients of their own: its requests went on after close (and after
    the test), into a later test's simulator or `responses` mock (a later test counted a
    request to /v1/organization/projects/proj_.../api_keys that was not its own, in random order
    under load). Close now ends the listings and waits for them."""
    from agent_input import app

    simulator.latency = 0.02  # the first load is still listing when close() comes
    base = {"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 1}
    every = [s.name for s in config_from_dict(base, env={}).enabled_streams()]
    cfg = config_from_dict({**base, "data_streams": {n: {"enabled": n == "completions"} for n in every}}, env={})
    output = NdjsonFileOutput(tmp_path / "out.ndjson")
    before = set(threading.enumerate())
    collection = app.build(cfg, state_dir=tmp_path / "state", output=output, clock=simulator.now)
    deadline = time.monotonic() + 10
    while simulator.stats()["requests"] == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    collection.close()
    output.close()
    asked = simulator.stats()["requests"]
    assert not [t.name for t in set(threading.enumerate()) - before if t.name.startswith("names")]
    time.sleep(0.3)
    assert simulator.stats()["requests"] == asked, "requests were made after close()"


def test_listings_run_on_their_own_clients_and_one_failure_costs_only_its_names(simulator):
    """Users and each project's keys are listed concurrently, each worker with its own session."""
    from agent_input.simulator import FaultRule

    org = simulator.org
    made: list[AdminApiClient] = []

    def factory():
        made.append(AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0))
        return made[-1]

    broken = org.projects[0].id
    simulator.add_fault(FaultRule(kind="500", path=f"/v1/organization/projects/{broken}/api_keys", count=None))
    cache = NameCache(factory(), clock=simulator.now, client_factory=factory)
    cache.refresh()
    assert len(made) > 2, "listings should run on worker clients, not the cache's own"
    assert any(f"api keys of {broken}" in f for f in cache.failures)
    healthy = [k for k in org.keys if k.project_id != broken]
    assert healthy and all(cache.api_key_name(k.id) == k.name for k in healthy)
    assert all(cache.user_email(u.id) == u.email for u in org.users)
    cache.close()


def test_the_users_listing_does_not_wait_for_the_projects_listing(simulator):
    """The users listing needs no project id and is the longest chain (one page per 100 users):
    it starts beside the projects listing, not after it."""
    import threading

    users_asked = threading.Event()

    def projects_wait_for_users(path):
        if path.endswith("/organization/users"):
            users_asked.set()
        elif path.endswith("/organization/projects"):
            assert users_asked.wait(5), "the users listing waited for the projects listing"

    cache = _cache_calling_before_each_listing(simulator, projects_wait_for_users)
    cache.refresh()
    org = simulator.org
    assert not cache.failures
    assert all(cache.user_email(u.id) == u.email for u in org.users)
    assert all(cache.project_name(p.id) == p.name for p in org.projects)
    assert all(cache.api_key_name(k.id) == k.name for k in org.keys)
    cache.close()


def test_a_warm_up_that_fails_ends_quietly_and_the_first_lookup_loads_again(simulator, monkeypatch):
    """A --once run can end while the warm-up still lists (its pools then refuse new work): that
    must not be a traceback from a dying thread, and a later lookup must still get the names."""
    import threading

    dying = []
    monkeypatch.setattr(threading, "excepthook", dying.append)
    client = AdminApiClient(simulator.base_url, ADMIN_KEY, max_retries=0)
    cache = NameCache(client, refresh_interval=3600, clock=simulator.now)
    real = cache.ensure_fresh

    def refused():
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    cache.ensure_fresh = refused
    cache.warm_up().join(10)
    assert dying == []
    cache.ensure_fresh = real
    doc = {"openai": {"base": {"project_id": simulator.org.projects[0].id}}}
    cache.enrich(doc)
    assert doc["openai"]["base"]["project_name"] == simulator.org.projects[0].name
    client.close()


def test_a_listing_whose_cursor_comes_back_is_a_failure_not_a_short_list():
    """The names share the audit and rate-limit listings' pagination: a repeated last_id fails the
    listing (retried later) instead of ending it quietly with the users read so far."""
    class Looping:
        def get_json(self, path, params):
            if path.endswith("/users"):
                return {"object": "list", "data": [{"id": "user-1", "email": "a@example.com"}],
                        "has_more": True, "last_id": "user-1"}
            return {"object": "list", "data": [], "has_more": False, "last_id": None}

        def close(self):
            pass

    cache = NameCache(Looping(), refresh_interval=3600, clock=lambda: 0.0)
    cache.ensure_fresh()
    assert any("users" in f and "'user-1' came back a second time" in f for f in cache.failures), cache.failures


class _OwnerOutsideUsersApi:
    """One project, one key whose owner (user-gone) the users listing lacks; `failing` (a path
    ending) answers 503 while `fail[0]` is set."""

    def __init__(self, failing: str = "", fail: list | None = None):
        self.failing, self.fail = failing, fail or [False]

    def get_json(self, path, params):
        from agent_input.http_client import RetriesExhaustedError

        if self.fail[0] and path.endswith(self.failing):
            raise RetriesExhaustedError(503, "down", None, path)
        if path.endswith("/organization/users"):
            data = [{"id": "user-member", "email": "member@example.com"}]
        elif path.endswith("/organization/projects"):
            data = [{"id": "proj-1", "name": "project"}]
        else:
            data = [{"id": "key-1", "name": "key",
                     "owner": {"type": "user", "user": {"id": "user-gone", "email": "gone@example.com"}}}]
        return {"object": "list", "data": data, "has_more": False, "last_id": None}

    def close(self):
        pass


def test_a_key_owner_the_users_listing_lacks_keeps_the_email_its_key_gave():
    """A key's listing names its owner's email; a users listing without that user (a member
    removed while their key lives on, a listing of another moment) does not take the email away."""
    cache = NameCache(_OwnerOutsideUsersApi(), refresh_interval=3600, clock=lambda: 0.0)
    cache.ensure_fresh()
    assert cache.failures == []
    assert cache.user_email("user-gone") == "gone@example.com"
    assert cache.user_email("user-member") == "member@example.com"


@pytest.mark.parametrize("failing", ["/organization/projects", "/api_keys"])
def test_a_failed_key_listing_keeps_the_email_a_key_gave_its_owner(failing):
    """Emails that only a key's listing gives (its owner is not in the users listing) are kept,
    like the key names, when a later refresh cannot list the projects or that project's keys: a
    refresh whose users listing succeeded used to drop them, and documents lost the email."""
    now, fail = [0.0], [False]
    cache = NameCache(_OwnerOutsideUsersApi(failing, fail), refresh_interval=3600, clock=lambda: now[0])
    cache.ensure_fresh()
    assert cache.user_email("user-gone") == "gone@example.com"
    fail[0], now[0] = True, 3601.0
    cache.ensure_fresh()
    assert cache.wait_for_refresh(30) and cache.refreshes == 2 and cache.failures
    assert cache.api_key_name("key-1") == "key" and cache.user_email("user-member") == "member@example.com"
    assert cache.user_email("user-gone") == "gone@example.com", "a failed listing keeps the previous names"

class _EarlyApi:
    """Projects, keys and users a test can change; a listing can fail or be held up."""

    def __init__(self):
        from agent_input.http_client import RetriesExhaustedError

        self.error = RetriesExhaustedError
        self.projects = {"proj-1": "one", "proj-2": "two"}
        self.keys = {"proj-1": [("key-1", "user-gone", "gone@example.com")],
                     "proj-2": [("key-2", "user-old", "old@example.com")]}
        self.service_accounts = {"proj-1": [("key-sa", "svc-1")]}
        self.users = {"user-member": "member@example.com"}
        self.failing: set[str] = set()
        self.hold = threading.Event()
        self.hold.set()

    def get_json(self, path, params):
        if any(path.endswith(f) for f in self.failing):
            raise self.error(503, "down", None, path)
        if path.endswith("/organization/users"):
            self.hold.wait(30)
            data = [{"id": i, "email": e} for i, e in self.users.items()]
        elif path.endswith("/organization/projects"):
            data = [{"id": i, "name": n} for i, n in self.projects.items()]
        else:
            pid = path.split("/")[-2]
            data = [{"id": k, "name": k, "owner": {"type": "user", "user": {"id": u, "email": e}}}
                    for k, u, e in self.keys.get(pid, [])]
            data += [{"id": k, "name": k, "owner": {"type": "service_account", "service_account": {"id": sa}}}
                     for k, sa in self.service_accounts.get(pid, [])]
        return {"object": "list", "data": data, "has_more": False, "last_id": None}

    def close(self):
        pass


def _early_cache(api, now, **kwargs):
    cache = NameCache(api, refresh_interval=3600, clock=lambda: now[0], **kwargs)
    return cache


@pytest.mark.parametrize("doc", [_doc(project_id="proj-new"), _doc(api_key_id="key-new"), _doc(user_id="user-new")])
def test_an_id_not_named_brings_the_refresh_forward_once_after_the_first_load(doc):
    """Each kind of id the maps lack moves the next refresh to EARLY_REFRESH_AFTER after the last
    listing; one met before the first load ended (which lists it) is asked for once it has."""
    import copy

    from agent_input.names import EARLY_REFRESH_AFTER

    now = [1000.0]
    cache = _early_cache(_EarlyApi(), now)
    if "user_id" not in doc["openai"]["base"]:  # (a user id waits for the first load's users)
        cache.enrich_all([copy.deepcopy(doc)])  # before the first load: not a reason, not forgotten either
    cache.ensure_fresh()
    assert cache._next_refresh == 1000.0 + 3600
    now[0] = 1100.0
    cache.enrich_all([copy.deepcopy(doc)])
    assert cache._next_refresh == 1000.0 + EARLY_REFRESH_AFTER


def test_a_listed_project_with_an_empty_name_brings_no_refresh_forward():
    """A project the listing has, named "" (nothing to show): a refresh sooner names it no better."""
    now = [1000.0]
    api = _EarlyApi()
    api.projects["proj-1"] = ""
    cache = _early_cache(api, now)
    cache.ensure_fresh()
    now[0] = 1100.0
    doc = _doc(project_id="proj-1")
    cache.enrich_all([doc])
    assert "project_name" not in doc["openai"]["base"]
    assert cache._next_refresh == 1000.0 + 3600


def test_a_key_owner_that_is_a_service_account_brings_no_refresh_forward():
    now = [1000.0]
    cache = _early_cache(_EarlyApi(), now)
    cache.ensure_fresh()
    cache.enrich_all([_doc(user_id="svc-1", project_id="proj-1", api_key_id="key-sa")])
    assert cache._next_refresh == 1000.0 + 3600


def test_ids_asked_for_and_deleted_service_accounts_are_forgotten_not_kept_for_ever():
    """The ids that brought a refresh forward (once each) and the service accounts that own keys
    only grew: a month of 1,000 CI keys a day deleted was ~3 MB kept for the process's life. An id
    is remembered ASKED_FOR (met again within it, it brings nothing more forward), and a complete
    keys listing replaces the service accounts, as it replaces the keys and their owners."""
    from agent_input.names import ASKED_FOR, EARLY_REFRESH_AFTER

    now, api = [1000.0], _EarlyApi()
    cache = _early_cache(api, now)
    cache.ensure_fresh()
    assert cache._service_accounts == {"svc-1"}
    now[0] = 1100.0
    cache.enrich_all([_doc(api_key_id="key-deleted")])
    assert cache._next_refresh == 1000.0 + EARLY_REFRESH_AFTER and set(cache._asked) == {"key-deleted"}

    def refresh_at(t):
        now[0] = t
        cache.ensure_fresh()
        assert cache.wait_for_refresh(30)

    api.service_accounts = {}  # svc-1's key deleted
    refresh_at(1000.0 + EARLY_REFRESH_AFTER)
    assert cache._service_accounts == frozenset()
    cache.enrich_all([_doc(api_key_id="key-deleted")])  # still remembered: nothing moves
    assert cache._next_refresh == now[0] + 3600 and set(cache._asked) == {"key-deleted"}
    refresh_at(1100.0 + ASKED_FOR)
    assert cache._asked == {}
    cache.enrich_all([_doc(api_key_id="key-deleted")])  # met again after it: once more
    assert cache._next_refresh == now[0] + EARLY_REFRESH_AFTER


def test_a_keys_listing_that_fails_for_one_project_keeps_the_service_accounts_it_had():
    """Only a complete keys listing replaces the service accounts (5601237): one that failed for a
    project keeps those it had, or their usage documents would each bring a refresh forward."""
    now, api = [1000.0], _EarlyApi()
    cache = _early_cache(api, now)
    cache.ensure_fresh()
    assert cache._service_accounts == {"svc-1"}
    api.failing = {"proj-1/api_keys"}
    now[0] = 1000.0 + 3600
    cache.ensure_fresh()
    assert cache.wait_for_refresh(30)
    assert cache._service_accounts == {"svc-1"} and cache.api_key_name("key-sa") == "key-sa"
    cache.enrich_all([_doc(user_id="svc-1")])
    assert cache._asked == {}


@pytest.mark.parametrize("failing, after", [(set(), 3600.0), ({"/api_keys"}, 60.0)])
def test_an_id_met_while_a_refresh_runs_brings_the_next_one_forward(failing, after):
    """The refresh that was running may have listed before the id was created: the next one comes
    EARLY_REFRESH_AFTER after it ends, or sooner when a failure's back-off is shorter."""
    from agent_input.names import EARLY_REFRESH_AFTER

    now, api = [1000.0], _EarlyApi()
    cache = _early_cache(api, now, retry_after_failure=60.0)
    cache.ensure_fresh()
    api.hold.clear()
    api.failing = failing
    now[0] = 1000.0 + 3600
    cache.ensure_fresh()  # a background refresh, held up in the users listing
    cache.enrich_all([_doc(project_id="proj-new")])
    now[0] = 5000.0
    api.hold.set()
    assert cache.wait_for_refresh(30) and cache.refreshes == 2
    assert cache._next_refresh == 5000.0 + min(after, EARLY_REFRESH_AFTER)


def test_a_short_failure_said_the_same_way_twice_is_still_a_warning(caplog):
    """Only refusals (403) are said once: a 5xx is a WARNING at each try."""
    import logging

    now, api = [0.0], _EarlyApi()
    api.failing = {"/organization/users"}
    cache = _early_cache(api, now)
    with caplog.at_level(logging.DEBUG, logger="agent_input.names"):
        cache.ensure_fresh()
        now[0] = 301.0
        cache.ensure_fresh()
        assert cache.wait_for_refresh(30) and cache.refreshes == 2
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "listing(s) failed" in r.getMessage()]
    assert len(warned) == 2


def test_key_owners_emails_follow_the_listings():
    """A changed owner email is taken even when another project's keys could not be listed; a
    deleted key's owner who is no member loses the email; the users listing wins over a key's."""
    now, api = [0.0], _EarlyApi()
    cache = _early_cache(api, now)
    cache.ensure_fresh()
    assert cache.user_email("user-old") == "old@example.com"
    api.keys["proj-2"] = [("key-2", "user-old", "new@example.com")]
    api.failing = {"proj-1/api_keys"}
    now[0] = 3601.0
    cache.ensure_fresh()
    assert cache.wait_for_refresh(30) and cache.failures
    assert cache.user_email("user-old") == "new@example.com"
    assert cache.user_email("user-gone") == "gone@example.com"  # kept: its project's keys failed
    api.failing = set()
    api.keys["proj-1"] = []  # key-1 deleted
    api.users["user-old"] = "member-now@example.com"
    now[0] = 3601.0 * 2
    cache.ensure_fresh()
    assert cache.wait_for_refresh(30) and not cache.failures
    assert cache.user_email("user-gone") is None
    assert cache.user_email("user-old") == "member-now@example.com"


def test_the_keys_of_a_project_no_longer_listed_are_not_kept():
    """Each listed project's keys come from its own last listing: a project gone from the projects
    listing takes its keys (and its keys' owners) with it, rather than keeping them for good."""
    now, api = [0.0], _EarlyApi()
    cache = _early_cache(api, now)
    cache.ensure_fresh()
    assert cache.api_key_name("key-2") == "key-2"
    del api.projects["proj-2"]
    now[0] = 3601.0
    cache.ensure_fresh()
    assert cache.wait_for_refresh(30) and not cache.failures
    assert cache.api_key_name("key-2") is None and cache.api_key_name("key-1") == "key-1"


def test_a_key_of_a_refused_project_met_while_the_first_users_listing_ran_brings_no_refresh_forward():
    """A page waiting for the first users listing reads which projects' keys listings were refused
    again after the wait: read before it (none yet), a key of the refused project was asked for."""
    from agent_input.http_client import PermissionDeniedError

    now, api = [1000.0], _EarlyApi()
    api.error, api.failing = PermissionDeniedError, {"proj-1/api_keys"}
    api.hold.clear()
    cache = _early_cache(api, now)
    warm = cache.warm_up()
    assert cache._keys_loaded.wait(30)
    doc = _doc(project_id="proj-1", user_id="user-member", api_key_id="key-new")
    waited = threading.Thread(target=cache.enrich_all, args=([doc],))
    waited.start()
    time.sleep(0.2)
    api.hold.set()
    waited.join(30)
    warm.join(30)
    assert doc["openai"]["base"]["user_email"] == "member@example.com"
    assert cache._refused_key_projects == {"proj-1"}
    assert cache._next_refresh == 1000.0 + 3600 and cache._asked == {}


def test_the_names_client_retries_as_few_times_as_the_configuration_says():
    from agent_input.names import NAMES_MAX_RETRIES

    for configured, expected in ((1, 1), (8, NAMES_MAX_RETRIES)):
        config = config_from_dict({"url": "http://127.0.0.1:9", "api_key": ADMIN_KEY, "max_retries": configured},
                                  env={})
        cache = NameCache.from_config(config)
        assert cache.client.max_retries == expected
        cache.close()


class _FakeOrgApi:
    """An Admin API with one project, one key and two users whose names a test can change, whose
    users listing a test can hold up and whose listings it can make fail."""

    def __init__(self):
        import threading

        self.version = 1
        self.users_open = threading.Event()
        self.users_open.set()
        self.failing: set[str] = set()  # path endings that fail
        self.asked: list[str] = []
        self._lock = threading.Lock()

    def client(self):
        api = self

        class Client:
            def get_json(self, path, params=None):
                from agent_input.http_client import RetriesExhaustedError

                with api._lock:
                    api.asked.append(path)
                if any(path.endswith(end) for end in api.failing):
                    raise RetriesExhaustedError(500, "down", None, path)
                v = api.version
                if path.endswith("/organization/users"):
                    assert api.users_open.wait(30), "the test never released the users listing"
                    data = [{"id": "user-owner", "email": f"owner-v{v}@example.com"},
                            {"id": "user-keyless", "email": f"keyless-v{v}@example.com"}]
                elif path.endswith("/organization/projects"):
                    data = [{"id": "proj-1", "name": f"project v{v}"}]
                else:
                    data = [{"id": "key-1", "name": f"key v{v}",
                             "owner": {"type": "user", "user": {"id": "user-owner", "email": f"owner-v{v}@example.com"}}}]
                return {"object": "list", "data": data, "has_more": False, "last_id": None}

            def close(self):
                pass

        return Client()

    def names(self, cache):
        return (cache.project_name("proj-1"), cache.api_key_name("key-1"), cache.user_email("user-owner"),
                cache.user_email("user-keyless"))

    @staticmethod
    def expected(v):
        return (f"project v{v}", f"key v{v}", f"owner-v{v}@example.com", f"keyless-v{v}@example.com")


def test_a_refresh_after_the_first_load_never_holds_a_page_up(caplog):
    """After the first load, a due refresh runs in the background on one thread: ready() returns
    at once (a hanging listing used to hold the stream that found the cache stale for as long),
    documents keep the old names until the whole new set is published at once."""
    import threading
    import time

    api, now = _FakeOrgApi(), [0.0]
    cache = NameCache(api.client(), clock=lambda: now[0], client_factory=api.client)
    cache.ready()
    assert api.names(cache) == api.expected(1) and cache.refreshes == 1
    api.version, now[0] = 2, 3601.0
    api.users_open.clear()  # the refresh's users listing hangs
    try:
        callers = [threading.Thread(target=cache.ready) for _ in range(8)]  # every stream's next page
        started = time.monotonic()
        for t in callers:
            t.start()
        for t in callers:
            t.join(5)
        assert not any(t.is_alive() for t in callers), "a page waited for a names refresh after the first load"
        assert time.monotonic() - started < 2
        assert not cache.wait_for_refresh(0.2), "the refresh goes on in the background"
        doc = _doc(project_id="proj-1", user_id="user-keyless", api_key_id="key-1")
        cache.enrich(doc)  # old names, not a mix of old and new: the new set is not published yet
        assert doc["openai"]["base"] == {"project_id": "proj-1", "user_id": "user-keyless", "api_key_id": "key-1",
                                         "project_name": "project v1", "user_email": "keyless-v1@example.com",
                                         "api_key_name": "key v1"}
        assert api.names(cache) == api.expected(1)
    finally:
        api.users_open.set()
    assert cache.wait_for_refresh(30)
    assert api.names(cache) == api.expected(2) and cache.refreshes == 2 and cache.failures == []
    assert api.asked.count("/v1/organization/projects") == 2, "one refresh, not one per caller"
    # fresh again: nothing is started until the next refresh is due
    cache.ready()
    assert cache.wait_for_refresh(0) and api.asked.count("/v1/organization/projects") == 2
    cache.close()


def test_a_failed_background_refresh_keeps_the_old_names_and_backs_off(monkeypatch):
    """A background refresh that fails keeps the names it had and is tried again after
    RETRY_AFTER_FAILURE, like a first load's; one that dies of anything else does not leave the
    cache without a refresh (nor start one for every page), and no refresh starts after stop."""
    import threading

    from agent_input.names import RETRY_AFTER_FAILURE

    dying = []
    monkeypatch.setattr(threading, "excepthook", dying.append)
    api, now, stop = _FakeOrgApi(), [0.0], threading.Event()
    cache = NameCache(api.client(), clock=lambda: now[0], client_factory=api.client, stop=stop)
    cache.ready()
    api.version, now[0] = 2, 3601.0
    api.failing = {"/organization/projects", "/organization/users", "/api_keys"}
    cache.ready()
    assert cache.wait_for_refresh(30)
    assert api.names(cache) == api.expected(1), "a failed refresh keeps the old names"
    assert cache.refreshes == 2 and len(cache.failures) == 2  # projects and users (no project: no keys)
    asked = len(api.asked)
    now[0] += RETRY_AFTER_FAILURE - 1
    cache.ready()
    assert cache.wait_for_refresh(30) and len(api.asked) == asked, "tried again before the back-off"
    # something other than an API error: the refresh ends quietly and backs off as well
    real = cache.refresh
    monkeypatch.setattr(cache, "refresh", lambda: (_ for _ in ()).throw(RuntimeError("pools shut down")))
    now[0] += 2
    cache.ready()
    assert cache.wait_for_refresh(30) and dying == []
    assert any("pools shut down" in f for f in cache.failures)
    monkeypatch.setattr(cache, "refresh", real)
    cache.ready()
    assert cache.wait_for_refresh(30) and len(api.asked) == asked
    api.failing = set()
    now[0] += RETRY_AFTER_FAILURE + 1
    stop.set()
    cache.ready()
    assert cache.wait_for_refresh(0) and len(api.asked) == asked, "a refresh started after stop"
    stop.clear()
    cache.ready()
    assert cache.wait_for_refresh(30)
    assert api.names(cache) == api.expected(2) and cache.failures == []
    cache.close()


def test_a_stopping_collector_starts_no_names_listing():
    """A refresh lists every user and every project's keys; after a stop it went on asking (70
    requests after SIGTERM in the lifecycle hunt, the process waiting for them at exit)."""
    import threading

    from agent_input.names import NameCache

    calls: list = []
    stop = threading.Event()

    class Listing:
        def get_json(self, path, params):
            calls.append(path)
            stop.set()  # the stop arrives while the first page is read
            return {"object": "list", "data": [{"id": "proj_1", "name": "one"}], "has_more": len(calls) < 5,
                    "last_id": f"proj_{len(calls)}"}

        def close(self):
            pass

    NameCache(Listing(), stop=stop).refresh()
    assert len(calls) == 1


def test_a_build_that_fails_part_way_closes_the_clients_it_made(simulator, tmp_path, monkeypatch):
    """`run` builds a new engine for each config it is sent: a build that fails after some clients
    exist (a collector's constructor) must not leave their sessions open, one more per attempt."""
    from agent_input import app

    made, closed = [], []
    real_init, real_close = AdminApiClient.__init__, AdminApiClient.close
    # the clients the build makes on its own thread (the names' listing workers close theirs
    # when their listing ends, on the warm-up's thread)
    monkeypatch.setattr(AdminApiClient, "__init__", lambda self, *a, **kw: (
        made.append(self) if threading.current_thread() is threading.main_thread() else None,
        real_init(self, *a, **kw))[1])
    monkeypatch.setattr(AdminApiClient, "close", lambda self: (closed.append(self), real_close(self))[1])

    def broken(*a, **kw):
        raise RuntimeError("cannot build the rate_limits collector")

    monkeypatch.setitem(app.EXTRA_COLLECTORS, "rate_limits", broken)
    base = {"url": simulator.base_url, "api_key": ADMIN_KEY, "max_retries": 1}
    every = [s.name for s in config_from_dict(base, env={}).enabled_streams()]
    wanted = ("completions", "rate_limits", "costs")
    cfg = config_from_dict({**base, "data_streams": {n: {"enabled": n in wanted} for n in every}}, env={})
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="cannot build"):
        app.build(cfg, state_dir=tmp_path / "state", output=NdjsonFileOutput(tmp_path / "out.ndjson"),
                  clock=simulator.now)
    assert len(made) >= 3, "the names client, completions' and rate_limits' clients were made"
    assert set(map(id, made)) <= set(map(id, closed)), "every client made was closed"
    # the warm-up started before the failure is ended and waited for by the failed build: left
    # listing, it made a later test's `responses` count a request that was not the test's
    assert not [t.name for t in set(threading.enumerate()) - before if t.name.startswith("names")]


def test_a_closed_cache_s_listing_waiting_to_retry_asks_nothing_more(simulator):
    """close() said no request is started after it, but a listing waiting out a 429's Retry-After
    (the names clients' waits ended on the collector's stop only) asked again after close, and
    close() (then the process's exit: `collect --once` had nothing to collect while the users
    listing was throttled) waited for every retry."""
    from agent_input.simulator import FaultRule

    rule = FaultRule(kind="429", path="/v1/organization/users", count=None, retry_after=3)
    simulator.add_fault(rule)
    cfg = config_from_dict({"url": simulator.base_url, "api_key": ADMIN_KEY}, env={})
    cache = NameCache.from_config(cfg, clock=simulator.now, stop=threading.Event())
    cache.warm_up()
    deadline = time.monotonic() + 10
    while rule.to_dict()["fired"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rule.to_dict()["fired"] == 1
    started = time.monotonic()
    cache.close()
    assert time.monotonic() - started < 2.0, "close() waited out the Retry-After"
    time.sleep(3.5)
    assert rule.to_dict()["fired"] == 1, "the users listing was asked again after close()"


def test_a_listing_that_hangs_does_not_hold_the_process_exit_after_close(simulator, tmp_path):
    """close() waits up to CLOSE_WAIT for a listing in flight and then leaves it, but the listing
    workers were a ThreadPoolExecutor's, which the interpreter joins at exit: `collect --once` with
    a users listing that hung exited only when the request timed out (http_timeout, up to 10
    minutes), and a Ctrl-C meanwhile was a KeyboardInterrupt traceback from threading's shutdown."""
    import subprocess
    import sys

    from agent_input.simulator import FaultRule

    rule = FaultRule(kind="slow", path="/v1/organization/users", count=None, delay=8)
    simulator.add_fault(rule)
    script = tmp_path / "names_exit.py"
    script.write_text(
        "import sys, time\n"
        "from agent_input.config import config_from_dict\n"
        "from agent_input.names import NameCache\n"
        f"cfg = config_from_dict({{'url': {simulator.base_url!r}, 'api_key': {ADMIN_KEY!r}}}, env={{}})\n"
        "cache = NameCache.from_config(cfg)\n"
        "cache.warm_up()\n"
        "time.sleep(1.0)\n"
        "cache.close(timeout=0.2)\n"
        "print('closed', flush=True)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.stdout == "closed\n", done.stderr
    assert rule.to_dict()["fired"] == 1, "the users listing was not asked (or asked again)"
    assert time.monotonic() - started < 6.0, "the exit waited for the listing that hung"


def test_a_clock_stepped_back_behind_the_last_listing_does_not_hold_the_next_refresh():
    """NTP steps the clock back a day: the next refresh waited for the clock to reach its due
    time again, and that day's new projects (keys, users) were stored without names."""
    api = _EarlyApi()
    now = [100000.0]
    cache = _early_cache(api, now)
    cache.ensure_fresh()
    now[0] -= 86400
    api.projects["proj-new"] = "new"
    now[0] += 3600  # refresh_interval later, on the stepped clock
    cache.ensure_fresh()
    if cache._refreshing is not None:
        cache._refreshing.join(10)
    assert cache.refreshes == 2 and cache._projects.get("proj-new") == "new"
    cache.ensure_fresh()  # due again refresh_interval after that listing, not at once
    assert cache.refreshes == 2 and cache._next_refresh == now[0] + 3600


@pytest.mark.parametrize("error", [ValueError, KeyError])
def test_a_refresh_that_raised_with_the_clock_behind_the_last_listing_waits_for_the_retry_spacing(error, caplog):
    """A background refresh that raised something other than an API error set its retry time, but
    with the clock stepped back behind the last listing a refresh stayed due at every check (the
    clock still behind that listing): a new refresh, every listing again and a WARNING, at every
    page of every stream. It is tried again after `retry_after_failure`, on the stepped clock."""
    api = _EarlyApi()
    now = [100000.0]
    cache = _early_cache(api, now)
    cache.ensure_fresh()
    assert cache.refreshes == 1
    now[0] -= 86400  # NTP steps the clock back a day
    api.error, api.failing = error, {"/organization/projects"}
    asked = []
    real = api.get_json
    api.get_json = lambda path, params: (asked.append(path), real(path, params))[1]

    def check():
        cache.ensure_fresh()
        assert cache.wait_for_refresh(10)

    with caplog.at_level("WARNING", logger="agent_input.names"):
        check()  # the stepped clock makes a refresh due: it raises
        tried = len(asked)
        assert tried >= 1 and cache.refreshes == 1
        for _ in range(5):
            now[0] += 10
            check()
        assert len(asked) == tried, "a refresh was started again at every check"
        assert len([r for r in caplog.records if "refresh failed" in r.getMessage()]) == 1
        now[0] += cache.retry_after_failure  # the retry spacing after the failure
        api.failing = set()
        api.projects["proj-new"] = "new"
        check()
    assert cache.refreshes == 2 and cache.project_name("proj-new") == "new"
    assert cache._next_refresh == now[0] + 3600


@pytest.mark.parametrize("error", [ValueError, KeyError])
def test_a_first_load_that_raised_waits_for_the_retry_spacing(error, caplog):
    """A first load that raised something other than an API error left the cache never loaded, so
    every page of every stream (`ready()`) ran the whole first load again, synchronously, with a
    WARNING each time. It ends as a failed listing does: documents go on without the names, and
    the load is tried again after `retry_after_failure`."""
    api = _EarlyApi()
    api.error, api.failing = error, {"/organization/projects"}
    asked = []
    real = api.get_json
    api.get_json = lambda path, params: (asked.append(path), real(path, params))[1]
    now = [100000.0]
    cache = _early_cache(api, now)
    with caplog.at_level("WARNING", logger="agent_input.names"):
        cache.ready()
        tried = asked.count("/v1/organization/projects")
        assert tried == 1 and cache.refreshes == 0
        for _ in range(5):
            now[0] += 10
            cache.ready()
        assert asked.count("/v1/organization/projects") == tried, "the first load was run again at every page"
        assert len([r for r in caplog.records if "refresh failed" in r.getMessage()]) == 1
        now[0] += cache.retry_after_failure
        api.failing = set()
        cache.ready()
        assert cache.wait_for_refresh(10)
    assert cache.refreshes == 1 and cache.project_name("proj-1") == "one"
