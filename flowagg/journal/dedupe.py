"""Remembered client entryIds (SPEC §3): a bounded filter in memory, the exact answer on disk.

Memory follows the settings, never the traffic: each time generation (one dedupe window long)
has a one-word-blocked Bloom filter of `dedupeMaxIds` x 10 bits, and at most two generations
are alive. A filter miss is a certain "new"; a hit is checked against an SQLite table per
generation (`<root>/journal/dedupe/index.sqlite`, id → arrival ms) with the exact window, so a
false positive never drops an entry. Ids not yet committed to SQLite stay in `recent`.
The loop thread answers from memory (`check`); the rare filter hits are confirmed in SQLite on
a lookup thread (`confirm`), which answers LookupBusy rather than guess when SQLite cannot.

The journal is the truth: the index is written off the ack path, in grouped commits (a
rollback journal with synchronous=FULL keeps it consistent across a power cut, perhaps a
little behind), and each store records the journal seq up to which it holds every client id.
At start the records after the older of the two checkpoints (filter file, SQLite) are
replayed, each into the stores that lack it: after kill -9 the filter file is usually far
behind (it is saved now and then) while SQLite is not, and re-inserting every id SQLite
already held made a start wait on its commits. A missing, damaged or foreign-version index
file is simply rebuilt from the journal (it is derived data, so it is never refused).

Here: the screen in memory, the lookups and the filter file. The filter itself is
`dedupe_filter`'s, the SQLite file's layout `dedupe_sqlite`'s, its thread `dedupe_writer`'s.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import repeat
from pathlib import Path

import orjson

from flowagg.core.fsutil import atomic_write_chunks, remove_stale_temps
from flowagg.core.supervise import name_os_thread
from flowagg.journal import dedupe_sqlite
from flowagg.journal.dedupe_filter import (
    BITS_PER_ID,
    Filter,
    Key,
    filter_chunks,
    key_of,
    keys_of,
    merge,
    read_filters,
)
from flowagg.journal.dedupe_sqlite import FORMAT_VERSION
from flowagg.journal.dedupe_writer import IndexWriter

log = logging.getLogger("flowagg.dedupe")

FILTER_NAME = "filter.bin"
MAX_FILTERS = 2
# How long a lookup waits for a lock on the index before the add is answered busy: a commit
# holds it for a few fsyncs; anything longer is someone else's lock, and the client retries.
LOOKUP_BUSY_TIMEOUT_S = 1.0


class LookupBusy(Exception):
    """SQLite could not answer (locked, unreadable): the id is neither new nor a duplicate."""


class DedupeIndex:
    def __init__(self, directory: Path, *, window_ms: int, max_ids: int) -> None:
        self.directory = directory
        self.window_ms = window_ms
        self.words = max(1, max_ids * BITS_PER_ID // 64)
        # generation -> filter; at most MAX_FILTERS: a filter may also hold older generations
        self.filters: dict[int, Filter] = {}
        self.gens: set[int] = set()  # generations with a table in SQLite
        self._expired_below = 0
        self.recent: dict[str, int] = {}  # handed to SQLite, not yet committed: id -> t
        self.seq = 0  # every client id of a journal record up to this seq is in the filter
        self.checkpoint = 0  # ... and in the filter and SQLite both, as found at open
        self.db_checkpoint = 0  # ... and in SQLite, as found at open
        self.top_checkpoint = 0  # the newer of the two: no new record may take a seq up to it
        self.saved_seq = 0  # the seq the filter file on disk covers
        # Guards `filters` and `seq`: `save` takes them together from another thread.
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._writer = IndexWriter(self._forget)
        # One thread owns the reader connection; lookups queue behind each other.
        self._lookups = ThreadPoolExecutor(
            1,
            thread_name_prefix="dedupe-lookup",
            initializer=name_os_thread,
            initargs=("dedupe-lookup",),
        )
        self._busy_at = float("-inf")  # when a lookup last found the index locked (monotonic)

    # -- open / close -----------------------------------------------------------------------
    def open(self) -> None:
        """Load the filter and the SQLite index; `checkpoint` says where replay starts.

        Nothing expires here: the caller's clock decides that (see Pipeline.dedupe_now).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temps([self.directory])
        db_seq = self._open_db()
        filter_seq = self._load_filter()
        self.checkpoint = min(db_seq, filter_seq)
        self.db_checkpoint = db_seq
        self.top_checkpoint = max(db_seq, filter_seq)
        self.seq = self.checkpoint
        assert self._db is not None
        self._writer.start(self._db, frozenset(self.gens))

    def _open_db(self) -> int:
        try:
            return self._try_open_db()
        except sqlite3.DatabaseError as exc:
            log.error("dedupe index unreadable (%s); rebuilding it from the journal", exc)
            self._close_db()
            dedupe_sqlite.remove(self.directory)
            return self._try_open_db()

    def _try_open_db(self) -> int:
        self._db = dedupe_sqlite.connect(self.directory)
        self._reader = dedupe_sqlite.connect(self.directory, LOOKUP_BUSY_TIMEOUT_S)
        seq, self.gens = dedupe_sqlite.prepare(self._db, self.window_ms)
        return seq

    def _load_filter(self) -> int:
        path = self.directory / FILTER_NAME
        try:
            with path.open("rb") as fh:
                head = orjson.loads(fh.readline())
                if (
                    head.get("v") != FORMAT_VERSION
                    or head.get("windowMs") != self.window_ms
                    or head.get("words") != self.words
                ):
                    raise ValueError("written with other settings or by another version")
                filters = read_filters(fh, head["gens"], self.words)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError, zlib.error) as exc:
            log.warning("dedupe filter %s not used (%s); rebuilding it from the journal", path, exc)
            return 0
        self.filters.update(filters)
        self.saved_seq = int(head["seq"])
        return self.saved_seq

    def save(self) -> None:
        """Write the filter with the seq it covers (from any one thread at a time).

        The live buffers are compressed in place, not copied: bits are only ever set, so
        every id up to `seq` (read first) is in what is written, and extra bits do no harm.
        """
        if self.window_ms <= 0:
            return
        with self._lock:
            gens = sorted(self.filters)
            filters = [self.filters[g] for g in gens]
            seq = self.seq
        if seq == self.saved_seq and (self.directory / FILTER_NAME).exists():
            return  # nothing new since the file on disk (tens of MB: not rewritten for nothing)
        head = {"v": FORMAT_VERSION, "seq": seq, "windowMs": self.window_ms, "words": self.words}
        head["gens"] = gens
        atomic_write_chunks(self.directory / FILTER_NAME, filter_chunks(head, filters))
        self.saved_seq = seq

    def close(self) -> None:
        """Commit what is queued, save the filter, stop the thread."""
        self._writer.stop()
        self._lookups.shutdown(wait=True)
        try:
            self.save()
        except OSError as exc:
            log.error("cannot save the dedupe filter (%s); the next start replays more", exc)
        self._close_db()

    def _close_db(self) -> None:
        for db in (self._db, self._reader):
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        self._db = self._reader = None

    # -- the loop thread (and the start-up scan) -------------------------------------------
    def generation(self, t_ms: int) -> int:
        return t_ms // self.window_ms

    def end_replay(self) -> None:
        """The start-up replay is over: from here on every record goes to SQLite too, even
        one whose seq is not above SQLite's checkpoint (a damaged journal tail set aside)."""
        self.db_checkpoint = 0

    def add(
        self, ids: list[str], t_ms: int, last_seq: int, keys: dict[str, Key] | None = None
    ) -> None:
        """Remember the client ids of one durable journal record (records in seq order).

        Called for records without client ids too, so the checkpoint keeps up with the journal.
        `keys` holds filter keys `check` already worked out (hashing is most of the cost).
        """
        if self.window_ms <= 0:
            self.seq = max(self.seq, last_seq)
            return
        gen = self.generation(t_ms)
        if ids:
            self.gens.add(gen)
            flt = self.filters.get(gen) or self._new_filter(gen)
            words = self.words
            if keys:
                flt.add_all([keys.get(i) or key_of(i, words) for i in ids])
            else:
                flt.add_all(keys_of(ids, words))
        if last_seq <= self.db_checkpoint:
            # Replayed into the filter only: SQLite held these ids when it was opened.
            with self._lock:
                self.seq = max(self.seq, last_seq)
            return
        with self._lock:
            # Under the lock the writer's thread takes to forget committed ids: its check and
            # delete must not fall between a re-add's write, or the re-added id is forgotten.
            self.recent.update(zip(ids, repeat(t_ms)))
            self.seq = max(self.seq, last_seq)
        if ids:
            self._writer.put(gen, last_seq, list(zip(ids, repeat(t_ms))))
        else:
            self._writer.checkpoint(last_seq)

    def _forget(self, rows: list[tuple[str, int]]) -> None:
        """Committed to SQLite: the ids leave `recent`, unless added again meanwhile."""
        with self._lock:
            recent = self.recent
            for entry_id, t in rows:
                if recent.get(entry_id) == t:
                    del recent[entry_id]

    def _new_filter(self, gen: int) -> Filter:
        """A filter for `gen`, never more than MAX_FILTERS in memory.

        Over the bound (a clock step can make arrival times run ahead of the expiry clock)
        the two oldest are merged: their union answers for both, only for longer.
        """
        with self._lock:
            if len(self.filters) >= MAX_FILTERS and gen < min(self.filters):
                return self.filters[min(self.filters)]
            flt = self.filters[gen] = Filter(self.words)
            while len(self.filters) > MAX_FILTERS:
                older, newer = sorted(self.filters)[:2]
                merge(self.filters.pop(older), self.filters[newer])
        return flt

    def contains(self, entry_id: str, now_ms: int) -> bool:
        """Was `entry_id` accepted within the window before `now_ms`? (Blocks on SQLite.)"""
        known = self.check(entry_id, now_ms)
        if known is None:
            return entry_id in self.confirm_later([entry_id], now_ms).result()
        return known

    def check(self, entry_id: str, now_ms: int) -> bool | None:
        """From memory only: True accepted within the window, False never (or expired),
        None when only SQLite can tell (a filter hit: `confirm` it off the loop)."""
        return self.check_many([entry_id], now_ms)[0][entry_id]

    def check_many(
        self, ids: Iterable[str], now_ms: int, known: AbstractSet[str] = frozenset()
    ) -> tuple[dict[str, bool | None], dict[str, Key]]:
        """`check` for the ids of one add (those in `known` are True), and the filter keys it
        worked out on the way, for `add` to reuse: hashing is most of the cost, and the
        window and the live filters are looked up once per add, not per id."""
        if self.window_ms <= 0:
            return {i: i in known for i in ids}, {}
        verdicts: dict[str, bool | None] = dict.fromkeys(ids, False)
        horizon = now_ms - self.window_ms
        low = self.generation(max(0, horizon))
        live = [flt for gen, flt in self.filters.items() if gen >= low]
        recent = self.recent
        # Set operations, not a lookup per id: almost every id of an add is in neither.
        settled = verdicts.keys() & known
        for entry_id in settled:
            verdicts[entry_id] = True
        remembered: dict[str, int] = {}
        if recent:
            # The SQLite thread may forget an id between the set operation and its lookup
            # (it takes no lock here): a forgotten id is committed, and the filter holds it.
            for entry_id in (verdicts.keys() & recent.keys()) - settled:
                if (t := recent.get(entry_id)) is not None:
                    remembered[entry_id] = t
                    verdicts[entry_id] = t >= horizon
        if settled or remembered:
            open_ids = [i for i in verdicts if i not in settled and i not in remembered]
        else:
            open_ids = list(verdicts)
        found = keys_of(open_ids, self.words)
        for flt in live:
            for entry_id, hit in zip(open_ids, flt.holds(found), strict=True):
                if hit:
                    verdicts[entry_id] = None
        return verdicts, dict(zip(open_ids, found, strict=True))

    def live_gens(self, now_ms: int) -> list[int]:
        """The generations a lookup at `now_ms` reads, newest first (taken on the loop thread)."""
        low = self.generation(max(0, now_ms - self.window_ms))
        return sorted((g for g in self.gens if g >= low), reverse=True)

    def confirm_later(self, ids: list[str], now_ms: int) -> Future[set[str]]:
        """`confirm` on the lookup thread; the loop awaits the future."""
        return self._lookups.submit(
            self.confirm, ids, now_ms, self.live_gens(now_ms), time.monotonic()
        )

    def confirm(
        self, ids: Iterable[str], now_ms: int, gens: list[int], asked_at: float
    ) -> set[str]:
        """Those of `ids` that SQLite holds within the window; LookupBusy when it cannot say.

        `ids` are ones `check` left open: not in `recent` when it looked, so a table missing
        from SQLite that the SQLite thread never committed holds none of them.
        """
        if self._busy_at > asked_at:
            # Queued behind a lookup that found the index locked: each waiting its own busy
            # timeout in turn would hold the last request for the sum of them.
            raise LookupBusy("the dedupe index was locked while this lookup waited")
        horizon = now_ms - self.window_ms
        open_ids = list(ids)
        found: set[str] = set()
        for gen in gens:  # newest first: an id is stored again only once it has expired
            if not open_ids:
                break
            times = self._select(gen, open_ids)
            found.update(i for i, t in times.items() if t >= horizon)
            open_ids = [i for i in open_ids if i not in times]
        return found

    def _select(self, gen: int, ids: list[str]) -> dict[str, int]:
        assert self._reader is not None
        try:
            return dedupe_sqlite.select(self._reader, gen, ids)
        except sqlite3.Error as exc:
            if "no such table" in str(exc) and gen not in self._writer.tables:
                return {}  # not committed yet: the generation's ids are still in `recent`
            self._busy_at = time.monotonic()
            log.warning("dedupe index lookup failed (%s); adds with remembered ids wait", exc)
            raise LookupBusy(str(exc)) from exc

    def expire(self, now_ms: int) -> int:
        """Drop the generations wholly older than the window; returns how many."""
        if self.window_ms <= 0:
            return 0
        low = self.generation(max(0, now_ms - self.window_ms))
        if low <= self._expired_below:
            return 0
        self._expired_below = low
        self.gens = {g for g in self.gens if g >= low}
        with self._lock:
            old = [g for g in self.filters if g < low]
            for g in old:
                del self.filters[g]
        self._writer.drop_below(low)
        return len(old)
