"""The daemon looks after its socket and its root on its own: a deleted socket comes back, and
cleanup runs at start (not first a day later)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import orjson

from flowagg.core.layout import Layout
from tests.harness import DaemonProc, cli, entry, ping, start_daemon, wait_for

QUIET = {"maxAgeMs": 3_600_000}


def test_a_deleted_socket_is_listened_on_again(root: Path, daemons: list[DaemonProc]) -> None:
    daemon = start_daemon(root, QUIET)
    daemons.append(daemon)
    sock = Layout(root).socket
    sock.unlink()
    # The loop checks every few seconds.
    wait_for(lambda: ping(sock, timeout=1.0), timeout=20)
    assert "was gone; listening on it again" in daemon.log()
    proc = cli(root, "add", orjson.dumps(entry(1)).decode())
    assert proc.returncode == 0, proc.stderr

    sock.unlink()
    daemon.send(signal.SIGHUP)  # at once, not at the next check
    wait_for(lambda: ping(sock, timeout=1.0), timeout=2.5)
    status = orjson.loads(cli(root, "status", "--json").stdout)
    assert status["socket"]["recreated"] == 2


def test_a_live_daemon_without_its_socket_is_named(root: Path) -> None:
    layout = Layout(root)
    layout.run.mkdir(parents=True)
    # A live process named by the pid file, and no socket.
    layout.pid_file.write_text(f"{os.getpid()}\n")
    for args in (["status"], ["flush"], ["add", orjson.dumps(entry(1)).decode()]):
        proc = cli(root, *args)
        message = proc.stderr.decode()
        assert proc.returncode == 3, message
        assert message.count("\n") == 1
        assert f"pid {os.getpid()} runs but its socket {layout.socket} is gone" in message
        assert "SIGHUP" in message


def test_cleanup_runs_at_start(root: Path, daemons: list[DaemonProc]) -> None:
    health = Layout(root).health
    health.mkdir(parents=True)
    old = health / "health-1000000000000.json"  # 2001: far past cleanupAgeMs
    old.write_text("{}")
    daemon = start_daemon(root, QUIET)
    daemons.append(daemon)
    wait_for(lambda: not old.exists(), timeout=10)
