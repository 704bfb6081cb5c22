"""`flowagg validate --full`: the checks across files, and between the files and the journal.

- no entryId appears twice across all files (or twice in one);
- batch ids are unique across aggregated/, recovery/ and abandoned/, and ordered: a batch id
  is `<arrival ms>_<journal seq>` of its first entry, so in seq order the arrival times never
  decrease and no batch's seq range overlaps the next one's;
- the journal agrees with the files: no entry waiting after the journal's done cursor is
  already in a batch file, and the batch named by the last done record exists.

What is collected (one row per entry and per batch) spills to a temporary SQLite file with a
small page cache, so memory stays flat for millions of entries; SQLite sorts on disk.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from flowagg.batches.storage import find_batch
from flowagg.core.layout import Layout
from flowagg.delivery.recovery_format import BATCH_ID_RE
from flowagg.journal.view import iter_waiting, view
from flowagg.read.validate import Finding, GoodBatch

CACHE_KIB = 8192
INSERT_CHUNK = 5000


class CrossCheck:
    def __init__(self, layout: Layout, report: Callable[[Finding], None], tmp_dir: Path) -> None:
        self.layout = layout
        self.report = report
        self.db_path = tmp_dir / "validate.sqlite"
        self.db = sqlite3.connect(self.db_path, isolation_level=None)
        for pragma in (
            "journal_mode=OFF",
            "synchronous=OFF",
            "temp_store=FILE",
            f"cache_size=-{CACHE_KIB}",
        ):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(
            """
            CREATE TABLE files(id INTEGER PRIMARY KEY, name TEXT);
            CREATE TABLE ids(entry_id TEXT, file INTEGER, pos INTEGER);
            CREATE TABLE batches(batch_id TEXT, ms INTEGER, seq INTEGER, count INTEGER,
                                 file INTEGER);
            CREATE TABLE waiting(entry_id TEXT, seq INTEGER, segment TEXT);
            BEGIN;
            """
        )
        self._files = 0
        self._rows: list[tuple[str, int, int]] = []
        self.skipped: list[str] = []  # journal names that are not regular files, not read

    def add(self, good: GoodBatch) -> None:
        self._files += 1
        file_id = self._files
        self.db.execute("INSERT INTO files VALUES (?, ?)", (file_id, good.shown))
        entries = good.doc["entries"]
        ms, _, seq = good.batch_id.partition("_")
        if ms.isdigit() and seq.isdigit():
            self.db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                (good.batch_id, int(ms), int(seq), len(entries), file_id),
            )
        rows = self._rows
        for pos, entry in enumerate(entries):
            entry_id = entry.get("entryId") if isinstance(entry, dict) else None
            if isinstance(entry_id, str):
                rows.append((entry_id, file_id, pos))
        if len(rows) >= INSERT_CHUNK:
            self._flush_rows()

    def _flush_rows(self) -> None:
        self.db.executemany("INSERT INTO ids VALUES (?, ?, ?)", self._rows)
        self._rows.clear()

    def finish(self, *, journal: bool, retention: bool) -> list[str]:
        """Run the checks; returns notes (what was not checked, and why).

        `retention`: retainBatchesMs is set, so the batch of the last done record may have
        been deleted on purpose.
        """
        self._flush_rows()
        self.db.execute("COMMIT")
        self._duplicate_entries()
        self._batch_order()
        notes: list[str] = []
        if journal:
            self._journal(retention=retention)
        else:
            notes.append(
                "journal not compared: a daemon is running on this root and moves it;"
                " stop it for a still view"
            )
        return notes

    def _duplicate_entries(self) -> None:
        self.db.execute("CREATE INDEX ids_by_id ON ids(entry_id)")
        query = """
            SELECT i.entry_id, f.name, i.pos FROM ids i JOIN files f ON f.id = i.file
            WHERE i.entry_id IN (SELECT entry_id FROM ids GROUP BY entry_id HAVING count(*) > 1)
            ORDER BY i.entry_id, i.file, i.pos
        """
        current: str | None = None
        first = ""
        for entry_id, name, pos in self.db.execute(query):
            where = f"{name} entry {pos}"
            if entry_id != current:
                current, first = entry_id, where
                continue
            self.report(
                Finding(
                    name,
                    "duplicate entryId",
                    f"entry {pos}: entryId {entry_id!r} is also stored at {first}",
                    "once",
                    "twice or more",
                )
            )

    def _batch_order(self) -> None:
        query = """
            SELECT b.batch_id, b.ms, b.seq, b.count, f.name FROM batches b
            JOIN files f ON f.id = b.file ORDER BY b.seq, b.ms, f.id
        """
        prev: tuple[str, int, int, int, str] | None = None
        for row in self.db.execute(query):
            batch_id, ms, seq, _, name = row
            if prev is not None:
                p_id, p_ms, p_seq, p_count, p_name = prev
                if batch_id == p_id:
                    self.report(
                        Finding(name, "batch id", f"batch {batch_id} is also stored as {p_name}")
                    )
                    continue
                if seq < p_seq + p_count:
                    self.report(
                        Finding(
                            name,
                            "batch order",
                            f"its journal seqs overlap those of {p_name}",
                            f"first seq >= {p_seq + p_count}",
                            str(seq),
                        )
                    )
                if ms < p_ms:
                    self.report(
                        Finding(
                            name,
                            "batch order",
                            f"arrival time goes back from {p_name}",
                            f"ms >= {p_ms}",
                            str(ms),
                        )
                    )
            prev = row

    def _journal(self, *, retention: bool) -> None:
        journal = view(self.layout.journal)
        done_batch = journal.done_batch
        if (
            not retention
            and isinstance(done_batch, str)
            and BATCH_ID_RE.fullmatch(done_batch)
            and find_batch(self.layout, done_batch) is None
        ):
            self.report(
                Finding(
                    "journal",
                    "journal",
                    f"the last done record says batch {journal.done_batch} is stored,"
                    " but no batch file holds it",
                    "a batch file",
                    "none",
                )
            )
        self.db.execute("BEGIN")
        rows: list[tuple[str, int, str]] = []
        for waiting in iter_waiting(journal):
            if waiting.entry_id is not None:
                rows.append((waiting.entry_id, waiting.seq, waiting.segment))
            if len(rows) >= INSERT_CHUNK:
                self.db.executemany("INSERT INTO waiting VALUES (?, ?, ?)", rows)
                rows.clear()
        self.db.executemany("INSERT INTO waiting VALUES (?, ?, ?)", rows)
        self.db.execute("COMMIT")
        query = """
            SELECT f.name, count(*), min(w.seq), max(w.seq), min(w.segment) FROM waiting w
            JOIN ids i ON i.entry_id = w.entry_id JOIN files f ON f.id = i.file
            GROUP BY f.id ORDER BY min(w.seq)
        """
        for name, count, low, high, segment in self.db.execute(query):
            self.report(
                Finding(
                    name,
                    "journal",
                    f"{count} of its entries are still waiting in journal/{segment} (seqs"
                    f" {low}-{high}, after the done cursor {journal.done_seq}); the next start"
                    " of the daemon settles this only if the file is the journal's own batch"
                    " for them, else they are stored twice",
                    "stored or waiting",
                    "both",
                )
            )
        for name, kind in journal.skipped:
            self.skipped.append(f"journal/{name} ({kind})")
            self.report(
                Finding(
                    f"journal/{name}",
                    "not a regular file",
                    f"{kind} named like a journal file, not read; the daemon writes only"
                    " regular files there, move it away",
                )
            )
        if journal.bad_lines:
            self.report(
                Finding(
                    "journal",
                    "journal",
                    f"{journal.bad_lines} records fail their checksum; the next start"
                    " quarantines them",
                )
            )

    def close(self) -> None:
        self.db.close()
