"""Crash-safe file primitives: atomic publish, directory fsync, quarantine.

Every file flowagg publishes goes through `atomic_write`: a temp file in the same directory,
write, fsync, rename, fsync the directory. A reader sees the whole file or none of it, and a
temp file left by a crash carries TEMP_MARK so the next start can remove it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

import orjson

from flowagg.core.audit import FileOwner, audit

log = logging.getLogger("flowagg.fsutil")

TEMP_MARK = ".flowagg-tmp-"
FILE_MODE = 0o600
NAME_MAX = 255  # bytes in one file name on Linux file systems
REASON_SUFFIX = ".reason.json"
# What unique_path may append to a name: ".N" for a counter, then the reason file's suffix.
QUARANTINE_RESERVE = len(".9999999") + len(REASON_SUFFIX)
_CUT_MARK = "~"
_MAX_KEPT_SUFFIX = 16


def name_bytes(name: str) -> int:
    return len(os.fsencode(name))


def display_name(name: str) -> str:
    """A file name as valid text for JSON and logs: bytes that are not UTF-8 show as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def fit_name(name: str, reserve: int = 0) -> str:
    """`name`, cut in the middle when needed so that it plus `reserve` bytes fits NAME_MAX.

    The head (an adopted name's unique prefix) and the extension (the format) stay; the cut
    is at a character boundary, so a valid UTF-8 name stays valid.
    """
    budget = NAME_MAX - reserve
    if name_bytes(name) <= budget:
        return name
    dot = name.rfind(".")
    suffix = name[dot:] if dot > 0 and name_bytes(name[dot:]) <= _MAX_KEPT_SUFFIX else ""
    room = budget - name_bytes(suffix) - len(_CUT_MARK)
    head = []
    for char in name:
        room -= name_bytes(char)
        if room < 0:
            break
        head.append(char)
    return "".join(head) + _CUT_MARK + suffix


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: Path, data: bytes, *, mode: int = FILE_MODE) -> Path:
    """The first half of `atomic_write`: `data` whole and fsynced in a temp file beside `path`
    (with `mode`, whatever the umask).

    Returns the temp file; the caller renames it into place (or unlinks it).
    """
    pid = f".{os.getpid()}"
    tmp = path.with_name(fit_name(f"{TEMP_MARK}{path.name}", len(pid)) + pid)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        if mode != FILE_MODE:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def atomic_write(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Publish `data` at `path` whole or not at all (with `mode`, whatever the umask)."""
    tmp = write_temp(path, data, mode=mode)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    """`atomic_write` for data made piece by piece (never held whole in memory)."""
    tmp = path.with_name(f"{TEMP_MARK}{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(dirs: Iterable[Path]) -> list[Path]:
    """Remove temp files a crashed writer left behind (only flowagg's own, never a client's)."""
    removed = []
    for directory in dirs:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            if name.startswith(TEMP_MARK):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / name)
                    removed.append(directory / name)
    return removed


def unique_path(directory: Path, name: str) -> Path:
    """A free path for `name` in `directory`, short enough for its `.N` and reason file."""
    base = fit_name(name, QUARANTINE_RESERVE)
    candidate = directory / base
    counter = 1
    # lexists: a dangling symlink quarantined earlier must not be replaced.
    while os.path.lexists(candidate) or os.path.lexists(_reason_path(candidate)):
        candidate = directory / f"{base}.{counter}"
        counter += 1
    return candidate


def _reason_path(target: Path) -> Path:
    return target.with_name(target.name + REASON_SUFFIX)


def write_reason(target: Path, reason: dict[str, object]) -> None:
    atomic_write(_reason_path(target), orjson.dumps(reason, option=orjson.OPT_INDENT_2))


def quarantine_file(
    errors_dir: Path,
    src: Path,
    *,
    reason: str,
    component: str,
    now_ms: int,
    extra: dict[str, object] | None = None,
    owner: FileOwner | None = None,
) -> Path:
    """Move an untrusted file (of any type) to errors/ with a reason beside it. Never deletes.

    The audit line names the file's owner as its peer (whoever put a junk file there): `owner`
    when the file is flowagg's copy of another's, else the file's own.
    """
    target = unique_path(errors_dir, src.name)
    owner = owner or FileOwner.of(os.lstat(src))
    os.rename(src, target)
    fsync_dir(errors_dir)
    if src.parent != errors_dir:
        fsync_dir(src.parent)
    write_reason(
        target,
        {
            "file": display_name(target.name),
            "originalPath": display_name(str(src)),
            "reason": reason,
            "component": component,
            "quarantinedAt": now_ms,
            **(extra or {}),
        },
    )
    audit("quarantine", peer=owner, file=display_name(target.name), component=component)
    return target


def quarantine_bytes(
    errors_dir: Path,
    name: str,
    data: bytes,
    *,
    reason: str,
    component: str,
    now_ms: int,
    extra: dict[str, object] | None = None,
    overwrite: bool = False,
    owner: FileOwner | None = None,
) -> Path:
    """Store bytes that could not be trusted (a torn record, an invalid spool entry); `owner`
    is who wrote the file they came from, when another account did."""
    if overwrite:
        target = errors_dir / fit_name(name, len(REASON_SUFFIX))
    else:
        target = unique_path(errors_dir, name)
    atomic_write(target, data)
    write_reason(
        target,
        {
            "file": display_name(target.name),
            "reason": reason,
            "component": component,
            "quarantinedAt": now_ms,
            **(extra or {}),
        },
    )
    audit("quarantine", peer=owner, file=display_name(target.name), component=component)
    return target


def rotate_errors(errors_dir: Path, keep: int) -> list[str]:
    """Delete the oldest quarantined files beyond `keep` (by their reason file's time), each
    with its reason; returns their names. A junk-file flood must not fill the disk.

    The file goes before its reason: a crash in between leaves a reason whose file is gone,
    which the next rotation takes first, never a file no reason counts.
    """
    reasons: list[tuple[int, str]] = []
    with os.scandir(errors_dir) as found:
        for item in found:
            if item.name.endswith(REASON_SUFFIX) and not item.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    reasons.append((item.stat(follow_symlinks=False).st_mtime_ns, item.name))
    if len(reasons) <= keep:
        return []
    reasons.sort()
    removed = []
    for _, reason in reasons[: len(reasons) - keep]:
        name = reason[: -len(REASON_SUFFIX)]
        try:
            _remove_any(errors_dir / name)
            os.unlink(errors_dir / reason)
        except OSError as exc:
            log.error("cannot rotate %s out of %s: %s", display_name(name), errors_dir, exc)
            continue
        removed.append(display_name(name))
    if removed:
        fsync_dir(errors_dir)
    return removed


def _remove_any(path: Path) -> None:
    """Unlink a file, link or special file, or remove a directory tree (a planted folder)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def count_files(directory: Path, suffix: str | tuple[str, ...]) -> int:
    try:
        return sum(1 for n in os.listdir(directory) if n.endswith(suffix) and not n.startswith("."))
    except FileNotFoundError:
        return 0
