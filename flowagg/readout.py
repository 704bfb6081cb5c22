"""How the read commands show things: rich tables and progress on a terminal, plain lines when
piped. `rich` is imported only here, inside the functions that draw, so the daemon and
`flowagg add` never load it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click


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
