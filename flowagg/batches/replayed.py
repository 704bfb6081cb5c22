"""At start: is a batch rebuilt from its journaled cut stored already?

A cut is journaled before its batch is delivered or written, so after a crash the batch may
lie on disk under its id (written, not yet marked done), or not (a hole: never written, or a
rename a power cut took). Found whole, it counts as stored; a copy that is damaged or holds
other entries is moved to errors/ and the batch written again under its own id, from its own
cut, with the same bytes. Batches after a hole stay where they are.

The flusher also comes here for a fresh cut whose id is already on disk: a damaged journal
tail lost the cut that named it. A batch file is never replaced by other entries: a copy
that begins with the batch's entries keeps them (and those the journal lost), and the
batch's entries it lacks are stored under the id the first of them gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

from flowagg.batches.storage import (
    Batch,
    CorruptBatch,
    common_prefix,
    existing_locations,
    make_batch_id,
    read_batch,
)
from flowagg.core.clock import Clock
from flowagg.core.formats import NewerFormatError
from flowagg.core.fsutil import fsync_dir, quarantine_file
from flowagg.core.layout import Layout

log = logging.getLogger("flowagg.flusher")


def sync_folders(layout: Layout) -> None:
    """Make the previous run's renames durable before anything relies on them.

    A kill between a rename and its directory fsync leaves a name that a power cut may still
    take; the done records, journal progress and deletions this run writes about such a file
    must not outlive it. So this runs at start, before anything is journaled.
    """
    for directory in (
        layout.aggregated,
        layout.recovery,
        layout.abandoned,
        layout.errors,
        layout.inbox,
        layout.journal_spool,
    ):
        fsync_dir(directory)


Found = tuple[Path, Batch | None]  # where the batch lies, and its entries the copy lacks


def find_stored(layout: Layout, clock: Clock, batch: Batch) -> Found | None:
    """Where the batch is stored, or None after moving every bad copy aside."""
    while True:
        # A copy moved meanwhile (the recovery loop completed or abandoned a failed one) went
        # to a place perhaps looked at already: look everywhere again.
        with contextlib.suppress(FileNotFoundError):
            return _find_stored(layout, clock, batch)


def _find_stored(layout: Layout, clock: Clock, batch: Batch) -> Found | None:
    for path in existing_locations(layout, batch.batch_id):
        try:
            ids = [entry["entryId"] for entry in read_batch(path)["entries"]]
        except NewerFormatError:
            # A newer flowagg stored this batch: writing it again would replace its file.
            log.warning("batch %s: %s is of a newer format; taken as stored", batch.batch_id, path)
            return path, None
        except FileNotFoundError:
            raise
        except (CorruptBatch, OSError, KeyError, TypeError) as exc:
            reason = f"stored batch unreadable ({exc}); written again from its journaled cut"
        else:
            if ids == batch.entry_ids or _holds_lost_entries(batch, ids):
                log.info("batch %s was stored before the last stop", batch.batch_id)
                return path, None
            held = common_prefix(ids, batch.entry_ids)
            if held:
                # Cut before a damaged journal tail took the cut record: entries only this
                # copy holds may be among the rest, so it stays as it is.
                log.error(
                    "batch %s: %s holds %d of its %d entries and %d others; kept",
                    batch.batch_id,
                    path.name,
                    held,
                    batch.count,
                    len(ids) - held,
                )
                return path, _rest(batch, held, set(ids))
            reason = "stored batch does not hold the entries its journaled cut names"
        log.error("batch %s: %s: %s", batch.batch_id, path.name, reason)
        try:
            quarantine_file(
                layout.errors, path, reason=reason, component="startup", now_ms=clock.now_ms()
            )
        except OSError as exc:
            # Left in place: the copy in aggregated/ is replaced by the new write; recovery
            # quarantines a bad failed file itself when it reads it.
            log.error("batch %s: cannot move %s aside (%s)", batch.batch_id, path.name, exc)
    return None


def _holds_lost_entries(batch: Batch, ids: list[str]) -> bool:
    """Whether a stored copy holds every entry of the batch's cut where the journal lost some
    (a damaged record): those are in no other place, so the copy is kept as it is."""
    if batch.count == batch.last_seq - batch.first_seq + 1 or len(ids) != (
        batch.last_seq - batch.first_seq + 1
    ):
        return False
    stored = iter(ids)
    return all(entry_id in stored for entry_id in batch.entry_ids)  # in order


def _rest(batch: Batch, held: int, stored: set[str]) -> Batch | None:
    """The batch's entries after the first `held` that are not `stored`, as a batch of
    their own, or None.

    Its id is the batch's arrival ms with the seq `held` past the batch's first: the same at
    every start (a crash before the batch's done record comes here again and finds it), and
    inside the batch's journaled span, which no other cut may start in.
    """
    kept = [n for n in range(held, batch.count) if batch.entry_ids[n] not in stored]
    if not kept:
        return None
    first_ms = int(batch.batch_id.split("_", 1)[0])
    return dataclasses.replace(
        batch,
        batch_id=make_batch_id(first_ms, batch.first_seq + held),
        entries=[batch.entries[n] for n in kept],
        first_seq=batch.first_seq + held,
        entry_ids=[batch.entry_ids[n] for n in kept],
        look_first=True,
    )
