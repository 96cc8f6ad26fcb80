"""Direct delivery to Elasticsearch: `create` operations with the deterministic `_id`.

For users without Elastic Agent (`openai-input collect --output elasticsearch`). Each outbox batch
becomes `create` operations into `logs-<dataset>-<namespace>` (the document's own
`data_stream.*`), sent with the official client's `helpers.streaming_bulk`. The batch is
acknowledged (and leaves the outbox) only when every document in it is accounted for:

- **created** (201), or **already there** (409 `version_conflict_engine_exception` on create:
  the same id always carries the same content, so this is a re-delivery; counted, not an error);
- **stored in the failure store** (201 with `"failure_store": "used"`): Elasticsearch 9.2+ turns a
  data stream's failure store on by default for new `logs-*-*` data streams, ours included, and a
  document that would have been rejected (a mapping conflict, an ingest pipeline failure) is kept
  there instead, in `<data stream>::failures`, outside every dashboard's sums. It is in
  Elasticsearch, so it is not dead-lettered, but each batch with such documents logs a WARNING
  naming the data stream, how many, the first ids and where to read them, and they are counted;
- **retried**: 408, 429 and 5xx, per item (partial bulk failures) or for the whole request, and
  connection errors, by the output's own loop (`attempts`, exponential backoff from
  `initial_backoff` up to `max_backoff`: about 2.5 minutes of patience), whose waits end on a
  stop; the bulk helper's own retries (`max_retries`) are off by default, as they sleep through
  a stop. When patience runs out the batch stays in the outbox and `OutputError` stops the
  collector with one clear line;
  a 2xx answer that is not a bulk answer (a proxy, a broken cluster: no `items`, fewer items than
  documents, items for documents not sent...) is retried the same way, with a plain reason;
- **split**: a whole request refused with 413 (`http.max_content_length`, or a proxy's body limit
  below our `max_chunk_bytes`) is sent again as two requests, halving down to one document; when
  no request gets through at all, the limit is below ordinary documents and `OutputError` says so;
- **refused for its index**: an item error about the target index or the cluster rather than the
  document — HTTP 401/403/404, or an error type in `INDEX_ERROR_TYPES`: `index_not_found_exception`
  (auto-creation not allowed by `action.auto_create_index`, or no privilege to create it),
  `invalid_index_name_exception`, `index_closed_exception`, `cluster_block_exception`,
  `security_exception`, or an `illegal_argument_exception` saying the index's ingest pipeline does
  not exist (the assets not installed) — would be the same for every document bound for that index, so it is
  treated like a refused request: nothing is dead-lettered, the batch stays in the outbox and
  `OutputError` names the index and the reason;
- **rejected** for good (any other 4xx on an item: an error in the document itself, e.g.
  `mapper_parsing_exception`, `document_parsing_exception`, `strict_dynamic_mapping_exception`, an
  `illegal_argument_exception` about a field; or 413 for a document refused alone while others got
  through): written, with the error, to the
  dead-letter file `<state dir>/dead-letter.ndjson` (fsynced) once the rest of the batch is delivered,
  just before the batch is acknowledged (a batch stopped part way dead-letters nothing, so its re-sending
  does not write the same record twice), so one bad document cannot block its stream forever, and it is never silently
  lost; the batch's documents rejected for the same cause (dataset, status, error type) are one
  ERROR line with their count, the reason and the first ids. A batch's records are one append and
  one fsync (and one of the folder when the file is new or empty: the first, or after a rotation). Once the file has reached `dead_letter_max_bytes` (100 MiB) it is moved to
  `dead-letter.ndjson.1` before the next batch's records, replacing the older records there, with a WARNING.
  If the dead-letter file cannot be written, the batch is not acknowledged, and records written
  only in part (a full disk) are cut back at once, so the file only ever holds whole lines.

Any other status for the whole request (401/403, 404, 400...) means nothing reached Elasticsearch
and retrying will not help (a wrong URL, key or proxy): no document is dead-lettered, the batch
stays in the outbox and `OutputError` names the status and URL.

Backpressure: `send` returns only when the batch is settled, so a collector thread never reads
its next page while the cluster is behind; memory is bounded by one page per stream (a batch is
parsed and settled `SEND_PART_LINES` documents at a time: a rate-limits cycle or an audit slice is
one batch of up to hundreds of thousands; at most `chunk_size` documents / `max_chunk_bytes` per
request) and at most `max_concurrent` bulk
requests are in flight across streams. Everything not yet delivered waits on disk, in the outbox.
A stop (SIGTERM) waits for the bulk requests in flight only: no
request starts after it, and a batch not wholly delivered is not acknowledged, so it is sent again
at the next start.

Compatibility: Elasticsearch 8.18+ and 9.x, and Elastic Cloud Serverless (told by `build_flavor`,
its version number not checked: `check_cluster`). The 9.x Python client sends
`Accept/Content-Type: application/vnd.elasticsearch+json; compatible-with=9`, which 8.x servers
reject ("Accept version must be either version 8 or 7"); 9.x servers accept compatible-with=8.
So the client is built with a transport that pins every request to `compatible-with=8`, which both
understand and which, for the few APIs used here (info, bulk create), means the same thing.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import orjson

from .config import credential_problem, display_url, url_problem
from .durable import fsync, fsync_dir, truncate_partial_line, write_all
from .http_client import StoppedError
from .outputs import Ack, OutputError

log = logging.getLogger("agent_input.es_output")

COMPAT_MAJOR = 8
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
DEAD_LETTER_NAME = "dead-letter.ndjson"
# Past this size the dead-letter file is moved to `dead-letter.ndjson.1` (replacing the older one)
# before the next record: a dataset rejected for days must not fill the state directory's disk.
DEAD_LETTER_MAX_BYTES = 100 * 1024 * 1024
# Per-document errors that are about the target index or the cluster, not the document: every
# document bound for that index gets the same, so they stop delivery instead of dead-lettering.
INDEX_ERROR_TYPES = frozenset({
    "index_not_found_exception",  # may not be created: action.auto_create_index, no privilege to create it
    "invalid_index_name_exception",  # a name Elasticsearch does not allow (e.g. over 255 bytes)
    "index_closed_exception",  # the write index is closed
    "cluster_block_exception",  # a write block (read-only index or cluster); the 429 of a full disk is retried
    "security_exception",  # no privilege on the index
})
# An index's default or final pipeline that does not exist (the assets not installed, or removed):
# Elasticsearch reports it per document as an `illegal_argument_exception` whose only mark is its
# reason text, "pipeline with id [<id>] does not exist"; every document of that index gets it.
_MISSING_PIPELINE = re.compile(r"pipeline with id \[[^\]]*\] does not exist")
ENV_API_KEY = "ELASTIC_API_KEY"
ENV_USERNAME = "ELASTIC_USERNAME"
ENV_PASSWORD = "ELASTIC_PASSWORD"
ENV_CLOUD_ID = "ELASTIC_CLOUD_ID"
_COMPAT_RE = re.compile(r"compatible-with=\d+")


class MalformedBulkAnswer(Exception):
    """A bulk request answered 2xx with a body not shaped as Elasticsearch's bulk answer (a proxy,
    a broken cluster): its text is a plain reason. Raised before the bulk helper reads the answer,
    where it would fail with a KeyError or TypeError; the batch is retried like a connection error."""


def bulk_answer_problem(body: Any, sent: int | None) -> str | None:
    """Why a 2xx bulk answer cannot be read, for `sent` documents (None: not known); None when it can."""
    if not isinstance(body, Mapping):
        return f"the bulk answer is {_kind(body)}, not a JSON object"
    if "items" not in body:
        return "the bulk answer has no `items`"
    items = body["items"]
    if not isinstance(items, list):
        return f"the bulk answer's `items` is {_kind(items)}, not a list"
    if sent is not None and len(items) != sent:
        return f"the bulk answer lists {len(items)} item{'' if len(items) == 1 else 's'} for {sent} documents"
    for n, item in enumerate(items, 1):
        result = next(iter(item.values())) if isinstance(item, Mapping) and len(item) == 1 else None
        if not isinstance(result, Mapping):
            return f"item {n} of the bulk answer is not an {{operation: result}} object"
        status = result.get("status")
        if not isinstance(status, int) or isinstance(status, bool):
            return f"item {n} of the bulk answer has no numeric `status`"
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "text" if value.strip() else "empty"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", dict: "an object", bool: "a boolean"}.get(type(value), type(value).__name__)


def _compat_transport_class():
    from elastic_transport import SerializationError, Transport

    class CompatTransport(Transport):
        """Rewrites `compatible-with=<client major>` to `compatible-with=8` on every request, and
        checks the shape of a 2xx bulk answer before the bulk helper reads it (`MalformedBulkAnswer`)."""

        def perform_request(self, method, target, *, headers=None, **kwargs):  # type: ignore[override]
            if headers:
                headers = headers.copy() if hasattr(headers, "copy") else dict(headers)
                for name in ("accept", "content-type"):
                    value = headers.get(name)
                    if isinstance(value, str) and "compatible-with=" in value:
                        headers[name] = _COMPAT_RE.sub(f"compatible-with={COMPAT_MAJOR}", value)
                kwargs["headers"] = headers
            if target.split("?")[0] != "/_bulk":
                return super().perform_request(method, target, **kwargs)
            try:
                response = super().perform_request(method, target, **kwargs)
            except SerializationError:  # its text quotes the whole body
                raise MalformedBulkAnswer("the bulk answer is not valid JSON") from None
            if 200 <= response.meta.status < 300:
                body = kwargs.get("body")  # the create operations: an action line, then the document
                problem = bulk_answer_problem(response.body, len(body) // 2 if isinstance(body, list) else None)
                if problem:
                    raise MalformedBulkAnswer(problem)
            return response

    return CompatTransport


def make_client(
    url: str | None = None,
    *,
    cloud_id: str | None = None,
    ca_file: str | None = None,
    verify: bool = True,
    env: Mapping[str, str] = os.environ,
    request_timeout: float = 60.0,
):
    """An `Elasticsearch` client from a URL or cloud id (the cloud id wins when both are given; the
    `ELASTIC_CLOUD_ID` environment variable is used only without either), with credentials from the environment:
    `ELASTIC_API_KEY`, else `ELASTIC_USERNAME`/`ELASTIC_PASSWORD` (as for the asset installer).
    The credentials are registered for redaction before anything can log them."""
    from elasticsearch import Elasticsearch

    from .logs import register_secret, register_url_password

    if not url:  # ELASTIC_CLOUD_ID only stands in for a missing URL: it never overrides one given
        cloud_id = cloud_id or (env.get(ENV_CLOUD_ID) or "").strip() or None
    if not url and not cloud_id:
        raise OutputError("the elasticsearch output needs --es-url (or es_url in the config) or a cloud id")
    if url and not cloud_id:  # --es-url is not checked with the config: the client's error quotes it whole
        problem = url_problem(url)
        if problem:
            raise OutputError(f"the Elasticsearch URL {display_url(url)!r} is not a valid URL: {problem}")
        register_url_password(url)
    kwargs: dict[str, Any] = {
        "transport_class": _compat_transport_class(),
        "request_timeout": request_timeout,
        # retries (with backoff) are ours, see ElasticsearchOutput; the transport fails fast
        "max_retries": 0,
        "retry_on_timeout": False,
    }
    api_key = (env.get(ENV_API_KEY) or "").strip()
    user, password = env.get(ENV_USERNAME) or "", env.get(ENV_PASSWORD) or ""
    if api_key:
        register_secret(api_key)
        bad = credential_problem(api_key, allow_space=False, ascii_only=True)
        if bad:  # checked here: the HTTP library's error would quote the header, key and all
            raise OutputError(f"{ENV_API_KEY} contains {bad}; it must be the encoded key exactly as "
                              "Elasticsearch returned it")
        kwargs["api_key"] = api_key
    elif user or password:
        if not (user and password):
            raise OutputError(f"set both {ENV_USERNAME} and {ENV_PASSWORD} (or {ENV_API_KEY})")
        register_secret(password)
        for name, value in ((ENV_USERNAME, user), (ENV_PASSWORD, password)):
            bad = credential_problem(value, allow_space=True) or (
                "a colon" if name == ENV_USERNAME and ":" in value else None)
            if bad:
                raise OutputError(f"{name} contains {bad}")
        # encoded here, as UTF-8 (what Elasticsearch decodes): the client encodes a (user, password)
        # pair as ASCII and fails on any other character (elastic/elasticsearch-py#1054)
        token = base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")
        register_secret(token)
        kwargs["basic_auth"] = token
    elif not (url and urlsplit(url).username):  # the client sends a URL's user:password@ itself
        log.warning("no Elasticsearch credentials (%s or %s/%s): sending requests without auth",
                    ENV_API_KEY, ENV_USERNAME, ENV_PASSWORD)
    if cloud_id:
        kwargs["cloud_id"] = cloud_id
    else:
        kwargs["hosts"] = [url]
    https = bool(cloud_id) or str(url).lower().startswith("https:")
    if https:
        kwargs["verify_certs"] = verify
        if ca_file:
            if not Path(ca_file).is_file():
                raise OutputError(f"Elasticsearch CA file {ca_file!r} is not a readable file")
            kwargs["ca_certs"] = ca_file
        if not verify:
            kwargs["ssl_show_warn"] = False
            log.warning("TLS certificate verification of Elasticsearch is OFF")
    try:
        return Elasticsearch(**kwargs)
    except Exception as exc:  # bad URL, bad cloud id
        from .logs import redact

        message = str(exc).replace(url, display_url(url)) if url else str(exc)
        raise OutputError(f"cannot set up the Elasticsearch client: {redact(message)}") from None


def target_index(doc: Mapping[str, Any], stream: str, namespace: str) -> tuple[str, str]:
    """(dataset, data stream name) of a document, from its own `data_stream` fields."""
    ds = doc.get("data_stream") if isinstance(doc.get("data_stream"), Mapping) else {}
    dataset = ds.get("dataset") or f"openai.{stream}"
    ns = ds.get("namespace") or namespace
    kind = ds.get("type") or "logs"
    return dataset, f"{kind}-{dataset}-{ns}"


SEND_PART_LINES = 5000  # documents parsed and settled at a time (a usage page's most results)


def _parts(payload: bytes, lines: int) -> Iterator[bytes]:
    """`payload` cut after every `lines`-th newline (the whole of it when it has fewer)."""
    start, size = 0, len(payload)
    while start < size:
        end = start
        for _ in range(lines):
            end = payload.find(b"\n", end) + 1
            if not end:
                end = size
                break
        if start == 0 and end >= size:
            yield payload
            return
        yield payload[start:end]
        start = end


class ElasticsearchOutput:
    """An `Output` that bulk-creates each batch and acknowledges it once settled (see module doc)."""

    def __init__(
        self,
        client,
        *,
        state_dir: str | Path,
        namespace: str = "default",
        chunk_size: int = 500,
        max_chunk_bytes: int = 10 * 1024 * 1024,
        max_retries: int = 0,  # the bulk helper's retries: they sleep through a stop (see the module doc)
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
        attempts: int = 10,
        max_concurrent: int = 2,
        stop: threading.Event | None = None,
        sleep: Callable[[float], None] | None = None,
        dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES,
    ):
        self.client = client
        self.namespace = namespace
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        self.max_retries = max_retries
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.attempts = max(1, attempts)
        self.stop = stop or threading.Event()
        self._sleep = sleep
        self._slots = threading.BoundedSemaphore(max(1, max_concurrent))
        self._dead_lock = threading.Lock()
        self.dead_letter_path = Path(state_dir) / DEAD_LETTER_NAME
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self._count_lock = threading.Lock()
        self.created = 0
        self.duplicates = 0
        self.rejected = 0
        self.failure_stored = 0
        self.retried = 0
        self.events = 0

    # -- the Output protocol ---------------------------------------------------------------------
    def send(self, stream: str, payload: bytes, events: int, on_ack: Ack) -> None:
        # Documents Elasticsearch rejected for good, dead-lettered only once the whole batch is
        # settled: a batch that stops on an index-level error or a stop is sent again whole, and
        # would otherwise dead-letter them a second time.
        rejected: list[tuple[dict, Any, Mapping]] = []
        stored: dict[str, list[tuple[str, str]]] = {}  # data stream -> (id, dataset) kept in its failure store
        # A batch is parsed and settled SEND_PART_LINES documents at a time: parsed whole, a
        # rate-limits cycle of 5,000 projects (171,000 documents, 138 MB) took 1.2 GB of RSS.
        for part in _parts(payload, SEND_PART_LINES):
            if not self._send_part(stream, part, rejected, stored):
                return  # stopped: not acknowledged, the batch is re-sent at the next start
        causes: dict[tuple, list] = {}  # (dataset, status, error type) -> [ids, first reason]
        if rejected:
            self._dead_letter(rejected)
        for doc, status, info in rejected:
            error = info.get("error")
            cause = causes.setdefault((doc["dataset"], status, error.get("type") if isinstance(error, Mapping) else None),
                                      [[], _reason(info)])
            cause[0].append(doc["_id"])
        for (dataset, status, _kind), (ids, reason) in causes.items():  # a line per cause, not per document
            log.error("Elasticsearch rejected %d %s document%s (HTTP %s: %s); written to %s; first ids: %s",
                      len(ids), dataset, "" if len(ids) == 1 else "s", status, reason, self.dead_letter_path,
                      ", ".join(ids[:3]))
        for index, ids in stored.items():
            log.warning("Elasticsearch kept %d %s document%s in the failure store of %s, not in the data stream "
                        "(a mapping conflict or an ingest pipeline failure): the dashboards do not count %s. "
                        "Read the error with `FROM %s::failures`, fix its cause and reindex them; first ids: %s",
                        len(ids), ids[0][1], "" if len(ids) == 1 else "s", index,
                        "it" if len(ids) == 1 else "them", index, ", ".join(i for i, _ in ids[:3]))
        with self._count_lock:
            self.events += events
        on_ack()

    def _send_part(self, stream: str, payload: bytes, rejected: list, stored: dict) -> bool:
        """Settle a part of a batch (created, already there, kept in a failure store: `stored`, or
        in `rejected`); False when a stop ended the wait for a retry."""
        docs = self._parse(stream, payload)
        pending: dict[str, dict] = {d["_id"]: d for d in docs}
        attempt = 0
        while pending:
            attempt += 1
            failure = ""
            if not self._take_slot():
                break  # stopped while other streams' requests held every slot
            try:
                failure = self._bulk(pending, rejected=rejected, stored=stored)
            except OutputError:
                raise
            except MalformedBulkAnswer as exc:
                failure = str(exc)
            except Exception as exc:  # connection refused/reset, timeout, TLS...
                failure = _describe_exc(exc)
            finally:
                self._slots.release()
            if not pending or self.stop.is_set():
                break
            if attempt >= self.attempts:
                raise OutputError(
                    f"Elasticsearch did not take {len(pending)} of {len(docs)} {stream} documents after "
                    f"{attempt} attempts ({failure}); they stay in the outbox and are sent again at the next start"
                )
            delay = min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1))
            log.warning("%s: %d documents not delivered yet (%s); retrying in %.1fs",
                        stream, len(pending), failure, delay)
            with self._count_lock:
                self.retried += len(pending)
            if self._wait(delay):
                break
        if pending:  # stopped: not acknowledged, the batch is sent again at the next start
            log.info("%s: stopping with %d documents undelivered; they stay in the outbox", stream, len(pending))
            return False
        return True

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing must not fail
            pass

    # -- internals -------------------------------------------------------------------------------
    def _take_slot(self) -> bool:
        """One of the `max_concurrent` request slots, or False once stopped: a stop does not wait
        for every other stream's requests to a slow cluster before its own batch gives up."""
        while not self._slots.acquire(timeout=0.2):
            if self.stop.is_set():
                return False
        return True

    def _wait(self, seconds: float) -> bool:
        if self._sleep is not None:
            self._sleep(seconds)
            return self.stop.is_set()
        return self.stop.wait(seconds)

    def _parse(self, stream: str, payload: bytes) -> list[dict]:
        docs = []
        for n, line in enumerate(payload.splitlines(), 1):
            if not line.strip():
                continue
            try:
                source = json.loads(line)
                doc_id = source.pop("_id")
                if not isinstance(doc_id, str):  # every id the collector writes is one (`ecs`): a
                    # list or object was no dict key (TypeError), a number or null no id to re-send by
                    raise TypeError(doc_id)
            except (ValueError, KeyError, AttributeError, TypeError, RecursionError):  # (nested too deep)
                raise OutputError(f"{stream}: outbox line {n} is not a JSON document with an `_id`") from None
            dataset, index = target_index(source, stream, self.namespace)
            docs.append({"_id": doc_id, "_index": index, "dataset": dataset, "_source": source})
        return docs

    def _bulk(self, pending: dict[str, dict], ids: list[str] | None = None, chunk_size: int = 0,
              split: "_Split | None" = None, *, rejected: list, stored: dict) -> str:
        """One pass of streaming_bulk over the pending documents (or those of them in `ids`, in
        requests of at most `chunk_size`, when a 413 is being split: `split`); settled ones leave
        `pending`, those rejected for good go to `rejected` (dead-lettered by `send`). Returns a
        short description of what is still failing ('' when nothing)."""
        from elasticsearch import ApiError, helpers

        top = split is None
        split = split or _Split()
        ids = list(pending) if ids is None else ids
        chunk_size = chunk_size or self.chunk_size
        actions = (  # after a stop no further request starts: the rest stays pending, in the outbox
            {"_op_type": "create", "_index": d["_index"], "_id": d["_id"], "_source": d["_source"]}
            for d in (pending[i] for i in ids) if not self.stop.is_set()
        )
        last = ""
        too_large: list[tuple[Exception, list[str]]] = []  # per 413'd request: its exception, its ids
        answered: set = set()
        strays: list = []  # ids in the answer that were not sent
        for ok, item in helpers.streaming_bulk(
            self.client,
            actions,
            chunk_size=chunk_size,
            max_chunk_bytes=self.max_chunk_bytes,
            raise_on_error=False,
            raise_on_exception=False,
            max_retries=self.max_retries,
            initial_backoff=self.initial_backoff,
            max_backoff=self.max_backoff,
            retry_on_status=RETRY_STATUS,
            yield_ok=True,
        ):
            _op, info = next(iter(item.items()))
            doc_id = info.get("_id")
            doc = pending.get(doc_id)
            if doc is None:
                strays.append(doc_id)
                continue
            answered.add(doc_id)
            status = info.get("status")
            request_error = info.get("exception")
            if request_error is None:  # the helper attaches the request's ApiError when the whole request failed
                split.got_through = True  # Elasticsearch answered for this document, whatever it said
            if ok:
                pending.pop(doc_id)
                if info.get("failure_store") == "used":
                    stored.setdefault(doc["_index"], []).append((doc_id, doc["dataset"]))
                    with self._count_lock:
                        self.failure_stored += 1
                    continue
                with self._count_lock:
                    self.created += 1
            elif isinstance(request_error, ApiError):
                # the whole request failed: Elasticsearch judged no document, so none is dead-lettered
                if status == 413:
                    if not too_large or too_large[-1][0] is not request_error:
                        too_large.append((request_error, []))
                    too_large[-1][1].append(doc_id)
                elif status in RETRY_STATUS or status >= 500:
                    last = f"HTTP {status}: {_reason(info)}"
                    split.transient = True
                else:
                    raise _refused(request_error, doc)
            elif status == 409:
                pending.pop(doc_id)
                with self._count_lock:
                    self.duplicates += 1
            elif isinstance(status, int) and (status in RETRY_STATUS or status >= 500):
                last = f"HTTP {status}: {_reason(info)}"
            elif _about_the_index(status, info):
                raise _index_refused(status, info, doc["_index"])
            else:
                rejected.append((doc, status, info))
                pending.pop(doc_id)
        unanswered = sum(1 for i in ids if i not in answered)
        if unanswered:  # left in `pending`, sent again
            last = (f"the bulk answer names documents that were not sent (_id {strays[0]!r})" if strays else
                    f"the bulk answer has no item for {unanswered} of {len(ids)} documents")
        for _exc, group in too_large:
            if len(group) == 1:
                split.alone.append(group[0])
                if split.refuses_everything():
                    raise split.refused_everything(pending)
                continue
            log.warning("a bulk request of %d documents was too large for Elasticsearch (HTTP 413); "
                        "sending them in smaller requests", len(group))
            last = self._bulk(pending, group, (len(group) + 1) // 2, split, rejected=rejected,
                              stored=stored) or last
        if top and split.alone:
            if not split.got_through:
                if split.transient:
                    return last  # nothing judged yet: the outer loop retries, and the halving with it
                raise split.refused_everything(pending)
            for doc_id in split.alone:  # others got through: these are too large for the limit
                rejected.append((pending.pop(doc_id), 413, {
                    "error": "too large: a bulk request of this document alone was refused with HTTP 413 "
                             "(http.max_content_length, or a proxy's limit)"}))
        return last

    def _dead_letter(self, rejected: list) -> None:
        """Write a settled batch's rejected documents to the dead-letter file: one append and one
        fsync for them all, and all or none (OutputError, the batch then stays in the outbox)."""
        def lines() -> Iterator[bytes]:
            for doc, status, info in rejected:
                error = info.get("error")
                record = {
                    "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "_id": doc["_id"],
                    "_index": doc["_index"],
                    "dataset": doc["dataset"],
                    "status": status,
                    "error": error if isinstance(error, (dict, str)) else str(error),
                    "document": doc["_source"],
                }
                yield (json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode()

        with self._dead_lock:
            try:
                self.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
                _refuse_special_file(self.dead_letter_path)
                self._rotate_dead_letter()
                _append_records(self.dead_letter_path, lines())
            except OSError as exc:
                doc, _status, info = rejected[0]
                more = f" and {len(rejected) - 1} other document(s)" if len(rejected) > 1 else ""
                raise OutputError(
                    f"Elasticsearch rejected {doc['dataset']} document {doc['_id']} ({_reason(info)}){more} and they "
                    f"cannot be written to {self.dead_letter_path}: {exc.strerror or exc}; the batch stays in the outbox"
                ) from None
        with self._count_lock:
            self.rejected += len(rejected)

    def _rotate_dead_letter(self) -> None:
        """Move the dead-letter file to `<name>.1` (the older one is deleted) once it has reached
        `dead_letter_max_bytes`, before a batch's records: each holds at most that plus one batch's
        records (OSError)."""
        path = self.dead_letter_path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.dead_letter_max_bytes:
            return
        truncate_partial_line(path)  # a crash's fragment is not moved along with the whole records
        older = path.with_name(path.name + ".1")
        os.replace(path, older)
        fsync_dir(path.parent)
        log.warning("the dead-letter file reached %d bytes: moved to %s, replacing the records there "
                    "before; new records go to %s", size, older, path)


def _refuse_special_file(path: Path) -> None:
    """OSError for a FIFO or a device where the dead-letter file should be: its first seek failed
    with an error that names nothing (io.UnsupportedOperation), and records are appended, cut back
    and rotated there as in a file (a folder there gives open()'s own "Is a directory")."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OSError(0, "it is not a regular file (a FIFO or a device)")


_WRITE_BYTES = 1 << 20  # records are written in slices of about this size: a batch is not joined whole


def _append_records(path: Path, lines: Iterator[bytes]) -> None:
    """Append whole records and fsync them once, or leave the file as it was (OSError). A write
    that fails part-way (a full disk, a file-size limit) is cut back at once to where the file
    ended, and a partial line left by a crash in the middle of a write is cut back first: its
    batch was never acknowledged and dead-letters its documents again, while the record glued
    onto the fragment would be lost."""
    truncate_partial_line(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        before = os.fstat(fd).st_size
        try:
            buf: list[bytes] = []
            size = 0
            for line in lines:
                buf.append(line)
                size += len(line)
                if size >= _WRITE_BYTES:
                    write_all(fd, b"".join(buf))
                    buf, size = [], 0
            if buf:
                write_all(fd, b"".join(buf))
            fsync(fd)
            # a file found empty is new (the first, or after a rotation) or was made by an append
            # that failed: its name may not be durable yet, and must be before the batch's ack
            if before == 0:
                fsync_dir(path.parent)
        except OSError:
            try:
                os.ftruncate(fd, before)
            except OSError:
                pass  # the next write cuts it back to the last newline instead
            raise
    finally:
        os.close(fd)


def _about_the_index(status: Any, info: Mapping) -> bool:
    """Whether a document's error is about its target index or the cluster (see the module doc)."""
    error = info.get("error")
    kind = error.get("type") if isinstance(error, Mapping) else None
    return status in (401, 403, 404) or kind in INDEX_ERROR_TYPES or _missing_pipeline(error)


def _missing_pipeline(error: Any) -> bool:
    return (isinstance(error, Mapping) and error.get("type") == "illegal_argument_exception"
            and isinstance(error.get("reason"), str) and _MISSING_PIPELINE.search(error["reason"]) is not None)


def _index_refused(status: Any, info: Mapping, index: str) -> OutputError:
    """A document refused for a reason of its index or the cluster: every document bound for that
    index would be refused alike, so none is dead-lettered and delivery stops with the batch kept."""
    from .logs import redact

    error = info.get("error")
    kind = error.get("type") if isinstance(error, Mapping) else None
    if status in (401, 403) and (kind == "security_exception" or kind not in INDEX_ERROR_TYPES):
        return _credentials_refused(str(status), index)  # not a write block: the key or its privileges
    if _missing_pipeline(error):
        return OutputError(redact(
            f"Elasticsearch cannot write to {index}: an ingest pipeline its index template names does not exist "
            f"({_reason(info)}); install the assets (`openai-assets install`) or fix the template's pipeline; "
            "nothing is dead-lettered and the batch stays in the outbox"))
    return OutputError(redact(
        f"Elasticsearch cannot write to {index} (HTTP {status}: {_reason(info)}): this is about the index "
        "or the cluster, not the documents (action.auto_create_index, the index template, a write block, the "
        "key's privileges...); nothing is dead-lettered and the batch stays in the outbox"))


def _reason(info: Mapping) -> str:
    """An item's error for a message: redacted, then cut (a secret cut first would escape the
    redaction of the whole value)."""
    from .logs import redact

    error = info.get("error")
    if isinstance(error, Mapping):
        text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
        cause = error.get("caused_by")
        if isinstance(cause, Mapping) and cause.get("reason"):
            text += f" ({cause.get('type')}: {cause.get('reason')})"
        return redact(text)[:500]
    return redact(str(error))[:500] if error else "no reason given"


@dataclass
class _Split:
    """One batch's 413 halving: whether any request got through to Elasticsearch (it answered per
    document, whatever it answered), whether one failed for a passing reason (429/5xx), and the
    documents refused alone. A document refused alone is dead-lettered only once another request
    got through: when none does and nothing passing is in the way, the limit in front of
    Elasticsearch is below ordinary documents, a setting to fix, and two single documents refused
    end the halving instead of trying every one alone."""

    got_through: bool = False
    transient: bool = False
    alone: list = field(default_factory=list)

    def refuses_everything(self) -> bool:
        return not self.got_through and not self.transient and len(self.alone) >= 2

    def refused_everything(self, pending: Mapping[str, dict]) -> OutputError:
        size = min(len(orjson.dumps(pending[i]["_source"])) for i in self.alone)
        return OutputError(
            f"Elasticsearch (or a proxy in front of it) refused even single documents as too large (HTTP 413, "
            f"one of {size} bytes): raise http.max_content_length or the proxy's body limit; the batch stays "
            "in the outbox")


def _credentials_refused(what: str, index: str | None = None) -> OutputError:
    """401/403, from the cluster check, a whole bulk request or one of its documents."""
    privileges = f" and the index privileges on {index}; the batch stays in the outbox" if index else ""
    return OutputError(f"Elasticsearch refused the credentials ({what}): check {ENV_API_KEY} or "
                       f"{ENV_USERNAME}/{ENV_PASSWORD}{privileges}")


def _refused(exc, doc: Mapping) -> OutputError:
    """The error for a whole bulk request refused with a status that retrying cannot fix (a wrong
    URL, key or proxy): names the status and the URL, since nothing reached Elasticsearch."""
    from .logs import redact

    node = getattr(getattr(exc, "meta", None), "node", None)
    url = f"{node.scheme}://{node.host}:{node.port}{node.path_prefix}/_bulk" if node else "_bulk"
    status = exc.status_code
    if status in (401, 403):
        return _credentials_refused(f"HTTP {status} from {url}", doc["_index"])
    message = redact(" ".join(str(exc.message).split()))[:200]  # a proxy's answer may be a whole HTML page
    return OutputError(redact(
        f"Elasticsearch refused the bulk request (HTTP {status} from {url}: {message}): check the Elasticsearch "
        f"URL and any proxy in front of it; the batch stays in the outbox"))


def _describe_exc(exc: Exception) -> str:
    from elastic_transport import TlsError

    from .logs import redact

    text = str(exc) or type(exc).__name__
    if isinstance(exc, TlsError) and exc.__cause__ is not None:  # its own text is only "TLS error"
        cause = str(exc.__cause__) or type(exc.__cause__).__name__
        hint = ("; give --es-ca-file (or es_ssl_ca_file) the CA that signed the cluster's certificate"
                if "CERTIFICATE_VERIFY_FAILED" in cause else "")
        return redact(f"{type(exc).__name__}: {text}: {cause}")[:300] + hint
    return redact(f"{type(exc).__name__}: {text}")[:300]


def _at(client) -> str:
    """" at <url>" of the client's node (without credentials: they travel in headers), or ''."""
    try:
        return f" at {client.transport.node_pool.all()[0].base_url}"
    except Exception:  # noqa: BLE001 - a client of another shape (a test's fake): say it without
        return ""


def _info(client, stop: threading.Event | None):
    """`client.info()`, waited for until a stop (StoppedError): on a daemon thread, left to end by
    itself, as every request a stop must not wait for (`paging.result`)."""
    if stop is None:
        return client.info()
    from .paging import DaemonPool

    pool = DaemonPool(1, "es-info")
    try:
        return pool.run(stop, "Elasticsearch's answer", "GET /", client.info)
    finally:
        pool.shutdown(wait=False)


def check_cluster(client, stop: threading.Event | None = None) -> str:
    """`GET /`: the cluster's version, or OutputError with one clear line (auth, TLS, version).
    A `stop` ends the wait for the answer (OutputError): a cluster that never answers held a
    SIGTERM for the whole request timeout; the request is left to its daemon thread."""
    from elasticsearch import ApiError

    from .logs import redact

    try:
        info = _info(client, stop)
    except StoppedError:
        raise OutputError("stopped while waiting for Elasticsearch's answer to GET /") from None
    except ApiError as exc:
        if exc.status_code in (401, 403):
            raise _credentials_refused(str(exc.status_code)) from None
        if isinstance(exc.status_code, int) and 300 <= exc.status_code < 400:  # no body: its message is None
            try:
                location = exc.meta.headers.get("location")
            except Exception:  # noqa: BLE001 - an error of another shape: said without it
                location = None
            to = f" to {display_url(location)[:200]}" if location else ""
            raise OutputError(f"Elasticsearch{_at(client)} answered {exc.status_code}, a redirect{to}, which the "
                              "client does not follow: give the URL it redirects to") from None
        body = exc.body if isinstance(exc.body, Mapping) else {}
        # the reason, not only the error's type (which is all `exc.message` holds)
        why = _reason(body) if isinstance(body.get("error"), Mapping) else redact(str(exc.message))
        raise OutputError(f"Elasticsearch answered {exc.status_code}: {why}") from None
    except Exception as exc:  # noqa: BLE001
        raise OutputError(f"cannot reach Elasticsearch{_at(client)}: {_describe_exc(exc)}") from None
    version = str(info.get("version", {}).get("number", "?"))
    if info.get("version", {}).get("build_flavor") == "serverless":
        # Elastic Cloud Serverless: always the newest, whatever number it reports (8.11.0 for
        # years); it is told by its flavor (Elasticsearch's `GET /` reference), not the number
        return f"serverless (reports {version})"
    major = version.split(".")[0]
    try:
        major_n, minor_n = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return version
    if (major_n, minor_n) < (8, 18):
        log.warning("Elasticsearch %s is older than 8.18, the oldest version this collector is tested with", version)
    if major_n > 9:
        log.warning("Elasticsearch %s is newer than 9.x; compatible-with=%d may be refused", version, COMPAT_MAJOR)
    return version if major else "?"
