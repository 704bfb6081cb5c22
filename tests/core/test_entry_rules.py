"""SPEC §3's rules against what a database or a columnar file cannot hold: no U+0000 in any
string, type-checked integers within a signed 64-bit integer. Each is refused at ingest, by
the socket's `add` and by the spool alike, naming the field; its batch-mates are stored."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.harness import DaemonProc, entry, request, start_daemon, stored_id_counts, wait_for

INT64_MAX = 2**63 - 1

# (entry, the field its rejection must name)
REFUSED: list[tuple[dict[str, Any], str]] = [
    (entry(0, userId="ali\u0000ce"), "userId"),
    (entry(0, entryId="id\u0000"), "entryId"),
    (entry(0, metadata={"taskId": "t\u0000"}), "metadata.taskId"),
    (entry(0, metadata={"a": {"b": ["ok", "deep\u0000"]}}), "metadata.a.b[1]"),
    (entry(0, metadata={"a": {"k\u0000": 1}}), "metadata.a key"),
    (entry(0, metadata={"duration": 2**64 - 1}), "metadata.duration"),
    (entry(0, metadata={"duration": INT64_MAX + 1}), "metadata.duration"),
]
# Close to the rules and accepted: a backslash before "u0000" is not a NUL, int64's top fits.
ACCEPTED = [
    entry(1, metadata={"note": "\\u0000", "duration": INT64_MAX}),
    entry(2, userId="\\u0000"),
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    proc = start_daemon(tmp_path_factory.mktemp("rules") / "data", {"batchSize": 1})
    try:
        yield proc
    finally:
        proc.kill()


def with_ids(entries: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [{"entryId": f"{prefix}{i}", **e} for i, e in enumerate(entries)]


@pytest.mark.parametrize(("bad", "field"), REFUSED, ids=[f for _, f in REFUSED])
def test_add_refuses_by_field_and_keeps_the_rest(
    daemon: DaemonProc, bad: dict[str, Any], field: str
) -> None:
    prefix = f"add-{REFUSED.index((bad, field))}-"
    good = with_ids(ACCEPTED, prefix)
    reply = request(daemon.layout.socket, {"op": "add", "entries": [good[0], bad, good[1]]})
    assert reply["ok"] and reply["accepted"] == 2, reply
    [rejected] = reply["rejected"]
    assert rejected["index"] == 1  # 0-based in JSON; a person reads "entry 2"
    error = rejected["error"]
    assert error.startswith(f"entry 2: {field}") and "\n" not in error, error
    assert ("U+0000" in error) != ("duration" in field), error
    counts = wait_for(lambda: (c := stored_id_counts(daemon.root)) and c[f"{prefix}1"] and c)
    assert counts[f"{prefix}0"] == counts[f"{prefix}1"] == 1


def test_spool_refuses_by_field_and_keeps_the_rest(daemon: DaemonProc) -> None:
    layout = daemon.layout
    good = with_ids(ACCEPTED, "spool-")
    lines = [orjson.dumps(e) for e in [good[0], *(bad for bad, _ in REFUSED), good[1]]]
    tmp = layout.inbox / "rules.tmp"
    tmp.write_bytes(b"\n".join(lines) + b"\n")
    os.rename(tmp, layout.inbox / "rules.jsonl")
    reasons: list[Path] = wait_for(lambda: list(layout.errors.glob("*rules.jsonl*.reason.json")))
    [reason] = [orjson.loads(p.read_bytes()) for p in reasons]
    errors = reason["errors"]
    assert len(errors) == len(REFUSED), errors
    for (_, field), error in zip(REFUSED, errors, strict=True):
        assert f": {field}" in error, (field, error)
    counts = wait_for(lambda: (c := stored_id_counts(daemon.root)) and c["spool-1"] and c)
    assert counts["spool-0"] == counts["spool-1"] == 1
