"""The ingest pipeline on the event loop: validate → dedupe → journal → buffer → flusher.

Everything here runs on the asyncio loop thread, so the buffer, the dedupe index and the
counters need no locks. The journal writer and the flusher are threads; their results come
back through `loop.call_soon_threadsafe`, in order.

The pipeline wires the stages and takes entries in; checking them against the entry rules is
`entry_check`'s, and the buffer's way out to the flusher is `flush_driver`'s.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowagg.batches.aggregator import Aggregator, FlushPolicy
from flowagg.batches.cut_queue import CutQueue
from flowagg.batches.published import skip_uncut
from flowagg.batches.replayed import sync_folders
from flowagg.batches.spill import Spill
from flowagg.core.clock import Clock, EntryIdFactory, WindowClock
from flowagg.core.config import Config
from flowagg.core.fsutil import is_disk_full
from flowagg.core.latency import LatencySamples
from flowagg.core.layout import Layout
from flowagg.core.redact import Redactor
from flowagg.core.supervise import Spawn, plain_thread
from flowagg.delivery.flusher import Flusher
from flowagg.ingest.add_result import AddResult
from flowagg.ingest.dedupe_gate import DedupeGate, LookupBusy, Valid
from flowagg.ingest.entry_check import EntryRules, check_add, check_compiled, validate_entries
from flowagg.ingest.flush_driver import FlushDriver
from flowagg.ingest.pipeline_status import (
    buffered_status,
    flusher_status,
    journal_status,
    latency_status,
)
from flowagg.journal.dedupe import DedupeIndex
from flowagg.journal.public import (
    MAX_RECORD_ENTRIES,
    Append,
    JournalWriter,
    Position,
    ScanResult,
)

log = logging.getLogger("flowagg.pipeline")

LATENCY_SAMPLES = 2048
# Below the unit's TimeoutStopSec (120 s): a stuck disk must not turn a stop into a SIGKILL.
SHUTDOWN_FLUSH_TIMEOUT_S = 60.0
# Rejections listed in a reply; the rest are only counted (`rejectedCount`).
MAX_LISTED_REJECTIONS = 100
DEDUPE_SAVE_INTERVAL_S = 600.0
# A start that replayed this many journal seqs into the filter saves it at once: daemons
# killed sooner than DEDUPE_SAVE_INTERVAL_S made every start replay the whole window again.
DEDUPE_SAVE_AFTER_REPLAY = 20_000


class Pipeline:
    def __init__(
        self,
        config: Config,
        layout: Layout,
        clock: Clock,
        loop: asyncio.AbstractEventLoop,
        ids: EntryIdFactory,
        *,
        next_retry_at: Callable[[int], int],
        store: Callable[[str, bytes], Path],
        spawn: Spawn = plain_thread,
    ) -> None:
        self.config = config
        self._spawn = spawn
        self.layout = layout
        self.clock = clock
        self.loop = loop
        self.ids = ids
        self._next_retry_at = next_retry_at
        self._store = store
        self.aggregator = Aggregator(FlushPolicy.from_config(config))
        self.redactor = Redactor(config.redact_keys, config.redact_patterns)
        self.dedupe: DedupeIndex | None = None
        self.window_clock = WindowClock(clock, 0)  # anchored on the journal at start
        self.gate = DedupeGate(loop)  # client ids being decided or journaled
        self.writer: JournalWriter | None = None
        self.flusher: Flusher | None = None
        self.spill = Spill()
        self.flushing = FlushDriver(
            layout, clock, loop, self.aggregator, self.spill, latency_samples=LATENCY_SAMPLES
        )
        self.last_acked_seq = 0
        self.counters: Counter[str] = Counter()
        self.add_latency = LatencySamples(LATENCY_SAMPLES)
        self.last_journal_error: str | None = None
        self._dedupe_saved_at = clock.monotonic()
        self._dedupe_saving: asyncio.Future[None] | None = None

    # -- start ------------------------------------------------------------------------------
    def start(self, scan: ScanResult) -> None:
        sync_folders(self.layout)
        self.dedupe = scan.dedupe
        self.window_clock = WindowClock(
            self.clock, max((s.max_t for s in scan.segments), default=0)
        )
        self.dedupe.expire(self.window_clock.now_ms())
        self._dedupe_saved_at = self.clock.monotonic()
        if self.dedupe.seq - self.dedupe.saved_seq >= DEDUPE_SAVE_AFTER_REPLAY:
            self._dedupe_saving = self.loop.run_in_executor(None, self._save_dedupe)
        self.flushing.done_seq = scan.done_seq
        self.last_acked_seq = scan.next_seq - 1
        self.aggregator.last_seq_loaded = scan.done_seq
        self.aggregator.acknowledge(scan.backlog_entries, scan.backlog_bytes)
        self.aggregator.replay.extend(scan.cuts)
        if scan.quarantined or not scan.clean_tail:
            # A damaged record may have been a cut whose batch is stored: a fresh cut of the
            # backlog gets that batch's id when it starts at the same entry, and written
            # blind it would land beside the stored copy (another suffix, recovery/).
            self.aggregator.look_until = scan.next_seq - 1
        self.writer = JournalWriter(
            self.layout.journal,
            segments=scan.segments,
            next_seq=scan.next_seq,
            segment_bytes=self.config.journal_segment_bytes,
            clean_tail=scan.clean_tail,
            deliver=lambda results: self.loop.call_soon_threadsafe(self._journal_done, results),
            spawn=self._spawn,
        )
        self._size_records()
        self.writer.start()
        if scan.backlog is not None:
            self.spill.resume_at(scan.backlog)
            skipped, done_seq = skip_uncut(
                self.layout, self.clock, self.aggregator, scan, self.writer.append_done
            )
            if skipped:
                self.flushing.done_seq = done_seq
                self.counters["batchesFoundAtStart"] += skipped
        self.flusher = Flusher(
            self.layout,
            self.clock,
            immediate_retries=self.config.immediate_retries,
            next_retry_at=self._next_retry_at,
            store=self._store,
            on_stored=lambda stored: self.loop.call_soon_threadsafe(
                self.flushing.batches_stored, stored
            ),
            spawn=self._spawn,
            writers=self.config.flush_writers,
        )
        self.flusher.start()
        cuts = CutQueue(self.loop, self.writer, self.flusher.submit, self._cut_failed)
        self.flushing.attach(self.writer, cuts)
        self.flushing.refill()

    def reconfigure(self, config: Config) -> None:
        """Apply reloaded flush settings; the buffer is kept and re-checked at once."""
        self.config = config
        self.aggregator.policy = FlushPolicy.from_config(config)
        self.redactor.reconfigure(config.redact_keys, config.redact_patterns)
        if self.flusher is not None:
            self.flusher.immediate_retries = config.immediate_retries
        if self.writer is not None:
            self.writer.segment_bytes = config.journal_segment_bytes
            self._size_records()
        self.flushing.refill()

    def _size_records(self) -> None:
        """Records no larger than the window always fit once it drains."""
        assert self.writer is not None
        self.writer.max_record_entries = min(MAX_RECORD_ENTRIES, self.config.memory_window_entries)

    # -- intake -----------------------------------------------------------------------------
    def validate(
        self, raw_entries: list[Any], *, max_listed: int | None = None
    ) -> tuple[list[Valid], list[dict[str, Any]]]:
        """Check entries against §3 (`validate_entries`): (valid entries, rejections)."""
        return validate_entries(raw_entries, self._rules(), max_listed=max_listed)

    def validate_compiled(self, entries: list[Any]) -> list[Valid] | None:
        """`validate`'s valid entries when entry_codec decoded `entries` and all are valid."""
        return check_compiled(entries, self._rules())

    def _rules(self) -> EntryRules:
        return EntryRules(
            self.clock,
            self.config.max_entry_bytes,
            self.ids.new,
            self.redactor if self.redactor.active else None,
        )

    async def add(self, raw_entries: list[Any]) -> AddResult:
        valid, rejected, rejected_count = check_add(
            raw_entries, self._rules(), max_listed=MAX_LISTED_REJECTIONS
        )
        result = await self.add_valid(valid, wait_for_space=False)
        result.rejected_count = rejected_count
        if result.error is None:
            self.counters["rejected"] += result.rejected_count
        result.rejected = rejected
        return result

    async def add_valid(
        self,
        valid: list[Valid],
        *,
        src: str | None = None,
        off: int | None = None,
        fin: bool = False,
        wait_for_space: bool,
        queued: Callable[[], None] | None = None,
    ) -> AddResult:
        """Dedupe, journal (one record, one group commit) and buffer validated entries.

        `queued` runs once the record is queued for the journal (never when the add ends
        without one): the caller may queue another behind it, in order, and await both.
        """
        started = self.clock.monotonic()
        if not await self._room(wait_for_space):
            return self._busy()
        dedupe = self.dedupe
        assert dedupe is not None
        try:
            screened = await self.gate.screen(valid, dedupe, self.window_clock.now_ms)
        except LookupBusy:
            # Neither new nor a duplicate for sure: accepting could store it twice.
            return self._busy()
        claim, claimed = screened.claim, screened.claimed
        # The screen may have waited: check the bound again before counting these entries.
        if not await self._room(wait_for_space):
            self.gate.release(claim, claimed, known=False)
            return self._busy()
        result = AddResult(duplicates=screened.duplicates)
        datas, ids = screened.datas, screened.ids
        if not datas and src is None:
            self.gate.release(claim, claimed, known=True)
            self.counters["duplicates"] += result.duplicates
            return result
        assert self.writer is not None
        now = self.window_clock.arrival_ms()
        client_ids = screened.client_ids
        # Counted before the await, so concurrent requests cannot all pass the busy check.
        size = sum(map(len, datas)) + len(datas)
        self.aggregator.acknowledge(len(datas), size)
        done: asyncio.Future[BaseException | None] = self.loop.create_future()
        first_seq = 0

        def durable(error: BaseException | None, after: Position) -> None:
            if error is not None:
                self.aggregator.acknowledge(-len(datas), -size)
            else:
                dedupe.expire(self.window_clock.now_ms())  # before a new generation starts
                dedupe.add(client_ids, now, first_seq + len(datas) - 1, screened.keys)
                if datas:
                    self.last_acked_seq = first_seq + len(datas) - 1
                    arrival = self.clock.monotonic()
                    self.spill.take(self.aggregator, first_seq, now, arrival, datas, ids, after)
            # Resends of these ids waited for this: now they are duplicates, or new again.
            self.gate.release(claim, claimed, known=error is None)
            done.set_result(error)

        try:
            first_seq = self.writer.append_entries(
                datas, now, screened.client_idx, src, durable, off=off, fin=fin
            )
        except OSError as exc:
            self.gate.release(claim, claimed, known=False)
            self.aggregator.acknowledge(-len(datas), -size)
            return self._journal_failure(exc)
        if queued is not None:
            queued()
        error = await done
        if error is not None:
            return self._journal_failure(error)
        self.last_journal_error = None
        result.accepted = len(datas)
        self.counters["accepted"] += len(datas)
        self.counters["duplicates"] += result.duplicates
        self.add_latency.append(self.clock.monotonic() - started)
        return result

    async def _room(self, wait_for_space: bool) -> bool:
        """False when the buffer is over its bound and this add may not wait."""
        while self.aggregator.is_busy():
            if not wait_for_space:
                return False
            await self.flushing.wait_for_space()
        return True

    def _busy(self) -> AddResult:
        self.counters["busy"] += 1
        return AddResult(error="busy", retry_after_ms=self.config.busy_retry_after_ms)

    def _journal_failure(self, exc: BaseException) -> AddResult:
        self.last_journal_error = f"{type(exc).__name__}: {exc}"
        self.counters["journalErrors"] += 1
        if is_disk_full(exc):
            return AddResult(error="disk_full", retry_after_ms=1000)
        code = errno.errorcode.get(getattr(exc, "errno", 0) or 0, "error")
        return AddResult(error=f"journal_unavailable: {code}", retry_after_ms=1000)

    def _cut_failed(self, error: BaseException) -> None:
        self.last_journal_error = f"{type(error).__name__}: {error}"
        self.counters["journalErrors"] += 1

    def _journal_done(self, results: list[tuple[Append, BaseException | None, Position]]) -> None:
        for append, error, after in results:
            if append.callback is not None:
                append.callback(error, after)
        self.flushing.refill()

    @property
    def batches_found_at_start(self) -> int:
        """Batches a start found stored, not yet marked done: written again would be twice."""
        found = self.flusher.found_at_start if self.flusher is not None else 0
        return self.counters["batchesFoundAtStart"] + found

    @property
    def spilled(self) -> bool:
        return self.spill.spilled

    # -- flushing ---------------------------------------------------------------------------
    async def flush(self, trigger: str = "manual", *, include_disk: bool = True) -> dict[str, int]:
        """Store every entry acknowledged before this call; returns once they are stored.

        The counts are `FlushDriver.flush`'s. Without `include_disk` only the memory window is
        written (the rest stays journaled).
        """
        target = self.last_acked_seq if include_disk else self.aggregator.last_seq_loaded
        return await self.flushing.flush(target, trigger)

    def expire_dedupe(self) -> int:
        """Forget client entryIds older than the window; now and then save the filter."""
        if self.dedupe is None:
            return 0
        expired = self.dedupe.expire(self.window_clock.now_ms())
        saving = self._dedupe_saving
        if (saving is None or saving.done()) and (
            self.clock.monotonic() - self._dedupe_saved_at >= DEDUPE_SAVE_INTERVAL_S
        ):
            # Bounds what a start after kill -9 replays; the filter is tens of MB, so not often.
            self._dedupe_saved_at = self.clock.monotonic()
            self._dedupe_saving = self.loop.run_in_executor(None, self._save_dedupe)
        return expired

    def _save_dedupe(self) -> None:
        assert self.dedupe is not None
        try:
            self.dedupe.save()
        except OSError as exc:
            log.error("cannot save the dedupe filter (%s); the next start replays more", exc)

    def compact_journal(self) -> int:
        if self.writer is None:
            return 0
        horizon = self.window_clock.now_ms() - self.config.dedupe_window_ms
        return len(self.writer.compact(self.writer.durable_done_seq, horizon))

    async def shutdown(
        self, flush_s: float = SHUTDOWN_FLUSH_TIMEOUT_S, join_s: float | None = None
    ) -> list[str]:
        """Flush what is in memory (the disk backlog stays journaled), then stop the threads.

        Returns the threads still busy after `join_s` (they are left to the process exit).
        """
        self.flushing.cancel_age_timer()
        # Nothing can be stored while the flusher is stalled, nor cut without the journal.
        stalled = (self.flusher is not None and self.flusher.stalled_error is not None) or (
            self.writer is not None and self.writer.broken
        )
        if not stalled and flush_s > 0:
            try:
                await asyncio.wait_for(self.flush("shutdown", include_disk=False), flush_s)
            except TimeoutError:
                log.error("the shutdown flush is stuck; what it did not write stays journaled")
        busy = []
        flusher, writer = self.flusher, self.writer
        if flusher and not await asyncio.to_thread(flusher.stop, give_up=True, timeout=join_s):
            busy.append("flusher")
        if writer and not await asyncio.to_thread(writer.stop, join_s):
            busy.append("journal-writer")
        if self._dedupe_saving is not None:
            await self._dedupe_saving
        if self.dedupe is not None:
            await asyncio.to_thread(self.dedupe.close)
        return busy

    # -- reporting --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "buffered": buffered_status(self.aggregator),
            "counters": {
                "accepted": self.counters["accepted"],
                "duplicates": self.counters["duplicates"],
                "rejected": self.counters["rejected"],
                "busy": self.counters["busy"],
                "journalErrors": self.counters["journalErrors"],
                "redactedEntries": self.redactor.entries,
                "redactedValues": self.redactor.values,
                "batches": dict(self.flushing.batches_by_trigger),
                "storedEntries": self.flushing.stored_entries,
            },
            "journal": journal_status(self.writer, self.last_journal_error),
            "flusher": flusher_status(self.flusher),
            "lastFlushAt": self.flushing.last_flush_at,
            "latencyMs": latency_status(self.add_latency, self.flushing.flush_latency),
        }
