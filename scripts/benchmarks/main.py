"""The entry point's work: options, the order figures run in, the printed report."""

from __future__ import annotations

import argparse
import functools
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from . import memory
from .common import LIVE_DAEMONS, Bench, ClientPool, median, snapshot_flowagg
from .compression import compression
from .data import data_figures, data_notes, data_rows
from .flush import flush_latency
from .group_commit import group_commit
from .hostile import hostile
from .latency import latency
from .powerloss import power_cuts
from .redaction import redaction
from .report import OtherLoad, build_rows, meta, notes, render
from .restart import build_backlog, restart, restart_remembered
from .sink_postgres import sink_notes, sink_postgres, sink_rows
from .spool import spool_intake
from .throughput import throughput

FIGURES = (
    "throughput",
    "latency",
    "group commit",
    "flush",
    "start",
    "hostile",
    "spool",
    "remembered",
    "power cuts",
)


def run(b: Bench) -> None:
    s = b.sizes
    repeats = b.args.repeats
    only = set(b.args.only or FIGURES)

    def section(name: str, func: Callable[[], None]) -> None:
        if name in only or (name == "big" and "start" in only):
            b.section(name, func)

    b.pool = ClientPool(max(8, s.gc_clients))
    costs = {"redaction": redaction, "compression": compression}
    chosen = [name for name in costs if getattr(b.args, name)]
    if chosen:
        try:
            for rep in range(1, repeats + 1):
                for name in chosen:
                    b.progress(f"{name}, run {rep}/{repeats}")
                    b.section(name, functools.partial(costs[name], b))
        finally:
            b.pool.close()
        return
    try:
        if b.args.sink == "postgres":
            b.section("sink postgres", lambda: sink_postgres(b))
            return
        backlogs: dict[str, tuple[Path, int]] = {}

        def build(prefix: str, entries: int) -> None:
            backlogs[prefix] = build_backlog(b, entries)

        def restart_backlog(prefix: str) -> None:
            if prefix in backlogs:  # else building it failed, and that error is reported
                pristine, entries = backlogs[prefix]
                restart(b, pristine, prefix, entries)

        if "start" in only:
            b.progress(f"building a journal of {s.startup_entries:,} unflushed entries")
        section("start", lambda: build("start", s.startup_entries))
        for rep in range(1, repeats + 1):
            b.progress(f"run {rep}/{repeats}")
            section("throughput", lambda: throughput(b))
            section("latency", lambda: latency(b))
            section("group commit", lambda: group_commit(b))
            section("flush", lambda: flush_latency(b))
            section("start", lambda: restart_backlog("start"))
            section("hostile", lambda: hostile(b))
            section("spool", lambda: spool_intake(b))
        if b.args.big:
            b.progress(f"--big: building a journal of {s.big_entries:,} entries")
            section("big", lambda: build("big", s.big_entries))
            section("big", lambda: restart_backlog("big"))
        if "remembered" in only:
            remembered(b)
        if "power cuts" in only:
            b.progress("power cuts")
        section("power cuts", lambda: power_cuts(b))
    finally:
        b.pool.close()


def remembered(b: Bench) -> None:
    """RSS with N remembered entryIds, then restarts on the same (cleanly stopped) root.

    One root per size serves both figures: building it is the expensive part (once, not per
    repeat); the restarts leave it as they found it, so they are repeated.
    """
    day = memory.day_sizes(b)
    roots: dict[int, Path] = {}

    def build(entries: int) -> None:
        roots[entries] = memory.build_remembered(b, entries)

    for entries in sorted({*memory.rss_sizes(b), *day}):
        b.progress(f"remembering {entries:,} client entryIds")
        b.section(f"remembered {entries:,}", functools.partial(build, entries))
        if entries not in roots:
            continue  # building it failed, and that error is reported
        if entries in day:
            for rep in range(1, b.args.repeats + 1):
                b.progress(f"restart with a day of journal ({entries:,} entries), run {rep}")
                b.section(
                    f"day restart {entries:,}",
                    functools.partial(restart_remembered, b, roots[entries], entries),
                )
        shutil.rmtree(roots.pop(entries), ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark flowagg beside baselines measured in the same run (SPEC §10).",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run (< 2 min)")
    parser.add_argument("--repeats", type=int, help="runs per figure (default 3; --quick: 1)")
    parser.add_argument(
        "--big",
        action="store_true",
        help="also restart with 1,000,000 journaled entries, remember 10,000,000 entryIds and"
        " restart with a 5,000,000-entry day of journal",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=FIGURES,
        help="run only this figure (repeatable); the others show n/a",
    )
    parser.add_argument(
        "--data",
        action="store_true",
        help="only the read commands (validate, export, report) on 1,000,000 stored entries"
        " (--quick: 100,000)",
    )
    parser.add_argument(
        "--redaction",
        action="store_true",
        help="only the redaction figure: add throughput with 10 keys and 3 patterns vs off",
    )
    parser.add_argument(
        "--compression",
        action="store_true",
        help="only the compression figure: throughput with zstd batch files vs none"
        " (with --redaction: both)",
    )
    parser.add_argument(
        "--sink",
        choices=["postgres"],
        help="only the sink figure: entries/s delivered into a throwaway PostgreSQL beside a"
        " plain psycopg COPY (needs PostgreSQL's server binaries)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers to PATH")
    parser.add_argument(
        "--dir", metavar="DIR", help="parent of the temp directory (the disk under test)"
    )
    parser.add_argument(
        "--rev",
        metavar="REV",
        help="benchmark flowagg as of this git revision (default: the working tree)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="daemon setting for every flowagg daemon (repeatable)",
    )
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    other_load = OtherLoad()
    with tempfile.TemporaryDirectory(prefix="flowagg-bench-", dir=args.dir) as tmp_name:
        bench = Bench(args, Path(tmp_name))
        bench.notes["flowagg"] = snapshot_flowagg(bench.tmp / "src", args.rev)
        try:
            if args.data:
                bench.section("data", lambda: data_figures(bench))
            else:
                run(bench)
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        finally:
            for daemon in list(LIVE_DAEMONS):
                daemon.kill()
        info = meta(bench)
    elapsed = time.monotonic() - started
    info["otherLoadCpus"] = round(other_load.cpus(), 3)
    print(
        f"flowagg benchmark: flowagg from the {info['flowagg']};"
        f" {'quick, ' if args.quick else ''}{args.repeats} run(s), {elapsed:.0f} s"
    )
    print(
        f"machine: {info['cpus']} CPUs, {info['memoryMB']:,} MB, Python {info['python']},"
        f" SQLite {info['sqlite']}, temp dir on {info['filesystem']}"
    )
    print(
        f"noise: other processes and the kernel kept {info['otherLoadCpus']:.2f} of"
        f" {info['cpus']} CPUs busy on average during the run"
        + (
            " -- figures are unreliable; rerun on a quieter machine"
            if info["otherLoadCpus"] > 0.25
            else ""
        )
    )
    print()
    if args.data:
        rows, notes_text = data_rows(bench), data_notes(bench)
    elif args.sink:
        rows, notes_text = sink_rows(bench), sink_notes(bench)
    else:
        rows, notes_text = build_rows(bench), notes(bench)
    print(render(rows))
    print()
    print("Notes:")
    for line in notes_text.split("\n"):
        print(f"- {line}")
    if bench.errors:
        print()
        for name, error in bench.errors.items():
            print(f"ERROR in {name}: {error}")
    if args.json:
        doc = {
            "meta": info,
            "samples": bench.samples,
            "medians": {k: median(v) for k, v in bench.samples.items()},
            "errors": bench.errors,
            "elapsedS": elapsed,
        }
        Path(args.json).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
