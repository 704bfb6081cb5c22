"""The Unix socket server (SPEC §4.1): newline-delimited JSON, one reply line per request.

Nothing a client sends can crash the daemon: malformed JSON, a non-object, an unknown op or
an oversized line each get `{"ok": false, "error": ...}`. After an oversized line the
connection is closed (its remainder cannot be framed); other errors leave it usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from .entries import short_repr
from .errors import RootUnusableError

log = logging.getLogger("flowagg.server")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
SOCKET_MODE = 0o600


class SocketServer:
    def __init__(self, path: Path, handler: Handler, *, max_request_bytes: int) -> None:
        self.path = path
        self.handler = handler
        self.max_request_bytes = max_request_bytes
        self._server: asyncio.AbstractServer | None = None
        self._active: set[asyncio.Task[Any]] = set()
        self.requests = 0
        self.bad_requests = 0

    async def start(self) -> None:
        # Only the lock holder gets here, so a socket file left by a dead daemon is stale.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=self.max_request_bytes
            )
        except OSError as exc:
            raise RootUnusableError(
                f"cannot listen on {self.path}: {exc.strerror or exc}"
                " (a Unix socket path must stay under 108 bytes); use a shorter --root"
            ) from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, SOCKET_MODE)

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish, then close the socket."""
        if self._server is None:
            return
        self._server.close()
        if self._active:
            await asyncio.gather(*self._active, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
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
                task = asyncio.current_task()
                assert task is not None
                self._active.add(task)
                try:
                    reply = await self._handle_line(line)
                finally:
                    self._active.discard(task)
                await self._reply(writer, reply)
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle_line(self, line: bytes) -> dict[str, Any]:
        self.requests += 1
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self.bad_requests += 1
            return _error(f"malformed JSON: {exc}")
        if not isinstance(request, dict):
            self.bad_requests += 1
            return _error('request must be a JSON object like {"op": "ping"}')
        try:
            return await self.handler(request)
        except Exception:
            log.exception("request failed: op=%s", short_repr(request.get("op")))
            return _error("internal error; see logs/aggregation.log")

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(orjson.dumps(reply) + b"\n")
        await writer.drain()


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}
