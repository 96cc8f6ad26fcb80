"""The HTTP side of the simulator: routing, parameter validation, auth, faults, control interface."""
from __future__ import annotations

import base64
import json
import re
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import orjson

from .audit import AuditLog, decode_id, public, tenant_scoped
from .faults import FaultRule, FaultSet
from .org import ORG_SIZES, Organization, OrgSpec, rate_limit_rows
from .usage import (CONTEXT_LEVELS, COSTS_GROUP_BY, DAY, IMAGE_SIZES, IMAGE_SOURCES, LIMITS, STREAMS, WIDTHS,
                    UsageModel, align)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = headers or {}


def redact_key(key: str) -> str:
    if len(key) < 10:
        return "***"
    return f"{key[:5]}***{key[-2:]}"


# ------------------------------------------------------------------------------------ parameters
_INTEGER = re.compile(r"-?[0-9]+")
#: usage filters whose values the reference enumerates
FILTER_ENUMS = {"sizes": IMAGE_SIZES, "sources": IMAGE_SOURCES, "context_levels": CONTEXT_LEVELS}
_CLOCK_END = 253402300800  # 10000-01-01: the first time datetime (and the answers) cannot hold
TRUTH_MAX_SPAN = 2 * 366 * 86400  # /_sim/truth: two years (summed minute by minute, ~20 s)


class Params:
    """Query parameters: repeated names and `name[]` both give lists."""

    def __init__(self, query: str):
        raw = parse_qs(query, keep_blank_values=True)
        self.raw: dict[str, list[str]] = {}
        for k, v in raw.items():
            name = k[:-2] if k.endswith("[]") else k
            self.raw.setdefault(name, []).extend(v)

    def one(self, name: str) -> str | None:
        v = self.raw.get(name)
        return v[-1] if v else None

    def many(self, name: str) -> list[str]:
        out: list[str] = []
        for v in self.raw.get(name, []):
            out.extend(x for x in v.split(",") if x)
        return out

    def int(self, name: str, default: int | None = None, required: bool = False) -> int | None:
        v = self.one(name)
        if v is None or v == "":
            if required:
                raise ApiError(400, f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
            return default
        if _INTEGER.fullmatch(v):
            return int(v)
        # `1.0`, `1e9`, `1_000`: the reference's `integer`, written as a query value, is digits only
        # (Python's int()/float() take all three: a collector sending a float time would pass here)
        try:
            float(v.replace("_", "x"))
            got = "a decimal number"
        except ValueError:
            got = "a string"
        raise ApiError(400, f"Invalid type for '{name}': expected an integer, but got {got} instead.",
                       name, "invalid_type")

    def bool(self, name: str) -> bool | None:
        v = self.one(name)
        if v is None or v == "":
            return None
        if v.lower() in ("true", "1"):
            return True
        if v.lower() in ("false", "0"):
            return False
        raise ApiError(400, f"Invalid value for '{name}': expected a boolean.", name, "invalid_value")

    def limit(self, default: int, lo: int, hi: int) -> int:
        n = self.int("limit", default)
        if n < lo or n > hi:
            raise ApiError(400, f"Invalid 'limit': integer above maximum value. Expected a value <= {hi}, but got "
                           f"{n} instead." if n > hi else f"Invalid 'limit': integer below minimum value. Expected "
                           f"a value >= {lo}, but got {n} instead.", "limit",
                           "integer_above_max_value" if n > hi else "integer_below_min_value")
        return n


def _page_token(kind: str, width: str, next_start: int) -> str:
    sig = zlib.crc32(f"{kind}|{width}".encode())
    return "page_" + base64.urlsafe_b64encode(struct.pack(">qI", next_start, sig)).decode()


def _page_start(kind: str, width: str, tok: str) -> int:
    try:
        if not tok.startswith("page_"):
            raise ValueError
        ts, sig = struct.unpack(">qI", base64.urlsafe_b64decode(tok[5:].encode()))
        if sig != zlib.crc32(f"{kind}|{width}".encode()):
            raise ValueError
        return ts
    except Exception:
        raise ApiError(400, "Invalid 'page': the page cursor is not valid for this request.", "page",
                       "invalid_value") from None


def _scope_for(path: str) -> str:
    if path.startswith("/v1/organization/usage/") or path.startswith("/v1/organization/costs"):
        return "api.usage.read"
    if path.startswith("/v1/organization/audit_logs"):
        return "api.audit_logs.read"
    if path.startswith("/v1/organization/users"):
        return "api.organization.users.read"
    return "api.organization.projects.read"


# ------------------------------------------------------------------------------------ the API
class Api:
    """Pure request -> (status, body, headers) logic, independent of the HTTP server."""

    def __init__(self, sim: "Simulator"):
        self.sim = sim

    def handle(self, path: str, query: str) -> tuple[int, object]:
        sim = self.sim
        parts = [p for p in path.split("/") if p]
        if len(parts) < 2 or parts[0] != "v1" or parts[1] != "organization":
            raise ApiError(404, f"Invalid URL (GET {path})", None, "unknown_url")
        p = Params(query)
        rest = parts[2:]
        if len(rest) == 2 and rest[0] == "usage" and rest[1] in STREAMS:
            return 200, self.usage(rest[1], p)
        if rest == ["costs"]:
            return 200, self.costs(p)
        if rest == ["audit_logs"]:
            if not sim.audit_logs_enabled:
                raise ApiError(403, "Audit logging is not enabled for this organization. An organization owner "
                               "can enable it under Settings > Organization > Data controls > Audit logging "
                               "(https://platform.openai.com/settings/organization/data-controls).", None,
                               "audit_logs_not_enabled")
            return 200, self.audit_logs(p)
        if rest == ["projects"]:
            include = p.bool("include_archived") or False
            items = [pr.to_api() for pr in sim.org.projects if include or pr.archived_at is None]
            return 200, self._list(items, p, 20, 100)
        if rest and rest[0] == "projects" and len(rest) >= 2:
            proj = sim.org.projects_by_id.get(rest[1])
            if proj is None:
                raise ApiError(404, f"The project {rest[1]} was not found", None, "not_found")
            if len(rest) == 2:
                return 200, proj.to_api()
            sub = rest[2]
            if sub == "rate_limits" and len(rest) == 3:
                return 200, self._list(rate_limit_rows(sim.org, proj), p, 100, 1000, before=True)
            if sub == "api_keys":
                now = sim.now()
                if len(rest) == 4:
                    k = sim.org.keys_by_id.get(rest[3])
                    if k is None or k.project_id != proj.id:
                        raise ApiError(404, f"No such API key: {rest[3]}", None, "not_found")
                    return 200, sim.org.project_api_key(k, now)
                if len(rest) == 3:
                    access = p.one("owner_project_access")
                    if access not in (None, "", "active", "inactive", "any"):
                        raise ApiError(400, "Invalid value for 'owner_project_access'.", "owner_project_access",
                                       "invalid_value")
                    items = [sim.org.project_api_key(sim.org.keys_by_id[kid], now) for kid in proj.keys]
                    if access in ("active", "inactive"):
                        items = [i for i in items if i["owner_project_access"] == access]
                    elif access != "any":  # omitted: "membership-based visibility rules, which may
                        # exclude some enabled keys" (the spec); here, those whose owner lost access
                        items = [i for i in items if i["owner_project_access"] == "active"]
                    return 200, self._list(items, p, 20, 100)
            if sub in ("users", "service_accounts") and len(rest) == 3:
                if proj.archived_at is not None:
                    raise ApiError(400, f"Project {proj.id} is archived", None, "project_archived")
                if sub == "users":
                    items = []
                    for uid, role, added in proj.users:
                        u = sim.org.users_by_id[uid]
                        items.append({"object": "organization.project.user", "id": u.id, "name": u.name,
                                      "email": u.email, "role": role, "added_at": added})
                else:
                    items = []
                    for sid in proj.service_accounts:
                        sa = sim.org.service_accounts_by_id[sid]
                        items.append({"object": "organization.project.service_account", "id": sa.id,
                                      "name": sa.name, "role": sa.role, "created_at": sa.created_at})
                return 200, self._list(items, p, 20, 100)
        if rest == ["users"]:
            emails = set(p.many("emails"))
            items = [u.to_api() for u in sim.org.users if not emails or u.email in emails]
            return 200, self._list(items, p, 20, 100)
        if len(rest) == 2 and rest[0] == "users":
            u = sim.org.users_by_id.get(rest[1])
            if u is None:
                raise ApiError(404, f"No such user: {rest[1]}", None, "not_found")
            return 200, u.to_api()
        raise ApiError(404, f"Invalid URL (GET {path})", None, "unknown_url")

    # -------------------------------------------------------------------------- lists
    @staticmethod
    def _list(items: list[dict], p: Params, default: int, hi: int, before: bool = False) -> dict:
        limit = p.limit(default, 1, hi)
        after = p.one("after")
        bef = p.one("before") if before else None
        ids = [i["id"] for i in items]
        if after:
            if after not in ids:
                raise ApiError(400, f"Invalid 'after': no object with id {after}.", "after", "invalid_value")
            start = ids.index(after) + 1
            page = items[start:start + limit]
            has_more = start + limit < len(items)
        elif bef:
            if bef not in ids:
                raise ApiError(400, f"Invalid 'before': no object with id {bef}.", "before", "invalid_value")
            end = ids.index(bef)
            page = items[max(0, end - limit):end]
            has_more = end - limit > 0
        else:
            page = items[:limit]
            has_more = len(items) > limit
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": has_more}

    # -------------------------------------------------------------------------- usage
    def _common_bucket_params(self, kind: str, p: Params, widths: dict, allowed_group_by: tuple):
        start = p.int("start_time", required=True)
        end = p.int("end_time")
        if end is not None and end <= start:
            raise ApiError(400, "Invalid 'end_time': must be greater than 'start_time'.", "end_time", "invalid_value")
        width_name = p.one("bucket_width") or "1d"
        if width_name not in widths:
            raise ApiError(400, f"Invalid value for 'bucket_width': expected one of {', '.join(widths)}, but got "
                           f"'{width_name}' instead.", "bucket_width", "invalid_value")
        group_by: list[str] = []
        for g in p.many("group_by"):
            if g not in allowed_group_by:
                raise ApiError(400, f"Invalid value for 'group_by': '{g}' is not supported. Supported values are: "
                               f"{', '.join(allowed_group_by)}.", "group_by", "invalid_value")
            if g not in group_by:
                group_by.append(g)
        width = WIDTHS[width_name]
        first = align(start, width)
        tok = p.one("page")
        cursor = _page_start(kind, width_name, tok) if tok else first
        if cursor < first or (cursor - first) % width:
            raise ApiError(400, "Invalid 'page': the page cursor is not valid for this request.", "page",
                           "invalid_value")
        return start, end, width_name, width, tuple(group_by), cursor

    def _paginate(self, kind: str, width_name: str, width: int, cursor: int, end: int | None, limit: int,
                  bucket_results) -> dict:
        sim = self.sim
        now = sim.now()
        budget = sim.max_results_per_page
        data = []
        n = 0
        b = cursor
        while len(data) < limit and (end is None or b < end) and b <= now:
            results = bucket_results(b, now)
            if data and n + len(results) > budget:
                break
            data.append({"object": "bucket", "start_time": b, "end_time": b + width, "results": results})
            n += len(results)
            b += width
        more = (end is None or b < end) and b <= now
        return {"object": "page", "data": data, "has_more": more,
                "next_page": _page_token(kind, width_name, b) if more else None}

    def usage(self, stream: str, p: Params) -> dict:
        sd = STREAMS[stream]
        start, end, width_name, width, group_by, cursor = self._common_bucket_params(stream, p, WIDTHS, sd.group_by)
        d, hi = LIMITS[width_name]
        limit = p.limit(d, 1, hi)
        filters: dict[str, set] = {}
        for param, dim in sd.filters.items():
            if dim == "batch":
                v = p.bool("batch")
                if v is not None:
                    filters[dim] = {v}
                continue
            vals = p.many(param)
            allowed = FILTER_ENUMS.get(param)
            wrong = [v for v in vals if allowed is not None and v not in allowed]
            if wrong:
                raise ApiError(400, f"Invalid value for '{param}': '{wrong[0]}' is not supported. Supported values "
                               f"are: {', '.join(allowed)}.", param, "invalid_value")
            if vals:
                filters[dim] = set(vals)
        model = self.sim.usage

        def bucket_results(b: int, now: float) -> list[dict]:
            groups = model.bucket_groups(stream, b, width, now, group_by, filters)
            return model.results(stream, groups, group_by)

        return self._paginate(stream, width_name, width, cursor, end, limit, bucket_results)

    def costs(self, p: Params) -> dict:
        start, end, width_name, width, group_by, cursor = self._common_bucket_params(
            "costs", p, {"1d": DAY}, COSTS_GROUP_BY)
        limit = p.limit(7, 1, 180)
        filters: dict[str, set] = {}
        if p.many("project_ids"):
            filters["project_id"] = set(p.many("project_ids"))
        if p.many("api_key_ids"):
            filters["api_key_id"] = set(p.many("api_key_ids"))
        model = self.sim.usage

        def bucket_results(b: int, now: float) -> list[dict]:
            return model.cost_results(model.cost_groups(b, now, group_by, filters), group_by)

        return self._paginate("costs", width_name, width, cursor, end, limit, bucket_results)

    # -------------------------------------------------------------------------- audit logs
    def audit_logs(self, p: Params) -> dict:
        bounds = {}
        for op in ("gt", "gte", "lt", "lte"):
            v = p.int(f"effective_at[{op}]")
            if v is None:
                v = p.int(op)
            if v is None and p.one("effective_at"):
                # A JSON-encoded object, e.g. effective_at={"gte": 1}
                try:
                    obj = json.loads(p.one("effective_at"))
                    v = int(obj[op]) if op in obj else None
                except (ValueError, TypeError, KeyError):
                    raise ApiError(400, "Invalid value for 'effective_at'.", "effective_at", "invalid_value")
            bounds[op] = v
        gte = bounds["gte"]
        if bounds["gt"] is not None:
            gte = max(gte if gte is not None else -1, bounds["gt"] + 1)
        lte = bounds["lte"]
        if bounds["lt"] is not None:
            lte = min(lte if lte is not None else 2 ** 62, bounds["lt"] - 1)
        limit = p.limit(20, 1, 100)
        after = before = None
        if p.one("after"):
            after = decode_id(p.one("after"))
            if after is None:
                raise ApiError(400, "Invalid 'after': not an audit log id.", "after", "invalid_value")
        if p.one("before"):
            before = decode_id(p.one("before"))
            if before is None:
                raise ApiError(400, "Invalid 'before': not an audit log id.", "before", "invalid_value")

        def s(name):
            v = p.many(name)
            return set(v) if v else None

        tenant_only = bool(p.bool("tenant_only"))
        types = s("event_types")
        if tenant_only and types and any(not tenant_scoped(t) for t in types):
            wrong = sorted(t for t in types if not tenant_scoped(t))
            raise ApiError(400, "Invalid value for 'event_types': with 'tenant_only' every event type must be "
                           f"tenant-scoped, not {', '.join(wrong)}.", "event_types", "invalid_value")
        events, has_more = self.sim.audit.list(self.sim.now(), limit, gte, lte, after, before, types,
                                               s("project_ids"), s("actor_ids"), s("actor_emails"),
                                               s("resource_ids"), tenant_only=tenant_only)
        data = [public(e) for e in events]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}


# ------------------------------------------------------------------------------------ faults
def corrupt(body: object) -> object:
    """A 200 body that violates the spec: a null counter, a string for an int, a missing required field."""
    if isinstance(body, dict) and body.get("object") == "page":
        buckets = body.get("data") or [{"object": "bucket", "start_time": 0, "end_time": 60, "results": []}]
        body["data"] = buckets
        b = buckets[0]
        res = b.get("results") or []
        if not res:
            res = [{"object": "organization.usage.completions.result", "input_tokens": 1, "output_tokens": 1,
                    "num_model_requests": 1}]
        r = dict(res[0])
        ints = [k for k, v in r.items() if isinstance(v, int) and not isinstance(v, bool)]
        if ints:
            r[ints[0]] = None
        if len(ints) > 1:
            r[ints[1]] = str(r[ints[1]])
        if len(ints) > 2:
            del r[ints[2]]
        if "amount" in r:
            r["amount"] = {"value": "0.5", "currency": None}
        res = [r] + list(res[1:])
        b["results"] = res
        b["start_time"] = str(b.get("start_time"))
        return body
    if isinstance(body, dict) and isinstance(body.get("data"), list):
        items = body["data"] or [{}]
        first = dict(items[0])
        first.pop("id", None)
        for k, v in list(first.items()):
            if isinstance(v, int) and not isinstance(v, bool):
                first[k] = None
                break
        body["data"] = [first] + items[1:]
        body.pop("has_more", None)
        return body
    return {"object": None}


def corrupt_items(body: object) -> object:
    """A list page whose items violate the spec while the page itself does not: the first item
    without its `id`, the second with a word (`"lots"`) for its first integer. `has_more`,
    `first_id` and `last_id` are kept, so the listing goes on past it (`invalid_results` drops
    `has_more`, and only a collector's page-level check fires). Anything but a list: unchanged."""
    if not (isinstance(body, dict) and body.get("object") == "list" and isinstance(body.get("data"), list)):
        return body
    items = [dict(i) if isinstance(i, dict) else i for i in body["data"]]
    if items and isinstance(items[0], dict):
        items[0].pop("id", None)
    if len(items) > 1 and isinstance(items[1], dict):
        for k, v in items[1].items():
            if isinstance(v, int) and not isinstance(v, bool):
                items[1][k] = "lots"
                break
    return {**body, "data": items}


_STATUS_ERRORS = {
    "401": (401, "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error", "invalid_api_key"),
    "403": (403, "You have insufficient permissions for this operation.", "invalid_request_error", None),
    "404": (404, "Not found.", "invalid_request_error", "not_found"),
    "429": (429, "Rate limit reached for requests on the organization usage API. Please try again later.",
            "requests", "rate_limit_exceeded"),
    "500": (500, "The server had an error while processing your request. Sorry about that!", "server_error", None),
    "502": (502, "Bad gateway.", "server_error", None),
    "503": (503, "The engine is currently overloaded, please try again later.", "server_error", None),
}


# ------------------------------------------------------------------------------------ HTTP
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "openai-admin-sim/1.0"
    sim: "Simulator"
    _api_arrived: float | None = None  # the API request being answered: when it arrived

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def log_error(self, format, *args):  # noqa: A002
        pass

    def date_time_string(self, timestamp=None):
        """The `Date` header: the simulated clock's time, as OpenAI's is its own clock's."""
        return super().date_time_string(self.sim.now() if timestamp is None else timestamp)

    def _send(self, status: int, body: object, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else _encode(body)
        self._answered()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_sim_{self.sim._next_request_id()}")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        # Headers and body in one write: two small writes meet Nagle + delayed ACK (40 ms a request).
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(data)
        self.flush_headers()

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def _answered(self) -> None:
        """Record an API request's span before its answer goes out: a client that reads
        /_sim/stats once it has its answer must find that answer counted."""
        if self._api_arrived is not None:
            self.sim._served(self._api_arrived, time.time())
            self._api_arrived = None

    def _reset(self) -> None:
        self._answered()
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
        self.close_connection = True

    def do_POST(self):  # noqa: N802
        url = urlsplit(self.path)
        if not url.path.startswith("/_sim/"):
            self._send(405, {"error": {"message": "Method not allowed", "type": "invalid_request_error",
                                       "param": None, "code": None}})
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            payload = json.loads(raw or b"null")
            if url.path == "/_sim/config":
                self.sim._responses.clear()  # page size, audit switch: other answers from now on
            status, body = self.sim._control("POST", url.path, url.query, payload)
        except ApiError as e:  # a missing or malformed query parameter, worded as the API words it
            status, body = e.status, e.body
        except (ValueError, TypeError, KeyError) as e:
            status, body = 400, {"error": str(e)}
        self._send(status, body)

    def do_GET(self):  # noqa: N802
        sim = self.sim
        url = urlsplit(self.path)
        path = url.path
        if path.startswith("/_sim/"):
            try:
                status, body = sim._control("GET", path, url.query, None)
            except ApiError as e:  # e.g. /_sim/truth without start or end
                status, body = e.status, e.body
            except (ValueError, TypeError, KeyError) as e:
                status, body = 400, {"error": str(e)}
            self._send(status, body)
            return
        self._api_arrived = time.time()
        try:
            self._api_get(sim, url, path)
        finally:
            self._answered()  # when no answer was sent (an error in the handler)

    def _api_get(self, sim: "Simulator", url, path: str) -> None:
        if sim.latency > 0:
            time.sleep(sim.latency)
        try:
            sim._auth(self.headers.get("Authorization"), path)
            refused = None
        except ApiError as e:
            refused = e  # answered after the faults that come whatever the key (a 5xx, a reset)
        rule = sim.faults.pick(path, url.query, authorized=refused is None)
        mode = None
        if rule is not None:
            sim._count_fault(rule.kind)
            if rule.kind == "slow":
                time.sleep(rule.delay)
            elif rule.kind == "reset":
                sim._count(path, "reset")
                self._reset()
                return
            elif rule.kind in _STATUS_ERRORS:
                status, msg, typ, code = _STATUS_ERRORS[rule.kind]
                if rule.kind == "403" and path.startswith("/v1/organization/audit_logs"):
                    if Params(url.query).one("tenant_only") in ("true", "1"):
                        msg = "This organization cannot list tenant-scoped audit events."
                        code = "tenant_audit_logs_not_available"
                    else:
                        msg = "Audit logging is not enabled for this organization."
                        code = "audit_logs_not_enabled"
                headers = {"Retry-After": rule.retry_after} if rule.kind == "429" else {}
                sim._count(path, status)
                self._send(status, {"error": {"message": rule.message or msg, "type": typ, "param": None,
                                              "code": code}}, headers)
                return
            else:
                mode = rule.kind
        try:
            if refused is not None:
                raise refused
            cached = sim._responses.get(path, url.query, sim.now()) if mode is None else None
            if cached is not None:
                sim._count(path, 200)
                self._send(200, None, raw=cached)
                return
            status, body = sim.api.handle(path, url.query)
            headers: dict = {}
        except ApiError as e:
            status, body, headers = e.status, e.body, e.headers
        if status == 200 and mode is None and sim._responses.enabled:
            data = _encode(body)
            sim._responses.put(path, url.query, sim.now(), data)
            sim._count(path, status)
            self._send(200, None, raw=data)
            return
        if status == 200 and mode == "malformed_json":
            data = _encode(body)
            sim._count(path, status)
            self._send(200, None, raw=data[: max(1, len(data) // 2)])
            return
        if status == 200 and mode == "invalid_results":
            body = corrupt(body)
        elif status == 200 and mode == "invalid_items":
            body = corrupt_items(body)
        sim._count(path, status)
        self._send(status, body, headers)


def _encode(body: object) -> bytes:
    """Compact JSON (orjson: a large org's 5,000-result page is most of the simulator's time
    in the stdlib encoder)."""
    return orjson.dumps(body)


class ResponseCache:
    """Answers to repeated requests, by (path, query, simulated now), kept up to `max_bytes`.

    Off unless asked for (`simulate --cache-responses`): the benchmarks warm it with a cold
    run of each backfill, so the repeated run measures the collector against an API that answers in
    its simulated latency, not latency plus this process's page generation competing for the
    collector's cores. The simulated time is part of the key and faults are decided before the
    cache is asked, so only a config change (POST /_sim/config) empties it.
    """

    def __init__(self, enabled: bool = False, max_bytes: int = 2 << 30):
        self.enabled, self.max_bytes = enabled, max_bytes
        self._data: dict[tuple, bytes] = {}
        self._size = 0
        self._lock = threading.Lock()

    def get(self, path: str, query: str, now: float) -> bytes | None:
        if not self.enabled:
            return None
        with self._lock:
            return self._data.get((path, query, now))

    def put(self, path: str, query: str, now: float, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            while self._data and self._size + len(data) > self.max_bytes:
                self._size -= len(self._data.pop(next(iter(self._data))))  # the oldest first
            self._data[(path, query, now)] = data
            self._size += len(data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._size = 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request, client_address):
        """Quiet for a client that went away (killed collectors, timeouts); loud for a bug here."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


# ------------------------------------------------------------------------------------ Simulator
class Simulator:
    """A loopback OpenAI organization Admin API. See the package docstring."""

    def __init__(self, seed: int = 1, org: str | OrgSpec = "small", now: float | None = 1763892000.0,
                 admin_key: str = "sk-admin-sim", restricted_key: str | None = None, latency: float = 0.0,
                 max_results_per_page: int = 5000, audit_logs_enabled: bool = True,
                 running_clock: bool | None = None, cache_responses: bool = False):
        if isinstance(org, str):
            if org not in ORG_SIZES:
                raise ValueError(f"unknown org size {org!r}; one of {', '.join(ORG_SIZES)} or an OrgSpec")
            spec = ORG_SIZES[org]
        else:
            spec = org
        self.seed = seed
        self.spec = spec
        self.org = Organization(seed, spec)
        self.usage = UsageModel(self.org)
        self.audit = AuditLog(self.org)
        self.admin_key = admin_key
        self.restricted_key = restricted_key
        self.latency = float(latency)
        self.max_results_per_page = max(1, int(max_results_per_page))
        self.audit_logs_enabled = audit_logs_enabled
        self.faults = FaultSet(seed)
        self.api = Api(self)
        self._responses = ResponseCache(cache_responses)
        self._running = (now is None) if running_clock is None else running_clock
        self._clock_lock = threading.Lock()
        self._now = float(now) if now is not None else time.time()
        self._anchor = time.time()
        self._stats_lock = threading.Lock()
        self._by_path: Counter = Counter()
        self._by_status: Counter = Counter()
        self._faults: Counter = Counter()
        self._requests = 0
        self._first_arrival: float | None = None  # wall time of the first API request since a reset
        self._last_answer: float | None = None  # ... and of the last API answer sent
        self._req_id = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url: str | None = None

    # -------------------------------------------------------------------------- clock
    def now(self) -> float:
        with self._clock_lock:
            if self._running:
                return self._now + (time.time() - self._anchor)
            return self._now

    def set_time(self, ts: float) -> None:
        ts = float(ts)
        if not 0 <= ts < _CLOCK_END:  # NaN too: a clock past it failed every later request
            raise ValueError(f"now must be a Unix time from 0 to {_CLOCK_END - 1}, not {ts}")
        with self._clock_lock:
            self._now = ts
            self._anchor = time.time()

    def advance(self, seconds: float) -> None:
        self.set_time(self.now() + float(seconds))

    # -------------------------------------------------------------------------- server
    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if self._server is not None:
            return self.base_url  # type: ignore[return-value]
        handler = type("Handler", (_Handler,), {"sim": self})
        self._server = _Server((host, port), handler)
        h, p = self._server.server_address[:2]
        self.base_url = f"http://{h}:{p}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="openai-admin-sim", daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "Simulator":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------------------- faults and stats
    def add_fault(self, rule: FaultRule) -> None:
        self.faults.add(rule)

    def clear_faults(self) -> None:
        self.faults.clear()

    def _count(self, path: str, status) -> None:
        with self._stats_lock:
            self._requests += 1
            self._by_path[path] += 1
            self._by_status[str(status)] += 1

    def _count_fault(self, kind: str) -> None:
        with self._stats_lock:
            self._faults[kind] += 1

    def _served(self, arrived: float, done: float) -> None:
        """An API request's arrival and answer times: the span the API was busy for a client."""
        with self._stats_lock:
            self._first_arrival = arrived if self._first_arrival is None else min(self._first_arrival, arrived)
            self._last_answer = done if self._last_answer is None else max(self._last_answer, done)

    def _next_request_id(self) -> int:
        with self._stats_lock:
            self._req_id += 1
            return self._req_id

    def stats(self) -> dict:
        with self._stats_lock:
            return {"requests": self._requests, "by_path": dict(self._by_path), "by_status": dict(self._by_status),
                    "faults": dict(self._faults), "faults_injected": sum(self._faults.values()),
                    "first_request_at": self._first_arrival, "last_answer_at": self._last_answer}

    def reset_stats(self) -> None:
        with self._stats_lock:
            self._requests = 0
            self._by_path.clear()
            self._by_status.clear()
            self._faults.clear()
            self._first_arrival = self._last_answer = None

    # -------------------------------------------------------------------------- auth
    def _auth(self, header: str | None, path: str) -> None:
        if not header or not header.startswith("Bearer ") or not header[7:].strip():
            raise ApiError(401, "You didn't provide an API key. You need to provide your API key in an "
                           "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the "
                           "password field (with blank username) if you're accessing the API from your browser and "
                           "are prompted for a username and password. You can obtain an API key from "
                           "https://platform.openai.com/account/api-keys.", None, None)
        key = header[7:].strip()
        if key == self.admin_key:
            return
        if self.restricted_key is not None and key == self.restricted_key:
            scope = _scope_for(path)
            raise ApiError(403, "You have insufficient permissions for this operation. Missing scopes: "
                           f"{scope}. Check that you have the correct role in your organization (Reader, Writer, "
                           "Owner) and project (Member, Owner), and if you're using a restricted API key, that it "
                           "has the necessary scopes.", None, "insufficient_permissions")
        raise ApiError(401, f"Incorrect API key provided: {redact_key(key)}. You can find your API key at "
                       "https://platform.openai.com/account/api-keys.", None, "invalid_api_key")

    # -------------------------------------------------------------------------- truth
    def truth(self, stream: str, start: int, end: int, bucket_width: str = "1m",
              group_by: tuple[str, ...] = ()) -> dict[tuple, dict]:
        """Final totals per group over the buckets of `bucket_width` starting in [align(start), end)."""
        group_by = tuple(group_by)
        if bucket_width not in WIDTHS:
            raise ValueError(f"bucket_width must be one of {', '.join(WIDTHS)}")
        width = WIDTHS[bucket_width]
        first = align(int(start), width)
        n = max(0, -(-(int(end) - first) // width))
        out: dict[tuple, dict] = {}
        if stream == "costs":
            if width != DAY:
                raise ValueError("costs only has 1d buckets")
            for g in group_by:
                if g not in COSTS_GROUP_BY:
                    raise ValueError(f"costs cannot be grouped by {g!r}")
            for i in range(n):
                for key, (amount, _q, _u) in self.usage.cost_groups(first + i * width, 0, group_by, {},
                                                                     final=True).items():
                    cur = out.setdefault(key, {"amount": 0})
                    cur["amount"] += amount
            return {k: {"amount": round(v["amount"] / 1e6, 6)} for k, v in out.items()}
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}")
        sd = STREAMS[stream]
        for g in group_by:
            if g not in sd.dims:
                raise ValueError(f"{stream} cannot be grouped by {g!r}")
        acc: dict[tuple, list] = {}
        spans = [(first + i * width, width) for i in range(n)] if sd.level else [(first, n * width)]
        for s0, w in spans:
            if w <= 0:
                continue
            for key, comps in self.usage.bucket_groups(stream, s0, w, 0, group_by, {}, final=True).items():
                cur = acc.get(key)
                if cur is None:
                    acc[key] = list(comps)
                else:
                    for i, v in enumerate(comps):
                        cur[i] += v
        for key, comps in acc.items():
            vals = sd.derive(tuple(comps)) if sd.derive else comps
            out[key] = dict(zip(sd.counters, vals))
        return out

    # -------------------------------------------------------------------------- control interface
    def _control(self, method: str, path: str, query: str, payload) -> tuple[int, object]:
        p = Params(query)
        if path == "/_sim/clock":
            if method == "POST":
                if isinstance(payload, dict) and "now" in payload:
                    self.set_time(float(payload["now"]))
                elif isinstance(payload, dict) and "advance" in payload:
                    self.advance(float(payload["advance"]))
                else:
                    raise ValueError('expected {"now": ts} or {"advance": seconds}')
            return 200, {"now": self.now()}
        if path == "/_sim/faults":
            if method == "POST":
                rules = payload if isinstance(payload, list) else [payload] if isinstance(payload, dict) else None
                if rules is None:
                    raise ValueError("expected a JSON list of fault rules")
                parsed = [FaultRule.from_dict(r) for r in rules]
                self.clear_faults()
                for r in parsed:
                    self.add_fault(r)
            return 200, self.faults.rules()
        if path == "/_sim/truth" and method == "GET":
            stream = p.one("stream")
            start, end = p.int("start", required=True), p.int("end", required=True)
            gb = tuple(p.many("group_by"))
            width = p.one("bucket_width") or ("1d" if stream == "costs" else "1m")
            if not 0 <= start <= end <= _CLOCK_END or end - start > TRUTH_MAX_SPAN:
                # the truth is summed minute by minute (~30 ms a day): 10^23 seconds held the thread for ever
                raise ValueError(f"start and end must lie within 0..{_CLOCK_END}, start first, and span at most "
                                 f"{TRUTH_MAX_SPAN // 86400} days")
            t = self.truth(stream, start, end, width, gb)
            return 200, [{"group": dict(zip(gb, k)), "totals": v} for k, v in sorted(
                t.items(), key=lambda kv: tuple("" if x is None else str(x) for x in kv[0]))]
        if path == "/_sim/stats":
            if method == "POST":  # any body: counts and times start again from nothing
                self.reset_stats()
            return 200, self.stats()
        if path == "/_sim/config":
            if method == "POST":
                if not isinstance(payload, dict):
                    raise ValueError("expected a JSON object")
                for k in ("audit_logs_enabled", "latency", "max_results_per_page"):
                    if k in payload:
                        setattr(self, k, type(getattr(self, k))(payload[k]))
            return 200, {"audit_logs_enabled": self.audit_logs_enabled, "latency": self.latency,
                         "max_results_per_page": self.max_results_per_page, "seed": self.seed,
                         "admin_key_hint": redact_key(self.admin_key)}
        return 404, {"error": f"unknown control endpoint {method} {path}"}


def run_simulator(port: int, seed: int, org: str, latency_ms: int, now: float | None,
                  cache_responses: bool = False, stop: threading.Event | None = None) -> None:
    """Serve until `stop` is set (the CLI sets it on SIGINT/SIGTERM) or Ctrl-C. Prints the base
    URL and the admin key to stderr."""
    stop = stop or threading.Event()
    sim = Simulator(seed=seed, org=org, now=now, latency=latency_ms / 1000.0, cache_responses=cache_responses)
    try:  # from before the server starts: whenever the signal lands, the server is stopped
        url = sim.start(host="127.0.0.1", port=port)
        clock = "following the wall clock" if sim._running else f"frozen at {int(sim.now())} (move it with POST /_sim/clock)"
        print(f"OpenAI Admin API simulator listening on {url} (seed {seed}, org {org}, clock {clock})", file=sys.stderr)
        print(f"OPENAI_ADMIN_KEY={sim.admin_key}", file=sys.stderr)
        print(f"API base: {url}/v1/organization/...", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
