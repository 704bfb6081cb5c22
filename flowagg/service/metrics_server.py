"""`metricsListen`: a bounded HTTP responder for `GET /metrics` on the event loop (SPEC §11).

prometheus_client's server started a thread per connection, with no limit and no timeout:
about 1 000 idle TCP connections took every descriptor the daemon had, and adds, the spool
scan and health failed with EMFILE. This one holds at most MAX_CONNECTIONS sockets, gives
each READ_TIMEOUT_S to send its request and the whole exchange EXCHANGE_TIMEOUT_S, and
answers one request per connection. When every slot is taken, the connection that has waited
longest without sending a request makes way for the newcomer, so a flood of idle connections
cannot lock a scraper out: a scraper sends its request as soon as it connects.

It runs on the daemon's loop, where the counters live, so a scrape needs no thread or lock.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("flowagg.metrics")

MAX_CONNECTIONS = 16
READ_TIMEOUT_S = 5.0
EXCHANGE_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 8192
# Connections the kernel queues, and asyncio accepts at once, beyond the ones served.
BACKLOG = 32
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}

# Accept header -> (body, content type).
Render = Callable[[str], tuple[bytes, str]]


def listen_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a port in use stops the start."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class MetricsServer:
    def __init__(
        self,
        render: Render,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self._render = render
        self._max = max_connections
        self._read_timeout_s = read_timeout_s
        self._open: set[asyncio.StreamWriter] = set()
        # Connections still to send their request, oldest first: the first to make way.
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self._server: asyncio.Server | None = None
        self.dropped = 0  # connections closed to keep within MAX_CONNECTIONS

    async def start(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(
            self._connection, sock=sock, limit=MAX_HEAD_BYTES, backlog=BACKLOG
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        if len(self._open) >= self._max:
            oldest = next(iter(self._waiting), None)
            self.dropped += 1
            if oldest is None:  # every slot is busy answering: the newcomer waits its turn
                writer.transport.abort()
                return False
            self._forget(oldest)
            oldest.transport.abort()
        self._open.add(writer)
        self._waiting[writer] = None
        return True

    def _forget(self, writer: asyncio.StreamWriter) -> None:
        self._open.discard(writer)
        self._waiting.pop(writer, None)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            return
        graceful = False
        try:
            async with asyncio.timeout(self._read_timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
            self._waiting.pop(writer, None)
            async with asyncio.timeout(EXCHANGE_TIMEOUT_S):
                writer.write(self._answer(head))
                await writer.drain()
            graceful = True
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # slow, silent, oversized or gone: the socket is freed below all the same
        finally:
            self._forget(writer)
            if graceful:
                writer.close()
            else:
                writer.transport.abort()

    def _answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        words = lines[0].split(" ")
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            return _response(400, b"bad request line\n")
        method, target, _ = words
        if target.partition("?")[0] != "/metrics":
            return _response(404, b"only /metrics is served here\n")
        if method not in ("GET", "HEAD"):
            return _response(405, b"use GET\n", extra="Allow: GET, HEAD\r\n")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        try:
            body, content_type = self._render(accept)
        except Exception:
            log.exception("metrics: a scrape failed")
            return _response(500, b"the scrape failed; see the daemon's log\n")
        return _response(200, body, content_type=content_type, head_only=method == "HEAD")


def _response(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: str = "",
    head_only: bool = False,
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + (b"" if head_only else body)
