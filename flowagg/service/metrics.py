"""Prometheus metrics (SPEC §11): `flowagg metrics`, `metricsListen` and `metricsTextfile`.

Nothing is counted twice: a scrape takes one snapshot of the daemon's own counters and
status on the event loop (where they live, so no locks) and a custom collector turns it into
metric families. The HTTP server (metrics_server) answers on the loop too; the textfile is
rendered on the loop and written atomically in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from flowagg import __version__
from flowagg.core.config_values import parse_listen
from flowagg.core.fsutil import atomic_write
from flowagg.service.metrics_server import MetricsServer, listen_socket

if TYPE_CHECKING:
    from flowagg.service.daemon_host import MetricsSource

log = logging.getLogger("flowagg.metrics")

# node_exporter runs as its own user; the file holds counts and no entry contents.
TEXTFILE_MODE = 0o644
BREAKER_STATES = ("closed", "open", "half-open")
Snapshot = dict[str, Any]


def snapshot(daemon: MetricsSource, status: dict[str, Any]) -> Snapshot:
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


class SnapshotCollector:
    """Metric families from a snapshot, taken afresh for every collect()."""

    def __init__(self, take: Callable[[], Snapshot]) -> None:
        self._take = take

    def collect(self) -> Iterator[Metric]:
        return iter(families(self._take()))


def _counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    family = CounterMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


def families(snap: Snapshot) -> list[Metric]:
    st = snap["status"]
    counters = st["counters"]
    out: list[Metric] = []
    info = InfoMetricFamily("flowagg_build", "flowagg's version")
    info.add_metric([], {"version": __version__})
    out.append(info)
    out.append(
        _gauge("flowagg_start_time_seconds", "Unix time the daemon started", snap["startTime"])
    )
    out.append(
        _counter(
            "flowagg_entries_accepted", "entries acknowledged (stored once)", counters["accepted"]
        )
    )
    rejected = CounterMetricFamily(
        "flowagg_entries_rejected", "entries refused as invalid", labels=["source"]
    )
    rejected.add_metric(["socket"], counters["rejected"])
    rejected.add_metric(["spool"], st["spool"]["entriesRejected"])
    out.append(rejected)
    out.append(
        _counter(
            "flowagg_entries_duplicate",
            "entries acknowledged as duplicates",
            counters["duplicates"],
        )
    )
    out.append(
        _counter(
            "flowagg_entries_redacted",
            "entries with at least one redacted value",
            counters["redactedEntries"],
        )
    )
    out.append(
        _counter("flowagg_redacted_values", "metadata values redacted", counters["redactedValues"])
    )
    out.append(
        _counter(
            "flowagg_entries_rate_limited",
            "entries answered rate_limited",
            st["rateLimit"]["limitedEntries"],
        )
    )
    out.append(_counter("flowagg_busy_replies", "add requests answered busy", counters["busy"]))
    out.append(
        _counter("flowagg_journal_errors", "journal appends that failed", counters["journalErrors"])
    )
    batches = CounterMetricFamily(
        "flowagg_batches_written", "batch files written, by trigger", labels=["trigger"]
    )
    for trigger in ("size", "age", "threshold", "manual", "shutdown"):
        batches.add_metric([trigger], counters["batches"].get(trigger, 0))
    for trigger, count in sorted(counters["batches"].items()):
        if trigger not in ("size", "age", "threshold", "manual", "shutdown"):
            batches.add_metric([trigger], count)
    out.append(batches)
    out.append(
        _counter("flowagg_entries_stored", "entries written to batch files", snap["storedEntries"])
    )
    recovery = CounterMetricFamily(
        "flowagg_recovery_batches", "recovery loop outcomes", labels=["outcome"]
    )
    for key, label in (
        ("recovered", "recovered"),
        ("failedAgain", "failed_again"),
        ("abandoned", "abandoned"),
    ):
        recovery.add_metric([label], st["recovery"].get(key, 0))
    out.append(recovery)
    # Every attempt after a batch's first: inline ones, and each recovery pass's try.
    retries = st["flusher"]["inlineRetries"] + sum(
        st["recovery"].get(key, 0) for key in ("recovered", "failedAgain", "abandoned")
    )
    out.append(_counter("flowagg_retries", "inline and recovery retries of batches", retries))
    out.append(
        _gauge(
            "flowagg_buffer_entries", "entries not yet in batch files", st["buffered"]["entries"]
        )
    )
    out.append(
        _gauge(
            "flowagg_buffer_bytes",
            "bytes of entries not yet in batch files",
            st["buffered"]["bytes"],
        )
    )
    queue = st["queue"]
    out.append(_gauge("flowagg_failed_batches", "batches waiting in recovery/", queue["failed"]))
    out.append(
        _gauge("flowagg_abandoned_batches", "batches in recovery/abandoned/", queue["abandoned"])
    )
    out.append(
        _gauge("flowagg_error_files", "files quarantined in recovery/errors/", queue["errors"])
    )
    out.append(_gauge("flowagg_inbox_files", "spool files waiting in inbox/", queue["inbox"]))
    out.append(
        _gauge("flowagg_journal_bytes", "bytes of journal segments on disk", snap["journalBytes"])
    )
    out.append(
        _counter("flowagg_journal_syncs", "journal fsyncs (group commits)", st["journal"]["syncs"])
    )
    last = st["lastFlushAt"]
    out.append(
        _gauge(
            "flowagg_last_flush_timestamp_seconds",
            "Unix time of the last batch stored (0: none yet)",
            last / 1000 if last else 0,
        )
    )
    sink = st["sink"]
    breaker = GaugeMetricFamily(
        "flowagg_sink_breaker_state",
        "the sink's circuit breaker (1 for its state)",
        labels=["state"],
    )
    for state in BREAKER_STATES:
        breaker.add_metric([state], 1 if sink and sink["state"] == state else 0)
    out.append(breaker)
    if sink:
        out.append(_counter("flowagg_sink_failures", "failed sink deliveries", sink["failures"]))
    for name, key, doc in (
        ("flowagg_add_latency_seconds", "addLatency", "add requests, arrival to durable reply"),
        ("flowagg_flush_latency_seconds", "flushLatency", "batch writes, cut to stored"),
    ):
        buckets, total = snap[key]
        out.append(HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total))
    return out


def _registry(snap: Snapshot) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))  # type: ignore[arg-type]
    return registry


def render(snap: Snapshot, *, openmetrics: bool = False) -> bytes:
    return (generate_openmetrics if openmetrics else generate_latest)(_registry(snap))


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
        encoder, content_type = choose_encoder(accept)
        return encoder(_registry(snapshot(self.daemon, self._status()))), content_type

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
