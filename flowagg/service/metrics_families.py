"""Prometheus metric families from a snapshot (service.metrics), and their rendering.

Apart from service.metrics so that a daemon nobody scrapes never imports prometheus_client:
it is imported at the first scrape, textfile write or `flowagg metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

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

BREAKER_STATES = ("closed", "open", "half-open")
# What service.metrics.snapshot takes on the event loop.
Snapshot = dict[str, Any]


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


def encode(snap: Snapshot, accept: str) -> tuple[bytes, str]:
    """An HTTP scrape's body in the format the Accept header prefers, and its type."""
    encoder, content_type = choose_encoder(accept)
    return encoder(_registry(snap)), content_type
