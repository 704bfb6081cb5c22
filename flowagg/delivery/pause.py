"""Failures of the environment rather than of a batch (SPEC §6): they pause the recovery loop.

ENOSPC or EACCES on a folder, a process out of file descriptors, an open breaker, a sink that
is down: every batch would meet the same failure, so none of them is charged a retry
(`batchRetryLimit`), and the loop stops trying until a backoff of its own has passed
(`retryBaseMs * 2^n`, capped at `retryMaxDelayMs`, n the passes in a row that met the cause).
A failure of one batch (EIO on its file, a sink that took other batches but not this one)
still counts.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from typing import Any

from flowagg.core.errors import CircuitOpenError, SinkDownError

# A folder the daemon cannot write to, whatever the batch: full, read-only, not allowed.
FOLDER_ERRNOS = {
    errno.ENOSPC: "ENOSPC",
    errno.EDQUOT: "EDQUOT",
    errno.EACCES: "EACCES",
    errno.EPERM: "EPERM",
    errno.EROFS: "EROFS",
    errno.ENOTDIR: "ENOTDIR",
}
# The process (or the system) out of file descriptors: no folder to blame, and no batch either.
PROCESS_ERRNOS = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE"}


@dataclasses.dataclass(frozen=True)
class Cause:
    """What stops every batch: an errno name and the folder (relative to the root, ending in
    '/'), or "breakerOpen" / "sinkDown" without a folder."""

    cause: str
    folder: str | None
    error: str

    @property
    def needs_disk(self) -> bool:
        """Whether every batch's retry would meet it, not only those that still need the sink."""
        return self.folder is not None or self.cause in PROCESS_ERRNOS.values()

    def describe(self) -> str:
        where = f" on {self.folder}" if self.folder else ""
        return f"{self.cause}{where} ({self.error})"


def environment_cause(exc: BaseException, root: Path, default_folder: str) -> Cause | None:
    """The environment-wide cause behind `exc`, or None when it is the batch's own failure."""
    error = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, CircuitOpenError):
        return Cause("breakerOpen", None, error)
    if isinstance(exc, SinkDownError):
        return Cause("sinkDown", None, error)
    if isinstance(exc, OSError) and exc.errno in FOLDER_ERRNOS:
        return Cause(FOLDER_ERRNOS[exc.errno], _folder(exc.filename, root, default_folder), error)
    if isinstance(exc, OSError) and exc.errno in PROCESS_ERRNOS:
        return Cause(PROCESS_ERRNOS[exc.errno], None, error)
    return None


def _folder(filename: object, root: Path, default: str) -> str:
    if not isinstance(filename, str | os.PathLike):
        return default
    path = Path(filename)
    try:
        # A file's folder (a temp file in aggregated/), or the folder itself.
        rel = (path if path.is_dir() else path.parent).relative_to(root)
    except ValueError:
        return default
    return f"{rel.as_posix()}/" if rel.parts else "./"


class Pause:
    """The loop's own backoff while an environment cause lasts (times in ms, from the loop's
    injected clock)."""

    def __init__(self) -> None:
        self.cause: Cause | None = None
        self.since_ms = 0
        self.until_ms = 0
        self.passes = 0

    def hit(self, cause: Cause, now_ms: int, delay_ms: int) -> None:
        """`delay_ms`: the policy's cap for `passes` (grows with each pass that meets it)."""
        if self.cause is None:
            self.since_ms = now_ms
        self.cause = cause
        self.passes += 1
        self.until_ms = now_ms + delay_ms

    def clear(self) -> None:
        self.cause = None
        self.passes = 0

    def holds(self, now_ms: int) -> bool:
        return self.cause is not None and now_ms < self.until_ms

    def snapshot(self) -> dict[str, Any] | None:
        if self.cause is None:
            return None
        return {
            "cause": self.cause.cause,
            "folder": self.cause.folder,
            "error": self.cause.error,
            "since": self.since_ms,
            "retryAt": self.until_ms,
        }
