"""Attacks on journaled cuts (SPEC §5, last paragraph): a batch id names one set of entries.

Each test builds a state a crash, a damaged journal or a failing disk leaves, restarts, and
checks that every acknowledged entry is stored exactly once and that no batch id ever names
two contents.
"""

from __future__ import annotations

import asyncio
import errno
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.batches import cut_queue, replayed
from flowagg.batches.storage import CompletedFiles, iter_batch_files, read_batch
from flowagg.core.layout import Layout
from flowagg.delivery.failed_format import Delivery, failed_document
from flowagg.journal.public import frame, list_segments, unframe
from flowagg.journal.writer import JournalWriter
from tests.batches.test_batch_identity import (
    configure,
    ids_by_batch,
    killing_sink,
    restart,
    snapshot,
)
from tests.harness import cli, entry, start_daemon, stored_id_counts
from tests.system.test_faults import Rig, until


def stored_in_records(root: Path, *, batches: int, per_batch: int = 30, record: int = 10) -> Rig:
    """`batches` batches of `per_batch` entries, journaled `record` entries a record, stored
    without their done records (a crash before those reached the disk)."""

    async def main() -> Rig:
        rig = Rig(root)
        configure(rig, batchSize=per_batch)
        pipeline = await rig.start()
        assert pipeline.writer is not None
        pipeline.writer.append_done = lambda last_seq, batch_id: None  # type: ignore[method-assign]
        for _ in range(batches * per_batch // record):
            await rig.add(record)
        await pipeline.flush()
        await pipeline.shutdown(flush_s=0)
        return rig

    return asyncio.run(main())


def journal_lines(layout: Layout) -> list[tuple[Path, int, dict[str, Any] | None]]:
    """(segment, line index, record) for every line of the journal, oldest first."""
    return [
        (seg, n, unframe(line))
        for seg in list_segments(layout.journal)
        for n, line in enumerate(seg.read_bytes().splitlines(keepends=True))
    ]


def damage(seg: Path, index: int) -> None:
    """Flip a byte inside one record's payload: its checksum fails, the scan quarantines it."""
    lines = seg.read_bytes().splitlines(keepends=True)
    line = bytearray(lines[index])
    line[20] ^= 0x01
    lines[index] = bytes(line)
    seg.write_bytes(b"".join(lines))


def add_records(layout: Layout) -> list[tuple[Path, int, dict[str, Any]]]:
    return [(s, n, r) for s, n, r in journal_lines(layout) if r is not None and r["k"] == "a"]


def then_more(rig: Rig, count: int, **flags: Any) -> None:
    """Start again, add `count` entries, flush, stop."""

    async def main() -> None:
        configure(rig, **flags)
        pipeline = await rig.start()
        await rig.add(count)
        await pipeline.flush()
        await rig.stop()

    asyncio.run(main())


def test_a_damaged_record_inside_a_stored_batch_keeps_the_stored_copy(tmp_path: Path) -> None:
    """A journal record in the middle of a stored batch fails its checksum. The batch file
    still holds every entry its cut names: it is the one copy of the damaged record's
    entries, so the start must take it as stored, not move it aside and write the rest."""
    rig = stored_in_records(tmp_path / "data", batches=3)
    before = snapshot(rig.layout)
    seg, index, record = add_records(rig.layout)[4]  # seqs 41..50, inside the second batch
    assert record["q"] == 41
    damage(seg, index)
    restart(rig)
    rig.check("aggregated")
    assert snapshot(rig.layout) == before


def test_a_damaged_last_record_of_a_cut_never_reuses_its_seqs_or_its_id(tmp_path: Path) -> None:
    """The last add record, the tail of the last stored batch, is damaged; only its cut
    record follows it. The seqs it held are named by that cut: new entries must not take
    them (they would be cut into the old batch's id), and the stored batch stays whole."""
    rig = stored_in_records(tmp_path / "data", batches=2)
    before = snapshot(rig.layout)
    old_ids = ids_by_batch(rig.layout)
    seg, index, record = add_records(rig.layout)[-1]
    assert record["q"] == 51
    damage(seg, index)
    then_more(rig, 15, batchSize=20)
    rig.check("aggregated")
    after = ids_by_batch(rig.layout)
    for batch_id, ids in old_ids.items():
        assert after[batch_id] == ids, f"batch {batch_id} changed its entries"
    assert {k: v for k, v in snapshot(rig.layout).items() if k in before} == before


def test_a_cut_straddling_the_done_cursor_keeps_its_stored_copy(tmp_path: Path) -> None:
    """A done record lands inside a journaled cut (a crafted journal: no flowagg writes
    one there). The cut's batch is stored whole; the entries before the done cursor are in
    it and nowhere else, so it must not be moved aside and written again without them."""
    rig = stored_in_records(tmp_path / "data", batches=2)
    before = snapshot(rig.layout)
    seg = list_segments(rig.layout.journal)[-1]
    done = frame(orjson.dumps({"k": "d", "q": 45, "b": "crafted"}))
    seg.write_bytes(seg.read_bytes() + done)
    restart(rig)
    rig.check("aggregated")
    assert snapshot(rig.layout) == before


def stored_ids(layout: Layout) -> list[str]:
    return [e["entryId"] for p in iter_batch_files(layout) for e in read_batch(p)["entries"]]


def test_a_damaged_cut_record_never_stores_its_batch_twice(tmp_path: Path) -> None:
    """The last cut record is damaged: its batch is stored, the start cannot know where it
    ended. Restarted with another compression and batch size, the entries it holds must not
    be written again beside it under another suffix."""
    rig = stored_in_records(tmp_path / "data", batches=2)
    cuts = [(s, n, r) for s, n, r in journal_lines(rig.layout) if r is not None and r["k"] == "c"]
    seg, index, _ = cuts[-1]
    damage(seg, index)
    rig.files = CompletedFiles(rig.layout, "gzip")
    then_more(rig, 15, batchSize=50)
    rig.check("aggregated")


def test_a_failed_copy_recovered_while_the_start_looks_for_it_is_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replayed batch lies in recovery/ as failed; the recovery loop completes it into
    aggregated/ just as the flusher's start-up look reaches the failed name. The batch is
    stored: the look must find it in aggregated/, not write it again over the recovered copy
    (and, with a sink, deliver it a second time)."""
    rig = stored_in_records(tmp_path / "data", batches=2)
    first = iter_batch_files(rig.layout)[0]
    batch_id = read_batch(first)["batchId"]
    failed = rig.layout.recovery / f"{batch_id}.failed.json"
    failed.write_bytes(
        failed_document(
            first.read_bytes(), error="EIO", now_ms=1, next_retry_ms=1, delivery=Delivery()
        )
    )
    first.unlink()
    real = replayed.read_batch

    def racing(path: Path) -> dict[str, Any]:
        if path == failed:
            assert rig.recovery.run_once(force=True).recovered == [batch_id]
        return real(path)

    monkeypatch.setattr(replayed, "read_batch", racing)
    restart(rig)
    rig.check("aggregated")
    assert read_batch(first)["recovered"] is True, "the recovered copy was written over"


def test_a_sink_gets_one_content_per_id_across_kills_and_other_settings(tmp_path: Path) -> None:
    """The sink takes batch A (cut by `flush`) and the daemon is killed before writing it;
    the restart has a smaller batch size, a smaller window and compression on, and is
    killed again the same way after more entries. Every id the sink ever saw carries one
    content, byte for byte (timestamp included), and every entry is stored once."""
    root = tmp_path / "data"
    log, armed = tmp_path / "sink.jsonl", tmp_path / "armed"
    layout = Layout(root)
    sink = killing_sink(tmp_path, log, armed, layout.pid_file)
    base = {"sinkType": "command", "sinkCommand": sink, "maxAgeMs": 3_600_000}
    runs = [
        {"batchSize": 50},
        {"batchSize": 7, "memoryWindowEntries": 1000, "batchCompression": "gzip"},
        {"batchSize": 500, "maxBatchBytes": 1 << 20},
    ]
    acked: set[str] = set()
    for n, settings in enumerate(runs):
        daemon = start_daemon(root, {**base, **settings})
        batch = [entry(i, entryId=f"r{n}-{i}") for i in range(30)]
        assert cli(root, "add", input=orjson.dumps(batch)).returncode == 0
        acked.update(e["entryId"] for e in batch)
        if n < len(runs) - 1:
            armed.touch()
            cli(root, "flush")  # the sink kills the daemon during it
            assert daemon.proc.wait(30) == -signal.SIGKILL
            daemon.kill()
    assert cli(root, "flush").returncode == 0
    assert daemon.stop() == 0
    lines = log.read_bytes().splitlines()
    delivered: dict[str, set[bytes]] = {}
    for line in lines:
        delivered.setdefault(orjson.loads(line)["batchId"], set()).add(line)
    assert len(lines) >= len(delivered) + 2, "both killed batches were delivered again"
    assert all(len(copies) == 1 for copies in delivered.values()), "one id, one content"
    counts = stored_id_counts(root)
    assert set(counts) == acked and set(counts.values()) == {1}


def test_a_failed_cut_with_later_cuts_durable_then_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first cut's journal write fails (EIO) while the two cut after it are durable;
    the daemon dies before the retry. The restart, with a smaller batch size, cuts the
    first batch's entries anew and rebuilds the later two exactly as journaled."""
    monkeypatch.setattr(cut_queue, "CUT_RETRY_S", 3600.0)  # the crash comes first
    real = JournalWriter.append_cut
    failed: list[str] = []

    def flaky(self: JournalWriter, cut: Any, callback: Any) -> None:
        if not failed:
            failed.append(cut.batch_id)
            callback(OSError(errno.EIO, "injected"), None)
            return
        real(self, cut, callback)

    monkeypatch.setattr(JournalWriter, "append_cut", flaky)

    async def crash() -> Rig:
        rig = Rig(tmp_path / "data")
        configure(rig, batchSize=30)
        pipeline = await rig.start()
        for _ in range(3):
            await rig.add(30)
        assert pipeline.flushing.cuts is not None
        await until(lambda: len(journaled_cuts(rig.layout)) == 2)
        assert len(pipeline.flushing.cuts) == 3, "no batch leaves before the failed cut"
        await pipeline.shutdown(flush_s=0)
        return rig

    rig = asyncio.run(crash())
    assert rig.where() == {}
    later = journaled_cuts(rig.layout)
    monkeypatch.setattr(JournalWriter, "append_cut", real)
    configure(rig, batchSize=20)
    restart(rig)
    rig.check("aggregated")
    stored = ids_by_batch(rig.layout)
    for cut in later:
        assert stored[cut["b"]] == [f"e{q}" for q in range(cut["f"], cut["l"] + 1)]
    assert failed[0] in stored and len(stored[failed[0]]) == 20, "cut anew, today's size"


def journaled_cuts(layout: Layout) -> list[dict[str, Any]]:
    return [r for _, _, r in journal_lines(layout) if r is not None and r["k"] == "c"]
