"""A failed batch whose id already names a file in aggregated/ with other entries (SPEC §5:
a batch id names one set of entries forever).

Copies with the same entries are settled before (recovery_reconcile.py). Any other copy is
looked at the way the flusher looks at a batch whose name is on disk (replayed.find_stored),
before the batch is delivered or written: a copy that begins with the batch's entries is
kept, and the entries it lacks are parked under the id the first of them gives; a copy that
is unreadable or holds none of them is moved to errors/, and the batch is then written.

Apart from the loop because it is a rare path, and the loop's module a long one already.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson

from flowagg.batches.replayed import find_stored
from flowagg.batches.storage import Batch, BatchNames, CorruptBatch
from flowagg.core.clock import Clock
from flowagg.core.fsutil import atomic_write, fsync_dir
from flowagg.core.layout import Layout
from flowagg.delivery.failed_format import Delivery, failed_document
from flowagg.delivery.recovery_format import FAILED_SUFFIX

# The recovery side's logger, which logsetup also sends to recovery.log.
log = logging.getLogger("flowagg.recovery")


def batch_of(doc: dict[str, Any]) -> Batch:
    """The failed file's batch as the flusher would hold it; its span is taken as whole."""
    try:
        entry_ids = [entry["entryId"] for entry in doc["entries"]]
        first_seq = int(doc["batchId"].split("_", 1)[1])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptBatch(
            f"its id is taken in aggregated/ and its entries cannot be compared ({exc!r})"
        ) from None
    entries = [orjson.dumps(entry) for entry in doc["entries"]]
    return Batch(
        doc["batchId"],
        doc.get("trigger", "manual"),
        entries,
        first_seq,
        first_seq + len(entries) - 1,
        entry_ids,
        timestamp_ms=doc.get("timestamp"),
    )


def stored_apart(layout: Layout, clock: Clock, path: Path, doc: dict[str, Any]) -> bool:
    """True when aggregated/ holds the batch under its id already (its entries the copy
    lacks are parked by then): the failed file can go. False: write the batch.

    Raises OSError when the entries the copy lacks cannot be parked.
    """
    if not BatchNames.of(layout).completed(doc["batchId"]):
        return False
    batch = batch_of(doc)
    found = find_stored(layout, clock, batch)
    # The failed file itself: every copy in aggregated/ was moved aside.
    if found is None or found[0] == path:
        return False
    # The failed file goes once this returns: the copy kept instead must be durable first
    # (its rename may not be: a failed directory fsync parked the batch). An OSError here
    # counts as a failed retry, as a failed write would.
    fsync_dir(found[0].parent)
    rest = found[1]
    while rest is not None:
        again = find_stored(layout, clock, rest)
        if again is None:
            _park(layout, clock, rest, doc)
            break
        rest = again[1]
    log.error(
        "batch %s: kept its copy in %s/; not written again", batch.batch_id, found[0].parent.name
    )
    return True


def _park(layout: Layout, clock: Clock, rest: Batch, doc: dict[str, Any]) -> None:
    """The entries a kept copy lacks, as a failed batch of their own, due at once; what the
    sink did with the whole batch holds for them."""
    now = clock.now_ms()
    data = rest.encode(now)
    delivery = Delivery(doc.get("sinkAcceptedAt"), doc.get("possiblyDelivered", False))
    error = f"the rest of batch {doc['batchId']}, whose id names a stored copy lacking them"
    target = layout.recovery / f"{rest.batch_id}{FAILED_SUFFIX}"
    atomic_write(
        target,
        failed_document(data, error=error, now_ms=now, next_retry_ms=now, delivery=delivery),
    )
    log.warning("batch %s: %d entries parked in recovery/", rest.batch_id, rest.count)
