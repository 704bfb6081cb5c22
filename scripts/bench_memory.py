#!/usr/bin/env python3
"""Memory of remembered entryIds and restart time with a full day of journal (SPEC §10).

Run as `.venv/bin/python scripts/bench_memory.py` from the repository. Everything happens in a
temporary directory (`--dir` picks its parent):
  1. for each id count (default 1 000 000 and 10 000 000), a fresh process builds a
     DedupeIndex through its real API (100-id journal records, arrival times spread over the
     window) and prints its peak RSS and the cost per insert and per lookup (hits and misses);
  2. a journal of `--entries` entries (default 2 000 000) with client entryIds written through
     the real JournalWriter, arrival times over the last 24 h, all done but a small backlog;
     a real `flowagg run` starts on it (the first start builds the dedupe index from the
     journal), stops, and starts again: the time until `ping` answers, each time.
Goals: RSS < 80 MB with 10 000 000 ids; start < 10 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flowagg.core.config_schema import DAY_MS  # noqa: E402
from flowagg.core.layout import Layout  # noqa: E402
from flowagg.journal.dedupe import DedupeIndex  # noqa: E402
from flowagg.journal.public import JournalWriter  # noqa: E402
from tests.harness import DaemonProc  # noqa: E402

RECORD = 100
GOAL_RSS_MB = 80
GOAL_START_S = 10.0


def index_child(directory: Path, count: int) -> None:
    """In a fresh process: build the index, print one line of figures."""
    proc = psutil.Process()
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            peak = max(peak, proc.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    now = time.time_ns() // 1_000_000
    index = DedupeIndex(directory, window_ms=DAY_MS, max_ids=count)
    index.open()
    base = proc.memory_info().rss
    started = time.perf_counter()
    records = count // RECORD
    for r in range(records):
        t = now - DAY_MS + (r * DAY_MS) // records
        index.add([f"client-{r}-{i}" for i in range(RECORD)], t, (r + 1) * RECORD)
    insert_s = time.perf_counter() - started
    while index.recent:  # the SQLite thread catches up
        time.sleep(0.05)
    held = proc.memory_info().rss
    caught_up_s = time.perf_counter() - started
    probes = 100_000
    started = time.perf_counter()
    hits = sum(
        index.contains(f"client-{(i * 7919) % records}-{i % RECORD}", now) for i in range(probes)
    )
    hit_us = (time.perf_counter() - started) / probes * 1e6
    started = time.perf_counter()
    false = sum(index.contains(f"never-{i}", now) for i in range(probes))
    miss_us = (time.perf_counter() - started) / probes * 1e6
    index.close()
    stop.set()
    peak = max(peak, proc.memory_info().rss)
    print(
        orjson.dumps(
            {
                "ids": count,
                "peakRssMb": round(peak / 2**20, 1),
                "rssAtOpenMb": round(base / 2**20, 1),
                "rssHoldingMb": round(held / 2**20, 1),
                "insertUsPerId": round(insert_s / count * 1e6, 2),
                "indexedUsPerId": round(caught_up_s / count * 1e6, 2),
                "lookupHitUs": round(hit_us, 1),
                "lookupMissUs": round(miss_us, 1),
                "hitsFound": hits,
                "falseHits": false,
                "diskMb": round(sum(p.stat().st_size for p in directory.iterdir()) / 2**20, 1),
            }
        ).decode()
    )


def bench_index(parent: Path, count: int) -> dict[str, object]:
    directory = Path(tempfile.mkdtemp(prefix="dedupe-", dir=parent))
    out = subprocess.run(
        [sys.executable, __file__, "--child-index", str(directory), str(count)],
        capture_output=True,
        check=True,
    )
    result: dict[str, object] = orjson.loads(out.stdout.splitlines()[-1])
    return result


def write_day(root: Path, entries: int, backlog: int) -> None:
    """A day of journal through the real writer: client ids, done records every 50 entries."""
    layout = Layout(root)
    layout.prepare()
    now = time.time_ns() // 1_000_000
    done = threading.Semaphore(0)
    writer = JournalWriter(
        layout.journal,
        segments=[],
        next_seq=1,
        segment_bytes=64 << 20,
        deliver=lambda results: [a.callback(e, p) for a, e, p in results if a.callback],
    )
    writer.start()
    records = entries // RECORD
    pending = 0
    for r in range(records):
        t = now - DAY_MS + 60_000 + (r * (DAY_MS - 120_000)) // records
        datas = [
            orjson.dumps(
                {
                    "userId": f"user{i % 7}",
                    "action": "code_edit",
                    "timestamp": t,
                    "metadata": {"taskId": f"t{i % 3}", "duration": i},
                    "entryId": f"day-{r}-{i}",
                }
            )
            for i in range(RECORD)
        ]
        first = writer.append_entries(
            datas, t, list(range(RECORD)), None, lambda e, p: done.release()
        )
        pending += 1
        last = first + RECORD - 1
        if last <= entries - backlog:
            for q in range(first + 49, last + 1, 50):
                writer.append_done(q, f"{t}_{q:012d}")
        if pending >= 64:  # keep the queue (and this process) small
            for _ in range(pending):
                done.acquire()
            pending = 0
    for _ in range(pending):
        done.acquire()
    writer.stop()


def time_start(root: Path) -> tuple[float, float]:
    started = time.perf_counter()
    daemon = DaemonProc(root, {"maxAgeMs": 3_600_000}).wait_ready(timeout=600)
    ready = time.perf_counter() - started
    rss = psutil.Process(daemon.proc.pid).memory_info().rss / 2**20
    assert daemon.stop() == 0, daemon.log()
    return ready, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temp directory")
    parser.add_argument("--ids", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--entries", type=int, default=2_000_000)
    parser.add_argument("--backlog", type=int, default=1_000)
    parser.add_argument("--child-index", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.child_index:
        index_child(Path(args.child_index[0]), int(args.child_index[1]))
        return
    with tempfile.TemporaryDirectory(prefix="flowagg-bench-memory-", dir=args.dir) as tmp:
        parent = Path(tmp)
        for count in args.ids:
            r = bench_index(parent, count)
            verdict = "ok" if float(r["peakRssMb"]) < GOAL_RSS_MB else "OVER GOAL"  # type: ignore[arg-type]
            print(f"dedupe index, {count:,} ids: {orjson.dumps(r).decode()}  [{verdict}]")
        if args.entries:
            root = parent / "root"
            started = time.perf_counter()
            write_day(root, args.entries, args.backlog)
            size = sum(p.stat().st_size for p in (root / "journal").glob("seg-*.log"))
            print(
                f"journal: {args.entries:,} entries, {size / 2**20:.0f} MiB,"
                f" written in {time.perf_counter() - started:.1f} s"
            )
            for label in ("first start (builds the dedupe index)", "restart"):
                ready, rss = time_start(root)
                verdict = "ok" if ready < GOAL_START_S else "OVER GOAL"
                print(f"{label}: ready in {ready:.2f} s, RSS {rss:.0f} MB  [{verdict}]")
    os.sync()


if __name__ == "__main__":
    main()
