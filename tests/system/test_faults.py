"""Fault injection at every write site: ENOSPC, EACCES, EIO and EROFS (SPEC §12).

An in-process pipeline on real files, with `os` calls patched to fail at one site. After
every step the stored batch files are read back: each acknowledged entry is in exactly one
of aggregated/, recovery/ and recovery/abandoned/ (or, while nothing can be written, still
in the journal), and once the disk heals it ends in aggregated/.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.batches.storage import CompletedFiles, iter_batch_files, read_batch
from flowagg.core.clock import EntryIdFactory, FakeClock, SystemClock
from flowagg.core.config import load_config
from flowagg.core.fsutil import atomic_write, fsync_dir
from flowagg.core.layout import Layout
from flowagg.delivery.recovery import Recovery
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.delivery.sink import Completer
from flowagg.ingest.pipeline import Pipeline
from flowagg.journal.public import list_segments, scan_root
from flowagg.service.health import read_latest, write_snapshot
from tests.faults import ERRNOS, FaultInjector, directory, under
from tests.harness import entry

LIMIT = 3


class Rig:
    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)
        self.layout.prepare()
        self.files = CompletedFiles(self.layout)
        self.config = load_config(
            flags={
                "root": str(root),
                "maxAgeMs": 3_600_000,
                "batchSize": 1000,
                "immediateRetries": 1,
                "batchRetryLimit": LIMIT,
            },
            environ={},
        )
        self.clock = FakeClock(now_ms=time.time_ns() // 1_000_000)
        self.rng = random.Random(7)
        self.policy = RetryPolicy(base_ms=1000, max_delay_ms=60_000, limit=LIMIT)
        self.recovery = Recovery(self.layout, self.clock, self.rng, self.policy)
        self.pipeline: Pipeline | None = None
        self.acked: set[str] = set()
        self._n = 0

    async def start(self) -> Pipeline:
        result = scan_root(self.layout, self.config, now_ms=self.clock.now_ms())
        pipeline = Pipeline(
            self.config,
            self.layout,
            SystemClock(),
            asyncio.get_running_loop(),
            EntryIdFactory(SystemClock(), random.Random(1)),
            next_retry_at=lambda now: self.policy.next_retry_at(now, 0, self.rng),
            # The daemon's completer: batches that queue up are written as runs.
            store=Completer(self.files.write, files=self.files),
        )
        pipeline.start(result)
        self.pipeline = pipeline
        return pipeline

    async def add(self, count: int) -> dict[str, Any]:
        assert self.pipeline is not None
        entries = []
        for _ in range(count):
            self._n += 1
            entries.append(entry(self._n, entryId=f"e{self._n}"))
        result = await self.pipeline.add(entries)
        if result.error is None:
            assert result.accepted == count
            self.acked.update(e["entryId"] for e in entries)
        return result.reply()

    def where(self) -> dict[str, str]:
        """entryId -> folder of the one stored batch holding it; fails on any duplicate."""
        found: dict[str, str] = {}
        for path in iter_batch_files(self.layout):
            for e in read_batch(path)["entries"]:
                assert e["entryId"] not in found, f"{e['entryId']} stored twice"
                found[e["entryId"]] = path.parent.name
        assert set(found) <= self.acked, "stored an entry that was never acknowledged"
        return found

    def check(self, folder: str | None = None) -> None:
        found = self.where()
        assert set(found) == self.acked
        if folder is not None:
            assert set(found.values()) == {folder}, found

    async def stop(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.shutdown()


def run(root: Path, scenario: Callable[[Rig], Awaitable[None]]) -> None:
    async def main() -> None:
        rig = Rig(root)
        await rig.start()
        try:
            await scenario(rig)
        finally:
            await rig.stop()

    asyncio.run(main())


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> FaultInjector:
    return FaultInjector(monkeypatch)


@pytest.mark.parametrize("name", list(ERRNOS))
def test_batch_file_site(root: Path, faults: FaultInjector, name: str) -> None:
    async def scenario(rig: Rig) -> None:
        heal = faults.breaks(under(rig.layout.aggregated), ERRNOS[name])
        await rig.add(10)
        assert rig.pipeline is not None
        await rig.pipeline.flush()
        rig.check("recovery")
        failed = orjson.loads(next(rig.layout.recovery.glob("*.failed.json")).read_bytes())
        assert failed["retryCount"] == 0
        assert os.strerror(ERRNOS[name]) in failed["lastError"]
        assert failed["failedAt"] <= failed["nextRetryAt"] <= failed["failedAt"] + 1000
        if ERRNOS[name] != errno.EIO:
            # A full, refusing or read-only folder fails every batch alike: recovery pauses and
            # charges no batch a retry, however long it lasts (issue #24 item 4).
            for _ in range(LIMIT + 2):
                report = rig.recovery.run_once(force=True)
                rig.check("recovery")
                assert report.paused is not None and report.paused["cause"] == name
            assert (
                orjson.loads(next(rig.layout.recovery.glob("*.failed.json")).read_bytes())[
                    "retryCount"
                ]
                == 0
            )
            heal()
            assert rig.recovery.run_once(force=True).recovered
            rig.check("aggregated")
            return
        for attempt in range(1, LIMIT + 1):
            report = rig.recovery.run_once(force=True)
            rig.check("recovery" if attempt < LIMIT else "abandoned")
        assert report.abandoned
        parked = orjson.loads(next(rig.layout.abandoned.glob("*.abandoned.json")).read_bytes())
        assert parked["retryCount"] == LIMIT and len(parked["history"]) == LIMIT
        heal()
        assert rig.recovery.requeue_abandoned() == [parked["batchId"]]
        rig.check("recovery")
        assert rig.recovery.run_once(force=True).recovered == [parked["batchId"]]
        rig.check("aggregated")
        [done] = iter_batch_files(rig.layout)
        assert read_batch(done)["recovered"] is True

    run(root, scenario)


@pytest.mark.parametrize("name", list(ERRNOS))
def test_failed_file_site_keeps_the_batch_in_the_journal(
    root: Path, faults: FaultInjector, name: str
) -> None:
    async def scenario(rig: Rig) -> None:
        heal_batches = faults.breaks(under(rig.layout.aggregated), ERRNOS[name])
        heal_failed = faults.breaks(under(rig.layout.recovery), ERRNOS[name])
        await rig.add(10)
        pipeline = rig.pipeline
        assert pipeline is not None and pipeline.flusher is not None
        flush = asyncio.ensure_future(pipeline.flush())
        await until(lambda: pipeline.flusher.stalled_error is not None)
        assert rig.where() == {}  # stored nowhere yet ...
        assert pipeline.aggregator.unflushed_entries == 10  # ... but held, and journaled
        assert not flush.done()
        heal_failed()
        await asyncio.wait_for(flush, 20)
        rig.check("recovery")
        heal_batches()
        rig.recovery.run_once(force=True)
        rig.check("aggregated")

    run(root, scenario)


@pytest.mark.parametrize("name", list(ERRNOS))
def test_abandoned_file_site(root: Path, faults: FaultInjector, name: str) -> None:
    async def scenario(rig: Rig) -> None:
        # EIO on aggregated/ is the batch's own failure (a full folder would pause recovery
        # and never abandon): it spends the retries, then abandoned/ refuses with `name`.
        heal_batches = faults.breaks(under(rig.layout.aggregated), errno.EIO)
        heal_abandoned = faults.breaks(under(rig.layout.abandoned), ERRNOS[name])
        await rig.add(5)
        assert rig.pipeline is not None
        await rig.pipeline.flush()
        for _ in range(LIMIT + 2):
            rig.recovery.run_once(force=True)
            rig.check("recovery")  # cannot be parked: stays failed, retried, never lost
        heal_abandoned()
        assert rig.recovery.run_once(force=True).abandoned
        rig.check("abandoned")
        heal_batches()
        rig.recovery.requeue_abandoned()
        rig.recovery.run_once(force=True)
        rig.check("aggregated")

    run(root, scenario)


@pytest.mark.parametrize("name", list(ERRNOS))
def test_journal_site_refuses_then_accepts(root: Path, faults: FaultInjector, name: str) -> None:
    async def scenario(rig: Rig) -> None:
        heal = faults.breaks(under(rig.layout.journal, "seg-"), ERRNOS[name])
        reply = await rig.add(4)
        assert reply["ok"] is False
        expected = "disk_full" if name == "ENOSPC" else "journal_unavailable"
        assert reply["error"].startswith(expected) and reply["retryAfterMs"] > 0
        assert faults.hits >= 1
        heal()
        assert (await rig.add(4))["ok"] is True
        assert rig.pipeline is not None
        await rig.pipeline.flush()
        rig.check("aggregated")

    run(root, scenario)
    # A restart finds no trace of the refused entries, and nothing to write again.
    rig = Rig(root)
    rig.acked = {f"e{i}" for i in range(5, 9)}

    async def restart(rig2: Rig) -> None:
        assert rig2.pipeline is not None
        assert rig2.pipeline.aggregator.unflushed_entries == 0
        await rig2.pipeline.flush()

    async def main() -> None:
        await rig.start()
        try:
            await restart(rig)
        finally:
            await rig.stop()

    asyncio.run(main())
    rig.check("aggregated")


@pytest.mark.parametrize("name", list(ERRNOS))
def test_health_file_site(root: Path, faults: FaultInjector, name: str) -> None:
    layout = Layout(root)
    layout.prepare()
    write_snapshot(layout, {"timestamp": 1, "status": "healthy"})
    with faults.broken(under(layout.health), ERRNOS[name]), pytest.raises(OSError):
        write_snapshot(layout, {"timestamp": 2, "status": "critical"})
    assert read_latest(layout) == {"timestamp": 1, "status": "healthy"}
    assert sorted(p.name for p in layout.health.iterdir()) == ["health-1.json", "latest.json"]
    write_snapshot(layout, {"timestamp": 3, "status": "healthy"})
    assert read_latest(layout) == {"timestamp": 3, "status": "healthy"}


@pytest.mark.parametrize("name", ["ENOSPC", "EROFS"])
def test_torn_tail_with_errors_folder_unwritable(
    root: Path, faults: FaultInjector, name: str
) -> None:
    """Start-up must not fail because the torn bytes cannot be copied out; they stay, and
    new records go to a fresh segment instead of after them."""
    rig = Rig(root)

    async def first(rig: Rig) -> None:
        await rig.add(3)

    async def main(scenario: Callable[[Rig], Awaitable[None]]) -> None:
        await rig.start()
        try:
            await scenario(rig)
        finally:
            await rig.stop()

    asyncio.run(main(first))
    [segment] = list_segments(rig.layout.journal)
    junk = b'0badc0de {"k":"a","q":9'  # a torn write, no newline
    with segment.open("ab") as fh:
        fh.write(junk)
    size = segment.stat().st_size

    async def second(rig: Rig) -> None:
        await rig.add(2)
        assert rig.pipeline is not None
        await rig.pipeline.flush()

    with faults.broken(under(rig.layout.errors), ERRNOS[name]):
        asyncio.run(main(second))
    assert segment.stat().st_size == size  # the bad bytes were kept
    assert len(list_segments(rig.layout.journal)) == 2
    rig.check("aggregated")
    result = scan_root(rig.layout, rig.config, now_ms=rig.clock.now_ms())
    result.dedupe.close()
    offset = size - len(junk)
    assert [p.name for p in result.quarantined] == [f"journal-{segment.stem}-{offset}.corrupt"]
    assert result.backlog_entries == 0


def test_fault_helper_breaks_directory_fsyncs(tmp_path: Path, faults: FaultInjector) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    with faults.broken(directory(folder), errno.EIO):
        with pytest.raises(OSError) as caught:
            atomic_write(folder / "f.json", b"x")
        assert caught.value.errno == errno.EIO
        assert (folder / "f.json").read_bytes() == b"x"  # renamed, but not durable
        fd = os.open(folder / "f.json", os.O_RDONLY)
        os.fsync(fd)  # the files in it are not affected
        os.close(fd)
        with pytest.raises(OSError):
            fsync_dir(folder)
    fsync_dir(folder)
    assert faults.hits == 2


def test_batch_renamed_but_not_durable_ends_in_one_place(root: Path, faults: FaultInjector) -> None:
    """The rename into aggregated/ succeeds, its directory fsync fails: the writer counts a
    failure and the batch is parked, retried and abandoned while its aggregated/ copy exists.
    Once aggregated/ can be fsynced again, that copy wins."""

    async def scenario(rig: Rig) -> None:
        heal = faults.breaks(directory(rig.layout.aggregated), errno.EIO)
        await rig.add(10)
        assert rig.pipeline is not None
        await rig.pipeline.flush()
        assert len(list(rig.layout.aggregated.glob("batch_*.json"))) == 1
        assert len(list(rig.layout.recovery.glob("*.failed.json"))) == 1
        for _ in range(LIMIT):
            rig.recovery.run_once(force=True)
        [parked] = rig.layout.abandoned.glob("*.abandoned.json")
        assert not rig.recovery.run_once(force=True).reconciled  # not durable yet: both stay
        assert parked.exists()
        heal()
        assert rig.recovery.run_once().reconciled == [parked.name]
        rig.check("aggregated")

    run(root, scenario)
