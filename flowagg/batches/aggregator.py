"""The buffer and its flush triggers (SPEC §5). Pure: no I/O, time passed in.

The buffer is the journal's unflushed tail. Its head lives in memory (at most
`memoryWindowEntries`, batches being written included); the rest waits on disk and is read
back as room frees up. Backpressure counts the whole tail, memory and disk.

After a restart, the cuts the journal holds beyond the done cursor (`replay`) are cut again
exactly as journaled, whatever today's settings say: a batch id names one set of entries.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from flowagg.batches.storage import Batch, make_batch_id
from flowagg.batches.window import Buffered, Run, Window
from flowagg.journal.format import Cut


@dataclasses.dataclass(frozen=True)
class FlushPolicy:
    batch_size: int
    max_age_s: float
    max_batch_bytes: int
    threshold_bytes: float
    memory_window: int
    max_buffered_entries: int
    max_buffered_bytes: int

    @classmethod
    def from_config(cls, config: object) -> FlushPolicy:
        c = config
        return cls(
            batch_size=c.batch_size,  # type: ignore[attr-defined]
            max_age_s=c.max_age_ms / 1000.0,  # type: ignore[attr-defined]
            max_batch_bytes=c.max_batch_bytes,  # type: ignore[attr-defined]
            threshold_bytes=c.flush_threshold * c.max_batch_bytes,  # type: ignore[attr-defined]
            memory_window=c.memory_window_entries,  # type: ignore[attr-defined]
            max_buffered_entries=c.max_buffered_entries,  # type: ignore[attr-defined]
            max_buffered_bytes=c.max_buffered_bytes,  # type: ignore[attr-defined]
        )


class Aggregator:
    def __init__(self, policy: FlushPolicy) -> None:
        self.policy = policy
        self.window = Window()
        self.inflight_entries = 0
        self.unflushed_entries = 0
        self.unflushed_bytes = 0
        self.last_seq_loaded = 0
        self.replay: deque[Cut] = deque()
        # The head cut whose missing entries are gone for good (a damaged journal record):
        # it is cut with what is left, under its own id, rather than wait or be cut anew.
        self._short_cut: str | None = None
        # Fresh cuts starting at or before this seq may name a batch stored under a cut record
        # a damaged journal lost: the flusher looks for it before writing (set at start).
        self.look_until = 0

    # -- intake ------------------------------------------------------------------------------
    def acknowledge(self, count: int, size: int) -> None:
        """Count entries being made durable (negative to take back a failed write)."""
        self.unflushed_entries += count
        self.unflushed_bytes += size

    def room(self) -> int:
        return self.policy.memory_window - len(self.window) - self.inflight_entries

    def replay_waits(self) -> bool:
        """Whether a journaled cut needs more of the journal than the window holds.

        It is loaded whatever the room: it was cut under a larger window or batch size, and
        no other cut may take its entries.
        """
        if not self.replay or self.replay[0].batch_id == self._short_cut:
            return False
        return self.last_seq_loaded < self.replay[0].last_seq

    def stop_waiting(self) -> None:
        """Every durable record is loaded, yet the head cut lacks entries: cut it short."""
        self._short_cut = self.replay[0].batch_id

    @property
    def window_bytes(self) -> int:
        return self.window.bytes

    def load(self, item: Buffered) -> bool:
        """Put a durable entry in the window; False if it was loaded before (a re-read)."""
        if item.seq <= self.last_seq_loaded:
            return False
        self.load_run(item.seq, item.t_ms, item.arrival, [item.data], [item.entry_id])
        return True

    def load_run(
        self, first_seq: int, t_ms: int, arrival: float, datas: list[bytes], ids: list[str]
    ) -> None:
        """Load one journal record's entries (seqs first_seq, first_seq + 1, ...) at once."""
        skip = max(0, self.last_seq_loaded - first_seq + 1)
        if skip >= len(datas):
            return
        self.window.append(Run(first_seq, t_ms, arrival, datas, ids, skip))
        self.last_seq_loaded = first_seq + len(datas) - 1

    def is_busy(self) -> bool:
        """At the bound, add answers busy (one request may overshoot it, never more)."""
        p = self.policy
        return (
            self.unflushed_entries >= p.max_buffered_entries
            or self.unflushed_bytes >= p.max_buffered_bytes
        )

    # -- triggers ----------------------------------------------------------------------------
    def due(self, now: float) -> str | None:
        if not self.window:
            return None
        self._drop_passed_cuts()
        if self.replay:
            cut = self.replay[0]
            if self.window.head_seq >= cut.first_seq:
                return None if self.replay_waits() else cut.trigger
            if self.last_seq_loaded >= cut.first_seq:
                # Entries before a journaled cut whose own cut was never durable (its journal
                # write failed, a later one did not): they waited through a restart, and the
                # journaled cut behind them cannot go first.
                return "age"
        p = self.policy
        if len(self.window) >= p.batch_size:
            return "size"
        if self.window_bytes >= p.threshold_bytes:
            return "threshold"
        if now - self.window.head_arrival >= p.max_age_s:
            return "age"
        return None

    def next_deadline(self) -> float | None:
        """Monotonic time at which the age trigger fires, if anything is buffered."""
        if not self.window:
            return None
        return self.window.head_arrival + self.policy.max_age_s

    def cut(self, trigger: str, now_ms: int | None = None) -> Batch:
        """Take the next batch from the head of the window (at least one entry).

        `now_ms` becomes the batch's timestamp. A journaled cut at the head is taken as it
        was journaled, trigger and timestamp included.
        """
        p = self.policy
        self._drop_passed_cuts()
        replayed = self.replay[0] if self.replay else None
        limit = None
        if replayed is not None and self.window and self.window.head_seq >= replayed.first_seq:
            if self.replay_waits():
                raise ValueError("a journaled cut is not in the window yet")
            self.replay.popleft()
            max_entries, max_bytes, limit = len(self.window), None, replayed.last_seq
        else:
            # A fresh cut never takes entries of a journaled one.
            if replayed is not None:
                limit = replayed.first_seq - 1
            max_entries, max_bytes, replayed = p.batch_size, p.max_batch_bytes, None
        taken = self.window.take(max_entries, max_bytes, limit)
        if taken is None:
            raise ValueError("cut from an empty window")
        self.inflight_entries += len(taken.datas)
        if replayed is not None:
            # The cut's own seqs, not those found: a batch short of entries the journal lost
            # still settles its whole cut, and may find a stored copy that holds them all.
            return Batch(
                batch_id=replayed.batch_id,
                trigger=replayed.trigger,
                entries=taken.datas,
                first_seq=replayed.first_seq,
                last_seq=replayed.last_seq,
                entry_ids=taken.ids,
                timestamp_ms=replayed.timestamp_ms,
                replayed=True,
                look_first=True,
            )
        return Batch(
            batch_id=make_batch_id(taken.first_t_ms, taken.first_seq),
            trigger=trigger,
            entries=taken.datas,
            first_seq=taken.first_seq,
            last_seq=taken.last_seq,
            entry_ids=taken.ids,
            timestamp_ms=now_ms,
            look_first=taken.first_seq <= self.look_until,
        )

    def _drop_passed_cuts(self) -> None:
        """Forget journaled cuts whose entries are all behind the window (found stored)."""
        while self.replay and self.replay[0].last_seq < (
            self.window.head_seq if self.window else self.last_seq_loaded + 1
        ):
            self.replay.popleft()

    def cut_due(self, now: float, now_ms: int | None = None) -> list[Batch]:
        batches = []
        while (trigger := self.due(now)) is not None:
            batches.append(self.cut(trigger, now_ms))
        return batches

    def cut_all(self, trigger: str, now_ms: int | None = None) -> list[Batch]:
        """Cut the whole window; a journaled cut still loading stays (it cannot be split)."""
        batches = []
        while self.window:
            self._drop_passed_cuts()
            head_is_replayed = self.replay and self.window.head_seq >= self.replay[0].first_seq
            if head_is_replayed and self.replay_waits():
                break
            batches.append(self.cut(trigger, now_ms))
        return batches

    def stored(self, batch: Batch) -> None:
        """A batch reached disk (aggregated/ or recovery/): its entries leave the buffer."""
        self.inflight_entries -= batch.count
        self._forget(batch.count, sum(map(len, batch.entries)) + batch.count)

    def found_stored(self, count: int) -> None:
        """At start: `count` backlog entries turned out to be in a batch stored before."""
        self._forget(count, 0)

    def _forget(self, count: int, size: int) -> None:
        self.unflushed_entries -= count
        self.unflushed_bytes -= size
        if self.unflushed_entries == 0:
            # The backlog found at start is counted by record size, an estimate; settle it.
            self.unflushed_bytes = 0
