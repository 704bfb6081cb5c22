"""The audit log `logs/audit.log` (SPEC §11): one JSON line per state-changing operation.

A line says when, what, who asked (the peer's uid/gid/pid from SO_PEERCRED, or the daemon
itself for scheduled work and signals) and the outcome; it names files, batch ids, counts and
setting keys, never entry contents. The daemon writes through a rotating handler set up with
the other logs; a command that changes the root without the daemon (`flowagg cleanup`)
appends its line itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from typing import Any, Protocol

import orjson

LOGGER = "flowagg.audit"
FILE_NAME = "audit.log"
AUDIT_FORMAT_VERSION = "1.0.0"

log = logging.getLogger(LOGGER)


class PeerLike(Protocol):
    @property
    def pid(self) -> int | None: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class FileOwner:
    """The owner of a file flowagg acted on unasked (a quarantine): lstat knows who wrote it,
    no process asked, so there is no pid."""

    uid: int
    gid: int
    pid: None = None

    @classmethod
    def of(cls, st: os.stat_result) -> FileOwner:
        return cls(st.st_uid, st.st_gid)


def self_peer() -> dict[str, int]:
    return {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid()}


def record(
    event: str,
    *,
    peer: PeerLike | None = None,
    by: str = "daemon",
    outcome: str = "ok",
    now_ms: int | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The line for one operation. `by` says who started it when there is no peer (daemon,
    scheduler, signal)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    doc: dict[str, Any] = {
        "v": AUDIT_FORMAT_VERSION,
        "time": datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(
            timespec="milliseconds"
        ),
        "event": event,
        "outcome": outcome,
        "peer": {"uid": peer.uid, "gid": peer.gid, "pid": peer.pid} if peer else None,
        "by": by if peer is None or isinstance(peer, FileOwner) else "socket",
    }
    doc.update(fields)
    return doc


def audit(event: str, **kwargs: Any) -> None:
    """Log one line through the daemon's audit handler (nothing when none is set up)."""
    log.info("%s", orjson.dumps(record(event, **kwargs)).decode())


def append_line(logs_dir: os.PathLike[str] | str, doc: dict[str, Any]) -> None:
    """One line appended with O_APPEND, for commands that run without the daemon: a single
    write of a short line does not interleave with the daemon's own lines."""
    fd = os.open(
        os.path.join(logs_dir, FILE_NAME),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
        0o600,
    )
    try:
        os.write(fd, orjson.dumps(doc) + b"\n")
    finally:
        os.close(fd)
