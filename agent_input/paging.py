"""How a usage backfill's pages share the process: fetched ahead per stream, worked on one at a time.

A backfill's wall time is bounded below by its longest chain of dependent requests (the stream
with the most pages: each page's request needs the previous page's `next_page` token) and by the
CPU its documents cost, under one GIL. Two pieces aim at the larger of the two:

- `PageFetcher`: each stream's requests run on a thread of their own, reading the token off the
  end of every raw body and asking for the next page at once, up to `PAGES_AHEAD` pages ahead of
  the page being worked on. A stream's chain then costs the API's latency, not latency plus the
  time its pages wait for the gate, the name cache or an fsync.
- `PAGE_GATE`: at most `PAGE_WORKERS` pages are parsed, compared and mapped at once, across
  every stream, which keeps memory flat (the GIL runs one at a time anyway). Waiting pages go in
  longest chain first: the long pole's pages are worked on as they arrive, so its fetch thread
  never stalls on a full read-ahead, and the other streams' pages fill the time in between.

It also holds how a request is waited for until a stop (`DaemonPool`, `result`): the fetch thread,
the audit and rate limits collectors' requests, the limits' workers and the organization check's own
projects listing run on daemon threads, and a
stop leaves a request that hangs to end by itself, its answer dropped, rather than wait out
`http_timeout`.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import queue
import re
import threading
from collections import deque
from concurrent.futures import Future, wait
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import orjson

# How many pages are parsed, compared, mapped and stored at once, across every stream thread.
# The threads still wait for the API concurrently; only the CPU- and memory-heavy part is bounded
# (the GIL runs one at a time anyway). Unbounded, ten streams each holding a parsed 5,000-result
# page, its NDJSON lines and the joined payload took a large-org backfill past 300 MB of RSS;
# one worker measured 120 MB and the same wall time as two (docs/performance.md).
PAGE_WORKERS = 1


class PageGate:
    """A semaphore whose waiters are let in by priority (highest first, then in arrival order).

    The engine gives a page the number of pages its stream still has to fetch: the stream with the
    longest chain left is served first, so that its fetch thread never stalls on a full read-ahead
    while shorter streams' pages, which have time to spare, fill the gate in between.
    """

    def __init__(self, slots: int = 1):
        self._lock = threading.Lock()
        self._free = slots
        self._slots = slots
        self._waiters: list[tuple[float, int, threading.Event]] = []
        self._seq = itertools.count()
        self._held = threading.local()  # the priority of this thread's slot, while it holds one

    def acquire(self, priority: float = 0.0, timeout: float | None = None) -> bool:
        """Take a slot, waiting behind every waiter of a higher priority; False on timeout."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            entry = (-priority, next(self._seq), threading.Event())
            heapq.heappush(self._waiters, entry)
        if entry[2].wait(timeout):
            return True
        with self._lock:
            if entry[2].is_set():  # handed the slot just as the wait timed out
                return True
            self._waiters.remove(entry)
            heapq.heapify(self._waiters)
            return False

    def release(self) -> None:
        """Give the slot back: straight to the first waiter in line, if there is one."""
        with self._lock:
            if self._waiters:
                heapq.heappop(self._waiters)[2].set()  # the slot passes straight to the waiter
            elif self._free < self._slots:
                self._free += 1
            else:
                raise ValueError("PageGate released too many times")

    @contextmanager
    def slot(self, priority: float = 0.0):
        """`with gate.slot(priority):` holds one slot for the block."""
        self.acquire(priority)
        self._held.priority = priority
        try:
            yield
        finally:
            self._held.priority = None
            self.release()

    @contextmanager
    def set_aside(self):
        """`with gate.set_aside():` around a wait for something else (the users listing) inside
        this thread's `slot`: the slot goes to other pages meanwhile, and is taken back (at the
        slot's priority) before the block's caller goes on. Outside a slot, nothing is done."""
        priority = getattr(self._held, "priority", None)
        if priority is None:
            yield
            return
        self._held.priority = None
        self.release()
        try:
            yield
        finally:
            self.acquire(priority)
            self._held.priority = priority


PAGE_GATE = PageGate(PAGE_WORKERS)
# How many pages of one stream may be fetched ahead of the one being worked on: enough that a
# chain does not stall while its pages wait (for the name cache's first load, above all); each is
# at most one 5,000-result body (3 MB for a large organization's completions).
PAGES_AHEAD = 4

# where the API puts the next page's token: the last members of the page object
_NEXT_PAGE_AT_END = re.compile(rb'"has_more"\s*:\s*true\s*,\s*"next_page"\s*:\s*("(?:[^"\\]|\\.)*")\s*}\s*$')


STOP_CHECK = 0.2  # seconds: how often a wait for a page (or a name) looks at the stop event


def stopped(what: str, path: str = "") -> Exception:
    """The StoppedError of a wait cut short by a stop: the poll ends there, its cursor unmoved."""
    from .http_client import StoppedError

    return StoppedError(None, f"stopped while waiting for {what}", "stopped", path)


class DaemonPool:
    """ThreadPoolExecutor's `submit` and `shutdown` on daemon threads, made as jobs need them (up
    to `max_workers`) and kept until `shutdown`. ThreadPoolExecutor's workers are joined at the
    interpreter's exit: a request that hangs (its whole `http_timeout`, up to 10 minutes) held
    `collect`'s exit after a SIGTERM for as long, and a Ctrl-C in that wait was a KeyboardInterrupt
    traceback from threading's shutdown. `result` waits for a job until a stop, then leaves it to
    end by itself on its daemon thread (its answer is dropped)."""

    def __init__(self, max_workers: int, thread_name_prefix: str, initializer: Callable[[], None] | None = None):
        self._max, self._prefix, self._initializer = max_workers, thread_name_prefix, initializer
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)  # workers waiting for a job

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
            thread = threading.Thread(target=self._work, name=f"{self._prefix}_{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return future

    def _work(self) -> None:
        if self._initializer is not None:
            try:
                self._initializer()
            except Exception as exc:  # noqa: BLE001 - the worker's jobs use their caller's fallback
                logging.getLogger("agent_input.paging").debug("%s: a worker could not be set up: %s",
                                                              self._prefix, exc)
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the future
                    future.set_exception(exc)
            self._idle.release()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        if cancel_futures:
            try:
                while True:
                    item = self._queue.get_nowait()
                    if item is not None:
                        item[0].cancel()
            except queue.Empty:
                pass
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def run(self, stop: threading.Event | None, what: str, path: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on a worker, waited for until a stop (`result`)."""
        return result(self.submit(fn, *args), stop, what, path)


def result(future: Future, stop: threading.Event | None, what: str, path: str = "") -> Any:
    """`future`'s result (or its exception), or StoppedError once `stop` is set while it is not
    done: the job is cancelled if it has not started, and left to end by itself (on a daemon
    thread: `DaemonPool`) if it has; what it would have given is dropped, so nothing of it is
    stored and the next poll asks again."""
    while stop is not None and not wait((future,), STOP_CHECK).done:
        if stop.is_set():
            future.cancel()
            raise stopped(what, path)
    return future.result()


class PageFetcher:
    """One stream's chain of page requests, read ahead of the pages being worked on.

    The fetch thread reads each page's `next_page` token off the end of the raw body and asks for
    that page at once, up to `PAGES_AHEAD` pages beyond the one taken last. The token is a guess that
    the engine checks against the parsed page: a wrong one restarts the chain at the right token
    (one wasted request, never data), one on the last page is dropped. There is never more than
    one request in flight per stream. Clients without `get_raw` (test doubles) give parsed
    objects: no token to read, one page at a time, the next asked for by `request`. Leaving the
    block on an error or a stop drops what is still in flight (a later poll asks again) without
    waiting for it, so the error is reported at once; a stop also ends a wait in `take` (a request
    may hang for up to `http_timeout`, 10 minutes at most). The fetch thread is a daemon
    (`DaemonPool`): a request that hangs does not hold `collect`'s exit after a SIGTERM.
    """

    def __init__(self, client, path: str, stop: threading.Event | None = None):
        self.client, self.path, self._stop = client, path, stop
        self._raw = getattr(client, "get_raw", None)
        self._ahead = max(1, PAGES_AHEAD)
        self._pool = DaemonPool(1, "page-fetch")  # one thread: never more than one request in flight
        self._cond = threading.Condition()
        self._pages: deque = deque()  # (answer, failed, token the next request used), in order
        self._chain = 0  # bumped by request/discard: answers of an older chain are dropped
        self._closed = False

    def __enter__(self) -> "PageFetcher":
        return self

    def __exit__(self, *exc) -> bool:
        with self._cond:
            self._closed = True
            self._pages.clear()
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)  # the request in flight is not waited for
        return False

    def request(self, params: Mapping[str, Any]) -> None:
        """Start a chain at this page; what an earlier chain fetched or will fetch is dropped."""
        self._pool.submit(self._fetch, self._new_chain(), dict(params))

    def discard(self) -> None:
        """End the chain: the page after the last one was guessed; its answer is dropped."""
        self._new_chain()

    def _new_chain(self) -> int:
        """Drop the current chain's pages and the answers still to come; the next chain's number."""
        with self._cond:
            self._chain += 1
            self._pages.clear()
            self._cond.notify_all()
            return self._chain

    def take(self) -> tuple[Any, str | None]:
        """The next page (bytes or parsed) and the token its successor was asked for with (None:
        not asked for); the request's own error if it failed."""
        with self._cond:
            while not self._pages:
                if self._stop is not None and self._stop.is_set():
                    raise stopped("a page", self.path)
                self._cond.wait(STOP_CHECK if self._stop is not None else None)
            answer, failed, token = self._pages.popleft()
            self._cond.notify_all()
        if failed:
            raise answer
        return answer, token

    def parse(self, raw) -> Any:
        return self.client.parse(raw, self.path) if self._raw is not None else raw

    def _fetch(self, chain: int, params: dict) -> None:
        get = self._raw or self.client.get_json
        while True:
            with self._cond:  # at most PAGES_AHEAD pages fetched and not yet taken
                while chain == self._chain and not self._closed and len(self._pages) >= self._ahead:
                    self._cond.wait()
                if chain != self._chain or self._closed:
                    return
            try:
                answer, failed = get(self.path, params), False
            except BaseException as exc:  # noqa: BLE001 - handed to take(), which raises it
                answer, failed = exc, True
            token = None if failed else self.peek_token(answer)
            with self._cond:
                if chain != self._chain or self._closed:
                    return
                self._pages.append((answer, failed, token))
                self._cond.notify_all()
            if token is None:
                return
            params = {**params, "page": token}

    def peek_token(self, raw) -> str | None:
        """The next page's token read off the end of an unparsed page; None when the page does
        not end that way (the engine then asks with the token from the parsed page)."""
        if self._raw is None or not isinstance(raw, (bytes, bytearray)):
            return None
        match = _NEXT_PAGE_AT_END.search(raw, max(0, len(raw) - 1024))
        if match is None:
            return None
        try:
            token = orjson.loads(match.group(1))
        except orjson.JSONDecodeError:
            return None
        return token if isinstance(token, str) and token else None


def cursor_pages(get_json: Callable[[str, Mapping[str, Any]], Mapping], path: str, params: Mapping[str, Any],
                 bad: Callable[[str], Exception] | None = None, max_pages: int = 100_000) -> Iterator[list]:
    """The `data` list of each page of an admin listing paginated by cursor (`after` = the previous
    page's `last_id` while `has_more`): audit logs, projects, rate limits, users, API keys.

    A page without a `data` list or a boolean `has_more` (the reference requires both: reading a
    missing one as "no more" would end the listing early and pass over the rest unread, which for
    audit logs moves the mark past them for good), `has_more` with no id to go on from, a
    `last_id` that comes back (ending there would pass over what was never read; following it
    would never end) or more than `max_pages` pages raise `bad(what)`, by default the client's
    MalformedResponseError for `path`.
    """
    if bad is None:
        from .http_client import MalformedResponseError

        def bad(what: str) -> Exception:
            return MalformedResponseError(200, what, "malformed_response", path)
    query = dict(params)
    followed: set[str] = set()
    for _ in range(max_pages):
        body = get_json(path, query)
        data = body.get("data")
        if not isinstance(data, list):
            raise bad("response has no `data` list")
        has_more = body.get("has_more")
        if not isinstance(has_more, bool):
            raise bad(f"response has no boolean `has_more` ({has_more!r:.40}): the rest of the listing is unknown")
        if not has_more:
            yield data
            return
        last = body.get("last_id") or (data[-1].get("id") if data and isinstance(data[-1], Mapping) else None)
        if not isinstance(last, str):
            raise bad("response says has_more but gives no `last_id` to go on from")
        yield data
        if last in followed:
            raise bad(f"last_id {last!r:.60} came back a second time with has_more")
        followed.add(last)
        query["after"] = last
    raise bad(f"more than {max_pages} pages in one listing")
