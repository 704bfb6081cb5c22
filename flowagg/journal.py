"""Write-ahead journal: every accepted entry is fsync'd here before it is acknowledged.

The format is in `journal_format`, the start-up scan and the reader in `journal_reader`, the
group-committing writer in `journal_writer`; this module is their public face.

Batches are published strictly in journal order, so a done record is a cursor. Only the
batches published after the last durable done record need a look on disk at start (their
names follow from the journal, see storage.make_batch_id).
"""

from __future__ import annotations

from .journal_format import (
    FORMAT_VERSION,
    MAX_RECORD_BYTES,
    MAX_RECORD_ENTRIES,
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
from .journal_reader import JournalRecord, ScanResult, read_records, scan
from .journal_writer import Append, JournalWriter

__all__ = [
    "FORMAT_VERSION",
    "MAX_RECORD_BYTES",
    "MAX_RECORD_ENTRIES",
    "Append",
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
    "segment_name",
    "segment_number",
    "split_add",
    "unframe",
]
