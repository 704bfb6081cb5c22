"""Opening an adopted spool file: only a regular file the daemon can read and trusts.

Step 1 of the intake (see spool.py), apart because it is where hostile files are met: a FIFO,
socket, device, directory or symlink, a file another user left unreadable, or one spool_trust
refuses goes to recovery/errors/ unread, and the fd read by is one the daemon owns.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from pathlib import Path

from flowagg.core.audit import FileOwner
from flowagg.ingest.spool_quarantine import SpoolQuarantine
from flowagg.ingest.spool_read import Chunk, file_kind, not_regular_reason, read_chunk
from flowagg.ingest.spool_trust import OPEN_FLAGS, Droppers, account, refusal, take_over


def open_adopted(path: Path, droppers: Droppers, quarantine: SpoolQuarantine) -> int | None:
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
                quarantine.move(
                    path,
                    f"unreadable: {account(st.st_uid)} wrote it with mode"
                    f" {stat.S_IMODE(st.st_mode):04o}; spool files must be readable by the"
                    " daemon's user (`flowagg add --spool` writes them so)",
                )
                return None
            st = os.fstat(fd)
            kind = file_kind(st.st_mode)
            if kind is None:
                return _trusted(path, fd, st, droppers, quarantine)
            os.close(fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        kind = "a symbolic link"
    quarantine.move(path, not_regular_reason(kind))
    return None


def _trusted(
    path: Path, fd: int, st: os.stat_result, droppers: Droppers, quarantine: SpoolQuarantine
) -> int | None:
    """The fd to read an adopted file by, or None when it is refused (quarantined)."""
    refused = refusal(st, droppers)
    if refused is None:
        quarantine.owners[path.name] = FileOwner.of(st)
        return take_over(path, fd, st)
    os.close(fd)
    quarantine.move(path, refused)
    return None


@dataclasses.dataclass
class Opened:
    """An adopted file opened ahead of its turn: its fd (None when `open_adopted` found it gone
    or quarantined it) and, for a .jsonl file, its first chunk; or what opening it raised."""

    fd: int | None = None
    first: Chunk | None = None
    error: Exception | None = None

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def open_step(
    folder: Path,
    names: list[str],
    max_line: int,
    droppers: Droppers,
    quarantine: SpoolQuarantine,
    budget: int,
) -> dict[str, Opened]:
    """Open adopted files none of which is journaled yet, and read each .jsonl file's first
    chunk: a step's files in one trip off the loop, not two each. Once the chunks read hold
    `budget` bytes the rest are left out, to be opened in their turn."""
    opened: dict[str, Opened] = {}
    for name in names:
        if budget <= 0:
            break
        entry = opened[name] = Opened()
        try:
            entry.fd = open_adopted(folder / name, droppers, quarantine)
            if entry.fd is not None and name.endswith(".jsonl"):
                entry.first = read_chunk(entry.fd, 0, max_line)
                budget -= entry.first.end
        except Exception as exc:
            entry.close()
            entry.error = exc  # raised on the loop, where the file's turn handles it
    return opened
