"""Pushes the bundle through the documented Elasticsearch and Kibana APIs.

Every request the installer makes goes through `Target.es()` / `Target.kb()`; contract tests in
`tests/test_installer*.py` pin each one. Writes to Kibana carry `kbn-xsrf`. Credentials live only
in the session's headers and are never printed.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import quote, urlsplit

import requests

from agent_input.config import (  # display_url: user:password@ -> ***@
    SECRET_FILE_LIMIT, FileTooLarge, PipeNotWritten, Secret, credential_problem, display_url, read_text_file, url_problem)
from agent_input.logs import redact, register_secret
from agent_input.http_client import AuthorizationHeader

from . import MANAGED_BY
from . import elasticsearch as E
from . import kibana as K

MIN_VERSION = (8, 18, 0)
RULES_READ = "logs-openai.*-*"  # the rules' ES|QL reads logs-openai.<dataset>-*
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
    # _import/_export leave authorization to the saved objects client: the dashboard type's own
    "dashboard": "Kibana feature privilege 'Dashboard: All' (Analytics > Dashboard)",
    "rule": "Kibana feature privilege 'Stack Rules: All' (Management > Stack Rules)",
    # Kibana reads the connectors of a rule written with actions (the ones the user attached,
    # which updates and moves send back): `get` on connectors, which Stack Rules does not grant
    "rule_actions": "Kibana feature privileges 'Stack Rules: All' and 'Actions and Connectors: Read' "
                    "(Management > Actions and Connectors; the rule has connectors attached)",
    "version": "any Kibana privilege in the space (to read /api/status)",
}


class InstallerError(Exception):
    """A one-line, user-facing error. `code` is the process exit status. Its text is redacted:
    it may quote an answer, and a proxy's error page can echo the request's Authorization header."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(redact(message))
        self.code = code


class MissingPrivilege(InstallerError):
    def __init__(self, message: str):
        super().__init__(message, code=3)


# ---------------------------------------------------------------------------------------------
# URLs


def check_url(value: str, option: str, example: str = "https://localhost:9200") -> None:
    """Reject what requests would turn into a traceback (no scheme, no host, a bad port) with one
    line naming the option."""
    problem = url_problem(value)
    if problem:
        raise InstallerError(f"{option} {display_url(value)!r} is not a valid URL: {problem} "
                             f"(for example {example})", code=2)


_SPACE_PATH = re.compile(r"/s/([^/]+)/*$")


def check_kibana_url(value: str) -> None:
    """A Kibana URL that ends in a space's path (`https://kb:5601/s/team-a`, as the browser shows
    it) would put every object in that space under the default space's ids, since the requests'
    own `/s/<id>` is added only for --space: an install there that the next default-space install
    took for an earlier version's, and refused with advice that did not apply."""
    found = _SPACE_PATH.search(urlsplit(value).path)
    if found:
        space = found.group(1)
        raise InstallerError(f"--kibana-url {display_url(value)!r} ends in the path of Kibana space {space!r} "
                             f"(/s/{space}): pass Kibana's URL without it, and --space {space}", code=2)


# ---------------------------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True)
class Credentials:
    header: str | None  # the Authorization header value; never printed
    source: str  # where it came from, for messages

    def __post_init__(self) -> None:
        if self.header:  # the encoded value, redacted from every message from now on
            register_secret(self.header.split(" ", 1)[-1])

    def __repr__(self) -> str:  # keep secrets out of tracebacks and debug output
        return f"Credentials(source={self.source!r})"


def _checked_api_key(key: str, source: str) -> str:
    """An API key is printable ASCII (base64): anything else would be a traceback from http.client
    (UnicodeEncodeError) or requests (InvalidHeader, which prints the header, key included)."""
    bad = credential_problem(key, allow_space=False, ascii_only=True)
    if bad:
        raise InstallerError(f"the API key from {source} contains {bad}; it must be the encoded key exactly "
                             "as Elasticsearch returned it", code=2)
    return key


def _read_secret(path: str, what: str) -> str:
    if not os.path.lexists(path):
        # not shown: a path that names nothing may be the secret itself, pasted in place of its file
        option = "--api-key-file" if what == "API key" else "--password-file"
        raise InstallerError(f"the {what} file given to {option} does not exist (the value is not shown: "
                             f"pass the path of a file holding the {what})", code=2)
    try:
        value = read_text_file(path, SECRET_FILE_LIMIT).strip()
    except OSError as exc:
        raise InstallerError(f"cannot read {what} file {path}: {exc.strerror or exc}", code=2) from None
    except UnicodeDecodeError:  # the value is not shown: it may be the secret itself
        raise InstallerError(f"cannot read {what} file {path}: it is not UTF-8 text", code=2) from None
    except (FileTooLarge, PipeNotWritten) as exc:
        raise InstallerError(f"cannot read {what} file {path}: {exc}", code=2) from None
    if not value:
        raise InstallerError(f"{what} file {path} is empty", code=2)
    return value


CA_FILE_LIMIT = 10 * 1024 * 1024  # bytes: far past any CA bundle (a system's whole bundle is ~250 KiB)


def ca_bundle(path: str) -> str:
    """The path requests verifies with for `--ca-cert PATH`. A regular file is used as it is. A
    named pipe (`<(vault read ...)`) or a device is read as the key and password files are (a pipe's
    writer waited for 10 s at most, at most CA_FILE_LIMIT bytes) into a private temporary file:
    OpenSSL's own open() of a FIFO that nobody writes to blocked for ever, and /dev/zero was read
    without end."""
    import atexit
    import stat
    import tempfile

    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return path
        data = read_text_file(path, CA_FILE_LIMIT)
    except OSError as exc:
        raise InstallerError(f"cannot read CA file {path}: {exc.strerror or exc}", code=2) from None
    except UnicodeDecodeError:
        raise InstallerError(f"cannot read CA file {path}: it is not UTF-8 text (expected a PEM CA bundle)",
                             code=2) from None
    except (FileTooLarge, PipeNotWritten) as exc:
        raise InstallerError(f"cannot read CA file {path}: {exc}", code=2) from None
    fd, copy = tempfile.mkstemp(prefix="openai-assets-ca-", suffix=".pem")
    atexit.register(lambda: os.path.exists(copy) and os.unlink(copy))
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(data)
    return copy


def resolve_credentials(api_key_file: str | None = None, username: str | None = None,
                        password_file: str | None = None, env: dict | None = None) -> Credentials:
    """API key (file, then ELASTIC_API_KEY) wins over basic auth (username option or
    ELASTIC_USERNAME, with the password from a file or ELASTIC_PASSWORD)."""
    import base64

    env = os.environ if env is None else env
    if api_key_file:
        source = f"--api-key-file {api_key_file}"
        return Credentials("ApiKey " + _checked_api_key(_read_secret(api_key_file, "API key"), source), source)
    if env.get("ELASTIC_API_KEY"):
        return Credentials("ApiKey " + _checked_api_key(env["ELASTIC_API_KEY"].strip(), "ELASTIC_API_KEY"),
                           "ELASTIC_API_KEY")
    user = username or env.get("ELASTIC_USERNAME")
    if user:
        bad = credential_problem(user, allow_space=True)
        if bad or ":" in user:
            raise InstallerError(f"the user name contains {bad or 'a colon'}", code=2)
        if password_file:
            password, src = _read_secret(password_file, "password"), f"--password-file {password_file}"
        elif env.get("ELASTIC_PASSWORD"):
            password, src = env["ELASTIC_PASSWORD"], "ELASTIC_PASSWORD"
        else:
            raise InstallerError(f"no password for user {user}: set ELASTIC_PASSWORD or pass --password-file",
                                 code=2)
        bad = credential_problem(password, allow_space=True)
        if bad:
            raise InstallerError(f"the password from {src} contains {bad}", code=2)
        register_secret(password)
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
        # an auth object, not a session header: requests would replace a header with a ~/.netrc
        # entry's basic auth (agent_input.http_client.AuthorizationHeader)
        self.session.auth = AuthorizationHeader(Secret(self.credentials.header) if self.credentials.header else None)

    def _request(self, service: str, base: str | None, method: str, path: str, **kw) -> requests.Response:
        if not base:
            raise InstallerError(f"no {service} URL given (--{'es' if service == 'Elasticsearch' else 'kibana'}-url)",
                                 code=2)
        url = base.rstrip("/") + path
        shown = display_url(base)
        try:
            resp = self.session.request(method, url, timeout=self.timeout, verify=self.verify, **kw)
        except requests.exceptions.SSLError as exc:
            text = str(exc)
            if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text or "wrong version number" in text:
                raise InstallerError(f"{service} at {shown} does not speak TLS: is it http://?", code=2) from None
            if self.verify is False:
                raise InstallerError(f"TLS handshake with {service} at {shown} failed ({_ssl_reason(text)})",
                                     code=2) from None
            raise InstallerError(f"TLS verification failed for {service} at {shown} ({_ssl_reason(text)}): pass "
                                 "--ca-cert PATH (or --insecure for a test cluster)", code=2) from None
        except requests.exceptions.Timeout:
            raise InstallerError(f"{service} at {shown} did not answer within {self.timeout:g}s", code=2) from None
        except requests.exceptions.ConnectionError:
            raise InstallerError(f"cannot reach {service} at {shown} (connection failed)", code=2) from None
        except (requests.exceptions.RequestException, UnicodeError) as exc:
            # Only the exception's type: its text may quote a header, and so the credentials.
            raise InstallerError(f"request to {service} at {shown} failed ({type(exc).__name__})", code=2) from None
        if resp.status_code == 401:
            raise InstallerError(f"{service} at {shown} rejected the credentials (401, {self.credentials.source}): "
                                 "check ELASTIC_API_KEY or ELASTIC_USERNAME/ELASTIC_PASSWORD", code=3)
        return resp

    def es(self, method: str, path: str, **kw) -> requests.Response:
        return self._request("Elasticsearch", self.es_url, method, path, **kw)

    def kb(self, method: str, path: str, space: str | None = None, **kw) -> requests.Response:
        """A Kibana request in the target's space, or in `space`."""
        headers = dict(kw.pop("headers", {}) or {})
        if method != "GET":
            headers["kbn-xsrf"] = "true"
        space = space or self.space
        prefix = f"/s/{space}" if space and space != "default" else ""
        return self._request("Kibana", self.kibana_url, method, prefix + path, headers=headers, **kw)


def _ssl_reason(text: str) -> str:
    """The OpenSSL reason out of requests' SSLError text, e.g. CERTIFICATE_VERIFY_FAILED."""
    import re

    found = re.findall(r"\[SSL: ([A-Z_]+)\]|certificate verify failed: ([^()\]]+)", text)
    return next((a or b.strip() for a, b in found),
                "certificate verify failed" if "certificate verify failed" in text else "TLS error")


def _reason(resp: requests.Response) -> str:
    """What an answer says went wrong, redacted before it is cut (a proxy's error page may echo
    the Authorization header: cut first, the value would no longer match whole)."""
    try:
        body = resp.json()
    except ValueError:
        return redact((resp.text or "").strip())[:200] or f"HTTP {resp.status_code}"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return redact(str(err.get("reason") or err.get("type") or err))[:300]
        if body.get("message"):
            return redact(str(body["message"]))[:300]
        if err:
            return redact(str(err))[:300]
    return redact(json.dumps(body))[:300]


def _json(resp: requests.Response, expected: str = "a JSON object", text: str | None = None,
          pick: Callable[[Any], Any] | None = None, hint: str = "") -> Any:
    """Every JSON body the installer reads goes through here, so a login page, a proxy's error page
    or a redacted answer is one InstallerError (and the run's done/not-done summary), not a
    traceback. `text` parses one NDJSON line instead of the body; `pick` digs out the value needed
    (a KeyError/TypeError in it counts as the wrong shape)."""
    try:
        data = json.loads(resp.text if text is None else text)
        if pick is not None:
            data = pick(data)
        elif not isinstance(data, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        method = getattr(resp.request, "method", None) or "request to"
        ctype = resp.headers.get("content-type") or "none"
        raise InstallerError(f"{method} {display_url(resp.url or '')} answered with something that is not "
                             f"{expected} (HTTP {resp.status_code}, content-type {ctype})"
                             + (f": {hint}" if hint else "")) from None
    return data


def _version_number(data: Any) -> str:
    number = data["version"]["number"]
    if not isinstance(number, str) or not number[:1].isdigit():
        raise TypeError
    return number


def _version_and_flavor(data: Any) -> tuple[str, bool]:
    """(version number, whether it is Elastic Cloud Serverless). A Serverless project reports
    `build_flavor: serverless` and a version number that says nothing of its features (8.11.0 for
    years, later the next release's): it is always the newest, so the number is not checked."""
    return _version_number(data), data["version"].get("build_flavor") == "serverless"


def _taken_elsewhere(kind: str, so_id: str, space: str, holder: str | None = None) -> "InstallerError":
    """The error for an id that another Kibana space holds (Kibana 8+: ids are unique across all
    spaces). Our ids differ per space, so that space has objects that an openai-assets without
    per-space ids installed there under the default space's ids. `holder`: that space, when the
    user can see it."""
    that = holder or "<that space>"
    how = ("an openai-assets before per-space ids installed there with the default space's ids: run "
           f"`openai-assets install --space {that}` once, which moves them to that space's ids, "
           "then install here again" if space == K.DEFAULT_SPACE else
           "another space holds an object with this space's id (shared or moved there?): delete it, or "
           "remove it from that space, then install again")
    where = f"Kibana space {holder}" if holder else "another Kibana space"
    return InstallerError(f"{kind} {so_id} exists in {where}: {how}")


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
    status: str  # created|updated|unchanged|deleted|absent|kept|would create|would update|would delete|refused
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
        if not self.steps:  # nothing was written: the list of every asset says no more than that
            return f"{verb} incomplete: {self.error}\n  nothing was written ({len(self.pending)} assets not done)"
        done = ", ".join(s.label for s in self.steps)
        pending = ", ".join(self.pending) or "nothing"
        return (f"{verb} incomplete: {self.error}\n  done: {counts} ({done})\n"
                f"  not done: {pending}")


# ---------------------------------------------------------------------------------------------
# The installer


def check_version(label: str, version: str) -> None:
    try:
        v = K.parse_version(version)
    except ValueError:
        raise InstallerError(f"{label} reported version {version!r}, which openai-assets cannot read", code=4) from None
    if v < MIN_VERSION or v[0] > MAX_MAJOR:
        raise InstallerError(
            f"{label} {version} is not supported: openai-assets needs 8.18.0 or later within 8.x/9.x", code=4)


@dataclass
class Options:
    retention: E.Retention = field(default_factory=E.Retention)
    namespace: str = "default"
    rules: K.RuleOptions = field(default_factory=K.RuleOptions)
    with_kibana: bool = True
    # Overwrite (install) assets whose `_meta.managed_by` is not ours, e.g. the Elastic OpenAI
    # integration's templates of the same names. Off by default: see `Installer.foreign_es_assets`.
    replace_foreign: bool = False


class ForeignAssets(InstallerError):
    """Assets with our names already exist and another tool manages them."""


def _owner(current: dict | None) -> str | None:
    meta = (current or {}).get("_meta")
    return meta.get("managed_by") if isinstance(meta, dict) else None


def _owner_text(owner: str | None) -> str:
    return f"managed by {owner}" if owner else "no _meta.managed_by"


class Installer:
    def __init__(self, target: Target, options: Options | None = None, dry_run: bool = False,
                 echo: Callable[[str], None] | None = None):
        self.t = target
        self.o = options or Options()
        self.dry_run = dry_run
        self.echo = echo or (lambda line: None)
        # the Kibana space: each space has its own ids for our objects (kibana.object_id)
        self.space = K.space_id(target.space)
        self._rolled: set[str] = set()  # index templates whose data streams were rolled over
        self._other_spaces: list[str] | None = None  # read once, by _other_space_ids
        self.es_version: str | None = None
        self.kibana_version: str | None = None
        self.es_serverless = self.kibana_serverless = False  # build_flavor: serverless
        # asset path -> its body as read in this install or uninstall (None: absent): the foreign-asset
        # scan's reads serve the writes, and one template's read serves all its data streams
        self._es_read: dict[str, dict | None] = {}

    # -- preflight ---------------------------------------------------------------------------
    def preflight(self) -> None:
        resp = _check(self.t.es("GET", "/"), "read the Elasticsearch version", ES_PRIVILEGE["version"])
        self.es_version, self.es_serverless = _json(resp, "an Elasticsearch version document",
                                                    pick=_version_and_flavor, hint="is --es-url the Elasticsearch URL?")
        if not self.es_serverless:
            check_version("Elasticsearch", self.es_version)
        if self.o.with_kibana:
            resp = _check(self.t.kb("GET", "/api/status"), "read the Kibana version", KIBANA_PRIVILEGE["version"])
            self.kibana_version, self.kibana_serverless = _json(resp, "a Kibana version document",
                                                                pick=_version_and_flavor,
                                                                hint="is --kibana-url the Kibana URL?")
            if not self.kibana_serverless:
                check_version("Kibana", self.kibana_version)
        shown = lambda name, v, sv: f"{name} serverless (reports {v})" if sv else f"{name} {v}"  # noqa: E731
        self.echo(shown("Elasticsearch", self.es_version, self.es_serverless)
                  + (f", {shown('Kibana', self.kibana_version, self.kibana_serverless)}" if self.kibana_version else ""))

    @property
    def rules_kibana_version(self) -> str | None:
        """The Kibana version the rules are written for; None (the newest) on Serverless, whose
        version number does not say what it supports."""
        return None if self.kibana_serverless else self.kibana_version

    def check_serverless_options(self) -> None:
        """What Serverless cannot do, refused before anything is written."""
        if self.es_serverless and self.o.retention.ilm_policy:
            raise InstallerError("--ilm-policy: Elasticsearch Serverless has no ILM (data stream lifecycle only): "
                                 "drop --ilm-policy and set the retention with --retention", code=2)

    def check_ilm_policy(self) -> None:
        """`--ilm-policy` names a policy that exists. Elasticsearch takes a template naming any
        policy: each new backing index then has an ILM error instead of a policy, and with the data
        stream lifecycle turned off for ILM, no retention at all. Elasticsearch reads the name as
        a list or a wildcard and answers 200 with the policies it matches (`openai-*`, none of them
        named so): the answer names the policy itself. Without the privilege to read policies
        (`read_ilm`, not in the installer role) it cannot be told, and is not refused."""
        name = self.o.retention.ilm_policy
        if not name:
            return
        resp = self.t.es("GET", f"/_ilm/policy/{quote(name, safe='')}")
        try:
            named = resp.status_code != 200 or name in resp.json()
        except (ValueError, TypeError):  # not JSON (a proxy's page): not told
            named = True
        if resp.status_code == 404 or not named:
            raise InstallerError(f"--ilm-policy {name!r}: Elasticsearch has no ILM policy of that name: create it "
                                 "first, or drop --ilm-policy to keep data stream lifecycle retention", code=2)

    def check_es_privileges(self, cluster: Iterable[str], index_privs: Iterable[str] = (),
                            rules_read: bool = False) -> None:
        """`rules_read`: also `read` on what the rules query. They run with an API key Kibana
        grants for these credentials: without it, every run of every rule fails."""
        body: dict = {"cluster": sorted(set(cluster))}
        index_privs = list(index_privs)
        if index_privs:
            body["index"] = [{"names": ["logs-openai.*", "logs-openai-*"], "privileges": index_privs}]
        if rules_read:
            body.setdefault("index", []).append({"names": [RULES_READ], "privileges": ["read"]})
        resp = self.t.es("POST", "/_security/user/_has_privileges", json=body)
        if resp.status_code != 200:
            return  # security disabled or API unavailable: the writes themselves will tell
        data = _json(resp, "a privileges answer",
                     pick=lambda d: (d, dict(d.get("cluster") or {}),
                                     {str(n): dict(i) for n, i in (d.get("index") or {}).items()}))
        data, cluster, indices = data
        if data.get("has_all_requested", True):
            return
        missing = [p for p, ok in cluster.items() if not ok]
        for name, privs in indices.items():
            for p, ok in privs.items():
                if ok:
                    continue
                if name == RULES_READ and p == "read":
                    missing.append(f"read (index privilege on {RULES_READ}: the rules run with your credentials' "
                                   "API key and query those indices)")
                else:
                    missing.append(f"{p} (index privilege on logs-openai.*)")
        raise MissingPrivilege("missing Elasticsearch privilege: " + ", ".join(sorted(set(missing))))

    # -- install -----------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
        steps: list[tuple[str, Callable[[], tuple[str, str]]]] = []
        for asset in E.es_assets(self.o.retention, self.o.namespace):
            steps.append((asset.label, lambda a=asset: self._put_es(a)))
        if self.o.with_kibana:
            steps.append((f"data_view {K.data_view_id(self.space)}", self._data_view))
            for d in K.dashboards(self.space):
                steps.append((f"dashboard {d.id}", lambda d=d: self._dashboard(d)))
            for r in K.rules(self.o.rules, self.space):
                steps.append((f"rule {r.id} {r.name}", lambda r=r: self._rule(r)))
        return steps

    def install(self) -> Report:
        report = Report()
        self._es_read.clear()
        try:
            self.preflight()
            self.check_serverless_options()
            self.check_es_privileges(["manage_index_templates", "manage_pipeline"], rules_read=self.o.with_kibana)
            self.check_ilm_policy()
            foreign = self.foreign_es_assets()
        except InstallerError as exc:
            report.error = exc
            report.pending = [label for label, _ in self.plan()]
            return report
        if foreign and not self.o.replace_foreign:
            for label, owner in foreign:
                self.echo(f"{'refused':<13} {label}  ({_owner_text(owner)}, not {MANAGED_BY})")
            owners = sorted({o or "unknown" for _, o in foreign})
            why = ("the Elastic OpenAI integration (Fleet) is installed and uses the same names"
                   if "fleet" in owners else f"another tool manages them ({', '.join(owners)})")
            report.error = ForeignAssets(
                f"{len(foreign)} Elasticsearch assets already exist and are not managed by {MANAGED_BY}: {why}. "
                "Remove those assets (in Fleet: uninstall the integration's assets), or pass "
                "--replace-foreign-assets to take them over")
            report.pending = [label for label, _ in self.plan()]
            return report
        steps = self.plan()
        return self._run_steps(steps, report)

    def foreign_es_assets(self) -> list[tuple[str, str | None]]:
        """Read every Elasticsearch asset before writing any, and list those another tool manages
        (label, its `_meta.managed_by`). The names are the same as the Elastic OpenAI integration's,
        so overwriting them silently would take the integration's templates over, and `uninstall`
        would then delete them. The reads are kept for `_put_es`."""
        foreign = []
        for asset in E.es_assets(self.o.retention, self.o.namespace):
            current = self._read_es(asset)
            if current is not None and _owner(current) != MANAGED_BY:
                foreign.append((asset.label, _owner(current)))
        return foreign

    def _read_es(self, asset: E.EsAsset) -> dict | None:
        """The asset as Elasticsearch has it, or None when it does not exist; read once a run."""
        if asset.path not in self._es_read:
            resp = self.t.es("GET", asset.path)
            if resp.status_code == 404:
                self._es_read[asset.path] = None
            else:
                _check(resp, f"read {asset.label}", ES_PRIVILEGE[asset.kind])
                self._es_read[asset.path] = _existing_es_body(asset.kind, asset.name, _json(resp)) or {}
        return self._es_read[asset.path]

    def _would(self, status: str) -> str:
        return f"would {status[:-1] if status.endswith('d') else status}" if self.dry_run else status

    def _put_es(self, asset: E.EsAsset) -> tuple[str, str]:
        priv = ES_PRIVILEGE[asset.kind]
        current = self._read_es(asset)
        detail = ""
        reshaped = False  # what applies to a backing index changed: not only the _meta (a new version)
        if current is None:
            status = "created"
        else:
            meta = current.get("_meta") if isinstance(current.get("_meta"), dict) else {}
            if meta.get("fingerprint") == asset.body["_meta"]["fingerprint"] and _owner(current) == MANAGED_BY:
                return "unchanged", ""
            if _owner(current) != MANAGED_BY:
                if not self.o.replace_foreign:  # install() refuses first; this guards other callers
                    raise ForeignAssets(f"{asset.label} exists and is {_owner_text(_owner(current))}, not "
                                        f"{MANAGED_BY}: pass --replace-foreign-assets to take it over")
                detail = f"taken over from {_owner(current) or 'an unmanaged asset'}"
            status = "updated"
            reshaped = meta.get("content_fingerprint") != asset.body["_meta"].get("content_fingerprint")
        if self.dry_run:
            return self._would(status), detail
        _check(self.t.es("PUT", asset.path, json=asset.body), f"write {asset.label}", priv)
        if reshaped and asset.kind in ("component_template", "index_template"):
            rolled = self._roll_over_streams(asset.name.removesuffix("@package"))
            detail = "; ".join(d for d in (detail, rolled) if d)
        return status, detail

    def _roll_over_streams(self, template: str) -> str:
        """A template applies when a backing index is created: an existing data stream's write
        index keeps the mappings it was made with, so an upgrade's (the audit payload's
        ignore_above) did not apply, for up to the lifecycle's 30 days, to what it fixes. Each
        existing stream of updated index template `template` is rolled over lazily (a new backing
        index at its next write). Without the privilege for that (`manage` on the stream, not in
        the documented installer role) the install goes on and says what to run."""
        if template in self._rolled:
            return ""
        self._rolled.add(template)
        resp = self.t.es("GET", f"/_data_stream/{template}-*")
        if resp.status_code != 200:
            return "existing data streams keep the earlier mappings until their next rollover"
        names = _json(resp, "a list of data streams", pick=lambda d: [
            str(ds["name"]) for ds in d["data_streams"] if ds.get("template") == template])
        rolled, left = [], []
        for name in names:
            ok = self.t.es("POST", f"/{name}/_rollover", params={"lazy": "true"}).status_code == 200
            (rolled if ok else left).append(name)
        parts = []
        if rolled:
            parts.append(f"{', '.join(rolled)} " + ("rolls over at its" if len(rolled) == 1 else "roll over at their")
                         + " next write")
        if left:
            parts.append(f"{', '.join(left)} " + ("keeps" if len(left) == 1 else "keep") + " the earlier mappings "
                         f"until {'its' if len(left) == 1 else 'their'} next rollover: "
                         + ", ".join(f"POST {n}/_rollover" for n in left)
                         + " applies them now (with the manage privilege on it)")
        return "; ".join(parts)

    def _legacy_id(self, default_id: str, exists: Callable[[str], bool]) -> str | None:
        """Outside the default space: the default space's id when this space holds an object under
        it (an install by an openai-assets without per-space ids), to move to this space's id."""
        if self.space == K.DEFAULT_SPACE:
            return None
        return default_id if exists(default_id) else None

    def _found(self, path: str, what: str, priv: str) -> bool:
        resp = self.t.kb("GET", path)
        if resp.status_code == 404:
            return False
        _check(resp, what, priv)
        return True

    def _held_elsewhere(self, kind: str, so_id: str, held: Callable[[str], bool]) -> None:
        """A dry run's create in the default space: raise as `install` would when another space
        holds the id (an earlier version's install there): its create is a 409 conflict, or a copy
        Kibana imports under a new id, and it stops there. `held(space)` reads the id in a space."""
        if not self.dry_run or self.space != K.DEFAULT_SPACE:
            return
        holder = self._space_holding(held)
        if holder is not None:
            raise _taken_elsewhere(kind, so_id, self.space, holder)

    def _space_holding(self, held: Callable[[str], bool]) -> str | None:
        """The first other space (of those the user can see) where `held(space)`, or None: named in
        the error, so the user knows which space's install to run."""
        return next((sp for sp in self._other_space_ids() if held(sp)), None)

    def _other_space_ids(self) -> list[str]:
        """The ids of the Kibana spaces other than this one that the user can see (`GET
        /api/spaces/space`, read once); none without the Spaces API's answer."""
        if self._other_spaces is None:
            resp = self.t.kb("GET", "/api/spaces/space")
            self._other_spaces = [] if resp.status_code != 200 else [
                sp for sp in _json(resp, "a list of spaces", pick=lambda d: [str(x["id"]) for x in d])
                if sp != self.space and re.fullmatch(r"[a-z0-9_-]+", sp)]
        return self._other_spaces

    def _drop_legacy(self, path: str, what: str, priv: str) -> None:
        status, detail = self._kb_delete(path, priv, what)
        if status == "kept":
            raise InstallerError(f"failed to {what}: {detail}")

    def _left_behind(self, status: str, detail: str, default_id: str, exists: Callable[[str], bool],
                     drop: Callable[[str], None]) -> tuple[str, str]:
        """For an object this space has under its own id (`status` unchanged or updated): one
        under the default space's id here as well is what a move that stopped between its create
        and its delete (a failed request, an interrupt) left. It is deleted now: left, a rule fired
        twice, and the default space's install stayed refused with advice (`install --space
        <this space>`) that did not help."""
        legacy = self._legacy_id(default_id, exists)
        if legacy is None:
            return (status if status == "unchanged" else self._would(status)), detail
        if not self.dry_run:
            drop(legacy)
        return self._would("updated"), (detail + "; " if detail else "") + f"deleted {legacy}, left by an earlier move"

    def _data_view(self) -> tuple[str, str]:
        priv = KIBANA_PRIVILEGE["data_view"]
        body = K.data_view(self.space)
        dv_id = body["data_view"]["id"]
        path = "/api/data_views/data_view/"
        found = lambda i: self._found(path + i, "read the data view", priv)  # noqa: E731
        held = lambda sp: self.t.kb("GET", path + dv_id, space=sp).status_code == 200  # noqa: E731
        resp = self.t.kb("GET", path + dv_id)
        legacy = None
        if resp.status_code == 404:
            status = "created"
            legacy = self._legacy_id(K.DATA_VIEW_ID, found)
            self._held_elsewhere("data view", dv_id, held)
        else:
            _check(resp, "read the data view", priv)
            have = _json(resp, "a data view", pick=lambda d: dict(d.get("data_view") or {}))
            want = body["data_view"]
            status = "unchanged" if all(have.get(k) == want[k] for k in K.DATA_VIEW_FIELDS) else "updated"
        detail = f"moved from {legacy}" if legacy else ""
        if status != "created" and (status == "unchanged" or self.dry_run):
            return self._left_behind(status, detail, K.DATA_VIEW_ID, found,
                                     lambda i: self._drop_legacy(path + i, "delete the data view's earlier id", priv))
        if self.dry_run:
            return self._would(status), detail
        if status == "created":
            resp = self.t.kb("POST", "/api/data_views/data_view", json=body)
            if resp.status_code == 409:
                raise _taken_elsewhere("data view", dv_id, self.space, self._space_holding(held))
            _check(resp, "write the data view", priv)
            if legacy:  # `override` has replaced it already unless its title was edited
                self._drop_legacy(path + legacy, "delete the data view's earlier id", priv)
            return status, detail
        _check(self.t.kb("POST", path + dv_id, json=K.data_view_update()), "update the data view", priv)
        return self._left_behind(status, detail, K.DATA_VIEW_ID, found,
                                 lambda i: self._drop_legacy(path + i, "delete the data view's earlier id", priv))

    def _dashboard(self, dashboard: K.Dashboard) -> tuple[str, str]:
        priv = KIBANA_PRIVILEGE["dashboard"]
        so = dashboard.saved_object()
        exists = lambda i: self._export_saved_object("dashboard", i) is not None  # noqa: E731
        drop = lambda i: self._drop_legacy(f"/api/saved_objects/dashboard/{i}", f"delete dashboard {i}", priv)  # noqa: E731
        held = lambda sp: self._export_saved_object("dashboard", dashboard.id, sp) is not None  # noqa: E731
        existing = self._export_saved_object("dashboard", dashboard.id)
        legacy = None
        if existing is None:
            status = "created"
            legacy = self._legacy_id(dashboard.default_id, exists)
            self._held_elsewhere("dashboard", dashboard.id, held)
        else:
            status = "unchanged" if K.fingerprint_of(existing) == K.fingerprint_of(so) else "updated"
            if status == "unchanged" or self.dry_run:
                return self._left_behind(status, "", dashboard.default_id, exists, drop)
        detail = f"moved from {legacy}" if legacy else ""
        if self.dry_run:
            return self._would(status), detail
        ndjson = K.to_ndjson([so])
        resp = self.t.kb("POST", "/api/saved_objects/_import", params={"overwrite": "true"},
                         files={"file": ("openai-elastic.ndjson", ndjson, "application/ndjson")})
        _check(resp, f"import dashboard {dashboard.id}", priv)
        result = _json(resp, "an import result")
        if not result.get("success", False):
            errors = "; ".join(f"{e.get('type')}/{e.get('id')}: {(e.get('error') or {}).get('type')}"
                               for e in result.get("errors") or [] if isinstance(e, dict))
            raise InstallerError(f"failed to import dashboard {dashboard.id}: {errors or 'unknown error'}")
        for done in result.get("successResults") or []:
            moved = done.get("destinationId") if isinstance(done, dict) else None
            if moved and moved != dashboard.id:
                # Kibana created it under a new random id: another space holds ours. A copy under
                # an id no later run knows would be left behind at every install: remove it.
                taken = _taken_elsewhere("dashboard", dashboard.id, self.space, self._space_holding(held))
                try:
                    self._drop_legacy(f"/api/saved_objects/dashboard/{moved}", f"delete dashboard {moved}", priv)
                except InstallerError as exc:  # (Serverless without the dashboards API) the cause is said too
                    raise type(exc)(f"{taken}; and Kibana imported it under a new id, {exc}") from None
                raise taken
        if legacy:
            drop(legacy)
        if status == "updated":
            return self._left_behind(status, detail, dashboard.default_id, exists, drop)
        return status, detail

    def _export_saved_object(self, so_type: str, so_id: str, space: str | None = None) -> dict | None:
        resp = self.t.kb("POST", "/api/saved_objects/_export", space=space,
                         json={"objects": [{"type": so_type, "id": so_id}], "includeReferencesDeep": False,
                               "excludeExportDetails": False})
        if resp.status_code in (400, 404):
            return None  # Kibana reports an unknown id in a by-id export as a bad request
        _check(resp, f"read {so_type} {so_id}", KIBANA_PRIVILEGE["dashboard"])
        for line in resp.text.splitlines():
            if not line.strip():
                continue
            obj = _json(resp, "NDJSON of saved objects", text=line)
            if obj.get("id") == so_id and obj.get("type") == so_type:
                return obj
        return None

    def _rule(self, rule: K.Rule) -> tuple[str, str]:
        priv = KIBANA_PRIVILEGE["rule"]
        path = f"/api/alerting/rule/{rule.id}"
        resp = self.t.kb("GET", path)
        detail = ""
        if rule.per_row and self.rules_kibana_version and not K.supports_per_row_alerts(self.rules_kibana_version):
            detail = "one alert for all rows: per-row alerts need Kibana 8.19 or 9.1+"
        if resp.status_code == 404:
            return self._create_rule(rule, detail)
        _check(resp, f"read rule {rule.name}", priv)
        current = _json(resp, "a rule", pick=_rule_shape)
        want = rule.update_body(self.rules_kibana_version, actions=_actions_for_update(current.get("actions") or []))
        want["tags"] = _tags_kept(want["tags"], current)
        want.update(_rule_level_frequency(current))
        exists = lambda i: self._found(f"/api/alerting/rule/{i}", f"read rule {rule.name}", priv)  # noqa: E731
        drop = lambda i: self._drop_legacy(f"/api/alerting/rule/{i}", f"delete rule {i}", priv)  # noqa: E731
        if _rule_matches(current, want):
            return self._left_behind("unchanged", detail, rule.default_id, exists, drop)
        if self.dry_run:
            return self._left_behind("updated", detail, rule.default_id, exists, drop)
        _check(self.t.kb("PUT", path, json=want), f"update rule {rule.name}",
               KIBANA_PRIVILEGE["rule_actions"] if want["actions"] else priv)
        return self._left_behind("updated", (detail + "; " if detail else "") + "actions kept",
                                 rule.default_id, exists, drop)

    def _create_rule(self, rule: K.Rule, detail: str) -> tuple[str, str]:
        """Create `rule`; outside the default space, one under the default space's id here (an
        earlier version's) is moved to this space's id with its actions and enabled state."""
        priv = KIBANA_PRIVILEGE["rule"]
        legacy: dict | None = None
        if self.space != K.DEFAULT_SPACE:
            resp = self.t.kb("GET", f"/api/alerting/rule/{rule.default_id}")
            if resp.status_code != 404:
                _check(resp, f"read rule {rule.name}", priv)
                legacy = _json(resp, "a rule", pick=_rule_shape)
        if legacy is not None:
            detail = (detail + "; " if detail else "") + f"moved from {rule.default_id}, actions kept"
        held = lambda sp: self.t.kb("GET", f"/api/alerting/rule/{rule.id}", space=sp).status_code == 200  # noqa: E731
        self._held_elsewhere("rule", rule.id, held)
        if self.dry_run:
            return "would create", detail
        body = rule.create_body(self.rules_kibana_version, self.o.rules.enabled)
        if legacy is not None:
            body["actions"] = _actions_for_update(legacy.get("actions") or [])
            body["enabled"] = bool(legacy.get("enabled", body["enabled"]))
            body["tags"] = _tags_kept(body["tags"], legacy)
            body.update(_rule_level_frequency(legacy))
        resp = self.t.kb("POST", f"/api/alerting/rule/{rule.id}", json=body)
        if resp.status_code == 409:
            raise _taken_elsewhere("rule", rule.id, self.space, self._space_holding(held))
        _check(resp, f"create rule {rule.name}", KIBANA_PRIVILEGE["rule_actions"] if body["actions"] else priv)
        if legacy is not None:
            self._drop_legacy(f"/api/alerting/rule/{rule.default_id}", f"delete rule {rule.default_id}", priv)
        return "created", detail

    # -- uninstall ---------------------------------------------------------------------------
    def uninstall(self, delete_data: bool = False) -> Report:
        report = Report()
        self._es_read.clear()
        try:
            self.preflight()
            # view_index_metadata: without it, GET /_data_stream/<pattern> lists none of the streams,
            # with 200, and a template they use was taken for unused (or none found to delete)
            self.check_es_privileges(["manage_index_templates", "manage_pipeline"],
                                     ["view_index_metadata"] + (["delete_index"] if delete_data else []))
            elsewhere = self._installed_in_other_spaces() if self.o.with_kibana else []
        except InstallerError as exc:
            report.error = exc
            report.pending = [label for label, _ in self._uninstall_steps(delete_data, [])]
            return report
        return self._run_steps(self._uninstall_steps(delete_data, elsewhere), report)

    def _uninstall_steps(self, delete_data: bool,
                         elsewhere: list[str]) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
        """What uninstall goes through, in its order, each step's work deferred: run, or only
        listed as "not done" when the uninstall stops before the first. `elsewhere`: the other
        Kibana spaces that hold an install, for which the Elasticsearch assets stay."""
        steps: list[tuple[str, Callable[[], tuple[str, str]]]] = []
        if self.o.with_kibana:
            # this space's ids only: the other spaces' objects have their own ids and stay
            dv_id = K.data_view_id(self.space)
            for r in K.rules(self.o.rules, self.space):
                steps.append((f"rule {r.id} {r.name}", lambda r=r: self._delete_kb_both(
                    "/api/alerting/rule/", r.id, r.default_id, KIBANA_PRIVILEGE["rule"], f"delete rule {r.name}")))
            for d in K.dashboards(self.space):
                steps.append((f"dashboard {d.id}", lambda d=d: self._delete_kb_both(
                    "/api/saved_objects/dashboard/", d.id, d.default_id, KIBANA_PRIVILEGE["dashboard"],
                    f"delete dashboard {d.id}",
                    exists=lambda i: self._export_saved_object("dashboard", i) is not None)))
            steps.append((f"data_view {dv_id}", lambda: self._delete_kb_both(
                "/api/data_views/data_view/", dv_id, K.DATA_VIEW_ID, KIBANA_PRIVILEGE["data_view"],
                "delete the data view")))
        assets = E.es_assets(self.o.retention, self.o.namespace)
        stream_patterns = [E.ROUTER_PATTERN] + [f"logs-openai.{ds}-*" for ds in E.F.datasets()]
        if elsewhere:
            # the Elasticsearch assets (and data) serve every space's install: they stay
            why = (f"Kibana space{'s' if len(elsewhere) > 1 else ''} {', '.join(elsewhere)} still "
                   f"{'have' if len(elsewhere) > 1 else 'has'} openai-assets' dashboards: uninstall there too")
            for label in [f"data_stream {p}" for p in stream_patterns if delete_data] + [a.label for a in assets]:
                steps.append((label, lambda: ("kept", why)))
            return steps
        kept: dict[str, str] = {}  # pipeline or component template name -> why it stays
        if delete_data:
            for pattern in stream_patterns:
                steps.append((f"data_stream {pattern}", lambda p=pattern: self._delete_data_streams(p)))
        for a in [a for a in assets if a.kind == "index_template"]:
            steps.append((a.label, lambda a=a: self._delete_index_template(a, kept, delete_data)))
        for a in [a for a in assets if a.kind != "index_template"]:
            steps.append((a.label, lambda a=a: self._delete_es(a, kept.get(a.name))))
        return steps

    def _installed_in_other_spaces(self) -> list[str]:
        """The other Kibana spaces (of those the user can see) that hold our data view, under their
        id or an earlier version's (the default space's): the Elasticsearch assets serve them too.
        A space whose data view cannot be read (403) counts as using them. Without the Spaces
        API's answer, none (the uninstall of before)."""
        out = []
        for sp in self._other_space_ids():
            for dv_id in dict.fromkeys([K.data_view_id(sp), K.DATA_VIEW_ID]):
                found = self.t.kb("GET", f"/api/data_views/data_view/{dv_id}", space=sp)
                if found.status_code in (200, 403):
                    out.append(sp)
                    break
                if found.status_code != 404:
                    _check(found, f"read the data view of space {sp}", KIBANA_PRIVILEGE["data_view"])
        return out

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

    def _delete_kb_both(self, prefix: str, so_id: str, default_id: str, priv: str, what: str,
                        exists: Callable[[str], bool] | None = None) -> tuple[str, str]:
        """Delete `prefix + so_id`; outside the default space, also what an earlier version left in
        this space under the default space's id (never another space's: paths are this space's)."""
        status, detail = self._delete_kb(prefix + so_id, priv, what,
                                          exists=(lambda: exists(so_id)) if exists else None)
        if self.space == K.DEFAULT_SPACE or default_id == so_id:
            return status, detail
        old, _ = self._delete_kb(prefix + default_id, priv, what,
                                 exists=(lambda: exists(default_id)) if exists else None)
        if old in ("deleted", "would delete"):
            return old, f"and {default_id}, from an earlier openai-assets"
        return status, detail

    def _delete_kb(self, path: str, priv: str, what: str,
                   exists: Callable[[], bool] | None = None) -> tuple[str, str]:
        """`exists` checks presence for a dry run where GET on `path` is not the way to read it
        (saved objects are read through `_export`)."""
        if self.dry_run:
            if exists is not None:
                found = exists()
            else:
                resp = self.t.kb("GET", path)
                if resp.status_code != 404:
                    _check(resp, what.replace("delete", "read", 1), priv)
                found = resp.status_code != 404
            return ("would delete", "") if found else ("absent", "")
        return self._kb_delete(path, priv, what, exists)

    def _kb_delete(self, path: str, priv: str, what: str,
                   exists: Callable[[], bool] | None = None) -> tuple[str, str]:
        """DELETE `path`: deleted, absent (404), or, for a dashboard on a Kibana whose saved objects
        API answers the route is internal (Serverless), through its dashboards API (`kept` when
        that is missing too). `exists` reads the dashboard there (default: through `_export`)."""
        resp = self.t.kb("DELETE", path)
        if resp.status_code == 404:
            return "absent", ""
        if path.startswith(_SO_DASHBOARD) and _route_restricted(resp):
            so_id = path[len(_SO_DASHBOARD):]
            return self._delete_dashboard_without_so_api(
                so_id, exists or (lambda: self._export_saved_object("dashboard", so_id) is not None))
        _check(resp, what, priv, ok=(200, 204))
        return "deleted", ""

    def _delete_dashboard_without_so_api(self, so_id: str, exists: Callable[[], bool]) -> tuple[str, str]:
        """Serverless Kibana keeps the saved objects CRUD routes internal (only `_import`/`_export`
        are public there): a DELETE is answered 400 whether or not the dashboard exists. Its public
        dashboards API deletes it; a Kibana without that API keeps it, and the line says how to
        delete it by hand."""
        if not exists():
            return "absent", ""
        resp = self.t.kb("DELETE", f"/api/dashboards/{so_id}")
        if resp.status_code in (200, 204):
            return "deleted", ""
        if resp.status_code == 403:
            _check(resp, f"delete dashboard {so_id}", KIBANA_PRIVILEGE["dashboard"])
        return "kept", "this Kibana has no API to delete it: delete it in Stack Management > Saved objects"

    def _delete_data_streams(self, pattern: str) -> tuple[str, str]:
        """Lists the matching streams first: Elasticsearch answers a wildcard DELETE that matches
        nothing with 200, so its answer alone cannot say whether anything was deleted."""
        priv = ES_PRIVILEGE["data_stream"]
        resp = self.t.es("GET", f"/_data_stream/{pattern}")
        found: list[tuple[str, str]] = []  # (data stream, its index template)
        if resp.status_code != 404:
            _check(resp, f"list data streams {pattern}", priv)
            found = _json(resp, "a list of data streams",
                          pick=lambda d: [(str(ds["name"]), str(ds.get("template"))) for ds in d["data_streams"]])
        if not found:
            return "absent", "none found"
        names = [name for name, template in found if self._ours(template)]
        foreign = [name for name, _ in found if name not in names]
        why = f"their index template is not {MANAGED_BY}'s: {', '.join(foreign)}"
        kept = f"; kept, {why}" if foreign else ""
        if not names:
            return "kept", why
        if self.dry_run:
            return "would delete", ", ".join(names) + kept
        # by name, not by the pattern: the pattern would take another tool's streams along
        resp = self.t.es("DELETE", f"/_data_stream/{','.join(names)}")
        if resp.status_code == 404:
            return "absent", "none found"
        _check(resp, f"delete data streams {pattern}", priv)
        return "deleted", ", ".join(names) + kept

    def _ours(self, index_template: str) -> bool:
        """Whether a data stream's index template is one of ours as Elasticsearch has it now. The
        Elastic OpenAI integration's data streams have our names; their template tells them apart."""
        asset = next((a for a in E.es_assets(self.o.retention, self.o.namespace)
                      if a.kind == "index_template" and a.name == index_template), None)
        return asset is not None and _owner(self._read_es(asset)) == MANAGED_BY

    def _foreign(self, asset: E.EsAsset) -> tuple[str | None, tuple[str, str] | None]:
        """Read `asset` before deleting it: (its current body, or a step result when there is
        nothing to delete or it is not ours). Uninstall never deletes what another tool manages."""
        current = self._read_es(asset)
        if current is None:
            return None, ("absent", "")
        if _owner(current) != MANAGED_BY:
            return current, ("kept", f"{_owner_text(_owner(current))}, not {MANAGED_BY}")
        return current, None

    def _delete_es(self, asset: E.EsAsset, keep_reason: str | None = None) -> tuple[str, str]:
        _, result = self._foreign(asset)
        if result:
            return result
        if keep_reason:
            return "kept", keep_reason
        if self.dry_run:
            return "would delete", ""
        resp = self.t.es("DELETE", asset.path)
        if resp.status_code == 404:
            return "absent", ""
        if resp.status_code == 400 and asset.kind == "pipeline" and "pipeline for" in _reason(resp):
            # an index that exists names it (its template deleted, the data streams unread): kept,
            # or its next document were refused for a missing pipeline
            return "kept", ("the default pipeline of indices that exist "
                            "(pass --delete-data to remove data and templates)")
        _check(resp, f"delete {asset.label}", ES_PRIVILEGE[asset.kind])
        return "deleted", ""

    def _delete_index_template(self, asset: E.EsAsset, kept: dict[str, str],
                               delete_data: bool = False) -> tuple[str, str]:
        current, result = self._foreign(asset)
        if result:
            if result[0] == "kept":  # another tool's template: what it is composed of stays as well
                for name in current.get("composed_of") or []:
                    kept.setdefault(str(name), f"used by index template {asset.name}, {_owner_text(_owner(current))}")
            return result
        # kept while a data stream uses it (with --delete-data, ours are gone by then), not only
        # when Elasticsearch refuses the delete: it deletes it where another template matches the
        # stream (its built-in `logs`, logs-*-*, on most clusters), and the stream's next backing
        # index would take that one's mappings, its pipeline's delete then refused
        if not delete_data and self._template_in_use(asset):
            return self._keep_in_use(asset, kept)
        if self.dry_run:
            return "would delete", ""
        resp = self.t.es("DELETE", asset.path)
        if resp.status_code == 404:
            return "absent", ""
        if resp.status_code == 400 and "data stream" in _reason(resp):
            return self._keep_in_use(asset, kept)
        _check(resp, f"delete {asset.label}", ES_PRIVILEGE[asset.kind])
        return "deleted", ""

    @staticmethod
    def _keep_in_use(asset: E.EsAsset, kept: dict[str, str]) -> tuple[str, str]:
        """A template that live data streams use is kept, and what it references, so ingestion
        keeps working."""
        why = "its index template is in use by data streams"
        kept[asset.body["template"]["settings"]["index"]["default_pipeline"]] = why
        kept.update((name, why) for name in asset.body["composed_of"])
        return "kept", "in use by data streams (pass --delete-data to remove data and templates)"

    def _template_in_use(self, asset: E.EsAsset) -> bool:
        """Whether a data stream uses index template `asset`. A listing that cannot be read stops the
        uninstall: counted as none, the template went where another matches the stream too
        (Elasticsearch's built-in `logs`, on most clusters), its delete not refused."""
        resp = self.t.es("GET", "/_data_stream/" + ",".join(asset.body["index_patterns"]))
        if resp.status_code == 404:
            return False
        _check(resp, f"list the data streams of {asset.label.replace('_', ' ')}",
               "view_index_metadata (index privilege on logs-openai.*)")
        return bool(_json(resp, "a list of data streams", pick=lambda d: [
            ds for ds in d["data_streams"] if ds.get("template") == asset.name]))


_SO_DASHBOARD = "/api/saved_objects/dashboard/"


def _route_restricted(resp: requests.Response) -> bool:
    """Kibana's answer to a route that is internal in this Kibana (Serverless), for a caller that is
    not Kibana's own UI: 400 "uri [...] with method [...] exists but is not available with the
    current configuration"."""
    return resp.status_code == 400 and "exists but is not available" in _reason(resp)


def _existing_es_body(kind: str, name: str, payload: dict) -> dict | None:
    if kind == "pipeline":
        found = payload.get(name)
        return found if isinstance(found, dict) else None
    key = {"component_template": "component_templates", "index_template": "index_templates"}[kind]
    inner = {"component_template": "component_template", "index_template": "index_template"}[kind]
    for item in payload.get(key) or []:
        if isinstance(item, dict) and item.get("name") == name and isinstance(item.get(inner), dict):
            return item[inner]
    return None


def _rule_shape(data: Any) -> dict:
    """A rule as GET returns it: a dict whose actions, if any, are a list of dicts."""
    actions = data.get("actions") or []
    if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
        raise TypeError
    return data


_ACTION_KEYS = ("group", "id", "params", "frequency", "uuid", "alerts_filter", "use_alert_data_for_template")


def _actions_for_update(actions: list[dict]) -> list[dict]:
    """The rule's current actions in the shape PUT accepts: the user's actions survive upgrades."""
    return [{k: a[k] for k in _ACTION_KEYS if k in a} for a in actions]


def _rule_level_frequency(current: dict) -> dict:
    """The rule's own `notify_when` and `throttle` when its actions rely on them (none has a
    `frequency`: a rule written through the API in the rule-level form). Kibana refuses a write
    whose actions have no frequency and no rule-level one ("Actions missing frequency parameters"),
    and one that has both, so they go back with the actions exactly when the actions need them."""
    actions = current.get("actions") or []
    if any(a.get("frequency") for a in actions):
        return {}
    return {k: current[k] for k in ("notify_when", "throttle") if current.get(k) is not None}


def _tags_kept(ours: list[str], current: dict) -> list[str]:
    """Our tags, then the ones the user added to the rule in Kibana: an install keeps those."""
    tags = current.get("tags")
    extra = [t for t in tags if isinstance(t, str) and t not in ours] if isinstance(tags, list) else []
    return [*ours, *dict.fromkeys(extra)]


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


def export(directory: str | Path, options: Options | None = None, kibana_version: str | None = None,
           space: str | None = None) -> list[Path]:
    """Write the whole bundle as files; returns the paths written. `manifest.json` lists, in
    install order, the request that applies each file. `space`: the Kibana space the Kibana files
    are for, with that space's ids (as install uses there) and `/s/<space>` paths."""
    options = options or Options()
    space = K.space_id(space)
    kb_prefix = "" if space == K.DEFAULT_SPACE else f"/s/{space}"
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
    write(rel, K.to_ndjson(K.saved_objects(space)))
    manifest.append({"service": "kibana", "method": "POST",
                     "path": f"{kb_prefix}/api/saved_objects/_import?overwrite=true",
                     "file": rel, "multipart_field": "file", "headers": {"kbn-xsrf": "true"}})
    for rule in K.rules(options.rules, space):
        rel = f"kibana/rules/{rule.id}.json"
        body = rule.create_body(kibana_version, options.rules.enabled)
        write(rel, json.dumps(body, indent=2, sort_keys=True) + "\n")
        manifest.append({"service": "kibana", "method": "POST", "path": f"{kb_prefix}/api/alerting/rule/{rule.id}",
                         "file": rel, "headers": {"kbn-xsrf": "true"}})
    write("manifest.json", json.dumps(manifest, indent=2) + "\n")
    return written
