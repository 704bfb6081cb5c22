"""Senders: threads that deliver a run of batches to a sink several at a time.

A sink that stores each entry once whatever the order its batches arrive in (the postgres
sink: ON CONFLICT on the entry id) may take a run's batches at once, `sinkConnections` of
them: each delivery mostly waits for the server's commit, and concurrent commits share the
server's WAL flushes. Files stay in order: the flusher waits for every delivery and writes
the accepted prefix as a run; what follows the first batch not accepted goes the
one-at-a-time way, carrying what its delivery did (accepted, failed, or never begun).

The threads are made on first use, as many as the widest run asked for, and end with the
flusher.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable

from flowagg.core.supervise import Spawn, serve_jobs

Job = tuple[Callable[[], None], "concurrent.futures.Future[None]"]


class Senders:
    def __init__(self, spawn: Spawn) -> None:
        self._spawn = spawn
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def run(self, jobs: list[Callable[[], None]], width: int) -> list[Exception | None]:
        """Run `jobs` on up to `width` threads; once one fails, those not begun are not run.

        Returns when every job begun has ended: each one's error, or None (done, or not
        begun because one before it failed), in order.
        """
        self._grow(width)
        futures = []
        for job in jobs:
            future: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._jobs.put((job, future))
            futures.append(future)
        errors: list[Exception | None] = []
        failed = False
        for future in futures:
            if failed and future.cancel():
                errors.append(None)
                continue
            error = future.exception()
            if error is not None and not isinstance(error, Exception):
                raise error  # an interpreter exit, not a delivery's failure
            failed = failed or error is not None
            errors.append(error)
        return errors

    def stop(self) -> None:
        """Let the threads return once the jobs queued before this are done."""
        with self._lock:
            for _ in self._threads:
                self._jobs.put(None)

    def _grow(self, width: int) -> None:
        with self._lock:
            while len(self._threads) < width:
                thread = self._spawn(f"sink-sender-{len(self._threads)}", self._work)
                self._threads.append(thread)
                thread.start()

    def _work(self) -> None:
        serve_jobs(self._jobs)
