"""A loopback OpenAI organization Admin API: seeded organization, late revisions, faults, truth.

    from agent_input.simulator import Simulator, FaultRule
    sim = Simulator(seed=1, org="small", now=1763892000.0)
    base_url = sim.start()          # http://127.0.0.1:PORT ; API paths are base_url + "/v1/organization/..."
    ...
    sim.stop()

Served (GET, ``Authorization: Bearer <admin_key>``), shapes and limits per
``shared/reference/openai-admin-openapi.yaml``:

- ``/v1/organization/usage/{completions, embeddings, moderations, images, audio_speeches,
  audio_transcriptions, code_interpreter_sessions, vector_stores, file_search_calls, web_search_calls}``
- ``/v1/organization/costs`` (1d buckets; group_by project_id, line_item, api_key_id; limit 1..180, default 7)
- ``/v1/organization/audit_logs`` (newest first; ``effective_at[gte|gt|lte|lt]``; limit 1..100, default 20;
  ``after``/``before`` cursors; filters ``event_types[]``, ``project_ids[]``, ``actor_ids[]``,
  ``actor_emails[]``, ``resource_ids[]``; ``tenant_only=true`` lists the tenant-scoped events
  (``tenant.*``, ``role.bound_to_resource``, ...) and only those, absent or false lists only the
  organization's: see ``audit.py``)
- ``/v1/organization/projects`` (+ ``/{id}``, ``/{id}/rate_limits``, ``/{id}/api_keys`` (+ ``/{key}``),
  ``/{id}/users``, ``/{id}/service_accounts``), ``/v1/organization/users`` (+ ``/{id}``)

Usage buckets
    ``start_time`` required, ``end_time`` exclusive, ``bucket_width`` 1m|1h|1d (default 1d) aligned to UTC;
    ``limit`` default/max 60/1440, 24/168, 7/31; every bucket in range is returned (quiet ones with
    ``results: []``) up to ``now``: buckets starting after ``now`` are not returned, the bucket in progress
    IS returned with partial counts. A page also ends early once it holds ``max_results_per_page`` results
    (but always holds at least one bucket); ``next_page`` is an opaque cursor. Without ``group_by`` each
    bucket has one total result with all dimensions null; fields not grouped are null.

Late revisions
    Every minute-bucket group has a final value. What the API shows at time t is a deterministic,
    non-decreasing function of t that reaches the final value: most groups are final 1-10 minutes after
    the bucket ends, groups in busy (burst) minutes keep rising for up to **2 hours after the bucket
    end, never longer** (``usage.MAX_SETTLE``), so a collector re-reading a 3h revision window always
    converges to the final values. Hour and day buckets are exactly the sums of their minutes' visible
    values. Costs settle within 2 days after the day ends (``usage.COSTS_MAX_SETTLE``).
    ``vector_stores.usage_bytes`` is a storage level, not a flow: it does not revise, and an hour/day
    bucket reports the highest level of its minutes (not their sum).

Truth
    ``sim.truth(stream, start, end, bucket_width="1m", group_by=())`` returns the FINAL totals per group
    (key = tuple of group_by values in the given order) summed over the buckets of that width whose start
    lies in ``[align(start), end)``: every integer result field (for completions including the derived
    totals), or ``{"amount": usd}`` for ``stream="costs"``. For vector_stores it is the sum over buckets of
    each bucket's level. It ignores the clock (it is the model's final state).

Clock
    ``now=<unix ts>`` freezes the virtual clock there (move it with ``set_time``/``advance`` or
    ``POST /_sim/clock``); ``now=None`` follows the wall clock. ``running_clock=True`` makes a set clock
    tick with wall time.

Auth
    A missing or wrong key gives 401 with OpenAI's error body (the key is never echoed, only a redacted
    hint); ``restricted_key`` gives 403 naming the missing scope (``api.usage.read`` for usage and costs).
    ``audit_logs_enabled=False`` (or ``POST /_sim/config``) makes audit_logs answer 403 "Audit logging is
    not enabled for this organization".

Faults
    ``sim.add_fault(FaultRule(kind, path="usage/completions", count=1, skip=0, probability=None,
    retry_after=1, delay=1.0, message=None, query=""))``; kinds: "429" (Retry-After >= 1), "500", "502",
    "503", "401", "403" (on audit_logs: "audit logging is not enabled"; with tenant_only=true: "cannot list
    tenant-scoped audit events"), "404", "reset" (connection dropped with
    an RST), "slow" (sleep ``delay`` s, then answer), "malformed_json" (200, truncated body),
    "invalid_results" (200, JSON violating the spec; a list loses ``has_more``), "invalid_items" (200, a
    list page whose items violate the spec: the first without ``id``, the second with ``"lots"`` for its
    first integer; ``has_more`` and ``last_id`` kept, so the listing goes on past it). ``path`` is a prefix (``/v1/organization`` may be
    left out) or a glob (``*/projects/proj_x/rate_limits``); ``query`` (``tenant_only=true``) narrows a rule
    to requests carrying those parameters. A key the simulator refuses gets its 401 (or its missing scope's
    403) before a "403", "404", "429" or 200-body fault, which only an allowed key meets, as OpenAI answers;
    a 5xx, "reset" or "slow" comes whatever the key. ``latency`` adds seconds to every API request.

Control interface (no auth)
    ``GET/POST /_sim/clock`` ({"now": ts} or {"advance": s}), ``GET/POST /_sim/faults`` (a JSON list of
    FaultRule fields replaces the rules; [] clears), ``GET /_sim/truth?stream=&start=&end=&bucket_width=
    &group_by=a,b`` (list of {"group": {...}, "totals": {...}}), ``GET /_sim/stats`` (requests by path and
    status, faults, and the wall times of the first API request and the last answer; ``POST`` resets them),
    ``GET/POST /_sim/config`` ({"audit_logs_enabled", "latency", "max_results_per_page"}).
"""
from .faults import FAULT_KINDS, FaultRule
from .org import ORG_SIZES, OrgSpec
from .server import Simulator, run_simulator
from .usage import COSTS_MAX_SETTLE, MAX_SETTLE, STREAMS

__all__ = ["Simulator", "FaultRule", "FAULT_KINDS", "OrgSpec", "ORG_SIZES", "run_simulator", "STREAMS",
           "MAX_SETTLE", "COSTS_MAX_SETTLE"]
