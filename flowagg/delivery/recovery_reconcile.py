"""Settling a batch id found in two places (SPEC §6).

Every move is write-new-then-delete-old, so a crash can leave one batch id in two places;
every run settles that, keeping the copy that was being moved to. A copy in
aggregated/ also appears when a rename succeeded but the directory fsync after it failed,
and the writer counted the batch as failed. The kept copy is trusted only once its directory
fsync succeeds: until then both stay.

Apart from the loop: it decides which copy wins, never whether a batch is retried.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flowagg.batches.storage import CorruptBatch, batch_file_name, find_completed, read_batch
from flowagg.core.compression import SUFFIXES
from flowagg.core.fsutil import TEMP_MARK, fsync_dir
from flowagg.core.layout import Layout
from flowagg.delivery.recovery_folder import RecoveryFolder
from flowagg.delivery.recovery_format import ABANDONED_SUFFIX, FAILED_SUFFIX
from flowagg.delivery.recovery_report import RecoveryReport

# The recovery side's logger, which logsetup also sends to recovery.log.
log = logging.getLogger("flowagg.recovery")


class Reconciler:
    def __init__(self, layout: Layout, folder: RecoveryFolder) -> None:
        self.layout = layout
        self.folder = folder

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

    def settle_failed(self, path: Path, doc: dict[str, Any], report: RecoveryReport) -> bool:
        """Settle a failed file's batch id found in a second place; True when it was dropped."""
        batch_id = doc["batchId"]
        done = self._same_completed(batch_id, doc)
        if done is not None:
            return self._drop(path, done, "already in aggregated/", report)
        parked = self.layout.abandoned / f"{batch_id}{ABANDONED_SUFFIX}"
        if not parked.exists():
            return False
        other = self.folder.load(parked, report)
        if other is None or other["entriesSha256"] != doc["entriesSha256"]:
            return False
        if doc.get("requeuedAt", -1) >= other.get("abandonedAt", 0):
            self._drop(parked, path, "requeued", report)
            return False
        return self._drop(path, parked, "already abandoned", report)

    def settle_abandoned(self, report: RecoveryReport) -> None:
        """Abandoned batches that are also in aggregated/: the completed copy wins."""
        for name in sorted(os.listdir(self.layout.abandoned)):
            if not name.endswith(ABANDONED_SUFFIX) or name.startswith((".", TEMP_MARK)):
                continue
            batch_id = name[: -len(ABANDONED_SUFFIX)]
            if find_completed(self.layout, batch_id) is None:
                continue
            path = self.layout.abandoned / name
            doc = self.folder.load(path, report)
            if doc is None:
                continue
            done = self._same_completed(batch_id, doc)
            if done is not None:
                self._drop(path, done, "already in aggregated/", report)

    def has_twin(self, name: str) -> bool:
        """Whether a failed file's batch id is also in aggregated/ or abandoned/."""
        batch_id = name[: -len(FAILED_SUFFIX)]
        return (
            find_completed(self.layout, batch_id) is not None
            or (self.layout.abandoned / f"{batch_id}{ABANDONED_SUFFIX}").exists()
        )
