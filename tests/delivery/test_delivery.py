"""Deliver, then write, as two steps: the flusher retries only what failed, and backs off on
an ambiguous delivery or an open breaker. Real HTTP peers on 127.0.0.1 (port 0), injected
clocks and sleeps, and a store that fails on cue."""

from __future__ import annotations

import errno
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from flowagg.batches.storage import Batch, batch_file_name, read_batch
from flowagg.core.clock import FakeClock
from flowagg.core.errors import TransientError
from flowagg.core.layout import Layout
from flowagg.delivery.flusher import Flusher, Stored
from flowagg.delivery.recovery import Recovery, write_completed
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.delivery.sink import CircuitBreaker, Completer, GuardedSink
from flowagg.delivery.sink_http import HttpSink
from tests.harness import wait_for
from tests.sinkserver import Receiver

BATCH_ID = "1704067200000_000000000001"
WAIT_S = 20.0
POLICY = RetryPolicy(base_ms=1000, max_delay_ms=300_000, limit=5)


class CountingSink:
    name = "counting"

    def __init__(self) -> None:
        self.calls = 0
        self.error: BaseException | None = None

    def deliver(self, batch_id: str, data: bytes) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error


class FailingWrite:
    """A write that fails with ENOSPC `failures` times, then writes for real."""

    def __init__(self, layout: Layout, failures: int) -> None:
        self.layout = layout
        self.failures = failures
        self.calls = 0

    def __call__(self, batch_id: str, data: bytes) -> Path:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_completed(self.layout, batch_id, data)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def batch() -> Batch:
    entries = [orjson.dumps({"userId": "u", "entryId": f"e{i}"}) for i in range(3)]
    return Batch(BATCH_ID, "manual", entries, 1, 3, [f"e{i}" for i in range(3)])


def guarded(sink: object, clock: FakeClock | None = None) -> GuardedSink:
    return GuardedSink(sink, CircuitBreaker(3, 30.0, clock or FakeClock()))  # type: ignore[arg-type]


def run_flusher(
    layout: Layout, store: Completer, *, immediate_retries: int = 3
) -> tuple[Path, list[float]]:
    """Submit one batch; the path it ended in and the inline sleeps it took."""
    sleeps: list[float] = []
    stored: list[Path] = []
    done = threading.Event()

    def sleep(seconds: float) -> bool:
        sleeps.append(seconds)
        return False

    def on_stored(items: list[Stored]) -> None:
        stored.extend(path for _, path, _ in items)
        done.set()

    flusher = Flusher(
        layout,
        FakeClock(now_ms=5_000),
        immediate_retries=immediate_retries,
        next_retry_at=lambda now: now + 1000,
        store=store,
        on_stored=on_stored,
        sleep=sleep,
    )
    flusher.start()
    flusher.submit(batch())
    assert done.wait(WAIT_S)
    assert flusher.stop(give_up=True, timeout=WAIT_S)
    return stored[0], sleeps


def test_inline_retries_after_an_acceptance_only_write(layout: Layout) -> None:
    sink = CountingSink()
    write = FailingWrite(layout, failures=2)
    path, sleeps = run_flusher(layout, Completer(write, lambda: guarded(sink)))
    assert path == layout.aggregated / batch_file_name(BATCH_ID)
    assert sink.calls == 1 and write.calls == 3 and sleeps == [0.05, 0.1]


def test_a_parked_accepted_batch_says_so_and_recovery_only_writes_it(layout: Layout) -> None:
    sink = CountingSink()
    write = FailingWrite(layout, failures=10**9)
    completer = Completer(write, lambda: guarded(sink))
    path, _ = run_flusher(layout, completer)
    assert path == layout.recovery / f"{BATCH_ID}.failed.json"
    parked = orjson.loads(path.read_bytes())
    assert parked["sinkAcceptedAt"] == 5_000 and "possiblyDelivered" not in parked
    assert sink.calls == 1 and write.calls == 4

    clock = FakeClock(now_ms=10_000)
    recovery = Recovery(layout, clock, random.Random(1), POLICY, store=completer)
    for _ in range(POLICY.limit * 2):  # far past the retry limit: the collector holds it
        report = recovery.run_once(force=True)
        assert not report.abandoned and report.paused is not None  # the full disk's, not its
    assert sink.calls == 1
    assert orjson.loads(path.read_bytes())["retryCount"] == 0
    write.failures = 0
    assert recovery.run_once(force=True).recovered == [BATCH_ID]
    assert sink.calls == 1
    done = read_batch(layout.aggregated / batch_file_name(BATCH_ID))
    assert set(done) == {
        "batchId",
        "timestamp",
        "version",
        "trigger",
        "entries",
        "entryCount",
        "entriesSha256",
        "recovered",
    }


def test_a_stall_after_an_acceptance_does_not_deliver_again(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk that refuses the batch refuses its failed file too: the stall loop retries.
    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("flowagg.delivery.flush_parking.atomic_write", full)
    sink = CountingSink()
    write = FailingWrite(layout, failures=40)
    path, sleeps = run_flusher(layout, Completer(write, lambda: guarded(sink)))
    assert path == layout.aggregated / batch_file_name(BATCH_ID)
    assert sink.calls == 1 and write.calls == 41 and len(sleeps) == 40


def test_a_slow_collector_gets_one_copy_then_one_counted_resend(
    layout: Layout, receiver: Receiver
) -> None:
    # The collector stores the batch, then answers after sinkTimeoutMs.
    receiver.mode, receiver.delay_s = "timeout", 0.5
    sink = guarded(HttpSink(receiver.url, 0.2))
    completer = Completer(lambda b, d: write_completed(layout, b, d), lambda: sink)
    path, sleeps = run_flusher(layout, completer)
    assert path == layout.recovery / f"{BATCH_ID}.failed.json" and sleeps == []
    parked = orjson.loads(path.read_bytes())
    assert parked["possiblyDelivered"] is True and "sinkAcceptedAt" not in parked
    wait_for(lambda: len(receiver.batches) == 1)
    assert receiver.calls["timeout"] == 1 and sink.resends == 0

    receiver.mode = "ok"
    recovery = Recovery(layout, FakeClock(now_ms=10_000), random.Random(1), POLICY, store=completer)
    assert recovery.run_once(force=True).recovered == [BATCH_ID]
    assert sink.resends == 1 and sink.snapshot()["resends"] == 1
    assert [b["batchId"] for b in receiver.batches] == [BATCH_ID, BATCH_ID]  # at least once


def test_an_ambiguous_recovery_retry_is_remembered_and_counted(
    layout: Layout, receiver: Receiver
) -> None:
    receiver.mode = "drop"  # reads the whole request, then hangs up without an answer
    sink = guarded(HttpSink(receiver.url, 5))
    completer = Completer(lambda b, d: write_completed(layout, b, d), lambda: sink)
    path, _ = run_flusher(layout, completer)
    assert orjson.loads(path.read_bytes())["possiblyDelivered"] is True
    receiver.mode = "503"  # a clear failure later does not make it undelivered
    recovery = Recovery(layout, FakeClock(now_ms=10_000), random.Random(1), POLICY, store=completer)
    paused = recovery.run_once(force=True).paused  # a 503: the sink is down, no retry charged
    assert paused is not None and paused["cause"] == "sinkDown"
    assert orjson.loads(path.read_bytes())["possiblyDelivered"] is True
    receiver.mode = "ok"
    assert recovery.run_once(force=True).recovered == [BATCH_ID]
    assert sink.resends == 2


def test_an_open_breaker_parks_at_once_without_inline_sleeps(layout: Layout) -> None:
    clock = FakeClock()
    sink = CountingSink()
    sink.error = TransientError("down")
    breaker_sink = guarded(sink, clock)
    for _ in range(3):
        with pytest.raises(TransientError):
            breaker_sink.deliver("x", b"{}")
    assert breaker_sink.breaker.state == "open"
    completer = Completer(lambda b, d: write_completed(layout, b, d), lambda: breaker_sink)
    path, sleeps = run_flusher(layout, completer)
    assert path == layout.recovery / f"{BATCH_ID}.failed.json"
    assert sleeps == [] and sink.calls == 3
    assert "circuit breaker is open" in orjson.loads(path.read_bytes())["lastError"]
