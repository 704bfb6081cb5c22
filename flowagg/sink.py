"""Sinks (SPEC §6a): forward every batch before it is marked complete, at least once.

`command` runs a program with the batch JSON on stdin (exit 0 accepts, 75 = EX_TEMPFAIL
retries, any other code is permanent); `http` POSTs it (2xx accepts; 408, 429, 5xx and
connection errors retry; other 4xx are permanent). A circuit breaker stops calling a sink
after `breakerFailures` consecutive failures for `breakerCooldownMs`, then lets one trial
call through (half-open): success closes it, failure opens it again.
"""

from __future__ import annotations

import http.client
import logging
import shlex
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol

from .clock import Clock
from .config import Config
from .errors import CircuitOpenError, PermanentError, TransientError

log = logging.getLogger("flowagg.sink")

EX_TEMPFAIL = 75
RETRYABLE_HTTP = {408, 429}


class Sink(Protocol):
    name: str

    def deliver(self, batch_id: str, data: bytes) -> None: ...


class CommandSink:
    def __init__(self, argv: list[str], timeout_s: float) -> None:
        self.argv = argv
        self.timeout_s = timeout_s
        self.name = f"command {argv[0]}"

    def deliver(self, batch_id: str, data: bytes) -> None:
        try:
            proc = subprocess.run(
                self.argv,
                input=data,
                capture_output=True,
                timeout=self.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise TransientError(f"sink command timed out after {self.timeout_s:g} s") from None
        except OSError as exc:
            # A missing or unrunnable program is for an operator to fix: keep the batch.
            raise TransientError(f"sink command cannot run: {exc}") from None
        if proc.returncode == 0:
            return
        detail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        message = f"sink command exited {proc.returncode}: {detail[0][:200]}"
        if proc.returncode == EX_TEMPFAIL:
            raise TransientError(message)
        raise PermanentError(message)


class HttpSink:
    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.name = f"http {url}"

    def deliver(self, batch_id: str, data: bytes) -> None:
        request = urllib.request.Request(
            self.url,
            data=data,
            method="POST",
            headers={"Content-Type": "application/json", "X-Flowagg-Batch-Id": batch_id},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransientError(f"sink unreachable: {reason}") from None
        if 200 <= status < 300:
            return
        message = f"sink answered HTTP {status}"
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
                if self.clock.monotonic() - self.opened_at < self.cooldown_s:
                    raise CircuitOpenError("sink circuit breaker is open; not calling the sink")
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


class GuardedSink:
    """A sink behind its breaker, with counters for status and health."""

    def __init__(self, sink: Sink, breaker: CircuitBreaker) -> None:
        self.sink = sink
        self.breaker = breaker
        self.delivered = 0
        self.failures = 0

    def deliver(self, batch_id: str, data: bytes) -> None:
        trial = self.breaker.before_call()
        try:
            self.sink.deliver(batch_id, data)
        except PermanentError:
            # The sink is up and said no to this batch: not a reason to stop calling it.
            self.breaker.success()
            self.failures += 1
            raise
        except OSError as exc:
            self.breaker.failure()
            self.failures += 1
            if trial:
                # The sink is still down: that is the sink's failure, not this batch's, so it
                # must not use up the batch's retries (recovery treats it like an open breaker).
                raise CircuitOpenError(f"sink still down on a half-open trial: {exc}") from exc
            raise
        self.breaker.success()
        self.delivered += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "type": self.sink.name,
            **self.breaker.snapshot(),
            "delivered": self.delivered,
            "failures": self.failures,
        }


def build_sink(config: Config, clock: Clock) -> GuardedSink | None:
    kind = config.sink_type
    timeout_s = config.sink_timeout_ms / 1000
    sink: Sink
    if kind == "http":
        sink = HttpSink(config.sink_url, timeout_s)
    elif kind == "command":
        sink = CommandSink(shlex.split(config.sink_command), timeout_s)
    else:
        return None
    breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_ms / 1000, clock)
    return GuardedSink(sink, breaker)


def sink_then_store(
    sink: Callable[[], GuardedSink | None], write: Callable[[str, bytes], Any]
) -> Callable[[str, bytes], Any]:
    """The store used by the flusher and the recovery loop: deliver first, then complete."""

    def store(batch_id: str, data: bytes) -> Any:
        current = sink()
        if current is not None:
            current.deliver(batch_id, data)
        return write(batch_id, data)

    return store
