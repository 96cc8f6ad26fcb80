"""`openai-input`: the collector's command line (collect, check, demo, simulate, run)."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="openai-elastic")
def main() -> None:
    """Collect OpenAI organization usage, costs, rate limits and audit logs as ECS events."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML config file (the admin key comes from it, api_key_file or OPENAI_ADMIN_KEY).")
@click.option("--log-level", default="WARNING", show_default=True, help="stderr log level.")
def check(config_path: str, log_level: str) -> None:
    """Validate the config, then probe the Admin API once per enabled kind of endpoint.

    Exit status: 0 all good, 1 a probe failed, 2 the config is invalid (no request is made).
    """
    import sys

    from .config import ConfigError, load_config
    from .http_client import AdminApiClient, probe_api
    from .logs import setup_logging

    setup_logging(log_level, "text" if sys.stderr.isatty() else "ecs")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo("openai-input: config error:", err=True)
        for line in exc.lines():
            click.echo(f"  {line}", err=True)
        sys.exit(2)
    enabled = config.enabled_streams()
    click.echo(f"config OK: {len(enabled)} of {len(config.streams)} data streams enabled "
               f"({', '.join(s.name for s in enabled) or 'none'}); API {config.url}")
    failed = False
    try:
        # A check should answer quickly: a couple of retries, not the collector's full patience.
        with AdminApiClient.from_config(config, max_retries=min(config.max_retries, 2),
                                        backoff_cap=2.0) as client:
            for result in probe_api(client, config):
                failed |= not result.ok
                click.echo(f"  {result.name:<11} {result.path}: {result.message}")
    except Exception as exc:  # never a traceback from `check`
        from .logs import redact

        click.echo(f"openai-input: check failed: {redact(str(exc)) or type(exc).__name__}", err=True)
        sys.exit(1)
    if failed:
        click.echo("check FAILED", err=True)
        sys.exit(1)
    click.echo("check OK")


@main.command()
@click.option("--port", type=int, default=8089, show_default=True, help="Loopback port (0: any free port).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the synthetic organization.")
@click.option("--org", type=click.Choice(["small", "large"]), default="small", show_default=True,
              help="Size of the simulated organization.")
@click.option("--latency-ms", type=int, default=0, show_default=True, help="Added latency per API request.")
@click.option("--now", "now_text", default=None,
              help="Freeze the simulated clock here (ISO 8601 or unix seconds); default: follow the wall clock.")
def simulate(port, seed, org, latency_ms, now_text):
    """Serve the OpenAI Admin API simulator on loopback until Ctrl-C.

    Prints the base URL and the admin key to stderr. Tests drive it through /_sim/clock,
    /_sim/faults, /_sim/truth and /_sim/stats.
    """
    from datetime import datetime, timezone

    from .simulator import run_simulator

    now = None
    if now_text is not None:
        try:
            now = float(now_text)
        except ValueError:
            try:
                dt = datetime.fromisoformat(now_text.replace("Z", "+00:00"))
            except ValueError:
                raise click.BadParameter(f"{now_text!r} is neither ISO 8601 nor unix seconds",
                                         param_hint="--now") from None
            now = (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    run_simulator(port=port, seed=seed, org=org, latency_ms=latency_ms, now=now)
