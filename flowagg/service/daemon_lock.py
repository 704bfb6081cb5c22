"""One daemon per data root (SPEC §1.4, §2), whatever `runDir` says.

The lock that refuses a second daemon lives in the root itself (`<root>/flowagg.lock`), beside
a record of its holder's pid (`<root>/flowagg.pid`): two daemons started with different run
directories meet there, and the second learns the first's pid even though it cannot see its
run directory. The run directory keeps a lock of its own, so that two roots configured with
one run directory do not take each other's socket, and its pid file names the daemon that
owns the socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import filelock

from flowagg.core.errors import AlreadyRunningError, RootUnusableError
from flowagg.core.fsutil import atomic_write
from flowagg.core.layout import Layout

log = logging.getLogger("flowagg.daemon")


def read_pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class DaemonLock:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._held: list[filelock.BaseFileLock] = []

    def acquire(self) -> None:
        """Take the root's lock, then the run directory's; AlreadyRunningError (exit 3) when
        another daemon holds either, RootUnusableError (exit 4) when one cannot be made."""
        layout = self.layout
        try:
            self._take(layout.root_lock_file, layout.root_pid_file, "the data root", layout.root)
            if layout.run_lock_file != layout.root_lock_file:
                self._take(layout.run_lock_file, layout.pid_file, "the run directory", layout.run)
        except BaseException:
            self.release()
            raise
        pid = f"{os.getpid()}\n".encode()
        for path in dict.fromkeys((layout.root_pid_file, layout.pid_file)):
            try:
                atomic_write(path, pid)
            except OSError as exc:
                # A full disk must not stop the daemon (SPEC §2); a pid file only names us.
                log.warning("cannot write the pid file %s: %s", path, exc)

    def _take(self, lock_path: Path, pid_path: Path, what: str, where: Path) -> None:
        lock = filelock.FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            pid = read_pid_file(pid_path)
            who = f"pid {pid}" if pid else "another process"
            raise AlreadyRunningError(
                f"flowagg is already running on {what} {where} ({who}, holding {lock_path});"
                " stop it first or use another --root"
            ) from None
        except OSError as exc:
            raise RootUnusableError(
                f"cannot create the lock file {lock_path}: {exc.strerror}; check permissions"
            ) from None
        self._held.append(lock)

    def release(self) -> None:
        """Remove the pid files that still name us, then let go of the locks."""
        layout = self.layout
        for path in dict.fromkeys((layout.pid_file, layout.root_pid_file)):
            with contextlib.suppress(FileNotFoundError):
                if read_pid_file(path) == os.getpid():
                    path.unlink()
        while self._held:
            self._held.pop().release()
