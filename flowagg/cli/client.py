"""Talking to a running daemon over its socket, and writing spool files when it is down."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any

import orjson

from flowagg.core.clock import EntryIdFactory, SystemClock
from flowagg.core.config import load_config
from flowagg.core.config_values import group_name
from flowagg.core.entries import EntryError, validate_entry
from flowagg.core.errors import (
    ConfigError,
    DaemonError,
    FlowaggError,
    NotRunningError,
    RootUnusableError,
)
from flowagg.core.fsutil import fsync_dir, is_disk_full
from flowagg.core.layout import Layout
from flowagg.core.redact import Redactor

# A spool file in a shared inbox/ must be readable by the daemon's user (inbox/'s owner; under
# systemd it has no CAP_DAC_OVERRIDE, even as root) and by no other member of the group: an
# access ACL grants that user read (mode 0600 plus one named entry). Where the file system has
# no ACLs the file is 0640 in the group instead; then only its name protects it, and other
# members can neither list inbox/ (1730) nor guess SPOOL_NAME_BITS random bits, and the daemon
# moves it into its private journal/spool/ at once.
SHARED_SPOOL_MODE = 0o640
PRIVATE_SPOOL_MODE = 0o600
ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_UNDEFINED_ID = 0xFFFFFFFF
# e_tag values of <linux/posix_acl.h>, in the order the kernel wants them.
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
SPOOL_NAME_BITS = 128


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def access_denied(path: Path, what: str) -> RootUnusableError:
    """Permission denied on the socket or inbox/: name the group that would let this user in."""
    user = _user()
    for candidate in (path, *path.parents):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if st.st_mode & stat.S_IRWXG:
            group = group_name(st.st_gid)
            return RootUnusableError(
                f"permission denied on {what} {path}: you ({user}) are not in the {group} group;"
                f" ask an admin to run `usermod -aG {group} {user}`, then log in again"
            )
        break
    return RootUnusableError(
        f"permission denied on {what} {path}: the daemon serves only its own user; ask an admin"
        " to set socketGroup (README: Running under systemd) or run as the daemon's user"
    )


def _gone_socket(socket_path: Path) -> str | None:
    """The message for a live daemon whose socket file was deleted, else None."""
    try:
        pid = int((socket_path.parent / "flowagg.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    import psutil  # only on this error path: `flowagg add` starts faster without it

    if not psutil.pid_exists(pid):
        return None
    return f"pid {pid} runs but its socket {socket_path} is gone; send it SIGHUP or restart it"


class Client:
    """One connection, many requests (newline-delimited JSON)."""

    def __init__(self, socket_path: Path, *, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path))
        except PermissionError:
            sock.close()
            raise access_denied(socket_path, "the socket") from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            gone = _gone_socket(socket_path) if isinstance(exc, FileNotFoundError) else None
            if gone:
                raise NotRunningError(gone) from None
            raise NotRunningError(
                f"no flowagg daemon answers on {socket_path} ({exc.strerror});"
                " start it with `flowagg run` or pass --root"
            ) from None
        except OSError as exc:
            sock.close()
            raise NotRunningError(
                f"cannot reach the daemon at {socket_path}: {exc.strerror}"
            ) from None
        self._sock = sock
        self._file = sock.makefile("rb")

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            # A daemon that refuses this peer answers and closes: its reason is still read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._sock.sendall(orjson.dumps(payload) + b"\n")
            line = self._file.readline()
        except TimeoutError:
            raise DaemonError(
                "the daemon did not answer in time; check `flowagg status` and the log"
            ) from None
        except OSError as exc:
            raise DaemonError(f"connection to the daemon failed: {exc}") from None
        if not line:
            raise DaemonError("the daemon closed the connection without a reply; see its log")
        reply: dict[str, Any] = orjson.loads(line)
        return reply

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(layout: Layout, payload: dict[str, Any], *, timeout: float = 60.0) -> dict[str, Any]:
    with Client(layout.socket, timeout=timeout) as client:
        return client.request(payload)


def write_spool_file(layout: Layout, entries: list[Any], *, name: str | None = None) -> Path:
    """Drop entries into inbox/ the documented way: write <name>.tmp, fsync, rename, fsync dir.

    The rename is the acknowledgement (SPEC §4.2). Any failure leaves no temp file behind and
    is one line naming the cause (exit 4).
    """
    try:
        inbox_st = os.stat(layout.inbox)
    except PermissionError:
        raise access_denied(layout.inbox, "the spool folder") from None
    except OSError:
        raise NotRunningError(
            f"{layout.inbox} does not exist; start the daemon once to create the data root"
        ) from None
    # In a shared inbox/ the daemon may be another user (inbox/'s owner).
    daemon_uid = inbox_st.st_uid if inbox_st.st_mode & stat.S_IWGRP else os.geteuid()
    # Files are taken in name order, hence the time first; the random part makes the name
    # unguessable for the other members of the group.
    token = secrets.token_hex(SPOOL_NAME_BITS // 8)
    base = name or f"{time.time_ns() // 1_000_000:013d}-{token}"
    final = layout.inbox / f"{base}.jsonl"
    tmp = layout.inbox / f"{base}.jsonl.tmp"
    data = b"".join(orjson.dumps(e) + b"\n" for e in entries)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_SPOOL_MODE)
    except PermissionError:
        raise access_denied(layout.inbox, "the spool folder") from None
    except OSError as exc:
        raise _spool_error(layout, exc) from None
    try:
        with open(fd, "wb") as fh:
            os.fchmod(fh.fileno(), PRIVATE_SPOOL_MODE)  # whatever the umask
            if daemon_uid != os.geteuid():
                _readable_by(fh.fileno(), daemon_uid, inbox_st.st_gid)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _spool_error(layout, exc) from None
    with contextlib.suppress(OSError):
        # Renamed is acknowledged; a failed directory fsync only narrows power-loss safety.
        fsync_dir(layout.inbox)
    return final


def _readable_by(fd: int, uid: int, gid: int) -> None:
    """Let user `uid` read the file, and no one else but its owner (see SHARED_SPOOL_MODE)."""
    entries = [
        (_ACL_USER_OBJ, 0o6, _ACL_UNDEFINED_ID),
        (_ACL_USER, 0o4, uid),
        (_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED_ID),
        (_ACL_MASK, 0o4, _ACL_UNDEFINED_ID),
        (_ACL_OTHER, 0, _ACL_UNDEFINED_ID),
    ]
    acl = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(fd, ACL_XATTR, acl)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
    # No setgid bit on inbox/ (RestrictSUIDSGID): the file carries the writer's own group,
    # which the daemon is not in, until it is given inbox/'s.
    if os.fstat(fd).st_gid != gid:
        os.fchown(fd, -1, gid)
    os.fchmod(fd, SHARED_SPOOL_MODE)


def _spool_error(layout: Layout, exc: OSError) -> RootUnusableError:
    if is_disk_full(exc):
        return RootUnusableError(
            f"cannot write a spool file in {layout.inbox}: disk full ({exc.strerror});"
            " nothing was spooled: free space and add again"
        )
    return RootUnusableError(
        f"cannot write a spool file in {layout.inbox}: {exc.strerror or exc}; nothing was"
        " spooled: fix the folder and add again"
    )


# At most the default maxRequestEntries (10000); a daemon set lower makes the client split.
ADD_CHUNK_ENTRIES = 1000
MAX_LISTED_REJECTIONS = 100
ADD_CHUNK_BYTES = 4 << 20


def _chunks(items: list[Any]) -> list[tuple[int, list[Any]]]:
    chunks: list[tuple[int, list[Any]]] = []
    start = 0
    current: list[Any] = []
    size = 0
    for i, item in enumerate(items):
        item_size = len(orjson.dumps(item, default=str)) + 1
        if current and (len(current) >= ADD_CHUNK_ENTRIES or size + item_size > ADD_CHUNK_BYTES):
            chunks.append((start, current))
            start, current, size = i, [], 0
        current.append(item)
        size += item_size
    if current:
        chunks.append((start, current))
    return chunks


def spool_redactor(root: Path) -> Redactor:
    """The daemon's redaction where its config can be read (the root's flowagg.toml or
    FLOWAGG_CONFIG, and the environment), else the defaults: a spool file lies under the root
    too, so it must not hold what the daemon would redact."""
    try:
        config = load_config(flags={"root": str(root)})
    except ConfigError:
        return Redactor()
    return Redactor(config.redact_keys, config.redact_patterns)


def spool_entries(layout: Layout, items: list[Any]) -> dict[str, Any]:
    """Validate locally, then write one spool file; all or nothing."""
    clock = SystemClock()
    ids = EntryIdFactory(clock)
    errors = []
    for i, item in enumerate(items):
        try:
            validate_entry(item, i, now_ms=clock.now_ms(), max_entry_bytes=1 << 30, new_id=ids.new)
        except EntryError as exc:
            errors.append({"index": i, "error": str(exc)})
    if errors:
        return {"ok": False, "error": "invalid entries; nothing was spooled", "rejected": errors}
    redactor = spool_redactor(layout.root)
    for item in items:
        if redactor.active and item.get("metadata"):
            redactor.metadata(item["metadata"])
    path = write_spool_file(layout, items)
    return {"ok": True, "spooled": len(items), "file": str(path)}


def send_entries(layout: Layout, items: list[Any], wait_s: float) -> dict[str, Any]:
    """Send entries in chunks, waiting out `busy` and `rate_limited` for up to `wait_s` per
    chunk. After `rate_limited` only the entries over the limit are sent again (the others are
    stored), so entries without an entryId are never stored twice.

    A daemon whose maxRequestEntries is below the chunk size says so; the chunk is split.
    """
    total: dict[str, Any] = {
        "ok": True,
        "accepted": 0,
        "duplicates": 0,
        "rejected": [],
        "rejectedCount": 0,
    }
    work = _chunks(items)
    work.reverse()
    with Client(layout.socket) as client:
        while work:
            start, chunk = work.pop()
            positions = list(range(start, start + len(chunk)))
            deadline = time.monotonic() + wait_s
            while True:
                reply = client.request({"op": "add", "entries": chunk})
                limited = reply.get("limited")
                if isinstance(limited, list):
                    _tally(total, reply, positions)
                    chunk = [chunk[i] for i in limited]
                    positions = [positions[i] for i in limited]
                retry = reply.get("retryAfterMs")
                left = deadline - time.monotonic()
                if reply.get("ok") or retry is None or left <= 0:
                    break
                time.sleep(min(retry / 1000, left))
            limit = reply.get("maxRequestEntries")
            if not reply.get("ok") and isinstance(limit, int) and 0 < limit < len(chunk):
                pieces = range(0, len(chunk), limit)
                work.extend((start + i, chunk[i : i + limit]) for i in reversed(pieces))
                continue
            if not reply.get("ok"):
                raise _gave_up(reply, positions, total, wait_s)
            _tally(total, reply, positions)
    return total


def _tally(total: dict[str, Any], reply: dict[str, Any], positions: list[int]) -> None:
    """Add a reply's counts; its rejection indexes point into the entries sent."""
    total["accepted"] += reply.get("accepted", 0)
    total["duplicates"] += reply.get("duplicates", 0)
    listed = reply.get("rejected", [])
    total["rejectedCount"] += reply.get("rejectedCount", len(listed))
    room = MAX_LISTED_REJECTIONS - len(total["rejected"])
    for r in listed[: max(0, room)]:
        total["rejected"].append({"index": positions[r["index"]], "error": r["error"]})


def _gave_up(
    reply: dict[str, Any], positions: list[int], total: dict[str, Any], wait_s: float
) -> FlowaggError:
    """The refusal that ends an add, with what was stored before it (entries count from 1)."""
    error = str(reply.get("error"))
    first, last = positions[0] + 1, positions[-1] + 1
    if error in ("busy", "rate_limited"):
        return DaemonError(
            f"gave up after --retry-timeout {wait_s:g} s: the daemon still answers {error};"
            f" {len(positions)} entries were not stored (the first is entry {first}),"
            f" {total['accepted']} were; add those again later or raise --retry-timeout"
        )
    if error == "disk_full":
        return RootUnusableError(
            f"the daemon's disk is full: entries {first}-{last} were not stored,"
            f" {total['accepted']} were before this; free space under its root, then add"
            f" entries {first}-{last} again"
        )
    if error.startswith("not_allowed"):
        return RootUnusableError(f"{error}; nothing was stored")
    return DaemonError(
        f"the daemon refused entries {first}-{last}: {error};"
        f" {total['accepted']} entries were accepted before this; retry later (entries with"
        " an entryId are deduplicated)"
    )


def add_entries(
    layout: Layout, items: list[Any], *, spool: bool, spool_if_down: bool, wait_s: float
) -> dict[str, Any]:
    """`flowagg add` and `provider-bridge aggregate`: the socket, or a spool file."""
    if spool:
        return spool_entries(layout, items)
    try:
        return send_entries(layout, items, wait_s)
    except NotRunningError:
        if not spool_if_down:
            raise
        return spool_entries(layout, items)
