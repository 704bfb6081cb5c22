"""The spool `inbox/` (SPEC §4.2): files renamed into place while the daemon may be down.

Intake of one file:
 1. only a regular file is taken (lstat, then open with O_NOFOLLOW and fstat); a FIFO, socket,
    device, directory or symlink goes to recovery/errors/ unread;
 2. adopt it: rename inbox/<name> to journal/spool/<ms>-<n>-<name> (the daemon owns it now);
 3. read it in chunks: a .jsonl file by lines (up to CHUNK_LINES lines or about CHUNK_BYTES),
    a .json file whole, up to max_file_bytes; invalid lines go to recovery/errors/ as the raw
    bytes they were, with their reasons;
 4. journal each chunk's valid entries as one record naming the adopted file and the byte
    where the chunk ends; the last chunk's record is marked finished;
 5. delete the adopted file.
A crash leaves the adopted file, and the next start resumes it after the last journaled chunk
(chunk boundaries depend only on the file and where the chunk starts) or deletes it when the
journal says it is finished. So no entry is ingested twice or lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import stat
from pathlib import Path
from typing import Any

import orjson
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .audit import FileOwner, audit
from .fsutil import (
    REASON_SUFFIX,
    display_name,
    fit_name,
    fsync_dir,
    quarantine_bytes,
    quarantine_file,
    rotate_errors,
)
from .layout import Layout
from .pipeline import Pipeline, Valid
from .spool_trust import OPEN_FLAGS, READ_BLOCK, Droppers, account, refusal, take_over

log = logging.getLogger("flowagg.spool")

SPOOL_SUFFIXES = (".json", ".jsonl")
CHUNK_LINES = 1000
CHUNK_BYTES = 1 << 20
RAW_PREFIX_BYTES = 4096  # what is kept of a line too long to buffer
MAX_LISTED_ERRORS = 100
# Junk (not a spool file) moved to errors/ per scan; more waits JUNK_PAUSE_S for the next one.
JUNK_PER_SCAN = 64
JUNK_PAUSE_S = 0.5
JUNK = "\0junk"  # what _take says of a file that is not a spool file (no file name has a NUL)
STOP_GRACE_S = 5.0
ADOPTED_MS_DIGITS = 13

Progress = tuple[int, bool]  # journaled end offset, finished


def is_spool_name(name: str) -> bool:
    return not name.startswith(".") and name.endswith(SPOOL_SUFFIXES)


def original_name(adopted: str) -> str:
    """The inbox name an adopted name came from (as far as it was kept)."""
    parts = adopted.split("-", 2)
    return parts[2] if len(parts) == 3 and parts[0].isdigit() else adopted


def adopted_ms(adopted: str) -> int:
    head = adopted[:ADOPTED_MS_DIGITS]
    return int(head) if head.isdigit() else 0


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is, for the reason file."""
    if stat.S_ISREG(mode):
        return None
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((name for test, name in kinds if test(mode)), "a special file")


def not_regular_reason(kind: str) -> str:
    return f"{kind}, not a regular file: only regular files are read; spool a regular file"


@dataclasses.dataclass
class Line:
    offset: int  # where the line starts in the file
    data: bytes  # without its newline; only a prefix when the line is over the limit
    length: int  # of the whole line, without its newline
    number: int  # counting from 1, as the reasons name it


@dataclasses.dataclass
class Chunk:
    start: int
    end: int  # where the next chunk starts
    lines: list[Line]
    final: bool


@dataclasses.dataclass
class Problem:
    offset: int
    raw: bytes
    error: str


def read_chunk(fd: int, start: int, max_line: int, first_line: int = 1) -> Chunk:
    """Lines from `start` (line number `first_line`), up to CHUNK_LINES of them or about
    CHUNK_BYTES.

    The boundaries depend only on the file and `start`, so a resumed intake cuts the same
    chunks. A line over `max_line` is never buffered whole: a prefix is kept, the rest skipped.
    """
    lines: list[Line] = []
    pos = start
    buf = b""
    at = 0  # buf[at:] holds the bytes at pos that are not a line yet
    while len(lines) < CHUNK_LINES and pos - start < CHUNK_BYTES:
        newline = buf.find(b"\n", at)
        if newline >= 0:
            length = newline - at
            keep = length if length <= max_line else RAW_PREFIX_BYTES
            lines.append(Line(pos, buf[at : at + keep], length, first_line + len(lines)))
            pos += length + 1
            at = newline + 1
        elif len(buf) - at > max_line:
            prefix = buf[at : at + RAW_PREFIX_BYTES]
            line, pos = _skip_long_line(fd, pos, prefix, len(buf) - at, first_line + len(lines))
            lines.append(line)
            buf, at = b"", 0
        else:
            block = os.pread(fd, READ_BLOCK, pos + len(buf) - at)
            if not block:
                if len(buf) > at:  # the last line has no newline
                    lines.append(Line(pos, buf[at:], len(buf) - at, first_line + len(lines)))
                    pos += len(buf) - at
                return Chunk(start, pos, lines, final=True)
            buf, at = buf[at:] + block, 0
    return Chunk(start, pos, lines, final=not os.pread(fd, 1, pos))


def _skip_long_line(fd: int, pos: int, prefix: bytes, seen: int, number: int) -> tuple[Line, int]:
    """Find the end of an overlong line starting at `pos`; returns it and the next offset."""
    scanned = pos + seen
    while True:
        block = os.pread(fd, READ_BLOCK, scanned)
        newline = block.find(b"\n")
        if not block or newline >= 0:
            end = scanned + (newline if newline >= 0 else 0)
            return Line(pos, prefix, end - pos, number), end + (1 if newline >= 0 else 0)
        scanned += len(block)


def count_lines(fd: int, end: int) -> int:
    """Newlines before byte `end`: the number of the line a resumed intake starts at, less 1."""
    count = pos = 0
    while pos < end:
        block = os.pread(fd, min(READ_BLOCK, end - pos), pos)
        if not block:
            break
        count += block.count(b"\n")
        pos += len(block)
    return count


def read_at_most(fd: int, limit: int) -> bytes:
    parts = []
    total = 0
    while total < limit:
        block = os.read(fd, min(READ_BLOCK, limit - total))
        if not block:
            break
        parts.append(block)
        total += len(block)
    return b"".join(parts)


def parse_lines(lines: list[Line], max_line: int) -> tuple[list[Any], list[Line], list[Problem]]:
    """JSON values of the lines (and the line of each), plus the lines that are not JSON."""
    items: list[Any] = []
    sources: list[Line] = []
    problems: list[Problem] = []
    for line in lines:
        if line.length > max_line:
            error = f"line {line.number}: {line.length} bytes, over {max_line}; split it"
            problems.append(Problem(line.offset, line.data[:RAW_PREFIX_BYTES], error))
            continue
        if not line.data.strip():
            continue
        try:
            items.append(orjson.loads(line.data))
        except orjson.JSONDecodeError as exc:
            error = f"line {line.number}: not valid JSON ({exc}); fix the line"
            problems.append(Problem(line.offset, line.data, error))
            continue
        sources.append(line)
    return items, sources, problems


def rejected_name(adopted: str, tail: str) -> str:
    """`adopted` plus `tail`, which must survive whole: it tells one chunk's copy from another."""
    return fit_name(adopted, len(tail) + len(REASON_SUFFIX)) + tail


def listed_errors(errors: list[str]) -> dict[str, object]:
    """The reason file's bounded list: the first ones plus how many there were."""
    return {"errors": errors[:MAX_LISTED_ERRORS], "errorCount": len(errors)}


class _Kick(FileSystemEventHandler):
    def __init__(self, kick: Any) -> None:
        self._kick = kick

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("created", "moved", "closed"):
            self._kick()


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
        self._rotation_due = True
        # Room for whitespace around an entry; its compact JSON is checked against the limit.
        self.max_line = 2 * pipeline.config.max_entry_bytes
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._observer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._counter = itertools.count()
        self._floor_ms = 0
        # Adopted files still in journal/spool/ -> how far the journal holds them.
        self._progress: dict[str, Progress] = {}
        # Inbox names (as text) of the files this run adopted, which may have been cut to fit.
        self._originals: dict[str, str] = {}
        self._droppers = Droppers(layout.group)
        # Who wrote each adopted file (before the daemon copied it): the peer of its rejects.
        self._owners: dict[str, FileOwner] = {}
        self.files_ingested = 0
        self.files_quarantined = 0
        self.entries_rejected = 0
        self.errors_rotated = 0

    async def recover(self, journaled: dict[str, Progress]) -> None:
        """At start, before the daemon reports ready: finish what a previous run adopted.

        Never waits: a file that cannot be journaled now (a full disk) stays adopted and is
        tried again at the next rescan.
        """
        present = set(os.listdir(self.layout.journal_spool))
        self._progress = {name: p for name, p in journaled.items() if name in present}
        # New adopted names sort after every name the journal or the folder knows, even if
        # the clock went back, so none can take an old name.
        self._floor_ms = max((adopted_ms(n) for n in [*journaled, *present]), default=-1) + 1
        await self._finish_adopted(wait=False)

    async def _finish_adopted(self, *, wait: bool) -> None:
        """Finished adopted files are deleted; any other is resumed where the journal ends."""
        for name in sorted(os.listdir(self.layout.journal_spool)):
            if self._stopping:
                return
            if name.startswith("."):
                continue
            if self._progress.get(name, (0, False))[1]:
                self._forget(name)
            else:
                await self._ingest_or_wait(name, wait=wait)

    def _forget(self, adopted: str) -> None:
        """Delete an adopted file that needs nothing more; until then its progress is kept."""
        try:
            (self.layout.journal_spool / adopted).unlink(missing_ok=True)
            # Durable before compaction drops the journal records naming it: back after a
            # power cut, with no record, it would be ingested twice.
            fsync_dir(self.layout.journal_spool)
        except OSError as exc:
            log.error(
                "spool file %s is stored but cannot be deleted (%s); trying again at the next"
                " rescan",
                adopted,
                exc,
            )
            return
        self._progress.pop(adopted, None)
        self._originals.pop(adopted, None)
        self._owners.pop(adopted, None)

    async def _ingest_or_wait(self, adopted: str, *, wait: bool) -> None:
        path = self.layout.journal_spool / adopted
        try:
            finished = await self._ingest(adopted, wait=wait)
        except OSError as exc:
            # The file stays adopted; the next rescan tries again (a full disk, say).
            log.error("spool file %s: %s; trying again at the next rescan", adopted, exc)
            return
        except Exception:
            log.exception("spool file %s: intake failed; moving it to recovery/errors/", adopted)
            off = self._progress.get(adopted, (0, False))[0]
            finished = self._quarantine_move(
                path,
                f"intake failed unexpectedly (see aggregation.log); the entries before byte"
                f" {off} are stored, fix the rest and spool it again",
            )
        if finished:
            self._forget(adopted)

    async def start(self) -> None:
        """Watch inbox/ (events plus a periodic rescan); the first scan runs at once."""
        loop = asyncio.get_running_loop()
        observer = Observer()
        observer.schedule(
            _Kick(lambda: loop.call_soon_threadsafe(self._wake.set)),
            str(self.layout.inbox),
            recursive=False,
        )
        observer.daemon = True
        observer.start()
        self._observer = observer
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
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join)

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
        for name in sorted(os.listdir(self.layout.inbox)):
            if self._stopping:
                break
            if name.startswith(".") or name.endswith(".tmp"):
                continue
            try:
                # Off the loop: renames and folder fsyncs of a junk-file flood must not delay
                # the acknowledgements of adds.
                adopted = await asyncio.to_thread(
                    self._take, self.layout.inbox / name, junk_left > 0
                )
            except Exception:
                # One file must not stop the others: it stays in inbox/ for the next rescan.
                log.exception("spool file %s cannot be taken from inbox/", display_name(name))
                continue
            if adopted is JUNK:
                junk_left -= 1
            elif adopted is not None:
                await self._ingest_or_wait(adopted, wait=True)
                count += 1
            await asyncio.sleep(0)  # a flood of bad files must not starve the socket
        if junk_left < 0:
            # More junk than a scan moves: the rest waits a while, so that a flood's renames
            # and fsyncs come at a bounded rate and the journal's fsyncs keep the disk.
            asyncio.get_running_loop().call_later(JUNK_PAUSE_S, self._wake.set)
        if self._rotation_due and self.max_error_files:
            self._rotation_due = False
            await asyncio.to_thread(self._rotate_errors)
        return count

    def _rotate_errors(self) -> None:
        """Keep recovery/errors/ within maxErrorFiles: the oldest quarantined files go."""
        try:
            removed = rotate_errors(self.layout.errors, self.max_error_files)
        except OSError as exc:
            log.error("cannot rotate recovery/errors/: %s; trying again at the next scan", exc)
            self._rotation_due = True
            return
        if removed:
            self.errors_rotated += len(removed)
            log.warning(
                "recovery/errors/ holds more than maxErrorFiles (%d): removed the %d oldest",
                self.max_error_files,
                len(removed),
            )
            audit(
                "errors_rotated",
                fileCount=len(removed),
                files=removed[:MAX_LISTED_ERRORS],
                maxErrorFiles=self.max_error_files,
            )

    def _take(self, path: Path, quarantine: bool) -> str | None:
        """Adopt a regular spool file; anything else in inbox/ is JUNK, moved to errors/ unread
        when `quarantine` says this scan may still do so."""
        try:
            kind = file_kind(os.lstat(path).st_mode)
        except FileNotFoundError:
            return None  # its client or another scan took it away
        if kind is not None:
            reason = not_regular_reason(kind)
        elif not is_spool_name(path.name):
            reason = "not a spool file: name must end in .json or .jsonl"
        else:
            return self._adopt(path)
        if quarantine:
            self._quarantine_move(path, reason)
        return JUNK

    def _adopt(self, path: Path) -> str | None:
        ms = max(self.pipeline.clock.now_ms(), self._floor_ms)
        # The journal names the file in JSON, so the name must be text: odd bytes become \xNN.
        adopted = fit_name(f"{ms:013d}-{next(self._counter):06d}-{display_name(path.name)}")
        target = self.layout.journal_spool / adopted
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None  # its client or another scan took it away
        except OSError as exc:
            shown = display_name(path.name)
            log.error("spool file %s cannot be adopted (%s); it waits in inbox/", shown, exc)
            return None
        try:
            fsync_dir(self.layout.journal_spool)
            fsync_dir(self.layout.inbox)
        except OSError as exc:
            log.error("spool file %s: cannot fsync its folders: %s", display_name(path.name), exc)
        self._originals[adopted] = display_name(path.name)
        return adopted

    def _original(self, adopted: str) -> str:
        """The inbox name of an adopted file; after a restart, what its adopted name kept."""
        return self._originals.get(adopted) or display_name(original_name(adopted))

    def _quarantine_move(self, path: Path, reason: str) -> bool:
        """Move a file to errors/ with its reason; False (logged) when it cannot be moved."""
        if path.parent == self.layout.inbox:
            original = display_name(path.name)
        else:
            original = self._original(path.name)
        try:
            target = quarantine_file(
                self.layout.errors,
                path,
                reason=reason,
                component="spool",
                now_ms=self.pipeline.clock.now_ms(),
                extra={"originalName": original},
                owner=self._owners.get(path.name) if path.parent != self.layout.inbox else None,
            )
        except OSError as exc:
            shown = display_name(str(path))
            log.error("spool file %s should go to errors/ (%s) but cannot: %s", shown, reason, exc)
            return False
        self.files_quarantined += 1
        self._rotation_due = True
        shown = display_name(target.name)
        log.warning("spool file %s quarantined to %s: %s", original, shown, reason)
        return True

    async def _ingest(self, adopted: str, *, wait: bool) -> bool:
        """Journal what is left of one adopted file; True once it needs nothing more."""
        path = self.layout.journal_spool / adopted
        if not is_spool_name(adopted) or display_name(adopted) != adopted:
            return self._quarantine_move(path, "not a name flowagg adopts; spool it again")
        fd = await asyncio.to_thread(self._open_regular, path)
        if fd is None:
            return not os.path.lexists(path)  # gone or quarantined; else tried again later
        try:
            if adopted.endswith(".jsonl"):
                return await self._ingest_lines(adopted, fd, wait=wait)
            return await self._ingest_document(adopted, fd, wait=wait)
        finally:
            os.close(fd)

    def _open_regular(self, path: Path) -> int | None:
        """An fd of the file if it is a regular one; None when it is gone or was quarantined."""
        try:
            st = os.lstat(path)
            kind = file_kind(st.st_mode)
            if kind is None:
                try:
                    fd = os.open(path, OPEN_FLAGS)
                except PermissionError:
                    if st.st_uid == os.geteuid():
                        raise
                    self._quarantine_move(
                        path,
                        f"unreadable: {account(st.st_uid)} wrote it with mode"
                        f" {stat.S_IMODE(st.st_mode):04o}; spool files must be readable by the"
                        " daemon's user (`flowagg add --spool` writes them so)",
                    )
                    return None
                st = os.fstat(fd)
                kind = file_kind(st.st_mode)
                if kind is None:
                    return self._trusted(path, fd, st)
                os.close(fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            kind = "a symbolic link"
        self._quarantine_move(path, not_regular_reason(kind))
        return None

    def _trusted(self, path: Path, fd: int, st: os.stat_result) -> int | None:
        """The fd to read an adopted file by, or None when it is refused (quarantined)."""
        refused = refusal(st, self._droppers)
        if refused is None:
            self._owners[path.name] = FileOwner.of(st)
            return take_over(path, fd, st)
        os.close(fd)
        self._quarantine_move(path, refused)
        return None

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
                self._reject_lines(adopted, chunk, problems)
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

    def _reject_lines(self, adopted: str, chunk: Chunk, problems: list[Problem]) -> None:
        original = self._original(adopted)
        # A fixed name: a resumed intake cuts the same chunk and replaces this copy.
        quarantine_bytes(
            self.layout.errors,
            rejected_name(adopted, f".{chunk.start}.rejected.jsonl"),
            b"".join(p.raw + b"\n" for p in problems),
            reason=(
                f"{len(problems)} invalid lines in spool file {original} (lines"
                f" {chunk.lines[0].number} to {chunk.lines[-1].number}); the valid ones were"
                " accepted"
            ),
            component="spool",
            now_ms=self.pipeline.clock.now_ms(),
            extra={"originalName": original, **listed_errors([p.error for p in problems])},
            overwrite=True,
            owner=self._owners.get(adopted),
        )
        self._count_rejected(original, len(problems))
        self._rotation_due = True

    def _count_rejected(self, original: str, count: int) -> None:
        self.entries_rejected += count
        self.pipeline.counters["rejected"] += count
        log.warning("spool file %s: %d invalid entries quarantined", original, count)

    async def _ingest_document(self, adopted: str, fd: int, *, wait: bool) -> bool:
        """A .json file: one entry or an array, read whole, so only up to max_file_bytes."""
        path = self.layout.journal_spool / adopted
        too_big = (
            f"a .json spool file over {self.max_file_bytes} bytes; use .jsonl (one entry per"
            " line), which is streamed"
        )
        if os.fstat(fd).st_size > self.max_file_bytes:
            return await asyncio.to_thread(self._quarantine_move, path, too_big)
        data = await asyncio.to_thread(read_at_most, fd, self.max_file_bytes + 1)
        if len(data) > self.max_file_bytes:  # it grew after the check
            return await asyncio.to_thread(self._quarantine_move, path, too_big)
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return await asyncio.to_thread(
                self._quarantine_move,
                path,
                f"not valid JSON ({exc}); fix the file and spool it again",
            )
        items = doc if isinstance(doc, list) else [doc]
        valid, rejected = self.pipeline.validate(items)
        if rejected:
            self._reject_document(adopted, data, rejected)
        if not await self._journal(adopted, valid, len(data), True, wait=wait):
            return False
        self.files_ingested += 1
        return True

    def _reject_document(self, adopted: str, data: bytes, rejected: list[dict[str, Any]]) -> None:
        """A copy of the whole file, with the indexes of its invalid entries and why."""
        original = self._original(adopted)
        quarantine_bytes(
            self.layout.errors,
            rejected_name(adopted, ".rejected.json"),
            data,
            reason=(
                f"{len(rejected)} invalid entries in spool file {original} (listed by index,"
                " counting from 0; the errors name them from entry 1); the valid ones were"
                " accepted"
            ),
            component="spool",
            now_ms=self.pipeline.clock.now_ms(),
            extra={
                "originalName": original,
                "rejectedIndexes": [r["index"] for r in rejected[:MAX_LISTED_ERRORS]],
                **listed_errors([r["error"] for r in rejected]),
            },
            overwrite=True,
            owner=self._owners.get(adopted),
        )
        self._count_rejected(original, len(rejected))
        self._rotation_due = True

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
        space = asyncio.ensure_future(self.pipeline.wait_for_space())
        stopping = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait(
                {space, stopping}, timeout=self.rescan_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            space.cancel()
            stopping.cancel()
        return not self._stopping
