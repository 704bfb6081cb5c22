"""Several deliveries at once (sinkConnections): a sink that takes batches side by side gets a
run's batches concurrently, files still appear in order, a batch the sink accepted is never
sent again because one before it failed, and the breaker and counters shared by the
delivering threads lose no update."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import orjson
import pytest

from flowagg.batches.storage import Batch, CompletedFiles, iter_batch_files, read_batch
from flowagg.core.clock import FakeClock
from flowagg.core.errors import PermanentError, TransientError
from flowagg.core.layout import Layout
from flowagg.delivery.flusher import Flusher, Stored
from flowagg.delivery.sink import CircuitBreaker, Completer, GuardedSink
from flowagg.delivery.sink_refused import Delivered

WAIT_S = 20.0
GATE_S = 5.0


class WideSink:
    """A sink that takes `parallel` batches at once and records how many it held together.

    `gate`: deliveries wait there until that many are under way (proof of concurrency);
    `refuse`: batch ids refused for good.
    """

    name = "wide"

    def __init__(self, parallel: int, gate: int = 1, refuse: frozenset[str] = frozenset()):
        self.parallel = parallel
        self.refuse = refuse
        self.calls: dict[str, int] = {}
        self.widest = 0
        self._under_way = 0
        self._lock = threading.Condition()
        self._gate = gate

    def deliver(self, batch_id: str, data: bytes) -> None:
        with self._lock:
            self.calls[batch_id] = self.calls.get(batch_id, 0) + 1
            self._under_way += 1
            self.widest = max(self.widest, self._under_way)
            self._lock.notify_all()
            # The first deliveries meet here; if they never all come, the gate opens for good
            # after one wait, so a one-at-a-time flusher fails the test instead of crawling.
            if not self._lock.wait_for(lambda: self.widest >= self._gate, GATE_S):
                self._gate = 0
            self._under_way -= 1
        if batch_id in self.refuse:
            raise PermanentError(f"batch {batch_id} refused")


def make_batches(count: int) -> list[Batch]:
    batches = []
    for b in range(count):
        ids = [f"b{b}-e{i}" for i in range(3)]
        entries = [orjson.dumps({"userId": "u", "entryId": i}) for i in ids]
        batch_id = f"{1_000 + b:013d}_{b:012d}"
        batches.append(Batch(batch_id, "size", entries, 3 * b + 1, 3 * b + 3, ids))
    return batches


class Run:
    """A flusher fed a whole run before it starts, with the daemon's completer."""

    def __init__(self, layout: Layout, sink: WideSink) -> None:
        self.files = CompletedFiles(layout)
        self.guarded = GuardedSink(sink, CircuitBreaker(1000, 30.0, FakeClock()))  # type: ignore[arg-type]
        self.reports: list[str] = []
        self._done = threading.Condition()
        self.flusher = Flusher(
            layout,
            FakeClock(now_ms=5_000),
            immediate_retries=0,
            next_retry_at=lambda now: now + 1000,
            store=Completer(self.files.write, lambda: self.guarded, files=self.files),
            on_stored=self._on_stored,
            sleep=lambda seconds: False,
        )

    def _on_stored(self, items: list[Stored]) -> None:
        with self._done:
            self.reports += [batch.batch_id for batch, _, _ in items]
            self._done.notify_all()

    def store(self, batches: list[Batch]) -> None:
        for batch in batches:
            self.flusher.submit(batch)
        self.flusher.start()
        with self._done:
            assert self._done.wait_for(lambda: len(self.reports) == len(batches), WAIT_S)
        assert self.flusher.stop(give_up=True, timeout=WAIT_S)


def stored_entries(layout: Layout) -> list[str]:
    return [e["entryId"] for p in iter_batch_files(layout) for e in read_batch(p)["entries"]]


def test_a_run_is_delivered_several_batches_at_a_time_and_stored_in_order(
    layout: Layout,
) -> None:
    batches = make_batches(12)
    sink = WideSink(parallel=4, gate=4)
    run = Run(layout, sink)
    run.store(batches)
    assert sink.widest == 4  # never more than sinkConnections, and that many at once
    assert sink.calls == {b.batch_id: 1 for b in batches}
    assert run.reports == [b.batch_id for b in batches]  # reported stored in batch order
    assert sorted(stored_entries(layout)) == sorted(i for b in batches for i in b.entry_ids)
    assert run.guarded.snapshot()["delivered"] == 12


def test_batches_accepted_behind_a_refused_one_are_written_not_sent_again(
    layout: Layout,
) -> None:
    batches = make_batches(8)
    refused = batches[2].batch_id
    sink = WideSink(parallel=4, gate=4, refuse=frozenset({refused}))
    run = Run(layout, sink)
    run.store(batches)
    # Every batch reached the sink once: those after the refused one were under way with it
    # (accepted: only their write was left) or not begun (delivered one at a time).
    assert sink.calls == {b.batch_id: 1 for b in batches}
    assert run.reports == [b.batch_id for b in batches]
    assert (layout.abandoned / f"{refused}.abandoned.json").exists()
    written = {p.name for p in layout.aggregated.iterdir()}
    assert len(written) == 7 and not any(refused in name for name in written)
    snap = run.guarded.snapshot()
    assert snap["delivered"] == 7 and snap["failures"] == 1


def test_a_sink_without_width_gets_one_batch_at_a_time(layout: Layout) -> None:
    batches = make_batches(6)
    sink = WideSink(parallel=1)
    Run(layout, sink).store(batches)
    assert sink.widest == 1 and sink.calls == {b.batch_id: 1 for b in batches}


@pytest.fixture
def eager_switching() -> Iterator[None]:
    """Threads switch every microsecond, so a read-modify-write without a lock loses updates."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


class Flaky:
    """Fails every third call (transient), reports a re-send on every fifth."""

    name = "flaky"
    parallel = 8

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0

    def deliver(self, batch_id: str, data: bytes) -> Delivered:
        with self._lock:
            self.calls += 1
            n = self.calls
        if n % 3 == 0:
            raise TransientError("down for a moment")
        return Delivered(already_held=n % 5 == 0, collisions=1)


def test_counters_and_breaker_lose_nothing_under_threads(eager_switching: None) -> None:
    sink = Flaky()
    guarded = GuardedSink(sink, CircuitBreaker(10**9, 30.0, FakeClock()))  # type: ignore[arg-type]
    threads, calls = 8, 3000
    failed = [0] * threads

    def hammer(k: int) -> None:
        for _ in range(calls):
            try:
                guarded.deliver("b", b"{}")
            except TransientError:
                failed[k] += 1

    workers = [threading.Thread(target=hammer, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    total = threads * calls
    snap = guarded.snapshot()
    assert snap["failures"] == sum(failed) == total // 3
    assert snap["delivered"] == snap["collisions"] == total - total // 3
    # already_held on calls 5, 10, ... that did not fail (not multiples of 15).
    assert snap["resends"] == total // 5 - total // 15
    assert snap["state"] == "closed" and snap["consecutiveFailures"] in range(threads + 1)
