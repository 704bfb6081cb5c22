"""The compiled add path (entry_codec) answers exactly as orjson plus the Python validator.

The compiled path only accepts; whatever it cannot accept whole goes to the validator. So the
property to hold is: an add line it accepts is one the validator accepts entry for entry, with
the same stored entries and the same bytes; and a line it does not accept is answered by the
validator itself (every rejection message included). Once another rule joins the validator,
an input the compiled path wrongly lets through shows up here as a mismatch.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flowagg.core.entries import EntryError, validate_entry_json
from flowagg.core.redact import Redactor
from flowagg.ingest.entry_codec import DecodedEntries, check_decoded, decode_add

NOW = 1_704_067_200_000
DAY = 86_400_000
MAX_BYTES = 2048  # small, so the size rule is reached too
INT64 = 2**63 - 1


def outcome_of_validator(line: bytes) -> list[tuple[Any, ...]] | None:
    """What the daemon answered before the compiled path: per entry (entry, client id?, bytes)
    or the rejection message; None when the line is no add request with an entry array."""
    try:
        request = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(request, dict) or request.get("op") != "add":
        return None
    entries = request.get("entries")
    if not isinstance(entries, list):
        return None
    return validate_all(entries)


def validate_all(entries: list[Any]) -> list[tuple[Any, ...]]:
    ids = itertools.count()
    redact = Redactor().metadata
    out: list[tuple[Any, ...]] = []
    for index, raw in enumerate(entries):
        try:
            out.append(
                validate_entry_json(
                    raw,
                    index,
                    now_ms=NOW,
                    max_entry_bytes=MAX_BYTES,
                    new_id=lambda: f"gen-{next(ids)}",
                    redact=redact,
                )
            )
        except EntryError as exc:
            out.append(("rejected", str(exc)))
    return out


def outcome_of_codec(line: bytes) -> tuple[bool, list[tuple[Any, ...]] | None]:
    """(compiled path accepted it, the answer as the daemon now gives it)."""
    decoded = decode_add(line)
    if decoded is None:
        return False, outcome_of_validator(line)
    valid = compiled_answer(decoded)
    if valid is None:
        return False, validate_all(decoded.plain())
    return True, valid


def compiled_answer(decoded: list[Any]) -> list[tuple[Any, ...]] | None:
    """The compiled checks' answer for decoded entries, None when they leave them to the
    validator."""
    ids = itertools.count()
    valid = check_decoded(
        decoded,
        now_ms=NOW,
        max_entry_bytes=MAX_BYTES,
        new_id=lambda: f"gen-{next(ids)}",
        redact=Redactor().metadata_many,
    )
    return None if valid is None else list(valid)


# -- inputs: mostly near-valid entries, with every rule's edge in reach ----------------------
KEYS = ["userId", "action", "timestamp", "metadata", "entryId", "userid", "extra", "op"]
META_KEYS = ["sessionId", "taskId", "duration", "password", "note", "api-key", "x", ""]
big_ints = st.sampled_from(
    [INT64, INT64 + 1, -INT64 - 1, -INT64 - 2, 2**64 - 1, 2**64, 10**18, 10**19, -(10**19)]
)
ints = st.one_of(st.integers(-(2**70), 2**70), big_ints, st.integers(-5, 5))
texts = st.one_of(
    st.text(max_size=20),
    st.text(alphabet='ab\x00\\"é/\u2028', max_size=8),
    st.sampled_from(["code_edit", "a" * 64, "a" * 65, "u" * 128, "u" * 129, "bad action", ""]),
)
scalars = st.one_of(
    st.none(), st.booleans(), ints, st.floats(allow_nan=False, allow_infinity=False), texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(META_KEYS), texts), inner, max_size=3),
    ),
    max_leaves=12,
)
timestamps = st.one_of(
    st.sampled_from([NOW, NOW + DAY, NOW + DAY + 1, 946_684_800_000, 946_684_799_999]),
    st.integers(0, NOW + 2 * DAY),
    ints,
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
metadatas = st.one_of(
    st.dictionaries(st.sampled_from(META_KEYS), json_values, max_size=4),
    st.fixed_dictionaries(
        {},
        optional={
            "sessionId": st.one_of(texts, ints),
            "taskId": st.one_of(texts, st.none()),
            "duration": st.one_of(ints, st.floats(allow_nan=False, allow_infinity=False), texts),
        },
    ),
    json_values,
)


def mostly(draw: st.DrawFn, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    """A valid value most of the time: a request is taken whole only when every entry is."""
    return draw(bad if draw(st.integers(0, 5)) == 0 else good)


@st.composite
def entries(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values)  # not even an object, mostly
    entry: dict[str, Any] = {
        "userId": mostly(draw, st.sampled_from(["u1", "x" * 128, "é"]), st.one_of(texts, ints)),
        "action": mostly(draw, st.sampled_from(["code_edit", "a.b:c-d_9"]), texts),
        "timestamp": mostly(draw, st.integers(946_684_800_000, NOW + DAY), timestamps),
    }
    if draw(st.booleans()):
        good_metadata = st.fixed_dictionaries(
            {},
            optional={
                "sessionId": texts,
                "taskId": st.sampled_from(["t1", "x" * 1500]),
                "duration": st.integers(0, INT64),
                "note": json_values,
                "token": texts,
            },
        )
        entry["metadata"] = mostly(draw, good_metadata, metadatas)
    if draw(st.booleans()):
        entry["entryId"] = mostly(
            draw, st.sampled_from(["id-1", "i" * 128]), st.one_of(texts, ints)
        )
    if draw(st.integers(0, 5)) == 0:
        for key in draw(st.lists(st.sampled_from(KEYS), max_size=2)):
            if draw(st.booleans()):
                entry.pop(key, None)
            else:
                entry.setdefault(key, draw(json_values))
    return entry


@st.composite
def add_lines(draw: st.DrawFn) -> bytes:
    request: dict[str, Any] = {"op": draw(st.sampled_from(["add", "add", "ping", "ADD"]))}
    request["entries"] = draw(st.lists(entries(), max_size=3))
    if draw(st.integers(0, 5)) == 0:
        request["other"] = draw(json_values)
    # The stdlib writes what orjson cannot (integers past 64 bits), in several spellings.
    text = json.dumps(
        request,
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
        allow_nan=False,
    )
    line = text.encode("utf-8", "surrogatepass")
    edit = draw(st.integers(0, 12))
    if edit == 0 and line:  # a damaged byte: malformed JSON, bad UTF-8, a control character
        at = draw(st.integers(0, len(line) - 1))
        line = line[:at] + bytes([draw(st.integers(0, 255))]) + line[at + 1 :]
    elif edit == 1:  # a duplicate key: both parsers keep the last value, in the first's place
        line = line.replace(b'"userId"', b'"userId": "dup", "userId"', 1)
    return line


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(add_lines())
@example(
    b'{"op":"add","entries":[{"userId":"u","action":"a","timestamp":1704067200000,'
    b'"metadata":{"x":"\\u0000"}}]}'
)
@example(b'{"op":"add","entries":[{"userId":"u\\u0000","action":"a","timestamp":1704067200000}]}')
@example(
    b'{"op":"add","entries":[{"userId":"u","action":"a","timestamp":1704067200000,'
    b'"metadata":{"duration":9223372036854775808}}]}'
)
@example(
    b'{"op":"add","entries":[{"userId":"u","action":"a","timestamp":1704067200000,'
    b'"metadata":{"x":123456789012345678901234567890}}]}'
)
@example(b'{"op":"add","entries":[{"userId":"u","action":"a","timestamp":1704067200000.0}]}')
@example(
    b'{"op":"add","entries":[{"userId":"u","action":"a","timestamp":1704067200000,'
    b'"metadata":{"x":1,"y":2,"x":3}}]}'
)
@example(b'{"op":"add","entries":[],"\x80ther":null}')  # msgspec skips it unchecked
def test_compiled_path_answers_as_the_validator(line: bytes) -> None:
    _, answer = outcome_of_codec(line)
    assert answer == outcome_of_validator(line)


def test_valid_requests_take_the_compiled_path() -> None:
    """The property above holds trivially if nothing is ever accepted: the daemon's usual
    requests must be."""
    rng = random.Random(7)
    entries = [
        {
            "userId": f"user{rng.randrange(8):02d}",
            "action": "code_edit",
            "timestamp": NOW - rng.randrange(DAY),
            "metadata": {"sessionId": "s1", "taskId": "t", "duration": rng.randrange(9999)},
            **({"entryId": f"id-{n}"} if n % 2 else {}),
        }
        for n in range(100)
    ]
    entries[3]["metadata"] = {"nested": {"deep": [1, 2.5, None, True, "é"]}, "apiKey": "s3cr3t"}
    entries[4].pop("metadata")
    line = orjson.dumps({"op": "add", "entries": entries})
    accepted, answer = outcome_of_codec(line)
    assert accepted
    assert answer == outcome_of_validator(line)
    assert answer is not None and answer[3][0]["metadata"]["apiKey"] == "[REDACTED]"


def test_a_broken_rule_is_worded_by_the_validator() -> None:
    line = orjson.dumps(
        {"op": "add", "entries": [{"userId": "u", "action": "a b", "timestamp": NOW}]}
    )
    assert isinstance(decode_add(line), DecodedEntries)  # the typed decode holds...
    accepted, answer = outcome_of_codec(line)
    assert not accepted  # ... the action rule does not: the validator answers
    assert answer == outcome_of_validator(line)
    assert answer is not None and answer[0][0] == "rejected" and "action" in answer[0][1]


def test_flat_requests_are_written_byte_for_byte_as_the_validator_writes_them() -> None:
    """Flat metadata without floats is encoded by msgspec, not orjson: every character class,
    the int64 edges, booleans, null and drawn ids must come out as the validator's bytes."""
    texts = ["".join(map(chr, range(n or 1, n + 64))) for n in range(0, 0x800, 64)]  # no NUL
    texts += ['\u2028\u2029\ufeff\U0001f600"\\/', "\x7f\x1f\t\n\r\b\f", "é" * 40]
    entries = [
        {
            "userId": text[:128] or "u",
            "action": "code_edit",
            "timestamp": NOW - n,
            "metadata": {
                text[:20] or "k": text,
                "sessionId": text[-10:],
                "duration": n,
                "edges": [-INT64 - 1, INT64][n % 2],
                "flag": n % 3 == 0 or None,
            },
            **({"entryId": f"id-{n}"} if n % 3 else {}),
        }
        for n, text in enumerate(texts)
    ]
    line = orjson.dumps({"op": "add", "entries": entries})
    accepted, answer = outcome_of_codec(line)
    assert accepted
    assert answer == outcome_of_validator(line)


def test_one_secret_key_among_many_entries_is_redacted_and_counted() -> None:
    """Redaction judges a request's keys once: the one entry holding a secret must still be
    caught, and only it counted."""
    entries = [
        {"userId": "u", "action": "a", "timestamp": NOW, "metadata": {"note": f"n{n}"}}
        for n in range(50)
    ]
    entries[17]["metadata"]["Access-Token"] = "s3cr3t"
    decoded = decode_add(orjson.dumps({"op": "add", "entries": entries}))
    assert decoded is not None
    redactor = Redactor()
    valid = check_decoded(
        decoded,
        now_ms=NOW,
        max_entry_bytes=MAX_BYTES,
        new_id=lambda: "gen",
        redact=redactor.metadata_many,
    )
    assert valid is not None
    assert [n for n, (_, _, data) in enumerate(valid) if b"s3cr3t" in data] == []
    assert valid[17][0]["metadata"]["Access-Token"] == "[REDACTED]"
    assert (redactor.entries, redactor.values) == (1, 1)
