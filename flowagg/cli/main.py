"""The `flowagg` command line (SPEC §8): the group and its options. Every user error is one
line and a distinct exit code.

The commands live in modules by theme; this module only registers them, so none of them
imports it.
"""

from __future__ import annotations

import click

from flowagg.cli.admin_commands import cleanup, config_cmd, health
from flowagg.cli.daemon_commands import add, flush, recover, reload, run, status
from flowagg.cli.observe import metrics
from flowagg.cli.read_commands import diagnostics, export, report, top
from flowagg.cli.sink_commands import sink
from flowagg.cli.validate_commands import validate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
# Not readable=True: a shared root is 0710, which the group may pass through but not list.
@click.option(
    "--root",
    type=click.Path(readable=False),
    help="data root (default ./data, or FLOWAGG_ROOT)",
)
@click.option("--config", "config_path", type=click.Path(), help="TOML config file")
@click.pass_context
def main(ctx: click.Context, root: str | None, config_path: str | None) -> None:
    """flowagg: a local aggregation daemon that never loses an acknowledged entry."""
    ctx.obj = {"root": root, "config": config_path}


for command in (
    run,
    add,
    status,
    flush,
    reload,
    recover,
    config_cmd,
    health,
    cleanup,
    metrics,
    validate,
    export,
    report,
    diagnostics,
    top,
    sink,
):
    main.add_command(command)
