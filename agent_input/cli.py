"""`openai-input`: the collector's command line (collect, check, demo, simulate, run)."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="openai-elastic")
def main() -> None:
    """Collect OpenAI organization usage, costs, rate limits and audit logs as ECS events."""
