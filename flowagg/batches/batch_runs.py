"""Runs of batch files: their bytes written side by side, their names published in order.

Every batch file costs two fsyncs (its bytes, then its name), and one file at a time leaves
the disk idle between them. When batches queue up, the flusher takes the queued run at once:
stage threads encode each batch and write its temp file (write, fsync) in parallel, so the
disk merges those flushes; the flusher renames the temp files strictly in batch order and
fsyncs the directory once for the names renamed while the next file was still being written.
Only then are those batches reported stored (and the journal told).

A reader never sees batch N+1 before batch N, and every visible file's bytes are durable. A
crash before the directory fsync finds the same names, or re-creates them from the journal.
Journaling file systems keep renames in order through a power cut, so what survives is a
prefix; were a later name kept and an earlier one lost, the start sees the hole and
rebuilds from it (published.py), so nothing is stored twice either way.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from flowagg.batches.storage import Batch
from flowagg.core.fsutil import write_temp
from flowagg.core.supervise import Spawn, serve_jobs

STAGE_WORKERS = 4  # flushWriters' default: enough for the disk to merge the files' fsyncs
MAX_RUN = 64  # batches taken from the queue at once (at most 64 x maxBatchBytes in memory)


@dataclasses.dataclass
class Staged:
    batch: Batch
    tmp: Path  # written and fsynced
    target: Path  # where it is renamed to

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


Job = tuple[Callable[[], Staged], "concurrent.futures.Future[Staged]"]


def stage(batch: Batch, target: Path, data: bytes) -> Staged:
    return Staged(batch, write_temp(target, data), target)


class Stager:
    """A fixed set of supervised threads that run staging jobs; the flusher awaits them."""

    def __init__(self, workers: int, spawn: Spawn) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads = [spawn(f"flusher-stage-{n}", self._work) for n in range(workers)]
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                for thread in self._threads:
                    thread.start()

    def submit(self, job: Callable[[], Staged]) -> concurrent.futures.Future[Staged]:
        future: concurrent.futures.Future[Staged] = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future

    def stop(self) -> None:
        """Let the threads return once the jobs queued before this are done."""
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        serve_jobs(self._jobs)
