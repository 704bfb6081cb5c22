"""`scripts/provider-bridge`: the four actions other tools call (SPEC §8).

aggregate          entries on stdin (object, array or JSON lines), like `flowagg add`
aggregate-status   the daemon's status
aggregate-force    flush now
aggregate-recover  retry failed batches now (--abandoned to requeue abandoned ones)

Always one JSON document on stdout, errors included (`{"ok": false, "error": ...}`), and
the exit codes of `flowagg`. The data root is found exactly as `flowagg` finds it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import IO, Any, NoReturn

import orjson

from flowagg.cli.client import add_entries, request
from flowagg.core.config import load_client_paths
from flowagg.core.entries import EntryError, parse_entries_text
from flowagg.core.errors import (
    EXIT_DAEMON_FAILURE,
    EXIT_NOTHING_STORED,
    EXIT_OK,
    EXIT_USAGE,
    FlowaggError,
)
from flowagg.core.layout import Layout


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage: every answer is one JSON document."""

    def error(self, message: str) -> NoReturn:
        raise FlowaggError(f"{message}; run `provider-bridge --help` for the actions", EXIT_USAGE)

    def print_help(self, file: IO[str] | None = None) -> NoReturn:
        raise _HelpShown(self.format_help())


class _HelpShown(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="provider-bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="data root (default ./data, or FLOWAGG_ROOT)")
    parser.add_argument("--config", help="TOML config file")
    sub = parser.add_subparsers(dest="action", required=True, parser_class=_Parser)
    agg = sub.add_parser("aggregate", help="add entries read from stdin")
    agg.add_argument("--spool", action="store_true", help="write a spool file, no socket")
    agg.add_argument("--spool-if-down", action="store_true", help="spool when no daemon answers")
    agg.add_argument("--wait", type=float, default=30.0, help="seconds to wait out busy")
    sub.add_parser("aggregate-status", help="daemon status")
    sub.add_parser("aggregate-force", help="flush now")
    rec = sub.add_parser("aggregate-recover", help="retry failed batches now")
    rec.add_argument("--abandoned", action="store_true", help="also requeue abandoned batches")
    rec.add_argument("--batch", help="with --abandoned: only this batch id")
    return parser


def _run(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    layout = Layout(*load_client_paths(root=args.root, config_path=args.config))
    if args.action == "aggregate":
        if sys.stdin is None:
            raise FlowaggError(
                "stdin is closed; pipe the entries into aggregate", EXIT_NOTHING_STORED
            )
        try:
            items = parse_entries_text(sys.stdin.buffer.read())
        except EntryError as exc:
            raise FlowaggError(f"{exc}; nothing was stored", EXIT_NOTHING_STORED) from None
        if not items:
            raise FlowaggError("no entries on stdin; nothing was stored", EXIT_NOTHING_STORED)
        result = add_entries(
            layout, items, spool=args.spool, spool_if_down=args.spool_if_down, wait_s=args.wait
        )
        if not result.get("ok"):
            return result, EXIT_NOTHING_STORED
        return result, EXIT_USAGE if result.get("rejected") else EXIT_OK
    payload: dict[str, Any] = {
        "aggregate-status": {"op": "status"},
        "aggregate-force": {"op": "flush"},
        "aggregate-recover": {"op": "recover", "abandoned": getattr(args, "abandoned", False)},
    }[args.action]
    if getattr(args, "batch", None):
        payload["batch"] = args.batch
    reply = request(layout, payload)
    if not reply.get("ok"):
        return reply, EXIT_DAEMON_FAILURE
    if args.action == "aggregate-recover" and (
        reply["failedAgain"] or reply["abandoned"] or reply["circuitOpen"] or reply["paused"]
    ):
        return reply, EXIT_DAEMON_FAILURE
    if args.action == "aggregate-force" and reply["failedBatches"]:
        return reply, EXIT_DAEMON_FAILURE
    return reply, EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        result, code = _run(_parser().parse_args(argv))
    except _HelpShown as shown:
        result, code = {"ok": True, "help": str(shown)}, EXIT_OK
    except FlowaggError as exc:
        result, code = {"ok": False, "error": str(exc)}, exc.exit_code
    except Exception as exc:  # the JSON promise holds for the unforeseen too
        result, code = {"ok": False, "error": f"internal error: {exc!r}"}, EXIT_DAEMON_FAILURE
    try:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        sys.stdout.flush()
    except (OSError, AttributeError) as exc:  # stdout full, closed or missing
        _say(f"cannot write the reply to stdout ({exc}); {result.get('error') or 'ok'}")
        _quiet_exit()
        return EXIT_DAEMON_FAILURE
    if code and "error" in result:
        _say(result["error"])
    return code


def _say(message: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sys.stderr.write(f"provider-bridge: {message}\n")


def _quiet_exit() -> None:
    # Interpreter shutdown flushes stdout again and would print a traceback for the same error.
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


if __name__ == "__main__":
    sys.exit(main())
