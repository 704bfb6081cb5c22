"""Prometheus metrics (SPEC §11): `flowagg metrics`, `metricsListen` and `metricsTextfile`.

Nothing is counted twice: a scrape takes one snapshot of the daemon's own counters and
status on the event loop (where they live, so no locks) and a custom collector
(metrics_families) turns it into metric families. The HTTP server (metrics_server) answers
on the loop too; the textfile is rendered on the loop and written atomically in a worker
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowagg.core.config_values import parse_listen
from flowagg.core.fsutil import atomic_write
from flowagg.service.metrics_server import MetricsServer, listen_socket

if TYPE_CHECKING:
    from flowagg.service.daemon_host import MetricsSource

log = logging.getLogger("flowagg.metrics")

# node_exporter runs as its own user; the file holds counts and no entry contents.
TEXTFILE_MODE = 0o644


def snapshot(daemon: MetricsSource, status: dict[str, Any]) -> dict[str, Any]:
    """Everything a scrape shows, read on the event loop; `status` is `status --json`'s."""
    pipeline = daemon.pipeline
    assert pipeline is not None
    return {
        "status": status,
        "storedBatches": pipeline.flushing.stored_batches,
        "storedEntries": pipeline.flushing.stored_entries,
        "addLatency": (pipeline.add_latency.cumulative(), pipeline.add_latency.sum),
        "flushLatency": (
            pipeline.flushing.flush_latency.cumulative(),
            pipeline.flushing.flush_latency.sum,
        ),
        "journalBytes": _dir_bytes(daemon.layout.journal),
        "startTime": time.time() - status["uptimeS"],
    }


def _dir_bytes(path: Path) -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(path) as it:
        for item in it:
            with contextlib.suppress(FileNotFoundError):
                if item.is_file(follow_symlinks=False):
                    total += item.stat(follow_symlinks=False).st_size
    return total


class MetricsExport:
    """`metricsListen` and `metricsTextfile` for one daemon run."""

    def __init__(self, daemon: MetricsSource, status: Callable[[], dict[str, Any]]) -> None:
        self.daemon = daemon
        self._status = status
        self.listen: str | None = None
        self.textfile_writes = 0
        self.textfile_error: str | None = None
        self._server: MetricsServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        return {
            "listen": self.listen,
            "droppedConnections": self._server.dropped if self._server else 0,
            "textfileWrites": self.textfile_writes,
            "textfileError": self.textfile_error,
        }

    def start(self) -> None:
        config = self.daemon.config
        if config.metrics_listen:
            self._serve(*parse_listen(config.metrics_listen))
        if config.metrics_textfile:
            self._task = asyncio.get_running_loop().create_task(self._textfile_loop())

    def scrape(self, accept: str) -> tuple[bytes, str]:
        """One HTTP scrape: the format the Accept header prefers, from a fresh snapshot."""
        from flowagg.service.metrics_families import encode

        return encode(snapshot(self.daemon, self._status()), accept)

    def _serve(self, host: str, port: int) -> None:
        from flowagg.core.errors import FlowaggError

        try:
            sock = listen_socket(host, port)
        except OSError as exc:
            raise FlowaggError(
                f"metricsListen: cannot listen on {host}:{port} ({exc.strerror or exc});"
                " pick a free port or clear metricsListen"
            ) from None
        self._server = MetricsServer(self.scrape)
        self._serving = asyncio.get_running_loop().create_task(self._server.start(sock))
        bound = sock.getsockname()
        self.listen = f"{host if ':' not in host else f'[{host}]'}:{bound[1]}"
        log.info("metrics: serving http://%s/metrics", self.listen)

    async def _textfile_loop(self) -> None:
        while True:
            await self.write_textfile()
            await asyncio.sleep(self.daemon.config.metrics_textfile_interval_ms / 1000)

    async def write_textfile(self) -> None:
        from flowagg.service.metrics_families import render

        path = Path(self.daemon.config.metrics_textfile).expanduser()
        data = render(snapshot(self.daemon, self._status()))
        try:
            # node_exporter reads the file whole; a rename makes it see old or new, never half.
            await asyncio.to_thread(atomic_write, path, data, mode=TEXTFILE_MODE)
        except OSError as exc:
            if self.textfile_error is None:
                log.error("metrics: cannot write %s: %s", path, exc)
            self.textfile_error = f"{type(exc).__name__}: {exc}"
            return
        self.textfile_error = None
        self.textfile_writes += 1

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            await self.write_textfile()  # the last figures, for a scrape after the stop
        if self._serving is not None:
            await self._serving
        if self._server is not None:
            await self._server.stop()
