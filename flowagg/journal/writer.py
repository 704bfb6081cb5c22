"""The journal's only writer: a thread that group-commits queued appends.

Appends queue up while the writer thread is in fsync; the next write takes them all and one
fsync makes the whole group durable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from flowagg.core.fsutil import fsync_dir
from flowagg.core.layout import SPOOL_FOLDER
from flowagg.core.supervise import Spawn, plain_thread
from flowagg.journal.compaction import (
    deletable,
    delete_segments,
    expired_segments,
    progress_to_carry,
)
from flowagg.journal.format import (
    FORMAT_VERSION,
    MAX_RECORD_BYTES,
    MAX_RECORD_ENTRIES,
    Cut,
    Position,
    SegmentInfo,
    SpoolProgress,
    encode_add,
    encode_cut,
    frame,
    merge_sources,
    note_spool_chunk,
    segment_name,
    split_add,
    write_summary,
)

log = logging.getLogger("flowagg.journal")


@dataclasses.dataclass
class Append:
    line: bytes  # the framed record; for `entries`, framed by the writer thread
    callback: Callable[[BaseException | None, Position], None] | None
    first_seq: int = 0
    count: int = 0
    max_t: int = 0
    done_seq: int = 0
    cut_seq: int = 0
    src: str | None = None
    off: int | None = None
    fin: bool = False
    # An add record not framed yet: its entries' JSON and the indexes of client ids.
    entries: list[bytes] | None = None
    client_idx: list[int] | None = None

    def frame(self) -> None:
        """Encode and frame an add record queued unframed (on the writer thread: the crc and
        the copies of a large record are no work for the loop that queued it)."""
        if self.entries is not None:
            assert self.client_idx is not None
            head = (self.first_seq, self.max_t, self.entries, self.client_idx)
            self.line = encode_add(*head, self.src, self.off, self.fin)
            self.entries = self.client_idx = None


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
        spawn: Spawn = plain_thread,
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
        # Version 2 records go to a version 2 segment: a start reads a segment's version to
        # know whether its batches were cut on the record.
        self._need_new_segment = (
            not self.segments or not clean_tail or self.segments[-1].version < FORMAT_VERSION
        )
        last = self.segments[-1] if self.segments else None
        self.durable = Position(last.number, last.size) if last else Position(0, 0)
        self.entries_written = 0
        self.durable_done_seq = 0
        self._unsynced_done_seq = 0
        self._unsynced = False  # bytes written to the current segment since its last fsync
        self.syncs = 0
        self.bytes_written = 0
        self._thread = spawn("journal-writer", self._run)

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
        *,
        off: int | None = None,
        fin: bool = False,
    ) -> int:
        """Queue entries; returns the seq of the first. `callback` runs once durable (or not).

        A large add becomes several records queued together, so they share one write and one
        fsync; the callback rides on the last.
        """
        # A spool chunk stays one record: were it split, a torn write could keep its first
        # pieces without the last, which names the chunk, and the resumed intake would journal
        # those entries twice. Spool chunks are bounded by the intake instead.
        pieces = (
            [(0, len(entries), client_idx)]
            if src is not None
            else split_add(entries, client_idx, self.max_record_entries, MAX_RECORD_BYTES)
        )
        with self._cond:
            if self._broken is not None:
                raise self._broken
            first = self._next_seq
            self._next_seq += len(entries)
            for n, (start, end, idx) in enumerate(pieces):
                mark = n == len(pieces) - 1
                spool: dict[str, Any] = {"src": src, "off": off, "fin": fin} if mark else {}
                part = entries if len(pieces) == 1 else entries[start:end]
                self._queue.append(
                    Append(
                        b"",
                        callback if mark else None,
                        first + start,
                        end - start,
                        t_ms,
                        **spool,
                        entries=part,
                        client_idx=idx,
                    )
                )
            self._cond.notify()
        return first

    def append_cut(
        self, cut: Cut, callback: Callable[[BaseException | None, Position], None]
    ) -> None:
        """Queue a cut; `callback` runs once it is durable (or not). Raises when broken."""
        with self._cond:
            if self._broken is not None:
                raise self._broken
            self._queue.append(Append(encode_cut(cut), callback, cut_seq=cut.last_seq))
            self._cond.notify()

    def append_done(self, last_seq: int, batch_id: str) -> None:
        payload = orjson.dumps({"k": "d", "q": last_seq, "b": batch_id})
        with self._cond:
            if self._broken is not None:
                return  # the done record only saves work at the next start; the batch is safe
            self._queue.append(Append(frame(payload), None, done_seq=last_seq))
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> bool:
        """False when the thread is still in a write after `timeout` (a hung disk)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self._close_segment(summarize=False)
        return True

    @property
    def broken(self) -> bool:
        """Whether every append fails from now on (a write could not be cut off)."""
        return self._broken is not None

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

    def _close_segment(self, *, summarize: bool) -> None:
        """Close the current segment after making its unsynced done records durable.

        `durable_done_seq` advances on the next fsync, which happens on the new segment:
        without this one, compaction could trust a done record a power cut then erases.
        At rollover (`summarize`) the closed segment gets its summary, so starts skip it.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        seg = self.segments[-1]
        try:
            if self._unsynced:
                os.fsync(fd)
                self._unsynced = False
                self.durable_done_seq = max(self.durable_done_seq, self._unsynced_done_seq)
        except OSError as exc:
            # Only done records can be unsynced here; they are hints, so trust none of them.
            log.error("journal %s: fsync at close failed (%s)", seg.path, exc)
            self._unsynced = False
            self._unsynced_done_seq = self.durable_done_seq
            summarize = False
        finally:
            os.close(fd)
        if summarize:
            try:
                write_summary(seg, self._next_seq)
            except OSError as exc:
                log.warning("journal %s: no summary (%s); starts will parse it", seg.path, exc)

    def _open_segment(self) -> None:
        self._close_segment(summarize=True)
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
        for append in group:
            append.frame()
        data = b"".join(a.line for a in group)
        # Done records only save work at the next start, and their batches are already
        # durable: they ride on the next fsync instead of paying for one of their own. Spool
        # progress never does: compaction trusts the live segment's sources as durable.
        needs_sync = any(a.callback is not None or a.src is not None for a in group)
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
            if append.cut_seq:
                seg.cut_seq = max(seg.cut_seq, append.cut_seq)
            if append.done_seq:
                self._unsynced_done_seq = max(self._unsynced_done_seq, append.done_seq)
                seg.done_seq = max(seg.done_seq, append.done_seq)
            if append.src is not None:
                with self._cond:  # compaction reads the live segment's sources
                    note_spool_chunk(seg.sources, append.src, append.off, append.fin)
            seg.records += 1
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
        """Delete closed segments whose entries are all stored and older than the dedupe window.

        A segment may also hold the only record of how far a spool file still in
        journal/spool/ was journaled, or that it is finished: a start resumes (or deletes) the
        file by that record, and without it would ingest the file again from its start. Such
        progress is first copied into the live segment (`_carry`); the segment goes at a later
        pass, once the copy is durable, so no kill or power cut finds neither. A file stalled
        forever so costs one small record per segment generation, never a kept segment.
        """
        with self._cond:
            candidates = self.segments[:-1]
            live = dict(self.segments[-1].sources) if self.segments else {}
        expired = expired_segments(candidates, done_seq, horizon_ms)
        later = [seg.sources for seg in candidates[len(expired) :]]
        # The progress only they record, of files still adopted, is queued for the live segment.
        carried = progress_to_carry(
            self.directory / SPOOL_FOLDER, expired, merge_sources(*later, live)
        )
        if carried:
            self._carry(carried, max(seg.max_t for seg in expired))
        removed = delete_segments(expired[: deletable(expired, carried)])
        if removed:
            with self._cond:
                self.segments = self.segments[len(removed) :]
            fsync_dir(self.directory)
        return removed

    def _carry(self, progress: SpoolProgress, t_ms: int) -> None:
        """Queue a copy of each file's progress: an add record of no entries, as old as them.

        Any reader takes it as it takes a chunk whose lines were all invalid; it uses no seq.
        """
        with self._cond:
            if self._broken is not None:
                return  # the segments stay; a later pass tries again
            queued = {append.src for append in self._queue}
            copied = 0
            for name, (end, fin) in sorted(progress.items()):
                if name in queued:
                    continue  # a newer chunk, or a copy a previous pass queued
                spool: dict[str, Any] = {"src": name, "off": end, "fin": fin}
                line = encode_add(self._next_seq, t_ms, [], [], **spool)
                self._queue.append(Append(line, None, self._next_seq, 0, t_ms, **spool))
                copied += 1
            self._cond.notify()
        if copied:
            log.info("journal: copying the progress of %d adopted spool files to compact", copied)
