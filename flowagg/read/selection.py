"""Which stored entries a read command looks at: time range, users, actions (export, report)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import orjson

from flowagg.core.durations import parse_duration_ms
from flowagg.core.errors import EXIT_USAGE, FlowaggError
from flowagg.read.batchread import BatchPath, Unread, copies_by_batch, iter_batch_bytes
from flowagg.read.fanout import map_chunks

R = TypeVar("R")
Matcher = Callable[[dict[str, Any]], bool]
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

    def matcher(self) -> Matcher | None:
        """A test for one entry, or None when every entry is selected (the fast path)."""
        if self.since_ms is None and self.until_ms is None and not self.users and not self.actions:
            return None
        since = self.since_ms if self.since_ms is not None else -(2**63)
        until = self.until_ms if self.until_ms is not None else 2**63
        users, actions = self.users, self.actions

        def match(entry: dict[str, Any]) -> bool:
            ts = entry.get("timestamp")
            user, action = entry.get("userId"), entry.get("action")
            # A damaged file's userId or action can be a list or an object: never selected,
            # and no `in` on a set, where it is unhashable.
            return (
                isinstance(ts, int)
                and since <= ts < until
                and (not users or (isinstance(user, str) and user in users))
                and (not actions or (isinstance(action, str) and action in actions))
            )

        return match


@dataclasses.dataclass
class Unreadable:
    """A batch file a reader skipped: reported at the end, never silently dropped."""

    file: str
    reason: str


@dataclasses.dataclass
class Copy:
    """Another file of a batch whose entries were read from `read_from`: not counted again."""

    file: str
    batch_id: str
    read_from: str
    reason: str | None = None  # why this copy was not the one read, when it was tried first

    def line(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (
            f"not counted {self.file}{why}: batch {self.batch_id} was read from its copy"
            f" {self.read_from}; keep one copy"
        )


@dataclasses.dataclass
class Skipped:
    """What a reader did not count, and why."""

    unreadable: list[Unreadable] = dataclasses.field(default_factory=list)
    copies: list[Copy] = dataclasses.field(default_factory=list)


def _entries(data: bytes | Unread, *, whole: bool) -> list[Any] | str:
    """A batch's entries, or why there are none; `whole`: the checksum must match too."""
    if isinstance(data, Unread):
        return data.reason
    try:
        doc = orjson.loads(data)
        entries = doc["entries"]
        if not isinstance(entries, list):
            raise TypeError("entries is not an array")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        return f"not a batch ({exc})"
    if whole and (
        doc.get("entryCount") != len(entries)
        or doc.get("entriesSha256") != hashlib.sha256(orjson.dumps(entries)).hexdigest()
    ):
        return "entryCount or entriesSha256 does not match its entries"
    return entries


def read_batch(
    group: Sequence[BatchPath], match: Matcher | None, limit: int, skipped: Skipped
) -> list[dict[str, Any]] | None:
    """The selected entries of one batch, in stored order; None when none of its files can be
    read or parsed (they go to `skipped.unreadable`: `flowagg validate` says why in detail; its
    entries are not guessed at).

    A batch stored in several files is read from one (`copies_by_batch` says in which order
    they are tried; with several, the first whole one); the others go to `skipped.copies`.
    """
    tried: list[tuple[BatchPath, str]] = []
    entries: list[Any] | None = None
    taken = group[0]
    for bp, data in iter_batch_bytes(group, limit):
        if entries is not None:
            skipped.copies.append(Copy(str(bp.path), bp.name_id, str(taken.path)))
            continue
        got = _entries(data, whole=len(group) > 1)
        if isinstance(got, str):
            tried.append((bp, got))
            continue
        entries, taken = got, bp
        for early, reason in tried:
            skipped.copies.append(Copy(str(early.path), bp.name_id, str(bp.path), reason))
    if entries is None:
        skipped.unreadable.extend(Unreadable(str(bp.path), reason) for bp, reason in tried)
        return None
    if match is None:
        return [e for e in entries if type(e) is dict]
    return [e for e in entries if type(e) is dict and match(e)]


Batch = tuple[int, list[BatchPath]]  # a batch's files, numbered in stored order


def map_batches(
    work: Callable[[Sequence[Batch]], tuple[R, Skipped]],
    files: list[BatchPath],
    skipped: Skipped,
    *,
    on_file: Callable[[], None] | None = None,
    most: int | None = None,
) -> Iterator[R]:
    """`work`'s answers over consecutive runs of the files' batches, in stored order, computed
    in worker processes (`fanout`); what each run did not count is added to `skipped` in the
    same order, so the lists read as if one process had read every file in turn. `most`:
    batches in one run at most (fanout.map_chunks)."""
    batches = list(enumerate(copies_by_batch(files)))
    for part, (answer, got) in map_chunks(work, batches, most=most):
        skipped.unreadable.extend(got.unreadable)
        skipped.copies.extend(got.copies)
        if on_file is not None:
            for _ in itertools.chain.from_iterable(group for _, group in part):
                on_file()
        yield answer
