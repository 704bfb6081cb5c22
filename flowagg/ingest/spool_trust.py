"""Which adopted spool files the daemon trusts, and how it makes one its own (SPEC §4.2).

A shared inbox/ is a drop box: any member of socketGroup may put a file there, so a file's
owner is not necessarily who put it there. A member can hard-link another account's file
into inbox/, or rename into it a file someone else wrote. The daemon therefore never changes
an inode it did not create (a chown or chmod would seize the victim's file): it refuses a
file with more than one link or whose owner could not have written it there, and reads any
other foreign file through a private copy it creates itself.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
from pathlib import Path

from flowagg.core.fsutil import FILE_MODE, TEMP_MARK, display_name, fit_name, fsync_dir

log = logging.getLogger("flowagg.spool")

READ_BLOCK = 64 << 10
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def account(uid: int) -> str:
    """`uid 1001 (alice)`, or just the uid when no account has it."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class Droppers:
    """Who may write a file into inbox/: the daemon's user, root and, when it is shared, the
    members of socketGroup. Looked up once per uid until `forget` (each scan)."""

    def __init__(self, group: int | None) -> None:
        self.group = group
        self._known: dict[int, bool] = {}

    def forget(self) -> None:
        self._known.clear()

    def may_drop(self, uid: int) -> bool:
        if uid in (0, os.geteuid()):
            return True
        if self.group is None:
            return False
        if uid not in self._known:
            self._known[uid] = self._member(uid)
        return self._known[uid]

    def _member(self, uid: int) -> bool:
        assert self.group is not None
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            return False
        if user.pw_gid == self.group:
            return True
        try:
            return user.pw_name in grp.getgrgid(self.group).gr_mem
        except KeyError:
            return False


def refusal(st: os.stat_result, droppers: Droppers) -> str | None:
    """Why an adopted regular file must not be read (None when it may be).

    The reason names the file's real owner: the account that planted the file is unknown,
    and the owner is its victim, not its author.
    """
    owner = account(st.st_uid)
    if st.st_nlink > 1:
        return (
            f"a hard link ({st.st_nlink} names) to a file owned by {owner}: someone linked it"
            " into inbox/, so it was not read and is left as it was; spool a file of your own"
            " with one name (`flowagg add --spool`)"
        )
    if not droppers.may_drop(st.st_uid):
        return (
            f"owned by {owner}, who cannot write to inbox/: another account moved it there, so"
            " it was not read and is left as it was; its owner may spool it with"
            " `flowagg add --spool`"
        )
    return None


def take_over(path: Path, fd: int, st: os.stat_result) -> int:
    """An fd of a file the daemon owns with the adopted file's bytes; `path` is then it.

    A file another account wrote still belongs to it after the adoption rename, and that
    account could rewrite it through an fd it kept while the daemon reads it. Its bytes are
    copied (same bytes, so journaled offsets stay valid) into a file the daemon creates,
    which replaces it: the foreign inode is never chowned or chmodded.
    """
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == FILE_MODE:
        return fd
    fd = _copy_over(path, fd)
    if st.st_uid != os.geteuid():
        log.info(
            "spool file %s came from %s; the daemon reads its own copy (mode 0600)",
            display_name(path.name),
            account(st.st_uid),
        )
    return fd


def _copy_over(path: Path, fd: int) -> int:
    pid = f".{os.getpid()}"
    tmp = path.with_name(fit_name(f"{TEMP_MARK}{path.name}", len(pid)) + pid)
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        offset = 0
        while block := os.pread(fd, READ_BLOCK, offset):
            view = memoryview(block)
            while view:
                view = view[os.write(out, view) :]
            offset += len(block)
        os.fsync(out)
        os.close(out)
        out = -1
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if out >= 0:
            os.close(out)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        os.close(fd)
        raise
    os.close(fd)
    return os.open(path, OPEN_FLAGS)
