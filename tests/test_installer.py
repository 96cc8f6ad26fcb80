"""Contract tests: every request `openai-assets` makes, against a stateful fake of the documented
Elasticsearch and Kibana APIs served through `responses` (no cluster needed)."""
from __future__ import annotations

import copy
import email.parser
import fnmatch
import json
import os
import re
import uuid
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import requests
import responses
from click.testing import CliRunner

from kibana_assets import elasticsearch as E
from kibana_assets import kibana as K
from kibana_assets.cli import main
from kibana_assets.installer import KIBANA_PRIVILEGE

ES = "http://es.test:9200"
KB = "http://kb.test:5601"
API_KEY = "c2VjcmV0LWtleS1kby1ub3QtcHJpbnQ="
PASSWORD = "hunter2-do-not-print"
# an action's `frequency` as Kibana 8.7+ writes it (the UI always does)
FREQUENCY = {"summary": False, "notify_when": "onActiveAlert", "throttle": None}


class FakeStack:
    """Just enough of Elasticsearch and Kibana, with the documented request/response shapes.

    Kibana spaces as Kibana 8.x has them: data views, dashboards and rules are `multiple-isolated`
    (or `multiple`) saved-object types, so an id is unique across *all* spaces. The stores are
    keyed by id alone and `self.space` says which space holds each object: a read, update or
    delete through another space's `/s/<id>/` path does not see it (404), creating the id again
    from another space is a 409 conflict, and `_import` gives the object a new random id
    (`destinationId`), as Kibana's import does for an unresolvable conflict."""

    def __init__(self, es_version="9.1.3", kb_version="9.1.3"):
        self.es_version, self.kb_version = es_version, kb_version
        self.es_flavor = self.kb_flavor = "default"  # version.build_flavor: "serverless" on Elastic Cloud Serverless
        self.dashboards_api = True  # Serverless Kibana's DELETE /api/dashboards/{id}
        self.dashboards_api_status = 200  # its answer to a delete that found the dashboard
        self.answer: dict[tuple[str, str], tuple[int, dict]] = {}  # (method, Kibana path regex) -> (status, body)
        self.component, self.index, self.pipelines = {}, {}, {}
        self.data_streams: set[str] = set()  # index template names in use
        self.rollovers: list[tuple[str, dict]] = []  # (data stream, query) of each POST <stream>/_rollover
        self.data_views, self.saved_objects, self.rules = {}, {}, {}
        # ("index-pattern", id) / (type, id) / ("alert", id) -> the space that holds the object;
        # objects a test puts in the stores directly are in the default space
        self.space: dict[tuple[str, str], str] = {}
        self.calls: list[dict] = []
        self.missing_privileges: list[str] = []
        self.forbid: set[tuple[str, str]] = set()  # (method, path regex) answered with 403
        # whether the user may read connectors (Kibana feature 'Actions and Connectors': Read):
        # Kibana reads the connectors of a rule written with actions, and answers 403 without it
        self.connectors_readable = True
        self.status = {"es": 200, "kb": 200}
        self.ilm_policies: set[str] = set()  # GET /_ilm/policy/<name>
        # Elasticsearch's built-in `logs` template (logs-*-*, priority 100), on every cluster that has
        # not turned stack templates off: a data stream another template matches does not hold its
        # own template's delete, and Elasticsearch deletes it
        self.builtin_logs_template = False
        self.pipelines_in_use: dict[str, str] = {}  # index template -> its default pipeline, as its indices have it
        # data stream (by its template's name) -> the template that matches it now, when another's
        # (the Elastic integration's, upgraded with a higher priority): GET _data_stream names that one
        self.stream_template: dict[str, str] = {}
        self.es_answer: dict[tuple[str, str], tuple[int, str]] = {}  # (method, path regex) -> (status, raw body)

    # -- plumbing -----------------------------------------------------------------------------
    def install(self, rsps: responses.RequestsMock) -> None:
        for method in ("GET", "PUT", "POST", "DELETE"):
            rsps.add_callback(method, re.compile(re.escape(ES) + r"/.*"), callback=self._es)
            rsps.add_callback(method, re.compile(re.escape(KB) + r"/.*"), callback=self._kb)

    def _record(self, service, request):
        url = urlparse(request.url)
        body = request.body
        if isinstance(body, bytes):
            try:
                body = body.decode()
            except UnicodeDecodeError:
                pass
        call = {"service": service, "method": request.method, "path": url.path,
                "query": parse_qs(url.query), "headers": dict(request.headers), "body": body}
        self.calls.append(call)
        return call

    def writes(self):
        reads = {("POST", "/_security/user/_has_privileges"), ("POST", "/api/saved_objects/_export")}
        return [c for c in self.calls if c["method"] != "GET" and (c["method"], self._strip(c["path"])) not in reads]

    @staticmethod
    def _strip(path):
        return re.sub(r"^/s/[^/]+", "", path)

    @staticmethod
    def _space_of_path(path):
        mm = re.match(r"^/s/([^/]+)/", path)
        return mm.group(1) if mm else "default"

    def in_space(self, key, space):
        return self.space.get(key, "default") == space

    def objects_in(self, space):
        """{(kind, id)} of every object in `space`: index-pattern (data views), dashboard, alert."""
        keys = ([("index-pattern", i) for i in self.data_views] + list(self.saved_objects)
                + [("alert", i) for i in self.rules])
        return {k for k in keys if self.in_space(k, space)}

    @staticmethod
    def _json(status, body, headers=None):
        return status, {"content-type": "application/json", **(headers or {})}, json.dumps(body)

    def _forbidden(self, method, path):
        return any(m == method and re.fullmatch(p, path) for m, p in self.forbid)

    # -- Elasticsearch -------------------------------------------------------------------------
    def _es(self, request):
        call = self._record("es", request)
        m, path = call["method"], call["path"]
        body = json.loads(call["body"]) if call["body"] else None
        if self._forbidden(m, path):
            return self._json(403, {"error": {"type": "security_exception", "reason": f"action [{path}] is unauthorized"}})
        for (am, ap), (status, raw) in self.es_answer.items():
            if am == m and re.fullmatch(ap, path):
                return status, {"content-type": "text/plain"}, raw
        if m == "GET" and path == "/":
            return self._json(200, {"name": "n", "version": {"number": self.es_version, "build_flavor": self.es_flavor},
                                    "tagline": "You Know, for Search"})
        if m == "POST" and path == "/_security/user/_has_privileges":
            cluster = {p: p not in self.missing_privileges for p in body["cluster"]}
            index = {}  # Elasticsearch merges the entries that name the same index
            for i in body.get("index", []):
                for n in i["names"]:
                    index.setdefault(n, {}).update({p: p not in self.missing_privileges for p in i["privileges"]})
            granted = all(cluster.values()) and all(ok for privs in index.values() for ok in privs.values())
            return self._json(200, {"username": "u", "has_all_requested": granted,
                                    "cluster": cluster, "index": index, "application": {}})
        for prefix, store, kind in (("/_component_template/", self.component, "component"),
                                    ("/_index_template/", self.index, "index"),
                                    ("/_ingest/pipeline/", self.pipelines, "pipeline")):
            if path.startswith(prefix):
                name = path[len(prefix):]
                if m == "GET":
                    if name not in store:
                        return self._json(404, {"error": {"type": "resource_not_found_exception", "reason": name}})
                    if kind == "pipeline":
                        return self._json(200, {name: store[name]})
                    key = f"{kind}_templates"
                    return self._json(200, {key: [{"name": name, f"{kind}_template": store[name]}]})
                if m == "PUT":
                    settings = ((body.get("template") or {}).get("settings") or {}).get("index") or {}
                    if self.es_flavor == "serverless" and "lifecycle" in settings:  # no ILM there
                        return self._json(400, {"error": {"type": "illegal_argument_exception", "reason":
                            "Settings [index.lifecycle.name] are not available when running in serverless mode"}})
                    store[name] = body
                    if kind == "index" and settings.get("default_pipeline"):
                        self.pipelines_in_use[name] = settings["default_pipeline"]
                    return self._json(200, {"acknowledged": True})
                if m == "DELETE":
                    if name not in store:
                        return self._json(404, {"error": {"type": "resource_not_found_exception", "reason": name}})
                    if kind == "index" and name in self.data_streams and not self.builtin_logs_template:
                        return self._json(400, {"error": {"type": "illegal_argument_exception", "reason":
                            f"unable to remove composable templates [{name}] as they are in use by a data streams [{name}-default]"}})
                    users = [t for t in sorted(self.data_streams) if self.pipelines_in_use.get(t) == name]
                    if kind == "pipeline" and users:  # the default pipeline of a backing index (7.16+)
                        return self._json(400, {"error": {"type": "illegal_argument_exception", "reason":
                            f"pipeline [{name}] cannot be deleted because it is the default pipeline for "
                            f"{len(users)} index(es) including [.ds-{users[0]}-default-000001]"}})
                    del store[name]
                    return self._json(200, {"acknowledged": True})
        if path.startswith("/_ilm/policy/") and m == "GET":
            # as Elasticsearch reads it: comma-separated names, or one wildcard (what it matches)
            names = unquote(path[len("/_ilm/policy/"):]).split(",")
            if any("*" in n for n in names):
                found = [p for p in sorted(self.ilm_policies) if fnmatch.fnmatchcase(p, names[0])]
            elif all(n in self.ilm_policies for n in names):
                found = names
            else:
                return self._json(404, {"error": {"type": "resource_not_found_exception",
                                                  "reason": f"Lifecycle policy not found: {names}"}, "status": 404})
            return self._json(200, {n: {"version": 1, "policy": {"phases": {"delete": {"min_age": "30d"}}}}
                                    for n in found})
        if path.startswith("/_data_stream/") and m in ("GET", "DELETE"):
            pattern = path[len("/_data_stream/"):]  # a comma-separated list of names or wildcards
            rx = re.compile("|".join(p.replace(".", r"\.").replace("*", ".*") for p in pattern.split(",")))
            hit = {t for t in self.data_streams if rx.fullmatch(t + "-default")}
            if m == "GET" and "view_index_metadata" in self.missing_privileges and "*" in pattern:
                # security resolves a wildcard to the names the user may see: none, not a 403
                return self._json(200, {"data_streams": []})
            if m == "GET":  # a wildcard that matches nothing is 200 with an empty list
                if not hit and "*" not in pattern:
                    return self._json(404, {"error": {"type": "index_not_found_exception", "reason": pattern}})
                return self._json(200, {"data_streams": [{"name": t + "-default", "template": self.stream_template.get(t, t)}
                                                         for t in sorted(hit)]})
            if not hit:
                return self._json(404, {"error": {"type": "index_not_found_exception", "reason": pattern}})
            self.data_streams -= hit
            return self._json(200, {"acknowledged": True})
        mm = re.fullmatch(r"/([^/_][^/]*)/_rollover", path)
        if mm and m == "POST":
            if not any(t + "-default" == mm.group(1) for t in self.data_streams):
                return self._json(404, {"error": {"type": "index_not_found_exception", "reason": mm.group(1)}})
            self.rollovers.append((mm.group(1), call["query"]))
            lazy = call["query"].get("lazy") == ["true"]
            return self._json(200, {"acknowledged": True, "rolled_over": not lazy, "lazy": lazy, "dry_run": False,
                                    "old_index": ".ds-x-1", "new_index": ".ds-x-1" if lazy else ".ds-x-2"})
        return self._json(400, {"error": {"type": "fake", "reason": f"unexpected {m} {path}"}})

    # -- Kibana ---------------------------------------------------------------------------------
    def _kb(self, request):
        call = self._record("kb", request)
        m, path = call["method"], self._strip(call["path"])
        space = self._space_of_path(call["path"])
        if m != "GET" and call["headers"].get("kbn-xsrf") != "true":
            return self._json(400, {"statusCode": 400, "error": "Bad Request", "message": "Request must contain a kbn-xsrf header."})
        if self._forbidden(m, path):
            return self._json(403, {"statusCode": 403, "error": "Forbidden", "message": "Unauthorized to do that"})
        for (am, ap), (status, answer) in self.answer.items():
            if am == m and re.fullmatch(ap, path):
                return self._json(status, answer)
        ctype = call["headers"].get("Content-Type", "")
        body = json.loads(call["body"]) if call["body"] and ctype.startswith("application/json") else None
        if m == "GET" and path == "/api/status":
            return self._json(200, {"name": "kb", "version": {"number": self.kb_version, "build_flavor": self.kb_flavor},
                                    "status": {"overall": {"level": "available"}}})
        if m == "GET" and path == "/api/spaces/space":  # the spaces the user may see
            ids = ["default"] + sorted(set(self.space.values()) - {"default"})
            return self._json(200, [{"id": i, "name": i.title(), "disabledFeatures": []} for i in ids])
        if path.startswith("/api/data_views/data_view"):
            dv_id = path.rsplit("/", 1)[-1]
            visible = dv_id in self.data_views and self.in_space(("index-pattern", dv_id), space)
            if m == "GET":
                if not visible:
                    return self._json(404, {"statusCode": 404, "error": "Not Found", "message": f"{dv_id} not found"})
                return self._json(200, {"data_view": self.data_views[dv_id]})
            if m == "POST" and path == "/api/data_views/data_view":
                # create: `override` replaces a data view with the same *title* (documented); an
                # existing id under another title is a conflict, as on Kibanas that do not overwrite by id
                dv = body["data_view"]
                same_title = [i for i, v in self.data_views.items()
                              if v["title"] == dv["title"] and self.in_space(("index-pattern", i), space)]
                if same_title and not body.get("override"):
                    return self._json(400, {"statusCode": 400, "message": f"Duplicate data view: {dv['title']}"})
                for i in same_title:
                    del self.data_views[i]
                if dv["id"] in self.data_views:  # in this space or in any other
                    return self._json(409, {"statusCode": 409, "error": "Conflict",
                                            "message": f"Saved object [index-pattern/{dv['id']}] conflict"})
                self.data_views[dv["id"]] = dict(dv, version="WzEsMV0=")
                self.space[("index-pattern", dv["id"])] = space
                return self._json(200, {"data_view": self.data_views[dv["id"]]})
            if m == "POST":  # update: only the given fields change
                if not visible:
                    return self._json(404, {"statusCode": 404, "error": "Not Found", "message": f"{dv_id} not found"})
                self.data_views[dv_id].update(body["data_view"])
                return self._json(200, {"data_view": self.data_views[dv_id]})
            if m == "DELETE":
                if not visible:
                    return self._json(404, {"statusCode": 404, "message": "not found"})
                del self.data_views[dv_id]
                return 200, {}, ""
        if path == "/api/saved_objects/_export" and m == "POST":
            lines, missing = [], []
            for o in body["objects"]:
                key = (o["type"], o["id"])
                obj = self.saved_objects.get(key) if self.in_space(key, space) else None
                (lines.append(json.dumps(obj)) if obj else missing.append(o))
            if missing:
                return self._json(400, {"statusCode": 400, "error": "Bad Request",
                                        "message": "Error fetching objects to export", "attributes": {"objects": missing}})
            lines.append(json.dumps({"exportedCount": len(lines), "missingRefCount": 0, "missingReferences": []}))
            return 200, {"content-type": "application/ndjson"}, "\n".join(lines) + "\n"
        if path == "/api/saved_objects/_import" and m == "POST":
            assert ctype.startswith("multipart/form-data; boundary="), ctype
            msg = email.parser.BytesParser().parsebytes(
                f"Content-Type: {ctype}\r\n\r\n".encode() + call["body"].encode())
            parts = msg.get_payload()
            (part,) = parts
            assert part.get_param("name", header="content-disposition") == "file"
            assert part.get_filename().endswith(".ndjson")
            overwrite = call["query"].get("overwrite") == ["true"]
            ok = []
            for line in part.get_payload(decode=True).decode().splitlines():
                obj = json.loads(line)
                key = (obj["type"], obj["id"])
                result = {"id": obj["id"], "type": obj["type"]}
                if key in self.saved_objects and not self.in_space(key, space):
                    # Kibana's import (check_conflicts): the id exists in another space, an
                    # unresolvable conflict, so the object is created under a new random id
                    result["destinationId"] = str(uuid.uuid4())
                    key = (obj["type"], result["destinationId"])
                elif key in self.saved_objects and not overwrite:
                    return self._json(200, {"success": False, "successCount": 0,
                                            "errors": [{"id": obj["id"], "type": obj["type"], "error": {"type": "conflict"}}]})
                migrated = copy.deepcopy(obj)
                migrated["id"] = key[1]
                migrated["migrationVersion"] = {"dashboard": "10.0.0"}  # Kibana rewrites on import
                self.saved_objects[key] = migrated
                self.space[key] = space
                ok.append(result)
            return self._json(200, {"success": True, "successCount": len(ok), "successResults": ok})
        mm = re.fullmatch(r"/api/saved_objects/(\w+)/(.+)", path)
        if mm and m == "DELETE" and self.kb_flavor == "serverless":
            # the saved objects CRUD routes are `internal` on Serverless (elastic/kibana#184408), and
            # internal routes answer this to a request without x-elastic-internal-origin
            return self._json(400, {"statusCode": 400, "error": "Bad Request", "message":
                f"uri [{call['path']}] with method [delete] exists but is not available with the current configuration"})
        mm_dash = re.fullmatch(r"/api/dashboards/([^/]+)", path)
        if mm_dash and m == "DELETE" and self.kb_flavor == "serverless" and self.dashboards_api:
            key = ("dashboard", mm_dash.group(1))  # Serverless's public dashboards API
            if key not in self.saved_objects or not self.in_space(key, space):
                return self._json(404, {"statusCode": 404, "error": "Not Found", "message": "not found"})
            del self.saved_objects[key]
            return self.dashboards_api_status, {}, ""
        if mm and m == "DELETE":
            key = (mm.group(1), mm.group(2))
            if key not in self.saved_objects or not self.in_space(key, space):
                return self._json(404, {"statusCode": 404, "message": "Saved object not found"})
            del self.saved_objects[key]
            return self._json(200, {})
        mm = re.fullmatch(r"/api/alerting/rule/([^/]+)", path)
        if mm:
            rid = mm.group(1)
            visible = rid in self.rules and self.in_space(("alert", rid), space)
            if m == "GET":
                if not visible:
                    return self._json(404, {"statusCode": 404, "message": f"Saved object [alert/{rid}] not found"})
                return self._json(200, self.rules[rid])
            if m in ("POST", "PUT") and body.get("actions") and not self.connectors_readable:
                return self._json(403, {"statusCode": 403, "error": "Forbidden", "message": "Unauthorized to get actions"})
            if m in ("POST", "PUT"):
                # the rules client's validateActions: every action has a frequency, or the rule has
                # a rule-level notify_when/throttle and no action has one (system actions, which have
                # no group, are not checked)
                rule_level = body.get("notify_when") is not None or body.get("throttle") is not None
                groups = [a["group"] for a in body.get("actions", [])
                          if a.get("group") and bool(a.get("frequency")) == rule_level]
                if groups:
                    why = ("Cannot specify per-action frequency params when notify_when or throttle are defined "
                           "at the rule level" if rule_level else "Actions missing frequency parameters")
                    return self._json(400, {"statusCode": 400, "error": "Bad Request", "message":
                        f"Failed to validate actions due to the following error: {why}: {', '.join(map(str, groups))}"})
            if m == "POST":
                if rid in self.rules:  # in this space or in any other: rule ids are unique across spaces
                    return self._json(409, {"statusCode": 409, "error": "Conflict",
                                            "message": f"Saved object [alert/{rid}] conflict"})
                for required in ("name", "rule_type_id", "consumer", "schedule", "params"):
                    assert required in body, required
                self.rules[rid] = {**body, "id": rid, "mute_all": False, "execution_status": {"status": "pending"},
                                   "actions": [dict(a, connector_type_id=".email") for a in body.get("actions", [])]}
                self.space[("alert", rid)] = space
                return self._json(200, self.rules[rid])
            if m == "PUT":
                if not visible:
                    return self._json(404, {"statusCode": 404})
                for forbidden in ("rule_type_id", "consumer", "enabled"):
                    if forbidden in body:
                        return self._json(400, {"statusCode": 400, "message": f"[request body.{forbidden}]: definition for this key is missing"})
                for a in body["actions"]:
                    if "connector_type_id" in a:
                        return self._json(400, {"statusCode": 400, "message": "[request body.actions.0.connector_type_id]: definition for this key is missing"})
                self.rules[rid].update(body)
                self.rules[rid]["actions"] = [dict(a, connector_type_id=".email") for a in body["actions"]]
                return self._json(200, self.rules[rid])
            if m == "DELETE":
                if not visible:
                    return self._json(404, {"statusCode": 404})
                del self.rules[rid]
                return 204, {}, ""
        return self._json(400, {"statusCode": 400, "message": f"unexpected {m} {path}"})


@pytest.fixture
def stack():
    fake = FakeStack()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake.install(rsps)
        yield fake


def run(*args, env=None):
    env = {"ELASTIC_API_KEY": API_KEY, **(env or {})}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def install(*extra, env=None):
    return run("install", "--es-url", ES, "--kibana-url", KB, *extra, env=env)


N_ES = len(E.es_assets())
N_KB = 1 + len(K.dashboards()) + len(K.rules())


# ---------------------------------------------------------------------------------------------
# install


def test_fresh_install_makes_exactly_the_documented_requests(stack):
    result = install()
    assert result.exit_code == 0, result.output
    assert f"install complete: {N_ES + N_KB} created" in result.output
    calls = [(c["service"], c["method"], c["path"]) for c in stack.calls]
    # version first, then privileges, then the assets
    assert calls[:3] == [("es", "GET", "/"), ("kb", "GET", "/api/status"),
                         ("es", "POST", "/_security/user/_has_privileges")]
    hp = json.loads(stack.calls[2]["body"])
    assert set(hp["cluster"]) == {"manage_index_templates", "manage_pipeline"}
    # every Elasticsearch asset is read before any is written (the foreign-asset check)
    expected = [("es", "GET", a.path) for a in E.es_assets()] + [("es", "PUT", a.path) for a in E.es_assets()]
    expected += [("kb", "GET", f"/api/data_views/data_view/{K.DATA_VIEW_ID}"),
                 ("kb", "POST", "/api/data_views/data_view")]
    for d in K.dashboards():
        expected += [("kb", "POST", "/api/saved_objects/_export"), ("kb", "POST", "/api/saved_objects/_import")]
    for r in K.rules():
        expected += [("kb", "GET", f"/api/alerting/rule/{r.id}"), ("kb", "POST", f"/api/alerting/rule/{r.id}")]
    assert calls[3:] == expected
    # bodies are the bundle's
    puts = {c["path"]: json.loads(c["body"]) for c in stack.calls if c["method"] == "PUT"}
    for a in E.es_assets():
        assert puts[a.path] == a.body
    # every Kibana write carries kbn-xsrf; every request carries the API key
    for c in stack.calls:
        assert c["headers"]["Authorization"] == f"ApiKey {API_KEY}"
        if c["service"] == "kb" and c["method"] != "GET":
            assert c["headers"]["kbn-xsrf"] == "true"
    imports = [c for c in stack.calls if c["path"] == "/api/saved_objects/_import"]
    assert all(c["query"] == {"overwrite": ["true"]} for c in imports)
    assert {k[1] for k in stack.saved_objects} == {d.id for d in K.dashboards()}
    rule = stack.rules[K.RULE_ID_HEADROOM_TPM]
    assert rule["name"] == "[OpenAI] Rate limit headroom low" and rule["alert_delay"] == {"active": 3}
    assert rule["params"]["groupBy"] == "row" and rule["enabled"] is True
    assert API_KEY not in result.output


def test_reinstall_changes_nothing(stack):
    assert install().exit_code == 0
    stack.calls.clear()
    result = install()
    assert result.exit_code == 0, result.output
    assert f"install complete: {N_ES + N_KB} unchanged" in result.output
    assert stack.writes() == []


def test_upgrade_updates_only_what_changed_and_keeps_rule_actions(stack):
    assert install().exit_code == 0
    # the user wired a connector to the headroom rule and disabled the RPM rule
    user_action = {"group": "query matched", "id": "my-connector", "uuid": "a1",
                   "params": {"message": "{{context.message}}"},
                   "frequency": {"summary": False, "notify_when": "onActionGroupChange", "throttle": None},
                   "connector_type_id": ".slack"}
    stack.rules[K.RULE_ID_HEADROOM_TPM]["actions"] = [user_action]
    stack.rules[K.RULE_ID_HEADROOM_RPM]["enabled"] = False
    # an older bundle left a different component template behind
    name = "logs-openai.completions@package"
    stack.component[name]["_meta"]["fingerprint"] = "0000000000000000"
    stack.calls.clear()
    result = install("--headroom-threshold", "0.9")
    assert result.exit_code == 0, result.output
    assert re.search(r"updated\s+component_template logs-openai.completions@package", result.output)
    assert re.search(r"updated\s+rule 6f1c2a52-3b7e-4c8e-9a51-0e6a1d3f7b01", result.output)
    writes = [(c["method"], c["path"]) for c in stack.writes()]
    assert writes == [("PUT", f"/_component_template/{name}"),
                      ("PUT", f"/api/alerting/rule/{K.RULE_ID_HEADROOM_TPM}"),
                      ("PUT", f"/api/alerting/rule/{K.RULE_ID_HEADROOM_RPM}")]
    put = json.loads([c for c in stack.writes() if c["path"].endswith(K.RULE_ID_HEADROOM_TPM)][0]["body"])
    assert set(put) == {"name", "tags", "schedule", "params", "actions", "alert_delay"}
    assert put["actions"] == [{k: v for k, v in user_action.items() if k != "connector_type_id"}]
    assert "WHERE tpm_utilization >= 0.9" in put["params"]["esqlQuery"]["esql"]
    # the default usage window: one breaching minute is seen by the 3 runs of the alert delay
    assert "@timestamp >= NOW() - 22 minutes" in put["params"]["esqlQuery"]["esql"]
    assert (put["params"]["timeWindowSize"], put["alert_delay"]) == (70, {"active": 3})
    assert stack.rules[K.RULE_ID_HEADROOM_TPM]["actions"][0]["id"] == "my-connector"
    assert stack.rules[K.RULE_ID_HEADROOM_RPM]["enabled"] is False


def test_a_rule_whose_connectors_use_the_rule_level_frequency_is_updated_and_moved(stack):
    """A connector attached through the API (or Terraform) in the rule-level form: `notify_when`
    (and `throttle`) on the rule, none on its actions. Kibana refuses a write whose actions have no
    frequency and no rule-level one ("Actions missing frequency parameters"), so an upgrade that
    sent the actions back without the rule's notify_when stopped at that rule, and so did the
    move of such a rule into a space's id."""
    assert install().exit_code == 0
    action = {"group": "query matched", "id": "my-connector", "uuid": "a1", "params": {"message": "x"}}
    stack.rules[K.RULE_ID_HEADROOM_TPM].update(actions=[action], notify_when="onThrottleInterval", throttle="1h")
    stack.calls.clear()
    result = install("--headroom-threshold", "0.9")
    assert result.exit_code == 0, result.output
    put = json.loads([c for c in stack.writes() if c["path"].endswith(K.RULE_ID_HEADROOM_TPM)][0]["body"])
    assert (put["notify_when"], put["throttle"], put["actions"]) == ("onThrottleInterval", "1h", [action])
    # an action with its own frequency: the rule's notify_when (null, as Kibana answers) stays out
    stack.rules[K.RULE_ID_HEADROOM_RPM].update(actions=[dict(action, frequency=FREQUENCY)], notify_when=None,
                                               throttle=None)
    stack.calls.clear()
    assert install("--headroom-threshold", "0.8").exit_code == 0
    put = json.loads([c for c in stack.writes() if c["path"].endswith(K.RULE_ID_HEADROOM_RPM)][0]["body"])
    assert "notify_when" not in put and "throttle" not in put
    # an earlier version's rule in team-a moves to the space's id with its rule-level frequency
    for key in {("index-pattern", K.DATA_VIEW_ID)} | {("dashboard", d.id) for d in K.dashboards()} | {
            ("alert", r.id) for r in K.rules()}:
        stack.space[key] = "team-a"
    result = install("--space", "team-a")
    assert result.exit_code == 0, result.output
    moved = stack.rules[K.rule_id(K.RULE_ID_HEADROOM_TPM, "team-a")]
    assert (moved["notify_when"], moved["throttle"], [a["id"] for a in moved["actions"]]) == (
        "onThrottleInterval", "1h", ["my-connector"])


def test_tags_a_user_added_to_a_rule_survive_installs(stack):
    """A tag added in Kibana (to find or group the rules) was replaced by ours at every install,
    the same version's too: the rule was reported updated and the tag was gone."""
    assert install().exit_code == 0
    stack.rules[K.RULE_ID_HEADROOM_TPM]["tags"] = [*K.TAGS, "team-payments"]
    legacy = dict(stack.rules[K.RULE_ID_HEADROOM_RPM])
    result = install()
    assert result.exit_code == 0, result.output
    assert re.search(r"unchanged\s+rule 6f1c2a52-3b7e-4c8e-9a51-0e6a1d3f7b01", result.output), result.output
    assert stack.rules[K.RULE_ID_HEADROOM_TPM]["tags"] == [*K.TAGS, "team-payments"]
    # an upgrade that changes the rule keeps the tag too
    result = install("--headroom-threshold", "0.9")
    assert re.search(r"updated\s+rule 6f1c2a52-3b7e-4c8e-9a51-0e6a1d3f7b01", result.output), result.output
    assert stack.rules[K.RULE_ID_HEADROOM_TPM]["tags"] == [*K.TAGS, "team-payments"]
    assert stack.rules[K.RULE_ID_HEADROOM_RPM]["tags"] == legacy["tags"]


def test_an_updated_template_reaches_the_data_streams_that_exist(stack):
    """A template applies when a backing index is created: an upgrade's new mappings (the audit
    payload's ignore_above) left the live write index as it was, rejecting what they fix, until a
    rollover that may be a month away. Each existing stream of an updated template is rolled over
    lazily (at its next write); without the privilege for it, the install says what to run."""
    def changed(store, name):  # as an earlier version wrote it: other mappings (or no content mark)
        stack_meta = store[name]["_meta"]
        stack_meta["fingerprint"] = "0000000000000000"
        stack_meta["content_fingerprint"] = "1111111111111111"

    assert install().exit_code == 0
    stack.data_streams |= {"logs-openai.audit", "logs-openai.completions"}
    changed(stack.component, "logs-openai.audit@package")
    changed(stack.index, "logs-openai.audit")
    result = install()
    assert result.exit_code == 0, result.output
    assert stack.rollovers == [("logs-openai.audit-default", {"lazy": ["true"]})]  # once, and only audit's
    assert re.search(r"updated\s+component_template logs-openai.audit@package\s+\(logs-openai.audit-default "
                     r"rolls over at its next write", result.output), result.output
    # the documented installer role may not roll over: not a failure, the way to apply it is named
    stack.rollovers.clear()
    stack.forbid.add(("POST", r"/[^/]+/_rollover"))
    changed(stack.component, "logs-openai.audit@package")
    result = install()
    assert result.exit_code == 0, result.output
    assert stack.rollovers == []
    assert "logs-openai.audit-default keeps the earlier mappings until its next rollover: " \
           "POST logs-openai.audit-default/_rollover applies them now" in result.output
    # a dry run reads, and writes nothing
    stack.calls.clear()
    changed(stack.component, "logs-openai.audit@package")
    assert install("--dry-run").exit_code == 0 and stack.writes() == []
    # an earlier version's template, without the content mark: rolled over, as it cannot be told
    stack.forbid.clear()
    stack.rollovers.clear()
    del stack.index["logs-openai.audit"]["_meta"]["content_fingerprint"]
    stack.index["logs-openai.audit"]["_meta"]["fingerprint"] = "0000000000000000"
    assert install().exit_code == 0 and stack.rollovers == [("logs-openai.audit-default", {"lazy": ["true"]})]


def test_a_new_version_with_the_same_mappings_rolls_no_data_stream_over(stack, monkeypatch):
    """Every asset's `_meta` holds the bundle's version, bumped at any change (a dashboard's): each
    upgrade updated every template, and each of them rolled all its data streams over (a new
    backing index per stream and namespace at every upgrade, said to bring mappings that were
    the same). Only a change to what applies to a backing index rolls its streams over."""
    assert install().exit_code == 0
    stack.data_streams |= {"logs-openai.audit", "logs-openai.completions", "logs-openai"}
    monkeypatch.setattr(E, "VERSION", "99.0.0")
    result = install()
    assert result.exit_code == 0, result.output
    assert re.search(r"updated\s+index_template logs-openai.audit\n", result.output), result.output
    assert stack.rollovers == [] and "next write" not in result.output, result.output


def test_changed_dashboard_is_reimported(stack):
    assert install().exit_code == 0
    key = ("dashboard", "openai-elastic-costs")
    stack.saved_objects[key]["attributes"]["description"] = "edited [openai-assets 0.0.1 #deadbeefdeadbeef]"
    stack.calls.clear()
    result = install()
    assert re.search(r"updated\s+dashboard openai-elastic-costs", result.output)
    assert [c["path"] for c in stack.writes()] == ["/api/saved_objects/_import"]


def test_dry_run_prints_the_plan_and_writes_nothing(stack):
    result = install("--dry-run")
    assert result.exit_code == 0, result.output
    assert stack.writes() == []
    assert "would create  index_template logs-openai.completions" in result.output
    assert f"dry run complete: {N_ES + N_KB} would create" in result.output


def test_space_prefixes_every_kibana_path(stack):
    assert install("--space", "team-ai").exit_code == 0
    kb_paths = [c["path"] for c in stack.calls if c["service"] == "kb" and c["path"] != "/api/status"]
    assert kb_paths and all(p.startswith("/s/team-ai/api/") for p in kb_paths)


def test_space_default_uses_the_unprefixed_paths(stack):
    """The default space's URLs have no `/s/<space>` prefix: `--space default` is the same install
    as none, on the same paths as the exported manifest's."""
    assert install("--space", "default").exit_code == 0
    kb_paths = [c["path"] for c in stack.calls if c["service"] == "kb"]
    assert kb_paths and all(p.startswith("/api/") for p in kb_paths), kb_paths


# ---------------------------------------------------------------------------------------------
# Kibana spaces: ids are unique across all spaces, so each space gets its own


def _kb_ids(space=None):
    """{(kind, id)} install writes into `space`, as the fake Kibana keys them."""
    return ({("index-pattern", K.data_view_id(space))} | {("dashboard", d.id) for d in K.dashboards(space)}
            | {("alert", r.id) for r in K.rules(space=space)})


def test_a_second_space_gets_its_own_objects_and_both_installs_work(stack):
    assert install().exit_code == 0
    result = install("--space", "team-a")
    assert result.exit_code == 0, result.output
    assert f"install complete: {N_ES} unchanged, {N_KB} created" in result.output
    assert stack.objects_in("default") == _kb_ids() == _kb_ids("default")
    assert stack.objects_in("team-a") == _kb_ids("team-a")
    assert not _kb_ids() & _kb_ids("team-a")
    # nothing else: no copy that Kibana imported under a random id
    assert len(stack.saved_objects) == 2 * len(K.dashboards()) and len(stack.rules) == 2 * len(K.rules())
    # the same dashboards, rules and data view in each space, under that space's ids
    titles = lambda sp: sorted(stack.saved_objects[("dashboard", d.id)]["attributes"]["title"] for d in K.dashboards(sp))
    assert titles(None) == titles("team-a")
    assert {stack.rules[r.id]["name"] for r in K.rules(space="team-a")} == {r.name for r in K.rules()}
    assert stack.data_views[K.data_view_id("team-a")]["title"] == K.DATA_VIEW_TITLE


@pytest.mark.parametrize("first, second", [(None, "team-a"), ("team-a", None), ("team-a", "team-b")])
def test_installs_in_two_spaces_in_either_order_are_idempotent(stack, first, second):
    space = lambda sp: ("--space", sp) if sp else ()
    for sp in (first, second):
        result = install(*space(sp))
        assert result.exit_code == 0, result.output
    for sp in (first, second):
        stack.calls.clear()
        result = install(*space(sp))
        assert result.exit_code == 0, result.output
        assert f"install complete: {N_ES + N_KB} unchanged" in result.output
        assert stack.writes() == []
    assert stack.objects_in(first or "default") == _kb_ids(first)
    assert stack.objects_in(second or "default") == _kb_ids(second)


def test_uninstall_of_one_space_leaves_the_other_whole(stack):
    assert install().exit_code == 0
    assert install("--space", "team-a").exit_code == 0
    stack.rules[K.rule_id(K.RULE_ID_HEADROOM_TPM, None)]["actions"] = [{"group": "query matched", "id": "c1", "params": {}, "frequency": FREQUENCY}]
    es_before = copy.deepcopy((stack.component, stack.index, stack.pipelines))
    stack.calls.clear()
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--space", "team-a")
    assert result.exit_code == 0, result.output
    assert f"uninstall complete: {N_KB} deleted, {N_ES} kept" in result.output, result.output
    assert "Kibana space default still has openai-assets' dashboards" in result.output
    assert stack.objects_in("team-a") == set()
    assert stack.objects_in("default") == _kb_ids()
    # the Elasticsearch assets serve the default space's install: untouched
    assert (stack.component, stack.index, stack.pipelines) == es_before
    assert not [c for c in stack.writes() if c["service"] == "es"]
    assert stack.rules[K.RULE_ID_HEADROOM_TPM]["actions"][0]["id"] == "c1"
    # the default space's install is intact: a reinstall there changes nothing
    stack.calls.clear()
    result = install()
    assert result.exit_code == 0, result.output
    assert stack.writes() == [] and f"install complete: {N_ES + N_KB} unchanged" in result.output
    # and the other way round
    assert install("--space", "team-a").exit_code == 0
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--delete-data")
    assert result.exit_code == 0, result.output
    assert stack.objects_in("default") == set() and stack.objects_in("team-a") == _kb_ids("team-a")
    assert re.search(r"kept\s+data_stream logs-openai-\*\s+\(Kibana space team-a still has", result.output)
    assert stack.index and stack.pipelines  # kept for team-a
    # the last space's uninstall removes them
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--space", "team-a")
    assert result.exit_code == 0, result.output
    assert stack.objects_in("team-a") == set() and stack.index == {} and stack.pipelines == {}


@pytest.mark.parametrize("how", ["earlier version's ids", "unreadable"])
def test_uninstall_keeps_the_elasticsearch_assets_another_space_may_use(stack, how):
    assert install().exit_code == 0
    if how == "unreadable":  # team-a's data view cannot be read: counted as an install there
        assert install("--space", "team-a", "--skip-kibana").exit_code == 0
        stack.space[("dashboard", "elsewhere")] = "team-a"
        stack.forbid.add(("GET", r"/api/data_views/data_view/team-a\..*"))
    else:  # team-a holds an earlier version's install, under the default space's ids
        stack.space[("index-pattern", K.DATA_VIEW_ID)] = "team-a"
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code == 0, result.output
    assert "Kibana space team-a still has" in result.output and stack.index and stack.pipelines


def test_references_resolve_within_the_space(stack):
    assert install().exit_code == 0
    assert install("--space", "team-a").exit_code == 0
    for sp in ("default", "team-a"):
        have = stack.objects_in(sp)
        for key in have:
            if key[0] in ("index-pattern", "alert"):
                continue
            for ref in stack.saved_objects[key].get("references", []):
                assert (ref["type"], ref["id"]) in have, (sp, key, ref)
    # what install imports refers only to the same space's objects, whatever a future panel adds
    for sp in (None, "team-a"):
        ours = {i for _, i in _kb_ids(sp)}
        for obj in K.saved_objects(sp):
            assert obj["id"] in ours
            assert all(ref["id"] in ours for ref in obj.get("references", [])), obj["id"]


def test_a_reference_to_our_data_view_or_a_dashboard_gets_the_space_s_id():
    """Dashboards have no references today (ES|QL panels); one a future panel adds to our data view
    or another of our dashboards must name this space's object, and any other stays as it is."""
    refs = [{"type": "index-pattern", "id": K.DATA_VIEW_ID, "name": "dv"},
            {"type": "dashboard", "id": K.DASHBOARD_IDS[0], "name": "d"},
            {"type": "tag", "id": "someone-elses", "name": "t"}]
    assert [r["id"] for r in K.space_references(refs, "team-a")] == [
        K.data_view_id("team-a"), K.object_id(K.DASHBOARD_IDS[0], "team-a"), "someone-elses"]
    assert K.space_references(refs, None) == refs

def test_space_ids_are_stable_unique_and_kibana_valid():
    spaces = [None, "default", "team-a", "team-b", "a", "team_a", "a-team", "x" * 60]
    sets = {sp: _kb_ids(sp) for sp in spaces}
    assert sets[None] == sets["default"]
    # the default space keeps the ids every earlier install used
    assert {i for _, i in sets[None]} == ({K.DATA_VIEW_ID} | {d.id for d in K.dashboards()}
                                          | {K.RULE_ID_HEADROOM_TPM, K.RULE_ID_HEADROOM_RPM,
                                             K.RULE_ID_LIMITS_STALE, K.RULE_ID_PROJECT_LIMITS_FAILING})
    every = [i for sp in spaces[1:] for _, i in sets[sp]]
    assert len(every) == len(set(every))  # unique across spaces and assets
    assert _kb_ids("team-a") == _kb_ids("team-a")  # stable
    v4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    for sp in spaces:
        for kind, i in sets[sp]:
            if kind == "alert":
                assert v4.fullmatch(i), i  # a caller-chosen rule id is a UUID v4
            else:
                assert re.fullmatch(r"[a-z0-9_.-]+", i) and len(i) < 200, i


def test_an_install_into_a_space_by_an_earlier_version_is_moved_to_the_space_ids(stack):
    """Before per-space ids, an install into one non-default space used the default space's ids
    there. Installing into that space again moves each object to the space's ids (the user's rule
    actions and enabled state kept) instead of leaving a second copy of everything."""
    legacy = {("index-pattern", K.DATA_VIEW_ID)} | {("dashboard", d.id) for d in K.dashboards()} | {
        ("alert", r.id) for r in K.rules()}
    assert install().exit_code == 0  # the earlier version's objects, moved to team-a
    for key in legacy:
        stack.space[key] = "team-a"
    stack.rules[K.RULE_ID_HEADROOM_TPM]["actions"] = [{"group": "query matched", "id": "my-connector", "params": {}, "frequency": FREQUENCY}]
    stack.rules[K.RULE_ID_LIMITS_STALE]["enabled"] = False
    # the default space cannot take those ids while team-a holds them: said, with what to do
    result = install()
    assert result.exit_code == 1, result.output
    # the space that holds them is named, and so is the command to run there
    assert "exists in Kibana space team-a" in result.output and "install --space team-a`" in result.output, result.output
    assert len(stack.saved_objects) == len(K.dashboards())  # no stray copy left behind
    result = install("--space", "team-a")
    assert result.exit_code == 0, result.output
    assert "moved from" in result.output
    assert stack.objects_in("team-a") == _kb_ids("team-a")
    tpm = stack.rules[K.rule_id(K.RULE_ID_HEADROOM_TPM, "team-a")]
    assert [a["id"] for a in tpm["actions"]] == ["my-connector"]
    assert "connector_type_id" in tpm["actions"][0]  # Kibana's own field, not sent back by us
    assert stack.rules[K.rule_id(K.RULE_ID_LIMITS_STALE, "team-a")]["enabled"] is False
    assert stack.rules[K.rule_id(K.RULE_ID_HEADROOM_RPM, "team-a")]["enabled"] is True
    # now the default space installs, and both are idempotent
    assert install().exit_code == 0
    assert stack.objects_in("default") == _kb_ids()
    for extra in ((), ("--space", "team-a")):
        stack.calls.clear()
        assert install(*extra).exit_code == 0 and stack.writes() == []


def test_an_earlier_version_s_install_into_a_space_is_moved_on_serverless_too(stack):
    """Serverless Kibana answers the saved objects API's DELETE with 400 (an internal route there):
    the move of an earlier version's dashboards to a space's own ids stopped at the first one
    ("install incomplete"); it deletes them through the dashboards API, as uninstall does, and a
    Kibana without that API either is told what to delete by hand, not left with a silent copy."""
    _serverless(stack)
    legacy = {("index-pattern", K.DATA_VIEW_ID)} | {("dashboard", d.id) for d in K.dashboards()} | {
        ("alert", r.id) for r in K.rules()}
    assert install().exit_code == 0
    for key in legacy:
        stack.space[key] = "team-a"
    stack.dashboards_api = False
    result = install("--space", "team-a")
    assert result.exit_code == 1 and "delete it in Stack Management > Saved objects" in result.output, result.output
    stack.dashboards_api = True
    result = install("--space", "team-a")
    assert result.exit_code == 0, result.output
    assert stack.objects_in("team-a") == _kb_ids("team-a")
    assert stack.objects_in("default") == set()


def test_a_space_the_user_cannot_list_is_not_named_but_the_remedy_is_given(stack):
    """Without the Spaces API (403), the refusal cannot say which space holds the ids: it says so
    and gives the command with a placeholder."""
    assert install().exit_code == 0
    for key in list(stack.objects_in("default")):
        if key[0] == "index-pattern":
            stack.space[key] = "team-a"
    stack.forbid.add(("GET", r"/api/spaces/space"))
    result = install()
    assert result.exit_code == 1
    assert "exists in another Kibana space" in result.output and "install --space <that space>`" in result.output


@pytest.mark.parametrize("held", ["index-pattern", "dashboard", "alert"])
def test_a_dry_run_in_the_default_space_says_what_install_would_stop_at(stack, held):
    """An earlier version's install in team-a holds the default space's ids: `install` there stops
    at the first of them (409, or a copy Kibana imports under a new id), but `--dry-run` said
    `would create` for each and exited 0, so the plan hid the failure and its remedy."""
    assert install().exit_code == 0
    for key in list(stack.objects_in("default")):
        if key[0] == held:
            stack.space[key] = "team-a"
    stack.calls.clear()
    result = install("--dry-run")
    assert stack.writes() == []
    assert result.exit_code == 1, result.output
    assert "exists in Kibana space team-a" in result.output and "install --space team-a`" in result.output, result.output
    real = install()
    assert real.exit_code == 1 and "exists in Kibana space team-a" in real.output, real.output


@pytest.mark.parametrize("stuck", [("DELETE", r"/api/alerting/rule/" + K.RULE_ID_HEADROOM_TPM),
                                   ("DELETE", r"/api/saved_objects/dashboard/openai-elastic-costs")])
def test_a_move_stopped_between_create_and_delete_is_finished_by_the_next_install(stack, stuck):
    """A move creates the space's object, then deletes the old one. When that delete failed (a
    5xx, a dropped connection, Ctrl-C), the next install found the space's id there, said
    `unchanged` and left the old object for good: the old rule fired beside the new one, and the
    default space's install stayed refused, its advice (`install --space team-a`) no help."""
    assert install().exit_code == 0
    for key in list(stack.objects_in("default")):
        stack.space[key] = "team-a"  # an earlier version's install in team-a
    stack.forbid.add(stuck)
    assert install("--space", "team-a").exit_code != 0
    stack.forbid.clear()
    stack.calls.clear()
    result = install("--space", "team-a", "--dry-run")
    assert result.exit_code == 0 and stack.writes() == [], result.output
    assert re.search(r"would update\s+\S+ \S+.*deleted \S+, left by an earlier move", result.output), result.output
    result = install("--space", "team-a")
    assert result.exit_code == 0, result.output
    assert "left by an earlier move" in result.output
    assert stack.objects_in("team-a") == _kb_ids("team-a")
    assert install().exit_code == 0 and stack.objects_in("default") == _kb_ids()
    stack.calls.clear()
    result = install("--space", "team-a")
    assert stack.writes() == [] and f"install complete: {N_ES + N_KB} unchanged" in result.output


def test_a_dry_run_names_the_data_view_left_by_a_move_also_when_its_own_changed(stack):
    """team-a has its data view under its own id, edited since, and the default space's id is still
    there (a move that stopped before its delete): the dry run says `would update` and that it would
    delete the leftover, as the install then does, not only `would update`."""
    assert install("--space", "team-a").exit_code == 0
    ours = K.data_view_id("team-a")
    stack.data_views[K.DATA_VIEW_ID] = dict(stack.data_views[ours], id=K.DATA_VIEW_ID)
    stack.space[("index-pattern", K.DATA_VIEW_ID)] = "team-a"
    stack.data_views[ours]["name"] = "renamed by someone"
    stack.calls.clear()
    result = install("--space", "team-a", "--dry-run")
    assert result.exit_code == 0 and stack.writes() == [], result.output
    line = next(x for x in result.output.splitlines() if f"data_view {ours}" in x)
    assert line.startswith("would update") and f"deleted {K.DATA_VIEW_ID}, left by an earlier move" in line, line
    result = install("--space", "team-a")
    assert result.exit_code == 0, result.output
    assert K.DATA_VIEW_ID not in stack.data_views and stack.data_views[ours]["name"] == K.DATA_VIEW_NAME


def test_an_import_answer_that_does_not_say_success_is_a_failure(stack):
    """Only `success: true` in `_import`'s answer means the dashboard was written: an answer
    without it (a proxy's 200, another API) is a failure, not an install reported complete."""
    stack.answer[("POST", r"/api/saved_objects/_import")] = (200, {"successCount": 0})
    result = install()
    assert result.exit_code == 1, result.output
    assert "failed to import dashboard openai-elastic-usage-overview: unknown error" in result.output
    assert "install complete" not in result.output and "not done: dashboard openai-elastic-usage-overview" in result.output


def test_a_dashboard_kibana_imports_under_a_new_id_is_removed_and_an_error(stack):
    """Kibana's import creates an object whose id another space holds under a new random id, and
    says so with `destinationId`: left there, every install would add one more copy."""
    assert install().exit_code == 0
    costs = ("dashboard", "openai-elastic-costs")
    stack.space[costs] = "team-a"
    stack.calls.clear()
    result = install()
    assert result.exit_code == 1, result.output
    assert "dashboard openai-elastic-costs exists in Kibana space team-a" in result.output
    assert "install --space team-a`" in result.output
    assert set(stack.saved_objects) == {("dashboard", d.id) for d in K.dashboards()}
    assert [c["method"] for c in stack.writes()] == ["POST", "DELETE"]  # the import, then its copy


def test_a_dashboard_kibana_imports_under_a_new_id_on_serverless_says_which_space_holds_it(stack):
    """On Serverless the copy Kibana imported under a new random id is deleted through the
    dashboards API; a Kibana without that API cannot delete it, and the install stopped on "failed
    to delete dashboard <uuid>" alone: the cause (another space holds the id) and its remedy were
    never said, and deleting the copy by hand only made the next install import a new one."""
    _serverless(stack)
    assert install().exit_code == 0
    stack.space[("dashboard", "openai-elastic-costs")] = "team-a"
    stack.dashboards_api = False
    result = install()
    assert result.exit_code == 1, result.output
    assert "dashboard openai-elastic-costs exists in Kibana space team-a" in result.output
    assert "install --space team-a`" in result.output and "Stack Management > Saved objects" in result.output
    stack.dashboards_api = True
    result = install()
    assert result.exit_code == 1 and "install --space team-a`" in result.output, result.output
    copies = {k for k in stack.saved_objects if k[0] == "dashboard"} - {("dashboard", d.id) for d in K.dashboards()}
    assert len(copies) == 1  # the one the first install could not delete; this one's is deleted


def test_uninstall_of_a_space_also_removes_an_earlier_version_s_objects_there(stack):
    assert install().exit_code == 0
    for key in list(stack.objects_in("default")):
        stack.space[key] = "team-a"
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--space", "team-a", "--skip-kibana")
    assert result.exit_code == 0
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--space", "team-a")
    assert result.exit_code == 0, result.output
    assert stack.objects_in("team-a") == set(), result.output


def test_export_for_a_space_matches_install(stack, tmp_path):
    assert install("--space", "team-a").exit_code == 0
    assert run("export", str(tmp_path), "--space", "team-a").exit_code == 0
    objs = [json.loads(line) for line in (tmp_path / "kibana/openai-elastic.ndjson").read_text().splitlines()]
    assert {(o["type"], o["id"]) for o in objs} | {("alert", r.id) for r in K.rules(space="team-a")} == _kb_ids("team-a")
    for o in objs:
        if o["type"] == "dashboard":
            assert K.fingerprint_of(o) == K.fingerprint_of(stack.saved_objects[("dashboard", o["id"])])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    kb = [m for m in manifest if m["service"] == "kibana"]
    assert kb and all(m["path"].startswith("/s/team-a/api/") for m in kb)
    assert {m["path"].rsplit("/", 1)[1] for m in kb if "alerting" in m["path"]} == {r.id for r in K.rules(space="team-a")}
    assert sorted(p.name for p in (tmp_path / "kibana/rules").iterdir()) == sorted(
        f"{r.id}.json" for r in K.rules(space="team-a"))
    # a `.` is refused as in install: it is what keeps `<space>.<id>` apart from every other id
    assert run("export", str(tmp_path / "x"), "--space", "team.ai").exit_code == 2


@pytest.mark.parametrize("space", ["Team AI", "Marketing", "team.ai", "ai/team"])
@pytest.mark.parametrize("command", ["install", "uninstall"])
def test_a_space_that_is_not_a_kibana_space_id_is_refused_before_any_request(stack, command, space):
    """Kibana routes /s/<id>/ only for ids of a-z, 0-9, _ and - (its space-id rule): a space *name*
    (`Marketing`, `Team AI`) was sent as is, and Kibana answered 404 for the version read or, for
    `team.ai`, took the space `team` and a broken path. Refused as a bad option value instead."""
    result = run(command, "--es-url", ES, "--kibana-url", KB, "--space", space)
    assert result.exit_code == 2, result.output
    assert "--space" in result.output and "a-z, 0-9, _ and -" in result.output, result.output
    assert stack.calls == []


def test_kibana_818_gets_single_alert_rules_and_says_so(stack):
    stack.es_version = stack.kb_version = "8.18.2"
    result = install()
    assert result.exit_code == 0, result.output
    assert stack.rules[K.RULE_ID_HEADROOM_TPM]["params"]["groupBy"] == "all"
    assert "per-row alerts need Kibana 8.19 or 9.1+" in result.output


def test_basic_auth_from_env_and_password_file(stack, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    result = run("install", "--es-url", ES, "--kibana-url", KB, "--password-file", str(pw),
                 env={"ELASTIC_API_KEY": "", "ELASTIC_USERNAME": "installer"})
    assert result.exit_code == 0, result.output
    import base64
    want = "Basic " + base64.b64encode(f"installer:{PASSWORD}".encode()).decode()
    assert all(c["headers"]["Authorization"] == want for c in stack.calls)
    assert PASSWORD not in result.output


def test_api_key_file_wins(stack, tmp_path):
    key = tmp_path / "key"
    key.write_text("ZmlsZS1rZXk=")
    assert install("--api-key-file", str(key), "--skip-kibana").exit_code == 0
    assert all(c["headers"]["Authorization"] == "ApiKey ZmlsZS1rZXk=" for c in stack.calls)
    assert not any(c["service"] == "kb" for c in stack.calls)


@pytest.mark.parametrize("content", [b"\xffkey\xfe", None])
def test_a_secret_file_that_is_not_text_or_endless_is_one_line(stack, tmp_path, content):
    """--api-key-file/--password-file not UTF-8 was a UnicodeDecodeError traceback, and /dev/zero a
    MemoryError one after eating the memory; the bytes are never shown (they may be the secret)."""
    path = "/dev/zero"
    if content is not None:
        (tmp_path / "key").write_bytes(content)
        path = str(tmp_path / "key")
    for option in (["--api-key-file", path], ["--username", "u", "--password-file", path]):
        result = install(*option, "--skip-kibana", env={"ELASTIC_API_KEY": ""})
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        what = "API key" if option[0] == "--api-key-file" else "password"
        reason = "it is not UTF-8 text" if content else "it is larger than 64 KiB"
        assert result.output.strip() == f"openai-assets: cannot read {what} file {path}: {reason}"
    assert not stack.calls


@pytest.mark.parametrize("kind", ["empty", "blank"])
def test_a_secret_file_that_is_empty_is_one_line(stack, tmp_path, kind):
    """An empty (or whitespace-only) key or password file is refused before any request, not sent
    as an empty credential."""
    path = tmp_path / "key"
    path.write_text("" if kind == "empty" else " \n\t\n")
    for option in (["--api-key-file", str(path)], ["--username", "u", "--password-file", str(path)]):
        result = install(*option, "--skip-kibana", env={"ELASTIC_API_KEY": ""})
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        what = "API key" if option[0] == "--api-key-file" else "password"
        assert result.output.strip() == f"openai-assets: {what} file {path} is empty"
    assert not stack.calls


def _unwritten_fifo(path, monkeypatch):
    """A named pipe at `path` that nobody writes, and the programs' wait for a writer cut to 0.2 s."""
    import agent_input.config as config_module
    monkeypatch.setattr(config_module, "FIFO_WAIT_SECONDS", 0.2)
    os.mkfifo(path)
    return path


def test_a_secret_file_that_is_a_fifo_nobody_writes_is_one_line_not_a_hang(stack, tmp_path, monkeypatch):
    """--api-key-file naming a named pipe with no writer blocked in open() for ever."""
    fifo = _unwritten_fifo(tmp_path / "key.fifo", monkeypatch)
    result = install("--api-key-file", str(fifo), "--skip-kibana", env={"ELASTIC_API_KEY": ""})
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip() == (f"openai-assets: cannot read API key file {fifo}: "
                                     "nothing was written to the pipe in 0.2 s")
    assert not stack.calls


def test_a_ca_cert_that_is_a_fifo_is_read_with_the_same_bounded_wait(stack, tmp_path, monkeypatch):
    """--ca-cert naming a named pipe with no writer hung for ever (OpenSSL's own open() of it), where
    the key and password files wait 10 s at most. Written to, it is read and used."""
    import threading

    import agent_input.config as config_module
    fifo = _unwritten_fifo(tmp_path / "ca.fifo", monkeypatch)
    result = install("--ca-cert", str(fifo), "--skip-kibana")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip() == f"openai-assets: cannot read CA file {fifo}: nothing was written to the pipe in 0.2 s"
    assert not stack.calls
    monkeypatch.setattr(config_module, "FIFO_WAIT_SECONDS", 5.0)
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

    def write():
        with open(fifo, "w") as fh:
            fh.write(pem)

    writer = threading.Thread(target=write)
    writer.start()
    from kibana_assets import installer

    copy = installer.ca_bundle(str(fifo))
    writer.join()
    assert copy != str(fifo) and open(copy).read() == pem


def test_a_ca_cert_pipe_that_is_not_pem_text_is_a_usage_error_not_a_traceback(stack, tmp_path):
    import threading

    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as fh:
            fh.write(b"0\x82\x01\xff DER bytes")

    writer = threading.Thread(target=write)
    writer.start()
    result = install("--ca-cert", str(fifo), "--skip-kibana")
    writer.join()
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip() == (f"openai-assets: cannot read CA file {fifo}: it is not UTF-8 text "
                                     "(expected a PEM CA bundle)")
    assert not stack.calls


def test_a_ca_cert_that_cannot_be_read_is_a_usage_error(stack, tmp_path, monkeypatch):
    """A pipe this user may not read (EACCES): exit 2 with the reason, as for the key files."""
    from kibana_assets import installer

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(installer, "read_text_file", refused)
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    result = install("--ca-cert", str(fifo), "--skip-kibana")
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"openai-assets: cannot read CA file {fifo}: Permission denied"
    assert not stack.calls


def test_insecure_wins_over_a_ca_cert_that_is_not_read(stack, tmp_path, monkeypatch):
    """--insecure turns verification off: the --ca-cert beside it (a pipe nobody writes) is not read."""
    fifo = _unwritten_fifo(tmp_path / "ca.fifo", monkeypatch)
    result = install("--insecure", "--ca-cert", str(fifo), "--skip-kibana", "--dry-run")
    assert result.exit_code == 0, result.output


def test_a_ca_cert_that_is_a_device_is_refused_not_read_for_ever(stack):
    result = install("--ca-cert", "/dev/zero", "--skip-kibana")
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "openai-assets: cannot read CA file /dev/zero: it is larger than 10 MiB"
    assert not stack.calls


@pytest.mark.parametrize("env_set", [False, True])
def test_a_secret_pasted_in_place_of_its_file_is_never_echoed(stack, tmp_path, env_set):
    """`--api-key-file "$ELASTIC_API_KEY"` or `--password-file "$ELASTIC_PASSWORD"` (the value
    instead of a path) was echoed whole: "cannot read API key file <the key>: No such file"."""
    key, password = "RVNBUElLRVlodW50c2VjcmV0MTIzNDU2Nzg5", "Hp@ss:w/rd?#%HuntEsPw9"
    for option, secret, what, env in (
            (["--api-key-file", key], key, "--api-key-file", {"ELASTIC_API_KEY": key if env_set else ""}),
            (["--username", "u", "--password-file", password], password, "--password-file",
             {"ELASTIC_API_KEY": "", "ELASTIC_PASSWORD": password if env_set else ""})):
        result = install(*option, "--skip-kibana", env=env)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        assert what in result.output and "does not exist" in result.output, result.output
        assert secret[:8] not in result.output, result.output
    assert not stack.calls


def test_a_netrc_entry_never_replaces_or_adds_credentials(stack, tmp_path):
    """requests would put a matching ~/.netrc entry's basic auth in place of the ApiKey header, and
    add it where none was given: the installer sends only the credentials it was given."""
    netrc = tmp_path / "netrc"
    netrc.write_text("default login someone password netrc-password-1234\n")
    netrc.chmod(0o600)
    assert install("--skip-kibana", env={"NETRC": str(netrc)}).exit_code == 0
    assert stack.calls and all(c["headers"]["Authorization"] == f"ApiKey {API_KEY}" for c in stack.calls)
    stack.calls.clear()
    run("install", "--es-url", ES, "--skip-kibana", env={"NETRC": str(netrc), "ELASTIC_API_KEY": ""})
    assert stack.calls and not any("Authorization" in c["headers"] for c in stack.calls)


def test_retention_and_ilm_options_reach_the_templates(stack):
    assert install("--retention", "30d", "--skip-kibana").exit_code == 0
    t = stack.index["logs-openai.completions"]["template"]
    assert t["lifecycle"]["data_retention"] == "30d"
    stack.ilm_policies.add("openai-logs")
    assert install("--ilm-policy", "openai-logs", "--skip-kibana").exit_code == 0
    t = stack.index["logs-openai.completions"]["template"]
    assert t["settings"]["index"]["lifecycle"] == {"name": "openai-logs"} and t["lifecycle"] == {"enabled": False}


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("error,says", [
    (requests.exceptions.ConnectionError("refused"), "cannot reach Elasticsearch at {ES} (connection failed)"),
    (requests.exceptions.TooManyRedirects("Exceeded 30 redirects."),  # any other failure of requests
     "request to Elasticsearch at {ES} failed (TooManyRedirects)"),
    # an SSLError is a ConnectionError too: it must still say how to fix it
    (requests.exceptions.SSLError("certificate verify failed"),
     "TLS verification failed for Elasticsearch at {ES} (certificate verify failed): pass --ca-cert PATH (or "
     "--insecure for a test cluster)"),
    # https:// to a server that answers in plain HTTP: not a certificate problem, whatever --insecure says
    (requests.exceptions.SSLError("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)"),
     "Elasticsearch at {ES} does not speak TLS: is it http://?"),
    (requests.exceptions.ReadTimeout("read timed out"), "Elasticsearch at {ES} did not answer within 30s"),
])
def test_a_request_that_fails_is_one_clear_line(error, says):
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, ES + "/", body=error)
        result = install()
    assert result.exit_code == 2
    assert result.output.splitlines()[0] == "install incomplete: " + says.format(ES=ES)


@pytest.mark.parametrize("status", [400, 404, 500, 503])
def test_an_error_answer_exits_1_not_2(status):
    """The exit-status rule of docs/assets.md: 2 is a request that got no answer (or a bad option
    before any); an answer that is an HTTP error (other than 401 and a missing privilege) is 1. The
    table said "any other failed request" exits 2, which a 500 or a 400 never did."""
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, ES + "/", status=status, json={"error": {"type": "x", "reason": "boom"}})
        result = install()
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[0] == f"install incomplete: failed to read the Elasticsearch version: HTTP {status}: boom"


def test_assets_doc_states_the_exit_status_rule():
    text = (Path(__file__).resolve().parents[1] / "docs" / "assets.md").read_text()
    table = text[text.index("| exit | cause |"):]
    table = table[:table.index("\n\n")]
    row = {line.split("|")[1].strip(): line.split("|")[2] for line in table.splitlines()[2:]}
    assert "any other failed request" not in row["2"] and "got no answer" in row["2"]
    assert "HTTP error" in row["1"]


def test_bad_credentials(stack):
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, ES + "/", status=401, json={"error": {"type": "security_exception"}})
        result = install()
    assert result.exit_code == 3
    assert "rejected the credentials (401, ELASTIC_API_KEY)" in result.output
    assert API_KEY not in result.output


def test_unsupported_versions_are_refused_before_any_write(stack):
    stack.es_version = "8.17.4"
    result = install()
    assert result.exit_code == 4
    assert "Elasticsearch 8.17.4 is not supported: openai-assets needs 8.18.0 or later" in result.output
    assert stack.writes() == []
    stack.es_version, stack.kb_version = "9.1.0", "10.0.0"
    result = install()
    assert result.exit_code == 4 and "Kibana 10.0.0 is not supported" in result.output


@pytest.mark.parametrize("extra", [(), ("--delete-data",), ("--skip-kibana",)])
def test_an_uninstall_stopped_before_its_first_delete_says_what_it_did_not_do(stack, extra):
    """Its summary said "nothing was written (0 assets not done)": as if there were nothing to do."""
    from kibana_assets import installer as I

    assert install().exit_code == 0
    stack.es_version = "8.17.4"
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, *extra)
    assert result.exit_code == 4, result.output
    stack.es_version = "9.1.3"
    inst = I.Installer(I.Target(ES, KB, I.resolve_credentials(env={"ELASTIC_API_KEY": API_KEY})),
                       I.Options(with_kibana="--skip-kibana" not in extra))
    done = inst.uninstall(delete_data="--delete-data" in extra)
    assert done.error is None and done.steps
    assert f"nothing was written ({len(done.steps)} assets not done)" in result.output, result.output
    # the "not done" list is the real uninstall's steps, in its order
    listed = [label for label, _ in inst._uninstall_steps("--delete-data" in extra, [])]
    assert listed == [step.label for step in done.steps]


def test_uninstall_refuses_unsupported_versions_before_any_delete(stack):
    """uninstall runs the same preflight as install: an unsupported Elasticsearch or Kibana is
    the same one line and exit code, and nothing is deleted."""
    assert install().exit_code == 0
    stack.calls.clear()
    stack.es_version = "8.17.4"
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code == 4, result.output
    assert "Elasticsearch 8.17.4 is not supported: openai-assets needs 8.18.0 or later" in result.output
    stack.es_version, stack.kb_version = "9.1.0", "10.0.0"
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code == 4 and "Kibana 10.0.0 is not supported" in result.output
    assert not [c for c in stack.calls if c["method"] == "DELETE"]
    assert stack.rules and stack.saved_objects and stack.index


def test_serverless_projects_are_installed_whatever_version_they_report(stack):
    """Elastic Cloud Serverless answers `GET /` with `build_flavor: serverless` and a version
    number that is not its feature level (8.11.0 for years: "Clients should detect a Serverless
    environment by checking for build_flavor: serverless", Elasticsearch's `GET /` reference). It
    was refused as "Elasticsearch 8.11.0 is not supported" (exit 4), with nothing installed."""
    stack.es_version, stack.es_flavor = "8.11.0", "serverless"
    stack.kb_version, stack.kb_flavor = "8.16.0", "serverless"
    result = install()
    assert result.exit_code == 0, result.output
    assert "Elasticsearch serverless (reports 8.11.0), Kibana serverless (reports 8.16.0)" in result.output
    assert len(stack.index) == len([a for a in E.es_assets() if a.kind == "index_template"])
    # Serverless Kibana is the newest: one alert per row, never the 8.18/9.0 fallback
    assert stack.rules[K.RULE_ID_HEADROOM_TPM]["params"]["groupBy"] == "row"
    assert "per-row alerts need" not in result.output
    again = install()
    assert again.exit_code == 0 and f"{N_ES + N_KB} unchanged" in again.output, again.output


def test_an_ilm_policy_that_does_not_exist_is_refused_before_any_write(stack):
    """Elasticsearch takes a template naming any policy: a typo in --ilm-policy was installed, each
    new backing index then had an ILM error instead of a policy, and with the data stream
    lifecycle turned off, the data had no retention at all."""
    for extra in ((), ("--dry-run",)):
        result = install("--ilm-policy", "opnai-logs", *extra)
        assert result.exit_code == 2, result.output
        assert "--ilm-policy 'opnai-logs': Elasticsearch has no ILM policy of that name" in result.output
        assert stack.writes() == [] and "nothing was written" in result.output
    # Elasticsearch reads the name as a list or a wildcard, and answers 200 with the policies it
    # names: "openai-*" or "openai-logs,openai-keep" named none, yet was installed, an ILM error
    # at each new backing index as for a typo
    stack.ilm_policies.update({"openai-logs", "openai-keep"})
    for name in ("openai-*", "openai-logs,openai-keep", "nothing-*"):
        result = install("--ilm-policy", name, "--skip-kibana")
        assert result.exit_code == 2, result.output
        assert f"--ilm-policy {name!r}: Elasticsearch has no ILM policy of that name" in result.output
        assert stack.writes() == []
    # one whose policies the installer may not read (read_ilm) is not refused
    stack.forbid.add(("GET", r"/_ilm/policy/.*"))
    assert install("--ilm-policy", "opnai-logs", "--skip-kibana").exit_code == 0
    assert stack.index["logs-openai.audit"]["template"]["settings"]["index"]["lifecycle"] == {"name": "opnai-logs"}


def test_ilm_policy_on_serverless_is_refused_before_any_write(stack):
    """Serverless has no ILM (data stream lifecycle only): the index templates were refused at
    the first one, after the pipelines and component templates were written."""
    stack.es_version, stack.es_flavor = "8.11.0", "serverless"
    result = install("--ilm-policy", "my-policy")
    assert result.exit_code == 2
    assert "--ilm-policy: Elasticsearch Serverless has no ILM" in result.output
    assert stack.writes() == []


def test_missing_privilege_from_has_privileges_is_named(stack):
    stack.missing_privileges = ["manage_pipeline"]
    result = install()
    assert result.exit_code == 3
    assert "missing Elasticsearch privilege: manage_pipeline" in result.output
    assert stack.writes() == []


def test_the_rules_read_privilege_is_checked_before_anything_is_written(stack):
    """The rules run with the API key of whoever installs them (Kibana grants one for the request's
    credentials), and their ES|QL reads `logs-openai.<dataset>-*`: without `read` there every run
    of every rule failed, while `install` said complete. It is asked, on the names the rules read,
    only when rules are installed."""
    stack.missing_privileges = ["read"]
    result = install()
    assert result.exit_code == 3
    assert "missing Elasticsearch privilege: read (index privilege on logs-openai.*-*" in result.output
    assert "rules" in result.output.split("missing Elasticsearch privilege:")[1].splitlines()[0]
    assert stack.writes() == []
    hp = json.loads([c for c in stack.calls if c["path"] == "/_security/user/_has_privileges"][-1]["body"])
    assert hp["index"] == [{"names": ["logs-openai.*-*"], "privileges": ["read"]}]
    # without Kibana there are no rules, and nothing reads the indices
    stack.calls.clear()
    assert install("--skip-kibana").exit_code == 0
    hp = json.loads([c for c in stack.calls if c["path"] == "/_security/user/_has_privileges"][-1]["body"])
    assert "index" not in hp


def test_partial_failure_says_what_was_and_was_not_installed(stack):
    stack.forbid.add(("PUT", r"/_index_template/logs-openai\.audit"))
    result = install()
    assert result.exit_code == 3
    assert "missing privilege: manage_index_templates is needed to write index_template logs-openai.audit" in result.output
    done = result.output.split("done:")[1].split("not done:")[0]
    not_done = result.output.split("not done:")[1]
    assert "pipeline logs-openai.completions@pipeline" in done
    assert "index_template logs-openai.audit" in not_done and "rule " in not_done
    assert "index_template logs-openai.audit" not in done


def test_kibana_privilege_error_names_the_feature(stack):
    stack.forbid.add(("POST", r"/api/alerting/rule/.*"))
    result = install()
    assert result.exit_code == 3
    assert "Stack Rules: All" in result.output


def test_a_rule_with_connectors_names_the_connectors_privilege(stack):
    """Kibana reads the connectors of a rule written with actions (the rules client's
    validateActions: actionsClient.getBulk, authorized as `get` on connectors, which the feature
    'Actions and Connectors' grants from Read; Stack Rules: All does not). An upgrade sends a
    rule's actions back, so an installer without it was refused half way through the install,
    and the error named 'Stack Rules: All', which the user had."""
    assert install().exit_code == 0
    stack.rules[K.RULE_ID_HEADROOM_TPM]["actions"] = [{"group": "query matched", "id": "my-connector", "params": {}, "frequency": FREQUENCY}]
    stack.connectors_readable = False
    result = install("--headroom-threshold", "0.9")
    assert result.exit_code == 3
    assert "Actions and Connectors: Read" in result.output, result.output
    # a rule without actions needs no more than Stack Rules: All
    del stack.rules[K.RULE_ID_HEADROOM_TPM]["actions"]
    assert install("--headroom-threshold", "0.9").exit_code == 0


def test_a_rule_moved_into_a_space_with_its_connectors_names_the_connectors_privilege(stack):
    """The move of an earlier version's rule to a space's id creates the new rule with the old
    one's actions: Kibana reads their connectors there too, so a refusal names the same privilege
    as an update's, not 'Stack Rules: All', which the user had."""
    assert install().exit_code == 0  # the earlier version's objects, moved to team-a
    for key in {("index-pattern", K.DATA_VIEW_ID)} | {("dashboard", d.id) for d in K.dashboards()} | {
            ("alert", r.id) for r in K.rules()}:
        stack.space[key] = "team-a"
    stack.rules[K.RULE_ID_HEADROOM_TPM]["actions"] = [{"group": "query matched", "id": "my-connector", "params": {}, "frequency": FREQUENCY}]
    stack.connectors_readable = False
    result = install("--space", "team-a")
    assert result.exit_code == 3, result.output
    assert "Actions and Connectors: Read" in result.output, result.output


def test_a_dashboard_privilege_error_names_only_the_dashboard_feature(stack):
    """Kibana's `_import` and `_export` routes leave authorization to the saved objects client,
    which checks the type's own privileges (a dashboard: Dashboard, All to write). 'Saved Objects
    Management: All' grants `all` on every saved-object type of the space: the least-privilege
    role asked for it, and the error sent the user to grant it, though no request needs it."""
    stack.forbid.add(("POST", r"/api/saved_objects/_import"))
    result = install()
    assert result.exit_code == 3
    assert "Dashboard: All" in result.output
    assert "Saved Objects Management" not in result.output


def test_missing_urls_and_credentials_files():
    r = run("install", "--kibana-url", KB)
    assert r.exit_code == 2 and "--es-url (or ES_URL) is required" in r.output
    r = run("install", "--es-url", ES, "--kibana-url", KB, "--api-key-file", "/nonexistent/key")
    assert r.exit_code == 2 and "API key file given to --api-key-file does not exist" in r.output
    assert "/nonexistent/key" not in r.output  # it might be the key itself
    r = run("install", "--es-url", ES, "--kibana-url", KB, env={"ELASTIC_API_KEY": "", "ELASTIC_USERNAME": "u"})
    assert r.exit_code == 2 and "no password for user u" in r.output


# ---------------------------------------------------------------------------------------------
# uninstall and export


def test_uninstall_removes_assets_but_never_data(stack):
    assert install().exit_code == 0
    stack.data_streams.add("logs-openai.completions")
    stack.calls.clear()
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code == 0, result.output
    # the data streams are read (is a template in use?), never deleted
    assert not any(c["path"].startswith("/_data_stream") for c in stack.calls if c["method"] != "GET")
    assert stack.rules == {} and stack.saved_objects == {} and stack.data_views == {}
    # the template in use stays, with what it references, so ingestion keeps working
    assert set(stack.index) == {"logs-openai.completions"}
    assert set(stack.component) == {"logs-openai.completions@package"}
    assert set(stack.pipelines) == {"logs-openai.completions@pipeline"}
    assert re.search(r"kept\s+index_template logs-openai.completions", result.output)
    deletes = [c["path"] for c in stack.calls if c["method"] == "DELETE"]
    assert f"/api/alerting/rule/{K.RULE_ID_HEADROOM_TPM}" in deletes
    assert "/api/saved_objects/dashboard/openai-elastic-costs" in deletes
    assert f"/api/data_views/data_view/{K.DATA_VIEW_ID}" in deletes
    assert all(c["headers"].get("kbn-xsrf") == "true" for c in stack.calls if c["service"] == "kb" and c["method"] == "DELETE")
    # a second uninstall finds nothing to delete
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code == 0 and re.search(r"absent\s+rule", result.output)


def _serverless(stack):
    stack.es_version, stack.es_flavor = "8.11.0", "serverless"
    stack.kb_version, stack.kb_flavor = "9.4.0", "serverless"


def test_uninstall_on_serverless_deletes_the_dashboards_through_the_dashboards_api(stack):
    """Serverless Kibana keeps only `_import`/`_export` of the saved objects API public: `DELETE
    /api/saved_objects/dashboard/<id>` is answered 400 "... exists but is not available with the
    current configuration" whether or not the dashboard exists. Uninstall stopped at the first
    dashboard, every time: the data view and the Elasticsearch assets were never removed."""
    _serverless(stack)
    assert install().exit_code == 0
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code == 0, result.output
    assert stack.saved_objects == {} and stack.data_views == {} and stack.index == {}
    assert re.search(r"deleted\s+dashboard openai-elastic-costs", result.output)
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code == 0 and re.search(r"absent\s+dashboard openai-elastic-costs", result.output)


def test_uninstall_on_serverless_without_a_dashboard_delete_api_keeps_them_and_says_so(stack):
    _serverless(stack)
    stack.dashboards_api = False
    assert install().exit_code == 0
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code == 0, result.output
    assert len(stack.saved_objects) == len(K.dashboards())
    assert re.search(r"kept\s+dashboard openai-elastic-costs  \(this Kibana has no API to delete it: "
                     r"delete it in Stack Management > Saved objects\)", result.output)
    assert stack.data_views == {} and stack.index == {}  # the rest is removed


def test_uninstall_on_serverless_takes_a_204_of_the_dashboards_api_as_deleted(stack):
    _serverless(stack)
    stack.dashboards_api_status = 204
    assert install().exit_code == 0
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code == 0 and stack.saved_objects == {}, result.output
    assert re.search(r"deleted\s+dashboard openai-elastic-costs", result.output)


def test_uninstall_on_serverless_without_the_dashboard_privilege_stops_and_names_it(stack):
    """A 403 of the dashboards API is a missing privilege, not a Kibana without that API: the
    uninstall stops there and says which privilege, as a 403 of the saved objects API does."""
    _serverless(stack)
    assert install().exit_code == 0
    stack.forbid.add(("DELETE", r"/api/dashboards/.*"))
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code != 0 and "kept" not in result.output, result.output
    assert KIBANA_PRIVILEGE["dashboard"] in result.output
    assert len(stack.saved_objects) == len(K.dashboards())


@pytest.mark.parametrize("flavor", ["default", "serverless"])
def test_uninstall_reports_a_400_that_is_not_the_internal_route_answer(stack, flavor):
    """Only Serverless's "exists but is not available" answer to the saved objects DELETE sends
    the delete to the dashboards API; any other 400 (and any 400 of another object) is an error
    that stops the uninstall with Kibana's reason, never a dashboard reported as kept."""
    stack.kb_flavor = flavor
    assert install().exit_code == 0
    stack.answer[("DELETE", r"/api/saved_objects/dashboard/.*")] = (400, {
        "statusCode": 400, "error": "Bad Request", "message": "something else went wrong"})
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code != 0 and "something else went wrong" in result.output, result.output
    assert not [c for c in stack.calls if c["path"].startswith("/api/dashboards/")]
    stack.answer = {("DELETE", r"/api/data_views/data_view/.*"): (400, {
        "statusCode": 400, "error": "Bad Request",
        "message": "uri [/api/data_views/data_view/x] with method [delete] exists but is not available with the "
                   "current configuration"})}
    stack.saved_objects.clear()
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert result.exit_code != 0 and "exists but is not available" in result.output, result.output
    assert not [c for c in stack.calls if c["path"].startswith("/api/dashboards/")]


def test_each_product_is_told_serverless_by_its_own_answer(stack):
    """Elasticsearch's flavor says nothing of Kibana's: a Kibana that is not Serverless has its
    version checked, and its rules written for that version."""
    stack.es_version, stack.es_flavor = "8.11.0", "serverless"
    stack.kb_version = "8.11.0"
    result = install()
    assert result.exit_code == 4 and "Kibana 8.11.0 is not supported" in result.output, result.output
    stack.kb_version = "8.18.0"
    result = install()
    assert result.exit_code == 0, result.output
    assert "Elasticsearch serverless (reports 8.11.0), Kibana 8.18.0" in result.output
    assert "per-row alerts need" in result.output


def test_uninstall_delete_data(stack):
    assert install().exit_code == 0
    stack.data_streams.add("logs-openai.completions")
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--delete-data")
    assert result.exit_code == 0, result.output
    assert stack.index == {} and stack.component == {} and stack.pipelines == {}
    assert any(c["method"] == "DELETE" and c["path"] == "/_data_stream/logs-openai.completions-default"
               for c in stack.calls)
    hp = json.loads([c for c in stack.calls if c["path"] == "/_security/user/_has_privileges"][-1]["body"])
    assert hp["index"][0]["privileges"] == ["view_index_metadata", "delete_index"]


def test_uninstall_dry_run_deletes_nothing(stack):
    assert install().exit_code == 0
    stack.calls.clear()
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--dry-run")
    assert result.exit_code == 0, result.output
    assert stack.writes() == [] and "would delete" in result.output
    # summed up as a dry run, as install's is: "uninstall complete" said it was done
    assert f"dry run complete: {N_ES + N_KB} would delete" in result.output
    assert "uninstall complete" not in result.output


@pytest.mark.parametrize("builtin_logs_template", [False, True])
def test_uninstall_dry_run_keeps_what_uninstall_keeps_for_data_streams_in_use(stack, builtin_logs_template):
    """The dry run said `would delete` for an index template live data streams use, and for its
    pipeline and component template: uninstall keeps all three. Elasticsearch refuses that delete
    only while no other template matches the data stream; on a cluster with its built-in `logs`
    template (logs-*-*) it deleted ours, and the uninstall then stopped at the pipeline, which the
    backing indices still name (refused: "the default pipeline for 1 index(es)"), its data stream
    left to the `logs` template's mappings at its next rollover. It looks at the data streams first."""
    stack.builtin_logs_template = builtin_logs_template
    assert install().exit_code == 0
    stack.data_streams |= {"logs-openai.audit", "logs-openai"}
    stack.calls.clear()
    dry = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert stack.writes() == []
    real = run("uninstall", "--es-url", ES, "--kibana-url", KB)
    assert real.exit_code == 0, real.output
    steps = lambda out: [ln.split(None, 1) for ln in out.splitlines() if ln.startswith(("kept ", "would delete"))]  # noqa: E731
    kept = {label for status, label in steps(dry.output) if status == "kept"}
    assert kept == {label for status, label in steps(real.output) if status == "kept"} == {
        "index_template logs-openai.audit  (in use by data streams (pass --delete-data to remove data and templates))",
        "pipeline logs-openai.audit@pipeline  (its index template is in use by data streams)",
        "component_template logs-openai.audit@package  (its index template is in use by data streams)",
        "index_template logs-openai  (in use by data streams (pass --delete-data to remove data and templates))",
        "pipeline logs-openai@router  (its index template is in use by data streams)"}
    assert f"dry run complete: {N_ES + N_KB - 5} would delete, 5 kept" in dry.output
    if builtin_logs_template:  # a stream another template matches now: ours goes, the pipeline its indices name stays
        assert install().exit_code == 0
        stack.stream_template["logs-openai.audit"] = "logs-openai.audit-integration"
        real = run("uninstall", "--es-url", ES, "--kibana-url", KB)
        assert real.exit_code == 0, real.output
        assert "logs-openai.audit" not in stack.index
        assert re.search(r"kept\s+pipeline logs-openai.audit@pipeline  \(the default pipeline of indices", real.output)
        assert "logs-openai.audit@pipeline" in stack.pipelines
        stack.stream_template.clear()
    # with --delete-data, the data streams go first and the templates with them
    assert install().exit_code == 0
    stack.data_streams |= {"logs-openai.audit"}
    dry = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--dry-run", "--delete-data")
    assert dry.exit_code == 0 and not re.search(r"^kept", dry.output, re.M), dry.output
    assert re.search(r"would delete\s+index_template logs-openai.audit\n", dry.output), dry.output


@pytest.mark.parametrize("answer, code, says", [
    ((403, None), 3, "missing privilege: view_index_metadata (index privilege on logs-openai.*) is needed to list "
                     "the data streams of index template logs-openai.audit"),
    ((503, "upstream connect error"), 1, "failed to list the data streams of index template logs-openai.audit: "
                                         "HTTP 503"),
    ((200, "<html>login</html>"), 1, "answered with something that is not a list of data streams"),
])
def test_uninstall_stops_when_the_data_streams_of_a_template_cannot_be_read(stack, answer, code, says):
    """An unread data streams listing (403, a 5xx, a login page) counted as no stream: the template
    live data streams use was deleted (Elasticsearch deletes it where its built-in `logs` template
    matches the stream too), and the stream's next backing index took that one's mappings, the
    uninstall reporting success. It stops there, that template and what follows it not deleted."""
    stack.builtin_logs_template = True
    assert install().exit_code == 0
    stack.data_streams |= {"logs-openai.audit"}
    status, raw = answer
    if status == 403:
        stack.forbid.add(("GET", r"/_data_stream/logs-openai\.audit-.*"))
    else:
        stack.es_answer[("GET", r"/_data_stream/logs-openai\.audit-.*")] = (status, raw)
    for extra in ((), ("--dry-run",)):
        result = run("uninstall", "--es-url", ES, "--kibana-url", KB, *extra)
        assert result.exit_code == code, result.output
        assert says in result.output, result.output
        assert "Traceback" not in result.output
        assert {"logs-openai.audit", "logs-openai"} <= set(stack.index)
        assert "logs-openai.audit@pipeline" in stack.pipelines


@pytest.mark.parametrize("extra", [(), ("--delete-data",)])
def test_uninstall_needs_view_index_metadata_to_see_the_data_streams(stack, extra):
    """Without view_index_metadata on logs-openai.*, Elasticsearch resolves GET /_data_stream/<pattern>
    to the streams the user may see, none, with 200: the uninstall took the template live data streams
    use for unused and deleted it (the built-in `logs` template matching them too), or with
    --delete-data found no stream to delete, and reported success. The privilege is checked first."""
    stack.builtin_logs_template = True
    assert install().exit_code == 0
    stack.data_streams |= {"logs-openai.audit"}
    stack.missing_privileges = ["view_index_metadata"]
    stack.calls.clear()
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, *extra)
    assert result.exit_code == 3, result.output
    assert "missing Elasticsearch privilege: view_index_metadata (index privilege on logs-openai.*)" in result.output
    assert "logs-openai.audit" in stack.index and "logs-openai.audit" in stack.data_streams
    assert not [c for c in stack.writes() if c["service"] == "es"]


def test_export_makes_no_requests(tmp_path):
    with responses.RequestsMock() as rsps:  # any request would raise ConnectionError
        result = run("export", str(tmp_path / "bundle"))
        assert len(rsps.calls) == 0
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["install", "export", "uninstall"])
@pytest.mark.parametrize("namespace, says", [("Bad-NS", "must not contain '-'; must be lowercase"),
                                             ("a b", "must not contain ' '"), ("_x", "must not start with")])
def test_a_namespace_the_collector_refuses_is_refused(stack, tmp_path, command, namespace, says):
    """The router's fallback namespace follows the collector's rule for `namespace`: Elasticsearch
    would otherwise rewrite it (bad_ns), and the data stream named in the summary would not exist."""
    args = [str(tmp_path / "bundle")] if command == "export" else ["--es-url", ES, "--kibana-url", KB]
    result = run(command, *args, "--namespace", namespace)
    assert result.exit_code == 2 and "--namespace" in result.output and says in result.output, result.output
    assert stack.calls == [] and not (tmp_path / "bundle").exists()


# ---------------------------------------------------------------------------------------------
# input mistakes and odd answers: one line, never a traceback, never a secret


def _one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("openai-assets: "), result.output
    return lines[0]


@pytest.mark.parametrize("url, says", [
    ("es:9200", "must start with http:// or https://"),
    ("localhost:9200", "must start with http:// or https://"),
    ("//es:9200", "must start with http:// or https://"),
    ("http://", "has no host"),
    ("http://es:notaport", "has an invalid port"),
    ("http://es:0", "has an invalid port"),
    ("http://[::1", "is not a valid URL"),  # urlsplit's own ValueError
])
def test_malformed_urls_are_one_line(url, says):
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        line = _one_line_error(run("install", "--es-url", url, "--kibana-url", KB))
        assert says in line and "--es-url" in line and "(for example https://localhost:9200)" in line
        line = _one_line_error(run("install", "--es-url", ES, "--kibana-url", url))
        # Kibana's example is Kibana's port, not Elasticsearch's
        assert says in line and "--kibana-url" in line and "(for example https://localhost:5601)" in line
        line = _one_line_error(run("uninstall", "--es-url", url, "--skip-kibana"))
        assert says in line


@pytest.mark.parametrize("command", ["install", "uninstall"])
@pytest.mark.parametrize("url", [f"{KB}/s/team-a", f"{KB}/s/team-a/", f"{KB}/kibana/s/team-a"])
def test_a_kibana_url_that_names_a_space_is_refused_before_any_request(stack, command, url):
    """The space's URL as the browser shows it put every object in that space under the default
    space's ids (the installer adds /s/<id> for --space only), and the next install into the
    default space was refused as if an earlier openai-assets had installed there."""
    line = _one_line_error(run(command, "--es-url", ES, "--kibana-url", url))
    assert "ends in the path of Kibana space 'team-a' (/s/team-a)" in line and "--space team-a" in line, line
    assert stack.calls == [] and stack.objects_in("team-a") == set()
    # a Kibana under a base path, and the space given as --space, are as before
    assert install("--space", "team-a").exit_code == 0 and stack.objects_in("team-a") == _kb_ids("team-a")


@pytest.mark.parametrize("key, says", [
    ("…", "a non-ASCII character"),                              # the docs' placeholder pasted as is
    ("c2VjcmV0LWtleS1k\nby1ub3QtcHJpbnQ=", "a line break"),      # two keys, or a wrapped key
    ("c2VjcmV0LWtleS1k by1ub3QtcHJpbnQ=", "a space"),
    ("c2VjcmV0LWtleS1k\x00by1ub3QtcHJpbnQ=", "a control character"),
])
def test_api_key_with_bad_characters_is_refused_without_showing_it(key, says, tmp_path):
    # (an environment variable cannot hold a NUL: that case only comes from a file)
    for first, second in ((key, None), (None, key)) if "\x00" not in key else ((None, key),):
        env = {"ELASTIC_API_KEY": first or ""}
        args = ["install", "--es-url", ES, "--kibana-url", KB]
        if second is not None:
            path = tmp_path / "key"
            path.write_text(second + "\n")
            args += ["--api-key-file", str(path)]
        with responses.RequestsMock(assert_all_requests_are_fired=False):
            line = _one_line_error(run(*args, env=env))
        assert says in line
        for part in re.split(r"\s|\x00", key):
            assert part not in line.split(": ", 1)[1] or part == ""


def test_password_with_a_line_break_is_refused_without_showing_it():
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        line = _one_line_error(run("install", "--es-url", ES, "--kibana-url", KB,
                                   env={"ELASTIC_API_KEY": "", "ELASTIC_USERNAME": "u",
                                        "ELASTIC_PASSWORD": "hunter2\nsecond-line"}))
    assert "a line break" in line and "hunter2" not in line and "second-line" not in line


def test_password_in_a_url_is_never_printed():
    url = "http://elastic:S3cretPW@es.test:9200"
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, url + "/", body=requests.exceptions.ConnectionError("refused"))
        result = run("install", "--es-url", url, "--kibana-url", KB)
    assert result.exit_code == 2
    assert "cannot reach Elasticsearch at http://***@es.test:9200" in result.output
    assert "S3cretPW" not in result.output
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        line = _one_line_error(run("install", "--es-url", "elastic:S3cretPW@es.test:9200", "--kibana-url", KB))
    assert "S3cretPW" not in line and "***@es.test:9200" in line


def test_es_url_pointing_at_kibana_is_one_line_with_the_summary():
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, ES + "/", body="<!DOCTYPE html><html>Kibana</html>", content_type="text/html")
        result = install("--skip-kibana")
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[0] == (
        f"install incomplete: GET {ES}/ answered with something that is not an Elasticsearch version document "
        "(HTTP 200, content-type text/html): is --es-url the Elasticsearch URL?")
    assert "nothing was written (" in result.output and "not done: pipeline " not in result.output


def test_kibana_status_without_a_version_is_one_line(stack):
    stack.kb_version = None
    result = install()
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"install incomplete: GET {KB}/api/status answered with something that is not "
                                    "a Kibana version document (HTTP 200, content-type "), result.output
    assert "is --kibana-url the Kibana URL?" in result.output.splitlines()[0]
    assert stack.writes() == []


def test_non_json_answer_mid_install_still_prints_the_summary():
    fake = FakeStack()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, re.compile(re.escape(KB) + r"/api/alerting/rule/.*"), body="<html>gateway</html>",
                 content_type="text/html")
        fake.install(rsps)
        result = install()
    assert result.exit_code == 1, result.output
    assert f"install incomplete: GET {KB}/api/alerting/rule/{K.RULE_ID_HEADROOM_TPM} answered with something " \
        "that is not a rule (HTTP 200, content-type text/html)" in result.output
    assert "dashboard openai-elastic-costs" in result.output.split("done:")[1].split("not done:")[0]
    assert "rule " in result.output.split("not done:")[1]


# ---------------------------------------------------------------------------------------------
# assets that belong to someone else (the Elastic OpenAI integration installed by Fleet)

FLEET_META = {"package": {"name": "openai"}, "managed_by": "fleet", "managed": True}


def _fleet_owns_completions(stack):
    stack.index["logs-openai.completions"] = {
        "index_patterns": ["logs-openai.completions-*"], "priority": 200, "data_stream": {},
        "composed_of": ["logs-openai.completions@package", "logs-openai.completions@custom"], "_meta": FLEET_META}
    stack.component["logs-openai.completions@package"] = {"template": {"mappings": {}}, "_meta": FLEET_META}


def test_install_refuses_foreign_assets_before_writing_anything(stack):
    _fleet_owns_completions(stack)
    for extra in ((), ("--dry-run",)):
        stack.calls.clear()
        result = install("--skip-kibana", *extra)
        assert result.exit_code == 1, result.output
        assert stack.writes() == []
        assert re.search(r"refused\s+index_template logs-openai.completions  \(managed by fleet", result.output)
        assert re.search(r"refused\s+component_template logs-openai.completions@package", result.output)
        assert "the Elastic OpenAI integration" in result.output and "--replace-foreign-assets" in result.output
        assert stack.index["logs-openai.completions"]["_meta"] == FLEET_META


def test_install_refuses_an_unmanaged_asset_of_our_name_before_writing_anything(stack):
    """A pipeline someone made by hand under our name (no `_meta.managed_by` at all) is another
    tool's too: refused up front with every other asset left unwritten, not overwritten, nor
    found only half-way through the install."""
    mine = {"description": "hand-made", "processors": [{"set": {"field": "x", "value": 1}}]}
    stack.pipelines["logs-openai.audit@pipeline"] = mine
    result = install("--skip-kibana")
    assert result.exit_code == 1, result.output
    assert stack.writes() == []
    assert re.search(r"refused\s+pipeline logs-openai.audit@pipeline  \(no _meta.managed_by, not openai-assets\)",
                     result.output), result.output
    assert "another tool manages them (unknown)" in result.output
    assert stack.pipelines["logs-openai.audit@pipeline"] == mine


def test_replace_foreign_assets_takes_them_over(stack):
    _fleet_owns_completions(stack)
    result = install("--skip-kibana", "--replace-foreign-assets")
    assert result.exit_code == 0, result.output
    assert re.search(r"updated\s+index_template logs-openai.completions  \(taken over from fleet\)", result.output)
    assert stack.index["logs-openai.completions"]["_meta"]["managed_by"] == "openai-assets"


def test_uninstall_never_deletes_foreign_assets(stack):
    assert install("--skip-kibana").exit_code == 0
    _fleet_owns_completions(stack)
    for extra in (("--dry-run",), ()):
        result = run("uninstall", "--es-url", ES, "--skip-kibana", *extra)
        assert result.exit_code == 0, result.output
        assert re.search(r"kept\s+index_template logs-openai.completions  \(managed by fleet", result.output)
        assert re.search(r"kept\s+component_template logs-openai.completions@package  \(managed by fleet", result.output)
    assert set(stack.index) == {"logs-openai.completions"} and stack.index["logs-openai.completions"]["_meta"] == FLEET_META
    assert set(stack.component) == {"logs-openai.completions@package"}
    assert not any(c["method"] == "DELETE" and "completions" in c["path"] and "pipeline" not in c["path"]
                   for c in stack.calls)


# ---------------------------------------------------------------------------------------------
# uninstall reports what is really there


def test_delete_data_reports_what_was_found(stack):
    assert install("--skip-kibana").exit_code == 0
    stack.data_streams.add("logs-openai.completions")
    result = run("uninstall", "--es-url", ES, "--skip-kibana", "--delete-data", "--dry-run")
    assert re.search(r"would delete\s+data_stream logs-openai.completions-\*  \(logs-openai.completions-default\)",
                     result.output)
    assert re.search(r"absent\s+data_stream logs-openai.audit-\*  \(none found\)", result.output)
    result = run("uninstall", "--es-url", ES, "--skip-kibana", "--delete-data")
    assert result.exit_code == 0, result.output
    assert re.search(r"deleted\s+data_stream logs-openai.completions-\*  \(logs-openai.completions-default\)",
                     result.output)
    assert re.search(r"absent\s+data_stream logs-openai-\*  \(none found\)", result.output)
    deletes = [c["path"] for c in stack.calls if c["method"] == "DELETE" and c["path"].startswith("/_data_stream/")]
    assert deletes == ["/_data_stream/logs-openai.completions-default"]  # by name, never by the pattern


def test_uninstall_dry_run_checks_that_dashboards_exist(stack):
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would delete" not in result.output
    assert re.search(r"absent\s+dashboard openai-elastic-costs", result.output)
    assert install().exit_code == 0
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--dry-run")
    assert re.search(r"would delete\s+dashboard openai-elastic-costs", result.output)


# ---------------------------------------------------------------------------------------------
# bad option values


def test_bad_option_values_are_one_clear_line(tmp_path):
    r = run("export", str(tmp_path / "b"), "--kibana-version", "9.x")
    assert r.exit_code == 2 and "'9.x' is not a version like 8.18.0" in r.output
    r = run("export", "/proc/nope")
    assert r.exit_code == 1 and r.output.startswith("openai-assets: cannot write the bundle to /proc/nope"), r.output
    assert len(r.output.splitlines()) == 1
    for opt in ("--headroom-window", "--stale-after"):
        r = run("export", str(tmp_path / "b"), opt, "0m")
        assert r.exit_code == 2 and "must be longer than 0" in r.output, r.output


@pytest.mark.parametrize("version", ["7.17.0", "8.17.4", "10.0.0"])
def test_export_for_a_kibana_version_install_refuses_is_refused(tmp_path, version):
    """install refuses these versions (exit 4); an exported bundle would fail on them at import."""
    r = run("export", str(tmp_path / "b"), "--kibana-version", version)
    assert r.exit_code == 2 and "needs 8.18.0 or later within 8.x/9.x" in r.output, r.output
    assert not (tmp_path / "b").exists()


def test_uninstall_offers_only_the_options_it_uses():
    """The rule and retention options tune what install writes; on uninstall they did nothing."""
    help_text = run("uninstall", "--help").output
    assert "--delete-data" in help_text and "--space" in help_text
    for option in ("--retention", "--ilm-policy", "--headroom-window", "--stale-after", "--rules-disabled"):
        assert option not in help_text
    assert run("uninstall", "--es-url", ES, "--retention", "30d").exit_code == 2  # click: no such option


def test_delete_data_keeps_the_data_streams_of_a_foreign_template(stack):
    """The Elastic OpenAI integration's data streams have our names; only the index template that
    Elasticsearch gives each stream tells them apart, and a foreign one keeps its data."""
    assert install("--skip-kibana").exit_code == 0
    stack.index["logs-openai.embeddings"]["_meta"]["managed_by"] = "fleet"  # Fleet's template, same name
    stack.data_streams |= {"logs-openai.completions", "logs-openai.embeddings"}
    result = run("uninstall", "--es-url", ES, "--skip-kibana", "--delete-data")
    assert "logs-openai.embeddings" in stack.data_streams and "logs-openai.completions" not in stack.data_streams
    assert re.search(r"kept\s+data_stream logs-openai.embeddings-\*  \(their index template is not "
                     r"openai-assets's: logs-openai.embeddings-default\)", result.output), result.output


# ---------------------------------------------------------------------------------------------
# gaps found by mutation testing


def test_the_oldest_supported_version_is_accepted(stack):
    stack.es_version = stack.kb_version = "8.18.0"
    result = install()
    assert result.exit_code == 0, result.output
    assert stack.rules[K.RULE_ID_HEADROOM_TPM]["params"]["groupBy"] == "all"


def test_rule_and_retention_options_reach_the_assets(stack):
    result = install("--headroom-window", "2h", "--stale-after", "1d", "--rules-disabled",
                     "--rate-limits-retention", "30d")
    assert result.exit_code == 0, result.output
    tpm, rpm, stale = (stack.rules[i] for i in (K.RULE_ID_HEADROOM_TPM, K.RULE_ID_HEADROOM_RPM, K.RULE_ID_LIMITS_STALE))
    # usage: the last 2h, inside the query; the rules' window: limits for --stale-after + 10m
    assert (tpm["params"]["timeWindowSize"], tpm["params"]["timeWindowUnit"]) == (1450, "m")
    assert rpm["params"]["timeWindowSize"] == 1450
    assert "@timestamp >= NOW() - 120 minutes" in tpm["params"]["esqlQuery"]["esql"]
    # stale after 1d; the alert stays active for a day (the default horizon), then stops
    assert stale["params"]["timeWindowSize"] == 2880
    assert "last_success < NOW() - 1440 minutes" in stale["params"]["esqlQuery"]["esql"]
    assert [r["enabled"] for r in (tpm, rpm, stale)] == [False, False, False]
    assert stack.index["logs-openai.rate_limits"]["template"]["lifecycle"]["data_retention"] == "30d"
    assert stack.index["logs-openai.completions"]["template"]["lifecycle"]["data_retention"] == E.DEFAULT_RETENTION_ALL


def test_stale_horizon_option(stack):
    result = install("--stale-after", "2h", "--stale-horizon", "7d")
    assert result.exit_code == 0, result.output
    assert stack.rules[K.RULE_ID_LIMITS_STALE]["params"]["timeWindowSize"] == 7 * 1440
    r = run("install", "--es-url", ES, "--kibana-url", KB, "--stale-after", "2h", "--stale-horizon", "1h")
    assert r.exit_code == 2 and "must be longer than --stale-after" in r.output


@pytest.mark.parametrize("option", ["--stale-after", "--stale-horizon", "--headroom-window"])
def test_a_rule_window_past_a_year_is_refused(stack, tmp_path, option):
    """`--stale-after 99999999999999d` was written into the rules as `NOW() - 143999999999998560
    minutes` and a time window of 1.4e17 minutes: rules that fail at every run, or never fire."""
    r = run("install", "--es-url", ES, "--kibana-url", KB, option, "99999999999999d")
    assert r.exit_code == 2 and f"Invalid value for {option}: '99999999999999d' is longer than 365d" in r.output
    assert not stack.calls
    r = run("export", str(tmp_path / "bundle"), option, "366d")
    assert r.exit_code == 2 and "is longer than 365d" in r.output and not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("args", [["--stale-after", "365d"], ["--stale-after", "525595m", "--stale-horizon", "365d"]])
def test_a_stale_after_whose_derived_windows_pass_a_year_is_refused(tmp_path, args):
    """`--stale-after 365d` passed the 365d bound but wrote rules looking back 366d (its default
    +24h horizon) and 365d+10m (the limits look-back)."""
    r = run("export", str(tmp_path / "b"), *args)
    assert r.exit_code == 2 and "Invalid value for --stale-after" in r.output and "longer than 365d" in r.output
    r = run("export", str(tmp_path / "c"), "--stale-after", "364d")
    assert r.exit_code == 0, r.output
    windows = [json.loads(p.read_text())["params"]["timeWindowSize"] for p in (tmp_path / "c" / "kibana" / "rules").iterdir()]
    assert max(windows) <= 365 * 1440


@pytest.mark.parametrize("value", ["30days", "\uff13\uff10d", "30d\n"])
def test_a_retention_with_trailing_text_or_non_ascii_digits_is_refused(value):
    """Full-width digits passed Python's \\d and were sent to Elasticsearch as typed, failing the
    install part-way; a trailing newline passed `$`."""
    r = run("install", "--es-url", ES, "--kibana-url", KB, "--retention", value)
    assert r.exit_code == 2 and "is not a retention like 90d" in r.output


@pytest.mark.parametrize("option", ["--retention", "--rate-limits-retention"])
@pytest.mark.parametrize("value", ["0d", "0h", "000d"])
def test_a_zero_retention_is_refused_naming_the_option(stack, option, value):
    """`--retention 0d` was installed: data stream lifecycle may then delete every document as
    soon as it lands, emptying the dashboards. Nothing is sent."""
    r = run("install", "--es-url", ES, "--kibana-url", KB, option, value)
    assert r.exit_code == 2, r.output
    assert f"Invalid value for {option}: '{value}' must be longer than 0" in r.output
    assert not stack.calls


@pytest.mark.parametrize("option", ["--retention", "--rate-limits-retention"])
@pytest.mark.parametrize("value", ["36501d", "876001h", "99999999999999999999d"])
def test_a_retention_past_100_years_is_refused_naming_the_option(stack, option, value):
    """`--retention 99999999999999999999d` was written into the templates (and `export`'s bundle) as
    typed: Elasticsearch reads data_retention as a count of its unit in a Java long, so the
    template writes fail; --headroom-window is capped at 365d the same way."""
    r = run("install", "--es-url", ES, "--kibana-url", KB, option, value)
    assert r.exit_code == 2, r.output
    assert f"Invalid value for {option}: '{value}' is longer than 36500d (100 years)" in r.output
    assert not stack.calls


def test_a_retention_of_100_years_is_taken(stack):
    assert install("--retention", "36500d", "--rate-limits-retention", "876000h", "--skip-kibana").exit_code == 0
    assert stack.index["logs-openai.completions"]["template"]["lifecycle"]["data_retention"] == "36500d"


def test_tls_options_reach_every_request(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked by the fake\n")
    # (without an option requests verifies with its default bundle, or REQUESTS_CA_BUNDLE)
    for args, verified in (((), lambda v: v not in (False, str(ca))), (("--ca-cert", str(ca)), lambda v: v == str(ca)),
                           (("--insecure",), lambda v: v is False)):
        fake = FakeStack()
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
            fake.install(rsps)
            assert install("--skip-kibana", "--dry-run", *args).exit_code == 0
            assert rsps.calls and all(verified(c.request.req_kwargs["verify"]) for c in rsps.calls), args


def test_insecure_is_said_once_not_urllib3_s_warning_at_every_request(tmp_path):
    """--insecure: urllib3 warns InsecureRequestWarning at every request to an unverified host (its
    filter for SecurityWarnings is "always"), two raw lines on stderr each: 44 for one install
    against a small cluster. The command says once that verification is off, as the collector does."""
    import warnings

    from conftest import tls_server

    body = json.dumps({"version": {"number": "8.18.0", "build_flavor": "default"}}).encode()
    with tls_server(tmp_path, body) as url:
        with warnings.catch_warnings(record=True) as caught:  # the process's filters, restored after
            r = run("install", "--es-url", url, "--skip-kibana", "--dry-run", "--insecure")
    assert [str(w.message)[:40] for w in caught] == [], r.output
    assert r.output.count("TLS certificate verification is off (--insecure)") == 1, r.output


@pytest.mark.parametrize("command", ["install", "uninstall"])
def test_without_kibana_url_is_one_line_before_any_request(command):
    """uninstall read the Elasticsearch version first, then stopped at Kibana's with "no Kibana
    URL given" and a summary of "0 assets not done", where install says what to pass up front."""
    with responses.RequestsMock() as rsps:  # any request would raise ConnectionError
        line = _one_line_error(run(command, "--es-url", ES))
        assert len(rsps.calls) == 0
    assert "--kibana-url (or KIBANA_URL) is required (or pass --skip-kibana)" in line


def test_a_foreign_copy_of_our_asset_is_taken_over_even_with_our_fingerprint(stack):
    """The fingerprint alone does not make an asset ours: `_meta.managed_by` decides."""
    assert install("--skip-kibana").exit_code == 0
    stack.index["logs-openai.completions"]["_meta"]["managed_by"] = "fleet"
    result = install("--skip-kibana", "--replace-foreign-assets")
    assert result.exit_code == 0, result.output
    assert re.search(r"updated\s+index_template logs-openai.completions  \(taken over from fleet\)", result.output)
    assert stack.index["logs-openai.completions"]["_meta"]["managed_by"] == "openai-assets"


@pytest.mark.parametrize("field,value", [("name", "renamed by someone"), ("title", "logs-*"),
                                         ("timeFieldName", "event.created")])
def test_a_changed_data_view_is_put_back_through_the_update_api(stack, field, value):
    """Create's `override` matches by title: a data view of ours whose title was edited is put
    back by id with the update API, not re-created (which would conflict with its id)."""
    assert install().exit_code == 0
    stack.data_views[K.DATA_VIEW_ID][field] = value
    stack.calls.clear()
    result = install()
    assert result.exit_code == 0, result.output
    assert re.search(rf"updated\s+data_view {K.DATA_VIEW_ID}", result.output)
    (post,) = stack.writes()
    assert post["path"] == f"/api/data_views/data_view/{K.DATA_VIEW_ID}"
    assert json.loads(post["body"]) == {"data_view": {"title": K.DATA_VIEW_TITLE, "name": K.DATA_VIEW_NAME,
                                                      "timeFieldName": "@timestamp"}}
    assert {k: stack.data_views[K.DATA_VIEW_ID][k] for k in K.DATA_VIEW_FIELDS} == \
        {k: K.data_view()["data_view"][k] for k in K.DATA_VIEW_FIELDS}


def test_a_data_view_is_created_with_override(stack):
    """A data view of someone else's with our title is replaced (create's documented `override`)."""
    stack.data_views["theirs"] = {"id": "theirs", "title": K.DATA_VIEW_TITLE, "name": "theirs"}
    result = install()
    assert result.exit_code == 0, result.output
    (post,) = [c for c in stack.writes() if c["path"] == "/api/data_views/data_view"]
    assert json.loads(post["body"])["override"] is True
    assert set(stack.data_views) == {K.DATA_VIEW_ID}


def test_a_failed_dashboard_import_is_an_error():
    """The import API answers 200 with `success: false` and `errors` when objects were not imported."""
    fake = FakeStack()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.POST, KB + "/api/saved_objects/_import", json={
            "success": False, "successCount": 0,
            "errors": [{"id": "openai-elastic-usage-overview", "type": "dashboard", "error": {"type": "unknown"}}]})
        fake.install(rsps)
        result = install()
    assert result.exit_code == 1, result.output
    assert ("install incomplete: failed to import dashboard openai-elastic-usage-overview: "
            "dashboard/openai-elastic-usage-overview: unknown") in result.output
    assert "rule " in result.output.split("not done:")[1]


def test_dry_run_of_an_upgrade_writes_nothing(stack):
    assert install().exit_code == 0
    stack.data_views[K.DATA_VIEW_ID]["name"] = "renamed"
    stack.component["logs-openai.completions@package"]["_meta"]["fingerprint"] = "0000000000000000"
    stack.calls.clear()
    result = install("--headroom-threshold", "0.9", "--dry-run")
    assert result.exit_code == 0, result.output
    assert stack.writes() == []
    assert re.search(rf"would update\s+rule {K.RULE_ID_HEADROOM_TPM}", result.output)
    assert re.search(rf"would update\s+data_view {K.DATA_VIEW_ID}", result.output)
    assert re.search(r"would update\s+component_template logs-openai.completions@package", result.output)


@pytest.mark.parametrize("edit", [
    lambda r: r.update(schedule={"interval": "1h"}),
    lambda r: r.update(alert_delay={"active": 5}),
    lambda r: r.update(tags=["mine"]),
    lambda r: r.update(name="renamed"),
    lambda r: r["params"].update(timeWindowSize=7),
], ids=["schedule", "alert_delay", "tags", "name", "params"])
def test_a_rule_edited_in_kibana_is_put_back(stack, edit):
    """docs/assets.md: an existing rule is updated if its name, tags, schedule, params or alert delay
    differ (our tags put back, the user's own kept)."""
    assert install().exit_code == 0
    edit(stack.rules[K.RULE_ID_LIMITS_STALE])
    stack.calls.clear()
    result = install()
    assert result.exit_code == 0, result.output
    assert [(c["method"], c["path"]) for c in stack.writes()] == [("PUT", f"/api/alerting/rule/{K.RULE_ID_LIMITS_STALE}")]
    want = K.rules()[2].update_body("9.1.3")
    rule = stack.rules[K.RULE_ID_LIMITS_STALE]
    if "mine" in rule["tags"]:  # ours are put back; a tag the user added is kept
        want["tags"] = [*K.TAGS, "mine"]
    assert {k: rule[k] for k in ("name", "tags", "schedule", "alert_delay", "params")} == \
        {k: want[k] for k in ("name", "tags", "schedule", "alert_delay", "params")}


def test_uninstall_keeps_our_component_templates_that_a_foreign_template_uses(stack):
    """A foreign index template keeps the component templates it is composed of, ours included."""
    assert install("--skip-kibana").exit_code == 0
    stack.index["logs-openai.completions"]["_meta"]["managed_by"] = "fleet"
    result = run("uninstall", "--es-url", ES, "--skip-kibana")
    assert result.exit_code == 0, result.output
    assert re.search(r"kept\s+component_template logs-openai.completions@package  "
                     r"\(used by index template logs-openai.completions, managed by fleet\)", result.output)
    assert set(stack.component) == {"logs-openai.completions@package"}
    assert set(stack.index) == {"logs-openai.completions"}


def test_another_refusal_to_delete_an_index_template_is_an_error_not_kept():
    fake = FakeStack()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.DELETE, ES + "/_index_template/logs-openai.audit", status=400,
                 json={"error": {"type": "illegal_argument_exception", "reason": "something else went wrong"}})
        fake.install(rsps)
        assert install("--skip-kibana").exit_code == 0
        result = run("uninstall", "--es-url", ES, "--skip-kibana")
    assert result.exit_code == 1, result.output
    assert "uninstall incomplete: failed to delete index_template logs-openai.audit: HTTP 400: " \
        "something else went wrong" in result.output
    assert "pipeline logs-openai.audit@pipeline" in result.output.split("not done:")[1]


def test_uninstall_dry_run_reports_a_missing_kibana_privilege(stack):
    assert install().exit_code == 0
    stack.forbid.add(("GET", r"/api/alerting/rule/.*"))
    result = run("uninstall", "--es-url", ES, "--kibana-url", KB, "--dry-run")
    assert result.exit_code == 3, result.output
    assert "missing privilege: Kibana feature privilege 'Stack Rules: All'" in result.output
    assert "is needed to read rule" in result.output


def test_a_user_name_with_a_colon_is_refused():
    """Basic auth cannot carry a colon in the user name (it separates user and password)."""
    with responses.RequestsMock() as rsps:
        line = _one_line_error(run("install", "--es-url", ES, "--kibana-url", KB,
                                   env={"ELASTIC_API_KEY": "", "ELASTIC_USERNAME": "team:ai",
                                        "ELASTIC_PASSWORD": PASSWORD}))
        assert len(rsps.calls) == 0
    assert "the user name contains a colon" in line and PASSWORD not in line


def test_credentials_never_show_in_their_repr(tmp_path):
    from kibana_assets.installer import Target, resolve_credentials

    key = resolve_credentials(env={"ELASTIC_API_KEY": API_KEY})
    basic = resolve_credentials(env={"ELASTIC_USERNAME": "u", "ELASTIC_PASSWORD": PASSWORD})
    import base64
    token = base64.b64encode(f"u:{PASSWORD}".encode()).decode()
    for creds in (key, basic):
        for text in (repr(creds), str(creds), repr(Target(ES, KB, creds))):
            assert API_KEY not in text and PASSWORD not in text and token not in text


def test_an_api_key_with_a_trailing_newline_in_the_environment_works(stack):
    result = install("--skip-kibana", env={"ELASTIC_API_KEY": API_KEY + "\n"})
    assert result.exit_code == 0, result.output
    assert all(c["headers"]["Authorization"] == f"ApiKey {API_KEY}" for c in stack.calls)


def test_password_in_the_url_is_not_printed_when_the_answer_is_not_json():
    url = "http://elastic:S3cretPW@es.test:9200"
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, url + "/", body="<html>login</html>", content_type="text/html")
        result = run("install", "--es-url", url, "--skip-kibana")
    assert result.exit_code == 1, result.output
    assert "S3cretPW" not in result.output
    assert "GET http://***@es.test:9200/ answered with something that is not" in result.output


@pytest.mark.parametrize("command", ["export", "install"])
def test_a_headroom_threshold_that_is_not_a_number_is_refused(tmp_path, command):
    """click's FloatRange(0, 10) let `nan` through: the rules said `WHERE tpm_utilization >= nan`."""
    args = [str(tmp_path / "out")] if command == "export" else ["--es-url", ES, "--skip-kibana", "--dry-run"]
    result = CliRunner().invoke(main, [command, *args, "--headroom-threshold", "nan"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for --headroom-threshold: nan is not a number" in result.output
    assert not (tmp_path / "out").exists()


def test_export_manifest_and_rules_follow_the_options(tmp_path):
    out = tmp_path / "b"
    result = run("export", str(out), "--rules-disabled")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(m["service"], m["method"], m["path"]) for m in manifest] == (
        [("elasticsearch", "PUT", a.path) for a in E.es_assets()]
        + [("kibana", "POST", "/api/saved_objects/_import?overwrite=true")]
        + [("kibana", "POST", f"/api/alerting/rule/{r.id}") for r in K.rules()])
    assert all(m["headers"] == {"kbn-xsrf": "true"} for m in manifest if m["service"] == "kibana")
    for r in K.rules():
        body = json.loads((out / f"kibana/rules/{r.id}.json").read_text())
        assert body["enabled"] is False
    # without --kibana-version the rules are for the newest Kibana: one alert per row
    tpm = json.loads((out / f"kibana/rules/{K.RULE_ID_HEADROOM_TPM}.json").read_text())
    assert tpm["params"]["groupBy"] == "row"
    assert "Left out: rules for 8.19 and 9.1+" in " ".join(run("export", "--help").output.split())


def test_rule_descriptions_follow_the_headroom_threshold():
    tpm, rpm, *_others = K.rules(K.RuleOptions(headroom_threshold=0.9))
    assert ">= 90% of the TPM limit" in tpm.description and ">= 90% of the RPM limit" in rpm.description
    assert ">= 80% of the TPM limit" in K.rules()[0].description


def test_a_proxy_page_echoing_the_authorization_header_is_not_printed():
    """A proxy that answers with an error page quoting the request's headers: the installer
    printed up to 300 characters of it, the ApiKey or Basic value included."""
    import requests as _requests

    from kibana_assets.installer import Credentials, InstallerError, _reason

    Credentials("ApiKey " + API_KEY, "test")  # registered for redaction as the installer does
    page = f"<html><pre>GET / HTTP/1.1\nAuthorization: ApiKey {API_KEY}\nAccept: */*</pre></html>"
    resp = _requests.Response()
    resp.status_code, resp._content = 502, page.encode()
    assert API_KEY[:12] not in _reason(resp) and "ApiKey ***" in _reason(resp)
    assert API_KEY[:12] not in str(InstallerError(f"failed: {page}"))
    basic = "Basic " + __import__("base64").b64encode(f"elastic:{PASSWORD}".encode()).decode()
    assert basic[6:18] not in str(InstallerError(f"Authorization: {basic[:40]}"))


@pytest.mark.parametrize("body, said", [
    ({"error": {"type": "security_exception", "reason": "action [indices:admin/create] is unauthorized"}},
     "action [indices:admin/create] is unauthorized"),  # Elasticsearch
    ({"error": {"type": "resource_already_exists_exception"}}, "resource_already_exists_exception"),
    ({"statusCode": 409, "error": "Conflict", "message": "Saved object [dashboard/x] conflict"},
     "Saved object [dashboard/x] conflict"),  # Kibana
    ({"statusCode": 403, "error": "Forbidden", "message": ""}, "Forbidden"),  # Kibana, no message
    (["not", "an", "object"], '["not", "an", "object"]'),
])
def test_an_error_answer_is_said_by_its_reason_in_every_shape(body, said):
    """_reason: Elasticsearch's error.reason (else its type), Kibana's message (else its error
    word), anything else as JSON; what `failed to ...: HTTP n: <reason>` lines end with."""
    import requests as _requests

    from kibana_assets.installer import _reason

    resp = _requests.Response()
    resp.status_code, resp._content = 400, json.dumps(body).encode()
    assert _reason(resp) == said
