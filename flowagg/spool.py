"""The spool `inbox/` (SPEC §4.2): files renamed into place while the daemon may be down.

Intake of one file:
 1. adopt it: rename inbox/<name> to journal/spool/<ms>-<n>-<name> (the daemon owns it now);
 2. parse and validate; invalid entries go to recovery/errors/ with their reasons;
 3. journal the valid ones as one record naming the adopted file (one CRC, so all or none);
 4. delete the adopted file.
A crash between 1 and 3 leaves the adopted file, and the next start re-runs 2-4; after 3 the
journal names it, and the next start only deletes it. So no file is ingested twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from pathlib import Path
from typing import Any

import orjson
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .fsutil import fsync_dir, quarantine_bytes, quarantine_file
from .layout import Layout
from .pipeline import Pipeline

log = logging.getLogger("flowagg.spool")

SPOOL_SUFFIXES = (".json", ".jsonl")


def is_spool_name(name: str) -> bool:
    return not name.startswith(".") and name.endswith(SPOOL_SUFFIXES)


def parse_spool(name: str, data: bytes) -> tuple[list[Any], list[dict[str, Any]]]:
    """Items of a spool file, plus lines that are not JSON (with their reasons).

    A .json file is one JSON value (an entry or an array of entries); a .jsonl file is one
    entry per line, and a bad line costs only itself.
    """
    if name.endswith(".json"):
        doc = orjson.loads(data)  # raises: the whole file is unreadable
        return (doc if isinstance(doc, list) else [doc]), []
    items: list[Any] = []
    bad: list[dict[str, Any]] = []
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            items.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            bad.append(
                {"line": lineno, "error": f"line {lineno}: not valid JSON ({exc})", "raw": line}
            )
    return items, bad


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
    ) -> None:
        self.layout = layout
        self.pipeline = pipeline
        self.rescan_s = rescan_s
        self.max_file_bytes = max_file_bytes
        self._wake = asyncio.Event()
        self._stopping = False
        self._observer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._counter = itertools.count()
        self._journaled: set[str] = set()  # adopted names the journal holds: never again
        self.files_ingested = 0
        self.files_quarantined = 0
        self.entries_rejected = 0

    async def recover(self, journaled_sources: set[str]) -> None:
        """At start, before the daemon reports ready: finish what a previous run adopted."""
        self._journaled |= journaled_sources
        await self._finish_adopted()

    async def _finish_adopted(self) -> None:
        """Adopted files the journal holds are deleted; any other is ingested (again)."""
        for name in sorted(os.listdir(self.layout.journal_spool)):
            if name.startswith("."):
                continue
            if name in self._journaled:
                (self.layout.journal_spool / name).unlink(missing_ok=True)
                fsync_dir(self.layout.journal_spool)  # or compaction could resurrect it
            else:
                await self._ingest_or_wait(name)

    async def _ingest_or_wait(self, adopted: str) -> None:
        try:
            await self._ingest(adopted)
        except OSError as exc:
            # The file stays adopted; the next rescan tries again (a full disk, say).
            log.error("spool file %s: %s; trying again at the next rescan", adopted, exc)

    async def start(self) -> None:
        """Watch inbox/ (events plus a periodic rescan) and take what is already there."""
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
        await self.scan_once()
        self._task = asyncio.create_task(self._run(), name="spool")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
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
        await self._finish_adopted()
        count = 0
        for name in sorted(os.listdir(self.layout.inbox)):
            if self._stopping:
                break
            path = self.layout.inbox / name
            if name.startswith(".") or name.endswith(".tmp"):
                continue
            if not is_spool_name(name):
                if path.is_file():
                    self._quarantine_move(
                        path, "not a spool file: name must end in .json or .jsonl"
                    )
                continue
            adopted = await self._adopt(path)
            if adopted is not None:
                await self._ingest_or_wait(adopted)
                count += 1
        return count

    async def _adopt(self, path: Path) -> str | None:
        ms = self.pipeline.clock.now_ms()
        adopted = f"{ms:013d}-{next(self._counter):06d}-{path.name}"
        target = self.layout.journal_spool / adopted
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None  # its client or another scan took it away
        except OSError as exc:
            log.error("spool file %s cannot be adopted (%s); it waits in inbox/", path.name, exc)
            return None
        try:
            fsync_dir(self.layout.journal_spool)
            fsync_dir(self.layout.inbox)
        except OSError as exc:
            log.error("spool file %s: cannot fsync its folders: %s", path.name, exc)
        return adopted

    def _quarantine_move(self, path: Path, reason: str) -> None:
        try:
            target = quarantine_file(
                self.layout.errors,
                path,
                reason=reason,
                component="spool",
                now_ms=self.pipeline.clock.now_ms(),
            )
        except OSError as exc:
            log.error("spool file %s should go to errors/ (%s) but cannot: %s", path, reason, exc)
            return
        self.files_quarantined += 1
        log.warning("spool file %s quarantined to %s: %s", path.name, target.name, reason)

    async def _ingest(self, adopted: str) -> None:
        path = self.layout.journal_spool / adopted
        original = adopted.split("-", 2)[2]
        size = path.stat().st_size
        if size > self.max_file_bytes:
            self._quarantine_move(
                path, f"spool file is {size} bytes, over {self.max_file_bytes}; split it"
            )
            return
        data = await asyncio.to_thread(path.read_bytes)
        try:
            items, bad_lines = parse_spool(original, data)
        except orjson.JSONDecodeError as exc:
            self._quarantine_move(path, f"not valid JSON ({exc}); fix the file and spool it again")
            return
        valid, rejected = self.pipeline.validate(items)
        problems = [
            {"index": r["index"], "error": r["error"], "entry": items[r["index"]]} for r in rejected
        ] + [
            {"line": b["line"], "error": b["error"], "raw": b["raw"].decode("utf-8", "replace")}
            for b in bad_lines
        ]
        if problems:
            # Written before the journal record: once that exists, the spool file is deleted.
            quarantine_bytes(
                self.layout.errors,
                f"{adopted}.rejected.jsonl",
                b"".join(orjson.dumps(p) + b"\n" for p in problems),
                reason=f"{len(problems)} invalid entries in spool file {original}",
                component="spool",
                now_ms=self.pipeline.clock.now_ms(),
                extra={"errors": [p["error"] for p in problems]},
                overwrite=True,
            )
            self.entries_rejected += len(problems)
            self.pipeline.counters["rejected"] += len(problems)
            log.warning("spool file %s: %d invalid entries quarantined", original, len(problems))
        while True:
            result = await self.pipeline.add_valid(valid, src=adopted, wait_for_space=True)
            if result.error is None:
                break
            if self._stopping:
                return  # the adopted file stays; the next start ingests it
            log.error("spool file %s waits: %s", original, result.error)
            await asyncio.sleep((result.retry_after_ms or 1000) / 1000)
        self._journaled.add(adopted)
        path.unlink()
        # Durable before compaction drops the journal record naming it: back after a power
        # cut, with no record, it would be ingested twice.
        fsync_dir(self.layout.journal_spool)
        self.files_ingested += 1
        log.info(
            "spool file %s: %d accepted, %d duplicates, %d invalid",
            original,
            result.accepted,
            result.duplicates,
            len(problems),
        )
