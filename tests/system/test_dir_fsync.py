"""Every directory operation the promise relies on is followed by a directory fsync (SPEC §12).

LazyFS keeps creates, renames and unlinks through a power cut even without a directory fsync,
so tests/system/test_powerloss.py cannot see a missing one. Here the file system calls of each
publish and retire path are recorded in order, and each create, rename, mkdir and unlink must
be followed by an fsync of its directory (both directories for a rename) before the operation
is acknowledged; a create or rename must be durable before any later unlink too, since
deleting a source relies on its copy being there. Temp files are exempt: nothing relies on
their names.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pytest

import flowagg.cli.client
import flowagg.delivery.recovery
import flowagg.ingest.spool
import flowagg.journal.writer
from flowagg.batches.storage import Batch, batch_file_name
from flowagg.cli.client import write_spool_file
from flowagg.core import fsutil
from flowagg.core.clock import FakeClock
from flowagg.core.layout import Layout
from flowagg.delivery.flusher import Flusher, Stored
from flowagg.delivery.recovery import Recovery
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.ingest.spool import SpoolIntake
from flowagg.journal.public import Append, JournalWriter, Position
from flowagg.service.health import write_snapshot
from tests.delivery.test_recovery import FlakyStore, failed_doc, put_failed
from tests.system.test_faults import Rig

WAIT_S = 10.0
POLICY = RetryPolicy(base_ms=1000, max_delay_ms=300_000, limit=2)


class Call(NamedTuple):
    op: str  # create, rename, replace, unlink, mkdir, fsync, fsync_dir, ack
    path: Path
    dest: Path | None = None


def _norm(path: Any) -> Path:
    text = os.fsdecode(path)
    return Path(os.path.realpath(os.path.dirname(os.path.abspath(text)))) / os.path.basename(text)


def _is_temp(path: Path) -> bool:
    return path.name.startswith(fsutil.TEMP_MARK) or path.name.endswith(".tmp")


class Recorder:
    """The file system calls made under `base`, in order, with `ack()` marks between them."""

    def __init__(self, base: Path) -> None:
        self.base = Path(os.path.realpath(base))
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def add(self, op: str, path: Any, dest: Any = None) -> None:
        call = Call(op, _norm(path), None if dest is None else _norm(dest))
        if call.path.is_relative_to(self.base):
            with self._lock:
                self.calls.append(call)

    def ack(self) -> None:
        self.add("ack", self.base)

    def ops(self, op: str) -> list[Call]:
        return [c for c in self.calls if c.op == op]

    def unsynced(self) -> list[str]:
        """Directory operations not followed in time by an fsync of their directories."""
        calls = self.calls
        end = next((i for i, c in enumerate(calls) if c.op == "ack"), len(calls))
        problems = []
        for i, call in enumerate(calls[:end]):
            if call.op in ("rename", "replace"):
                assert call.dest is not None
                dirs = {call.path.parent, call.dest.parent}
            elif call.op in ("create", "unlink", "mkdir") and not _is_temp(call.path):
                dirs = {call.path.parent}
            else:
                continue
            limit = end
            if call.op != "unlink":
                limit = next(
                    (
                        j
                        for j in range(i + 1, end)
                        if calls[j].op == "unlink" and not _is_temp(calls[j].path)
                    ),
                    end,
                )
            synced = {c.path for c in calls[i + 1 : limit] if c.op in ("fsync", "fsync_dir")}
            for directory in sorted(dirs - synced):
                before = "the acknowledgement" if limit == end else f"unlink {calls[limit].path}"
                target = f" -> {call.dest}" if call.dest else ""
                problems.append(
                    f"{call.op} {call.path}{target}: {directory} not fsync'd before {before}"
                )
        return problems


@pytest.fixture
def rec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    recorder = Recorder(tmp_path)
    real_open, real_fsync, real_fsync_dir = os.open, os.fsync, fsutil.fsync_dir

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        if flags & os.O_CREAT:
            recorder.add("create", path)
        return fd

    def fsync(fd: Any) -> None:
        fileno = fd if isinstance(fd, int) else fd.fileno()
        recorder.add("fsync", os.readlink(f"/proc/self/fd/{fileno}"))
        real_fsync(fd)

    def fsync_dir(path: Path) -> None:
        recorder.add("fsync_dir", path)
        real_fsync_dir(path)

    def recording(op: str, real: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            result = real(*args, **kw)
            recorder.add(op, args[0], args[1] if op in ("rename", "replace") else None)
            return result

        return call

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    for op in ("rename", "replace", "unlink", "mkdir"):
        monkeypatch.setattr(os, op, recording(op, getattr(os, op)))
    # Modules that imported fsync_dir by name hold their own reference to it.
    for module in list(sys.modules.values()):
        if module.__name__.startswith("flowagg") and vars(module).get("fsync_dir") is (
            real_fsync_dir
        ):
            monkeypatch.setattr(module, "fsync_dir", fsync_dir)
    assert (
        flowagg.journal.writer.fsync_dir is fsync_dir
        and flowagg.ingest.spool.fsync_dir is fsync_dir
    )
    assert (
        flowagg.delivery.recovery.fsync_dir is fsync_dir
        and flowagg.cli.client.fsync_dir is fsync_dir
    )
    yield recorder


def prepared(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "data")
    layout.prepare()
    return layout


def renamed_to(rec: Recorder, directory: Path) -> list[Call]:
    return [c for c in rec.ops("rename") if c.dest is not None and c.dest.parent == directory]


def test_atomic_write_publishes_batch_health_and_failed_files(
    rec: Recorder, tmp_path: Path
) -> None:
    layout = prepared(tmp_path)
    rec.calls.clear()
    fsutil.atomic_write(layout.aggregated / batch_file_name("b1"), b"{}")
    write_snapshot(layout, {"timestamp": 1, "status": "healthy"})
    fsutil.atomic_write(layout.recovery / "b2.failed.json", b"{}")
    rec.ack()
    for directory, count in ((layout.aggregated, 1), (layout.health, 2), (layout.recovery, 1)):
        assert len(renamed_to(rec, directory)) == count
    assert rec.unsynced() == []


def test_flusher_parks_a_failed_batch_durably_before_it_counts_as_stored(
    rec: Recorder, tmp_path: Path
) -> None:
    layout = prepared(tmp_path)
    stored = threading.Event()

    def on_stored(items: list[Stored]) -> None:
        rec.ack()  # the pipeline journals the done record here
        stored.set()

    def broken_store(batch_id: str, data: bytes) -> Path:
        raise OSError(errno.EIO, "Input/output error")

    flusher = Flusher(
        layout,
        FakeClock(now_ms=1_000),
        immediate_retries=0,
        next_retry_at=lambda now: now + 1000,
        store=broken_store,
        on_stored=on_stored,
    )
    flusher.start()
    rec.calls.clear()
    entries = [orjson.dumps({"userId": "u", "entryId": "e1"})]
    flusher.submit(Batch("0000000001000_000000000001", "manual", entries, 1, 1, ["e1"]))
    assert stored.wait(WAIT_S)
    flusher.stop(give_up=True)
    assert len(renamed_to(rec, layout.recovery)) == 1
    assert rec.unsynced() == []


def test_pipeline_flush_publishes_batches_before_answering(rec: Recorder, tmp_path: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path / "data")
        await rig.start()
        try:
            await rig.add(5)
            rec.calls.clear()
            await rig.pipeline.flush("manual")  # type: ignore[union-attr]
            rec.ack()
        finally:
            await rig.stop()
        assert len(renamed_to(rec, rig.layout.aggregated)) == 1

    asyncio.run(scenario())
    assert rec.unsynced() == []


def test_quarantine_moves_and_copies_are_durable(rec: Recorder, tmp_path: Path) -> None:
    layout = prepared(tmp_path)
    bad = layout.inbox / "bad.bin"
    bad.write_bytes(b"\x00junk")
    rec.calls.clear()
    fsutil.quarantine_file(layout.errors, bad, reason="r", component="test", now_ms=1)
    fsutil.quarantine_bytes(layout.errors, "torn", b"xx", reason="r", component="t", now_ms=1)
    rec.ack()
    assert rec.ops("rename")[0].path == bad
    assert len(renamed_to(rec, layout.errors)) == 4  # two files, each with its reason
    assert rec.unsynced() == []


def test_journal_segments_are_durable_before_appends_are_acknowledged(
    rec: Recorder, tmp_path: Path
) -> None:
    layout = prepared(tmp_path)
    acked = threading.Event()

    def deliver(results: list[tuple[Append, BaseException | None, Position]]) -> None:
        assert all(error is None for _, error, _ in results)
        rec.ack()
        acked.set()

    writer = JournalWriter(
        layout.journal, segments=[], next_seq=1, segment_bytes=64, deliver=deliver
    )
    writer.start()
    try:
        rec.calls.clear()
        entry = orjson.dumps({"userId": "u", "entryId": "e1"})
        writer.append_entries([entry], 1, [0], None, lambda error, pos: None)
        assert acked.wait(WAIT_S)
    finally:
        writer.stop()
    assert [c.path.parent for c in rec.ops("create")] == [layout.journal]
    assert rec.unsynced() == []


def test_journal_compaction_deletes_segments_durably(rec: Recorder, tmp_path: Path) -> None:
    layout = prepared(tmp_path)
    acked = threading.Semaphore(0)
    writer = JournalWriter(
        layout.journal,
        segments=[],
        next_seq=1,
        segment_bytes=64,
        deliver=lambda results: acked.release(),
    )
    writer.start()
    try:
        for n in range(3):  # one segment each: every record is over segment_bytes
            entry = orjson.dumps({"userId": "u", "entryId": f"e{n}", "pad": "x" * 64})
            writer.append_entries([entry], 1, [0], None, lambda error, pos: None)
            assert acked.acquire(timeout=WAIT_S)
        rec.calls.clear()
        removed = writer.compact(done_seq=3, horizon_ms=2)
        rec.ack()
    finally:
        writer.stop()
    assert len(removed) == 2
    assert [c.path for c in rec.ops("unlink")] == [
        path for seg in removed for path in (seg.with_suffix(".sum"), seg)
    ]
    assert rec.unsynced() == []


def test_journal_compaction_copies_spool_progress_durably_first(
    rec: Recorder, tmp_path: Path
) -> None:
    layout = prepared(tmp_path)
    (layout.journal_spool / "a.jsonl").write_bytes(b"")  # partly journaled; gone.jsonl is not
    acked = threading.Semaphore(0)
    writer = JournalWriter(
        layout.journal,
        segments=[],
        next_seq=1,
        segment_bytes=64,
        deliver=lambda results: acked.release(),
    )
    writer.start()
    try:
        for n, src, fin in ((0, "a.jsonl", False), (1, "gone.jsonl", True), (2, None, False)):
            entry = orjson.dumps({"userId": "u", "entryId": f"e{n}", "pad": "x" * 64})
            writer.append_entries([entry], 1, [0], src, lambda error, pos: None, off=10, fin=fin)
            assert acked.acquire(timeout=WAIT_S)
        rec.calls.clear()
        assert writer.compact(done_seq=3, horizon_ms=2) == []
        assert acked.acquire(timeout=WAIT_S)  # the copy of a.jsonl's progress
        removed = writer.compact(done_seq=3, horizon_ms=2)
        rec.ack()
    finally:
        writer.stop()
    assert len(removed) == 3
    live = writer.segments[-1].path
    copied = next(i for i, c in enumerate(rec.calls) if c == Call("fsync", live))
    spool_synced = rec.calls.index(Call("fsync_dir", layout.journal_spool))
    first_unlink = rec.calls.index(rec.ops("unlink")[0])
    assert copied < first_unlink and spool_synced < first_unlink
    assert rec.unsynced() == []


def test_spool_adoption_ingest_and_quarantine_are_durable(rec: Recorder, tmp_path: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path / "data")
        await rig.start()
        layout = rig.layout
        assert rig.pipeline is not None
        intake = SpoolIntake(layout, rig.pipeline, rescan_s=60, max_file_bytes=1 << 20)
        good = orjson.dumps({"userId": "u", "action": "a", "timestamp": 1_704_067_200_000})
        (layout.inbox / "a.jsonl").write_bytes(good + b"\n" + b"not json\n")
        (layout.inbox / "b.txt").write_bytes(b"not a spool file")
        try:
            rec.calls.clear()
            assert await intake.scan_once() == 1
            rec.ack()
        finally:
            await rig.stop()
        adopted = [c for c in rec.ops("rename") if c.path == layout.inbox / "a.jsonl"]
        assert len(adopted) == 1 and adopted[0].dest is not None
        assert adopted[0].dest.parent == layout.journal_spool
        assert [c.path for c in rec.ops("unlink")] == [adopted[0].dest]
        assert len(renamed_to(rec, layout.errors)) == 4  # b.txt, the bad line, two reasons
        assert os.listdir(layout.journal_spool) == []

    asyncio.run(scenario())
    assert rec.unsynced() == []


def test_spool_leftovers_the_journal_holds_are_deleted_durably(
    rec: Recorder, tmp_path: Path
) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path / "data")
        await rig.start()
        assert rig.pipeline is not None
        intake = SpoolIntake(rig.layout, rig.pipeline, rescan_s=60, max_file_bytes=1 << 20)
        leftover = rig.layout.journal_spool / "0000000000001-000000-a.jsonl"
        leftover.write_bytes(b"{}\n")
        try:
            rec.calls.clear()
            await intake.recover({leftover.name: (3, True)})
            rec.ack()
        finally:
            await rig.stop()
        assert [c.path for c in rec.ops("unlink")] == [leftover]

    asyncio.run(scenario())
    assert rec.unsynced() == []


def test_recovery_moves_are_durable_before_the_source_goes(rec: Recorder, tmp_path: Path) -> None:
    layout = prepared(tmp_path)
    clock = FakeClock(now_ms=10_000)
    store = FlakyStore(layout)
    store.error = None
    recovery = Recovery(layout, clock, random.Random(1), POLICY, store=store)
    put_failed(layout, failed_doc("b1"))
    rec.calls.clear()
    assert recovery.run_once().recovered == ["b1"]
    rec.ack()
    assert len(renamed_to(rec, layout.aggregated)) == 1
    assert [c.path for c in rec.ops("unlink")] == [layout.recovery / "b1.failed.json"]
    assert rec.unsynced() == []


def test_recovery_abandon_and_requeue_are_durable(rec: Recorder, tmp_path: Path) -> None:
    layout = prepared(tmp_path)
    clock = FakeClock(now_ms=10_000)
    recovery = Recovery(layout, clock, random.Random(1), POLICY, store=FlakyStore(layout))
    put_failed(layout, failed_doc("b1", retryCount=POLICY.limit - 1))
    rec.calls.clear()
    assert recovery.run_once().abandoned == ["b1"]
    rec.ack()
    assert len(renamed_to(rec, layout.abandoned)) == 1
    assert [c.path for c in rec.ops("unlink")] == [layout.recovery / "b1.failed.json"]
    assert rec.unsynced() == []

    rec.calls.clear()
    assert recovery.requeue_abandoned() == ["b1"]
    rec.ack()
    assert len(renamed_to(rec, layout.recovery)) == 1
    assert [c.path for c in rec.ops("unlink")] == [layout.abandoned / "b1.abandoned.json"]
    assert rec.unsynced() == []


def test_reconcile_deletes_are_durable(rec: Recorder, tmp_path: Path) -> None:
    layout = prepared(tmp_path)
    recovery = Recovery(layout, FakeClock(now_ms=10_000), random.Random(1), POLICY)
    # b1 was moved to aggregated/ and b2 to abandoned/, and b3 requeued from abandoned/: each
    # crashed before deleting the old copy.
    done = failed_doc("b1")
    put_failed(layout, done)
    (layout.aggregated / batch_file_name("b1")).write_bytes(orjson.dumps(done))
    parked = failed_doc("b2", abandonedAt=5)
    put_failed(layout, failed_doc("b2", nextRetryAt=1 << 50))
    (layout.abandoned / "b2.abandoned.json").write_bytes(orjson.dumps(parked))
    put_failed(layout, failed_doc("b3", requeuedAt=9, nextRetryAt=1 << 50))
    (layout.abandoned / "b3.abandoned.json").write_bytes(orjson.dumps(failed_doc("b3")))
    rec.calls.clear()
    report = recovery.run_once()
    rec.ack()
    assert sorted(report.reconciled) == ["b1.failed.json", "b2.failed.json", "b3.abandoned.json"]
    assert len(rec.ops("unlink")) == 3
    assert rec.unsynced() == []


def test_client_spool_file_is_durable_when_write_returns(rec: Recorder, tmp_path: Path) -> None:
    layout = prepared(tmp_path)
    rec.calls.clear()
    path = write_spool_file(layout, [{"userId": "u"}])
    rec.ack()
    assert [c.dest for c in rec.ops("rename")] == [path]
    assert rec.unsynced() == []


def test_layout_prepare_makes_new_folders_durable(rec: Recorder, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "data", tmp_path / "run")
    layout.prepare()
    rec.ack()
    assert {c.path for c in rec.ops("mkdir")} == {layout.root, *layout.all_dirs()}
    assert rec.unsynced() == []


def test_the_recorder_reports_a_missing_directory_fsync(rec: Recorder, tmp_path: Path) -> None:
    layout = prepared(tmp_path)
    rec.calls.clear()
    os.rename(layout.inbox, tmp_path / "moved")
    rec.ack()
    assert rec.unsynced() == [
        f"rename {layout.inbox} -> {tmp_path / 'moved'}: {directory} not fsync'd before"
        " the acknowledgement"
        for directory in sorted({tmp_path, layout.root})
    ]
