"""One compiled decode-and-check step for `add` requests (SPEC §3, §4.1).

A typed msgspec decode parses a request line and checks the static entry rules (types,
lengths, unknown keys) in C; what depends on the clock or on settings (timestamp window,
action alphabet, known metadata keys, depth, redaction, size) is checked per entry after it.
This path only ever *accepts*: a request it cannot accept whole, and one it cannot be sure of,
goes to orjson and the Python validator (entries.py), which word every rejection. So its
answers are the validator's, only cheaper; tests/ingest/test_entry_codec.py holds it to that.

What it leaves to the validator without deciding:
- any `\\u0000` in the line (no string may hold U+0000; an escaped backslash before `u0000`
  is sent there too, harmlessly);
- any integer in metadata outside int64 (-2**63 to 2**63 - 1): orjson reads those past 64 bits
  as floats, msgspec as ints, and the rules bound checked integers to int64;
- anything msgspec refuses, from malformed JSON to a wrong type or another top-level key.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from operator import attrgetter
from typing import Annotated, Any, Literal

import msgspec
import orjson

from flowagg.core.entries import (
    _GOOD_ACTIONS,
    _NUL_ESCAPE,
    MAX_FUTURE_MS,
    MAX_INT64,
    MAX_METADATA_DEPTH,
    MIN_TIMESTAMP_MS,
    _remember_action,
)
from flowagg.ingest.dedupe_gate import Valid

_ID = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


# Not tracked by the garbage collector (no entry can hold a cycle): a request makes a hundred.
class _Entry(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    userId: _ID
    action: str
    timestamp: int
    metadata: dict[str, Any] = {}
    entryId: _ID | msgspec.UnsetType = msgspec.UNSET


class _AddRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Other top-level keys go to orjson: msgspec skips an ignored value without checking its
    UTF-8, where orjson refuses the whole line."""

    op: Literal["add"]
    entries: list[_Entry]


_DECODER = msgspec.json.Decoder(_AddRequest)
_ENTRY_DECODER = msgspec.json.Decoder(_Entry)
_ENCODE = msgspec.json.Encoder().encode
_TIMESTAMP = attrgetter("timestamp")
_ACTION = attrgetter("action")
_METADATA = attrgetter("metadata")
_ENTRY_ID = attrgetter("entryId")
_IS_INT = int.__instancecheck__  # bools too: they are within any bound
_CONTAINERS = frozenset((dict, list))
_KNOWN_KEYS = frozenset(("sessionId", "taskId", "duration"))
_KNOWN_SHAPE = {(str, str, int)}


class DecodedEntries(list[_Entry]):
    """The entries of an add request that passed the compiled checks, and the line they came
    from (to hand the validator the plain parse when a per-entry rule does not hold)."""

    def __init__(self, entries: list[_Entry], line: bytes) -> None:
        super().__init__(entries)
        self.line = line

    def plain(self) -> list[Any]:
        """The entries as orjson parses them, for the validator and the rate limiter."""
        entries: list[Any] = orjson.loads(self.line)["entries"]
        return entries


def decode_add(line: bytes) -> DecodedEntries | None:
    """The entries of an `add` line whose static rules all hold, else None (any other line)."""
    if _NUL_ESCAPE in line:
        return None
    try:
        request = _DECODER.decode(line)
    except (msgspec.DecodeError, RecursionError):
        return None
    return DecodedEntries(request.entries, line)


def decode_lines(lines: list[bytes]) -> list[_Entry] | None:
    """One entry per line (a spool chunk's) when every line's static rules hold, else None."""
    if any(_NUL_ESCAPE in line for line in lines):
        return None
    try:
        return list(map(_ENTRY_DECODER.decode, lines))
    except (msgspec.DecodeError, RecursionError):
        return None


def check_decoded(
    entries: list[_Entry],
    *,
    now_ms: int,
    max_entry_bytes: int,
    new_id: Callable[[], str],
    redact: Callable[[list[dict[str, Any]], bool], None] | None = None,
) -> list[Valid] | None:
    """validate_entry_json's answer for every entry when all are valid, else None.

    A None leaves nothing the caller uses: it validates `entries.plain()`, a fresh parse, so
    metadata redacted here is dropped, and ids drawn here are skipped (never reused).
    `redact` takes every entry's metadata at once, and whether all of it is flat.

    Each rule is checked over the whole request at once (map, min, set: the iteration runs in
    C); a per-entry walk is left for metadata holding objects or arrays.
    """
    if not entries:
        return []
    stamps = list(map(_TIMESTAMP, entries))
    if min(stamps) < MIN_TIMESTAMP_MS or max(stamps) > now_ms + MAX_FUTURE_MS:
        return None
    actions = set(map(_ACTION, entries))
    if not actions <= _GOOD_ACTIONS and not all(map(_remember_action, actions - _GOOD_ACTIONS)):
        return None
    metadatas = list(map(_METADATA, entries))
    values = list(chain.from_iterable(map(dict.values, metadatas)))
    kinds = set(map(type, values))
    flat = kinds.isdisjoint(_CONTAINERS)
    if flat:
        if not _flat_ok(metadatas, values, kinds):
            return None
    elif not all(map(_metadata_ok, metadatas)):
        return None
    if redact is not None:
        redact(metadatas, flat)
    outs = list(map(msgspec.structs.asdict, entries))
    missing = list(map(_ENTRY_ID, entries)).count(msgspec.UNSET)
    if missing:
        client_ids = [out["entryId"] is not msgspec.UNSET for out in outs]
        for entry, out, client_id in zip(entries, outs, client_ids, strict=True):
            if not client_id:
                entry.entryId = out["entryId"] = new_id()
    else:
        client_ids = [True] * len(outs)
    try:
        if flat and float not in kinds:
            # Strings, integers, booleans and null: msgspec writes them byte for byte as
            # orjson does (tests/ingest/test_entry_codec.py), at a third of the cost of
            # orjson's bytes and their exact-size copy. Floats are spelt differently.
            datas = list(map(_ENCODE, entries))
        else:
            # Copies of exact size, as the validator makes them (see validate_entry_json).
            datas = list(map(bytes, map(memoryview, map(orjson.dumps, outs))))
    except (orjson.JSONEncodeError, msgspec.EncodeError, UnicodeEncodeError):
        return None  # the validator words it ("holds a value JSON cannot carry")
    if max(map(len, datas)) > max_entry_bytes:
        return None
    return list(zip(outs, client_ids, datas, strict=True))


def _flat_ok(metadatas: list[dict[str, Any]], values: list[Any], kinds: set[type]) -> bool:
    """`_metadata_ok` for every entry of a request whose metadata holds no object or array:
    `values` are all their values, `kinds` the types among them."""
    if int in kinds:
        ints = list(filter(_IS_INT, values))
        if min(ints) < -MAX_INT64 - 1 or max(ints) > MAX_INT64:
            return False
    if _KNOWN_KEYS.isdisjoint(set().union(*metadatas)):
        return True
    shapes = {
        (type(m.get("sessionId", "")), type(m.get("taskId", "")), type(m.get("duration", 0)))
        for m in metadatas
    }
    return shapes == _KNOWN_SHAPE and min(m.get("duration", 0) for m in metadatas) >= 0


def _metadata_ok(metadata: dict[str, Any]) -> bool:
    """The known keys' types, integers within int64, and the nesting bound."""
    for key in ("sessionId", "taskId"):
        if type(metadata.get(key, "")) is not str:
            return False
    if type(metadata.get("duration", 0)) is not int or metadata.get("duration", 0) < 0:
        return False
    for value in metadata.values():
        kind = type(value)
        if kind is int:
            if not -MAX_INT64 - 1 <= value <= MAX_INT64:
                return False
        elif kind is dict or kind is list:
            return _nested_ok(metadata)
    return True


def _nested_ok(metadata: dict[str, Any]) -> bool:
    """Integers within int64 at any depth, and no deeper than MAX_METADATA_DEPTH."""
    stack: list[tuple[Any, int]] = [(metadata, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_METADATA_DEPTH:
            return False
        for child in node.values() if type(node) is dict else node:
            kind = type(child)
            if kind is int:
                if not -MAX_INT64 - 1 <= child <= MAX_INT64:
                    return False
            elif kind is dict or kind is list:
                stack.append((child, depth + 1))
    return True
