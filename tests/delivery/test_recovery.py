"""The recovery loop with an injected clock and rng: schedules, limits, quarantine, moves."""

from __future__ import annotations

import errno
import itertools
import random
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowagg.delivery.recovery_folder
from flowagg.batches.storage import Batch, batch_file_name, encode_batch, read_batch
from flowagg.core.clock import FakeClock
from flowagg.core.errors import PermanentError, TransientError
from flowagg.core.layout import Layout
from flowagg.delivery.recovery import Recovery, write_completed
from flowagg.delivery.recovery_format import INT_FIELDS
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.delivery.sink import CircuitBreaker, Completer, GuardedSink

POLICY = RetryPolicy(base_ms=1000, max_delay_ms=300_000, limit=5)
B1 = "1704067200000_000000000001"


def make_layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "data")
    layout.prepare()
    return layout


def failed_doc(batch_id: str, n: int = 3, **extra: Any) -> dict[str, Any]:
    entries = [orjson.dumps({"userId": "u", "entryId": f"{batch_id}-{i}"}) for i in range(n)]
    batch = Batch(batch_id, "size", entries, 1, n, [f"{batch_id}-{i}" for i in range(n)])
    doc = orjson.loads(encode_batch(batch, timestamp_ms=1_000))
    doc.update(
        {"retryCount": 0, "lastRetryAt": 0, "lastError": "x", "failedAt": 0, "nextRetryAt": 0}
    )
    doc.update(extra)
    return doc


def put_failed(layout: Layout, doc: dict[str, Any]) -> Path:
    path = layout.recovery / f"{doc['batchId']}.failed.json"
    path.write_bytes(orjson.dumps(doc))
    return path


class FlakyStore:
    """A store that fails while `error` is set, then writes for real. EIO by default: a
    failure of the batch's own file, charged to it (a full disk is not, test_pause)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.error: BaseException | None = OSError(errno.EIO, "Input/output error")
        self.calls = 0

    def __call__(self, batch_id: str, data: bytes) -> Path:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return write_completed(self.layout, batch_id, data)


def test_delay_cap_doubles_then_caps() -> None:
    caps = [POLICY.delay_cap_ms(n) for n in range(12)]
    assert caps[:6] == [1000, 2000, 4000, 8000, 16000, 32000]
    assert caps[-1] == 300_000 and max(caps) == 300_000
    assert all(a <= b for a, b in itertools.pairwise(caps))


def test_full_jitter_stays_within_bounds_and_varies() -> None:
    rng = random.Random(1)
    for count in range(10):
        cap = POLICY.delay_cap_ms(count)
        delays = [POLICY.next_retry_at(5000, count, rng) - 5000 for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert len(set(delays)) > 50  # jittered, not a fixed delay
        assert max(delays) > cap * 0.8 and min(delays) < cap * 0.2


def test_schedule_then_abandon_then_requeue(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    clock = FakeClock(now_ms=10_000)
    store = FlakyStore(layout)
    recovery = Recovery(layout, clock, random.Random(3), POLICY, store=store)
    put_failed(layout, failed_doc(B1, nextRetryAt=10_500))

    report = recovery.run_once()
    assert report.waiting == 1 and store.calls == 0  # not yet due
    clock.advance(500)
    for attempt in range(1, POLICY.limit):
        report = recovery.run_once()
        assert report.retried_failed == [B1]
        doc = orjson.loads((layout.recovery / f"{B1}.failed.json").read_bytes())
        assert doc["retryCount"] == attempt
        assert doc["lastRetryAt"] == clock.now_ms()
        assert "Input/output error" in doc["lastError"]
        delay = doc["nextRetryAt"] - clock.now_ms()
        assert 0 <= delay <= POLICY.delay_cap_ms(attempt)
        assert len(doc["history"]) == attempt
        if delay > 0:
            calls = store.calls
            assert recovery.run_once().waiting == 1 and store.calls == calls  # not due yet
        clock.advance(delay)
    report = recovery.run_once()
    assert report.abandoned == [B1]
    assert not (layout.recovery / f"{B1}.failed.json").exists()
    parked = orjson.loads((layout.abandoned / f"{B1}.abandoned.json").read_bytes())
    assert parked["retryCount"] == POLICY.limit
    assert parked["abandonReason"] == "retry limit reached"
    assert [h["kind"] for h in parked["history"]] == ["transient"] * POLICY.limit

    store.error = None
    assert recovery.requeue_abandoned(B1) == [B1]
    requeued = orjson.loads((layout.recovery / f"{B1}.failed.json").read_bytes())
    assert requeued["retryCount"] == 0 and requeued["history"][-1]["event"] == "requeued"
    assert recovery.run_once().recovered == [B1]
    done = read_batch(layout.aggregated / batch_file_name(B1))
    assert done["recovered"] is True and done["entryCount"] == 3
    assert "retryCount" not in done and "history" not in done
    assert not list(layout.recovery.glob("*.json")) and not list(layout.abandoned.iterdir())


def test_permanent_error_skips_the_retries(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    store = FlakyStore(layout)
    store.error = PermanentError("sink answered 400: bad batch")
    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY, store=store)
    put_failed(layout, failed_doc("p1"))
    assert recovery.run_once().abandoned == ["p1"]
    parked = orjson.loads((layout.abandoned / "p1.abandoned.json").read_bytes())
    assert parked["abandonReason"] == "permanent error" and parked["retryCount"] == 1
    assert "bad batch" in parked["lastError"]


def test_oldest_failures_first(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    order: list[str] = []

    def store(batch_id: str, data: bytes) -> Path:
        order.append(batch_id)
        return write_completed(layout, batch_id, data)

    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY, store=store)
    put_failed(layout, failed_doc("a-new", failedAt=300))
    put_failed(layout, failed_doc("z-old", failedAt=100))
    put_failed(layout, failed_doc("m-mid", failedAt=200))
    recovery.run_once()
    assert order == ["z-old", "m-mid", "a-new"]


def test_untrusted_files_are_quarantined_and_the_loop_carries_on(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY)
    good = put_failed(layout, failed_doc("good"))
    truncated = put_failed(layout, failed_doc("trunc"))
    truncated.write_bytes(truncated.read_bytes()[:-25])
    wrong = failed_doc("sum")
    wrong["entriesSha256"] = "0" * 64
    put_failed(layout, wrong)
    (layout.recovery / "notes.txt").write_text("garbage")
    (layout.recovery / "shape.failed.json").write_text('["not", "a", "batch"]')

    report = recovery.run_once()
    assert report.recovered == ["good"] and not good.exists()
    assert sorted(report.quarantined) == sorted(
        ["notes.txt", "shape.failed.json", "sum.failed.json", "trunc.failed.json"]
    )
    for name in report.quarantined:
        reason = orjson.loads((layout.errors / f"{name}.reason.json").read_bytes())
        assert reason["component"] == "recovery" and reason["reason"]
        assert (layout.errors / name).exists()
    sum_reason = orjson.loads((layout.errors / "sum.failed.json.reason.json").read_bytes())
    assert "entriesSha256" in sum_reason["reason"]


def test_newer_format_is_refused_and_left_in_place(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY)
    path = put_failed(layout, failed_doc("future", version="3.0.0"))
    report = recovery.run_once()
    assert report.refused == ["future.failed.json"] and path.exists()
    assert not list(layout.errors.iterdir())


@pytest.mark.parametrize("winner", ["abandoned", "requeued"])
def test_reconcile_a_move_cut_by_a_crash(tmp_path: Path, winner: str) -> None:
    layout = make_layout(tmp_path)
    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY)
    doc = failed_doc("both", retryCount=5)
    parked = dict(doc, abandonedAt=1000, abandonReason="retry limit reached")
    (layout.abandoned / "both.abandoned.json").write_bytes(orjson.dumps(parked))
    if winner == "requeued":
        doc.update(retryCount=0, requeuedAt=2000, nextRetryAt=10**15)
    else:
        doc.update(nextRetryAt=10**15)
    put_failed(layout, doc)
    report = recovery.run_once()
    remaining = [p.name for p in (*layout.recovery.glob("*.json"), *layout.abandoned.iterdir())]
    if winner == "requeued":
        assert remaining == ["both.failed.json"]
    else:
        assert remaining == ["both.abandoned.json"]
    assert len(report.reconciled) == 1


def test_failed_copy_of_a_completed_batch_is_dropped(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY)
    doc = failed_doc("dup")
    write_completed(layout, "dup", orjson.dumps(dict(doc, recovered=True)))
    put_failed(layout, doc)
    report = recovery.run_once()
    assert report.reconciled == ["dup.failed.json"] and not report.recovered
    assert not (layout.recovery / "dup.failed.json").exists()


def test_disk_full_on_a_fake_filesystem_then_space_returns(fs: Any) -> None:
    """pyfakefs: a disk that is really full (set_disk_usage), not a patched call."""
    layout = Layout(Path("/flowagg/data"))
    fs.create_dir("/flowagg")
    layout.prepare()
    put_failed(layout, failed_doc("full", n=20))
    used = sum(p.stat().st_size for p in layout.recovery.glob("*.json"))
    fs.set_disk_usage(used + 200, path="/flowagg")  # room for little more than nothing
    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY)
    report = recovery.run_once(force=True)
    # The disk's failure, not the batch's: no retry charged, the loop paused with the cause.
    assert report.retried_failed == [] and report.waiting == 1
    assert report.paused is not None
    assert (report.paused["cause"], report.paused["folder"]) == ("ENOSPC", "aggregated/")
    assert orjson.loads((layout.recovery / "full.failed.json").read_bytes())["retryCount"] == 0
    assert not list(layout.aggregated.iterdir())  # no partial or temp file left behind
    fs.set_disk_usage(10 * 1024 * 1024, path="/flowagg")
    assert recovery.run_once(force=True).recovered == ["full"]
    assert read_batch(layout.aggregated / batch_file_name("full"))["entryCount"] == 20


def test_a_pass_reads_only_files_that_are_due_or_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = make_layout(tmp_path)
    clock = FakeClock(now_ms=10_000)
    store = FlakyStore(layout)
    recovery = Recovery(layout, clock, random.Random(1), POLICY, store=store)
    for i in range(20):
        put_failed(layout, failed_doc(f"w{i:02d}", nextRetryAt=50_000, failedAt=i))
    reads: list[str] = []
    real_read = flowagg.delivery.recovery_folder.read_regular

    def counting_read(path: Path) -> bytes:
        reads.append(path.name)
        return real_read(path)

    monkeypatch.setattr(flowagg.delivery.recovery_folder, "read_regular", counting_read)
    assert recovery.run_once().waiting == 20 and len(reads) == 20  # learnt once
    reads.clear()
    assert recovery.run_once().waiting == 20 and reads == []
    put_failed(layout, failed_doc("w00", nextRetryAt=50_000, lastError="edited by hand"))
    (layout.recovery / "w01.failed.json").unlink()
    assert recovery.run_once().waiting == 19 and reads == ["w00.failed.json"]
    reads.clear()
    clock.advance(40_000)  # all due: each is read and retried
    report = recovery.run_once()
    assert len(report.retried_failed) == 19 and len(reads) == 19 and store.calls == 19


def test_abandoned_copy_of_a_completed_batch_is_dropped(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY)
    doc = failed_doc("gone", retryCount=5, abandonedAt=1, abandonReason="retry limit reached")
    write_completed(layout, "gone", orjson.dumps(dict(doc, recovered=True)))
    (layout.abandoned / "gone.abandoned.json").write_bytes(orjson.dumps(doc))
    other = failed_doc("differs", abandonedAt=1)
    write_completed(layout, "differs", orjson.dumps(failed_doc("differs", n=2)))
    (layout.abandoned / "differs.abandoned.json").write_bytes(orjson.dumps(other))
    report = recovery.run_once()
    assert report.reconciled == ["gone.abandoned.json"]
    assert sorted(p.name for p in layout.abandoned.iterdir()) == ["differs.abandoned.json"]
    assert (layout.aggregated / batch_file_name("gone")).exists()


def test_user_batch_ids_are_checked_before_any_path_is_built(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    outside = tmp_path / "x.abandoned.json"
    outside.write_bytes(orjson.dumps(failed_doc("x")))
    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY)
    with pytest.raises(ValueError, match="is not a batch id"):
        recovery.requeue_abandoned("../../x")
    assert outside.exists() and not list(layout.recovery.glob("*.json"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retryCount", "3"),
        ("retryCount", -1),
        ("retryCount", True),
        ("nextRetryAt", 1.5),
        ("nextRetryAt", None),
        ("failedAt", "yesterday"),
        ("lastRetryAt", 2**60),
        ("sinkAcceptedAt", "now"),
        ("lastError", 42),
        ("history", {"at": 1}),
        ("history", ["not an object"]),
        ("possiblyDelivered", "yes"),
    ],
)
def test_a_malformed_recovery_field_is_quarantined_not_raised(
    tmp_path: Path, field: str, value: Any
) -> None:
    # One such file once raised TypeError out of every pass, holding up all the others.
    layout = make_layout(tmp_path)
    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY, store=FlakyStore(layout))
    put_failed(layout, {**failed_doc("bad", failedAt=1), field: value})
    put_failed(layout, failed_doc("good", failedAt=2))
    report = recovery.run_once(force=True)
    assert report.quarantined == ["bad.failed.json"] and report.retried_failed == ["good"]
    reason = orjson.loads((layout.errors / "bad.failed.json.reason.json").read_bytes())
    assert field in reason["reason"]
    assert (layout.errors / "bad.failed.json").exists()


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(-5, 5), max_size=2),
)
FIELDS = (*INT_FIELDS, "lastError", "abandonReason", "history", "possiblyDelivered")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    junk=st.dictionaries(st.sampled_from(FIELDS), JUNK, min_size=1),
    twin_junk=st.dictionaries(st.sampled_from(FIELDS), JUNK),
    twin=st.booleans(),
    store_fails=st.booleans(),
)
def test_junk_in_the_recovery_fields_never_makes_a_pass_raise(
    junk: dict[str, Any], twin_junk: dict[str, Any], twin: bool, store_fails: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        layout = make_layout(Path(tmp))
        store = FlakyStore(layout)
        if not store_fails:
            store.error = None
        recovery = Recovery(layout, FakeClock(now_ms=10**6), random.Random(1), POLICY, store=store)
        put_failed(layout, {**failed_doc(B1), **junk})
        if twin:
            parked = {**failed_doc(B1), "abandonReason": "retry limit reached", **twin_junk}
            (layout.abandoned / f"{B1}.abandoned.json").write_bytes(orjson.dumps(parked))
        for force in (False, True, True):
            recovery.run_once(force=force)
        # Never deleted: in the queue, stored, parked, or quarantined with a reason.
        places = [
            layout.recovery / f"{B1}.failed.json",
            layout.aggregated / batch_file_name(B1),
            layout.abandoned / f"{B1}.abandoned.json",
            layout.errors / f"{B1}.failed.json",
        ]
        assert any(p.exists() for p in places)


def test_a_pass_ends_between_batches_once_asked_to_stop(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    recovery: Recovery

    def store(batch_id: str, data: bytes) -> Path:
        recovery.stop.set()  # the daemon's SIGTERM arrives during the first batch
        return write_completed(layout, batch_id, data)

    recovery = Recovery(layout, FakeClock(), random.Random(1), POLICY, store=store)
    for i in range(10):
        put_failed(layout, failed_doc(f"s{i}", failedAt=i))
    report = recovery.run_once()
    assert report.recovered == ["s0"] and report.waiting == 9 and report.stopped
    assert report.as_dict()["stopped"] is True
    assert len(list(layout.recovery.glob("*.failed.json"))) == 9


def open_breaker(clock: FakeClock, cooldown_s: float = 30.0) -> GuardedSink:
    class Down:
        name = "down"

        def deliver(self, batch_id: str, data: bytes) -> None:
            raise TransientError("connection refused")

    sink = GuardedSink(Down(), CircuitBreaker(1, cooldown_s, clock))
    with pytest.raises(TransientError):
        sink.deliver("x", b"{}")
    return sink


def test_an_open_breaker_leaves_every_untried_batch_waiting_and_writes_accepted_ones(
    tmp_path: Path,
) -> None:
    layout = make_layout(tmp_path)
    clock = FakeClock(now_ms=10_000)
    sink = open_breaker(clock)
    clock.advance(10_000)
    completer = Completer(lambda b, d: write_completed(layout, b, d), lambda: sink)
    recovery = Recovery(layout, clock, random.Random(1), POLICY, store=completer)
    for i in range(4):
        put_failed(layout, failed_doc(f"n{i}", failedAt=i))
    put_failed(layout, failed_doc("held", failedAt=9, sinkAcceptedAt=5))
    put_failed(layout, failed_doc("later", failedAt=10, nextRetryAt=10**9))
    report = recovery.run_once()
    assert report.circuit_open and report.waiting == 5  # four need the sink, one is not due
    assert report.recovered == ["held"]  # the sink has it: only the write was left
    assert report.as_dict()["breakerRetryInS"] == 20.0
    assert not report.retried_failed and not report.abandoned


def test_an_acceptance_is_remembered_when_its_failed_file_cannot_be_updated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = make_layout(tmp_path)
    delivered: list[str] = []

    class Accepting:
        name = "accepting"

        def deliver(self, batch_id: str, data: bytes) -> None:
            delivered.append(batch_id)

    sink = GuardedSink(Accepting(), CircuitBreaker(3, 30.0, FakeClock()))
    store = FlakyStore(layout)
    completer = Completer(store, lambda: sink)
    path = put_failed(layout, failed_doc(B1))

    def full(target: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("flowagg.delivery.recovery.atomic_write", full)
    recovery = Recovery(layout, FakeClock(now_ms=10_000), random.Random(1), POLICY, store=completer)
    for _ in range(POLICY.limit + 2):
        assert recovery.run_once(force=True).retried_failed == [B1]
    assert delivered == [B1] and path.exists()
    monkeypatch.undo()
    store.error = None
    assert recovery.run_once(force=True).recovered == [B1]
    assert delivered == [B1] and store.calls == POLICY.limit + 3
