"""Sinks against real peers: an HTTP server on 127.0.0.1 (port 0) and real commands; the
circuit breaker with an injected clock."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from flowagg.core.clock import FakeClock
from flowagg.core.errors import AmbiguousDelivery, CircuitOpenError, PermanentError, TransientError
from flowagg.delivery.sink import CircuitBreaker, GuardedSink
from flowagg.delivery.sink_command import CommandSink
from flowagg.delivery.sink_deadline import Watchdog
from flowagg.delivery.sink_http import HttpSink
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
    breaker.success(trial=True)
    assert breaker.before_call() is False and breaker.state == "closed"


def test_a_call_begun_before_the_breaker_opened_does_not_end_the_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 1.0, clock)
    assert breaker.before_call() is False  # a delivery begun while closed, still running
    assert breaker.before_call() is False
    breaker.failure()  # another delivery's failure opens the breaker
    clock.advance(1_000)
    assert breaker.before_call() is True  # the half-open trial begins
    breaker.failure()  # the delivery begun while closed now fails: the trial still runs
    clock.advance(1_000)
    with pytest.raises(CircuitOpenError, match="a trial is running"):
        breaker.before_call()
    breaker.success(trial=True)
    assert breaker.state == "closed" and breaker.before_call() is False


def test_permanent_refusals_do_not_open_the_breaker() -> None:
    flaky = Flaky()
    sink = GuardedSink(flaky, CircuitBreaker(2, 10.0, FakeClock()))
    flaky.error = PermanentError("400")
    for _ in range(5):
        with pytest.raises(PermanentError):
            sink.deliver("b", BATCH)
    assert sink.breaker.state == "closed"


@pytest.mark.parametrize("status", ["301", "302", "303", "307", "308"])
def test_http_redirects_are_never_followed(receiver: Receiver, status: str) -> None:
    # urllib turned a redirected POST into a bodyless GET whose 2xx counted as delivered.
    receiver.mode = status
    with pytest.raises(PermanentError, match=f"HTTP {status}.*127.0.0.1:1/elsewhere"):
        HttpSink(receiver.url, 5).deliver("1_1", BATCH)
    assert receiver.calls[status] == 1 and not receiver.batches


def test_http_deliveries_share_one_deadline_thread(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread per delivery (a Timer) cost the flusher a thread start and join each time."""
    started: list[str] = []
    start = threading.Thread.start

    def counted(thread: threading.Thread) -> None:
        if threading.current_thread() is threading.main_thread():  # not the receiver's own
            started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", counted)
    sink = HttpSink(receiver.url, 5)
    for _ in range(20):
        sink.deliver("1_1", BATCH)
    assert len(started) <= 1, started


def test_deadlines_are_kept_after_the_watchdog_thread_failed_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its thread could not start once (no thread left, say): that delivery fails, but later
    deadlines must still be kept, or a hung sink holds the flusher for good."""
    start = threading.Thread.start
    refused: list[str] = []

    def start_or_refuse(thread: threading.Thread) -> None:
        if thread.name == "test-deadline" and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_refuse)
    watchdog = Watchdog("test-deadline")
    with pytest.raises(RuntimeError):
        watchdog.arm(0.01, lambda: None)
    expired = threading.Event()
    watchdog.arm(0.01, expired.set)
    assert expired.wait(5.0)


def test_http_timeout_is_a_total_deadline(receiver: Receiver) -> None:
    receiver.mode = "trickle"  # every read gets a byte in time; the whole reply never comes
    started = time.monotonic()
    with pytest.raises(TransientError, match="within sinkTimeoutMs"):
        HttpSink(receiver.url, 0.5).deliver("1_1", BATCH)
    assert time.monotonic() - started < 3.0


def test_command_killed_by_a_signal_is_transient() -> None:
    with pytest.raises(TransientError, match="signal SIGKILL"):
        CommandSink(["sh", "-c", "kill -9 $$"], 10).deliver("1_1", BATCH)


def test_command_timeout_kills_its_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    with pytest.raises(TransientError, match="timed out"):
        CommandSink(["sh", "-c", script], 0.5).deliver("1_1", BATCH)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(child) and psutil.Process(child).status() != "zombie":
        assert time.monotonic() < deadline, "the sink's child outlived the timeout"
        time.sleep(0.01)


def test_chatty_command_costs_no_memory_and_keeps_its_last_stderr_line() -> None:
    # 300 MB on stdout and 5 MB on stderr once took the daemon to gigabytes of RSS.
    script = (
        "head -c 300000000 /dev/zero; head -c 5000000 /dev/zero >&2;"
        " echo >&2; echo last words >&2; exit 3"
    )
    # The probe samples its own RSS: ru_maxrss would carry the forking pytest's high mark.
    probe = (
        "import threading, psutil\n"
        "from flowagg.delivery.sink_command import CommandSink\n"
        "from flowagg.core.errors import PermanentError\n"
        "me, peak, done = psutil.Process(), [0], threading.Event()\n"
        "def sample():\n"
        "    while not done.wait(0.005):\n"
        "        peak[0] = max(peak[0], me.memory_info().rss)\n"
        "threading.Thread(target=sample, daemon=True).start()\n"
        "base = me.memory_info().rss\n"
        "try:\n"
        f"    CommandSink(['sh', '-c', {script!r}], 60).deliver('1_1', b'{{}}')\n"
        "except PermanentError as exc:\n"
        "    print(exc)\n"
        "done.set()\n"
        "print(max(peak[0], me.memory_info().rss) - base)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, check=True, timeout=120
    ).stdout.decode()
    message, growth = out.strip().splitlines()
    assert message == "sink command exited 3: last words"
    assert int(growth) < 20 * 2**20


class DeadlineAtReceipt:
    """Stands for the sink's deadline timer: it expires once the receiver holds the whole
    request, whatever the machine's load, instead of after a fixed time."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def __call__(self, _interval: float, function: Callable[[], None]) -> threading.Thread:
        cancelled = threading.Event()

        def expire() -> None:
            while not cancelled.is_set():
                if self.receiver.received.wait(0.01):
                    function()
                    return

        timer = threading.Thread(target=expire, daemon=True)
        timer.cancel = cancelled.set  # type: ignore[attr-defined]
        return timer


def test_failures_after_the_request_went_out_are_ambiguous(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The collector may hold the batch: a timeout after it was sent, or a hang-up before the
    # answer. Before the request is out, the batch cannot be there.
    receiver.mode = "hold"
    with monkeypatch.context() as patched:
        patched.setattr(threading, "Timer", DeadlineAtReceipt(receiver))
        with pytest.raises(AmbiguousDelivery, match="within sinkTimeoutMs"):
            HttpSink(receiver.url, 0.2).deliver("1_1", BATCH)
    receiver.release.set()
    receiver.mode = "drop"
    with pytest.raises(AmbiguousDelivery, match="dropped the connection"):
        HttpSink(receiver.url, 60).deliver("1_1", BATCH)
    for status in ("503", "429"):
        receiver.mode = status
        with pytest.raises(TransientError) as answered:
            HttpSink(receiver.url, 60).deliver("1_1", BATCH)
        assert not isinstance(answered.value, AmbiguousDelivery)
    url = receiver.url
    receiver.close()
    with pytest.raises(TransientError) as unreachable:
        HttpSink(url, 60).deliver("1_1", BATCH)
    assert not isinstance(unreachable.value, AmbiguousDelivery)


def test_a_command_killed_or_timed_out_is_ambiguous_a_tempfail_is_not(tmp_path: Path) -> None:
    with pytest.raises(AmbiguousDelivery, match="signal SIGKILL"):
        CommandSink(["sh", "-c", "kill -9 $$"], 10).deliver("1_1", BATCH)
    with pytest.raises(AmbiguousDelivery, match="timed out"):
        CommandSink([sys.executable, "-c", "import time; time.sleep(5)"], 0.2).deliver("1_1", BATCH)
    for argv in (command(75), [str(tmp_path / "no-such-program")]):
        with pytest.raises(TransientError) as clear:
            CommandSink(argv, 10).deliver("1_1", BATCH)
        assert not isinstance(clear.value, AmbiguousDelivery)


def test_an_open_breaker_says_when_its_next_trial_is() -> None:
    clock = FakeClock()
    flaky = Flaky()
    sink = GuardedSink(flaky, CircuitBreaker(1, 30.0, clock))
    flaky.error = TransientError("down")
    with pytest.raises(TransientError):
        sink.deliver("b", BATCH)
    clock.advance(12_000)
    with pytest.raises(CircuitOpenError) as opened:
        sink.deliver("b", BATCH)
    assert opened.value.retry_in_s == pytest.approx(18.0)


def test_resends_are_counted_only_when_the_sink_is_called() -> None:
    clock = FakeClock()
    flaky = Flaky()
    sink = GuardedSink(flaky, CircuitBreaker(1, 30.0, clock))
    sink.deliver("b", BATCH, resend=True)
    sink.deliver("c", BATCH)
    flaky.error = TransientError("down")
    with pytest.raises(TransientError):
        sink.deliver("d", BATCH)
    with pytest.raises(CircuitOpenError):
        sink.deliver("d", BATCH, resend=True)  # not called: not a re-send
    assert sink.snapshot()["resends"] == 1 and flaky.calls == 3
