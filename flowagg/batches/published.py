"""At start: batches stored without a journaled cut.

Version 1 journals hold no cut records, so where such a batch ended is guessed from the
files found. In journals of version 2 every batch's cut is on record before the batch leaves
the daemon, and a start rebuilds exactly those (aggregator.replay); a batch stored beyond
them means a damaged tail took its cut, its done record and perhaps entries that only the
batch still holds. Every start looks (one name per suffix when nothing is there): the start
that set the damage aside may end before its findings are journaled, and a later one must
decide the same, or it would cut the survivors anew under the stored batch's id.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path

from flowagg.batches.aggregator import Aggregator
from flowagg.batches.storage import (
    CorruptBatch,
    common_prefix,
    existing_locations,
    find_completed,
    make_batch_id,
    read_batch,
)
from flowagg.core.clock import Clock
from flowagg.core.config_schema import SETTINGS
from flowagg.core.formats import NewerFormatError
from flowagg.core.fsutil import quarantine_file
from flowagg.core.layout import Layout
from flowagg.journal.public import Position, ScanResult, read_records

log = logging.getLogger("flowagg.pipeline")


def skip_uncut(
    layout: Layout,
    clock: Clock,
    aggregator: Aggregator,
    scan: ScanResult,
    append_done: Callable[[int, str], None],
) -> tuple[int, int]:
    """`skip_published` over the backlog before the first journaled cut, if any."""
    until = scan.cuts[0].first_seq - 1 if scan.cuts else scan.next_seq - 1
    if scan.backlog is None or until <= scan.done_seq:
        return 0, scan.done_seq
    return skip_published(
        layout,
        clock,
        aggregator,
        scan.backlog,
        append_done,
        until_seq=until,
        guess_until=min(until, scan.uncut_until),
    )


def skip_published(
    layout: Layout,
    clock: Clock,
    aggregator: Aggregator,
    start: Position,
    append_done: Callable[[int, str], None],
    *,
    until_seq: int,
    guess_until: int | None = None,
) -> tuple[int, int]:
    """Find batches stored after the last durable done record; their entries are done.

    Batch ids follow from the journal (first entry's arrival ms and seq), so each check is
    one lookup by name. A stored batch found here is trusted only if its entryIds begin with
    the next entries of the journal, and any others are ones the journal lost. Only entries
    up to `until_seq` (those no cut covers) are looked at. Up to `guess_until` (journaled
    without cuts) a bad or missing batch also sets aside the stored ones after it; beyond,
    the flusher deals with it when it cuts the batch (None: `until_seq`). Returns
    (batches found, last seq they hold).
    """
    if guess_until is None:
        guess_until = until_seq
    skipped = 0
    done_seq = 0
    pending: deque[tuple[int, int, str]] = deque()  # seq, t, entryId
    records = read_records(layout.journal, start, None)
    exhausted = False

    def fill(n: int) -> None:
        nonlocal exhausted
        while len(pending) < n and not exhausted:
            record = next(records, None)
            if record is None:
                exhausted = True
                return
            if record.first_seq > until_seq:
                exhausted = True
                return
            for i, entry in enumerate(record.entries):
                seq = record.first_seq + i
                if aggregator.last_seq_loaded < seq <= until_seq:
                    pending.append((seq, record.t_ms, entry["entryId"]))

    while True:
        fill(1)
        if not pending:
            break
        seq, t, _ = pending[0]
        batch_id = make_batch_id(t, seq)
        # Every copy, not just the first: a bad file under one suffix must not hide the good
        # one under another, or the batch would be written again beside it.
        ids = None
        bad: list[tuple[Path, str]] = []
        for path in existing_locations(layout, batch_id):
            ids, reason = _matching_ids(path, pending, fill)
            if ids is not None:
                break
            bad.append((path, reason))
        if ids is None and seq > guess_until:
            break  # the flusher looks again before it writes, and moves a bad copy aside
        if ids is None and bad:
            # The batches behind go first (this consumes `pending`): killed half way, the bad
            # one is still found at the next start.
            _set_aside_later_batches(layout, clock, pending, fill, "an unreadable batch")
        elif ids is None and _stored_beyond_gap(layout, pending, fill, aggregator):
            _set_aside_later_batches(layout, clock, pending, fill, "a missing batch")
        for path, reason in bad:
            quarantine_file(
                layout.errors, path, reason=reason, component="startup", now_ms=clock.now_ms()
            )
        if ids is None:
            break
        done_seq = pending[len(ids) - 1][0]
        for _ in ids:
            pending.popleft()
        aggregator.last_seq_loaded = done_seq
        aggregator.found_stored(len(ids))
        append_done(done_seq, batch_id)
        skipped += 1
        log.info("batch %s was stored before the last stop; not writing it again", batch_id)
    return skipped, done_seq


def _matching_ids(
    path: Path, pending: deque[tuple[int, int, str]], fill: Callable[[int], None]
) -> tuple[list[str] | None, str]:
    """The entryIds of the batch file at `path` when they are the journal's next ones, or
    None and why the file cannot be trusted."""
    try:
        ids = [e["entryId"] for e in read_batch(path)["entries"]]
    except NewerFormatError as exc:
        # Writing the batch again would replace the newer flowagg's file.
        raise NewerFormatError(f"{path.parent.name}/{exc}") from None
    except (CorruptBatch, OSError, KeyError, TypeError) as exc:
        return None, f"stored batch unreadable ({exc}); rebuilt from the journal"
    fill(len(ids))
    journal_ids = [pending[i][2] for i in range(min(len(ids), len(pending)))]
    # An empty one would mark nothing stored yet seem to: flowagg never writes one.
    if ids and journal_ids == ids:
        return ids, ""
    held = common_prefix(ids, journal_ids)
    if held and set(ids[held:]).isdisjoint(journal_ids[held:]):
        # The rest are entries a damaged tail took from the journal: this file is their only
        # copy, so it stays, and the journal's entries it holds are done.
        log.warning(
            "stored batch %s holds %d entries the journal lost; kept as it is",
            path.name,
            len(ids) - held,
        )
        return ids[:held], ""
    log.error("stored batch %s does not match the journal; leaving it", path.name)
    return None, "stored batch does not match the journal entries it is named after"


def _stored_beyond_gap(
    layout: Layout,
    pending: deque[tuple[int, int, str]],
    fill: Callable[[int], None],
    aggregator: Aggregator,
) -> bool:
    """Whether a batch is stored after the missing next one: a hole in what was published.

    Runs publish several names with one directory fsync (batch_runs). Journaling file
    systems (ext4, xfs, btrfs) keep renames in order through a power cut, so the stored
    batches are a prefix; one that does not could keep a later name and lose an earlier one.
    Only a run's batches can be in that state, and a run is cut from the memory window, so
    the look goes that far ahead (every suffix, one stat each).
    """
    ahead = max(aggregator.policy.memory_window, SETTINGS["memoryWindowEntries"].default)
    fill(ahead + 1)
    for i in range(1, min(ahead, len(pending) - 1) + 1):
        seq, t, _ = pending[i]
        if find_completed(layout, make_batch_id(t, seq)) is not None:
            log.error(
                "a batch is stored after the missing batch %s; both are rebuilt",
                make_batch_id(pending[0][1], pending[0][0]),
            )
            return True
    return False


def _set_aside_later_batches(
    layout: Layout,
    clock: Clock,
    pending: deque[tuple[int, int, str]],
    fill: Callable[[int], None],
    after: str,
) -> None:
    """After an unreadable or missing batch, quarantine the stored batches that follow it in
    the journal.

    Where the bad one ended is unknown, so its entries are rebuilt from the journal together
    with everything after it, in new cuts: a later batch left in place would hold some of
    them a second time. Rare (a file flowagg wrote whole was damaged, or a file system lost
    an earlier rename and kept a later one), hence the scan.
    """
    pending.popleft()  # the bad batch itself: its copies are the caller's
    while True:
        fill(1)
        if not pending:
            return
        seq, t, _ = pending.popleft()
        for path in existing_locations(layout, make_batch_id(t, seq)):
            log.error("batch %s follows %s; rebuilding it", path.name, after)
            quarantine_file(
                layout.errors,
                path,
                reason=f"stored after {after}, whose entries are rebuilt from the journal:"
                " rebuilt with them",
                component="startup",
                now_ms=clock.now_ms(),
            )
