"""Layer 2 of SPEC §6: the recovery loop over recovery/*.failed.json, one pass at a time.

Oldest failures first. A batch is retried when `now >= nextRetryAt` (or at once, when an
operator asks); a failure sets the next try by the retry policy (retry_policy.py). After
`batchRetryLimit` failed retries, or at once for a permanent error, it moves to
recovery/abandoned/ with its history. A batch id found in two places is settled first
(recovery_reconcile.py).

A pass reads a failed file only when it is due or has changed since the last pass (by inode,
mtime and size): thousands of waiting batches cost a stat each, not a read and a checksum.

Completing a batch is two steps, deliver then write. A batch the sink accepted
(`sinkAcceptedAt`, or remembered here when its failed file could not be updated) only has
its write retried, with no retry limit: the collector holds it, so it waits for the disk.
With the breaker open such writes still go ahead; the batches that need the sink wait.
A pass ends early, between batches, once `stop` is set: a daemon's shutdown does not
wait for a whole pass through a slow sink.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from flowagg.batches.storage import CompletedFiles
from flowagg.core.audit import audit
from flowagg.core.clock import Clock
from flowagg.core.errors import AmbiguousDelivery, CircuitOpenError, PermanentError, classify
from flowagg.core.fsutil import atomic_write, fsync_dir
from flowagg.core.humanize import iso_ms
from flowagg.core.layout import Layout
from flowagg.delivery.pause import Cause, Pause, environment_cause
from flowagg.delivery.recovery_folder import RecoveryFolder
from flowagg.delivery.recovery_format import ABANDONED_SUFFIX, FAILED_SUFFIX, completed_document
from flowagg.delivery.recovery_reconcile import Reconciler
from flowagg.delivery.recovery_report import RecoveryReport
from flowagg.delivery.recovery_requeue import requeue_abandoned
from flowagg.delivery.recovery_taken import stored_apart
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.delivery.sink import as_completer

log = logging.getLogger("flowagg.recovery")

HISTORY_LIMIT = 50
# What a delivery attempt learns about the sink's copy (kept even when nothing is charged).
DELIVERY_FIELDS = ("sinkAcceptedAt", "possiblyDelivered")


@dataclasses.dataclass(frozen=True)
class _Known:
    """What a pass remembers of a failed file it has read."""

    stamp: tuple[int, int, int]  # st_ino, st_mtime_ns, st_size
    failed_at: int
    next_retry_at: int
    sink_accepted: bool


def write_completed(layout: Layout, batch_id: str, data: bytes) -> Path:
    return CompletedFiles(layout).write(batch_id, data)


class Recovery:
    def __init__(
        self,
        layout: Layout,
        clock: Clock,
        rng: random.Random,
        policy: RetryPolicy,
        *,
        store: Callable[[str, bytes], Path] | None = None,
    ) -> None:
        self.layout = layout
        self.clock = clock
        self.rng = rng
        self.policy = policy
        self.completer = as_completer(
            store or (lambda batch_id, data: write_completed(layout, batch_id, data))
        )
        self.pause = Pause()
        self.runs = 0
        self.totals: dict[str, int] = {"recovered": 0, "failedAgain": 0, "abandoned": 0}
        # Set by the daemon when it stops: a pass ends before its next batch.
        self.stop = threading.Event()
        # By file name; holds only names present at the last pass.
        self._known: dict[str, _Known] = {}
        # Batch id -> when the sink accepted it, for failed files that could not be updated
        # to say so (the disk that refused the batch refuses its failed file too).
        self._accepted: dict[str, int] = {}
        self.folder = RecoveryFolder(layout, clock)
        self.reconciler = Reconciler(layout, self.folder)

    # -- the loop ---------------------------------------------------------------------------
    def _scan(self, report: RecoveryReport) -> list[tuple[_Known, Path, dict[str, Any] | None]]:
        """Every failed file with its schedule; read only when new, changed or twinned."""
        found: list[tuple[_Known, Path, dict[str, Any] | None]] = []
        paths = self.folder.failed_files(report)
        present = {path.name for path in paths}
        for name in [n for n in self._known if n not in present]:
            del self._known[name]
        for batch_id in [b for b in self._accepted if f"{b}{FAILED_SUFFIX}" not in present]:
            del self._accepted[batch_id]
        for path in paths:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            known = self._known.get(path.name)
            if (
                known is not None
                and known.stamp == stamp
                and not self.reconciler.has_twin(path.name)
            ):
                found.append((known, path, None))
                continue
            self._known.pop(path.name, None)
            doc = self.folder.load(path, report)
            if doc is None or self.reconciler.settle_failed(path, doc, report):
                continue
            known = _Known(
                stamp, doc.get("failedAt", 0), doc.get("nextRetryAt", 0), "sinkAcceptedAt" in doc
            )
            self._known[path.name] = known
            found.append((known, path, doc))
        return found

    def run_once(self, *, force: bool = False) -> RecoveryReport:
        """One pass. `force` (an operator's `flowagg recover`) ignores nextRetryAt and the
        loop's pause.

        Every batch not tried (not due, stopped, paused, or needing a sink whose breaker is
        open) counts as waiting.
        """
        self.runs += 1
        report = RecoveryReport()
        found = self._scan(report)
        self.reconciler.settle_abandoned(report)
        found.sort(key=lambda item: (item[0].failed_at, item[1]))
        paused_all = not force and self.pause.holds(self.clock.now_ms())
        met: Cause | None = None
        for known, path, doc in found:
            if self.stop.is_set():
                report.stopped = True
                report.waiting += 1
                continue
            if paused_all or (met is not None and met.needs_disk):
                report.waiting += 1
                continue
            if not force and self.clock.now_ms() < known.next_retry_at:
                report.waiting += 1
                continue
            batch_id = path.name[: -len(FAILED_SUFFIX)]
            needs_sink = not known.sink_accepted and batch_id not in self._accepted
            if (report.circuit_open or met is not None) and needs_sink:
                report.waiting += 1
                continue
            doc = doc or self.folder.load(path, report)
            if doc is None:
                continue
            self._known.pop(path.name, None)  # the retry rewrites or removes it
            cause = self._retry(path, doc, report)
            if cause is not None:
                report.waiting += 1
                met = met if met is not None and met.needs_disk else cause
                report.circuit_open = report.circuit_open or cause.cause == "breakerOpen"
        tried = bool(report.recovered or report.retried_failed or report.abandoned)
        self._settle_pause(met, tried or not found, report)
        if report.stopped:
            log.info("recovery pass stopped early: the daemon is stopping")
        for key, items in (
            ("recovered", report.recovered),
            ("failedAgain", report.retried_failed),
            ("abandoned", report.abandoned),
        ):
            self.totals[key] += len(items)
        return report

    def _settle_pause(self, met: Cause | None, cleared: bool, report: RecoveryReport) -> None:
        """Pause the loop on an environment cause; lift the pause once a batch got past it
        (or none is left)."""
        now = self.clock.now_ms()
        if met is not None:
            first = self.pause.cause is None
            self.pause.hit(met, now, self.policy.delay_cap_ms(self.pause.passes))
            (log.error if first else log.warning)(
                "recovery paused: %s; no batch is charged a retry; next try in %d ms",
                met.describe(),
                self.pause.until_ms - now,
            )
        elif cleared and self.pause.cause is not None:
            log.info("recovery resumed: %s is gone", self.pause.cause.cause)
            self.pause.clear()
        report.paused = self.pause.snapshot()

    def _complete(self, path: Path, doc: dict[str, Any], now: int) -> None:
        """Deliver unless the sink already has the batch, then write it; `doc` keeps what the
        delivery learnt (accepted, or possibly delivered) for its failed file."""
        batch_id = doc["batchId"]
        # Neither sent nor written when its id names another copy: a batch file is never
        # replaced, and a receiver dedupes by batch id.
        if stored_apart(self.layout, self.clock, path, doc):
            return
        data = completed_document(doc)
        accepted = doc.get("sinkAcceptedAt", self._accepted.get(batch_id))
        if accepted is None:
            try:
                if self.completer.deliver(
                    batch_id, data, resend=doc.get("possiblyDelivered", False)
                ):
                    accepted = self._accepted[batch_id] = now
            except AmbiguousDelivery:
                doc["possiblyDelivered"] = True
                raise
            doc.pop("possiblyDelivered", None)
        if accepted is not None:
            doc["sinkAcceptedAt"] = accepted
        self.completer.write(batch_id, data)

    def _retry(self, path: Path, doc: dict[str, Any], report: RecoveryReport) -> Cause | None:
        """Try one batch; the environment's cause when it failed for every batch alike (an
        open breaker, a sink that is down, a folder that refuses writes): nothing is charged."""
        batch_id = doc["batchId"]
        now = self.clock.now_ms()
        learnt = [doc.get(key) for key in DELIVERY_FIELDS]
        try:
            self._complete(path, doc, now)
        except Exception as exc:
            cause = environment_cause(exc, self.layout.root, "aggregated/")
            if cause is not None:
                if isinstance(exc, CircuitOpenError):
                    report.breaker_retry_in_s = exc.retry_in_s
                if learnt != [doc.get(key) for key in DELIVERY_FIELDS]:
                    # What the sink now holds must outlive a restart; the count stays as it is.
                    with contextlib.suppress(OSError):
                        atomic_write(path, orjson.dumps(doc))
                log.warning("batch %s: not charged a retry: %s", batch_id, cause.describe())
                return cause
            # Anything else (a bug, a sink's bad URL) is retried like a transient failure.
            if not isinstance(exc, (OSError, PermanentError)):
                log.error("batch %s: unexpected error while recovering", batch_id, exc_info=exc)
            error = f"{type(exc).__name__}: {exc}"
            kind = classify(exc)
            doc["retryCount"] = doc.get("retryCount", 0) + 1
            doc["lastRetryAt"] = now
            doc["lastError"] = error
            history = doc.setdefault("history", [])
            history.append({"at": now, "error": error, "kind": kind})
            del history[:-HISTORY_LIMIT]
            # The collector holds a batch it accepted: giving up the local copy would leave
            # aggregated/ without it for good, so only the write is retried, without limit.
            held = "sinkAcceptedAt" in doc
            if kind == "permanent" or (not held and doc["retryCount"] >= self.policy.limit):
                why = "permanent error" if kind == "permanent" else "retry limit reached"
                self._abandon(path, doc, why, report)
                return None
            doc["nextRetryAt"] = self.policy.next_retry_at(now, doc["retryCount"], self.rng)
            try:
                atomic_write(path, orjson.dumps(doc))
            except OSError as write_exc:
                log.error("batch %s: cannot update its failed file: %s", batch_id, write_exc)
            report.retried_failed.append(batch_id)
            log.warning(
                "batch %s: retry %d failed (%s%s); next at %s",
                batch_id,
                doc["retryCount"],
                "the sink has it, the write failed: " if held else "",
                error,
                iso_ms(doc["nextRetryAt"]),
            )
            return None
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fsync_dir(path.parent)
        self._accepted.pop(batch_id, None)
        report.recovered.append(batch_id)
        log.info("batch %s: recovered into aggregated/", batch_id)
        return None

    def _abandon(self, path: Path, doc: dict[str, Any], why: str, report: RecoveryReport) -> None:
        batch_id = doc["batchId"]
        doc["abandonedAt"] = self.clock.now_ms()
        doc["abandonReason"] = why
        doc.pop("nextRetryAt", None)
        target = self.layout.abandoned / f"{batch_id}{ABANDONED_SUFFIX}"
        try:
            atomic_write(target, orjson.dumps(doc))
        except OSError as exc:
            # Cannot park it: keep it failed (with its count) and try again next run.
            log.error("batch %s: cannot move to abandoned/: %s", batch_id, exc)
            doc.pop("abandonedAt")
            doc.pop("abandonReason")
            doc["nextRetryAt"] = self.clock.now_ms()
            with contextlib.suppress(OSError):
                atomic_write(path, orjson.dumps(doc))
            report.retried_failed.append(batch_id)
            return
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fsync_dir(path.parent)
        report.abandoned.append(batch_id)
        audit("abandon", batchId=batch_id, reason=why, retryCount=doc["retryCount"])
        log.error("batch %s: abandoned (%s) after %d retries", batch_id, why, doc["retryCount"])

    # -- operator ---------------------------------------------------------------------------
    def requeue_abandoned(self, batch_id: str | None = None) -> list[str]:
        """Put abandoned batches back into the retry queue (all, or one by id)."""
        return requeue_abandoned(self.folder, self.clock, batch_id)
