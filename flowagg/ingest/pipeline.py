"""The ingest pipeline on the event loop: validate → dedupe → journal → buffer → flusher.

Everything here runs on the asyncio loop thread, so the buffer, the dedupe index and the
counters need no locks. The journal writer and the flusher are threads; their results come
back through `loop.call_soon_threadsafe`, in order.
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
from flowagg.batches.storage import Batch
from flowagg.core.clock import Clock, EntryIdFactory, WindowClock
from flowagg.core.config import Config
from flowagg.core.entries import EntryError, validate_entry_json
from flowagg.core.fsutil import is_disk_full
from flowagg.core.latency import LatencySamples
from flowagg.core.layout import Layout
from flowagg.core.redact import Redactor
from flowagg.core.supervise import Spawn, plain_thread
from flowagg.delivery.flusher import Flusher, Stored
from flowagg.ingest.add_result import AddResult
from flowagg.ingest.dedupe_gate import DedupeGate, LookupBusy, Valid
from flowagg.ingest.entry_codec import DecodedEntries, check_decoded
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
        self.done_seq = 0
        self.last_acked_seq = 0
        self.stored_batches = 0
        self.stored_entries = 0
        # Of those, the ones parked in recovery/ or abandoned/ rather than completed.
        self.parked_batches = 0
        self.parked_entries = 0
        self.counters: Counter[str] = Counter()
        self.batches_by_trigger: Counter[str] = Counter()
        self.last_flush_at: int | None = None
        self.add_latency = LatencySamples(LATENCY_SAMPLES)
        self.flush_latency = LatencySamples(LATENCY_SAMPLES)
        self.last_journal_error: str | None = None
        self._batch_waiters: dict[str, asyncio.Future[None]] = {}
        self.cuts: CutQueue | None = None
        self._age_timer: asyncio.TimerHandle | None = None
        self._space_waiters: list[asyncio.Future[None]] = []
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
        self.done_seq = scan.done_seq
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
                self.done_seq = done_seq
                self.counters["batchesFoundAtStart"] += skipped
        self.flusher = Flusher(
            self.layout,
            self.clock,
            immediate_retries=self.config.immediate_retries,
            next_retry_at=self._next_retry_at,
            store=self._store,
            on_stored=lambda stored: self.loop.call_soon_threadsafe(self._batches_stored, stored),
            spawn=self._spawn,
            writers=self.config.flush_writers,
        )
        self.flusher.start()
        self.cuts = CutQueue(self.loop, self.writer, self.flusher.submit, self._cut_failed)
        self._refill()

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
        self._refill()

    def _size_records(self) -> None:
        """Records no larger than the window always fit once it drains."""
        assert self.writer is not None
        self.writer.max_record_entries = min(MAX_RECORD_ENTRIES, self.config.memory_window_entries)

    # -- intake -----------------------------------------------------------------------------
    def validate(
        self, raw_entries: list[Any], *, max_listed: int | None = None
    ) -> tuple[list[Valid], list[dict[str, Any]]]:
        """Check entries against §3: (valid entries, rejections).

        Past `max_listed` rejections are only counted: len(raw) - len(valid) is the total.
        """
        now = self.clock.now_ms()
        limit = self.config.max_entry_bytes
        new_id = self.ids.new
        redact = self.redactor.metadata if self.redactor.active else None
        valid: list[Valid] = []
        rejected: list[dict[str, Any]] = []
        for index, raw in enumerate(raw_entries):
            try:
                valid.append(
                    validate_entry_json(
                        raw, index, now_ms=now, max_entry_bytes=limit, new_id=new_id, redact=redact
                    )
                )
            except EntryError as exc:
                if max_listed is None or len(rejected) < max_listed:
                    rejected.append({"index": index, "error": str(exc)})
        return valid, rejected

    async def add(self, raw_entries: list[Any]) -> AddResult:
        valid: list[Valid] | None = None
        rejected: list[dict[str, Any]] = []
        if isinstance(raw_entries, DecodedEntries):
            valid = check_decoded(
                raw_entries,
                now_ms=self.clock.now_ms(),
                max_entry_bytes=self.config.max_entry_bytes,
                new_id=self.ids.new,
                redact=self.redactor.metadata if self.redactor.active else None,
            )
            if valid is None:  # some entry breaks a rule: the validator words why
                raw_entries = raw_entries.plain()
        if valid is None:
            valid, rejected = self.validate(raw_entries, max_listed=MAX_LISTED_REJECTIONS)
        result = await self.add_valid(valid, wait_for_space=False)
        result.rejected_count = len(raw_entries) - len(valid)
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
    ) -> AddResult:
        """Dedupe, journal (one record, one group commit) and buffer validated entries."""
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
        size = sum(len(d) + 1 for d in datas)
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
            await self.wait_for_space()
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

    def _journal_done(self, results: list[tuple[Append, BaseException | None, Position]]) -> None:
        for append, error, after in results:
            if append.callback is not None:
                append.callback(error, after)
        self._refill()

    @property
    def batches_found_at_start(self) -> int:
        """Batches a start found stored, not yet marked done: written again would be twice."""
        found = self.flusher.found_at_start if self.flusher is not None else 0
        return self.counters["batchesFoundAtStart"] + found

    @property
    def spilled(self) -> bool:
        return self.spill.spilled

    def _refill(self) -> None:
        """Load what waits on disk as room allows (after every durable append and every
        stored batch), then check the triggers."""
        if self.writer is not None:
            self.spill.refill(self.aggregator, self.writer, self.clock.monotonic())
            if self.aggregator.replay_waits() and not self.spill.spilled:
                # Every durable record is loaded, yet a journaled cut lacks entries: they were
                # in a record damaged since and quarantined. What is left keeps the cut's id
                # (cut anew, its first entry would name a batch of other entries).
                self.aggregator.stop_waiting()
                log.error(
                    "journaled batch %s lost entries to a damaged record",
                    self.aggregator.replay[0].batch_id,
                )
        self._check_triggers()

    # -- flushing ---------------------------------------------------------------------------
    def _check_triggers(self) -> None:
        for batch in self.aggregator.cut_due(self.clock.monotonic(), self.clock.now_ms()):
            self._submit(batch)
        self._arm_age_timer()

    def _arm_age_timer(self) -> None:
        if self._age_timer is not None:
            self._age_timer.cancel()
            self._age_timer = None
        deadline = self.aggregator.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self.clock.monotonic())
            self._age_timer = self.loop.call_later(delay, self._check_triggers)

    def _submit(self, batch: Batch) -> asyncio.Future[None]:
        """Hand a cut batch on; the flusher gets it once its cut is durable (cut_queue)."""
        assert self.cuts is not None
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._batch_waiters[batch.batch_id] = waiter
        self.cuts.put(batch)
        return waiter

    def _cut_failed(self, error: BaseException) -> None:
        self.last_journal_error = f"{type(error).__name__}: {error}"
        self.counters["journalErrors"] += 1

    def _batches_stored(self, stored: list[Stored]) -> None:
        """Batches reached disk, in order: one done record for the last covers them all."""
        for batch, path, seconds in stored:
            self.aggregator.stored(batch)
            self.batches_by_trigger[batch.trigger] += 1
            self.stored_batches += 1
            self.stored_entries += batch.count
            if path.parent != self.layout.aggregated:
                self.parked_batches += 1
                self.parked_entries += batch.count
            self.flush_latency.append(seconds)
            log.debug(
                "batch %s: %d entries, trigger %s -> %s/%s",
                batch.batch_id,
                batch.count,
                batch.trigger,
                path.parent.name,
                path.name,
            )
            waiter = self._batch_waiters.pop(batch.batch_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        last = stored[-1][0]
        self.done_seq = last.last_seq
        assert self.writer is not None
        self.writer.append_done(last.last_seq, last.batch_id)
        self.last_flush_at = self.clock.now_ms()
        for fut in self._space_waiters:
            if not fut.done():
                fut.set_result(None)
        self._space_waiters.clear()
        self._refill()

    async def flush(self, trigger: str = "manual", *, include_disk: bool = True) -> dict[str, int]:
        """Store every entry acknowledged before this call; returns once they are stored.

        Counts the batches and entries stored meanwhile, whatever trigger cut them: all of them
        (`batches`, `entries`), those completed into aggregated/ (`stored...`) and those that
        failed to recovery/ or abandoned/ (`failed...`). Without `include_disk` only the memory
        window is written (the rest stays journaled).
        """
        target = self.last_acked_seq if include_disk else self.aggregator.last_seq_loaded
        before = self._stored_counts()
        while self.done_seq < target:
            for batch in self.aggregator.cut_all(trigger, self.clock.now_ms()):
                self._submit(batch)
            pending = list(self._batch_waiters.values())
            if pending:
                await asyncio.gather(*pending)
            elif self.spilled:
                self._refill()
            else:
                break  # nothing left to cut, in flight or on disk
        self._arm_age_timer()
        batches, entries, failed_batches, failed_entries = (
            now - then for now, then in zip(self._stored_counts(), before, strict=True)
        )
        return {
            "batches": batches,
            "entries": entries,
            "storedBatches": batches - failed_batches,
            "storedEntries": entries - failed_entries,
            "failedBatches": failed_batches,
            "failedEntries": failed_entries,
        }

    def _stored_counts(self) -> tuple[int, int, int, int]:
        return (self.stored_batches, self.stored_entries, self.parked_batches, self.parked_entries)

    async def wait_for_space(self) -> None:
        """Wait until a batch is stored (the buffer shrinks); for spool intake under pressure."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self._space_waiters.append(fut)
        await fut

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
        if self._age_timer is not None:
            self._age_timer.cancel()
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
                "batches": dict(self.batches_by_trigger),
                "storedEntries": self.stored_entries,
            },
            "journal": journal_status(self.writer, self.last_journal_error),
            "flusher": flusher_status(self.flusher),
            "lastFlushAt": self.last_flush_at,
            "latencyMs": latency_status(self.add_latency, self.flush_latency),
        }
