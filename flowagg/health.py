"""Health snapshots (SPEC §7): the reference document's format plus `queue` and `latencyMs`.

`evaluate` is pure: figures in, status and human-readable issues out, so every threshold is
tested without a real disk filling up.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import orjson
import psutil

from .fsutil import atomic_write
from .layout import Layout

log = logging.getLogger("flowagg.health")

STALE_INTERVALS = 3
EXIT_BY_STATUS = {"healthy": 0, "degraded": 1, "critical": 2}
SEVERITY = {"healthy": "normal", "degraded": "warning", "critical": "critical"}


@dataclasses.dataclass(frozen=True)
class Figures:
    success_rate: float
    flush_p99_ms: float | None
    memory_percent: float
    disk_free_fraction: float
    abandoned_now: int
    abandoned_before: int
    stalled_error: str | None = None
    breaker_state: str | None = None


def evaluate(f: Figures) -> tuple[str, list[str]]:
    critical: list[str] = []
    degraded: list[str] = []
    if f.success_rate < 0.8:
        critical.append(f"batch write success rate {f.success_rate:.1%} is below 80%")
    elif f.success_rate < 0.9:
        degraded.append(f"batch write success rate {f.success_rate:.1%} is below 90%")
    if f.disk_free_fraction < 0.02:
        critical.append(f"disk nearly full: {f.disk_free_fraction:.1%} free (< 2%)")
    elif f.disk_free_fraction < 0.10:
        degraded.append(f"disk filling up: {f.disk_free_fraction:.1%} free (< 10%)")
    if f.abandoned_now > f.abandoned_before:
        critical.append(
            f"{f.abandoned_now - f.abandoned_before} batches abandoned since the last snapshot;"
            " inspect recovery/abandoned/ and run `flowagg recover --abandoned`"
        )
    if f.stalled_error:
        critical.append(f"batches cannot be stored anywhere: {f.stalled_error}")
    if f.flush_p99_ms is not None and f.flush_p99_ms > 500:
        degraded.append(f"flush p99 {f.flush_p99_ms:.0f} ms is over 500 ms")
    if f.breaker_state in ("open", "half-open"):
        degraded.append(f"sink circuit breaker is {f.breaker_state}: batches wait in recovery/")
    if f.memory_percent > 80:
        degraded.append(f"system memory {f.memory_percent:.0f}% used (> 80%)")
    status = "critical" if critical else "degraded" if degraded else "healthy"
    return status, critical + degraded


def system_figures(root: Path) -> dict[str, Any]:
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(str(root))
    rss = psutil.Process().memory_info().rss
    return {
        "memoryUsage": {"used": mem.total - mem.available, "total": mem.total},
        "memoryPercent": mem.percent,
        "processRss": rss,
        "diskSpace": {"available": disk.free, "total": disk.total},
    }


def write_snapshot(layout: Layout, snapshot: dict[str, Any]) -> Path:
    data = orjson.dumps(snapshot, option=orjson.OPT_INDENT_2)
    path = layout.health / f"health-{snapshot['timestamp']}.json"
    atomic_write(path, data)
    atomic_write(layout.health / "latest.json", data)
    return path


def read_latest(layout: Layout) -> dict[str, Any] | None:
    try:
        doc = orjson.loads((layout.health / "latest.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def is_stale(snapshot: dict[str, Any], now_ms: int) -> bool:
    interval = snapshot.get("intervalMs", 60_000)
    return now_ms - snapshot.get("timestamp", 0) > STALE_INTERVALS * interval
