"""A step's spool files share group commits yet reach the journal in name order (SPEC §4.2).

Each file waiting for its own commit made intake pay one journal fsync per file; queued
together, the files of a step must still be journaled in the order of their names, and a
file of several chunks must keep its chunks together and in order.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

from flowagg.ingest.spool_read import CHUNK_LINES, original_name
from flowagg.journal.public import list_segments, unframe
from tests.ingest.test_spool import Rig, line, run

SMALL_FILES = 40
FSYNC_DELAY_S = 0.02


def test_a_steps_files_share_group_commits_in_name_order_under_a_slow_journal(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow disk: while the journal syncs one group, the step's later files queue behind it.
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(FSYNC_DELAY_S)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    names = [f"f{i:02d}.jsonl" for i in range(SMALL_FILES)]
    big = "f20b.jsonl"  # two chunks, between f20 and f21
    big_lines = range(1000, 1000 + CHUNK_LINES + 5)
    expected: Counter[str] = Counter()

    async def scenario(rig: Rig) -> None:
        assert rig.pipeline is not None and rig.pipeline.writer is not None
        for n, name in enumerate(names):
            # Sizes that differ, so reads that finish in any order would show.
            ids = range(10 * n, 10 * n + 1 + n % 7)
            (rig.layout.inbox / name).write_bytes(b"".join(line(i) + b"\n" for i in ids))
            expected.update(f"e{i}" for i in ids)
        (rig.layout.inbox / big).write_bytes(b"".join(line(i) + b"\n" for i in big_lines))
        expected.update(f"e{i}" for i in big_lines)
        syncs = rig.pipeline.writer.syncs
        assert await rig.scan() == SMALL_FILES + 1
        syncs = rig.pipeline.writer.syncs - syncs
        assert rig.left() == []
        # One commit per file was SMALL_FILES + 2; the big file's first chunk alone must wait.
        assert syncs <= 8, f"{syncs} journal fsyncs for one step of {SMALL_FILES + 1} files"
        await rig.pipeline.flush()

    run(root, scenario)
    records = [
        r
        for seg in list_segments(Rig(root).layout.journal)
        for raw in seg.open("rb")
        if (r := unframe(raw)) is not None and r.get("src") is not None
    ]
    order = [original_name(r["src"]) for r in records]
    assert order == sorted([*names, big, big])
    assert [bool(r.get("fin")) for r in records if original_name(r["src"]) == big] == [False, True]
    assert Rig(root).stored() == expected
