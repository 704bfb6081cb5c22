"""Bad input over the socket (SPEC §4.1, §12): clear one-line errors, and the daemon keeps serving.

One real daemon serves the whole module; every example talks to it over raw sockets and then
checks that `ping` still answers.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.harness import BASE_TS, DaemonProc, ping, request, start_daemon

MAX_REQUEST = 65_536
MAX_ENTRY = 4096
REPLY_TIMEOUT_S = 30.0
FIELDS = ("userId", "action", "timestamp", "metadata", "entryId")
KNOWN_OPS = ("add", "flush", "status", "ping", "recover", "health")

EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_unique = itertools.count()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    root = tmp_path_factory.mktemp("bad-input") / "data"
    proc = start_daemon(
        root,
        {
            "maxRequestBytes": MAX_REQUEST,
            "maxEntryBytes": MAX_ENTRY,
            "batchSize": 1000,
            "maxAgeMs": 3_600_000,
        },
    )
    try:
        yield proc
        assert proc.proc.poll() is None, f"the daemon died during the module: {proc.log()}"
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def sock(daemon: DaemonProc) -> Path:
    return daemon.layout.socket


# --------------------------------------------------------------------------------------------
# raw socket helpers


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(REPLY_TIMEOUT_S)
    s.connect(str(path))
    return s


def send(s: socket.socket, data: bytes) -> None:
    # The daemon may answer an oversized line and close before it has read all of it.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(data)


def read_reply(reader: Any) -> dict[str, Any]:
    line = reader.readline()
    assert line.endswith(b"\n"), f"no complete reply line: {line[:200]!r}"
    assert line.count(b"\n") == 1
    reply = orjson.loads(line)
    assert isinstance(reply, dict)
    assert isinstance(reply.get("ok"), bool)
    return reply


def exchange(path: Path, data: bytes, *, half_close: bool = False) -> dict[str, Any]:
    """Send raw bytes on a fresh connection; return the one reply line, parsed."""
    with connect(path) as s:
        send(s, data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return read_reply(s.makefile("rb"))


def still_serving(path: Path) -> None:
    assert ping(path, timeout=REPLY_TIMEOUT_S), "the daemon stopped answering ping"


def assert_error(reply: dict[str, Any], *words: str) -> str:
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert isinstance(error, str)
    assert error.strip()
    assert "\n" not in error
    for word in words:
        assert word in error, (word, error)
    return error


def counters(path: Path) -> dict[str, Any]:
    reply = request(path, {"op": "status"}, timeout=REPLY_TIMEOUT_S)
    assert reply["ok"] is True
    return reply["counters"]


# --------------------------------------------------------------------------------------------
# strategies: entries that are each invalid for a known reason


def good_entry(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "userId": "alice",
        "action": "code_edit",
        "timestamp": BASE_TS,
        "metadata": {"taskId": "t1", "duration": 10},
    }
    doc.update(changes)
    return doc


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
not_a_string = json_values.filter(lambda v: not isinstance(v, str))
not_an_int = json_values.filter(lambda v: isinstance(v, bool) or not isinstance(v, int))
action_chars = "abcxyzABC019_.:-"
ACTION_ALLOWED = set(string.ascii_letters + string.digits + "_.:-")


@st.composite
def bad_entries(draw: st.DrawFn) -> tuple[bytes, str]:
    """One invalid entry as JSON bytes, with a word its rejection must contain."""
    kind = draw(
        st.sampled_from(
            [
                "not_object",
                "unknown_key",
                "user_type",
                "user_length",
                "user_missing",
                "action_type",
                "action_chars",
                "action_length",
                "ts_type",
                "ts_range",
                "meta_type",
                "meta_known",
                "meta_deep",
                "entry_id",
                "too_big",
            ]
        )
    )
    if kind == "not_object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return orjson.dumps(value), "must be a JSON object"
    if kind == "unknown_key":
        key = draw(st.text(max_size=20).filter(lambda k: k not in FIELDS))
        return orjson.dumps({**good_entry(), key: draw(json_values)}), "unknown key"
    if kind == "user_type":
        return orjson.dumps(good_entry(userId=draw(not_a_string))), "userId"
    if kind == "user_length":
        n = draw(st.sampled_from([0, 129, 1000, 40_000]))
        return orjson.dumps(good_entry(userId="u" * n)), "userId"
    if kind == "user_missing":
        doc = good_entry()
        del doc["userId"]
        return orjson.dumps(doc), "userId"
    if kind == "action_type":
        return orjson.dumps(good_entry(action=draw(not_a_string))), "action"
    if kind == "action_chars":
        good = draw(st.text(alphabet=action_chars, max_size=10))
        bad = draw(
            st.text(min_size=1, max_size=3).filter(
                lambda t: any(c not in ACTION_ALLOWED for c in t)
            )
        )
        return orjson.dumps(good_entry(action=good + bad)), "action"
    if kind == "action_length":
        return orjson.dumps(good_entry(action="a" * draw(st.integers(65, 3000)))), "action"
    if kind == "ts_type":
        value = draw(not_an_int | st.sampled_from(["2024-01-01", str(BASE_TS), float(BASE_TS)]))
        return orjson.dumps(good_entry(timestamp=value)), "timestamp"
    if kind == "ts_range":
        value = draw(
            st.integers(min_value=-(2**63), max_value=946_684_799_999)
            | st.integers(min_value=4_102_444_800_000, max_value=2**63 - 1)  # after 2100
        )
        return orjson.dumps(good_entry(timestamp=value)), "timestamp"
    if kind == "meta_type":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return orjson.dumps(good_entry(metadata=value)), "metadata"
    if kind == "meta_known":
        key = draw(st.sampled_from(["sessionId", "taskId", "duration"]))
        if key == "duration":
            value = draw(not_an_int | st.integers(min_value=-(2**63), max_value=-1))
        else:
            value = draw(not_a_string)
        return orjson.dumps(good_entry(metadata={key: value})), f"metadata.{key}"
    if kind == "meta_deep":
        depth = draw(st.integers(9, 900))
        opener, closer = draw(st.sampled_from([(b'{"k":', b"}"), (b"[", b"]")]))
        inner = opener * (depth - 1) + b"{}" + closer * (depth - 1)
        if opener == b"[":
            inner = b'{"k":' + b"[" * (depth - 2) + b"{}" + b"]" * (depth - 2) + b"}"
        doc = orjson.dumps(good_entry(metadata={}))
        return doc.replace(b'"metadata":{}', b'"metadata":' + inner), "nested deeper than 8"
    if kind == "entry_id":
        value = draw(not_a_string | st.sampled_from(["", "e" * 129]))
        return orjson.dumps(good_entry(entryId=value)), "entryId"
    # too_big: valid fields, but the whole entry is over maxEntryBytes
    pad = draw(st.integers(MAX_ENTRY, MAX_REQUEST // 2))
    return orjson.dumps(good_entry(metadata={"note": "n" * pad})), "maxEntryBytes"


def add_line(entries: list[bytes]) -> bytes:
    return b'{"op":"add","entries":[' + b",".join(entries) + b"]}\n"


# --------------------------------------------------------------------------------------------
# entries


@settings(EXAMPLES, max_examples=100)
@given(bad=st.lists(bad_entries(), min_size=1, max_size=5), good_at=st.none() | st.integers(0, 5))
def test_bad_entries_are_rejected_by_index_and_field(
    sock: Path, bad: list[tuple[bytes, str]], good_at: int | None
) -> None:
    items = [data for data, _ in bad]
    words = [word for _, word in bad]
    if good_at is not None:
        # One good entry among the bad ones is still accepted: the rest of a request is kept.
        good_at = min(good_at, len(items))
        items.insert(good_at, orjson.dumps(good_entry(entryId=f"bad-input-good-{next(_unique)}")))
        words.insert(good_at, "")
    data = add_line(items)
    assume(len(data) <= MAX_REQUEST)
    before = counters(sock)
    reply = exchange(sock, data)
    assert reply["ok"] is True, reply
    assert reply["accepted"] == (0 if good_at is None else 1)
    assert reply["duplicates"] == 0
    rejected = reply["rejected"]
    expected_indexes = [i for i, w in enumerate(words) if w]
    assert [r["index"] for r in rejected] == expected_indexes
    for r in rejected:
        error = r["error"]
        assert "\n" not in error
        assert error.startswith(f"entry {r['index'] + 1}: "), error
        assert words[r["index"]] in error, (words[r["index"]], error)
    after = counters(sock)
    assert after["rejected"] - before["rejected"] == len(expected_indexes)
    assert after["accepted"] - before["accepted"] == (0 if good_at is None else 1)
    still_serving(sock)


def test_a_redaction_is_counted_once_when_another_entry_is_too_large(sock: Path) -> None:
    """The compiled path redacts, then finds an entry over maxEntryBytes and hands the
    request to the validator, which redacts its own parse again: counted once, not twice."""
    secret = good_entry(entryId=f"bad-input-secret-{next(_unique)}")
    secret["metadata"]["password"] = "hunter2"
    large = good_entry(metadata={"note": "x" * MAX_ENTRY})
    before = counters(sock)
    reply = exchange(sock, add_line([orjson.dumps(secret), orjson.dumps(large)]))
    assert reply["accepted"] == 1 and [r["index"] for r in reply["rejected"]] == [1], reply
    after = counters(sock)
    assert after["redactedEntries"] - before["redactedEntries"] == 1
    assert after["redactedValues"] - before["redactedValues"] == 1


@EXAMPLES
@given(value=json_values.filter(lambda v: not isinstance(v, list)))
def test_entries_must_be_a_list(sock: Path, value: Any) -> None:
    reply = exchange(sock, orjson.dumps({"op": "add", "entries": value}) + b"\n")
    assert_error(reply, "entries")
    still_serving(sock)


def test_add_without_entries(sock: Path) -> None:
    assert_error(exchange(sock, b'{"op":"add"}\n'), "entries")
    still_serving(sock)


def test_empty_entries_list_is_fine(sock: Path) -> None:
    reply = exchange(sock, b'{"op":"add","entries":[]}\n')
    assert reply == {"ok": True, "accepted": 0, "duplicates": 0, "rejected": []}


@pytest.mark.parametrize("depth", [9, 100, 1000])
def test_deep_metadata_is_rejected_not_fatal(sock: Path, depth: int) -> None:
    inner = b'{"k":' * (depth - 1) + b"{}" + b"}" * (depth - 1)
    entry = orjson.dumps(good_entry()).replace(
        b'"metadata":{"taskId":"t1","duration":10}', b'"metadata":' + inner
    )
    reply = exchange(sock, add_line([entry]))
    assert reply["ok"] is True
    (rejected,) = reply["rejected"]
    assert "metadata: nested deeper than 8 levels" in rejected["error"]
    still_serving(sock)


def test_nesting_beyond_the_json_parser_limit(sock: Path) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    assert_error(exchange(sock, b'{"op":"add","entries":[' + deep + b"]}\n"), "malformed JSON")
    still_serving(sock)


def test_deep_wrong_typed_field_is_a_rejection(sock: Path) -> None:
    deep = b"[" * 1015 + b"]" * 1015
    entry = orjson.dumps(good_entry()).replace(b'"alice"', deep)
    try:
        reply = exchange(sock, add_line([entry]))
        assert reply["ok"] is True, reply
        (rejected,) = reply["rejected"]
        assert "userId" in rejected["error"]
    finally:
        still_serving(sock)


@EXAMPLES
@given(text=st.text(min_size=1, max_size=30))
def test_strings_with_escapes_and_controls(sock: Path, text: str) -> None:
    # Control characters, quotes and non-ASCII in every string field: a valid JSON request
    # whose entry is rejected (action charset) or accepted, never an error.
    doc = good_entry(
        userId=text,
        action=text,
        metadata={"sessionId": text, text: text},
        entryId=f"esc-{next(_unique)}",
    )
    reply = exchange(sock, add_line([orjson.dumps(doc)]))
    assert reply["ok"] is True, reply
    assert reply["accepted"] + len(reply["rejected"]) == 1
    if reply["rejected"]:
        assert reply["rejected"][0]["error"].startswith("entry 1: ")
    still_serving(sock)


@pytest.mark.parametrize(
    "escape",
    [b"\\ud800", b"\\udfff", b"\\ud800\\u0041", b"\\u00", b"\\x41", b"\\"],
)
def test_bad_escapes_in_strings(sock: Path, escape: bytes) -> None:
    line = b'{"op":"add","entries":[{"userId":"a' + escape + b'","action":"a","timestamp":%d}]}\n'
    reply = exchange(sock, line % BASE_TS)
    if reply["ok"]:
        (rejected,) = reply["rejected"]
        assert rejected["error"].startswith("entry 1: ")
    else:
        assert_error(reply)
    still_serving(sock)


# --------------------------------------------------------------------------------------------
# malformed requests


@EXAMPLES
@given(value=json_values.filter(lambda v: not isinstance(v, dict)))
def test_non_object_requests(sock: Path, value: Any) -> None:
    assert_error(exchange(sock, orjson.dumps(value) + b"\n"), "must be a JSON object")
    still_serving(sock)


@EXAMPLES
@given(
    op=json_values.filter(lambda v: v not in KNOWN_OPS),
    extra=st.dictionaries(st.text(max_size=5), json_values, max_size=3),
)
def test_unknown_ops(sock: Path, op: Any, extra: dict[str, Any]) -> None:
    request_doc = {**extra, "op": op}
    assert_error(exchange(sock, orjson.dumps(request_doc) + b"\n"), "unknown op")
    still_serving(sock)


def test_request_without_op(sock: Path) -> None:
    assert_error(exchange(sock, b'{"entries":[]}\n'), "unknown op")
    still_serving(sock)


def test_deeply_nested_op_gets_a_reply(sock: Path) -> None:
    try:
        reply = exchange(sock, b'{"op":' + b"[" * 1015 + b"]" * 1015 + b"}\n")
        assert_error(reply, "unknown op")
    finally:
        still_serving(sock)


def valid_requests() -> st.SearchStrategy[bytes]:
    add = st.lists(st.just(good_entry()), min_size=1, max_size=3).map(
        lambda es: orjson.dumps({"op": "add", "entries": es})
    )
    return add | st.sampled_from([b'{"op":"ping"}', b'{"op":"status"}', b'{"op": "flush"}'])


@EXAMPLES
@given(data=valid_requests(), cut=st.floats(0.0, 0.999))
def test_truncated_json(sock: Path, data: bytes, cut: float) -> None:
    truncated = data[: max(1, int(len(data) * cut))]
    assert_error(exchange(sock, truncated + b"\n"), "malformed JSON")
    still_serving(sock)


@EXAMPLES
@given(data=valid_requests(), cut=st.floats(0.0, 1.0))
def test_unterminated_request_then_eof(sock: Path, data: bytes, cut: float) -> None:
    partial = data[: max(1, int(len(data) * cut))]
    assert_error(exchange(sock, partial, half_close=True), "not terminated by a newline")
    still_serving(sock)


@EXAMPLES
@given(
    head=st.binary(max_size=40),
    bad=st.sampled_from([b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80"]),
    tail=st.binary(max_size=40),
)
def test_non_utf8_bytes(sock: Path, head: bytes, bad: bytes, tail: bytes) -> None:
    line = (head + bad + tail).replace(b"\n", b" ")
    assert_error(exchange(sock, line + b"\n"))
    still_serving(sock)


def test_non_utf8_inside_a_string(sock: Path) -> None:
    line = b'{"op":"add","entries":[{"userId":"al\xffce","action":"a","timestamp":%d}]}\n'
    assert_error(exchange(sock, line % BASE_TS), "malformed JSON")
    still_serving(sock)


@settings(max_examples=12, deadline=None)
@given(
    size=st.integers(MAX_REQUEST + 2, 4 * MAX_REQUEST), filler=st.sampled_from([b"x", b" ", b"{"])
)
def test_line_over_max_request_bytes(sock: Path, size: int, filler: bytes) -> None:
    with connect(sock) as s:
        send(s, filler * size + b"\n")
        reader = s.makefile("rb")
        assert_error(read_reply(reader), "request_too_large", str(MAX_REQUEST))
        # The rest of the line cannot be framed: the daemon closes the connection cleanly.
        with contextlib.suppress(ConnectionResetError):
            assert reader.read() == b""
    still_serving(sock)


def test_request_of_exactly_max_request_bytes_is_served(sock: Path) -> None:
    body = b'{"op":"ping"}'
    body += b" " * (MAX_REQUEST - len(body))
    assert len(body) == MAX_REQUEST
    assert exchange(sock, body + b"\n") == {"ok": True}


def test_request_of_one_byte_over_max_request_bytes_is_refused(sock: Path) -> None:
    body = b'{"op":"ping"}'
    body += b" " * (MAX_REQUEST + 1 - len(body))
    try:
        assert_error(exchange(sock, body + b"\n"), "request_too_large")
    finally:
        still_serving(sock)


def test_valid_json_add_over_max_request_bytes(sock: Path) -> None:
    entries = [good_entry(metadata={"pad": "p" * 1000}) for _ in range(80)]
    data = orjson.dumps({"op": "add", "entries": entries}) + b"\n"
    assert len(data) > MAX_REQUEST
    before = counters(sock)
    assert_error(exchange(sock, data), "request_too_large")
    assert counters(sock)["accepted"] == before["accepted"]
    still_serving(sock)


# --------------------------------------------------------------------------------------------
# one connection, many bad requests


def test_connection_stays_usable_after_errors(sock: Path) -> None:
    lines = [
        (b"{nope\n", "malformed JSON"),
        (b"[1,2,3]\n", "must be a JSON object"),
        (b'{"op":"dance"}\n', "unknown op"),
        (b'{"op":"add","entries":{"a":1}}\n', "entries"),
        (b"\xff\xfe\xfd\n", ""),
    ]
    with connect(sock) as s:
        reader = s.makefile("rb")
        for data, word in lines:
            send(s, data)
            assert_error(read_reply(reader), word)
        # Blank lines are skipped without a reply.
        send(s, b"\n  \n" + add_line([b'"x"']))
        reply = read_reply(reader)
        assert reply["ok"] is True
        assert reply["rejected"][0]["error"].startswith("entry 1: must be a JSON object")
        send(s, b'{"op":"ping"}\n')
        assert read_reply(reader) == {"ok": True}


def test_pipelined_requests_get_replies_in_order(sock: Path) -> None:
    batch = b"".join(
        [b'{"op":"ping"}\n', b"garbage\n", b'{"op":"ping"}\n', b"[]\n", b'{"op":"ping"}\n']
    )
    with connect(sock) as s:
        send(s, batch)
        reader = s.makefile("rb")
        replies = [read_reply(reader) for _ in range(5)]
    assert [r["ok"] for r in replies] == [True, False, True, False, True]


def test_abrupt_disconnects_do_not_hurt(sock: Path) -> None:
    for data in [b"", b'{"op":"add","entries":[', b'{"op":"ping"}\n', b"x" * 100_000]:
        s = connect(sock)
        send(s, data)
        s.close()  # without reading any reply
    still_serving(sock)


def test_daemon_still_consistent_after_abuse(sock: Path) -> None:
    reply = request(
        sock,
        {"op": "add", "entries": [good_entry(entryId=f"final-{next(_unique)}")]},
        timeout=REPLY_TIMEOUT_S,
    )
    assert reply == {"ok": True, "accepted": 1, "duplicates": 0, "rejected": []}
    flushed = request(sock, {"op": "flush"}, timeout=REPLY_TIMEOUT_S)
    assert flushed["ok"] is True
    status = request(sock, {"op": "status"}, timeout=REPLY_TIMEOUT_S)
    assert status["buffered"]["entries"] == 0
