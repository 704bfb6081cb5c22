"""Deadlines for sink calls (`sinkTimeoutMs`), kept by one watchdog thread per sink.

A delivery arms a deadline and disarms it when done: a heap push under a lock. A
`threading.Timer` per batch started a thread every time and waited until it ran, which cost
the PostgreSQL sink a tenth of its delivery time, and more once the event loop held the GIL.

The expiry callback runs under the watchdog's lock and must not block (it shuts a socket):
so once `disarm` returns, the callback has either run or never will, and a connection handed
to the next delivery is never cut for the previous one's deadline.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

from flowagg.core.supervise import name_os_thread

IDLE_EXIT_S = 30.0  # a watchdog with nothing armed this long lets its thread end


class Deadline:
    def __init__(self, on_expiry: Callable[[], None]) -> None:
        self.on_expiry = on_expiry
        self.expired = False
        self.disarmed = False


class Watchdog:
    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._running = False

    def arm(self, seconds: float, on_expiry: Callable[[], None]) -> Deadline:
        deadline = Deadline(on_expiry)
        at = time.monotonic() + seconds
        with self._cond:
            if not self._running:
                # Running only once started: a start that failed (no thread left) fails this
                # call, and the next one tries again rather than arm a deadline nobody keeps.
                threading.Thread(target=self._run, name=self.name, daemon=True).start()
                self._running = True
            earliest = not self._heap or at < self._heap[0][0]
            heapq.heappush(self._heap, (at, next(self._order), deadline))
            if earliest:
                self._cond.notify()
        return deadline

    def disarm(self, deadline: Deadline) -> None:
        with self._cond:
            deadline.disarmed = True
            # Deliveries end roughly in the order they began: dropping the disarmed ones at
            # the front keeps the heap about as long as the deliveries under way.
            while self._heap and self._heap[0][2].disarmed:
                heapq.heappop(self._heap)

    def _run(self) -> None:
        name_os_thread(self.name)
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].disarmed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    if not self._cond.wait(IDLE_EXIT_S) and not self._heap:
                        self._running = False
                        return
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                _, _, due = heapq.heappop(self._heap)
                due.expired = True
                due.on_expiry()
