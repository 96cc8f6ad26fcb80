"""`openai-assets`: the installer. Placeholder until the asset bundle lands (issue 4)."""
import sys

import click


@click.group()
def main() -> None:
    """Install openai-elastic's Elasticsearch and Kibana assets."""


@main.command()
def install() -> None:
    """Not yet implemented."""
    click.echo("openai-assets: not yet implemented", err=True)
    sys.exit(2)
