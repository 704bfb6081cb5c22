"""How the read commands show things: rich tables and progress on a terminal, plain lines when
piped. `rich` is imported only here, inside the functions that draw, so the daemon and
`flowagg add` never load it."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import click
import orjson

from flowagg.core.humanize import utc_moment

if TYPE_CHECKING:
    from flowagg.read.report import Totals
    from flowagg.read.selection import Skipped


def hms(ms: int) -> str:
    """Milliseconds as h:mm:ss (hours grow past 24: a report sums many days)."""
    seconds = ms // 1000
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], *, right: set[int]
) -> None:
    """`right` holds the indexes of numeric columns (aligned right)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, title_justify="left")
        for i, header in enumerate(headers):
            t.add_column(header, justify="right" if i in right else "left")
        for row in rows:
            t.add_row(*(str(v) for v in row))
        Console().print(t)
        return
    cells = [[str(h) for h in headers], *[[str(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    click.echo(title)
    for r in cells:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(r)
        ]
        click.echo("  ".join(parts).rstrip())


@contextlib.contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[], None]]:
    """Yields `advance()`: one step done. A bar on stderr only when stderr is a terminal."""
    if not sys.stderr.isatty() or total == 0:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        steps = 0

        def advance() -> None:
            nonlocal steps
            steps += 1
            if steps % 64 == 0 or steps == total:  # redrawing per file would cost more than it
                bar.update(task, completed=steps)

        yield advance


def size(count: int | None) -> str:
    if count is None:
        return "unknown"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def iso(ms: object) -> str:
    """A time from a file read back (a health snapshot may be damaged): "unknown" unless it
    is a number of milliseconds a date can show."""
    if not isinstance(ms, int | float) or isinstance(ms, bool):
        return "unknown"
    when = utc_moment(ms / 1000)
    return "unknown" if when is None else when.isoformat(timespec="seconds")


def ms_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def age(ms: int | None) -> str:
    if ms is None:
        return "-"
    days, rest = divmod(ms, 86_400_000)
    return f"{days} d {hms(rest)}" if days >= 2 else hms(ms)


def diagnostics_text(d: dict[str, Any]) -> str:
    lines: list[str] = []
    if d["source"] == "daemon":
        daemon = d["daemon"]
        lines.append(
            f"flowagg on {d['root']} at {iso(d['at'])}: daemon pid {daemon['pid']}, up"
            f" {hms(int(daemon['uptimeS'] * 1000))}, RSS {size(daemon.get('rss'))} (live)"
        )
    else:
        lines.append(f"flowagg on {d['root']} at {iso(d['at'])}: no daemon runs (from the files)")
    health = d["health"]
    if health is None:
        lines.append("health: no snapshot")
    else:
        when = f" (snapshot of {iso(health['snapshotAt'])})" if "snapshotAt" in health else ""
        lines.append(f"health: {health['status']}{when}")
        lines += [f"  ! {issue}" for issue in health["issues"]]
    lat = d["latencyMs"] or {}
    lines.append(
        "add latency: " + ", ".join(f"p{q} {ms_text(lat.get(f'addP{q}'))}" for q in (50, 95, 99))
    )
    lines.append(
        "flush latency: "
        + ", ".join(f"p{q} {ms_text(lat.get(f'flushP{q}'))}" for q in (50, 95, 99))
    )
    b = d["batches"]
    rate = b["successRate"]
    written = b["written"]
    lines.append(
        f"batches: success rate {'-' if rate is None else f'{rate:.1%}'}, retries"
        f" {'-' if b['retries'] is None else b['retries']}"
        + (f", written {sum(written.values())} ({_by_trigger(written)})" if written else "")
    )
    sink = d["sink"]
    lines.append(
        "sink: none"
        if not sink
        else f"sink {sink.get('type')}: breaker {sink.get('state')}, failures"
        f" {sink.get('failures')}, opened {sink.get('timesOpened')} times"
    )
    q = d["queue"]
    lines.append(
        f"queue: buffered {q.get('buffered')}, failed {q.get('failed')}, abandoned"
        f" {q.get('abandoned')}, errors {q.get('errors')}, inbox {q.get('inbox')}"
    )
    oldest = d["oldestPendingEntry"]
    failed = d["oldestFailedBatch"]
    lines.append(
        f"oldest pending entry: {'none' if oldest is None else age(oldest['ageMs']) + ' old'};"
        f" oldest failed batch: "
        + ("none" if failed is None else f"{failed['batchId']}, {age(failed['ageMs'])} old")
    )
    j = d["journal"]
    lines.append(
        f"journal: {size(j['bytes'])} in {j['segments']} segments, stored up to seq"
        f" {j['doneSeq']}, {j['waitingEntries']} entries waiting"
    )
    if j["skipped"]:
        lines.append(f"journal: not read, not regular files: {', '.join(j['skipped'])}")
    free = d["diskFree"]
    if free:
        lines.append(f"disk: {size(free['available'])} free of {size(free['total'])}")
    for name, use in d["disk"].items():
        lines.append(f"  {name + '/':<20} {size(use['bytes']):>10} in {use['files']} files")
    lines.append("recent errors:" if d["recentErrors"] else "recent errors: none in the logs")
    lines += [f"  {line}" for line in d["recentErrors"]]
    return "\n".join(lines)


def _by_trigger(written: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(written.items()))


@contextlib.contextmanager
def quiet_when_stdout_closes(code_so_far: Callable[[], int]) -> Iterator[None]:
    """A reader that stopped early (`| head`) ends the command at once, without a word,
    with the exit code it has so far: not an error of the data root."""
    try:
        try:
            yield
        finally:
            sys.stdout.flush()  # a pipe closed late shows here, not at the interpreter's exit
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at nothing, so that stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(code_so_far())


def report_output(result: Totals, top: int | None, as_json: bool, skipped: Skipped) -> None:
    """`flowagg report`'s answer: a table, or JSON with the files it did not count."""
    by = result.by
    if as_json:
        doc = result.as_dict(top) | {
            "unreadableFiles": [u.file for u in skipped.unreadable],
            "copiesNotCounted": [
                {"file": c.file, "batchId": c.batch_id, "readFrom": c.read_from}
                for c in skipped.copies
            ],
        }
        click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    else:
        rows = [[*key, f"{g.entries:,}", hms(g.duration_ms)] for key, g in result.ranked(top)]
        rows.append(
            ["total", *[""] * (len(by) - 1), f"{result.entries:,}", hms(result.duration_ms)]
        )
        shown = f"top {top} of {len(result.groups):,}" if top else f"{len(result.groups):,}"
        table(
            f"time by {', '.join(by)} ({shown} groups)",
            [*by, "entries", "duration"],
            rows,
            right={len(by), len(by) + 1},
        )
