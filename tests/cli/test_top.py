"""`flowagg top` driven in tmux as a person would, and `flowagg diagnostics` live and offline."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from tests.harness import clean_env, cli, entry, request, start_daemon
from tests.readfixture import Root, make_entry

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
DEADLINE_S = 30.0


class Tmux:
    """One private tmux server (its own socket in the test's tmp dir), one window."""

    def __init__(self, tmp: Path, command: list[str]) -> None:
        self.sock = tmp / "tmux.sock"
        # The shell stays after the command to show its exit code on the screen.
        shell = f'{shlex.join(command)}; echo "top exited with $?"; sleep 600'
        self.run("new-session", "-d", "-s", "t", "-x", "110", "-y", "30", shell)

    def run(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", str(self.sock), *args],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=10,
            check=True,
        )
        return done.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    def kill(self) -> None:
        subprocess.run(
            ["tmux", "-S", str(self.sock), "kill-server"], capture_output=True, check=False
        )


def poll(what: str, check: Callable[[], object]) -> object:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def accepted_total(screen: str) -> int | None:
    match = re.search(r"accepted\s+[\d,]+/s\s+\(total ([\d,]+)\)", screen)
    return int(match.group(1).replace(",", "")) if match else None


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[Path, threading.Event]]:
    root = tmp_path / "root"
    daemon = start_daemon(root, {"batchSize": 20})
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            reply = request(daemon.layout.socket, {"op": "add", "entries": [entry(i)]})
            assert reply.get("ok"), reply
            i += 1
            stop.wait(0.02)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield root, stop
    finally:
        stop.set()
        thread.join(10)
        daemon.stop()


def test_top_in_tmux_shows_counters_moving_and_q_quits(
    tmp_path: Path, writer: tuple[Path, threading.Event]
) -> None:
    root, _ = writer
    tmux = Tmux(tmp_path, [sys.executable, "-m", "flowagg", "--root", str(root), "top"])
    try:
        first = poll("a frame with a rate", lambda: accepted_total(tmux.screen()))
        screen = tmux.screen()
        for label in ("stored", "buffer", "journal syncs", "add latency", "flush latency"):
            assert label in screen, screen
        for label in ("failed", "abandoned", "breaker", "health", "q quits"):
            assert label in screen, screen
        poll(
            "the accepted total to grow",
            lambda: (accepted_total(tmux.screen()) or 0) > first,  # type: ignore[operator]
        )
        poll("a non-zero accepted rate", lambda: re.search(r"accepted\s+[1-9]", tmux.screen()))
        tmux.run("send-keys", "-t", "t", "q")
        exited = poll("top to exit", lambda: re.search(r"top exited with (\d+)", tmux.screen()))
        assert exited.group(1) == "0", tmux.screen()  # type: ignore[union-attr]
    finally:
        tmux.kill()


def test_top_piped_prints_one_plain_frame(writer: tuple[Path, threading.Event]) -> None:
    root, _ = writer
    result = cli(root, "top", "--interval", "0.5")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "\x1b[" not in text
    assert re.search(r"^accepted\s+[\d,]+/s", text, re.MULTILINE), text


def test_top_without_a_daemon_exits_3(tmp_path: Path) -> None:
    result = cli(tmp_path, "top")
    assert result.returncode == 3
    assert b"start it with `flowagg run`" in result.stderr


def test_diagnostics_from_the_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = Root(root)
    r.batch([make_entry(i) for i in range(10)])
    r.batch([make_entry(i) for i in range(10, 15)], kind="failed")
    r.waiting([make_entry(i) for i in range(15, 18)])
    r.write_journal()
    (r.layout.logs / "aggregation.log").write_text(
        "2024-01-01 00:00:00,000 INFO flowagg: started\n"
        "2024-01-01 00:00:01,000 ERROR flowagg.delivery.flusher: batch 1 failed: disk full\n"
    )
    result = cli(root, "diagnostics", "--json")
    assert result.returncode == 0, result.stderr
    doc = orjson.loads(result.stdout)
    assert doc["source"] == "files"
    assert doc["queue"]["failed"] == 1 and doc["queue"]["buffered"] == 3
    assert doc["journal"]["waitingEntries"] == 3 and doc["journal"]["segments"] == 1
    assert doc["oldestPendingEntry"]["ageMs"] > 0
    assert doc["disk"]["aggregated"]["files"] == 1
    assert doc["recentErrors"] == [
        "2024-01-01 00:00:01,000 ERROR flowagg.delivery.flusher: batch 1 failed: disk full"
    ]
    text = cli(root, "diagnostics").stdout.decode()
    assert "no daemon runs" in text and "3 entries waiting" in text
    assert "ERROR flowagg.delivery.flusher: batch 1 failed" in text


def test_diagnostics_live(writer: tuple[Path, threading.Event]) -> None:
    root, _ = writer
    poll(
        "an add latency",
        lambda: orjson.loads(cli(root, "status", "--json").stdout)["latencyMs"]["addP50"],
    )
    result = cli(root, "diagnostics", "--json")
    assert result.returncode == 0, result.stderr
    doc = orjson.loads(result.stdout)
    assert doc["source"] == "daemon"
    assert set(doc["latencyMs"]) >= {"addP50", "addP95", "addP99", "flushP95"}
    assert doc["batches"]["successRate"] is not None
    assert doc["health"]["status"] in ("healthy", "degraded")
    text = cli(root, "diagnostics").stdout.decode()
    assert "(live)" in text and "add latency: p50" in text


def test_rich_is_not_loaded_by_add_or_the_daemon() -> None:
    code = (
        "import sys, flowagg.cli.main, flowagg.service.daemon;"
        " from click.testing import CliRunner;"
        " CliRunner().invoke(flowagg.cli.main.main, ['--root', '/nonexistent', 'add', '{}']);"
        " print(sorted(m for m in sys.modules if m.split('.')[0] == 'rich'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), check=True
    )
    assert done.stdout.strip() == "[]"
