"""The loop that checks the crash states of every workload (workloads.py).

`explore(work, budget)` records each workload once, enumerates its distinct crash states and
checks them: all of them (budget None), or the `budget` that matter most (per kill point for
a start-up workload). Those come first that lose names the killed run left unsynced (for a
start-up workload), then those where a later name outlived an earlier one (only POSIX allows
it), then by how many names not yet durable they drop.

The start-up workloads are two-level: the daemon of a first run is taken as killed just
before one of its directory fsyncs (the process-visible state, page cache and all), a second
daemon starts on that state under strace, and the crash states of that second run may still
lose what the first had not made durable and the second never fsynced.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowagg.core.layout import Layout
from tests.crashmodel.check import Verdict, acked_ids, check_state, short_run_dir
from tests.crashmodel.model import Barrier, Fs, Link, Op, materialize
from tests.crashmodel.record import Recording, fresh_root, record, traced_run
from tests.crashmodel.resolve import Resolver
from tests.crashmodel.states import (
    Choice,
    Found,
    build,
    crash_points,
    distinct_states,
    droppable,
    fixed_at,
    publishes,
)
from tests.crashmodel.strace import parse
from tests.crashmodel.workloads import KILL_DIRS, WORKLOADS, Workload

Log = Callable[[str], None]
# Daemons started side by side on crash states: a start is mostly CPU (imports), so one a core.
CHECK_WORKERS = min(2, os.cpu_count() or 1)
FAILURES = {
    "lost": "lost",
    "duplicated": "duplicated",
    "two_ids": "entries under two ids",
    "two_contents": "two-content ids",
    "blocked": "blocked starts",
}


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

    def counts(self) -> dict[str, int]:
        """How many states showed each kind of failure."""
        return {
            label: sum(1 for f in self.findings if getattr(f.verdict, key))
            for key, label in FAILURES.items()
        }

    def line(self) -> str:
        bad = ", ".join(f"{label} {n}" for label, n in self.counts().items())
        return (
            f"{self.workload}: {self.distinct} distinct states ({self.subsets} subsets),"
            f" {self.checked} checked; states with {bad}"
        )


class Recordings:
    """Each workload's recording, made once and shared (by the tests of a session too)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._made: dict[str, tuple[Recording, dict[str, Any]]] = {}
        self._template: Path | None = None

    def get(self, w: Workload) -> tuple[Recording, dict[str, Any]]:
        if self._template is None:
            self._template = fresh_root(self.work / "fresh")
        if w.key not in self._made:
            source = next(s for s in WORKLOADS if s.name == w.key)
            self._made[w.key] = record(
                self.work / source.name,
                self._template,
                source.settings,
                source.steps,
                source.spool,
                source.maintenance_s,
                source.before,
            )
        return self._made[w.key]


def ranked(found: list[Found], ops: list[Op], budget: int | None, first: int = 0) -> list[Found]:
    """Up to `budget` states, those that matter most first (see the module's note); among
    equals, one per crash point in turn, from the last point."""
    if budget is None:
        return found
    seen_at: dict[int, int] = {}
    order: list[tuple[tuple[int, ...], Found]] = []
    for f in found:  # in the order tried: systematic choices first at each point
        turn = seen_at.get(f.choice.point, 0)
        seen_at[f.choice.point] = turn + 1
        killed = sum(1 for i in f.choice.dropped if i < first and publishes(ops[i]))
        order.append(((-killed, -f.reordered, -f.names_lost, turn, -f.choice.point), f))
    order.sort(key=lambda pair: pair[0])
    return [f for _, f in order[:budget]]


def check_all(
    work: Path,
    summary: Summary,
    rec: Recording,
    ops: list[Op],
    points: list[int],
    settings: dict[str, Any],
    budget: int | None,
    log: Log,
    label: str = "",
    first: int = 0,
    check: bool = True,
    resend: bool = False,
) -> None:
    subsets, found = distinct_states(Fs.from_state(rec.base), ops, points)
    summary.subsets += subsets
    summary.distinct += len(found)
    picked = ranked(found, ops, budget, first) if check else []
    cases = [work / f"state-{summary.checked + n}" for n in range(len(picked))]
    summary.checked += len(picked)

    def one(f: Found, case: Path) -> Verdict:
        acked = acked_ids(rec.replies, f.replies, rec.upfront)
        # Every id the run sent, answered by the crash or not: a client retries them all.
        again = sorted(acked_ids(rec.replies, len(rec.replies), ())) if resend else []
        return check_state(case, f.state, f.external, acked, settings, again)

    with concurrent.futures.ThreadPoolExecutor(CHECK_WORKERS) as pool:
        verdicts = list(pool.map(one, picked, cases))
    for f, case, verdict in zip(picked, cases, verdicts, strict=True):
        if verdict.ok:
            shutil.rmtree(case, ignore_errors=True)
            continue
        where = f"{label}{f.choice.describe(ops)} (kept in {case})"
        summary.findings.append(Finding(summary.workload, where, verdict))
        log(f"  {summary.workload}: {verdict.summary()} at {where}")


def kill_points(rec: Recording, budget: int | None) -> list[tuple[int, str]]:
    """(op index, directory) just before directory fsyncs: names are visible there, not yet
    durable. All of them, or with a budget, for each of KILL_DIRS the point that leaves the
    most names unsynced there, new names counting first (a rename into the directory, as a
    spool file's adoption or a batch's publication; a removal second). The latest among
    equals: less is left for the restart to write, whose own fsync of the directory would
    make the killed run's names durable too."""
    fs = Fs.from_state(rec.base)
    fixed = fixed_at(rec.ops)
    points: list[tuple[int, str, tuple[int, int]]] = []
    for i, op in enumerate(rec.ops):
        if isinstance(op, Barrier) and op.is_dir:
            edits = [
                ino
                for j in droppable(rec.ops, i, fixed)
                if publishes(rec.ops[j])
                for d, _, ino in _edits(rec.ops[j])
                if d == op.ino
            ]
            unsynced = (sum(1 for ino in edits if ino is not None), len(edits))
            points.append((i, fs.path_of(op.ino) or "", unsynced))
        fs.apply(op)
    if budget is None:
        return [(i, d) for i, d, _ in points]
    best = [
        max((p for p in points if p[1] == d and p[2][1]), key=lambda p: (p[2], p[0]), default=None)
        for d in KILL_DIRS
    ]
    return sorted((p[0], p[1]) for p in best if p is not None)


def _edits(op: Op) -> tuple[tuple[int, str, int | None], ...]:
    return op.edits if isinstance(op, Link) else ()


def restarted(work: Path, rec: Recording, settings: dict[str, Any], kill: int) -> list[Op]:
    """The killed run's operations up to `kill`, then those of a daemon started on what the
    process saw there (and stopped cleanly)."""
    visible = build(Fs.from_state(rec.base), rec.ops, Choice(kill, frozenset()))
    with short_run_dir() as run_dir:
        layout = Layout(work / "data", run_dir)
        materialize(visible, layout.root)
        text, _ = traced_run(work, layout, {**settings, "runDir": str(run_dir)}, [])
    fs = Fs.from_state(rec.base)
    for op in rec.ops[:kill]:
        fs.apply(op)
    return rec.ops[:kill] + Resolver(fs, layout.root).feed(parse(text))


def explore_one(
    work: Path, w: Workload, recordings: Recordings, budget: int | None, log: Log, check: bool
) -> Summary:
    summary = Summary(w.name)
    rec, settings = recordings.get(w)
    settings = {**settings, **w.check_settings}
    if not w.restart:
        points = crash_points(rec.ops)
        check_all(
            work, summary, rec, rec.ops, points, settings, budget, log, check=check, resend=w.resend
        )
        return summary
    kills = kill_points(rec, budget)
    for k, directory in kills:
        ops = restarted(work / f"kill-{k}", rec, settings, k)
        points = [p for p in crash_points(ops) if p > k]
        label = f"killed before op {k} (fsync of {directory}/), restarted, "
        check_all(work, summary, rec, ops, points, settings, budget, log, label, k, check, w.resend)
    return summary


def explore(
    work: Path,
    budget: int | None,
    log: Log = lambda _msg: None,
    names: list[str] | None = None,
    recordings: Recordings | None = None,
    check: bool = True,
) -> list[Summary]:
    """The summaries of `names` (all workloads: None); without `check`, states are only
    counted."""
    recordings = recordings or Recordings(work / "recordings")
    summaries = []
    for w in WORKLOADS:
        if names is None or w.name in names:
            summary = explore_one(work / w.name, w, recordings, budget, log, check)
            log(summary.line())
            summaries.append(summary)
    return summaries


def table(summaries: list[Summary]) -> str:
    head = ["workload", "distinct states", "checked", *FAILURES.values()]
    rows = [
        [s.workload, str(s.distinct), str(s.checked), *map(str, s.counts().values())]
        for s in summaries
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]
    )
