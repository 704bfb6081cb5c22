"""The spool `inbox/` (SPEC §4.2): files renamed into place while the daemon may be down.

Intake of one file:
 1. only a regular file is taken (lstat, then open with O_NOFOLLOW and fstat); a FIFO, socket,
    device, directory or symlink goes to recovery/errors/ unread;
 2. adopt it: rename inbox/<name> to journal/spool/<ms>-<n>-<name> (the daemon owns it now),
    and fsync both folders before anything of it is journaled;
 3. read it in chunks: a .jsonl file by lines (up to CHUNK_LINES lines or about CHUNK_BYTES),
    a .json file whole, up to max_file_bytes; invalid lines go to recovery/errors/ as the raw
    bytes they were, with their reasons;
 4. journal each chunk's valid entries as one record naming the adopted file and the byte
    where the chunk ends; the last chunk's record is marked finished;
 5. delete the adopted file (and fsync journal/spool/).
Files go through these steps a step of files at a time (spool_adopt): a step's renames share
two folder fsyncs, its files' records are queued for the journal in name order (SPEC §4.2:
the order they are stored in) and share group commits, and its finished files are deleted
with one folder fsync, while the next step goes on.
A crash leaves the adopted file, and the next start resumes it after the last journaled chunk
(chunk boundaries depend only on the file and where the chunk starts) or deletes it when the
journal says it is finished. So no entry is ingested twice or lost.

This module is the intake itself (scan, journal, resume); adopting files is spool_adopt's,
reading a file spool_read's, opening it spool_open's, deleting it spool_delete's, what goes
to recovery/errors/ spool_quarantine's, and the inbox/ events that wake a scan are
spool_watch's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os

from flowagg.core.fsutil import display_name, fsync_dir
from flowagg.core.layout import Layout
from flowagg.ingest.entry_codec import decode_lines
from flowagg.ingest.pipeline import Pipeline, Valid
from flowagg.ingest.spool_adopt import STEP_BYTES, STEP_FILES, Adopter
from flowagg.ingest.spool_delete import unlink_side_by_side
from flowagg.ingest.spool_open import Opened, open_adopted, open_step
from flowagg.ingest.spool_quarantine import SpoolQuarantine
from flowagg.ingest.spool_read import (
    Chunk,
    Problem,
    adopted_ms,
    count_lines,
    is_spool_name,
    parse_lines,
    read_chunk,
    read_document,
)
from flowagg.ingest.spool_records import Pending, Progress, SpoolRecords
from flowagg.ingest.spool_trust import Droppers
from flowagg.ingest.spool_watch import InboxWatch

log = logging.getLogger("flowagg.spool")

# Junk (not a spool file) moved to errors/ per scan; more waits JUNK_PAUSE_S for the next one.
JUNK_PER_SCAN = 64
JUNK_PAUSE_S = 0.5
STOP_GRACE_S = 5.0
_LENGTH = operator.attrgetter("length")
_DATA = operator.attrgetter("data")


class SpoolIntake:
    def __init__(
        self,
        layout: Layout,
        pipeline: Pipeline,
        *,
        rescan_s: float,
        max_file_bytes: int,
        max_error_files: int = 0,
    ) -> None:
        self.layout = layout
        self.pipeline = pipeline
        self.rescan_s = rescan_s
        self.max_file_bytes = max_file_bytes
        self.max_error_files = max_error_files  # 0: recovery/errors/ is not rotated
        self._quarantine = SpoolQuarantine(layout, pipeline.clock, pipeline.counters)
        # Room for whitespace around an entry; its compact JSON is checked against the limit.
        self.max_line = 2 * pipeline.config.max_entry_bytes
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._watch = InboxWatch(layout.inbox, self._wake)
        self._folder = layout.journal_spool  # built once: a Path per file is not free
        self._task: asyncio.Task[None] | None = None
        self._deleting: asyncio.Future[None] | None = None  # a step's deletion, still running
        self._adopter = Adopter(layout, pipeline.clock, self._quarantine)
        self._progress: dict[str, Progress] = {}  # the records', kept up to date by them
        self._records = SpoolRecords(
            pipeline, self._progress, rescan_s=rescan_s, stop_event=self._stop_event
        )
        self._droppers = Droppers(layout.group)

    @property
    def files_ingested(self) -> int:
        return self._records.files_ingested

    @property
    def files_quarantined(self) -> int:
        return self._quarantine.files_quarantined

    @property
    def entries_rejected(self) -> int:
        return self._quarantine.entries_rejected

    @property
    def errors_rotated(self) -> int:
        return self._quarantine.errors_rotated

    async def recover(self, journaled: dict[str, Progress]) -> None:
        """At start, before the daemon reports ready: finish what a previous run adopted.

        Never waits: a file that cannot be journaled now (a full disk) stays adopted and is
        tried again at the next rescan.
        """
        present = set(os.listdir(self._folder))
        self._progress.clear()
        self._progress.update((name, p) for name, p in journaled.items() if name in present)
        # New adopted names sort after every name the journal or the folder knows, even if
        # the clock went back, so none can take an old name.
        floor = max((adopted_ms(n) for n in [*journaled, *present]), default=-1) + 1
        self._adopter.floor_ms = floor
        await self._finish_adopted(wait=False)
        await self._deleted()

    async def _finish_adopted(self, *, wait: bool) -> None:
        """Finished adopted files are deleted; any other is resumed where the journal ends."""
        names = [n for n in sorted(os.listdir(self._folder)) if n[:1] != "."]
        # Left by a step whose folder fsync failed: durable first (see sync_folders).
        unjournaled = any(n not in self._progress for n in names)
        if unjournaled and not await asyncio.to_thread(self._adopter.sync_folders):
            return
        step: list[str] = []
        size = 0
        for name in names:
            with contextlib.suppress(OSError):  # gone: the step finds that out
                size += os.lstat(self._folder / name).st_size
            step.append(name)
            if len(step) >= STEP_FILES or size >= STEP_BYTES or name == names[-1]:
                if self._stopping:
                    return
                await self._ingest_step(step, wait=wait)
                step, size = [], 0

    async def _ingest_step(self, adopted: list[str], *, wait: bool) -> None:
        """Journal a step's adopted files, then delete the finished ones with one folder fsync.

        A file's records are queued in name order, each file's once the one before it has
        queued its last (side by side, they would reach the journal in whatever order their
        reads finished); the step then awaits them together, so they share group commits.
        """
        fresh = [a for a in adopted if a not in self._progress and self._adoptable(a)]
        opened = await asyncio.to_thread(
            open_step,
            self._folder,
            fresh,
            self.max_line,
            self._droppers,
            self._quarantine,
            STEP_BYTES,
        )
        try:
            turns = [await self._ingest_or_wait(a, opened.get(a), wait=wait) for a in adopted]
        finally:
            for entry in opened.values():
                entry.close()
        finished = [turn.adopted for turn in turns if await self._records.settle(turn)]
        await self._deleted()
        if finished:
            # The next step goes on meanwhile: deleting waits on the disk, not on the CPU.
            self._deleting = asyncio.ensure_future(self._delete(finished))

    async def _deleted(self) -> None:
        """Wait for the deletion a step left running; shielded, so that a cancelled scan
        still ends it with its folder fsync."""
        deleting = self._deleting
        if deleting is not None:
            try:
                await asyncio.shield(deleting)
            finally:
                # Failed, it is reported once: kept, it would fail every scan after it, and
                # its files are adopted still, for the next rescan to delete.
                if deleting.done():
                    self._deleting = None

    async def _delete(self, adopted: list[str]) -> None:
        for name in await asyncio.to_thread(self._delete_durably, adopted):
            self._progress.pop(name, None)
            self._quarantine.forget(name)

    def _delete_durably(self, adopted: list[str]) -> list[str]:
        """Delete adopted files that need nothing more; returns those now durably gone (only
        their progress may be forgotten)."""
        gone = unlink_side_by_side(self._folder, adopted)
        try:
            # Durable before compaction drops the journal records naming them: back after a
            # power cut, with no record, a file would be ingested twice.
            fsync_dir(self._folder)
        except OSError as exc:
            log.error(
                "spool files %s to %s are stored but their deletion is not durable (%s); trying"
                " again at the next rescan",
                adopted[0],
                adopted[-1],
                exc,
            )
            return []
        return gone

    async def _ingest_or_wait(self, adopted: str, opened: Opened | None, *, wait: bool) -> Pending:
        """Queue what is left of one adopted file; settled, it says whether it can be deleted."""
        if self._progress.get(adopted, (0, False))[1]:
            return Pending(adopted, finished=True)
        path = self._folder / adopted
        try:
            return await self._ingest(adopted, opened, wait=wait)
        except OSError as exc:
            # The file stays adopted; the next rescan tries again (a full disk, say).
            log.error("spool file %s: %s; trying again at the next rescan", adopted, exc)
            return Pending(adopted)
        except Exception:
            log.exception("spool file %s: intake failed; moving it to recovery/errors/", adopted)
            off = self._progress.get(adopted, (0, False))[0]
            moved = self._quarantine.move(
                path,
                f"intake failed unexpectedly (see aggregation.log); the entries before byte"
                f" {off} are stored, fix the rest and spool it again",
            )
            return Pending(adopted, finished=moved)

    async def start(self) -> None:
        """Watch inbox/ (events plus a periodic rescan); the first scan runs at once."""
        self._watch.start()
        self._wake.set()
        self._task = asyncio.create_task(self._run(), name="spool")

    async def stop(self) -> None:
        """Bounded: a scan waiting for space stops at once; one stuck on the disk is cancelled."""
        self._stopping = True
        self._stop_event.set()
        self._wake.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=STOP_GRACE_S)
            if not done:
                # Safe: a journal append in flight is shielded, and the file stays adopted.
                log.warning("spool intake did not stop in %.0f s; cancelling it", STOP_GRACE_S)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await self._watch.stop()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.rescan_s)
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.scan_once()
            except Exception:
                log.exception("spool scan failed; retrying at the next rescan")

    async def scan_once(self) -> int:
        """Ingest every spool file now in inbox/, in name order (leftovers first)."""
        self._droppers.forget()  # a member removed from the group is one no longer
        await self._finish_adopted(wait=True)
        count = 0
        junk_left = JUNK_PER_SCAN
        names = [
            n
            for n in sorted(os.listdir(self.layout.inbox))
            if not (n.startswith(".") or n.endswith(".tmp"))
        ]
        while names and not self._stopping:
            # Off the loop: renames and folder fsyncs (of a junk-file flood too) must not delay
            # the acknowledgements of adds.
            step = await asyncio.to_thread(
                self._adopter.take_step, names, junk_left, lambda: self._stopping
            )
            del names[: step.seen]
            junk_left -= step.junk
            if not step.synced:
                break  # the step's files wait in journal/spool/ for the next rescan
            await self._ingest_step(step.adopted, wait=True)
            count += len(step.adopted)
        await self._deleted()
        if junk_left < 0:
            # More junk than a scan moves: the rest waits a while, so that a flood's renames
            # and fsyncs come at a bounded rate and the journal's fsyncs keep the disk.
            asyncio.get_running_loop().call_later(JUNK_PAUSE_S, self._wake.set)
        if self._quarantine.rotation_due and self.max_error_files:
            self._quarantine.rotation_due = False
            await asyncio.to_thread(self._quarantine.rotate, self.max_error_files)
        return count

    @staticmethod
    def _adoptable(adopted: str) -> bool:
        return is_spool_name(adopted) and display_name(adopted) == adopted

    async def _ingest(self, adopted: str, opened: Opened | None, *, wait: bool) -> Pending:
        """Queue what is left of one adopted file (`opened` ahead of its turn, or not yet)."""
        path = self._folder / adopted
        if not self._adoptable(adopted):
            moved = self._quarantine.move(path, "not a name flowagg adopts; spool it again")
            return Pending(adopted, finished=moved)
        if opened is None:
            fd = await asyncio.to_thread(open_adopted, path, self._droppers, self._quarantine)
        elif opened.error is not None:
            raise opened.error
        else:
            fd, opened.fd = opened.fd, None  # closed here, like one opened now
        if fd is None:
            # Gone or quarantined; else tried again later.
            return Pending(adopted, finished=not os.path.lexists(path))
        try:
            if adopted.endswith(".jsonl"):
                first = opened.first if opened is not None else None
                return await self._ingest_lines(adopted, fd, first, wait=wait)
            return await self._ingest_document(adopted, fd, wait=wait)
        finally:
            os.close(fd)

    async def _ingest_lines(
        self, adopted: str, fd: int, first: Chunk | None, *, wait: bool
    ) -> Pending:
        """Queue the file's chunks from where the journal ends (`first`: the one at byte 0).

        Every chunk before the last is awaited before the next is read: a later chunk durable
        without an earlier one would move the file's progress past entries never stored.
        """
        off = self._progress.get(adopted, (0, False))[0]
        line_no = 1 + (await asyncio.to_thread(count_lines, fd, off) if off else 0)
        started = False
        while True:
            # A stop lets a file it finds taken in get its first chunk journaled: a small file
            # renamed out of inbox/ is then stored, as a client watching inbox/ would expect.
            if self._stopping and started:
                return Pending(adopted)
            started = True
            if first is None:
                chunk = await asyncio.to_thread(read_chunk, fd, off, self.max_line, line_no)
            else:
                chunk, first = first, None
            line_no += len(chunk.lines)
            valid, problems = self._check_lines(chunk)
            if problems:
                # Written before the journal record: once that exists, the lines are gone.
                self._quarantine.reject_lines(adopted, chunk, problems)
            turn = await self._records.queue(adopted, valid, chunk.end, chunk.final, wait=wait)
            if chunk.final or turn.added is None:
                return turn
            if not await self._records.journaled(turn):
                return Pending(adopted)
            off = chunk.end

    def _check_lines(self, chunk: Chunk) -> tuple[list[Valid], list[Problem]]:
        lines = chunk.lines
        # The compiled decode answers when every line holds a valid entry; a blank, overlong
        # or invalid line sends the chunk to orjson and the validator, which word each reason.
        if lines and max(map(_LENGTH, lines)) <= self.max_line:
            decoded = decode_lines(list(map(_DATA, lines)))
            if decoded is not None:
                valid = self.pipeline.validate_compiled(decoded)
                if valid is not None:
                    return valid, []
        items, sources, problems = parse_lines(lines, self.max_line)
        valid, rejected = self.pipeline.validate(items)
        for r in rejected:
            line = sources[r["index"]]
            error = r["error"].removeprefix(f"entry {r['index'] + 1}: ")
            problems.append(Problem(line.offset, line.data, f"line {line.number}: {error}"))
        problems.sort(key=lambda p: p.offset)
        return valid, problems

    async def _ingest_document(self, adopted: str, fd: int, *, wait: bool) -> Pending:
        """A .json file: one entry or an array, read whole, so only up to max_file_bytes."""
        read = await asyncio.to_thread(read_document, fd, self.max_file_bytes)
        if isinstance(read, str):
            path = self._folder / adopted
            moved = await asyncio.to_thread(self._quarantine.move, path, read)
            return Pending(adopted, finished=moved)
        doc, data = read
        items = doc if isinstance(doc, list) else [doc]
        valid, rejected = self.pipeline.validate(items)
        if rejected:
            self._quarantine.reject_document(adopted, data, rejected)
        return await self._records.queue(adopted, valid, len(data), True, wait=wait)
