"""The `flowagg` command line (SPEC §8): the group and its options. Every user error is one
line and a distinct exit code.

The commands live in modules by theme; this module only names them, so none of them imports
it. A command's module is imported when that command runs: `flowagg add`, run by the bridge
once per entry, does not pay for the read commands, the sink's or the daemon's imports.
"""

from __future__ import annotations

import importlib

import click

# name -> (module under flowagg.cli, attribute)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("daemon_commands", "run"),
    "add": ("daemon_commands", "add"),
    "status": ("daemon_commands", "status"),
    "flush": ("daemon_commands", "flush"),
    "reload": ("daemon_commands", "reload"),
    "recover": ("daemon_commands", "recover"),
    "config": ("admin_commands", "config_cmd"),
    "health": ("admin_commands", "health"),
    "cleanup": ("admin_commands", "cleanup"),
    "metrics": ("observe", "metrics"),
    "validate": ("validate_commands", "validate"),
    "export": ("read_commands", "export"),
    "report": ("read_commands", "report"),
    "diagnostics": ("read_commands", "diagnostics"),
    "top": ("read_commands", "top"),
    "sink": ("sink_commands", "sink"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        command: click.Command = getattr(
            importlib.import_module(f"flowagg.cli.{where[0]}"), where[1]
        )
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
