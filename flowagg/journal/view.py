"""A read-only look at the journal for the read commands (validate --full, diagnostics).

Unlike the start-up scan (`journal_reader.scan`), this never quarantines, truncates or
writes anything, and takes no lock: a running daemon may append meanwhile, so what it shows
is a moment's view. Bad or torn lines are counted and skipped. A name that is not a regular
file (a FIFO, a link to a device) is never opened for a read: it is listed in `skipped`.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from flowagg.core.readsafe import NotRegular, kind_of, open_regular
from flowagg.journal.format import SegmentInfo, list_segments, read_summary, summary_path, unframe

_DONE_PREFIX = b'{"k":"d"'


@dataclasses.dataclass
class JournalView:
    segments: list[Path]
    bytes: int
    done_seq: int  # every entry up to this seq is stored
    done_batch: str | None  # the batch named by the done record that says so
    bad_lines: int = 0
    # Names that are not regular files, with what each is: ("seg-000001.log", "a FIFO").
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def skip(self, path: Path, kind: str) -> None:
        if (path.name, kind) not in self.skipped:
            self.skipped.append((path.name, kind))


@dataclasses.dataclass(frozen=True)
class Waiting:
    """One journaled entry not yet covered by a done record."""

    seq: int
    arrival_ms: int
    entry_id: str | None
    segment: str


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _special(path: Path) -> str | None:
    """What the name is when it is not a regular file; None for a regular or a gone one."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else kind_of(mode)


def _summary(path: Path, journal: JournalView) -> tuple[SegmentInfo, int] | None:
    """The segment's summary, unless its file is not a regular one (then the segment is read)."""
    kind = _special(summary_path(path))
    if kind is not None:
        journal.skip(summary_path(path), kind)
        return None
    return read_summary(path)


def view(directory: Path) -> JournalView:
    journal = JournalView([], 0, 0, None)
    segments: list[Path] = []
    for path in list_segments(directory):
        kind = _special(path)
        if kind is None:
            segments.append(path)
        else:
            journal.skip(path, kind)
    done_seq, done_batch, bad = 0, None, 0
    summaries = [_summary(p, journal) for p in segments]
    summarized_done = max((s[0].done_seq for s in summaries if s is not None), default=0)
    for path, summary in zip(segments, summaries, strict=True):
        # A summarized segment is read only if it holds the highest done record (for its id).
        if summary is not None and (summary[0].done_seq < summarized_done or not summarized_done):
            continue
        try:
            with open_regular(path) as fh:
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
        except NotRegular as exc:  # swapped since it was listed
            journal.skip(path, exc.kind)
    journal.segments = segments
    journal.bytes = sum(_size(p) for p in segments)
    journal.done_seq, journal.done_batch, journal.bad_lines = done_seq, done_batch, bad
    return journal


def iter_waiting(journal: JournalView) -> Iterator[Waiting]:
    """Every entry after the done cursor, in journal order."""
    done = journal.done_seq
    for path in journal.segments:
        summary = _summary(path, journal)
        if summary is not None and summary[0].last_seq <= done:
            continue
        try:
            fh = open_regular(path)
        except FileNotFoundError:
            continue
        except NotRegular as exc:
            journal.skip(path, exc.kind)
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
