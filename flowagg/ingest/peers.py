"""Who is on the other end of the socket (SO_PEERCRED), and what each uid may hold (SPEC §11).

The kernel's word on a peer is taken once, at accept, before a byte is read: a uid outside
`allowedUids` costs one error line and nothing else. What a uid may hold is counted per uid:
connections open at once and bytes of requests not yet answered. Root and the daemon's own
uid are the operator: their connections come from a budget of their own, so no member of
`socketGroup` can use up what the operator needs to reach its daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

import orjson

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# A refused uid is logged once per this many seconds: a flood of refusals is counted in
# status, not written to the log a line at a time.
REFUSAL_LOG_INTERVAL_S = 60.0


@dataclasses.dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    conn: int = 0  # this connection's number in the daemon's run

    def __str__(self) -> str:
        return f"uid {self.uid} gid {self.gid} pid {self.pid}"


UNKNOWN_PEER = Peer(0, -1, -1)


def peer_of(sock: Any, conn: int = 0) -> Peer:
    """The peer of a connected Unix socket; UNKNOWN_PEER (uid -1) when the kernel will not say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (AttributeError, OSError):
        return dataclasses.replace(UNKNOWN_PEER, conn=conn)
    return Peer(*_UCRED.unpack(raw), conn=conn)


def privileged(peer: Peer) -> bool:
    """Root and the daemon's own user: they may see secrets and have a budget of their own."""
    return peer.uid == 0 or peer.uid == os.geteuid()


class UidBudget:
    """Connections and unanswered request bytes per uid, and the total for unprivileged uids.

    Counters only, dropped at zero: memory grows with the uids holding a connection, and those
    are bounded by the connection caps.
    """

    def __init__(
        self, *, max_connections: int, per_uid_connections: int, per_uid_bytes: int
    ) -> None:
        self.max_connections = max_connections
        self.per_uid_connections = per_uid_connections
        self.per_uid_bytes = per_uid_bytes
        self._conns: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        self._operator_conns = 0
        self._member_conns = 0

    def open_refusal(self, peer: Peer) -> str | None:
        """Take a connection slot for the peer, or say why not (and take nothing)."""
        if privileged(peer):
            if self._operator_conns >= self.max_connections:
                return (
                    f"too_many_connections: {self._operator_conns} open for root and the"
                    f" daemon's own user, over maxConnections={self.max_connections}; raise"
                    " maxConnections or reuse connections"
                )
            self._operator_conns += 1
            return None
        held = self._conns.get(peer.uid, 0)
        if held >= self.per_uid_connections:
            return (
                f"too_many_connections: uid {peer.uid} has {held} open, over"
                f" maxConnectionsPerUid={self.per_uid_connections}; close idle connections"
                " or ask the daemon's admin to raise maxConnectionsPerUid"
            )
        if self._member_conns >= self.max_connections:
            return (
                f"too_many_connections: {self._member_conns} open for other users, over"
                f" maxConnections={self.max_connections}; retry later or ask the daemon's"
                " admin to raise maxConnections"
            )
        self._conns[peer.uid] = held + 1
        self._member_conns += 1
        return None

    def close(self, peer: Peer) -> None:
        if privileged(peer):
            self._operator_conns -= 1
            return
        self._member_conns -= 1
        left = self._conns[peer.uid] - 1
        if left:
            self._conns[peer.uid] = left
        else:
            del self._conns[peer.uid]

    def take_bytes(self, peer: Peer, size: int) -> bool:
        """Count `size` more bytes held for the peer; False (nothing counted) over its budget.
        The operator's requests are bounded per connection by maxRequestBytes alone."""
        if privileged(peer):
            return True
        held = self._bytes.get(peer.uid, 0) + size
        if held > self.per_uid_bytes:
            return False
        self._bytes[peer.uid] = held
        return True

    def release_bytes(self, peer: Peer, size: int) -> None:
        if privileged(peer) or not size:
            return
        left = self._bytes[peer.uid] - size
        if left:
            self._bytes[peer.uid] = left
        else:
            del self._bytes[peer.uid]

    @property
    def connections(self) -> int:
        return self._operator_conns + self._member_conns

    def held_bytes(self, uid: int) -> int:
        return self._bytes.get(uid, 0)


class AdmittingProtocol(asyncio.StreamReaderProtocol):
    """A stream whose connection is admitted when it is accepted, before its transport reads:
    `admit` returns None to serve it, or the one reply a refused peer gets."""

    def __init__(
        self,
        admit: Callable[[asyncio.BaseTransport], dict[str, Any] | None],
        serve: Any,
        limit: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(asyncio.StreamReader(limit=limit, loop=loop), serve, loop=loop)
        self._admit = admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refusal = self._admit(transport)
        if refusal is None:
            super().connection_made(transport)
            return
        # The transport has not read yet and never will: one line says why, then it closes.
        writing = cast(asyncio.WriteTransport, transport)
        with contextlib.suppress(OSError):
            writing.write(orjson.dumps(refusal) + b"\n")
        writing.close()


class RefusalLog:
    """Warnings about refused peers, at most one per uid per REFUSAL_LOG_INTERVAL_S."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._last: dict[int, float] = {}

    def warn(self, peer: Peer, reason: str) -> None:
        now = asyncio.get_running_loop().time()
        last = self._last.get(peer.uid)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL_S:
            return
        if len(self._last) > 1024:
            self._last.clear()  # uids are few; this only bounds a pathological run
        self._last[peer.uid] = now
        self._log.warning(
            "refused a request from %s: %s (repeats within %g s are only counted)",
            peer,
            reason,
            REFUSAL_LOG_INTERVAL_S,
        )
