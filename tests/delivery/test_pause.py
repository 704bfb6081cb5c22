"""Failures of the environment (a full or unwritable folder, a sink that is down, an open
breaker) pause the recovery loop and charge no batch a retry; a batch's own failure counts."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import orjson

from flowagg.core.clock import FakeClock
from flowagg.core.errors import SinkDownError, TransientError
from flowagg.core.layout import Layout
from flowagg.delivery.pause import environment_cause
from flowagg.delivery.recovery import Recovery, write_completed
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.delivery.sink import CircuitBreaker, Completer, GuardedSink
from tests.delivery.test_recovery import FlakyStore, failed_doc, make_layout, put_failed

POLICY = RetryPolicy(base_ms=1000, max_delay_ms=8000, limit=3)
B1, B2 = "1704067200000_000000000001", "1704067200000_000000000002"


def retry_count(layout: Layout, batch_id: str) -> int:
    doc = orjson.loads((layout.recovery / f"{batch_id}.failed.json").read_bytes())
    count: int = doc["retryCount"]
    return count


def test_a_full_disk_longer_than_the_retry_limit_abandons_nothing(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    clock = FakeClock(now_ms=10_000)
    store = FlakyStore(layout)
    store.error = OSError(errno.ENOSPC, "No space left on device", str(layout.aggregated / "x"))
    recovery = Recovery(layout, clock, random.Random(1), POLICY, store=store)
    put_failed(layout, failed_doc(B1, failedAt=1))
    put_failed(layout, failed_doc(B2, failedAt=2))
    delays = []
    # Twenty times the retry limit, an hour of fake time: the disk stays full throughout.
    for _ in range(20 * POLICY.limit):
        calls = store.calls
        report = recovery.run_once()
        assert report.abandoned == [] and report.retried_failed == []
        assert report.paused is not None and report.paused["cause"] == "ENOSPC"
        assert report.paused["folder"] == "aggregated/"
        if store.calls > calls:
            # One try per pass: the second batch is not sent into the same full disk.
            assert store.calls == calls + 1 and report.waiting == 2
            delays.append(report.paused["retryAt"] - clock.now_ms())
        clock.advance(60_000 // POLICY.limit)
    assert delays[:4] == [1000, 2000, 4000, 8000] and max(delays) == POLICY.max_delay_ms
    assert retry_count(layout, B1) == retry_count(layout, B2) == 0
    assert not list(layout.abandoned.iterdir())
    assert recovery.run_once().paused is not None
    # Space returns; while paused a scheduled pass tries nothing, after retryAt it completes.
    store.error = None
    calls = store.calls
    assert recovery.run_once().recovered == [] and store.calls == calls
    clock.advance(POLICY.max_delay_ms)
    report = recovery.run_once()
    assert sorted(report.recovered) == [B1, B2] and report.paused is None


def test_a_failure_of_the_batch_itself_still_counts_and_abandons(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    store = FlakyStore(layout)  # EIO on this batch's file
    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY, store=store)
    put_failed(layout, failed_doc(B1))
    for _ in range(POLICY.limit):
        report = recovery.run_once(force=True)
        assert report.paused is None
    assert report.abandoned == [B1]


class Sink:
    name = "test"

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.calls = 0

    def deliver(self, batch_id: str, data: bytes) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error


def sink_recovery(layout: Layout, clock: FakeClock, sink: Sink, failures: int) -> Recovery:
    guarded = GuardedSink(sink, CircuitBreaker(failures, 30.0, clock))
    completer = Completer(lambda b, d: write_completed(layout, b, d), lambda: guarded)
    return Recovery(layout, clock, random.Random(1), POLICY, store=completer)


def test_a_sink_that_is_down_or_behind_an_open_breaker_costs_no_retry(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    clock = FakeClock(now_ms=10_000)
    sink = Sink()
    sink.error = SinkDownError("sink unreachable: connection refused")
    recovery = sink_recovery(layout, clock, sink, failures=2)
    put_failed(layout, failed_doc(B1, failedAt=1))
    # The collector holds this one already: its write goes ahead while the sink is down.
    put_failed(layout, failed_doc(B2, failedAt=2, sinkAcceptedAt=5))
    for _ in range(4 * POLICY.limit):
        report = recovery.run_once(force=True)
        assert report.abandoned == [] and report.retried_failed == []
        assert report.paused is not None
        assert report.paused["cause"] in ("sinkDown", "breakerOpen")
        assert report.paused["folder"] is None
        clock.advance(10_000)
    assert report.recovered == [] and retry_count(layout, B1) == 0
    assert not (layout.recovery / f"{B2}.failed.json").exists()
    assert sink.calls < 4 * POLICY.limit  # the open breaker kept most passes off the sink
    sink.error = None
    clock.advance(40_000)
    assert recovery.run_once(force=True).recovered == [B1]


def test_a_sink_that_refuses_one_batch_while_up_charges_that_batch(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    sink = Sink()
    sink.error = TransientError("sink answered HTTP 500")
    recovery = sink_recovery(layout, FakeClock(), sink, failures=1000)
    put_failed(layout, failed_doc(B1))
    reports = [recovery.run_once(force=True) for _ in range(POLICY.limit)]
    assert [r.paused for r in reports] == [None] * POLICY.limit
    assert reports[-1].abandoned == [B1]


def test_the_cause_names_the_folder_of_the_file_that_failed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    layout = Layout(root)
    layout.prepare()
    denied = PermissionError(errno.EACCES, "Permission denied", str(layout.abandoned / "f.tmp"))
    cause = environment_cause(denied, root, "aggregated/")
    assert cause is not None and (cause.cause, cause.folder) == ("EACCES", "recovery/abandoned/")
    nameless = OSError(errno.EROFS, "Read-only file system")
    cause = environment_cause(nameless, root, "aggregated/")
    assert cause is not None and (cause.cause, cause.folder) == ("EROFS", "aggregated/")
    assert environment_cause(OSError(errno.EIO, "I/O error"), root, "aggregated/") is None


def test_running_out_of_file_descriptors_pauses_and_charges_no_batch(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    clock = FakeClock(now_ms=10_000)
    store = FlakyStore(layout)
    recovery = Recovery(layout, clock, random.Random(1), POLICY, store=store)
    put_failed(layout, failed_doc(B1, failedAt=1))
    put_failed(layout, failed_doc(B2, failedAt=2))
    for code, name in ((errno.EMFILE, "EMFILE"), (errno.ENFILE, "ENFILE")):
        store.error = OSError(code, "Too many open files")
        for _ in range(3 * POLICY.limit):
            calls = store.calls
            report = recovery.run_once(force=True)
            assert report.paused is not None and report.paused["cause"] == name
            assert report.paused["folder"] is None and report.abandoned == []
            # One try per pass: the other batch would only meet the same limit.
            assert store.calls == calls + 1 and report.waiting == 2
    assert retry_count(layout, B1) == retry_count(layout, B2) == 0
    store.error = None
    assert sorted(recovery.run_once(force=True).recovered) == [B1, B2]
