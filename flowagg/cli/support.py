"""What every `flowagg` command shares: one-line errors with their exit code, the effective
config, the client's view of the root, a request to the daemon, and human or JSON output."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
import orjson

from flowagg.core.config import Config, load_client_paths, load_config
from flowagg.core.errors import EXIT_ROOT_UNUSABLE, EXIT_USAGE, DaemonError, FlowaggError
from flowagg.core.layout import Layout

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"flowagg: {message}", err=True)
    sys.exit(code)


def handles_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FlowaggError as exc:
            fail(str(exc), exc.exit_code)
        except OSError as exc:
            # A file or folder this user cannot use (another account's root, a full disk).
            where = f"{exc.filename}: " if exc.filename else ""
            fail(
                f"{where}{exc.strerror or exc}; check the path and its permissions",
                EXIT_ROOT_UNUSABLE,
            )

    return wrapper  # type: ignore[return-value]


def get_config(ctx: click.Context, extra: dict[str, Any] | None = None) -> Config:
    flags = {"root": ctx.obj["root"], **(extra or {})}
    return load_config(flags=flags, config_path=ctx.obj["config"])


def client_layout(ctx: click.Context) -> Layout:
    """Where the daemon lives, for commands that only talk to it (see load_client_paths)."""
    return Layout(*load_client_paths(root=ctx.obj["root"], config_path=ctx.obj["config"]))


def require_root(layout: Layout) -> None:
    if not layout.root.is_dir():
        fail(
            f"data root {layout.root} does not exist; pass --root or set FLOWAGG_ROOT",
            EXIT_USAGE,
        )


def daemon_request(ctx: click.Context, payload: dict[str, Any]) -> dict[str, Any]:
    from flowagg.cli.client import request

    reply = request(client_layout(ctx), payload)
    if not reply.get("ok"):
        raise DaemonError(f"the daemon answered: {reply.get('error')}")
    return reply


def emit(data: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(human(data))
