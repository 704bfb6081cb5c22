"""The Unix socket server (SPEC §4.1): newline-delimited JSON, one reply line per request.

Nothing a client sends can crash the daemon: malformed JSON, a non-object, an unknown op or
an oversized line each get `{"ok": false, "error": ...}`. After an oversized line the
connection is closed (its remainder cannot be framed); other errors leave it usable.

What one client can cost is bounded (SPEC §11): the peer's uid is taken from the kernel
(SO_PEERCRED) when the connection is accepted, before anything is read from it, and a uid
outside `allowedUids`, or over its connection cap, gets one error line and a closed socket.
Bytes of requests not yet answered are counted per uid (`maxPendingBytesPerUid`), a request
line must end within `partialRequestTimeoutMs` of its first byte, and root and the daemon's
own user have a connection budget no other uid can use up (see peers.py). A stop never waits
on a client: idle connections are closed, requests in progress get a short grace and are then
answered `stopping`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from flowagg.core.entries import short_repr
from flowagg.core.errors import RootUnusableError
from flowagg.ingest.entry_codec import decode_add
from flowagg.ingest.peers import (
    UNKNOWN_PEER,
    AdmittingProtocol,
    Peer,
    RefusalLog,
    UidBudget,
    peer_of,
)
from flowagg.ingest.request_shape import (
    CONTAINERS_PER_ENTRY,
    PRECHECK_BYTES,
    largest_top_array,
    request_shape,
)

__all__ = ["Peer", "SocketServer", "largest_top_array", "request_shape", "stopping_reply"]

log = logging.getLogger("flowagg.server")

SOCKET_MODE = 0o600
GROUP_SOCKET_MODE = 0o660
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
STOPPING_RETRY_AFTER_MS = 1000
# Reads are taken in pieces this size, so every byte held for a request is counted against
# its uid as it arrives; the stream's own buffer stops reading from the socket at twice this.
READ_CHUNK = 64 << 10


class _Timeout(Exception):
    pass


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
        max_connections_per_uid: int | None = None,
        max_pending_bytes_per_uid: int | None = None,
        partial_request_timeout_s: float = 10.0,
        group: int | None = None,
        allowed_uids: tuple[int, ...] = (),
    ) -> None:
        self.path = path
        self.handler = handler
        self.group = group
        self.max_request_bytes = max_request_bytes
        self.max_request_entries = max_request_entries
        self.max_connections = max_connections
        self.budget = UidBudget(
            max_connections=max_connections, per_uid_connections=1, per_uid_bytes=1
        )
        self.reconfigure(
            allowed_uids=allowed_uids,
            max_connections_per_uid=max_connections_per_uid or max_connections,
            max_pending_bytes_per_uid=max_pending_bytes_per_uid or max_request_bytes,
            partial_request_timeout_s=partial_request_timeout_s,
        )
        self._server: asyncio.AbstractServer | None = None
        # Open connections (their tasks), and the request each one is busy with.
        self._conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._busy: dict[asyncio.Task[Any], asyncio.Future[dict[str, Any]]] = {}
        # Admitted connections whose task has not started yet, by transport.
        self._admitted: dict[asyncio.BaseTransport, Peer] = {}
        self._refusal_log = RefusalLog(log)
        self._stopping = False
        self.requests = 0
        self.bad_requests = 0
        self.too_many_entries = 0
        self.refused_connections = 0
        self.refused_peers = 0
        self.timed_out_requests = 0
        self.over_pending_bytes = 0
        self._accepted = 0
        self._inode: int | None = None

    def reconfigure(
        self,
        *,
        allowed_uids: tuple[int, ...],
        max_connections_per_uid: int,
        max_pending_bytes_per_uid: int,
        partial_request_timeout_s: float,
    ) -> None:
        """The settings a reload may change; connections already open keep their slots."""
        self.allowed_uids = allowed_uids
        self.budget.per_uid_connections = max_connections_per_uid
        # One request of maxRequestBytes (and the start of the next) must always fit.
        self.budget.per_uid_bytes = max(
            max_pending_bytes_per_uid, self.max_request_bytes + READ_CHUNK
        )
        self.partial_request_timeout_s = partial_request_timeout_s

    @property
    def connections(self) -> int:
        return self.budget.connections

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
            loop = asyncio.get_running_loop()
            server = await loop.create_unix_server(
                lambda: AdmittingProtocol(self._admit, self._serve, READ_CHUNK),
                path=str(self.path),
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

    def _admit(self, transport: asyncio.BaseTransport) -> dict[str, Any] | None:
        """Called as a connection is accepted: None admits it, else the one reply it gets."""
        self._accepted += 1
        peer = peer_of(transport.get_extra_info("socket"), self._accepted)
        if self._stopping:
            self.refused_connections += 1
            return stopping_reply()
        if not self._allowed(peer):
            return self._not_allowed(peer)
        refusal = self.budget.open_refusal(peer)
        if refusal is not None:
            self.refused_connections += 1
            self._refusal_log.warn(peer, refusal.partition(":")[0])
            return _error(refusal)
        self._admitted[transport] = peer
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = asyncio.current_task()
        assert conn is not None
        peer = self._admitted.pop(writer.transport)
        self._conns[conn] = writer
        held = 0  # bytes read for requests not answered yet, counted against the peer's uid
        try:
            pieces: list[bytes] = []  # the unfinished line
            size = 0
            deadline = 0.0
            while not self._stopping:
                try:
                    data = await self._read(reader, deadline if size else None)
                except _Timeout:
                    self.timed_out_requests += 1
                    timeout_ms = round(self.partial_request_timeout_s * 1000)
                    await self._reply(
                        writer,
                        _error(
                            f"request_timeout: a request line was not finished within"
                            f" partialRequestTimeoutMs={timeout_ms}; send whole lines, each"
                            " ending in a newline"
                        ),
                    )
                    return
                if not data:
                    if b"".join(pieces).strip():
                        await self._reply(writer, _error("request is not terminated by a newline"))
                    return
                if not self.budget.take_bytes(peer, len(data)):
                    await self._reply(writer, self._over_pending(peer))
                    return
                held += len(data)
                if not size:
                    deadline = asyncio.get_running_loop().time() + self.partial_request_timeout_s
                start = 0
                while (end := data.find(b"\n", start)) >= 0:
                    line = (
                        b"".join([*pieces, data[start : end + 1]])
                        if pieces
                        else data[start : end + 1]
                    )
                    pieces, size, start = [], 0, end + 1
                    if len(line) - 1 > self.max_request_bytes:  # the newline is free
                        await self._reply(writer, self._too_large())
                        return
                    if line.strip():
                        await self._reply(writer, await self._answer(conn, line, peer))
                    self.budget.release_bytes(peer, len(line))
                    held -= len(line)
                    if self._stopping:
                        return
                    deadline = asyncio.get_running_loop().time() + self.partial_request_timeout_s
                if start < len(data):
                    pieces.append(data[start:] if start else data)
                    size += len(data) - start
                    if size > self.max_request_bytes:
                        await self._reply(writer, self._too_large())
                        return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self.budget.release_bytes(peer, held)
            self.budget.close(peer)
            self._conns.pop(conn, None)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read(self, reader: asyncio.StreamReader, deadline: float | None) -> bytes:
        """The next bytes; _Timeout past the deadline of a line already started."""
        if deadline is None:
            return await reader.read(READ_CHUNK)
        left = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(reader.read(READ_CHUNK), max(left, 0.0))
        except TimeoutError:
            raise _Timeout from None

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
        self._refusal_log.warn(peer, "not in allowedUids (closed at connect, nothing read)")
        return _error(
            f"not_allowed: uid {peer.uid} is not in this daemon's allowedUids; ask its admin"
            " to add it"
        )

    def _over_pending(self, peer: Peer) -> dict[str, Any]:
        self.over_pending_bytes += 1
        self._refusal_log.warn(peer, "over maxPendingBytesPerUid")
        limit = self.budget.per_uid_bytes
        return _error(
            f"too_much_pending: uid {peer.uid} holds {self.budget.held_bytes(peer.uid)} bytes of"
            f" unanswered requests, over maxPendingBytesPerUid={limit}; send fewer requests at"
            " once or ask the daemon's admin to raise maxPendingBytesPerUid"
        )

    def _too_large(self) -> dict[str, Any]:
        self.bad_requests += 1
        return _error(
            f"request_too_large: over maxRequestBytes={self.max_request_bytes};"
            " split it into smaller requests"
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
        decoded = decode_add(line)
        if decoded is not None:
            request: Any = {"op": "add", "entries": decoded}
        else:
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
        writer.write(orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE))
        await writer.drain()


def stopping_reply() -> dict[str, Any]:
    """Not done, and not acknowledged: the client retries against the next start."""
    return {"ok": False, "error": "stopping", "retryAfterMs": STOPPING_RETRY_AFTER_MS}


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}
