"""Entry validation and normalisation (SPEC §3).

Every rejection is one line naming the entry index, the field and the rule, so a user can fix
the input without reading the code.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable
from typing import Any

import orjson

from flowagg.core.humanize import iso_ms

MIN_TIMESTAMP_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_FUTURE_MS = 86_400_000
MAX_METADATA_DEPTH = 8
# Type-checked integers (timestamp, duration) fit a signed 64-bit integer: PostgreSQL's bigint,
# Parquet's int64 and most readers hold no more.
MAX_INT64 = (1 << 63) - 1
# How orjson writes U+0000; the bytes may also come from a backslash before "u0000", so a
# hit is confirmed on the values themselves (nul_field) before an entry is refused.
_NUL_ESCAPE = b"\\u0000"
# 19 digits or more: the only integers that can fall outside int64 (2**63 has 19 digits).
_LONG_NUMBER = re.compile(rb"\d{19,}")
FIELDS = ("userId", "action", "timestamp", "metadata", "entryId")
_FIELD_SET = frozenset(FIELDS)
_ACTION_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_KNOWN_METADATA: dict[str, tuple[type, str]] = {
    "sessionId": (str, "a string"),
    "taskId": (str, "a string"),
    "duration": (int, f"an integer number of ms from 0 to {MAX_INT64} (signed 64-bit)"),
}


# Actions seen valid, so that the regex runs once per distinct action; bounded, never by traffic.
_GOOD_ACTIONS: set[str] = set()
GOOD_ACTIONS_KEPT = 4096


def _remember_action(action: str) -> bool:
    if not _ACTION_RE.fullmatch(action):
        return False
    if len(_GOOD_ACTIONS) < GOOD_ACTIONS_KEPT:
        _GOOD_ACTIONS.add(action)
    return True


class EntryError(ValueError):
    """An entry that breaks a rule of §3; str() is the one-line message for the user."""


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60


def short_repr(value: Any) -> str:
    """repr() that stays short and never recurses deeper than a few levels."""
    return _REPR.repr(value)


def _show(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        text = short_repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def nul_field(entry: dict[str, Any]) -> str | None:
    """A field holding U+0000 in a string (a key or a value, at any depth), or None.

    SPEC §3: databases and many tools cannot store NUL, and one such entry must never take its
    batch-mates down at a sink, so it is refused at ingest. The path names keys as
    `metadata.a.b` and array items as `metadata.a[2]`.
    """
    stack: list[tuple[str, Any]] = [(key, value) for key, value in entry.items()]
    while stack:
        path, value = stack.pop()
        if type(value) is str and "\x00" in value:
            return path
        if type(value) is dict:
            for key, child in value.items():
                if "\x00" in key:
                    return f"{path} key {_show(key)}"
                stack.append((f"{path}.{key}", child))
        elif type(value) is list:
            stack += [(f"{path}[{i}]", child) for i, child in enumerate(value)]
    return None


def wide_int_field(entry: dict[str, Any]) -> str | None:
    """A field holding an integer outside int64 (at any depth), or None.

    SPEC §3: PostgreSQL's bigint, Parquet's int64 and most readers hold no wider integer, so
    one is refused at ingest rather than failing a reader or a sink later.
    """
    stack: list[tuple[str, Any]] = [(key, value) for key, value in entry.items()]
    while stack:
        path, value = stack.pop()
        if type(value) is int and not -MAX_INT64 - 1 <= value <= MAX_INT64:
            return path
        if type(value) is dict:
            stack += [(f"{path}.{key}", child) for key, child in value.items()]
        elif type(value) is list:
            stack += [(f"{path}[{i}]", child) for i, child in enumerate(value)]
    return None


def wide_int_error(index: int, field: str) -> EntryError:
    return EntryError(
        f"entry {index}: {field}: an integer outside the signed 64-bit range"
        f" ({-MAX_INT64 - 1} to {MAX_INT64}), which databases and Parquet cannot hold;"
        " send it as a string"
    )


def nul_error(index: int, field: str) -> EntryError:
    return EntryError(
        f"entry {index}: {field}: must not contain U+0000 (NUL), which databases cannot store;"
        " remove it"
    )


def _depth_exceeds(metadata: dict[str, Any], limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(metadata, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


# Timestamps in this range are seconds from 2000 to 2286: a clock read in the wrong unit.
_SECONDS_RANGE = range(MIN_TIMESTAMP_MS // 1000, 10_000_000_000)


def _early_hint(ts: int) -> str:
    if ts in _SECONDS_RANGE:
        return " (seconds instead of milliseconds?)"
    if ts >= 0:
        return f" ({iso_ms(ts)}, before the earliest accepted time)"
    return " (before 1970)"


def validate_entry(
    raw: Any,
    index: int,
    *,
    now_ms: int,
    max_entry_bytes: int,
    new_id: Callable[[], str],
) -> tuple[dict[str, Any], bool]:
    """Return (normalised entry, client_supplied_id) or raise EntryError.

    The normalised entry has its keys in the stored order and always carries an entryId.
    """
    entry, client_id, _ = validate_entry_json(
        raw, index, now_ms=now_ms, max_entry_bytes=max_entry_bytes, new_id=new_id
    )
    return entry, client_id


def validate_entry_json(
    raw: Any,
    index: int,
    *,
    now_ms: int,
    max_entry_bytes: int,
    new_id: Callable[[], str],
    redact: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], bool, bytes]:
    """validate_entry, plus the entry as the compact JSON that is journaled and stored.

    This runs for every entry on the event loop: the common, valid case takes the cheap
    checks, and messages are built only on the way out. `index` counts from 0; messages
    name the entry counting from 1, as a person does (`entry 1` is the first).
    """
    index += 1
    if not isinstance(raw, dict):
        raise EntryError(f"entry {index}: must be a JSON object, got {_type_name(raw)}")
    if not raw.keys() <= _FIELD_SET:
        unknown = next(k for k in raw if k not in _FIELD_SET)
        raise EntryError(
            f"entry {index}: unknown key {_show(unknown)}; allowed keys are {', '.join(FIELDS)}"
        )

    user = raw.get("userId")
    if type(user) is not str or not 1 <= len(user) <= 128:
        got = "missing" if "userId" not in raw else f"got {_show(user)}"
        raise EntryError(f"entry {index}: userId: must be a string of 1-128 characters, {got}")

    action = raw.get("action")
    if type(action) is not str or (action not in _GOOD_ACTIONS and not _remember_action(action)):
        got = "missing" if "action" not in raw else f"got {_show(action)}"
        raise EntryError(
            f"entry {index}: action: must be 1-64 characters of [A-Za-z0-9_.:-], {got}"
        )

    ts = raw.get("timestamp")
    if type(ts) is not int:
        got = "missing" if "timestamp" not in raw else f"got {_show(ts)}"
        raise EntryError(f"entry {index}: timestamp: must be an integer (ms since epoch), {got}")
    if ts < MIN_TIMESTAMP_MS:
        raise EntryError(
            f"entry {index}: timestamp: must be on or after 2000-01-01 ({MIN_TIMESTAMP_MS}),"
            f" got {ts}{_early_hint(ts)}"
        )
    if ts > now_ms + MAX_FUTURE_MS:
        raise EntryError(f"entry {index}: timestamp: must be at most 1 day in the future, got {ts}")

    metadata = raw.get("metadata", {})
    if type(metadata) is not dict:
        raise EntryError(f"entry {index}: metadata: must be an object, got {_type_name(metadata)}")
    if metadata:
        nested = False
        for key, value in metadata.items():
            known = _KNOWN_METADATA.get(key)
            if known is not None:
                kind, rule = known
                if type(value) is not kind or (kind is int and not 0 <= value <= MAX_INT64):
                    raise EntryError(
                        f"entry {index}: metadata.{key}: must be {rule}, got {_show(value)}"
                    )
            elif type(value) is dict or type(value) is list:
                nested = True
        if nested and _depth_exceeds(metadata, MAX_METADATA_DEPTH):
            raise EntryError(
                f"entry {index}: metadata: nested deeper than {MAX_METADATA_DEPTH} levels;"
                " flatten it"
            )
        if redact is not None:
            redact(metadata)

    client_id = "entryId" in raw
    if client_id:
        entry_id = raw["entryId"]
        if type(entry_id) is not str or not 1 <= len(entry_id) <= 128:
            raise EntryError(
                f"entry {index}: entryId: must be a string of 1-128 characters,"
                f" got {_show(entry_id)}"
            )
    else:
        entry_id = new_id()

    entry = {
        "userId": user,
        "action": action,
        "timestamp": ts,
        "metadata": metadata,
        "entryId": entry_id,
    }
    try:
        # A copy of exact size: orjson's own buffer keeps kilobytes of slack per object, and
        # these bytes live in the buffer until the entry is stored.
        data = bytes(memoryview(orjson.dumps(entry)))
    except orjson.JSONEncodeError as exc:
        # orjson writes no integer below -2**63 (nor above 2**64-1): name the field.
        field = wide_int_field(entry)
        if field is not None:
            raise wide_int_error(index, field) from None
        raise EntryError(
            f"entry {index}: holds a value JSON cannot carry ({exc}); remove it"
        ) from None
    if _NUL_ESCAPE in data:
        field = nul_field(entry)
        if field is not None:
            raise nul_error(index, field)
    if _LONG_NUMBER.search(data):
        field = wide_int_field(entry)
        if field is not None:
            raise wide_int_error(index, field)
    if len(data) > max_entry_bytes:
        raise EntryError(
            f"entry {index}: is {len(data)} bytes as compact JSON, over"
            f" maxEntryBytes={max_entry_bytes}; shrink metadata"
        )
    return entry, client_id, data


def plain_json(data: bytes) -> bool:
    """True when compact JSON `data` holds no U+0000: the one value check `validate_entry_json`
    makes on an entry's bytes, ruled out at once for any number of entries."""
    return _NUL_ESCAPE not in data


def plainly_valid(raw: Any, now_ms: int) -> bool:
    """True when `validate_entry_json` accepts `raw` as it stands and finds an entryId in it,
    as far as the entry's own fields tell. The rest is for the caller to know from the compact
    JSON it already made of `raw` (a reader makes a whole batch's at once): that there is one
    (orjson carries every value), its size, and `plain_json` of it. False says nothing:
    the validator then words the fault, if any. Keep in step with validate_entry_json."""
    if type(raw) is not dict or not raw.keys() <= _FIELD_SET:
        return False
    user, action, ts, entry_id = (
        raw.get("userId"),
        raw.get("action"),
        raw.get("timestamp"),
        raw.get("entryId"),
    )
    if not (
        type(user) is str
        and 1 <= len(user) <= 128
        and type(entry_id) is str
        and 1 <= len(entry_id) <= 128
        and type(action) is str
        and action in _GOOD_ACTIONS
        and type(ts) is int
        and MIN_TIMESTAMP_MS <= ts <= now_ms + MAX_FUTURE_MS
    ):
        return False
    metadata = raw.get("metadata", {})
    if type(metadata) is not dict:
        return False
    nested = False
    for key, value in metadata.items():
        known = _KNOWN_METADATA.get(key)
        if known is not None:
            kind = known[0]
            if type(value) is not kind or (kind is int and not 0 <= value <= MAX_INT64):
                return False
        elif type(value) is dict or type(value) is list:
            nested = True
        elif type(value) is int and not -MAX_INT64 - 1 <= value <= MAX_INT64:
            return False
    # A search of the bytes for long numbers (as the validator makes) costs a reader more than
    # its JSON parse; only nested values are walked.
    return not nested or (
        not _depth_exceeds(metadata, MAX_METADATA_DEPTH) and wide_int_field(metadata) is None
    )


def parse_entries_text(data: bytes) -> list[Any]:
    """Parse a JSON object, a JSON array, or JSON lines (used by the spool and `flowagg add`).

    Raises EntryError naming the line of the first syntax error.
    """
    stripped = data.strip()
    if not stripped:
        return []
    try:
        whole = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        whole = None
    else:
        if isinstance(whole, list):
            return whole
        if isinstance(whole, dict):
            return [whole]
        raise EntryError(
            f"input: must be a JSON object, an array or JSON lines, got {short_repr(whole)}"
        )
    items: list[Any] = []
    for lineno, line in enumerate(data.split(b"\n"), 1):
        line = line.strip()
        if not line:
            continue
        try:
            items.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise EntryError(f"line {lineno}: not valid JSON ({exc}); fix or remove it") from None
    return items
