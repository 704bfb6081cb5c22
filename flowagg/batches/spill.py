"""The buffer's tail that waits in the journal, read back into the memory window.

Records are loaded whole: a record fits when the window has room for all its entries, or
when the window is empty (a record larger than the window, written by an older flowagg).
A record that does not fit is remembered with its entry count, so it is not parsed again
until that much room is free.
"""

from __future__ import annotations

import orjson

from flowagg.batches.aggregator import Aggregator
from flowagg.journal.public import JournalWriter, Position, read_records


class Spill:
    def __init__(self) -> None:
        self.spilled = False
        self.reader_pos = Position(0, 0)  # the first record not in memory, while spilled
        self._blocked: tuple[Position, int] | None = None

    def resume_at(self, pos: Position) -> None:
        self.reader_pos = pos
        self.spilled = True

    def take(
        self,
        aggregator: Aggregator,
        first_seq: int,
        t_ms: int,
        arrival: float,
        datas: list[bytes],
        ids: list[str],
        after: Position,
    ) -> None:
        """Load a just-durable add into memory, unless it must wait on disk (then refill)."""
        if self.spilled or aggregator.room() < len(datas):
            # reader_pos still points at the first record not in memory; refill (run once
            # the whole delivery is through) loads from there, record by record.
            self.spilled = True
            return
        aggregator.load_run(first_seq, t_ms, arrival, datas, ids)
        self.reader_pos = after

    @staticmethod
    def _fits(aggregator: Aggregator, count: int) -> bool:
        return (
            aggregator.room() >= count
            or (not aggregator.window and not aggregator.inflight_entries)
            or aggregator.replay_waits()
        )

    def refill(self, aggregator: Aggregator, writer: JournalWriter, arrival: float) -> None:
        """Load whole durable records that wait on disk into the window, oldest first."""
        if not self.spilled:
            return
        blocked = self._blocked
        if (
            blocked is not None
            and blocked[0] == self.reader_pos
            and not self._fits(aggregator, blocked[1])
        ):
            return
        self._blocked = None
        segments = [seg.path for seg in list(writer.segments)]
        for record in read_records(writer.directory, self.reader_pos, writer.durable, segments):
            skip = max(0, aggregator.last_seq_loaded - record.first_seq + 1)
            count = len(record.entries) - skip
            if count > 0:
                if not self._fits(aggregator, count):
                    self._blocked = (self.reader_pos, count)
                    return
                entries = record.entries[skip:]
                # Copies of exact size, see entries.py.
                datas = [bytes(memoryview(orjson.dumps(entry))) for entry in entries]
                ids = [entry["entryId"] for entry in entries]
                aggregator.load_run(record.first_seq + skip, record.t_ms, arrival, datas, ids)
            self.reader_pos = record.after
        self.spilled = False
