"""The pipeline's part of `status --json` (SPEC §8), section by section."""

from __future__ import annotations

from collections import deque
from typing import Any

from flowagg.batches.aggregator import Aggregator
from flowagg.delivery.flusher import Flusher
from flowagg.journal.public import JournalWriter


def percentile(samples: deque[float] | list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def buffered_status(agg: Aggregator) -> dict[str, int]:
    in_memory = len(agg.window)
    return {
        "entries": agg.unflushed_entries,
        "bytes": agg.unflushed_bytes,
        "inMemory": in_memory,
        "inFlight": agg.inflight_entries,
        "onDisk": max(0, agg.unflushed_entries - in_memory - agg.inflight_entries),
    }


def journal_status(writer: JournalWriter | None, last_error: str | None) -> dict[str, Any]:
    return {
        "entries": writer.entries_written if writer else 0,
        "syncs": writer.syncs if writer else 0,
        "bytes": writer.bytes_written if writer else 0,
        "segments": len(writer.segments) if writer else 0,
        "lastError": last_error,
    }


def flusher_status(flusher: Flusher | None) -> dict[str, Any]:
    return {
        "stalledError": flusher.stalled_error if flusher else None,
        "parkedBatches": flusher.failed_batches if flusher else 0,
        "inlineRetries": flusher.inline_retries if flusher else 0,
    }


def latency_status(add: deque[float], flush: deque[float]) -> dict[str, float | None]:
    return {
        "addP50": _ms(percentile(add, 0.5)),
        "addP95": _ms(percentile(add, 0.95)),
        "addP99": _ms(percentile(add, 0.99)),
        "flushP50": _ms(percentile(flush, 0.5)),
        "flushP95": _ms(percentile(flush, 0.95)),
        "flushP99": _ms(percentile(flush, 0.99)),
    }
