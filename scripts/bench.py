#!/usr/bin/env python3
"""Benchmark flowagg against baselines measured in the same run on the same machine (SPEC §10).

Run it through `scripts/bench` (it sets up .venv with the `bench` extra, i.e. persist-queue).
Never part of the test suite: absolute times on a shared machine mean little, so every flowagg
figure is printed beside baselines measured in the same run, and every figure is the median
over `--repeats` runs (the single runs are in `--json PATH`).

Everything happens in a temporary directory (`--dir` chooses its parent, so the disk under
test can be picked): real `flowagg run` daemons as subprocesses, driven only over their Unix
socket (newline-delimited JSON, no network), and the baselines' files and databases. Every
daemon started here is stopped or killed before the script exits. The daemons run a copy of
the flowagg package taken at the start (the working tree, or `--rev REV` from git), so edits
made while the benchmark runs do not mix into one run.

Figures (see the table notes for the details of each):
  1. durable `add` throughput, 1 and 8 socket clients x 100-entry requests, beside raw appends
     with one fsync per group of requests, SQLite (WAL, synchronous=FULL) from as many threads,
     and persist-queue's SQLiteAckQueue;
  2. single-entry `add` latency from 1 client beside `ping` and one small fsync'd append;
  3. group commit: entries per journal sync with 32 clients sending single-entry adds;
  4. manual flush latency with 50 and 500 entries buffered;
  5. restart with 100 000 (or, with --big, also 1 000 000) journaled unflushed entries:
     time until `ping` answers, until the backlog is stored, and peak RSS meanwhile;
  6. peak RSS during the throughput runs and idle CPU;
  7. RSS with 1 000 000 (--quick: 200 000; --big: also 10 000 000) remembered client
     entryIds, all stored;
  8. restart with a day of journal: as many (--big: also 5 000 000) stored entries whose
     entryIds are still remembered: time until `ping` answers, peak RSS meanwhile;
  9. a hostile request: one 16 MiB line of ~8 million non-entries: reply time and size, peak
     RSS, and whether the daemon still answers;
 10. power cuts survived, when tests/powerloss.py provides its LazyFS runner.

The figures live in scripts/benchmarks/ (one module per figure group, common.py for the
daemons and clients, baselines.py, report.py); this file is only the entry point.
"""

import sys

from benchmarks.main import main

if __name__ == "__main__":
    sys.exit(main())
