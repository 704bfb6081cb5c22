"""Injected time and identifiers, so tests drive time instead of waiting on it."""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock milliseconds since the epoch (for timestamps written to files)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (for ages and timeouts)."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, now_ms: int = 1_704_067_200_000) -> None:
        self._now_ms = now_ms
        self._mono = 1000.0

    def now_ms(self) -> int:
        return self._now_ms

    def monotonic(self) -> float:
        return self._mono

    def advance(self, ms: int) -> None:
        self._now_ms += ms
        self._mono += ms / 1000.0

    def jump(self, ms: int) -> None:
        """Step the wall clock only (an operator, NTP or a VM resume); negative goes back."""
        self._now_ms += ms


class WindowClock:
    """Time for windows (dedupe expiry, journal compaction) that a wall-clock step cannot move.

    It advances only by monotonic elapsed time from an anchor: the newest arrival time in the
    journal, or now if that is in the future (or the journal is empty). A forward step of the
    wall clock therefore never forgets an id early; time spent stopped does not count either,
    which only keeps ids longer.
    """

    def __init__(self, clock: Clock, newest_ms: int) -> None:
        wall = clock.now_ms()
        self._clock = clock
        self._anchor_ms = newest_ms if 0 < newest_ms <= wall else wall
        self._anchor_mono = clock.monotonic()
        self._last_arrival = newest_ms

    def now_ms(self) -> int:
        return self._anchor_ms + int((self._clock.monotonic() - self._anchor_mono) * 1000)

    def arrival_ms(self) -> int:
        """A journal arrival time: wall time, never below the last one nor the window clock.

        Non-decreasing, so batch ids sort by time after a backward step; never behind the
        window clock, so an id is remembered for a whole window of elapsed time.
        """
        t = max(self._clock.now_ms(), self._last_arrival, self.now_ms())
        self._last_arrival = t
        return t


_B32 = "0123456789abcdefghjkmnpqrstvwxyz"
_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits at a time: ids are on the hot path


def _b32(value: int, width: int) -> str:
    """`value` as `width` Crockford base32 digits (width even), most significant first."""
    pairs = _PAIRS
    return "".join(pairs[(value >> shift) & 1023] for shift in range(5 * (width - 2), -1, -10))


class EntryIdFactory:
    """Sortable unique ids (ULID-like: 48-bit ms time + 80 bits that increase within a ms).

    Within one millisecond the random part is incremented rather than redrawn, so ids issued
    by one process always sort in issue order, even when the wall clock stalls or steps back.
    """

    def __init__(self, clock: Clock, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._rng = rng or random.Random(int.from_bytes(os.urandom(16), "big"))
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0
        self._prefix = ""  # time digits and the upper random digits, re-encoded when they change
        self._prefix_key = (-1, -1)

    def new(self) -> str:
        with self._lock:
            ms = self._clock.now_ms()
            if ms <= self._last_ms:
                rand = self._last_rand = self._last_rand + 1
                if rand & 1023:  # the upper digits did not change: the prefix still holds
                    return self._prefix + _PAIRS[rand & 1023]
            else:
                self._last_ms = ms
                self._last_rand = self._rng.getrandbits(79)
            rand = self._last_rand
            key = (self._last_ms, rand >> 10)
            if key != self._prefix_key:
                self._prefix_key = key
                self._prefix = _b32(self._last_ms, 10) + _b32(rand >> 10, 14)
            return self._prefix + _PAIRS[rand & 1023]
