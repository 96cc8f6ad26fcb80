"""The `audit` data stream: OpenAI's organization audit log as ECS events.

The API lists events **newest first** with `after` cursors, so an `after` position is no use as a
durable cursor: events older than it may still be unread. The collector therefore keeps a
high-water mark instead, `audit:hwm` = every event with `effective_at < hwm` is durable:

1. A poll at `now` covers `[hwm - overlap, now - lag]`, cut into closed time slices of at most
   `SLICE` seconds, oldest slice first.
2. A slice is read completely (`effective_at[gte]`/`effective_at[lte]`, `limit` = batch_size,
   `after` = the previous page's `last_id` until `has_more` is false), whatever order the pages
   come in.
3. Its events, the new high-water mark (slice end + 1) and the ids seen in the overlap are stored in
   ONE transaction (`StateStore.commit_events`), before anything is emitted.

An API error or a crash in the middle of a slice leaves the mark at the slice start: the slice is
read again from scratch and nothing of it was stored yet, so nothing is lost and nothing doubled.
The overlap re-reads the last few minutes to catch events OpenAI records late; the ids already
emitted there are remembered and skipped (and the document id is the audit log id anyway, so a
re-emission would be a harmless duplicate).

A 403 (audit logging not enabled, or the key is not an Organization Owner's) is reported once, with
what to enable, and the stream goes quiet: it asks again every `FORBIDDEN_RETRY` seconds, silently.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from .ecs import ECS_VERSION, iso_timestamp
from .engine import ListingCollector, PollStats, serialize
from .http_client import PermissionDeniedError, explain
from .paging import cursor_pages

log = logging.getLogger("agent_input.audit")

PATH = "/v1/organization/audit_logs"
DATASET = "openai.audit"
SLICE = 6 * 3600  # the most one transaction covers (bounds memory and the re-read after a crash)
OVERLAP = 300  # re-read this much before the high-water mark: events recorded late
LAG = 0  # how far behind `now` a poll stops (seconds)
FORBIDDEN_RETRY = 6 * 3600  # after a 403, ask again this rarely (and say nothing unless it changes)
MAX_PAGES_PER_SLICE = 100_000  # a safety net against a server that never ends a listing

KV_HWM = "audit:hwm"
KV_RECENT = "audit:recent_ids"


class BadAuditPage(ValueError):
    """An audit page that does not match the API reference."""


class AuditCollector(ListingCollector):
    """The Collector for `openai.audit` (see engine.Collector)."""

    name = "audit"

    def __init__(self, config, stream, *args: Any, **kwargs: Any):
        super().__init__(config, stream, *args, **kwargs)
        self.initial_interval = stream.initial_interval or 86400
        self.preserve_original = bool(getattr(config, "preserve_original_event", False))
        self.forbidden: str | None = None  # the 403 explanation, while audit logs are not readable
        self._forbidden_until = 0.0

    # -- polling -------------------------------------------------------------------------------
    def poll(self, now: float) -> PollStats:
        stats = PollStats()
        if self.forbidden is not None and now < self._forbidden_until:
            return stats
        end = int(now) - LAG  # inclusive upper bound of this poll
        hwm_text = self.store.get(KV_HWM)
        hwm = int(hwm_text) if hwm_text is not None else int(now - self.initial_interval)
        # ids already emitted whose effective_at lies in the overlap, with that effective_at
        recent: dict[str, int] = _load_recent(self.store.get(KV_RECENT))
        start = max(0, hwm - OVERLAP) if hwm_text is not None else hwm
        try:
            while start <= end and not self.stop.is_set():
                slice_end = min(end, start + SLICE - 1)
                if end - slice_end < OVERLAP:  # no tiny last slice: one request less
                    slice_end = end
                events = self._read_slice(start, slice_end, stats)
                new_hwm = slice_end + 1
                keep_from = new_hwm - OVERLAP
                lines: list[bytes] = []
                next_recent = {i: t for i, t in recent.items() if t >= keep_from}
                for ev in sorted(events.values(), key=_order):
                    eid = ev["id"]
                    if eid in recent:
                        continue  # emitted by an earlier slice or poll (the overlap)
                    try:
                        doc_id, doc = audit_event(ev, namespace=self.namespace,
                                                  preserve_original=self.preserve_original)
                    except BadAuditPage as exc:
                        msg = f"audit: skipped an event that does not match the API reference: {exc}"
                        stats.errors.append(msg)
                        log.warning(msg)
                        continue
                    lines.append(serialize(doc_id, doc))
                    if ev["effective_at"] >= keep_from:
                        next_recent[eid] = int(ev["effective_at"])
                self.delivery.commit_events(
                    self.name, lines,
                    {KV_HWM: str(new_hwm), KV_RECENT: json.dumps(next_recent, sort_keys=True, separators=(",", ":"))},
                )
                stats.events += len(lines)
                recent = next_recent
                start = new_hwm
        except PermissionDeniedError as exc:
            self._forbid(exc, now)
            return stats
        if self.forbidden is not None:
            log.warning("audit: audit logs are readable again; collecting")
            self.forbidden = None
        return stats

    def _forbid(self, exc: PermissionDeniedError, now: float) -> None:
        first = self.forbidden is None
        self.forbidden = explain(exc, "audit_logs", self.config)
        self._forbidden_until = now + FORBIDDEN_RETRY
        if first:
            log.error("audit: %s; the audit stream stays quiet and asks again every %dh",
                      self.forbidden, FORBIDDEN_RETRY // 3600)
        else:
            log.debug("audit: still forbidden: %s", self.forbidden)

    def _read_slice(self, gte: int, lte: int, stats: PollStats) -> dict[str, dict]:
        """Every event with gte <= effective_at <= lte, by id (pages newest first, any order)."""
        params: dict[str, Any] = {"effective_at[gte]": gte, "effective_at[lte]": lte, "limit": self.batch_size}
        events: dict[str, dict] = {}
        for data in cursor_pages(self.client.get_json, PATH, params, lambda what: BadAuditPage(f"{PATH}: {what}"),
                                 MAX_PAGES_PER_SLICE):
            stats.requests += 1
            stats.pages += 1
            for ev in data:
                if not isinstance(ev, Mapping) or not isinstance(ev.get("id"), str):
                    raise BadAuditPage(f"{PATH}: an entry has no string `id`: {ev!r:.80}")
                events[ev["id"]] = dict(ev)
        return events


def _load_recent(text: str | None) -> dict[str, int]:
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def _order(ev: Mapping) -> tuple:
    t = ev.get("effective_at")
    return (t if isinstance(t, (int, float)) and not isinstance(t, bool) else 0, str(ev.get("id")))


# -- ECS mapping ------------------------------------------------------------------------------
def audit_event(event: Mapping[str, Any], *, namespace: str = "default",
                preserve_original: bool = False) -> tuple[str, dict]:
    """(document id, ECS document) for one audit log entry, as the seed's audit example shows.

    The id is the audit log id: re-reading an event can only ever produce the same document.
    """
    eid = event.get("id")
    etype = event.get("type")
    effective_at = event.get("effective_at")
    if not isinstance(eid, str) or not isinstance(etype, str):
        raise BadAuditPage(f"entry lacks a string id/type ({eid!r}, {etype!r})")
    if not isinstance(effective_at, (int, float)) or isinstance(effective_at, bool):
        raise BadAuditPage(f"{eid}: effective_at is {effective_at!r}, not a Unix time")
    ts = iso_timestamp(effective_at)

    audit: dict[str, Any] = {}
    for key, value in event.items():
        if value is None or key == etype:
            continue
        if key == "actor" and isinstance(value, Mapping):
            audit["actor"] = _actor(value)
        elif key == "effective_at":
            audit["effective_at"] = ts
        else:
            audit[key] = _copy(value)
    payload = event.get(etype)
    if isinstance(payload, Mapping) and payload:
        _set_path(audit, etype, _copy(payload))

    doc: dict[str, Any] = {
        "@timestamp": ts,
        "ecs": {"version": ECS_VERSION},
        "data_stream": {"type": "logs", "dataset": DATASET, "namespace": namespace},
        "event": {
            "action": etype.replace(".", "-"),
            "category": ["iam"],
            "dataset": DATASET,
            "id": eid,
            "kind": "event",
            "type": ["change"],
        },
        "observer": {"product": "OpenAI", "vendor": "OpenAI"},
        "openai": {"audit": audit},
    }
    if preserve_original:
        doc["event"]["original"] = json.dumps(event, separators=(",", ":"), sort_keys=True, ensure_ascii=False)

    actor = audit.get("actor") or {}
    session = actor.get("session") if isinstance(actor.get("session"), Mapping) else None
    api_key = actor.get("api_key") if isinstance(actor.get("api_key"), Mapping) else None
    user: Mapping = {}
    related_ip: list[str] = []
    if session:
        user = session.get("user") or {}
        ip = session.get("ip_address")
        if isinstance(ip, str) and ip:
            source: dict[str, Any] = {"ip": ip}
            related_ip.append(ip)
            details = session.get("ip_address_details") or {}
            if isinstance(details.get("asn"), int):
                source["as"] = {"number": details["asn"]}
            geo = _geo(details)
            if geo:
                source["geo"] = geo
            doc["source"] = source
        if isinstance(session.get("ja3"), str):
            doc["tls"] = {"client": {"ja3": session["ja3"]}}
        if isinstance(session.get("user_agent"), str):
            doc["user_agent"] = {"original": session["user_agent"]}
    elif api_key:
        user = api_key.get("user") or {}
        service_account = api_key.get("service_account") or {}
        if not user and isinstance(service_account.get("id"), str):
            user = {"id": service_account["id"]}
    related_user: list[str] = []
    ecs_user: dict[str, Any] = {}
    email = user.get("email") if isinstance(user, Mapping) else None
    uid = user.get("id") if isinstance(user, Mapping) else None
    if isinstance(email, str) and email:
        ecs_user["email"] = email
        related_user.append(email)
        if "@" in email:
            ecs_user["domain"] = email.rsplit("@", 1)[1]
    if isinstance(uid, str) and uid:
        ecs_user["id"] = uid
        related_user.append(uid)
    if ecs_user:
        doc["user"] = dict(sorted(ecs_user.items()))
    related: dict[str, list[str]] = {}
    if related_ip:
        related["ip"] = related_ip
    if related_user:
        related["user"] = related_user
    if related:
        doc["related"] = related
    tags = ["forwarded", "openai-audit"]
    if preserve_original:
        tags.insert(0, "preserve_original_event")
    doc["tags"] = tags
    return eid, doc


def _actor(actor: Mapping[str, Any]) -> dict:
    out = _copy(actor)
    session = out.get("session")
    if isinstance(session, dict) and isinstance(session.get("ip_address_details"), dict):
        details = session["ip_address_details"]
        for key, conv in (("asn", _to_int), ("latitude", _to_float), ("longitude", _to_float)):
            if key in details:
                value = conv(details[key])
                if value is None:
                    details.pop(key)
                else:
                    details[key] = value
    return out


def _geo(details: Mapping[str, Any]) -> dict:
    geo: dict[str, Any] = {}
    if isinstance(details.get("city"), str):
        geo["city_name"] = details["city"]
    if isinstance(details.get("country"), str):
        geo["country_iso_code"] = details["country"]
    lat, lon = details.get("latitude"), details.get("longitude")
    if isinstance(lat, float) and isinstance(lon, float):
        geo["location"] = {"lat": lat, "lon": lon}
    if isinstance(details.get("region_code"), str):
        geo["region_iso_code"] = details["region_code"]
    if isinstance(details.get("region"), str):
        geo["region_name"] = details["region"]
    return geo


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip().upper().removeprefix("AS"))
    except ValueError:
        return None


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def _copy(value: Any) -> Any:
    """A deep copy of JSON data without nulls (the seed's documents leave null fields out)."""
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _set_path(target: dict, dotted: str, value: Any) -> None:
    """openai.audit.<type> with the type's dots as object levels (`api_key.created` nests under
    `api_key`, next to nothing else: Elasticsearch would expand the dotted key the same way)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            nxt = target[part] = {}
        target = nxt
    if isinstance(target.get(leaf), dict) and isinstance(value, dict):
        target[leaf].update(value)
    else:
        target[leaf] = value


factory = AuditCollector  # app.EXTRA_COLLECTORS builds it as engine.ListingCollector says
