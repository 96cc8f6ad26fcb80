"""Fault injection rules."""
from __future__ import annotations

import fnmatch
import random
import threading
from dataclasses import asdict, dataclass, fields
from urllib.parse import parse_qsl

FAULT_KINDS = ("429", "500", "502", "503", "401", "403", "404", "reset", "slow", "malformed_json",
               "invalid_results", "invalid_items")
# what OpenAI answers only a key it took: a refused key gets its 401 (or its missing scope's 403)
# instead, as a gateway's 5xx, a reset or a slow answer come whatever the key
AFTER_AUTH = frozenset({"403", "404", "429", "malformed_json", "invalid_results", "invalid_items"})


@dataclass
class FaultRule:
    """Inject `kind` into requests whose path matches `path`.

    path: a prefix of the request path (``/v1/organization/usage/completions``; ``/v1`` or
        ``/v1/organization/`` may be left out: ``usage/completions``) or a glob if it contains ``*``, ``?`` or ``[`` (``*/rate_limits``). Empty matches every API path.
    count: how many matching requests get the fault (None: unlimited). `skip` matching requests pass
        untouched first, so "fail the 3rd page" is ``skip=2, count=1``.
    probability: if set, each matching request gets the fault with this probability (seeded, so a
        run is reproducible); `count` still caps the total.
    retry_after: the 429's Retry-After header in seconds (an integer >= 1, as the spec says).
    delay: seconds to sleep for "slow" (then the normal answer is sent).
    message: overrides the error message of status faults.
    query: a query string (``tenant_only=true``) whose every ``name=value`` the request must carry
        (``name[]`` counts as ``name``; a comma list as its values) for the rule to match it.
        Empty matches any query.
    """

    kind: str
    path: str = ""
    count: int | None = 1
    skip: int = 0
    probability: float | None = None
    retry_after: int = 1
    delay: float = 1.0
    message: str | None = None
    query: str = ""

    def __post_init__(self) -> None:
        self.kind = str(self.kind)
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(FAULT_KINDS)}")
        self.retry_after = max(1, int(self.retry_after))
        self._seen = 0
        self._fired = 0

    @classmethod
    def from_dict(cls, d: dict) -> "FaultRule":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown fault rule keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fired"] = self._fired
        return d

    def matches(self, path: str, query: str = "") -> bool:
        return self._matches_query(query) and self._matches_path(path)

    def _matches_query(self, query: str) -> bool:
        if not self.query:
            return True
        have: dict[str, set[str]] = {}
        for k, v in parse_qsl(query, keep_blank_values=True):
            have.setdefault(k[:-2] if k.endswith("[]") else k, set()).update(v.split(","))
        return all(v in have.get(k, ()) for k, v in parse_qsl(self.query, keep_blank_values=True))

    def _matches_path(self, path: str) -> bool:
        p = self.path
        if not p:
            return True
        # The same path with and without its /v1 and /v1/organization prefixes.
        forms = [path]
        if path.startswith("/v1/"):
            forms.append(path[3:])
            if path.startswith("/v1/organization/"):
                forms.append(path[len("/v1/organization"):])
        forms += [f.lstrip("/") for f in forms[1:]]
        if any(c in p for c in "*?["):
            return any(fnmatch.fnmatchcase(f, p) for f in forms)
        return any(f.startswith(p) for f in forms)


class FaultSet:
    def __init__(self, seed: int):
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()
        self._rng = random.Random(seed * 7919 + 17)

    def add(self, rule: FaultRule) -> None:
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def rules(self) -> list[dict]:
        with self._lock:
            return [r.to_dict() for r in self._rules]

    def pick(self, path: str, query: str = "", authorized: bool = True) -> FaultRule | None:
        """The first rule that fires for this request (consuming one of its uses), or None.
        `authorized`: the request's key may make it; OpenAI answers a key it refuses before
        anything it decides for an allowed caller (`AFTER_AUTH`), so those rules skip it."""
        with self._lock:
            for r in self._rules:
                if r.count is not None and r._fired >= r.count:
                    continue
                if not authorized and r.kind in AFTER_AUTH:
                    continue
                if not r.matches(path, query):
                    continue
                r._seen += 1
                if r._seen <= r.skip:
                    continue
                if r.probability is not None and self._rng.random() >= r.probability:
                    continue
                r._fired += 1
                return r
        return None
