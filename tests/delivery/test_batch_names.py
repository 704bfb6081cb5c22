"""A batch file is never replaced by other entries (SPEC §5: a batch id names one set of
entries forever).

A damaged journal tail can take the cut that named a stored batch; the entries that survive
it are then cut anew, and the first of them gives the stored batch's id. The flusher must
keep the stored file (it may be the only copy of entries the tail took) and store only the
entries it lacks, under an id of their own.
"""

from __future__ import annotations

import threading

import orjson

from flowagg.batches.storage import (
    Batch,
    CompletedFiles,
    encode_batch,
    iter_batch_files,
    read_batch,
)
from flowagg.core.clock import FakeClock
from flowagg.core.layout import Layout
from flowagg.delivery.flusher import Flusher, Stored
from flowagg.delivery.sink import Completer

WAIT_S = 20.0


def batch(first_seq: int, ids: list[str], *, ms: int = 1_000) -> Batch:
    entries = [orjson.dumps({"userId": "u", "entryId": i}) for i in ids]
    batch_id = f"{ms:013d}_{first_seq:012d}"
    return Batch(batch_id, "size", entries, first_seq, first_seq + len(ids) - 1, ids)


def store(layout: Layout, batches: list[Batch]) -> list[str]:
    """Run the batches through a flusher without a sink; the ids it reports stored."""
    files = CompletedFiles(layout)
    reported: list[str] = []
    done = threading.Condition()

    def on_stored(items: list[Stored]) -> None:
        with done:
            reported.extend(b.batch_id for b, _, _ in items)
            done.notify_all()

    flusher = Flusher(
        layout,
        FakeClock(now_ms=5_000),
        immediate_retries=0,
        next_retry_at=lambda now: now + 1000,
        store=Completer(files.write, files=files),
        on_stored=on_stored,
        sleep=lambda seconds: False,
    )
    for b in batches:
        flusher.submit(b)
    flusher.start()
    with done:
        assert done.wait_for(lambda: len(reported) == len(batches), WAIT_S)
    assert flusher.stop(give_up=True, timeout=WAIT_S)
    return reported


def stored_ids(layout: Layout) -> dict[str, list[str]]:
    return {
        path.name: [e["entryId"] for e in read_batch(path)["entries"]]
        for path in iter_batch_files(layout)
    }


def test_a_fresh_cut_under_a_stored_batchs_id_keeps_the_stored_file(layout: Layout) -> None:
    """a0..a4 survive in the journal, a5..a9 only in the stored batch; b0..b2 are new."""
    before = batch(0, ["p0", "p1"], ms=900)
    colliding = batch(1, [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)])
    after = batch(14, ["c0", "c1"], ms=1_100)
    stored = layout.aggregated / f"batch_{colliding.batch_id}.json"
    old = batch(1, [f"a{i}" for i in range(10)])
    stored.write_bytes(encode_batch(old, timestamp_ms=1_000))
    original = stored.read_bytes()

    reported = store(layout, [before, colliding, after])

    assert reported == [before.batch_id, colliding.batch_id, after.batch_id]
    assert stored.read_bytes() == original
    counts: dict[str, int] = {}
    for ids in stored_ids(layout).values():
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    everything = ["p0", "p1", *(f"a{i}" for i in range(10)), "b0", "b1", "b2", "c0", "c1"]
    assert counts == dict.fromkeys(everything, 1)
    # The rest is named after the seq past what the stored copy holds: the same at any start.
    assert stored_ids(layout)[f"batch_{1_000:013d}_{6:012d}.json"] == ["b0", "b1", "b2"]


def test_the_rest_of_a_colliding_batch_is_found_again_at_a_later_start(layout: Layout) -> None:
    """Killed before the done record: the same cut comes again and finds both files."""
    colliding = batch(1, ["a0", "a1", "b0"])
    old = batch(1, ["a0", "a1", "a2"])
    (layout.aggregated / f"batch_{colliding.batch_id}.json").write_bytes(
        encode_batch(old, timestamp_ms=1_000)
    )
    store(layout, [colliding])
    first = {name: (layout.aggregated / name).read_bytes() for name in stored_ids(layout)}
    assert store(layout, [colliding]) == [colliding.batch_id]
    assert {name: (layout.aggregated / name).read_bytes() for name in stored_ids(layout)} == first
