"""Taking files out of the spool `inbox/` a step at a time (SPEC §4.2).

A step renames up to STEP_FILES spool files (about STEP_BYTES in all) from inbox/ into
journal/spool/ and then fsyncs both folders once: every rename of the step is durable before
any of its files is journaled, and the step's files share those two fsyncs. Anything in
inbox/ that is not a regular spool file is junk, moved to recovery/errors/ unread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path

from flowagg.core.clock import Clock
from flowagg.core.fsutil import display_name, fit_name, fsync_dir
from flowagg.core.layout import Layout
from flowagg.ingest.spool_quarantine import SpoolQuarantine
from flowagg.ingest.spool_read import file_kind, is_spool_name, not_regular_reason

log = logging.getLogger("flowagg.spool")

# Files adopted per step: they share the folder fsyncs, and their deletions share one. The
# byte bound keeps what a step adopts (and a crash leaves to resume) small.
STEP_FILES = 64
STEP_BYTES = 4 << 20
JUNK = "\0junk"  # what take says of a file that is not a spool file (no file name has a NUL)


@dataclasses.dataclass
class Step:
    seen: int = 0  # names of the listing this step looked at
    adopted: list[str] = dataclasses.field(default_factory=list)
    junk: int = 0  # junk found, moved to errors/ or not
    synced: bool = True  # the step's renames are durable: its files may be journaled


class Adopter:
    def __init__(self, layout: Layout, clock: Clock, quarantine: SpoolQuarantine) -> None:
        self.layout = layout
        self.clock = clock
        self._inbox, self._folder = layout.inbox, layout.journal_spool  # built once, not per file
        self._quarantine = quarantine
        self._counter = itertools.count()
        # New adopted names sort after every name this floor was raised past (see recover).
        self.floor_ms = 0

    def take_step(self, names: list[str], junk_left: int, stopping: Callable[[], bool]) -> Step:
        """Adopt spool files from the front of `names` (inbox/ listed in name order); junk goes
        to errors/ while `junk_left` allows. Blocking: runs off the event loop."""
        step = Step()
        size = 0
        for name in names:
            if stopping() or len(step.adopted) >= STEP_FILES or size >= STEP_BYTES:
                break
            step.seen += 1
            try:
                adopted, file_size = self._take(self._inbox / name, junk_left > step.junk)
            except Exception:
                # One file must not stop the others: it stays in inbox/ for the next rescan.
                log.exception("spool file %s cannot be taken from inbox/", display_name(name))
                continue
            if adopted is JUNK:
                step.junk += 1
            elif adopted is not None:
                step.adopted.append(adopted)
                size += file_size
        if step.adopted:
            step.synced = self.sync_folders()
        return step

    def sync_folders(self) -> bool:
        """Make the renames into journal/spool/ durable; False (logged) when they are not.

        A file journaled while its rename may still be undone by a power cut would come back
        in inbox/ after the cut, beside journal records that already hold its entries: it
        would be ingested twice. So nothing adopted is journaled until this succeeds.
        """
        try:
            fsync_dir(self.layout.journal_spool)
            fsync_dir(self.layout.inbox)
        except OSError as exc:
            log.error(
                "spool: cannot fsync inbox/ and journal/spool/ (%s); adopted files wait there"
                " until it works (tried again at the next rescan)",
                exc,
            )
            return False
        return True

    def _take(self, path: Path, quarantine: bool) -> tuple[str | None, int]:
        """Adopt a regular spool file (its name and size); anything else in inbox/ is JUNK,
        moved to errors/ unread when `quarantine` says this scan may still do so."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None, 0  # its client or another scan took it away
        kind = file_kind(st.st_mode)
        if kind is not None:
            reason = not_regular_reason(kind)
        elif not is_spool_name(path.name):
            reason = "not a spool file: name must end in .json or .jsonl"
        else:
            return self._adopt(path), st.st_size
        if quarantine:
            self._quarantine.move(path, reason)
        return JUNK, 0

    def _adopt(self, path: Path) -> str | None:
        ms = max(self.clock.now_ms(), self.floor_ms)
        # The journal names the file in JSON, so the name must be text: odd bytes become \xNN.
        adopted = fit_name(f"{ms:013d}-{next(self._counter):06d}-{display_name(path.name)}")
        try:
            os.rename(path, self._folder / adopted)
        except FileNotFoundError:
            return None  # its client or another scan took it away
        except OSError as exc:
            shown = display_name(path.name)
            log.error("spool file %s cannot be adopted (%s); it waits in inbox/", shown, exc)
            return None
        self._quarantine.originals[adopted] = display_name(path.name)
        return adopted
