"""Sinks (SPEC §6a): forward every batch before it is marked complete, at least once.

The sinks themselves are `command` (sink_command), `http` (sink_http) and `postgres`
(sink_postgres). A circuit breaker stops calling a sink after `breakerFailures` consecutive
failures for `breakerCooldownMs`, then lets one trial call through (half-open): success
closes it, failure opens it again.

A failure after the sink may have taken the batch (a timeout, a reset once the request was
out, a command killed) is `AmbiguousDelivery`: the caller backs off instead of re-sending at
once, and the next delivery of that batch is counted as a re-send.
"""

from __future__ import annotations

import logging
import shlex
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from flowagg.batches.storage import CompletedFiles
from flowagg.core.clock import Clock
from flowagg.core.config import Config
from flowagg.core.errors import AmbiguousDelivery, CircuitOpenError, PermanentError
from flowagg.core.layout import Layout
from flowagg.delivery.sink_command import CommandSink
from flowagg.delivery.sink_http import HttpSink
from flowagg.delivery.sink_refused import Delivered, Refused, RefusedStore

log = logging.getLogger("flowagg.sink")


class Sink(Protocol):
    name: str

    def deliver(self, batch_id: str, data: bytes) -> Delivered | None:
        """None, or what the receiver reported beyond accepting the whole batch."""
        ...


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

    # `trial`: what before_call returned for this call. Deliveries run side by side, so a call
    # begun while the breaker was closed may end during another's trial: only the trial's own
    # end lets the next trial through.
    def success(self, trial: bool = False) -> None:
        with self._lock:
            if self.state != "closed":
                log.info("sink circuit breaker closed")
            self.state = "closed"
            self.consecutive_failures = 0
            if trial:
                self._trial_running = False

    def failure(self, trial: bool = False) -> None:
        with self._lock:
            if trial:
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
    Several threads may deliver at once (the flusher's senders, the recovery loop): the
    counters are kept under a lock, the breaker has its own.
    """

    def __init__(
        self, sink: Sink, breaker: CircuitBreaker, refused: RefusedStore | None = None
    ) -> None:
        self.sink = sink
        self.breaker = breaker
        self.refused = refused
        # A sink that takes several batches at once says how many (the postgres sink).
        self.parallel: int = getattr(sink, "parallel", 1)
        self._lock = threading.Lock()
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
            with self._lock:
                self.resends += 1
        try:
            outcome = self.sink.deliver(batch_id, data) or Delivered()
        except PermanentError as exc:
            # The sink is up and said no to this batch: not a reason to stop calling it.
            self.breaker.success(trial)
            self._failed(f"{exc} (permanent)")
            raise
        except OSError as exc:
            self.breaker.failure(trial)
            self._failed(str(exc))
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
        self.breaker.success(trial)
        with self._lock:
            self.delivered += 1
            self.last_delivery_at = self.breaker.clock.now_ms()
            self.last_error = None
            self.entries_refused += len(outcome.refused)
            self.collisions += outcome.collisions
            if outcome.already_held and not resend:
                # An idempotent receiver saw rows it had: a copy nothing here knew was one (a
                # crash after the receiver committed, before the local write).
                self.resends += 1
        if outcome.refused:
            log.warning(
                "batch %s: the sink refused %d entries (parked in recovery/refused/): %s",
                batch_id,
                len(outcome.refused),
                outcome.refused[0].reason,
            )

    def _failed(self, error: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = error

    def snapshot(self) -> dict[str, Any]:
        details = getattr(self.sink, "snapshot", None)
        with self._lock:
            counters = {
                "delivered": self.delivered,
                "failures": self.failures,
                "resends": self.resends,
                "collisions": self.collisions,
                "entriesRefused": self.entries_refused,
                "lastDeliveryAt": self.last_delivery_at,
                "lastError": self.last_error,
            }
        return {
            "type": self.sink.name,
            **self.breaker.snapshot(),
            **counters,
            "refusedWaiting": self.refused.count() if self.refused is not None else 0,
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
        from flowagg.delivery.sink_postgres import PostgresSink

        sink = PostgresSink(
            config.sink_dsn, config.sink_table, timeout_s, parallel=config.sink_connections
        )
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

    def parallel(self) -> int:
        """How many batches may be delivered at once (1 without a sink)."""
        sink = self._sink()
        return sink.parallel if sink is not None else 1

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
