from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowagg.core.layout import Layout
from tests.harness import flush_all
from tests.torture import run_torture, wait_for_intake

# 200 kills in CI (SPEC §12); raise it locally with TORTURE_KILLS or use scripts/torture.
KILLS = int(os.environ.get("TORTURE_KILLS", "200"))


def test_sigkill_torture_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    result = run_torture(tmp_path / "data", kills=KILLS, seed=20261125)
    assert result.acknowledged > 0
    assert result.lost == [], result.summary()
    assert result.duplicated == [], result.summary()
    assert result.unexpected == [], result.summary()
    assert result.stored == result.acknowledged


def test_the_final_wait_lasts_as_long_as_the_spool_backlog_shrinks(tmp_path: Path) -> None:
    # inbox/ drains while journal/spool/ fills, then journal/spool/ drains: each is progress.
    left: Iterator[tuple[int, int]] = iter(
        [(6 - n, min(n, 3)) for n in range(7)] + [(0, 2), (0, 1), (0, 0)]
    )
    stall_s = 0.15
    started = time.monotonic()
    wait_for_intake(Layout(tmp_path), stall_s, lambda layout: next(left))
    assert time.monotonic() - started > 2 * stall_s  # longer than one stall, without failing
    assert next(left, None) is None


def test_the_final_wait_fails_while_adopted_files_stay_in_journal_spool(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "data")
    layout.prepare()
    (layout.journal_spool / "0000000000001-000000-a.jsonl").write_bytes(b"")
    with pytest.raises(TimeoutError, match=r"0 left in inbox/, 1 in journal/spool/"):
        wait_for_intake(layout, stall_s=0.2)


STILL_RUNNING = {"ok": False, "error": "the flush is still running after 45 s; it goes on"}


def test_the_final_flush_lasts_as_long_as_batch_files_appear(tmp_path: Path) -> None:
    replies = iter([STILL_RUNNING, STILL_RUNNING, STILL_RUNNING, {"ok": True, "batches": 9}])
    counts = iter([0, 3, 6, 9])
    flush_all(Layout(tmp_path), 0.0, lambda layout: next(replies), lambda layout: next(counts))
    assert next(replies, None) is None


def test_the_final_flush_fails_once_no_batch_file_appears(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError, match="no batch file stored"):
        flush_all(Layout(tmp_path), 0.0, lambda layout: STILL_RUNNING, lambda layout: 5)


def test_the_final_flush_fails_on_a_stalled_flusher(tmp_path: Path) -> None:
    stalled = {"ok": False, "error": "disk_full: [Errno 28] No space left on device"}
    with pytest.raises(AssertionError, match="disk_full"):
        flush_all(Layout(tmp_path), 60.0, lambda layout: stalled, lambda layout: 0)
