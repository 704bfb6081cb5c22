"""The window holds one unit per journal record: cuts from it are the cuts of a window loaded
entry by entry, boundaries inside a record included."""

from __future__ import annotations

from collections import deque
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from flowagg.batches.aggregator import Aggregator, Buffered, FlushPolicy
from flowagg.batches.window import Run, Window

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


def take_entry_by_entry(
    entries: deque[Buffered], max_entries: int, max_bytes: int | None, limit: int | None
) -> list[Buffered]:
    """The cut as it was made before runs: one entry at a time off a deque."""
    taken: list[Buffered] = []
    size = 1
    while entries and len(taken) < max_entries:
        head = entries[0]
        if limit is not None and head.seq > limit:
            break
        cost = len(head.data) + 1
        if taken and max_bytes is not None and size + cost > max_bytes:
            break
        size += cost
        taken.append(entries.popleft())
    return taken


appends = st.tuples(st.just("append"), st.lists(st.integers(1, 300), min_size=1, max_size=10))
takes = st.tuples(
    st.just("take"),
    st.integers(1, 60),
    st.none() | st.integers(2, 1500),
    st.none() | st.integers(-5, 40),  # seqs ahead of the head, or behind it
)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(appends | takes, max_size=20), skips=st.lists(st.integers(0, 40)))
def test_takes_interleaved_with_appends_match_an_entry_by_entry_window(
    ops: list[tuple[Any, ...]], skips: list[int]
) -> None:
    """Runs appended between cuts, some with their first entries cut already, and cuts
    bounded by entries, bytes and a journaled cut's seq (`limit`), in any mix."""
    window, model = Window(), deque[Buffered]()
    seq, skip = 1, iter(skips)
    for n, op in enumerate(ops):
        if op[0] == "append":
            datas = [b"x" * size for size in op[1]]
            ids = [f"e{seq + i}" for i in range(len(datas))]
            start = min(next(skip, 0), len(datas) - 1)
            window.append(Run(seq, T0 + n, float(n), datas, ids, start))
            model.extend(
                Buffered(seq + i, T0 + n, float(n), datas[i], ids[i])
                for i in range(start, len(datas))
            )
            seq += len(datas)
        else:
            _, max_entries, max_bytes, ahead = op
            limit = None if ahead is None or not model else model[0].seq + ahead
            want = take_entry_by_entry(model, max_entries, max_bytes, limit)
            got = window.take(max_entries, max_bytes, limit)
            if not want:
                assert got is None
                continue
            assert got is not None
            assert (got.first_seq, got.first_t_ms, got.last_seq) == (
                want[0].seq,
                want[0].t_ms,
                want[-1].seq,
            )
            assert (got.datas, got.ids) == ([w.data for w in want], [w.entry_id for w in want])
        assert list(window) == list(model)
        assert len(window) == len(model)
        assert window.bytes == sum(len(b.data) + 1 for b in model)
        if model:
            assert (window.head_seq, window.head_arrival) == (model[0].seq, model[0].arrival)
