"""Pushes the bundle through the documented Elasticsearch and Kibana APIs.

Every request the installer makes goes through `Target.es()` / `Target.kb()`; contract tests in
`tests/test_installer*.py` pin each one. Writes to Kibana carry `kbn-xsrf`. Credentials live only
in the session's headers and are never printed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import requests

from . import elasticsearch as E
from . import kibana as K

MIN_VERSION = (8, 18, 0)
MAX_MAJOR = 9  # 9.x is the newest major we know the APIs of

# Elasticsearch privilege per asset kind (named in errors and in docs/assets.md).
ES_PRIVILEGE = {
    "component_template": "manage_index_templates",
    "index_template": "manage_index_templates",
    "pipeline": "manage_pipeline",
    "data_stream": "delete_index (index privilege on logs-openai.*)",
    "version": "monitor",
}
KIBANA_PRIVILEGE = {
    "data_view": "Kibana feature privilege 'Data View Management: All'",
    "dashboard": "Kibana feature privileges 'Dashboard: All' and 'Saved Objects Management: All'",
    "rule": "Kibana feature privilege 'Stack Rules: All' (Management > Stack Rules)",
    "version": "any Kibana privilege in the space (to read /api/status)",
}


class InstallerError(Exception):
    """A one-line, user-facing error. `code` is the process exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class MissingPrivilege(InstallerError):
    def __init__(self, message: str):
        super().__init__(message, code=3)


# ---------------------------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True)
class Credentials:
    header: str | None  # the Authorization header value; never printed
    source: str  # where it came from, for messages

    def __repr__(self) -> str:  # keep secrets out of tracebacks and debug output
        return f"Credentials(source={self.source!r})"


def _read_secret(path: str, what: str) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InstallerError(f"cannot read {what} file {path}: {exc.strerror}", code=2) from None
    if not value:
        raise InstallerError(f"{what} file {path} is empty", code=2)
    return value


def resolve_credentials(api_key_file: str | None = None, username: str | None = None,
                        password_file: str | None = None, env: dict | None = None) -> Credentials:
    """API key (file, then ELASTIC_API_KEY) wins over basic auth (username option or
    ELASTIC_USERNAME, with the password from a file or ELASTIC_PASSWORD)."""
    import base64

    env = os.environ if env is None else env
    if api_key_file:
        return Credentials("ApiKey " + _read_secret(api_key_file, "API key"), f"--api-key-file {api_key_file}")
    if env.get("ELASTIC_API_KEY"):
        return Credentials("ApiKey " + env["ELASTIC_API_KEY"].strip(), "ELASTIC_API_KEY")
    user = username or env.get("ELASTIC_USERNAME")
    if user:
        if password_file:
            password, src = _read_secret(password_file, "password"), f"--password-file {password_file}"
        elif env.get("ELASTIC_PASSWORD"):
            password, src = env["ELASTIC_PASSWORD"], "ELASTIC_PASSWORD"
        else:
            raise InstallerError(f"no password for user {user}: set ELASTIC_PASSWORD or pass --password-file",
                                 code=2)
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return Credentials("Basic " + token, f"user {user} ({src})")
    return Credentials(None, "no credentials")


# ---------------------------------------------------------------------------------------------
# HTTP


@dataclass
class Target:
    es_url: str | None
    kibana_url: str | None
    credentials: Credentials = field(default_factory=lambda: Credentials(None, "no credentials"))
    space: str | None = None
    verify: bool | str = True
    timeout: float = 30.0
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.session.headers["User-Agent"] = "openai-assets"
        if self.credentials.header:
            self.session.headers["Authorization"] = self.credentials.header

    def _request(self, service: str, base: str | None, method: str, path: str, **kw) -> requests.Response:
        if not base:
            raise InstallerError(f"no {service} URL given (--{'es' if service == 'Elasticsearch' else 'kibana'}-url)",
                                 code=2)
        url = base.rstrip("/") + path
        try:
            resp = self.session.request(method, url, timeout=self.timeout, verify=self.verify, **kw)
        except requests.exceptions.SSLError:
            raise InstallerError(f"TLS verification failed for {service} at {base}: pass --ca-cert PATH "
                                 "(or --insecure for a test cluster)", code=2) from None
        except requests.exceptions.Timeout:
            raise InstallerError(f"{service} at {base} did not answer within {self.timeout:g}s", code=2) from None
        except requests.exceptions.ConnectionError:
            raise InstallerError(f"cannot reach {service} at {base} (connection failed)", code=2) from None
        if resp.status_code == 401:
            raise InstallerError(f"{service} at {base} rejected the credentials (401, {self.credentials.source}): "
                                 "check ELASTIC_API_KEY or ELASTIC_USERNAME/ELASTIC_PASSWORD", code=3)
        return resp

    def es(self, method: str, path: str, **kw) -> requests.Response:
        return self._request("Elasticsearch", self.es_url, method, path, **kw)

    def kb(self, method: str, path: str, **kw) -> requests.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if method != "GET":
            headers["kbn-xsrf"] = "true"
        prefix = f"/s/{self.space}" if self.space and self.space != "default" else ""
        return self._request("Kibana", self.kibana_url, method, prefix + path, headers=headers, **kw)


def _reason(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return (resp.text or "").strip()[:200] or f"HTTP {resp.status_code}"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("reason") or err.get("type") or err)[:300]
        if body.get("message"):
            return str(body["message"])[:300]
        if err:
            return str(err)[:300]
    return json.dumps(body)[:300]


def _check(resp: requests.Response, what: str, privilege: str, ok=(200, 201)) -> requests.Response:
    if resp.status_code in ok:
        return resp
    if resp.status_code == 403:
        raise MissingPrivilege(f"missing privilege: {privilege} is needed to {what} ({_reason(resp)})")
    raise InstallerError(f"failed to {what}: HTTP {resp.status_code}: {_reason(resp)}")


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class Step:
    label: str
    status: str  # created|updated|unchanged|deleted|absent|kept|would create|would update|would delete
    detail: str = ""


@dataclass
class Report:
    steps: list[Step] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    error: InstallerError | None = None

    def add(self, label: str, status: str, detail: str = "", echo: Callable[[str], None] | None = None) -> None:
        step = Step(label, status, detail)
        self.steps.append(step)
        if echo:
            echo(f"{status:<13} {label}" + (f"  ({detail})" if detail else ""))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.status] = out.get(s.status, 0) + 1
        return out

    def summary(self, verb: str) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in self.counts().items()) or "nothing done"
        if self.error is None:
            return f"{verb} complete: {counts}"
        done = ", ".join(s.label for s in self.steps) or "nothing"
        pending = ", ".join(self.pending) or "nothing"
        return (f"{verb} incomplete: {self.error}\n  done: {counts} ({done})\n"
                f"  not done: {pending}")


# ---------------------------------------------------------------------------------------------
# The installer


def check_version(label: str, version: str) -> None:
    v = K.parse_version(version)
    if v < MIN_VERSION or v[0] > MAX_MAJOR:
        raise InstallerError(
            f"{label} {version} is not supported: openai-assets needs 8.18.0 or later within 8.x/9.x", code=4)


@dataclass
class Options:
    retention: E.Retention = field(default_factory=E.Retention)
    namespace: str = "default"
    rules: K.RuleOptions = field(default_factory=K.RuleOptions)
    with_kibana: bool = True


class Installer:
    def __init__(self, target: Target, options: Options | None = None, dry_run: bool = False,
                 echo: Callable[[str], None] | None = None):
        self.t = target
        self.o = options or Options()
        self.dry_run = dry_run
        self.echo = echo or (lambda line: None)
        self.es_version: str | None = None
        self.kibana_version: str | None = None

    # -- preflight ---------------------------------------------------------------------------
    def preflight(self) -> None:
        resp = _check(self.t.es("GET", "/"), "read the Elasticsearch version", ES_PRIVILEGE["version"])
        self.es_version = resp.json()["version"]["number"]
        check_version("Elasticsearch", self.es_version)
        if self.o.with_kibana:
            resp = _check(self.t.kb("GET", "/api/status"), "read the Kibana version", KIBANA_PRIVILEGE["version"])
            self.kibana_version = resp.json()["version"]["number"]
            check_version("Kibana", self.kibana_version)
        self.echo(f"Elasticsearch {self.es_version}" + (f", Kibana {self.kibana_version}" if self.kibana_version else ""))

    def check_es_privileges(self, cluster: Iterable[str], index_privs: Iterable[str] = ()) -> None:
        body: dict = {"cluster": sorted(set(cluster))}
        index_privs = list(index_privs)
        if index_privs:
            body["index"] = [{"names": ["logs-openai.*", "logs-openai-*"], "privileges": index_privs}]
        resp = self.t.es("POST", "/_security/user/_has_privileges", json=body)
        if resp.status_code != 200:
            return  # security disabled or API unavailable: the writes themselves will tell
        data = resp.json()
        if data.get("has_all_requested", True):
            return
        missing = [p for p, ok in (data.get("cluster") or {}).items() if not ok]
        for idx in (data.get("index") or {}).values():
            missing += [f"{p} (index privilege on logs-openai.*)" for p, ok in idx.items() if not ok]
        raise MissingPrivilege("missing Elasticsearch privilege: " + ", ".join(sorted(set(missing))))

    # -- install -----------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
        steps: list[tuple[str, Callable[[], tuple[str, str]]]] = []
        for asset in E.es_assets(self.o.retention, self.o.namespace):
            steps.append((asset.label, lambda a=asset: self._put_es(a)))
        if self.o.with_kibana:
            steps.append((f"data_view {K.DATA_VIEW_ID}", self._data_view))
            for d in K.dashboards():
                steps.append((f"dashboard {d.id}", lambda d=d: self._dashboard(d)))
            for r in K.rules(self.o.rules):
                steps.append((f"rule {r.id} {r.name}", lambda r=r: self._rule(r)))
        return steps

    def install(self) -> Report:
        report = Report()
        try:
            self.preflight()
            self.check_es_privileges(["manage_index_templates", "manage_pipeline"])
        except InstallerError as exc:
            report.error = exc
            report.pending = [label for label, _ in self.plan()]
            return report
        steps = self.plan()
        return self._run_steps(steps, report)

    def _would(self, status: str) -> str:
        return f"would {status[:-1] if status.endswith('d') else status}" if self.dry_run else status

    def _put_es(self, asset: E.EsAsset) -> tuple[str, str]:
        priv = ES_PRIVILEGE[asset.kind]
        resp = self.t.es("GET", asset.path)
        if resp.status_code == 404:
            status = "created"
        else:
            _check(resp, f"read {asset.label}", priv)
            current = _existing_es_body(asset.kind, asset.name, resp.json())
            have = ((current or {}).get("_meta") or {}).get("fingerprint")
            if have == asset.body["_meta"]["fingerprint"]:
                return "unchanged", ""
            status = "updated"
        if self.dry_run:
            return self._would(status), ""
        _check(self.t.es("PUT", asset.path, json=asset.body), f"write {asset.label}", priv)
        return status, ""

    def _data_view(self) -> tuple[str, str]:
        priv = KIBANA_PRIVILEGE["data_view"]
        body = K.data_view()
        resp = self.t.kb("GET", f"/api/data_views/data_view/{K.DATA_VIEW_ID}")
        if resp.status_code == 404:
            status = "created"
        else:
            _check(resp, "read the data view", priv)
            have = resp.json().get("data_view", {})
            want = body["data_view"]
            if all(have.get(k) == want[k] for k in ("title", "name", "timeFieldName")):
                return "unchanged", ""
            status = "updated"
        if self.dry_run:
            return self._would(status), ""
        _check(self.t.kb("POST", "/api/data_views/data_view", json=body), "write the data view", priv)
        return status, ""

    def _dashboard(self, dashboard: K.Dashboard) -> tuple[str, str]:
        priv = KIBANA_PRIVILEGE["dashboard"]
        so = dashboard.saved_object()
        existing = self._export_saved_object("dashboard", dashboard.id)
        if existing is None:
            status = "created"
        elif K.fingerprint_of(existing) == K.fingerprint_of(so):
            return "unchanged", ""
        else:
            status = "updated"
        if self.dry_run:
            return self._would(status), ""
        ndjson = K.to_ndjson([so])
        resp = self.t.kb("POST", "/api/saved_objects/_import", params={"overwrite": "true"},
                         files={"file": ("openai-elastic.ndjson", ndjson, "application/ndjson")})
        _check(resp, f"import dashboard {dashboard.id}", priv)
        result = resp.json()
        if not result.get("success", False):
            errors = "; ".join(f"{e.get('type')}/{e.get('id')}: {(e.get('error') or {}).get('type')}"
                               for e in result.get("errors", []))
            raise InstallerError(f"failed to import dashboard {dashboard.id}: {errors or 'unknown error'}")
        return status, ""

    def _export_saved_object(self, so_type: str, so_id: str) -> dict | None:
        resp = self.t.kb("POST", "/api/saved_objects/_export",
                         json={"objects": [{"type": so_type, "id": so_id}], "includeReferencesDeep": False,
                               "excludeExportDetails": False})
        if resp.status_code in (400, 404):
            return None  # Kibana reports an unknown id in a by-id export as a bad request
        _check(resp, f"read {so_type} {so_id}", KIBANA_PRIVILEGE["dashboard"])
        for line in resp.text.splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            if obj.get("id") == so_id and obj.get("type") == so_type:
                return obj
        return None

    def _rule(self, rule: K.Rule) -> tuple[str, str]:
        priv = KIBANA_PRIVILEGE["rule"]
        path = f"/api/alerting/rule/{rule.id}"
        resp = self.t.kb("GET", path)
        detail = ""
        if rule.per_row and self.kibana_version and not K.supports_per_row_alerts(self.kibana_version):
            detail = "one alert for all rows: per-row alerts need Kibana 8.19 or 9.1+"
        if resp.status_code == 404:
            if self.dry_run:
                return "would create", detail
            _check(self.t.kb("POST", path, json=rule.create_body(self.kibana_version, self.o.rules.enabled)),
                   f"create rule {rule.name}", priv)
            return "created", detail
        _check(resp, f"read rule {rule.name}", priv)
        current = resp.json()
        want = rule.update_body(self.kibana_version, actions=_actions_for_update(current.get("actions", [])))
        if _rule_matches(current, want):
            return "unchanged", detail
        if self.dry_run:
            return "would update", detail
        _check(self.t.kb("PUT", path, json=want), f"update rule {rule.name}", priv)
        return "updated", (detail + "; " if detail else "") + "actions kept"

    # -- uninstall ---------------------------------------------------------------------------
    def uninstall(self, delete_data: bool = False) -> Report:
        report = Report()
        try:
            self.preflight()
            self.check_es_privileges(["manage_index_templates", "manage_pipeline"],
                                     ["delete_index"] if delete_data else [])
        except InstallerError as exc:
            report.error = exc
            return report
        steps: list[tuple[str, Callable[[], tuple[str, str]]]] = []
        if self.o.with_kibana:
            for r in K.rules(self.o.rules):
                steps.append((f"rule {r.id} {r.name}", lambda r=r: self._delete_kb(
                    f"/api/alerting/rule/{r.id}", KIBANA_PRIVILEGE["rule"], f"delete rule {r.name}")))
            for d in K.dashboards():
                steps.append((f"dashboard {d.id}", lambda d=d: self._delete_kb(
                    f"/api/saved_objects/dashboard/{d.id}", KIBANA_PRIVILEGE["dashboard"], f"delete dashboard {d.id}")))
            steps.append((f"data_view {K.DATA_VIEW_ID}", lambda: self._delete_kb(
                f"/api/data_views/data_view/{K.DATA_VIEW_ID}", KIBANA_PRIVILEGE["data_view"], "delete the data view")))
        assets = E.es_assets(self.o.retention, self.o.namespace)
        kept_pipelines: set[str] = set()
        kept_components: set[str] = set()
        if delete_data:
            for pattern in [E.ROUTER_PATTERN] + [f"logs-openai.{ds}-*" for ds in E.F.datasets()]:
                steps.append((f"data_stream {pattern}", lambda p=pattern: self._delete_es(
                    f"/_data_stream/{p}", ES_PRIVILEGE["data_stream"], f"delete data streams {p}", wildcard=True)))
        for a in [a for a in assets if a.kind == "index_template"]:
            steps.append((a.label, lambda a=a: self._delete_index_template(a, kept_pipelines, kept_components)))
        for a in [a for a in assets if a.kind != "index_template"]:
            def run(a=a):
                if a.name in kept_pipelines or a.name in kept_components:
                    return "kept", "its index template is in use by data streams"
                return self._delete_es(a.path, ES_PRIVILEGE[a.kind], f"delete {a.label}")
            steps.append((a.label, run))
        return self._run_steps(steps, report)

    def _run_steps(self, steps: list[tuple[str, Callable[[], tuple[str, str]]]], report: "Report") -> "Report":
        """Run steps in order; the first failure stops, and the report says what was not done."""
        for i, (label, run) in enumerate(steps):
            try:
                status, detail = run()
            except InstallerError as exc:
                report.error = exc
                report.pending = [lbl for lbl, _ in steps[i:]]
                return report
            report.add(label, status, detail, self.echo)
        return report

    def _delete_kb(self, path: str, priv: str, what: str) -> tuple[str, str]:
        if self.dry_run:
            resp = self.t.kb("GET", path) if "/saved_objects/" not in path else None
            if resp is not None and resp.status_code == 404:
                return "absent", ""
            return "would delete", ""
        resp = self.t.kb("DELETE", path)
        if resp.status_code == 404:
            return "absent", ""
        _check(resp, what, priv, ok=(200, 204))
        return "deleted", ""

    def _delete_es(self, path: str, priv: str, what: str, wildcard: bool = False) -> tuple[str, str]:
        if self.dry_run:
            resp = self.t.es("GET", path)
            return ("absent", "") if resp.status_code == 404 else ("would delete", "")
        resp = self.t.es("DELETE", path)
        if resp.status_code == 404:
            return "absent", ""
        _check(resp, what, priv)
        return "deleted", ""

    def _delete_index_template(self, asset: E.EsAsset, kept_pipelines: set, kept_components: set) -> tuple[str, str]:
        if self.dry_run:
            resp = self.t.es("GET", asset.path)
            return ("absent", "") if resp.status_code == 404 else ("would delete", "")
        resp = self.t.es("DELETE", asset.path)
        if resp.status_code == 404:
            return "absent", ""
        if resp.status_code == 400 and "data stream" in _reason(resp):
            # Elasticsearch refuses to remove a template that live data streams use; keep it and
            # what it references so ingestion keeps working.
            kept_pipelines.add(asset.body["template"]["settings"]["index"]["default_pipeline"])
            kept_components.update(asset.body["composed_of"])
            return "kept", "in use by data streams (pass --delete-data to remove data and templates)"
        _check(resp, f"delete {asset.label}", ES_PRIVILEGE[asset.kind])
        return "deleted", ""


def _existing_es_body(kind: str, name: str, payload: dict) -> dict | None:
    if kind == "pipeline":
        return payload.get(name)
    key = {"component_template": "component_templates", "index_template": "index_templates"}[kind]
    inner = {"component_template": "component_template", "index_template": "index_template"}[kind]
    for item in payload.get(key, []):
        if item.get("name") == name:
            return item.get(inner)
    return None


_ACTION_KEYS = ("group", "id", "params", "frequency", "uuid", "alerts_filter", "use_alert_data_for_template")


def _actions_for_update(actions: list[dict]) -> list[dict]:
    """The rule's current actions in the shape PUT accepts: the user's actions survive upgrades."""
    return [{k: a[k] for k in _ACTION_KEYS if k in a} for a in actions]


def _rule_matches(current: dict, want: dict) -> bool:
    if current.get("name") != want["name"] or sorted(current.get("tags", [])) != sorted(want["tags"]):
        return False
    if (current.get("schedule") or {}).get("interval") != want["schedule"]["interval"]:
        return False
    if (current.get("alert_delay") or {}).get("active") != want["alert_delay"]["active"]:
        return False
    params = current.get("params") or {}
    return all(params.get(k) == v for k, v in want["params"].items())


# ---------------------------------------------------------------------------------------------
# Export


def export(directory: str | Path, options: Options | None = None, kibana_version: str | None = None) -> list[Path]:
    """Write the whole bundle as files; returns the paths written. `manifest.json` lists, in
    install order, the request that applies each file."""
    options = options or Options()
    root = Path(directory)
    written: list[Path] = []
    manifest: list[dict] = []

    def write(rel: str, content: str) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
        return path

    folder = {"component_template": "component_templates", "index_template": "index_templates",
              "pipeline": "ingest_pipelines"}
    for asset in E.es_assets(options.retention, options.namespace):
        rel = f"elasticsearch/{folder[asset.kind]}/{asset.name}.json"
        write(rel, json.dumps(asset.body, indent=2, sort_keys=True) + "\n")
        manifest.append({"service": "elasticsearch", "method": "PUT", "path": asset.path, "file": rel})
    rel = "kibana/openai-elastic.ndjson"
    write(rel, K.to_ndjson(K.saved_objects()))
    manifest.append({"service": "kibana", "method": "POST", "path": "/api/saved_objects/_import?overwrite=true",
                     "file": rel, "multipart_field": "file", "headers": {"kbn-xsrf": "true"}})
    for rule in K.rules(options.rules):
        rel = f"kibana/rules/{rule.id}.json"
        body = rule.create_body(kibana_version, options.rules.enabled)
        write(rel, json.dumps(body, indent=2, sort_keys=True) + "\n")
        manifest.append({"service": "kibana", "method": "POST", "path": f"/api/alerting/rule/{rule.id}",
                         "file": rel, "headers": {"kbn-xsrf": "true"}})
    write("manifest.json", json.dumps(manifest, indent=2) + "\n")
    return written
