"""The window holds one unit per journal record: cuts from it are the cuts of a window loaded
entry by entry, boundaries inside a record included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flowagg.batches.aggregator import Aggregator, Buffered, FlushPolicy

T0 = 1_704_067_200_000


def make_policy(batch_size: int, max_batch_bytes: int) -> FlushPolicy:
    return FlushPolicy(
        batch_size=batch_size,
        max_age_s=30.0,
        max_batch_bytes=max_batch_bytes,
        threshold_bytes=0.9 * max_batch_bytes,
        memory_window=100_000,
        max_buffered_entries=1_000_000,
        max_buffered_bytes=1 << 30,
    )


records = st.lists(st.lists(st.integers(1, 300), min_size=1, max_size=40), max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    records=records,
    batch_size=st.integers(1, 60),
    max_batch_bytes=st.integers(2, 4000),
    steps=st.lists(st.sampled_from(["due", "all"]), min_size=1, max_size=4),
)
def test_cuts_match_a_window_loaded_entry_by_entry(
    records: list[list[int]], batch_size: int, max_batch_bytes: int, steps: list[str]
) -> None:
    policy = make_policy(batch_size, max_batch_bytes)
    by_run, by_entry = Aggregator(policy), Aggregator(policy)
    seq = 1
    for n, sizes in enumerate(records):
        datas = [b"x" * size for size in sizes]
        ids = [f"e{seq + i}" for i in range(len(sizes))]
        by_run.load_run(seq, T0 + n, float(n), datas, ids)
        for i, data in enumerate(datas):
            assert by_entry.load(Buffered(seq + i, T0 + n, float(n), data, ids[i]))
        seq += len(sizes)
    assert len(by_run.window.runs) == len(records)
    for step in steps:
        if step == "due":
            got, want = by_run.cut_due(1.0, 5), by_entry.cut_due(1.0, 5)
        else:
            got, want = by_run.cut_all("manual", 5), by_entry.cut_all("manual", 5)
        assert got == want
        assert list(by_run.window) == list(by_entry.window)
        assert (len(by_run.window), by_run.window_bytes) == (
            len(by_entry.window),
            by_entry.window_bytes,
        )
