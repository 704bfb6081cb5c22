"""The explorer's workloads: short runs of a real daemon, each a few hundred file-system calls.

Small batches (batchSize 3) so that several batches, runs and done records happen in each.
Two workloads may share one recording (`recording`): a start-up workload is a kill of its
twin's run at a directory fsync, then a second daemon on what the process saw.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowagg.core.layout import Layout
from flowagg.journal.format import SEGMENT_PREFIX, SEGMENT_SUFFIX, list_segments
from tests.crashmodel.check import ANONYMOUS_MARK, SINK_FAILS, SINK_HOLDS, short_run_dir
from tests.crashmodel.record import Driver, Step
from tests.harness import DaemonProc, entry, request, wait_for

BASE = {"batchSize": 3, "maxAgeMs": 3_600_000, "spoolRescanMs": 50}
# Directories whose unsynced names a start-up after a kill must cope with (SPEC §1.3, §4.2).
KILL_DIRS = ("aggregated", "inbox", "journal/spool")


def adds(*sizes: int, flush_after: tuple[int, ...] = ()) -> Step:
    def step(d: Driver) -> None:
        n = sum(len(r) for r in d.replies)
        for k, size in enumerate(sizes):
            d.add([entry(n + i, entryId=f"e{n + i}") for i in range(size)])
            n += size
            if k in flush_after:
                assert d.op("flush").get("ok")

    return step


def spool_files(count: int, size: int, anonymous_from: int) -> list[list[dict[str, Any]]]:
    """Spool files of `size` entries; those from `anonymous_from` on carry no entryId (a tool
    need not give one), only a mark in their metadata that the check knows them by."""

    def one(n: int, key: str, anonymous: bool) -> dict[str, Any]:
        if anonymous:
            return entry(n, metadata={ANONYMOUS_MARK: key})
        return entry(n, entryId=key)

    return [
        [one(100 + f * size + i, f"s{f}-{i}", f >= anonymous_from) for i in range(size)]
        for f in range(count)
    ]


def drained(d: Driver) -> None:
    """Every spool file taken in and stored, so that the trace holds the whole intake."""
    wait_for(lambda: not any(d.layout.inbox.glob("*.json*")), timeout=30)
    assert d.op("flush").get("ok")


def fail_sink(d: Driver) -> None:
    (d.work / SINK_FAILS).touch()


def heal_sink_and_recover(d: Driver) -> None:
    (d.work / SINK_FAILS).unlink()
    assert d.op("recover").get("ok")


def hold_sink(d: Driver) -> None:
    (d.work / SINK_HOLDS).touch()


def queue_a_run_with_a_manual_cut(d: Driver) -> None:
    """With the sink held on the first batch, queue a size, a manual and a size batch behind
    it: released, the three are delivered and then written as one run whose middle batch a
    re-cut by size would not reproduce."""
    adds(3, 3, 1)(d)
    flush = threading.Thread(target=request, args=(d.layout.socket, {"op": "flush"}))
    flush.start()
    # The flush waits for the held sink; its cut is made once nothing is left buffered.
    wait_for(lambda: d.op("status")["buffered"]["inMemory"] == 0, timeout=30)
    adds(3)(d)
    (d.work / SINK_HOLDS).unlink()
    flush.join(60)
    assert not flush.is_alive(), "the manual flush did not return after the sink was released"
    assert d.op("flush").get("ok")


def segments(journal: Path) -> list[str]:
    return sorted(p.name for p in journal.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))


def compacted(d: Driver) -> None:
    """Stored entries fill closed segments; wait until maintenance deletes one."""
    first = segments(d.layout.journal)[0]
    assert d.op("flush").get("ok")
    # Compaction trusts done records once durable: the next add's journal fsync makes them so.
    adds(1)(d)
    wait_for(lambda: first not in segments(d.layout.journal), timeout=30)


DAMAGED = {**BASE, "batchSize": 10}


def stored_then_damaged(root: Path) -> list[str]:
    """Before the recorded run, untraced: a0..a4 added by a run killed unflushed, a5..a9 by
    the next one, whose size cut stores a0..a9 as one batch; then the journal loses that
    run's records (adds, cut, done) to a torn tail. The stored batch is the only copy of
    a5..a9, and the survivors a0..a4 would be cut anew under its id. Returns the ids the
    runs had acknowledged."""
    ids = [f"a{i}" for i in range(10)]
    first = [entry(200 + i, entryId=key) for i, key in enumerate(ids)]
    with short_run_dir() as run_dir:
        settings = {**DAMAGED, "runDir": str(run_dir)}
        log = root.parent / "before.log"
        daemon = DaemonProc(root, settings, log_path=log).wait_ready()
        assert request(daemon.layout.socket, {"op": "add", "entries": first[:5]})["ok"]
        daemon.kill()
        [segment] = list_segments(Layout(root).journal)
        good = segment.stat().st_size
        daemon = DaemonProc(root, settings, log_path=log).wait_ready()
        assert request(daemon.layout.socket, {"op": "add", "entries": first[5:]})["ok"]
        assert daemon.stop() == 0
    with segment.open("r+b") as fh:
        fh.truncate(good)
        fh.seek(good)
        fh.write(b'deadbeef {"k":"a","q":')
    return ids


@dataclasses.dataclass
class Workload:
    name: str
    settings: dict[str, Any]
    steps: list[Step]
    spool: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)
    restart: bool = False  # two-level: kill at a directory fsync, start a second daemon
    recording: str = ""  # share the recording of this workload (same settings and steps)
    # Settings the daemon is started with on each crash state (an operator's change).
    check_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    maintenance_s: float | None = None  # run journal maintenance this often while recorded
    # On each crash state, once started, a client sends every id of the run again (their
    # answers lost to the crash): the dedupe index, committed only every so often, may have
    # lost them too, yet none may be stored twice.
    resend: bool = False
    # Run on the root before the recorded run (untraced); returns the ids it acknowledged.
    before: Callable[[Path], list[str]] | None = None
    in_ci: bool = True  # False: only `scripts/torture --crash-states` explores it

    @property
    def key(self) -> str:
        return self.recording or self.name


RUNS = [adds(2, 10, 2, 7, flush_after=(0, 1))]
SINK_RUN = {**BASE, "sinkType": "command", "flushWriters": 4}

WORKLOADS = [
    Workload("adds", BASE, [adds(4, 3, 5)]),
    Workload("resend", BASE, [], recording="adds", resend=True),
    Workload("manual", BASE, [adds(2, 1, 4, flush_after=(0, 1))]),
    # A run's batches set aside behind a lost one are cut again; with another batchSize a cut
    # that differs from what readers saw shows (SPEC §5: a batch id names one set forever).
    Workload("runs", {**BASE, "flushWriters": 4}, RUNS, check_settings={"batchSize": 4}),
    Workload("sink", {**BASE, "sinkType": "command"}, [adds(2, 5, 1, 4, flush_after=(0, 2))]),
    Workload("sink-run", SINK_RUN, [hold_sink, queue_a_run_with_a_manual_cut]),
    Workload("spool", BASE, [adds(1), drained], spool=spool_files(3, 2, anonymous_from=1)),
    Workload(
        "recovery",
        {**BASE, "sinkType": "command", "immediateRetries": 0},
        [fail_sink, adds(4, 1, flush_after=(1,)), heal_sink_and_recover],
    ),
    # Segments roll over, and maintenance deletes those whose entries are all stored.
    Workload(
        "compaction",
        {**BASE, "journalSegmentBytes": 4096, "dedupeWindowMs": 0},
        [adds(9, 9, 9, 9, 9), compacted],
        maintenance_s=0.2,
    ),
    # A damaged tail took a stored batch's cut: the batch must stay, with all it holds. Its
    # two daemon runs before the recording cost CI seconds it has not got; the same sequence
    # runs there in tests/system/test_crash_states.py.
    Workload(
        "damaged-tail",
        DAMAGED,
        [adds(5, 3, flush_after=(0,))],
        before=stored_then_damaged,
        in_ci=False,
    ),
    Workload("start-runs", {**BASE, "flushWriters": 4}, RUNS, restart=True, recording="runs"),
    Workload("start-spool", BASE, [], restart=True, recording="spool"),
    Workload("start-sink-run", SINK_RUN, [], restart=True, recording="sink-run"),
]
