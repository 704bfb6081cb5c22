"""The `flowagg` command line (SPEC §8). Every user error is one line and a distinct exit code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .cli_observe import metrics
from .cli_support import client_layout, emit, fail, handles_errors
from .client import add_entries
from .clock import SystemClock
from .config import Config, check_config, config_warnings, load_config
from .entries import EntryError, parse_entries_text
from .errors import (
    EXIT_NOTHING_STORED,
    EXIT_USAGE,
    DaemonError,
    FlowaggError,
    NotRunningError,
)
from .humanize import hms, iso_ms
from .layout import Layout


def get_config(ctx: click.Context, extra: dict[str, Any] | None = None) -> Config:
    flags = {"root": ctx.obj["root"], **(extra or {})}
    return load_config(flags=flags, config_path=ctx.obj["config"])


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


def _parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} must look like KEY=VALUE", param_hint="--set")
        out[key] = value
    return out


@main.command()
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a setting")
@click.option("--batch-size", type=int, help="entries per batch")
@click.option("--max-age-ms", type=int, help="oldest entry's wait before an age flush")
@click.pass_context
@handles_errors
def run(
    ctx: click.Context, sets: tuple[str, ...], batch_size: int | None, max_age_ms: int | None
) -> None:
    """Run the daemon in the foreground."""
    from .daemon import Daemon

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


@main.command(cls=_AddCommand)
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


def _daemon_request(ctx: click.Context, payload: dict[str, Any]) -> dict[str, Any]:
    from .client import request

    reply = request(client_layout(ctx), payload)
    if not reply.get("ok"):
        raise DaemonError(f"the daemon answered: {reply.get('error')}")
    return reply


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


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the running daemon's counters and buffer."""
    reply = _daemon_request(ctx, {"op": "status"})
    emit(reply, as_json, _status_text)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def flush(ctx: click.Context, as_json: bool) -> None:
    """Write everything buffered to batch files now; exit 1 when a batch failed."""
    reply = _daemon_request(ctx, {"op": "flush"})
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


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def reload(ctx: click.Context, as_json: bool) -> None:
    """Make the daemon re-read its config (like SIGHUP); a bad config is refused."""
    reply = _daemon_request(ctx, {"op": "reload"})

    def human(r: dict[str, Any]) -> str:
        text = f"reloaded; changed: {', '.join(r['changed']) or 'nothing'}"
        if r["needsRestart"]:
            text += f"; at the next start: {', '.join(r['needsRestart'])}"
        return text

    emit(reply, as_json, human)


@main.command("config")
@click.option("--json", "as_json", is_flag=True)
@click.option("--check", "check_file", type=click.Path(), help="validate a config file and exit")
@click.option(
    "--with-env", is_flag=True, help="with --check: let FLOWAGG_* variables override the file"
)
@click.option("--running", is_flag=True, help="the running daemon's settings (asks it)")
@click.pass_context
@handles_errors
def config_cmd(
    ctx: click.Context, as_json: bool, check_file: str | None, with_env: bool, running: bool
) -> None:
    """Print the effective configuration and where each value came from."""
    from .ops import config_report

    if check_file:
        # The file alone, unless asked: a FLOWAGG_* variable in this shell would hide a
        # mistake the daemon's environment does not.
        environ = None if with_env else {}
        checked, errors = check_config(
            flags={"root": ctx.obj["root"]}, config_path=check_file, environ=environ
        )
        for error in errors:
            click.echo(f"flowagg: {error}", err=True)
        if errors:
            sys.exit(EXIT_USAGE)
        assert checked is not None
        for warning in config_warnings(checked):
            click.echo(f"flowagg: warning: {warning}", err=True)
        click.echo(f"{check_file}: ok")
        return
    if running:
        data = _daemon_request(ctx, {"op": "config"})
        data.pop("ok", None)
    else:
        config = get_config(ctx)
        for warning in config_warnings(config):
            click.echo(f"flowagg: warning: {warning}", err=True)
        data = config_report(config)

    def human(d: dict[str, Any]) -> str:
        width = max(len(k) for k in d["settings"])
        rows = [f"# config file: {d['configFile'] or 'none'}"]
        for key, item in d["settings"].items():
            shown = _shown(item["value"])
            if "atRestart" in item:
                later = item["atRestart"]
                says = "the file" if later["source"].startswith("file ") else later["source"]
                shown = (
                    f"{shown} (running; {says} says {_shown(later['value'])}, applied at restart)"
                )
            rows.append(f"{key:<{width}}  {shown:<14}  {item['source']}")
        return "\n".join(rows)

    emit(data, as_json, human)


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


@main.command()
@click.option("--abandoned", is_flag=True, help="put abandoned batches back into the retry queue")
@click.option("--batch", "batch_id", help="with --abandoned: only this batch id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def recover(ctx: click.Context, abandoned: bool, batch_id: str | None, as_json: bool) -> None:
    """Retry every failed batch now (and, with --abandoned, the abandoned ones)."""
    from .recovery_format import check_batch_id

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
    reply = _daemon_request(ctx, payload)

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


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def health(ctx: click.Context, as_json: bool) -> None:
    """Show health; exit 0 healthy, 1 degraded, 2 critical, 3 no daemon and no fresh snapshot.

    A running daemon answers with a live snapshot (so a disk too full to write one still
    shows); without one, health/latest.json is read.
    """
    from .client import request
    from .health import EXIT_BY_STATUS, is_stale, read_latest, running_pid

    layout = client_layout(ctx)
    try:
        live = request(layout, {"op": "health"}, timeout=10)
    except (NotRunningError, DaemonError):
        live = None
    snapshot = {k: v for k, v in live.items() if k != "ok"} if live and live.get("ok") else None
    if snapshot is None:
        snapshot = read_latest(layout)
        # A snapshot outlives its daemon: trust it only while one runs on this root.
        alive = running_pid(layout) is not None
        if snapshot is not None and (not alive or not _is_running(snapshot)):
            raise NotRunningError(
                f"flowagg is not running on {layout.root} (last snapshot at"
                f" {iso_ms(snapshot.get('timestamp'))}); start it with `flowagg run`"
            )
    if snapshot is None:
        raise NotRunningError(
            f"no health snapshot in {layout.health}; start the daemon with `flowagg run`"
        )
    now = SystemClock().now_ms()
    if live is None and is_stale(snapshot, now):
        age_s = (now - snapshot.get("timestamp", 0)) / 1000
        raise NotRunningError(
            f"the last health snapshot is {hms(age_s)} old (more than 3 intervals);"
            " the daemon is not running or is stuck: check `flowagg status`"
        )

    def human(s: dict[str, Any]) -> str:
        q = s["queue"]
        sys_h = s["systemHealth"]
        disk = sys_h["diskSpace"]
        agg = s["aggregatorHealth"]
        lines = [
            f"status: {_status_word(s)} at {iso_ms(s['timestamp'])}",
            *[f"  ! {issue}" for issue in s["issues"]],
            f"queue: buffered {q['buffered']}, failed {q['failed']}, abandoned {q['abandoned']},"
            f" errors {q['errors']}, inbox {q['inbox']}",
            f"batches: {agg['totalOperations']}, success rate {agg['successRate']:.1%},"
            f" retries {agg['retryCount']}",
            f"disk: {_size(disk['available'])} free of {_size(disk['total'])};"
            f" daemon RSS {_size(sys_h['processRss'])}",
        ]
        return "\n".join(lines)

    emit(snapshot, as_json, human)
    sys.exit(EXIT_BY_STATUS.get(snapshot.get("status", ""), 2))


def _status_word(snapshot: dict[str, Any]) -> str:
    status, severity = snapshot.get("status"), snapshot.get("severity")
    return f"{status}" if severity in (None, status) else f"{status} ({severity})"


def _size(count: Any) -> str:
    """Bytes in the unit that keeps a small disk readable (0.5 MiB, not 0.0 GiB)."""
    if not isinstance(count, int | float):
        return "unknown"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} bytes"


def _is_running(snapshot: dict[str, Any]) -> bool:
    daemon = snapshot.get("daemonHealth")
    return not isinstance(daemon, dict) or daemon.get("isRunning") is not False


@main.command()
@click.option("--age", "age", help="remove snapshots and rotated logs older than this (e.g. 7d)")
@click.option("--dry-run", is_flag=True, help="only list what would be removed")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def cleanup(ctx: click.Context, age: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove old health snapshots, rotated logs, stale temp files (never abandoned/errors)."""
    from .cleanup import apply_cleanup, audit_cleanup, plan_cleanup
    from .durations import parse_duration_ms

    config = get_config(ctx)
    layout = Layout.for_config(config)
    age_ms = parse_duration_ms(age) if age else config.cleanup_age_ms
    plan = plan_cleanup(
        layout,
        SystemClock().now_ms(),
        age_ms=age_ms,
        retain_batches_ms=config.retain_batches_ms,
    )
    freed = 0 if dry_run else apply_cleanup(plan)
    if plan and not dry_run:
        audit_cleanup(layout, plan, freed)
    result = {
        "ok": True,
        "dryRun": dry_run,
        "removed": [{"path": str(r.path), "bytes": r.size, "why": r.why} for r in plan],
        "bytesFreed": freed if not dry_run else sum(r.size for r in plan),
    }

    def human(r: dict[str, Any]) -> str:
        verb = "would remove" if dry_run else "removed"
        lines = [
            f"{verb} {item['path']} ({item['bytes']} bytes, {item['why']})" for item in r["removed"]
        ]
        lines.append(f"{verb} {len(r['removed'])} files, {r['bytesFreed']} bytes")
        return "\n".join(lines)

    emit(result, as_json, human)


main.add_command(metrics)
from . import cli_read  # noqa: E402, F401  (registers the read commands on main)
from .cli_sink import sink  # noqa: E402 -- commands of their own module, on this group

main.add_command(sink)
