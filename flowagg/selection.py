"""Which stored entries a read command looks at: time range, users, actions (export, report)."""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from .batchread import BatchPath, iter_batch_bytes
from .durations import parse_duration_ms
from .errors import EXIT_USAGE, FlowaggError

_RELATIVE_RE = re.compile(r"\d+\s*(ms|s|m|h|d)")


def parse_when(text: str, *, now_ms: int, option: str) -> int:
    """`7d` (that long before now), `2024-01-31`, `2024-01-31T12:00:00[+02:00]` (UTC unless a
    zone is given) or epoch milliseconds, as epoch ms."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    if _RELATIVE_RE.fullmatch(value):
        return now_ms - parse_duration_ms(value)
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FlowaggError(
            f"{option} {text!r} is not a time; write e.g. 7d, 2024-01-31,"
            " 2024-01-31T12:00:00Z or epoch milliseconds",
            EXIT_USAGE,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


@dataclasses.dataclass(frozen=True)
class Selection:
    since_ms: int | None = None  # inclusive
    until_ms: int | None = None  # exclusive
    users: frozenset[str] = frozenset()
    actions: frozenset[str] = frozenset()

    def matcher(self) -> Callable[[dict[str, Any]], bool] | None:
        """A test for one entry, or None when every entry is selected (the fast path)."""
        if self.since_ms is None and self.until_ms is None and not self.users and not self.actions:
            return None
        since = self.since_ms if self.since_ms is not None else -(2**63)
        until = self.until_ms if self.until_ms is not None else 2**63
        users, actions = self.users, self.actions

        def match(entry: dict[str, Any]) -> bool:
            ts = entry.get("timestamp")
            return (
                isinstance(ts, int)
                and since <= ts < until
                and (not users or entry.get("userId") in users)
                and (not actions or entry.get("action") in actions)
            )

        return match


@dataclasses.dataclass
class Unreadable:
    """A batch file a reader skipped: reported at the end, never silently dropped."""

    file: str
    reason: str


def iter_entry_lists(
    files: list[BatchPath],
    selection: Selection,
    unreadable: list[Unreadable],
    *,
    on_file: Callable[[], None] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """The selected entries of every file, one list per file, each in stored order.

    A file that cannot be read or parsed goes to `unreadable` (`flowagg validate` says why
    in detail); its entries are not guessed at.
    """
    match = selection.matcher()
    for bp, data in iter_batch_bytes(files):
        if on_file is not None:
            on_file()
        if isinstance(data, OSError):
            unreadable.append(Unreadable(str(bp.path), data.strerror or str(data)))
            continue
        try:
            doc = orjson.loads(data)
            entries = doc["entries"]
            if not isinstance(entries, list):
                raise TypeError("entries is not an array")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            unreadable.append(Unreadable(str(bp.path), f"not a batch ({exc})"))
            continue
        if match is None:
            yield [e for e in entries if type(e) is dict]
        else:
            yield [e for e in entries if type(e) is dict and match(e)]
