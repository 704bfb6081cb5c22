"""Runs of batch files (flowagg/batches/batch_runs.py): written side by side, published in order.

The flusher takes every batch queued behind the first and writes their temp files in
parallel; the renames stay in batch order and each group of renamed files gets one
directory fsync before any of them counts as stored. These tests break each step of a run
at one batch in its middle, then kill a real daemon while runs are in flight.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.batches import batch_runs
from flowagg.batches.batch_runs import MAX_RUN
from flowagg.batches.storage import (
    Batch,
    CompletedFiles,
    find_completed,
    iter_batch_files,
    read_batch,
)
from flowagg.core import fsutil
from flowagg.core.clock import FakeClock
from flowagg.core.errors import TransientError
from flowagg.core.fsutil import TEMP_MARK
from flowagg.core.layout import Layout
from flowagg.delivery.flusher import Flusher, Stored
from flowagg.delivery.sink import CircuitBreaker, Completer, GuardedSink
from tests.faults import FaultInjector
from tests.harness import DaemonProc, entry, flush_all, request, stored_id_counts, wait_for

WAIT_S = 20.0
RUN = 40


@pytest.fixture
def writers(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The names of the threads that write batch files' temp copies."""
    names: set[str] = set()
    real = batch_runs.write_temp

    def recording(path: Path, data: bytes) -> Path:
        names.add(threading.current_thread().name)
        return real(path, data)

    monkeypatch.setattr(batch_runs, "write_temp", recording)
    return names


def make_batches(count: int, per_batch: int = 3) -> list[Batch]:
    batches = []
    for b in range(count):
        first = b * per_batch + 1
        ids = [f"e{first + i}" for i in range(per_batch)]
        entries = [orjson.dumps({"userId": "u", "entryId": i}) for i in ids]
        batch_id = f"{1_000 + b:013d}_{first:012d}"
        batches.append(Batch(batch_id, "size", entries, first, first + per_batch - 1, ids))
    return batches


class Run:
    """A flusher with the daemon's completer, fed a whole run before it starts."""

    def __init__(
        self,
        layout: Layout,
        *,
        immediate_retries: int = 0,
        compression: str = "none",
        sink: GuardedSink | None = None,
    ) -> None:
        self.layout = layout
        self.files = CompletedFiles(layout, compression)
        self.reports: list[list[str]] = []
        self._done = threading.Condition()
        self.flusher = Flusher(
            layout,
            FakeClock(now_ms=5_000),
            immediate_retries=immediate_retries,
            next_retry_at=lambda now: now + 1000,
            store=Completer(self.files.write, lambda: sink, files=self.files),
            on_stored=self._on_stored,
            sleep=lambda seconds: False,
        )

    def _on_stored(self, items: list[Stored]) -> None:
        with self._done:
            self.reports.append([batch.batch_id for batch, _, _ in items])
            self._done.notify_all()

    def stored_ids(self) -> list[str]:
        return [batch_id for report in self.reports for batch_id in report]

    def store(self, batches: list[Batch]) -> None:
        for batch in batches:
            self.flusher.submit(batch)
        self.flusher.start()
        with self._done:
            assert self._done.wait_for(lambda: len(self.stored_ids()) == len(batches), WAIT_S)
        assert self.flusher.stop(give_up=True, timeout=WAIT_S)


def where(layout: Layout) -> dict[str, str]:
    """entryId -> folder of the one batch file holding it; fails on a duplicate."""
    found: dict[str, str] = {}
    for path in iter_batch_files(layout):
        for e in read_batch(path)["entries"]:
            assert e["entryId"] not in found, f"{e['entryId']} stored twice"
            found[e["entryId"]] = path.parent.name
    return found


def no_temp_files(layout: Layout) -> bool:
    return not [p for p in layout.root.rglob(f"{TEMP_MARK}*")]


def test_a_run_is_written_side_by_side_and_stored_in_order(
    layout: Layout, writers: set[str]
) -> None:
    batches = make_batches(RUN)
    run = Run(layout)
    run.store(batches)
    assert run.stored_ids() == [b.batch_id for b in batches]
    assert sorted(p.name for p in layout.aggregated.iterdir()) == sorted(
        CompletedFiles(layout).path(b.batch_id).name for b in batches
    )
    assert set(where(layout).values()) == {"aggregated"}
    assert len(where(layout)) == RUN * 3
    assert {w for w in writers if w.startswith("flusher-stage-")}, writers
    assert no_temp_files(layout)


def test_every_report_comes_after_the_directory_fsync_of_its_renames(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_rename, real_fsync_dir = os.rename, fsutil.fsync_dir

    def rename(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        real_rename(src, dst, *a, **kw)
        with lock:
            events.append(("rename", Path(dst).name))

    def fsync_dir(path: Path) -> None:
        real_fsync_dir(path)
        with lock:
            events.append(("fsync_dir", path.name))

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr("flowagg.delivery.flush_runs.fsync_dir", fsync_dir)
    batches = make_batches(RUN)
    run = Run(layout)
    original = run._on_stored

    def on_stored(items: list[Stored]) -> None:
        with lock:
            events.extend(("stored", path.name) for _, path, _ in items)
        original(items)

    run.flusher._on_stored = on_stored
    run.store(batches)
    renamed: list[str] = []
    pending: set[str] = set()
    for op, name in events:
        if op == "rename":
            renamed.append(name)
            pending.add(name)
        elif op == "fsync_dir":
            pending.clear()
        else:
            assert name not in pending, f"{name} reported stored before its directory fsync"
    expected = [CompletedFiles(layout).path(b.batch_id).name for b in batches]
    assert renamed == expected, "renames keep batch order"


@pytest.mark.parametrize(
    ("fault", "code"),
    [("temp write", errno.ENOSPC), ("create", errno.EACCES), ("rename", errno.EROFS)],
)
@pytest.mark.parametrize("persistent", [False, True])
def test_a_fault_in_the_middle_of_a_run(
    layout: Layout,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    code: int,
    persistent: bool,
) -> None:
    faults = FaultInjector(monkeypatch)
    batches = make_batches(RUN)
    victim = batches[RUN // 2].batch_id
    aggregated = str(layout.aggregated) + os.sep

    def site(path: str) -> bool:
        if fault == "rename":
            return path.endswith(f"batch_{victim}.json")
        return path.startswith(aggregated) and TEMP_MARK in path and victim in path

    heal = faults.breaks(site, code)
    run = Run(layout, immediate_retries=1)
    if not persistent:

        def sleep(seconds: float) -> bool:
            heal()  # the victim's first failure took it to the one-at-a-time path
            run.flusher._sleep = lambda seconds: False
            return False

        run.flusher._sleep = sleep
    run.store(batches)
    assert faults.hits >= 1
    assert run.stored_ids() == [b.batch_id for b in batches], "order survives the fault"
    found = where(layout)
    assert len(found) == RUN * 3, "every entry exactly once"
    victim_folder = {found[i] for i in batches[RUN // 2].entry_ids}
    assert victim_folder == ({"recovery"} if persistent else {"aggregated"})
    others = {found[i] for b in batches if b.batch_id != victim for i in b.entry_ids}
    assert others == {"aggregated"}
    assert no_temp_files(layout)


def test_a_failed_directory_fsync_writes_the_run_again(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = FaultInjector(monkeypatch)
    real = fsutil.fsync_dir
    calls: list[Path] = []

    def fsync_dir(path: Path) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error", str(path))
        real(path)

    monkeypatch.setattr("flowagg.delivery.flush_runs.fsync_dir", fsync_dir)
    batches = make_batches(RUN)
    run = Run(layout)
    run.store(batches)
    assert faults.hits == 0 and calls, "the run's directory fsync failed once"
    assert run.stored_ids() == [b.batch_id for b in batches]
    found = where(layout)
    assert len(found) == RUN * 3 and set(found.values()) == {"aggregated"}
    assert no_temp_files(layout)


def test_a_run_is_bounded(layout: Layout) -> None:
    batches = make_batches(MAX_RUN * 2 + 5, per_batch=1)
    run = Run(layout)
    run.store(batches)
    assert max(len(r) for r in run.reports) <= MAX_RUN
    assert run.stored_ids() == [b.batch_id for b in batches]


def test_killing_a_daemon_while_runs_are_written(tmp_path: Path) -> None:
    """SIGKILL while batch files are being written in runs; then every entry exactly once."""
    rng = random.Random(15)
    root = tmp_path / "data"
    settings = {"batchSize": 3, "maxAgeMs": 60_000, "memoryWindowEntries": 5000}
    acked: set[str] = set()
    n = 0
    for _ in range(4):
        daemon = DaemonProc(root, settings).wait_ready()
        entries = []
        for _ in range(3000):
            n += 1
            entries.append(entry(n, entryId=f"k{n}"))
        reply = request(daemon.layout.socket, {"op": "add", "entries": entries})
        assert reply["ok"] and reply["accepted"] + reply.get("duplicates", 0) == 3000, reply
        acked.update(e["entryId"] for e in entries)
        before = len(list(daemon.layout.aggregated.iterdir()))
        target = before + rng.randint(20, 400)
        folder = daemon.layout.aggregated
        wait_for(lambda f=folder, t=target: len(list(f.iterdir())) >= t, WAIT_S, 0.001)
        daemon.send(signal.SIGKILL)
        daemon.kill()
    daemon = DaemonProc(root, settings).wait_ready()
    try:
        flush_all(daemon.layout)  # thousands of 3-entry batches: longer than one reply waits
    finally:
        assert daemon.stop() == 0
    counts = stored_id_counts(root)
    assert set(counts) == acked
    assert [i for i, c in counts.items() if c > 1] == []


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_a_compressed_run(layout: Layout, compression: str) -> None:
    batches = make_batches(RUN)
    run = Run(layout, compression=compression)
    run.store(batches)
    assert run.stored_ids() == [b.batch_id for b in batches]
    for batch in batches:
        path = find_completed(layout, batch.batch_id)
        assert path is not None and path == run.files.path(batch.batch_id)
        assert [e["entryId"] for e in read_batch(path)["entries"]] == batch.entry_ids
    assert no_temp_files(layout)


class RecordingSink:
    """Accepts every batch but those in `refuse` (a 503-like transient failure)."""

    name = "recording"

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.refuse = refuse or set()
        self.lock = threading.Lock()

    def deliver(self, batch_id: str, data: bytes) -> None:
        with self.lock:
            self.calls.append(batch_id)
        assert orjson.loads(data)["batchId"] == batch_id
        if batch_id in self.refuse:
            raise TransientError(f"HTTP 503 for {batch_id}")


def guarded(sink: RecordingSink) -> GuardedSink:
    return GuardedSink(sink, CircuitBreaker(1000, 30.0, FakeClock()))  # type: ignore[arg-type]


def test_with_a_sink_a_run_is_delivered_in_order_then_written_as_a_run(
    layout: Layout, writers: set[str]
) -> None:
    sink = RecordingSink()
    batches = make_batches(RUN)
    run = Run(layout, sink=guarded(sink))
    run.store(batches)
    assert sink.calls == [b.batch_id for b in batches], "each delivered once, in order"
    assert run.stored_ids() == [b.batch_id for b in batches]
    assert set(where(layout).values()) == {"aggregated"} and len(where(layout)) == RUN * 3
    assert {w for w in writers if w.startswith("flusher-stage-")}, writers


def test_with_a_sink_a_refused_batch_is_parked_and_the_rest_still_flow(layout: Layout) -> None:
    batches = make_batches(RUN)
    victim = batches[RUN // 2].batch_id
    sink = RecordingSink(refuse={victim})
    run = Run(layout, immediate_retries=2, sink=guarded(sink))
    run.store(batches)
    assert sink.calls.count(victim) == 3, "the first attempt and 2 inline retries, no more"
    assert [c for c in sink.calls if c != victim] == [
        b.batch_id for b in batches if b.batch_id != victim
    ]
    assert run.stored_ids() == [b.batch_id for b in batches], "order survives the refusal"
    found = where(layout)
    assert len(found) == RUN * 3
    victim_ids = set(batches[RUN // 2].entry_ids)
    assert {found[i] for i in victim_ids} == {"recovery"}
    assert {f for i, f in found.items() if i not in victim_ids} == {"aggregated"}


def test_with_a_sink_an_accepted_batch_whose_write_fails_is_only_written_again(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = FaultInjector(monkeypatch)
    batches = make_batches(RUN)
    victim = batches[3].batch_id
    aggregated = str(layout.aggregated) + os.sep
    faults.breaks(lambda p: p.startswith(aggregated) and victim in p, errno.ENOSPC)
    sink = RecordingSink()
    run = Run(layout, immediate_retries=1, sink=guarded(sink))
    run.store(batches)
    assert sink.calls == [b.batch_id for b in batches], "never sent twice for a local failure"
    assert run.stored_ids() == [b.batch_id for b in batches]
    [parked] = layout.recovery.glob("*.failed.json")
    doc = orjson.loads(parked.read_bytes())
    assert doc["batchId"] == victim and "sinkAcceptedAt" in doc
    assert len(where(layout)) == RUN * 3
    assert no_temp_files(layout)
