"""Supervised threads and a bounded stop.

Every long-lived thread runs through `Supervisor.spawn`. A thread that dies (an exception,
or a return before the daemon asked it to stop) is logged with its traceback, counted, shown
as critical in health, and the daemon stops with EX_SOFTWARE so that systemd's
Restart=on-failure starts a fresh one: never a silent stall.

Threads are daemon threads, and blocking calls the event loop hands off run in daemon
threads too (`DaemonExecutor`): a thread stuck in a slow sink or a hung disk must not hold
the process past `shutdownTimeoutMs`. What it did not store stays in the journal.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
# A job and the future its result or error goes to; None tells the thread to return.
JobQueue = queue.SimpleQueue[tuple[Callable[[], T], "concurrent.futures.Future[T]"] | None]

log = logging.getLogger("flowagg.supervise")

EX_SOFTWARE = 70
Target = Callable[[], None]
Spawn = Callable[[str, Target], threading.Thread]


PR_SET_NAME = 15
OS_NAME_BYTES = 15  # the kernel keeps 16 bytes, the terminating NUL included


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the kernel too (`/proc/<pid>/task/<tid>/comm`), so
    top, ps and py-spy tell the daemon's threads apart; Python 3.11 names them for itself only.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:OS_NAME_BYTES], 0, 0, 0)


def named(name: str, target: Target) -> Target:
    def run() -> None:
        name_os_thread(name)
        target()

    return run


def serve_jobs(jobs: JobQueue[Any]) -> None:
    """A worker thread's loop: run each job into its future until told to return. A job
    cancelled before it began is skipped; any exception, even an exit, goes to its future."""
    while True:
        item = jobs.get()
        if item is None:
            return
        job, future = item
        if not future.set_running_or_notify_cancel():
            continue
        try:
            result = job()
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)


def plain_thread(name: str, target: Target) -> threading.Thread:
    """An unsupervised daemon thread, for components used outside the daemon (tests, tools)."""
    return threading.Thread(target=named(name, target), name=name, daemon=True)


class Supervisor:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deaths: list[tuple[str, str]] = []
        self._on_death: Callable[[str], None] | None = None
        # Set once the daemon stops its threads: from then on a thread may return.
        self.stopping = False

    def on_death(self, callback: Callable[[str], None]) -> None:
        """`callback(thread name)` runs in the dying thread; it must only hand off."""
        self._on_death = callback

    def spawn(self, name: str, target: Target) -> threading.Thread:
        """A daemon thread running `target` under supervision (not started yet)."""

        def run() -> None:
            name_os_thread(name)
            try:
                target()
            except BaseException as exc:
                log.critical("thread %s died", name, exc_info=True)
                self._died(name, f"{type(exc).__name__}: {exc}")
                return
            if not self.stopping:
                log.critical("thread %s ended while the daemon was running", name)
                self._died(name, "ended while the daemon was running")

        return threading.Thread(target=run, name=name, daemon=True)

    def _died(self, name: str, reason: str) -> None:
        with self._lock:
            self._deaths.append((name, reason))
        if self._on_death is not None:
            self._on_death(name)

    @property
    def deaths(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._deaths)

    def issues(self) -> list[str]:
        return [
            f"thread {name} died ({reason}); the daemon stops so that it can be restarted"
            for name, reason in self.deaths
        ]


class DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each call in its own daemon thread; shutting down never waits for one.

    The loop's default executor joins its threads when the loop closes and again at exit,
    so one call stuck in a sink or on a hung disk would hold the process forever. (A
    ThreadPoolExecutor only because asyncio insists; its pool is never used.)
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            name_os_thread("flowagg-worker")
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

        threading.Thread(target=run, name="flowagg-worker", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


class Deadline:
    """One stop deadline shared by the stop phases; each gets a fraction of the whole."""

    # Kept back for the interpreter's own exit after the last phase.
    EXIT_RESERVE = 0.1

    def __init__(self, total_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.total_s = total_s
        self._monotonic = monotonic
        self.end = monotonic() + total_s * (1 - self.EXIT_RESERVE)

    def remaining(self) -> float:
        return max(0.0, self.end - self._monotonic())

    def share(self, fraction: float, cap_s: float | None = None) -> float:
        seconds = self.total_s * fraction
        if cap_s is not None:
            seconds = min(seconds, cap_s)
        return min(seconds, self.remaining())
