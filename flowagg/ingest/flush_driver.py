"""The buffer's way out: load what waits on disk, cut batches when due, hand them to the
flusher, and account for them once stored.

Apart from the pipeline's intake because it answers other events (a trigger's timer, batches
stored, a flush asked for) and owns other state: the batches in flight and what was stored.
Like the pipeline it runs on the asyncio loop thread, so its state needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from flowagg.batches.aggregator import Aggregator
from flowagg.batches.cut_queue import CutQueue
from flowagg.batches.spill import Spill
from flowagg.batches.storage import Batch
from flowagg.core.clock import Clock
from flowagg.core.latency import LatencySamples
from flowagg.core.layout import Layout
from flowagg.delivery.flusher import Stored
from flowagg.journal.public import JournalWriter

log = logging.getLogger("flowagg.pipeline")


class FlushDriver:
    def __init__(
        self,
        layout: Layout,
        clock: Clock,
        loop: asyncio.AbstractEventLoop,
        aggregator: Aggregator,
        spill: Spill,
        *,
        latency_samples: int,
    ) -> None:
        self.layout = layout
        self.clock = clock
        self.loop = loop
        self.aggregator = aggregator
        self.spill = spill
        self.writer: JournalWriter | None = None
        self.cuts: CutQueue | None = None
        self.done_seq = 0
        self.stored_batches = 0
        self.stored_entries = 0
        # Of those, the ones parked in recovery/ or abandoned/ rather than completed.
        self.parked_batches = 0
        self.parked_entries = 0
        self.batches_by_trigger: Counter[str] = Counter()
        self.last_flush_at: int | None = None
        self.flush_latency = LatencySamples(latency_samples)
        self._batch_waiters: dict[str, asyncio.Future[None]] = {}
        self._age_timer: asyncio.TimerHandle | None = None
        self._space_waiters: list[asyncio.Future[None]] = []

    def attach(self, writer: JournalWriter, cuts: CutQueue) -> None:
        """Drive from now on: the journal is open and cut batches can reach the flusher."""
        self.writer = writer
        self.cuts = cuts

    def refill(self) -> None:
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

    def _check_triggers(self) -> None:
        for batch in self.aggregator.cut_due(self.clock.monotonic(), self.clock.now_ms()):
            self._submit(batch)
        self._arm_age_timer()

    def _arm_age_timer(self) -> None:
        self.cancel_age_timer()
        deadline = self.aggregator.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self.clock.monotonic())
            self._age_timer = self.loop.call_later(delay, self._check_triggers)

    def cancel_age_timer(self) -> None:
        if self._age_timer is not None:
            self._age_timer.cancel()
            self._age_timer = None

    def _submit(self, batch: Batch) -> asyncio.Future[None]:
        """Hand a cut batch on; the flusher gets it once its cut is durable (cut_queue)."""
        assert self.cuts is not None
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._batch_waiters[batch.batch_id] = waiter
        self.cuts.put(batch)
        return waiter

    def batches_stored(self, stored: list[Stored]) -> None:
        """Batches reached disk, in order: one done record for the last covers them all."""
        aggregated = self.layout.aggregated  # a new Path per access: once per delivery
        for batch, path, seconds in stored:
            self.aggregator.stored(batch)
            self.batches_by_trigger[batch.trigger] += 1
            self.stored_batches += 1
            self.stored_entries += batch.count
            if path.parent != aggregated:
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
        self.refill()

    async def flush(self, target: int, trigger: str) -> dict[str, int]:
        """Store every entry up to seq `target`; returns once they are stored.

        Counts the batches and entries stored meanwhile, whatever trigger cut them: all of them
        (`batches`, `entries`), those completed into aggregated/ (`stored...`) and those that
        failed to recovery/ or abandoned/ (`failed...`).
        """
        before = self._stored_counts()
        while self.done_seq < target:
            for batch in self.aggregator.cut_all(trigger, self.clock.now_ms()):
                self._submit(batch)
            pending = list(self._batch_waiters.values())
            if pending:
                await asyncio.gather(*pending)
            elif self.spill.spilled:
                self.refill()
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
