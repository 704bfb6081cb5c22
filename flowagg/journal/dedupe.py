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
replayed into both; a missing, damaged or foreign-version index file is
simply rebuilt from the journal (it is derived data, so it is never refused).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
import zlib
from collections.abc import Container, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import orjson

from flowagg.core.fsutil import atomic_write_chunks, remove_stale_temps
from flowagg.core.supervise import name_os_thread, plain_thread
from flowagg.journal.dedupe_filter import (
    BITS_PER_ID,
    Filter,
    Key,
    filter_chunks,
    key_of,
    merge,
    read_filters,
)

log = logging.getLogger("flowagg.dedupe")

FORMAT_VERSION = 1
# Ids handed to the SQLite thread but not committed; past this the producer waits for it.
MAX_QUEUED = 10_000
# Records without client ids only move the checkpoint: committing it (several fsyncs on a
# rollback journal) at most this often keeps those fsyncs off a disk busy with batch files,
# and costs a start after kill -9 at most this much more replay.
CHECKPOINT_ONLY_INTERVAL_S = 1.0
# Client ids are committed at most this often (a start after kill -9 replays them anyway).
COMMIT_INTERVAL_S = 0.1
FILTER_NAME = "filter.bin"
MAX_FILTERS = 2
DB_NAME = "index.sqlite"
# How long a lookup waits for a lock on the index before the add is answered busy: a commit
# holds it for a few fsyncs; anything longer is someone else's lock, and the client retries.
LOOKUP_BUSY_TIMEOUT_S = 1.0
# Ids per SELECT ... IN (...): under SQLite's oldest bound on parameters (999).
LOOKUP_CHUNK = 500


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
        # The tables the SQLite thread has committed, as it records them: a lookup that finds
        # one of these missing could not read the schema, which is not "never stored".
        self._tables: frozenset[int] = frozenset()
        self._expired_below = 0
        self.recent: dict[str, int] = {}  # handed to SQLite, not yet committed: id -> t
        self.seq = 0  # every client id of a journal record up to this seq is in the filter
        self.checkpoint = 0  # ... and in the filter and SQLite both, as found at open
        self.saved_seq = 0  # the seq the filter file on disk covers
        self._cond = threading.Condition()
        self._queue: list[tuple[int, int, list[tuple[str, int]]]] = []  # gen, seq, (id, t)
        self._drops: list[int] = []
        self._queued = 0
        self._held_seq = 0  # a checkpoint not committed yet (records without client ids)
        self._loose_seq = 0  # the same, handed over by `add`
        self._loose_due = False
        self._checkpoint_saved_at = 0.0
        self._failing = False
        self._stopping = False
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._thread = plain_thread("dedupe-index", self._run)
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
        self.seq = self.checkpoint
        self._thread.start()

    def _connect(self, timeout: float = 30.0) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.directory / DB_NAME, isolation_level=None, check_same_thread=False, timeout=timeout
        )
        # A rollback journal, not WAL: WAL maps a shared-memory file, which FUSE file systems
        # handle badly (LazyFS crashed under it in the power-loss test). PERSIST ends a commit
        # by zeroing the journal's header, not truncating it: as safe, and it keeps truncates
        # (LazyFS's fragile path) out of every commit. FULL keeps the index consistent across
        # a power cut; commits are few, grouped and off the ack path.
        db.execute("PRAGMA journal_mode=PERSIST")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA cache_size=-2048")  # KiB: the page cache is part of the RSS bound
        return db

    def _open_db(self) -> int:
        try:
            return self._try_open_db()
        except sqlite3.DatabaseError as exc:
            log.error("dedupe index unreadable (%s); rebuilding it from the journal", exc)
            self._close_db()
            for suffix in ("", "-journal", "-wal", "-shm"):
                (self.directory / (DB_NAME + suffix)).unlink(missing_ok=True)
            return self._try_open_db()

    def _try_open_db(self) -> int:
        db = self._db = self._connect()
        self._reader = self._connect(LOOKUP_BUSY_TIMEOUT_S)
        db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
        meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
        if meta.get("version") == FORMAT_VERSION and meta.get("windowMs") == self.window_ms:
            for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
                if name.startswith("g_"):
                    self.gens.add(int(name[2:]))
            self._tables = frozenset(self.gens)
            return int(meta.get("seq", 0))
        # Another layout or window: generations would not line up, so start over.
        db.execute("BEGIN")
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            if name.startswith("g_"):
                db.execute(f"DROP TABLE {name}")
        db.execute("DELETE FROM meta")
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)",
            [("version", FORMAT_VERSION), ("windowMs", self.window_ms), ("seq", 0)],
        )
        db.execute("COMMIT")
        return 0

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
        with self._cond:
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
        if self._thread.is_alive():
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._thread.join()
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
            recent, words = self.recent, self.words
            for entry_id in ids:
                key = keys.get(entry_id) if keys else None
                flt.add(key or key_of(entry_id, words))
                recent[entry_id] = t_ms
        with self._cond:
            self.seq = max(self.seq, last_seq)
            if not ids:
                # Only the checkpoint moves: it rides on the next commit unless it is due
                # (a wake per add would cost the loop, a commit per add the disk).
                self._loose_seq = max(self._loose_seq, last_seq)
                if time.monotonic() - self._checkpoint_saved_at >= CHECKPOINT_ONLY_INTERVAL_S:
                    self._loose_due = True
                    self._cond.notify_all()
                return
            while self._queued >= MAX_QUEUED and not self._failing and self._thread.is_alive():
                self._cond.wait()
            first = not self._queue
            self._queue.append((gen, last_seq, [(i, t_ms) for i in ids]))
            self._queued += len(ids)
            # The thread wakes for the first ids of a group and when the queue fills up; in
            # between it waits out COMMIT_INTERVAL_S by itself (a wake per add cost the loop).
            if first or self._queued >= MAX_QUEUED // 2:
                self._cond.notify_all()

    def _new_filter(self, gen: int) -> Filter:
        """A filter for `gen`, never more than MAX_FILTERS in memory.

        Over the bound (a clock step can make arrival times run ahead of the expiry clock)
        the two oldest are merged: their union answers for both, only for longer.
        """
        with self._cond:
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
        self, ids: Iterable[str], now_ms: int, known: Container[str] = ()
    ) -> tuple[dict[str, bool | None], dict[str, Key]]:
        """`check` for the ids of one add (those in `known` are True), and the filter keys it
        worked out on the way, for `add` to reuse: hashing is most of the cost, and the
        window and the live filters are looked up once per add, not per id."""
        verdicts: dict[str, bool | None] = {}
        keys: dict[str, Key] = {}
        if self.window_ms <= 0:
            return {i: i in known for i in ids}, keys
        horizon = now_ms - self.window_ms
        low = self.generation(max(0, horizon))
        live = [flt for gen, flt in self.filters.items() if gen >= low]
        recent, words = self.recent, self.words
        for entry_id in ids:
            if entry_id in verdicts:
                continue
            if entry_id in known:
                verdicts[entry_id] = True
                continue
            t = recent.get(entry_id)
            if t is not None:
                verdicts[entry_id] = t >= horizon
                continue
            key = keys[entry_id] = key_of(entry_id, words)
            verdicts[entry_id] = None if any(key in flt for flt in live) else False
        return verdicts, keys

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
        times: dict[str, int] = {}
        try:
            for at in range(0, len(ids), LOOKUP_CHUNK):
                chunk = ids[at : at + LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT id, t FROM g_{gen} WHERE id IN ({marks})"
                times.update((i, int(t)) for i, t in self._reader.execute(query, chunk))
        except sqlite3.Error as exc:
            if "no such table" in str(exc) and gen not in self._tables:
                return {}  # not committed yet: the generation's ids are still in `recent`
            self._busy_at = time.monotonic()
            log.warning("dedupe index lookup failed (%s); adds with remembered ids wait", exc)
            raise LookupBusy(str(exc)) from exc
        return times

    def expire(self, now_ms: int) -> int:
        """Drop the generations wholly older than the window; returns how many."""
        if self.window_ms <= 0:
            return 0
        low = self.generation(max(0, now_ms - self.window_ms))
        if low <= self._expired_below:
            return 0
        self._expired_below = low
        self.gens = {g for g in self.gens if g >= low}
        with self._cond:
            old = [g for g in self.filters if g < low]
            for g in old:
                del self.filters[g]
            self._drops.append(low)
            self._cond.notify_all()
        return len(old)

    # -- the SQLite thread ------------------------------------------------------------------
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
                for entry_id, t in rows:
                    if self.recent.get(entry_id) == t:
                        del self.recent[entry_id]
                done += len(rows)
            with self._cond:
                self._failing = False
                self._queued -= done
                self._cond.notify_all()

    def _commit(
        self, group: list[tuple[int, int, list[tuple[str, int]]]], drops: list[int]
    ) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN")
        try:
            tables = {
                name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if drops:
                below = max(drops)
                for name in sorted(tables):
                    if name.startswith("g_") and int(name[2:]) < below:
                        db.execute(f"DROP TABLE {name}")
                        tables.discard(name)
            seq = self._held_seq
            for gen, last_seq, rows in group:
                seq = max(seq, last_seq)
                if not rows:
                    continue
                name = f"g_{gen}"
                if name not in tables:
                    db.execute(
                        f"CREATE TABLE IF NOT EXISTS {name}"
                        " (id TEXT PRIMARY KEY, t INTEGER NOT NULL) WITHOUT ROWID"
                    )
                    tables.add(name)
                db.executemany(f"INSERT OR REPLACE INTO {name} VALUES (?, ?)", rows)
            if seq:
                db.execute("UPDATE meta SET v = max(v, ?) WHERE k = 'seq'", (seq,))
            db.execute("COMMIT")
            # Before the committed ids leave `recent` (see `_select`).
            self._tables = frozenset(int(n[2:]) for n in tables if n.startswith("g_"))
            self._held_seq = 0
            self._checkpoint_saved_at = time.monotonic()
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
