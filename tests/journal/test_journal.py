"""The write-ahead journal: group commit, scan/recovery, torn tails, compaction, write faults."""

from __future__ import annotations

import collections
import errno
import itertools
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.journal import public as journal_mod
from flowagg.journal import reader as journal_reader
from flowagg.journal.dedupe import DedupeIndex
from flowagg.journal.format import summary_path
from flowagg.journal.public import (
    FORMAT_VERSION,
    Append,
    JournalVersionError,
    JournalWriter,
    Position,
    ScanResult,
    encode_add,
    frame,
    list_segments,
    read_records,
    scan,
    segment_name,
    split_add,
    unframe,
)

NOW = 1_704_067_200_000
HOUR = 3_600_000
DAY = 24 * HOUR
WAIT_S = 20.0


_OPENED: list[DedupeIndex] = []
_INDEX_NUMBERS = itertools.count()


@pytest.fixture(autouse=True)
def _close_indexes() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()


class RecordingIndex:
    """What scan feeds a dedupe index, kept in a dict (loops scan hundreds of times)."""

    def __init__(self, window_ms: int, checkpoint: int = 0) -> None:
        self.window_ms = window_ms
        self.checkpoint = self.top_checkpoint = checkpoint
        self.ids: dict[str, int] = {}

    def open(self) -> None:
        pass

    def add(self, ids: list[str], t_ms: int, last_seq: int) -> None:
        self.ids.update(dict.fromkeys(ids, t_ms))

    def contains(self, entry_id: str, now_ms: int) -> bool:
        t = self.ids.get(entry_id)
        return self.window_ms > 0 and t is not None and t >= now_ms - self.window_ms


def scan_dir(
    jdir: Path,
    edir: Path,
    *,
    now_ms: int = NOW,
    window: int = DAY,
    real: bool = False,
    checkpoint: int = 0,
) -> ScanResult:
    """Scan with a fresh dedupe index, so the scan alone rebuilds what it remembers."""
    index: Any = RecordingIndex(window, checkpoint)
    if real:
        index = DedupeIndex(
            edir.parent / f"dedupe-{next(_INDEX_NUMBERS)}", window_ms=window, max_ids=1000
        )
        _OPENED.append(index)
    return scan(jdir, edir, now_ms=now_ms, dedupe=index)


def remembered(result: ScanResult, now_ms: int = NOW) -> set[str]:
    """The test ids (`id-<n>`) the scan's dedupe index answers as already accepted."""
    return {f"id-{n}" for n in range(10_000) if result.dedupe.contains(f"id-{n}", now_ms)}


def entry(n: int, **extra: Any) -> bytes:
    doc = {"userId": "u", "action": "a", "timestamp": NOW, "metadata": {}, "entryId": f"id-{n}"}
    doc.update(extra)
    return orjson.dumps(doc)


class Journal:
    """A JournalWriter over real files, with its results collected from the writer thread."""

    def __init__(self, root: Path, *, segment_bytes: int = 1 << 20, now_ms: int = NOW) -> None:
        self.dir = root / "journal"
        self.errors = root / "errors"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.errors.mkdir(parents=True, exist_ok=True)
        self.results: queue.Queue[tuple[Append, BaseException | None, Position]] = queue.Queue()
        self.delivered: list[tuple[Append, BaseException | None, Position]] = []
        result = self.scan(now_ms=now_ms)
        self.writer = JournalWriter(
            self.dir,
            segments=result.segments,
            next_seq=result.next_seq,
            segment_bytes=segment_bytes,
            deliver=self._deliver,
        )
        self.writer.start()

    def _deliver(self, results: list[tuple[Append, BaseException | None, Position]]) -> None:
        assert threading.current_thread().name == "journal-writer"
        for append, error, pos in results:
            if append.callback is not None:
                append.callback(error, pos)
            self.delivered.append((append, error, pos))

    def scan(self, *, now_ms: int = NOW, window: int = DAY, real: bool = False) -> ScanResult:
        return scan_dir(self.dir, self.errors, now_ms=now_ms, window=window, real=real)

    def append(
        self,
        entries: list[bytes],
        *,
        t_ms: int = NOW,
        client_idx: list[int] | None = None,
        src: str | None = None,
        off: int | None = None,
        fin: bool = False,
    ) -> tuple[int, BaseException | None, Position]:
        """Append and wait until the writer reports the record durable (or failed)."""
        box: list[tuple[BaseException | None, Position]] = []
        done = threading.Event()

        def callback(error: BaseException | None, pos: Position) -> None:
            box.append((error, pos))
            done.set()

        first = self.writer.append_entries(
            entries, t_ms, client_idx or [], src, callback, off=off, fin=fin
        )
        assert done.wait(WAIT_S), "the journal writer never reported back"
        assert len(box) == 1
        return first, box[0][0], box[0][1]

    def ok(self, entries: list[bytes], **kw: Any) -> tuple[int, Position]:
        first, error, pos = self.append(entries, **kw)
        assert error is None
        return first, pos

    def done(self, last_seq: int, batch_id: str = "b") -> None:
        before = len(self.delivered)
        self.writer.append_done(last_seq, batch_id)
        wait_until(lambda: len(self.delivered) > before)

    def stop(self) -> None:
        self.writer.stop()


def wait_until(predicate: Any, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        pause.wait(0.005)


@pytest.fixture
def jr(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path)
    yield j
    j.stop()


def records_in(directory: Path, start: Position | None = None) -> list[tuple[int, list[str]]]:
    segments = list_segments(directory)
    if start is None:
        start = Position(journal_mod.segment_number(segments[0]), 0) if segments else Position(0, 0)
    return [
        (r.first_seq, [e["entryId"] for e in r.entries])
        for r in read_records(directory, start, None)
    ]


def write_segment(directory: Path, number: int, lines: list[bytes]) -> Path:
    path = directory / segment_name(number)
    path.write_bytes(b"".join(lines))
    return path


def header(seq: int, version: int = FORMAT_VERSION) -> bytes:
    return frame(orjson.dumps({"k": "h", "v": version, "seq": seq}))


def done_line(q: int, batch_id: str = "b") -> bytes:
    return frame(orjson.dumps({"k": "d", "q": q, "b": batch_id}))


# --------------------------------------------------------------------------------------------
# framing


def test_frame_and_unframe() -> None:
    line = frame(b'{"k":"d","q":3,"b":"x"}')
    assert line.endswith(b"\n")
    assert unframe(line) == {"k": "d", "q": 3, "b": "x"}
    assert unframe(line[:-1]) is None  # no newline: torn
    wrong_crc = (b"1" if line[:1] == b"0" else b"0") + line[1:]
    assert unframe(wrong_crc) is None
    assert unframe(b"zzzzzzzz " + line[9:]) is None
    assert unframe(frame(b"[1,2]")) is None  # not a record object
    assert unframe(frame(b'{"x":1}')) is None  # no kind
    assert unframe(b"\n") is None


def test_encode_add_layout() -> None:
    line = encode_add(5, NOW, [entry(1), entry(2)], [1], "f.jsonl")
    record = unframe(line)
    assert record == {
        "k": "a",
        "q": 5,
        "t": NOW,
        "e": [orjson.loads(entry(1)), orjson.loads(entry(2))],
        "c": [1],
        "src": "f.jsonl",
    }
    plain = unframe(encode_add(1, NOW, [entry(1)], [], None))
    assert plain is not None
    assert "c" not in plain
    assert "src" not in plain


def test_split_add_bounds_count_and_bytes() -> None:
    datas = [b"x" * 10] * 7
    assert split_add(datas, [0, 3, 6], 3, 1 << 20) == [(0, 3, [0]), (3, 6, [0]), (6, 7, [0])]
    assert split_add(datas, [1, 2], 100, 25) == [(0, 2, [1]), (2, 4, [0]), (4, 6, []), (6, 7, [])]
    assert split_add([b"y" * 100], [0], 3, 10) == [(0, 1, [0])]  # one entry alone may exceed
    assert split_add([], [], 3, 10) == [(0, 0, [])]


def test_a_spool_chunk_is_never_split_but_a_socket_add_is(tmp_path: Path) -> None:
    # Split, a torn write could keep a chunk's first pieces without the one naming it, and the
    # resumed intake would journal those entries twice.
    j = Journal(tmp_path)
    j.writer.max_record_entries = 2
    try:
        j.ok([entry(n) for n in range(1, 6)], client_idx=[0, 2, 4], src="f.jsonl")
        j.ok([entry(n) for n in range(6, 9)], client_idx=[0])
        assert j.writer.syncs == 2
    finally:
        j.stop()
    records = [unframe(line) for line in list_segments(j.dir)[0].read_bytes().splitlines(True)]
    adds = [r for r in records if r is not None and r["k"] == "a"]
    assert [(r["q"], len(r["e"]), r.get("c"), r.get("src")) for r in adds] == [
        (1, 5, [0, 2, 4], "f.jsonl"),
        (6, 2, [0], None),
        (8, 1, None, None),
    ]
    result = j.scan()
    assert remembered(result) == {"id-1", "id-3", "id-5", "id-6"}
    assert result.spool_sources == {"f.jsonl": (0, True)}


# --------------------------------------------------------------------------------------------
# writing and scanning


def test_empty_journal_scan(tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    (tmp_path / "e").mkdir()
    result = scan_dir(tmp_path / "j", tmp_path / "e")
    assert result.segments == []
    assert result.next_seq == 1
    assert result.done_seq == 0
    assert result.backlog is None
    assert result.backlog_entries == 0
    assert remembered(result) == set()
    assert result.quarantined == []


def test_appends_are_read_back(jr: Journal) -> None:
    first_a, pos_a = jr.ok([entry(1), entry(2), entry(3)], client_idx=[0, 2])
    first_b, pos_b = jr.ok([entry(4)], src="spool-1.jsonl")
    first_c, pos_c = jr.ok([entry(5), entry(6)], client_idx=[1])
    assert (first_a, first_b, first_c) == (1, 4, 5)
    assert pos_a.segment == pos_b.segment == pos_c.segment == 1
    assert pos_a.key() < pos_b.key() < pos_c.key()
    assert jr.writer.next_seq == 7
    assert jr.writer.durable == pos_c
    assert jr.writer.entries_written == 6
    jr.stop()
    seg = jr.dir / segment_name(1)
    assert seg.stat().st_size == pos_c.offset

    result = jr.scan()
    assert result.next_seq == 7
    assert result.done_seq == 0
    assert remembered(result) == {"id-1", "id-3", "id-6"}
    assert result.spool_sources == {"spool-1.jsonl": (0, True)}
    assert result.backlog is not None
    assert result.backlog.segment == 1
    assert result.backlog_entries == 6
    assert result.quarantined == []
    (info,) = result.segments
    assert (info.number, info.size, info.last_seq, info.max_t) == (1, pos_c.offset, 6, NOW)
    assert records_in(jr.dir) == [
        (1, ["id-1", "id-2", "id-3"]),
        (4, ["id-4"]),
        (5, ["id-5", "id-6"]),
    ]


def test_segment_starts_with_a_header(jr: Journal) -> None:
    jr.ok([entry(1)])
    jr.stop()
    first_line = (jr.dir / segment_name(1)).read_bytes().split(b"\n")[0] + b"\n"
    head = unframe(first_line)
    assert head is not None
    assert (head["k"], head["v"]) == ("h", FORMAT_VERSION)
    # seq is the next unallocated seq when the segment opened: seq 1 was allocated at
    # append time, before the writer opened the segment for it.
    assert head["seq"] == 2


def test_done_records_set_the_cursor_and_backlog(jr: Journal) -> None:
    _, pos1 = jr.ok([entry(1), entry(2), entry(3)])
    _, pos2 = jr.ok([entry(4), entry(5), entry(6)])
    jr.ok([entry(7), entry(8)])
    jr.done(4)
    assert jr.writer.durable_done_seq == 0  # a done record alone pays for no fsync ...
    syncs = jr.writer.syncs
    jr.ok([entry(9)])
    assert jr.writer.syncs == syncs + 1
    assert jr.writer.durable_done_seq == 4  # ... it is durable with the next group
    jr.stop()
    result = jr.scan()
    assert result.done_seq == 4
    assert result.next_seq == 10
    assert result.backlog == pos1  # the record holding seq 5 starts where the first ended
    assert result.backlog_entries == 5  # 5, 6, 7, 8, 9
    assert records_in(jr.dir, result.backlog)[0][0] == 4
    rec2 = pos2.offset - pos1.offset
    assert result.backlog_bytes > 0
    assert result.backlog_bytes <= rec2 + 2 * 1000


@pytest.mark.parametrize(("done", "entries"), [(0, 8), (3, 5), (6, 2), (7, 1), (8, 0)])
def test_backlog_count_follows_done(tmp_path: Path, done: int, entries: int) -> None:
    j = Journal(tmp_path)
    j.ok([entry(1), entry(2), entry(3)])
    j.ok([entry(4), entry(5), entry(6)])
    j.ok([entry(7), entry(8)])
    if done:
        j.done(done)
    j.stop()
    result = j.scan()
    assert result.backlog_entries == entries
    assert (result.backlog is None) == (entries == 0)
    if result.backlog is not None:
        seqs = [
            r.first_seq + i
            for r in read_records(j.dir, result.backlog, None)
            for i in range(len(r.entries))
        ]
        assert [s for s in seqs if s > done] == list(range(done + 1, 9))
        assert seqs[0] <= done + 1


def test_done_cursor_is_the_maximum(jr: Journal) -> None:
    jr.ok([entry(i) for i in range(1, 11)])
    jr.done(7)
    jr.done(3)  # an older cursor written later never moves it back
    jr.stop()
    assert jr.scan().done_seq == 7


def test_restart_continues_the_sequence(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.ok([entry(1), entry(2)])
    j.stop()
    j2 = Journal(tmp_path)
    try:
        first, pos = j2.ok([entry(3)])
        assert first == 3
        assert pos.segment == 1  # appends continue in the last segment
    finally:
        j2.stop()
    assert records_in(j2.dir) == [(1, ["id-1", "id-2"]), (3, ["id-3"])]


def test_dedupe_window(jr: Journal) -> None:
    jr.ok([entry(1), entry(2)], t_ms=NOW - 25 * HOUR, client_idx=[0, 1])  # expired
    jr.ok([entry(3), entry(4)], t_ms=NOW - DAY, client_idx=[1])  # exactly at the horizon
    jr.ok([entry(5), entry(6)], t_ms=NOW - HOUR, client_idx=[0])
    jr.ok([entry(7)], t_ms=NOW)  # generated id: not a dedupe key
    jr.stop()
    for real in (False, True):
        result = jr.scan(real=real)
        assert remembered(result) == {"id-4", "id-5"}
        assert remembered(result, NOW + 1) == {"id-5"}  # id-4 leaves the window
        wide = jr.scan(window=2 * DAY, real=real)
        assert remembered(wide) == {"id-1", "id-2", "id-4", "id-5"}
        assert remembered(jr.scan(window=0, real=real)) == set()
    # Only id-7 is that new, and it is not a key.
    assert remembered(jr.scan(now_ms=NOW + DAY, real=True), NOW + DAY) == set()


def test_spool_sources_are_collected(jr: Journal) -> None:
    jr.ok([], src="empty.json")  # a spool file with no valid entries is still recorded
    jr.ok([entry(1)], src="a.jsonl")
    jr.ok([entry(2)])
    jr.ok([entry(3)], src="b.json")
    jr.stop()
    result = jr.scan()
    finished = (0, True)  # records without `off` held a whole file
    assert result.spool_sources == {"a.jsonl": finished, "empty.json": finished, "b.json": finished}
    assert result.next_seq == 4
    assert result.backlog_entries == 3


def test_spool_chunks_report_the_journaled_end_and_whether_finished(jr: Journal) -> None:
    jr.ok([entry(1)], src="big.jsonl", off=100)
    jr.ok([], src="big.jsonl", off=250)  # a chunk of invalid lines still moves the offset
    jr.ok([entry(2)], src="done.jsonl", off=40)
    jr.ok([entry(3)], src="done.jsonl", off=90, fin=True)
    jr.ok([], src="empty.jsonl", off=0, fin=True)
    jr.stop()
    result = jr.scan()
    assert result.spool_sources == {
        "big.jsonl": (250, False),
        "done.jsonl": (90, True),
        "empty.jsonl": (0, True),
    }
    assert result.backlog_entries == 3


def test_empty_spool_record_after_unflushed_entries(jr: Journal) -> None:
    jr.ok([entry(1)])  # not flushed yet
    jr.ok([], src="all-invalid.jsonl")
    jr.ok([entry(2)])
    jr.stop()
    result = jr.scan()
    assert result.spool_sources == {"all-invalid.jsonl": (0, True)}
    assert result.backlog_entries == 2
    assert result.next_seq == 3


def test_stop_commits_what_was_queued(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    fired: list[int] = []
    for i in range(50):
        j.writer.append_entries([entry(i)], NOW, [], None, lambda e, p, i=i: fired.append(i))
    j.stop()
    assert sorted(fired) == list(range(50))
    assert j.scan().next_seq == 51


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "j").mkdir()
    (tmp_path / "e").mkdir()
    write_segment(tmp_path / "j", 1, [header(1, version=FORMAT_VERSION + 1)])
    with pytest.raises(JournalVersionError, match="upgrade flowagg"):
        scan_dir(tmp_path / "j", tmp_path / "e")
    assert list((tmp_path / "e").iterdir()) == []  # refused, not quarantined
    assert (tmp_path / "j" / segment_name(1)).exists()


# --------------------------------------------------------------------------------------------
# group commit


def test_group_commit_shares_fsyncs(jr_held: Held) -> None:
    j, release = jr_held.journal, jr_held.release
    counts: collections.Counter[int] = collections.Counter()
    positions: dict[int, Position] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    all_done = threading.Event()
    threads_n, per_thread = 6, 40
    total = threads_n * per_thread + 1

    def callback(seq: int, error: BaseException | None, pos: Position) -> None:
        with lock:
            counts[seq] += 1
            positions[seq] = pos
            if error is not None:
                errors.append(error)
            if sum(counts.values()) >= total:
                all_done.set()

    def submit(t: int) -> None:
        for i in range(per_thread):
            box: dict[str, int] = {}
            seq = j.writer.append_entries(
                [entry(t * 1000 + i)], NOW, [0], None, lambda e, p, b=box: callback(b["s"], e, p)
            )
            box["s"] = seq

    # The first append holds the writer inside fsync; everything else queues behind it.
    seq0 = j.writer.append_entries([entry(0)], NOW, [], None, lambda e, p: callback(1, e, p))
    assert seq0 == 1
    assert jr_held.holding.wait(WAIT_S)
    threads = [threading.Thread(target=submit, args=(t,)) for t in range(1, threads_n + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    release.set()
    assert all_done.wait(WAIT_S)
    assert errors == []
    assert sorted(counts) == list(range(1, total + 1))
    assert set(counts.values()) == {1}, "every callback fires exactly once"
    assert j.writer.entries_written == total
    assert j.writer.syncs < total
    assert j.writer.syncs == 2  # the held group, then everything queued behind it
    # Positions follow seq order: a later append is durable at a later offset.
    ordered = [positions[s].key() for s in range(1, total + 1)]
    assert ordered == sorted(ordered)
    j.stop()
    result = j.scan()
    assert result.next_seq == total + 1
    assert len(remembered(result)) == total - 1


class Held:
    def __init__(self, journal: Journal, holding: threading.Event, release: threading.Event):
        self.journal = journal
        self.holding = holding
        self.release = release


@pytest.fixture
def jr_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Held]:
    """A journal whose writer blocks in its first fsync until the test releases it."""
    real_fsync = os.fsync
    holding = threading.Event()
    release = threading.Event()

    def fsync(fd: int) -> None:
        if not holding.is_set() and threading.current_thread().name == "journal-writer":
            holding.set()
            assert release.wait(WAIT_S)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    j = Journal(tmp_path)
    yield Held(j, holding, release)
    release.set()
    j.stop()


def test_concurrent_appends_each_fire_once(jr: Journal) -> None:
    threads_n, per_thread = 8, 50
    fired: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    everything = threading.Event()

    def submit(t: int) -> None:
        for i in range(per_thread):
            n = t * per_thread + i

            def callback(error: BaseException | None, pos: Position, n: int = n) -> None:
                assert error is None
                with lock:
                    fired[n] += 1
                    if len(fired) == threads_n * per_thread:
                        everything.set()

            jr.writer.append_entries([entry(n)], NOW, [0], None, callback)

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert everything.wait(WAIT_S)
    assert set(fired.values()) == {1}
    assert jr.writer.syncs <= threads_n * per_thread
    assert jr.writer.entries_written == threads_n * per_thread
    jr.stop()
    ids = [i for _, chunk in records_in(jr.dir) for i in chunk]
    assert sorted(ids) == sorted(f"id-{n}" for n in range(threads_n * per_thread))
    seqs = [s for s, _ in records_in(jr.dir)]
    assert seqs == list(range(1, threads_n * per_thread + 1))


# --------------------------------------------------------------------------------------------
# segments


def test_rotation_and_reading_across_segments(tmp_path: Path) -> None:
    j = Journal(tmp_path, segment_bytes=600)
    expected = []
    positions = []
    for i in range(1, 31):
        first, pos = j.ok([entry(i)], client_idx=[0])
        expected.append((first, [f"id-{i}"]))
        positions.append(pos)
    j.stop()
    segments = list_segments(j.dir)
    assert len(segments) > 3
    assert [journal_mod.segment_number(p) for p in segments] == list(range(1, len(segments) + 1))
    prev_last = 0
    for path in segments:
        lines = path.read_bytes().splitlines(keepends=True)
        head = unframe(lines[0])
        assert head is not None
        assert head["k"] == "h"
        first_add = unframe(lines[1])
        assert first_add is not None
        # The header names the next unallocated seq at opening: past every seq before it,
        # at most past the group that opened the segment.
        assert head["seq"] > prev_last
        assert first_add["q"] <= head["seq"] <= first_add["q"] + len(first_add["e"])
        prev_last = max(unframe(line)["q"] for line in lines[1:])
        # A segment is closed once it reaches segment_bytes: it overshoots by one group.
        assert path.stat().st_size < 600 + 400
    assert records_in(j.dir) == expected
    # Reading from a position in the middle, and up to an end position.
    start = positions[9]  # after record 10
    end = positions[19]  # after record 20
    middle = [r.first_seq for r in read_records(j.dir, start, end)]
    assert middle == list(range(11, 21))
    result = j.scan()
    assert result.next_seq == 31
    assert len(remembered(result)) == 30
    assert [s.number for s in result.segments] == list(range(1, len(segments) + 1))
    assert [s.last_seq for s in result.segments] == sorted(s.last_seq for s in result.segments)


def test_read_records_stops_at_a_record_still_being_written(jr: Journal) -> None:
    jr.ok([entry(1)])
    jr.ok([entry(2)])
    jr.stop()
    seg = jr.dir / segment_name(1)
    partial = encode_add(3, NOW, [entry(3)], [], None)[:-5]
    with seg.open("ab") as fh:
        fh.write(partial)
    assert [s for s, _ in records_in(jr.dir)] == [1, 2]


# --------------------------------------------------------------------------------------------
# torn tails and corrupt records


def build_lines() -> list[bytes]:
    return [
        header(1),
        encode_add(1, NOW, [entry(1), entry(2)], [0, 1], None),
        encode_add(3, NOW, [entry(3)], [0], "f.jsonl"),
        done_line(2),
        encode_add(4, NOW, [entry(4), entry(5), entry(6)], [2], None),
        encode_add(7, NOW, [entry(7, metadata={"note": "ünïcode ✓"})], [0], None),
    ]


def expected_after_cut(lines: list[bytes], keep: int) -> dict[str, Any]:
    """What scan must report when only the first `keep` lines survive."""
    next_seq, done, ids, adds = 1, 0, [], []
    for line in lines[:keep]:
        rec = unframe(line)
        assert rec is not None
        if rec["k"] == "h":
            next_seq = max(next_seq, rec["seq"])
        elif rec["k"] == "d":
            done = max(done, rec["q"])
        else:
            next_seq = max(next_seq, rec["q"] + len(rec["e"]))
            ids += [rec["e"][i]["entryId"] for i in rec.get("c", [])]
            adds.append(rec["q"])
    return {"next_seq": next_seq, "done": done, "ids": set(ids), "adds": adds}


@pytest.fixture
def fast_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip fsync in loops that rewrite files hundreds of times (durability is not tested)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.mark.parametrize("earlier_segment", [False, True])
def test_torn_tail_at_every_offset(tmp_path: Path, fast_fsync: None, earlier_segment: bool) -> None:
    lines = build_lines()
    data = b"".join(lines)
    ends = []
    total = 0
    for line in lines:
        total += len(line)
        ends.append(total)
    earlier = [header(1), encode_add(100, NOW - 1, [entry(100)], [0], None)]
    for cut in range(len(data) + 1):
        jdir = tmp_path / f"j{cut}"
        edir = tmp_path / f"e{cut}"
        jdir.mkdir()
        edir.mkdir()
        number = 1
        if earlier_segment:
            write_segment(jdir, 1, earlier)
            number = 2
        seg = write_segment(jdir, number, [data[:cut]])
        result = scan_dir(jdir, edir)  # never raises
        keep = sum(1 for end in ends if end <= cut)
        boundary = ends[keep - 1] if keep else 0
        want = expected_after_cut(lines, keep)
        assert seg.stat().st_size == boundary, cut
        assert result.segments[-1].size == boundary
        got_adds = [r.first_seq for r in read_records(jdir, Position(number, 0), None)]
        assert got_adds == want["adds"], cut
        assert result.done_seq == want["done"]
        base_ids = {"id-100"} if earlier_segment else set()
        assert remembered(result) == want["ids"] | base_ids
        if earlier_segment:
            assert result.next_seq == max(want["next_seq"], 101)
        else:
            assert result.next_seq == want["next_seq"]
        torn = data[boundary:cut]
        if torn:
            (q,) = result.quarantined
            assert q.parent == edir
            assert q.read_bytes() == torn
            reason = orjson.loads(q.with_name(q.name + ".reason.json").read_bytes())
            assert reason["segment"] == seg.name
            assert reason["offset"] == boundary
            assert reason["length"] == len(torn)
            assert "torn" in reason["reason"]
        else:
            assert result.quarantined == []
            assert list(edir.iterdir()) == []
        # A second scan finds a clean journal.
        again = scan_dir(jdir, edir)
        assert again.quarantined == []
        assert again.next_seq == result.next_seq


def test_junk_appended_to_the_last_segment(jr: Journal) -> None:
    jr.ok([entry(1)], client_idx=[0])
    _, pos = jr.ok([entry(2)], client_idx=[0])
    jr.stop()
    seg = jr.dir / segment_name(1)
    junk = b"\x00\xff garbage that is not a record\n\x00\x00partial"
    with seg.open("ab") as fh:
        fh.write(junk)
    result = jr.scan()
    assert seg.stat().st_size == pos.offset
    (q,) = result.quarantined
    assert q.read_bytes() == junk
    assert remembered(result) == {"id-1", "id-2"}
    assert result.next_seq == 3
    # The writer can carry on after the cut.
    j2 = Journal(jr.dir.parent)
    try:
        first, _ = j2.ok([entry(3)])
        assert first == 3
    finally:
        j2.stop()
    assert [s for s, _ in records_in(jr.dir)] == [1, 2, 3]


def test_corrupt_record_in_the_middle_at_every_byte(tmp_path: Path, fast_fsync: None) -> None:
    lines = build_lines()
    victim = 2  # the add record for seq 3
    start = sum(len(line) for line in lines[:victim])
    original = b"".join(lines)
    for i in range(len(lines[victim]) - 1):  # every byte but the newline
        data = bytearray(original)
        data[start + i] ^= 0x01
        jdir = tmp_path / f"j{i}"
        edir = tmp_path / f"e{i}"
        jdir.mkdir()
        edir.mkdir()
        seg = write_segment(jdir, 1, [bytes(data)])
        result = scan_dir(jdir, edir)
        # The bad line is copied out, the segment itself is left alone.
        assert seg.read_bytes() == bytes(data)
        (q,) = result.quarantined
        assert q.read_bytes() == bytes(data[start : start + len(lines[victim])])
        assert q.name.endswith(".corrupt")
        reason = orjson.loads(q.with_name(q.name + ".reason.json").read_bytes())
        assert reason["offset"] == start
        assert "checksum" in reason["reason"]
        # Everything around it is still read.
        assert [r.first_seq for r in read_records(jdir, Position(1, 0), None)] == [1, 4, 7]
        assert result.next_seq == 8
        assert result.done_seq == 2
        assert remembered(result) == {"id-1", "id-2", "id-6", "id-7"}


def test_corrupt_record_in_a_closed_segment(jr: Journal) -> None:
    jdir = jr.dir
    jr.stop()
    (jdir / segment_name(1)).unlink(missing_ok=True)
    seg1 = write_segment(
        jdir,
        1,
        [header(1), encode_add(1, NOW, [entry(1)], [0], None), b"deadbeef {broken}\n"],
    )
    write_segment(jdir, 2, [header(3), encode_add(3, NOW, [entry(3)], [0], None)])
    size_before = seg1.stat().st_size
    result = jr.scan()
    assert seg1.stat().st_size == size_before  # only the last segment is ever cut
    (q,) = result.quarantined
    assert q.read_bytes() == b"deadbeef {broken}\n"
    assert result.next_seq == 4
    assert [s for s, _ in records_in(jdir)] == [1, 3]


def test_read_records_continues_after_a_truncated_closed_segment(tmp_path: Path) -> None:
    jdir, edir = tmp_path / "j", tmp_path / "e"
    jdir.mkdir()
    edir.mkdir()
    torn = encode_add(2, NOW, [entry(2)], [0], None)[:-7]
    write_segment(jdir, 1, [header(1), encode_add(1, NOW, [entry(1)], [0], None), torn])
    write_segment(jdir, 2, [header(3), encode_add(3, NOW, [entry(3)], [0], None)])
    result = scan_dir(jdir, edir)
    assert result.next_seq == 4  # scan itself gets past the torn closed segment
    assert result.backlog_entries == 2
    assert result.backlog is not None
    assert [r.first_seq for r in read_records(jdir, result.backlog, None)] == [1, 3]


# --------------------------------------------------------------------------------------------
# compaction


def test_compaction_deletes_only_closed_done_and_old_segments(tmp_path: Path) -> None:
    # segment_bytes=1: every commit opens a new segment, so each append has its own.
    j = Journal(tmp_path, segment_bytes=1)
    j.ok([entry(1), entry(2)], t_ms=NOW - 3 * DAY)  # seg 1: seqs 1-2, old
    j.ok([entry(3)], t_ms=NOW - 2 * DAY)  # seg 2: seq 3, old
    j.ok([entry(4)], t_ms=NOW - HOUR)  # seg 3: seq 4, young
    j.ok([entry(5)], t_ms=NOW - 3 * DAY)  # seg 4: seq 5, old
    j.ok([entry(6)], t_ms=NOW - 3 * DAY)  # seg 5: the open segment
    names = [p.name for p in list_segments(j.dir)]
    assert names == [segment_name(n) for n in range(1, 6)]
    horizon = NOW - DAY

    # Nothing is done: nothing goes.
    assert j.writer.compact(0, horizon) == []
    # seq 2 done: only segment 1 is fully done.
    assert [p.name for p in j.writer.compact(2, horizon)] == [segment_name(1)]
    # seq 3 done but the next segment is young: stop at it, whatever follows.
    assert [p.name for p in j.writer.compact(6, horizon)] == [segment_name(2)]
    assert [p.name for p in list_segments(j.dir)] == [segment_name(n) for n in (3, 4, 5)]
    # Once everything is old enough, closed segments go; the open one never does.
    removed = j.writer.compact(6, NOW + DAY)
    assert [p.name for p in removed] == [segment_name(3), segment_name(4)]
    assert [p.name for p in list_segments(j.dir)] == [segment_name(5)]
    assert j.writer.compact(6, NOW + 10 * DAY) == []
    # The writer still appends, and a scan still knows where the sequence stands.
    first, _ = j.ok([entry(7)], t_ms=NOW)
    assert first == 7
    j.stop()
    result = j.scan()
    assert result.next_seq == 8
    assert [s for s, _ in records_in(j.dir)][-1] == 7


def test_compaction_partly_done_segment_is_kept(tmp_path: Path) -> None:
    j = Journal(tmp_path, segment_bytes=1)
    j.ok([entry(1), entry(2), entry(3)], t_ms=NOW - 3 * DAY)
    j.ok([entry(4)], t_ms=NOW - 3 * DAY)
    try:
        assert j.writer.compact(2, NOW) == []
        assert j.writer.compact(3, NOW) == [j.dir / segment_name(1)]
    finally:
        j.stop()


def test_compaction_after_restart_uses_scanned_segment_info(tmp_path: Path) -> None:
    j = Journal(tmp_path, segment_bytes=1)
    j.ok([entry(1)], t_ms=NOW - 3 * DAY)
    j.ok([entry(2)], t_ms=NOW - 3 * DAY)
    j.ok([entry(3)], t_ms=NOW)
    j.stop()
    j2 = Journal(tmp_path, segment_bytes=1)
    try:
        assert j2.writer.compact(1, NOW - DAY) == [j2.dir / segment_name(1)]
        assert j2.writer.compact(3, NOW - DAY) == [j2.dir / segment_name(2)]
        assert [p.name for p in list_segments(j2.dir)] == [segment_name(3)]
    finally:
        j2.stop()


def test_rollover_fsyncs_unsynced_done_records_before_closing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # segment_bytes=1: every commit rolls over. The done record rides alone (no fsync of its
    # own), so the segment holding it is closed with unsynced bytes at the next append.
    j = Journal(tmp_path, segment_bytes=1)
    calls: list[tuple[str, object]] = []
    real_open, real_write, real_fsync, real_close = os.open, os.write, os.fsync, os.close

    def rec_open(path: Any, flags: int, *args: Any) -> int:
        fd = real_open(path, flags, *args)
        calls.append(("open", (Path(path).name, fd)))
        return fd

    def rec_write(fd: int, data: Any) -> int:
        calls.append(("write", fd))
        return real_write(fd, data)

    def rec_fsync(fd: int) -> None:
        calls.append(("fsync", fd))
        real_fsync(fd)

    def rec_close(fd: int) -> None:
        calls.append(("close", fd))
        real_close(fd)

    monkeypatch.setattr(os, "open", rec_open)
    monkeypatch.setattr(os, "write", rec_write)
    monkeypatch.setattr(os, "fsync", rec_fsync)
    monkeypatch.setattr(os, "close", rec_close)
    try:
        j.ok([entry(1)])
        j.done(1)
        done_fd = j.writer._fd
        done_segment = j.writer.segments[-1].path.name
        assert j.writer.durable_done_seq == 0  # written, not yet synced
        j.ok([entry(2)])
    finally:
        j.stop()
    assert ("open", (done_segment, done_fd)) in calls
    opened = calls.index(("open", (done_segment, done_fd)))
    mine = [op for op, arg in calls[opened + 1 :] if arg == done_fd]
    closed = mine.index("close")
    assert "fsync" in mine[:closed]
    last_write = max(i for i, op in enumerate(mine[:closed]) if op == "write")
    assert "fsync" in mine[last_write:closed], mine
    assert j.writer.durable_done_seq == 1


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The segments a scan parses (the others it takes from their summaries)."""
    names: list[str] = []
    real_parse = journal_reader._Scan.parse

    def parse(self: Any, path: Path, *, is_last: bool) -> None:
        names.append(path.name)
        real_parse(self, path, is_last=is_last)

    monkeypatch.setattr(journal_reader._Scan, "parse", parse)
    return names


def scan_view(result: ScanResult) -> dict[str, Any]:
    return {
        "next": result.next_seq,
        "done": result.done_seq,
        "backlog": result.backlog,
        "backlogEntries": result.backlog_entries,
        "sources": result.spool_sources,
        "segments": [
            (s.number, s.size, s.last_seq, s.max_t, s.done_seq, s.sources, s.records)
            for s in result.segments
        ],
    }


def summarized_journal(tmp_path: Path) -> Journal:
    j = Journal(tmp_path, segment_bytes=1)  # every commit rolls over
    j.ok([entry(1), entry(2)], client_idx=[0, 1], t_ms=NOW - HOUR)  # seg 1
    j.ok([entry(3)], client_idx=[0], src="a.jsonl", off=120, t_ms=NOW - HOUR)  # seg 2
    j.done(3)  # seg 3: only the done record
    j.ok([entry(4)], client_idx=[0], t_ms=NOW)  # seg 4: the backlog
    j.ok([entry(5)], t_ms=NOW)  # seg 5: the open segment
    j.stop()
    return j


def test_summaries_let_a_start_skip_closed_stored_segments(
    tmp_path: Path, parsed: list[str]
) -> None:
    j = summarized_journal(tmp_path)
    names = [segment_name(n) for n in range(1, 6)]
    assert sorted(p.name for p in j.dir.glob("*.sum")) == [
        summary_path(j.dir / n).name for n in names[:4]
    ]
    # The index already holds every client id up to seq 3: only the backlog and the tail.
    fast = scan_dir(j.dir, j.errors, checkpoint=3)
    assert parsed == names[3:]
    assert remembered(fast) == {"id-4"}
    parsed.clear()
    for path in j.dir.glob("*.sum"):
        path.unlink()
    slow = scan_dir(j.dir, j.errors, checkpoint=3)
    assert parsed == names
    assert scan_view(fast) == scan_view(slow)
    assert fast.spool_sources == {"a.jsonl": (120, False)}  # the summary keeps progress
    assert (fast.done_seq, fast.next_seq, fast.backlog_entries) == (3, 6, 2)
    # Without the index checkpoint the segments with live client ids are parsed again.
    parsed.clear()
    j2 = summarized_journal(tmp_path / "again")
    parsed.clear()
    assert remembered(scan_dir(j2.dir, j2.errors)) == {f"id-{n}" for n in (1, 2, 3, 4)}
    assert parsed == names[:2] + names[3:]


@pytest.mark.parametrize(
    "damage", ["appended", "garbage", "newer", "stale size", "last segment", "deleted"]
)
def test_a_summary_that_cannot_be_trusted_means_a_parse(
    tmp_path: Path, parsed: list[str], damage: str
) -> None:
    j = summarized_journal(tmp_path)
    seg = j.dir / segment_name(1)
    summary = summary_path(seg)
    doc = orjson.loads(summary.read_bytes())
    if damage == "appended":
        with seg.open("ab") as fh:
            fh.write(done_line(2))
    elif damage == "garbage":
        summary.write_bytes(b"{not json")
    elif damage == "newer":
        summary.write_bytes(orjson.dumps({**doc, "v": doc["v"] + 1}))
    elif damage == "stale size":
        summary.write_bytes(orjson.dumps({**doc, "size": doc["size"] + 1}))
    elif damage == "deleted":
        summary.unlink()
    else:
        # A crash right after a rollover summarized what is still the last segment.
        seg = j.dir / segment_name(5)
        summary_path(seg).write_bytes(summary.read_bytes())
    result = scan_dir(j.dir, j.errors, checkpoint=3)
    assert seg.name in parsed
    if damage == "last segment":
        assert not summary_path(seg).exists()
    assert result.next_seq == 6
    assert result.spool_sources == {"a.jsonl": (120, False)}


def test_compaction_removes_summaries(tmp_path: Path) -> None:
    j = summarized_journal(tmp_path)
    j2 = Journal(tmp_path, segment_bytes=1)
    try:
        j2.ok([entry(6)], t_ms=NOW)  # rolls segment 5 over, so it gets its summary
        assert summary_path(j.dir / segment_name(5)).exists()
        removed = j2.writer.compact(6, NOW + 2 * DAY)
        assert [p.name for p in removed] == [segment_name(n) for n in range(1, 6)]
    finally:
        j2.stop()
    assert sorted(p.name for p in j.dir.glob("seg-*")) == [segment_name(6)]


# --------------------------------------------------------------------------------------------
# write failures


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def check_failed_append_leaves_no_trace(
    j: Journal, good_size: int, error: BaseException | None
) -> None:
    assert isinstance(error, OSError)
    assert error.errno == errno.ENOSPC
    assert (j.dir / segment_name(1)).stat().st_size == good_size
    # Later appends succeed, in a new segment.
    first, pos = j.ok([entry(3)], client_idx=[0])
    assert pos.segment == 2
    assert first == 3  # seq 2 was spent on the failed append and is never reused
    j.stop()
    result = j.scan()
    assert result.quarantined == []
    assert remembered(result) == {"id-1", "id-3"}
    assert records_in(j.dir) == [(1, ["id-1"]), (3, ["id-3"])]
    everything = b"".join(p.read_bytes() for p in list_segments(j.dir))
    assert b"id-2" not in everything


def test_fsync_failure_is_reported_and_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path)
    j.ok([entry(1)], client_idx=[0])
    good_size = (j.dir / segment_name(1)).stat().st_size
    syncs = j.writer.syncs
    real_fsync = os.fsync
    fired = []

    def fsync(fd: int) -> None:
        if not fired and fd == j.writer._fd:
            fired.append(fd)
            raise enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _, error, pos = j.append([entry(2)], client_idx=[0])
    assert fired
    assert pos == Position(1, good_size)  # durable position unchanged
    assert j.writer.syncs == syncs
    check_failed_append_leaves_no_trace(j, good_size, error)


def test_short_write_then_enospc_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = Journal(tmp_path)
    j.ok([entry(1)], client_idx=[0])
    good_size = (j.dir / segment_name(1)).stat().st_size
    real_write = os.write
    calls: list[int] = []

    def write(fd: int, data: Any) -> int:
        if fd == j.writer._fd and len(calls) < 2:
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, bytes(data[: len(data) // 2]))  # half of it lands
            raise enospc()
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    _, error, _ = j.append([entry(2)], client_idx=[0])
    assert len(calls) == 2
    check_failed_append_leaves_no_trace(j, good_size, error)


def test_every_append_in_a_failed_group_gets_the_error(
    jr_held: Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    j, release = jr_held.journal, jr_held.release
    results: queue.Queue[tuple[int, BaseException | None]] = queue.Queue()
    j.writer.append_entries([entry(0)], NOW, [], None, lambda e, p: results.put((0, e)))
    assert jr_held.holding.wait(WAIT_S)
    # While the writer is held, queue a group whose fsync will fail.
    held_fsync = os.fsync
    failing = {"armed": True}

    def fsync(fd: int) -> None:
        held_fsync(fd)
        if failing["armed"] and fd == j.writer._fd and j.writer.syncs == 1:
            failing["armed"] = False
            raise enospc()

    monkeypatch.setattr(os, "fsync", fsync)
    for i in range(1, 11):
        j.writer.append_entries([entry(i)], NOW, [0], None, lambda e, p, i=i: results.put((i, e)))
    release.set()
    got = dict(results.get(timeout=WAIT_S) for _ in range(11))
    assert got[0] is None
    assert all(isinstance(got[i], OSError) for i in range(1, 11))
    j.writer.append_entries([entry(11)], NOW, [0], None, lambda e, p: results.put((11, e)))
    assert results.get(timeout=WAIT_S) == (11, None)
    j.stop()
    assert [s for s, _ in records_in(j.dir)] == [1, 12]


def test_header_fsync_failure_leaves_no_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    fired = []

    def fsync(fd: int) -> None:
        if not fired and threading.current_thread().name == "journal-writer":
            fired.append(fd)
            raise enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    j = Journal(tmp_path)
    try:
        _, error, _ = j.append([entry(1)])
        assert isinstance(error, OSError)
        assert list_segments(j.dir) == []
        first, pos = j.ok([entry(2)])
        assert pos.segment == 1
        assert first == 2
    finally:
        j.stop()
    assert records_in(j.dir) == [(2, ["id-2"])]
