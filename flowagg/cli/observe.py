"""`flowagg metrics` (SPEC §11): the running daemon's Prometheus metrics."""

from __future__ import annotations

import click

from flowagg.cli.support import client_layout, handles_errors
from flowagg.core.errors import DaemonError


@click.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["prometheus", "openmetrics"]),
    default="prometheus",
    show_default=True,
    help="the Prometheus text format (0.0.4) that promtool reads, or OpenMetrics text",
)
@click.pass_context
@handles_errors
def metrics(ctx: click.Context, fmt: str) -> None:
    """Print the daemon's metrics (names start with flowagg_)."""
    from flowagg.cli.client import request

    reply = request(client_layout(ctx), {"op": "metrics", "format": fmt})
    if not reply.get("ok"):
        raise DaemonError(f"the daemon answered: {reply.get('error')}")
    click.echo(reply["text"], nl=False)
