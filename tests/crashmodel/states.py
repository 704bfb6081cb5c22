"""Every distinct crash state of a recorded operation list (bounded and sampled where many).

A crash point is just before a barrier (or at the end): the states of any instant between
two barriers are among those of the point before the second, since everything in between
may still be lost. At a point, the durable operations are kept; of the others, every subset
is taken when there are few, else a systematic set (all, none, all but one, only one, each
prefix in order) plus seeded random subsets; and each write not yet durable is also tried
cut in half with the rest kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
from collections.abc import Iterator

from flowagg.core.fsutil import TEMP_MARK
from tests.crashmodel.model import DIR, Ack, Barrier, Data, External, Fs, Link, Op, State

FULL_SUBSETS_UP_TO = 8  # non-durable operations at a point: every subset up to 2**8
RANDOM_SUBSETS = 24


def fixed_at(ops: list[Op]) -> list[int]:
    """For each operation, the index of the barrier that makes it durable (len(ops): none)."""
    never = len(ops)
    result = [never] * len(ops)
    pending_data: dict[int, list[int]] = {}
    pending_dirs: dict[int, list[int]] = {}
    waiting: dict[int, set[int]] = {}  # Link index -> directories still to be fsynced
    for i, op in enumerate(ops):
        if isinstance(op, Data):
            pending_data.setdefault(op.ino, []).append(i)
        elif isinstance(op, Link):
            waiting[i] = set(op.dirs)
            for d in op.dirs:
                pending_dirs.setdefault(d, []).append(i)
        elif isinstance(op, Barrier):
            for j in pending_data.pop(op.ino, []):
                result[j] = i
            if op.is_dir:
                for j in pending_dirs.pop(op.ino, []):
                    waiting[j].discard(op.ino)
                    if not waiting[j]:
                        result[j] = i
    return result


def crash_points(ops: list[Op]) -> list[int]:
    return [i for i, op in enumerate(ops) if isinstance(op, Barrier)] + [len(ops)]


@dataclasses.dataclass(frozen=True)
class Choice:
    """A crash state: the point, the non-durable operations dropped, a write cut short."""

    point: int
    dropped: frozenset[int]
    cut: tuple[int, int] | None = None  # (op index, bytes kept)

    def describe(self, ops: list[Op]) -> str:
        parts = [f"crash before op {self.point}"]
        names = [_op_text(ops[i], i) for i in sorted(self.dropped) if isinstance(ops[i], Link)]
        writes = len(self.dropped) - len(names)
        if names:
            parts.append("dropped the names " + ", ".join(names))
        if writes:
            parts.append(f"dropped {writes} unsynced writes")
        if self.cut:
            parts.append(f"op {self.cut[0]} cut to {self.cut[1]} bytes")
        return "; ".join(parts)


def _op_text(op: Op, i: int) -> str:
    if isinstance(op, Link):
        return f"#{i} names {[(n, ino) for _, n, ino in op.edits]}"
    if isinstance(op, Data):
        kind = f"truncate {op.truncate}" if op.truncate is not None else f"{len(op.data)} bytes"
        return f"#{i} inode {op.ino} {kind} at {op.offset}"
    return f"#{i} {op}"


def droppable(ops: list[Op], point: int, fixed: list[int]) -> list[int]:
    return [i for i in range(point) if isinstance(ops[i], Link | Data) and fixed[i] >= point]


def choices_at(
    ops: list[Op], point: int, fixed: list[int], rng: random.Random
) -> tuple[int, Iterator[Choice]]:
    """(how many subsets exist at `point`, the choices to try there, systematic ones first)."""
    loose = droppable(ops, point, fixed)
    n = len(loose)

    def generate() -> Iterator[Choice]:
        yield Choice(point, frozenset())
        # A lost name is what start-up must cope with most: each alone comes first.
        for i in loose:
            if isinstance(ops[i], Link):
                yield Choice(point, frozenset([i]))
        if n <= FULL_SUBSETS_UP_TO:
            for size in range(1, n + 1):
                for combo in itertools.combinations(loose, size):
                    yield Choice(point, frozenset(combo))
        else:
            for i in loose:
                yield Choice(point, frozenset([i]))
            yield Choice(point, frozenset(loose))
            for i in loose:
                yield Choice(point, frozenset(loose) - {i})
            for k in range(1, n):
                yield Choice(point, frozenset(loose[k:]))
            for _ in range(RANDOM_SUBSETS):
                yield Choice(point, frozenset(i for i in loose if rng.random() < 0.5))
        for i in loose:
            op = ops[i]
            if isinstance(op, Data) and op.truncate is None and len(op.data) > 1:
                yield Choice(point, frozenset(), (i, len(op.data) // 2))

    return 2**n, generate()


def build(base: Fs, ops: list[Op], choice: Choice) -> State:
    fs = base.copy()
    for i in range(choice.point):
        if i not in choice.dropped:
            cut = choice.cut[1] if choice.cut and choice.cut[0] == i else None
            fs.apply(ops[i], cut)
    return fs.state()


def acked_replies(ops: list[Op], point: int) -> int:
    return sum(1 for op in ops[:point] if isinstance(op, Ack))


def external_at(ops: list[Op], point: int) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for op in ops[:point]:
        if isinstance(op, External):
            out[op.name] = out.get(op.name, b"") + op.data
    return out


def publishes(op: Op) -> bool:
    """Whether a name operation touches a name other than a temp file's."""
    return isinstance(op, Link) and any(TEMP_MARK not in name for _, name, _ in op.edits)


def digest(state: State) -> str:
    h = hashlib.sha256()
    for rel in sorted(state):
        content = state[rel]
        h.update(
            rel.encode() + (b"/" if content is DIR else b"=" + hashlib.sha256(content).digest())
        )
    return h.hexdigest()


@dataclasses.dataclass
class Found:
    choice: Choice
    state: State
    replies: int  # add replies acknowledged at its point
    external: dict[str, bytes]
    # Temp files' names aside: a name was lost while a later one was kept (only POSIX allows
    # it), and how many names not yet durable it drops.
    reordered: bool
    names_lost: int


def distinct_states(
    base: Fs, ops: list[Op], points: list[int], seed: int = 0
) -> tuple[int, list[Found]]:
    """(subsets that exist over all points, the distinct states in the order tried).

    Points are walked from the last: a state met again at an earlier point is kept with the
    later point's acknowledgements, the stricter check.
    """
    rng = random.Random(seed)
    fixed = fixed_at(ops)
    seen: set[str] = set()
    found: list[Found] = []
    total = 0
    for point in sorted(points, reverse=True):
        count, choices = choices_at(ops, point, fixed, rng)
        total += count
        names = [i for i in droppable(ops, point, fixed) if publishes(ops[i])]
        replies, external = acked_replies(ops, point), external_at(ops, point)
        for choice in choices:
            state = build(base, ops, choice)
            key = digest(state) + repr(sorted(external.items()))
            if key not in seen:
                seen.add(key)
                lost = [i for i in names if i in choice.dropped]
                reordered = bool(lost) and any(i > lost[0] for i in names if i not in lost)
                found.append(Found(choice, state, replies, external, reordered, len(lost)))
    return total, found
