"""`flowagg run`: the daemon's life cycle, in the manner of gunicorn's arbiter.

Signal handlers only enqueue the signal; the main loop dispatches `handle_term`,
`handle_usr1`, ... so no real work ever runs inside a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from flowagg import __version__
from flowagg.batches.storage import CompletedFiles
from flowagg.core.audit import audit
from flowagg.core.clock import Clock, EntryIdFactory, SystemClock
from flowagg.core.config import Config, config_warnings
from flowagg.core.errors import ConfigError, RootUnusableError
from flowagg.core.fsutil import remove_stale_temps
from flowagg.core.layout import Layout
from flowagg.core.supervise import EX_SOFTWARE, DaemonExecutor, Deadline, Supervisor
from flowagg.delivery.recovery import Recovery
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.delivery.sink import Completer, build_sink
from flowagg.ingest.pipeline import Pipeline
from flowagg.ingest.ratelimit import RateLimiter
from flowagg.ingest.server import Peer, SocketServer
from flowagg.ingest.spool import SpoolIntake
from flowagg.journal.public import JournalVersionError, scan_root
from flowagg.service.daemon_duties import Duties
from flowagg.service.daemon_lock import DaemonLock
from flowagg.service.jobs import reschedule, start_scheduler, start_watchdog
from flowagg.service.logsetup import setup_logging
from flowagg.service.metrics import MetricsExport
from flowagg.service.ops import daemon_status, handle_request
from flowagg.service.reloading import merge_reload
from flowagg.service.sdnotify import notify

log = logging.getLogger("flowagg.daemon")

# Tracked objects allocated, net of those freed, between collections of the young generation.
GC_YOUNG = 10_000

SIGNALS = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGUSR1: "usr1",
    signal.SIGHUP: "hup",
}


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
        self.retry_policy = RetryPolicy.from_config(config)
        self.sink = build_sink(config, self.clock)
        files = CompletedFiles(self.layout, config.batch_compression)
        self.completer = Completer(files.write, lambda: self.sink, files=files)
        self.recovery = Recovery(
            self.layout, self.clock, self.rng, self.retry_policy, store=self.completer
        )
        self.supervisor = Supervisor()
        self.limiter = RateLimiter.from_config(config, self.clock.monotonic)
        self.duties = Duties(self, lambda: daemon_status(self))
        self._scheduler: AsyncIOScheduler | None = None
        self.started_mono = 0.0
        self.pipeline: Pipeline | None = None
        self.server: SocketServer | None = None
        self.metrics = MetricsExport(self, lambda: daemon_status(self))
        self.spool: SpoolIntake | None = None
        self.stopping = False
        self.socket_recreated = 0
        self.last_reload: dict[str, Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = DaemonLock(self.layout)

    # -- life cycle -------------------------------------------------------------------------
    def acquire(self) -> None:
        """Prepare the root and take the one-daemon-per-root lock (exit 4 / exit 3)."""
        self.layout.prepare()
        self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def run(self) -> int:
        # The journal writer and the flusher wait for the GIL after every system call; with
        # the default 5 ms switch interval a busy event loop starves them.
        sys.setswitchinterval(0.0005)
        # An add keeps a few thousand containers alive at once (entries, their metadata, keys,
        # futures), so at the default 700 the young generation was collected every ~250
        # entries, ~10 % of the loop's CPU (scripts/bench). Nearly all of it is freed by
        # reference counting; only cyclic garbage waits for a pass, at most GC_YOUNG of it.
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
        # Files 0600 and folders 0700 whatever the caller's umask (log files are made by
        # logging, which takes the umask); the shared folders get their mode explicitly.
        old_umask = os.umask(0o077)
        try:
            self.acquire()
            try:
                setup_logging(self.layout, self.config)
                return asyncio.run(self._main())
            finally:
                self.release()
        finally:
            os.umask(old_umask)

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(DaemonExecutor())
        # Signals and thread deaths alike only enqueue; the loop below dispatches them.
        signals: asyncio.Queue[str] = asyncio.Queue()

        def died(name: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting
                loop.call_soon_threadsafe(signals.put_nowait, "died")

        self.supervisor.on_death(died)
        self.started_mono = self.clock.monotonic()
        started = time.perf_counter()
        log.info("flowagg %s starting on %s (pid %d)", __version__, self.layout.root, os.getpid())
        for warning in config_warnings(self.config):
            log.warning("config: %s", warning)
        removed = remove_stale_temps(self.layout.private_dirs())
        if removed:
            log.info("removed %d stale temp files", len(removed))
        try:
            result = await asyncio.to_thread(
                scan_root, self.layout, self.config, now_ms=self.clock.now_ms()
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
            store=self.completer,
            spawn=self.supervisor.spawn,
        )
        self.pipeline.start(result)
        log.info(
            "journal: %d segments, %d entries waiting to be flushed",
            len(result.segments),
            self.pipeline.aggregator.unflushed_entries,
        )
        for signum, name in SIGNALS.items():
            loop.add_signal_handler(signum, signals.put_nowait, name)
        self.spool = SpoolIntake(
            self.layout,
            self.pipeline,
            rescan_s=self.config.spool_rescan_ms / 1000,
            max_file_bytes=self.config.max_request_bytes,
            max_error_files=self.config.max_error_files,
        )
        await self.spool.recover(result.spool_sources)
        self.server = SocketServer(
            self.layout.socket,
            functools.partial(handle_request, self),
            max_request_bytes=self.config.max_request_bytes,
            max_request_entries=self.config.max_request_entries,
            max_connections=self.config.max_connections,
            max_connections_per_uid=self.config.max_connections_per_uid,
            max_pending_bytes_per_uid=self.config.max_pending_bytes_per_uid,
            partial_request_timeout_s=self.config.partial_request_timeout_ms / 1000,
            group=self.layout.group,
            allowed_uids=self.config.allowed_uids,
        )
        await self.server.start()
        self.metrics.start()
        await self.spool.start()
        self._scheduler = start_scheduler(self)
        self.duties.start(self._scheduler)
        log.info("ready in %.3f s; socket %s", time.perf_counter() - started, self.layout.socket)
        audit("start", version=__version__, pid=os.getpid(), root=str(self.layout.root))
        notify(f"READY=1\nSTATUS=accepting entries\nMAINPID={os.getpid()}")
        start_watchdog(loop)
        while not self.stopping:
            name = await signals.get()
            await getattr(self, f"handle_{name}")()
        return await self._shutdown()

    async def maintenance(self) -> None:
        assert self.pipeline is not None
        self.pipeline.expire_dedupe()
        removed = self.pipeline.compact_journal()
        if removed:
            log.info("journal: removed %d stored segments", removed)

    async def check_socket(self) -> None:
        """Listen again if the socket file was deleted (a cleaned /run, a careless rm)."""
        if self.server is None:
            return
        try:
            recreated = await self.server.relisten()
        except RootUnusableError as exc:
            log.error("the socket %s is gone and cannot be made again: %s", self.server.path, exc)
            return
        if recreated:
            self.socket_recreated += 1
            log.warning("the socket %s was gone; listening on it again", self.server.path)

    # -- duties: the scheduler's jobs and the socket's operations call them here ------------
    async def scheduled_recovery(self) -> None:
        await self.duties.scheduled_recovery()

    async def recover(
        self, *, force: bool, requeue: bool = False, batch: str | None = None
    ) -> dict[str, Any]:
        return await self.duties.recover(force=force, requeue=requeue, batch=batch)

    def health_snapshot(self, *, running: bool = True) -> dict[str, Any]:
        return self.duties.health_snapshot(running=running)

    async def write_health(self) -> None:
        await self.duties.write_health()

    async def run_cleanup(self) -> None:
        await self.duties.run_cleanup()

    async def _shutdown(self) -> int:
        """Stop within shutdownTimeoutMs, whatever clients, sinks or the disk do (SPEC §9).

        Each phase gets a share of one deadline; what is not stored by then stays journaled.
        """
        assert self.pipeline is not None
        deadline = Deadline(self.config.shutdown_timeout_ms / 1000, self.clock.monotonic)
        notify("STOPPING=1\nSTATUS=flushing")
        log.info("stopping within %.1f s: flushing the buffer", deadline.total_s)
        self.supervisor.stopping = True
        self.recovery.stop.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self.server is not None:
            await self.server.stop(
                grace_s=deadline.share(0.1, cap_s=1.0), close_s=deadline.share(0.05)
            )
        if self.spool is not None:
            try:  # on timeout, wait_for's cancel reaches the spool task that stop() awaits
                await asyncio.wait_for(self.spool.stop(), deadline.share(0.1))
            except TimeoutError:
                log.error("the spool intake did not stop in time; its file stays adopted")
        dead = bool(self.supervisor.deaths)
        # The last 20% is kept for the thread joins and the final snapshot.
        flush_s = 0.0 if dead else max(0.0, deadline.remaining() - deadline.share(0.2))
        busy = await self.pipeline.shutdown(flush_s=flush_s, join_s=deadline.share(0.1))
        for name in busy:
            log.error("thread %s did not stop in time; left to the process exit", name)
        await self.metrics.stop()
        left = self.pipeline.aggregator.unflushed_entries
        if left:
            log.warning("stopped with %d entries in the journal; the next start writes them", left)
        await self.duties.final_snapshot(deadline.share(0.05))
        code = EX_SOFTWARE if dead else 0
        audit("stop", outcome="ok" if not dead else "thread died", exitCode=code, journaled=left)
        if dead:
            log.critical("stopped after a thread died; exit %d to be restarted", EX_SOFTWARE)
            return EX_SOFTWARE
        log.info("stopped")
        return 0

    # -- signals ----------------------------------------------------------------------------
    async def handle_term(self) -> None:
        self.stopping = True

    async def handle_int(self) -> None:
        self.stopping = True

    async def handle_died(self) -> None:
        self.stopping = True

    async def handle_usr1(self) -> None:
        # In the background: a flush waiting on a broken disk must not hold up SIGTERM.
        task = asyncio.create_task(self._flush_for_signal())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush_for_signal(self) -> None:
        assert self.pipeline is not None
        result = await self.pipeline.flush("manual")
        audit("flush", by="signal", **result)
        log.info("SIGUSR1 flush: %d batches, %d entries", result["batches"], result["entries"])

    async def handle_hup(self) -> None:
        await self.check_socket()
        self.reload()

    def reload(self, peer: Peer | None = None) -> dict[str, Any]:
        """Re-read the config; apply flush, recovery and sink settings; keep the old on error."""
        reply = self._reload()
        fields = ("changed", "needsRestart") if reply["ok"] else ("error",)
        outcome = "ok" if reply["ok"] else "error"
        audit("reload", peer=peer, by="signal", outcome=outcome, **{k: reply[k] for k in fields})
        return reply

    def _reload(self) -> dict[str, Any]:
        if self._reload_config is None:
            return {"ok": False, "error": "this daemon was started without a reloadable config"}
        notify("RELOADING=1")
        try:
            new = self._reload_config()
        except ConfigError as exc:
            log.error("reload refused, the running config is unchanged: %s", exc)
            notify("READY=1")
            # `systemctl reload` cannot show this: status does.
            self.last_reload = {"at": self.clock.now_ms(), "ok": False, "error": str(exc)}
            return {"ok": False, "error": f"reload refused: {exc}; the running config is unchanged"}
        merged, changed, restart = merge_reload(self.config, new)
        for warning in config_warnings(new):
            log.warning("config: %s", warning)
        self.apply_config(merged, changed)
        if restart:
            log.warning("reload: %s change only at the next start", ", ".join(restart))
        log.info("reload: applied %s", ", ".join(changed) or "no changes")
        notify("READY=1")
        self.last_reload = {
            "at": self.clock.now_ms(),
            "ok": True,
            "changed": changed,
            "needsRestart": restart,
        }
        return {"ok": True, "changed": changed, "needsRestart": restart}

    def config_on_disk(self) -> Config | None:
        """What a reload would read now (for `config --running`); None when it cannot."""
        if self._reload_config is None:
            return None
        try:
            return self._reload_config()
        except ConfigError:
            return None

    def apply_config(self, config: Config, changed: list[str]) -> None:
        self.config = config
        assert self.pipeline is not None
        self.pipeline.reconfigure(config)
        self.limiter.reconfigure(config)
        self.retry_policy = RetryPolicy.from_config(config)
        self.recovery.policy = self.retry_policy
        if any(k.startswith(("sink", "breaker")) for k in changed):
            self.sink = build_sink(config, self.clock)
        if self.spool is not None:
            self.spool.rescan_s = config.spool_rescan_ms / 1000
            self.spool.max_error_files = config.max_error_files
        if self.server is not None:
            self.server.reconfigure(
                allowed_uids=config.allowed_uids,
                max_connections_per_uid=config.max_connections_per_uid,
                max_pending_bytes_per_uid=config.max_pending_bytes_per_uid,
                partial_request_timeout_s=config.partial_request_timeout_ms / 1000,
            )
        logging.getLogger("flowagg").setLevel(config.log_level)
        if self._scheduler is not None:
            reschedule(self._scheduler, config, changed)
