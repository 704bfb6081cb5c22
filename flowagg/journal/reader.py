"""Reading the journal: the start-up scan and the records after a position."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flowagg.core.fsutil import quarantine_bytes
from flowagg.journal.dedupe import DedupeIndex
from flowagg.journal.format import (
    CUTS_VERSION,
    FORMAT_VERSION,
    Cut,
    JournalVersionError,
    Position,
    SegmentInfo,
    SpoolProgress,
    decode_cut,
    list_segments,
    note_spool_chunk,
    read_summary,
    segment_number,
    summary_path,
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
    spool_sources: SpoolProgress
    quarantined: list[Path]
    clean_tail: bool = True  # False: the last segment ends in bytes that are not a record
    # Journaled cuts not yet covered by the done cursor, by first seq: rebuilt exactly.
    cuts: list[Cut] = dataclasses.field(default_factory=list)
    # Backlog entries up to this seq lie in segments older than cut records: batches made
    # of them may be stored without a cut on record (see published.py).
    uncut_until: int = 0


def scan(
    directory: Path,
    errors_dir: Path,
    *,
    now_ms: int,
    dedupe: DedupeIndex,
) -> ScanResult:
    """Find where the journal stands: catch the dedupe index up, find the backlog, cut a torn tail.

    `dedupe` is opened here; the records after its checkpoint are replayed into it. A closed
    segment with a summary is parsed only if it holds entries after the done cursor (the
    backlog) or client ids the index may lack; so a start reads summaries and the tail.

    Bad lines in the middle of the journal are copied to errors/ (the segment stays as it is
    until compaction); bad bytes at the end of the last segment are quarantined and cut off.
    """
    dedupe.open()
    paths = list_segments(directory)
    if paths:
        # The writer appends to the last segment: its summary (a crash right after rollover
        # can leave one) would go stale.
        summary_path(paths[-1]).unlink(missing_ok=True)
    summaries = [read_summary(p) for p in paths[:-1]] + [None] if paths else []
    # The done cursor first: it decides which summarized segments still need a parse.
    done_seq = max((s[0].done_seq for s in summaries if s is not None), default=0)
    for path, summary in zip(paths, summaries, strict=True):
        if summary is None:
            done_seq = max(done_seq, _done_records(path))
    # Ids older than this are past the window however the expiry clock is anchored (it starts
    # at the newest arrival time, never after now): replaying fewer would forget live ids.
    newest = max((s[0].max_t for s in summaries if s is not None), default=0)
    horizon = min(now_ms, newest) - dedupe.window_ms
    state = _Scan(errors_dir, now_ms, dedupe, done_seq, horizon)
    for index, (path, summary) in enumerate(zip(paths, summaries, strict=True)):
        if summary is not None:
            info, next_seq = summary
            holds_ids = info.last_seq > dedupe.checkpoint and info.max_t >= horizon
            if max(info.last_seq, info.cut_seq) <= done_seq and not holds_ids:
                state.skip(info, next_seq)
                continue
        state.parse(path, is_last=index == len(paths) - 1)
    # A damaged tail set aside can take records the stores already hold: were their seqs
    # given again, a later start would replay none of the new records (each store replays
    # only above its checkpoint) and forget their client ids.
    state.next_seq = max(state.next_seq, dedupe.top_checkpoint + 1)
    return state.result()


def _done_records(path: Path) -> int:
    """The highest done record in a segment, without parsing its add records."""
    done = 0
    with path.open("rb") as fh:
        for line in fh:
            if line[9:17] == b'{"k":"d"':
                record = unframe(line)
                if record is not None:
                    done = max(done, record["q"])
    return done


class _Scan:
    def __init__(
        self, errors_dir: Path, now_ms: int, dedupe: DedupeIndex, done_seq: int, horizon: int
    ) -> None:
        self.errors_dir = errors_dir
        self.now_ms = now_ms
        self.dedupe = dedupe
        self.replay_after = dedupe.checkpoint
        self.horizon = horizon
        self.done_seq = done_seq
        self.segments: list[SegmentInfo] = []
        self.next_seq = 1
        self.spool_sources: SpoolProgress = {}
        self.quarantined: list[Path] = []
        self.clean_tail = True
        self.backlog: Position | None = None
        self.backlog_entries = 0
        self.backlog_bytes = 0
        self.cuts: dict[int, Cut] = {}
        self.uncut_until = 0

    def skip(self, info: SegmentInfo, next_seq: int) -> None:
        """Take a summarized segment as it describes itself."""
        self.segments.append(info)
        self.next_seq = max(self.next_seq, next_seq, info.last_seq + 1, info.cut_seq + 1)
        for name, (end, done) in info.sources.items():
            note_spool_chunk(self.spool_sources, name, end, done)
        if info.last_seq > self.replay_after:
            self.dedupe.add([], info.max_t, info.last_seq)  # all its client ids have expired

    def parse(self, path: Path, *, is_last: bool) -> None:
        # Until its header is read, a segment is taken for the oldest kind.
        info = SegmentInfo(number=segment_number(path), path=path, version=1)
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
                    self._quarantine(path, bad_from, offset, "corrupt")
                    bad_from = None
                self._record(info, record, offset, len(line))
                offset += len(line)
        if bad_from is not None:
            what = "torn" if is_last else "corrupt"
            if self._quarantine(path, bad_from, offset, what):
                if is_last:
                    with path.open("r+b") as fh:
                        fh.truncate(bad_from)
                        os.fsync(fh.fileno())
                    offset = bad_from
                    log.warning("journal %s: cut a torn tail at byte %d", path.name, bad_from)
            elif is_last:
                # The bad bytes could not be copied out, so they stay (nothing is dropped),
                # and new records go to a fresh segment rather than after them.
                self.clean_tail = False
        info.size = offset
        self.segments.append(info)

    def _record(self, info: SegmentInfo, record: dict[str, Any], offset: int, size: int) -> None:
        kind = record["k"]
        info.records += kind != "h"  # as the writer counts them: adds and done records
        if kind == "a":
            first = record["q"]
            entries = record["e"]
            last = first + len(entries) - 1
            t = record["t"]
            info.last_seq = max(info.last_seq, last)
            info.max_t = max(info.max_t, t)
            self.next_seq = max(self.next_seq, last + 1)
            if last > self.replay_after and last >= first:
                live = t >= self.horizon
                ids = [entries[i]["entryId"] for i in record.get("c", ())] if live else []
                self.dedupe.add(ids, t, last)
            if "src" in record:
                off, fin = record.get("off"), record.get("fin", False)
                note_spool_chunk(info.sources, record["src"], off, fin)
                note_spool_chunk(self.spool_sources, record["src"], off, fin)
            if last >= first and last > self.done_seq:  # a spool file with no valid entry has none
                if info.version < CUTS_VERSION:
                    self.uncut_until = max(self.uncut_until, last)
                if self.backlog is None:
                    self.backlog = Position(info.number, offset)
                pending = last - max(first - 1, self.done_seq)
                self.backlog_entries += pending
                self.backlog_bytes += size * pending // (last - first + 1)
        elif kind == "c":
            cut = decode_cut(record)
            info.cut_seq = max(info.cut_seq, cut.last_seq)
            # The cut names its seqs even when their add record was damaged since: a new
            # entry given one of them would be cut into this batch's id.
            self.next_seq = max(self.next_seq, cut.last_seq + 1)
            if cut.last_seq > self.done_seq:
                # A cut journaled again after a failed write is the same cut.
                self.cuts[cut.first_seq] = cut
        elif kind == "d":
            info.done_seq = max(info.done_seq, record["q"])
            self.next_seq = max(self.next_seq, record["q"] + 1)
        elif kind == "h":
            if record.get("v", 0) > FORMAT_VERSION:
                raise JournalVersionError(
                    f"journal segment {info.path} has format version {record['v']}, newer"
                    f" than this flowagg ({FORMAT_VERSION}); upgrade flowagg"
                )
            self.next_seq = max(self.next_seq, record["seq"])
            info.version = record.get("v", 1)

    def _quarantine(self, path: Path, start: int, end: int, what: str) -> bool:
        return _quarantine_range(
            path, start, end, self.errors_dir, self.now_ms, what, self.quarantined
        )

    def result(self) -> ScanResult:
        return ScanResult(
            segments=self.segments,
            next_seq=self.next_seq,
            done_seq=self.done_seq,
            dedupe=self.dedupe,
            backlog=self.backlog,
            backlog_entries=self.backlog_entries,
            backlog_bytes=self.backlog_bytes,
            spool_sources=self.spool_sources,
            quarantined=self.quarantined,
            clean_tail=self.clean_tail,
            cuts=[self.cuts[first] for first in sorted(self.cuts)],
            uncut_until=self.uncut_until,
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
