"""Cut batches wait here until their cut is journaled, then go to the flusher in cut order.

A batch id must name one set of entries forever, so where a batch ends is a journal record
before the batch is delivered or written: a restart rebuilds exactly that cut. The cuts ride
on the journal's group commits; a cut whose write failed is journaled again after a pause,
and the batches behind it wait, since batches are stored in cut order. Runs on the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from flowagg.batches.storage import Batch
from flowagg.journal.public import Cut, JournalWriter, Position

log = logging.getLogger("flowagg.pipeline")

CUT_RETRY_S = 1.0  # a cut whose journal write failed is journaled again after this


class CutQueue:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        writer: JournalWriter,
        hand_over: Callable[[Batch], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._loop = loop
        self._writer = writer
        self._hand_over = hand_over
        self._on_error = on_error
        self._waiting: deque[Batch] = deque()  # in cut order
        self._durable: set[str] = set()

    def __len__(self) -> int:
        return len(self._waiting)

    def put(self, batch: Batch) -> None:
        """Journal the batch's cut; a batch rebuilt from a journaled cut is durable already."""
        self._waiting.append(batch)
        if batch.replayed:
            self._mark_durable(batch)
        else:
            self._journal(batch)

    def _journal(self, batch: Batch) -> None:
        assert batch.timestamp_ms is not None, "a fresh cut carries its timestamp"
        cut = Cut(
            batch.batch_id, batch.first_seq, batch.last_seq, batch.trigger, batch.timestamp_ms
        )

        def durable(error: BaseException | None, _after: Position) -> None:
            if error is None:
                self._mark_durable(batch)
            else:
                self._failed(batch, error)

        try:
            self._writer.append_cut(cut, durable)
        except OSError as exc:
            self._failed(batch, exc)

    def _failed(self, batch: Batch, error: BaseException) -> None:
        # The batch stays cut (its entries are journaled) and waits for its cut.
        self._on_error(error)
        log.error("cannot journal the cut of batch %s (%s); retrying", batch.batch_id, error)
        self._loop.call_later(CUT_RETRY_S, self._journal, batch)

    def _mark_durable(self, batch: Batch) -> None:
        self._durable.add(batch.batch_id)
        while self._waiting and self._waiting[0].batch_id in self._durable:
            head = self._waiting.popleft()
            self._durable.discard(head.batch_id)
            self._hand_over(head)
