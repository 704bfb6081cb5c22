"""Sinks against real peers: an HTTP server on 127.0.0.1 (port 0) and real commands; the
circuit breaker with an injected clock."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowagg.clock import FakeClock
from flowagg.errors import CircuitOpenError, PermanentError, TransientError
from flowagg.sink import CircuitBreaker, CommandSink, GuardedSink, HttpSink
from tests.sinkserver import Receiver

BATCH = b'{"batchId":"1_1","entries":[{"entryId":"a"}]}'


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_http_accepts_2xx(receiver: Receiver) -> None:
    HttpSink(receiver.url, 5).deliver("1_1", BATCH)
    assert [b["batchId"] for b in receiver.batches] == ["1_1"]


@pytest.mark.parametrize("status", ["500", "502", "503", "408", "429"])
def test_http_retryable_statuses_are_transient(receiver: Receiver, status: str) -> None:
    receiver.mode = status
    with pytest.raises(TransientError, match=status):
        HttpSink(receiver.url, 5).deliver("1_1", BATCH)


@pytest.mark.parametrize("status", ["400", "401", "404", "413", "422"])
def test_http_other_4xx_are_permanent(receiver: Receiver, status: str) -> None:
    receiver.mode = status
    with pytest.raises(PermanentError, match=status):
        HttpSink(receiver.url, 5).deliver("1_1", BATCH)


def test_http_timeout_and_dropped_connection_are_transient(receiver: Receiver) -> None:
    receiver.mode, receiver.delay_s = "timeout", 1.0
    with pytest.raises(TransientError):
        HttpSink(receiver.url, 0.2).deliver("1_1", BATCH)
    receiver.mode = "drop"
    with pytest.raises(TransientError):
        HttpSink(receiver.url, 5).deliver("1_1", BATCH)


def test_http_nobody_listening_is_transient(receiver: Receiver) -> None:
    url = receiver.url
    receiver.close()
    with pytest.raises(TransientError, match="unreachable"):
        HttpSink(url, 2).deliver("1_1", BATCH)


def command(code: int, out: Path | None = None) -> list[str]:
    save = f"open({str(out)!r}, 'wb').write(data);" if out else ""
    return [
        sys.executable,
        "-c",
        f"import sys; data = sys.stdin.buffer.read(); {save} sys.exit({code})",
    ]


def test_command_exit_0_accepts_and_gets_the_batch_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "got.json"
    CommandSink(command(0, out), 10).deliver("1_1", BATCH)
    assert out.read_bytes() == BATCH


def test_command_exit_75_is_transient_other_codes_permanent() -> None:
    with pytest.raises(TransientError, match="exited 75"):
        CommandSink(command(75), 10).deliver("1_1", BATCH)
    with pytest.raises(PermanentError, match="exited 1"):
        CommandSink(command(1), 10).deliver("1_1", BATCH)


def test_command_timeout_and_missing_program_are_transient(tmp_path: Path) -> None:
    slow = [sys.executable, "-c", "import time; time.sleep(5)"]
    with pytest.raises(TransientError, match="timed out"):
        CommandSink(slow, 0.2).deliver("1_1", BATCH)
    with pytest.raises(TransientError, match="cannot run"):
        CommandSink([str(tmp_path / "no-such-program")], 1).deliver("1_1", BATCH)


class Flaky:
    name = "flaky"

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.calls = 0

    def deliver(self, batch_id: str, data: bytes) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error


def test_breaker_opens_cools_down_trials_and_closes() -> None:
    clock = FakeClock()
    flaky = Flaky()
    sink = GuardedSink(flaky, CircuitBreaker(3, 10.0, clock))
    flaky.error = TransientError("down")
    for _ in range(3):
        with pytest.raises(TransientError):
            sink.deliver("b", BATCH)
    assert sink.breaker.state == "open" and flaky.calls == 3
    with pytest.raises(CircuitOpenError):
        sink.deliver("b", BATCH)
    assert flaky.calls == 3  # not called while open
    clock.advance(10_000)
    with pytest.raises(CircuitOpenError, match="half-open trial"):
        sink.deliver("b", BATCH)  # the trial fails: open again, and not the batch's fault
    assert sink.breaker.state == "open" and flaky.calls == 4
    clock.advance(10_000)
    flaky.error = None
    sink.deliver("b", BATCH)
    assert sink.breaker.state == "closed" and sink.breaker.consecutive_failures == 0
    snap = sink.snapshot()
    assert snap["timesOpened"] == 2  # opened, then opened again by the failed trial
    assert snap["delivered"] == 1 and snap["failures"] == 4


def test_half_open_lets_one_trial_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 1.0, clock)
    breaker.before_call()
    breaker.failure()
    clock.advance(1_000)
    assert breaker.before_call() is True
    with pytest.raises(CircuitOpenError):
        breaker.before_call()  # a second caller while the trial runs
    breaker.success()
    assert breaker.before_call() is False and breaker.state == "closed"


def test_permanent_refusals_do_not_open_the_breaker() -> None:
    flaky = Flaky()
    sink = GuardedSink(flaky, CircuitBreaker(2, 10.0, FakeClock()))
    flaky.error = PermanentError("400")
    for _ in range(5):
        with pytest.raises(PermanentError):
            sink.deliver("b", BATCH)
    assert sink.breaker.state == "closed"
