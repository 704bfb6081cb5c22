"""Health snapshots (SPEC §7): the reference document's format plus `queue` and `latencyMs`.

`evaluate` is pure: figures in, status and human-readable issues out, so every threshold is
tested without a real disk filling up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import psutil

from flowagg.core import formats
from flowagg.core.fsutil import atomic_write
from flowagg.core.layout import Layout
from flowagg.service.daemon_lock import read_pid_file

log = logging.getLogger("flowagg.health")

STALE_INTERVALS = 3
HEALTH_FORMAT_VERSION = formats.HEALTH
EXIT_BY_STATUS = {"healthy": 0, "degraded": 1, "critical": 2}
SEVERITY = {"healthy": "normal", "degraded": "warning", "critical": "critical", "stopped": "info"}


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
    sink_error: str | None = None
    # Entries the sink refused one by one, waiting in recovery/refused/; entryIds it held
    # with other content since start (SPEC §6a).
    sink_refused: int = 0
    sink_collisions: int = 0
    thread_issues: tuple[str, ...] = ()
    # The folder whose file system has the least free space (disk_free_fraction is its).
    disk_folder: str | None = None
    # The recovery loop's pause (pause.py): what stops every batch, charged to none.
    paused: dict[str, Any] | None = None


class SuccessWindow:
    """Where the success rate health reports starts: `intervals` health intervals back, but
    never before the failed queue was last seen empty. Failures that have all been recovered
    since are history: a short sink outage must not hold health at critical for the window."""

    def __init__(self, intervals: int) -> None:
        self.intervals = intervals
        self._drained_at: float | None = None

    def since(self, now: float, *, interval_s: float, failed_queued: int) -> float:
        if failed_queued == 0:
            self._drained_at = now
        start = now - self.intervals * interval_s
        return start if self._drained_at is None else max(start, self._drained_at)


def evaluate(f: Figures) -> tuple[str, list[str]]:
    critical: list[str] = []
    degraded: list[str] = []
    sink_down = f.breaker_state in ("open", "half-open")
    if f.success_rate < 0.8 and not sink_down:
        critical.append(f"batch write success rate {f.success_rate:.1%} is below 80%")
    elif f.success_rate < 0.8:
        # The breaker parks batches by design while the sink is down; they wait, unlost.
        degraded.append(
            f"batch write success rate {f.success_rate:.1%} is below 80% while the sink is down"
        )
    elif f.success_rate < 0.9:
        degraded.append(f"batch write success rate {f.success_rate:.1%} is below 90%")
    on = f" on {f.disk_folder}" if f.disk_folder else ""
    if f.disk_free_fraction < 0.02:
        critical.append(f"disk nearly full: {f.disk_free_fraction:.1%} free{on} (< 2%)")
    elif f.disk_free_fraction < 0.10:
        degraded.append(f"disk filling up: {f.disk_free_fraction:.1%} free{on} (< 10%)")
    if f.paused is not None:
        _paused_issue(f.paused, critical if f.paused["folder"] else degraded)
    if f.abandoned_now > f.abandoned_before:
        critical.append(
            f"{f.abandoned_now - f.abandoned_before} batches abandoned since the last snapshot;"
            " inspect recovery/abandoned/ and run `flowagg recover --abandoned`"
            + (f"; the sink's last error: {f.sink_error}" if f.sink_error else "")
        )
    if f.stalled_error:
        critical.append(f"batches cannot be stored anywhere: {f.stalled_error}")
    critical.extend(f.thread_issues)
    if f.flush_p99_ms is not None and f.flush_p99_ms > 500:
        degraded.append(f"flush p99 {f.flush_p99_ms:.0f} ms is over 500 ms")
    if f.breaker_state in ("open", "half-open"):
        degraded.append(
            f"sink circuit breaker is {f.breaker_state}: batches wait in recovery/"
            + (f" (last error: {f.sink_error})" if f.sink_error else "")
        )
    if f.sink_refused:
        degraded.append(
            f"the sink refused {f.sink_refused} entries one by one (their batch-mates were"
            " delivered); each waits with its reason in recovery/refused/"
        )
    if f.sink_collisions:
        degraded.append(
            f"{f.sink_collisions} entryIds reached the sink with other content than it held"
            " (two clients used one id); both are kept: see the sink's collisions table"
        )
    if f.memory_percent > 80:
        degraded.append(f"system memory {f.memory_percent:.0f}% used (> 80%)")
    status = "critical" if critical else "degraded" if degraded else "healthy"
    return status, critical + degraded


def _paused_issue(paused: dict[str, Any], issues: list[str]) -> None:
    """A folder that refuses writes stops every batch (critical); a sink that is down leaves
    batches waiting, unlost (degraded, like an open breaker)."""
    if paused["folder"]:
        fix = (
            "free space on its file system"
            if paused["cause"] in ("ENOSPC", "EDQUOT")
            else "make it writable for the daemon's user"
        )
        cause = f"{paused['cause']} on {paused['folder']}"
    else:
        fix, cause = "bring the sink back", paused["cause"]
    issues.append(
        f"recovery paused: {cause} ({paused['error']}); batches wait in recovery/ without"
        f" using up retries; {fix}"
    )


@dataclasses.dataclass(frozen=True)
class DaemonFacts:
    """What the daemon knows about itself for one snapshot (`status` is `Daemon.status()`)."""

    status: dict[str, Any]
    interval_ms: int
    success_rate: float
    flush_latency_s: Sequence[float]
    retry_count: int
    scheduled_tasks: int
    health_checks: int
    cleanup_runs: int
    thread_issues: tuple[str, ...] = ()
    running: bool = True


def build_snapshot(
    facts: DaemonFacts, *, now_ms: int, system: dict[str, Any], abandoned_before: int
) -> dict[str, Any]:
    """The snapshot of SPEC §7. A stopped daemon's last one says so: `isRunning` false."""
    st = facts.status
    disk_folder, disk_free = _least_free(system)
    paused = st["recovery"].get("paused")
    figures = Figures(
        success_rate=facts.success_rate,
        flush_p99_ms=st["latencyMs"]["flushP99"],
        memory_percent=system["memoryPercent"],
        disk_free_fraction=disk_free,
        disk_folder=disk_folder,
        paused=paused,
        abandoned_now=st["queue"]["abandoned"],
        abandoned_before=abandoned_before,
        stalled_error=st["flusher"]["stalledError"],
        breaker_state=st["sink"]["state"] if st["sink"] else None,
        sink_error=st["sink"].get("lastError") if st["sink"] else None,
        sink_refused=st["sink"].get("refusedWaiting", 0) if st["sink"] else 0,
        sink_collisions=st["sink"].get("collisions", 0) if st["sink"] else 0,
        thread_issues=facts.thread_issues,
    )
    status, issues = evaluate(figures)
    if not facts.running:
        status = "critical" if facts.thread_issues else "stopped"
    flush_ms = [s * 1000 for s in facts.flush_latency_s]
    return {
        "formatVersion": HEALTH_FORMAT_VERSION,
        "timestamp": now_ms,
        "status": status,
        "severity": SEVERITY[status],
        "issues": issues,
        "intervalMs": facts.interval_ms,
        "daemonHealth": {
            "uptime": int(st["uptimeS"] * 1000),
            "isRunning": facts.running,
            "pid": st["pid"],
            "scheduledTasksExecuted": facts.scheduled_tasks,
            "healthChecksPerformed": facts.health_checks,
            "cleanupOperations": facts.cleanup_runs,
        },
        "aggregatorHealth": {
            "totalOperations": sum(st["counters"]["batches"].values()),
            "successRate": round(facts.success_rate, 4),
            "averageProcessingTime": round(sum(flush_ms) / len(flush_ms), 3) if flush_ms else 0,
            "maxFlushTime": round(max(flush_ms), 3) if flush_ms else 0,
            "retryCount": facts.retry_count,
        },
        "systemHealth": system,
        "queue": st["queue"],
        "latencyMs": st["latencyMs"],
        "recovery": {"paused": paused},
        "sink": st["sink"],
        "security": {
            "redactedEntries": st["counters"]["redactedEntries"],
            "redactedValues": st["counters"]["redactedValues"],
            "rateLimitedEntries": st["rateLimit"]["limitedEntries"],
        },
    }


def _least_free(system: dict[str, Any]) -> tuple[str | None, float]:
    """(folder, free fraction) of the fullest file system a folder is on; the root's figure
    when the folders are not known."""
    folders = system.get("folders") or {}
    figures = [(f["available"] / f["total"], name) for name, f in folders.items() if f["total"]]
    if figures:
        fraction, name = min(figures)
        return name, fraction
    disk = system["diskSpace"]
    return None, disk["available"] / disk["total"] if disk["total"] else 1.0


def system_figures(layout: Layout) -> dict[str, Any]:
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(str(layout.root))
    rss = psutil.Process().memory_info().rss
    return {
        "memoryUsage": {"used": mem.total - mem.available, "total": mem.total},
        "memoryPercent": mem.percent,
        "processRss": rss,
        "diskSpace": {"available": disk.free, "total": disk.total},
        "folders": folder_space(layout),
    }


def folder_space(layout: Layout) -> dict[str, dict[str, int]]:
    """Free and total bytes of the file system each folder is on, by folder ("aggregated/"):
    a tmpfs or another disk mounted on one folder fills up apart from the root's. Folders on
    one file system (one st_dev) share one statvfs figure."""
    by_device: dict[int, dict[str, int]] = {}
    out: dict[str, dict[str, int]] = {}
    for folder in (layout.root, *layout.all_dirs()):
        try:
            device = os.stat(folder).st_dev
            if device not in by_device:
                vfs = os.statvfs(folder)
                by_device[device] = {
                    "available": vfs.f_bavail * vfs.f_frsize,
                    "total": vfs.f_blocks * vfs.f_frsize,
                    "device": device,
                }
        except OSError:
            continue
        out[_folder_name(layout, folder)] = by_device[device]
    return out


def _folder_name(layout: Layout, folder: Path) -> str:
    try:
        rel = folder.relative_to(layout.root)
    except ValueError:
        return str(folder)  # a runDir outside the root
    return f"{rel.as_posix()}/" if rel.parts else "./"


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
    if not isinstance(doc, dict):
        return None
    try:
        formats.check(doc.get("formatVersion"), formats.HEALTH_MAJOR, "health/latest.json")
    except formats.BadVersionError:
        return None
    return doc


def abandoned_before(layout: Layout, abandoned_now: int) -> int:
    """The abandoned count the last daemon saw, so new abandonments since then still show."""
    try:
        previous = read_latest(layout)
    except formats.NewerFormatError:
        previous = None  # a newer flowagg's snapshot: its count means nothing here
    if previous is None:
        return abandoned_now
    queue = previous.get("queue")
    seen = queue.get("abandoned") if isinstance(queue, dict) else None
    return seen if isinstance(seen, int) else abandoned_now


def is_stale(snapshot: dict[str, Any], now_ms: int) -> bool:
    interval = snapshot.get("intervalMs", 60_000)
    return now_ms - snapshot.get("timestamp", 0) > STALE_INTERVALS * interval


def running_pid(layout: Layout) -> int | None:
    """The pid of a live daemon on this root, or None.

    From the pid files (the root's first: it names the daemon whatever its runDir), not by
    trying the lock: a probe holding the lock even for a moment could make a daemon starting
    at that moment refuse to run.
    """
    for path in (layout.root_pid_file, layout.pid_file):
        pid = read_pid_file(path)
        if pid is not None and psutil.pid_exists(pid):
            return pid
    return None
