"""Latency samples that also feed a cumulative histogram.

The recent samples give status and health their p50/p99; the histogram gives Prometheus
counts that only grow, whatever the window forgets. One bisect per request (not per entry).
"""

from __future__ import annotations

import bisect
from collections import deque

# Seconds: from a group commit's fsync to a flush stuck behind a slow sink.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencySamples(deque[float]):
    def __init__(self, maxlen: int) -> None:
        super().__init__(maxlen=maxlen)
        self.bucket_counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total = 0
        self.sum = 0.0

    def append(self, seconds: float) -> None:
        super().append(seconds)
        self.bucket_counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs as Prometheus wants them, +Inf last."""
        out, running = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.bucket_counts, strict=True):
            running += count
            out.append((bound, running))
        return out
