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
does every batch behind it in that run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import orjson

from .audit import audit
from .batch_runs import MAX_RUN, STAGE_WORKERS, Staged, Stager, stage
from .clock import Clock
from .errors import AmbiguousDelivery, CircuitOpenError, PermanentError
from .fsutil import atomic_write, fsync_dir
from .layout import Layout
from .sink import as_completer
from .storage import Batch, CompletedFiles, encode_batch
from .supervise import Spawn, plain_thread

log = logging.getLogger("flowagg.flusher")

INLINE_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6)
STALL_MAX_DELAY_S = 5.0
OUTCOMES_KEPT = 1000
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
class Delivery:
    """What the flusher knows of one batch's delivery while it retries it."""

    accepted_at: int | None = None  # when the sink accepted it: from then on, only write
    possibly_delivered: bool = False  # the last attempt was ambiguous


def failed_document(
    batch_bytes: bytes,
    *,
    error: str,
    now_ms: int,
    next_retry_ms: int | None,
    delivery: Delivery,
) -> bytes:
    """The failed-batch format; without a next retry it is the abandoned format."""
    doc = orjson.loads(batch_bytes)
    doc.update(
        {
            "retryCount": 0,
            "lastRetryAt": now_ms,
            "lastError": error,
            "failedAt": now_ms,
        }
    )
    if delivery.accepted_at is not None:
        doc["sinkAcceptedAt"] = delivery.accepted_at
    elif delivery.possibly_delivered:
        doc["possiblyDelivered"] = True
    if next_retry_ms is None:
        doc.update(
            {
                "history": [{"at": now_ms, "error": error, "kind": "permanent"}],
                "abandonedAt": now_ms,
                "abandonReason": "permanent error",
            }
        )
    else:
        doc["nextRetryAt"] = next_retry_ms
    return orjson.dumps(doc)


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
    ) -> None:
        self.layout = layout
        self.clock = clock
        self.immediate_retries = immediate_retries
        self.next_retry_at = next_retry_at
        self.completer = as_completer(store)
        self._on_stored = on_stored
        self._queue: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._thread = spawn("flusher", self._run)
        self._stager = Stager(STAGE_WORKERS, spawn)
        self.stalled_error: str | None = None
        self.failed_batches = 0
        self.inline_retries = 0
        self.unexpected_errors = 0
        self._traced: set[str] = set()
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
        """Store `run` in order; False when a stop gave up on a batch (it stays journaled)."""
        started = self.clock.monotonic()
        files = self.completer.files()
        rest = self._write_run(run, files, started) if files is not None else 0
        for batch in run[rest:]:
            path = self._store(batch)
            if path is None:
                return False
            self._on_stored([(batch, path, self.clock.monotonic() - started)])
        return True

    def _write_run(self, run: list[Batch], files: CompletedFiles, started: float) -> int:
        """Write the run's files side by side and publish them in order.

        Returns how many batches were stored; the rest go one at a time.
        """
        now_ms = self.clock.now_ms()

        def job(batch: Batch) -> Callable[[], Staged]:
            return lambda: stage(
                batch,
                files.path(batch.batch_id),
                files.file_bytes(encode_batch(batch, timestamp_ms=now_ms)),
            )

        if len(run) == 1:
            done: concurrent.futures.Future[Staged] = concurrent.futures.Future()
            try:
                done.set_result(job(run[0])())
            except Exception as exc:
                done.set_exception(exc)
            futures = [done]
        else:
            self._stager.start()
            futures = [self._stager.submit(job(batch)) for batch in run]
        renamed: list[Staged] = []
        stored, end = 0, len(run)
        for n, future in enumerate(futures):
            if renamed and not future.done():
                if not self._publish(renamed, started):
                    end, renamed = n, []
                    break
                stored, renamed = n, []
            try:
                staged = future.result()
            except Exception as exc:
                log.warning("batch %s: run write failed (%s); retried alone", run[n].batch_id, exc)
                end = n
                break
            try:
                os.rename(staged.tmp, staged.target)
            except OSError as exc:
                staged.discard()
                log.warning("batch %s: rename failed (%s); retried alone", run[n].batch_id, exc)
                end = n
                break
            renamed.append(staged)
        if renamed and self._publish(renamed, started):
            stored += len(renamed)
        for future in futures[end:]:
            with contextlib.suppress(Exception):
                future.result().discard()
        return stored

    def _publish(self, renamed: list[Staged], started: float) -> bool:
        """Make the renamed files' names durable, then report them stored, in order."""
        if not renamed:
            return True
        try:
            fsync_dir(renamed[0].target.parent)
        except OSError as exc:
            # Visible but perhaps not durable: the one-at-a-time path writes them again.
            log.warning("run of %d batch files: directory fsync failed (%s)", len(renamed), exc)
            return False
        now = self.clock.monotonic()
        self.outcomes.record(now, True, len(renamed))
        if self.stalled_error:
            log.info("batch %s written after a stall; writes work again", renamed[0].batch.batch_id)
            self.stalled_error = None
        self._on_stored([(staged.batch, staged.target, now - started) for staged in renamed])
        return True

    def _attempt(self, batch_id: str, data: bytes, delivery: Delivery) -> Path:
        """Deliver unless the sink already accepted the batch, then write it."""
        if delivery.accepted_at is None:
            try:
                if self.completer.deliver(batch_id, data, resend=delivery.possibly_delivered):
                    delivery.accepted_at = self.clock.now_ms()
            except AmbiguousDelivery:
                delivery.possibly_delivered = True
                raise
            delivery.possibly_delivered = False
        return self.completer.write(batch_id, data)

    def _write_inline(self, batch_id: str, data: bytes, delivery: Delivery) -> Path:
        """Layer 1: the first attempt plus `immediateRetries` more, 50/100/200 ms apart."""
        for delay in INLINE_DELAYS_S[: self.immediate_retries]:
            try:
                return self._attempt(batch_id, data, delivery)
            except (CircuitOpenError, AmbiguousDelivery):
                raise
            except OSError:
                self.inline_retries += 1
                self._sleep(delay)
        return self._attempt(batch_id, data, delivery)

    def _store(self, batch: Batch) -> Path | None:
        stall_delay = 0.05
        delivery = Delivery()
        data = b""
        while True:
            # What the sink accepted is what gets written: the bytes stay fixed from then on.
            if delivery.accepted_at is None:
                data = encode_batch(batch, timestamp_ms=self.clock.now_ms())
            try:
                written = self._write_inline(batch.batch_id, data, delivery)
                self.outcomes.record(self.clock.monotonic(), True)
                if self.stalled_error:
                    log.info("batch %s written after a stall; writes work again", batch.batch_id)
                    self.stalled_error = None
                return written
            except PermanentError as exc:
                error, permanent = f"{type(exc).__name__}: {exc}", True
                log.error("batch %s refused for good: %s", batch.batch_id, error)
            except OSError as exc:
                error, permanent = f"{type(exc).__name__}: {exc}", False
                log.error("batch %s could not be completed: %s", batch.batch_id, error)
            except Exception as exc:
                # A bug or an unforeseen error (a sink's bad URL, say): handled like a transient
                # failure, so the batch is parked and retried instead of dying with the thread.
                error, permanent = f"{type(exc).__name__}: {exc}", False
                self.unexpected_errors += 1
                self._log_unexpected(batch.batch_id, exc)
            now = self.clock.now_ms()
            if permanent:
                target = self.layout.abandoned / f"{batch.batch_id}.abandoned.json"
                doc = failed_document(
                    data, error=error, now_ms=now, next_retry_ms=None, delivery=delivery
                )
            else:
                target = self.layout.recovery / f"{batch.batch_id}.failed.json"
                doc = failed_document(
                    data,
                    error=error,
                    now_ms=now,
                    next_retry_ms=self.next_retry_at(now),
                    delivery=delivery,
                )
            try:
                atomic_write(target, doc)
                self.failed_batches += 1
                self.outcomes.record(self.clock.monotonic(), False)
                if permanent:
                    audit("abandon", batchId=batch.batch_id, reason=error, retryCount=0)
                log.warning("batch %s parked in %s/: %s", batch.batch_id, target.parent.name, error)
                return target
            except OSError as exc:
                self.stalled_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "batch %s cannot be stored anywhere (%s); it stays in the journal, retrying",
                    batch.batch_id,
                    self.stalled_error,
                )
            if self._sleep(stall_delay):
                return None
            stall_delay = min(stall_delay * 2, STALL_MAX_DELAY_S)

    def _log_unexpected(self, batch_id: str, exc: Exception) -> None:
        """The traceback once per kind of error; a repeat gets one line."""
        kind = type(exc).__name__
        if kind in self._traced:
            log.error("batch %s: unexpected %s: %s", batch_id, kind, exc)
            return
        self._traced.add(kind)
        log.error("batch %s: unexpected error; it is parked and retried", batch_id, exc_info=exc)
