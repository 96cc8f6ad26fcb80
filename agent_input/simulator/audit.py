"""Audit log events: generated per hour from a hash of (seed, hour), newest first, cursor-paginated.

An event id encodes its position in the global order (effective_at, sequence in its hour), so
``after``/``before`` cursors work across restarts without any server-side state.

Two scopes, as the API reference's ``tenant_only`` parameter has them:

- organization events (``EVENT_TYPES``): drawn from ``h64(seed, "audit", hour)``, sequences
  ``0..`` in their hour; listed when ``tenant_only`` is absent or false.
- tenant-scoped events (``TENANT_EVENT_TYPES``: ``tenant.*``, ``role.bound_to_resource``,
  ``role.unbound_from_resource``): drawn from a stream of their own, ``h64(seed, "audit-tenant",
  hour)``, at ``TENANT_RATE`` of the organization's ``audit_events_per_hour``, with sequences from
  ``TENANT_SEQ_BASE`` on (so no id or position can equal an organization event's); listed only with
  ``tenant_only=true``. Adding them changed no organization event: same ids, contents and draws.

``hour_events(hour)`` returns both scopes (each event's private ``_tenant`` says which), so the
simulator's truth is everything an organization's audit log holds.
"""
from __future__ import annotations

import math
import random
import threading
from collections import OrderedDict
from itertools import accumulate

from .org import ORG_EPOCH, Organization, h64, token
from .usage import HOUR, diurnal

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# (type, weight)
EVENT_TYPES: tuple[tuple[str, float], ...] = (
    ("login.succeeded", 30), ("login.failed", 5), ("logout.succeeded", 8),
    ("api_key.created", 6), ("api_key.updated", 4), ("api_key.deleted", 2),
    ("project.created", 1), ("project.updated", 2), ("project.archived", 0.5),
    ("invite.sent", 3), ("invite.accepted", 2), ("invite.deleted", 0.5),
    ("user.added", 2), ("user.updated", 2), ("user.deleted", 0.3),
    ("rate_limit.updated", 2), ("service_account.created", 1), ("service_account.updated", 0.5),
    ("organization.updated", 0.5),
)
_TYPES = [t for t, _ in EVENT_TYPES]
_CUM = list(accumulate(w for _, w in EVENT_TYPES))  # random.choices' cum_weights

PROJECT_SCOPED = {"api_key.created", "api_key.updated", "api_key.deleted", "project.created", "project.updated",
                  "project.archived", "rate_limit.updated", "service_account.created", "service_account.updated",
                  "user.added", "user.updated", "user.deleted"}
SESSION_ONLY = {"login.succeeded", "login.failed", "logout.succeeded"}

# Tenant-scoped events (listed only with tenant_only=true), (type, weight)
TENANT_EVENT_TYPES: tuple[tuple[str, float], ...] = (
    ("tenant.admin_api_key.created", 3), ("tenant.admin_api_key.updated", 1), ("tenant.admin_api_key.deleted", 2),
    ("tenant.project_api_key.created", 1), ("role.bound_to_resource", 2), ("role.unbound_from_resource", 1),
)
_TENANT_TYPES = [t for t, _ in TENANT_EVENT_TYPES]
_TENANT_CUM = list(accumulate(w for _, w in TENANT_EVENT_TYPES))
TENANT_RATE = 0.05  # tenant events per hour, as a fraction of the org's audit_events_per_hour
TENANT_SEQ_BASE = 3000  # first sequence of an hour's tenant events (an id holds 2 base62 digits: < 3844)
MAX_SEQ = 62 * 62 - 1
ADMIN_SCOPES = ("api.organization.read", "api.organization.write", "api.audit_logs.read", "api.usage.read")
ROLE_PERMISSIONS = ("api.model.request", "api.files.read", "api.files.write", "api.vector_stores.read",
                    "api.assistants.write")


def tenant_scoped(etype: str) -> bool:
    """Whether the API lists `etype` only with tenant_only=true (the reference's parameter text)."""
    return etype.startswith("tenant.") or etype in ("role.bound_to_resource", "role.unbound_from_resource")

# (country, city, region, region_code, asn, latitude, longitude, ip prefix)
LOCATIONS = (
    ("US", "San Francisco", "California", "CA", "13335", "37.77490", "-122.41940", "104.28"),
    ("US", "New York", "New York", "NY", "7922", "40.71280", "-74.00600", "73.12"),
    ("IN", "Mumbai", "Maharashtra", "MH", "55256", "19.07283", "72.88261", "163.116"),
    ("DE", "Berlin", "Land Berlin", "BE", "3320", "52.52000", "13.40500", "91.64"),
    ("GB", "London", "England", "ENG", "2856", "51.50740", "-0.12780", "81.2"),
    ("JP", "Tokyo", "Tokyo", "13", "2516", "35.67620", "139.65030", "126.78"),
    ("BR", "Sao Paulo", "Sao Paulo", "SP", "28573", "-23.55050", "-46.63330", "177.79"),
    ("FR", "Paris", "Ile-de-France", "IDF", "3215", "48.85660", "2.35220", "90.84"),
)
USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/144.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/143.0.0.0 Safari/537.36",
)
SCOPES = ("api.model.request", "api.model.read", "api.files.write", "api.assistants.read", "api.usage.read",
          "api.fine_tuning.jobs.write")


def _b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out))


def _unb62(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 62 + _B62.index(ch)
    return n


def encode_id(seed: int, effective_at: int, seq: int) -> str:
    return "audit_log-" + _b62(effective_at, 6) + _b62(seq, 2) + token(16, seed, "audit-id", effective_at, seq)


def decode_id(event_id: str) -> tuple[int, int] | None:
    if not event_id.startswith("audit_log-") or len(event_id) != len("audit_log-") + 24:
        return None
    body = event_id[len("audit_log-"):]
    try:
        return _unb62(body[:6]), _unb62(body[6:8])
    except ValueError:
        return None


class AuditLog:
    def __init__(self, org: Organization, cache_hours: int = 5000):
        rate = org.spec.audit_events_per_hour  # the diurnal peak; an hour rarely passes rate + 6 sigma
        if rate + 6 * math.sqrt(rate) >= TENANT_SEQ_BASE:
            raise ValueError(f"audit_events_per_hour {rate:g} is more than the simulated audit ids can number: "
                             f"keep it under {TENANT_SEQ_BASE - 6 * math.sqrt(TENANT_SEQ_BASE):.0f}")
        self.org = org
        self.seed = org.seed
        self._cache: OrderedDict[int, list] = OrderedDict()
        self._lock = threading.Lock()
        self._cache_hours = cache_hours

    def hour_events(self, hour: int) -> list[dict]:
        """Events of one hour, oldest first. Each event dict has a private '_pos' (effective_at, seq)."""
        with self._lock:
            ev = self._cache.get(hour)
            if ev is not None:
                return ev
        ev = self._generate(hour)
        with self._lock:
            self._cache[hour] = ev
            while len(self._cache) > self._cache_hours:
                self._cache.popitem(last=False)
        return ev

    def _session(self, rng: random.Random, user) -> dict:
        uh = h64(self.seed, "ua", user.id)
        loc = LOCATIONS[uh % len(LOCATIONS)] if rng.random() < 0.9 else LOCATIONS[rng.randrange(len(LOCATIONS))]
        country, city, region, rc, asn, lat, lon, prefix = loc
        ip = f"{prefix}.{(uh >> 8) % 254 + 1}.{(uh >> 16) % 254 + 1}"
        if prefix.count(".") == 0:
            ip = f"{prefix}.{(uh >> 24) % 254 + 1}.{(uh >> 8) % 254 + 1}.{(uh >> 16) % 254 + 1}"
        return {
            "user": {"id": user.id, "email": user.email},
            "ip_address": ip,
            "ip_address_details": {"country": country, "city": city, "region": region, "region_code": rc,
                                   "asn": asn, "latitude": lat, "longitude": lon},
            "ja3": token(32, self.seed, "ja3", uh % 7).lower()[:32].translate(_HEX),
            "ja4": "t13d" + str(1500 + uh % 400) + "h2_" + token(12, self.seed, "ja4a", uh % 5).translate(_HEX).lower()
                   + "_" + token(12, self.seed, "ja4b", uh % 9).translate(_HEX).lower(),
            "user_agent": USER_AGENTS[uh % len(USER_AGENTS)],
        }

    def _generate(self, hour: int) -> list[dict]:
        if hour < ORG_EPOCH:
            return []
        events = self._generate_org(hour)
        if len(events) > TENANT_SEQ_BASE:
            raise ValueError(f"{len(events)} audit events in one hour: the ids cannot tell them from tenant events")
        events += self._generate_tenant(hour)
        events.sort(key=lambda ev: ev["_pos"])
        return events

    def _generate_org(self, hour: int) -> list[dict]:
        org = self.org
        rng = random.Random(h64(self.seed, "audit", hour))
        lam = org.spec.audit_events_per_hour * diurnal(hour + 1800)
        n = max(0, int(lam + rng.gauss(0, math.sqrt(lam)) + 0.5))
        offsets = sorted(rng.randrange(HOUR) for _ in range(n))
        events = []
        for seq, off in enumerate(offsets):
            eff = hour + off
            etype = rng.choices(_TYPES, cum_weights=_CUM)[0]
            project = org.projects[rng.randrange(len(org.projects))]
            user = org.users[rng.randrange(len(org.users))]
            key = org.keys[rng.randrange(len(org.keys))] if org.keys else None
            if etype in SESSION_ONLY or key is None or rng.random() < 0.7:
                actor = {"type": "session", "session": self._session(rng, user)}
                actor_ids = {user.id}
                actor_email = user.email
            else:
                ak = org.actor_for_key(key)
                actor = {"type": "api_key", "api_key": ak}
                actor_ids = {key.id, ak.get("user", ak.get("service_account", {})).get("id")}
                actor_email = ak.get("user", {}).get("email")
            ev = {
                "id": encode_id(self.seed, eff, seq),
                "object": "organization.audit_log",
                "type": etype,
                "effective_at": eff,
                "actor": actor,
            }
            payload, resource = self._payload(rng, etype, project, user, key)
            if etype in PROJECT_SCOPED:
                ev["project"] = {"id": project.id, "name": project.name}
            ev[etype] = payload
            ev["_pos"] = (eff, seq)
            ev["_actor_ids"] = actor_ids
            ev["_actor_email"] = actor_email
            ev["_resource"] = resource
            ev["_tenant"] = False
            events.append(ev)
        return events

    def _generate_tenant(self, hour: int) -> list[dict]:
        """The hour's tenant-scoped events, from their own random stream (the organization events'
        draws are untouched), sequences from TENANT_SEQ_BASE on."""
        org = self.org
        rng = random.Random(h64(self.seed, "audit-tenant", hour))
        lam = org.spec.audit_events_per_hour * TENANT_RATE
        n, p, limit = 0, rng.random(), math.exp(-lam)  # Poisson (Knuth): lam is small
        while p > limit and n < MAX_SEQ - TENANT_SEQ_BASE:
            n += 1
            p *= rng.random()
        offsets = sorted(rng.randrange(HOUR) for _ in range(n))
        owners = [u for u in org.users if u.role == "owner"] or org.users
        events = []
        for i, off in enumerate(offsets):
            eff, seq = hour + off, TENANT_SEQ_BASE + i
            etype = rng.choices(_TENANT_TYPES, cum_weights=_TENANT_CUM)[0]
            user = owners[rng.randrange(len(owners))]
            project = org.projects[rng.randrange(len(org.projects))]
            payload, resource = self._tenant_payload(rng, etype, project)
            events.append({
                "id": encode_id(self.seed, eff, seq),
                "object": "organization.audit_log",
                "type": etype,
                "effective_at": eff,
                "actor": {"type": "session", "session": self._session(rng, user)},
                etype: payload,
                "_pos": (eff, seq),
                "_actor_ids": {user.id},
                "_actor_email": user.email,
                "_resource": resource,
                "_tenant": True,
            })
        return events

    def _tenant_payload(self, rng: random.Random, etype: str, project) -> tuple[dict, str]:
        if etype.startswith("tenant.admin_api_key."):
            kid = "key_" + token(16, self.seed, "admin-key", rng.randrange(6))
            if etype.endswith(".created"):
                return {"id": kid, "data": {"name": f"admin-key-{rng.randrange(100)}",
                                            "scopes": rng.sample(ADMIN_SCOPES, 1 + rng.randrange(3))}}, kid
            if etype.endswith(".updated"):
                return {"id": kid, "changes_requested": {"name": f"admin-key-{rng.randrange(100)}"}}, kid
            return {"id": kid}, kid
        if etype == "tenant.project_api_key.created":
            kid = "key_" + token(16, self.seed, "tenant-project-key", rng.random())
            return {"id": kid, "data": {"project_id": project.id,
                                        "scopes": rng.sample(SCOPES, 1 + rng.randrange(3))}}, kid
        role = "role_" + token(16, self.seed, "role", rng.randrange(4))
        return {"id": project.id, "role_id": role, "resource_id": project.id, "resource_type": "api.project",
                "permissions": rng.sample(ROLE_PERMISSIONS, 1 + rng.randrange(3))}, project.id

    def _payload(self, rng: random.Random, etype: str, project, user, key) -> tuple[dict, str | None]:
        org = self.org
        if etype == "login.succeeded" or etype == "logout.succeeded":
            return {}, None
        if etype == "login.failed":
            return {"error_code": "invalid_credentials", "error_message": "Wrong email or password."}, None
        if etype.startswith("api_key."):
            kid = key.id if key else "key_" + token(16, self.seed, "k", rng.random())
            if etype == "api_key.created":
                return {"id": kid, "data": {"scopes": rng.sample(SCOPES, 1 + rng.randrange(3))}}, kid
            if etype == "api_key.updated":
                return {"id": kid, "changes_requested": {"scopes": rng.sample(SCOPES, 1 + rng.randrange(3))}}, kid
            return {"id": kid}, kid
        if etype == "project.created":
            return {"id": project.id, "data": {"name": project.name, "title": project.name}}, project.id
        if etype == "project.updated":
            return {"id": project.id, "changes_requested": {"title": project.name + " (renamed)"}}, project.id
        if etype == "project.archived":
            return {"id": project.id}, project.id
        if etype.startswith("invite."):
            iid = "invite-" + token(24, self.seed, "invite", rng.random())
            if etype == "invite.sent":
                return {"id": iid, "data": {"email": f"new.hire{rng.randrange(1000)}@example.com",
                                            "role": "owner" if rng.random() < 0.1 else "reader"}}, iid
            return {"id": iid}, iid
        if etype == "user.added":
            return {"id": user.id, "data": {"role": "member" if rng.random() < 0.8 else "owner"}}, user.id
        if etype == "user.updated":
            return {"id": project.id, "changes_requested": {"role": "owner" if rng.random() < 0.3 else "member"}}, project.id
        if etype == "user.deleted":
            return {"id": user.id}, user.id
        if etype == "rate_limit.updated":
            m = org.models[rng.randrange(len(org.models))]
            rl = f"rl-{m.name}"
            ch = {"max_requests_per_1_minute": 500 * (1 + rng.randrange(20)),
                  "max_tokens_per_1_minute": 100000 * (1 + rng.randrange(50))}
            if m.stream == "images":
                ch["max_images_per_1_minute"] = 10 * (1 + rng.randrange(10))
            return {"id": rl, "changes_requested": ch}, rl
        if etype.startswith("service_account."):
            sa = org.service_accounts[rng.randrange(len(org.service_accounts))].id if org.service_accounts else \
                "svc_acct_" + token(24, self.seed, "sa", rng.random())
            role = "member" if rng.random() < 0.7 else "owner"
            if etype == "service_account.created":
                return {"id": sa, "data": {"role": role}}, sa
            return {"id": sa, "changes_requested": {"role": role}}, sa
        if etype == "organization.updated":
            return {"id": org.org_id, "changes_requested": {"title": "Example Org",
                                                            "usage_dashboard_visibility": "ANY_ROLE"}}, org.org_id
        return {}, None

    # ------------------------------------------------------------------------------ listing
    def list(self, now: float, limit: int, gte: int | None, lte: int | None, after: tuple | None,
             before: tuple | None, types: set | None, projects: set | None, actors: set | None,
             emails: set | None, resources: set | None, tenant_only: bool = False) -> tuple[list[dict], bool]:
        """Events of one scope (tenant-scoped ones if `tenant_only`, else the organization's) newest
        first within [gte, lte] (and effective_at <= now); returns (page, has_more)."""
        hi = int(now) if lte is None else min(int(now), lte)
        lo = ORG_EPOCH if gte is None else max(ORG_EPOCH, gte)

        def ok(ev) -> bool:
            e = ev["effective_at"]
            if e < lo or e > hi:
                return False
            if ev["_tenant"] != tenant_only:
                return False
            if types is not None and ev["type"] not in types:
                return False
            if projects is not None and ev.get("project", {}).get("id") not in projects:
                return False
            if actors is not None and not (ev["_actor_ids"] & actors):
                return False
            if emails is not None and ev["_actor_email"] not in emails:
                return False
            if resources is not None and ev["_resource"] not in resources:
                return False
            return True

        out: list[dict] = []
        if before is not None:
            # Items newer than `before`, nearest first, then returned newest first.
            h = before[0] // HOUR * HOUR
            while h <= hi and len(out) <= limit:
                for ev in self.hour_events(h):
                    if ev["_pos"] > before and ok(ev):
                        out.append(ev)
                        if len(out) > limit:
                            break
                h += HOUR
            has_more = len(out) > limit
            out = out[:limit]
            out.reverse()
            return out, has_more
        h = hi // HOUR * HOUR
        if after is not None:
            h = min(h, after[0] // HOUR * HOUR)
        while h >= lo // HOUR * HOUR and len(out) <= limit:
            for ev in reversed(self.hour_events(h)):
                if after is not None and ev["_pos"] >= after:
                    continue
                if ok(ev):
                    out.append(ev)
                    if len(out) > limit:
                        break
            h -= HOUR
        has_more = len(out) > limit
        return out[:limit], has_more


_HEX = str.maketrans({c: "0123456789abcdef"[i % 16] for i, c in enumerate(_B62)})


def public(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if not k.startswith("_")}
