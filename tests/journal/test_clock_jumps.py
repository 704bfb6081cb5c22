"""Wall-clock steps (SPEC §1: a clock jump): dedupe and compaction follow elapsed time."""

from __future__ import annotations

from pathlib import Path

from flowagg.core.config_schema import DAY_MS
from flowagg.ingest.pipeline import Pipeline
from flowagg.journal.public import Position, list_segments, read_records, segment_number
from tests.batches.test_pipeline_window import Rig, run
from tests.harness import entry


async def send(pipeline: Pipeline, entry_id: str) -> tuple[int, int]:
    result = await pipeline.add([entry(1, entryId=entry_id)])
    assert result.error is None
    return result.accepted, result.duplicates


def test_a_forward_step_does_not_forget_ids(root: Path) -> None:
    rig = Rig(root)

    async def scenario() -> None:
        pipeline = rig.start()
        try:
            assert await send(pipeline, "x") == (1, 0)
            rig.clock.jump(3 * DAY_MS)
            pipeline.expire_dedupe()
            pipeline.compact_journal()
            assert await send(pipeline, "x") == (0, 1)
        finally:
            await pipeline.shutdown()

    run(scenario)


def test_a_forward_step_while_stopped_does_not_forget_ids(root: Path) -> None:
    rig = Rig(root)

    async def first() -> None:
        pipeline = rig.start()
        try:
            assert await send(pipeline, "y") == (1, 0)
        finally:
            await pipeline.shutdown()

    async def second() -> None:
        pipeline = rig.start()
        try:
            pipeline.expire_dedupe()
            assert await send(pipeline, "y") == (0, 1)
        finally:
            await pipeline.shutdown()

    run(first)
    rig.clock.jump(3 * DAY_MS)
    run(second)


def test_ids_expire_after_a_window_of_elapsed_time(root: Path) -> None:
    rig = Rig(root)

    async def scenario() -> None:
        pipeline = rig.start()
        try:
            assert await send(pipeline, "z") == (1, 0)
            rig.clock.advance(DAY_MS - 1)
            assert await send(pipeline, "z") == (0, 1)
            rig.clock.advance(1000)
            pipeline.expire_dedupe()
            assert await send(pipeline, "z") == (1, 0)
        finally:
            await pipeline.shutdown()

    run(scenario)


def test_a_backward_step_keeps_arrival_times_in_order(root: Path) -> None:
    rig = Rig(root)

    async def scenario() -> None:
        pipeline = rig.start()
        try:
            await send(pipeline, "b1")
            rig.clock.jump(-3_600_000)
            await send(pipeline, "b2")
            rig.clock.advance(10)
            await send(pipeline, "b3")
            await pipeline.flush()
        finally:
            await pipeline.shutdown()

    run(scenario)
    first = list_segments(rig.layout.journal)[0]
    times = [
        r.t_ms for r in read_records(rig.layout.journal, Position(segment_number(first), 0), None)
    ]
    assert len(times) == 3
    assert times == sorted(times)
    assert times[2] > times[1]  # time moves on again once the wall clock passes the last
    names = sorted(p.name for p in rig.layout.aggregated.rglob("batch_*.json"))
    assert len(names) == 1  # one manual batch, its id named after the first arrival
