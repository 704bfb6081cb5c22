"""`flowagg export`: stored entries in timestamp order as JSON lines, CSV or Parquet.

Batch ids sort by arrival, but timestamps are the clients' and interleave across batches, so
the order comes from an external merge sort: runs of `exportRunEntries` entries are sorted in
memory and spilled to temp files, then merged (`heapq.merge`); memory stays bounded whatever
the size of the data. Ties keep the stored order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from flowagg.core.errors import EXIT_USAGE, FlowaggError
from flowagg.core.fsutil import FILE_MODE, TEMP_MARK, fsync_dir
from flowagg.read.csv_export import KEY_BYTES, MetadataColumns
from flowagg.read.selection import Batch, Selection, Skipped, read_batch

FORMATS = ("jsonl", "csv", "parquet")
PARQUET_ROWS = 65_536
WRITE_BLOCK_LINES = 4096


# Each entry is kept as one line whose fixed-width prefix sorts as (timestamp, stored order):
# runs then sort and merge as plain bytes, compared in C, and merge straight from the files.
# Stored order is (batch number, place in the batch), so a worker that reads some batches
# makes their lines without knowing how many entries the batches before them hold.
_TS_OFFSET = 1 << 63  # timestamps below zero still sort first
_KEY = b"%016x%012x%08x"  # KEY_BYTES long
_MAX_TS = (1 << 63) - 1


@dataclasses.dataclass
class Lines:
    """Some batches' entries as sortable lines, sorted, and what was left out of them."""

    # The lines joined (each ends with a newline): one bytes object pickles as one copy, where
    # a list of lines pickled and unpickled object by object in the parent (a seventh of its
    # samples under py-spy). A line holds no other newline: JSON escapes it in strings.
    block: bytes
    skipped: int  # entries without an integer timestamp: they cannot be placed
    metadata: MetadataColumns | None

    def lines(self) -> list[bytes]:
        return self.block.splitlines(keepends=True)


def lines_of_batches(
    params: tuple[Selection, int, bool], batches: Sequence[Batch]
) -> tuple[Lines, Skipped]:
    """One worker's share of an export (`map_batches`); with `csv`, metadata columns counted."""
    selection, limit, csv = params
    match = selection.matcher()
    skipped = Skipped()
    columns = MetadataColumns() if csv else None
    lines: list[bytes] = []
    left_out = 0
    dumps = orjson.dumps
    for number, group in batches:
        entries = read_batch(group, match, limit, skipped)
        for place, entry in enumerate(entries or ()):
            ts = entry.get("timestamp")
            if type(ts) is not int or not -_TS_OFFSET <= ts <= _MAX_TS:
                left_out += 1
                continue
            if columns is not None:
                metadata = entry.get("metadata")
                if isinstance(metadata, dict):
                    columns.add(metadata)
            # The concatenation is also an exact-size copy: orjson's own buffer keeps
            # kilobytes of slack per object.
            lines.append(_KEY % (ts + _TS_OFFSET, number, place) + dumps(entry) + b"\n")
    # Sorted here, in parallel: the parent's sort of a run then merges sorted shares, the
    # most of its work that a worker can take (its run.sort was 13% of export's samples).
    lines.sort()
    return Lines(b"".join(lines), left_out, columns), skipped


class Sorter:
    """Entry lines in, entry JSON out in (timestamp, stored order); spills sorted runs to disk."""

    def __init__(self, run_entries: int, tmp_dir: Path) -> None:
        self.run_entries = run_entries
        self.tmp_dir = tmp_dir
        self.run: list[bytes] = []
        self.runs: list[Path] = []
        self.count = 0
        self.skipped = 0  # entries without an integer timestamp: they cannot be placed
        self.metadata: MetadataColumns | None = None  # counted when the output is CSV

    def add(self, share: Lines) -> None:
        """Some batches' lines, given in stored order."""
        self.skipped += share.skipped
        if self.metadata is not None and share.metadata is not None:
            self.metadata.merge(share.metadata)
        run = self.run
        room = self.run_entries - len(run)
        lines = share.lines()
        self.count += len(lines)
        while len(lines) >= room:
            run.extend(lines[:room])
            lines = lines[room:]
            self._spill()
            room = self.run_entries
        run.extend(lines)

    def _spill(self) -> None:
        self.run.sort()
        path = self.tmp_dir / f"run-{len(self.runs):06d}"
        run = self.run
        with path.open("wb") as fh:
            # Joined in blocks, as write_jsonl does: never a second copy of the whole run.
            for start in range(0, len(run), WRITE_BLOCK_LINES):
                fh.write(b"".join(run[start : start + WRITE_BLOCK_LINES]))
        self.runs.append(path)
        self.run.clear()

    def sorted(self) -> Iterator[bytes]:
        """Entry JSON lines (newline-terminated), in order."""
        for line in self.keyed():
            yield line[KEY_BYTES:]

    def keyed(self) -> Iterator[bytes]:
        """The lines in order, each still behind its sort key."""
        if not self.runs:
            self.run.sort()
            yield from self.run
            return
        if self.run:
            self._spill()
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(p.open("rb")) for p in self.runs]
            yield from heapq.merge(*files)

    def blocks(self) -> Iterator[bytes]:
        """The keyed lines in order, joined in blocks of WRITE_BLOCK_LINES."""
        lines = self.keyed()
        while block := b"".join(itertools.islice(lines, WRITE_BLOCK_LINES)):
            yield block


def write_jsonl(rows: Iterator[bytes], out: IO[bytes]) -> None:
    # Joined in blocks: a buffered write per line costs more than its copy into a block.
    while block := b"".join(itertools.islice(rows, WRITE_BLOCK_LINES)):
        out.write(block)


def write_parquet(rows: Iterator[bytes], out: IO[bytes]) -> None:
    """Fixed columns (the known metadata keys typed, the whole metadata as JSON text): one
    schema for every file, whatever metadata holds."""
    pa, pq = parquet_modules()
    schema = pa.schema(
        [
            ("entryId", pa.string()),
            ("userId", pa.string()),
            ("action", pa.string()),
            ("timestamp", pa.timestamp("ms", tz="UTC")),
            ("sessionId", pa.string()),
            ("taskId", pa.string()),
            ("duration", pa.int64()),
            ("metadata", pa.string()),
        ]
    )
    names = schema.names
    with pq.ParquetWriter(out, schema) as writer:
        columns: dict[str, list[Any]] = {n: [] for n in names}
        for data in rows:
            entry = orjson.loads(data)
            metadata = entry.get("metadata")
            metadata = metadata if isinstance(metadata, dict) else {}
            columns["entryId"].append(entry.get("entryId"))
            columns["userId"].append(entry.get("userId"))
            columns["action"].append(entry.get("action"))
            columns["timestamp"].append(entry["timestamp"])
            columns["sessionId"].append(_typed(metadata.get("sessionId"), str))
            columns["taskId"].append(_typed(metadata.get("taskId"), str))
            columns["duration"].append(_typed(metadata.get("duration"), int))
            columns["metadata"].append(orjson.dumps(metadata).decode())
            if len(columns["entryId"]) >= PARQUET_ROWS:
                writer.write_table(pa.table(columns, schema=schema))
                columns = {n: [] for n in names}
        if columns["entryId"]:
            writer.write_table(pa.table(columns, schema=schema))


def _typed(value: Any, kind: type) -> Any:
    return value if type(value) is kind else None


def parquet_modules() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise FlowaggError(
            "--format parquet needs pyarrow; install the parquet extra:"
            " pip install 'flowagg[parquet]'",
            EXIT_USAGE,
        ) from None
    return pa, pq


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[IO[bytes]]:
    """A file that appears at `path` whole, once everything is written, or not at all."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TEMP_MARK}{path.name}.", dir=directory)
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), FILE_MODE)
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(directory)
