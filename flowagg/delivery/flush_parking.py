"""Where the flusher files a batch it could not complete (SPEC §6, layer 1).

A permanent error (the sink said no for good) sends the batch to abandoned/; anything else,
a bug or an unforeseen error included, to recovery/<id>.failed.json with its next retry.
Apart from the flusher, whose loop keeps batches in order and retries them: this judges why
one failed and writes its file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flowagg.core.audit import audit
from flowagg.core.errors import PermanentError
from flowagg.core.fsutil import atomic_write
from flowagg.core.layout import Layout
from flowagg.delivery.failed_format import Delivery, failed_document

# The flusher's own log: these lines tell what became of its batches.
log = logging.getLogger("flowagg.flusher")


class Parking:
    """Judges a failed batch and writes its failed (or abandoned) file."""

    def __init__(self, layout: Layout, next_retry_at: Callable[[int], int]) -> None:
        self.layout = layout
        self.next_retry_at = next_retry_at
        self.unexpected_errors = 0
        self._traced: set[str] = set()

    def park(
        self, batch_id: str, data: bytes, failure: BaseException, delivery: Delivery, now_ms: int
    ) -> Path:
        """The file written for the batch; raises OSError when it cannot be written."""
        error, permanent = self._classify(batch_id, failure)
        if permanent:
            target = self.layout.abandoned / f"{batch_id}.abandoned.json"
            doc = failed_document(
                data, error=error, now_ms=now_ms, next_retry_ms=None, delivery=delivery
            )
        else:
            target = self.layout.recovery / f"{batch_id}.failed.json"
            doc = failed_document(
                data,
                error=error,
                now_ms=now_ms,
                next_retry_ms=self.next_retry_at(now_ms),
                delivery=delivery,
            )
        atomic_write(target, doc)
        if permanent:
            audit("abandon", batchId=batch_id, reason=error, retryCount=0)
        log.warning("batch %s parked in %s/: %s", batch_id, target.parent.name, error)
        return target

    def _classify(self, batch_id: str, exc: BaseException) -> tuple[str, bool]:
        """(the error as recorded, permanent?) for a batch that could not be completed."""
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, PermanentError):
            log.error("batch %s refused for good: %s", batch_id, error)
            return error, True
        if isinstance(exc, OSError):
            log.error("batch %s could not be completed: %s", batch_id, error)
            return error, False
        # A bug or an unforeseen error (a sink's bad URL, say): handled like a transient
        # failure, so the batch is parked and retried instead of dying with the thread.
        self.unexpected_errors += 1
        self._log_unexpected(batch_id, exc)
        return error, False

    def _log_unexpected(self, batch_id: str, exc: BaseException) -> None:
        """The traceback once per kind of error; a repeat gets one line."""
        kind = type(exc).__name__
        if kind in self._traced:
            log.error("batch %s: unexpected %s: %s", batch_id, kind, exc)
            return
        self._traced.add(kind)
        log.error("batch %s: unexpected error; it is parked and retried", batch_id, exc_info=exc)
