"""Health statuses (pure thresholds) and `flowagg health` exit codes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest

from flowagg.core.clock import FakeClock
from flowagg.core.layout import Layout
from flowagg.delivery.flusher import Outcomes
from flowagg.service.daemon_duties import SUCCESS_WINDOW_INTERVALS
from flowagg.service.health import Figures, SuccessWindow, evaluate, write_snapshot
from tests.harness import cli

OK = Figures(
    success_rate=1.0,
    flush_p99_ms=3.0,
    memory_percent=40.0,
    disk_free_fraction=0.5,
    abandoned_now=0,
    abandoned_before=0,
)


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({}, "healthy", None),
        ({"success_rate": 0.89}, "degraded", "below 90%"),
        ({"success_rate": 0.79}, "critical", "below 80%"),
        ({"flush_p99_ms": 501.0}, "degraded", "over 500 ms"),
        ({"memory_percent": 81.0}, "degraded", "memory"),
        ({"disk_free_fraction": 0.09}, "degraded", "disk filling up"),
        ({"disk_free_fraction": 0.01}, "critical", "disk nearly full"),
        ({"abandoned_now": 2, "abandoned_before": 1}, "critical", "abandoned"),
        ({"abandoned_now": 2, "abandoned_before": 2}, "healthy", None),
        ({"stalled_error": "OSError: [Errno 28]"}, "critical", "cannot be stored"),
        (
            {"abandoned_now": 1, "sink_error": "permission denied (permanent)"},
            "critical",
            "the sink's last error: permission denied",
        ),
        (
            {"breaker_state": "open", "sink_error": "connection refused"},
            "degraded",
            "open: batches wait in recovery/ (last error: connection refused)",
        ),
        ({"sink_error": "connection refused"}, "healthy", None),
    ],
)
def test_thresholds(change: dict, status: str, words: str | None) -> None:
    got, issues = evaluate(Figures(**{**OK.__dict__, **change}))
    assert got == status
    if words is None:
        assert issues == []
    else:
        assert len(issues) == 1 and words in issues[0]


def test_critical_outranks_degraded() -> None:
    status, issues = evaluate(
        Figures(**{**OK.__dict__, "memory_percent": 95.0, "success_rate": 0.5})
    )
    assert status == "critical" and len(issues) == 2


def snapshot(status: str, age_ms: int = 0, interval_ms: int = 60_000) -> dict:
    return {
        "timestamp": time.time_ns() // 1_000_000 - age_ms,
        "status": status,
        "severity": "x",
        "issues": [] if status == "healthy" else [f"{status} because of a test"],
        "intervalMs": interval_ms,
        "queue": {"buffered": 0, "failed": 0, "abandoned": 0, "errors": 0, "inbox": 0},
        "aggregatorHealth": {"totalOperations": 1, "successRate": 1.0, "retryCount": 0},
        "systemHealth": {"diskSpace": {"available": 1, "total": 2}, "processRss": 1},
    }


def pretend_running(layout: Layout) -> None:
    """A pid file naming a live process (this one): what `flowagg health` checks first."""
    layout.pid_file.write_text(f"{os.getpid()}\n")


@pytest.mark.parametrize(("status", "code"), [("healthy", 0), ("degraded", 1), ("critical", 2)])
def test_health_command_exit_codes(tmp_path: Path, status: str, code: int) -> None:
    layout = Layout(tmp_path / "data")
    layout.prepare()
    pretend_running(layout)
    write_snapshot(layout, snapshot(status))
    proc = cli(layout.root, "health")
    assert proc.returncode == code, proc.stderr
    assert f"status: {status}" in proc.stdout.decode()
    as_json = cli(layout.root, "health", "--json")
    assert as_json.returncode == code
    assert orjson.loads(as_json.stdout)["status"] == status


def test_health_command_stale_and_missing(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "data")
    layout.prepare()
    missing = cli(layout.root, "health")
    assert missing.returncode == 3 and b"no health snapshot" in missing.stderr
    pretend_running(layout)
    write_snapshot(layout, snapshot("healthy", age_ms=3_100, interval_ms=1_000))
    stale = cli(layout.root, "health")
    assert stale.returncode == 3 and b"3 intervals" in stale.stderr
    # Fresh: a start of the CLI, however slow, stays far inside 3 intervals of a minute.
    write_snapshot(layout, snapshot("healthy", age_ms=2_000, interval_ms=60_000))
    assert cli(layout.root, "health").returncode == 0


def test_a_short_sink_outage_is_degraded_then_forgotten_once_the_queue_drains() -> None:
    # The success rate once covered 10 intervals whatever happened since: health stayed
    # critical for 10 minutes after a short outage whose batches had all been recovered.
    clock = FakeClock()
    outcomes = Outcomes()
    window = SuccessWindow(SUCCESS_WINDOW_INTERVALS)
    interval_s = 60.0

    def status(failed_queued: int, breaker: str) -> str:
        since = window.since(clock.monotonic(), interval_s=interval_s, failed_queued=failed_queued)
        figures = {**OK.__dict__, "success_rate": outcomes.success_rate(since)}
        return evaluate(Figures(**{**figures, "breaker_state": breaker}))[0]

    assert status(0, "closed") == "healthy"
    clock.advance(1_000)
    outcomes.record(clock.monotonic(), True)
    outcomes.record(clock.monotonic(), False, 9)  # the sink goes down: parked in recovery/
    clock.advance(1_000)
    assert status(9, "open") == "degraded"  # batches wait, unlost: not critical
    assert status(9, "closed") == "critical"  # failing with the sink called: critical
    clock.advance(60_000)
    outcomes.record(clock.monotonic(), True, 2)  # the sink is back, the queue is draining
    assert status(3, "closed") == "critical"
    clock.advance(1_000)
    assert status(0, "closed") == "healthy"  # all recovered: the outage is history
    clock.advance(1_000)
    outcomes.record(clock.monotonic(), False, 5)  # a new outage counts again
    clock.advance(1_000)
    assert status(5, "closed") == "critical"
    clock.advance(int(SUCCESS_WINDOW_INTERVALS * interval_s * 1000))
    assert status(5, "closed") == "healthy"  # and the window still ends
