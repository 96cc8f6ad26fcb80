"""`AdminApiClient`: one `requests.Session` to OpenAI's Admin API, with retries and typed errors.

Retries are a small loop here rather than urllib3's `Retry` on the adapter, because the loop can:
- sleep through an injectable `sleep` (tests run the whole backoff schedule in microseconds), or
  wait on the collector's `stop` event, so a stop never waits out a Retry-After of minutes;
- count what happened (`ClientStats`: 429s, retries, seconds spent honouring Retry-After);
- honour `Retry-After` as seconds *and* as an HTTP-date, plus OpenAI's `retry-after-ms`, with full
  jitter and a cap when the server gives no hint;
- raise typed errors carrying OpenAI's error body, where urllib3's `MaxRetryError` drops it;
- keep TLS/config errors (not transient) out of the retry path.

The admin key never appears in an exception, a log line or a repr: the Authorization header is
logged as `Bearer ***` and every message built from a response is passed through `logs.redact`.

What the configuration says wins over the environment. requests reads the environment for each
request (`trust_env`): a proxy from HTTPS_PROXY, a CA bundle from REQUESTS_CA_BUNDLE, and basic
auth from a ~/.netrc entry for the host, and it lets each of them override what was set on the
session. So the admin key goes as an auth object (`AuthorizationHeader`), which keeps requests
from looking in netrc, and `proxy_url`, `ssl_verify: false` and `ssl_ca_file` go with each
request. The environment's proxy and CA bundle still apply where the configuration sets none.
"""
from __future__ import annotations

import datetime
import email.utils
import logging
import random
import re
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlencode

import orjson
import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from . import __version__, logs
from .config import Secret

log = logs.get_logger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A 2xx body is read in chunks this large, not requests' 10 KiB: each chunk needs the GIL back,
# and while the engine maps another page a 3 MB usage page read in 300 chunks took up to 1 s
# instead of 0.16 s (docs/performance.md).
BODY_CHUNK = 1 << 20
USER_AGENT = f"openai-elastic/{__version__} python-requests/{requests.__version__}"
_SCOPE = r"[a-z0-9_]+(?:\.[a-z0-9_]+)+"
_SCOPE_RE = re.compile(rf"(?i)missing scopes?:?\s*({_SCOPE}(?:\s*,\s*{_SCOPE})*)")
_SCOPE_TOKEN_RE = re.compile(r"\bapi\.[a-z_]+(?:\.[a-z_]+)+\b")
# a token like a scope that is a host name (api.openai.com in a proxy's page or a link), not a scope
_HOST_END_RE = re.compile(r"\.(?:com|org|net|io|ai|dev|co)$")


class ApiError(Exception):
    """A request to the Admin API failed. `str()` is one line and never contains the key."""

    server_date: int | None = None  # the `Date` of the answer that refused (None: no answer, or none given)

    def __init__(self, status: int | None, message: str, code: str | None = None, path: str = "",
                 *, error_type: str | None = None) -> None:
        self.status = status
        self.message = logs.redact(" ".join(str(message).split()))
        self.code = code
        self.path = path
        self.error_type = error_type
        super().__init__(str(self))

    def summary(self) -> str:
        status = f"{self.status}" if self.status is not None else "no response"
        code = f" {self.code}" if self.code else ""
        return f"{status}{code}"

    def __str__(self) -> str:
        return logs.redact(f"{self.path}: {self.summary()}: {self.message}" if self.path else
                           f"{self.summary()}: {self.message}")


class AuthenticationError(ApiError):
    """401: the admin key is wrong, revoked, or not an admin key."""

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        return logs.redact(f"the admin key was rejected ({self.status}{code}): {self.message}")


class PermissionDeniedError(ApiError):
    """403: the key lacks a scope or the organization lacks a feature (e.g. audit logging)."""

    @property
    def missing_scope(self) -> str | None:
        m = _SCOPE_RE.search(self.message)
        if m:
            return m.group(1).replace(" ", "")
        for m in _SCOPE_TOKEN_RE.finditer(self.message):
            if not _HOST_END_RE.search(m.group(0)) and self.message[m.end():m.end() + 1] != "/":
                return m.group(0)
        return None

    @property
    def refusal(self) -> str:
        """What was refused, in a user's words: the missing scope when OpenAI names it."""
        scope = self.missing_scope
        return f"the key lacks the {scope} scope" if scope else "permission denied"

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        return logs.redact(f"{self.refusal} ({self.status}{code} on {self.path}): {self.message}")


class NotFoundError(ApiError):
    """404."""


class BadRequestError(ApiError):
    """Any other 4xx: the request itself is wrong (a bug or an unsupported parameter)."""


class RetriesExhaustedError(ApiError):
    """429/5xx/connection errors/timeouts that were still failing after `max_retries` retries."""


class MalformedResponseError(ApiError):
    """A 2xx whose body is not a JSON object."""


class TransportError(ApiError):
    """A non-transient transport failure (TLS verification, invalid URL or proxy): not retried."""


class StoppedError(ApiError):
    """The collector was told to stop while this request waited to be retried."""


@dataclass
class ClientStats:
    requests: int = 0  # HTTP attempts made (including retries)
    retries: int = 0
    throttled: int = 0  # 429 responses
    retry_after_seconds_total: float = 0.0  # seconds slept because the server said Retry-After
    errors: int = 0  # get_json calls that raised

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_retry_after(headers: Mapping[str, str], now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` (seconds or HTTP-date); None if absent."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    when = _http_date(value)
    return None if when is None else max(0.0, when - now())


def _http_date(value: str | None) -> float | None:
    """An HTTP-date as Unix seconds, or None. HTTP dates are GMT (RFC 9110): one written with
    `-0000` comes back from the parser without a zone, and is read as GMT, not the host's zone."""
    try:
        when = email.utils.parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def server_date(headers: Mapping[str, str]) -> int | None:
    """The `Date` header as Unix seconds, or None when absent or unreadable."""
    when = _http_date(headers.get("Date"))
    return None if when is None else int(when)


def _join(base_url: str, path: str) -> str:
    base = base_url.rstrip("/")
    if not path.startswith("/"):
        path = "/" + path
    if base.endswith("/v1") and (path == "/v1" or path.startswith("/v1/")):
        path = path[3:]
    return base + path


def _encode_params(params: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Query pairs: None dropped, bools as true/false, lists repeated (group_by=a&group_by=b)."""
    pairs: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None:
                continue
            if isinstance(v, bool):
                v = "true" if v else "false"
            pairs.append((key, str(v)))
    return pairs


class AuthorizationHeader(AuthBase):
    """A request's Authorization header, as requests' auth object.

    requests looks a request's host up in ~/.netrc (or $NETRC) only when it has no auth object,
    and a match (a `default` entry matches every host) replaces the Authorization header with
    that entry's basic auth: the admin key would not be sent, and the netrc password would be.
    With `value` None nothing is set, and netrc is still not read."""

    __slots__ = ("_value",)

    def __init__(self, value: Secret | None) -> None:
        self._value = value

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self._value:
            request.headers["Authorization"] = self._value.reveal()
        return request

    def __repr__(self) -> str:
        return "AuthorizationHeader(***)"


class AdminApiClient:
    def __init__(
        self,
        base_url: str,
        api_key: Secret | str,
        *,
        proxy_url: str | None = None,
        verify: bool = True,
        ca_file: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 8,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        retry_after_cap: float = 600.0,
        sleep: Callable[[float], None] = time.sleep,
        stop: threading.Event | None = None,
        session: requests.Session | None = None,
        user_agent: str = USER_AGENT,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url
        self._key = api_key if isinstance(api_key, Secret) else Secret(api_key)
        logs.register_secret(self._key)
        self._auth = AuthorizationHeader(Secret(f"Bearer {self._key.reveal()}"))
        self.timeout = timeout
        self.max_retries = max(0, int(max_retries))
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self._sleep = sleep
        # Waits before a retry end when this is set: a Retry-After of minutes must not hold a
        # stop (SIGTERM, the agent's stop) up for as long.
        self._stop = stop
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self.stats = ClientStats()
        # The API's clock, from the `Date` header of the last 2xx response (whole Unix seconds;
        # None without one): the audit collector never marks as read a time the API has not reached.
        self.server_date: int | None = None

        self.session = session or requests.Session()
        self._owns_session = session is None
        if self._owns_session:
            # No adapter-level retries: the loop in get_json owns them.
            adapter = HTTPAdapter(max_retries=0, pool_connections=4, pool_maxsize=16)
            self.session.mount("https://", adapter)
            self.session.mount("http://", adapter)
        self.session.headers.update({
            "User-Agent": user_agent,
            "Accept": "application/json",
        })
        if proxy_url:
            self.session.proxies.update({"http": proxy_url, "https": proxy_url})
        # requests takes a proxy from the environment (HTTPS_PROXY, ...) where proxy_url sets none:
        # its user:password@ is as secret as proxy_url's, and urllib3 quotes a malformed one whole
        for env_proxy in urllib.request.getproxies().values():
            logs.register_url_password(env_proxy)
        # (verify=False is warned about once per collection, by `app.build`, and by `check`, not
        # once per client; the commands' `setup_logging` silences urllib3's per-request warning)
        self.session.verify = ca_file if (verify and ca_file) else bool(verify)

    @classmethod
    def from_config(cls, config, **kwargs: Any) -> "AdminApiClient":
        options = dict(
            proxy_url=config.proxy_url,
            verify=config.ssl_verify,
            ca_file=config.ssl_ca_file,
            timeout=config.http_timeout,
            max_retries=config.max_retries,
        )
        options.update(kwargs)
        return cls(config.url, config.api_key, **options)

    def __repr__(self) -> str:
        return f"AdminApiClient(base_url={self.base_url!r}, api_key=***)"

    # ----------------------------------------------------------------------------------------------

    def url_for(self, path: str) -> str:
        return _join(self.base_url, path)

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> dict:
        """GET `path` (e.g. "/v1/organization/usage/completions") and return the JSON object."""
        return self.parse(self.get_raw(path, params), path)

    def get_raw(self, path: str, params: Mapping[str, Any] | None = None) -> bytes:
        """GET `path` with every retry rule of `get_json`, and return the 2xx body unparsed.

        For callers that bound how many big pages are parsed at once (the usage engine): the
        wait for the network stays concurrent, the memory-heavy parse does not.
        """
        try:
            return self._get_raw(path, params)
        except ApiError:
            self._count(errors=1)
            raise

    def parse(self, content: bytes, path: str = "") -> dict:
        """The JSON object in a 2xx body (orjson straight from bytes: no str copy of the page),
        or MalformedResponseError."""
        try:
            body = orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            self._count(errors=1)
            # redacted before it is cut: a secret the cut fell inside would keep its first characters
            text = logs.redact(content[:4096].decode("utf-8", "replace"))[:120] if content else "(empty body)"
            # orjson's reason says what is wrong past the start shown: NaN, bytes that are not
            # UTF-8, nesting deeper than 1024, a body cut short
            msg = str(exc.msg)
            if not content:
                why = "empty"
            elif "UTF-8" in msg:  # orjson says "str is not valid UTF-8: surrogates ..." at position 0
                why = "not valid UTF-8"
            else:
                why = f"{msg[:100]} at character {exc.pos}"
            raise MalformedResponseError(200, f"response is not JSON ({why}): {text!r}", "malformed_response",
                                         path) from None
        if not isinstance(body, dict):
            self._count(errors=1)
            raise MalformedResponseError(200, f"expected a JSON object, got {type(body).__name__}",
                                         "malformed_response", path)
        return body

    def _get_raw(self, path: str, params: Mapping[str, Any] | None) -> bytes:
        url = self.url_for(path)
        query = _encode_params(params)
        # per request, so that the environment does not override them (module docstring)
        settings = {"auth": self._auth, "verify": self.session.verify, "proxies": dict(self.session.proxies)}
        attempt = 0
        while True:
            self._count(requests=1)
            started = time.monotonic()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("GET %s?%s headers=%s", url, urlencode(query),
                          {**self.session.headers, "Authorization": "Bearer ***"})
            try:
                response = self.session.get(url, params=query, timeout=self.timeout, stream=True, **settings)
                body = None
                if 200 <= response.status_code < 300:
                    body = b"".join(response.iter_content(BODY_CHUNK))
                else:  # the error body is read here too (requests keeps it): a connection cut in it is retried
                    _ = response.content
            except requests.exceptions.SSLError as exc:
                raise TransportError(None, f"TLS error talking to {self.base_url}: {_reason(exc)}",
                                     "tls_error", path) from None
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
                    requests.exceptions.MissingSchema, requests.exceptions.InvalidProxyURL) as exc:
                raise TransportError(None, f"invalid URL or proxy: {_reason(exc)}", "invalid_url", path) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as exc:
                # a body that could not be read whole, or not inflated (a corrupt gzip from a proxy),
                # is a failed read like a cut connection: asked again, then a clear error
                kind = ("timeout" if isinstance(exc, requests.exceptions.Timeout) else
                        "decoding_error" if isinstance(exc, requests.exceptions.ContentDecodingError) else
                        "connection_error")
                message = f"{kind.replace('_', ' ')}: {_reason(exc)}"
                if attempt >= self.max_retries:
                    raise RetriesExhaustedError(
                        None, f"still failing after {attempt} retries: {message}", kind, path) from None
                attempt += 1
                delay = self._backoff(attempt)
                log.warning("GET %s failed (%s); retry %d/%d in %.1fs", path, message, attempt,
                            self.max_retries, delay)
                self._count(retries=1)
                self._pause(delay, path)
                continue

            elapsed_ms = (time.monotonic() - started) * 1000
            status = response.status_code
            log.debug("GET %s -> %d in %.0f ms", path, status, elapsed_ms)
            if body is not None:
                self.server_date = server_date(response.headers)
                return body

            message, code, etype = _error_details(response)
            if status in RETRY_STATUSES:
                retry_after = parse_retry_after(response.headers)
                if status == 429:
                    self._count(throttled=1)
                if attempt >= self.max_retries:
                    what = "throttled" if status == 429 else "failing"
                    raise RetriesExhaustedError(
                        status, f"still {what} after {attempt} retries: {message}", code, path,
                        error_type=etype)
                attempt += 1
                if retry_after is not None:
                    delay = min(retry_after, self.retry_after_cap)
                    self._count(retry_after_seconds_total=delay)
                else:
                    delay = self._backoff(attempt)
                log.warning("GET %s -> %d%s; retry %d/%d in %.1fs", path, status,
                            f" (Retry-After {retry_after:g}s)" if retry_after is not None else "",
                            attempt, self.max_retries, delay)
                self._count(retries=1)
                self._pause(delay, path)
                continue
            error = _typed_error(status, message, code, path, etype)
            # OpenAI's time as the refusal gave it (its `Date`): a 403 of a first read tells the
            # clock's lead as an answer does (`AuditCollector._forbid`)
            error.server_date = server_date(response.headers)
            raise error

    def _pause(self, delay: float, path: str) -> None:
        if self._stop is None:
            self._sleep(delay)
        elif self._stop.wait(delay):
            raise StoppedError(None, "stopped while waiting to retry", "stopped", path)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
        ceiling = min(self.backoff_cap, self.backoff_base * (2 ** (attempt - 1)))
        return self._rng.uniform(0, ceiling)

    def add_stats(self, other: ClientStats) -> None:
        """Count another client's requests, retries, 429s and waits as this one's (a stream's
        helper clients, e.g. the rate-limits workers)."""
        self._count(**other.as_dict())

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    def close(self) -> None:
        if self._owns_session:
            self.session.close()

    def __enter__(self) -> "AdminApiClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    """A short reason for a requests/urllib3 exception (their str() nests several reprs)."""
    text = str(exc)
    m = re.search(r"\(Caused by \w+\((?:<[^>]*>, )?'?(.*?)'?\)\)?$", text)
    if m and m.group(1):
        text = m.group(1)
    return logs.redact(" ".join(text.split())).strip("\"'")[:300]


def _error_details(response: requests.Response) -> tuple[str, str | None, str | None]:
    """(message, code, type) from OpenAI's error body, or the status text when there is none."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            message = err.get("message") or response.reason or "error"
            code = err.get("code")
            return str(message), (str(code) if code is not None else None), err.get("type")
        if isinstance(err, str):
            return err, None, None
    # redacted before it is cut: a secret the cut fell inside would keep its first characters
    text = logs.redact((response.text or "")[:4096].strip())
    message = response.reason or "error"
    if text:
        message = f"{message}: {text[:200]}"
    return message, None, None


def _typed_error(status: int, message: str, code: str | None, path: str, etype: str | None) -> ApiError:
    cls: type[ApiError]
    if status == 401:
        cls = AuthenticationError
    elif status == 403:
        cls = PermissionDeniedError
    elif status == 404:
        cls = NotFoundError
    elif 400 <= status < 500:
        cls = BadRequestError
    else:
        cls = ApiError
    return cls(status, message, code, path, error_type=etype)


# --------------------------------------------------------------------------------------------------
# `openai-input check`: one cheap request per enabled kind of endpoint


@dataclass(frozen=True)
class ProbeResult:
    name: str  # "usage", "costs", "audit_logs", "audit_tenant", "projects", "rate_limits", "users", "api_keys"
    path: str
    ok: bool
    message: str  # "OK" or why not, one line, key-free
    error: ApiError | None = None


def _key_hint(config: Any) -> str:
    source = getattr(config, "api_key_source", "env")
    return {"config": "the api_key setting", "file": f"the key in {getattr(config, 'api_key_file', None)}"}.get(
        source, "OPENAI_ADMIN_KEY")


def explain(error: ApiError, probe: str, config: Any = None) -> str:
    """One line telling a user what an error from `probe` means and what to do."""
    if isinstance(error, AuthenticationError):
        return f"401: the admin key was rejected — check {_key_hint(config)} ({error.message})"
    if isinstance(error, PermissionDeniedError):
        scope = error.missing_scope
        if scope:
            return f"403: the key lacks the {scope} scope ({error.message})"
        if probe == "audit_logs":
            return ("403: audit logs are not readable — enable audit logging (Data controls > Data "
                    "retention) and use an Organization Owner's admin key "
                    f"({error.message})")
        return f"403: permission denied ({error.message})"
    if isinstance(error, RetriesExhaustedError):
        return f"unreachable: {error.message}"
    return str(error)


# What a listing only the names (and the state directory's organization check) need cannot give
# when it is refused: `check` warns with it and goes on, since the collector does too.
_NAMES_LOST = {
    "users": "usage documents lack openai.base.user_email (but for users who own a listed API key)",
    "api_keys": "usage and costs documents lack openai.base.api_key_name (and the e-mails of the keys' owners)",
}


def _refusal_warning(exc: PermissionDeniedError, lost: str) -> str:
    """A name listing's 403, as check's warning: the scope (or OpenAI's reason) and what is lost."""
    return f"warning: 403: {exc.refusal}, so {lost} ({exc.message})"


def _projects_lost(names: bool) -> str:
    lost = ("usage and costs documents lack openai.base.project_name and api_key_name, and " if names else "")
    return (lost + "the state directory cannot be tied to its organization (a new one is collected without "
            "the check that refuses another organization's key; one that recorded its organization stores "
            "nothing until the listing works)")


def probe_api(client: AdminApiClient, config: Any, now: float | None = None) -> list[ProbeResult]:
    """The cheapest request for each kind of endpoint the enabled streams use (limit=1), and for the
    listings the collector makes beside them: the projects (the state directory's organization
    check, the names, the rate limits), and, for usage and costs, the users and a project's API
    keys (names only). A refused (403) listing that only names or the organization check need is a
    warning (ok), as the collector goes on without them; the rate limits need the projects."""
    now = time.time() if now is None else now
    day_start = int(now // 86400) * 86400 - 86400
    enabled = {s.name: s for s in config.enabled_streams()}
    # usage and costs documents carry names (agent_input/names.py): their listings are asked too
    names = any(s.bucket_width is not None for s in enabled.values())
    probes: list[tuple[str, str, dict[str, Any]]] = []
    usage = [n for n, s in enabled.items() if s.bucket_width is not None and n != "costs"]
    if usage:
        probes.append(("usage", f"/v1/organization/usage/{usage[0]}",
                       {"start_time": day_start, "bucket_width": "1d", "limit": 1}))
    if "costs" in enabled:
        probes.append(("costs", "/v1/organization/costs",
                       {"start_time": day_start, "bucket_width": "1d", "limit": 1}))
    if "audit" in enabled:
        probes.append(("audit_logs", "/v1/organization/audit_logs", {"limit": 1}))
    if enabled:  # every stream's writes wait for the organization check, which lists the projects
        probes.append(("projects", "/v1/organization/projects", {"limit": 1}))
    if names:
        probes.append(("users", "/v1/organization/users", {"limit": 1}))
    results: list[ProbeResult] = []
    skip: str | None = None
    for name, path, params in probes:
        if skip:  # every other probe would fail the same way: say so instead of waiting for it
            results.append(ProbeResult(name, path, False, skip))
            continue
        try:
            body = client.get_json(path, params)
        except (PermissionDeniedError, BadRequestError, NotFoundError) as exc:
            if isinstance(exc, PermissionDeniedError) and (
                    name in _NAMES_LOST or (name == "projects" and "rate_limits" not in enabled)):
                # the collector goes on without these names (and, for the projects, without the
                # organization check: org_guard.py); the rate limits cannot, so that one fails
                lost = _NAMES_LOST.get(name) or _projects_lost(names)
                results.append(ProbeResult(name, path, True, _refusal_warning(exc, lost), exc))
                continue
            if name != "audit_tenant":
                results.append(ProbeResult(name, path, False, explain(exc, name, config), exc))
                continue
            # what the audit stream does then: warns, and collects the organization's events
            results.append(ProbeResult(name, path, True, f"warning: tenant-scoped events (tenant.*, "
                                       f"role.bound_to_resource, ...) cannot be listed, only the "
                                       f"organization's are collected: {exc}", exc))
        except ApiError as exc:
            results.append(ProbeResult(name, path, False, explain(exc, name, config), exc))
            if isinstance(exc, AuthenticationError):
                skip = "skipped: the admin key was rejected"
            elif exc.status is None:
                skip = "skipped: the API is unreachable"
        else:
            if not isinstance(body.get("data"), list):  # collect fails every poll on it ("no `data` list")
                from .config import display_url

                results.append(ProbeResult(name, path, False, "the answer has no `data` list, as OpenAI's lists "
                                           f"have: is `url` the OpenAI API ({display_url(config.url)})?"))
                continue
            results.append(ProbeResult(name, path, True, "OK"))
            if name == "audit_logs":  # the stream's second scope, listed apart (see audit.py)
                probes.insert(probes.index((name, path, params)) + 1,
                              ("audit_tenant", path, {"limit": 1, "tenant_only": "true"}))
            first = (body.get("data") or [None])[0] if name == "projects" else None
            if isinstance(first, Mapping) and isinstance(first.get("id"), str):
                at = probes.index((name, path, params)) + 1
                if names:  # the API key names are listed per project: the first one's keys stand for all
                    probes.insert(at, ("api_keys", f"/v1/organization/projects/{first['id']}/api_keys",
                                       {"limit": 1}))
                if "rate_limits" in enabled:
                    # a key may list projects and still not read their limits: the rate_limits stream
                    # would then fail every cycle, so its own endpoint is asked too (this loop reaches it)
                    probes.insert(at, ("rate_limits", f"/v1/organization/projects/{first['id']}/rate_limits",
                                       {"limit": 1}))
    return results


__all__ = [
    "AdminApiClient", "ApiError", "AuthenticationError", "BadRequestError", "ClientStats",
    "MalformedResponseError", "NotFoundError", "PermissionDeniedError", "RetriesExhaustedError",
    "TransportError", "ProbeResult", "explain", "parse_retry_after", "probe_api", "RETRY_STATUSES", "USER_AGENT",
]
