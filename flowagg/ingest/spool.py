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
two folder fsyncs, its files are journaled one after another in name order (SPEC §4.2: the
order they are stored in), and its finished files are deleted with one folder fsync.
A crash leaves the adopted file, and the next start resumes it after the last journaled chunk
(chunk boundaries depend only on the file and where the chunk starts) or deletes it when the
journal says it is finished. So no entry is ingested twice or lost.

This module is the intake itself (scan, journal, resume); adopting files is spool_adopt's,
reading a file spool_read's, opening it spool_open's, what goes to recovery/errors/
spool_quarantine's, and the inbox/ events that wake a scan are spool_watch's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import orjson

from flowagg.core.fsutil import display_name, fsync_dir
from flowagg.core.layout import Layout
from flowagg.ingest.pipeline import Pipeline, Valid
from flowagg.ingest.spool_adopt import STEP_BYTES, STEP_FILES, Adopter
from flowagg.ingest.spool_open import open_adopted
from flowagg.ingest.spool_quarantine import SpoolQuarantine
from flowagg.ingest.spool_read import (
    Chunk,
    Problem,
    adopted_ms,
    count_lines,
    is_spool_name,
    parse_lines,
    read_at_most,
    read_chunk,
)
from flowagg.ingest.spool_trust import Droppers
from flowagg.ingest.spool_watch import InboxWatch

log = logging.getLogger("flowagg.spool")

# Junk (not a spool file) moved to errors/ per scan; more waits JUNK_PAUSE_S for the next one.
JUNK_PER_SCAN = 64
JUNK_PAUSE_S = 0.5
STOP_GRACE_S = 5.0

Progress = tuple[int, bool]  # journaled end offset, finished


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
        self._task: asyncio.Task[None] | None = None
        self._adopter = Adopter(layout, pipeline.clock, self._quarantine)
        # Adopted files still in journal/spool/ -> how far the journal holds them.
        self._progress: dict[str, Progress] = {}
        self._droppers = Droppers(layout.group)
        self.files_ingested = 0

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
        present = set(os.listdir(self.layout.journal_spool))
        self._progress = {name: p for name, p in journaled.items() if name in present}
        # New adopted names sort after every name the journal or the folder knows, even if
        # the clock went back, so none can take an old name.
        floor = max((adopted_ms(n) for n in [*journaled, *present]), default=-1) + 1
        self._adopter.floor_ms = floor
        await self._finish_adopted(wait=False)

    async def _finish_adopted(self, *, wait: bool) -> None:
        """Finished adopted files are deleted; any other is resumed where the journal ends."""
        names = [n for n in sorted(os.listdir(self.layout.journal_spool)) if n[:1] != "."]
        # Left by a step whose folder fsync failed: durable first (see sync_folders).
        unjournaled = any(n not in self._progress for n in names)
        if unjournaled and not await asyncio.to_thread(self._adopter.sync_folders):
            return
        step: list[str] = []
        size = 0
        for name in names:
            with contextlib.suppress(OSError):  # gone: the step finds that out
                size += os.lstat(self.layout.journal_spool / name).st_size
            step.append(name)
            if len(step) >= STEP_FILES or size >= STEP_BYTES or name == names[-1]:
                if self._stopping:
                    return
                await self._ingest_step(step, wait=wait)
                step, size = [], 0

    async def _ingest_step(self, adopted: list[str], *, wait: bool) -> None:
        """Journal a step's adopted files in name order, then delete the finished ones with
        one folder fsync. One at a time: side by side, their records would share group commits
        but reach the journal in whatever order their reads finished."""
        finished = [a for a in adopted if await self._ingest_or_wait(a, wait=wait)]
        if finished:
            for name in await asyncio.to_thread(self._delete, finished):
                self._progress.pop(name, None)
                self._quarantine.forget(name)

    def _delete(self, adopted: list[str]) -> list[str]:
        """Delete adopted files that need nothing more; returns those now durably gone (only
        their progress may be forgotten)."""
        gone = []
        for name in adopted:
            try:
                (self.layout.journal_spool / name).unlink(missing_ok=True)
                gone.append(name)
            except OSError as exc:
                log.error(
                    "spool file %s is stored but cannot be deleted (%s); trying again at the"
                    " next rescan",
                    name,
                    exc,
                )
        try:
            # Durable before compaction drops the journal records naming them: back after a
            # power cut, with no record, a file would be ingested twice.
            fsync_dir(self.layout.journal_spool)
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

    async def _ingest_or_wait(self, adopted: str, *, wait: bool) -> bool:
        """Journal what is left of one adopted file; True once it can be deleted."""
        if self._progress.get(adopted, (0, False))[1]:
            return True
        path = self.layout.journal_spool / adopted
        try:
            finished = await self._ingest(adopted, wait=wait)
        except OSError as exc:
            # The file stays adopted; the next rescan tries again (a full disk, say).
            log.error("spool file %s: %s; trying again at the next rescan", adopted, exc)
            return False
        except Exception:
            log.exception("spool file %s: intake failed; moving it to recovery/errors/", adopted)
            off = self._progress.get(adopted, (0, False))[0]
            finished = self._quarantine.move(
                path,
                f"intake failed unexpectedly (see aggregation.log); the entries before byte"
                f" {off} are stored, fix the rest and spool it again",
            )
        return finished

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
        if junk_left < 0:
            # More junk than a scan moves: the rest waits a while, so that a flood's renames
            # and fsyncs come at a bounded rate and the journal's fsyncs keep the disk.
            asyncio.get_running_loop().call_later(JUNK_PAUSE_S, self._wake.set)
        if self._quarantine.rotation_due and self.max_error_files:
            self._quarantine.rotation_due = False
            await asyncio.to_thread(self._quarantine.rotate, self.max_error_files)
        return count

    async def _ingest(self, adopted: str, *, wait: bool) -> bool:
        """Journal what is left of one adopted file; True once it needs nothing more."""
        path = self.layout.journal_spool / adopted
        if not is_spool_name(adopted) or display_name(adopted) != adopted:
            return self._quarantine.move(path, "not a name flowagg adopts; spool it again")
        fd = await asyncio.to_thread(open_adopted, path, self._droppers, self._quarantine)
        if fd is None:
            return not os.path.lexists(path)  # gone or quarantined; else tried again later
        try:
            if adopted.endswith(".jsonl"):
                return await self._ingest_lines(adopted, fd, wait=wait)
            return await self._ingest_document(adopted, fd, wait=wait)
        finally:
            os.close(fd)

    async def _ingest_lines(self, adopted: str, fd: int, *, wait: bool) -> bool:
        off, fin = self._progress.get(adopted, (0, False))
        line_no = 1 + (await asyncio.to_thread(count_lines, fd, off) if off and not fin else 0)
        first = True
        while not fin:
            # A stop lets a file it finds taken in get its first chunk journaled: a small file
            # renamed out of inbox/ is then stored, as a client watching inbox/ would expect.
            if self._stopping and not first:
                return False
            first = False
            chunk = await asyncio.to_thread(read_chunk, fd, off, self.max_line, line_no)
            line_no += len(chunk.lines)
            valid, problems = self._check_lines(chunk)
            if problems:
                # Written before the journal record: once that exists, the lines are gone.
                self._quarantine.reject_lines(adopted, chunk, problems)
            if not await self._journal(adopted, valid, chunk.end, chunk.final, wait=wait):
                return False
            off, fin = chunk.end, chunk.final
        self.files_ingested += 1
        return True

    def _check_lines(self, chunk: Chunk) -> tuple[list[Valid], list[Problem]]:
        items, sources, problems = parse_lines(chunk.lines, self.max_line)
        valid, rejected = self.pipeline.validate(items)
        for r in rejected:
            line = sources[r["index"]]
            error = r["error"].removeprefix(f"entry {r['index'] + 1}: ")
            problems.append(Problem(line.offset, line.data, f"line {line.number}: {error}"))
        problems.sort(key=lambda p: p.offset)
        return valid, problems

    async def _ingest_document(self, adopted: str, fd: int, *, wait: bool) -> bool:
        """A .json file: one entry or an array, read whole, so only up to max_file_bytes."""
        path = self.layout.journal_spool / adopted
        too_big = (
            f"a .json spool file over {self.max_file_bytes} bytes; use .jsonl (one entry per"
            " line), which is streamed"
        )
        if os.fstat(fd).st_size > self.max_file_bytes:
            return await asyncio.to_thread(self._quarantine.move, path, too_big)
        data = await asyncio.to_thread(read_at_most, fd, self.max_file_bytes + 1)
        if len(data) > self.max_file_bytes:  # it grew after the check
            return await asyncio.to_thread(self._quarantine.move, path, too_big)
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return await asyncio.to_thread(
                self._quarantine.move,
                path,
                f"not valid JSON ({exc}); fix the file and spool it again",
            )
        items = doc if isinstance(doc, list) else [doc]
        valid, rejected = self.pipeline.validate(items)
        if rejected:
            self._quarantine.reject_document(adopted, data, rejected)
        if not await self._journal(adopted, valid, len(data), True, wait=wait):
            return False
        self.files_ingested += 1
        return True

    async def _journal(
        self, adopted: str, valid: list[Valid], off: int, fin: bool, *, wait: bool
    ) -> bool:
        """Journal one chunk; False (logged) when it has to wait for the next rescan."""
        while True:
            if wait and self.pipeline.aggregator.is_busy():
                if not await self._space_or_stop():
                    return False
                continue
            # Shielded: a cancelled stop must not cut an append the journal writer will report.
            result = await asyncio.shield(
                self.pipeline.add_valid(valid, src=adopted, off=off, fin=fin, wait_for_space=False)
            )
            if result.error == "busy" and wait and not self._stopping:
                continue
            break
        if result.error is not None:
            log.error(
                "spool file %s waits in journal/spool/ (%s); trying again at the next rescan",
                adopted,
                result.error,
            )
            return False
        self._progress[adopted] = (off, fin)
        return True

    async def _space_or_stop(self) -> bool:
        """Wait until the buffer has room (or a rescan's time); False when stopping."""
        space = asyncio.ensure_future(self.pipeline.flushing.wait_for_space())
        stopping = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait(
                {space, stopping}, timeout=self.rescan_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            space.cancel()
            stopping.cancel()
        return not self._stopping
