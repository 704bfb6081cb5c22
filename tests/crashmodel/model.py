"""What a file system may keep after a power cut: recorded calls as operations on inodes.

The model is POSIX's, not ext4's ordered mode: a file's writes are durable only once an fsync
or fdatasync of that file completed after them; a directory entry (create, rename, link,
unlink, mkdir) only once its directory was fsynced after it, both directories for a rename.
Anything not yet durable may be lost, in any order, and a write may be cut short. Names stay
atomic: a rename is kept or dropped whole.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

ROOT_INO = 0
DIR = None  # a directory's content in a materialized state
State = dict[str, bytes | None]  # path relative to the root -> bytes, or DIR
ACK_PREFIX = b'{"ok":true,"accepted"'
O_FLAGS = {"O_CREAT", "O_TRUNC", "O_APPEND", "O_DIRECTORY", "O_TMPFILE"}


@dataclasses.dataclass(frozen=True)
class Link:
    """Directory entries set (to an inode) or removed (None) together."""

    edits: tuple[tuple[int, str, int | None], ...]
    new_dir: int | None = None  # mkdir: the inode it creates

    @property
    def dirs(self) -> frozenset[int]:
        return frozenset(d for d, _, _ in self.edits)


@dataclasses.dataclass(frozen=True)
class Data:
    ino: int
    offset: int
    data: bytes = b""
    truncate: int | None = None  # a truncate to this size instead of a write


@dataclasses.dataclass(frozen=True)
class Barrier:
    ino: int
    is_dir: bool


@dataclasses.dataclass(frozen=True)
class Ack:
    """The daemon answered an add: the request's entries are acknowledged from here on."""

    reply: int  # how many add replies came before this one


@dataclasses.dataclass(frozen=True)
class External:
    """Bytes appended to a file outside the root (a sink's receiver): always kept."""

    name: str
    data: bytes


Op = Link | Data | Barrier | Ack | External


class Fs:
    """Inodes: a directory maps names to inodes, a file holds bytes."""

    def __init__(self) -> None:
        self.dirs: dict[int, dict[str, int]] = {ROOT_INO: {}}
        self.files: dict[int, bytearray] = {}
        self.next_ino = 1

    @classmethod
    def from_state(cls, state: State) -> Fs:
        fs = cls()
        for rel in sorted(state, key=lambda p: p.count("/")):
            parent, name = fs.parent_of(rel)
            ino = fs.new_ino()
            content = state[rel]
            if content is DIR:
                fs.dirs[ino] = {}
            else:
                fs.files[ino] = bytearray(content)
            fs.dirs[parent][name] = ino
        return fs

    def copy(self) -> Fs:
        fs = Fs()
        fs.dirs = {k: dict(v) for k, v in self.dirs.items()}
        fs.files = {k: bytearray(v) for k, v in self.files.items()}
        fs.next_ino = self.next_ino
        return fs

    def new_ino(self) -> int:
        self.next_ino += 1
        return self.next_ino - 1

    def lookup(self, rel: str) -> int | None:
        ino = ROOT_INO
        for part in rel.split("/") if rel else []:
            entries = self.dirs.get(ino)
            if entries is None or part not in entries:
                return None
            ino = entries[part]
        return ino

    def path_of(self, ino: int) -> str | None:
        """The path of a directory inode, relative to the root."""
        if ino == ROOT_INO:
            return ""
        for parent, entries in self.dirs.items():
            for name, child in entries.items():
                if child == ino:
                    head = self.path_of(parent)
                    return None if head is None else f"{head}/{name}".lstrip("/")
        return None

    def parent_of(self, rel: str) -> tuple[int, str]:
        head, _, name = rel.rpartition("/")
        parent = self.lookup(head)
        if parent is None or parent not in self.dirs:
            raise KeyError(f"no directory {head!r} for {rel!r}")
        return parent, name

    def apply(self, op: Op, cut: int | None = None) -> None:
        # Replayed operations name inodes the recording made: later new ones must not reuse them.
        for ino in _inodes(op):
            self.next_ino = max(self.next_ino, ino + 1)
        if isinstance(op, Link):
            if op.new_dir is not None:
                self.dirs.setdefault(op.new_dir, {})
            for d, name, ino in op.edits:
                entries = self.dirs.setdefault(d, {})
                if ino is None:
                    entries.pop(name, None)
                else:
                    entries[name] = ino
        elif isinstance(op, Data):
            buf = self.files.setdefault(op.ino, bytearray())
            if op.truncate is not None:
                del buf[op.truncate :]
                buf.extend(bytes(op.truncate - len(buf)))
                return
            data = op.data if cut is None else op.data[:cut]
            end = op.offset + len(data)
            if len(buf) < op.offset:
                buf.extend(bytes(op.offset - len(buf)))
            buf[op.offset : end] = data

    def state(self) -> State:
        out: State = {}

        def walk(ino: int, prefix: str) -> None:
            for name, child in sorted(self.dirs[ino].items()):
                rel = f"{prefix}{name}"
                if child in self.dirs:
                    out[rel] = DIR
                    walk(child, rel + "/")
                elif child in self.files:
                    out[rel] = bytes(self.files[child])
                else:
                    out[rel] = b""

        walk(ROOT_INO, "")
        return out


def _inodes(op: Op) -> list[int]:
    if isinstance(op, Link):
        return [ino for _, _, ino in op.edits if ino is not None] + [
            ino for ino in (op.new_dir,) if ino is not None
        ]
    return [op.ino] if isinstance(op, Data) else []


def snapshot(root: Path, skip: Iterable[str] = ()) -> State:
    """The files and directories under `root` (taken while nothing writes there)."""
    skipped = tuple(skip)
    state: State = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in sorted(dirnames):
            state[prefix + name] = DIR
        for name in sorted(filenames):
            rel = prefix + name
            if not rel.startswith(skipped):
                state[rel] = (Path(dirpath) / name).read_bytes()
    return state


def materialize(state: State, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for rel, content in state.items():
        path = target / rel
        if content is DIR:
            path.mkdir(mode=0o700, exist_ok=True)
        else:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o600)
