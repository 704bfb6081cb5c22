"""The index file's grouped commit: every row stored, the last arrival of an id kept, few
statements per commit (the index thread's CPU is per statement, #26)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowagg.journal import dedupe_sqlite

WINDOW_MS = 86_400_000


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = fast(dedupe_sqlite.connect(tmp_path))
    dedupe_sqlite.prepare(conn, WINDOW_MS)
    yield conn
    conn.close()


def fast(conn: sqlite3.Connection) -> sqlite3.Connection:
    """What is checked here is what a commit holds, not its fsyncs."""
    conn.execute("PRAGMA synchronous=OFF")
    return conn


def stored(db: sqlite3.Connection, gen: int) -> dict[str, int]:
    return dict(db.execute(f"SELECT id, t FROM g_{gen}").fetchall())


def seq_of(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT v FROM meta WHERE k = 'seq'").fetchone()[0])


def test_a_commit_of_many_ids_runs_few_insert_statements(db: sqlite3.Connection) -> None:
    # 25 journal records of 100 client ids each, as the add path hands them over.
    group: dedupe_sqlite.Group = [
        (7, (r + 1) * 100, [(f"id-{r}-{k}", 1_000 + r) for k in range(100)]) for r in range(25)
    ]
    inserts: list[str] = []
    db.set_trace_callback(lambda sql: inserts.append(sql) if sql.startswith("INSERT") else None)
    dedupe_sqlite.commit(db, group, [], 0)
    db.set_trace_callback(None)
    assert len(stored(db, 7)) == 2_500
    # One statement per row ran the SQL engine's setup 2 500 times for 2 500 ids.
    assert len(inserts) <= 10, f"{len(inserts)} INSERT statements for 2 500 ids"
    assert seq_of(db) == 2_500


rows_st = st.lists(
    st.tuples(st.sampled_from([1, 2]), st.text(min_size=1, max_size=5), st.integers(0, 50)),
    max_size=1_000,
)


@settings(max_examples=40, deadline=None)
@given(records=st.lists(rows_st, max_size=4), held=st.integers(0, 10))
def test_every_row_is_stored_and_the_last_arrival_wins(
    tmp_path_factory: pytest.TempPathFactory, records: list[list[tuple[int, str, int]]], held: int
) -> None:
    conn = fast(dedupe_sqlite.connect(tmp_path_factory.mktemp("index")))
    try:
        dedupe_sqlite.prepare(conn, WINDOW_MS)
        group: dedupe_sqlite.Group = []
        expected: dict[int, dict[str, int]] = {1: {}, 2: {}}
        for n, record in enumerate(records):
            for gen in (1, 2):
                rows = [(i, t) for g, i, t in record if g == gen]
                group.append((gen, 100 * (n + 1) + gen, rows))
                expected[gen].update(rows)
        tables = dedupe_sqlite.commit(conn, group, [], held)
        for gen in (1, 2):
            assert (stored(conn, gen) if gen in tables else {}) == expected[gen]
        assert seq_of(conn) == max([held, *(last for _, last, _ in group)])
    finally:
        conn.close()
