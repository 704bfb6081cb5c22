"""Journal compaction never drops how far a spool file still in journal/spool/ was journaled.

A spool intake resumes an adopted file from the progress the journal names (SPEC §4.2). Once
its chunks are stored and older than the dedupe window, compaction may delete their segments:
the progress must survive them, or a restart ingests the file again from the start and the
entries already stored are stored twice (the dedupe index has forgotten them by then).

An in-process pipeline and intake on real files with an injected clock, so the dedupe window
and compaction passes are driven by hand; a real daemon starts on roots copied as a kill -9
leaves them; the writer alone for which progress a pass copies.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.batches.storage import iter_batch_files, read_batch
from flowagg.core.clock import EntryIdFactory, FakeClock
from flowagg.core.config import load_config
from flowagg.core.layout import Layout
from flowagg.delivery.recovery import write_completed
from flowagg.ingest.add_result import AddResult
from flowagg.ingest.pipeline import Pipeline
from flowagg.ingest.spool import SpoolIntake
from flowagg.ingest.spool_read import CHUNK_LINES
from flowagg.journal.public import list_segments, scan_root, segment_name, unframe
from tests.harness import BASE_TS, DaemonProc, entry, start_daemon, stored_id_counts, wait_for
from tests.journal.test_journal import DAY, NOW, Journal, wait_until
from tests.journal.test_journal import entry as entry_bytes

WAIT_S = 20.0
WINDOW_MS = 60_000
# The report: one chunk of 4 002 lines journaled before the intake stalled.
LINES = 4 * CHUNK_LINES + 2
DAEMON_SETTINGS = {
    "maxAgeMs": 3_600_000,
    "batchSize": 100_000,
    "dedupeWindowMs": WINDOW_MS,
    # The minimum: a 1 000-entry chunk fills a segment, so the next commit rolls it.
    "journalSegmentBytes": 4096,
}


class Rig:
    """A pipeline plus spool intake on `root`, both on one fake clock that outlives restarts."""

    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)
        self.layout.prepare()
        self.config = load_config(flags={"root": str(root), **DAEMON_SETTINGS}, environ={})
        self.clock = FakeClock(now_ms=BASE_TS + 60_000)
        self.pipeline: Pipeline | None = None
        self.spool: SpoolIntake | None = None
        self._socket_ids = 0

    async def start(self) -> tuple[Pipeline, SpoolIntake]:
        result = scan_root(self.layout, self.config, now_ms=self.clock.now_ms())
        self.pipeline = Pipeline(
            self.config,
            self.layout,
            self.clock,
            asyncio.get_running_loop(),
            EntryIdFactory(self.clock, random.Random(1)),
            next_retry_at=lambda now: now + 1000,
            store=lambda batch_id, data: write_completed(self.layout, batch_id, data),
        )
        self.pipeline.start(result)
        self.spool = SpoolIntake(self.layout, self.pipeline, rescan_s=0.05, max_file_bytes=1 << 20)
        await asyncio.wait_for(self.spool.recover(result.spool_sources), WAIT_S)
        return self.pipeline, self.spool

    async def stop(self) -> None:
        if self.spool is not None:
            await asyncio.wait_for(self.spool.stop(), WAIT_S)
        if self.pipeline is not None:
            await asyncio.wait_for(self.pipeline.shutdown(), WAIT_S)
        self.spool = self.pipeline = None

    async def add(self) -> None:
        """One entry over the socket path: its fsync makes pending done records durable."""
        assert self.pipeline is not None
        self._socket_ids += 1
        result = await self.pipeline.add([entry(0, entryId=f"s{self._socket_ids}")])
        assert result.error is None and result.accepted == 1

    async def store_and_age(self) -> None:
        """Store everything journaled, durably mark it done, then let the window pass."""
        assert self.pipeline is not None and self.pipeline.writer is not None
        await self.pipeline.flush()
        await self.add()
        await self.pipeline.flush()
        self.clock.advance(WINDOW_MS + 60_000)
        self.pipeline.expire_dedupe()

    async def compact_until_gone(self, segment: Path) -> None:
        """Maintenance passes until `segment` is deleted (a pass may first carry progress)."""
        assert self.pipeline is not None
        deadline = time.monotonic() + WAIT_S
        while segment.exists():
            assert time.monotonic() < deadline, f"{segment.name} was never compacted"
            self.pipeline.compact_journal()
            await asyncio.sleep(0.01)

    def stored(self) -> Counter[str]:
        return Counter(
            e["entryId"] for p in iter_batch_files(self.layout) for e in read_batch(p)["entries"]
        )

    def adopted(self) -> list[str]:
        return sorted(n for n in os.listdir(self.layout.journal_spool) if not n.startswith("."))


def spool_body(count: int) -> bytes:
    return b"".join(orjson.dumps(entry(i, entryId=f"e{i}")) + b"\n" for i in range(count))


def spool_first_chunk_end() -> int:
    return len(spool_body(CHUNK_LINES))


def stall_after(pipeline: Pipeline, chunks: int) -> Callable[[], None]:
    """Journal `chunks` spool chunks, then answer disk_full; returns the undo."""
    real = pipeline.add_valid
    calls = 0

    async def stalling(*args: Any, **kw: Any) -> AddResult:
        nonlocal calls
        if kw.get("src") is not None:
            calls += 1
            if calls > chunks:
                return AddResult(error="disk_full", retry_after_ms=1000)
        return await real(*args, **kw)

    pipeline.add_valid = stalling  # type: ignore[method-assign]
    return lambda: setattr(pipeline, "add_valid", real)


def run(root: Path, scenario: Callable[[Rig], Awaitable[None]]) -> Rig:
    rig = Rig(root)

    async def main() -> None:
        try:
            await scenario(rig)
        finally:
            await rig.stop()

    asyncio.run(main())
    return rig


def expected(lines: int, socket_adds: int) -> Counter[str]:
    return Counter([f"e{i}" for i in range(lines)] + [f"s{n + 1}" for n in range(socket_adds)])


def test_a_stalled_intake_is_resumed_not_restarted_after_compaction(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        pipeline, spool = await rig.start()
        undo = stall_after(pipeline, 1)
        (rig.layout.inbox / "big.jsonl").write_bytes(spool_body(LINES))
        await spool.scan_once()
        [adopted] = rig.adopted()
        first = list_segments(rig.layout.journal)[0]
        await rig.store_and_age()
        await rig.compact_until_gone(first)
        undo()
        await rig.stop()
        # The only records of the first chunk are gone: the restart must still know them.
        assert scan_root(rig.layout, rig.config, now_ms=rig.clock.now_ms()).spool_sources == {
            adopted: (spool_first_chunk_end(), False)
        }
        _, spool = await rig.start()
        await spool.scan_once()
        assert rig.adopted() == []

    rig = run(root, scenario)
    assert rig.stored() == expected(LINES, 1)


def test_a_file_stalled_through_many_compactions_keeps_the_journal_bounded(root: Path) -> None:
    rounds = 6

    async def scenario(rig: Rig) -> None:
        pipeline, spool = await rig.start()
        undo = stall_after(pipeline, 1)
        (rig.layout.inbox / "big.jsonl").write_bytes(spool_body(LINES))
        await spool.scan_once()
        [adopted] = rig.adopted()
        for _ in range(rounds):
            # Enough traffic to fill the live segment, so each round rolls it over.
            for _ in range(40):
                await rig.add()
            await rig.store_and_age()
            segments = list_segments(rig.layout.journal)
            await rig.compact_until_gone(segments[-2])
            # Only the newest two are left: the stalled file holds no segment back.
            assert len(list_segments(rig.layout.journal)) <= 2
            result = scan_root(rig.layout, rig.config, now_ms=rig.clock.now_ms())
            assert result.spool_sources[adopted] == (spool_first_chunk_end(), False)
        undo()
        await rig.stop()
        _, spool = await rig.start()
        await spool.scan_once()
        assert rig.adopted() == []

    rig = run(root, scenario)
    assert rig.stored() == expected(LINES, rounds * 41)


@pytest.fixture
def undeletable_spool(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """While its flag is set, files in journal/spool/ cannot be unlinked (a read-only mount)."""
    blocked = [True]
    real = os.unlink

    def unlink(path: Any, *args: Any, **kw: Any) -> None:
        if blocked[0] and Path(os.fsdecode(path)).parent.name == "spool":
            raise PermissionError(1, "Operation not permitted", path)
        real(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    yield blocked


def test_a_finished_file_that_cannot_be_deleted_is_not_ingested_again(
    root: Path, undeletable_spool: list[bool]
) -> None:
    async def scenario(rig: Rig) -> None:
        _, spool = await rig.start()
        (rig.layout.inbox / "small.jsonl").write_bytes(spool_body(CHUNK_LINES))
        await spool.scan_once()
        [adopted] = rig.adopted()  # finished, but its deletion failed
        first = list_segments(rig.layout.journal)[0]
        await rig.store_and_age()
        await rig.compact_until_gone(first)
        await rig.stop()
        undeletable_spool[0] = False
        _, spool = await rig.start()
        assert rig.adopted() == []  # the journal still says it is finished: deleted unread
        assert adopted not in os.listdir(rig.layout.journal_spool)

    rig = run(root, scenario)
    assert rig.stored() == expected(CHUNK_LINES, 1)


@pytest.mark.parametrize("step", ["copied", "deleted"])
def test_a_kill_at_either_step_of_compaction_leaves_a_start_that_resumes(
    root: Path, tmp_path: Path, daemons: list[DaemonProc], step: str
) -> None:
    """The root as a kill -9 leaves it once the copy is durable, before or after the unlink."""
    crashed = tmp_path / "crashed"

    async def scenario(rig: Rig) -> None:
        pipeline, spool = await rig.start()
        undo = stall_after(pipeline, 1)
        (rig.layout.inbox / "big.jsonl").write_bytes(spool_body(LINES))
        await spool.scan_once()
        [adopted] = rig.adopted()
        first = list_segments(rig.layout.journal)[0]
        await rig.store_and_age()
        if step == "copied":
            assert pipeline.compact_journal() == 0
            assert pipeline.writer is not None
            deadline = time.monotonic() + WAIT_S
            while adopted not in pipeline.writer.segments[-1].sources:
                assert time.monotonic() < deadline, "the copy never became durable"
                await asyncio.sleep(0.01)
            assert first.exists()
        else:
            await rig.compact_until_gone(first)
        shutil.copytree(rig.layout.root, crashed)
        undo()

    run(root, scenario)
    daemon = start_daemon(crashed, DAEMON_SETTINGS)
    daemons.append(daemon)
    wait_for(lambda: not os.listdir(Layout(crashed).journal_spool))
    assert daemon.stop() == 0
    assert stored_id_counts(crashed) == expected(LINES, 1)


# --------------------------------------------------------------------------------------------
# the writer alone


def adopted_journal(tmp_path: Path, *names: str) -> Journal:
    """Segments 1-3 (one commit each): chunks of a.jsonl and b.jsonl, old; a young entry.

    `names` are the files still in journal/spool/.
    """
    j = Journal(tmp_path, segment_bytes=1)
    folder = Layout(tmp_path).journal_spool
    assert folder.parent == j.dir
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"")
    j.ok([entry_bytes(1)], src="a.jsonl", off=100, t_ms=NOW - 3 * DAY)
    j.ok([entry_bytes(2)], src="b.jsonl", off=50, fin=True, t_ms=NOW - 3 * DAY)
    j.ok([entry_bytes(3)], t_ms=NOW)
    return j


def copies(j: Journal) -> list[dict[str, Any]]:
    """The add records of no entries in the journal: compaction's copies of progress."""
    found = []
    for seg in list_segments(j.dir):
        for raw in seg.read_bytes().splitlines(keepends=True):
            record = unframe(raw)
            assert record is not None
            if record["k"] == "a" and not record["e"]:
                found.append(record)
    return found


def test_progress_only_an_old_segment_holds_is_copied_before_it_goes(tmp_path: Path) -> None:
    j = adopted_journal(tmp_path, "a.jsonl")
    try:
        # Segment 1 alone says how far a.jsonl went: it stays until the copy is durable.
        assert j.writer.compact(3, NOW - DAY) == []
        wait_until(lambda: "a.jsonl" in j.writer.segments[-1].sources)
        assert j.writer.compact(3, NOW - DAY) == [j.dir / segment_name(n) for n in (1, 2)]
        assert j.writer.compact(3, NOW - DAY) == []
        first, _ = j.ok([entry_bytes(4)])
        assert first == 4  # the copy used no seq
    finally:
        j.stop()
    # b.jsonl is no longer adopted (deleted once finished): its progress is not kept.
    assert j.scan().spool_sources == {"a.jsonl": (100, False)}
    [copy] = copies(j)
    assert (copy["q"], copy["t"], copy["src"], copy["off"]) == (4, NOW - 3 * DAY, "a.jsonl", 100)
    assert "fin" not in copy


def test_a_finished_file_still_adopted_keeps_its_finished_mark(tmp_path: Path) -> None:
    j = adopted_journal(tmp_path, "b.jsonl")
    try:
        assert j.writer.compact(3, NOW - DAY) == [j.dir / segment_name(1)]
        wait_until(lambda: "b.jsonl" in j.writer.segments[-1].sources)
        assert j.writer.compact(3, NOW - DAY) == [j.dir / segment_name(2)]
    finally:
        j.stop()
    assert j.scan().spool_sources == {"b.jsonl": (50, True)}


def test_progress_a_newer_record_holds_is_not_copied(tmp_path: Path) -> None:
    j = adopted_journal(tmp_path, "a.jsonl", "b.jsonl")
    try:
        j.ok([entry_bytes(4)], src="a.jsonl", off=200, t_ms=NOW)
        j.ok([], src="b.jsonl", off=50, fin=True, t_ms=NOW)  # a last chunk of invalid lines
        before = copies(j)
        assert j.writer.compact(3, NOW - DAY) == [j.dir / segment_name(n) for n in (1, 2)]
    finally:
        j.stop()  # drains the queue: a copy compaction queued would be written now
    assert copies(j) == before
    assert j.scan().spool_sources == {"a.jsonl": (200, False), "b.jsonl": (50, True)}


def test_an_unreadable_spool_folder_keeps_every_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = adopted_journal(tmp_path)
    folder = Layout(tmp_path).journal_spool
    real = os.listdir

    def listdir(path: Any = ".") -> list[str]:
        if Path(path) == folder:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    try:
        assert j.writer.compact(3, NOW - DAY) == []
        wait_until(lambda: len(j.writer.segments[-1].sources) == 2)
        assert j.writer.compact(3, NOW - DAY) == [j.dir / segment_name(n) for n in (1, 2)]
    finally:
        j.stop()
    assert j.scan().spool_sources == {"a.jsonl": (100, False), "b.jsonl": (50, True)}
