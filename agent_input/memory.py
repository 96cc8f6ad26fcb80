"""Keep the collector's resident memory close to what it actually holds (glibc only; no-op elsewhere).

Measured on the large-org 24h@1m backfill: Python itself never held more than ~80 MB, but RSS
reached ~300 MB. The gap is glibc malloc fragmentation: each of the ten stream threads gets its
own malloc arena, and multi-megabyte response bodies and NDJSON payloads raise the dynamic mmap
threshold so later ones are carved from those arenas and never handed back. Three settings close
the gap (the figures are in docs/performance.md):

- one arena per process thread pool (`M_ARENA_MAX`): the threads mostly wait on the network and
  the GIL runs one at a time anyway, so there is no contention to buy with more arenas;
- a fixed 256 KiB mmap threshold (`M_MMAP_THRESHOLD`): page-sized buffers are mmapped and unmapped
  on free instead of fragmenting the heap;
- `trim()` after each stored page (`malloc_trim`): gives freed heap pages back.

The options are the process's, for good: the commands (`collect`, `demo`, `run`) call `tune()`;
`app.build` does not, so a program that embeds the collector keeps its own.
"""
from __future__ import annotations

import ctypes
import logging
import sys
import threading

log = logging.getLogger("agent_input.memory")

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_libc = None
_tuned = False
_lock = threading.Lock()


def _load():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            # the process's own symbols, libc's among them: ctypes.util.find_library("c") would run
            # `ldconfig -p` in a subprocess (15 ms of every start here), or gcc where there is none
            libc = ctypes.CDLL(None)
            libc.mallopt  # glibc (musl has neither)
            libc.malloc_trim
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def tune(arena_max: int = 1, mmap_threshold: int = 256 * 1024) -> bool:
    """Set the malloc options once per process, before the stream threads start."""
    global _tuned
    with _lock:
        if _tuned:
            return True
        libc = _load()
        if libc is None:
            return False
        ok = libc.mallopt(_M_ARENA_MAX, arena_max) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        _tuned = True
        log.debug("malloc tuned (arena_max=%d, mmap_threshold=%d): %s", arena_max, mmap_threshold, ok)
        return ok


def trim() -> None:
    """Return freed heap memory to the OS (cheap: a few hundred microseconds)."""
    libc = _load()
    if libc is not None:
        libc.malloc_trim(0)
