"""Fault injection by patching `os` calls: a site (a predicate on the path) plus an errno.

EACCES and EROFS strike when a file is created (where the kernel reports them); ENOSPC and
EIO strike on write and fsync of a file opened at the site. With `directory(path)` as the
site, EIO and ENOSPC strike the fsync of that directory: a rename into it has happened, but
is not durable.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

AT_OPEN = {errno.EACCES, errno.EROFS, errno.EPERM}
ERRNOS = {
    "ENOSPC": errno.ENOSPC,
    "EACCES": errno.EACCES,
    "EIO": errno.EIO,
    "EROFS": errno.EROFS,
}


class FaultInjector:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rules: list[tuple[Callable[[str], bool], int]] = []
        self.fds: dict[int, str] = {}
        self.hits = 0
        real_open, real_write, real_fsync = os.open, os.write, os.fsync
        real_rename, real_close = os.rename, os.close

        def match(path: str, at_open: bool) -> int | None:
            for predicate, code in self.rules:
                if predicate(path) and (code in AT_OPEN) == at_open:
                    return code
            return None

        def fake_open(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
            spath = os.fspath(path)
            if flags & os.O_CREAT and (code := match(spath, True)) is not None:
                self.hits += 1
                raise OSError(code, os.strerror(code), spath)
            fd = real_open(path, flags, mode, *a, **kw)
            self.fds[fd] = spath
            return fd

        def fake_write(fd: int, data: Any) -> int:
            path = self.fds.get(fd)
            if path is not None and (code := match(path, False)) is not None:
                self.hits += 1
                raise OSError(code, os.strerror(code), path)
            return real_write(fd, data)

        def fake_fsync(fd: Any) -> None:
            path = self.fds.get(fd) if isinstance(fd, int) else None
            if path is not None and (code := match(path, False)) is not None:
                self.hits += 1
                raise OSError(code, os.strerror(code), path)
            real_fsync(fd)

        def fake_rename(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            spath = os.fspath(dst)
            if (code := match(spath, True)) is not None:
                self.hits += 1
                raise OSError(code, os.strerror(code), spath)
            real_rename(src, dst, *a, **kw)

        def fake_close(fd: int) -> None:
            # A number reused by a later open that bypasses os.open must not keep this path.
            self.fds.pop(fd, None)
            real_close(fd)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "close", fake_close)
        monkeypatch.setattr(os, "write", fake_write)
        monkeypatch.setattr(os, "fsync", fake_fsync)
        monkeypatch.setattr(os, "rename", fake_rename)

    @contextmanager
    def broken(self, predicate: Callable[[str], bool], code: int) -> Iterator[None]:
        rule = (predicate, code)
        self.rules.append(rule)
        try:
            yield
        finally:
            self.rules.remove(rule)

    def breaks(self, predicate: Callable[[str], bool], code: int) -> Callable[[], None]:
        """Start a fault now; the returned function heals it."""
        rule = (predicate, code)
        self.rules.append(rule)
        return lambda: self.rules.remove(rule)


def under(directory: Path, suffix: str = "") -> Callable[[str], bool]:
    prefix = str(directory) + os.sep

    def predicate(path: str) -> bool:
        return (
            path.startswith(prefix)
            and os.sep not in path[len(prefix) :]
            and (not suffix or suffix in path)
        )

    return predicate


def directory(path: Path) -> Callable[[str], bool]:
    """The directory itself (its fsync), not the files in it."""
    target = os.fspath(path)
    return lambda candidate: candidate.rstrip(os.sep) == target
