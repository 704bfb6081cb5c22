"""`flowagg run`: the daemon's life cycle, in the manner of gunicorn's arbiter.

Signal handlers only enqueue the signal; the main loop dispatches `handle_term`,
`handle_usr1`, ... so no real work ever runs inside a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import random
import signal
import sys
import time
from typing import Any

import filelock

from . import __version__
from .clock import Clock, EntryIdFactory, SystemClock
from .config import Config
from .errors import AlreadyRunningError, RootUnusableError
from .fsutil import atomic_write, remove_stale_temps
from .journal import JournalVersionError, scan
from .layout import Layout
from .pipeline import Pipeline, count_files
from .sdnotify import notify
from .server import SocketServer
from .spool import SpoolIntake

log = logging.getLogger("flowagg.daemon")

MAINTENANCE_INTERVAL_S = 60.0
SIGNALS = {
    signal.SIGTERM: "term",
    signal.SIGINT: "int",
    signal.SIGUSR1: "usr1",
    signal.SIGHUP: "hup",
}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def read_pid(layout: Layout) -> int | None:
    try:
        return int(layout.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def setup_logging(layout: Layout, config: Config) -> None:
    root = logging.getLogger("flowagg")
    root.setLevel(config.log_level)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT)
    file_handler = logging.handlers.RotatingFileHandler(
        layout.logs / "aggregation.log",
        maxBytes=config.log_max_bytes,
        backupCount=config.log_backups,
        encoding="utf-8",
    )
    file_handler.setFormatter(formatter)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    root.addHandler(file_handler)
    root.addHandler(stderr)


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.layout = Layout(config.root_path)
        self.clock = clock or SystemClock()
        self.rng = rng
        self.started_mono = 0.0
        self.pipeline: Pipeline | None = None
        self.server: SocketServer | None = None
        self.spool: SpoolIntake | None = None
        self._signals: asyncio.Queue[str] | None = None
        self._stop = False
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
            result = await asyncio.to_thread(
                scan,
                self.layout.journal,
                self.layout.errors,
                now_ms=self.clock.now_ms(),
                dedupe_window_ms=self.config.dedupe_window_ms,
            )
        except JournalVersionError as exc:
            raise RootUnusableError(str(exc)) from None
        ids = EntryIdFactory(self.clock, self.rng)
        self.pipeline = Pipeline(self.config, self.layout, self.clock, loop, ids)
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
        maintenance = loop.call_later(MAINTENANCE_INTERVAL_S, self._maintenance)
        log.info("ready in %.3f s; socket %s", time.perf_counter() - started, self.layout.socket)
        notify(f"READY=1\nSTATUS=accepting entries\nMAINPID={os.getpid()}")
        while not self._stop:
            name = await self._signals.get()
            await getattr(self, f"handle_{name}")()
        maintenance.cancel()
        return await self._shutdown()

    def _maintenance(self) -> None:
        assert self.pipeline is not None
        self.pipeline.expire_dedupe()
        removed = self.pipeline.compact_journal()
        if removed:
            log.info("journal: removed %d stored segments", removed)
        asyncio.get_running_loop().call_later(MAINTENANCE_INTERVAL_S, self._maintenance)

    async def _shutdown(self) -> int:
        notify("STOPPING=1\nSTATUS=flushing")
        log.info("stopping: flushing the buffer")
        assert self.pipeline is not None
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
        assert self.pipeline is not None
        result = await self.pipeline.flush("manual")
        log.info("SIGUSR1 flush: %d batches, %d entries", result["batches"], result["entries"])

    async def handle_hup(self) -> None:
        log.warning("SIGHUP: reloading the config is not supported yet; restart to apply changes")

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
        return {
            "ok": False,
            "error": f"unknown op {op!r}; use add, flush, status or ping",
        }

    def status(self) -> dict[str, Any]:
        assert self.pipeline is not None
        spool = self.spool
        return {
            "pid": os.getpid(),
            "version": __version__,
            "root": str(self.layout.root),
            "uptimeS": round(self.clock.monotonic() - self.started_mono, 3),
            **self.pipeline.status(),
            "spool": {
                "filesIngested": spool.files_ingested if spool else 0,
                "filesQuarantined": spool.files_quarantined if spool else 0,
                "inbox": count_files(self.layout.inbox, (".json", ".jsonl")),
            },
            "failed": count_files(self.layout.recovery, ".failed.json"),
            "abandoned": count_files(self.layout.abandoned, ".abandoned.json"),
            "errors": count_files(self.layout.errors, ".reason.json"),
        }
