"""Where the spool's bad input goes: recovery/errors/, each file or copy with its reason.

Whole files the intake will not read (junk, special files, refused or unreadable ones, an
invalid .json document), the invalid lines of a .jsonl chunk and the invalid entries of a
document, and the rotation that keeps recovery/errors/ within maxErrorFiles. Apart from the
intake because none of it touches the journal: it only names, moves, copies and counts.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from flowagg.core.audit import FileOwner, audit
from flowagg.core.clock import Clock
from flowagg.core.fsutil import (
    REASON_SUFFIX,
    display_name,
    fit_name,
    quarantine_bytes,
    quarantine_file,
    rotate_errors,
)
from flowagg.core.layout import Layout
from flowagg.ingest.spool_read import Chunk, Problem, original_name

log = logging.getLogger("flowagg.spool")

MAX_LISTED_ERRORS = 100


def rejected_name(adopted: str, tail: str) -> str:
    """`adopted` plus `tail`, which must survive whole: it tells one chunk's copy from another."""
    return fit_name(adopted, len(tail) + len(REASON_SUFFIX)) + tail


def listed_errors(errors: list[str]) -> dict[str, object]:
    """The reason file's bounded list: the first ones plus how many there were."""
    return {"errors": errors[:MAX_LISTED_ERRORS], "errorCount": len(errors)}


class SpoolQuarantine:
    def __init__(self, layout: Layout, clock: Clock, counters: Counter[str]) -> None:
        self.layout = layout
        self.clock = clock
        self.counters = counters  # the pipeline's: spool rejects count as its rejects
        self.rotation_due = True
        # Inbox names (as text) of the files this run adopted, which may have been cut to fit.
        self.originals: dict[str, str] = {}
        # Who wrote each adopted file (before the daemon copied it): the peer of its rejects.
        self.owners: dict[str, FileOwner] = {}
        self.files_quarantined = 0
        self._counting = threading.Lock()
        self.entries_rejected = 0
        self.errors_rotated = 0

    def forget(self, adopted: str) -> None:
        self.originals.pop(adopted, None)
        self.owners.pop(adopted, None)

    def original(self, adopted: str) -> str:
        """The inbox name of an adopted file; after a restart, what its adopted name kept."""
        return self.originals.get(adopted) or display_name(original_name(adopted))

    def move(self, path: Path, reason: str) -> bool:
        """Move a file to errors/ with its reason; False (logged) when it cannot be moved."""
        if path.parent == self.layout.inbox:
            original = display_name(path.name)
        else:
            original = self.original(path.name)
        try:
            target = quarantine_file(
                self.layout.errors,
                path,
                reason=reason,
                component="spool",
                now_ms=self.clock.now_ms(),
                extra={"originalName": original},
                owner=self.owners.get(path.name) if path.parent != self.layout.inbox else None,
            )
        except OSError as exc:
            shown = display_name(str(path))
            log.error("spool file %s should go to errors/ (%s) but cannot: %s", shown, reason, exc)
            return False
        with self._counting:  # moves run on worker threads (junk at adoption, refused opens)
            self.files_quarantined += 1
        self.rotation_due = True
        shown = display_name(target.name)
        log.warning("spool file %s quarantined to %s: %s", original, shown, reason)
        return True

    def reject_lines(self, adopted: str, chunk: Chunk, problems: list[Problem]) -> None:
        original = self.original(adopted)
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
            now_ms=self.clock.now_ms(),
            extra={"originalName": original, **listed_errors([p.error for p in problems])},
            overwrite=True,
            owner=self.owners.get(adopted),
        )
        self._count_rejected(original, len(problems))
        self.rotation_due = True

    def reject_document(self, adopted: str, data: bytes, rejected: list[dict[str, Any]]) -> None:
        """A copy of the whole file, with the indexes of its invalid entries and why."""
        original = self.original(adopted)
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
            now_ms=self.clock.now_ms(),
            extra={
                "originalName": original,
                "rejectedIndexes": [r["index"] for r in rejected[:MAX_LISTED_ERRORS]],
                **listed_errors([r["error"] for r in rejected]),
            },
            overwrite=True,
            owner=self.owners.get(adopted),
        )
        self._count_rejected(original, len(rejected))
        self.rotation_due = True

    def _count_rejected(self, original: str, count: int) -> None:
        self.entries_rejected += count
        self.counters["rejected"] += count
        log.warning("spool file %s: %d invalid entries quarantined", original, count)

    def rotate(self, max_error_files: int) -> None:
        """Keep recovery/errors/ within maxErrorFiles: the oldest quarantined files go."""
        try:
            removed = rotate_errors(self.layout.errors, max_error_files)
        except OSError as exc:
            log.error("cannot rotate recovery/errors/: %s; trying again at the next scan", exc)
            self.rotation_due = True
            return
        if removed:
            self.errors_rotated += len(removed)
            log.warning(
                "recovery/errors/ holds more than maxErrorFiles (%d): removed the %d oldest",
                max_error_files,
                len(removed),
            )
            audit(
                "errors_rotated",
                fileCount=len(removed),
                files=removed[:MAX_LISTED_ERRORS],
                maxErrorFiles=max_error_files,
            )
