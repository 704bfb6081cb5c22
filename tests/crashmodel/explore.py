"""The workloads, and the loop that checks every crash state of each.

`explore(work, budget)` records each workload, enumerates its distinct crash states and
checks up to `budget` of them per workload (None: all), spread over the crash points. The
start-up workloads are two-level: the daemon of a first run is taken as killed just before
one of its directory fsyncs (the process-visible state, page cache and all), a second
daemon starts on that state under strace, and the crash states of that second run may still
lose what the first had not made durable and the second never fsynced.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowagg.layout import Layout
from tests.crashmodel.check import Verdict, acked_ids, check_state
from tests.crashmodel.model import Barrier, Fs, Op, materialize
from tests.crashmodel.record import Driver, Recording, Step, record, traced_run
from tests.crashmodel.resolve import Resolver
from tests.crashmodel.states import Choice, Found, build, crash_points, distinct_states
from tests.crashmodel.strace import parse
from tests.harness import entry

BASE = {"batchSize": 3, "maxAgeMs": 3_600_000, "spoolRescanMs": 50}


def adds(*sizes: int, flush_after: tuple[int, ...] = ()) -> Step:
    def step(d: Driver) -> None:
        n = sum(len(r) for r in d.replies)
        for k, size in enumerate(sizes):
            d.add([entry(n + i, entryId=f"e{n + i}") for i in range(size)])
            n += size
            if k in flush_after:
                assert d.op("flush").get("ok")

    return step


def spool_files(count: int, size: int) -> list[list[dict[str, Any]]]:
    return [
        [entry(100 + f * size + i, entryId=f"s{f}-{i}") for i in range(size)] for f in range(count)
    ]


def fail_sink(d: Driver) -> None:
    (d.work / "sink-fails").touch()


def heal_sink_and_recover(d: Driver) -> None:
    (d.work / "sink-fails").unlink()
    assert d.op("recover").get("ok")


@dataclasses.dataclass
class Workload:
    name: str
    settings: dict[str, Any]
    steps: list[Step]
    spool: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)
    restart: bool = False  # two-level: kill at a directory fsync, start a second daemon


WORKLOADS = [
    Workload("adds", BASE, [adds(4, 3, 5)]),
    Workload("manual", BASE, [adds(2, 1, 4, flush_after=(0, 1))]),
    Workload("runs", {**BASE, "flushWriters": 4}, [adds(2, 10, 2, 7, flush_after=(0, 1))]),
    Workload("sink", {**BASE, "sinkType": "command"}, [adds(2, 5, 1, 4, flush_after=(0, 2))]),
    Workload("spool", BASE, [adds(1)], spool=spool_files(3, 2)),
    Workload(
        "recovery",
        {**BASE, "sinkType": "command", "immediateRetries": 0},
        [fail_sink, adds(4, 1, flush_after=(1,)), heal_sink_and_recover],
    ),
    Workload("rollover", {**BASE, "journalSegmentBytes": 4096}, [adds(9, 9, 9, 9, 9)]),
    Workload(
        "start-runs",
        {**BASE, "flushWriters": 4},
        [adds(2, 10, 2, 7, flush_after=(0, 1))],
        restart=True,
    ),
    Workload("start-spool", BASE, [adds(1)], spool=spool_files(3, 2), restart=True),
]


@dataclasses.dataclass
class Finding:
    workload: str
    where: str
    verdict: Verdict


@dataclasses.dataclass
class Summary:
    workload: str
    subsets: int = 0
    distinct: int = 0
    checked: int = 0
    findings: list[Finding] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        counts = {"lost": 0, "duplicated": 0, "two_ids": 0, "two_contents": 0, "blocked": 0}
        for f in self.findings:
            for key in counts:
                counts[key] += bool(getattr(f.verdict, key))
        bad = ", ".join(f"{k} {v}" for k, v in counts.items())
        return (
            f"{self.workload}: {self.subsets} subsets, {self.distinct} distinct states,"
            f" {self.checked} checked; states with {bad}"
        )


def spread(found: list[Found], budget: int | None, seed: int, first: int = 0) -> list[Found]:
    """Up to `budget` states, taken round robin over the crash points (systematic first);
    those that lose an operation before index `first` (the killed run's) come first."""
    if budget is None or len(found) <= budget:
        return found
    by_point: dict[int, list[Found]] = {}
    # Out-of-order losses first: ordered ones are what the kill-based tests already reach.
    for f in sorted(
        found, key=lambda f: (min(f.choice.dropped, default=first) >= first, not f.reordered)
    ):
        by_point.setdefault(f.choice.point, []).append(f)
    queues = list(by_point.values())
    random.Random(seed).shuffle(queues)
    picked: list[Found] = []
    while len(picked) < budget:
        for q in queues:
            if q and len(picked) < budget:
                picked.append(q.pop(0))
    return picked


def check_all(
    work: Path,
    summary: Summary,
    rec: Recording,
    ops: list[Op],
    points: list[int],
    settings: dict[str, Any],
    budget: int | None,
    log: Callable[[str], None],
    label: str = "",
    first: int = 0,
) -> None:
    subsets, found = distinct_states(Fs.from_state(rec.base), ops, points)
    summary.subsets += subsets
    summary.distinct += len(found)
    for f in spread(found, budget, len(found), first):
        case = work / f"state-{summary.checked}"
        summary.checked += 1
        acked = acked_ids(rec.replies, f.replies, rec.upfront)
        verdict = check_state(case, f.state, f.external, acked, settings)
        if verdict.ok:
            shutil.rmtree(case, ignore_errors=True)
            continue
        where = f"{label}{f.choice.describe(ops)} (kept in {case})"
        summary.findings.append(Finding(summary.workload, where, verdict))
        log(f"  {summary.workload}: {verdict.summary()} at {where}")


def kill_points(ops: list[Op]) -> list[int]:
    """Just before each directory fsync: names are visible there, not yet durable."""
    return [i for i, op in enumerate(ops) if isinstance(op, Barrier) and op.is_dir]


def explore_one(work: Path, w: Workload, budget: int | None, log: Callable[[str], None]) -> Summary:
    summary = Summary(w.name)
    rec, settings = record(work / "record", w.settings, w.steps, w.spool)
    if not w.restart:
        check_all(work, summary, rec, rec.ops, crash_points(rec.ops), settings, budget, log)
        return summary
    kills = kill_points(rec.ops)
    if budget is not None:
        kills = kills[:: max(1, len(kills) // 4)][:4]
    per_kill = None if budget is None else max(1, budget // max(1, len(kills)))
    for k in kills:
        base = Fs.from_state(rec.base)
        visible = build(base, rec.ops, Choice(k, frozenset()))
        second = work / f"kill-{k}"
        layout = Layout(second / "data", second / "run")
        materialize(visible, layout.root)
        layout.run.mkdir(parents=True)
        phase2 = {**settings, "runDir": str(layout.run)}
        text, _ = traced_run(second, layout, phase2, [])
        fs = Fs.from_state(rec.base)
        for op in rec.ops[:k]:
            fs.apply(op)
        more = Resolver(fs, layout.root).feed(parse(text))
        ops = rec.ops[:k] + more
        points = [p for p in crash_points(ops) if p > k]
        label = f"killed before op {k}, restarted, "
        check_all(work, summary, rec, ops, points, settings, per_kill, log, label, k)
    return summary


def explore(
    work: Path,
    budget: int | None,
    log: Callable[[str], None] = lambda _msg: None,
    names: list[str] | None = None,
) -> list[Summary]:
    summaries = []
    for w in WORKLOADS:
        if names is None or w.name in names:
            summary = explore_one(work / w.name, w, budget, log)
            log(summary.line())
            summaries.append(summary)
    return summaries
