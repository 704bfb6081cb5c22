"""The buffer's memory window: one unit per journal record, not one object per entry.

An add of a hundred entries is one journal record, loaded as one `Run`; a cut takes whole
runs, and splits one only where a batch boundary falls inside it. To a reader the window is
still a sequence of entries (`Buffered`, made on demand), in seq order.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator


@dataclasses.dataclass(slots=True)
class Buffered:
    seq: int
    t_ms: int
    arrival: float  # monotonic seconds, for the age trigger
    data: bytes  # the entry as compact JSON
    entry_id: str


@dataclasses.dataclass(slots=True)
class Run:
    """Consecutive entries of one journal record; those before `start` are cut already."""

    first_seq: int  # the seq of datas[0]
    t_ms: int
    arrival: float
    datas: list[bytes]
    ids: list[str]
    start: int = 0


@dataclasses.dataclass(slots=True)
class Taken:
    """The head entries a cut took, in order."""

    first_seq: int
    first_t_ms: int
    last_seq: int
    datas: list[bytes]
    ids: list[str]


class Window:
    def __init__(self) -> None:
        self.runs: deque[Run] = deque()
        self.entries = 0
        self.bytes = 0  # each entry's JSON and the comma (or bracket) it adds to an array

    def __len__(self) -> int:
        return self.entries

    def __bool__(self) -> bool:
        return self.entries > 0

    def __iter__(self) -> Iterator[Buffered]:
        for run in self.runs:
            for i in range(run.start, len(run.datas)):
                yield Buffered(run.first_seq + i, run.t_ms, run.arrival, run.datas[i], run.ids[i])

    def append(self, run: Run) -> None:
        count = len(run.datas) - run.start
        self.runs.append(run)
        self.entries += count
        self.bytes += sum(map(len, run.datas[run.start :] if run.start else run.datas)) + count

    @property
    def head_seq(self) -> int:
        run = self.runs[0]
        return run.first_seq + run.start

    @property
    def head_arrival(self) -> float:
        return self.runs[0].arrival

    def take(self, max_entries: int, max_bytes: int | None, limit: int | None) -> Taken | None:
        """Pop head entries: at most `max_entries`, none past seq `limit`, and within
        `max_bytes` as an array (its brackets counted), except that the first is always taken."""
        datas: list[bytes] = []
        ids: list[str] = []
        first_seq = first_t_ms = last_seq = 0
        size = 1
        runs = self.runs
        while runs and len(datas) < max_entries:
            run = runs[0]
            head = run.first_seq + run.start
            if limit is not None and head > limit:
                break
            end = min(len(run.datas), run.start + max_entries - len(datas))
            if limit is not None:
                end = min(end, limit - run.first_seq + 1)
            chunk = run.datas[run.start : end]
            cost = sum(map(len, chunk)) + len(chunk)
            full = max_bytes is None or size + cost <= max_bytes
            if not full:
                assert max_bytes is not None
                # The batch boundary falls inside this run: entry by entry up to it.
                cost = 0
                for n, data in enumerate(chunk):
                    if (datas or n) and size + cost + len(data) + 1 > max_bytes:
                        end = run.start + n
                        break
                    cost += len(data) + 1
                chunk = run.datas[run.start : end]
                if not chunk:
                    break
            if not datas:
                first_seq, first_t_ms = head, run.t_ms
            datas += chunk
            ids += run.ids[run.start : end]
            last_seq = run.first_seq + end - 1
            size += cost
            self.entries -= len(chunk)
            self.bytes -= cost
            if end == len(run.datas):
                runs.popleft()
            else:
                run.start = end
            if not full:
                break
        if not datas:
            return None
        return Taken(first_seq, first_t_ms, last_seq, datas, ids)
