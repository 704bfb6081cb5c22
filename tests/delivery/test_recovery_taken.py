"""The recovery loop never replaces a batch file in aggregated/ by other entries (SPEC §5: a
batch id names one set of entries forever), as the flusher does not (test_batch_names).

A failed batch whose id names a copy in aggregated/ with other entries (a damaged journal
tail took the cut that named the copy) keeps that copy, and parks only the entries it lacks.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

from flowagg.batches.storage import (
    Batch,
    CompletedFiles,
    encode_batch,
    iter_batch_files,
    read_batch,
)
from flowagg.core.clock import FakeClock
from flowagg.core.layout import Layout
from flowagg.delivery.recovery import Recovery
from flowagg.delivery.retry_policy import RetryPolicy

POLICY = RetryPolicy(base_ms=1000, max_delay_ms=300_000, limit=5)
BATCH_ID = f"{1_000:013d}_{1:012d}"


def batch(ids: list[str]) -> Batch:
    entries = [orjson.dumps({"userId": "u", "entryId": i}) for i in ids]
    return Batch(BATCH_ID, "size", entries, 1, len(ids), ids)


def park(layout: Layout, ids: list[str]) -> None:
    doc = orjson.loads(encode_batch(batch(ids), timestamp_ms=1_000))
    doc.update(
        {"retryCount": 0, "lastRetryAt": 0, "lastError": "x", "failedAt": 0, "nextRetryAt": 0}
    )
    (layout.recovery / f"{BATCH_ID}.failed.json").write_bytes(orjson.dumps(doc))


def stored(layout: Layout) -> dict[str, list[str]]:
    return {
        path.name: [e["entryId"] for e in read_batch(path)["entries"]]
        for path in iter_batch_files(layout)
    }


def recover(layout: Layout, compression: str = "none") -> Recovery:
    files = CompletedFiles(layout, compression)
    return Recovery(layout, FakeClock(now_ms=5_000), random.Random(1), POLICY, store=files.write)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_a_failed_batch_keeps_another_copy_under_its_id(layout: Layout, compression: str) -> None:
    """aggregated/ holds a0..a9 under the id (a5..a9 nowhere else); the failed batch a0..a4
    and b0..b2. Both passes write with the copy's compression and with none: neither may
    replace the copy, nor add a second file under its id."""
    copy = CompletedFiles(layout, compression).path(BATCH_ID)
    copy.write_bytes(
        CompletedFiles(layout, compression).file_bytes(
            encode_batch(batch([f"a{i}" for i in range(10)]), timestamp_ms=1_000)
        )
    )
    original = copy.read_bytes()
    park(layout, [f"a{i}" for i in range(5)] + ["b0", "b1", "b2"])

    for writes in (compression, "none"):
        recover(layout, writes).run_once(force=True)

    assert copy.read_bytes() == original
    counts = Counter(i for ids in stored(layout).values() for i in ids)
    assert counts == Counter([*(f"a{i}" for i in range(10)), "b0", "b1", "b2"])
    # The rest is named after the seq past what the copy holds, and completed by a later pass.
    rest = CompletedFiles(layout, "none").path(f"{1_000:013d}_{6:012d}")
    assert stored(layout)[rest.name] == ["b0", "b1", "b2"]
    assert [p.name for p in iter_batch_files(layout)] == sorted([copy.name, rest.name])


def test_a_copy_holding_the_whole_batch_is_not_sent_again(layout: Layout) -> None:
    """The copy holds a0..a2 and more: the failed a0..a2 is stored, neither sent nor written."""
    copy = CompletedFiles(layout).path(BATCH_ID)
    copy.write_bytes(encode_batch(batch(["a0", "a1", "a2", "a3"]), timestamp_ms=1_000))
    original = copy.read_bytes()
    park(layout, ["a0", "a1", "a2"])
    writes: list[str] = []

    def store(batch_id: str, data: bytes) -> Path:
        writes.append(batch_id)
        return CompletedFiles(layout).write(batch_id, data)

    recovery = Recovery(layout, FakeClock(now_ms=5_000), random.Random(1), POLICY, store=store)
    report = recovery.run_once(force=True)

    assert report.recovered == [BATCH_ID] and writes == []
    assert copy.read_bytes() == original
    assert [p.name for p in iter_batch_files(layout)] == [copy.name]
