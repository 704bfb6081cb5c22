"""The dedupe index's SQLite file (`index.sqlite`): its connection settings, its layout (one
table per generation, id → arrival ms, and a meta table), the lookup query and one grouped
commit. Apart from the index because the SQL is the file's layout, while when to commit,
what to do when SQLite fails and what a lookup may answer are the index's and its threads'.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

# Of the index's files: the SQLite layout and the filter file's header.
FORMAT_VERSION = 1
DB_NAME = "index.sqlite"
# Ids per SELECT ... IN (...): under SQLite's oldest bound on parameters (999).
LOOKUP_CHUNK = 500
# Rows per INSERT (two parameters each, under the same bound): one statement per row cost a
# VDBE run and a bind loop per id, the larger part of the index thread's CPU (#26).
INSERT_CHUNK = 400

# Queued for one commit, per journal record: its generation, its last seq, its (id, t) rows.
Group = list[tuple[int, int, list[tuple[str, int]]]]


def connect(directory: Path, timeout: float = 30.0) -> sqlite3.Connection:
    db = sqlite3.connect(
        directory / DB_NAME, isolation_level=None, check_same_thread=False, timeout=timeout
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


def remove(directory: Path) -> None:
    """Delete the index file with its journals (it is rebuilt from the journal)."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        (directory / (DB_NAME + suffix)).unlink(missing_ok=True)


def prepare(db: sqlite3.Connection, window_ms: int) -> tuple[int, set[int]]:
    """The seq the file holds every client id up to, and its generations; an empty layout
    (seq 0) when the file is new or was written with another layout or window."""
    db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
    meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
    if meta.get("version") == FORMAT_VERSION and meta.get("windowMs") == window_ms:
        gens = set()
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            if name.startswith("g_"):
                gens.add(int(name[2:]))
        return int(meta.get("seq", 0)), gens
    # Another layout or window: generations would not line up, so start over.
    db.execute("BEGIN")
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
        if name.startswith("g_"):
            db.execute(f"DROP TABLE {name}")
    db.execute("DELETE FROM meta")
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("version", FORMAT_VERSION), ("windowMs", window_ms), ("seq", 0)],
    )
    db.execute("COMMIT")
    return 0, set()


def select(reader: sqlite3.Connection, gen: int, ids: list[str]) -> dict[str, int]:
    """The arrival times `gen`'s table holds for `ids` (sqlite3.Error when it cannot say)."""
    times: dict[str, int] = {}
    for at in range(0, len(ids), LOOKUP_CHUNK):
        chunk = ids[at : at + LOOKUP_CHUNK]
        marks = ",".join("?" * len(chunk))
        query = f"SELECT id, t FROM g_{gen} WHERE id IN ({marks})"
        times.update((i, int(t)) for i, t in reader.execute(query, chunk))
    return times


def insert_rows(db: sqlite3.Connection, table: str, rows: list[tuple[str, int]]) -> None:
    """Store (id, t) rows in `table`, INSERT_CHUNK rows per statement (a later t wins)."""
    for at in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[at : at + INSERT_CHUNK]
        values = ",".join(["(?,?)"] * len(chunk))
        params = [value for row in chunk for value in row]
        db.execute(f"INSERT OR REPLACE INTO {table} VALUES {values}", params)


def commit(db: sqlite3.Connection, group: Group, drops: list[int], held_seq: int) -> frozenset[int]:
    """Store `group`, drop the generations below the newest of `drops` and move the seq to
    the newest of the group's and `held_seq`, in one transaction; returns the generations
    with a table once it is committed."""
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
        seq = held_seq
        # A generation's rows in journal order, so that full chunks span records.
        by_gen: dict[int, list[tuple[str, int]]] = {}
        for gen, last_seq, rows in group:
            seq = max(seq, last_seq)
            if rows:
                by_gen.setdefault(gen, []).extend(rows)
        for gen, rows in by_gen.items():
            name = f"g_{gen}"
            if name not in tables:
                db.execute(
                    f"CREATE TABLE IF NOT EXISTS {name}"
                    " (id TEXT PRIMARY KEY, t INTEGER NOT NULL) WITHOUT ROWID"
                )
                tables.add(name)
            insert_rows(db, name, rows)
        if seq:
            db.execute("UPDATE meta SET v = max(v, ?) WHERE k = 'seq'", (seq,))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return frozenset(int(n[2:]) for n in tables if n.startswith("g_"))
