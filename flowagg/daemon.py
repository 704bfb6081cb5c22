"""`flowagg run`: the daemon's life cycle, in the manner of gunicorn's arbiter.

Signal handlers only enqueue the signal; the main loop dispatches `handle_term`,
`handle_usr1`, ... so no real work ever runs inside a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import logging.handlers
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import filelock
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from . import __version__
from .cleanup import apply_cleanup, plan_cleanup
from .clock import Clock, EntryIdFactory, SystemClock
from .config import SETTINGS, Config
from .dedupe import DedupeIndex
from .entries import short_repr
from .errors import AlreadyRunningError, ConfigError, RootUnusableError
from .fsutil import atomic_write, count_files, remove_stale_temps
from .health import SEVERITY, Figures, evaluate, read_latest, system_figures, write_snapshot
from .journal import JournalVersionError, scan
from .layout import Layout
from .pipeline import Pipeline
from .recovery import Recovery, RetryPolicy, write_completed
from .sdnotify import notify
from .server import SocketServer
from .sink import build_sink, sink_then_store
from .spool import SpoolIntake

log = logging.getLogger("flowagg.daemon")

MAINTENANCE_INTERVAL_S = 60.0
CLEANUP_INTERVAL_S = 86_400.0
HEALTH_FORMAT_VERSION = 1
SUCCESS_WINDOW_INTERVALS = 10
SIGNALS = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGUSR1: "usr1",
    signal.SIGHUP: "hup",
}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


RESTART_ONLY = ("root", "runDir", "maxRequestBytes", "logMaxBytes", "logBackups")


def retry_policy(config: Config) -> RetryPolicy:
    return RetryPolicy(
        base_ms=config.retry_base_ms,
        max_delay_ms=config.retry_max_delay_ms,
        limit=config.batch_retry_limit,
    )


def read_pid(layout: Layout) -> int | None:
    try:
        return int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def setup_logging(layout: Layout, config: Config) -> None:
    """aggregation.log and stderr get everything; recovery.log gets the recovery side too."""
    formatter = logging.Formatter(LOG_FORMAT)

    def rotating(name: str) -> logging.Handler:
        handler = logging.handlers.RotatingFileHandler(
            layout.logs / name,
            maxBytes=config.log_max_bytes,
            backupCount=config.log_backups,
            encoding="utf-8",
        )
        handler.setFormatter(formatter)
        return handler

    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    root = logging.getLogger("flowagg")
    root.setLevel(config.log_level)
    root.propagate = False
    for logger, handlers in (
        (root, [rotating("aggregation.log"), stderr]),
        (logging.getLogger("flowagg.recovery"), [rotating("recovery.log")]),
    ):
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        for handler in handlers:
            logger.addHandler(handler)


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        reload_config: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.layout = Layout.for_config(config)
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._reload_config = reload_config
        self.retry_policy = retry_policy(config)
        self.sink = build_sink(config, self.clock)
        self.store = sink_then_store(
            lambda: self.sink, lambda batch_id, data: write_completed(self.layout, batch_id, data)
        )
        self.recovery = Recovery(
            self.layout, self.clock, self.rng, self.retry_policy, store=self.store
        )
        self.health_checks = 0
        self.cleanup_runs = 0
        self._abandoned_seen: int | None = None
        self._recovery_lock: asyncio.Lock | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self.started_mono = 0.0
        self.pipeline: Pipeline | None = None
        self.server: SocketServer | None = None
        self.spool: SpoolIntake | None = None
        self._signals: asyncio.Queue[str] | None = None
        self._stop = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock: filelock.BaseFileLock | None = None

    # -- life cycle -------------------------------------------------------------------------
    def acquire(self) -> None:
        """Prepare the root and take the one-daemon-per-root lock (exit 4 / exit 3)."""
        self.layout.prepare()
        lock = filelock.FileLock(str(self.layout.lock_file), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            pid = read_pid(self.layout)
            who = f"pid {pid}" if pid else "another process"
            raise AlreadyRunningError(
                f"flowagg is already running on {self.layout.root} ({who});"
                " stop it first or use another --root"
            ) from None
        except OSError as exc:
            raise RootUnusableError(
                f"cannot create the lock file {self.layout.lock_file}: {exc.strerror}"
            ) from None
        self._lock = lock
        try:
            atomic_write(self.layout.pid_file, f"{os.getpid()}\n".encode())
        except OSError as exc:
            # A full disk must not stop the daemon (SPEC §2); the pid file only names us.
            logging.getLogger("flowagg.daemon").warning("cannot write the pid file: %s", exc)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if read_pid(self.layout) == os.getpid():
                self.layout.pid_file.unlink()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def run(self) -> int:
        # The journal writer and the flusher wait for the GIL after every system call; with
        # the default 5 ms switch interval a busy event loop starves them.
        sys.setswitchinterval(0.0005)
        self.acquire()
        try:
            setup_logging(self.layout, self.config)
            return asyncio.run(self._main())
        finally:
            self.release()

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self.started_mono = self.clock.monotonic()
        started = time.perf_counter()
        log.info("flowagg %s starting on %s (pid %d)", __version__, self.layout.root, os.getpid())
        removed = remove_stale_temps(self.layout.private_dirs())
        if removed:
            log.info("removed %d stale temp files", len(removed))
        try:
            dedupe = DedupeIndex(
                self.layout.journal / "dedupe",
                window_ms=self.config.dedupe_window_ms,
                max_ids=self.config.dedupe_max_ids,
            )
            result = await asyncio.to_thread(
                scan,
                self.layout.journal,
                self.layout.errors,
                now_ms=self.clock.now_ms(),
                dedupe=dedupe,
            )
        except JournalVersionError as exc:
            raise RootUnusableError(str(exc)) from None
        ids = EntryIdFactory(self.clock, self.rng)
        self.pipeline = Pipeline(
            self.config,
            self.layout,
            self.clock,
            loop,
            ids,
            next_retry_at=lambda now: self.retry_policy.next_retry_at(now, 0, self.rng),
            store=self.store,
        )
        self.pipeline.start(result)
        log.info(
            "journal: %d segments, %d entries waiting to be flushed",
            len(result.segments),
            self.pipeline.aggregator.unflushed_entries,
        )
        self._signals = asyncio.Queue()
        for signum, name in SIGNALS.items():
            loop.add_signal_handler(signum, self._signals.put_nowait, name)
        self.spool = SpoolIntake(
            self.layout,
            self.pipeline,
            rescan_s=self.config.spool_rescan_ms / 1000,
            max_file_bytes=self.config.max_request_bytes,
        )
        await self.spool.recover(result.spool_sources)
        self.server = SocketServer(
            self.layout.socket, self.handle_request, max_request_bytes=self.config.max_request_bytes
        )
        await self.server.start()
        await self.spool.start()
        self._recovery_lock = asyncio.Lock()
        self._start_scheduler()
        log.info("ready in %.3f s; socket %s", time.perf_counter() - started, self.layout.socket)
        notify(f"READY=1\nSTATUS=accepting entries\nMAINPID={os.getpid()}")
        self._start_watchdog(loop)
        while not self._stop:
            name = await self._signals.get()
            await getattr(self, f"handle_{name}")()
        return await self._shutdown()

    def _start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
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

    def _start_scheduler(self) -> None:
        scheduler = AsyncIOScheduler(
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        )
        scheduler.add_job(
            self.scheduled_recovery,
            "interval",
            seconds=self.config.schedule_interval_ms / 1000,
            next_run_time=_utcnow(),
            id="recovery",
        )
        scheduler.add_job(
            self.write_health,
            "interval",
            seconds=self.config.health_check_interval_ms / 1000,
            next_run_time=_utcnow(),
            id="health",
        )
        scheduler.add_job(self.run_cleanup, "interval", seconds=CLEANUP_INTERVAL_S, id="cleanup")
        scheduler.add_job(
            self.maintenance, "interval", seconds=MAINTENANCE_INTERVAL_S, id="maintenance"
        )
        scheduler.start()
        self._scheduler = scheduler

    async def maintenance(self) -> None:
        assert self.pipeline is not None
        self.pipeline.expire_dedupe()
        removed = self.pipeline.compact_journal()
        if removed:
            log.info("journal: removed %d stored segments", removed)

    async def scheduled_recovery(self) -> None:
        await self.recover(force=False)

    async def recover(
        self, *, force: bool, requeue: bool = False, batch: str | None = None
    ) -> dict[str, Any]:
        """One recovery pass in a worker thread, never two at once."""
        assert self._recovery_lock is not None and self.pipeline is not None
        async with self._recovery_lock:
            requeued: list[str] = []
            if requeue:
                requeued = await asyncio.to_thread(self.recovery.requeue_abandoned, batch)
            report = await asyncio.to_thread(self.recovery.run_once, force=force)
        outcomes = self.pipeline.flusher.outcomes if self.pipeline.flusher else None
        if outcomes is not None:
            now = self.clock.monotonic()
            outcomes.extend([(now, True)] * len(report.recovered))
            outcomes.extend([(now, False)] * (len(report.retried_failed) + len(report.abandoned)))
        result = report.as_dict()
        if requeue:
            result["requeued"] = requeued
        return result

    def health_snapshot(self) -> dict[str, Any]:
        assert self.pipeline is not None
        st = self.status()
        flusher = self.pipeline.flusher
        # Success rate over the last SUCCESS_WINDOW_INTERVALS health intervals, so a bad spell
        # shows at once and is forgotten once writes have worked for a while.
        horizon = self.clock.monotonic() - (
            SUCCESS_WINDOW_INTERVALS * self.config.health_check_interval_ms / 1000
        )
        outcomes = [ok for t, ok in (flusher.outcomes if flusher else ()) if t >= horizon]
        success = sum(outcomes) / len(outcomes) if outcomes else 1.0
        system = system_figures(self.layout.root)
        disk = system["diskSpace"]
        abandoned = st["queue"]["abandoned"]
        if self._abandoned_seen is None:
            previous = read_latest(self.layout)
            self._abandoned_seen = (
                previous.get("queue", {}).get("abandoned", abandoned) if previous else abandoned
            )
        flush_ms = [s * 1000 for s in self.pipeline.flush_latency]
        figures = Figures(
            success_rate=success,
            flush_p99_ms=st["latencyMs"]["flushP99"],
            memory_percent=system["memoryPercent"],
            disk_free_fraction=disk["available"] / disk["total"] if disk["total"] else 1.0,
            abandoned_now=abandoned,
            abandoned_before=self._abandoned_seen,
            stalled_error=st["flusher"]["stalledError"],
            breaker_state=st["sink"]["state"] if st["sink"] else None,
        )
        status, issues = evaluate(figures)
        return {
            "formatVersion": HEALTH_FORMAT_VERSION,
            "timestamp": self.clock.now_ms(),
            "status": status,
            "severity": SEVERITY[status],
            "issues": issues,
            "intervalMs": self.config.health_check_interval_ms,
            "daemonHealth": {
                "uptime": int(st["uptimeS"] * 1000),
                "isRunning": True,
                "pid": st["pid"],
                "scheduledTasksExecuted": self.recovery.runs,
                "healthChecksPerformed": self.health_checks,
                "cleanupOperations": self.cleanup_runs,
            },
            "aggregatorHealth": {
                "totalOperations": sum(st["counters"]["batches"].values()),
                "successRate": round(success, 4),
                "averageProcessingTime": round(sum(flush_ms) / len(flush_ms), 3) if flush_ms else 0,
                "maxFlushTime": round(max(flush_ms), 3) if flush_ms else 0,
                "retryCount": (flusher.inline_retries if flusher else 0)
                + self.recovery.totals["failedAgain"],
            },
            "systemHealth": system,
            "queue": st["queue"],
            "latencyMs": st["latencyMs"],
            "sink": st["sink"],
        }

    async def write_health(self) -> None:
        snapshot = self.health_snapshot()
        self.health_checks += 1
        try:
            await asyncio.to_thread(write_snapshot, self.layout, snapshot)
        except OSError as exc:
            log.error("cannot write the health snapshot: %s", exc)
            return
        self._abandoned_seen = snapshot["queue"]["abandoned"]
        notify(f"STATUS={snapshot['status']}: {'; '.join(snapshot['issues']) or 'ok'}")

    async def run_cleanup(self) -> None:
        plan = await asyncio.to_thread(
            plan_cleanup,
            self.layout,
            self.clock.now_ms(),
            age_ms=self.config.cleanup_age_ms,
            retain_batches_ms=self.config.retain_batches_ms,
        )
        freed = await asyncio.to_thread(apply_cleanup, plan)
        self.cleanup_runs += 1
        if plan:
            log.info("cleanup: %d files removed, %d bytes freed", len(plan), freed)

    async def _shutdown(self) -> int:
        notify("STOPPING=1\nSTATUS=flushing")
        log.info("stopping: flushing the buffer")
        assert self.pipeline is not None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self.server is not None:
            await self.server.stop()
        if self.spool is not None:
            await self.spool.stop()
        await self.pipeline.shutdown()
        left = self.pipeline.aggregator.unflushed_entries
        if left:
            log.warning("stopped with %d entries in the journal; the next start writes them", left)
        log.info("stopped")
        return 0

    # -- signals ----------------------------------------------------------------------------
    async def handle_term(self) -> None:
        self._stop = True

    async def handle_int(self) -> None:
        self._stop = True

    async def handle_usr1(self) -> None:
        # In the background: a flush waiting on a broken disk must not hold up SIGTERM.
        task = asyncio.create_task(self._flush_for_signal())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_for_signal(self) -> None:
        assert self.pipeline is not None
        result = await self.pipeline.flush("manual")
        log.info("SIGUSR1 flush: %d batches, %d entries", result["batches"], result["entries"])

    async def handle_hup(self) -> None:
        self.reload()

    def reload(self) -> dict[str, Any]:
        """Re-read the config; apply flush, recovery and sink settings; keep the old on error."""
        if self._reload_config is None:
            return {"ok": False, "error": "this daemon was started without a reloadable config"}
        notify("RELOADING=1")
        try:
            new = self._reload_config()
        except ConfigError as exc:
            log.error("reload refused, the running config is unchanged: %s", exc)
            notify("READY=1")
            return {"ok": False, "error": f"reload refused: {exc}; the running config is unchanged"}
        old = self.config
        changed = [k for k in SETTINGS if new.values[k] != old.values[k]]
        restart = [k for k in changed if k in RESTART_ONLY]
        values = {k: (old.values[k] if k in RESTART_ONLY else new.values[k]) for k in SETTINGS}
        sources = {k: (old.sources[k] if k in RESTART_ONLY else new.sources[k]) for k in SETTINGS}
        merged = Config(values=values, sources=sources, config_file=new.config_file)
        self.apply_config(merged, [k for k in changed if k not in RESTART_ONLY])
        if restart:
            log.warning("reload: %s change only at the next start", ", ".join(restart))
        log.info("reload: applied %s", ", ".join(changed) or "no changes")
        notify("READY=1")
        return {
            "ok": True,
            "changed": [k for k in changed if k not in restart],
            "needsRestart": restart,
        }

    def apply_config(self, config: Config, changed: list[str]) -> None:
        self.config = config
        assert self.pipeline is not None
        self.pipeline.reconfigure(config)
        self.retry_policy = retry_policy(config)
        self.recovery.policy = self.retry_policy
        if any(k.startswith(("sink", "breaker")) for k in changed):
            self.sink = build_sink(config, self.clock)
        if self.spool is not None:
            self.spool.rescan_s = config.spool_rescan_ms / 1000
        logging.getLogger("flowagg").setLevel(config.log_level)
        if self._scheduler is not None:
            for job, key in (
                ("recovery", "scheduleIntervalMs"),
                ("health", "healthCheckIntervalMs"),
            ):
                if key in changed:
                    self._scheduler.reschedule_job(
                        job, trigger="interval", seconds=config.values[key] / 1000
                    )

    # -- requests ---------------------------------------------------------------------------
    async def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.pipeline is not None
        op = request.get("op")
        if op == "add":
            entries = request.get("entries")
            if not isinstance(entries, list):
                return {"ok": False, "error": 'add: "entries" must be an array of entries'}
            if self._stop:
                return {"ok": False, "error": "stopping", "retryAfterMs": 1000}
            return (await self.pipeline.add(entries)).reply()
        if op == "ping":
            return {"ok": True}
        if op == "flush":
            return {"ok": True, **(await self.pipeline.flush("manual"))}
        if op == "status":
            return {"ok": True, **self.status()}
        if op == "recover":
            batch = request.get("batch")
            if batch is not None and not isinstance(batch, str):
                return {"ok": False, "error": 'recover: "batch" must be a batch id string'}
            try:
                report = await self.recover(
                    force=True, requeue=bool(request.get("abandoned")), batch=batch
                )
            except FileNotFoundError as exc:
                return {"ok": False, "error": str(exc)}
            return {"ok": True, **report}
        if op == "health":
            return {"ok": True, **self.health_snapshot()}
        if op == "reload":
            return self.reload()
        return {
            "ok": False,
            "error": f"unknown op {short_repr(op)}; use add, flush, recover, status, health,"
            " reload or ping",
        }

    def status(self) -> dict[str, Any]:
        assert self.pipeline is not None
        spool = self.spool
        queue = {
            "buffered": self.pipeline.aggregator.unflushed_entries,
            "failed": count_files(self.layout.recovery, ".failed.json"),
            "abandoned": count_files(self.layout.abandoned, ".abandoned.json"),
            "errors": count_files(self.layout.errors, ".reason.json"),
            "inbox": count_files(self.layout.inbox, (".json", ".jsonl")),
        }
        return {
            "pid": os.getpid(),
            "version": __version__,
            "root": str(self.layout.root),
            "uptimeS": round(self.clock.monotonic() - self.started_mono, 3),
            **self.pipeline.status(),
            "spool": {
                "filesIngested": spool.files_ingested if spool else 0,
                "filesQuarantined": spool.files_quarantined if spool else 0,
                "entriesRejected": spool.entries_rejected if spool else 0,
            },
            "socket": {
                "requests": self.server.requests if self.server else 0,
                "badRequests": self.server.bad_requests if self.server else 0,
            },
            "failed": queue["failed"],
            "abandoned": queue["abandoned"],
            "errors": queue["errors"],
            "queue": queue,
            "recovery": {"runs": self.recovery.runs, **self.recovery.totals},
            "sink": self.sink.snapshot() if self.sink else None,
        }


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
