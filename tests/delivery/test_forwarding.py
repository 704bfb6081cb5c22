"""Forwarding through a real daemon to a real HTTP receiver that fails for a while, and to
command sinks that accept, ask for a retry, or refuse."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.core.layout import Layout
from tests.harness import (
    DaemonProc,
    cli,
    entry,
    request,
    start_daemon,
    stored_id_counts,
    wait_for,
)
from tests.service.test_reload_bridge import bridge
from tests.sinkserver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def status(root: Path) -> dict[str, Any]:
    return request(Layout(root).socket, {"op": "status"})


def test_ten_thousand_entries_through_a_sink_that_fails_for_a_while(
    root: Path, receiver: Receiver, daemons: list[DaemonProc]
) -> None:
    settings = {
        "sinkType": "http",
        "sinkUrl": receiver.url,
        "sinkTimeoutMs": 500,
        "breakerFailures": 3,
        "breakerCooldownMs": 200,
        "batchSize": 100,
        "maxAgeMs": 100,
        "immediateRetries": 1,
        "scheduleIntervalMs": 150,
        "retryBaseMs": 50,
        "retryMaxDelayMs": 400,
    }
    daemons.append(start_daemon(root, settings))
    sock = Layout(root).socket
    sent: set[str] = set()

    def send(start: int, count: int) -> None:
        entries = [entry(i, entryId=f"fw{i}") for i in range(start, start + count)]
        reply = request(sock, {"op": "add", "entries": entries})
        assert reply["ok"] and reply["accepted"] == count, reply
        sent.update(e["entryId"] for e in entries)

    for start in range(0, 3000, 100):
        send(start, 100)
    wait_for(lambda: len(receiver.entry_ids()) >= 1000)
    receiver.mode = "503"  # the collector goes down ...
    for start in range(3000, 6000, 100):
        send(start, 100)
    wait_for(lambda: status(root)["sink"]["state"] == "open")
    receiver.mode = "drop"  # ... then drops connections ...
    for start in range(6000, 8000, 100):
        send(start, 100)
    wait_for(lambda: status(root)["queue"]["failed"] > 0)
    # The outage lasts a while: at least one cooldown ends in a failed half-open trial.
    wait_for(lambda: status(root)["sink"]["timesOpened"] >= 2)
    receiver.mode = "ok"  # ... and comes back
    for start in range(8000, 10000, 100):
        send(start, 100)

    def drained() -> bool:
        st = status(root)
        return st["queue"]["failed"] == 0 and st["buffered"]["entries"] == 0

    wait_for(drained, timeout=120)
    got = receiver.entry_ids()
    assert set(got) == sent and len(sent) == 10_000  # at least once: dedupe gives the set
    assert stored_id_counts(root) == dict.fromkeys(sent, 1)  # exactly once locally
    st = status(root)
    assert st["sink"]["state"] == "closed" and st["sink"]["timesOpened"] >= 1
    assert st["queue"]["abandoned"] == 0
    assert receiver.calls["503"] >= 1 and receiver.calls["drop"] >= 1


def sink_script(tmp_path: Path, code_file: Path) -> str:
    script = tmp_path / "sink.py"
    script.write_text(
        "import pathlib, sys\n"
        "sys.stdin.buffer.read()\n"
        f"sys.exit(int(pathlib.Path({str(code_file)!r}).read_text()))\n"
    )
    return f"{sys.executable} {script}"


def test_command_sink_retry_then_accept_and_refuse(
    root: Path, tmp_path: Path, daemons: list[DaemonProc]
) -> None:
    code = tmp_path / "code"
    code.write_text("75")
    settings = {
        "sinkType": "command",
        "sinkCommand": sink_script(tmp_path, code),
        "immediateRetries": 0,
        "maxAgeMs": 3_600_000,
        "scheduleIntervalMs": 3_600_000,
    }
    daemons.append(start_daemon(root, settings))
    layout = Layout(root)
    add = cli(root, "add", input=orjson.dumps([entry(1, entryId="c1"), entry(2, entryId="c2")]))
    assert add.returncode == 0
    assert cli(root, "flush").returncode == 1  # the batch failed: said so
    assert len(list(layout.recovery.glob("*.failed.json"))) == 1  # 75: try again later
    code.write_text("0")
    assert cli(root, "recover").returncode == 0
    assert stored_id_counts(root) == {"c1": 1, "c2": 1}
    assert list(layout.aggregated.glob("batch_*.json"))

    code.write_text("1")  # refused for good: straight to abandoned, no retries
    assert cli(root, "add", input=orjson.dumps(entry(3, entryId="c3"))).returncode == 0
    assert cli(root, "flush").returncode == 1
    [parked] = layout.abandoned.glob("*.abandoned.json")
    doc = orjson.loads(parked.read_bytes())
    assert doc["abandonReason"] == "permanent error" and "exited 1" in doc["lastError"]
    assert stored_id_counts(root) == {"c1": 1, "c2": 1, "c3": 1}


def test_recover_with_the_breaker_open_fails_and_counts_every_batch_waiting(
    root: Path, tmp_path: Path, receiver: Receiver, daemons: list[DaemonProc]
) -> None:
    # `recover` and `aggregate-recover` once exited 0 with nothing retried, and counted one
    # of the waiting batches.
    receiver.mode = "503"
    settings = {
        "sinkType": "http",
        "sinkUrl": receiver.url,
        "breakerFailures": 1,
        "breakerCooldownMs": 600_000,
        "immediateRetries": 3,
        "maxAgeMs": 3_600_000,
        "scheduleIntervalMs": 3_600_000,
    }
    daemons.append(start_daemon(root, settings))
    for n in range(3):
        assert cli(root, "add", input=orjson.dumps(entry(n, entryId=f"w{n}"))).returncode == 0
        assert cli(root, "flush").returncode == 1
    st = status(root)
    assert st["queue"]["failed"] == 3 and st["sink"]["state"] == "open"
    assert receiver.calls["503"] == 1  # the breaker parked the others at once, untried

    plain = cli(root, "recover")
    assert plain.returncode == 1, plain.stdout
    assert "3 batches not tried: sink breaker open, next trial in" in plain.stdout.decode()
    as_json = cli(root, "recover", "--json")
    assert as_json.returncode == 1
    report = orjson.loads(as_json.stdout)
    assert report["waiting"] == 3 and report["circuitOpen"] is True
    assert 0 < report["breakerRetryInS"] <= 600
    code, reply = bridge(tmp_path, "aggregate-recover", root=root)
    assert code == 1 and reply["waiting"] == 3 and reply["circuitOpen"] is True
    assert receiver.calls["503"] == 1 and stored_id_counts(root) == {"w0": 1, "w1": 1, "w2": 1}


def test_a_slow_collector_gets_no_inline_copies_and_the_resend_is_reported(
    root: Path, receiver: Receiver, daemons: list[DaemonProc]
) -> None:
    # It stores, then answers after sinkTimeoutMs: every inline retry once added a copy.
    receiver.mode, receiver.delay_s = "timeout", 0.8
    settings = {
        "sinkType": "http",
        "sinkUrl": receiver.url,
        "sinkTimeoutMs": 300,
        "immediateRetries": 3,
        "maxAgeMs": 3_600_000,
        "scheduleIntervalMs": 3_600_000,
    }
    daemons.append(start_daemon(root, settings))
    assert cli(root, "add", input=orjson.dumps(entry(1, entryId="slow1"))).returncode == 0
    assert cli(root, "flush").returncode == 1
    [parked] = Layout(root).recovery.glob("*.failed.json")
    assert orjson.loads(parked.read_bytes())["possiblyDelivered"] is True
    wait_for(lambda: receiver.entry_ids() == {"slow1": 1})
    assert receiver.calls["timeout"] == 1
    receiver.mode = "ok"
    assert cli(root, "recover").returncode == 0
    assert receiver.entry_ids() == {"slow1": 2}  # one counted re-send, deduped by the receiver
    assert status(root)["sink"]["resends"] == 1
    health = cli(root, "health", "--json")
    assert orjson.loads(health.stdout)["sink"]["resends"] == 1
    assert stored_id_counts(root) == {"slow1": 1}
