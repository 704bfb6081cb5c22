"""Opening files the read commands find under the root, whatever lies behind their names.

A name that looks like a batch or a journal segment may be a FIFO (an open for reading waits
for a writer forever), a link to `/dev/zero` (a read never ends) or a device. The read
commands open without following a link and without waiting, check that what they got is a
regular file before they read a byte, and read no more than a bound.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from flowagg.core.compression import TooLarge

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class NotRegular(ValueError):
    """The name is not a regular file; `kind` says what it is ("a FIFO")."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"not a regular file ({kind}); flowagg writes only regular files")
        self.kind = kind


def kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """The regular file at `path`, open for reading; NotRegular for anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular("a symbolic link") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegular(kind_of(mode))
    return os.fdopen(fd, "rb")


def read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """All bytes of the regular file at `path`; TooLarge past `limit` (nothing more is read)."""
    with open_regular(path) as file:
        size = os.fstat(file.fileno()).st_size
        data = b""
        if size <= limit:
            # read(limit + 1) would allocate the whole bound for every file, however small:
            # ask for the size, and for more only when the file grew since the fstat.
            data = file.read(size + 1)
            if len(data) > size:
                data += file.read(limit + 1 - len(data))
    if size > limit or len(data) > limit:
        raise TooLarge(f"holds {max(size, len(data)):,} bytes, past {limit:,}")
    return data
