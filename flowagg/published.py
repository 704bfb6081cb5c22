"""At start: batches stored after the last durable done record need no second write."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from .aggregator import Aggregator
from .clock import Clock
from .formats import NewerFormatError
from .fsutil import quarantine_file
from .journal import Position, read_records
from .layout import Layout
from .storage import CorruptBatch, find_batch, make_batch_id, read_batch

log = logging.getLogger("flowagg.pipeline")


def skip_published(
    layout: Layout,
    clock: Clock,
    aggregator: Aggregator,
    start: Position,
    append_done: Callable[[int, str], None],
) -> tuple[int, int]:
    """Find batches stored after the last durable done record; their entries are done.

    Batch ids follow from the journal (first entry's arrival ms and seq), so each check is
    one lookup by name. A stored batch found here is trusted only if its entryIds are
    exactly the next entries of the journal. Returns (batches found, last seq they hold).
    """
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
            for i, entry in enumerate(record.entries):
                seq = record.first_seq + i
                if seq > aggregator.last_seq_loaded:
                    pending.append((seq, record.t_ms, entry["entryId"]))

    while True:
        fill(1)
        if not pending:
            break
        seq, t, _ = pending[0]
        batch_id = make_batch_id(t, seq)
        path = find_batch(layout, batch_id)
        if path is None:
            break
        try:
            ids = [e["entryId"] for e in read_batch(path)["entries"]]
        except NewerFormatError as exc:
            # Writing the batch again would replace the newer flowagg's file.
            raise NewerFormatError(f"aggregated/{exc}") from None
        except (CorruptBatch, OSError, KeyError, TypeError) as exc:
            quarantine_file(
                layout.errors,
                path,
                reason=f"stored batch unreadable ({exc}); rebuilt from the journal",
                component="startup",
                now_ms=clock.now_ms(),
            )
            break
        fill(len(ids))
        journal_ids = [pending[i][2] for i in range(min(len(ids), len(pending)))]
        if journal_ids != ids:
            log.error(
                "stored batch %s does not match the journal; leaving it and rebuilding",
                batch_id,
            )
            quarantine_file(
                layout.errors,
                path,
                reason="stored batch does not match the journal entries it is named after",
                component="startup",
                now_ms=clock.now_ms(),
            )
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
