"""Per-file work of the read commands in worker processes, one per core, results in file order.

Reading, parsing and checking a batch file does not depend on any other file, so the read
commands hand chunks of files to a pool of forked workers and take the answers back in the
order the chunks were given: output, findings and exit codes are those of one process reading
the files in order. At most `IN_FLIGHT_PER_WORKER` chunks per worker are out at a time, so
memory stays bounded whatever the number of files. With one core, or a single file, everything
runs in this process.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

from flowagg.core.errors import FlowaggError

if TYPE_CHECKING:
    from concurrent.futures import Future, ProcessPoolExecutor

T = TypeVar("T")
R = TypeVar("R")

CHUNK_FILES = 64  # files per task: a task costs a pickle round trip, a file ~0.1-1 ms of work
IN_FLIGHT_PER_WORKER = 4
# The bound on workers comes from the memory goal (the command's processes together under
# 100 MB of PSS), not from the cores: at 1,000,000 entries in 20,000 files export's parent
# holds ~50 MB (its sort run) and a worker adds 5-10 MB (what it reads and builds; it no
# longer copies the parent's pages, see map_chunks). Export measured 88 MB with 4 workers.
_BUDGET_MB = 90
_PARENT_MB = 50
_WORKER_MB = 10
MAX_WORKERS = (_BUDGET_MB - _PARENT_MB) // _WORKER_MB


def worker_count() -> int:
    """One worker per core this process may run on (its CPU affinity, where the OS says), at
    most MAX_WORKERS."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    return min(count, MAX_WORKERS)


def map_stream(
    work: Callable[[T], R], items: Iterable[T], *, workers: int | None = None
) -> Iterator[R]:
    """work(item) for each item, in order, computed in worker processes; at most
    IN_FLIGHT_PER_WORKER items per worker are out at a time, so `items` may be an endless
    stream (made as the answers are taken)."""
    workers = worker_count() if workers is None else workers
    with _pool(workers) as pool:
        if pool is None:
            yield from map(work, items)
            return
        pending: collections.deque[Future[R]] = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _run(work: Callable[[Sequence[T]], R], part: Sequence[T]) -> R:
    return work(part)


def map_chunks(
    work: Callable[[Sequence[T]], R],
    items: Sequence[T],
    *,
    workers: int | None = None,
    most: int | None = None,
) -> Iterator[tuple[Sequence[T], R]]:
    """(chunk, work(chunk)) for consecutive chunks of `items`, in order; a chunk holds at
    most `most` items (default CHUNK_FILES).

    `work` must pickle (a module-level function, or a partial of one) and so must its answer.
    """
    workers = worker_count() if workers is None else workers
    # Even a few files are spread over every worker, a few tasks each; many go in tasks of
    # `most`.
    size = max(1, min(most or CHUNK_FILES, -(-len(items) // (workers * IN_FLIGHT_PER_WORKER))))
    bounds = [(i, min(i + size, len(items))) for i in range(0, len(items), size)]
    workers = min(workers, len(bounds))
    with _pool(workers) as pool:
        if pool is None:
            for start, stop in bounds:
                part = items[start:stop]
                yield part, work(part)
            return
        pending: collections.deque[tuple[Sequence[T], Future[R]]] = collections.deque()
        try:
            for start, stop in bounds:
                part = items[start:stop]
                pending.append((part, pool.submit(_run, work, part)))
                if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    part, future = pending.popleft()
                    yield part, future.result()
            while pending:
                part, future = pending.popleft()
                yield part, future.result()
        finally:
            # A reader that stops early (an error, a closed stdout) does not wait for the rest.
            for _, future in pending:
                future.cancel()


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of `workers` forked processes, or None: the work is done in this process."""
    # Imported here: `flowagg add` loads the read modules' names, never a pool.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # Workers are forked, so they start at once with the modules and settings already loaded
    # (a spawned worker would import flowagg again, a third of a second per core).
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    context = multiprocessing.get_context("fork")
    # A task carries its own items (a few kB pickled) and a worker never touches the parent's
    # objects: an inherited list's items got their refcounts written and the collector walked
    # them, so each worker copied the pages they sat on (11-19 MB PSS a worker at 20,000
    # files). Frozen, the objects from before the fork are never scanned again by a worker's
    # collector.
    gc.freeze()
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            yield pool
    except BrokenProcessPool:
        # Killed from outside (the kernel's OOM killer, say): its items' answers are lost, so
        # the command cannot finish, but it says so in one line, not a traceback.
        raise FlowaggError(
            "a worker process of this command was killed before it answered (out of memory?);"
            " run the command again"
        ) from None
    finally:
        gc.unfreeze()
