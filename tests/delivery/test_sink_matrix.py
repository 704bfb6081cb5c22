"""The sink fault matrix: each way a collector can fail, while aggregated/ takes writes and
while it refuses them (ENOSPC). Real peers: an HTTP receiver on 127.0.0.1 (port 0) and real
commands. One batch goes through the flusher, then recovery passes while the fault lasts,
after it is cleared, and after the disk is back. Every time: the batch ends in exactly one
place, recovery/ ends empty, the collector got it as often as the fault allows (at least
once, never again once it accepted), and every re-send is counted."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from flowagg.batches.storage import batch_file_name
from flowagg.core.clock import FakeClock
from flowagg.core.layout import Layout
from flowagg.delivery.recovery import Recovery
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.delivery.sink import CircuitBreaker, Completer, GuardedSink
from flowagg.delivery.sink_command import CommandSink
from flowagg.delivery.sink_http import HttpSink
from tests.delivery.test_delivery import BATCH_ID, FailingWrite, run_flusher
from tests.harness import wait_for
from tests.sinkserver import Receiver

POLICY = RetryPolicy(base_ms=1000, max_delay_ms=300_000, limit=5)
# Wide enough that a loaded machine answers a plain 503 in time (0.3 s was missed at load 8)
HTTP_TIMEOUT_S = 1.0
# The command reads the batch, then does what the mode file says; it counts acceptances.
COMMAND = """
cat > /dev/null
case "$(cat "$1")" in
  signal) kill -9 $$ ;;
  huge) echo x >> "$2"; head -c 50000000 /dev/zero; exit 0 ;;
  ok) echo x >> "$2"; exit 0 ;;
esac
"""


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # http or command
    mode: str  # the receiver's mode or the command's
    outcome: str  # abandoned, or the copies the collector ends with
    copies: int = 1
    resends: int = 0


FAULTS = {
    "3xx redirect": Fault("http", "302", "abandoned", copies=0),
    "4xx": Fault("http", "404", "abandoned", copies=0),
    "413": Fault("http", "413", "abandoned", copies=0),
    "5xx": Fault("http", "503", "stored"),
    # Ambiguous: the collector may hold the batch, so each later delivery (one while the fault
    # lasts, one after) is a counted re-send; a collector that stores, then answers too late,
    # holds a copy from each.
    "slow body": Fault("http", "trickle", "stored", resends=2),
    "timeout, stored late": Fault("http", "timeout", "stored", copies=3, resends=2),
    "connection reset": Fault("http", "drop", "stored", resends=2),
    "killed by a signal": Fault("command", "signal", "stored", resends=2),
    "huge output": Fault("command", "huge", "stored"),
}


class Collector:
    """The sink under test, its fault switchable, and how many copies it accepted."""

    def __init__(self, fault: Fault, tmp: Path, receiver: Receiver) -> None:
        self.fault = fault
        self.receiver = receiver
        self.mode_file = tmp / "mode"
        self.count_file = tmp / "count"
        self.count_file.touch()
        self.mode_file.write_text(fault.mode)
        receiver.mode, receiver.delay_s = fault.mode, HTTP_TIMEOUT_S * 2
        sink = (
            HttpSink(receiver.url, HTTP_TIMEOUT_S)
            if fault.kind == "http"
            else CommandSink(
                ["sh", "-c", COMMAND, "sink", str(self.mode_file), str(self.count_file)], 30
            )
        )
        self.sink = GuardedSink(sink, CircuitBreaker(1000, 30.0, FakeClock()))

    def clear(self) -> None:
        self.receiver.mode = "ok"
        self.mode_file.write_text("ok")

    def copies(self) -> int:
        if self.fault.kind == "http":
            return len(self.receiver.batches)
        return len(self.count_file.read_text().split())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.mark.parametrize("disk", ["writes work", "disk full"])
@pytest.mark.parametrize("name", list(FAULTS))
def test_sink_fault_matrix(tmp_path: Path, receiver: Receiver, name: str, disk: str) -> None:
    fault = FAULTS[name]
    layout = Layout(tmp_path / "data")
    layout.prepare()
    collector = Collector(fault, tmp_path, receiver)
    write = FailingWrite(layout, failures=10**9 if disk == "disk full" else 0)
    completer = Completer(write, lambda: collector.sink)
    recovery = Recovery(layout, FakeClock(now_ms=10_000), random.Random(1), POLICY, store=completer)
    failed = layout.recovery / f"{BATCH_ID}.failed.json"
    done = layout.aggregated / batch_file_name(BATCH_ID)
    abandoned = layout.abandoned / f"{BATCH_ID}.abandoned.json"

    path, _ = run_flusher(layout, completer)
    if fault.outcome == "abandoned":
        assert path == abandoned and collector.copies() == 0
    elif fault.mode == "huge":  # accepted at once: with a full disk only the write waits
        assert path == (failed if disk == "disk full" else done)
    else:
        assert path == failed
        report = recovery.run_once(force=True)  # the fault lasts
        # A 503 says the sink is down, not this batch: the pass pauses and charges nothing.
        # An ambiguous failure may have delivered the batch: that one is the batch's own.
        down = fault.mode == "503"
        assert report.retried_failed == ([] if down else [BATCH_ID])
        assert (report.paused is not None) is down
    collector.clear()
    if disk == "disk full" and fault.outcome != "abandoned":
        charged = orjson.loads(failed.read_bytes()).get("retryCount", 0)
        for _ in range(POLICY.limit + 2):  # past the retry limit: the collector holds it
            report = recovery.run_once(force=True)
            assert not report.retried_failed and not report.abandoned
            assert report.paused is not None and report.paused["cause"] == "ENOSPC"
        doc = orjson.loads(failed.read_bytes())
        assert "sinkAcceptedAt" in doc and doc.get("retryCount", 0) == charged
        write.failures = 0
    report = recovery.run_once(force=True)
    if fault.outcome == "abandoned":
        assert not done.exists() and abandoned.exists()
    else:
        assert report.recovered == [BATCH_ID] or path == done
        assert done.exists() and not abandoned.exists()
    assert not list(layout.recovery.glob("*.failed.json"))
    wait_for(lambda: collector.copies() >= fault.copies)
    assert collector.copies() == fault.copies
    assert collector.sink.resends == fault.resends
