"""The memory window over the journal: spilled entries come back whole-record, exactly once."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowagg.batches import spill as spill_mod
from flowagg.batches.storage import iter_batch_files, read_batch
from flowagg.core.clock import EntryIdFactory, FakeClock
from flowagg.core.config import load_config
from flowagg.core.layout import Layout
from flowagg.delivery.recovery import write_completed
from flowagg.ingest.pipeline import Pipeline
from flowagg.journal.dedupe import DedupeIndex
from flowagg.journal.public import (
    JournalRecord,
    Position,
    list_segments,
    read_records,
    scan,
    segment_number,
)
from tests.harness import BASE_TS, entry


class Rig:
    def __init__(self, root: Path, **settings: Any) -> None:
        self.layout = Layout(root)
        self.layout.prepare()
        flags = {"root": str(root), "maxAgeMs": 3_600_000, "batchSize": 1000}
        flags.update(settings)
        self.config = load_config(flags=flags, environ={})
        self.clock = FakeClock(now_ms=BASE_TS + 60_000)
        self.acked: list[str] = []
        self._n = 0

    def start(self) -> Pipeline:
        result = scan(
            self.layout.journal,
            self.layout.errors,
            now_ms=self.clock.now_ms(),
            dedupe=DedupeIndex(
                self.layout.journal / "dedupe",
                window_ms=self.config.dedupe_window_ms,
                max_ids=self.config.dedupe_max_ids,
            ),
        )
        pipeline = Pipeline(
            self.config,
            self.layout,
            self.clock,
            asyncio.get_running_loop(),
            EntryIdFactory(self.clock, random.Random(1)),
            next_retry_at=lambda now: now + 1000,
            store=lambda batch_id, data: write_completed(self.layout, batch_id, data),
        )
        pipeline.start(result)
        return pipeline

    async def add(self, pipeline: Pipeline, count: int) -> None:
        entries = []
        for _ in range(count):
            self._n += 1
            entries.append(entry(self._n, entryId=f"e{self._n}"))
        result = await pipeline.add(entries)
        assert result.error is None and result.accepted == count
        self.acked.extend(e["entryId"] for e in entries)

    def stored(self) -> list[str]:
        return [
            e["entryId"]
            for path in sorted(iter_batch_files(self.layout))
            for e in read_batch(path)["entries"]
        ]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


async def until(predicate: Callable[[], Any], timeout: float = 20.0) -> None:
    # The flusher is a real thread writing real files: poll, bounded, never a fixed sleep.
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[int]]:
    """How many times the pipeline read back each journal record (by its first seq)."""
    counts: Counter[int] = Counter()
    real = spill_mod.read_records

    def counting(*args: Any, **kw: Any) -> Iterator[JournalRecord]:
        for record in real(*args, **kw):
            counts[record.first_seq] += 1
            yield record

    monkeypatch.setattr(spill_mod, "read_records", counting)
    yield counts


def test_add_larger_than_the_window_keeps_batches_flowing(root: Path) -> None:
    rig = Rig(root, memoryWindowEntries=100, batchSize=50)

    async def scenario() -> None:
        pipeline = rig.start()
        try:
            await rig.add(pipeline, 151)
            # Size batches follow without a flush: the spilled add is read back as room frees.
            await until(lambda: pipeline.flushing.stored_entries == 150)
            await rig.add(pipeline, 49)
            await until(lambda: pipeline.flushing.stored_entries == 200)
            assert not pipeline.spilled
        finally:
            await pipeline.shutdown()
        assert rig.stored() == rig.acked

    run(scenario)


def test_large_add_is_split_into_records_no_larger_than_the_window(root: Path) -> None:
    rig = Rig(root, memoryWindowEntries=40)

    async def scenario() -> None:
        pipeline = rig.start()
        try:
            await rig.add(pipeline, 100)
            assert pipeline.writer is not None
            assert pipeline.writer.syncs == 1  # one request, one fsync
        finally:
            await pipeline.shutdown()

    run(scenario)
    first = list_segments(rig.layout.journal)[0]
    records = list(read_records(rig.layout.journal, Position(segment_number(first), 0), None))
    assert [(r.first_seq, len(r.entries)) for r in records] == [(1, 40), (41, 40), (81, 20)]


def test_big_old_record_is_not_parsed_again_per_refill(root: Path, parsed: Counter[int]) -> None:
    rig = Rig(root, memoryWindowEntries=100, batchSize=50)

    async def scenario() -> None:
        pipeline = rig.start()
        assert pipeline.writer is not None
        try:
            await rig.add(pipeline, 30)
            # A record as an older flowagg wrote it: one record, six times the window.
            pipeline.writer.max_record_entries = 10_000
            await rig.add(pipeline, 600)
            assert pipeline.spilled
            measured = parsed[31]
            for _ in range(3):
                await rig.add(pipeline, 5)  # each durable append retries the refill
            assert parsed[31] == measured  # known not to fit yet: not parsed again
            await pipeline.flush()
            assert pipeline.flushing.done_seq == 645
        finally:
            await pipeline.shutdown()
        # Once to learn it does not fit, once to load it whole into the drained window (not
        # once per 50-entry batch).
        assert parsed[31] <= 2
        assert rig.stored() == rig.acked

    run(scenario)
