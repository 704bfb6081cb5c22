"""`flowagg top`: a live view of a running daemon, refreshed every second; `q` quits.

Rates are differences of the daemon's counters between two `status` answers over the time
between them, so the view costs the daemon two socket requests a second. When stdout is not
a terminal it prints one plain frame (two samples, one interval apart) and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import sys
import time
from collections.abc import Iterator
from typing import Any

from flowagg.cli.client import Client
from flowagg.core.errors import DaemonError, NotRunningError
from flowagg.core.humanize import hms
from flowagg.core.layout import Layout

INTERVAL_S = 1.0


@dataclasses.dataclass
class Sample:
    at: float  # monotonic seconds
    status: dict[str, Any]
    health: dict[str, Any]


class Poller:
    """One connection to the daemon, opened again after it goes away."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.client: Client | None = None

    def sample(self) -> Sample:
        if self.client is None:
            self.client = Client(self.layout.socket, timeout=5)
        try:
            status = self.client.request({"op": "status"})
            health = self.client.request({"op": "health"})
        except DaemonError:
            self.close()
            raise
        if not status.get("ok"):
            raise DaemonError(f"the daemon answered: {status.get('error')}")
        return Sample(time.monotonic(), status, health if health.get("ok") else {})

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _rate(now: Sample, before: Sample | None, pick: Any) -> float | None:
    if before is None or now.at <= before.at:
        return None
    return max(0.0, (pick(now.status) - pick(before.status)) / (now.at - before.at))


def frame(now: Sample, before: Sample | None) -> list[tuple[str, str]]:
    """The rows of one frame: (label, value)."""
    s = now.status
    c = s["counters"]
    lat = s["latencyMs"]
    sink = s.get("sink")
    health = now.health

    def rate(pick: Any) -> str:
        value = _rate(now, before, pick)
        return "-" if value is None else f"{value:,.0f}/s"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} ms"

    issues = health.get("issues") or []
    return [
        ("daemon", f"pid {s['pid']} on {s['root']}, up {hms(s['uptimeS'])}"),
        ("accepted", f"{rate(lambda st: st['counters']['accepted'])}  (total {c['accepted']:,})"),
        (
            "stored",
            f"{rate(lambda st: st['counters'].get('storedEntries', 0))}"
            f"  (total {c.get('storedEntries', 0):,})",
        ),
        ("buffer", f"{s['buffered']['entries']:,} entries, {s['buffered']['bytes']:,} bytes"),
        ("journal syncs", f"{rate(lambda st: st['journal']['syncs'])}"),
        ("add latency", f"p50 {ms(lat.get('addP50'))}, p99 {ms(lat.get('addP99'))}"),
        ("flush latency", f"p99 {ms(lat.get('flushP99'))}"),
        ("failed", f"{s['failed']:,}"),
        ("abandoned", f"{s['abandoned']:,}"),
        ("breaker", "no sink" if not sink else f"{sink['state']} ({sink['type']} sink)"),
        (
            "health",
            f"{health.get('status', 'unknown')}" + (f": {'; '.join(issues)}" if issues else ""),
        ),
    ]


def plain(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def one_frame(layout: Layout, interval_s: float = INTERVAL_S) -> str:
    poller = Poller(layout)
    try:
        first = poller.sample()
        time.sleep(interval_s)
        return plain(frame(poller.sample(), first))
    finally:
        poller.close()


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode (keys arrive unbuffered, unechoed); yields its fd, or None."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(fd: int | None, deadline: float) -> bool:
    """Sleep until `deadline`; True when `q` (or Q, or ^D's EOF) was pressed meanwhile."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            key = os.read(fd, 32)
            if not key or b"q" in key.lower():
                return True


def live(layout: Layout, interval_s: float = INTERVAL_S) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    poller = Poller(layout)
    poller.sample()  # no daemon: NotRunningError before the screen is taken
    before: Sample | None = None

    def view() -> Any:
        nonlocal before
        table = Table(title="flowagg top", title_justify="left", show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        try:
            now = poller.sample()
        except (NotRunningError, DaemonError) as exc:
            table.add_row("daemon", Text(f"not answering: {exc}", style="red"))
            before = None
        else:
            for label, value in frame(now, before):
                table.add_row(label, value)
            before = now
        return Group(table, Text("q quits", style="dim"))

    try:
        with _keys() as fd, Live(view(), screen=True, auto_refresh=False) as screen:
            next_at = time.monotonic() + interval_s
            while not _wait_for_quit(fd, next_at):
                screen.update(view(), refresh=True)
                next_at += interval_s
                next_at = max(next_at, time.monotonic())
    except KeyboardInterrupt:
        pass
    finally:
        poller.close()
