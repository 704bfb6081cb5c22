"""Sinks (SPEC §6a): forward every batch before it is marked complete, at least once.

`command` runs a program with the batch JSON on stdin (exit 0 accepts, 75 = EX_TEMPFAIL
retries, any other code is permanent); `http` POSTs it (2xx accepts; 408, 429, 5xx and
connection errors retry; other 4xx are permanent). A circuit breaker stops calling a sink
after `breakerFailures` consecutive failures for `breakerCooldownMs`, then lets one trial
call through (half-open): success closes it, failure opens it again.

A failure after the sink may have taken the batch (a timeout, a reset once the request was
out, a command killed) is `AmbiguousDelivery`: the caller backs off instead of re-sending at
once, and the next delivery of that batch is counted as a re-send.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import logging
import os
import shlex
import signal
import socket
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from .clock import Clock
from .config import Config
from .errors import (
    AmbiguousDelivery,
    CircuitOpenError,
    PermanentError,
    SinkDownError,
    TransientError,
)
from .layout import Layout
from .sink_refused import Delivered, Refused, RefusedStore
from .storage import CompletedFiles

log = logging.getLogger("flowagg.sink")

EX_TEMPFAIL = 75
RETRYABLE_HTTP = {408, 429}
# Answers that speak for the service rather than the batch: a gateway without its backend.
DOWN_HTTP = {502, 503, 504}
STDERR_TAIL_BYTES = 4096
RESPONSE_BODY_LIMIT = 64 << 10  # a reply body is read (to reuse nothing) but never kept whole


class Sink(Protocol):
    name: str

    def deliver(self, batch_id: str, data: bytes) -> Delivered | None:
        """None, or what the receiver reported beyond accepting the whole batch."""
        ...


def _tail(stream: IO[bytes], keep: collections.deque[bytes]) -> None:
    """Drain a pipe, keeping only its last bytes: a chatty program never costs memory."""
    for chunk in iter(lambda: stream.read(4096), b""):
        keep.append(chunk)
        while sum(len(c) for c in keep) > STDERR_TAIL_BYTES and len(keep) > 1:
            keep.popleft()


class CommandSink:
    def __init__(self, argv: list[str], timeout_s: float) -> None:
        self.argv = argv
        self.timeout_s = timeout_s
        self.name = f"command {argv[0]}"

    def deliver(self, batch_id: str, data: bytes) -> None:
        try:
            # Its own process group, so a timeout kills the program and everything it started;
            # stdout is discarded (SPEC §6a), stderr keeps a bounded tail for the reason.
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            # A missing or unrunnable program is for an operator to fix: keep the batch.
            raise SinkDownError(f"sink command cannot run: {exc}") from None
        assert proc.stdin is not None and proc.stderr is not None
        tail: collections.deque[bytes] = collections.deque()
        reader = threading.Thread(target=_tail, args=(proc.stderr, tail), daemon=True)
        reader.start()
        writer = threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True)
        writer.start()
        try:
            code = proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            # It may have stored the batch and hung on the way out.
            raise AmbiguousDelivery(
                f"sink command timed out after {self.timeout_s:g} s (killed with its children)"
            ) from None
        finally:
            writer.join(timeout=1.0)
            reader.join(timeout=1.0)
            proc.stderr.close()
        detail = b"".join(tail).decode(errors="replace").strip().splitlines()[-1:] or [""]
        if code == 0:
            return
        if code < 0:
            # Killed by a signal (a `systemctl stop` reaching it, the OOM killer): not a verdict
            # on the batch, and it may have stored it before it died.
            name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
            raise AmbiguousDelivery(f"sink command killed by signal {name}: {detail[0][-200:]}")
        message = f"sink command exited {code}: {detail[0][-200:]}"
        if code == EX_TEMPFAIL:
            raise TransientError(message)
        raise PermanentError(message)


def _feed(stdin: IO[bytes], data: bytes) -> None:
    # A program that exits without reading its input is its own verdict, given by its code.
    with contextlib.suppress(OSError):
        stdin.write(data)
    with contextlib.suppress(OSError):
        stdin.close()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5.0)


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

    def deliver(self, batch_id: str, data: bytes) -> None:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout_s, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        # A socket timeout bounds each read, not the call: a server trickling a byte a second
        # would hold the flusher forever. The timer cuts the connection at the deadline.
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

        timer = threading.Timer(self.timeout_s, cut)
        timer.daemon = True
        timer.start()
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
            timer.cancel()
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


class CircuitBreaker:
    """closed → open after `failures` in a row → half-open after `cooldown_s` → closed."""

    def __init__(self, failures: int, cooldown_s: float, clock: Clock) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.state = "closed"
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self.times_opened = 0
        self._trial_running = False
        self._lock = threading.Lock()

    def before_call(self) -> bool:
        """Raise CircuitOpenError, or allow the call; True when it is the half-open trial."""
        with self._lock:
            if self.state == "open":
                assert self.opened_at is not None
                left = self.cooldown_s - (self.clock.monotonic() - self.opened_at)
                if left > 0:
                    raise CircuitOpenError(
                        "sink circuit breaker is open; not calling the sink", retry_in_s=left
                    )
                self.state = "half-open"
            if self.state == "half-open":
                if self._trial_running:
                    raise CircuitOpenError("sink circuit breaker is half-open; a trial is running")
                self._trial_running = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            if self.state != "closed":
                log.info("sink circuit breaker closed")
            self.state = "closed"
            self.consecutive_failures = 0
            self._trial_running = False

    def failure(self) -> None:
        with self._lock:
            self._trial_running = False
            self.consecutive_failures += 1
            if self.state == "half-open" or self.consecutive_failures >= self.threshold:
                if self.state != "open":
                    self.times_opened += 1
                    log.warning(
                        "sink circuit breaker open after %d failures", self.consecutive_failures
                    )
                self.state = "open"
                self.opened_at = self.clock.monotonic()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": self.state,
                "consecutiveFailures": self.consecutive_failures,
                "timesOpened": self.times_opened,
            }


def _no_refusals(batch_id: str, data: bytes, refused: list[Refused], now_ms: int) -> None:
    raise PermanentError(
        f"the sink refused {len(refused)} entries of the batch and there is no refused/ folder"
    )


class GuardedSink:
    """A sink behind its breaker, with counters for status and health.

    `refused`: where entries the sink refused one by one are parked (SPEC §6a).
    """

    def __init__(
        self, sink: Sink, breaker: CircuitBreaker, refused: RefusedStore | None = None
    ) -> None:
        self.sink = sink
        self.breaker = breaker
        self.refused = refused
        self.delivered = 0
        self.failures = 0
        self.resends = 0
        self.entries_refused = 0
        self.collisions = 0
        self.last_delivery_at: int | None = None
        self.last_error: str | None = None

    def deliver(self, batch_id: str, data: bytes, *, resend: bool = False) -> None:
        """`resend`: the last attempt with this batch was ambiguous, so this may be a copy."""
        trial = self.breaker.before_call()
        if resend:
            self.resends += 1
        try:
            outcome = self.sink.deliver(batch_id, data) or Delivered()
        except PermanentError as exc:
            # The sink is up and said no to this batch: not a reason to stop calling it.
            self.breaker.success()
            self.failures += 1
            self.last_error = f"{exc} (permanent)"
            raise
        except OSError as exc:
            self.breaker.failure()
            self.failures += 1
            self.last_error = str(exc)
            # An ambiguous trial stays ambiguous: the batch must remember it may be delivered.
            if trial and not isinstance(exc, AmbiguousDelivery):
                # The sink is still down: that is the sink's failure, not this batch's, so it
                # must not use up the batch's retries (recovery treats it like an open breaker).
                raise CircuitOpenError(
                    f"sink still down on a half-open trial: {exc}",
                    retry_in_s=self.breaker.cooldown_s,
                ) from exc
            raise
        if outcome.refused:
            # Parked before the batch counts as accepted: a crash (or a failed write) in
            # between re-sends the batch, which stores nothing twice and rewrites these files.
            park = self.refused.park if self.refused is not None else _no_refusals
            park(batch_id, data, list(outcome.refused), self.breaker.clock.now_ms())
        self.breaker.success()
        self.delivered += 1
        self.last_delivery_at = self.breaker.clock.now_ms()
        self.last_error = None
        self.entries_refused += len(outcome.refused)
        self.collisions += outcome.collisions
        if outcome.refused:
            log.warning(
                "batch %s: the sink refused %d entries (parked in recovery/refused/): %s",
                batch_id,
                len(outcome.refused),
                outcome.refused[0].reason,
            )
        if outcome.already_held and not resend:
            # An idempotent receiver saw rows it had: a copy nothing here knew was one (a
            # crash after the receiver committed, before the local write).
            self.resends += 1

    def snapshot(self) -> dict[str, Any]:
        details = getattr(self.sink, "snapshot", None)
        return {
            "type": self.sink.name,
            **self.breaker.snapshot(),
            "delivered": self.delivered,
            "failures": self.failures,
            "resends": self.resends,
            "collisions": self.collisions,
            "entriesRefused": self.entries_refused,
            "refusedWaiting": self.refused.count() if self.refused is not None else 0,
            "lastDeliveryAt": self.last_delivery_at,
            "lastError": self.last_error,
            **(details() if details else {}),
        }


def build_sink(config: Config, clock: Clock) -> GuardedSink | None:
    kind = config.sink_type
    timeout_s = config.sink_timeout_ms / 1000
    sink: Sink
    if kind == "http":
        sink = HttpSink(config.sink_url, timeout_s)
    elif kind == "command":
        sink = CommandSink(shlex.split(config.sink_command), timeout_s)
    elif kind == "postgres":
        from .sink_postgres import PostgresSink

        sink = PostgresSink(config.sink_dsn, config.sink_table, timeout_s)
    else:
        return None
    breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_ms / 1000, clock)
    return GuardedSink(sink, breaker, RefusedStore(Layout.for_config(config).refused))


def _no_sink() -> GuardedSink | None:
    return None


class Completer:
    """Completes a batch in two steps (SPEC §6a): deliver it to the sink, then write it.

    The steps are apart so that callers can remember that the sink accepted a batch and
    retry only the write: a full disk must not make the collector receive it over and over.
    """

    def __init__(
        self,
        write: Callable[[str, bytes], Path],
        sink: Callable[[], GuardedSink | None] = _no_sink,
        *,
        files: CompletedFiles | None = None,
    ) -> None:
        self.write = write
        self._sink = sink
        # How `write` stores a batch, so that the flusher may write runs of batches itself
        # (batch_runs); None for a plain store function, which is called batch by batch.
        self.files = files

    def has_sink(self) -> bool:
        return self._sink() is not None

    def deliver(self, batch_id: str, data: bytes, *, resend: bool = False) -> bool:
        """True when a sink accepted the batch; False when there is no sink to accept it."""
        sink = self._sink()
        if sink is None:
            return False
        sink.deliver(batch_id, data, resend=resend)
        return True

    def __call__(self, batch_id: str, data: bytes) -> Path:
        """Both steps at once: a Completer is a store as the pipeline takes one."""
        self.deliver(batch_id, data)
        return self.write(batch_id, data)


def as_completer(store: Callable[[str, bytes], Path]) -> Completer:
    """A plain store function is a completer without a sink."""
    return store if isinstance(store, Completer) else Completer(store)
