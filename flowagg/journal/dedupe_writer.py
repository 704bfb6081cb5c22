"""The dedupe index's SQLite thread: it takes the client ids (and bare checkpoints) the loop
hands over, groups them into few commits, and retries with a backoff when SQLite fails.
Apart from the index because this is the one place that waits on the disk: the loop only
queues here, and waits only when the queue is full.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from flowagg.core.supervise import plain_thread
from flowagg.journal import dedupe_sqlite
from flowagg.journal.dedupe_sqlite import Group

log = logging.getLogger("flowagg.dedupe")

# Ids handed to the SQLite thread but not committed; past this the producer waits for it.
MAX_QUEUED = 10_000
# Records without client ids only move the checkpoint: committing it (several fsyncs on a
# rollback journal) at most this often keeps those fsyncs off a disk busy with batch files,
# and costs a start after kill -9 at most this much more replay.
CHECKPOINT_ONLY_INTERVAL_S = 1.0
# Client ids are committed at most this often (a start after kill -9 replays them anyway).
# Each commit costs a fixed few fsyncs and page writes: at 0.1 s, a daemon storing ~7 000
# entries/s paid about 1 us of kernel time per id for them (#26). A filling queue still
# commits at once, so this only bounds `recent` (MAX_QUEUED ids) and the replay after a crash.
COMMIT_INTERVAL_S = 0.5


class IndexWriter:
    """Commits to the index's SQLite file on its own thread; `forget` is told each group's
    (id, t) rows once they are committed (they may leave `recent` then)."""

    def __init__(self, forget: Callable[[list[tuple[str, int]]], None]) -> None:
        self._forget = forget
        # The tables the SQLite thread has committed, as it records them: a lookup that finds
        # one of these missing could not read the schema, which is not "never stored".
        self.tables: frozenset[int] = frozenset()
        self._db: sqlite3.Connection | None = None
        self._cond = threading.Condition()
        self._queue: Group = []
        self._drops: list[int] = []
        self._queued = 0
        self._held_seq = 0  # a checkpoint not committed yet (records without client ids)
        self._loose_seq = 0  # the same, handed over by `checkpoint`
        self._loose_due = False
        self._checkpoint_saved_at = 0.0
        self._failing = False
        self._stopping = False
        self._thread = plain_thread("dedupe-index", self._run)

    def start(self, db: sqlite3.Connection, tables: frozenset[int]) -> None:
        """Write through `db` (the caller closes it after `stop`), which holds `tables`."""
        self._db = db
        self.tables = tables
        self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        if self._thread.is_alive():
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._thread.join()

    def checkpoint(self, last_seq: int) -> None:
        """Every client id up to `last_seq` is handed over (a record without client ids)."""
        with self._cond:
            # Only the checkpoint moves: it rides on the next commit unless it is due
            # (a wake per add would cost the loop, a commit per add the disk).
            self._loose_seq = max(self._loose_seq, last_seq)
            if time.monotonic() - self._checkpoint_saved_at >= CHECKPOINT_ONLY_INTERVAL_S:
                self._loose_due = True
                self._cond.notify_all()

    def put(self, gen: int, last_seq: int, rows: list[tuple[str, int]]) -> None:
        """Queue the (id, t) rows of one journal record; waits while the queue is full."""
        with self._cond:
            while self._queued >= MAX_QUEUED and not self._failing and self._thread.is_alive():
                self._cond.wait()
            first = not self._queue
            self._queue.append((gen, last_seq, rows))
            self._queued += len(rows)
            # The thread wakes for the first ids of a group and when the queue fills up; in
            # between it waits out COMMIT_INTERVAL_S by itself (a wake per add cost the loop).
            if first or self._queued >= MAX_QUEUED // 2:
                self._cond.notify_all()

    def drop_below(self, low: int) -> None:
        """Drop the tables of the generations below `low` with the next commit."""
        with self._cond:
            self._drops.append(low)
            self._cond.notify_all()

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while (
                    not self._queue
                    and not self._drops
                    and not self._stopping
                    and not self._loose_due
                ):
                    self._cond.wait()
                # A commit costs fsyncs and rewrites every page it touches: under a stream of
                # ids, one commit per COMMIT_INTERVAL_S holds many ids per page. Meanwhile the
                # ids are answered from `recent` (exactly); a filling queue does not wait.
                while (
                    self._queue
                    and not self._stopping
                    and self._queued < MAX_QUEUED // 2
                    and (left := self._checkpoint_saved_at + COMMIT_INTERVAL_S - time.monotonic())
                    > 0
                ):
                    self._cond.wait(left)
                self._held_seq = max(self._held_seq, self._loose_seq)
                self._loose_seq, self._loose_due = 0, False
                if not self._queue and not self._drops and not self._held_seq:
                    if self._stopping:
                        return
                    continue
                group, drops = self._queue, self._drops
                self._queue, self._drops = [], []
            try:
                self._commit(group, drops)
            except sqlite3.Error as exc:
                # Ids stay in `recent` (exact, in memory) until a later commit succeeds.
                failures += 1
                log.error("dedupe index write failed (%s); retrying", exc)
                with self._cond:
                    self._failing = True
                    self._queue = group + self._queue
                    self._drops = drops + self._drops
                    self._cond.notify_all()
                    self._cond.wait(min(30.0, 0.1 * 2**failures))
                    if self._stopping:
                        return
                continue
            failures = 0
            done = 0
            for _, _, rows in group:
                self._forget(rows)
                done += len(rows)
            with self._cond:
                self._failing = False
                self._queued -= done
                self._cond.notify_all()

    def _commit(self, group: Group, drops: list[int]) -> None:
        assert self._db is not None
        tables = dedupe_sqlite.commit(self._db, group, drops, self._held_seq)
        # Before the committed ids leave `recent` (see DedupeIndex._select).
        self.tables = tables
        self._held_seq = 0
        self._checkpoint_saved_at = time.monotonic()
