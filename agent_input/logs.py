"""Logging to stderr, with the admin key redacted everywhere.

stdout belongs to events (NDJSON, the agent protocol), so every log line goes to stderr: ECS JSON
lines (the `ecs-logging` library) when supervised or piped, a short human format in a terminal.

Redaction has two layers, because a secret can reach a log record in several ways (the message, its
args, an exception's text, or an exception object the ECS formatter stringifies on its own):

- `RedactingFilter`, a `logging.Filter` on our handler, rewrites the message (args merged in), the
  cached exception text and stack info of every record that reaches it;
- the ECS formatter redacts every string of the document it builds (`format_to_ecs`, the
  library's hook) before serializing it: that covers the `error.message` it takes straight from the
  exception object and `extra` fields, and a secret whose JSON spelling differs from its own (a
  password with a quote, backslash, control or non-ASCII character) is still found;
- `RedactingFormatter` wraps either formatter and redacts its final line as well.

Registered secrets (`register_secret`) and anything shaped like a bearer token or an OpenAI key
(`Bearer sk-...`, `sk-admin-...`) are replaced with `***`.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
import time
import warnings
from typing import Callable, Iterable, Literal, Mapping, TextIO

REDACTED = "***"

# Bearer tokens of any kind, and OpenAI-style keys (sk-..., sk-admin-..., sk-proj-...) on their own.
_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    # an Elasticsearch Authorization value echoed back (a proxy's error page quoting the request):
    # base64 of an API key or of user:password, 12 characters or more with a digit or + / =
    re.compile(r"(?i)\b((?:apikey|basic)\s+)(?=[A-Za-z0-9+/=_-]*[0-9+/=])[A-Za-z0-9+/=_-]{12,}"),
]
# A secret cut short (an error line quoting 45 characters of a value, a body cut at 200) is still
# a secret: any run of at least this many of its first characters is redacted too.
PREFIX_CHARS = 12

_lock = threading.Lock()
_secrets: set[str] = set()
_HANDLER_NAME = "openai-input-stderr"


def register_secret(value: object) -> None:
    """Redact `value` (a string, or a `config.Secret`) from every log line from now on."""
    reveal = getattr(value, "reveal", None)
    text = reveal() if callable(reveal) else value
    if not isinstance(text, str):
        return
    text = text.strip()
    if len(text) < 4:  # redacting "a" or "" would mangle every line and protect nothing
        return
    with _lock:
        _secrets.add(text)


def register_url_password(url: str | None) -> None:
    """Redact the password of a `user:password@host` URL, as written and as sent (percent-decoded:
    `p%40ss` goes out as `p@ss`)."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password if url else None
    except ValueError:  # a malformed URL: its checks say so; nothing here to register
        return
    if password:
        register_secret(password)
        register_secret(unquote(password))


def registered_secrets() -> frozenset[str]:
    with _lock:
        return frozenset(_secrets)


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with every registered secret (plus `extra`) and every bearer token replaced by ***."""
    if not text:
        return text
    # the shapes first: a registered secret replaced inside a token would leave the rest of it
    # unmatched (`Basic ***TU1d29y...`)
    text = _PATTERNS[0].sub(lambda m: m.group(1) + REDACTED, text)
    text = _PATTERNS[1].sub(REDACTED, text)
    text = _PATTERNS[2].sub(lambda m: m.group(1) + REDACTED, text)
    secrets = set(registered_secrets())
    secrets.update(s for s in extra if s)
    # Longest first, so a secret that contains another is replaced whole.
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
        if len(secret) > PREFIX_CHARS:
            text = _redact_prefixes(text, secret)
    return text


def _redact_prefixes(text: str, secret: str) -> str:
    """`text` with every run of `secret`'s first PREFIX_CHARS or more characters replaced."""
    head = secret[:PREFIX_CHARS]
    at = text.find(head)
    while at >= 0:
        end = at + PREFIX_CHARS
        while end < len(text) and end - at < len(secret) and text[end] == secret[end - at]:
            end += 1
        text = text[:at] + REDACTED + text[end:]
        at = text.find(head, at + len(REDACTED))
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message, exception text and stack info with secrets redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what we can, never fail logging
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class RedactingFormatter(logging.Formatter):
    """Delegates to `inner` and redacts the finished line (covers fields built from exc_info)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")


def map_strings(value: object, fn: Callable[[str], str], *, keys: bool = False) -> object:
    """A JSON-like value with `fn` applied to every string in it (and to mapping keys, if asked)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {(map_strings(k, fn, keys=True) if keys else k): map_strings(v, fn, keys=keys) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [map_strings(v, fn, keys=keys) for v in value]
    return value


def _ecs_formatter() -> logging.Formatter:
    import ecs_logging

    class RedactingEcsFormatter(ecs_logging.StdlibFormatter):
        """Redacts the document before it is JSON: the finished line holds secrets escaped."""

        def format_to_ecs(self, record: logging.LogRecord) -> dict:
            return map_strings(super().format_to_ecs(record), redact)

    return RedactingEcsFormatter()


class UnblockedStream:
    """A text stream for the log handler whose `write` never waits for the reader: lines are
    queued (up to `limit` characters) and written to `stream` by a thread of their own. A
    supervisor that does not read stderr (a full pipe) then costs log lines, not the collector:
    logging to a full pipe blocked the thread that logged, with the handler's lock held, and so
    every thread that logged after it: the stdin reader (no more acks), the streams, and the stop.
    Lines that do not fit are dropped and counted; the count is logged where they were missing
    (one ECS line) once the reader takes lines again. `wait_written` before exiting."""

    def __init__(self, stream: TextIO, limit: int = 1 << 20):
        self.stream = stream
        self.limit = limit
        self._cond = threading.Condition()
        self._items: list[str | list[int]] = []  # lines, and [n] where n lines were dropped
        self._size = 0
        self._busy = False
        threading.Thread(target=self._drain, name="stderr", daemon=True).start()

    def write(self, text: str) -> int:
        with self._cond:
            if self._size + len(text) > self.limit:
                if self._items and isinstance(self._items[-1], list):
                    self._items[-1][0] += 1
                else:
                    self._items.append([1, time.time()])  # the count, and when the first was dropped
            else:
                self._items.append(text)
                self._size += len(text)
            self._cond.notify_all()
        return len(text)

    def flush(self) -> None:
        pass  # the drain thread flushes what it wrote

    def isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError, OSError):
            return False

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                items, self._items, self._busy = self._items, [], True
            for item in items:
                # one line a write: a line up to PIPE_BUF is then whole in the pipe, even when the
                # process exits while this thread waits for the reader (`wait_written` gave up)
                text = item if isinstance(item, str) else _dropped_notice(*item)
                try:
                    self.stream.write(text)
                    self.stream.flush()
                except (OSError, ValueError, AttributeError):  # AttributeError: no stderr at all (None)
                    pass  # stderr closed: the lines go nowhere, as a direct write's would
                with self._cond:
                    self._size -= len(item) if isinstance(item, str) else 0
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def wait_written(self, timeout: float) -> bool:
        """Whether every queued line was written within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._items or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


def _dropped_notice(count: int, first: float) -> str:
    """The ECS line that stands where `count` log lines were dropped, formatted as every other
    line (the ECS formatter), stamped when the first of them was dropped so it sorts among them."""
    record = logging.LogRecord(__name__, logging.WARNING, __file__, 0,
                               "%d log line(s) dropped: stderr was not read", (count,), None)
    record.created, record.msecs = first, (first % 1) * 1000
    return _ecs_formatter().format(record) + "\n"


def setup_logging(
    level: str | int = "INFO",
    fmt: Literal["auto", "ecs", "text"] = "auto",
    secrets: Iterable[object] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send all logging to stderr in the chosen format, with secrets redacted. Idempotent.

    `fmt="auto"` is text when stderr is a terminal, ECS JSON otherwise (a supervisor reads it).
    `stream` (default: the current sys.stderr) is for tests; never pass stdout. Returns the handler.
    """
    stream = stream if stream is not None else sys.stderr
    if fmt not in ("auto", "ecs", "text"):
        raise ValueError(f"log format {fmt!r} is not one of auto, ecs, text")
    for secret in secrets:
        register_secret(secret)
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "text" if callable(isatty) and isatty() else "ecs"
    inner = _ecs_formatter() if fmt == "ecs" else _TextFormatter()

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(RedactingFormatter(inner))
    root.addHandler(handler)
    if isinstance(level, str):
        name, level = level, logging.getLevelName(level.upper())
        if not isinstance(level, int):  # the name as given, not getLevelName's "Level FOO"
            raise ValueError(f"unknown log level {name!r} (expected DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    root.setLevel(level)
    # urllib3 logs every connection at DEBUG; keep it one notch quieter than ours.
    logging.getLogger("urllib3").setLevel(max(level, logging.INFO))
    # The Elasticsearch client logs each request at INFO and a failed one at WARNING: the output
    # says what failed in its own lines (and retries itself; the client's retries are off).
    logging.getLogger("elastic_transport").setLevel(level if level <= logging.DEBUG else max(level, logging.ERROR))
    # Python warnings (a library's) go through this handler too: formatted and redacted as every
    # other line, and never written straight to the real stderr, which `run` leaves to its
    # unblocked stream. urllib3's InsecureRequestWarning it repeats at every request ("always"):
    # ssl_verify: false is said once per collection instead (`app.build`, `check`), and the
    # Elasticsearch output silences it too (ssl_show_warn=False).
    logging.captureWarnings(True)
    from urllib3.exceptions import InsecureRequestWarning

    warnings.filterwarnings("ignore", category=InsecureRequestWarning)
    return handler


def get_logger(name: str) -> logging.Logger:
    """A logger under the `agent_input` hierarchy (pass `__name__`)."""
    if not name.startswith("agent_input"):
        name = f"agent_input.{name}"
    return logging.getLogger(name)
