"""Export's CSV rows made in blocks (`csv_rows.csv_block`) are the bytes the csv module writes
for the same cells, whatever the entries hold."""

from __future__ import annotations

import csv
import io
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flowagg.read.csv_export import (
    BASE_COLUMNS,
    OTHER_COLUMN,
    Layout,
    MetadataColumns,
    cell,
    flatten,
    iso,
)
from flowagg.read.csv_rows import csv_block
from flowagg.read.export import _KEY

_TS_OFFSET = 1 << 63


def one_writer(layout: Layout, entries: list[dict[str, Any]]) -> bytes:
    """The rows as one csv writer made them before rows were made in blocks: every value
    given to the csv module as it is."""
    position = {name: i for i, name in enumerate(layout.columns)}
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    for entry in entries:
        row: list[Any] = [""] * len(layout.columns)
        ts = entry["timestamp"]
        row[:5] = [
            cell(entry.get("entryId", "")),
            cell(entry.get("userId", "")),
            cell(entry.get("action", "")),
            ts,
            iso(ts),
        ]
        fields = entry.get("metadata")
        if type(fields) is dict:
            rest = {}
            for name, value in flatten(fields).items():
                at = position.get(name)
                if at is None:
                    rest[name[len("metadata.") :]] = value
                else:
                    row[at] = cell(value)
            if rest:
                row[-1] = orjson.dumps(rest).decode()
        writer.writerow(row)
    return text.getvalue().encode()


texts = st.text(alphabet=st.sampled_from('ab ,"\n\r\t=+-@.\\é\u2028'), max_size=6) | st.text(
    max_size=4
)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | texts
scalars |= st.floats(allow_nan=False, allow_infinity=False)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
# Around the end of the exact range (2**32 s), the year 1, the year 9999 and now.
timestamps = st.integers(-62_135_596_800_000, 253_402_300_799_999) | st.sampled_from(
    [0, 1, 999, (1 << 32) * 1000 - 1, (1 << 32) * 1000, 1_700_000_000_123, -1]
)
entries = st.fixed_dictionaries(
    {"timestamp": timestamps},
    optional={
        "entryId": values,
        "userId": texts,
        "action": texts,
        "metadata": values | st.dictionaries(texts, values, max_size=5),
    },
)


@settings(max_examples=50, deadline=None)
@given(st.lists(entries, max_size=8), st.integers(0, 6))
@example([{"timestamp": 0, "userId": "a,b", "metadata": {"x": 'q"'}}], 1)
def test_block_rows_are_the_csv_modules_rows(batch: list[dict[str, Any]], kept: int) -> None:
    counted = MetadataColumns()
    for entry in batch:
        if type(entry.get("metadata")) is dict:
            counted.add(entry["metadata"])
    names = sorted(counted.counts)
    chosen = names[:kept]
    other = len(chosen) < len(names)
    layout = Layout((*BASE_COLUMNS, *chosen, *([OTHER_COLUMN] if other else [])), other)
    batch.sort(key=lambda e: e["timestamp"])
    block = b"".join(
        _KEY % (e["timestamp"] + _TS_OFFSET, 0, i) + orjson.dumps(e) + b"\n"
        for i, e in enumerate(batch)
    )
    # orjson's own round trip is what export stores; the rows are made of what it parses.
    parsed = [orjson.loads(orjson.dumps(e)) for e in batch]
    assert csv_block(layout, block) == one_writer(layout, parsed)
