"""The flusher thread: turns cut batches into files, strictly in order, off the ack path.

Layer 1 of SPEC §6: a batch that cannot be completed (written to aggregated/, after the sink
took it) is retried inline (`immediateRetries`, 50/100/200 ms), then written to
recovery/<id>.failed.json; a permanent error goes straight to abandoned/. When even
that fails (disk full), the batch stays queued here, and in the journal, and is retried
with a capped backoff: never dropped, and no later batch overtakes it (the journal's done
cursor relies on batches being stored in order).

Once the sink accepted a batch, only the write is retried, inline and in the stall loop,
and the failed file says so (`sinkAcceptedAt`). An open breaker or an ambiguous delivery
parks the batch at once: inline sleeps would only hold up the batches behind it, and an
ambiguous one re-sent at once would likely reach the collector twice.

Without a sink, batches that queue up are written as a run (batch_runs): side by side,
published in order. A batch that fails there takes the one-at-a-time path above, and so
does every batch behind it in that run. With a sink, the run is delivered first, in order
or, for a sink that takes several batches at once, by the senders (sink_senders); the
batches before the first one not accepted are then written as a run.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from flowagg.batches.batch_runs import MAX_RUN, STAGE_WORKERS, Staged, Stager
from flowagg.batches.replayed import find_stored
from flowagg.batches.storage import Batch, BatchNames
from flowagg.core.clock import Clock
from flowagg.core.errors import AmbiguousDelivery, CircuitOpenError
from flowagg.core.layout import Layout
from flowagg.core.supervise import Spawn, plain_thread
from flowagg.delivery.failed_format import Delivery
from flowagg.delivery.flush_parking import Parking
from flowagg.delivery.flush_runs import RunWriter
from flowagg.delivery.sink import as_completer
from flowagg.delivery.sink_senders import Senders

log = logging.getLogger("flowagg.flusher")

INLINE_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6)
STALL_MAX_DELAY_S = 5.0
OUTCOMES_KEPT = 1000
T = TypeVar("T")
Stored = tuple[Batch, Path, float]  # a batch, where it lies, seconds its write took


class Outcomes:
    """Recent (monotonic time, completed?) results of batch writes, for the success rate.

    The flusher thread records while the loop reads for health: every access holds the lock.
    """

    def __init__(self, maxlen: int = OUTCOMES_KEPT) -> None:
        self._lock = threading.Lock()
        self._items: deque[tuple[float, bool]] = deque(maxlen=maxlen)

    def record(self, at: float, ok: bool, count: int = 1) -> None:
        with self._lock:
            self._items.extend(itertools.repeat((at, ok), min(count, self._items.maxlen or 0)))

    def success_rate(self, since: float) -> float:
        """Share of completed writes at or after `since`; 1.0 when there were none."""
        with self._lock:
            recent = [ok for t, ok in self._items if t >= since]
        return sum(recent) / len(recent) if recent else 1.0


@dataclasses.dataclass
class Pending:
    """A batch a run handed to the one-at-a-time path, with what the run did with it."""

    batch: Batch
    data: bytes  # as delivered (empty: not encoded yet)
    delivery: Delivery = dataclasses.field(default_factory=Delivery)
    error: BaseException | None = None  # the run's delivery failed with this


class Flusher:
    def __init__(
        self,
        layout: Layout,
        clock: Clock,
        *,
        immediate_retries: int,
        next_retry_at: Callable[[int], int],
        store: Callable[[str, bytes], Path],
        on_stored: Callable[[list[Stored]], None],
        sleep: Callable[[float], bool] | None = None,
        spawn: Spawn = plain_thread,
        writers: int = STAGE_WORKERS,
    ) -> None:
        self.layout, self._names = layout, BatchNames.of(layout)
        self.clock = clock
        self.immediate_retries = immediate_retries
        self.parking = Parking(layout, next_retry_at)
        self.completer = as_completer(store)
        self._on_stored = on_stored
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._thread = spawn("flusher", self._run)
        self._stager = Stager(writers, spawn)
        self._runs = RunWriter(self._stager, clock, self._report)
        self._senders = Senders(spawn)
        self.stalled_error: str | None = None
        self.failed_batches = 0
        self._retries_lock = threading.Lock()  # senders retry inline side by side
        self.inline_retries = 0
        self.found_at_start = 0
        self.outcomes = Outcomes()

    def start(self) -> None:
        self._thread.start()

    def submit(self, batch: Batch) -> None:
        self._queue.put(batch)

    def stop(self, *, give_up: bool, timeout: float | None = None) -> bool:
        """Finish queued batches; with give_up, abandon a stalled retry (it stays journaled).

        False when the thread is still busy after `timeout` (stuck in a sink, say).
        """
        if give_up:
            self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                run, last = self._next_run()
                if run and not self._store_run(run):
                    return  # stopping while the disk refuses every write: the journal keeps it
                if last:
                    return
        finally:
            self._stager.stop()
            self._senders.stop()

    def _next_run(self) -> tuple[list[Batch], bool]:
        """The next batch and those queued behind it; True when the stop marker followed."""
        first = self._queue.get()
        if first is None:
            return [], True
        run = [first]
        while len(run) < MAX_RUN:
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                break
            if batch is None:
                return run, True
            run.append(batch)
        return run, False

    def _store_run(self, run: list[Batch]) -> bool:
        """Store `run` in order; False when a stop gave up on a batch (it stays journaled).

        A batch that may be stored already, or whose name is on disk (a damaged journal lost
        the cut that named it), is looked for first, alone: a batch file is never replaced.
        """
        started, names = self.clock.monotonic(), self._names
        while run:
            look = (n for n, b in enumerate(run) if b.look_first or names.taken(b.batch_id))
            n = next(look, len(run))
            if n and not self._store_fresh(run[:n], started):
                return False
            if n == len(run):
                return True
            if self._store_looked(run[n], started) is None:
                return False
            run = run[n + 1 :]
        return True

    def _store_fresh(self, run: list[Batch], started: float) -> bool:
        """With a sink, the run is delivered first (each batch with its inline retries), then
        the accepted ones are written as a run; the first batch the sink did not take, and
        every one after it, go one at a time."""
        files = self.completer.files
        if files is None:
            return self._store_each([(batch, None) for batch in run], started)
        if not self.completer.has_sink():
            stored = self._runs.write(run, files, started)
            return self._store_each([(batch, None) for batch in run[stored:]], started)
        accepted, rest = self._deliver_run(run)
        fixed = {a.batch.batch_id: a.data for a in accepted}
        stored = self._runs.write([a.batch for a in accepted], files, started, fixed)
        return self._store_each([(p.batch, p) for p in accepted[stored:] + rest], started)

    def _store_looked(self, batch: Batch, started: float, *, part: bool = False) -> Path | None:
        """A batch that may be stored already is only reported; one not stored is stored alone
        (a sink may have taken it before the crash). None when a stop gave up on it. `part`:
        entries a copy under another batch's id lacked, stored but not reported."""
        found, seconds = find_stored(self.layout, self.clock, batch), 0.0
        if found is None:
            delivery = Delivery(possibly_delivered=self.completer.has_sink())
            path = self._store(batch, Pending(batch, b"", delivery))
            seconds = self.clock.monotonic() - started
        else:
            path, rest = found
            # The entries a copy under the batch's id lacks go under an id of their own first:
            # the batch counts as stored (its done record) only once they are.
            if rest is not None and self._store_looked(rest, started, part=True) is None:
                return None
            self.found_at_start += not part
        if path is not None and not part:
            self._on_stored([(batch, path, seconds)])
        return path

    def _store_each(self, items: list[tuple[Batch, Pending | None]], started: float) -> bool:
        for batch, pending in items:
            path = self._store(batch, pending)
            if path is None:
                return False
            self._on_stored([(batch, path, self.clock.monotonic() - started)])
        return True

    def _deliver_run(self, run: list[Batch]) -> tuple[list[Pending], list[Pending]]:
        """Deliver until one is not taken: (the accepted, the first refused and those after
        it, each with what its delivery did)."""
        width = self.completer.parallel()
        if width > 1 and len(run) > 1:
            return self._deliver_at_once(run, width)
        accepted: list[Pending] = []
        for n, batch in enumerate(run):
            pending = Pending(batch, batch.encode(self.clock.now_ms()))
            try:
                self._inline(self._deliver, batch.batch_id, pending.data, pending.delivery)
            except Exception as exc:
                pending.error = exc
                return accepted, [pending, *(Pending(later, b"") for later in run[n + 1 :])]
            accepted.append(pending)
        return accepted, []

    def _deliver_at_once(self, run: list[Batch], width: int) -> tuple[list[Pending], list[Pending]]:
        """The senders deliver up to `width` batches of the run at a time."""
        now_ms = self.clock.now_ms()
        pendings = [Pending(batch, batch.encode(now_ms)) for batch in run]
        jobs = [
            functools.partial(self._inline, self._deliver, p.batch.batch_id, p.data, p.delivery)
            for p in pendings
        ]
        # A later batch the sink accepted keeps its bytes (only its write is left); a failed
        # one is parked with its error; one not begun is delivered when its turn comes.
        for pending, error in zip(pendings, self._senders.run(jobs, width), strict=True):
            pending.error = error
        taken = next((n for n, p in enumerate(pendings) if p.error is not None), len(run))
        return pendings[:taken], pendings[taken:]

    def _report(self, published: list[Staged], started: float) -> None:
        now = self.clock.monotonic()
        self.outcomes.record(now, True, len(published))
        if self.stalled_error:
            log.info(
                "batch %s written after a stall; writes work again", published[0].batch.batch_id
            )
            self.stalled_error = None
        self._on_stored([(staged.batch, staged.target, now - started) for staged in published])

    def _deliver(self, batch_id: str, data: bytes, delivery: Delivery) -> None:
        """Deliver unless the sink already accepted the batch."""
        if delivery.accepted_at is None:
            try:
                if self.completer.deliver(batch_id, data, resend=delivery.possibly_delivered):
                    delivery.accepted_at = self.clock.now_ms()
            except AmbiguousDelivery:
                delivery.possibly_delivered = True
                raise
            delivery.possibly_delivered = False

    def _attempt(self, batch_id: str, data: bytes, delivery: Delivery) -> Path:
        """Deliver unless the sink already accepted the batch, then write it."""
        self._deliver(batch_id, data, delivery)
        return self.completer.write(batch_id, data)

    def _inline(
        self, step: Callable[[str, bytes, Delivery], T], batch_id: str, data: bytes, d: Delivery
    ) -> T:
        """Layer 1: the first attempt plus `immediateRetries` more, 50/100/200 ms apart."""
        for delay in INLINE_DELAYS_S[: self.immediate_retries]:
            try:
                return step(batch_id, data, d)
            except (CircuitOpenError, AmbiguousDelivery):
                raise
            except OSError:
                with self._retries_lock:
                    self.inline_retries += 1
                self._sleep(delay)
        return step(batch_id, data, d)

    def _store(self, batch: Batch, pending: Pending | None = None) -> Path | None:
        """Complete one batch with every retry; `pending` carries what a run did with it
        (the sink accepted it, or refused it with `error`, which is then not tried again)."""
        stall_delay = 0.05
        pending = pending or Pending(batch, b"")
        delivery, data, failure = pending.delivery, pending.data, pending.error
        while True:
            if failure is None:
                # What the sink accepted is what gets written: the bytes stay fixed from then on.
                if delivery.accepted_at is None:
                    data = batch.encode(self.clock.now_ms())
                try:
                    written = self._inline(self._attempt, batch.batch_id, data, delivery)
                except Exception as exc:
                    failure = exc
                else:
                    self.outcomes.record(self.clock.monotonic(), True)
                    if self.stalled_error:
                        log.info(
                            "batch %s written after a stall; writes work again", batch.batch_id
                        )
                        self.stalled_error = None
                    return written
            try:
                target = self.parking.park(
                    batch.batch_id, data, failure, delivery, self.clock.now_ms()
                )
            except OSError as exc:
                self.stalled_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "batch %s cannot be stored anywhere (%s); it stays in the journal, retrying",
                    batch.batch_id,
                    self.stalled_error,
                )
            else:
                self.failed_batches += 1
                self.outcomes.record(self.clock.monotonic(), False)
                return target
            failure = None
            if self._sleep(stall_delay):
                return None
            stall_delay = min(stall_delay * 2, STALL_MAX_DELAY_S)
