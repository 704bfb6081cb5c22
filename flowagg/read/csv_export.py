"""`flowagg export --format csv`: one row per entry, metadata flattened into columns.

- Column names are unambiguous: a nested key is joined with `.`, and a `.` or `\\` inside a
  key is written `\\.` or `\\\\`, so `{"a.b": 1}` is `metadata.a\\.b` and `{"a": {"b": 1}}` is
  `metadata.a.b`.
- The file stays proportional to the data: at most `MAX_METADATA_COLUMNS` metadata columns,
  the keys found in the most entries (ties by name, among the first `TRACKED_KEYS` distinct
  keys seen); every other key of an entry goes to its `otherMetadata` cell, one JSON object
  keyed by the names its columns would have had (without `metadata.`).
- A text cell that a spreadsheet would take for a formula (it starts with `= + - @`, a tab or
  a carriage return: OWASP's CSV injection rule) is prefixed with `'`. A JSON number is
  written as it is, `-5` included: a number cannot call anything.
"""

from __future__ import annotations

import csv
import datetime
import io
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

import orjson

BASE_COLUMNS = ("entryId", "userId", "action", "timestamp", "time")
OTHER_COLUMN = "otherMetadata"
PREFIX = "metadata."
MAX_METADATA_COLUMNS = 64
TRACKED_KEYS = 10_000  # distinct keys counted; memory stays bounded whatever the metadata
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _escape_key(key: str) -> str:
    return key.replace("\\", "\\\\").replace(".", "\\.")


def flatten(metadata: dict[str, Any], prefix: str = PREFIX) -> dict[str, Any]:
    """Nested objects as dotted columns; arrays and empty objects as JSON text."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        name = prefix + _escape_key(key)
        kind = type(value)
        if kind is dict and value:
            out.update(flatten(value, name + "."))
        elif kind is dict or kind is list:
            out[name] = orjson.dumps(value).decode()
        else:
            out[name] = value
    return out


def cell(value: Any) -> Any:
    """A value as a spreadsheet may open it safely (see the module's notes)."""
    if type(value) is str and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


class MetadataColumns:
    """Counts, in a first pass over the entries, in how many of them each column occurs."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.untracked = False  # a key seen after TRACKED_KEYS others: never a column

    def add(self, metadata: dict[str, Any]) -> None:
        counts = self.counts
        for name in flatten(metadata):
            if name in counts or len(counts) < TRACKED_KEYS:
                counts[name] += 1
            else:
                self.untracked = True

    def merge(self, later: MetadataColumns) -> None:
        """Add the counts of the entries after these. A key is tracked when fewer than
        TRACKED_KEYS others were seen before its first entry, as if counted in one pass:
        `later` holds its keys in the order first seen, and one untracked there was preceded
        by TRACKED_KEYS others there already."""
        counts = self.counts
        for name, n in later.counts.items():
            if name in counts or len(counts) < TRACKED_KEYS:
                counts[name] += n
            else:
                self.untracked = True
        self.untracked = self.untracked or later.untracked

    def chosen(self) -> list[str]:
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return sorted(name for name, _ in ranked[:MAX_METADATA_COLUMNS])

    def overflow(self) -> bool:
        return self.untracked or len(self.counts) > MAX_METADATA_COLUMNS


def iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat(
        timespec="milliseconds"
    )


def write_csv(rows: Iterator[bytes], out: IO[bytes], metadata: MetadataColumns) -> None:
    chosen = metadata.chosen()
    other = metadata.overflow()
    columns = [*BASE_COLUMNS, *chosen, *([OTHER_COLUMN] if other else [])]
    position = {name: i for i, name in enumerate(columns)}
    blank = [""] * len(columns)
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=False)
    writer = csv.writer(text)
    writer.writerow(columns)
    loads = orjson.loads
    for data in rows:
        entry = loads(data)
        row = blank.copy()
        ts = entry["timestamp"]
        row[0] = cell(entry.get("entryId", ""))
        row[1] = cell(entry.get("userId", ""))
        row[2] = cell(entry.get("action", ""))
        row[3] = ts
        row[4] = iso(ts)
        fields = entry.get("metadata")
        if type(fields) is dict:
            rest: dict[str, Any] = {}
            for name, value in flatten(fields).items():
                at = position.get(name)
                if at is None:
                    rest[name[len(PREFIX) :]] = value
                else:
                    row[at] = cell(value)
            if rest:
                row[-1] = orjson.dumps(rest).decode()
        writer.writerow(row)
    text.flush()
    text.detach()
