"""The usage streams as data: one spec per endpoint, one engine drives them all.

A spec says where a stream's buckets come from (path, group_by), which result fields are
counters (they get corrections) and which are dimensions (they identify a group), and how the
result maps to ECS. Field lists come from OpenAI's Admin API reference (the `Usage*Result` and
`CostsResult` schemas); the grouping per stream follows the Elastic integration's seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

WIDTH_SECONDS: Mapping[str, int] = {"1m": 60, "1h": 3600, "1d": 86400}
# `limit` is the number of buckets per page; we always ask for the maximum the API allows
# (the defaults, 60/24/7, are what made the seed's backfills slow).
MAX_LIMIT: Mapping[str, int] = {"1m": 1440, "1h": 168, "1d": 31}

# Result fields that go to openai.base.* rather than openai.<stream>.*
BASE_DIMENSIONS = ("project_id", "user_id", "api_key_id", "model")
BASE_COUNTERS = ("num_model_requests",)
# The dimensions the reference types boolean (`batch`, mapped `boolean`); every other one is a string
BOOLEAN_DIMENSIONS = frozenset({"batch"})


@dataclass(frozen=True)
class UsageStreamSpec:
    """One usage-like endpoint, declaratively."""

    name: str
    path: str
    group_by: tuple[str, ...]
    counters: tuple[str, ...]
    dimensions: tuple[str, ...]
    has_grace: bool = True
    # openai.base.<normalized field> = sum of these counters (for headroom queries)
    normalized: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # result field -> ECS leaf name under openai.<name>, where it differs
    renames: Mapping[str, str] = field(default_factory=dict)
    # costs: 1d only, counters may be float amounts
    # the reference's counters are integers (usage) or numbers (costs' amount and quantity)
    integer_counters: bool = True
    # counters the reference marks required; a result without one is bad data, not a zero
    required_counters: tuple[str, ...] | None = None
    widths: tuple[str, ...] = ("1m", "1h", "1d")
    max_limit: Mapping[str, int] = field(default_factory=lambda: dict(MAX_LIMIT))
    # the API's `object` of one result (a group that vanished from a re-read bucket gets it too);
    # None: organization.usage.<name>.result
    result_object: str | None = None
    # dimensions outside the group key whose values cannot be added up across (costs' currency): a
    # group with two of them in one bucket is bad data, not one sum
    unmergeable: tuple[str, ...] = ()
    # (top-level field naming the unit of a counter, that counter) (costs' quantity_unit of
    # quantity): a group whose results with the counter differ in it is added up with it null, as
    # the API leaves it where no single unit applies
    unit_fields: tuple[tuple[str, str], ...] = ()

    @property
    def object_type(self) -> str:
        return self.result_object or f"organization.usage.{self.name}.result"

    @property
    def parents(self) -> tuple[str, ...]:
        """The objects dotted fields are read from (costs' `amount`)."""
        return tuple(dict.fromkeys(f.split(".")[0] for f in self.counters + self.dimensions if "." in f))

    @property
    def required(self) -> tuple[str, ...]:
        return self.counters if self.required_counters is None else self.required_counters

    @property
    def dataset(self) -> str:
        return f"openai.{self.name}"

    @property
    def tag(self) -> str:
        return "openai-" + self.name.replace("_", "-")

    def group_key(self, result: Mapping) -> tuple:
        """The values that identify one group inside a bucket."""
        return tuple(get_field(result, f) for f in self.group_by)


def get_field(result: Mapping, dotted: str):
    """`result["a"]["b"]` for `a.b` (costs nest `amount.value`); None when absent."""
    if "." not in dotted:
        return result.get(dotted)
    value = result
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


_USER_GROUPS = ("project_id", "user_id", "api_key_id", "model")
_PER_USER_DIMS = _USER_GROUPS

_COMPLETIONS_COUNTERS = (
    "input_tokens",
    "input_cached_tokens",
    "input_cache_write_tokens",
    "input_uncached_tokens",
    "output_tokens",
    "input_text_tokens",
    "output_text_tokens",
    "input_cached_text_tokens",
    "input_audio_tokens",
    "input_cached_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "input_cached_image_tokens",
    "output_image_tokens",
    "num_model_requests",
)


def _usage(name: str, **kw) -> UsageStreamSpec:
    return UsageStreamSpec(name=name, path=f"/v1/organization/usage/{name}", **kw)


USAGE_STREAMS: tuple[UsageStreamSpec, ...] = (
    _usage(
        "completions",
        # service_tier: without it the API adds every tier of a group together (and leaves the
        # field null), so a priority tier's spend could not be told from the default tier's
        group_by=_USER_GROUPS + ("batch", "service_tier"),
        counters=_COMPLETIONS_COUNTERS,
        required_counters=("input_tokens", "output_tokens", "num_model_requests"),
        dimensions=_PER_USER_DIMS + ("batch", "service_tier"),
        # input_tokens already includes cached, cache-write, audio and image input tokens and
        # output_tokens every output modality: adding audio tokens again would double count.
        normalized={"usage_tokens": ("input_tokens", "output_tokens")},
    ),
    _usage(
        "embeddings",
        group_by=_USER_GROUPS,
        counters=("input_tokens", "num_model_requests"),
        dimensions=_PER_USER_DIMS,
        normalized={"usage_tokens": ("input_tokens",)},
    ),
    _usage(
        "moderations",
        group_by=_USER_GROUPS,
        counters=("input_tokens", "num_model_requests"),
        dimensions=_PER_USER_DIMS,
        normalized={"usage_tokens": ("input_tokens",)},
    ),
    _usage(
        "images",
        group_by=_USER_GROUPS + ("size", "source"),
        counters=("images", "num_model_requests"),
        dimensions=_PER_USER_DIMS + ("size", "source"),
        normalized={"usage_images": ("images",)},
    ),
    _usage(
        "audio_speeches",
        group_by=_USER_GROUPS,
        counters=("characters", "num_model_requests"),
        dimensions=_PER_USER_DIMS,
    ),
    _usage(
        "audio_transcriptions",
        group_by=_USER_GROUPS,
        counters=("seconds", "num_model_requests"),
        dimensions=_PER_USER_DIMS,
    ),
    _usage(
        "code_interpreter_sessions",
        group_by=("project_id",),
        counters=("num_sessions",),
        dimensions=("project_id",),
        has_grace=False,
        renames={"num_sessions": "sessions"},
    ),
    _usage(
        "vector_stores",
        group_by=("project_id",),
        counters=("usage_bytes",),
        dimensions=("project_id",),
        has_grace=False,
    ),
    _usage(
        "file_search_calls",
        group_by=("project_id", "user_id", "api_key_id", "vector_store_id"),
        counters=("num_requests",),
        dimensions=("project_id", "user_id", "api_key_id", "vector_store_id"),
        result_object="organization.usage.file_searches.result",
    ),
    _usage(
        "web_search_calls",
        group_by=_USER_GROUPS + ("context_level",),
        counters=("num_model_requests", "num_requests"),
        dimensions=_PER_USER_DIMS + ("context_level",),
        result_object="organization.usage.web_searches.result",
    ),
)

# Costs settle over days: 1d buckets only (the API supports nothing else), up to 180 a page,
# re-read within the 3d revision window like usage. Amounts and quantities are floats. Kept out of
# USAGE_STREAMS (whose members all support 1m/1h/1d and the usage truth) but driven by the same engine.
COSTS = UsageStreamSpec(
    name="costs",
    path="/v1/organization/costs",
    group_by=("project_id", "line_item", "api_key_id"),
    counters=("amount.value", "quantity"),
    integer_counters=False,
    required_counters=(),  # the reference requires only `object`: a result without an amount is not bad data
    dimensions=("project_id", "api_key_id", "line_item", "amount.currency", "quantity_unit"),
    has_grace=False,
    widths=("1d",),
    max_limit={"1d": 180},
    result_object="organization.costs.result",
    unmergeable=("amount.currency",),
    unit_fields=(("quantity_unit", "quantity"),),
)

STREAMS_BY_NAME: Mapping[str, UsageStreamSpec] = {s.name: s for s in USAGE_STREAMS + (COSTS,)}
# The eight the seed documents; the two search-call streams are ours.
SEED_USAGE_STREAMS = tuple(s.name for s in USAGE_STREAMS[:8])
