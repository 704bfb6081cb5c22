"""The journal's on-disk format: segment names, framing, records, segment summaries.

Segments `journal/seg-<n>.log` hold one record per line: `<crc32 hex> <compact JSON>\\n`.
Records:
  {"k":"h","v":V,"seq":S}                    segment header (format V); S = next unused seq
  {"k":"a","q":Q,"t":MS,"e":[...],"c":[...],"src":NAME,"off":O,"fin":true}
                                             accepted entries, seqs Q, Q+1, ...; `c` lists the
                                             indexes whose entryId came from the client (for
                                             dedupe); `src` names an adopted spool file, `off`
                                             the byte where this chunk of it ends and `fin`
                                             marks its last chunk (`src` alone: finished); with
                                             no entries it may also be compaction's copy of
                                             that progress (see JournalWriter.compact)
  {"k":"c","b":ID,"f":F,"l":L,"g":TRIGGER,"ts":MS}
                                             the cut: batch ID holds the entries with seqs F..L,
                                             was cut by TRIGGER and says `timestamp` MS; durable
                                             before the batch is delivered or written, so a
                                             restart rebuilds it with the same id and bytes
  {"k":"d","q":Q,"b":ID}                     batch ID holding every entry up to seq Q is stored

Version 2 added cut records. Segments of version 1 hold none: a batch stored from them may
have been cut anywhere, so a start looks for it by name (published.py), as version 1 did.

A segment closed at rollover gets a summary beside it, `seg-<n>.sum` (one JSON object, written
atomically after the segment's fsync) so a start need not parse it: see `Summary`.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Any

import orjson

from flowagg.core.fsutil import atomic_write

FORMAT_VERSION = 2
# The first version that journals every cut before its batch leaves the daemon.
CUTS_VERSION = 2
# One add record stays small: the reader loads records whole, never parses one twice, and a
# record larger than the memory window is only loaded into an empty window.
MAX_RECORD_ENTRIES = 1000
MAX_RECORD_BYTES = 1 << 20
SEGMENT_PREFIX = "seg-"
SEGMENT_SUFFIX = ".log"


def segment_name(number: int) -> str:
    return f"{SEGMENT_PREFIX}{number:08d}{SEGMENT_SUFFIX}"


def segment_number(path: Path) -> int:
    return int(path.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)])


def list_segments(directory: Path) -> list[Path]:
    paths = [
        p
        for p in directory.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}")
        if p.name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)].isdigit()
    ]
    return sorted(paths, key=segment_number)


def frame(payload: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def unframe(line: bytes) -> dict[str, Any] | None:
    """Return the record in a line, or None when the line is torn or corrupt."""
    if len(line) < 11 or line[-1:] != b"\n" or line[8:9] != b" ":
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        record = orjson.loads(payload)
    except ValueError:
        return None
    if not isinstance(record, dict) or "k" not in record:
        return None
    return record


def encode_add(
    first_seq: int,
    t_ms: int,
    entries: list[bytes],
    client_idx: list[int],
    src: str | None = None,
    off: int | None = None,
    fin: bool = False,
) -> bytes:
    parts = [b'{"k":"a","q":%d,"t":%d,"e":[' % (first_seq, t_ms), b",".join(entries), b"]"]
    if client_idx:
        parts.append(b',"c":' + orjson.dumps(client_idx))
    if src is not None:
        parts.append(b',"src":' + orjson.dumps(src))
    if off is not None:
        parts.append(b',"off":%d' % off)
    if fin:
        parts.append(b',"fin":true')
    parts.append(b"}")
    return frame(b"".join(parts))


def split_add(
    entries: list[bytes], client_idx: list[int], max_entries: int, max_bytes: int
) -> list[tuple[int, int, list[int]]]:
    """Cut one add into records of at most `max_entries` entries and about `max_bytes`.

    Returns (start, end, client indexes relative to start) per record; at least one record,
    even for no entries (a spool file with none valid is still journaled).
    """
    if len(entries) <= max_entries and sum(map(len, entries)) + len(entries) <= max_bytes:
        return [(0, len(entries), client_idx)]
    pieces: list[tuple[int, int, list[int]]] = []
    start = 0
    size = 0
    marks = iter(client_idx)
    mark = next(marks, None)
    chunk_idx: list[int] = []
    for i, data in enumerate(entries):
        if i > start and (i - start >= max_entries or size + len(data) > max_bytes):
            pieces.append((start, i, chunk_idx))
            start, size, chunk_idx = i, 0, []
        size += len(data) + 1
        if mark == i:
            chunk_idx.append(i - start)
            mark = next(marks, None)
    pieces.append((start, len(entries), chunk_idx))
    return pieces


@dataclasses.dataclass(frozen=True)
class Cut:
    """Where a batch ends, journaled before the batch is delivered or written."""

    batch_id: str
    first_seq: int
    last_seq: int
    trigger: str
    timestamp_ms: int


def encode_cut(cut: Cut) -> bytes:
    return frame(
        orjson.dumps(
            {
                "k": "c",
                "b": cut.batch_id,
                "f": cut.first_seq,
                "l": cut.last_seq,
                "g": cut.trigger,
                "ts": cut.timestamp_ms,
            }
        )
    )


def decode_cut(record: dict[str, Any]) -> Cut:
    return Cut(record["b"], record["f"], record["l"], record["g"], record["ts"])


SpoolProgress = dict[str, tuple[int, bool]]  # adopted name -> (journaled end, finished)


def note_spool_chunk(sources: SpoolProgress, src: str, off: int | None, fin: bool) -> None:
    # A record from before chunked intake has no `off`: it held the whole file.
    end, done = (off, fin) if off is not None else (0, True)
    known_end, known_done = sources.get(src, (0, False))
    sources[src] = (max(end, known_end), done or known_done)


def merge_sources(*sources: SpoolProgress) -> SpoolProgress:
    merged: SpoolProgress = {}
    for progress in sources:
        for name, (end, done) in progress.items():
            note_spool_chunk(merged, name, end, done)
    return merged


def covers(known: tuple[int, bool] | None, needed: tuple[int, bool]) -> bool:
    """Whether progress `known` says at least as much as `needed` (as far, finished if it is)."""
    return known is not None and known[0] >= needed[0] and (known[1] or not needed[1])


@dataclasses.dataclass
class Position:
    segment: int
    offset: int

    def key(self) -> tuple[int, int]:
        return (self.segment, self.offset)


@dataclasses.dataclass
class SegmentInfo:
    number: int
    path: Path
    size: int = 0
    last_seq: int = 0
    max_t: int = 0
    done_seq: int = 0  # the highest done record in this segment
    cut_seq: int = 0  # the last seq of the highest cut record in this segment
    version: int = FORMAT_VERSION  # its header's
    sources: SpoolProgress = dataclasses.field(default_factory=dict)  # spool files it names
    records: int = 0


SUMMARY_VERSION = 2
SUMMARY_SUFFIX = ".sum"


def summary_path(segment: Path) -> Path:
    return segment.with_suffix(SUMMARY_SUFFIX)


def write_summary(info: SegmentInfo, next_seq: int) -> None:
    """Describe a closed, fsync'd segment so a start can skip parsing it.

    {"v":2,"size":BYTES,"lastSeq":Q,"nextSeq":S,"maxT":MS,"doneSeq":D,"cutSeq":C,
     "journalVersion":V,"sources":{NAME:[END,FINISHED]},"records":N}: `size` must match the
    segment, or the summary is not trusted.
    """
    doc = {
        "v": SUMMARY_VERSION,
        "size": info.size,
        "lastSeq": info.last_seq,
        "nextSeq": next_seq,
        "maxT": info.max_t,
        "doneSeq": info.done_seq,
        "cutSeq": info.cut_seq,
        "journalVersion": info.version,
        "sources": {name: list(progress) for name, progress in sorted(info.sources.items())},
        "records": info.records,
    }
    atomic_write(summary_path(info.path), orjson.dumps(doc))


def read_summary(segment: Path) -> tuple[SegmentInfo, int] | None:
    """The segment's info and the next seq after it, or None: then the segment is parsed.

    A summary is derived data, so one that is missing, damaged, stale (size differs) or of
    another version is ignored, never refused: parsing the segment is the slow, sure path.
    """
    try:
        doc = orjson.loads(summary_path(segment).read_bytes())
        size = segment.stat().st_size
        if doc.get("v") != SUMMARY_VERSION or doc["size"] != size:
            return None
        info = SegmentInfo(
            number=segment_number(segment),
            path=segment,
            size=size,
            last_seq=int(doc["lastSeq"]),
            max_t=int(doc["maxT"]),
            done_seq=int(doc["doneSeq"]),
            cut_seq=int(doc["cutSeq"]),
            version=int(doc["journalVersion"]),
            sources={
                str(name): (int(end), bool(done)) for name, (end, done) in doc["sources"].items()
            },
            records=int(doc["records"]),
        )
        return info, int(doc["nextSeq"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class JournalVersionError(RuntimeError):
    pass
