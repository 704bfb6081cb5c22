"""systemd integration: sd_notify messages from a real daemon, and the unit file itself."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DaemonProc, start_daemon

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "flowagg.service"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def receive_until(sock: socket.socket, wanted: str, timeout: float = 20.0) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if any(wanted in m for m in messages):
            return messages
    raise TimeoutError(f"{wanted!r} not received; got {messages}")


def test_ready_watchdog_and_stopping(
    root: Path, tmp_path: Path, notify_socket: socket.socket, daemons: list[DaemonProc]
) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    daemon = start_daemon(root, {"healthCheckIntervalMs": 200}, env=env)
    daemons.append(daemon)
    first = receive_until(notify_socket, "READY=1")
    ready = next(m for m in first if "READY=1" in m)
    assert f"MAINPID={daemon.proc.pid}" in ready
    pings = [m for m in receive_until(notify_socket, "WATCHDOG=1") if m == "WATCHDOG=1"]
    while len(pings) < 3:
        pings += [m for m in receive_until(notify_socket, "WATCHDOG=1") if m == "WATCHDOG=1"]
    assert any(m.startswith("STATUS=") for m in receive_until(notify_socket, "STATUS=healthy"))
    daemon.send(signal.SIGHUP)
    assert "READY=1" in "".join(
        receive_until(notify_socket, "RELOADING=1") + receive_until(notify_socket, "READY=1")
    )
    daemon.send(signal.SIGTERM)
    receive_until(notify_socket, "STOPPING=1")
    assert daemon.proc.wait(30) == 0


def test_no_watchdog_pings_for_another_pid(
    root: Path, tmp_path: Path, notify_socket: socket.socket, daemons: list[DaemonProc]
) -> None:
    env = {
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "100000",
        "WATCHDOG_PID": "1",
    }
    daemon = start_daemon(root, env=env)
    daemons.append(daemon)
    messages = receive_until(notify_socket, "READY=1")
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            messages.append(notify_socket.recv(4096).decode())
    assert "WATCHDOG=1" not in messages


def test_unit_file_has_the_required_settings() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "StateDirectory=flowagg",
        "User=flowagg",
        "ProtectSystem=strict",
        "ProtectHome=true",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "WatchdogSec=",
        "TimeoutStopSec=",
        "Environment=FLOWAGG_ROOT=/var/lib/flowagg",
    ):
        assert line in text, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this interpreter for the check.
    unit = tmp_path / "flowagg.service"
    unit.write_text(
        UNIT.read_text().replace(
            "ExecStart=/opt/flowagg/venv/bin/flowagg run",
            f"ExecStart={sys.executable} -m flowagg run",
        )
    )
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    problems = [line for line in proc.stderr.splitlines() if "flowagg.service" in line]
    assert problems == [], proc.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_the_sandbox_rates_at_most_2_0(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for flowagg\.service: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout
    text = UNIT.read_text()
    for line in (
        "CapabilityBoundingSet=\n",
        "SystemCallFilter=@system-service",
        "SystemCallArchitectures=native",
        "RestrictNamespaces=true",
        "MemoryDenyWriteExecute=true",
        "ProtectProc=invisible",
    ):
        assert line in text, line
