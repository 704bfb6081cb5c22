"""A batch id names one set of entries forever (SPEC §5): cuts are journaled.

Each test builds the state a crash leaves (batches stored without their done records, then a
hole, a torn file, a smaller window, a sink that took a batch the daemon never wrote) and
checks that a restart rebuilds every batch under the id it had, with the same bytes, and
that batches already visible stay where they are.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.batches import cut_queue, published
from flowagg.batches.aggregator import Aggregator, FlushPolicy
from flowagg.batches.storage import iter_batch_files, read_batch
from flowagg.core.config import load_config
from flowagg.core.layout import Layout
from flowagg.journal.format import summary_path
from flowagg.journal.public import Cut, Position, frame, list_segments, unframe
from flowagg.journal.writer import JournalWriter
from tests.batches.test_attack_runs import restart, stored_without_done_records
from tests.harness import cli, entry, start_daemon, stored_id_counts, wait_for
from tests.system.test_faults import Rig


def configure(rig: Rig, **flags: Any) -> None:
    rig.config = load_config(
        flags={"root": str(rig.layout.root), "maxAgeMs": 3_600_000, **flags}, environ={}
    )


def crashed_after_storing(
    root: Path, *, batches: int, per_batch: int = 30, unstored: int = 0, **flags: Any
) -> Rig:
    """`batches` batches stored without their done records (a crash before those reached
    the disk), then `unstored` entries journaled and never cut."""

    return stored_without_done_records(
        root,
        batches=batches,
        unstored=unstored,
        per_batch=per_batch,
        setup=lambda rig: configure(rig, batchSize=per_batch, **flags),
    )


def found_at_restart(rig: Rig, timeout: float = 30.0) -> int:
    """Start again on the same root, flush, stop; how many batches the start found stored."""
    return restart(rig, timeout)["batchesFoundAtStart"]


def snapshot(layout: Layout) -> dict[str, bytes]:
    """Batch file name -> bytes, for every stored batch."""
    return {path.name: path.read_bytes() for path in iter_batch_files(layout)}


def ids_by_batch(layout: Layout) -> dict[str, list[str]]:
    return {
        doc["batchId"]: [e["entryId"] for e in doc["entries"]]
        for doc in (read_batch(path) for path in iter_batch_files(layout))
    }


def reasons(layout: Layout) -> list[str]:
    return sorted(p.name for p in layout.errors.iterdir() if p.name.endswith(".reason.json"))


def test_a_hole_is_written_again_under_its_own_id_and_later_batches_stay(tmp_path: Path) -> None:
    """A power cut kept a run's later names and lost an earlier one. The hole is written
    again from its journaled cut, byte for byte; the batches after it, which readers (and
    a sink) have seen, stay as they are and are never rebuilt under other ids."""
    rig = crashed_after_storing(tmp_path / "data", batches=4)
    before = snapshot(rig.layout)
    hole = sorted(before)[1]
    (rig.layout.aggregated / hole).unlink()
    assert found_at_restart(rig) == 3
    rig.check("aggregated")
    assert snapshot(rig.layout) == before, "the same names with the same bytes"
    assert reasons(rig.layout) == []


@pytest.mark.parametrize("where", ["first", "middle"])
def test_a_torn_batch_is_moved_aside_and_written_again_alone(tmp_path: Path, where: str) -> None:
    rig = crashed_after_storing(tmp_path / "data", batches=3)
    before = snapshot(rig.layout)
    torn = sorted(before)[0 if where == "first" else 1]
    path = rig.layout.aggregated / torn
    path.write_bytes(path.read_bytes()[:-30])
    restart(rig)
    rig.check("aggregated")
    assert snapshot(rig.layout) == before
    assert reasons(rig.layout) == [f"{torn}.reason.json"]


def test_a_smaller_window_and_batch_size_rebuild_the_journaled_cuts(tmp_path: Path) -> None:
    """The crash had a larger memory window and batch size than the restart: the restart
    still rebuilds the journaled cuts, not cuts of today's settings, even for a hole wider
    than today's window."""
    rig = crashed_after_storing(
        tmp_path / "data",
        batches=30,
        per_batch=1000,
        memoryWindowEntries=100_000,
        maxBatchBytes=1 << 24,
    )
    before = ids_by_batch(rig.layout)
    for name in sorted(snapshot(rig.layout))[:25]:  # 25 000 entries: past a 20 000 window
        (rig.layout.aggregated / name).unlink()
    configure(rig, batchSize=700, maxBatchBytes=1 << 24)
    restart(rig, timeout=120)
    rig.check("aggregated")
    assert ids_by_batch(rig.layout) == before
    assert reasons(rig.layout) == []


def test_cuts_are_journaled_before_the_batch_leaves(tmp_path: Path) -> None:
    rig = crashed_after_storing(tmp_path / "data", batches=2)
    records = [
        unframe(line)
        for seg in list_segments(rig.layout.journal)
        for line in seg.read_bytes().splitlines(keepends=True)
    ]
    cuts = [r for r in records if r is not None and r["k"] == "c"]
    stored = {doc["batchId"]: doc for doc in map(read_batch, iter_batch_files(rig.layout))}
    assert [c["b"] for c in cuts] == sorted(stored)
    for cut in cuts:
        doc = stored[cut["b"]]
        assert cut["l"] - cut["f"] + 1 == doc["entryCount"]
        assert (cut["g"], cut["ts"]) == (doc["trigger"], doc["timestamp"])


def test_folders_are_synced_at_start_before_any_done_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between a batch's rename and its directory fsync, then a restart that finds
    the batch: its done record must not become durable before its name is."""
    rig = crashed_after_storing(tmp_path / "data", batches=2)
    events: list[str] = []
    real_fsync, real_done = os.fsync, JournalWriter.append_done

    def fsync(fd: int) -> None:
        events.append(f"fsync {os.path.realpath(f'/proc/self/fd/{fd}')}")
        real_fsync(fd)

    def append_done(self: JournalWriter, last_seq: int, batch_id: str) -> None:
        events.append("done")
        real_done(self, last_seq, batch_id)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(JournalWriter, "append_done", append_done)
    assert found_at_restart(rig) == 2
    assert "done" in events
    first_done = events.index("done")
    synced = {e.split(" ", 1)[1] for e in events[:first_done] if e.startswith("fsync ")}
    for folder in (rig.layout.aggregated, rig.layout.inbox, rig.layout.journal_spool):
        assert str(folder.resolve()) in synced, f"{folder.name}/ not synced before a done record"


def as_version_1(layout: Layout) -> None:
    """Rewrite the journal as flowagg 0.x wrote it: no cut records, version 1 headers."""
    for seg in list_segments(layout.journal):
        summary_path(seg).unlink(missing_ok=True)
        lines = []
        for line in seg.read_bytes().splitlines(keepends=True):
            record = unframe(line)
            assert record is not None
            if record["k"] == "c":
                continue
            if record["k"] == "h":
                line = frame(orjson.dumps({**record, "v": 1}))
            lines.append(line)
        seg.write_bytes(b"".join(lines))


def test_a_version_1_journal_still_finds_its_stored_batches(tmp_path: Path) -> None:
    rig = crashed_after_storing(tmp_path / "data", batches=3, unstored=10)
    as_version_1(rig.layout)
    assert found_at_restart(rig) == 3
    rig.check("aggregated")
    heads = [
        unframe(seg.read_bytes().splitlines(keepends=True)[0])
        for seg in list_segments(rig.layout.journal)
    ]
    assert [h["v"] for h in heads if h is not None][-1] == 2, "new records in a new segment"


def test_a_version_1_journal_with_a_hole_sets_the_later_batches_aside(tmp_path: Path) -> None:
    """Without cut records, where the missing batch ended is unknown: the batches after it
    are set aside and everything from the hole is rebuilt, as version 1 did."""
    rig = crashed_after_storing(tmp_path / "data", batches=3)
    as_version_1(rig.layout)
    (rig.layout.aggregated / sorted(snapshot(rig.layout))[0]).unlink()
    restart(rig)
    rig.check("aggregated")
    assert len(reasons(rig.layout)) == 2


def test_a_version_1_start_killed_while_setting_batches_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start dies after its first quarantine; the next one must still not store twice."""
    rig = crashed_after_storing(tmp_path / "data", batches=3)
    as_version_1(rig.layout)
    a = iter_batch_files(rig.layout)[0]
    a.write_bytes(a.read_bytes()[:-30])
    real = published.quarantine_file
    calls = [0]

    def dying(*args: Any, **kwargs: Any) -> Path:
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt  # stands for the kill: nothing after it runs
        return real(*args, **kwargs)

    monkeypatch.setattr(published, "quarantine_file", dying)
    with pytest.raises(KeyboardInterrupt):
        published.skip_published(
            rig.layout,
            rig.clock,
            Aggregator(FlushPolicy.from_config(rig.config)),
            Position(0, 0),
            lambda seq, batch_id: None,
            until_seq=10**9,
        )
    monkeypatch.setattr(published, "quarantine_file", real)
    restart(rig)
    rig.check("aggregated")


def killing_sink(tmp_path: Path, log: Path, armed: Path, pid_file: Path) -> str:
    """A command sink that records each batch it accepts; while `armed` exists, it kills
    the daemon (SIGKILL) after accepting, before the daemon can write the batch itself."""
    script = tmp_path / "sink.py"
    script.write_text(
        "import os, pathlib, signal, sys\n"
        "data = sys.stdin.buffer.read()\n"
        f"with open({str(log)!r}, 'ab') as fh:\n"
        "    fh.write(data.rstrip(b'\\n') + b'\\n')\n"
        "    fh.flush()\n"
        "    os.fsync(fh.fileno())\n"
        f"armed = pathlib.Path({str(armed)!r})\n"
        "if armed.exists():\n"
        "    armed.unlink()\n"
        f"    os.kill(int(pathlib.Path({str(pid_file)!r}).read_text()), signal.SIGKILL)\n"
    )
    return f"{sys.executable} {script}"


def test_a_sink_gets_the_same_batch_again_after_a_kill(tmp_path: Path) -> None:
    """The sink took batch A (30 entries, cut by `flush`); the daemon died before writing
    it. More entries arrived through the spool while it was down. The restart delivers A
    again with the same 30 entries and the same bytes, never a wider batch under A's id."""
    root = tmp_path / "data"
    log, armed = tmp_path / "sink.jsonl", tmp_path / "armed"
    layout = Layout(root)
    settings = {
        "sinkType": "command",
        "sinkCommand": killing_sink(tmp_path, log, armed, layout.pid_file),
        "maxAgeMs": 3_600_000,
        "batchSize": 50,
    }
    daemon = start_daemon(root, settings)
    first = [entry(i, entryId=f"a{i}") for i in range(30)]
    assert cli(root, "add", input=orjson.dumps(first)).returncode == 0
    armed.touch()
    cli(root, "flush")  # answered or not: the sink kills the daemon during it
    assert daemon.proc.wait(30) == -signal.SIGKILL
    daemon.kill()
    assert not list(layout.aggregated.glob("batch_*")), "killed before the local write"
    later = [entry(100 + i, entryId=f"b{i}") for i in range(20)]
    spool = cli(root, "add", "--spool", input=orjson.dumps(later))
    assert spool.returncode == 0, spool.stderr
    daemon = start_daemon(root, settings)
    wait_for(lambda: stored_id_counts(root).get("a0") == 1)
    assert cli(root, "flush").returncode == 0
    assert daemon.stop() == 0
    delivered: dict[str, set[bytes]] = {}
    for line in log.read_bytes().splitlines():
        doc = orjson.loads(line)
        delivered.setdefault(doc["batchId"], set()).add(line)
    assert all(len(copies) == 1 for copies in delivered.values()), "one id, one content"
    counts = stored_id_counts(root)
    assert set(counts) == {e["entryId"] for e in first + later}
    assert set(counts.values()) == {1}
    first_batch = read_batch(sorted(layout.aggregated.glob("batch_*"))[0])
    assert [e["entryId"] for e in first_batch["entries"]] == [e["entryId"] for e in first]


def test_a_cut_whose_journal_write_fails_is_journaled_again_and_keeps_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first cut's journal write fails twice: no batch leaves before its cut is durable,
    and the batches cut after it wait, so they are still stored in order."""
    monkeypatch.setattr(cut_queue, "CUT_RETRY_S", 0.01)
    real = JournalWriter.append_cut
    failures = [2]
    handed: list[str] = []

    def flaky(self: JournalWriter, cut: Any, callback: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.EIO, "injected")
        real(self, cut, callback)

    monkeypatch.setattr(JournalWriter, "append_cut", flaky)

    async def main() -> Rig:
        rig = Rig(tmp_path / "data")
        configure(rig, batchSize=30)
        pipeline = await rig.start()
        assert pipeline.flusher is not None
        submit = pipeline.flusher.submit

        def record(batch: Any) -> None:
            handed.append(batch.batch_id)
            submit(batch)

        assert pipeline.flushing.cuts is not None
        pipeline.flushing.cuts._hand_over = record  # what the flusher is handed, in that order
        await rig.add(90)
        await asyncio.wait_for(pipeline.flush(), 30)
        assert pipeline.counters["journalErrors"] == 2
        await rig.stop()
        return rig

    rig = asyncio.run(main())
    rig.check("aggregated")
    assert handed == sorted(handed) and len(handed) == 3
    cuts = [
        r["b"]
        for seg in list_segments(rig.layout.journal)
        for r in map(unframe, seg.read_bytes().splitlines(keepends=True))
        if r is not None and r["k"] == "c"
    ]
    assert sorted(cuts) == handed


def test_entries_before_a_journaled_cut_are_cut_apart_from_it() -> None:
    """A later cut reached the journal and an earlier one did not (its write failed before a
    crash): the entries before the journaled cut are cut fresh, never into it."""
    agg = Aggregator(
        FlushPolicy(
            batch_size=50,
            max_age_s=3600,
            max_batch_bytes=1 << 20,
            threshold_bytes=1 << 20,
            memory_window=1000,
            max_buffered_entries=10**6,
            max_buffered_bytes=1 << 30,
        )
    )
    agg.replay.append(Cut("0000000000005_000000000011", 11, 20, "manual", 77))
    agg.load_run(
        1, 5, 0.0, [b'{"n":%d}' % i for i in range(1, 26)], [f"e{i}" for i in range(1, 26)]
    )
    first, second = agg.cut_due(0.0, now_ms=99)
    assert (first.first_seq, first.last_seq, first.trigger) == (1, 10, "age")
    assert (second.batch_id, second.first_seq, second.last_seq) == (
        "0000000000005_000000000011",
        11,
        20,
    )
    assert (second.trigger, second.timestamp_ms, second.replayed) == ("manual", 77, True)
    assert agg.cut_due(0.0, now_ms=99) == [], "the rest waits for its own trigger"
    (rest,) = agg.cut_all("manual", now_ms=99)
    assert (rest.first_seq, rest.last_seq, rest.replayed) == (21, 25, False)
