"""Wiring: a `Config` plus a state directory and an output become a running `Engine`.

`collect`, `demo` and the agent protocol's `run` all build their engine here, so the three
cannot disagree about which streams run or how.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .engine import Clock, Collector, Delivery, Engine, Progress, UsageCollector
from .http_client import AdminApiClient
from .org_guard import OrganizationGuard
from .outputs import Output
from .state import StateStore
from .streams import STREAMS_BY_NAME

if TYPE_CHECKING:
    from .names import NameCache

log = logging.getLogger("agent_input.app")

# Collectors for data streams that are not usage-like register here (audit, rate limits...):
# name -> factory(config, stream_config, client, delivery, **common) -> Collector
EXTRA_COLLECTORS: dict[str, Callable[..., Collector]] = {}


def _register_builtin() -> None:
    from . import audit, rate_limits

    EXTRA_COLLECTORS.setdefault("audit", audit.factory)
    EXTRA_COLLECTORS.setdefault("rate_limits", rate_limits.factory)


_register_builtin()


def fixed_clock(start: float) -> Clock:
    """A clock that starts at `start` and then runs at wall speed (`--now`, replays, tests)."""
    t0 = time.monotonic()
    return lambda: start + (time.monotonic() - t0)


@dataclass
class Collection:
    engine: Engine
    store: StateStore
    clients: list[AdminApiClient]
    names: NameCache | None = None  # its background listings end (and are waited for) first

    def close(self, names_wait: float | None = None) -> None:
        """`names_wait`: how long the name cache waits for a listing in flight (its default when
        None). `run` passes 0: a reconfiguration must not wait on a listing whose result the old
        cache no longer needs (a hanging one held every new config up 5 s); nor does a stop (a
        SIGTERM to `collect`: a projects listing that hung held its exit up 5 s)."""
        if names_wait is None and self.engine.stop.is_set():
            names_wait = 0
        if self.names is not None:
            self.names.close() if names_wait is None else self.names.close(names_wait)
        for collector in self.engine.collectors:
            close = getattr(collector, "close", None)
            if close is not None:
                close()
        for c in self.clients:
            c.close()
        self.store.close()


def build(
    config,
    *,
    state_dir=None,
    store: StateStore | None = None,
    output: Output,
    stop: threading.Event | None = None,
    clock: Clock = time.time,
    progress: Progress | None = None,
    on_status=None,
    on_poll=None,
) -> Collection:
    """One collector per enabled data stream, each with its own HTTP client (sessions are not
    shared across threads). The state is `store`, or a store opened on `state_dir` (and closed
    again if the build fails: it holds the directory's lock). The process's malloc options are
    left alone: the commands set them (`memory.tune`), a program that embeds the collector keeps its own."""
    stop = stop or threading.Event()
    if store is not None:
        return _build(config, store, output, stop, clock, progress, on_status, on_poll)
    store = StateStore(state_dir)
    try:
        return _build(config, store, output, stop, clock, progress, on_status, on_poll)
    except BaseException:
        store.close()
        raise


def _build(config, store, output, stop, clock, progress, on_status, on_poll) -> Collection:
    clients: list[AdminApiClient] = []
    caches: list = []  # the name cache, once made: its warm-up lists in the background
    try:
        return _build_collectors(config, store, output, stop, clock, progress, on_status, on_poll, clients,
                                 caches)
    except BaseException:
        for cache in caches:  # the warm-up of a build that failed part way lists no more, and is waited for
            cache.close()
        for client in clients:  # the sessions (and the names warm-up's pool) of a build that failed part way
            client.close()
        raise


def _build_collectors(config, store, output, stop, clock, progress, on_status, on_poll,
                      clients: list[AdminApiClient], caches: list) -> Collection:
    delivery = Delivery(store, output)
    collectors: list[Collector] = []
    if not config.ssl_verify:  # once per collection: each stream, the names and the check have a client
        log.warning("TLS certificate verification is off (ssl_verify: false)")
    common = dict(namespace=config.namespace, stop=stop, clock=clock)
    # The state directory's organization: nothing is written to it (so nothing is sent) until the
    # key is known to reach the organization it was collected for (see agent_input/org_guard.py).
    # With no stream enabled nothing is written, but batches left in the outbox would still be sent.
    guard = OrganizationGuard(store, client_factory=lambda: AdminApiClient.from_config(config, stop=stop),
                              stop=stop) if config.enabled_streams() or store.pending_count() else None
    # One name cache for every usage-like stream (project names, user emails, API key names).
    names = None
    if any(s.name in STREAMS_BY_NAME for s in config.enabled_streams()):
        from .names import NameCache

        names = NameCache.from_config(config, clock=clock, stop=stop)
        names.org_guard = guard  # its first projects listing is the check's: no request added
        clients.append(names.client)
        caches.append(names)
        names.warm_up()  # the first listing overlaps the first usage requests
    elif guard is not None:
        guard.start()  # no name cache: the check lists the projects itself, beside the first requests
    store.write_check = guard.wait if guard is not None else None
    for stream in config.enabled_streams():
        client = AdminApiClient.from_config(config, stop=stop)
        clients.append(client)
        if stream.name in STREAMS_BY_NAME:
            collector: Collector = UsageCollector(
                STREAMS_BY_NAME[stream.name], stream, client, delivery, progress=progress,
                names=names, **common
            )
        elif stream.name in EXTRA_COLLECTORS:
            collector = EXTRA_COLLECTORS[stream.name](
                config, stream, client, delivery, client_factory=lambda: AdminApiClient.from_config(config, stop=stop),
                progress=progress, **common)
        else:
            log.warning("%s: this collector version does not collect it yet; skipped", stream.name)
            clients.remove(client)
            client.close()
            continue
        collectors.append(collector)
    engine = Engine(collectors, delivery, stop=stop, clock=clock, on_status=on_status, on_poll=on_poll,
                    guard=guard)
    return Collection(engine, store, clients, names)
