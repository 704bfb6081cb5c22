"""Export's CSV rows, made in worker processes from blocks of sorted lines (`write_csv`).

A row is made as text: its cells joined by commas, when none of them holds a comma, a quote
or a line break (the cells the csv module would quote); any other row goes through the csv
module, so every row is the bytes `csv.writer` writes for it. Cells are the values the csv
module is given in `csv_export` (`cell`, `iso`, `flatten`), written as it writes them: None
as nothing, anything else as `str()`.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Iterator
from typing import IO, Any

import orjson

from flowagg.read.csv_export import (
    FORMULA_STARTS,
    KEY_BYTES,
    PREFIX,
    TRACKED_KEYS,
    Layout,
    MetadataColumns,
    escape_key,
    flatten,
    iso,
)
from flowagg.read.fanout import map_stream

# Below 2**32 seconds, ms / 1000 is within half a microsecond of the exact time (its spacing
# is 2**-20 s), so datetime rounds it back to the exact millisecond that `iso` then shows; the
# same digits come here from integer arithmetic. Elsewhere `iso` itself answers.
_EXACT_MS = (1 << 32) * 1000
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
_OTHER = -1  # a metadata key without a column: its value goes to otherMetadata


def _text(value: Any) -> str:
    """A cell's text as the csv module writes it, formula guard included (`cell`)."""
    kind = type(value)
    if kind is str:
        return "'" + value if value.startswith(FORMULA_STARTS) else value
    return "" if value is None else str(value)


class _Times:
    """`iso`, with the text up to the minute made once per minute: the rows come in time
    order, so consecutive ones mostly share it."""

    def __init__(self) -> None:
        self.minute = -1
        self.prefix = ""

    def iso(self, ms: int) -> str:
        if not 0 <= ms < _EXACT_MS:
            return iso(ms)
        minute, rest = divmod(ms, 60_000)
        if minute != self.minute:
            day, of_day = divmod(minute, 1440)
            date = datetime.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()
            self.minute = minute
            self.prefix = f"{date}T{of_day // 60:02d}:{of_day % 60:02d}:"
        return f"{self.prefix}{rest // 1000:02d}.{rest % 1000:03d}+00:00"


def csv_block(layout: Layout, block: bytes) -> bytes:
    """Sorted export lines (KEY_BYTES of key, then the entry's JSON; joined) as CSV rows.
    The csv writer keeps nothing from row to row, so blocks made apart and joined are the
    rows one writer makes of them all."""
    columns = layout.columns
    width = len(columns)
    position = {name: i for i, name in enumerate(columns)}
    slots: dict[str, int] = {}  # a flat metadata key's column, looked up once per key
    blank = [""] * width
    times = _Times()
    # One parse of the block as a JSON array: a line holds no newline of its own (JSON
    # escapes it in strings), and one call per line cost more than the parse.
    entries = orjson.loads(b"[" + b",".join([ln[KEY_BYTES:] for ln in block.splitlines()]) + b"]")
    lines: list[str] = []
    for entry in entries:
        row = blank.copy()
        ts = entry["timestamp"]
        row[0] = _text(entry.get("entryId", ""))
        row[1] = _text(entry.get("userId", ""))
        row[2] = _text(entry.get("action", ""))
        row[3] = str(ts)
        row[4] = times.iso(ts)
        fields = entry.get("metadata")
        if type(fields) is dict and fields:
            rest: dict[str, Any] | None = None
            for key, value in fields.items():
                kind = type(value)
                if kind is dict or kind is list:
                    flat = flatten({key: value}).items()
                else:
                    at = slots.get(key)
                    if at is None:
                        at = position.get(PREFIX + escape_key(key), _OTHER)
                        if len(slots) < TRACKED_KEYS:
                            slots[key] = at
                    if at != _OTHER:
                        row[at] = _text(value)
                        continue
                    flat = ((PREFIX + escape_key(key), value),)
                for name, item in flat:
                    at = position.get(name, _OTHER)
                    if at == _OTHER:
                        if rest is None:
                            rest = {}
                        rest[name[len(PREFIX) :]] = item
                    else:
                        row[at] = _text(item)
            if rest:
                row[-1] = orjson.dumps(rest).decode()
        line = ",".join(row)
        if line.count(",") != width - 1 or '"' in line or "\n" in line or "\r" in line:
            line = Layout.rows_text([row]).decode()[:-2]  # quoted as csv quotes it
        lines.append(line)
    lines.append("")
    return "\r\n".join(lines).encode()


def write_csv(blocks: Iterator[bytes], out: IO[bytes], metadata: MetadataColumns) -> None:
    """The CSV of export's sorted lines (`Sorter.blocks`), its rows made in worker processes:
    the columns are known only once every entry was counted, so this is export's second
    pass, over lines already read and sorted."""
    layout = Layout.of(metadata)
    out.write(layout.header())
    for text in map_stream(functools.partial(csv_block, layout), blocks):
        out.write(text)
