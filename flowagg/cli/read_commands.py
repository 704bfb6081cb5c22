"""The read commands of SPEC §8 that select entries or look at the daemon (export, report,
diagnostics, top). They work with or without a running daemon, never take its lock and never
change a file under the root."""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from flowagg.cli.support import client_layout, fail, get_config, handles_errors, require_root
from flowagg.core.clock import SystemClock
from flowagg.core.config_schema import SETTINGS
from flowagg.core.errors import EXIT_USAGE, ConfigError, DaemonError, NotRunningError
from flowagg.core.layout import Layout
from flowagg.read.export import FORMATS
from flowagg.read.readout import quiet_when_stdout_closes

if TYPE_CHECKING:
    from flowagg.read.selection import Selection, Skipped

# The modules behind each command are imported inside it: `flowagg add` loads this module too.


def _root_layout(ctx: click.Context) -> Layout:
    """The root alone: a mistake in the daemon's config file does not stop a reader."""
    layout = client_layout(ctx)
    require_root(layout)
    return layout


def _inflate_limit(ctx: click.Context) -> int:
    """The bound on a batch file's inflated size from the effective config, or from the
    defaults when the daemon's config file has a mistake (which must not stop a reader)."""
    from flowagg.read.batchread import inflate_limit

    try:
        values = get_config(ctx).values
    except ConfigError:
        values = {key: SETTINGS[key].default for key in ("maxBatchBytes", "maxEntryBytes")}
    return inflate_limit(values)


def _selection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--since", help="from this time on: 7d, 2024-01-31, ISO time, epoch ms"),
            click.option("--until", help="before this time (same forms as --since)"),
            click.option("--user", "users", multiple=True, help="only this userId (repeatable)"),
            click.option(
                "--action", "actions", multiple=True, help="only this action (repeatable)"
            ),
            click.option(
                "--include-failed",
                is_flag=True,
                help="also the batches in recovery/ and recovery/abandoned/",
            ),
        ]
    ):
        func = option(func)
    return func


def _selection(
    since: str | None, until: str | None, users: tuple[str, ...], actions: tuple[str, ...]
) -> Selection:
    from flowagg.read.selection import Selection, parse_when

    now = SystemClock().now_ms()
    return Selection(
        since_ms=parse_when(since, now_ms=now, option="--since") if since else None,
        until_ms=parse_when(until, now_ms=now, option="--until") if until else None,
        users=frozenset(users),
        actions=frozenset(actions),
    )


def _warn_skipped(skipped: Skipped) -> None:
    for copy in skipped.copies:
        click.echo(f"flowagg: {copy.line()}", err=True)
    for item in skipped.unreadable:
        click.echo(f"flowagg: skipped {item.file}: {item.reason}", err=True)
    if skipped.unreadable:
        click.echo(
            f"flowagg: {len(skipped.unreadable)} batch files could not be read, their entries"
            " are missing above; run `flowagg validate` for details",
            err=True,
        )


@click.command()
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="write here (atomically)")
@_selection_options
@click.pass_context
@handles_errors
def export(
    ctx: click.Context,
    fmt: str,
    output: str | None,
    since: str | None,
    until: str | None,
    users: tuple[str, ...],
    actions: tuple[str, ...],
    include_failed: bool,
) -> None:
    """Stored entries in timestamp order as JSON lines, CSV or Parquet (stdout or -o FILE).

    \b
    CSV: entryId, userId, action, timestamp (ms), time (ISO-8601 UTC), then up to 64
    metadata.<key> columns, the keys in the most entries (nested keys dotted, a dot in a
    key as \\.), the other keys as JSON in otherMetadata; a text cell starting with
    = + - @ TAB CR gets a leading '. Parquet (needs the parquet extra, and -o): entryId,
    userId, action, timestamp, sessionId, taskId, duration, metadata (JSON text).
    A batch stored twice (another suffix or folder) is read once; the copy not read is
    named on stderr. Exit 0, 1 when some batch files could not be read (named on stderr),
    2 usage.
    """
    from flowagg.read.batchread import inflate_limit, list_batch_files
    from flowagg.read.csv_export import MetadataColumns
    from flowagg.read.csv_rows import write_csv
    from flowagg.read.export import (
        Sorter,
        atomic_output,
        lines_of_batches,
        parquet_modules,
        write_jsonl,
        write_parquet,
    )
    from flowagg.read.readout import progress
    from flowagg.read.selection import Skipped, map_batches

    config = get_config(ctx)
    layout = Layout.for_config(config)
    require_root(layout)
    if fmt == "parquet":
        if not output:
            fail("--format parquet writes a binary file: give -o FILE", EXIT_USAGE)
        parquet_modules()
    if output and not Path(output).absolute().parent.is_dir():
        fail(f"-o {output}: its folder does not exist; create it or pick another", EXIT_USAGE)
    selection = _selection(since, until, users, actions)
    files = list_batch_files(layout, include_failed=include_failed)
    skipped = Skipped()
    with tempfile.TemporaryDirectory(prefix="flowagg-export-") as tmp:
        sorter = Sorter(config.values["exportRunEntries"], Path(tmp))
        metadata = sorter.metadata = MetadataColumns() if fmt == "csv" else None
        with progress(len(files), "reading") as advance:
            limit = inflate_limit(config.values)
            work = functools.partial(lines_of_batches, (selection, limit, fmt == "csv"))
            for share in map_batches(work, files, skipped, on_file=advance):
                sorter.add(share)
        code = 1 if skipped.unreadable or sorter.skipped else 0

        def write(out: Any) -> None:
            if metadata is not None:
                write_csv(sorter.blocks(), out, metadata)
            elif fmt == "jsonl":
                write_jsonl(sorter.sorted(), out)
            else:
                write_parquet(sorter.sorted(), out)

        if output:
            with atomic_output(Path(output)) as fh:
                write(fh)
        else:
            with quiet_when_stdout_closes(lambda: code):
                write(sys.stdout.buffer)
    _warn_skipped(skipped)
    if sorter.skipped:
        click.echo(
            f"flowagg: {sorter.skipped} entries without an integer timestamp were left out;"
            " run `flowagg validate` to find them",
            err=True,
        )
    if output:
        click.echo(f"exported {sorter.count:,} entries to {output}", err=True)
    sys.exit(code)


@click.command()
@click.option(
    "--by", "by_text", default="user", show_default=True, help="user, action, task, day or a list"
)
@click.option("--top", type=click.IntRange(min=1), help="only the N largest groups")
@click.option("--json", "as_json", is_flag=True)
@_selection_options
@click.pass_context
@handles_errors
def report(
    ctx: click.Context,
    by_text: str,
    top: int | None,
    as_json: bool,
    since: str | None,
    until: str | None,
    users: tuple[str, ...],
    actions: tuple[str, ...],
    include_failed: bool,
) -> None:
    """Entry counts and summed metadata.duration per group, longest first.

    \b
    --by user|action|task|day, or several comma-separated (--by user,day).
    Durations are ms in --json, h:mm:ss in the table. A batch stored twice (another suffix
    or folder) is counted once; the copy not read is named on stderr (copiesNotCounted in
    --json). Exit 0, 1 when some batch files could not be read (named on stderr), 2 usage.
    """
    from flowagg.read.batchread import list_batch_files
    from flowagg.read.readout import progress, report_output
    from flowagg.read.report import SHARE_BATCHES, Totals, parse_by, totals_of_batches
    from flowagg.read.selection import Skipped, map_batches

    try:
        by = parse_by(by_text)
    except ValueError as exc:
        fail(f"--by {exc}", EXIT_USAGE)
    layout = _root_layout(ctx)
    selection = _selection(since, until, users, actions)
    files = list_batch_files(layout, include_failed=include_failed)
    skipped = Skipped()
    limit = _inflate_limit(ctx)
    with progress(len(files), "reading") as advance:
        result = Totals(by, {})
        work = functools.partial(totals_of_batches, (by, selection, limit))
        shares = map_batches(work, files, skipped, on_file=advance, most=SHARE_BATCHES)
        for share in shares:
            result.merge(share)
    code = 1 if skipped.unreadable else 0
    with quiet_when_stdout_closes(lambda: code):
        report_output(result, top, as_json, skipped)
    _warn_skipped(skipped)
    sys.exit(code)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def diagnostics(ctx: click.Context, as_json: bool) -> None:
    """One page for slow processing: latencies, batch success, retries, breaker, queues,
    oldest pending entry, disk use per folder, journal, recent log errors.

    Live from the daemon when it runs, from the files otherwise. Exit 0, 2 no such root.
    """
    from flowagg.read.diagnostics import gather
    from flowagg.read.readout import diagnostics_text

    layout = _root_layout(ctx)
    doc = gather(layout, SystemClock().now_ms(), _live(layout))
    with quiet_when_stdout_closes(lambda: 0):
        if as_json:
            click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        else:
            click.echo(diagnostics_text(doc))


@click.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="seconds between refreshes",
)
@click.pass_context
@handles_errors
def top(ctx: click.Context, interval: float) -> None:
    """A live view of the running daemon: rates, buffer, latencies, queues, breaker, health.

    Press q to quit. When stdout is not a terminal, prints one frame and exits.
    Exit 0, 3 no daemon runs.
    """
    from flowagg.cli.top import live, one_frame

    layout = client_layout(ctx)
    if sys.stdout.isatty():
        live(layout, interval)
    else:
        click.echo(one_frame(layout, interval))


def _live(layout: Layout) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The running daemon's status and health replies, or None when none answers."""
    from flowagg.cli.client import Client

    try:
        with Client(layout.socket, timeout=10) as client:
            status = client.request({"op": "status"})
            health = client.request({"op": "health"})
    except (NotRunningError, DaemonError):
        return None
    if not status.get("ok") or not health.get("ok"):
        return None
    return status, health
