"""Reading the journal: the start-up scan and the records after a position."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .dedupe import DedupeIndex
from .fsutil import quarantine_bytes
from .journal_format import (
    FORMAT_VERSION,
    JournalVersionError,
    Position,
    SegmentInfo,
    list_segments,
    segment_number,
    unframe,
)

log = logging.getLogger("flowagg.journal")


@dataclasses.dataclass
class ScanResult:
    segments: list[SegmentInfo]
    next_seq: int
    done_seq: int
    dedupe: DedupeIndex
    backlog: Position | None
    backlog_entries: int
    backlog_bytes: int
    spool_sources: set[str]
    quarantined: list[Path]
    clean_tail: bool = True  # False: the last segment ends in bytes that are not a record


def scan(
    directory: Path,
    errors_dir: Path,
    *,
    now_ms: int,
    dedupe: DedupeIndex,
) -> ScanResult:
    """Read every segment once: catch the dedupe index up, find the backlog, cut a torn tail.

    `dedupe` is opened here; the records after its checkpoint are replayed into it.

    Bad lines in the middle of the journal are copied to errors/ (the segment stays as it is
    until compaction); bad bytes at the end of the last segment are quarantined and cut off.
    """
    segments: list[SegmentInfo] = []
    clean_tail = True
    next_seq = 1
    done_seq = 0
    dedupe.open(now_ms)
    replay_after = dedupe.checkpoint
    spool_sources: set[str] = set()
    quarantined: list[Path] = []
    # Entries after the done cursor are only counted once the cursor is known, so keep the
    # first position of each add record whose last seq may be beyond it.
    add_records: list[tuple[Position, int, int, int]] = []  # pos, first seq, last seq, bytes
    horizon = now_ms - dedupe.window_ms
    paths = list_segments(directory)
    for index, path in enumerate(paths):
        info = SegmentInfo(number=segment_number(path), path=path)
        is_last = index == len(paths) - 1
        bad_from: int | None = None
        offset = 0
        with path.open("rb") as fh:
            for line in fh:
                record = unframe(line)
                if record is None:
                    if bad_from is None:
                        bad_from = offset
                    offset += len(line)
                    continue
                if bad_from is not None:
                    _quarantine_range(
                        path, bad_from, offset, errors_dir, now_ms, "corrupt", quarantined
                    )
                    bad_from = None
                kind = record["k"]
                if kind == "a":
                    first = record["q"]
                    entries = record["e"]
                    last = first + len(entries) - 1
                    t = record["t"]
                    info.last_seq = max(info.last_seq, last)
                    info.max_t = max(info.max_t, t)
                    next_seq = max(next_seq, last + 1)
                    if last > replay_after and last >= first:
                        if t >= horizon:
                            ids = [entries[i]["entryId"] for i in record.get("c", ())]
                            dedupe.add(ids, t, last)
                        else:
                            dedupe.add([], t, last)
                    if "src" in record:
                        spool_sources.add(record["src"])
                    add_records.append((Position(info.number, offset), first, last, len(line)))
                elif kind == "d":
                    done_seq = max(done_seq, record["q"])
                elif kind == "h":
                    if record.get("v", 0) > FORMAT_VERSION:
                        raise JournalVersionError(
                            f"journal segment {path} has format version {record['v']}, newer"
                            f" than this flowagg ({FORMAT_VERSION}); upgrade flowagg"
                        )
                    next_seq = max(next_seq, record["seq"])
                offset += len(line)
        if bad_from is not None:
            what = "torn" if is_last else "corrupt"
            if _quarantine_range(path, bad_from, offset, errors_dir, now_ms, what, quarantined):
                if is_last:
                    with path.open("r+b") as fh:
                        fh.truncate(bad_from)
                        os.fsync(fh.fileno())
                    offset = bad_from
                    log.warning("journal %s: cut a torn tail at byte %d", path.name, bad_from)
            elif is_last:
                # The bad bytes could not be copied out, so they stay (nothing is dropped),
                # and new records go to a fresh segment rather than after them.
                clean_tail = False
        info.size = offset
        segments.append(info)

    backlog: Position | None = None
    backlog_entries = 0
    backlog_bytes = 0
    for pos, first, last, size in add_records:
        if last >= first and last > done_seq:  # a spool file with no valid entry has none
            if backlog is None:
                backlog = pos
            pending = last - max(first - 1, done_seq)
            backlog_entries += pending
            backlog_bytes += size * pending // (last - first + 1)
    return ScanResult(
        segments=segments,
        next_seq=next_seq,
        done_seq=done_seq,
        dedupe=dedupe,
        backlog=backlog,
        backlog_entries=backlog_entries,
        backlog_bytes=backlog_bytes,
        spool_sources=spool_sources,
        quarantined=quarantined,
        clean_tail=clean_tail,
    )


def _quarantine_range(
    path: Path,
    start: int,
    end: int,
    errors_dir: Path,
    now_ms: int,
    what: str,
    quarantined: list[Path],
) -> bool:
    """Copy bad bytes to errors/; False (logged) when even that cannot be written."""
    with path.open("rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    # A fixed name: the same bad range found again at the next start replaces its copy.
    name = f"journal-{path.stem}-{start}.{what}"
    reason = (
        "torn record at the end of the journal (the write was cut by a crash)"
        if what == "torn"
        else "journal record failed its checksum"
    )
    try:
        target = quarantine_bytes(
            errors_dir,
            name,
            data,
            reason=reason,
            component="journal",
            now_ms=now_ms,
            extra={"segment": path.name, "offset": start, "length": end - start},
            overwrite=True,
        )
    except OSError as exc:
        log.error(
            "journal %s: %d bad bytes at %d cannot be copied to errors/ (%s); left in place",
            path.name,
            end - start,
            start,
            exc,
        )
        return False
    quarantined.append(target)
    log.warning(
        "journal %s: %d bad bytes at %d quarantined to %s",
        path.name,
        end - start,
        start,
        target.name,
    )
    return True


@dataclasses.dataclass
class JournalRecord:
    first_seq: int
    t_ms: int
    entries: list[dict[str, Any]]
    after: Position  # where the next record starts


def read_records(
    directory: Path,
    start: Position,
    end: Position | None,
    paths: list[Path] | None = None,
) -> Iterator[JournalRecord]:
    """Yield the add records from `start` (a record boundary) up to `end` (exclusive).

    `paths` (the segments, oldest first) saves listing the folder when the caller knows them.
    """
    if paths is None:
        paths = list_segments(directory)
    for path in paths:
        number = segment_number(path)
        if number < start.segment:
            continue
        if end is not None and number > end.segment:
            return
        growing = path == paths[-1] or (end is not None and number == end.segment)
        offset = start.offset if number == start.segment else 0
        limit = end.offset if end is not None and number == end.segment else None
        with path.open("rb") as fh:
            fh.seek(offset)
            for line in fh:
                if limit is not None and offset >= limit:
                    break
                offset += len(line)
                record = unframe(line)
                if record is None:
                    if growing and not line.endswith(b"\n"):
                        return  # a record still being written: the end for now
                    continue  # a bad line scan() already quarantined
                if record["k"] == "a":
                    yield JournalRecord(
                        record["q"], record["t"], record["e"], Position(number, offset)
                    )
