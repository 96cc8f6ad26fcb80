"""`openai-input`: the collector's command line (collect, check, demo, simulate, run)."""
from __future__ import annotations

import click

# One clear usage error for a typo, instead of a ValueError traceback from logging set-up.
LOG_LEVEL = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False)


class StdoutSafeGroup(click.Group):
    """A command group whose output to a stdout that cannot take it (a full disk, `>/dev/full`, an
    I/O error) is one line on stderr and exit 1, not an OSError traceback from click.echo (click
    itself handles only EPIPE, a reader that went away). A character stdout's encoding cannot
    write (a path or name outside cp1252, Windows' code page when stdout is redirected) is written
    as `\\uXXXX`, as on stderr, not a UnicodeEncodeError that failed the command."""

    def __init__(self, *args, prog: str = "openai-input", **kwargs):
        super().__init__(*args, **kwargs)
        self.prog = prog

    def main(self, *args, **kwargs):
        import os
        import sys

        try:
            sys.stdout.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):
            pass  # None (stdout closed), not a TextIOWrapper, or already unusable
        try:
            return super().main(*args, **kwargs)
        except OSError as exc:
            if not _raised_by_echo_to_stdout(exc):
                raise  # not stdout's error: not ours to word
            try:  # the unwritten bytes go nowhere, so that the exit's own flush cannot fail again
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
            print(f"{self.prog}: cannot write to stdout: {exc.strerror or exc}", file=sys.stderr)
            sys.exit(1)


def _raised_by_echo_to_stdout(exc: BaseException) -> bool:
    """Whether `exc` came out of click.echo writing to stdout (the only way these commands write it)."""
    import sys

    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "echo" and frame.f_globals.get("__name__") == "click.utils":
            return frame.f_locals.get("file") is not sys.stderr
        tb = tb.tb_next
    return False


@click.group(cls=StdoutSafeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="openai-elastic")
def main() -> None:
    """Collect OpenAI organization usage, costs, rate limits and audit logs as ECS events."""


def _load_config_or_exit(path: str):
    """The config, or every problem with it on stderr and exit status 2 (before any request)."""
    from .config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo("openai-input: config error:", err=True)
        for line in exc.lines():
            click.echo(f"  {line}", err=True)  # ConfigError has hidden the keys in it
        raise SystemExit(2)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML config file (the admin key comes from it, api_key_file or OPENAI_ADMIN_KEY).")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Also check that the key reaches the organization this state directory was collected "
                   "for (read only). [default: the one collect uses by default]")
@click.option("--log-level", type=LOG_LEVEL, default="WARNING", show_default=True, help="stderr log level.")
def check(config_path: str, log_level: str, state_dir: str | None = None) -> None:
    """Validate the config, then probe the Admin API once per enabled kind of endpoint, and the state
    directory's organization when it records one.

    Exit status: 0 all good, 1 a probe failed, 2 the config is invalid (no request is made).
    """
    import logging
    import sys

    from .config import display_url
    from .http_client import AdminApiClient, probe_api
    from .logs import redact, setup_logging

    setup_logging(log_level, "auto")  # text on a terminal, else ECS; a closed stderr (None) is no terminal
    config = _load_config_or_exit(config_path)
    if not config.ssl_verify:  # as collect and run say it, once (app.build)
        logging.getLogger("agent_input.cli").warning("TLS certificate verification is off (ssl_verify: false)")
    enabled = config.enabled_streams()
    click.echo(redact(f"config OK: {len(enabled)} of {len(config.streams)} data streams enabled "
                      f"({', '.join(s.name for s in enabled) or 'none'}); API {display_url(config.url)}"))
    failed = False
    try:
        # A check should answer quickly: a couple of retries, not the collector's full patience.
        with AdminApiClient.from_config(config, max_retries=min(config.max_retries, 2),
                                        backoff_cap=2.0) as client:
            for result in probe_api(client, config):
                failed |= not result.ok
                click.echo(f"  {result.name:<12} {result.path}: {result.message}")
            if not failed:
                from .org_guard import check_state_dir

                state_dir = state_dir or _default_state_dir(required=False)
                org = check_state_dir(client, state_dir) if state_dir else None
                if org is not None:
                    failed |= not org[0]
                    click.echo(f"  {'state dir':<12} {org[1]}")
    except Exception as exc:  # never a traceback from `check`
        from .logs import redact

        if isinstance(exc, OSError) and _raised_by_echo_to_stdout(exc):
            raise  # its reader went away (`| head -1`) or stdout is full: not the API's failure (main says it)
        click.echo(f"openai-input: check failed: {redact(str(exc)) or type(exc).__name__}", err=True)
        sys.exit(1)
    if failed:
        click.echo("check FAILED", err=True)
        sys.exit(1)
    click.echo("check OK")


LATEST_NOW = 253402300799  # 9999-12-31T23:59:59Z: the last second a document's @timestamp can name


def _parse_now(value: str | None) -> float | None:
    """`--now`: ISO 8601 (Z or offset) or unix seconds, from 1970 to 9999 (nan, inf or 1e20 would
    fail every stream's every poll with an error of its own)."""
    if value is None:
        return None
    import math
    from datetime import datetime, timezone

    from .logs import redact

    try:
        now = float(value)
    except ValueError:
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise click.BadParameter(redact(f"{value[:60]!r} is neither ISO 8601 nor unix seconds"),
                                     param_hint="'--now'") from None
        now = (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    if not (math.isfinite(now) and 0 <= now <= LATEST_NOW):
        raise click.BadParameter(redact(f"{value[:60]!r} is not a time from 1970 to 9999 "
                                        f"(unix seconds 0..{LATEST_NOW})"), param_hint="'--now'")
    return now


# `run --ack-timeout`: an hour is far past any supervisor's patience at a stop; `inf` (or 1e308) made
# a stop with batches unacknowledged wait for ever, the batches being safe in the outbox anyway
MAX_ACK_TIMEOUT = 3600.0


def _not_nan(ctx, param, value: float) -> float:
    """FloatRange lets `nan` through (no comparison with it is true): as --ack-timeout it made the
    stop spin for ever, deaf to SIGTERM, waiting for acks with a deadline never reached."""
    if value != value:
        raise click.BadParameter(f"{value!r} is not a number of seconds")
    return value


def _default_state_dir(required: bool = True) -> str | None:
    """$XDG_STATE_HOME/openai-input, else ~/.local/state/openai-input. A user with no home (no
    $HOME and no passwd entry: a container's arbitrary uid) has no default: a usage error, or None
    when not `required` (check, which only looks at it)."""
    import os
    from pathlib import Path

    base = os.environ.get("XDG_STATE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".local" / "state")
        except (RuntimeError, KeyError):  # RuntimeError from 3.11, KeyError (pwd) before
            if not required:
                return None
            raise click.UsageError("no home directory for the default state directory: give --state-dir "
                                   "(or set XDG_STATE_HOME)") from None
    return str(Path(base) / "openai-input")


def _install_stop_handlers(stop) -> None:
    """SIGINT/SIGTERM: finish the page in flight (not a request still waiting for its answer), flush,
    save state, exit 0.

    A handler runs on the main thread between two bytecodes, wherever that thread is, so it must
    not take a lock the interrupted code may hold: `stop.set()` takes the event's (not reentrant)
    lock, and a second signal inside the first handler's set() (two SIGINTs a fraction of a
    millisecond apart, as `timeout` sends them to the process and to its group), or a signal
    while the main thread sets the event itself (`run` does), waited for that lock for ever, and
    the stream threads with it. The handler only puts the signal on a SimpleQueue (safe in a
    handler: it is reentrant); a relay thread sets the event, and ends once the event is set.

    When the command returns (its click context closes), the previous handlers are put back and
    the relay ends: a process that goes on (CliRunner, an embedding program, a test suite) gets
    its Ctrl-C and SIGTERM back instead of setting a finished command's stop event."""
    import queue
    import signal
    import threading

    signals: queue.SimpleQueue = queue.SimpleQueue()

    def relay() -> None:
        while not stop.is_set():
            try:
                signum = signals.get(timeout=1.0)
            except queue.Empty:
                continue
            if signum is None:  # the command returned: nothing more to relay
                return
            stop.set()

    threading.Thread(target=relay, name="stop-signals", daemon=True).start()

    def handler(signum, frame):
        signals.put(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def give_back() -> None:
        for sig, old in previous.items():
            if old is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(sig, old)
        signals.put(None)

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(give_back)


ROTATE_KEEP = 5  # --rotate-keep's default


def _open_output(kind: str, path: str | None, *, config=None, state_dir: str | None = None, stop=None,
                 es_url: str | None = None, es_ca_file: str | None = None, rotate_bytes: int | None = None,
                 rotate_keep: int | None = None):
    import sys

    from .outputs import NdjsonFileOutput, NdjsonOutput, OutputError

    if kind == "ndjson":
        # an option of the other output, or one that needs another, would be silently ignored
        if es_url or es_ca_file:
            raise OutputError("--es-url/--es-ca-file are for --output elasticsearch, not ndjson")
        if rotate_bytes and not path:
            raise OutputError("--rotate-bytes needs --output-path (stdout cannot be rotated)")
        if rotate_keep is not None and not rotate_bytes:
            raise OutputError("--rotate-keep needs --rotate-bytes (without it the file is never rotated)")
        if path:
            return NdjsonFileOutput(path, rotate_bytes=rotate_bytes,
                                    rotate_keep=ROTATE_KEEP if rotate_keep is None else rotate_keep, stop=stop)
        if sys.stdout is None:  # started with stdout closed (`>&-`): Python leaves it None
            raise OutputError("stdout is closed: nothing can receive the events (give --output-path, "
                              "or run it with stdout open)")
        return NdjsonOutput(sys.stdout.buffer)
    if kind == "elasticsearch":
        from .es_output import ElasticsearchOutput, check_cluster, make_client

        if path or rotate_bytes or rotate_keep is not None:
            raise OutputError("--output-path/--rotate-bytes/--rotate-keep are for --output ndjson, not elasticsearch")
        # --es-url overrides the config's es_url and es_cloud_id alike (the config allows only one)
        url = es_url or (config.es_url if config is not None else None)
        client = make_client(
            url,
            cloud_id=config.es_cloud_id if config is not None and not es_url else None,
            ca_file=es_ca_file or (config.es_ssl_ca_file if config is not None else None),
            verify=config.es_ssl_verify if config is not None else True,
        )
        version = check_cluster(client, stop)
        import logging

        logging.getLogger("agent_input.cli").info("Elasticsearch %s: sending events with create operations", version)
        return ElasticsearchOutput(client, state_dir=state_dir or _default_state_dir(),
                                   namespace=config.namespace if config is not None else "default", stop=stop)
    raise click.BadParameter(f"unknown output {kind!r}")


def _fail(message: str, code: int = 1) -> None:
    import sys

    click.echo(f"openai-input: {message}", err=True)
    sys.exit(code)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML config file (see README); the admin key comes from it, api_key_file or OPENAI_ADMIN_KEY.")
@click.option("--once", is_flag=True, help="One poll of every enabled stream, then exit.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Where cursors and the outbox live; the next run resumes from it. One collector "
                   "per state directory: a second one on it stops at its start. "
                   "[default: $XDG_STATE_HOME/openai-input, or ~/.local/state/openai-input]")
@click.option("--output", "output_kind", type=click.Choice(["ndjson", "elasticsearch"]), default="ndjson",
              show_default=True,
              help="ndjson: one ECS document per line, its id in the top-level `_id`. elasticsearch: bulk "
                   "`create` into logs-openai.<dataset>-<namespace> (credentials: ELASTIC_API_KEY or "
                   "ELASTIC_USERNAME/ELASTIC_PASSWORD).")
@click.option("--output-path", type=click.Path(dir_okay=False), default=None,
              help="Append NDJSON to this file (or FIFO, or character device) instead of stdout.")
@click.option("--rotate-bytes", type=click.IntRange(min=1), default=None,
              help="Rotate --output-path before it would grow past this many bytes (whole batches only).")
@click.option("--rotate-keep", type=click.IntRange(min=1), default=None,
              help=f"Rotated files to keep (<path>.1 newest ... <path>.N oldest), with --rotate-bytes. "
                   f"[default: {ROTATE_KEEP}]")
@click.option("--es-url", default=None,
              help="Elasticsearch URL for --output elasticsearch [default: es_url or es_cloud_id from the "
                   "config, else ELASTIC_CLOUD_ID].")
@click.option("--es-ca-file", type=click.Path(dir_okay=False), default=None,
              help="PEM CA bundle for Elasticsearch's TLS certificate [default: es_ssl_ca_file from the config].")
@click.option("--now", "now_text", default=None, hidden=True,
              help="Pretend the current time is this (ISO 8601 or unix seconds): replays and tests.")
@click.option("--log-level", type=LOG_LEVEL, default="INFO", show_default=True)
@click.option("--log-format", type=click.Choice(["auto", "ecs", "text"]), default="auto", show_default=True)
def collect(config_path, once, state_dir, output_kind, output_path, rotate_bytes, rotate_keep, es_url,
            es_ca_file, now_text, log_level, log_format):
    """Poll every enabled data stream and emit ECS documents."""
    import sys
    import threading
    import time

    from . import app, memory
    from .engine import Progress
    from .logs import register_secret, setup_logging
    from .outputs import OutputError
    from .org_guard import OrganizationMismatch
    from .state import StateDatabaseError, StateError, StateStore

    setup_logging(log_level, log_format)
    config = _load_config_or_exit(config_path)
    register_secret(config.api_key)
    now = _parse_now(now_text)
    clock = app.fixed_clock(now) if now is not None else time.time
    stop = threading.Event()
    _install_stop_handlers(stop)
    progress = Progress()
    store = None
    try:
        state_dir = state_dir or _default_state_dir()
        # the state first: its lock stops a second collector on this directory before it opens
        # (and cuts back the half-written last line of) the first one's output file
        store = StateStore(state_dir)
        output = _open_output(output_kind, output_path, config=config, state_dir=state_dir, stop=stop,
                              es_url=es_url, es_ca_file=es_ca_file, rotate_bytes=rotate_bytes,
                              rotate_keep=rotate_keep)
        memory.tune()  # before the stream threads exist: see agent_input/memory.py
        collection = app.build(config, store=store, output=output,
                               stop=stop, clock=clock, progress=progress)
    except (StateError, OutputError) as exc:
        if store is not None:
            store.close()  # the directory's lock, for a caller that goes on (CliRunner)
        if stop.is_set():  # SIGINT/SIGTERM before the output was open (a FIFO nobody reads): nothing to save
            click.echo(f"openai-input: {exc}", err=True)
            sys.exit(0)
        _fail(str(exc))
    try:
        code = collection.engine.run(once=once)
    except OrganizationMismatch as exc:  # another organization's key on this state: nothing was stored or sent
        _fail(str(exc))
    except OutputError as exc:  # re-sending the outbox failed: its batches wait there, as after a refused batch
        _fail(str(exc) + _waiting(_undelivered(collection.store), state_dir, "; "))
    except StateDatabaseError as exc:  # sqlite (a full disk, a lock) while re-sending: nothing is lost
        _fail(f"{exc}; the unacknowledged batches stay in the outbox and are sent again at the next start")
    except StateError as exc:  # e.g. an outbox file of an unacknowledged batch is gone: every start would fail
        _fail(f"cannot re-send the unacknowledged batches kept in {state_dir}: {exc}. Restore the missing "
              f"file from a backup, or move {state_dir} aside to start afresh (that batch is then lost and "
              "the streams read again from initial_interval)")
    finally:
        progress.finish()
        # delivered, but their outbox entries could not be deleted (a full disk): said apart
        unremoved = len(getattr(collection.engine.delivery, "unremoved", ()))
        undelivered = max(0, _undelivered(collection.store) - unremoved)
        collection.close()
        output.close()
    if collection.engine.collectors and once:
        _print_summary(collection.engine)
    if output_kind == "elasticsearch":
        _report(f"elasticsearch: {output.created} created, {output.duplicates} already there (409), "
                f"{output.rejected} rejected" + (f" (see {output.dead_letter_path})" if output.rejected else "")
                + (f", {output.failure_stored} kept in a failure store (see the warnings)"
                   if output.failure_stored else ""))
    if undelivered:  # the summary's documents are collected, not necessarily delivered
        _report(_waiting(undelivered, state_dir))
    if unremoved:
        _report(f"{unremoved} batch(es) were delivered but could not be deleted from the outbox ({state_dir}): "
                "they are sent again at the next start, duplicates by _id")
    raise SystemExit(code)


def _report(line: str) -> None:
    """A closing report line on stderr. A stderr that cannot take it (the logs' disk is full) loses
    the line, as it loses the log lines, but must not turn the exit status of a run that collected
    and delivered everything into 1 (an OSError out of the command)."""
    try:
        click.echo(line, err=True)
    except OSError:
        pass


def _waiting(undelivered: int, state_dir: str, prefix: str = "") -> str:
    """What the closing line says of the batches left in the outbox ('' when none)."""
    if not undelivered:
        return ""
    return (f"{prefix}{undelivered} batch(es) not delivered yet wait in the outbox ({state_dir}) and are sent "
            "first at the next start")


def _undelivered(store) -> int:
    """Batches the output has not acknowledged (0 when the state cannot say: it has said why)."""
    try:
        return store.pending_count()
    except Exception:  # noqa: BLE001 - a closing report must not fail the exit
        return 0


def _print_summary(engine) -> None:
    """One row per stream: what it emitted, the requests OpenAI answered (a listing page each, a first
    run's first page asked again from OpenAI's time included: a request made, though none of its page
    is used), how often OpenAI throttled it (429s, and the seconds waited because of Retry-After:
    each retry is also a WARNING line), its status."""
    clients = {c.name: getattr(c, "client", None) for c in engine.collectors}
    rows = [("stream", "documents", "corrections", "requests", "throttled", "status")]
    for name, t in sorted(engine.totals.items()):
        status = "failed: " + engine.failed[name] if name in engine.failed else (
            f"{t.bad_buckets} bad bucket(s)" if t.bad_buckets else "ok")
        stats = getattr(clients.get(name), "stats", None)
        throttled = getattr(stats, "throttled", 0)
        waited = getattr(stats, "retry_after_seconds_total", 0.0)
        rows.append((name, str(t.events), str(t.corrections), str(t.requests),
                     f"{throttled} ({waited:g}s waited)" if waited else str(throttled), status))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        _report("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])


@main.command()
@click.option("--out", "out_path", default="out/openai-demo.ndjson", show_default=True,
              type=click.Path(dir_okay=False), help="Where the demo writes its events (replaced each run).")
@click.option("--org", type=click.Choice(["small", "large"]), default="small", show_default=True,
              help="Size of the simulated organization.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--log-level", type=LOG_LEVEL, default="WARNING", show_default=True)
def demo(out_path, org, seed, log_level):
    """Collect a realistic day from the built-in OpenAI Admin API simulator.

    Starts the simulator on loopback, runs one backfill poll of every data stream (usage 24h at
    1m, costs 30 days daily),
    moves the simulated clock 30 minutes on and polls again so late revisions arrive as
    corrections, then prints a per-dataset summary. Nothing leaves this machine.
    """
    import secrets
    import tempfile
    import time
    from pathlib import Path

    from . import app, memory
    from .config import config_from_dict
    from .engine import Progress
    from .logs import register_secret, setup_logging
    from .outputs import NdjsonFileOutput, OutputError
    from .simulator import Simulator
    from .state import StateError

    setup_logging(log_level, "text")
    memory.tune()  # before any thread exists (the simulator's too): see agent_input/memory.py
    out = Path(out_path)
    try:  # before the simulator starts: a path that cannot be written is one line, not a traceback
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"")
    except OSError as exc:  # mkdir's FileExistsError: a file stands where a folder is needed
        reason = "a file is in the way of its folder" if isinstance(exc, FileExistsError) else exc.strerror or exc
        _fail(f"cannot write the demo's events to {out}: {reason}")
    key = "sk-admin-demo-" + secrets.token_hex(12)
    register_secret(key)
    sim = Simulator(seed=seed, org=org, now=time.time(), admin_key=key)
    url = sim.start()
    click.echo(f"simulator: {url} ({org} organization, seed {seed})", err=True)
    try:
        with tempfile.TemporaryDirectory(prefix="openai-demo-state-") as state_dir:
            config = config_from_dict({"url": url, "api_key": key}, env={})
            output = NdjsonFileOutput(out)
            progress = Progress()
            collection = app.build(config, state_dir=state_dir, output=output, clock=sim.now,
                                   progress=progress)
            try:
                started = time.monotonic()
                collection.engine.run(once=True)
                progress.finish()
                backfill_s = time.monotonic() - started
                sim.advance(30 * 60)
                collection.engine.run(once=True)
                progress.finish()
            finally:
                collection.close()
                output.close()
            _demo_summary(collection.engine, out, sim, backfill_s)
    except (StateError, OutputError) as exc:  # e.g. a full temporary folder: one line, no traceback
        _fail(str(exc))
    finally:
        sim.stop()


def _demo_summary(engine, out, sim, backfill_s) -> None:
    """Per dataset: documents, corrections, requests, and the stored total of its main counter
    next to the simulator's final truth for the buckets that have settled."""
    import json
    import math

    from .streams import STREAMS_BY_NAME

    now = sim.now()
    # the simulator revises minutes for at most 2h and cost days for at most 2 days
    settled_before = {"1m": int(now - 3 * 3600) // 60 * 60, "1d": int(now - 3 * 86400) // 86400 * 86400}
    sums: dict[str, float] = {}
    first: dict[str, int] = {}
    count: dict[str, int] = {}
    notes: dict[str, dict] = {}
    with open(out, "rb") as fh:
        for line in fh:
            doc = json.loads(line)
            ds = doc["data_stream"]["dataset"].split(".", 1)[1]
            count[ds] = count.get(ds, 0) + 1
            _demo_note(notes, ds, doc)
            spec = STREAMS_BY_NAME.get(ds)
            if spec is None or doc["event"]["kind"] != "metric":
                continue
            base = doc["openai"]["base"]
            start = int(_epoch(base["start_time"]))
            if start >= settled_before[_demo_width(spec)]:
                continue
            first[ds] = min(first.get(ds, start), start)
            counter = spec.counters[0]
            leaf = spec.renames.get(counter, counter)
            section = base if counter == "num_model_requests" else doc["openai"].get(ds, {})
            for part in leaf.split("."):
                section = section.get(part, 0) if isinstance(section, dict) else 0
            sums[ds] = sums.get(ds, 0) + (section or 0)
    click.echo("")
    header = f"{'dataset':<27}{'documents':>10}{'corrections':>13}{'requests':>10}  settled total (collected / OpenAI final)"
    click.echo(header)
    for name, t in sorted(engine.totals.items()):
        line = f"{name:<27}{count.get(name, 0):>10}{t.corrections:>13}{t.requests:>10}"
        spec = STREAMS_BY_NAME.get(name)
        if spec is not None and name in first:
            width = _demo_width(spec)
            truth = sim.truth(name, first[name], settled_before[width], width, ())
            counter = spec.counters[0]  # the simulator names `amount.value` just `amount`
            final = sum(v.get(counter, v.get(counter.split(".")[0], 0)) for v in truth.values())
            got = sums.get(name, 0)
            mark = "exact" if math.isclose(got, final) else "DIFFERS"
            # an amount to the cent (what a user reconciles with), a count as a whole number
            fmt = ",.2f" if isinstance(got, float) or isinstance(final, float) else ",.0f"
            line += f"  {spec.counters[0]}: {got:{fmt}} / {final:{fmt}} {mark}"
        elif name in notes:
            line += "  " + _demo_note_text(name, notes[name])
        if name in engine.failed:
            line += f"  failed: {engine.failed[name]}"
        click.echo(line)
    click.echo(f"\nbackfill of a day took {backfill_s:.1f}s; events in {out}")


def _demo_note(notes: dict, ds: str, doc: dict) -> None:
    """What the summary says about datasets that are not usage-like (audit, rate limits)."""
    n = notes.setdefault(ds, {})
    if ds == "audit":
        n["events"] = n.get("events", 0) + 1
        n.setdefault("actions", set()).add(doc["event"].get("action"))
        actor = doc["openai"]["audit"].get("actor", {}).get("type")
        n[actor] = n.get(actor, 0) + 1
    elif ds == "rate_limits":
        if doc["event"].get("action") == "rate-limits-collection":
            n["cycles"] = n.get("cycles", 0) + 1
            n["last"] = doc["event"].get("outcome")
            n["failed"] = doc["openai"]["rate_limits"]["collection"].get("failed_projects", 0)
        else:
            n["limits"] = n.get("limits", 0) + 1
            n.setdefault("projects", set()).add(doc["openai"]["rate_limits"].get("project_id"))


def _demo_note_text(name: str, n: dict) -> str:
    if name == "audit":
        return (f"audit events: {n.get('events', 0)} ({len(n.get('actions', ()))} actions; "
                f"{n.get('session', 0)} by sessions, {n.get('api_key', 0)} by API keys)")
    if name == "rate_limits":
        return (f"limits: {n.get('limits', 0)} for {len(n.get('projects', ()))} projects in "
                f"{n.get('cycles', 0)} collection(s); last {n.get('last', 'none')}, "
                f"{n.get('failed', 0)} failed project(s)")
    return ""


def _demo_width(spec) -> str:
    return "1m" if "1m" in spec.widths else spec.widths[0]


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@main.command()
@click.option("--port", type=click.IntRange(0, 65535), default=8089, show_default=True,
              help="Loopback port (0: any free port).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the synthetic organization.")
@click.option("--org", type=click.Choice(["small", "large"]), default="small", show_default=True,
              help="Size of the simulated organization.")
@click.option("--latency-ms", type=click.IntRange(min=0, max=600_000), default=0, show_default=True,
              help="Added latency per API request, in milliseconds (at most 10 minutes).")
@click.option("--now", "now_text", default=None,
              help="Freeze the simulated clock here (ISO 8601 or unix seconds); default: follow the wall clock.")
@click.option("--cache-responses", is_flag=True,
              help="Answer a repeated request (same path, query and simulated time) from memory, so a "
                   "second identical backfill costs the simulator no CPU (benchmarks).")
def simulate(port, seed, org, latency_ms, now_text, cache_responses):
    """Serve the OpenAI Admin API simulator on loopback until Ctrl-C (or SIGTERM); exit 0.

    Prints the base URL and the admin key to stderr. Tests drive it through /_sim/clock,
    /_sim/faults, /_sim/truth and /_sim/stats.
    """
    import errno

    from .simulator import run_simulator

    now = _parse_now(now_text)
    import threading

    stop = threading.Event()
    _install_stop_handlers(stop)  # a signal only sets the event: it cannot land mid-start-up
    try:
        run_simulator(port=port, seed=seed, org=org, latency_ms=latency_ms, now=now,
                      cache_responses=cache_responses, stop=stop)
    except OSError as exc:  # the port is taken (or below 1024 for a user): one line, not a traceback
        _fail(f"cannot serve on 127.0.0.1:{port}: {exc.strerror or exc}"
              + (" (pick another --port, or 0 for any free one)" if exc.errno == errno.EADDRINUSE else ""))


@main.command()
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Where cursors and the outbox live, as for collect. [default: $XDG_STATE_HOME/openai-input, "
                   "or ~/.local/state/openai-input]")
@click.option("--ack-on-flush", is_flag=True,
              help="No supervisor acks (a plain pipe): a batch counts as delivered once written and flushed.")
@click.option("--ack-timeout", type=click.FloatRange(min=0, max=MAX_ACK_TIMEOUT), default=10.0, show_default=True,
              callback=_not_nan, help="On stop, seconds to wait for the acks of batches already sent (at most "
                                      "3600).")
@click.option("--max-inflight", type=click.IntRange(min=1), default=32, show_default=True,
              help="Batches sent but not acked before the collectors wait (backpressure).")
@click.option("--now", "now_text", default=None, hidden=True,
              help="Pretend the current time is this (ISO 8601 or unix seconds): replays and tests.")
@click.option("--log-level", type=LOG_LEVEL, default="INFO", show_default=True)
def run(state_dir, ack_on_flush, ack_timeout, max_inflight, now_text, log_level):
    """Run under a supervisor: the agent NDJSON protocol on stdin/stdout (docs/protocol.md).

    stdin: config, ack and stop messages. stdout: event and status messages, nothing else.
    stderr: ECS JSON logs. Exit status 0 after a stop, end of stdin, SIGTERM/SIGINT, or when the
    reader closes stdout.
    """
    import sys
    import threading
    import time

    from . import app, memory
    from .logs import UnblockedStream, setup_logging
    from .protocol import ProtocolWriter, Runner

    writer = ProtocolWriter.take_stdout()
    logs = UnblockedStream(sys.stderr)  # a supervisor that does not read stderr must not stall the collector
    setup_logging(log_level, "ecs", stream=logs)
    memory.tune()  # before the stream threads exist: see agent_input/memory.py
    now = _parse_now(now_text)
    clock = app.fixed_clock(now) if now is not None else time.time
    stop = threading.Event()
    _install_stop_handlers(stop)
    runner = Runner(writer, state_dir=state_dir or _default_state_dir(), clock=clock,
                    ack_on_flush=ack_on_flush, ack_timeout=ack_timeout, max_inflight=max_inflight)
    try:
        code = runner.run(stop)
    except Exception as exc:  # one clear line on stderr, never a traceback on the event stream
        from .logs import redact

        logs.write(f"openai-input: run failed: {redact(str(exc)) or type(exc).__name__}\n")
        code = 1
    writer.close()
    logs.wait_written(2.0)  # not for ever: nobody may be reading stderr
    import os

    os._exit(code)  # daemon threads (stdin reader) must not hold the exit


if __name__ == "__main__":
    main()
