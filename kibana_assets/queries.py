"""Every ES|QL query of the bundle, written once and rendered into panels and rules.

The rate limit headroom semantics (the seed's, made correction-safe):

1. Usage and limits are read together from the usage data streams and `openai.rate_limits`.
2. Both sides are keyed on the exact project id and the model with a trailing dated snapshot
   suffix stripped: `REPLACE(model, "-[0-9]{4}-[0-9]{2}-[0-9]{2}$", "")`.
3. Batch API usage (completions with `batch: true`) is left out: OpenAI limits batches separately
   (their queue, `batch_1_day_max_input_tokens`), never against TPM/RPM.
   Usage is SUMMED per project, model and 1-minute bucket. This is what makes correction
   documents (`openai.base.revision` >= 1, carrying only differences) add up to the latest count;
   no single document is ever read as a minute's total. Only 1m buckets count (a 1h/1d bucket would
   smear the peak); documents without a width (the seed's collector) are taken as 1m.
4. The peak (MAX) minute in the window is taken per project and model.
5. Limits are combined with MAX, never SUM: the family and its dated snapshot report the same
   numbers and collapse onto one key; MAX over the window also stabilizes a limit that changed.
6. utilization = peak / limit, per unit: tokens <-> TPM, requests <-> RPM, images <-> images/min.
   Audio has no comparable usage figure (the limit is in megabytes), so no audio limit column;
   the audio streams still count as requests against RPM.
7. Rows exist for every (project, model) that has a limit in the window; no usage means 0%.
   Usage without a limit has nothing to divide by and is dropped (as an inner join would).
8. Org-wide: per project first (exactly as above), then per model the SUM of per-project peaks
   over the SUM of per-project limits: an indicative `limit (aggregate)` and
   `utilization (approx.)`, never a real throttle boundary.
9. The rules (not the panels) look back further for limits than for usage: usage is the last 22
   minutes (the seed's 15 plus the collector's lag; filtered inside the query with NOW()), the limit the MAX over those minutes, else the
   latest limit in the rule's longer window (--stale-after + 10m): the last known limits, until the
   stale rule fires. (Not the MAX over that window: a limit lowered shortly before the limits
   stopped would be read at its old, higher value.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Streams whose usage is compared with a rate limit (tokens, requests or images per minute).
HEADROOM_USAGE_DATASETS = (
    "completions", "embeddings", "moderations", "images", "audio_speeches", "audio_transcriptions",
)
SNAPSHOT_SUFFIX_REGEX = "-[0-9]{4}-[0-9]{2}-[0-9]{2}$"
DEFAULT_THRESHOLD = 0.8
# The rules' last known limit is the one of the latest minute that has one. ES|QL (8.18) has no
# "value at the latest time" aggregation, so each minute's limit is packed behind its minute
# number (minutes since the epoch * LIMIT_AT_SCALE + limit), MAX picks the latest, and the modulo
# unpacks it. A limit is far below LIMIT_AT_SCALE, and the packed value fits a long until 2100.
LIMIT_AT_SCALE = 100_000_000_000

# unit -> (usage field summed per minute, limit field, short name)
UNITS = {
    "tpm": ("openai.base.usage_tokens", "openai.rate_limits.max_tokens_per_1_minute", "TPM"),
    "rpm": ("openai.base.num_model_requests", "openai.rate_limits.max_requests_per_1_minute", "RPM"),
    "ipm": ("openai.base.usage_images", "openai.rate_limits.max_images_per_1_minute", "images/min"),
}


def index_pattern(dataset: str, namespace: str = "*") -> str:
    return f"logs-openai.{dataset}-{namespace}"


@dataclass(frozen=True)
class Sources:
    """Where the queries read from. Tests point this at scratch indices."""

    namespace: str = "*"
    prefix: str = "logs-openai."

    def pattern(self, dataset: str) -> str:
        if self.prefix == "logs-openai.":
            return index_pattern(dataset, self.namespace)
        return f"{self.prefix}{dataset}"

    def from_clause(self, datasets) -> str:
        return "FROM " + ", ".join(self.pattern(d) for d in datasets)


DEFAULT_SOURCES = Sources()


def normalized_model(expr: str) -> str:
    return f'REPLACE({expr}, "{SNAPSHOT_SUFFIX_REGEX}", "")'


def _per_project_core(sources: Sources, usage_minutes: int | None = None) -> list[str]:
    """The per project and model pipeline up to one row per (project, model) with peak usage and
    the window's limit per unit. Shared by the panel, the rules and the org-wide rollup.

    Without `usage_minutes` (the panels) the dashboard time range is the window for both sides.
    With it (the rules), the rule's time window is the longer *limits look-back* and the query
    itself keeps usage to the last `usage_minutes`; the limit is the MAX over those same minutes
    when any arrived, else the latest one in the look-back (the last known limits, until the stale
    rule takes over). So a stalled rate-limits collection does not silence the headroom rules.
    "The last known limits" is the limit of the latest minute that has one, not the MAX over the
    look-back."""
    recent = f"@timestamp >= NOW() - {usage_minutes} minutes" if usage_minutes else None
    lines = [
        sources.from_clause([*HEADROOM_USAGE_DATASETS, "rate_limits"]),
        "| WHERE openai.base.bucket_width IS NULL OR openai.base.bucket_width == \"1m\"",
        # Batch API usage has limits of its own (the batch queue), not the per-minute ones
        "| WHERE openai.completions.batch IS NULL OR openai.completions.batch == false",
    ]
    if recent:
        # usage only from the last usage_minutes; limit documents from the whole look-back
        lines.append(f"| WHERE openai.rate_limits.model IS NOT NULL OR {recent}")
    lines += [
        "| EVAL project_id = COALESCE(openai.base.project_id, openai.rate_limits.project_id),",
        f"       model = {normalized_model('COALESCE(openai.base.model, openai.rate_limits.model)')},",
        "       minute = DATE_TRUNC(1 minute, @timestamp)",
        "| WHERE project_id IS NOT NULL AND model IS NOT NULL",
        "| EVAL project_model = CONCAT(project_id, \"::\", model)",
    ]
    if recent:
        lines.append("| EVAL " + ", ".join(f"{u}_recent = CASE({recent}, {limit})"
                                            for u, (_, limit, _) in UNITS.items()))
    rec = (lambda fmt: [fmt.format(u=u) for u in UNITS]) if recent else (lambda fmt: [])
    lines += [
        # 1. usage summed per minute (corrections add up), limits MAX
        "| STATS " + ", ".join(
            [f"{u}_used = SUM({usage})" for u, (usage, _, _) in UNITS.items()]
            + [f"{u}_lim = MAX({limit})" for u, (_, limit, _) in UNITS.items()]
            + rec("{u}_lim_recent = MAX({u}_recent)")
        ) + " BY project_model, minute",
    ]
    if recent:
        # each minute's limit packed behind the minute, so that MAX gives the latest one
        lines.append("| EVAL " + ", ".join(
            f"{u}_lim_at = CASE({u}_lim IS NOT NULL, TO_LONG(minute) / 60000 * {LIMIT_AT_SCALE} + {u}_lim)"
            for u in UNITS))
    lines += [
        # 2. peak minute per project and model; limit stabilized as the max in the window
        "| STATS " + ", ".join(
            [f"peak_{u} = MAX({u}_used)" for u in UNITS]
            + [f"{u}_limit = MAX({u}_lim)" for u in UNITS]
            + rec("{u}_limit_recent = MAX({u}_lim_recent)")
            + rec("{u}_limit_last = MAX({u}_lim_at)")
        ) + " BY project_model",
    ]
    if recent:
        # the MAX over the usage window (the seed's), else the latest limit of the look-back
        lines.append("| EVAL " + ", ".join(
            f"{u}_limit = COALESCE({u}_limit_recent, {u}_limit_last % {LIMIT_AT_SCALE})" for u in UNITS))
    lines += [
        "| WHERE " + " OR ".join(f"{u}_limit IS NOT NULL" for u in UNITS),
        "| EVAL " + ", ".join(f"peak_{u} = COALESCE(peak_{u}, 0)" for u in UNITS),
        "| DISSECT project_model \"%{project_id}::%{model}\"",
    ]
    return lines


def _utilization(u: str) -> str:
    return f"{u}_utilization = ROUND(TO_DOUBLE(peak_{u}) / {u}_limit, 4)"


PER_PROJECT_COLUMNS = ["project_id", "model"] + [
    c for u in UNITS for c in (f"peak_{u}", f"{u}_limit", f"{u}_utilization")
]


# The most rows ES|QL returns (its result_truncation_max_size, 10,000 by default)
PER_PROJECT_ROWS = 10_000


def headroom_per_project(sources: Sources = DEFAULT_SOURCES) -> str:
    """Panel: rate limit headroom per project and model (the dashboard time range is the window)."""
    lines = _per_project_core(sources) + [
        "| EVAL " + ", ".join(_utilization(u) for u in UNITS),
        "| SORT tpm_utilization DESC NULLS LAST, rpm_utilization DESC NULLS LAST, project_id, model",
        "| KEEP " + ", ".join(PER_PROJECT_COLUMNS),
        # every pair's row (7. above): 1,000 cut a 50-project organization's 1,260 pairs
        f"| LIMIT {PER_PROJECT_ROWS}",
    ]
    return "\n".join(lines)


def org_limit_column(u: str) -> str:
    return f"{UNITS[u][2]} limit (aggregate)"


def org_utilization_column(u: str) -> str:
    return f"{UNITS[u][2]} utilization (approx.)"


def org_usage_column(u: str) -> str:
    return f"{UNITS[u][2]} sum of project peaks"


ORG_COLUMNS = ["model"] + [
    c for u in UNITS for c in (org_usage_column(u), org_limit_column(u), org_utilization_column(u))
]


def _q(name: str) -> str:
    """An ES|QL identifier, backquoted when it is not a plain name."""
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name) else f"`{name}`"


def headroom_org_wide(sources: Sources = DEFAULT_SOURCES) -> str:
    """Panel: org-wide rollup by model: sum of per-project peaks over the sum of per-project
    limits (each the max within the window). Only projects with a limit for the unit count."""
    lines = _per_project_core(sources) + [
        "| EVAL " + ", ".join(f"{u}_counted = CASE({u}_limit IS NOT NULL, peak_{u})" for u in UNITS),
        "| STATS " + ", ".join(
            [f"{_q(org_usage_column(u))} = SUM({u}_counted)" for u in UNITS]
            + [f"{_q(org_limit_column(u))} = SUM({u}_limit)" for u in UNITS]
        ) + " BY model",
        "| EVAL " + ", ".join(
            f"{_q(org_utilization_column(u))} = ROUND(TO_DOUBLE({_q(org_usage_column(u))}) / {_q(org_limit_column(u))}, 4)"
            for u in UNITS
        ),
        f"| SORT {_q(org_utilization_column('tpm'))} DESC NULLS LAST, model",
        "| KEEP " + ", ".join(_q(c) for c in ORG_COLUMNS),
        "| LIMIT 1000",
    ]
    return "\n".join(lines)


# The rules' usage look-back. The seed's 15m is three times the 5-minute schedule, so that one
# breaching minute would stay in view of the three consecutive runs the alert delay of 3 needs. But
# a minute is searchable only after its bucket closed (1m) and the collector's next poll (the usage
# streams poll every 5m), so with 15m it is in view for 15m less up to 6m: two runs, and a single
# breaching minute never alerted. 22m = 5m (usage interval) + 1m (the bucket closing) + 15m (three
# runs) + 1m for the seconds a poll takes and a run starts late. Add the collector's finalization
# grace when it has one (`--headroom-window`). The panels keep the dashboard's time range.
DEFAULT_USAGE_WINDOW_MINUTES = 22


def headroom_rule(unit: str = "tpm", threshold: float = DEFAULT_THRESHOLD,
                  sources: Sources = DEFAULT_SOURCES,
                  usage_minutes: int = DEFAULT_USAGE_WINDOW_MINUTES) -> str:
    """Rule: one row per project::model whose peak 1-minute utilization reached the threshold.

    The last STATS groups BY `project_model` (`<project_id>::<model>`), which Kibana's per-row
    alerting (8.19/9.1+) uses as the alert id. Tune with the `WHERE <unit>_utilization >= ...` line.
    Usage is the last `usage_minutes` (22 by default, the seed's 15 plus the collector's lag: see
    DEFAULT_USAGE_WINDOW_MINUTES); the rule's own time window is the longer
    limits look-back (see `_per_project_core`).
    """
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}")
    lines = _per_project_core(sources, usage_minutes) + [
        f"| EVAL {_utilization(unit)}",
        f"| WHERE {unit}_utilization >= {threshold:g}",
        f"| SORT {unit}_utilization DESC",
        f"| KEEP project_model, project_id, model, peak_{unit}, {unit}_limit, {unit}_utilization",
    ]
    return "\n".join(lines)


DEFAULT_STALE_AFTER_MINUTES = 60


def limits_stale_rule(sources: Sources = DEFAULT_SOURCES,
                      stale_after_minutes: int = DEFAULT_STALE_AFTER_MINUTES) -> str:
    """Rule: one row per namespace whose rate-limits collection ran within the rule's time window
    (the *stale horizon*, 24h by default) but none succeeded in the last `stale_after_minutes`.

    The collector writes one status document per cycle (`event.action: rate-limits-collection`,
    `event.outcome`). Collectors of several OpenAI organizations are told apart by their namespace,
    so the last STATS groups BY it, the alert id: an ungrouped one would let a collector that still
    succeeds hide another one that stopped, whose projects the headroom rules then silently lose. Only namespaces with a collection in the window get a row (the final WHERE
    keeps that explicit): a cluster that never had rate-limits data, or a stream turned off longer
    than the horizon ago, returns no row instead of firing forever. Failing from the first cycle
    (no success at all) fires; so does a collector that stopped writing, until the horizon passes."""
    return "\n".join([
        sources.from_clause(["rate_limits"]),
        "| WHERE event.action == \"rate-limits-collection\"",
        # `namespace` is made by EVAL, not by `BY namespace = data_stream.namespace`: Kibana (8.19,
        # 9.1+) takes a per-row alert's id from the last BY's plain columns only, and with none, from
        # every column (minutes_since_success too): a new alert at each run (kibana#267816)
        "| EVAL success_at = CASE(event.outcome == \"success\", @timestamp), failed = CASE(event.outcome == \"failure\", 1, 0),"
        " namespace = data_stream.namespace",
        "| STATS last_success = MAX(success_at), failed_collections = SUM(failed), last_collection = MAX(@timestamp)"
        " BY namespace",
        f"| WHERE last_collection IS NOT NULL AND (last_success IS NULL OR last_success < NOW() - {stale_after_minutes} minutes)",
        "| EVAL minutes_since_success = DATE_DIFF(\"minute\", last_success, NOW())",
    ])


PROJECT_FAILURE_ACTION = "rate-limits-project-failure"


def project_limits_failing_rule(sources: Sources = DEFAULT_SOURCES,
                                stale_after_minutes: int = DEFAULT_STALE_AFTER_MINUTES) -> str:
    """Rule: one row per project whose limits keep failing while the collection succeeds.

    The collector writes a document per project whose limits it could not read in a cycle
    (`event.action: rate-limits-project-failure`) beside the limit documents of the projects it
    read. A project fires when it failed recently (within half of `stale_after_minutes`: still
    failing, whatever the collection interval below that) and its last limits read, or its first
    failure in the window when none was read, is older than `stale_after_minutes` — when the
    headroom rules are about to lose its last known limits. A project that failed once and went
    away (deleted between the listing and its limits) does not fire: its one failure is older
    than half the period by the time its last read is older than all of it. The last STATS
    groups BY `project_id`, the alert id."""
    recent = max(1, stale_after_minutes // 2)
    return "\n".join([
        sources.from_clause(["rate_limits"]),
        f"| WHERE openai.rate_limits.model IS NOT NULL OR event.action == \"{PROJECT_FAILURE_ACTION}\"",
        f"| EVAL failed_at = CASE(event.action == \"{PROJECT_FAILURE_ACTION}\", @timestamp), "
        "read_at = CASE(openai.rate_limits.model IS NOT NULL, @timestamp), project_id = openai.rate_limits.project_id",
        "| STATS last_failure = MAX(failed_at), first_failure = MIN(failed_at), last_read = MAX(read_at), "
        "failures = COUNT(failed_at) BY project_id",
        f"| WHERE project_id IS NOT NULL AND last_failure >= NOW() - {recent} minutes "
        f"AND COALESCE(last_read, first_failure) < NOW() - {stale_after_minutes} minutes",
        "| EVAL minutes_since_read = DATE_DIFF(\"minute\", last_read, NOW())",
        "| SORT last_read NULLS FIRST, project_id",
        "| KEEP project_id, last_read, minutes_since_read, last_failure, failures",
    ])


def limits_freshness(sources: Sources = DEFAULT_SOURCES) -> str:
    """Panel: collection cycles and the last success per namespace (one collector per OpenAI
    organization, as the stale rule groups them), so a stale headroom table is visible even while
    another organization's collector keeps succeeding; with the projects that failed and the limits
    that did not match the API reference (not stored: a successful cycle that is not clean)."""
    return "\n".join([
        sources.from_clause(["rate_limits"]),
        "| WHERE event.action == \"rate-limits-collection\"",
        "| STATS cycles = COUNT(*), last_cycle = MAX(@timestamp), failed_projects = SUM(openai.rate_limits.collection.failed_projects),"
        " bad_limits = SUM(openai.rate_limits.collection.bad_limits)"
        " BY namespace = data_stream.namespace, event.outcome",
        "| SORT namespace, event.outcome",
    ])


def project_limit_failures(sources: Sources = DEFAULT_SOURCES) -> str:
    """Panel: the projects whose limits could not be read (the reasons are in the documents'
    `error.message`, which is text, not something ES|QL aggregates on every supported version)."""
    return "\n".join([
        sources.from_clause(["rate_limits"]),
        f"| WHERE event.action == \"{PROJECT_FAILURE_ACTION}\"",
        *_by_id_with_name("failures = COUNT(*), last_failure = MAX(@timestamp)", "openai.rate_limits.project_id",
                          "project_id", "openai.rate_limits.project_name", "project_name"),
        "| SORT last_failure DESC, project_id",
        "| KEEP project_id, project_name, failures, last_failure",
        "| LIMIT 100",
    ])


# ---------------------------------------------------------------------------------------------
# Usage, costs and audit panels (all sum per bucket: corrections add up)

# The over-time panels return a row per display bucket (BUCKET's target: 50) and series (project,
# model, stream, action). Without a LIMIT ES|QL returns 1,000 rows (its implicit LIMIT), the
# earliest ones after `SORT t`: a 50-project organization's vector store or code interpreter chart
# of the last 24 hours lost its latest 8 to 10 hours. 10,000 is the most ES|QL returns (200 series).
TIME_SERIES_ROWS = 10_000
_SERIES_LIMIT = f"| LIMIT {TIME_SERIES_ROWS}"


def _usage(datasets, *tail: str, sources: Sources = DEFAULT_SOURCES) -> str:
    return "\n".join([sources.from_clause(datasets), *tail])


# A display name (project, user e-mail, API key name) is enrichment, not identity: each document
# carries the name current when the collector emitted it, so a correction emitted after a rename
# (or after a failed or late name lookup) carries another name than the bucket's first document.
# Grouping BY the name would split one id's total over several rows (a downward correction even
# showing as a negative row). The panels group BY the id only and show the name of the most
# recently emitted document that has one (`event.created`, else `@timestamp`): the latest non-null
# name. ES|QL has no "value at the latest time" aggregation on 8.18, so the name is prefixed with a
# fixed-width timestamp, MAX picks the latest, and SUBSTRING strips the prefix.
NAME_KEY_TIME = "DATE_FORMAT(\"yyyy-MM-dd'T'HH:mm:ss.SSS\", COALESCE(event.created, @timestamp))"
_NAME_KEY_PREFIX = len("2026-01-01T00:00:00.000") + 1  # the timestamp and one separator


def latest_name(name_field: str, alias: str) -> tuple[str, str, str]:
    """(EVAL before the STATS, aggregate inside the STATS, EVAL after it) that give one row per id
    the latest non-null `name_field` as `alias`."""
    key = f"{alias}_key"
    return (f"| EVAL {key} = CONCAT({NAME_KEY_TIME}, \"|\", {name_field})",
            f"{key} = MAX({key})",
            f"| EVAL {alias} = SUBSTRING({key}, {_NAME_KEY_PREFIX + 1})")


def _by_id_with_name(aggs: str, id_field: str, id_alias: str, name_field: str, name_alias: str,
                     extra_by: str = "") -> list[str]:
    pre, agg, post = latest_name(name_field, name_alias)
    by = f"{id_alias} = {id_field}" + (f", {extra_by}" if extra_by else "")
    return [pre, f"| STATS {aggs}, {agg} BY {by}", post, f"| DROP {name_alias}_key"]


USAGE_TOKEN_DATASETS = ("completions", "embeddings", "moderations")
_REQUESTS_TOKENS = "requests = SUM(openai.base.num_model_requests), tokens = SUM(openai.base.usage_tokens)"
ALL_REQUEST_DATASETS = ("completions", "embeddings", "moderations", "images", "audio_speeches",
                        "audio_transcriptions")


def usage_panels(sources: Sources = DEFAULT_SOURCES) -> dict[str, str]:
    model = normalized_model("openai.base.model")
    return {
        "requests_over_time": _usage(
            ALL_REQUEST_DATASETS,
            "| STATS requests = SUM(openai.base.num_model_requests) BY t = BUCKET(@timestamp, 50, ?_tstart, ?_tend), dataset = data_stream.dataset",
            "| SORT t", _SERIES_LIMIT, sources=sources),
        "tokens_over_time_by_model": _usage(
            USAGE_TOKEN_DATASETS,
            f"| EVAL model = {model}",
            "| STATS tokens = SUM(openai.base.usage_tokens) BY t = BUCKET(@timestamp, 50, ?_tstart, ?_tend), model",
            "| SORT t", _SERIES_LIMIT, sources=sources),
        "by_model": _usage(
            ALL_REQUEST_DATASETS,
            "| STATS requests = SUM(openai.base.num_model_requests), tokens = SUM(openai.base.usage_tokens), images = SUM(openai.base.usage_images) BY model = openai.base.model",
            "| SORT tokens DESC NULLS LAST", "| LIMIT 50", sources=sources),
        "by_project": _usage(
            ALL_REQUEST_DATASETS,
            *_by_id_with_name(_REQUESTS_TOKENS, "openai.base.project_id", "project_id",
                              "openai.base.project_name", "project_name"),
            "| SORT tokens DESC NULLS LAST", "| LIMIT 50", sources=sources),
        "by_user": _usage(
            ALL_REQUEST_DATASETS,
            *_by_id_with_name(_REQUESTS_TOKENS, "openai.base.user_id", "user_id",
                              "openai.base.user_email", "user_email"),
            "| SORT tokens DESC NULLS LAST", "| LIMIT 50", sources=sources),
        "by_api_key": _usage(
            ALL_REQUEST_DATASETS,
            *_by_id_with_name(_REQUESTS_TOKENS, "openai.base.api_key_id", "api_key_id",
                              "openai.base.api_key_name", "api_key_name"),
            "| SORT tokens DESC NULLS LAST", "| LIMIT 50", sources=sources),
        "images_by_size": _usage(
            ("images",),
            "| STATS images = SUM(openai.images.images) BY size = openai.images.size, source = openai.images.source",
            "| SORT images DESC", sources=sources),
        "audio": _usage(
            ("audio_speeches", "audio_transcriptions"),
            "| STATS characters = SUM(openai.audio_speeches.characters), seconds = SUM(openai.audio_transcriptions.seconds) BY model = openai.base.model",
            "| SORT model", sources=sources),
        "vector_store_bytes": _usage(
            ("vector_stores",),
            # a storage LEVEL, not a flow: first the API bucket's level (its documents summed, so
            # corrections add up), then the highest level per display bucket. Summing the API
            # buckets of a display bucket would multiply the level by their number. (Per width:
            # a 1h and a 1m bucket starting together are two readings of one level, not two parts.)
            "| STATS bytes = SUM(openai.vector_stores.usage_bytes) BY start = @timestamp, width = openai.base.bucket_width, project_id = openai.base.project_id",
            "| STATS bytes = MAX(bytes) BY t = BUCKET(start, 50, ?_tstart, ?_tend), project_id",
            "| SORT t", _SERIES_LIMIT, sources=sources),
        "code_interpreter_sessions": _usage(
            ("code_interpreter_sessions",),
            "| STATS sessions = SUM(openai.code_interpreter_sessions.sessions) BY t = BUCKET(@timestamp, 50, ?_tstart, ?_tend), project_id = openai.base.project_id",
            "| SORT t", _SERIES_LIMIT, sources=sources),
        "tool_calls": _usage(
            ("file_search_calls", "web_search_calls"),
            "| STATS file_search = SUM(openai.file_search_calls.num_requests), web_search = SUM(openai.web_search_calls.num_requests) BY project_id = openai.base.project_id",
            "| SORT project_id", sources=sources),
    }


def costs_panels(sources: Sources = DEFAULT_SOURCES) -> dict[str, str]:
    return {
        "cost_over_time": _usage(
            ("costs",),
            "| STATS cost = SUM(openai.costs.amount.value) BY t = BUCKET(@timestamp, 50, ?_tstart, ?_tend), currency = openai.costs.amount.currency",
            "| SORT t", _SERIES_LIMIT, sources=sources),
        "cost_by_project": _usage(
            ("costs",),
            *_by_id_with_name("cost = SUM(openai.costs.amount.value)", "openai.base.project_id", "project_id",
                              "openai.base.project_name", "project_name",
                              extra_by="currency = openai.costs.amount.currency"),
            "| SORT cost DESC", "| LIMIT 50", sources=sources),
        "cost_by_line_item": _usage(
            ("costs",),
            "| STATS cost = SUM(openai.costs.amount.value), quantity = SUM(openai.costs.quantity) BY line_item = openai.costs.line_item, unit = openai.costs.quantity_unit, currency = openai.costs.amount.currency",
            "| SORT cost DESC", "| LIMIT 100", sources=sources),
    }


def audit_panels(sources: Sources = DEFAULT_SOURCES) -> dict[str, str]:
    return {
        "events_over_time": _usage(
            ("audit",),
            "| STATS events = COUNT(*) BY t = BUCKET(@timestamp, 50, ?_tstart, ?_tend), action = event.action",
            "| SORT t", _SERIES_LIMIT, sources=sources),
        "actors": _usage(
            ("audit",),
            "| EVAL actor = COALESCE(user.email, openai.audit.actor.api_key.user.email, openai.audit.actor.api_key.service_account.id, openai.audit.actor.api_key.id)",
            "| STATS events = COUNT(*) BY actor, actor_type = openai.audit.actor.type",
            "| SORT events DESC", "| LIMIT 50", sources=sources),
        "failed_logins": _usage(
            ("audit",),
            "| WHERE openai.audit.type IN (\"login.failed\", \"logout.failed\")",
            "| STATS failures = COUNT(*), last_failure = MAX(@timestamp) BY user_email = user.email, ip = source.ip, country = source.geo.country_iso_code",
            "| SORT failures DESC", "| LIMIT 50", sources=sources),
        "source_countries": _usage(
            ("audit",),
            "| WHERE source.geo.country_iso_code IS NOT NULL",
            "| STATS events = COUNT(*), ips = COUNT_DISTINCT(source.ip) BY country = source.geo.country_iso_code",
            "| SORT events DESC", "| LIMIT 50", sources=sources),
        "source_ips": _usage(
            ("audit",),
            "| WHERE source.ip IS NOT NULL",
            "| STATS events = COUNT(*), users = COUNT_DISTINCT(user.email) BY ip = source.ip, asn = source.as.number, country = source.geo.country_iso_code",
            "| SORT events DESC", "| LIMIT 50", sources=sources),
        "key_lifecycle": _usage(
            ("audit",),
            "| WHERE openai.audit.type IN (\"api_key.created\", \"api_key.updated\", \"api_key.deleted\", \"tenant.admin_api_key.created\", \"tenant.admin_api_key.updated\", \"tenant.admin_api_key.deleted\", \"tenant.project_api_key.created\")",
            "| KEEP @timestamp, openai.audit.type, user.email, openai.audit.project.name, source.ip",
            "| SORT @timestamp DESC", "| LIMIT 200", sources=sources),
    }


def all_queries() -> dict[str, str]:
    """Every ES|QL query of the bundle by a stable name (for validation and tests)."""
    out = {
        "headroom_per_project": headroom_per_project(),
        "headroom_org_wide": headroom_org_wide(),
        "rule_headroom_tpm": headroom_rule("tpm"),
        "rule_headroom_rpm": headroom_rule("rpm"),
        "rule_limits_stale": limits_stale_rule(),
        "rule_project_limits_failing": project_limits_failing_rule(),
        "limits_freshness": limits_freshness(),
        "project_limit_failures": project_limit_failures(),
    }
    out.update({f"usage.{k}": v for k, v in usage_panels().items()})
    out.update({f"costs.{k}": v for k, v in costs_panels().items()})
    out.update({f"audit.{k}": v for k, v in audit_panels().items()})
    return out
