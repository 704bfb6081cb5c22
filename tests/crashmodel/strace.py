"""Run a command under strace and parse its file-system calls.

strace prints every string and every fd's path in hex (`-xx -y`), so paths and written bytes
come back exact whatever they hold. A call another thread interrupted is printed in two
halves; it is placed where it completed, when its effect is certain.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

TRACED = (
    "open,openat,creat,write,pwrite64,writev,pwritev,rename,renameat,renameat2,link,linkat,"
    "unlink,unlinkat,mkdir,mkdirat,rmdir,ftruncate,truncate,fsync,fdatasync,close,lseek,"
    "sendto,sendmsg"
)
MAX_STRING = 1 << 22

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(.*)$", re.S)
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$", re.S)
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(.*)$", re.S)
_HEX = re.compile(r"((?:\\x[0-9a-f]{2})*)")
_STRING = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
_FD = re.compile(r"^(-?\d+|AT_FDCWD)<((?:\\x[0-9a-f]{2})*)>")


def strace_argv(out: Path, argv: list[str]) -> list[str]:
    exe = shutil.which("strace")
    if exe is None:
        raise RuntimeError("strace not found: install the strace package (apt-get install strace)")
    head = [exe, "-f", "-qq", "-y", "-xx", "-s", str(MAX_STRING), "-o", str(out)]
    return [*head, "-e", f"trace={TRACED}", *argv]


def unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


@dataclasses.dataclass
class Arg:
    raw: str
    fd: int | None = None  # an fd argument (AT_FDCWD is -100)
    path: bytes | None = None  # its path, or the string argument's bytes

    @property
    def text(self) -> str:
        return self.raw.strip()


@dataclasses.dataclass
class Syscall:
    tid: int
    name: str
    args: list[Arg]
    ret: int | None  # None when the call failed
    ret_path: bytes | None  # the path strace shows for a returned fd


def _split_args(text: str) -> list[str]:
    parts, depth, start, in_str = [], 0, 0, False
    i = 0
    while i < len(text):
        c = text[i]
        if in_str:
            if c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if text[start:].strip():
        parts.append(text[start:])
    return parts


def _arg(raw: str) -> Arg:
    raw = raw.strip()
    if m := _FD.match(raw):
        fd = -100 if m.group(1) == "AT_FDCWD" else int(m.group(1))
        return Arg(raw, fd, unhex(m.group(2)))
    if raw.startswith('"'):
        return Arg(raw, None, b"".join(unhex(s) for s in _STRING.findall(raw)))
    if raw.startswith("["):  # an iovec array: the bytes of every iov_base, in order
        return Arg(raw, None, b"".join(unhex(s) for s in _STRING.findall(raw)))
    return Arg(raw)


def _ret(text: str) -> tuple[int | None, bytes | None]:
    text = text.strip()
    if text.startswith("-1") or text.startswith("?"):
        return None, None
    m = re.match(r"^(-?\d+|0x[0-9a-f]+)(?:<((?:\\x[0-9a-f]{2})*)>)?", text)
    if not m:
        return None, None
    value = int(m.group(1), 0)
    return value, unhex(m.group(2)) if m.group(2) is not None else None


def parse(text: str) -> list[Syscall]:
    calls: list[Syscall] = []
    pending: dict[int, tuple[str, str]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        tid, rest = int(m.group(1)), m.group(2)
        if m2 := _UNFINISHED.match(rest):
            pending[tid] = (m2.group(1), m2.group(2))
            continue
        if m2 := _RESUMED.match(rest):
            name, head = pending.pop(tid, (m2.group(1), ""))
            args_text, ret_text = head + m2.group(2), m2.group(3)
        elif m2 := _CALL.match(rest):
            name, args_text, ret_text = m2.group(1), m2.group(2), m2.group(3)
        else:
            continue
        ret, ret_path = _ret(ret_text)
        calls.append(Syscall(tid, name, [_arg(a) for a in _split_args(args_text)], ret, ret_path))
    return calls
