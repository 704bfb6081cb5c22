"""Real daemon processes and CLI calls for integration tests (and scripts/torture)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil

from flowagg.batches.storage import iter_batch_files, read_batch
from flowagg.core.layout import Layout
from flowagg.service.ops import FLUSH_REPLY_WAIT_S

READY_TIMEOUT_S = 30.0
BASE_TS = 1_704_067_200_000


def flowagg_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flowagg", "--root", str(root), *args]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWAGG_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


def cli(
    root: Path, *args: str, input: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        flowagg_cmd(root, *args),
        input=input,
        capture_output=True,
        timeout=timeout,
        env=clean_env(),
        check=False,
    )


def ping(sock_path: Path, timeout: float = 2.0) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            s.sendall(b'{"op":"ping"}\n')
            return orjson.loads(s.makefile("rb").readline()).get("ok") is True
    except (OSError, ValueError):
        return False


def request(sock_path: Path, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(orjson.dumps(payload) + b"\n")
        reply: dict[str, Any] = orjson.loads(s.makefile("rb").readline())
        return reply


class DaemonProc:
    # Every daemon a test starts, so the suite can kill what a failing test left running.
    started: list[DaemonProc] = []

    def __init__(
        self,
        root: Path,
        settings: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        python: list[str] | None = None,
    ) -> None:
        """`python`: the command that stands for this interpreter (another account's, a
        sandbox wrapper); `-m flowagg ...` follows it."""
        self.root = root
        run_dir = (settings or {}).get("runDir")
        self.layout = Layout(root, Path(run_dir) if run_dir else None)
        args = ["run"]
        for key, value in (settings or {}).items():
            args += ["--set", f"{key}={value}"]
        self.log_path = log_path or root.parent / f"{root.name}-daemon.log"
        self._log = self.log_path.open("ab")
        command = flowagg_cmd(root, *args)
        if python is not None:
            command = [*python, *command[1:]]
        self.proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=clean_env(env),
        )
        DaemonProc.started.append(self)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> DaemonProc:
        """Ready within `timeout` of the last sign of progress, and within 10 times `timeout` in
        all: a start that replays a large backlog on a loaded machine keeps using CPU and is
        waited for; one that hangs (no CPU for `timeout`) fails."""
        started = time.monotonic()
        deadline = started + timeout
        spent = self._cpu_seconds()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            if ping(self.layout.socket, timeout=1.0):
                return self
            now = time.monotonic()
            if now >= deadline:
                progress = self._cpu_seconds()
                if progress - spent < 0.05 or now - started >= 10 * timeout:
                    break
                spent, deadline = progress, now + timeout
            # Short: the suite waits for hundreds of starts, and a ping with no socket yet
            # fails at once.
            time.sleep(0.005)
        raise TimeoutError(
            f"daemon not ready after {time.monotonic() - started:.0f} s: {self.log()}"
        )

    def _cpu_seconds(self) -> float:
        try:
            times = psutil.Process(self.proc.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(30)
        self._log.close()


def start_daemon(root: Path, settings: dict[str, Any] | None = None, **kw: Any) -> DaemonProc:
    return DaemonProc(root, settings, **kw).wait_ready()


def entry(i: int, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "userId": f"user{i % 7}",
        "action": "code_edit",
        "timestamp": BASE_TS + i,
        "metadata": {"taskId": f"t{i % 3}", "duration": i},
    }
    doc.update(extra)
    return doc


def stored_entries(root: Path) -> list[dict[str, Any]]:
    """Every entry in every stored batch file, each file verified (count and checksum)."""
    entries: list[dict[str, Any]] = []
    for path in iter_batch_files(Layout(root)):
        entries.extend(read_batch(path)["entries"])
    return entries


def stored_id_counts(root: Path) -> Counter[str]:
    return Counter(e["entryId"] for e in stored_entries(root))


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def flush_request(layout: Layout) -> dict[str, Any]:
    return request(layout.socket, {"op": "flush"}, timeout=FLUSH_REPLY_WAIT_S + 30)


def stored_files(layout: Layout) -> int:
    return len(iter_batch_files(layout))


def flush_all(
    layout: Layout,
    stall_s: float = 60.0,
    flush: Callable[[Layout], dict[str, Any]] = flush_request,
    stored: Callable[[Layout], int] = stored_files,
) -> None:
    """Flush until the daemon answers that every acknowledged entry is stored, however long
    that takes: --kills 1000 leaves tens of thousands buffered, more than one flush reply
    waits for. A "still running" answer is fine while batch files keep appearing; the wait
    fails once none appeared for `stall_s`, or on any other answer."""
    count = stored(layout)
    deadline = time.monotonic() + stall_s
    while True:
        reply = flush(layout)
        if reply.get("ok"):
            return
        assert "still running" in str(reply.get("error")), reply
        now = stored(layout)
        if now > count:
            count, deadline = now, time.monotonic() + stall_s
        elif time.monotonic() > deadline:
            raise TimeoutError(f"no batch file stored in {stall_s} s of flushing: {reply}")
