"""Write-ahead journal: every accepted entry is fsync'd here before it is acknowledged.

Segments `journal/seg-<n>.log` hold one record per line: `<crc32 hex> <compact JSON>\\n`.
Records:
  {"k":"h","v":1,"seq":S}                    segment header; S = next unused seq at opening
  {"k":"a","q":Q,"t":MS,"e":[...],"c":[...],"src":NAME}
                                             accepted entries, seqs Q, Q+1, ...; `c` lists the
                                             indexes whose entryId came from the client (for
                                             dedupe); `src` names an adopted spool file
  {"k":"d","q":Q,"b":ID}                     batch ID holding every entry up to seq Q is stored

Batches are published strictly in journal order, so a done record is a cursor. Only the
batches published after the last durable done record need a look on disk at start (their
names follow from the journal, see storage.make_batch_id).

Group commit: appends queue up while the writer thread is in fsync; the next write takes
them all and one fsync makes the whole group durable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from .dedupe import DedupeIndex
from .fsutil import fsync_dir, quarantine_bytes

log = logging.getLogger("flowagg.journal")

FORMAT_VERSION = 1
# One add record stays small: the reader loads records whole, never parses one twice, and a
# record larger than the memory window is only loaded into an empty window.
MAX_RECORD_ENTRIES = 1000
MAX_RECORD_BYTES = 1 << 20
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".log"


def segment_name(number: int) -> str:
    return f"{SEGMENT_PREFIX}{number:08d}{SEGMENT_SUFFIX}"


def segment_number(path: Path) -> int:
    return int(path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)])


def list_segments(directory: Path) -> list[Path]:
    paths = [
        p
        for p in directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}")
        if p.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)].isdigit()
    ]
    return sorted(paths, key=segment_number)


def frame(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def unframe(line: bytes) -> dict[str, Any] | None:
    """Return the record in a line, or None when the line is torn or corrupt."""
    if len(line) < 11 or line[-1:] != b"\n" or line[8:9] != b" ":
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        record = orjson.loads(payload)
    except ValueError:
        return None
    if not isinstance(record, dict) or "k" not in record:
        return None
    return record


def encode_add(
    first_seq: int,
    t_ms: int,
    entries: list[bytes],
    client_idx: list[int],
    src: str | None = None,
) -> bytes:
    parts = [b'{"k":"a","q":%d,"t":%d,"e":[' % (first_seq, t_ms), b",".join(entries), b"]"]
    if client_idx:
        parts.append(b',"c":' + orjson.dumps(client_idx))
    if src is not None:
        parts.append(b',"src":' + orjson.dumps(src))
    parts.append(b"}")
    return frame(b"".join(parts))


def split_add(
    entries: list[bytes], client_idx: list[int], max_entries: int, max_bytes: int
) -> list[tuple[int, int, list[int]]]:
    """Cut one add into records of at most `max_entries` entries and about `max_bytes`.

    Returns (start, end, client indexes relative to start) per record; at least one record,
    even for no entries (a spool file with none valid is still journaled).
    """
    pieces: list[tuple[int, int, list[int]]] = []
    start = 0
    size = 0
    marks = iter(client_idx)
    mark = next(marks, None)
    chunk_idx: list[int] = []
    for i, data in enumerate(entries):
        if i > start and (i - start >= max_entries or size + len(data) > max_bytes):
            pieces.append((start, i, chunk_idx))
            start, size, chunk_idx = i, 0, []
        size += len(data) + 1
        if mark == i:
            chunk_idx.append(i - start)
            mark = next(marks, None)
    pieces.append((start, len(entries), chunk_idx))
    return pieces


@dataclasses.dataclass
class Position:
    segment: int
    offset: int

    def key(self) -> tuple[int, int]:
        return (self.segment, self.offset)


@dataclasses.dataclass
class SegmentInfo:
    number: int
    path: Path
    size: int = 0
    last_seq: int = 0
    max_t: int = 0


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


class JournalVersionError(RuntimeError):
    pass


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


@dataclasses.dataclass
class Append:
    line: bytes
    callback: Callable[[BaseException | None, Position], None] | None
    first_seq: int = 0
    count: int = 0
    max_t: int = 0
    done_seq: int = 0


class JournalWriter:
    """The only writer of the journal: a thread that group-commits queued appends."""

    def __init__(
        self,
        directory: Path,
        *,
        segments: list[SegmentInfo],
        next_seq: int,
        segment_bytes: int,
        clean_tail: bool = True,
        deliver: Callable[[list[tuple[Append, BaseException | None, Position]]], None],
    ) -> None:
        self.directory = directory
        self.segments = list(segments)
        self.segment_bytes = segment_bytes
        self.max_record_entries = MAX_RECORD_ENTRIES
        self._deliver = deliver
        self._cond = threading.Condition()
        self._queue: list[Append] = []
        self._next_seq = next_seq
        self._stopping = False
        self._broken: BaseException | None = None
        self._fd: int | None = None
        self._need_new_segment = not self.segments or not clean_tail
        last = self.segments[-1] if self.segments else None
        self.durable = Position(last.number, last.size) if last else Position(0, 0)
        self.entries_written = 0
        self.durable_done_seq = 0
        self._unsynced_done_seq = 0
        self._unsynced = False  # bytes written to the current segment since its last fsync
        self.syncs = 0
        self.bytes_written = 0
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)

    # -- called from any thread -------------------------------------------------------------
    def start(self) -> None:
        if not self._need_new_segment:
            self._fd = os.open(self.segments[-1].path, os.O_WRONLY | os.O_APPEND)
        self._thread.start()

    def append_entries(
        self,
        entries: list[bytes],
        t_ms: int,
        client_idx: list[int],
        src: str | None,
        callback: Callable[[BaseException | None, Position], None],
    ) -> int:
        """Queue entries; returns the seq of the first. `callback` runs once durable (or not).

        A large add becomes several records queued together, so they share one write and one
        fsync; the callback rides on the last, which also carries `src`: a spool file counts
        as journaled only once all of its entries are.
        """
        pieces = split_add(entries, client_idx, self.max_record_entries, MAX_RECORD_BYTES)
        with self._cond:
            if self._broken is not None:
                raise self._broken
            first = self._next_seq
            self._next_seq += len(entries)
            for n, (start, end, idx) in enumerate(pieces):
                last = n == len(pieces) - 1
                line = encode_add(
                    first + start, t_ms, entries[start:end], idx, src=src if last else None
                )
                self._queue.append(
                    Append(line, callback if last else None, first + start, end - start, t_ms)
                )
            self._cond.notify()
        return first

    def append_done(self, last_seq: int, batch_id: str) -> None:
        payload = orjson.dumps({"k": "d", "q": last_seq, "b": batch_id})
        with self._cond:
            if self._broken is not None:
                return  # the done record only saves work at the next start; the batch is safe
            self._queue.append(Append(frame(payload), None, done_seq=last_seq))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        self._close_segment()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    # -- writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                group, self._queue = self._queue, []
                if not group and self._stopping:
                    return
            try:
                self._commit(group)
            except BaseException as exc:
                # Never leave a waiter hanging: fail this group and every later append.
                log.critical("journal writer failed: %r", exc)
                with self._cond:
                    self._broken = exc if isinstance(exc, OSError) else OSError(str(exc))
                    group += self._queue
                    self._queue = []
                self._deliver([(a, self._broken, self.durable) for a in group])
                return

    def _close_segment(self) -> None:
        """Close the current segment after making its unsynced done records durable.

        `durable_done_seq` advances on the next fsync, which happens on the new segment:
        without this one, compaction could trust a done record a power cut then erases.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._unsynced:
                os.fsync(fd)
                self._unsynced = False
                self.durable_done_seq = max(self.durable_done_seq, self._unsynced_done_seq)
        except OSError as exc:
            # Only done records can be unsynced here; they are hints, so trust none of them.
            log.error("journal %s: fsync at close failed (%s)", self.segments[-1].path, exc)
            self._unsynced = False
            self._unsynced_done_seq = self.durable_done_seq
        finally:
            os.close(fd)

    def _open_segment(self) -> None:
        self._close_segment()
        number = self.segments[-1].number + 1 if self.segments else 1
        path = self.directory / segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            header = frame(orjson.dumps({"k": "h", "v": FORMAT_VERSION, "seq": self._next_seq}))
            os.write(fd, header)
            os.fsync(fd)
            fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        self._fd = fd
        with self._cond:
            self.segments.append(SegmentInfo(number=number, path=path, size=len(header)))
        self._need_new_segment = False

    def _commit(self, group: list[Append]) -> None:
        results: list[tuple[Append, BaseException | None, Position]] = []
        try:
            if self._need_new_segment or self.segments[-1].size >= self.segment_bytes:
                self._open_segment()
        except OSError as exc:
            self._deliver([(a, exc, self.durable) for a in group])
            return
        assert self._fd is not None
        seg = self.segments[-1]
        start = seg.size
        data = b"".join(a.line for a in group)
        # Done records only save work at the next start, and their batches are already
        # durable: they ride on the next fsync instead of paying for one of their own.
        needs_sync = any(a.callback is not None for a in group)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            if needs_sync:
                os.fsync(self._fd)
        except OSError as exc:
            log.error("journal write failed: %s", exc)
            self._undo(seg, start)
            self._deliver([(a, exc, self.durable) for a in group])
            return
        offset = start
        for append in group:
            offset += len(append.line)
            results.append((append, None, Position(seg.number, offset)))
            if append.count:
                seg.last_seq = max(seg.last_seq, append.first_seq + append.count - 1)
                seg.max_t = max(seg.max_t, append.max_t)
                self.entries_written += append.count
            if append.done_seq:
                self._unsynced_done_seq = max(self._unsynced_done_seq, append.done_seq)
        seg.size = offset
        self.bytes_written += len(data)
        self._unsynced = not needs_sync
        if needs_sync:
            self.syncs += 1
            self.durable = Position(seg.number, offset)
            self.durable_done_seq = max(self.durable_done_seq, self._unsynced_done_seq)
        self._deliver(results)

    def _undo(self, seg: SegmentInfo, good_size: int) -> None:
        """Cut a failed group off so nothing unacknowledged survives, then use a new segment.

        After a failed fsync the kernel may have dropped the dirty pages, so this segment is
        never trusted with new data again.
        """
        try:
            assert self._fd is not None
            os.ftruncate(self._fd, good_size)
            os.fsync(self._fd)
        except OSError as exc:
            log.critical("journal cannot cut a failed write (%s); refusing further appends", exc)
            with self._cond:
                self._broken = exc
            return
        self._need_new_segment = True

    def compact(self, done_seq: int, horizon_ms: int) -> list[Path]:
        """Delete closed segments whose entries are all stored and older than the dedupe window."""
        removed = []
        with self._cond:
            candidates = self.segments[:-1]
        for seg in candidates:
            if seg.last_seq <= done_seq and seg.max_t < horizon_ms:
                seg.path.unlink(missing_ok=True)
                removed.append(seg.path)
            else:
                break
        if removed:
            with self._cond:
                self.segments = self.segments[len(removed) :]
            fsync_dir(self.directory)
        return removed
