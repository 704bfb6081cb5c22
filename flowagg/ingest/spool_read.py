"""Reading a spool file: its names, its kind, its chunks and lines, and their JSON.

Pure functions over a name, a mode or an fd, apart from the intake that owns the files: the
chunk boundaries must depend only on the file and where a chunk starts, so that a resumed
intake cuts the same chunks, and that is easiest to see (and test) here on its own.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any

import orjson

from flowagg.core.readsafe import kind_of
from flowagg.ingest.spool_trust import READ_BLOCK

SPOOL_SUFFIXES = (".json", ".jsonl")
CHUNK_LINES = 1000
CHUNK_BYTES = 1 << 20
RAW_PREFIX_BYTES = 4096  # what is kept of a line too long to buffer
ADOPTED_MS_DIGITS = 13


def is_spool_name(name: str) -> bool:
    return not name.startswith(".") and name.endswith(SPOOL_SUFFIXES)


def original_name(adopted: str) -> str:
    """The inbox name an adopted name came from (as far as it was kept)."""
    parts = adopted.split("-", 2)
    return parts[2] if len(parts) == 3 and parts[0].isdigit() else adopted


def adopted_ms(adopted: str) -> int:
    head = adopted[:ADOPTED_MS_DIGITS]
    return int(head) if head.isdigit() else 0


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is, for the reason file."""
    return None if stat.S_ISREG(mode) else kind_of(mode)


def not_regular_reason(kind: str) -> str:
    return f"{kind}, not a regular file: only regular files are read; spool a regular file"


@dataclasses.dataclass
class Line:
    offset: int  # where the line starts in the file
    data: bytes  # without its newline; only a prefix when the line is over the limit
    length: int  # of the whole line, without its newline
    number: int  # counting from 1, as the reasons name it


@dataclasses.dataclass
class Chunk:
    start: int
    end: int  # where the next chunk starts
    lines: list[Line]
    final: bool


@dataclasses.dataclass
class Problem:
    offset: int
    raw: bytes
    error: str


def read_chunk(fd: int, start: int, max_line: int, first_line: int = 1) -> Chunk:
    """Lines from `start` (line number `first_line`), up to CHUNK_LINES of them or about
    CHUNK_BYTES.

    The boundaries depend only on the file and `start`, so a resumed intake cuts the same
    chunks. A line over `max_line` is never buffered whole: a prefix is kept, the rest skipped.
    """
    lines: list[Line] = []
    pos = start
    buf = b""
    at = 0  # buf[at:] holds the bytes at pos that are not a line yet
    while len(lines) < CHUNK_LINES and pos - start < CHUNK_BYTES:
        newline = buf.find(b"\n", at)
        if newline >= 0:
            length = newline - at
            keep = length if length <= max_line else RAW_PREFIX_BYTES
            lines.append(Line(pos, buf[at : at + keep], length, first_line + len(lines)))
            pos += length + 1
            at = newline + 1
        elif len(buf) - at > max_line:
            prefix = buf[at : at + RAW_PREFIX_BYTES]
            line, pos = _skip_long_line(fd, pos, prefix, len(buf) - at, first_line + len(lines))
            lines.append(line)
            buf, at = b"", 0
        else:
            block = os.pread(fd, READ_BLOCK, pos + len(buf) - at)
            if not block:
                if len(buf) > at:  # the last line has no newline
                    lines.append(Line(pos, buf[at:], len(buf) - at, first_line + len(lines)))
                    pos += len(buf) - at
                return Chunk(start, pos, lines, final=True)
            buf, at = buf[at:] + block, 0
    return Chunk(start, pos, lines, final=not os.pread(fd, 1, pos))


def _skip_long_line(fd: int, pos: int, prefix: bytes, seen: int, number: int) -> tuple[Line, int]:
    """Find the end of an overlong line starting at `pos`; returns it and the next offset."""
    scanned = pos + seen
    while True:
        block = os.pread(fd, READ_BLOCK, scanned)
        newline = block.find(b"\n")
        if not block or newline >= 0:
            end = scanned + (newline if newline >= 0 else 0)
            return Line(pos, prefix, end - pos, number), end + (1 if newline >= 0 else 0)
        scanned += len(block)


def count_lines(fd: int, end: int) -> int:
    """Newlines before byte `end`: the number of the line a resumed intake starts at, less 1."""
    count = pos = 0
    while pos < end:
        block = os.pread(fd, min(READ_BLOCK, end - pos), pos)
        if not block:
            break
        count += block.count(b"\n")
        pos += len(block)
    return count


def read_at_most(fd: int, limit: int) -> bytes:
    parts = []
    total = 0
    while total < limit:
        block = os.read(fd, min(READ_BLOCK, limit - total))
        if not block:
            break
        parts.append(block)
        total += len(block)
    return b"".join(parts)


def read_document(fd: int, max_bytes: int) -> tuple[Any, bytes] | str:
    """A .json file's value and bytes, read whole, or why it is refused (too big, not JSON)."""
    too_big = (
        f"a .json spool file over {max_bytes} bytes; use .jsonl (one entry per line), which is"
        " streamed"
    )
    if os.fstat(fd).st_size > max_bytes:
        return too_big
    data = read_at_most(fd, max_bytes + 1)
    if len(data) > max_bytes:  # it grew after the check
        return too_big
    try:
        return orjson.loads(data), data
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON ({exc}); fix the file and spool it again"


def parse_lines(lines: list[Line], max_line: int) -> tuple[list[Any], list[Line], list[Problem]]:
    """JSON values of the lines (and the line of each), plus the lines that are not JSON."""
    items: list[Any] = []
    sources: list[Line] = []
    problems: list[Problem] = []
    for line in lines:
        if line.length > max_line:
            error = f"line {line.number}: {line.length} bytes, over {max_line}; split it"
            problems.append(Problem(line.offset, line.data[:RAW_PREFIX_BYTES], error))
            continue
        if not line.data.strip():
            continue
        try:
            items.append(orjson.loads(line.data))
        except orjson.JSONDecodeError as exc:
            error = f"line {line.number}: not valid JSON ({exc}); fix the line"
            problems.append(Problem(line.offset, line.data, error))
            continue
        sources.append(line)
    return items, sources, problems
