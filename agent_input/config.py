"""Configuration: a YAML file (or an agent-protocol config message) validated against `manifest.yml`.

The manifest is the single source of truth: var names, types, defaults, select options and integer
bounds are all read from it; nothing is defaulted here. Validation collects every problem before
failing, so a user fixes the whole file in one go:

    data_streams.completions.bucket_width: '2m' is not allowed (allowed: 1m, 1h, 1d)
    data_streams.vector_stores.finalization_grace: vector_stores has no finalization grace ...

File shape: global vars at the top level, plus `data_streams: {<name>: {<var>: value}}`.
"""
from __future__ import annotations

import difflib
import functools
import os
import re
import reprlib
import select
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

from . import logs

# An installed package reads its own copy (setup.py puts the root manifest.yml into the wheel: a
# wheel holds only what is inside its packages); a checkout reads the repository root's.
_PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST_PATH = (_PACKAGE_DIR / "manifest.yml" if (_PACKAGE_DIR / "manifest.yml").is_file()
                 else _PACKAGE_DIR.parent / "manifest.yml")
ENV_ADMIN_KEY = "OPENAI_ADMIN_KEY"
BUCKET_SECONDS = {"1m": 60, "1h": 3600, "1d": 86400}
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^(?:\d+[smhd])+$")
_DURATION_PART = re.compile(r"(\d+)([smhd])")
_ZERO_RE = re.compile(r"^(?:0+|(?:0+[smhd])+)$")  # a duration of zero, in any unit
DURATION_FORM = "a duration like 30s, 5m, 24h, 1d or 1h30m (or an integer number of seconds)"
_KEY_FILE_FORM = "expected the path of a file holding the admin key, not the key itself; the value is not shown"
# Elasticsearch's rules for the namespace part of a data stream name (plus the data stream rules).
_NAMESPACE_FORBIDDEN = set('-\\/*?"<>| ,#:')
# Elasticsearch refuses an index name over 255 bytes (UTF-8), and a data stream's backing indices
# are named .ds-<data stream>-<yyyy.MM.dd>-<generation>: the namespace must leave room for the
# longest one of our datasets (see namespace_max_bytes).
INDEX_NAME_MAX_BYTES = 255
_BACKING_INDEX = ".ds-logs-{dataset}-{namespace}-yyyy.MM.dd-000001"  # the date as long as the pattern

# Config / StreamConfig fields that are not manifest vars (derived or bookkeeping).
DERIVED_CONFIG_FIELDS = frozenset({"streams", "api_key_source"})
DERIVED_STREAM_FIELDS = frozenset({"name"})


class ConfigError(ValueError):
    """An invalid configuration. `str(e) == f"{key}: {message}"`.

    When validation found several problems, the raised error has `key == ""`, its message is the
    problems one per line ("key: message"), `str(e)` is that message, and `errors` lists them.
    """

    def __init__(self, key: str, message: str, errors: list["ConfigError"] | None = None) -> None:
        # An error line is printed and sent to supervisors: nothing shaped like a key may echo in it.
        self.key = logs.redact(key)
        self.message = logs.redact(message)
        self.errors: list[ConfigError] = errors if errors is not None else [self]
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message

    def lines(self) -> list[str]:
        return [str(e) for e in self.errors]

    @classmethod
    def combine(cls, errors: list["ConfigError"]) -> "ConfigError":
        if len(errors) == 1:
            return errors[0]
        return cls("", "\n".join(str(e) for e in errors), errors)

    def hiding(self, secrets: list[str]) -> "ConfigError":
        """This error with `secrets` (e.g. a configured key not shaped like one) redacted too."""
        hidden = [ConfigError(logs.redact(e.key, secrets), logs.redact(e.message, secrets)) for e in self.errors]
        return ConfigError.combine(hidden)


class Secret:
    """Wraps the admin key so it never shows up in str/repr/format; `.reveal()` gives it back."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return "***"

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return "***"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))



def format_duration(seconds: int) -> str:
    """`seconds` the way a config writes it: 0s, 90 -> 1m30s, 86400 -> 1d."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "0s"


def credential_problem(value: str, *, allow_space: bool, ascii_only: bool = False) -> str | None:
    """What kind of character makes `value` unusable in an Authorization header, or None. Names
    the kind, never the character or where it is, so a message gives nothing of the secret away
    (an HTTP library's own error quotes the header whole, escaped past redaction)."""
    for c in value:
        if c in "\r\n":
            return "a line break"
        if not c.isprintable():
            return "a control character"
        if c.isspace() and not allow_space:
            return "a space"
    if ascii_only and not value.isascii():
        return "a non-ASCII character"
    return None


def display_url(value: str) -> str:
    """`value` with any user:password@ replaced by ***@, for echoing a URL in a message or on stdout."""
    scheme_end = value.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    try:
        in_authority = "@" in urlsplit(value).netloc
    except ValueError:
        in_authority = False
    end = len(value)
    if in_authority:  # the @ ends the authority's user info: an @ in the path or query is no password
        end = min([i for i in (value.find(c, start) for c in "/?#") if i >= 0], default=end)
    # otherwise the last @ anywhere: a password typed with an unencoded / ? or # ends the authority
    # early, and hiding too much of a URL is harmless where hiding too little is a leak
    at = value.rfind("@", start, end)
    return value if at < 0 else value[:start] + "***" + value[at:]


_SHOWN_CHARS = 60  # the most of a value an error line quotes
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 1, _SHOWN_CHARS, _SHOWN_CHARS, _SHOWN_CHARS


def _shown(value: Any) -> str:
    """A value as an error line quotes it: bounded whatever it is. A string or number past 60
    characters is cut (a typo of thousands of digits, a 3 MB value sent by a supervisor), a list or
    mapping is only described (an alias bomb's tree would take minutes and gigabytes to print), and
    characters that cannot be printed or encoded (a lone surrogate) are escaped, as repr does."""
    if isinstance(value, Mapping):
        return f"a mapping of {len(value)} key{'s' if len(value) != 1 else ''}"
    if isinstance(value, (list, tuple, set)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, str):
        text = repr(value[:_SHOWN_CHARS + 1])
        if len(value) <= _SHOWN_CHARS and len(text) <= _SHOWN_CHARS + 2:
            return text
        return repr(value[:45])[:60] + f"... ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool):
        digits = str(value)
        return digits if len(digits) <= _SHOWN_CHARS else digits[:45] + f"... ({len(digits)} digits)"
    try:
        text = _repr.repr(value)
    except Exception:  # noqa: BLE001 - an error line must never fail
        text = f"a {type(value).__name__}"
    return text if len(text) <= _SHOWN_CHARS else text[:45] + "..."


def _key_name(key: Any) -> str:
    """A setting's or data stream's name as it appears in a key path: as written when it is short
    printable text, else quoted like a value (escaped, cut), so an odd key cannot make the line
    unencodable (a lone surrogate) or huge."""
    text = key if isinstance(key, str) else str(key) if isinstance(key, (int, float, bool, type(None))) else None
    if text is not None and text and len(text) <= _SHOWN_CHARS and text.isprintable():
        return text
    return _shown(key)


def parse_duration(value: str | int, key: str = "") -> int:
    """Seconds in `value`: "30s", "5m", "24h", "1d", "1h30m", or an int (seconds). Never negative."""
    if isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not {DURATION_FORM}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, f"{_shown(value)} is negative; expected {DURATION_FORM}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, float) and value < 0:
        raise ConfigError(key, f"{_shown(value)} is negative; expected {DURATION_FORM}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text.startswith("-"):
            if not _ZERO_RE.match(text[1:]):  # "-0s" is zero, as -0 unquoted is (the key's bound speaks)
                raise ConfigError(key, f"{_shown(value)} is negative; expected {DURATION_FORM}")
            text = text[1:]
        if _DURATION_RE.match(text) and len(text) <= 40:  # int() refuses 4,300+ digits with a ValueError
            return sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
        if text.isascii() and text.isdigit() and len(text) <= 40:
            if int(text) == 0:  # zero is zero in every unit: nothing to ask (the hint would be "0s")
                return 0
            # a number in quotes (or a policy's text field): the form's "integer number of seconds"
            # read as allowing it, and a bare "5" may be meant as minutes, so the unit is asked for
            raise ConfigError(key, f"{_shown(value)} has no unit: write {text}s for seconds "
                                   f"(or the number unquoted), or a duration like 5m, 24h, 1d or 1h30m")
    raise ConfigError(key, f"{_shown(value)} is not {DURATION_FORM}")


@dataclass(frozen=True)
class StreamConfig:
    name: str
    enabled: bool
    interval: int
    initial_interval: int | None
    bucket_width: str | None
    finalization_grace: int
    revision_window: int | None
    batch_size: int | None
    include_archived: bool

    @property
    def bucket_seconds(self) -> int:
        if self.bucket_width is None:
            raise AttributeError(f"data stream {self.name} has no bucket width")
        return BUCKET_SECONDS[self.bucket_width]

    @property
    def effective_revision_window(self) -> int:
        """The explicit revision window, else the manifest's default for the bucket width."""
        if self.revision_window is not None:
            return self.revision_window
        if self.bucket_width is None:
            return 0
        var = _stream_vars(self.name).get("revision_window")
        by_width = (var or {}).get("default_by_bucket_width") or {}
        if self.bucket_width not in by_width:
            return 0
        return parse_duration(by_width[self.bucket_width], f"manifest:{self.name}.revision_window")


@dataclass(frozen=True)
class Config:
    url: str
    api_key: Secret
    proxy_url: str | None
    ssl_verify: bool
    ssl_ca_file: str | None
    http_timeout: float
    max_retries: int
    namespace: str
    preserve_original_event: bool
    names_refresh_interval: int
    streams: Mapping[str, StreamConfig]
    api_key_file: str | None = None
    # Where the key came from: "config" (api_key), "file" (api_key_file) or "env" (OPENAI_ADMIN_KEY).
    api_key_source: str = "config"
    # The direct Elasticsearch output (collect --output elasticsearch); credentials come from the env.
    es_url: str | None = None
    es_cloud_id: str | None = None
    es_ssl_verify: bool = True
    es_ssl_ca_file: str | None = None

    def enabled_streams(self) -> list[StreamConfig]:
        return [s for s in self.streams.values() if s.enabled]

    def stream(self, name: str) -> StreamConfig:
        return self.streams[name]


# --------------------------------------------------------------------------------------------------
# The manifest


@functools.lru_cache(maxsize=None)
def load_manifest() -> dict:
    """The parsed manifest.yml (cached; treat it as read-only)."""
    try:
        text = MANIFEST_PATH.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            "manifest", f"cannot read {MANIFEST_PATH} ({exc.strerror or exc}); the package is incomplete"
        ) from None
    try:
        # libyaml when PyYAML has it: the pure-Python parser took 26 ms of every start-up (3 ms)
        manifest = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise ConfigError("manifest", f"{MANIFEST_PATH} is not valid YAML: {exc}") from None
    if not isinstance(manifest, dict) or "policy_templates" not in manifest or "data_streams" not in manifest:
        raise ConfigError("manifest", f"{MANIFEST_PATH} has no policy_templates/data_streams")
    return manifest


def global_vars() -> dict[str, dict]:
    """The input's vars by name, in manifest order."""
    inputs = load_manifest()["policy_templates"][0]["inputs"]
    return {v["name"]: v for v in inputs[0]["vars"]}


def data_streams() -> dict[str, dict]:
    """The manifest's data streams by name, in manifest order."""
    return {ds["name"]: ds for ds in load_manifest()["data_streams"]}


def _stream_vars(name: str) -> dict[str, dict]:
    return {v["name"]: v for v in data_streams()[name]["vars"]}


def var_default(var: Mapping[str, Any]) -> Any:
    """A var's default, with "" (no default) as None."""
    default = var.get("default")
    return None if default == "" else default


# --------------------------------------------------------------------------------------------------
# Loading and validation


MAX_ALIASED_VALUES = 10_000  # what a config file's aliases may add up to, in values (see _StrictLoader)


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key written twice in one mapping is an error: YAML's last-one-wins would
    silently drop the setting the user wrote first (a merge key's values may still be overridden).

    Anchors, aliases and `<<` merge keys work, but, as in go-yaml (Beats, Elastic Agent), not
    without bound: an alias that refers to the value it is part of, or aliases that together stand
    for more than MAX_ALIASED_VALUES values (an "alias bomb": nine lines can stand for 43 million),
    are an error naming the line, before anything walks the tree."""

    def compose_node(self, parent, index):
        opening = self.__dict__.setdefault("_open_anchors", set())
        if not self.check_event(yaml.AliasEvent):
            anchor = getattr(self.peek_event(), "anchor", None)
            if anchor is None or anchor in opening:
                return super().compose_node(parent, index)
            opening.add(anchor)
            try:
                return super().compose_node(parent, index)
            finally:
                opening.discard(anchor)
        event = self.peek_event()
        mark = event.start_mark
        if event.anchor in opening:
            raise yaml.composer.ComposerError(
                None, None, f"the alias *{event.anchor} refers to the value it is part of", mark)
        node = super().compose_node(parent, index)
        sizes = self.__dict__.setdefault("_alias_sizes", {})
        self._aliased = getattr(self, "_aliased", 0) + _node_size(node, sizes)
        if self._aliased > MAX_ALIASED_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"its aliases stand for more than {MAX_ALIASED_VALUES} values in all (an alias "
                "bomb?); write the values out, or alias fewer and smaller ones", mark)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        """A key written twice in `node`, or in a mapping it merges (`<<: {namespace: a, namespace:
        b}`: PyYAML folds a merged mapping's pairs into the one merging it without constructing
        it, so its own duplicates went unseen). Keys of the mapping itself still override merged
        ones, and the mappings of `<<: [*a, *b]` may share keys: that is what merging is for.
        Each mapping is judged once, as written: flatten_mapping rewrites a mapping that merges
        into its merged pairs followed by its own, so an anchored one (`b: &b {<<: *a, interval:
        1m}`) merged again later (`<<: *b`) would show an override as a key written twice."""
        judged = self.__dict__.setdefault("_judged_mappings", set())
        if id(node) in judged:
            return
        judged.add(id(node))
        seen: set = set()
        merges = 0
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merges += 1
                if merges == 2:  # `{<<: *a, <<: *b}`: PyYAML would merge both, in an order nobody wrote
                    raise yaml.constructor.ConstructorError(
                        None, None, "key '<<' appears twice in one mapping (merge several with `<<: [*a, *b]`)",
                        key_node.start_mark)
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for sub in merged:
                    if isinstance(sub, yaml.MappingNode):  # anything else: flatten_mapping says so
                        self._refuse_duplicate_keys(sub)
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping says so itself
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_shown(key)} appears twice in one mapping (the second would silently "
                    "replace the first)", key_node.start_mark)


def _node_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for, each alias counted in full (memoized per node)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    n = 1
    if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
        for item in node.value:
            for child in (item if isinstance(node, yaml.MappingNode) else (item,)):
                n += _node_size(child, sizes)
                if n > MAX_ALIASED_VALUES:
                    return n  # enough to refuse; not memoized (not measured in full)
    sizes[id(node)] = n
    return n


CONFIG_FILE_LIMIT = 10 * 1024 * 1024  # bytes: far past any config; /dev/zero or a wrong file is refused
SECRET_FILE_LIMIT = 64 * 1024  # bytes: far past any key or password


class FileTooLarge(ValueError):
    """A file read with `read_text_file` holds more than its limit."""


FIFO_WAIT_SECONDS = 10.0  # for a named pipe's writer (a secrets helper, process substitution)


class PipeNotWritten(ValueError):
    """A FIFO read with `read_text_file` had nothing written to it within `FIFO_WAIT_SECONDS`."""


def _read_fifo(path: str | os.PathLike, size: int) -> bytes:
    """Up to `size` bytes from a FIFO, until its writer closes it. Opened non-blocking, so a pipe
    with no writer yet reads as end-of-file: that only counts once a writer has written."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        chunks: list[bytes] = []
        got = 0
        deadline = time.monotonic() + FIFO_WAIT_SECONDS
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0:
                if got:
                    break  # a writer that stalls mid-way: keep what it wrote, its end is not coming
                raise PipeNotWritten(f"nothing was written to the pipe in {FIFO_WAIT_SECONDS:g} s")
            ready, _, _ = select.select([fd], [], [], min(left, 0.1))
            if not ready:
                continue
            try:
                chunk = os.read(fd, size - got)
            except BlockingIOError:
                continue
            if chunk:
                chunks.append(chunk)
                got += len(chunk)
            elif got:
                break  # the writer closed its end
            else:
                time.sleep(0.05)  # no writer yet (a FIFO without one polls readable at its end)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text_file(path: str | os.PathLike, limit: int) -> str:
    """A small text file's UTF-8 text, reading at most `limit` + 1 bytes: a read of the whole of
    /dev/zero, or of a huge file named by mistake, would take every byte of memory (MemoryError).
    A named pipe is read with a bounded wait (`FIFO_WAIT_SECONDS`): a plain open() of a FIFO that
    no process writes to blocks for ever, before the first log line. Raises OSError,
    UnicodeDecodeError, or FileTooLarge (a ValueError, as is "nothing was written to the pipe")."""
    try:
        is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        is_fifo = False  # open() below reports what is wrong with the path
    if is_fifo:
        data = _read_fifo(path, limit + 1)
    else:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"it is larger than {limit // 1024} KiB" if limit < 1024 * 1024
                           else f"it is larger than {limit // (1024 * 1024)} MiB")
    return data.decode("utf-8")


def load_config(path: str | os.PathLike, env: Mapping[str, str] = os.environ) -> Config:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = read_text_file(p, CONFIG_FILE_LIMIT)
    except FileNotFoundError:
        raise ConfigError("config", f"file {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError("config", f"{str(p)!r} is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError, FileTooLarge, PipeNotWritten) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError("config", f"cannot read {str(p)!r}: {reason}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        context = getattr(exc, "context", None)
        if problem.startswith("but ") and isinstance(context, str):  # "but found another document": what was expected
            problem = f"{context}, {problem}"
        if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):  # no mark, no problem
            before = text[:exc.position]
            where = f" (line {before.count(chr(10)) + 1}, column {exc.position - before.rfind(chr(10))})"
            problem = f"it holds the control character U+{exc.character:04X}, which YAML does not allow"
        if problem.startswith("found undefined alias"):  # its name is the user's text: a key typed `*sk-...`
            problem = "a value starting with * is read as an alias, and none has that name (quote the value)"
        raise ConfigError("config", f"{str(p)!r} is not valid YAML{where}: {problem}") from None
    except ValueError as exc:  # PyYAML's own int(): a number of 4,300+ digits
        raise ConfigError("config", f"{str(p)!r} cannot be read: {str(exc)[:120]}") from None
    except RecursionError:  # PyYAML's parser recurses once per level: thousands of [ or {
        raise ConfigError("config", f"{str(p)!r} cannot be read: its lists or mappings are nested too "
                                    "deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("config", f"{str(p)!r} must be a YAML mapping of settings, not {_kind(data)}")
    return config_from_dict(data, env=env)


def config_from_dict(data: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> Config:
    """Validate a mapping of settings (the config file's shape) into a `Config`."""
    errors: list[ConfigError] = []
    if not isinstance(data, Mapping):
        raise ConfigError("config", f"expected a mapping of settings, not {_kind(data)}")
    gvars = global_vars()
    streams_meta = data_streams()

    for key in data:
        if key == "data_streams" or key in gvars:
            continue
        errors.append(_unknown(_key_name(key), key, list(gvars) + ["data_streams"], "setting"))

    values: dict[str, Any] = {}
    for name, var in gvars.items():
        values[name] = _value(var, data.get(name), name, errors)

    # The admin key: api_key (config), api_key_file, or OPENAI_ADMIN_KEY, in that order.
    api_key, source = _resolve_key(values, env, errors)

    url = values["url"]
    if url is not None:
        _check_url(url, "url", ("http", "https"), errors)
    proxy_url = values["proxy_url"]
    if proxy_url is not None:
        _check_url(proxy_url, "proxy_url", ("http", "https", "socks5", "socks5h"), errors)
    ca_file = values["ssl_ca_file"]
    if ca_file is not None:
        ca = Path(os.path.expanduser(ca_file))
        if not _is_file(ca):
            errors.append(ConfigError("ssl_ca_file", f"{_shown(ca_file)} is not a readable file (expected a PEM CA bundle)"))
        elif not os.access(ca, os.R_OK):
            errors.append(ConfigError("ssl_ca_file", f"{_shown(ca_file)} is not readable"))
    if values.get("es_url") is not None:
        _check_url(values["es_url"], "es_url", ("http", "https"), errors)
        if values.get("es_cloud_id") is not None:  # the client would silently use the cloud id alone
            errors.append(ConfigError("es_cloud_id", "set either es_url or es_cloud_id, not both"))
    es_ca = values.get("es_ssl_ca_file")
    if es_ca is not None and not _is_file(Path(os.path.expanduser(es_ca))):
        errors.append(ConfigError("es_ssl_ca_file", f"{_shown(es_ca)} is not a readable file (expected a PEM CA bundle)"))
    namespace = values["namespace"]
    if namespace is not None:
        _check_namespace(namespace, errors)
    for name in ("http_timeout", "names_refresh_interval"):
        if values[name] == 0:
            errors.append(ConfigError(name, "must be greater than 0s"))

    raw_streams = data.get("data_streams", {})
    if raw_streams is None:
        raw_streams = {}
    if not isinstance(raw_streams, Mapping):
        errors.append(ConfigError(
            "data_streams", f"expected a mapping of data stream name to settings, not {_kind(raw_streams)}"
        ))
        raw_streams = {}
    for sname in raw_streams:
        if sname not in streams_meta:
            errors.append(_unknown(f"data_streams.{_key_name(sname)}", sname, list(streams_meta), "data stream"))

    streams: dict[str, StreamConfig] = {}
    for sname in streams_meta:
        raw = raw_streams.get(sname)
        streams[sname] = _stream(sname, raw, errors)

    if errors:
        # a key may be pasted into another setting and not look like a key: hide every candidate,
        # the Elasticsearch output's credentials too (the es_output reads them from `env` later)
        keys = [k.strip() for k in (api_key.reveal(), values.get("api_key"), env.get(ENV_ADMIN_KEY),
                                    env.get("ELASTIC_API_KEY"), env.get("ELASTIC_PASSWORD"))
                if isinstance(k, str)]
        raise ConfigError.combine(errors).hiding([k for k in keys if len(k) >= 4])
    logs.register_secret(api_key)
    for u in (url, proxy_url, values.get("es_url")):  # user:password@ in a URL: never in a log line
        logs.register_url_password(u)
    return Config(
        url=url,
        api_key=api_key,
        proxy_url=proxy_url,
        ssl_verify=values["ssl_verify"],
        ssl_ca_file=os.path.expanduser(ca_file) if ca_file else None,
        http_timeout=float(values["http_timeout"]),
        max_retries=values["max_retries"],
        namespace=namespace,
        preserve_original_event=values["preserve_original_event"],
        names_refresh_interval=values["names_refresh_interval"],
        streams=MappingProxyType(streams),
        api_key_file=values["api_key_file"],
        api_key_source=source,
        es_url=values.get("es_url"),
        es_cloud_id=values.get("es_cloud_id"),
        es_ssl_verify=values.get("es_ssl_verify", True),
        es_ssl_ca_file=os.path.expanduser(es_ca) if es_ca else None,
    )


def _is_file(path: Path) -> bool:
    """Path.is_file, but a path the system refuses (too long: ENAMETOOLONG) is no file either."""
    try:
        return path.is_file()
    except OSError:
        return False


def _stream(sname: str, raw: Any, errors: list[ConfigError]) -> StreamConfig:
    prefix = f"data_streams.{sname}"
    svars = _stream_vars(sname)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        errors.append(ConfigError(prefix, f"expected a mapping of settings, not {_kind(raw)}"))
        raw = {}
    for key in raw:
        if key in svars:
            continue
        if key in _all_stream_var_names() and key == "finalization_grace":
            with_grace = [n for n in data_streams() if "finalization_grace" in _stream_vars(n)]
            errors.append(ConfigError(
                f"{prefix}.{key}",
                f"{sname} has no finalization grace (only {', '.join(with_grace)} have one)",
            ))
        elif key in _all_stream_var_names():
            errors.append(ConfigError(
                f"{prefix}.{key}",
                f"{sname} has no {key} setting (allowed: {', '.join(svars)})",
            ))
        else:
            errors.append(_unknown(f"{prefix}.{_key_name(key)}", key, list(svars), f"setting of {sname}"))
    v = {name: _value(var, raw.get(name), f"{prefix}.{name}", errors) for name, var in svars.items()}
    if v.get("interval") == 0:
        errors.append(ConfigError(f"{prefix}.interval", "must be greater than 0s"))
    # The first window is [floor(now - initial_interval), floor(now - grace)) in whole buckets: with
    # no whole bucket in it, it stores no cursor, and every later poll at the same time of day computes
    # the same empty window, collecting nothing while looking healthy. Only initial - grace >= one
    # bucket width guarantees a bucket (audit and rate limits have no buckets).
    initial, grace = v.get("initial_interval"), v.get("finalization_grace") or 0
    width = BUCKET_SECONDS.get(v.get("bucket_width"))
    if initial is not None and width is not None and initial - grace < width:
        errors.append(ConfigError(f"{prefix}.initial_interval", (
            f"{format_duration(initial)} must be at least one bucket width ({v['bucket_width']}) longer than "
            f"finalization_grace ({format_duration(grace)}): buckets younger than the grace are not read yet, "
            "and a shorter first window holds no whole bucket, so nothing would ever be collected"
        ) if grace else (f"{format_duration(initial)} must be at least one bucket width ({v['bucket_width']}): "
                         "a shorter first window holds no whole bucket, so nothing would ever be collected")))
    elif initial == 0 and width is None:
        errors.append(ConfigError(f"{prefix}.initial_interval", "must be greater than 0s"))
    return StreamConfig(
        name=sname,
        enabled=bool(v["enabled"]) if v.get("enabled") is not None else False,
        interval=v.get("interval") or 0,
        initial_interval=v.get("initial_interval"),
        bucket_width=v.get("bucket_width"),
        finalization_grace=v.get("finalization_grace") or 0,
        revision_window=v.get("revision_window"),
        batch_size=v.get("batch_size"),
        include_archived=bool(v.get("include_archived") or False),
    )


@functools.lru_cache(maxsize=None)
def _all_stream_var_names() -> frozenset[str]:
    return frozenset(v["name"] for ds in data_streams().values() for v in ds["vars"])


def _value(var: Mapping[str, Any], raw: Any, key: str, errors: list[ConfigError]) -> Any:
    """The validated, typed value of one var (its manifest default when absent or empty)."""
    if raw is None or raw == "":
        raw = var_default(var)
        if raw is None:
            if var.get("required"):
                errors.append(ConfigError(key, f"is required ({_describe_type(var)})"))
            return None
    try:
        return _coerce(var, raw, key)
    except ConfigError as exc:
        errors.append(exc)
        return None


def _coerce(var: Mapping[str, Any], raw: Any, key: str) -> Any:
    vtype = var["type"]
    if vtype == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise ConfigError(key, f"{_shown(raw)} is not a boolean (expected true or false)")
    if vtype == "integer":
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ConfigError(key, f"{_shown(raw)} is not an integer{_bounds(var)}")
        if isinstance(raw, str):
            if not re.fullmatch(r"\s*-?\d{1,30}\s*", raw):  # int() refuses 4,300+ digits with a ValueError
                raise ConfigError(key, f"{_shown(raw)} is not an integer{_bounds(var)}")
            raw = int(raw)
        lo, hi = var.get("min"), var.get("max")
        if (lo is not None and raw < lo) or (hi is not None and raw > hi):
            raise ConfigError(key, f"{_shown(raw)} is out of range{_bounds(var)}")
        return raw
    if vtype == "duration":
        seconds = parse_duration(raw, key)
        hi = var.get("max")
        # unbounded, a typo like 999999999999d overflows the scheduler or the HTTP client much later
        if hi is not None and seconds > parse_duration(hi, f"manifest:{var['name']}.max"):
            raise ConfigError(key, f"{_shown(raw)} is too long (at most {hi})")
        return seconds
    if vtype == "select":
        allowed = [str(o["value"]) for o in var.get("options", [])]
        if not isinstance(raw, str) or raw not in allowed:
            raise ConfigError(key, f"{_shown(raw)} is not allowed (allowed: {', '.join(allowed)})")
        return raw
    if vtype in ("text", "password", "url"):
        if not isinstance(raw, str):
            raise ConfigError(key, f"expected a string, not {_kind(raw)}")
        return raw.strip()
    raise ConfigError(key, f"manifest type {vtype!r} is not supported")


def _resolve_key(values: dict[str, Any], env: Mapping[str, str], errors: list[ConfigError]) -> tuple[Secret, str]:
    inline, path = values.get("api_key"), values.get("api_key_file")
    if inline and path:
        errors.append(ConfigError("api_key_file", "set either api_key or api_key_file, not both"))
        return Secret(""), "config"
    if inline:
        bad = _key_problem(inline)
        if bad:
            errors.append(ConfigError("api_key", f"contains {bad} (the value is not shown)"))
            return Secret(""), "config"
        return Secret(inline), "config"
    if path:
        # The value is never echoed: a key pasted here instead of a path would land on stderr.
        p = Path(os.path.expanduser(path))
        try:
            text = read_text_file(p, SECRET_FILE_LIMIT).lstrip("\ufeff").strip()  # a BOM from some editors
        except FileNotFoundError:
            errors.append(ConfigError("api_key_file", f"the file does not exist ({_KEY_FILE_FORM})"))
            return Secret(""), "file"
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path; UnicodeError: not UTF-8
            readable = isinstance(exc, (FileTooLarge, PipeNotWritten))  # says nothing of the key itself
            reason = getattr(exc, "strerror", None) or (str(exc) if readable else type(exc).__name__)
            if isinstance(exc, UnicodeDecodeError):  # its text quotes the bytes: part of the key, maybe
                reason = "it is not UTF-8 text"
            errors.append(ConfigError("api_key_file", f"cannot read the file: {reason} ({_KEY_FILE_FORM})"))
            return Secret(""), "file"
        if not text:
            errors.append(ConfigError("api_key_file", "the file is empty (expected the admin key)"))
            return Secret(""), "file"
        if len(text.split()) != 1 or _key_problem(text):
            errors.append(ConfigError("api_key_file", "the file must hold only the admin key (one token: no spaces, control or "
                                                      "non-ASCII characters)"))
            return Secret(""), "file"
        return Secret(text), "file"
    from_env = (env.get(ENV_ADMIN_KEY) or "").strip()
    if from_env:
        bad = _key_problem(from_env)
        if bad:
            errors.append(ConfigError("api_key", f"the {ENV_ADMIN_KEY} environment variable contains {bad} "
                                                 "(the value is not shown)"))
            return Secret(""), "env"
        return Secret(from_env), "env"
    errors.append(ConfigError(
        "api_key",
        f"no admin key: set the {ENV_ADMIN_KEY} environment variable or api_key_file "
        "(a file holding the key); it is never accepted on the command line",
    ))
    return Secret(""), "env"


def _key_problem(key: str) -> str | None:
    """A line break or control character (requests would refuse the header and quote it in its
    error, where redaction no longer finds the key: it shows `\\n`, not a line break) or a non-ASCII
    one (a pasted placeholder such as `…`: http.client cannot encode the header)."""
    return credential_problem(key, allow_space=True, ascii_only=True)


def url_problem(value: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
    """What makes `value` unusable as a URL with one of `schemes` (requests would fail on it, some
    of it with a traceback), as the end of a sentence about it; None when it is usable."""
    if any(c.isspace() or not c.isprintable() for c in value):
        return "it contains a space or control character"
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return "it cannot be parsed"
    if parts.scheme.lower() not in schemes:
        return "it must start with " + " or ".join(f"{s}://" for s in schemes)
    try:
        port = parts.port
    except ValueError:  # not a number, or beyond 65535
        port = -1
    if port is not None and not 1 <= port <= 65535:
        return "it has an invalid port (a number from 1 to 65535)"
    if not parts.hostname:
        return "it has no host"
    return None


def _check_url(value: str, key: str, schemes: tuple[str, ...], errors: list[ConfigError]) -> None:
    problem = url_problem(value, schemes)
    if problem:
        errors.append(ConfigError(key, f"{_shown(display_url(value))} is not a valid URL: {problem} "
                                       f"({'|'.join(schemes)}://host[:port][/path])"))


def longest_backing_index(namespace: str = "<namespace>") -> str:
    """The longest backing index name of the manifest's datasets for `namespace`."""
    names = (_BACKING_INDEX.format(dataset=ds["dataset"], namespace=namespace) for ds in data_streams().values())
    return max(names, key=lambda name: len(name.encode("utf-8")))


def namespace_max_bytes() -> int:
    """The longest namespace, in UTF-8 bytes, whose every backing index name Elasticsearch accepts."""
    return INDEX_NAME_MAX_BYTES - len(longest_backing_index("").encode("utf-8"))


def namespace_problem(value: str) -> str | None:
    """What makes `value` unusable as the data stream namespace (quoted, then the reasons), or None."""
    errors: list[ConfigError] = []
    _check_namespace(value, errors)
    return errors[0].message if errors else None


def _check_namespace(value: str, errors: list[ConfigError]) -> None:
    problems = []
    if not value:
        problems.append("must not be empty")
    if len(value) > 100:
        problems.append(f"is {len(value)} characters long (at most 100)")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        size = 0  # reported below
    limit = namespace_max_bytes()
    if size > limit:
        problems.append(f"is {size} bytes long in UTF-8 (at most {limit}, so that the backing index "
                        f"{longest_backing_index()} stays within Elasticsearch's {INDEX_NAME_MAX_BYTES}-byte "
                        "limit on index names)")
    bad = sorted(set(value) & _NAMESPACE_FORBIDDEN)
    if bad:
        problems.append("must not contain " + " ".join(repr(c) for c in bad))
    if value != value.lower():
        problems.append("must be lowercase")
    if value.startswith(("_", "+")):
        problems.append("must not start with '_' or '+'")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no document could be encoded
        problems.append("is not valid Unicode text")
    if problems:
        errors.append(ConfigError("namespace", f"{_shown(value)} " + "; ".join(problems)))


def _unknown(key: str, name: Any, choices: list[str], what: str) -> ConfigError:
    # no suggestion for a name that is not short text (difflib on a 3 MB key takes seconds)
    close = (difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
             if isinstance(name, str) and len(name) <= 100 else [])
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(key, f"unknown {what}{hint} (allowed: {', '.join(choices)})")


def _bounds(var: Mapping[str, Any]) -> str:
    lo, hi = var.get("min"), var.get("max")
    if lo is not None and hi is not None:
        return f" (allowed: {lo}..{hi})"
    if lo is not None:
        return f" (allowed: >= {lo})"
    if hi is not None:
        return f" (allowed: <= {hi})"
    return ""


def _describe_type(var: Mapping[str, Any]) -> str:
    if var["type"] == "duration":
        return DURATION_FORM
    if var["type"] == "select":
        return "one of " + ", ".join(str(o["value"]) for o in var.get("options", []))
    return f"a {var['type']} value"


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
