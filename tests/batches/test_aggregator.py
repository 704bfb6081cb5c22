"""The buffer and its flush triggers (SPEC §5), driven with explicit monotonic times."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from flowagg.batches.aggregator import Aggregator, Buffered, FlushPolicy
from flowagg.batches.storage import Batch, entries_array, make_batch_id
from flowagg.core.config import load_config

T0 = 1_704_067_200_000


def policy(**changes: Any) -> FlushPolicy:
    values: dict[str, Any] = {
        "batch_size": 50,
        "max_age_s": 30.0,
        "max_batch_bytes": 65_536,
        "threshold_bytes": 0.9 * 65_536,
        "memory_window": 20_000,
        "max_buffered_entries": 1_000_000,
        "max_buffered_bytes": 1 << 30,
    }
    values.update(changes)
    return FlushPolicy(**values)


def entry_bytes(seq: int, size: int | None = None) -> bytes:
    """Compact JSON standing in for an entry; with `size`, padded to exactly that many bytes.

    The aggregator never parses entries, so a short stand-in keeps sizes easy to control.
    """
    data = orjson.dumps({"seq": seq, "p": ""})
    if size is not None:
        assert size >= len(data), f"cannot make an entry of {size} bytes"
        data = orjson.dumps({"seq": seq, "p": "x" * (size - len(data))})
        assert len(data) == size
    return data


class Feeder:
    """Hands out Buffered items with increasing seq and non-decreasing t_ms."""

    def __init__(self) -> None:
        self.seq = itertools.count(1)

    def item(self, arrival: float = 0.0, size: int | None = None, t_ms: int | None = None):
        seq = next(self.seq)
        data = entry_bytes(seq, size)
        return Buffered(seq, T0 + seq if t_ms is None else t_ms, arrival, data, f"e{seq}")


def load_n(agg: Aggregator, feeder: Feeder, n: int, **kw: Any) -> list[Buffered]:
    items = [feeder.item(**kw) for _ in range(n)]
    for it in items:
        assert agg.load(it)
    agg.acknowledge(len(items), sum(len(i.data) + 1 for i in items))
    return items


def array_size(batch: Batch) -> int:
    return len(entries_array(batch.entries))


# --------------------------------------------------------------------------------------------
# size trigger


def test_size_trigger_at_batch_size() -> None:
    agg = Aggregator(policy(batch_size=10))
    feeder = Feeder()
    load_n(agg, feeder, 9)
    assert agg.due(0.0) is None
    assert agg.cut_due(0.0) == []
    load_n(agg, feeder, 1)
    assert agg.due(0.0) == "size"
    (batch,) = agg.cut_due(0.0)
    assert batch.trigger == "size"
    assert batch.count == 10
    assert batch.first_seq == 1
    assert batch.last_seq == 10
    assert agg.due(0.0) is None
    assert not agg.window


def test_size_trigger_cuts_whole_batches_and_leaves_the_rest() -> None:
    agg = Aggregator(policy(batch_size=10))
    items = load_n(agg, Feeder(), 25)
    batches = agg.cut_due(0.0)
    assert [b.count for b in batches] == [10, 10]
    assert all(b.trigger == "size" for b in batches)
    assert [b.data for b in agg.window] == [i.data for i in items[20:]]


def test_batch_size_one() -> None:
    agg = Aggregator(policy(batch_size=1))
    load_n(agg, Feeder(), 3)
    batches = agg.cut_due(0.0)
    assert [b.count for b in batches] == [1, 1, 1]


# --------------------------------------------------------------------------------------------
# threshold trigger and the byte cap


def test_threshold_trigger_at_fraction_of_max_batch_bytes() -> None:
    # 100-byte entries cost 101 bytes each (the comma); threshold 0.5 x 2020 = 1010 = 10 entries
    agg = Aggregator(policy(max_batch_bytes=2020, threshold_bytes=0.5 * 2020))
    feeder = Feeder()
    load_n(agg, feeder, 9, size=100)
    assert agg.window_bytes == 909
    assert agg.due(0.0) is None
    load_n(agg, feeder, 1, size=100)
    assert agg.window_bytes == 1010
    assert agg.due(0.0) == "threshold"
    (batch,) = agg.cut_due(0.0)
    assert batch.trigger == "threshold"
    assert batch.count == 10
    assert array_size(batch) == 1011
    assert agg.window_bytes == 0


def test_size_wins_over_threshold_when_both_fire() -> None:
    agg = Aggregator(policy(batch_size=5, max_batch_bytes=1024, threshold_bytes=100.0))
    load_n(agg, Feeder(), 5, size=100)
    assert agg.due(0.0) == "size"


def test_no_batch_over_max_batch_bytes() -> None:
    max_bytes = 1024
    agg = Aggregator(policy(batch_size=1000, max_batch_bytes=max_bytes, threshold_bytes=900.0))
    feeder = Feeder()
    items = []
    for size in [100, 300, 250, 90, 400, 80, 80, 80, 512, 200, 333, 120, 700, 64, 64]:
        items += load_n(agg, feeder, 1, size=size)
    batches = agg.cut_all("manual")
    assert all(array_size(b) <= max_bytes for b in batches)
    assert [d for b in batches for d in b.entries] == [i.data for i in items]
    # Each batch is as full as the next entry allows.
    queue = [i.data for i in items]
    for batch in batches[:-1]:
        following = queue[batch.count]
        assert array_size(batch) + len(following) + 1 > max_bytes
        queue = queue[batch.count :]


def test_batch_that_fills_max_batch_bytes_exactly() -> None:
    # Array bytes = 1 + sum(len + 1): ten 101-byte entries make exactly 1021 bytes.
    agg = Aggregator(policy(max_batch_bytes=1021, threshold_bytes=1021.0))
    load_n(agg, Feeder(), 11, size=101)
    first = agg.cut("manual")
    assert first.count == 10
    assert array_size(first) == 1021


def test_single_entry_over_max_batch_bytes_gets_its_own_batch() -> None:
    agg = Aggregator(policy(max_batch_bytes=1024, threshold_bytes=900.0))
    feeder = Feeder()
    small_a = load_n(agg, feeder, 1, size=100)
    big = load_n(agg, feeder, 1, size=5000)
    small_b = load_n(agg, feeder, 2, size=100)
    batches = agg.cut_due(0.0)
    assert [b.entries for b in batches] == [
        [small_a[0].data],
        [big[0].data],
    ]
    assert array_size(batches[1]) > 1024
    assert [b.trigger for b in batches] == ["threshold", "threshold"]
    rest = agg.cut_all("manual")
    assert [d for b in rest for d in b.entries] == [i.data for i in small_b]


# --------------------------------------------------------------------------------------------
# age trigger and the deadline


def test_age_trigger_uses_oldest_arrival() -> None:
    agg = Aggregator(policy(max_age_s=30.0))
    feeder = Feeder()
    assert agg.next_deadline() is None
    assert agg.due(1e9) is None  # nothing buffered, nothing due
    load_n(agg, feeder, 1, arrival=100.0)
    load_n(agg, feeder, 1, arrival=120.0)
    assert agg.next_deadline() == 130.0
    assert agg.due(129.999) is None
    assert agg.due(130.0) == "age"
    (batch,) = agg.cut_due(130.0)
    assert batch.trigger == "age"
    assert batch.count == 2  # an age flush takes everything that fits, not only the old entry
    assert agg.next_deadline() is None


def test_age_trigger_cuts_only_while_the_head_is_old() -> None:
    # 200-byte entries cost 201 bytes: five fit under 1024, so nine old entries need two
    # batches; the second one starts old and is filled up with a young entry.
    agg = Aggregator(policy(batch_size=100, max_batch_bytes=1024, max_age_s=10.0))
    feeder = Feeder()
    olds = load_n(agg, feeder, 9, arrival=0.0, size=200)
    youngs = load_n(agg, feeder, 3, arrival=50.0, size=200)
    batches = agg.cut_due(10.0)
    assert [b.trigger for b in batches] == ["age", "age"]
    assert [b.count for b in batches] == [5, 5]
    taken = [d for b in batches for d in b.entries]
    assert taken == [i.data for i in olds + youngs[:1]]
    assert [i.data for i in agg.window] == [i.data for i in youngs[1:]]
    assert agg.due(59.9) is None
    assert agg.next_deadline() == 60.0
    assert agg.due(60.0) == "age"


def test_next_deadline_follows_the_head() -> None:
    agg = Aggregator(policy(batch_size=100, max_age_s=5.0))
    feeder = Feeder()
    load_n(agg, feeder, 1, arrival=1.0)
    load_n(agg, feeder, 1, arrival=3.0)
    assert agg.next_deadline() == 6.0
    agg.cut_all("manual")
    assert agg.next_deadline() is None
    load_n(agg, feeder, 1, arrival=10.0)
    assert agg.next_deadline() == 15.0


# --------------------------------------------------------------------------------------------
# manual, order, ids


def test_cut_all_manual_takes_everything_in_order() -> None:
    agg = Aggregator(policy(batch_size=4))
    items = load_n(agg, Feeder(), 10)
    batches = agg.cut_all("manual")
    assert [b.count for b in batches] == [4, 4, 2]
    assert all(b.trigger == "manual" for b in batches)
    assert [d for b in batches for d in b.entries] == [i.data for i in items]
    assert [e for b in batches for e in b.entry_ids] == [i.entry_id for i in items]
    assert agg.window_bytes == 0
    assert agg.cut_all("manual") == []


def test_cut_from_empty_window_raises() -> None:
    with pytest.raises(ValueError):
        Aggregator(policy()).cut("manual")


def test_batch_ids_unique_sorted_and_named_after_first_entry() -> None:
    agg = Aggregator(policy(batch_size=3))
    feeder = Feeder()
    # Several entries share a millisecond (one journal record), ms never decreases.
    for t in [T0, T0, T0, T0, T0 + 1, T0 + 1, T0 + 5, T0 + 5, T0 + 5, T0 + 5]:
        item = feeder.item(t_ms=t)
        agg.load(item)
    batches = agg.cut_all("manual")
    ids = [b.batch_id for b in batches]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert ids[0] == make_batch_id(T0, 1) == "1704067200000_000000000001"
    assert ids[1] == make_batch_id(T0, 4)
    for b in batches:
        assert b.last_seq - b.first_seq + 1 == b.count


def test_batch_id_format_sorts_numerically() -> None:
    assert make_batch_id(T0, 9) < make_batch_id(T0, 10) < make_batch_id(T0 + 1, 1)
    assert make_batch_id(999, 5) < make_batch_id(1000, 1)


def test_load_rejects_reloads() -> None:
    agg = Aggregator(policy())
    feeder = Feeder()
    a, b = feeder.item(), feeder.item()
    assert agg.load(a)
    assert agg.load(b)
    before = (list(agg.window), agg.window_bytes)
    assert not agg.load(a)
    assert not agg.load(b)
    assert (list(agg.window), agg.window_bytes) == before


# --------------------------------------------------------------------------------------------
# backpressure and accounting


def test_busy_at_max_buffered_entries() -> None:
    agg = Aggregator(policy(max_buffered_entries=100))
    assert not agg.is_busy()
    agg.acknowledge(99, 1000)
    assert not agg.is_busy()
    agg.acknowledge(1, 10)
    assert agg.is_busy()  # at the bound
    agg.acknowledge(5, 10)
    assert agg.is_busy()


def test_busy_at_max_buffered_bytes() -> None:
    agg = Aggregator(policy(max_buffered_bytes=4096))
    agg.acknowledge(1, 4095)
    assert not agg.is_busy()
    agg.acknowledge(1, 1)
    assert agg.is_busy()


def test_busy_clears_when_batches_are_stored() -> None:
    agg = Aggregator(policy(batch_size=10, max_buffered_entries=15))
    load_n(agg, Feeder(), 20)
    assert agg.is_busy()
    (first, second) = agg.cut_due(0.0)
    assert agg.is_busy()  # cut is not stored: still in the buffer
    agg.stored(first)
    assert not agg.is_busy()
    assert agg.unflushed_entries == 10
    agg.stored(second)
    assert agg.unflushed_entries == 0
    assert agg.unflushed_bytes == 0


def test_stored_accounting() -> None:
    agg = Aggregator(policy(batch_size=3))
    items = load_n(agg, Feeder(), 7, size=80)
    assert agg.unflushed_entries == 7
    assert agg.unflushed_bytes == 7 * 81
    batches = agg.cut_due(0.0)
    assert agg.inflight_entries == 6
    assert agg.window_bytes == 81
    agg.stored(batches[0])
    assert (agg.inflight_entries, agg.unflushed_entries, agg.unflushed_bytes) == (3, 4, 4 * 81)
    agg.stored(batches[1])
    assert (agg.inflight_entries, agg.unflushed_entries, agg.unflushed_bytes) == (0, 1, 81)
    (last,) = agg.cut_all("manual")
    assert last.entries == [items[-1].data]
    agg.stored(last)
    assert (agg.inflight_entries, agg.unflushed_entries, agg.unflushed_bytes) == (0, 0, 0)


def test_stored_settles_estimated_bytes_at_zero() -> None:
    # The backlog found at start is counted by journal record size, an estimate.
    agg = Aggregator(policy())
    feeder = Feeder()
    items = [feeder.item(size=100) for _ in range(3)]
    agg.acknowledge(3, 999)  # estimate larger than the real 303
    for it in items:
        agg.load(it)
    (batch,) = agg.cut_all("manual")
    agg.stored(batch)
    assert agg.unflushed_entries == 0
    assert agg.unflushed_bytes == 0


def test_room_counts_window_and_inflight() -> None:
    agg = Aggregator(policy(batch_size=4, memory_window=10))
    feeder = Feeder()
    assert agg.room() == 10
    load_n(agg, feeder, 6)
    assert agg.room() == 4
    first, _ = agg.cut_all("manual")  # 4 + 2 in flight, window empty
    assert agg.room() == 4
    agg.stored(first)
    assert agg.room() == 8
    load_n(agg, feeder, 8)
    assert agg.room() == 0


def test_acknowledge_counts_entries_not_in_the_window() -> None:
    # Entries beyond the memory window are durable and counted, but wait on disk.
    agg = Aggregator(policy(memory_window=5, max_buffered_entries=8))
    agg.acknowledge(7, 700)
    assert not agg.is_busy()
    agg.acknowledge(1, 100)
    assert agg.is_busy()
    assert agg.room() == 5
    assert agg.unflushed_entries == 8


def test_policy_from_config() -> None:
    config = load_config(
        flags={
            "batchSize": 7,
            "maxAgeMs": 1500,
            "maxBatchBytes": 4096,
            "flushThreshold": 0.5,
            "memoryWindowEntries": 33,
            "maxBufferedEntries": 44,
            "maxBufferedBytes": 5555,
            "root": "/nonexistent-flowagg-root",
        },
        environ={},
    )
    p = FlushPolicy.from_config(config)
    assert p == FlushPolicy(
        batch_size=7,
        max_age_s=1.5,
        max_batch_bytes=4096,
        threshold_bytes=2048.0,
        memory_window=33,
        max_buffered_entries=44,
        max_buffered_bytes=5555,
    )


# --------------------------------------------------------------------------------------------
# Property: every entry lands in exactly one batch, in order, whatever the interleaving


class AggregatorMachine(RuleBasedStateMachine):
    @initialize(
        batch_size=st.integers(1, 12),
        max_batch_bytes=st.integers(1024, 4096),
        fraction=st.floats(0.05, 1.0),
        max_age_s=st.floats(0.5, 20.0),
        memory_window=st.integers(1, 40),
    )
    def setup(
        self,
        batch_size: int,
        max_batch_bytes: int,
        fraction: float,
        max_age_s: float,
        memory_window: int,
    ) -> None:
        self.policy = policy(
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            threshold_bytes=fraction * max_batch_bytes,
            max_age_s=max_age_s,
            memory_window=memory_window,
        )
        self.agg = Aggregator(self.policy)
        self.seq = 0
        self.now = 0.0
        self.t_ms = T0
        self.loaded: list[bytes] = []
        self.batches: list[Batch] = []
        self.inflight: list[Batch] = []
        self.stored_count = 0

    @precondition(lambda self: self.agg.room() > 0)
    @rule(sizes=st.lists(st.integers(60, 2500), min_size=1, max_size=6))
    def load(self, sizes: list[int]) -> None:
        self.t_ms += 1
        for size in sizes[: self.agg.room()]:
            self.seq += 1
            data = entry_bytes(self.seq, size)
            item = Buffered(self.seq, self.t_ms, self.now, data, f"e{self.seq}")
            self.agg.acknowledge(1, len(data) + 1)
            assert self.agg.load(item)
            self.loaded.append(data)

    @rule(dt=st.floats(0.0, 30.0))
    def tick_and_cut_due(self, dt: float) -> None:
        self.now += dt
        cut = self.agg.cut_due(self.now)
        for batch in cut:
            assert batch.trigger in ("size", "threshold", "age")
        self.take(cut)
        assert self.agg.due(self.now) is None

    @rule()
    def flush_manual(self) -> None:
        cut = self.agg.cut_all("manual")
        assert all(b.trigger == "manual" for b in cut)
        self.take(cut)
        assert not self.agg.window

    @precondition(lambda self: bool(self.inflight))
    @rule()
    def store_oldest(self) -> None:
        batch = self.inflight.pop(0)
        self.agg.stored(batch)
        self.stored_count += batch.count

    def take(self, cut: list[Batch]) -> None:
        for batch in cut:
            assert batch.count >= 1
            assert batch.count <= self.policy.batch_size
            if batch.count > 1:
                assert array_size(batch) <= self.policy.max_batch_bytes
        self.batches.extend(cut)
        self.inflight.extend(cut)

    @invariant()
    def every_entry_once_in_order(self) -> None:
        in_batches = [d for b in self.batches for d in b.entries]
        in_window = [i.data for i in self.agg.window]
        assert in_batches + in_window == self.loaded

    @invariant()
    def ids_unique_and_sorted(self) -> None:
        ids = [b.batch_id for b in self.batches]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)

    @invariant()
    def accounting(self) -> None:
        agg = self.agg
        inflight = sum(b.count for b in self.inflight)
        assert agg.inflight_entries == inflight
        assert agg.unflushed_entries == len(self.loaded) - self.stored_count
        assert agg.room() == self.policy.memory_window - len(agg.window) - inflight
        assert agg.window_bytes == sum(len(i.data) + 1 for i in agg.window)
        expected_bytes = sum(len(d) + 1 for d in self.loaded) - sum(
            len(d) + 1 for b in self.batches if b not in self.inflight for d in b.entries
        )
        assert agg.unflushed_bytes == expected_bytes


AggregatorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_aggregator_machine = AggregatorMachine.TestCase
