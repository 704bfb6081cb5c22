"""Run a command under a seccomp filter that denies setuid/setgid bits, as systemd's
RestrictSUIDSGID=true does: chmod, fchmod, fchmodat(2), mkdir and mkdirat with S_ISUID or
S_ISGID in the mode fail with EPERM. Usage: python nosgid.py [--user NAME] COMMAND [ARG...]
(x86-64 only; `supported()` says whether this machine is one). With --user (as root) the
command runs as that account, in its groups, with no process in between to take signals."""

from __future__ import annotations

import ctypes
import os
import platform
import pwd
import struct
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
# x86-64 syscall number -> the argument that holds the mode.
MODE_ARG = {
    90: 1,  # chmod
    91: 1,  # fchmod
    268: 2,  # fchmodat
    452: 2,  # fchmodat2
    83: 1,  # mkdir
    258: 2,  # mkdirat
}
SET_ID_BITS = 0o6000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
RET_ALLOW = 0x7FFF0000
RET_EPERM = 0x00050000 | 1
LD_ABS, JEQ, JSET, JA, RET = 0x20, 0x15, 0x45, 0x05, 0x06
NR_AT, ARCH_AT = 0, 4


def _arg_at(index: int) -> int:
    return 16 + 8 * index  # seccomp_data.args[index], low half (little-endian)


def program() -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions; a jump skips that many instructions.

    Layout: check the arch; load nr; one jeq per call, else allow; per call a pair (load its
    mode argument, jump to the test); the test: a set-id bit -> EPERM, else allow.
    """
    calls = sorted(MODE_ARG)
    prog = [(LD_ABS, 0, 0, ARCH_AT), (JEQ, 1, 0, AUDIT_ARCH_X86_64), (RET, 0, 0, RET_ALLOW)]
    prog.append((LD_ABS, 0, 0, NR_AT))
    jeq_at = len(prog)
    pairs_at = jeq_at + len(calls) + 1
    test_at = pairs_at + 2 * len(calls)
    for i, nr in enumerate(calls):
        prog.append((JEQ, pairs_at + 2 * i - (jeq_at + i) - 1, 0, nr))
    prog.append((RET, 0, 0, RET_ALLOW))
    for i, nr in enumerate(calls):
        prog.append((LD_ABS, 0, 0, _arg_at(MODE_ARG[nr])))
        prog.append((JA, 0, 0, test_at - (pairs_at + 2 * i + 1) - 1))
    prog += [(JSET, 1, 0, SET_ID_BITS), (RET, 0, 0, RET_ALLOW), (RET, 0, 0, RET_EPERM)]
    return prog


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() == "x86_64"


def install() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    code = b"".join(struct.pack("<HBBI", *ins) for ins in program())
    buf = ctypes.create_string_buffer(code, len(code))

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Prog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    for args in (
        (PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0),
    ):
        if libc.prctl(*[ctypes.c_ulong(a) for a in args]) != 0:
            raise OSError(ctypes.get_errno(), "prctl failed")


def become(name: str) -> None:
    user = pwd.getpwnam(name)
    os.initgroups(name, user.pw_gid)
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


if __name__ == "__main__":
    command = sys.argv[1:]
    if command[0] == "--user":
        become(command[1])
        command = command[2:]
    install()
    os.execvp(command[0], command)
