"""SIGTERM exits within shutdownTimeoutMs whatever clients and sinks do; health tells the truth
about a stopped daemon; connections are bounded."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil

from flowagg.batches.storage import Batch, encode_batch
from flowagg.core.layout import Layout
from tests.harness import cli, entry, request, start_daemon, stored_id_counts, wait_for

STOP_MS = 3000
# Python's own start-up and exit, on a shared machine.
MARGIN_S = 3.0


def connect(sock_path: Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock_path))
    return s


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@contextlib.contextmanager
def reaped(pids: list[int]) -> Iterator[None]:
    """Kill the sink programs a stopped daemon left behind (they outlive it by design)."""
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_sigterm_is_bounded_with_a_stuck_sink_an_idle_client_and_a_waiting_flush(
    root: Path,
) -> None:
    settings = {
        "sinkType": "command",
        "sinkCommand": "sleep 60",
        "sinkTimeoutMs": 600_000,
        "shutdownTimeoutMs": STOP_MS,
        "batchSize": 1000,
        "maxAgeMs": 3_600_000,
    }
    daemon = start_daemon(root, settings)
    sock_path = daemon.layout.socket
    ids = [f"stuck-{i}" for i in range(5)]
    reply = request(
        sock_path, {"op": "add", "entries": [entry(i, entryId=e) for i, e in enumerate(ids)]}
    )
    assert reply["accepted"] == 5
    idle = connect(sock_path)
    flusher = connect(sock_path, timeout=STOP_MS / 1000 + 20)
    flusher.sendall(b'{"op":"flush"}\n')
    daemon_ps = psutil.Process(daemon.proc.pid)
    sinks = wait_for(lambda: [c.pid for c in daemon_ps.children(recursive=True)])
    with reaped(sinks), idle, flusher:
        started = time.monotonic()
        daemon.send(signal.SIGTERM)
        code = daemon.proc.wait(STOP_MS / 1000 + MARGIN_S + 10)
        elapsed = time.monotonic() - started
        assert code == 0, daemon.log()
        assert elapsed < STOP_MS / 1000 + MARGIN_S, (elapsed, daemon.log())
        answer = orjson.loads(read_line(flusher))
        assert answer["ok"] is False and answer["error"] == "stopping"
        assert answer["retryAfterMs"] > 0
        assert read_line(idle) == b""  # closed, not left hanging
    log = daemon.log()
    assert "5 entries in the journal" in log and "flusher did not stop in time" in log

    again = start_daemon(root, {"batchSize": 1000, "maxAgeMs": 3_600_000})
    assert cli(root, "flush").returncode == 0
    assert again.stop() == 0
    assert stored_id_counts(root) == {e: 1 for e in ids}


def test_extra_connections_are_refused_with_one_line_and_counted(root: Path) -> None:
    daemon = start_daemon(root, {"maxConnections": 3})
    sock_path = daemon.layout.socket
    held = [connect(sock_path) for _ in range(3)]
    try:
        for s in held:  # each connection is registered once it has been answered
            s.sendall(b'{"op":"ping"}\n')
            assert orjson.loads(read_line(s)) == {"ok": True}
        with connect(sock_path) as extra:
            refused = orjson.loads(read_line(extra))
            assert read_line(extra) == b""
        assert refused["ok"] is False
        assert refused["error"].startswith("too_many_connections: ")
        assert "raise maxConnections or reuse connections" in refused["error"]
        held[0].sendall(b'{"op":"status"}\n')
        status = orjson.loads(read_line(held[0]))
        assert status["socket"]["refusedConnections"] == 1
        assert status["socket"]["connections"] == 3
    finally:
        for s in held:
            s.close()
    wait_for(lambda: request(sock_path, {"op": "ping"}) == {"ok": True})
    assert daemon.stop() == 0


def test_health_after_a_clean_stop_says_not_running(root: Path) -> None:
    daemon = start_daemon(root)
    latest = Layout(root).health / "latest.json"
    wait_for(latest.exists)
    assert cli(root, "health").returncode == 0
    assert daemon.stop() == 0
    snapshot = orjson.loads(latest.read_bytes())
    assert snapshot["status"] == "stopped"
    assert snapshot["daemonHealth"]["isRunning"] is False
    proc = cli(root, "health")
    assert proc.returncode == 3, proc.stdout
    message = proc.stderr.decode()
    assert f"flowagg is not running on {root} (last snapshot at 20" in message
    assert len(message.strip().splitlines()) == 1


def test_health_after_kill_9_says_not_running(root: Path) -> None:
    daemon = start_daemon(root)
    latest = Layout(root).health / "latest.json"
    wait_for(latest.exists)
    daemon.kill()
    assert orjson.loads(latest.read_bytes())["status"] == "healthy"  # fresh, but its daemon is gone
    proc = cli(root, "health")
    assert proc.returncode == 3, proc.stdout
    assert b"flowagg is not running on" in proc.stderr


def test_sigterm_ends_a_recovery_pass_through_a_slow_sink_between_batches(
    root: Path, tmp_path: Path
) -> None:
    # Ten batches due and a 3 s sink: the pass once went on through all of them after SIGTERM.
    # The stop here waits 5 s for the buffered batch's delivery; the pass must not start a
    # second batch meanwhile.
    layout = Layout(root)
    layout.prepare()
    ids: list[str] = []
    for n in range(1, 11):
        batch_id = f"1704067200000_{n:012d}"
        entry_ids = [f"slow-{n}-{i}" for i in range(3)]
        entries = [orjson.dumps(entry(i, entryId=e)) for i, e in enumerate(entry_ids)]
        doc = orjson.loads(
            encode_batch(Batch(batch_id, "size", entries, n, n, entry_ids), timestamp_ms=1)
        )
        doc.update(retryCount=0, lastRetryAt=0, lastError="x", failedAt=n, nextRetryAt=0)
        (layout.recovery / f"{batch_id}.failed.json").write_bytes(orjson.dumps(doc))
        ids += entry_ids
    calls = tmp_path / "calls"
    sink = tmp_path / "slow_sink.py"
    sink.write_text(
        "import sys, time\n"
        "recovered = b'\"recovered\":true' in sys.stdin.buffer.read()\n"
        f"with open({str(calls)!r}, 'a') as log:\n"
        "    log.write('recovered\\n' if recovered else 'fresh\\n')\n"
        "time.sleep(3 if recovered else 5)\n"
    )
    stop_ms = 10_000
    settings = {
        "sinkType": "command",
        "sinkCommand": f"{sys.executable} {sink}",
        "sinkTimeoutMs": 60_000,
        "shutdownTimeoutMs": stop_ms,
        "scheduleIntervalMs": 3_600_000,
        "maxAgeMs": 3_600_000,
    }
    daemon = start_daemon(root, settings)
    daemon_ps = psutil.Process(daemon.proc.pid)
    wait_for(lambda: calls.exists() and calls.read_text() == "recovered\n")
    fresh = ["fresh-1", "fresh-2"]
    reply = request(
        daemon.layout.socket,
        {"op": "add", "entries": [entry(i, entryId=e) for i, e in enumerate(fresh)]},
    )
    assert reply["accepted"] == 2
    sinks = [c.pid for c in daemon_ps.children(recursive=True)]
    with reaped(sinks):
        started = time.monotonic()
        daemon.send(signal.SIGTERM)
        code = daemon.proc.wait(stop_ms / 1000 + MARGIN_S + 30)
        elapsed = time.monotonic() - started
    assert code == 0, daemon.log()
    assert elapsed < stop_ms / 1000 + MARGIN_S, (elapsed, daemon.log())
    assert calls.read_text().splitlines().count("recovered") == 1, calls.read_text()
    assert "recovery pass stopped early" in (layout.logs / "recovery.log").read_text()
    assert stored_id_counts(root) == dict.fromkeys(ids + fresh, 1)
