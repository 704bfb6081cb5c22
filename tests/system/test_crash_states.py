"""Start-up from the states a crash can leave behind, built on purpose.

The torture test kills at random instants; these tests pin down the narrow windows one by
one (a batch stored but its done record lost, a temp file left mid-write, a spool file
adopted with or without its journal record, a stored batch that was damaged).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from flowagg.batches.storage import iter_batch_files, read_batch
from flowagg.core.layout import Layout
from flowagg.journal.public import list_segments, unframe
from tests.harness import cli, entry, start_daemon, stored_id_counts, wait_for

SETTINGS = {"batchSize": 5, "maxAgeMs": 3_600_000}


def journal_records(layout: Layout) -> list[dict]:
    records = []
    for seg in list_segments(layout.journal):
        for line in seg.read_bytes().splitlines(keepends=True):
            record = unframe(line)
            assert record is not None
            records.append(record)
    return records


def strip_done_records(layout: Layout) -> int:
    """Rewrite the journal as if no done record had reached it before the crash."""
    stripped = 0
    for seg in list_segments(layout.journal):
        kept = []
        for line in seg.read_bytes().splitlines(keepends=True):
            record = unframe(line)
            if record is not None and record["k"] == "d":
                stripped += 1
            else:
                kept.append(line)
        seg.write_bytes(b"".join(kept))
    return stripped


def add(root: Path, entries: list[dict]) -> None:
    proc = cli(root, "add", input=orjson.dumps(entries))
    assert proc.returncode == 0, proc.stderr


def test_batches_stored_before_their_done_record_are_not_written_again(root: Path) -> None:
    daemon = start_daemon(root, SETTINGS)
    add(root, [entry(i, entryId=f"e{i}") for i in range(12)])  # two size batches + 2 buffered
    layout = Layout(root)

    def done_seq() -> int:  # the writer may be mid-line: read whole records only
        lines = (
            ln for seg in list_segments(layout.journal) for ln in seg.read_bytes().splitlines(True)
        )
        return max((r["q"] for ln in lines if (r := unframe(ln) or {}).get("k") == "d"), default=0)

    def stored_seq() -> int:
        files = iter_batch_files(layout)
        if len(files) != 2:
            return 0
        return max(
            int(p.name.split("_")[2].split(".")[0]) + read_batch(p)["entryCount"] - 1 for p in files
        )

    # The add is answered once journaled; the flusher writes the batches just after, as one
    # run or one by one: one done record for each group of them.
    wait_for(lambda: (seq := stored_seq()) and done_seq() == seq)
    daemon.kill()
    assert strip_done_records(layout) in (1, 2)
    daemon = start_daemon(root, SETTINGS)
    assert cli(root, "flush").returncode == 0
    assert daemon.stop() == 0
    assert stored_id_counts(root) == {f"e{i}": 1 for i in range(12)}
    assert "stored before the last stop" in daemon.log()


def test_temp_file_left_mid_write_is_removed_and_entries_written_once(root: Path) -> None:
    daemon = start_daemon(root, SETTINGS)
    add(root, [entry(i, entryId=f"t{i}") for i in range(3)])
    daemon.kill()
    layout = Layout(root)
    stale = layout.aggregated / ".flowagg-tmp-batch_x.json.123"
    stale.write_bytes(b'{"batchId": "half')
    daemon = start_daemon(root, SETTINGS)
    assert not stale.exists()
    assert cli(root, "flush").returncode == 0
    assert daemon.stop() == 0
    assert stored_id_counts(root) == {"t0": 1, "t1": 1, "t2": 1}


def test_adopted_spool_file_already_journaled_is_not_ingested_again(root: Path) -> None:
    daemon = start_daemon(root, {**SETTINGS, "spoolRescanMs": 50})
    layout = Layout(root)
    spool = [entry(i) for i in range(3)]  # no entryIds: only the journal can tell
    (layout.inbox / "tool.jsonl").write_bytes(b"\n".join(orjson.dumps(e) for e in spool))

    wait_for(lambda: not list(layout.inbox.iterdir()) and not list(layout.journal_spool.iterdir()))
    daemon.kill()
    src = next(r["src"] for r in journal_records(layout) if r.get("src"))
    # The crash came after the journal record but before the adopted file was deleted.
    (layout.journal_spool / src).write_bytes(b"\n".join(orjson.dumps(e) for e in spool))
    daemon = start_daemon(root, SETTINGS)
    assert not (layout.journal_spool / src).exists()
    assert cli(root, "flush").returncode == 0
    assert daemon.stop() == 0
    assert sum(stored_id_counts(root).values()) == 3


def test_adopted_spool_file_without_journal_record_is_ingested_at_start(root: Path) -> None:
    daemon = start_daemon(root, SETTINGS)
    assert daemon.stop() == 0
    layout = Layout(root)
    adopted = layout.journal_spool / "1704067200000-000000-tool.jsonl"
    adopted.write_bytes(orjson.dumps(entry(1, entryId="adopted")))
    daemon = start_daemon(root, SETTINGS)
    assert not adopted.exists()
    assert cli(root, "flush").returncode == 0
    assert daemon.stop() == 0
    assert stored_id_counts(root) == {"adopted": 1}


def test_damaged_stored_batch_is_quarantined_and_rebuilt_from_the_journal(root: Path) -> None:
    daemon = start_daemon(root, SETTINGS)
    add(root, [entry(i, entryId=f"d{i}") for i in range(5)])
    layout = Layout(root)
    # The size trigger fired; the batch is written off the ack path, so wait for it.
    [batch] = wait_for(lambda: iter_batch_files(layout))
    daemon.kill()
    strip_done_records(layout)
    batch.write_bytes(batch.read_bytes()[:-40])  # damaged after the crash
    daemon = start_daemon(root, SETTINGS)
    assert cli(root, "flush").returncode == 0
    assert daemon.stop() == 0
    assert stored_id_counts(root) == {f"d{i}": 1 for i in range(5)}
    assert (layout.errors / batch.name).exists()
    assert (layout.errors / (batch.name + ".reason.json")).exists()


def test_copy_of_a_root_restarts_to_the_same_stored_set(root: Path, tmp_path: Path) -> None:
    """A root copied at an arbitrary moment (like a snapshot) recovers without duplicates."""
    daemon = start_daemon(root, SETTINGS)
    add(root, [entry(i, entryId=f"c{i}") for i in range(23)])
    daemon.kill()
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("*.sock", "*.lock"))
    daemon = start_daemon(copy, SETTINGS)
    assert cli(copy, "flush").returncode == 0
    assert daemon.stop() == 0
    assert stored_id_counts(copy) == {f"c{i}": 1 for i in range(23)}


def test_ids_added_after_a_damaged_journal_tail_are_remembered_by_later_starts(
    root: Path,
) -> None:
    """The journal's tail is damaged below the seqs the dedupe stores hold (SQLite's
    checkpoint, the saved filter's): the ids added after it must still reach both."""
    layout = Layout(root)
    first = [entry(i, entryId=f"a{i}") for i in range(10)]
    daemon = start_daemon(root, SETTINGS)
    add(root, first[:5])
    assert daemon.stop() == 0
    [segment] = list_segments(layout.journal)
    good = segment.stat().st_size
    daemon = start_daemon(root, SETTINGS)  # appends to the same segment
    add(root, first[5:])
    assert daemon.stop() == 0
    # Stored, and both stores hold every id up to seq 10; the second run's records (seqs 6
    # to 10: their add, cut and done records) are damaged.
    with segment.open("r+b") as fh:
        fh.truncate(good)
        fh.seek(good)
        fh.write(b'deadbeef {"k":"a","q":')
    daemon = start_daemon(root, SETTINGS)
    later = [entry(20 + i, entryId=f"b{i}") for i in range(5)]
    add(root, later)
    daemon.kill()  # before the filter is saved again
    daemon = start_daemon(root, SETTINGS)
    add(root, first + later)
    assert cli(root, "flush").returncode == 0
    assert daemon.stop() == 0
    assert stored_id_counts(root) == {e["entryId"]: 1 for e in first + later}


DAMAGED = {**SETTINGS, "batchSize": 10}
FIRST = [entry(i, entryId=f"a{i}") for i in range(10)]


@pytest.fixture(scope="module")
def damaged_tail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One batch holding a0..a9 (the first run's a0..a4, killed unflushed, and the second
    run's a5..a9) is stored; then the journal loses the second run's records: its adds, the
    batch's cut and its done record. The stored file is the only copy of a5..a9."""
    root = tmp_path_factory.mktemp("damaged") / "data"
    layout = Layout(root)
    daemon = start_daemon(root, DAMAGED)
    add(root, FIRST[:5])
    daemon.kill()
    [segment] = list_segments(layout.journal)
    good = segment.stat().st_size
    daemon = start_daemon(root, DAMAGED)  # appends to the same segment
    add(root, FIRST[5:])  # the size trigger cuts a0..a9 into one batch
    assert daemon.stop() == 0
    assert stored_id_counts(root) == {e["entryId"]: 1 for e in FIRST}
    with segment.open("r+b") as fh:
        fh.truncate(good)
        fh.seek(good)
        fh.write(b'deadbeef {"k":"a","q":')
    return root


@pytest.mark.parametrize("later", [3, 5], ids=["nothing-cut", "cut-at-the-damaged-start"])
def test_a_stored_batch_holding_entries_a_damaged_tail_lost_is_kept(
    damaged_tail: Path, root: Path, later: int
) -> None:
    """The start that finds the damage adds b0.., then is killed: with 3 nothing is cut, and
    the next start re-cut a0..a4 under the stored batch's id and wrote it over the stored
    file; with 5 that start cut a0..a4 and b0..b4 under it and moved the stored file aside.
    Either way a5..a9, which only the stored file holds, must stay, and nothing be twice."""
    shutil.copytree(damaged_tail, root, ignore=shutil.ignore_patterns("*.sock", "*.lock"))
    more = [entry(20 + i, entryId=f"b{i}") for i in range(later)]
    daemon = start_daemon(root, DAMAGED)
    add(root, more)
    daemon.kill()
    daemon = start_daemon(root, DAMAGED)
    add(root, FIRST + more)
    assert cli(root, "flush").returncode == 0
    assert daemon.stop() == 0
    assert stored_id_counts(root) == {e["entryId"]: 1 for e in FIRST + more}
