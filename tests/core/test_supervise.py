"""Threads never die silently: supervision, the flusher's catch-all, the outcomes lock."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.batches.storage import Batch
from flowagg.core.clock import FakeClock
from flowagg.core.layout import Layout
from flowagg.core.supervise import EX_SOFTWARE, Deadline, Supervisor
from flowagg.delivery.flusher import Flusher, Outcomes, Stored
from flowagg.journal.public import JournalWriter
from tests.harness import clean_env, cli, entry, wait_for

BATCH_ID = "1704067200000_000000000001"


def test_a_thread_that_raises_is_recorded_and_reported() -> None:
    supervisor = Supervisor()
    told: list[str] = []
    supervisor.on_death(told.append)

    def boom() -> None:
        raise RuntimeError("injected")

    thread = supervisor.spawn("worker", boom)
    assert thread.daemon
    thread.start()
    thread.join(5)
    assert told == ["worker"]
    assert supervisor.deaths == [("worker", "RuntimeError: injected")]
    assert "thread worker died (RuntimeError: injected)" in supervisor.issues()[0]


def test_a_thread_that_returns_early_is_a_death_but_not_once_stopping() -> None:
    supervisor = Supervisor()
    early = supervisor.spawn("early", lambda: None)
    early.start()
    early.join(5)
    assert [name for name, _ in supervisor.deaths] == ["early"]
    supervisor.stopping = True
    late = supervisor.spawn("late", lambda: None)
    late.start()
    late.join(5)
    assert [name for name, _ in supervisor.deaths] == ["early"]


def test_deadline_shares_never_pass_the_end() -> None:
    now = [100.0]
    deadline = Deadline(10.0, lambda: now[0])
    assert deadline.share(0.1) == pytest.approx(1.0)
    assert deadline.share(0.5, cap_s=2.0) == pytest.approx(2.0)
    now[0] += 8.5  # 0.5 s left of the 9 s the phases may use
    assert deadline.share(0.2) == pytest.approx(0.5)
    now[0] += 1
    assert deadline.remaining() == 0.0 and deadline.share(0.1) == 0.0


def test_outcomes_read_while_another_thread_records() -> None:
    """Health reads the success rate on the loop while the flusher records results."""
    outcomes = Outcomes(maxlen=500)
    stop = threading.Event()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def hammer() -> None:
        while not stop.is_set():
            outcomes.record(time.monotonic(), True)
            outcomes.record(time.monotonic(), False, count=3)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        for _ in range(3000):
            assert 0.0 <= outcomes.success_rate(0.0) <= 1.0
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
    assert outcomes.success_rate(time.monotonic() + 60) == 1.0  # nothing that recent


def _batch(n: int = 2, first: int = 1) -> Batch:
    seqs = range(first, first + n)
    entries = [orjson.dumps(entry(i, entryId=f"e{i}")) for i in seqs]
    batch_id = f"1704067200000_{first:012d}"
    return Batch(batch_id, "manual", entries, first, first + n - 1, [f"e{i}" for i in seqs])


def test_flusher_parks_a_batch_whose_store_raises_anything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout = Layout(tmp_path / "data")
    layout.prepare()
    stored: list[Path] = []
    done = threading.Semaphore(0)

    def store(batch_id: str, data: bytes) -> Path:
        raise ValueError("Invalid IPv6 URL")

    def on_stored(items: list[Stored]) -> None:
        stored.extend(path for _, path, _ in items)
        done.release()

    flusher = Flusher(
        layout,
        FakeClock(),
        immediate_retries=1,
        next_retry_at=lambda now: now + 1000,
        store=store,
        on_stored=on_stored,
        sleep=lambda s: False,
    )
    flusher.start()
    with caplog.at_level(logging.ERROR, logger="flowagg.flusher"):
        flusher.submit(_batch())
        assert done.acquire(timeout=10)
        # Another batch: the same one again would be found parked already, and not stored.
        flusher.submit(_batch(first=3))
        assert done.acquire(timeout=10)
    assert flusher.stop(give_up=True, timeout=10)
    second = "1704067200000_000000000003"
    assert stored == [layout.recovery / f"{b}.failed.json" for b in (BATCH_ID, second)]
    parked = orjson.loads(stored[0].read_bytes())
    assert parked["lastError"] == "ValueError: Invalid IPv6 URL" and parked["entryCount"] == 2
    assert flusher.parking.unexpected_errors == 2
    assert sum(1 for r in caplog.records if r.exc_info) == 1  # the traceback once


def test_http_sink_with_a_malformed_url_is_refused_at_start(root: Path) -> None:
    # It once raised ValueError inside the flusher, outside its try, and the thread died; the
    # URL is now checked with the config, and the flusher survives the unforeseen (see above).
    proc = cli(root, "run", "--set", "sinkType=http", "--set", "sinkUrl=http://[::1/")
    assert proc.returncode == 2
    assert proc.stderr.decode().count("\n") == 1 and b"sinkUrl" in proc.stderr


KILL_FLUSHER = """
import sys
import flowagg.delivery.flusher

def broken_run(self):
    raise RuntimeError("injected flusher fault")

flowagg.delivery.flusher.Flusher._run = broken_run
from flowagg.cli.main import main
main(sys.argv[1:])
"""


def test_a_dead_flusher_makes_the_daemon_exit_70_with_critical_health(root: Path) -> None:
    log_path = root.parent / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_FLUSHER, "--root", str(root), "run"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
        try:
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert code == EX_SOFTWARE, text
    assert "thread flusher died" in text and "injected flusher fault" in text
    snapshot = orjson.loads((Layout(root).health / "latest.json").read_bytes())
    assert snapshot["status"] == "critical"
    assert snapshot["daemonHealth"]["isRunning"] is False
    assert any("thread flusher died" in issue for issue in snapshot["issues"])
    assert not Layout(root).pid_file.exists()
    wait_for(lambda: not os.path.exists(Layout(root).socket))


def test_a_broken_journal_writer_is_a_death(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer fails its waiters and ends; under supervision that ending is reported."""
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir()
    supervisor = Supervisor()
    died = threading.Event()
    supervisor.on_death(lambda name: died.set())
    results: list[BaseException | None] = []
    writer = JournalWriter(
        journal_dir,
        segments=[],
        next_seq=1,
        segment_bytes=1 << 20,
        deliver=lambda items: results.extend(error for _, error, _ in items),
        spawn=supervisor.spawn,
    )

    def corrupt(self: JournalWriter, group: list[Any]) -> None:
        raise RuntimeError("injected journal bug")

    monkeypatch.setattr(JournalWriter, "_commit", corrupt)
    writer.start()
    writer.append_entries([b"{}"], 1, [], None, lambda error, pos: None)
    assert died.wait(10)
    assert [name for name, _ in supervisor.deaths] == ["journal-writer"]
    assert results and isinstance(results[0], OSError)  # the waiter was answered, not left
    supervisor.stopping = True
    assert writer.stop(timeout=10)
