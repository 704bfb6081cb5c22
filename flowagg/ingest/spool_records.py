"""A spool file's chunks on their way into the journal (SPEC §4.2, steps 4 and 5 of spool.py).

A chunk's record is queued, and a turn (`Pending`) says how it went once awaited: a step
queues its files' records in name order, each once the one before is queued, and then awaits
them together, so they share group commits and still reach the journal in name order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from flowagg.ingest.add_result import AddResult
from flowagg.ingest.pipeline import Pipeline, Valid

log = logging.getLogger("flowagg.spool")

Progress = tuple[int, bool]  # journaled end offset, finished


@dataclasses.dataclass
class Pending:
    """Where a file's turn in a step left it: its last record queued for the journal (`added`
    says how that went), or settled without one (`finished`)."""

    adopted: str
    added: asyncio.Future[AddResult] | None = None
    off: int = 0
    fin: bool = False
    finished: bool = False


class SpoolRecords:
    def __init__(
        self,
        pipeline: Pipeline,
        progress: dict[str, Progress],
        *,
        rescan_s: float,
        stop_event: asyncio.Event,
    ) -> None:
        self.pipeline = pipeline
        # Adopted files still in journal/spool/ -> how far the journal holds them.
        self.progress = progress
        self.rescan_s = rescan_s
        self._stop_event = stop_event
        self.files_ingested = 0

    async def queue(
        self, adopted: str, valid: list[Valid], off: int, fin: bool, *, wait: bool
    ) -> Pending:
        """Queue one chunk's record; `settle` or `journaled` awaits it."""
        while True:
            if wait and self.pipeline.aggregator.is_busy():
                if not await self._space_or_stop():
                    return Pending(adopted)
                continue
            added = await self._add(adopted, valid, off, fin)
            stopping = self._stop_event.is_set()
            if added.done() and added.result().error == "busy" and wait and not stopping:
                continue
            return Pending(adopted, added, off, fin)

    async def settle(self, turn: Pending) -> bool:
        """Await a file's turn; True once the file can be deleted."""
        if turn.added is None:
            return turn.finished
        return await self.journaled(turn) and turn.fin

    async def journaled(self, turn: Pending) -> bool:
        """Await a queued record; False (logged) when the file has to wait for a rescan."""
        assert turn.added is not None
        result = await turn.added
        if result.error is not None:
            log.error(
                "spool file %s waits in journal/spool/ (%s); trying again at the next rescan",
                turn.adopted,
                result.error,
            )
            return False
        self.progress[turn.adopted] = (turn.off, turn.fin)
        if turn.fin:
            self.files_ingested += 1
        return True

    async def _add(
        self, adopted: str, valid: list[Valid], off: int, fin: bool
    ) -> asyncio.Future[AddResult]:
        """Start adding a chunk; returns once its record is queued for the journal (or the add
        ended without one), so that the next file's records queue behind it."""
        queued: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def signal(_: object = None) -> None:
            if not queued.done():
                queued.set_result(None)

        # Shielded: a cancelled stop must not cut an append the journal writer will report.
        added = asyncio.shield(
            self.pipeline.add_valid(
                valid, src=adopted, off=off, fin=fin, wait_for_space=False, queued=signal
            )
        )
        added.add_done_callback(signal)  # an add that queued nothing
        await queued
        return added

    async def _space_or_stop(self) -> bool:
        """Wait until the buffer has room (or a rescan's time); False when stopping."""
        space = asyncio.ensure_future(self.pipeline.flushing.wait_for_space())
        stopping = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait(
                {space, stopping}, timeout=self.rescan_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            space.cancel()
            stopping.cancel()
        return not self._stop_event.is_set()
