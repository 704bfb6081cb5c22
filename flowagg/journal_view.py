"""A read-only look at the journal for the read commands (validate --full, diagnostics).

Unlike the start-up scan (`journal_reader.scan`), this never quarantines, truncates or
writes anything, and takes no lock: a running daemon may append meanwhile, so what it shows
is a moment's view. Bad or torn lines are counted and skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from .journal_format import list_segments, read_summary, unframe

_DONE_PREFIX = b'{"k":"d"'


@dataclasses.dataclass
class JournalView:
    segments: list[Path]
    bytes: int
    done_seq: int  # every entry up to this seq is stored
    done_batch: str | None  # the batch named by the done record that says so
    bad_lines: int = 0


@dataclasses.dataclass(frozen=True)
class Waiting:
    """One journaled entry not yet covered by a done record."""

    seq: int
    arrival_ms: int
    entry_id: str | None
    segment: str


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def view(directory: Path) -> JournalView:
    segments = list_segments(directory)
    done_seq, done_batch, bad = 0, None, 0
    summaries = [read_summary(p) for p in segments]
    summarized_done = max((s[0].done_seq for s in summaries if s is not None), default=0)
    for path, summary in zip(segments, summaries, strict=True):
        # A summarized segment is read only if it holds the highest done record (for its id).
        if summary is not None and (summary[0].done_seq < summarized_done or not summarized_done):
            continue
        try:
            with path.open("rb") as fh:
                for line in fh:
                    if line[9:17] != _DONE_PREFIX:
                        continue
                    record = unframe(line)
                    if record is None:
                        bad += 1
                    elif record["q"] >= done_seq:
                        done_seq, done_batch = record["q"], record.get("b")
        except FileNotFoundError:
            continue  # compacted meanwhile: it held nothing that is waiting
    return JournalView(segments, sum(_size(p) for p in segments), done_seq, done_batch, bad)


def iter_waiting(journal: JournalView) -> Iterator[Waiting]:
    """Every entry after the done cursor, in journal order."""
    done = journal.done_seq
    for path in journal.segments:
        summary = read_summary(path)
        if summary is not None and summary[0].last_seq <= done:
            continue
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            continue
        with fh:
            for line in fh:
                if line[9:17] != b'{"k":"a"':
                    continue
                record = unframe(line)
                if record is None:
                    if line.endswith(b"\n"):
                        journal.bad_lines += 1
                    continue
                first, t = record["q"], record["t"]
                for i, entry in enumerate(record["e"]):
                    if first + i > done:
                        entry_id = entry.get("entryId") if isinstance(entry, dict) else None
                        yield Waiting(first + i, t, entry_id, path.name)
