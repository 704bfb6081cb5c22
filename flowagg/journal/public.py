"""Write-ahead journal: every accepted entry is fsync'd here before it is acknowledged.

The format is in `journal_format`, the start-up scan and the reader in `journal_reader`, the
group-committing writer in `journal_writer`; this module is their public face.

Batches are published strictly in journal order, so a done record is a cursor. Every batch's
cut is journaled before it leaves the daemon, so a start rebuilds the cuts after the last
durable done record exactly and looks on disk only for those.
"""

from __future__ import annotations

from flowagg.core.config import Config
from flowagg.core.layout import Layout
from flowagg.journal.dedupe import DedupeIndex
from flowagg.journal.format import (
    FORMAT_VERSION,
    MAX_RECORD_BYTES,
    MAX_RECORD_ENTRIES,
    Cut,
    JournalVersionError,
    Position,
    SegmentInfo,
    encode_add,
    frame,
    list_segments,
    segment_name,
    segment_number,
    split_add,
    unframe,
)
from flowagg.journal.reader import JournalRecord, ScanResult, read_records, scan
from flowagg.journal.writer import Append, JournalWriter


def scan_root(layout: Layout, config: Config, *, now_ms: int) -> ScanResult:
    """`scan` of a data root's journal, with its dedupe index opened as the config says."""
    dedupe = DedupeIndex(
        layout.journal / "dedupe",
        window_ms=config.dedupe_window_ms,
        max_ids=config.dedupe_max_ids,
    )
    result = scan(layout.journal, layout.errors, now_ms=now_ms, dedupe=dedupe)
    dedupe.end_replay()
    return result


__all__ = [
    "FORMAT_VERSION",
    "MAX_RECORD_BYTES",
    "MAX_RECORD_ENTRIES",
    "Append",
    "Cut",
    "JournalRecord",
    "JournalVersionError",
    "JournalWriter",
    "Position",
    "ScanResult",
    "SegmentInfo",
    "encode_add",
    "frame",
    "list_segments",
    "read_records",
    "scan",
    "scan_root",
    "segment_name",
    "segment_number",
    "split_add",
    "unframe",
]
