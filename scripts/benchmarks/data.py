"""`--data`: the read commands on a large root (validate, validate --full, export, report).

A root of N entries in N/50 batch files is written directly in the SPEC batch format (with
correct entriesSha256), timestamps shuffled so export has to sort across batches. Each
command runs as a `python -m flowagg` subprocess (the snapshot of the run), timed from spawn
to exit, the memory of it and its worker processes polled every 20 ms; beside it, in the same
repeat, a bare loop of `orjson.loads` over the same files in this process: the floor of any
reader in Python.

Memory is the tree's PSS (proportional set size, /proc/<pid>/smaps_rollup): forked workers
share the parent's pages until they write them, and a sum of RSS counts each shared page once
per process that maps it; PSS splits a shared page between them, so the sum over the tree is
what the command takes from the machine. The RSS sum is shown beside it, an upper bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import psutil

from .common import BASE_TS, MB, Bench, clean_env

PER_FILE = 50
RATIO_GOAL = 0.5
CSV_RATIO_GOAL = 0.3  # issue #26: CSV formats every cell, so its goal is lower
MEMORY_GOAL_MB = 100.0
SPAN_MS = 90 * 86_400_000  # timestamps spread over 90 days


@dataclasses.dataclass(frozen=True)
class Command:
    key: str
    label: str
    args: tuple[str, ...]
    goal: float = RATIO_GOAL  # the least ratio to the bare loop that meets the goal


def commands(out_dir: Path) -> list[Command]:
    return [
        Command("validate", "validate", ("validate",)),
        Command("validate_full", "validate --full", ("validate", "--full")),
        Command(
            "export_jsonl",
            "export jsonl",
            ("export", "--format", "jsonl", "-o", str(out_dir / "out.jsonl")),
        ),
        Command(
            "export_csv",
            "export csv",
            ("export", "--format", "csv", "-o", str(out_dir / "out.csv")),
            CSV_RATIO_GOAL,
        ),
        Command("report", "report --by user,day", ("report", "--by", "user,day", "--json")),
    ]


def data_sizes(b: Bench) -> int:
    return 100_000 if b.args.quick else 1_000_000


def build_root(root: Path, entries: int) -> None:
    """Batch files as the daemon writes them: ids `<arrival ms>_<seq>`, compact entries."""
    aggregated = root / "aggregated"
    for sub in ("inbox", "journal", "aggregated", "recovery/abandoned", "recovery/errors"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    rng = random.Random(16)
    seq = 1
    for f in range(entries // PER_FILE):
        arrival = BASE_TS + f * 1000
        batch_id = f"{arrival:013d}_{seq:012d}"
        items = []
        for k in range(PER_FILE):
            i = seq + k
            items.append(
                orjson.dumps(
                    {
                        "userId": f"user{i % 40:02d}",
                        "action": ("code_edit", "review", "meeting", "build")[i % 4],
                        "timestamp": BASE_TS + rng.randrange(SPAN_MS),
                        "metadata": {
                            "sessionId": f"s{i // 500}",
                            "taskId": f"task-{i % 97}",
                            "duration": 1000 + i % 3600_000,
                        },
                        "entryId": f"{i:08x}-0000-4000-8000-{i:012x}",
                    }
                )
            )
        array = b"[" + b",".join(items) + b"]"
        head = orjson.dumps(
            {"batchId": batch_id, "timestamp": arrival, "version": "2.0.0", "trigger": "size"}
        )
        tail = orjson.dumps(
            {
                "entryCount": len(items),
                "entriesSha256": hashlib.sha256(array).hexdigest(),
                "recovered": False,
            }
        )
        body = head[:-1] + b',"entries":' + array + b"," + tail[1:]
        (aggregated / f"batch_{batch_id}.json").write_bytes(body)
        seq += PER_FILE


def bare_loop(root: Path) -> tuple[float, float, int]:
    """(seconds, CPU seconds, entries): list the folder, read and parse every file, count its
    entries."""
    started = time.perf_counter()
    cpu = time.process_time()
    count = 0
    for path in sorted((root / "aggregated").iterdir()):
        count += len(orjson.loads(path.read_bytes())["entries"])
    return time.perf_counter() - started, time.process_time() - cpu, count


def children_cpu() -> float:
    """User + system CPU seconds of the ended children waited for, theirs included (a
    command's workers are waited for by the command)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class TreeMemory(threading.Thread):
    """Polls a process and its children until stopped; keeps the peaks of the sums of their
    PSS and of their RSS."""

    def __init__(self, ps: psutil.Process, interval: float) -> None:
        super().__init__(name="tree-memory", daemon=True)
        self.ps = ps
        self.interval = interval
        self.peak_pss = 0
        self.peak_rss = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        pss = rss = 0
        for proc in [self.ps, *self.ps.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # ended between listing and reading
                info = proc.memory_full_info()
                pss += info.pss
                rss += info.rss
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_rss = max(self.peak_rss, rss)

    def run(self) -> None:
        while True:
            try:
                self.sample()
            except psutil.Error:
                return
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> tuple[float, float]:
        """Stop sampling; returns the peaks (PSS, RSS) in MB."""
        self._stop_event.set()
        self.join()
        with contextlib.suppress(psutil.Error):
            self.sample()
        return self.peak_pss / MB, self.peak_rss / MB


def run_command(root: Path, cmd: Command) -> tuple[float, float, float, float]:
    """(seconds from spawn to exit, CPU seconds, peak PSS and peak RSS in MB) of one `flowagg`
    command with its workers."""
    args = [sys.executable, "-m", "flowagg", "--root", str(root), *cmd.args]
    cpu = children_cpu()
    started = time.perf_counter()
    # Run from outside the repository: `-m` puts the working directory first on sys.path,
    # before the snapshot (PYTHONPATH), so a run from the checkout measured its own flowagg.
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd=root.parent,
    )
    sampler = TreeMemory(psutil.Process(proc.pid), interval=0.02)
    sampler.start()
    _, err = proc.communicate(timeout=1800)
    seconds = time.perf_counter() - started
    pss, rss = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"flowagg {' '.join(cmd.args)} exited {proc.returncode}: {err[-500:]!r}")
    return seconds, children_cpu() - cpu, pss, rss


def data_figures(b: Bench) -> None:
    entries = data_sizes(b)
    root = b.fresh_dir("data")
    b.progress(f"--data: writing {entries:,} entries in {entries // PER_FILE:,} batch files")
    started = time.monotonic()
    build_root(root, entries)
    b.notes["data_build_s"] = round(time.monotonic() - started, 1)
    out_dir = b.fresh_dir("data-out")
    out_dir.mkdir()
    bare_loop(root)  # the first pass reads the disk; every timed one finds the page cache warm
    for rep in range(1, b.args.repeats + 1):
        for cmd in commands(out_dir):
            b.progress(f"--data run {rep}: {cmd.label}")
            seconds, cpu, count = bare_loop(root)
            if count != entries:
                raise RuntimeError(f"the root holds {count} entries, not {entries}")
            base_rate = entries / seconds
            b.record(f"data.{cmd.key}.bare", base_rate)
            b.record(f"data.{cmd.key}.bare_cpu_us", cpu / entries * 1e6)
            b.record("data.bare", base_rate)
            cmd_seconds, cmd_cpu, pss, rss = run_command(root, cmd)
            b.record(f"data.{cmd.key}.cpu_us", cmd_cpu / entries * 1e6)
            rate = entries / cmd_seconds
            b.record(f"data.{cmd.key}.rate", rate)
            b.record(f"data.{cmd.key}.ratio", rate / base_rate)
            b.record(f"data.{cmd.key}.pss", pss)
            b.record(f"data.{cmd.key}.rss", rss)
    b.notes["data_entries"] = entries
    b.notes["data_cores"] = cores()


def cores() -> int:
    """The cores the read commands may use: one worker process per core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def data_rows(b: Bench) -> list[tuple[str, str, str, str, str]]:
    from .report import at_least, below, fmt, fmt_rate, verdict

    m = b.med
    entries = b.notes.get("data_entries", data_sizes(b))
    rows = []
    for cmd in commands(Path("out")):
        ratio = m(f"data.{cmd.key}.ratio")
        pss = m(f"data.{cmd.key}.pss")
        ok_ratio, ok_pss = at_least(ratio, cmd.goal), below(pss, MEMORY_GOAL_MB)
        ok = None if ok_ratio is None or ok_pss is None else ok_ratio and ok_pss
        rows.append(
            (
                f"flowagg {cmd.label}\n{entries:,} entries in {entries // PER_FILE:,} files",
                f"{fmt_rate(m(f'data.{cmd.key}.rate'))}\npeak PSS {fmt(pss, ' MB', 1)}"
                f" (RSS sum {fmt(m(f'data.{cmd.key}.rss'), ' MB', 1)})\n"
                f"CPU {fmt(m(f'data.{cmd.key}.cpu_us'), ' us', 2)}/entry (all processes)",
                f"bare orjson.loads loop:\n{fmt_rate(m(f'data.{cmd.key}.bare'))}\n"
                f"CPU {fmt(m(f'data.{cmd.key}.bare_cpu_us'), ' us', 2)}/entry",
                f"ratio {fmt(ratio)} (goal >= {cmd.goal})\nPSS goal < {MEMORY_GOAL_MB:.0f} MB",
                f"{verdict(ok)}\nratio {verdict(ok_ratio)}, PSS {verdict(ok_pss)}",
            )
        )
    return rows


def data_notes(b: Bench) -> str:
    return "\n".join(
        [
            f"Every figure is the median of {b.args.repeats} run(s) (single runs: --json).",
            f"root: written directly in the batch format (50 entries a file, ids in arrival"
            f" order, timestamps shuffled over 90 days, unique entryIds) in"
            f" {b.notes.get('data_build_s', 0)} s; no daemon runs, the journal is empty.",
            f"cores: {b.notes.get('data_cores', cores())}; the read commands read files in"
            " one worker process per core, at most flowagg.read.fanout.MAX_WORKERS (derived"
            " from the memory goal), the bare loop in one.",
            "flowagg: `python -m flowagg --root R <command>` as a subprocess from spawn to"
            " exit (interpreter start included), output to a file or /dev/null; peak PSS"
            " of the command and its worker processes summed (pages shared after fork counted"
            " once), polled every 20 ms; beside it the RSS sum, which counts them once per"
            " process; CPU: user + system seconds of the command and its workers per entry"
            " (getrusage of waited children), steadier than a rate on a shared machine."
            " export uses the default exportRunEntries.",
            "bare loop: in this process, list aggregated/, read and orjson.loads every file,"
            " count its entries; timed right before each command, page cache warm for both.",
        ]
    )
