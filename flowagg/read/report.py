"""`flowagg report`: entry counts and sums of `metadata.duration` per group (SPEC §8).

One pass over the stored entries; memory grows with the number of groups, not of entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flowagg.core.humanize import utc_moment
from flowagg.read.selection import Batch, Selection, Skipped, read_batch

DIMENSIONS = ("user", "action", "task", "day")
NO_TASK = "(none)"
NO_TIME = "(no time)"


def parse_by(text: str) -> tuple[str, ...]:
    dims = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [d for d in dims if d not in DIMENSIONS]
    if not dims or bad:
        raise ValueError(
            f"{text!r}: group by one or more of {', '.join(DIMENSIONS)}, comma-separated"
        )
    if len(set(dims)) != len(dims):
        raise ValueError(f"{text!r}: names a dimension twice")
    return dims


def _day_key() -> Callable[[dict[str, Any]], str]:
    days: dict[int, str] = {}  # a day's name is made once, not once per entry

    def day(entry: dict[str, Any]) -> str:
        ts = entry.get("timestamp")
        if type(ts) is not int:
            return NO_TIME
        index = ts // 86_400_000
        name = days.get(index)
        if name is None:
            moment = utc_moment(index * 86_400)
            # Before the year 1 or after 9999: no day can name it.
            name = NO_TIME if moment is None else moment.date().isoformat()
            days[index] = name
        return name

    return day


def _task(entry: dict[str, Any]) -> str:
    metadata = entry.get("metadata")
    task = metadata.get("taskId") if type(metadata) is dict else None
    return task if type(task) is str else NO_TASK


def _text(field: str) -> Callable[[dict[str, Any]], str]:
    def get(entry: dict[str, Any]) -> str:
        value = entry.get(field)
        return value if type(value) is str else str(value)

    return get


def _key_functions(by: tuple[str, ...]) -> list[Callable[[dict[str, Any]], str]]:
    made: dict[str, Callable[[], Callable[[dict[str, Any]], str]]] = {
        "user": lambda: _text("userId"),
        "action": lambda: _text("action"),
        "task": lambda: _task,
        "day": _day_key,
    }
    return [made[d]() for d in by]


@dataclasses.dataclass(slots=True)
class Group:
    entries: int = 0
    duration_ms: int = 0


@dataclasses.dataclass
class Totals:
    by: tuple[str, ...]
    groups: dict[tuple[str, ...], Group]
    entries: int = 0
    duration_ms: int = 0

    def merge(self, share: Share) -> None:
        """Add a worker's share of the same report (`totals_of_batches`); sums do not depend
        on the order."""
        shares, entries, duration_ms = share
        groups = self.groups
        for key, (n, ms) in shares.items():
            group = groups.get(key)
            if group is None:
                groups[key] = Group(n, ms)
            else:
                group.entries += n
                group.duration_ms += ms
        self.entries += entries
        self.duration_ms += duration_ms

    def ranked(self, top: int | None) -> list[tuple[tuple[str, ...], Group]]:
        """Longest time first, then most entries, then by name: the same data, the same list."""
        ordered = sorted(
            self.groups.items(), key=lambda kv: (-kv[1].duration_ms, -kv[1].entries, kv[0])
        )
        return ordered if top is None else ordered[:top]

    def as_dict(self, top: int | None) -> dict[str, Any]:
        return {
            "by": list(self.by),
            "groups": [
                {
                    "key": dict(zip(self.by, key, strict=True)),
                    "entries": g.entries,
                    "durationMs": g.duration_ms,
                }
                for key, g in self.ranked(top)
            ],
            "groupCount": len(self.groups),
            "total": {"entries": self.entries, "durationMs": self.duration_ms},
        }


def _key_of(
    keys: list[Callable[[dict[str, Any]], str]],
) -> Callable[[dict[str, Any]], tuple[str, ...]]:
    """One group's key; the common arities without a loop (this runs once per entry)."""
    if len(keys) == 1:
        (k0,) = keys
        return lambda e: (k0(e),)
    if len(keys) == 2:
        k0, k1 = keys
        return lambda e: (k0(e), k1(e))
    return lambda e: tuple([k(e) for k in keys])


def totals(lists: Iterable[list[dict[str, Any]]], by: tuple[str, ...]) -> Totals:
    """Count and sum every entry of every list (one list per batch file)."""
    keys = _key_functions(by)
    key_of = _key_of(keys)
    groups: dict[tuple[str, ...], Group] = {}
    count = duration_sum = 0
    for entries in lists:
        for entry in entries:
            key = key_of(entry)
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group()
            metadata = entry.get("metadata")
            duration = metadata.get("duration", 0) if type(metadata) is dict else 0
            if type(duration) is not int or duration < 0:
                duration = 0  # validate reports such an entry; here it counts, with no time
            group.entries += 1
            group.duration_ms += duration
            duration_sum += duration
        count += len(entries)
    return Totals(by, groups, count, duration_sum)


# A report's share holds a sum per group, not per entry: the more batches one worker sums, the
# less there is to send and merge (the answer stays as small as the groups are few).
SHARE_BATCHES = 512
# A report's share as plain tuples: a worker's answer pickles in C, a Group would not.
Share = tuple[dict[tuple[str, ...], tuple[int, int]], int, int]


def totals_of_batches(
    params: tuple[tuple[str, ...], Selection, int], batches: Sequence[Batch]
) -> tuple[Share, Skipped]:
    """One worker's share of a report (`map_batches`): the totals of these batches."""
    by, selection, limit = params
    match = selection.matcher()
    skipped = Skipped()
    lists = (read_batch(group, match, limit, skipped) for _, group in batches)
    part = totals((entries for entries in lists if entries is not None), by)
    groups = {key: (g.entries, g.duration_ms) for key, g in part.groups.items()}
    return (groups, part.entries, part.duration_ms), skipped
