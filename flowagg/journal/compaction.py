"""Which closed journal segments compaction may delete, and what must outlive them.

A segment may go once its entries and cuts are all stored and older than the dedupe
window. It may also hold the only record of how far a spool file still in journal/spool/
was journaled, or that it is finished: such progress must be copied to the live segment
first. Apart from the writer, which owns the segments and the queue the copies go to: this
decides from what the segments record and what journal/spool/ holds, and deletes.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

from flowagg.core.fsutil import fsync_dir
from flowagg.journal.format import SegmentInfo, SpoolProgress, covers, merge_sources, summary_path

log = logging.getLogger("flowagg.journal")


def expired_segments(
    candidates: list[SegmentInfo], done_seq: int, horizon_ms: int
) -> list[SegmentInfo]:
    """The oldest of `candidates` whose entries are all stored and older than `horizon_ms`."""
    return list(
        itertools.takewhile(
            # A segment's cut records name batches as much as its entries do.
            lambda seg: max(seg.last_seq, seg.cut_seq) <= done_seq and seg.max_t < horizon_ms,
            candidates,
        )
    )


def progress_to_carry(
    spool: Path, expired: list[SegmentInfo], kept: SpoolProgress
) -> SpoolProgress:
    """The progress only `expired` record, of files still adopted in `spool`."""
    needed = merge_sources(*(seg.sources for seg in expired))
    adopted = _adopted(spool, set(needed))
    return {
        name: progress
        for name, progress in needed.items()
        if name in adopted and not covers(kept.get(name), progress)
    }


def deletable(expired: list[SegmentInfo], carried: SpoolProgress) -> int:
    """How many of `expired` (oldest first) can go without losing a spool file's progress.

    A segment with progress being carried stays until a later pass, once the copy is
    durable, so no kill or power cut finds neither.
    """
    if not carried:
        return len(expired)
    return next(n for n, seg in enumerate(expired) if not carried.keys().isdisjoint(seg.sources))


def delete_segments(segments: list[SegmentInfo]) -> list[Path]:
    removed = []
    for seg in segments:
        # The summary first: a segment left without one is only parsed at the next start.
        summary_path(seg.path).unlink(missing_ok=True)
        seg.path.unlink(missing_ok=True)
        removed.append(seg.path)
    return removed


def _adopted(folder: Path, names: set[str]) -> set[str]:
    """Which of `names` are still in journal/spool/; all of them when that is unknown.

    The intake deletes a file once the journal says it is finished; that unlink is made
    durable here before its records may go, or a power cut could bring the file back
    with nothing to say it was ingested.
    """
    if not names:
        return set()
    try:
        present = set(os.listdir(folder))
        if not names <= present:
            fsync_dir(folder)
    except FileNotFoundError:
        return set()  # no folder, no file a start could resume
    except OSError as exc:
        log.error(
            "journal compaction cannot read %s (%s); the progress of every spool file the"
            " journal names is kept until it can",
            folder,
            exc,
        )
        return names
    return names & present
