"""The commands that drive the running daemon (SPEC §8): run it, add entries, and ask it
for its status, a flush, a reload or a recovery pass."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from flowagg.cli.client import add_entries
from flowagg.cli.support import (
    client_layout,
    daemon_request,
    emit,
    fail,
    get_config,
    handles_errors,
)
from flowagg.core.entries import EntryError, parse_entries_text
from flowagg.core.errors import EXIT_NOTHING_STORED, EXIT_USAGE, FlowaggError
from flowagg.core.humanize import hms, iso_ms


def _parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} must look like KEY=VALUE", param_hint="--set")
        out[key] = value
    return out


@click.command()
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a setting")
@click.option("--batch-size", type=int, help="entries per batch")
@click.option("--max-age-ms", type=int, help="oldest entry's wait before an age flush")
@click.pass_context
@handles_errors
def run(
    ctx: click.Context, sets: tuple[str, ...], batch_size: int | None, max_age_ms: int | None
) -> None:
    """Run the daemon in the foreground."""
    from flowagg.service.daemon import Daemon

    flags = _parse_sets(sets)
    if batch_size is not None:
        flags["batchSize"] = batch_size
    if max_age_ms is not None:
        flags["maxAgeMs"] = max_age_ms
    config = get_config(ctx, flags)
    sys.exit(Daemon(config, reload_config=lambda: get_config(ctx, flags)).run())


def _read_input(entries: tuple[str, ...], file: str | None) -> list[Any]:
    try:
        if entries:
            items: list[Any] = []
            for i, text in enumerate(entries, 1):
                try:
                    items.extend(parse_entries_text(text.encode()))
                except EntryError as exc:
                    raise EntryError(f"argument {i}: {exc}") from None
            return items
        if file and file != "-":
            try:
                data = Path(file).read_bytes()
            except OSError as exc:
                raise FlowaggError(
                    f"cannot read {file}: {exc.strerror}; nothing was stored", EXIT_NOTHING_STORED
                ) from None
        else:
            if sys.stdin.isatty() and not file:
                raise FlowaggError(
                    "no entries given: pass them as JSON arguments, with --file, or on stdin",
                    EXIT_NOTHING_STORED,
                )
            data = sys.stdin.buffer.read()
        return parse_entries_text(data)
    except EntryError as exc:
        raise FlowaggError(f"{exc}; nothing was stored", EXIT_NOTHING_STORED) from None


class _AddCommand(click.Command):
    """`add` exits 5 on a command-line mistake too: 2 would claim the valid entries were
    stored, and nothing was sent."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            exc.exit_code = EXIT_NOTHING_STORED
            raise


@click.command(cls=_AddCommand)
@click.argument("entries", nargs=-1)
@click.option("--file", "file", type=str, help="read entries from a file ('-' for stdin)")
@click.option("--spool", is_flag=True, help="write a spool file instead of using the socket")
@click.option("--spool-if-down", is_flag=True, help="spool when no daemon answers")
@click.option(
    "--retry-timeout",
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="seconds to keep retrying while the daemon answers busy or rate_limited",
)
@click.option("--json", "as_json", is_flag=True, help="print the reply as JSON")
@click.pass_context
@handles_errors
def add(
    ctx: click.Context,
    entries: tuple[str, ...],
    file: str | None,
    spool: bool,
    spool_if_down: bool,
    wait_s: float,
    as_json: bool,
) -> None:
    """Add entries (JSON object, array or JSON lines) from arguments, --file or stdin.

    \b
    One entry (timestamp in ms since the epoch; metadata and entryId optional):
      {"userId": "alice", "action": "code_edit", "timestamp": 1704067200000,
       "metadata": {"taskId": "T-42", "duration": 90000}, "entryId": "alice-7f3a"}

    Exit 2 with rejections: the valid entries WERE stored. Send only the rejected ones again;
    resending all stores the others twice unless each carries an entryId.
    Exit codes: 0 all stored, 1 daemon refused or still busy, 2 some rejected (the valid
    ones stored), 3 no daemon, 4 no access or disk full, 5 nothing stored (unusable input).
    """
    layout = client_layout(ctx)
    items = _read_input(entries, file)
    if not items:
        fail("no entries in the input; nothing was stored", EXIT_NOTHING_STORED)
    result = add_entries(layout, items, spool=spool, spool_if_down=spool_if_down, wait_s=wait_s)
    if not result.get("ok"):
        for r in result.get("rejected", []):
            click.echo(f"flowagg: {r['error']}", err=True)
        fail(result["error"], EXIT_NOTHING_STORED)

    def human(r: dict[str, Any]) -> str:
        if "spooled" in r:
            return f"spooled {r['spooled']} entries to {r['file']}"
        return (
            f"accepted {r['accepted']}, duplicates {r['duplicates']}, rejected {r['rejectedCount']}"
        )

    emit(result, as_json, human)
    if result.get("rejected"):
        for r in result["rejected"]:
            click.echo(f"flowagg: rejected {r['error']}", err=True)
        unlisted = result["rejectedCount"] - len(result["rejected"])
        if unlisted:
            click.echo(f"flowagg: ... and {unlisted} more rejected entries", err=True)
        sys.exit(EXIT_USAGE)


def _status_text(s: dict[str, Any]) -> str:
    b = s["buffered"]
    c = s["counters"]
    j = s["journal"]
    batches = ", ".join(f"{k} {v}" for k, v in sorted(c["batches"].items())) or "none"
    last = s["lastFlushAt"]
    lines = [
        f"flowagg {s['version']} pid {s['pid']} on {s['root']}, up {hms(s['uptimeS'])}",
        f"buffered: {b['entries']} entries ({b['bytes']} bytes), {b['inMemory']} in memory",
        f"accepted {c['accepted']}, duplicates {c['duplicates']}, rejected {c['rejected']},"
        f" busy {c['busy']}",
        f"batches: {batches}; last flush at {iso_ms(last) if last else 'never'}",
        f"journal: {j['entries']} entries in {j['syncs']} syncs, {j['segments']} segments",
        f"failed {s['failed']}, abandoned {s['abandoned']}, errors {s['errors']},"
        f" inbox {s['queue']['inbox']}",
    ]
    if s["sink"]:
        k = s["sink"]
        lines.append(
            f"sink {k['type']}: breaker {k['state']}, delivered {k['delivered']},"
            f" failures {k['failures']}, opened {k['timesOpened']} times"
            + (f", rows written {k['rowsWritten']}" if "rowsWritten" in k else "")
            + (f", lag {hms(k['lagMs'] / 1000)}" if k.get("lagMs") else "")
        )
        if k.get("lastError"):
            lines.append(f"sink last error: {k['lastError']}")
    reload = s.get("lastReload")
    if reload and reload["ok"]:
        changed = ", ".join(reload["changed"]) or "nothing changed"
        lines.append(f"last reload at {iso_ms(reload['at'])}: applied ({changed})")
    elif reload:
        lines.append(f"last reload at {iso_ms(reload['at'])}: REFUSED: {reload['error']}")
    if s["flusher"]["stalledError"]:
        lines.append(f"WARNING: batches cannot be stored: {s['flusher']['stalledError']}")
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the running daemon's counters and buffer."""
    reply = daemon_request(ctx, {"op": "status"})
    emit(reply, as_json, _status_text)


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def flush(ctx: click.Context, as_json: bool) -> None:
    """Write everything buffered to batch files now; exit 1 when a batch failed."""
    reply = daemon_request(ctx, {"op": "flush"})
    emit(reply, as_json, _flush_text)
    if reply.get("failedBatches"):
        sys.exit(1)


def _flush_text(r: dict[str, Any]) -> str:
    text = f"stored {r['storedEntries']} entries in {r['storedBatches']} batches"
    if r["failedBatches"]:
        text += (
            f"; {r['failedBatches']} batches ({r['failedEntries']} entries) failed and are kept"
            " in recovery/ (abandoned/ if refused for good): see logs/aggregation.log for why,"
            " then run `flowagg recover`"
        )
    return text


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def reload(ctx: click.Context, as_json: bool) -> None:
    """Make the daemon re-read its config (like SIGHUP); a bad config is refused."""
    reply = daemon_request(ctx, {"op": "reload"})

    def human(r: dict[str, Any]) -> str:
        text = f"reloaded; changed: {', '.join(r['changed']) or 'nothing'}"
        if r["needsRestart"]:
            text += f"; at the next start: {', '.join(r['needsRestart'])}"
        return text

    emit(reply, as_json, human)


@click.command()
@click.option("--abandoned", is_flag=True, help="put abandoned batches back into the retry queue")
@click.option("--batch", "batch_id", help="with --abandoned: only this batch id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def recover(ctx: click.Context, abandoned: bool, batch_id: str | None, as_json: bool) -> None:
    """Retry every failed batch now (and, with --abandoned, the abandoned ones)."""
    from flowagg.delivery.recovery_format import check_batch_id

    if batch_id and not abandoned:
        fail("--batch only applies with --abandoned", EXIT_USAGE)
    if batch_id:
        try:
            check_batch_id(batch_id)
        except ValueError as exc:
            fail(f"--batch: {exc}", EXIT_USAGE)
    payload: dict[str, Any] = {"op": "recover", "abandoned": abandoned}
    if batch_id:
        payload["batch"] = batch_id
    reply = daemon_request(ctx, payload)

    def human(r: dict[str, Any]) -> str:
        lines = []
        if "requeued" in r:
            lines.append(f"requeued {len(r['requeued'])} abandoned batches")
        lines.append(
            f"recovered {len(r['recovered'])}, failed again {len(r['failedAgain'])},"
            f" abandoned {len(r['abandoned'])}, quarantined {len(r['quarantined'])}"
        )
        lines += [f"  recovered {b}" for b in r["recovered"]]
        lines += [f"  abandoned {b}" for b in r["abandoned"]]
        if r["paused"]:
            paused = r["paused"]
            where = f" on {paused['folder']}" if paused["folder"] else ""
            lines.append(
                f"{r['waiting']} batches wait, no retry charged: {paused['cause']}{where}"
                f" ({paused['error']}); fix that, then run `flowagg recover` again"
            )
        if r["circuitOpen"]:
            lines.append(
                f"{r['waiting']} batches not tried: sink breaker open, next trial in"
                f" {r['breakerRetryInS']:g} s; run `flowagg recover` again then"
            )
        return "\n".join(lines)

    emit(reply, as_json, human)
    if reply["failedAgain"] or reply["abandoned"] or reply["circuitOpen"] or reply["paused"]:
        sys.exit(1)
