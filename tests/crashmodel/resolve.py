"""Recorded calls -> model operations, resolved against the file system as the process saw it.

Only what lies under the data root is modelled; logs and health snapshots are left out (no
promise rests on them). An fd is followed with its offset, O_APPEND and O_TRUNC. Writes to
an `external` file (a sink's receiver outside the root) are kept as External operations,
and the daemon's `{"ok":true,"accepted"...}` replies as Acks.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from tests.crashmodel.model import ACK_PREFIX, Ack, Barrier, Data, External, Fs, Link, Op
from tests.crashmodel.strace import Arg, Syscall

IGNORED = ("logs/", "health/")


@dataclasses.dataclass
class OpenFile:
    ino: int
    offset: int
    append: bool
    is_dir: bool


class Resolver:
    def __init__(self, fs: Fs, root: Path, external: dict[Path, str] | None = None) -> None:
        self.fs = fs
        self.root = os.fsencode(os.path.realpath(root))
        self.external = {os.fsencode(os.path.realpath(p)): n for p, n in (external or {}).items()}
        self.ops: list[Op] = []
        self.replies = 0
        self._fds: dict[int, OpenFile] = {}
        self._external_fds: dict[int, str] = {}

    def rel(self, path: bytes | None) -> str | None:
        """`path` relative to the root, or None outside it or in an ignored folder."""
        if path is None:
            return None
        if path == self.root:
            return ""
        if not path.startswith(self.root + b"/"):
            return None
        rel = os.fsdecode(path[len(self.root) + 1 :])
        return None if rel.startswith(IGNORED) else rel

    def _path(self, dirfd: Arg | None, name: Arg) -> bytes | None:
        if name.path is None:
            return None
        if name.path.startswith(b"/") or dirfd is None or dirfd.path is None:
            return os.path.normpath(name.path)
        return os.path.normpath(dirfd.path + b"/" + name.path)

    def feed(self, calls: list[Syscall]) -> list[Op]:
        for call in calls:
            if call.ret is not None:
                getattr(self, f"_{call.name}", self._other)(call)
        return self.ops

    def _emit(self, op: Op) -> None:
        self.fs.apply(op)
        self.ops.append(op)

    def _key(self, call: Syscall, fd: int | None) -> int:
        # By number alone: a thread's first calls can come before its clone returns in the
        # trace, so threads cannot be told from processes in time. The only other processes
        # are a sink's, which touch the root through no fd; an fd is dropped only when the
        # path strace shows for it lies in the root.
        return fd if fd is not None else -1

    def _other(self, call: Syscall) -> None:
        pass

    # Opening and creating.
    def _open_path(self, call: Syscall, path: bytes | None, flags: str) -> None:
        assert call.ret is not None
        key = self._key(call, call.ret)
        target = call.ret_path or path
        if target is not None and os.path.realpath(target) in self.external:
            self._external_fds[key] = self.external[os.path.realpath(target)]
            return
        rel = self.rel(target)
        if rel is None or "O_TMPFILE" in flags:
            return
        ino = self.fs.lookup(rel)
        if ino is None:
            parent, name = self.fs.parent_of(rel)
            ino = self.fs.new_ino()
            self._emit(Link(((parent, name, ino),)))
        is_dir = ino in self.fs.dirs
        if "O_TRUNC" in flags and not is_dir and self.fs.files.get(ino):
            self._emit(Data(ino, 0, truncate=0))
        self._fds[key] = OpenFile(ino, 0, "O_APPEND" in flags, is_dir)

    def _openat(self, call: Syscall) -> None:
        self._open_path(call, self._path(call.args[0], call.args[1]), call.args[2].raw)

    def _open(self, call: Syscall) -> None:
        self._open_path(call, self._path(None, call.args[0]), call.args[1].raw)

    def _creat(self, call: Syscall) -> None:
        self._open_path(call, self._path(None, call.args[0]), "O_CREAT|O_TRUNC")

    def _close(self, call: Syscall) -> None:
        key = self._key(call, call.args[0].fd)
        if self.rel(call.args[0].path) is not None:
            self._fds.pop(key, None)
        self._external_fds.pop(key, None)

    # Data.
    def _write_at(self, call: Syscall, data: bytes, offset: int | None) -> None:
        key = self._key(call, call.args[0].fd)
        fd_path = call.args[0].path or b""
        if fd_path.startswith(b"socket:"):
            if data.startswith(ACK_PREFIX):
                self.ops.append(Ack(self.replies))
                self.replies += 1
            return
        name = self._external_fds.get(key) or self.external.get(os.path.realpath(fd_path))
        if name is not None:  # the annotation follows an fd a shell dup2'ed to stdout
            self.ops.append(External(name, data))
            return
        open_file = self._fds.get(key)
        if open_file is None or open_file.is_dir or self.rel(fd_path) is None:
            return
        size = len(self.fs.files.get(open_file.ino, b""))
        at = offset if offset is not None else size if open_file.append else open_file.offset
        self._emit(Data(open_file.ino, at, data))
        if offset is None:
            open_file.offset = at + len(data)

    def _write(self, call: Syscall) -> None:
        assert call.ret is not None
        self._write_at(call, (call.args[1].path or b"")[: call.ret], None)

    _writev = _write

    def _sendto(self, call: Syscall) -> None:
        self._write(call)

    def _sendmsg(self, call: Syscall) -> None:
        assert call.ret is not None
        self._write_at(call, (call.args[1].path or b"")[: call.ret], None)

    def _pwrite64(self, call: Syscall) -> None:
        assert call.ret is not None
        self._write_at(call, (call.args[1].path or b"")[: call.ret], int(call.args[3].raw))

    def _pwritev(self, call: Syscall) -> None:
        assert call.ret is not None
        self._write_at(call, (call.args[1].path or b"")[: call.ret], int(call.args[3].raw))

    def _lseek(self, call: Syscall) -> None:
        open_file = self._fds.get(self._key(call, call.args[0].fd))
        if open_file is not None and call.ret is not None:
            open_file.offset = call.ret

    def _ftruncate(self, call: Syscall) -> None:
        open_file = self._fds.get(self._key(call, call.args[0].fd))
        if open_file is not None and not open_file.is_dir:
            self._emit(Data(open_file.ino, 0, truncate=int(call.args[1].raw)))

    def _truncate(self, call: Syscall) -> None:
        rel = self.rel(self._path(None, call.args[0]))
        ino = None if rel is None else self.fs.lookup(rel)
        if ino is not None:
            self._emit(Data(ino, 0, truncate=int(call.args[1].raw)))

    def _fsync(self, call: Syscall) -> None:
        open_file = self._fds.get(self._key(call, call.args[0].fd))
        if open_file is not None and self.rel(call.args[0].path) is not None:
            self.ops.append(Barrier(open_file.ino, open_file.is_dir))

    _fdatasync = _fsync

    # Names.
    def _rename_paths(self, old: bytes | None, new: bytes | None) -> None:
        src, dst = self.rel(old), self.rel(new)
        if src is None and dst is None:
            return
        edits: list[tuple[int, str, int | None]] = []
        ino = None
        if src is not None:
            ino = self.fs.lookup(src)
            parent, name = self.fs.parent_of(src)
            edits.append((parent, name, None))
        if dst is not None and ino is not None:
            parent, name = self.fs.parent_of(dst)
            edits.append((parent, name, ino))
        self._emit(Link(tuple(edits)))

    def _rename(self, call: Syscall) -> None:
        self._rename_paths(self._path(None, call.args[0]), self._path(None, call.args[1]))

    def _renameat(self, call: Syscall) -> None:
        a = call.args
        self._rename_paths(self._path(a[0], a[1]), self._path(a[2], a[3]))

    _renameat2 = _renameat

    def _link_paths(self, old: bytes | None, new: bytes | None) -> None:
        src, dst = self.rel(old), self.rel(new)
        ino = None if src is None else self.fs.lookup(src)
        if dst is not None and ino is not None:
            parent, name = self.fs.parent_of(dst)
            self._emit(Link(((parent, name, ino),)))

    def _link(self, call: Syscall) -> None:
        self._link_paths(self._path(None, call.args[0]), self._path(None, call.args[1]))

    def _linkat(self, call: Syscall) -> None:
        a = call.args
        self._link_paths(self._path(a[0], a[1]), self._path(a[2], a[3]))

    def _remove(self, path: bytes | None) -> None:
        rel = self.rel(path)
        if rel and self.fs.lookup(rel) is not None:
            parent, name = self.fs.parent_of(rel)
            self._emit(Link(((parent, name, None),)))

    def _unlink(self, call: Syscall) -> None:
        self._remove(self._path(None, call.args[0]))

    _rmdir = _unlink

    def _unlinkat(self, call: Syscall) -> None:
        self._remove(self._path(call.args[0], call.args[1]))

    def _make_dir(self, path: bytes | None) -> None:
        rel = self.rel(path)
        if rel and self.fs.lookup(rel) is None:
            parent, name = self.fs.parent_of(rel)
            ino = self.fs.new_ino()
            self._emit(Link(((parent, name, ino),), new_dir=ino))

    def _mkdir(self, call: Syscall) -> None:
        self._make_dir(self._path(None, call.args[0]))

    def _mkdirat(self, call: Syscall) -> None:
        self._make_dir(self._path(call.args[0], call.args[1]))
