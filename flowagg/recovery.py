"""Layer 2 of SPEC §6: the recovery loop over recovery/*.failed.json.

Oldest failures first. A batch is retried when `now >= nextRetryAt` (or at once, when an
operator asks); a failure sets `nextRetryAt = now + U(0, min(retryMaxDelayMs, retryBaseMs *
2^retryCount))` (full jitter). After `batchRetryLimit` failed retries, or at once for a
permanent error, it moves to recovery/abandoned/ with its history.

Every move is write-new-then-delete-old, so a crash can leave one batch id in two places;
every run settles that, keeping the copy that was being moved to. A copy in
aggregated/ also appears when a rename succeeded but the directory fsync after it failed,
and the writer counted the batch as failed. The kept copy is trusted only once its directory
fsync succeeds: until then both stay.

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
import os
import random
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from .audit import audit
from .clock import Clock
from .compression import SUFFIXES
from .config import Config
from .entries import short_repr
from .errors import AmbiguousDelivery, CircuitOpenError, PermanentError, classify
from .formats import NewerFormatError
from .fsutil import TEMP_MARK, atomic_write, fsync_dir, quarantine_file
from .humanize import iso_ms
from .layout import Layout
from .pause import Cause, Pause, environment_cause
from .sink import as_completer
from .storage import (
    CompletedFiles,
    CorruptBatch,
    batch_file_name,
    decode_batch,
    find_completed,
    read_batch,
    read_regular,
)

log = logging.getLogger("flowagg.recovery")

FAILED_SUFFIX = ".failed.json"
ABANDONED_SUFFIX = ".abandoned.json"
# storage.make_batch_id: arrival ms (13 digits) and journal seq (12 digits); ASCII only.
BATCH_ID_RE = re.compile(r"[0-9]{13}_[0-9]{12}")
HISTORY_LIMIT = 50
# Times and counts stay within what any JSON reader holds exactly (JavaScript's safe integers).
FIELD_MAX = 2**53 - 1
INT_FIELDS = (
    "retryCount",
    "lastRetryAt",
    "failedAt",
    "nextRetryAt",
    "requeuedAt",
    "abandonedAt",
    "sinkAcceptedAt",
)
STR_FIELDS = ("lastError", "abandonReason")
# What a delivery attempt learns about the sink's copy (kept even when nothing is charged).
DELIVERY_FIELDS = ("sinkAcceptedAt", "possiblyDelivered")
BATCH_KEYS = (
    "batchId",
    "timestamp",
    "version",
    "trigger",
    "entries",
    "entryCount",
    "entriesSha256",
)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    base_ms: int
    max_delay_ms: int
    limit: int

    @classmethod
    def from_config(cls, config: Config) -> RetryPolicy:
        return cls(
            base_ms=config.retry_base_ms,
            max_delay_ms=config.retry_max_delay_ms,
            limit=config.batch_retry_limit,
        )

    def delay_cap_ms(self, retry_count: int) -> int:
        return min(self.max_delay_ms, self.base_ms * 2 ** min(retry_count, 62))

    def next_retry_at(self, now_ms: int, retry_count: int, rng: random.Random) -> int:
        return now_ms + rng.randint(0, self.delay_cap_ms(retry_count))


def check_batch_id(text: str) -> str:
    """A batch id from a user (CLI, socket); anything else could name a path outside the root."""
    if not BATCH_ID_RE.fullmatch(text):
        raise ValueError(
            f"{short_repr(text)} is not a batch id; use one like 1704067200000_000000000001"
            " (the file name in recovery/abandoned/ without .abandoned.json)"
        )
    return text


def undelivered_lag_ms(layout: Layout, clock: Clock) -> int:
    """Age of the oldest batch waiting in recovery/, from its first entry's arrival (the
    batch id's prefix); 0 when none waits."""
    oldest = min(
        (
            name
            for name in os.listdir(layout.recovery)
            if name.endswith(FAILED_SUFFIX) and BATCH_ID_RE.fullmatch(name[: -len(FAILED_SUFFIX)])
        ),
        default=None,
    )
    return 0 if oldest is None else max(0, clock.now_ms() - int(oldest[:13]))


def check_recovery_fields(doc: dict[str, Any]) -> None:
    """The fields a pass computes with, checked once on load: a hand-edited or damaged file
    is quarantined instead of raising out of every pass. Absent fields take their defaults."""
    for key in INT_FIELDS:
        value = doc.get(key, 0)
        if type(value) is not int or not 0 <= value <= FIELD_MAX:
            raise CorruptBatch(
                f"{key} must be an integer from 0 to 2^53-1, got {short_repr(value)}"
            )
    for key in STR_FIELDS:
        if not isinstance(doc.get(key, ""), str):
            raise CorruptBatch(f"{key} must be a string, got {short_repr(doc[key])}")
    if not isinstance(doc.get("possiblyDelivered", False), bool):
        raise CorruptBatch(
            f"possiblyDelivered must be true or false, got {short_repr(doc['possiblyDelivered'])}"
        )
    history = doc.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CorruptBatch(f"history must be an array of objects, got {short_repr(history)}")


def completed_document(doc: dict[str, Any]) -> bytes:
    """The batch as it goes to aggregated/: the batch keys only, marked recovered."""
    out = {key: doc[key] for key in BATCH_KEYS if key in doc}
    out["recovered"] = True
    return orjson.dumps(out)


@dataclasses.dataclass(frozen=True)
class _Known:
    """What a pass remembers of a failed file it has read."""

    stamp: tuple[int, int, int]  # st_ino, st_mtime_ns, st_size
    failed_at: int
    next_retry_at: int
    sink_accepted: bool


@dataclasses.dataclass
class RecoveryReport:
    recovered: list[str] = dataclasses.field(default_factory=list)
    retried_failed: list[str] = dataclasses.field(default_factory=list)
    abandoned: list[str] = dataclasses.field(default_factory=list)
    quarantined: list[str] = dataclasses.field(default_factory=list)
    waiting: int = 0
    reconciled: list[str] = dataclasses.field(default_factory=list)
    refused: list[str] = dataclasses.field(default_factory=list)
    circuit_open: bool = False
    breaker_retry_in_s: float | None = None
    stopped: bool = False
    # The environment-wide failure that stopped this pass (pause.py), without a retry charged.
    paused: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "recovered": self.recovered,
            "failedAgain": self.retried_failed,
            "abandoned": self.abandoned,
            "quarantined": self.quarantined,
            "waiting": self.waiting,
            "reconciled": self.reconciled,
            "refused": self.refused,
            "circuitOpen": self.circuit_open,
            "breakerRetryInS": (
                None if self.breaker_retry_in_s is None else round(self.breaker_retry_in_s, 1)
            ),
            "stopped": self.stopped,
            "paused": self.paused,
        }


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

    # -- reading ----------------------------------------------------------------------------
    def _load(self, path: Path, report: RecoveryReport) -> dict[str, Any] | None:
        """Parse and verify a recovery file; quarantine it when it cannot be trusted."""
        try:
            doc = decode_batch(read_regular(path), path)
            expected = doc["batchId"] + (
                FAILED_SUFFIX if path.name.endswith(FAILED_SUFFIX) else ABANDONED_SUFFIX
            )
            if path.name != expected:
                raise CorruptBatch(f"file name does not match batchId {doc['batchId']!r}")
            check_recovery_fields(doc)
            return doc
        except NewerFormatError as exc:
            log.error("%s", exc)
            report.refused.append(path.name)
            return None
        except (CorruptBatch, OSError, TypeError, KeyError, AttributeError) as exc:
            self._quarantine(path, f"unreadable recovery file: {exc}", report)
            return None

    def _quarantine(self, path: Path, reason: str, report: RecoveryReport) -> None:
        with contextlib.suppress(FileNotFoundError):
            target = quarantine_file(
                self.layout.errors,
                path,
                reason=reason,
                component="recovery",
                now_ms=self.clock.now_ms(),
            )
            report.quarantined.append(path.name)
            log.warning("quarantined %s to errors/%s: %s", path.name, target.name, reason)

    def _failed_files(self, report: RecoveryReport) -> list[Path]:
        paths = []
        for name in sorted(os.listdir(self.layout.recovery)):
            path = self.layout.recovery / name
            if name.startswith((".", TEMP_MARK)) or path.is_dir():
                continue
            if name.endswith(FAILED_SUFFIX):
                paths.append(path)
            else:
                self._quarantine(path, "unexpected file in recovery/", report)
        return paths

    # -- reconcile --------------------------------------------------------------------------
    def _drop(self, path: Path, kept: Path, why: str, report: RecoveryReport) -> bool:
        """Delete `path` once `kept` is durable; False (both stay) while it is not."""
        try:
            fsync_dir(kept.parent)
        except OSError as exc:
            log.error(
                "keeping both %s and %s/%s until the latter is durable: %s",
                path.name,
                kept.parent.name,
                kept.name,
                exc,
            )
            return False
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        report.reconciled.append(path.name)
        log.info("batch %s: removed %s (%s)", path.name.split(".")[0], path.name, why)
        return True

    def _same_completed(self, batch_id: str, doc: dict[str, Any]) -> Path | None:
        """The aggregated/ copy of this batch with the same entries, if there is one."""
        # Every suffix: an unreadable copy under one must not hide the same batch under another.
        for done in (self.layout.aggregated / batch_file_name(batch_id, c) for c in SUFFIXES):
            try:
                if read_batch(done)["entriesSha256"] == doc["entriesSha256"]:
                    return done
            except (CorruptBatch, OSError):
                continue
        return None

    def _settle_failed(self, path: Path, doc: dict[str, Any], report: RecoveryReport) -> bool:
        """Settle a failed file's batch id found in a second place; True when it was dropped."""
        batch_id = doc["batchId"]
        done = self._same_completed(batch_id, doc)
        if done is not None:
            return self._drop(path, done, "already in aggregated/", report)
        parked = self.layout.abandoned / f"{batch_id}{ABANDONED_SUFFIX}"
        if not parked.exists():
            return False
        other = self._load(parked, report)
        if other is None or other["entriesSha256"] != doc["entriesSha256"]:
            return False
        if doc.get("requeuedAt", -1) >= other.get("abandonedAt", 0):
            self._drop(parked, path, "requeued", report)
            return False
        return self._drop(path, parked, "already abandoned", report)

    def _settle_abandoned(self, report: RecoveryReport) -> None:
        """Abandoned batches that are also in aggregated/: the completed copy wins."""
        for name in sorted(os.listdir(self.layout.abandoned)):
            if not name.endswith(ABANDONED_SUFFIX) or name.startswith((".", TEMP_MARK)):
                continue
            batch_id = name[: -len(ABANDONED_SUFFIX)]
            if find_completed(self.layout, batch_id) is None:
                continue
            path = self.layout.abandoned / name
            doc = self._load(path, report)
            if doc is None:
                continue
            done = self._same_completed(batch_id, doc)
            if done is not None:
                self._drop(path, done, "already in aggregated/", report)

    # -- the loop ---------------------------------------------------------------------------
    def _has_twin(self, name: str) -> bool:
        batch_id = name[: -len(FAILED_SUFFIX)]
        return (
            find_completed(self.layout, batch_id) is not None
            or (self.layout.abandoned / f"{batch_id}{ABANDONED_SUFFIX}").exists()
        )

    def _scan(self, report: RecoveryReport) -> list[tuple[_Known, Path, dict[str, Any] | None]]:
        """Every failed file with its schedule; read only when new, changed or twinned."""
        found: list[tuple[_Known, Path, dict[str, Any] | None]] = []
        paths = self._failed_files(report)
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
            if known is not None and known.stamp == stamp and not self._has_twin(path.name):
                found.append((known, path, None))
                continue
            self._known.pop(path.name, None)
            doc = self._load(path, report)
            if doc is None or self._settle_failed(path, doc, report):
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
        self._settle_abandoned(report)
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
            doc = doc or self._load(path, report)
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

    def _complete(self, batch_id: str, doc: dict[str, Any], now: int) -> None:
        """Deliver unless the sink already has the batch, then write it; `doc` keeps what the
        delivery learnt (accepted, or possibly delivered) for its failed file."""
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
            self._complete(batch_id, doc, now)
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
        report = RecoveryReport()
        requeued = []
        if batch_id is not None:
            names = [f"{check_batch_id(batch_id)}{ABANDONED_SUFFIX}"]
            if not (self.layout.abandoned / names[0]).exists():
                raise FileNotFoundError(f"no abandoned batch {batch_id}")
        else:
            names = sorted(
                n for n in os.listdir(self.layout.abandoned) if n.endswith(ABANDONED_SUFFIX)
            )
        for name in names:
            path = self.layout.abandoned / name
            doc = self._load(path, report)
            if doc is None:
                continue
            now = self.clock.now_ms()
            doc.pop("abandonedAt", None)
            doc.pop("abandonReason", None)
            doc["retryCount"] = 0
            doc["requeuedAt"] = now
            doc["nextRetryAt"] = now
            doc.setdefault("history", []).append({"at": now, "event": "requeued"})
            atomic_write(
                self.layout.recovery / f"{doc['batchId']}{FAILED_SUFFIX}", orjson.dumps(doc)
            )
            path.unlink()
            fsync_dir(path.parent)
            requeued.append(doc["batchId"])
            log.info("batch %s: requeued from abandoned/", doc["batchId"])
        return requeued
