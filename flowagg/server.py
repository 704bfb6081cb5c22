"""The Unix socket server (SPEC §4.1): newline-delimited JSON, one reply line per request.

Nothing a client sends can crash the daemon: malformed JSON, a non-object, an unknown op or
an oversized line each get `{"ok": false, "error": ...}`. After an oversized line the
connection is closed (its remainder cannot be framed); other errors leave it usable.

What one client can cost is bounded: `maxConnections` open at once (the next one gets one
error line and is closed), and a stop never waits on a client: idle connections are closed,
requests in progress get a short grace and are then answered `stopping`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from .entries import short_repr
from .errors import RootUnusableError

log = logging.getLogger("flowagg.server")

SOCKET_MODE = 0o600
GROUP_SOCKET_MODE = 0o660
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
STOPPING_RETRY_AFTER_MS = 1000
# Lines from this size on are measured before they are parsed: a parse costs ~14 bytes of
# memory per byte of tiny values (`[0,0,...]`), so 16 MiB of them would cost ~230 MB.
PRECHECK_BYTES = 1 << 20
# Past this many arrays and objects per allowed entry a request is refused unparsed: each
# container costs a Python object, and a line of `[],[],...` would cost ~40 bytes per byte.
CONTAINERS_PER_ENTRY = 16
MAX_DEPTH = 1024  # orjson refuses deeper documents anyway
_STRING = re.compile(rb'"[^"]*"')
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},")
_STRUCTURE = re.compile(rb"[\[\]{}]|,+")


def request_shape(line: bytes) -> bytes:
    """The structure of a JSON line (brackets, braces, commas), strings removed, in linear time.

    Escapes go first (an escaped backslash, then an escaped quote), so every quote left opens or
    closes a string and `"[^"]*"` never backtracks: a line full of `\\"` stays linear.
    """
    unescaped = line.replace(b"\\\\", b"").replace(b'\\"', b"")
    return _STRING.sub(b"", unescaped).translate(None, _NOT_STRUCTURE)


def largest_top_array(shape: bytes) -> int:
    """Elements of the largest array directly inside the request object (see request_shape).

    A run of commas is one match, so a million scalars cost one step.
    """
    depth = commas = largest = 0
    in_array = False
    for match in _STRUCTURE.finditer(shape):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                break
            if depth == 2:
                in_array, commas = token == b"[", 0
        elif token in (b"]", b"}"):
            depth -= 1
        elif depth == 2 and in_array:
            commas += len(token)
            largest = max(largest, commas + 1)
    return largest


@dataclasses.dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    conn: int = 0  # this connection's number in the daemon's run (rate limits key on it)

    def __str__(self) -> str:
        return f"uid {self.uid} gid {self.gid} pid {self.pid}"


UNKNOWN_PEER = Peer(0, -1, -1)


def peer_of(writer: asyncio.StreamWriter, conn: int = 0) -> Peer:
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (AttributeError, OSError):
        return dataclasses.replace(UNKNOWN_PEER, conn=conn)
    return Peer(*_UCRED.unpack(raw), conn=conn)


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any]]]


class SocketServer:
    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        max_request_bytes: int,
        max_request_entries: int,
        max_connections: int,
        group: int | None = None,
        allowed_uids: tuple[int, ...] = (),
    ) -> None:
        self.path = path
        self.handler = handler
        self.group = group
        self.allowed_uids = allowed_uids
        self.max_request_bytes = max_request_bytes
        self.max_request_entries = max_request_entries
        self.max_connections = max_connections
        self._server: asyncio.AbstractServer | None = None
        # Open connections (their tasks), and the request each one is busy with.
        self._conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._busy: dict[asyncio.Task[Any], asyncio.Future[dict[str, Any]]] = {}
        self._stopping = False
        self.requests = 0
        self.bad_requests = 0
        self.too_many_entries = 0
        self.refused_connections = 0
        self.refused_peers = 0
        self._accepted = 0
        self._inode: int | None = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        size = len(os.fsencode(self.path))
        if size > MAX_SOCKET_PATH_BYTES:
            raise RootUnusableError(
                f"cannot listen on {self.path}: the path is {size} bytes and a Unix socket"
                " path must stay under 108 bytes; use a shorter --root or set runDir to a short"
                " local folder such as /run/flowagg"
            )
        # Only the lock holder gets here, so a socket file left by a dead daemon is stale.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await self._listen()

    async def _listen(self) -> asyncio.AbstractServer:
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=self.max_request_bytes
            )
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, "error")
            raise RootUnusableError(
                f"cannot listen on {self.path}: {code} ({exc.strerror or exc}); this file"
                " system may not support Unix sockets (FUSE, NFS): set runDir to a local"
                " folder such as /run/flowagg"
            ) from None
        finally:
            os.umask(old_umask)
        try:
            # The group first, the group's bits second: at no moment can the wrong group connect.
            if self.group is not None:
                os.chown(self.path, -1, self.group)
            os.chmod(self.path, GROUP_SOCKET_MODE if self.group is not None else SOCKET_MODE)
        except OSError as exc:
            server.close()
            raise RootUnusableError(
                f"cannot give the socket {self.path} to group {self.group}: {exc.strerror};"
                " the daemon's user must be in socketGroup (usermod -aG)"
            ) from None
        self._inode = os.stat(self.path).st_ino
        return server

    def socket_missing(self) -> bool:
        """True when the socket file is gone or replaced (someone cleaned the run dir)."""
        try:
            return os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            return True

    async def relisten(self) -> bool:
        """Listen again when the socket file is gone; open connections keep going. True if
        it was recreated."""
        if self._server is None or self._stopping or not self.socket_missing():
            return False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old, self._server = self._server, await self._listen()
        old.close()
        return True

    async def stop(self, *, grace_s: float, close_s: float) -> None:
        """Stop accepting; give requests in progress `grace_s`, then answer them `stopping`;
        close every connection, idle ones at once, and drop those still open after `close_s`.
        """
        if self._server is None:
            return
        self._stopping = True
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for conn in list(self._conns):
            if conn not in self._busy:
                conn.cancel()
        if self._busy:
            await asyncio.wait(set(self._busy.values()), timeout=grace_s)
        for conn, request in list(self._busy.items()):
            if not request.done():
                conn.cancel()  # the connection answers `stopping`; the request is left behind
        if self._conns:
            await asyncio.wait(set(self._conns), timeout=close_s)
        for conn, writer in list(self._conns.items()):
            writer.transport.abort()  # a client that does not read its reply
            conn.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = asyncio.current_task()
        assert conn is not None
        if self._stopping or len(self._conns) >= self.max_connections:
            await self._refuse(writer)
            return
        self._accepted += 1
        peer = peer_of(writer, self._accepted)
        self._conns[conn] = writer
        try:
            while not self._stopping:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        await self._reply(writer, _error("request is not terminated by a newline"))
                    return
                except asyncio.LimitOverrunError:
                    self.bad_requests += 1
                    await self._reply(
                        writer,
                        _error(
                            f"request_too_large: over maxRequestBytes={self.max_request_bytes};"
                            " split it into smaller requests"
                        ),
                    )
                    return
                if not line.strip():
                    continue
                if not self._allowed(peer):
                    # Answered after a request arrives, so the client reads the reason instead
                    # of a reset connection.
                    await self._reply(writer, self._not_allowed(peer))
                    return
                await self._reply(writer, await self._answer(conn, line, peer))
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._conns.pop(conn, None)
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, conn: asyncio.Task[Any], line: bytes, peer: Peer) -> dict[str, Any]:
        """Run one request in its own task, so a stop can answer for it without waiting."""
        request = asyncio.ensure_future(self._handle_line(line, peer))
        self._busy[conn] = request
        try:
            return await asyncio.shield(request)
        except asyncio.CancelledError:
            if not self._stopping:
                request.cancel()
                raise
            return stopping_reply()
        finally:
            self._busy.pop(conn, None)

    def _allowed(self, peer: Peer) -> bool:
        return not self.allowed_uids or peer.uid in self.allowed_uids or peer.uid == os.geteuid()

    def _not_allowed(self, peer: Peer) -> dict[str, Any]:
        self.refused_peers += 1
        log.warning("refused a request from %s: not in allowedUids", peer)
        return _error(
            f"not_allowed: uid {peer.uid} is not in this daemon's allowedUids; ask its admin"
            " to add it"
        )

    def _too_many_entries(self, count: int) -> dict[str, Any]:
        """Refused whole: validating each item would cost memory per item."""
        self.too_many_entries += 1
        limit = self.max_request_entries
        return {
            "ok": False,
            "error": f"too_many_entries: {count} entries, over maxRequestEntries={limit};"
            " split the request",
            "maxRequestEntries": limit,
        }

    async def _refuse(self, writer: asyncio.StreamWriter) -> None:
        self.refused_connections += 1
        if self._stopping:
            reply = stopping_reply()
        else:
            reply = _error(
                f"too_many_connections: {len(self._conns)} open, over"
                f" maxConnections={self.max_connections}; raise maxConnections or reuse"
                " connections"
            )
        with contextlib.suppress(ConnectionError):
            await self._reply(writer, reply)
        writer.close()

    async def _handle_line(self, line: bytes, peer: Peer = UNKNOWN_PEER) -> dict[str, Any]:
        self.requests += 1
        limit = self.max_request_entries
        if len(line) >= PRECHECK_BYTES and line.count(b",") >= limit:
            shape = request_shape(line)
            containers = shape.count(b"[") + shape.count(b"{")
            if containers > limit * CONTAINERS_PER_ENTRY:
                self.bad_requests += 1
                return _error(
                    f"too_many_values: {containers} arrays and objects in one request, over"
                    f" {CONTAINERS_PER_ENTRY} per entry of maxRequestEntries={limit}; split it"
                )
            count = largest_top_array(shape)
            if count > limit:
                return self._too_many_entries(count)
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self.bad_requests += 1
            return _error(f"malformed JSON: {exc}")
        if not isinstance(request, dict):
            self.bad_requests += 1
            return _error('request must be a JSON object like {"op": "ping"}')
        entries = request.get("entries")
        if isinstance(entries, list) and len(entries) > limit:
            return self._too_many_entries(len(entries))
        try:
            return await self.handler(request, peer)
        except Exception:
            log.exception("request failed: op=%s", short_repr(request.get("op")))
            return _error("internal error; see logs/aggregation.log")

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(orjson.dumps(reply) + b"\n")
        await writer.drain()


def stopping_reply() -> dict[str, Any]:
    """Not done, and not acknowledged: the client retries against the next start."""
    return {"ok": False, "error": "stopping", "retryAfterMs": STOPPING_RETRY_AFTER_MS}


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}
