"""Batch files: encoding, atomic publication and lookup by batch id (SPEC §5).

A batch id is `<arrival ms of its first entry>_<journal seq of its first entry>`. It is fixed
by the journal, not by the moment of writing, so re-creating a batch after a crash yields the
same id and name: a batch id names one set of entries wherever it lies, and finding it on
disk is the proof that those entries are stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import orjson

from flowagg import BATCH_FORMAT_VERSION
from flowagg.core import formats
from flowagg.core.compression import SUFFIXES, compress, decompress
from flowagg.core.fsutil import atomic_write
from flowagg.core.layout import Layout
from flowagg.core.readsafe import NotRegular, open_regular

TRIGGERS = ("size", "age", "threshold", "manual", "shutdown")


def make_batch_id(first_arrival_ms: int, first_seq: int) -> str:
    return f"{first_arrival_ms:013d}_{first_seq:012d}"


def batch_file_name(batch_id: str, compression: str = "none") -> str:
    return f"batch_{batch_id}{SUFFIXES[compression]}"


@dataclasses.dataclass
class Batch:
    batch_id: str
    trigger: str
    entries: list[bytes]  # each entry as compact JSON, in arrival order
    first_seq: int
    last_seq: int
    entry_ids: list[str]
    # The batch's `timestamp`, fixed with its cut so that every copy has the same bytes
    # (None: taken when it is encoded, for batches made outside the pipeline).
    timestamp_ms: int | None = None
    # Rebuilt at start from a journaled cut: the cut is durable already.
    replayed: bool = False
    # It may already be stored (a journaled cut, or a cut a damaged journal lost): look first.
    look_first: bool = False

    @property
    def count(self) -> int:
        return len(self.entries)

    def encode(self, now_ms: int) -> bytes:
        stamp = self.timestamp_ms if self.timestamp_ms is not None else now_ms
        return encode_batch(self, timestamp_ms=stamp)


def entries_array(entries: list[bytes]) -> bytes:
    return b"[" + b",".join(entries) + b"]"


def encode_batch(batch: Batch, *, timestamp_ms: int, recovered: bool = False) -> bytes:
    array = entries_array(batch.entries)
    head = orjson.dumps(
        {
            "batchId": batch.batch_id,
            "timestamp": timestamp_ms,
            "version": BATCH_FORMAT_VERSION,
            "trigger": batch.trigger,
        }
    )
    tail = orjson.dumps(
        {
            "entryCount": len(batch.entries),
            "entriesSha256": hashlib.sha256(array).hexdigest(),
            "recovered": recovered,
        }
    )
    # One join: chained `+` copied the entries array (most of the file) three more times.
    return b"".join((head[:-1], b',"entries":', array, b",", tail[1:]))


class CorruptBatch(ValueError):
    pass


def decode_batch(data: bytes, path: Path | str = "batch") -> dict[str, Any]:
    """Parse a batch file and check its version, shape, count and checksum.

    The version comes first: a newer flowagg's file may have another shape, and must be
    refused (formats.NewerFormatError), not taken for corrupt.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptBatch(f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CorruptBatch("not a JSON object")
    try:
        formats.check(doc.get("version"), formats.BATCH_MAJOR, path)
    except formats.BadVersionError as exc:
        raise CorruptBatch(str(exc)) from None
    for key in ("batchId", "entries", "entryCount", "entriesSha256"):
        if key not in doc:
            raise CorruptBatch(f"missing {key}")
    entries = doc["entries"]
    if not isinstance(entries, list):
        raise CorruptBatch("entries is not an array")
    if doc["entryCount"] != len(entries):
        raise CorruptBatch(f"entryCount {doc['entryCount']} but {len(entries)} entries")
    digest = hashlib.sha256(orjson.dumps(entries)).hexdigest()
    if digest != doc["entriesSha256"]:
        raise CorruptBatch("entriesSha256 does not match the entries")
    return doc


def read_regular(path: Path) -> bytes:
    """The bytes of the regular file at `path`; anything else (a link, a FIFO) is a CorruptBatch.

    A link is not followed and a FIFO not opened for a blocking read: what lies behind a name
    flowagg did not write must neither hang a start or the recovery loop nor count as stored.
    """
    try:
        file = open_regular(path)
    except NotRegular as exc:
        link = exc.kind == "a symbolic link"
        raise CorruptBatch(
            "a symbolic link, not a batch file" if link else "not a regular file"
        ) from None
    with file:
        return file.read()


def read_batch(path: Path) -> dict[str, Any]:
    raw = read_regular(path)
    try:
        data = decompress(path.name, raw)
    except ValueError as exc:
        raise CorruptBatch(str(exc)) from None
    return decode_batch(data, path)


@dataclasses.dataclass(frozen=True)
class CompletedFiles:
    """Where and how completed batches are written: aggregated/, compressed as configured."""

    layout: Layout
    compression: str = "none"

    def path(self, batch_id: str) -> Path:
        return self.layout.aggregated / batch_file_name(batch_id, self.compression)

    def file_bytes(self, data: bytes) -> bytes:
        return compress(self.compression, data)

    def write(self, batch_id: str, data: bytes) -> Path:
        target = self.path(batch_id)
        atomic_write(target, self.file_bytes(data))
        return target


def find_completed(layout: Layout, batch_id: str) -> Path | None:
    """The batch's file in aggregated/, whatever its compression.

    Names are joined as text, and a Path made only for a hit: a start checks thousands of
    ids beyond a missing batch (published.py), and Path objects cost four times the stats.
    """
    stem = os.path.join(layout.aggregated, f"batch_{batch_id}")
    for suffix in SUFFIXES.values():
        if os.path.exists(stem + suffix):
            return Path(stem + suffix)
    return None


def common_prefix(a: list[str], b: list[str]) -> int:
    """How many entryIds two batches share from their first on."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclasses.dataclass(frozen=True)
class BatchNames:
    """The folders a batch may lie in, as text: the flusher looks up every fresh batch's
    names, and Path objects cost more than the five lstats (find_completed)."""

    aggregated: str
    recovery: str
    abandoned: str

    @classmethod
    def of(cls, layout: Layout) -> BatchNames:
        return cls(str(layout.aggregated), str(layout.recovery), str(layout.abandoned))

    def names(self, batch_id: str) -> list[str]:
        """Every place a batch with this id may lie once stored: aggregated/'s names first."""
        stem = f"{self.aggregated}/batch_{batch_id}"
        return [
            *(stem + suffix for suffix in SUFFIXES.values()),
            f"{self.recovery}/{batch_id}.failed.json",
            f"{self.abandoned}/{batch_id}.abandoned.json",
        ]

    def completed(self, batch_id: str) -> bool:
        """Whether aggregated/ holds a name for this id (odd files too)."""
        return any(map(os.path.lexists, self.names(batch_id)[: len(SUFFIXES)]))

    def taken(self, batch_id: str) -> bool:
        """Whether any place a batch with this id may lie holds a name (odd files too)."""
        return any(map(os.path.lexists, self.names(batch_id)))


def batch_locations(layout: Layout, batch_id: str) -> list[Path]:
    """Every place a batch with this id may lie once stored."""
    return [Path(name) for name in BatchNames.of(layout).names(batch_id)]


def find_batch(layout: Layout, batch_id: str) -> Path | None:
    for path in batch_locations(layout, batch_id):
        if path.exists():
            return path
    return None


def existing_locations(layout: Layout, batch_id: str) -> list[Path]:
    """Every name this batch id has on disk, links and other odd files included."""
    return [path for path in batch_locations(layout, batch_id) if os.path.lexists(path)]


def iter_batch_files(layout: Layout) -> list[Path]:
    """All stored batch files, in name order within each folder."""
    files: list[Path] = []
    for directory, patterns in (
        (layout.aggregated, [f"batch_*{suffix}" for suffix in SUFFIXES.values()]),
        (layout.recovery, ["*.failed.json"]),
        (layout.abandoned, ["*.abandoned.json"]),
    ):
        files.extend(sorted(p for pattern in patterns for p in directory.glob(pattern)))
    return files
