"""The daemon's recurring duties: recovery passes, health snapshots and cleanup.

The scheduler runs them and the socket asks for some (`recover`, `health`). They are apart
from the life cycle in `daemon` and see the daemon only through `DutyHost`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from flowagg.core.audit import audit
from flowagg.service.cleanup import apply_cleanup, cleanup_fields, plan_cleanup
from flowagg.service.health import (
    DaemonFacts,
    SuccessWindow,
    abandoned_before,
    build_snapshot,
    system_figures,
    write_snapshot,
)
from flowagg.service.jobs import resume_job
from flowagg.service.ops import RECOVERY_FIELDS
from flowagg.service.sdnotify import notify

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from flowagg.core.clock import Clock
    from flowagg.core.config import Config
    from flowagg.core.layout import Layout
    from flowagg.core.supervise import Supervisor
    from flowagg.delivery.recovery import Recovery
    from flowagg.ingest.pipeline import Pipeline

log = logging.getLogger("flowagg.daemon")

SUCCESS_WINDOW_INTERVALS = 10


class DutyHost(Protocol):
    """What the duties read of the daemon: its config may change on reload, its pipeline
    exists once the daemon runs."""

    config: Config
    layout: Layout
    clock: Clock
    recovery: Recovery
    supervisor: Supervisor
    pipeline: Pipeline | None


class Duties:
    def __init__(self, host: DutyHost, status: Callable[[], dict[str, Any]]) -> None:
        self._host = host
        self._status = status
        self.health_checks = 0
        self.success_window = SuccessWindow(SUCCESS_WINDOW_INTERVALS)
        self.cleanup_runs = 0
        self._abandoned_seen: int | None = None
        self._recovery_lock: asyncio.Lock | None = None
        self._scheduler: AsyncIOScheduler | None = None

    def start(self, scheduler: AsyncIOScheduler) -> None:
        """Called in the running loop, once the scheduler that runs the duties exists."""
        self._recovery_lock = asyncio.Lock()
        self._scheduler = scheduler

    async def scheduled_recovery(self) -> None:
        report = await self.recover(force=False)
        paused = report["paused"]
        if paused is not None and self._scheduler is not None:
            # The loop's own backoff: one pass when the pause ends, not a wait for the
            # next scheduleIntervalMs.
            delay_s = max(0, paused["retryAt"] - self._host.clock.now_ms()) / 1000
            resume_job(self._scheduler, self.scheduled_recovery, delay_s)
        if any(report[key] for key in ("recovered", "abandoned", "quarantined")):
            audit(
                "recover", by="scheduler", **{k: report[k] for k in RECOVERY_FIELDS if k in report}
            )

    async def recover(
        self, *, force: bool, requeue: bool = False, batch: str | None = None
    ) -> dict[str, Any]:
        """One recovery pass in a worker thread, never two at once."""
        host = self._host
        assert self._recovery_lock is not None and host.pipeline is not None
        async with self._recovery_lock:
            requeued: list[str] = []
            if requeue:
                requeued = await asyncio.to_thread(host.recovery.requeue_abandoned, batch)
            report = await asyncio.to_thread(host.recovery.run_once, force=force)
        if host.pipeline.flusher is not None:
            now = host.clock.monotonic()
            outcomes = host.pipeline.flusher.outcomes
            outcomes.record(now, True, len(report.recovered))
            outcomes.record(now, False, len(report.retried_failed) + len(report.abandoned))
        result = report.as_dict()
        if requeue:
            result["requeued"] = requeued
        return result

    def health_snapshot(self, *, running: bool = True) -> dict[str, Any]:
        host = self._host
        assert host.pipeline is not None
        st = self._status()
        flusher = host.pipeline.flusher
        # Success rate over the last SUCCESS_WINDOW_INTERVALS health intervals, so a bad spell
        # shows at once and is forgotten once writes have worked for a while, or at once when
        # nothing waits in recovery/ any more.
        interval_ms = host.config.health_check_interval_ms
        horizon = self.success_window.since(
            host.clock.monotonic(),
            interval_s=interval_ms / 1000,
            failed_queued=st["queue"]["failed"],
        )
        if self._abandoned_seen is None:
            self._abandoned_seen = abandoned_before(host.layout, st["queue"]["abandoned"])
        facts = DaemonFacts(
            status=st,
            interval_ms=interval_ms,
            success_rate=flusher.outcomes.success_rate(horizon) if flusher else 1.0,
            flush_latency_s=list(host.pipeline.flushing.flush_latency),
            retry_count=(flusher.inline_retries if flusher else 0)
            + host.recovery.totals["failedAgain"],
            scheduled_tasks=host.recovery.runs,
            health_checks=self.health_checks,
            cleanup_runs=self.cleanup_runs,
            thread_issues=tuple(host.supervisor.issues()),
            running=running,
        )
        return build_snapshot(
            facts,
            now_ms=host.clock.now_ms(),
            system=system_figures(host.layout),
            abandoned_before=self._abandoned_seen,
        )

    async def write_health(self) -> None:
        snapshot = self.health_snapshot()
        self.health_checks += 1
        try:
            await asyncio.to_thread(write_snapshot, self._host.layout, snapshot)
        except OSError as exc:
            log.error("cannot write the health snapshot: %s", exc)
            return
        self._abandoned_seen = snapshot["queue"]["abandoned"]
        notify(f"STATUS={snapshot['status']}: {'; '.join(snapshot['issues']) or 'ok'}")

    async def final_snapshot(self, timeout_s: float) -> None:
        """Mark the snapshot stopped, so `flowagg health` does not report a dead daemon healthy."""
        snapshot = self.health_snapshot(running=False)
        try:
            await asyncio.wait_for(
                asyncio.to_thread(write_snapshot, self._host.layout, snapshot), timeout_s
            )
        except (OSError, TimeoutError) as exc:
            log.error("cannot write the final health snapshot: %r", exc)

    async def run_cleanup(self) -> None:
        host = self._host
        plan = await asyncio.to_thread(
            plan_cleanup,
            host.layout,
            host.clock.now_ms(),
            age_ms=host.config.cleanup_age_ms,
            retain_batches_ms=host.config.retain_batches_ms,
        )
        freed = await asyncio.to_thread(apply_cleanup, plan)
        self.cleanup_runs += 1
        if plan:
            audit("cleanup", by="scheduler", **cleanup_fields(plan, freed))
            log.info("cleanup: %d files removed, %d bytes freed", len(plan), freed)
