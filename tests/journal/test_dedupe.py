"""The bounded dedupe index: exact answers from a small filter plus SQLite, across restarts."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowagg.journal import dedupe_sqlite
from flowagg.journal.dedupe import FILTER_NAME, DedupeIndex
from flowagg.journal.dedupe_sqlite import DB_NAME

NOW = 1_704_067_200_000
HOUR = 3_600_000
DAY = 24 * HOUR


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        pause.wait(0.005)


class Indexes:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.opened: list[DedupeIndex] = []

    def open(self, *, window: int = DAY, max_ids: int = 1000) -> DedupeIndex:
        index = DedupeIndex(self.directory, window_ms=window, max_ids=max_ids)
        index.open()
        self.opened.append(index)
        return index


@pytest.fixture
def indexes(tmp_path: Path) -> Iterator[Indexes]:
    made = Indexes(tmp_path / "dedupe")
    yield made
    for index in made.opened:
        index.close()


def committed(index: DedupeIndex) -> None:
    wait_until(lambda: not index.recent)


def test_a_saturated_filter_never_drops_a_new_id(indexes: Indexes) -> None:
    # 1000 ids of room, 20 000 added: nearly every probe hits, SQLite gives the exact answer.
    index = indexes.open(max_ids=1000)
    for n in range(200):
        index.add([f"a{n}-{i}" for i in range(100)], NOW, n + 1)
    assert all(index.contains(f"a{n}-7", NOW) for n in range(200))  # some still in `recent`
    committed(index)
    assert all(index.contains(f"a{n}-{i}", NOW) for n in range(200) for i in (0, 99))
    assert not any(index.contains(f"b{n}", NOW) for n in range(2000))


def test_the_window_is_exact_and_generations_are_bounded(indexes: Indexes) -> None:
    index = indexes.open(window=DAY)
    for day in range(6):
        index.add([f"d{day}"], NOW + day * DAY, day + 1)
        assert len(index.filters) <= 2  # memory follows the settings, not the days passed
    committed(index)
    last = NOW + 5 * DAY
    assert index.contains("d5", last)
    assert index.contains("d4", last)  # exactly at the horizon
    assert not index.contains("d4", last + 1)
    assert not index.contains("d3", last)
    index.expire(last + DAY + 1)
    assert not index.contains("d5", last + DAY + 1)
    assert index.filters == {} or min(index.filters) >= index.generation(last)


def test_restart_keeps_ids_and_reports_the_checkpoint(indexes: Indexes) -> None:
    index = indexes.open()
    index.add(["x1", "x2"], NOW, 5)
    index.add([], NOW, 9)  # a record without client ids still moves the checkpoint
    index.close()
    indexes.opened.remove(index)
    again = indexes.open()
    assert again.checkpoint == 9
    assert again.contains("x1", NOW) and again.contains("x2", NOW)
    assert not again.contains("x3", NOW)


def test_a_crash_before_the_filter_is_saved_replays_from_the_older_checkpoint(
    indexes: Indexes,
) -> None:
    index = indexes.open()
    index.add(["c1"], NOW, 3)
    committed(index)
    index.save()
    index.add(["c2"], NOW, 7)
    committed(index)
    # kill -9 here: SQLite holds seq 7, the filter file only seq 3.
    second = DedupeIndex(indexes.directory, window_ms=DAY, max_ids=1000)
    second.open()
    indexes.opened.append(second)
    assert second.checkpoint == 3
    second.add(["c2"], NOW, 7)  # what the start-up replay does
    assert second.contains("c1", NOW) and second.contains("c2", NOW)


def test_the_start_up_replay_stores_in_sqlite_only_what_it_lacks(
    indexes: Indexes, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = indexes.open()
    index.add([f"old{i}" for i in range(50)], NOW, 50)
    committed(index)
    # kill -9 here: SQLite holds seq 50, no filter file was ever saved.
    stored: list[tuple[str, int]] = []
    insert_rows = dedupe_sqlite.insert_rows

    def counting(db: sqlite3.Connection, table: str, rows: list[tuple[str, int]]) -> None:
        stored.extend(rows)
        insert_rows(db, table, rows)

    monkeypatch.setattr(dedupe_sqlite, "insert_rows", counting)
    second = indexes.open()
    assert second.checkpoint == 0
    second.add([f"old{i}" for i in range(50)], NOW, 50)  # what the start-up replay does
    second.add(["new"], NOW, 51)
    committed(second)
    assert stored == [("new", NOW)]
    assert second.contains("old7", NOW) and second.contains("new", NOW)
    # After the replay, a record at or below SQLite's old checkpoint (a damaged journal tail
    # set aside, its seqs used again) is new to SQLite and goes there too.
    second.end_replay()
    second.add(["again"], NOW, 40)
    committed(second)
    assert stored[-1] == ("again", NOW)


def test_damaged_or_foreign_files_are_rebuilt_not_trusted(indexes: Indexes) -> None:
    index = indexes.open()
    index.add(["k"], NOW, 4)
    index.close()
    indexes.opened.remove(index)
    (indexes.directory / FILTER_NAME).write_bytes(b'{"v":1}\n\x00garbage')
    assert indexes.open().checkpoint == 0
    indexes.opened.pop().close()
    (indexes.directory / DB_NAME).write_bytes(b"not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (indexes.directory / (DB_NAME + suffix)).unlink(missing_ok=True)
    rebuilt = indexes.open()
    assert rebuilt.checkpoint == 0
    assert not rebuilt.contains("k", NOW)


def test_a_new_window_starts_over(indexes: Indexes) -> None:
    index = indexes.open(window=DAY)
    index.add(["w"], NOW, 2)
    index.close()
    indexes.opened.remove(index)
    other = indexes.open(window=2 * DAY)
    assert other.checkpoint == 0
    db = sqlite3.connect(indexes.directory / DB_NAME)
    try:
        names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    finally:
        db.close()
    assert names == ["meta"]


def test_window_zero_remembers_nothing(indexes: Indexes) -> None:
    index = indexes.open(window=0)
    index.add(["z"], NOW, 1)
    assert not index.contains("z", NOW)
    assert index.seq == 1


def test_the_filter_file_round_trips_across_chunks(indexes: Indexes) -> None:
    index = indexes.open(max_ids=2_000_000)  # 3 MB per generation: several write chunks
    index.add([f"r{n}" for n in range(5000)], NOW - DAY, 1)
    index.add([f"s{n}" for n in range(5000)], NOW, 2)
    before = {g: bytes(f.buf) for g, f in index.filters.items()}
    assert len(before) == 2
    index.close()
    indexes.opened.remove(index)
    again = indexes.open(max_ids=2_000_000)
    assert again.checkpoint == 2
    assert {g: bytes(f.buf) for g, f in again.filters.items()} == before
    again.close()
    indexes.opened.remove(again)
    path = indexes.directory / FILTER_NAME
    path.write_bytes(path.read_bytes()[:-100])  # cut short
    assert indexes.open(max_ids=2_000_000).checkpoint == 0


def test_the_filter_is_rewritten_only_when_it_has_news(indexes: Indexes) -> None:
    index = indexes.open()
    index.add(["n1"], NOW, 1)
    index.save()
    path = indexes.directory / FILTER_NAME
    first = path.stat().st_ino
    index.save()
    assert path.stat().st_ino == first
    index.add([], NOW, 2)
    index.save()
    assert path.stat().st_ino != first


class _ForgottenOnLookup(dict[str, int]):
    """`recent` as the loop thread meets it when the SQLite thread commits in the middle of a
    check: the set operation saw the ids, the lookup after it finds them forgotten."""

    def __getitem__(self, entry_id: str) -> int:
        wait_until(lambda: not dict.__contains__(self, entry_id))
        return dict.__getitem__(self, entry_id)


def test_ids_committed_during_a_check_are_still_found(indexes: Indexes) -> None:
    # The SQLite thread forgets committed ids under the lock, while check_many reads `recent`
    # on the loop thread without it: a resend checked as its first add commits must still be
    # a duplicate, and the check must not fail.
    index = indexes.open()
    ids = [f"r{i}" for i in range(50)]
    index.add(ids, NOW, 1)
    assert set(index.recent) == set(ids)
    index.recent = _ForgottenOnLookup(index.recent)
    verdicts, _ = index.check_many(ids, NOW)
    assert set(verdicts.values()) <= {True, None}, verdicts
    unsure = [i for i, seen in verdicts.items() if seen is None]
    assert index.confirm_later(unsure, NOW).result(timeout=20) == set(unsure)
