"""Cleanup (SPEC §6): old health snapshots and rotated logs, stale temp files, and completed
batches only when `retainBatchesMs` asks for it. Abandoned batches and quarantined files are
never removed here: a person decides about those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
from pathlib import Path

from flowagg.core import audit
from flowagg.core.errors import FlowaggError
from flowagg.core.fsutil import TEMP_MARK
from flowagg.core.layout import Layout

STALE_TEMP_MS = 3_600_000  # a temp file this old belongs to no write in progress
_HEALTH_RE = re.compile(r"health-(\d+)\.json")
_BATCH_RE = re.compile(r"batch_\d+_\d+\.json(\.gz|\.zst)?")
_ROTATED_RE = re.compile(r".+\.log\.\d+")


@dataclasses.dataclass
class Removal:
    path: Path
    size: int
    why: str


def plan_cleanup(
    layout: Layout, now_ms: int, *, age_ms: int, retain_batches_ms: int
) -> list[Removal]:
    out: list[Removal] = []

    def consider(path: Path, born_ms: float, limit_ms: int, why: str) -> None:
        if now_ms - born_ms > limit_ms:
            with contextlib.suppress(FileNotFoundError):
                st = path.lstat()
                # Only files flowagg could have written: a directory or a link under such a
                # name is not its to delete (and unlinking a directory fails the whole pass).
                if stat.S_ISREG(st.st_mode):
                    out.append(Removal(path, st.st_size, why))

    for path in _files(layout.health):
        m = _HEALTH_RE.fullmatch(path.name)
        if m:
            consider(path, int(m.group(1)), age_ms, "health snapshot")
    for path in _files(layout.logs):
        if _ROTATED_RE.fullmatch(path.name):
            consider(path, _mtime_ms(path), age_ms, "rotated log")
    for directory in layout.private_dirs():
        for path in _files(directory):
            if path.name.startswith(TEMP_MARK):
                consider(path, _mtime_ms(path), STALE_TEMP_MS, "stale temp file")
    if retain_batches_ms > 0:
        for path in _files(layout.aggregated):
            # Aged from completion (the file's mtime), not from the arrival time in its name:
            # a batch recovered or drained late is as new to its readers as any other.
            if _BATCH_RE.fullmatch(path.name):
                consider(path, _mtime_ms(path), retain_batches_ms, "completed batch past retention")
    return out


def cleanup_fields(removals: list[Removal], freed: int) -> dict[str, object]:
    """What the audit log keeps of a cleanup: each file's name (relative to the root's
    folders) and size, and the bytes freed."""
    return {
        "removed": [
            {"file": f"{r.path.parent.name}/{r.path.name}", "bytes": r.size, "why": r.why}
            for r in removals
        ],
        "bytesFreed": freed,
    }


def audit_cleanup(layout: Layout, removals: list[Removal], freed: int) -> None:
    """The audit line of a cleanup run by a command rather than by the daemon."""
    doc = audit.record("cleanup", by="command", **cleanup_fields(removals, freed))
    doc["peer"] = audit.self_peer()
    try:
        audit.append_line(layout.logs, doc)
    except OSError as exc:
        raise FlowaggError(
            f"removed {len(removals)} files but cannot write {layout.logs}/{audit.FILE_NAME}"
            f" ({exc.strerror}); free space or fix its permissions",
            1,
        ) from None


def apply_cleanup(removals: list[Removal]) -> int:
    freed = 0
    for item in removals:
        try:
            item.path.unlink()
        except FileNotFoundError:
            continue
        freed += item.size
    return freed


def _files(directory: Path) -> list[Path]:
    try:
        return [directory / n for n in sorted(os.listdir(directory))]
    except FileNotFoundError:
        return []


def _mtime_ms(path: Path) -> float:
    try:
        return path.stat().st_mtime * 1000
    except FileNotFoundError:
        return float("inf")
