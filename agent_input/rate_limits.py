"""The `rate_limits` data stream: every project's per-model limits, once per collection cycle.

A cycle lists the projects (`limit` = batch_size, `after`, `include_archived`), then each project's
`/rate_limits` (paginated; up to LIMITS_WORKERS projects at once), and writes one document per limit with the project's id, name and
status injected and `collected_at` = the cycle's time = `@timestamp`. Optional limit fields appear
only when OpenAI sends them. A project whose limits cannot be read (e.g. a 404 because it was deleted
between the two requests) is reported and skipped; the others still arrive. Projects that fail
alike (a key without the limits' scope fails them all) are reported in one line per cycle; when
every project is refused for one missing scope, the stream stops after storing the cycle, as for a
refused projects listing.

Each cycle also writes one status document to the same dataset (`event.action:
rate-limits-collection`, `event.outcome: success|failure`, `openai.rate_limits.collection.*`), so
a rule can fire when limits stop arriving: the seed's headroom alert silently stops otherwise.
And one document per project whose limits could not be read (`event.action:
rate-limits-project-failure`, the project's id and name, `error.message`): a project that keeps
failing while the others are read would otherwise go silent alone, its cycles all successes.

A limit that does not match the API reference (`ProjectRateLimit`: no string `id` or `model`, a
limit that is not an integer, such as `"lots"`, which Elasticsearch's `long` would refuse, or no
limit at all) is reported with its project, its id and the field at fault, and not stored; the
project's other limits are. One whose only fault is an integer at or past ±2^53 (Kibana would show it rounded) is
stored without that field, reported with its project, model and the field (unless no limit of it
would be left: then it is not stored, as a bad limit). The cycle counts either
in `openai.rate_limits.collection.bad_limits`, and a project none
of whose limits could be stored is a failed project (its failure document says why). A project of
the listing without a string `id` cannot be asked for its limits: reported, and counted among the
failed projects.

Document ids come from (cycle time, project, limit id): re-running the same cycle produces the same
documents. The whole cycle goes to the outbox in one transaction with the cycle's time, and a cycle
already stored is not collected again.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from contextlib import closing
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping

from .ecs import ECS_VERSION, iso_timestamp
from .engine import COUNTER_LIMIT, Lines, ListingCollector, PollStats, delivered_before, serialize
from .http_client import AdminApiClient, ApiError, AuthenticationError, PermissionDeniedError, StoppedError
from .org_guard import OrganizationUnverified
from .paging import DaemonPool, cursor_pages, result
from .reports import short as _short, wrong as _wrong

log = logging.getLogger("agent_input.rate_limits")

DATASET = "openai.rate_limits"
PROJECTS = "/v1/organization/projects"
LIMITS_PAGE = 100  # rate limits per page (the endpoint's default)
LIMITS_WORKERS = 8  # projects whose limits are read at once (see `_each_projects_limits`)
KV_LAST_CYCLE = "rate_limits:last_cycle"
MAX_PAGES = 10_000
BAD_SHOWN = 5  # bad limits or projects a cycle reports one line each; the rest are one line in all

# ProjectRateLimit in the API reference: the strings a limit document cannot do without (its id, and
# the model the headroom joins on), and the limits, integers (the reference's, and
# `max_tokens_per_1_day`, which the seed maps as a long too)
REQUIRED_STRINGS = ("id", "model")
LIMITS = ("max_requests_per_1_minute", "max_tokens_per_1_minute", "max_images_per_1_minute",
          "max_audio_megabytes_per_1_minute", "max_requests_per_1_day", "max_tokens_per_1_day",
          "batch_1_day_max_input_tokens")


class RateLimitsCollector(ListingCollector):
    """The Collector for `openai.rate_limits` (see engine.Collector)."""

    name = "rate_limits"

    def __init__(self, config, stream, *args: Any, **kwargs: Any):
        super().__init__(config, stream, *args, **kwargs)
        self.include_archived = bool(stream.include_archived)

    def poll(self, now: float) -> PollStats:
        stats = PollStats()
        cycle = int(now)
        if self.store.get(KV_LAST_CYCLE) == str(cycle):
            return stats  # this very cycle is already stored (a replay with the same clock)
        lines = Lines()
        projects: list[Mapping] = []
        failed: list[str] = []
        fatal: ApiError | None = None
        error: str | None = None
        try:
            projects = list(self._list(PROJECTS, {"include_archived": self.include_archived,
                                                  "limit": self.batch_size}, stats))
        except StoppedError:
            raise  # a stop is not a failed collection: nothing is stored, the next start reads a whole cycle
        except ApiError as exc:
            error = f"cannot list projects: {exc}"
            if isinstance(exc, (AuthenticationError, PermissionDeniedError)):
                fatal = exc
        limits = 0
        read = 0
        bad_limits = 0
        bad: list[str] = []  # what was wrong, one line per bad limit or project (`_report_bad`)
        refusals: dict[tuple, list[tuple[str, ApiError]]] = {}  # alike failures, said once (`_skipped`)
        readable: list[Mapping] = []
        for project in projects:
            if isinstance(project, Mapping) and isinstance(project.get("id"), str):
                readable.append(project)
                continue
            failed.append("(no id)")  # its limits cannot be asked for
            bad.append(f"a project of the listing has no string `id` ({_short(project)}): its limits cannot "
                       f"be read")
        each = closing(self._each_projects_limits(readable, stats))
        with each as results:  # leaving it (a rejected key, an error) drops the projects not read yet
            for project, rows, exc in results:
                pid = project["id"]
                if exc is not None:
                    failed.append(pid)
                    doc_id, doc = project_failure_event(project, str(exc), collected=cycle, namespace=self.namespace)
                    lines.append(serialize(doc_id, doc))
                    refusals.setdefault(_alike(exc), []).append((pid, exc))
                    if isinstance(exc, AuthenticationError):
                        fatal = exc
                        break
                    continue
                good = 0
                wrong: list[tuple[str, str]] = []  # (which limit, what is wrong with it)
                for n, row in enumerate(rows):
                    why = check_limit(row)
                    if why is not None:
                        which = f"limit {_short(row.get('id'))}" if isinstance(row, Mapping) and isinstance(
                            row.get("id"), str) else f"limit #{n + 1}"
                        wrong.append((which, why))
                        continue
                    row, past = trim_limit(row)
                    if past and all(row.get(name) is None for name in LIMITS):
                        # no limit of it left: a document without one feeds no headroom, and stored
                        # it counted its project as read (no failure document, no per-project alert)
                        wrong.append((f"limit {_short(row['id'])}", "; ".join(past)))
                        continue
                    if past:
                        # only the field at fault is left out: the limit's others still feed the headroom
                        bad_limits += 1
                        bad.append(f"project {pid}: limit {_short(row['id'])} of model {_short(row['model'])}: "
                                   + "; ".join(f"{why}, stored without it" for why in past))
                    doc_id, doc = limit_event(row, project, collected=cycle, namespace=self.namespace)
                    lines.append(serialize(doc_id, doc))
                    good += 1
                limits += good
                bad_limits += len(wrong)
                bad.extend(f"project {pid}: {which} does not match the API reference, not stored: {why}"
                           for which, why in wrong)
                if wrong and not good:
                    # nothing of it stored: a failed project, so the per-project rule sees it go silent
                    failed.append(pid)
                    reason = (f"none of its {len(wrong)} limit(s) matches the API reference (first: {wrong[0][0]}: {wrong[0][1]})")
                    doc_id, doc = project_failure_event(project, reason, collected=cycle, namespace=self.namespace)
                    lines.append(serialize(doc_id, doc))
                    continue
                read += 1
        _report_bad(bad, stats)
        # every project refused, not only none read: one whose listing was answered with limits none
        # of which could be stored, or one without an id, does not say the key lacks a scope
        asked_refused = sum(len(alike) for alike in refusals.values()) == len(failed)
        refused = _refused_for_a_scope(refusals) if fatal is None and read == 0 and asked_refused else None
        for alike in refusals.values():
            msg = _skipped(alike)
            stats.errors.append(msg)
            if refused is None:  # else the engine says it, once, stopping the stream
                log.warning(msg)
        if refused is not None:
            # no project's limits may be read with this key: the stream cannot go on, as when the
            # projects listing is refused (docs/protocol.md: `failed`, naming the scope)
            fatal = refused
            error = f"the rate limits of all {len(failed)} project(s) failed (first: {failed[0]}): {refused}"
        if error is None and fatal is not None:  # a key rejected part way: not a whole cycle (and why;
            # on the first project too, where "all 1 project(s) failed" hid both)
            error = f"stopped after {read} of {len(projects)} project(s): {fatal}"
        if error is None and failed and read == 0:
            error = f"the rate limits of all {len(failed)} project(s) failed (first: {failed[0]})"
        status_id, status = status_event(collected=cycle, projects=read, limits=limits,
                                         failed_projects=len(failed), bad_limits=bad_limits, error=error,
                                         namespace=self.namespace)
        lines.append(serialize(status_id, status))
        try:
            self.delivery.commit_events(self.name, lines, {KV_LAST_CYCLE: str(cycle)})
        except OrganizationUnverified:
            if fatal is None:
                raise
            # the organization check lists the projects with this same key, refused as well: held,
            # the cycle's documents are not stored, but the stream cannot go on for the key's reason
            raise delivered_before(fatal, stats) from None
        stats.events += len(lines)
        if fatal is not None:  # a rejected key or missing scope: the engine stops the stream and says why
            raise delivered_before(fatal, stats)  # (the cycle's documents are stored, and counted)
        if error is not None:
            stats.errors.append(f"rate_limits: {error}")
            log.error("rate_limits: collection failed: %s", error)
        return stats

    def _each_projects_limits(self, projects: list[Mapping], stats: PollStats
                              ) -> Iterator[tuple[Mapping, list[Mapping], ApiError | None]]:
        """(project, its limits, None) or (project, [], the ApiError), in the projects' order.

        One project after another would take a cycle of 5,000 projects twelve minutes at 150 ms a
        request, against a 5-minute interval; so the limits are read on up to LIMITS_WORKERS
        threads, each with a client of its own from `client_factory` (without one: one project
        after another on the stream's client). A stop raises StoppedError at once, a request in
        flight or not (the cycle is not stored; the workers are daemon threads, left to end by
        themselves); the caller stops taking results on a rejected key, and the projects not
        started yet are dropped."""
        def read(project: Mapping, get) -> tuple[Mapping, list[Mapping], ApiError | None, PollStats]:
            own = PollStats()
            if self.stop.is_set():
                raise StoppedError(None, "stopped before every project was read", "stopped", PROJECTS)
            try:
                rows = list(self._list(f"{PROJECTS}/{project['id']}/rate_limits", {"limit": LIMITS_PAGE}, own, get))
            except StoppedError:
                raise
            except ApiError as exc:
                return project, [], exc, own
            return project, rows, None, own

        def results(outcomes: Iterator[tuple]) -> Iterator[tuple[Mapping, list[Mapping], ApiError | None]]:
            for project, rows, exc, own in outcomes:
                stats.add(own)
                yield project, rows, exc

        if self.client_factory is None or len(projects) < 2:
            yield from results(read(p, self.get_json) for p in projects)
            return
        local = threading.local()
        clients: list[AdminApiClient] = []
        lock = threading.Lock()

        def start_worker() -> None:
            local.client = self.client_factory()
            with lock:
                clients.append(local.client)

        def on_worker(project: Mapping) -> tuple:
            return read(project, (getattr(local, "client", None) or self.client).get_json)

        pool = DaemonPool(min(LIMITS_WORKERS, len(projects)), "rate-limits", initializer=start_worker)
        futures = [pool.submit(on_worker, p) for p in projects]
        try:
            yield from results(result(f, self.stop, "a project's rate limits", PROJECTS) for f in futures)
        finally:
            # on a stop, a request in flight is not waited for (its answer is dropped)
            pool.shutdown(wait=not self.stop.is_set(), cancel_futures=True)
            for client in clients:
                # their 429s and Retry-After waits are the stream's (`collect --once`'s summary row)
                self.client.add_stats(client.stats)
                client.close()

    def _list(self, path: str, params: Mapping[str, Any], stats: PollStats, get=None) -> Iterator[Mapping]:
        """The listing's entries, asked with `get` (a worker's client), else on the collector's
        own thread until a stop (`get_json`)."""
        for data in cursor_pages(get or self.get_json, path, params, max_pages=MAX_PAGES):
            stats.requests += 1
            stats.pages += 1
            yield from data  # an entry that is not an object is reported by the caller


SKIPPED_IDS_SHOWN = 3  # project ids a line about projects that failed alike names

def _is_integer(value: Any) -> bool:
    """An integer of the reference that Elasticsearch's `long` stores as sent (JSON `5.0` too)."""
    if type(value) is float and not value.is_integer():
        return False
    return type(value) in (int, float) and -COUNTER_LIMIT < value < COUNTER_LIMIT


def _is_integral(value: Any) -> bool:
    """An integer of any size (JSON `5.0` too): what the reference allows, before the bound."""
    return type(value) is int or type(value) is float and value.is_integer()


def trim_limit(row: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[str]]:
    """A row `check_limit` passed, without its limits at or past ±2^53 (Kibana would show them
    rounded), and why each was left out: the row's other limits are kept, so a `max_tokens_per_1_day`
    out of bounds does not take the per-minute limits the headroom reads with it. (A row left with
    no limit at all is not stored: the caller checks.)"""
    past = [name for name in LIMITS if _is_integral(row.get(name)) and not _is_integer(row[name])]
    if not past:
        return row, []
    return ({k: v for k, v in row.items() if k not in past},
            [_wrong(name, row[name], "within ±2^53 (Kibana would show it rounded)") for name in past])


def check_limit(row: Any) -> str | None:
    """What makes one limit row not match the API reference (`ProjectRateLimit`), or None.

    A limit that is not an integer (`"lots"`) would be refused by the `long` mapping (the whole
    document; the direct output dead-letters it); one without `id` has no document id, and one
    without `model` is no headroom's limit, and one without any limit no limit at all. An integer
    at or past ±2^53 is not the row's fault (`trim_limit` leaves that field alone out)."""
    if not isinstance(row, Mapping):
        return f"it is not an object ({_short(row)})"
    for name in REQUIRED_STRINGS:
        value = row.get(name)
        if value is None:
            return f"it lacks required `{name}`"
        if not isinstance(value, str):
            return _wrong(name, value, "a string")
    if row.get("object") is not None and not isinstance(row["object"], str):
        return _wrong("object", row["object"], "a string")
    for name in LIMITS:
        value = row.get(name)
        if value is None:
            continue  # a limit it lacks is only not in the document (the reference requires the first two)
        if not _is_integral(value):
            return _wrong(name, value, "an integer")
    if all(row.get(name) is None for name in LIMITS):
        # a document of `id` and `model` alone feeds no headroom, and stored it counted its project
        # as read (no failure document, no per-project alert), as one left with none by `trim_limit`
        return "it has no limit (the reference requires `max_requests_per_1_minute` and `max_tokens_per_1_minute`)"
    return None


def _report_bad(bad: list[str], stats: PollStats) -> None:
    """Each bad limit or project of a cycle, a WARNING and a poll error each, the first BAD_SHOWN of
    them: an API that changed a field's type would otherwise make a line of every limit, every cycle."""
    for line in bad[:BAD_SHOWN]:
        msg = f"rate_limits: {line}"
        stats.errors.append(msg)
        log.warning(msg)
    if len(bad) > BAD_SHOWN:
        msg = (f"rate_limits: and {len(bad) - BAD_SHOWN} more bad limit(s) or project(s) in this cycle, not stored "
               f"(or stored without a limit past ±2^53)")
        stats.errors.append(msg)
        log.warning(msg)


def _alike(exc: ApiError) -> tuple:
    """Failures that are the same refusal (the same kind, status and missing scope) are one line:
    a key without the limits' scope failed every project of a 5,000-project organization alike,
    a WARNING each, every cycle."""
    scope = exc.missing_scope if isinstance(exc, PermissionDeniedError) else None
    return type(exc).__name__, exc.status, scope, None if scope else exc.code


def _skipped(alike: list[tuple[str, ApiError]]) -> str:
    """One line for the projects that failed alike in a cycle: the count, the first ids, why."""
    (pid, exc), n = alike[0], len(alike)
    if n == 1:
        return f"rate_limits: skipped project {pid}: {exc}"
    ids = ", ".join(p for p, _ in alike[:SKIPPED_IDS_SHOWN]) + (", ..." if n > SKIPPED_IDS_SHOWN else "")
    scoped = isinstance(exc, PermissionDeniedError) and exc.missing_scope
    why = f"{exc.refusal} ({exc.status}): {exc.message}" if scoped else f"first: {exc}"
    return f"rate_limits: skipped {n} projects ({ids}): {why}"


def _refused_for_a_scope(refusals: dict[tuple, list[tuple[str, ApiError]]]) -> PermissionDeniedError | None:
    """When every project failed with a 403 naming one missing scope, that refusal, for them all."""
    if len(refusals) != 1:
        return None
    ((_, status, scope, _),) = refusals
    if status != 403 or not scope:
        return None
    (alike,) = refusals.values()
    exc = alike[0][1]
    return PermissionDeniedError(403, f"every project's rate limits were refused ({len(alike)} project(s)): "
                                 f"{exc.message}", exc.code, f"{PROJECTS}/*/rate_limits", error_type=exc.error_type)


def _project_fields(project: Mapping[str, Any]) -> dict[str, Any]:
    """The project's id, name and status, as injected into its documents."""
    fields: dict[str, Any] = {"project_id": project.get("id")}
    for src, dst in (("name", "project_name"), ("status", "project_status")):
        if isinstance(project.get(src), str):
            fields[dst] = project[src]
    return fields


def _collected_at(ts: int) -> str:
    """`2026-05-26T06:40:21Z`, the seed's collected_at form."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _id(*parts: object) -> str:
    key = "|".join(str(p) for p in parts)
    return hashlib.blake2b(key.encode(), digest_size=20).hexdigest()


def limit_event(row: Mapping[str, Any], project: Mapping[str, Any], *, collected: int,
                namespace: str = "default") -> tuple[str, dict]:
    """One rate limit of one project, as the seed's rate_limits example shows."""
    limit: dict[str, Any] = {k: v for k, v in row.items() if v is not None and not isinstance(v, (dict, list))}
    pid = project.get("id")
    limit.update(_project_fields(project))
    limit["collected_at"] = _collected_at(collected)
    base: dict[str, Any] = {}
    if isinstance(row.get("model"), str):
        base["model"] = row["model"]
    base["project_id"] = pid
    if isinstance(project.get("name"), str):
        base["project_name"] = project["name"]
    ts = iso_timestamp(collected)
    doc = {
        "@timestamp": ts,
        "ecs": {"version": ECS_VERSION},
        "data_stream": {"type": "logs", "dataset": DATASET, "namespace": namespace},
        "event": {"kind": "metric", "dataset": DATASET, "created": ts},
        "openai": {"rate_limits": limit, "base": base},
        "tags": ["forwarded", "openai-rate-limits"],
    }
    return _id(DATASET, collected, pid, row["id"]), doc


def project_failure_event(project: Mapping[str, Any], reason: str, *, collected: int,
                          namespace: str = "default") -> tuple[str, dict]:
    """One project whose limits could not be read in a cycle (the per-project failing rule reads
    these beside the limit documents)."""
    from .logs import redact

    ts = iso_timestamp(collected)
    doc: dict[str, Any] = {
        "@timestamp": ts,
        "ecs": {"version": ECS_VERSION},
        "data_stream": {"type": "logs", "dataset": DATASET, "namespace": namespace},
        "event": {"kind": "event", "action": "rate-limits-project-failure", "outcome": "failure",
                  "dataset": DATASET, "created": ts},
        "openai": {"rate_limits": _project_fields(project)},
        "error": {"message": redact(reason)[:1000]},
        "tags": ["forwarded", "openai-rate-limits"],
    }
    return _id(DATASET, "project-failure", collected, project.get("id")), doc


def status_event(*, collected: int, projects: int, limits: int, failed_projects: int, error: str | None,
                 bad_limits: int = 0, namespace: str = "default") -> tuple[str, dict]:
    """The once-per-cycle status document the stale-limits rule reads."""
    ts = iso_timestamp(collected)
    doc: dict[str, Any] = {
        "@timestamp": ts,
        "ecs": {"version": ECS_VERSION},
        "data_stream": {"type": "logs", "dataset": DATASET, "namespace": namespace},
        "event": {
            "kind": "event",
            "action": "rate-limits-collection",
            "outcome": "failure" if error else "success",
            "dataset": DATASET,
            "created": ts,
        },
        "openai": {"rate_limits": {"collection": {
            "projects": projects, "limits": limits, "failed_projects": failed_projects, "bad_limits": bad_limits,
        }}},
        "tags": ["forwarded", "openai-rate-limits"],
    }
    if error:
        doc["error"] = {"message": error}
    return _id(DATASET, "collection", collected), doc


factory = RateLimitsCollector  # app.EXTRA_COLLECTORS builds it as engine.ListingCollector says
