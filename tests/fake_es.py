"""A recording fake of Elasticsearch's `GET /` and `POST /_bulk`, strict where it matters.

- create-only: an `_id` that exists in the target index gives 409 version_conflict_engine_exception;
  any op other than `create` is refused (data streams only take `create`) and recorded as a violation;
  a 409 for a document whose content differs from the stored one is recorded too (an id must always
  carry the same content).
- compatibility headers as a real server checks them: an 8.x server refuses `compatible-with=9`
  ("Accept version must be either version 8 or 7"), a 9.x server takes 8 and 9.
- auth: when `auth` is set, any other Authorization header gets 401.
- faults: whole-request statuses (`fail_requests`), per-item statuses by id (`item_faults`),
  permanent rejections (`reject(source) -> error | None`; with `failure_store` on, as 9.2+ has it
  for new `logs-*-*` data streams, such a document is kept in `failures` and answered 201 with
  `"failure_store": "used"` and the failure index), refusals of a target index as a
  cluster answers them for each of its documents (`refuse_index(index) -> (status, error) | None`,
  e.g. 404 index_not_found_exception when action.auto_create_index does not allow it), a delay per bulk request, and a body-size
  limit (`max_body_bytes`) answered as a proxy in front of the cluster answers it: 413 with an HTML page;
  and a broken answer (`mangle(answer) -> answer`, or bytes sent as they are) after the documents are handled.
"""
from __future__ import annotations

import json
import re
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

_COMPAT = re.compile(r"compatible-with=(\d+)")


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """Quiet for a client that went away (the crash tests kill collectors mid-bulk); loud for
        a bug in the fake."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FakeElasticsearch:
    def __init__(self, version: str = "8.18.0", *, auth: str | None = None, certfile: str | None = None,
                 keyfile: str | None = None):
        self.version = version
        self.build_flavor = "default"  # "serverless": Elastic Cloud Serverless (GET / reports 8.11.0 there)
        self.major = int(version.split(".")[0])
        self.auth = auth
        self.docs: dict[tuple[str, str], dict] = {}
        self.requests: list[dict] = []
        self.violations: list[str] = []
        self.conflicts = 0
        self.fail_requests: list[int] = []
        self.item_faults: dict[str, list[int]] = {}
        self.reject: Callable[[dict], dict | None] | None = None
        self.failure_store = False
        self.failures: dict[tuple[str, str], dict] = {}
        self.refuse_index: Callable[[str], tuple[int, dict] | None] | None = None
        self.mangle: Callable[[dict], object] | None = None
        self.delay = 0.0
        self.max_body_bytes = 0
        self.active = 0
        self.max_active = 0
        self.max_items = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                fake._handle(self, "GET")

            def do_POST(self):
                fake._handle(self, "POST")

            def do_PUT(self):
                fake._handle(self, "PUT")

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- helpers for tests -------------------------------------------------------------------------
    def stored(self) -> list[dict]:
        """Stored documents as NDJSON lines would carry them (`_id` back at the top)."""
        with self._lock:
            return [dict(_id=i, **src) for (_idx, i), src in self.docs.items()]

    def indices(self) -> set[str]:
        with self._lock:
            return {idx for idx, _ in self.docs}

    # -- HTTP ---------------------------------------------------------------------------------------
    def _reply(self, h, status: int, body: dict) -> None:
        self._reply_raw(h, status, json.dumps(body).encode())

    def _reply_raw(self, h, status: int, data: bytes) -> None:
        h.send_response(status)
        h.send_header("X-Elastic-Product", "Elasticsearch")
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _reply_html(self, h, status: int, title: str) -> None:
        data = f"<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>".encode()
        h.send_response(status)
        h.send_header("Content-Type", "text/html")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self._lock:
            self.requests.append({"method": method, "path": h.path, "headers": headers})
        if self.auth is not None and headers.get("authorization") != self.auth:
            return self._reply(h, 401, {"error": {"type": "security_exception", "reason": "unable to authenticate"},
                                        "status": 401})
        for name in ("accept", "content-type"):
            m = _COMPAT.search(headers.get(name, ""))
            if m and not (self.major - 1 <= int(m.group(1)) <= self.major):
                reason = (f"Accept version must be either version {self.major} or {self.major - 1}, "
                          f"but found {m.group(1)}. Accept={headers.get(name)}")
                return self._reply(h, 400, {"error": {"type": "media_type_header_exception",
                                                      "reason": "Invalid media-type value on headers [Accept, Content-Type]",
                                                      "caused_by": {"type": "status_exception", "reason": reason}},
                                            "status": 400})
        path = h.path.split("?")[0]
        if method == "GET" and path == "/":
            return self._reply(h, 200, {"name": "fake", "cluster_name": "fake", "version": {
                "number": self.version, "build_flavor": self.build_flavor}, "tagline": "You Know, for Search"})
        if method in ("POST", "PUT") and path == "/_bulk":
            return self._bulk(h, body)
        return self._reply(h, 404, {"error": {"type": "not_found", "reason": path}, "status": 404})

    def _bulk(self, h, body: bytes) -> None:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            fail = self.fail_requests.pop(0) if self.fail_requests else None
        try:
            if self.delay:
                time.sleep(self.delay)
            if fail:
                return self._reply(h, fail, {"error": {"type": "unavailable", "reason": f"injected {fail}"},
                                             "status": fail})
            if self.max_body_bytes and len(body) > self.max_body_bytes:
                return self._reply_html(h, 413, "413 Request Entity Too Large")
            lines = [line for line in body.split(b"\n") if line.strip()]
            items, errors = [], False
            i = 0
            n = 0
            while i < len(lines):
                action = json.loads(lines[i])
                op, meta = next(iter(action.items()))
                source = json.loads(lines[i + 1]) if op != "delete" else None
                i += 2 if op != "delete" else 1
                n += 1
                item = self._item(op, meta, source)
                errors |= item["status"] >= 300
                items.append({op: item})
            with self._lock:
                self.max_items = max(self.max_items, n)
            answer = {"took": 1, "errors": errors, "items": items}
            if self.mangle is not None:
                answer = self.mangle(answer)
                if isinstance(answer, bytes):
                    return self._reply_raw(h, 200, answer)
            return self._reply(h, 200, answer)
        finally:
            with self._lock:
                self.active -= 1

    def _item(self, op: str, meta: dict, source: dict | None) -> dict:
        index, doc_id = meta.get("_index"), meta.get("_id")
        base = {"_index": index, "_id": doc_id}
        with self._lock:
            if op != "create":
                self.violations.append(f"{op} on {index}/{doc_id}")
                return {**base, "status": 400, "error": {"type": "illegal_argument_exception",
                                                         "reason": "only write ops with an op_type of create are allowed in data streams"}}
            if not doc_id:
                self.violations.append(f"create without _id on {index}")
            if source is not None and "_id" in source:
                self.violations.append(f"_id inside the source of {doc_id}")
                return {**base, "status": 400, "error": {"type": "document_parsing_exception",
                                                         "reason": "Field [_id] is a metadata field and cannot be added inside a document"}}
            refused = self.refuse_index(index) if self.refuse_index is not None else None
            if refused:
                return {**base, "status": refused[0], "error": refused[1]}
            faults = self.item_faults.get(doc_id)
            if faults:
                status = faults.pop(0)
                return {**base, "status": status, "error": {"type": "es_rejected_execution_exception"
                                                            if status == 429 else "unavailable_shards_exception",
                                                            "reason": f"injected {status}"}}
            if self.reject is not None:
                err = self.reject(source)
                if err and self.failure_store and re.fullmatch(r"logs-[^-]+-[^-]+", index or ""):
                    self.failures[(index, doc_id)] = {"document": source, "error": err}
                    return {"_index": f".fs-{index}-2026.12.01-000002", "_id": doc_id, "_version": 1,
                            "result": "created", "status": 201, "failure_store": "used"}
                if err:
                    return {**base, "status": 400, "error": err}
            key = (index, doc_id)
            if key in self.docs:
                self.conflicts += 1
                if self.docs[key] != source:
                    self.violations.append(f"{doc_id}: 409 with different content")
                return {**base, "status": 409, "error": {
                    "type": "version_conflict_engine_exception",
                    "reason": f"[{doc_id}]: version conflict, document already exists (current version [1])"}}
            self.docs[key] = source
            return {**base, "_version": 1, "result": "created", "status": 201}
