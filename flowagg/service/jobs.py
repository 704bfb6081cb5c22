"""The daemon's timed work: apscheduler jobs on the event loop, and systemd's watchdog."""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from flowagg.core.config import Config
from flowagg.service.sdnotify import notify

if TYPE_CHECKING:
    from flowagg.service.daemon_host import TimedWork

MAINTENANCE_INTERVAL_S = 60.0
SOCKET_CHECK_S = 3.0
CLEANUP_INTERVAL_S = 86_400.0
# Jobs whose interval a reload may change: job id -> setting.
RESCHEDULABLE = {"recovery": "scheduleIntervalMs", "health": "healthCheckIntervalMs"}


def start_watchdog(loop: asyncio.AbstractEventLoop) -> None:
    """Ping systemd at half of WatchdogSec from the event loop: a stuck loop stops pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return
    interval = int(usec) / 2_000_000

    def ping() -> None:
        notify("WATCHDOG=1")
        loop.call_later(interval, ping)

    ping()


def start_scheduler(daemon: TimedWork) -> AsyncIOScheduler:
    config = daemon.config
    scheduler = AsyncIOScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
    )
    scheduler.add_job(
        daemon.scheduled_recovery,
        "interval",
        seconds=config.schedule_interval_ms / 1000,
        next_run_time=_utcnow(),
        id="recovery",
    )
    scheduler.add_job(
        daemon.write_health,
        "interval",
        seconds=config.health_check_interval_ms / 1000,
        next_run_time=_utcnow(),
        id="health",
    )
    # At start too (a daemon restarted daily would otherwise never clean up); the scheduler
    # runs its first pass after READY, off the start path.
    scheduler.add_job(
        daemon.run_cleanup,
        "interval",
        seconds=CLEANUP_INTERVAL_S,
        next_run_time=_utcnow(),
        id="cleanup",
    )
    scheduler.add_job(daemon.check_socket, "interval", seconds=SOCKET_CHECK_S, id="socket")
    scheduler.add_job(
        daemon.maintenance, "interval", seconds=MAINTENANCE_INTERVAL_S, id="maintenance"
    )
    scheduler.start()
    return scheduler


def resume_job(
    scheduler: AsyncIOScheduler, func: Callable[[], Awaitable[None]], delay_s: float
) -> None:
    """One extra recovery pass after `delay_s` (a paused loop's backoff); one at a time."""
    run_at = _utcnow() + datetime.timedelta(seconds=delay_s)
    scheduler.add_job(func, "date", run_date=run_at, id="recovery-resume", replace_existing=True)


def reschedule(scheduler: AsyncIOScheduler, config: Config, changed: list[str]) -> None:
    for job, key in RESCHEDULABLE.items():
        if key in changed:
            scheduler.reschedule_job(job, trigger="interval", seconds=config.values[key] / 1000)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
