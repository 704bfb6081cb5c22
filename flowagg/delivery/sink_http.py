"""The `http` sink (SPEC §6a): POSTs the batch JSON, with a total deadline.

2xx accepts; 408, 429 and 5xx retry (502, 503, 504 and no connection say the service is
down); other 4xx are permanent and redirects are never followed. A failure once the whole
request was out (a timeout, a reset) may follow a stored batch, so that is an
`AmbiguousDelivery`. Apart from sink.py because the connection, its deadline and the
answer's meaning are a transport of their own; the breaker and the counters around every
sink stay there.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import urllib.parse

from flowagg.core.errors import AmbiguousDelivery, PermanentError, SinkDownError, TransientError
from flowagg.delivery.sink_deadline import Watchdog

RETRYABLE_HTTP = {408, 429}
# Answers that speak for the service rather than the batch: a gateway without its backend.
DOWN_HTTP = {502, 503, 504}
RESPONSE_BODY_LIMIT = 64 << 10  # a reply body is read (to reuse nothing) but never kept whole


class HttpSink:
    """POST with a total deadline; redirects are never followed (SPEC §6a)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.name = f"http {url}"
        parts = urllib.parse.urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._watchdog = Watchdog("sink-deadline")

    def deliver(self, batch_id: str, data: bytes) -> None:
        # Here, not at the top: a daemon without an http sink starts without http.client and
        # the email package it pulls in.
        import http.client

        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout_s, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        # A socket timeout bounds each read, not the call: a server trickling a byte a second
        # would hold the flusher forever. The watchdog cuts the connection at the deadline.
        expired = threading.Event()
        sock: socket.socket | None = None
        # Once the whole request is out, the collector may store the batch whatever happens
        # to its answer: a failure from then on is ambiguous, before it the batch is not there.
        sent = False

        def cut() -> None:
            expired.set()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        deadline = self._watchdog.arm(self.timeout_s, cut)
        try:
            conn.connect()
            sock = conn.sock  # the response keeps using it after the connection lets go
            if expired.is_set():
                cut()
            conn.request(
                "POST",
                self._path,
                body=data,
                headers={"Content-Type": "application/json", "X-Flowagg-Batch-Id": batch_id},
            )
            sent = True
            response = conn.getresponse()
            status, location = response.status, response.getheader("Location")
            while response.read(RESPONSE_BODY_LIMIT):
                pass
        except (http.client.HTTPException, OSError, ValueError) as exc:
            if not expired.is_set():
                if sent:
                    message = f"sink dropped the connection before answering: {exc}"
                    raise AmbiguousDelivery(message) from None
                raise SinkDownError(f"sink unreachable: {exc}") from None
        finally:
            self._watchdog.disarm(deadline)
            conn.close()
        if expired.is_set():
            message = f"sink did not answer within sinkTimeoutMs ({self.timeout_s:g} s)"
            raise AmbiguousDelivery(message) if sent else SinkDownError(message)
        if 200 <= status < 300:
            return
        if 300 <= status < 400:
            raise PermanentError(
                f"sink answered HTTP {status} redirecting to {location or '(no Location)'};"
                " redirects are not followed: set sinkUrl to the final URL"
            )
        message = f"sink answered HTTP {status}"
        if status in DOWN_HTTP:
            raise SinkDownError(message)
        if status in RETRYABLE_HTTP or status >= 500:
            raise TransientError(message)
        raise PermanentError(message)
