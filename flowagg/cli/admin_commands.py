"""The operator's commands that also work without a daemon (SPEC §8): the effective
config, health (live or from the last snapshot) and cleanup of old files."""

from __future__ import annotations

import sys
from typing import Any

import click

from flowagg.cli.support import client_layout, daemon_request, emit, get_config, handles_errors
from flowagg.core.clock import SystemClock
from flowagg.core.config import check_config, config_warnings
from flowagg.core.errors import EXIT_USAGE, DaemonError, NotRunningError
from flowagg.core.humanize import hms, iso_ms
from flowagg.core.layout import Layout


@click.command("config")
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
    from flowagg.service.ops import config_report

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
        data = daemon_request(ctx, {"op": "config"})
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


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def health(ctx: click.Context, as_json: bool) -> None:
    """Show health; exit 0 healthy, 1 degraded, 2 critical, 3 no daemon and no fresh snapshot.

    A running daemon answers with a live snapshot (so a disk too full to write one still
    shows); without one, health/latest.json is read.
    """
    from flowagg.cli.client import request
    from flowagg.service.health import EXIT_BY_STATUS, is_stale, read_latest, running_pid

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


@click.command()
@click.option("--age", "age", help="remove snapshots and rotated logs older than this (e.g. 7d)")
@click.option("--dry-run", is_flag=True, help="only list what would be removed")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handles_errors
def cleanup(ctx: click.Context, age: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove old health snapshots, rotated logs, stale temp files (never abandoned/errors)."""
    from flowagg.core.durations import parse_duration_ms
    from flowagg.service.cleanup import apply_cleanup, audit_cleanup, plan_cleanup

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
