"""An operator's requeue: abandoned batches back into the retry queue, with a fresh count.

Apart from the loop because it runs only on request (`flowagg recover --abandoned`), never in
a pass; the requeued failed file is the copy that wins if a crash leaves both.
"""

from __future__ import annotations

import logging
import os

import orjson

from flowagg.core.clock import Clock
from flowagg.core.fsutil import atomic_write, fsync_dir
from flowagg.delivery.recovery_folder import RecoveryFolder
from flowagg.delivery.recovery_format import ABANDONED_SUFFIX, FAILED_SUFFIX, check_batch_id
from flowagg.delivery.recovery_report import RecoveryReport

# The recovery side's logger, which logsetup also sends to recovery.log.
log = logging.getLogger("flowagg.recovery")


def requeue_abandoned(folder: RecoveryFolder, clock: Clock, batch_id: str | None) -> list[str]:
    """Put abandoned batches back into the retry queue (all, or one by id)."""
    layout = folder.layout
    report = RecoveryReport()
    requeued = []
    if batch_id is not None:
        names = [f"{check_batch_id(batch_id)}{ABANDONED_SUFFIX}"]
        if not (layout.abandoned / names[0]).exists():
            raise FileNotFoundError(f"no abandoned batch {batch_id}")
    else:
        names = sorted(n for n in os.listdir(layout.abandoned) if n.endswith(ABANDONED_SUFFIX))
    for name in names:
        path = layout.abandoned / name
        doc = folder.load(path, report)
        if doc is None:
            continue
        now = clock.now_ms()
        doc.pop("abandonedAt", None)
        doc.pop("abandonReason", None)
        doc["retryCount"] = 0
        doc["requeuedAt"] = now
        doc["nextRetryAt"] = now
        doc.setdefault("history", []).append({"at": now, "event": "requeued"})
        atomic_write(layout.recovery / f"{doc['batchId']}{FAILED_SUFFIX}", orjson.dumps(doc))
        path.unlink()
        fsync_dir(path.parent)
        requeued.append(doc["batchId"])
        log.info("batch %s: requeued from abandoned/", doc["batchId"])
    return requeued
