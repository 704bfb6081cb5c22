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
import dataclasses
import io
from collections import Counter
from typing import Any

import orjson

from flowagg.core.humanize import utc_moment

KEY_BYTES = 36  # export's sort key before each line's JSON (export.KEY_BYTES)
BASE_COLUMNS = ("entryId", "userId", "action", "timestamp", "time")
OTHER_COLUMN = "otherMetadata"
PREFIX = "metadata."
MAX_METADATA_COLUMNS = 64
TRACKED_KEYS = 10_000  # distinct keys counted; memory stays bounded whatever the metadata
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def escape_key(key: str) -> str:
    return key.replace("\\", "\\\\").replace(".", "\\.")


def flatten(metadata: dict[str, Any], prefix: str = PREFIX) -> dict[str, Any]:
    """Nested objects as dotted columns; arrays and empty objects as JSON text."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        name = prefix + escape_key(key)
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
    if type(value) is str and value.startswith(FORMULA_STARTS):
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
    """The time cell; empty for a timestamp no date can show (before the year 1 or after
    9999, found in a damaged file): the timestamp cell beside it still holds the number."""
    moment = utc_moment(ms / 1000)
    return "" if moment is None else moment.isoformat(timespec="milliseconds")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The CSV's columns, known once every entry's metadata is counted."""

    columns: tuple[str, ...]
    other: bool  # the last column is otherMetadata

    @classmethod
    def of(cls, metadata: MetadataColumns) -> Layout:
        other = metadata.overflow()
        columns = (*BASE_COLUMNS, *metadata.chosen(), *([OTHER_COLUMN] if other else []))
        return cls(columns, other)

    def header(self) -> bytes:
        return self.rows_text([list(self.columns)])

    @staticmethod
    def rows_text(rows: list[list[Any]]) -> bytes:
        text = io.StringIO(newline="")
        csv.writer(text).writerows(rows)
        return text.getvalue().encode()
