"""Batch files (SPEC §5) and the crash-safe file primitives (SPEC §1.2, §1.3)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowagg import BATCH_FORMAT_VERSION
from flowagg.batches.storage import (
    TRIGGERS,
    Batch,
    CorruptBatch,
    batch_file_name,
    batch_locations,
    decode_batch,
    encode_batch,
    entries_array,
    find_batch,
    iter_batch_files,
    make_batch_id,
    read_batch,
)
from flowagg.core import fsutil
from flowagg.core.fsutil import (
    TEMP_MARK,
    atomic_write,
    is_disk_full,
    quarantine_bytes,
    quarantine_file,
    remove_stale_temps,
)
from flowagg.core.layout import Layout

NOW = 1_704_067_200_000
SPEC_KEYS = [
    "batchId",
    "timestamp",
    "version",
    "trigger",
    "entries",
    "entryCount",
    "entriesSha256",
    "recovered",
]


def entry(i: int, **meta: Any) -> dict[str, Any]:
    return {
        "userId": f"user{i}",
        "action": "code_edit",
        "timestamp": NOW + i,
        "metadata": {"taskId": f"t{i}", "duration": i, **meta},
        "entryId": f"id-{i:04d}",
    }


def make_batch(entries: list[dict[str, Any]], trigger: str = "size", first_seq: int = 1) -> Batch:
    return Batch(
        batch_id=make_batch_id(NOW, first_seq),
        trigger=trigger,
        entries=[orjson.dumps(e) for e in entries],
        first_seq=first_seq,
        last_seq=first_seq + len(entries) - 1,
        entry_ids=[e["entryId"] for e in entries],
    )


def no_temps(directory: Path) -> bool:
    return not [n for n in os.listdir(directory) if n.startswith(TEMP_MARK)]


# --------------------------------------------------------------------------------------------
# encoding


@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("recovered", [False, True])
def test_encoded_batch_has_exactly_the_spec_keys(trigger: str, recovered: bool) -> None:
    entries = [entry(i) for i in range(3)]
    batch = make_batch(entries, trigger)
    data = encode_batch(batch, timestamp_ms=NOW + 99, recovered=recovered)
    doc = orjson.loads(data)
    assert list(doc) == SPEC_KEYS
    assert doc["batchId"] == batch.batch_id
    assert doc["timestamp"] == NOW + 99
    assert doc["version"] == BATCH_FORMAT_VERSION == "2.0.0"
    assert doc["trigger"] == trigger
    assert doc["entries"] == entries
    assert doc["entryCount"] == 3
    assert doc["recovered"] is recovered
    assert b"\n" not in data  # compact


def test_checksum_is_sha256_of_orjson_dumps_of_entries() -> None:
    entries = [entry(1, note="ünïcødé ✓ 日本"), entry(2, nested={"a": [1, 2.5, None, True]})]
    doc = orjson.loads(encode_batch(make_batch(entries), timestamp_ms=NOW))
    expected = hashlib.sha256(orjson.dumps(entries)).hexdigest()
    assert doc["entriesSha256"] == expected
    assert len(expected) == 64
    # Non-ASCII characters are stored as UTF-8, not \\u escapes.
    assert "ünïcødé ✓ 日本".encode() in encode_batch(make_batch(entries), timestamp_ms=NOW)


def test_entries_array_is_compact_json() -> None:
    parts = [orjson.dumps(entry(i)) for i in range(3)]
    assert entries_array(parts) == orjson.dumps([entry(i) for i in range(3)])
    assert entries_array([]) == b"[]"


def test_batch_names() -> None:
    batch_id = make_batch_id(NOW, 42)
    assert batch_id == "1704067200000_000000000042"
    assert batch_file_name(batch_id) == "batch_1704067200000_000000000042.json"


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    metas=st.lists(
        st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=8
    ),
    trigger=st.sampled_from(TRIGGERS),
)
def test_encode_decode_round_trip(metas: list[dict[str, Any]], trigger: str) -> None:
    entries = [{**entry(i), "metadata": meta} for i, meta in enumerate(metas)]
    data = encode_batch(make_batch(entries, trigger), timestamp_ms=NOW)
    doc = decode_batch(data)
    assert doc["entries"] == entries
    assert doc["entryCount"] == len(entries)
    assert doc["entriesSha256"] == hashlib.sha256(orjson.dumps(doc["entries"])).hexdigest()


# --------------------------------------------------------------------------------------------
# decoding


def good_doc() -> dict[str, Any]:
    return orjson.loads(encode_batch(make_batch([entry(i) for i in range(4)]), timestamp_ms=NOW))


def test_decode_accepts_a_good_batch() -> None:
    assert decode_batch(orjson.dumps(good_doc()))["entryCount"] == 4


def test_decode_rejects_a_wrong_checksum() -> None:
    doc = good_doc()
    doc["entriesSha256"] = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(CorruptBatch, match="entriesSha256"):
        decode_batch(orjson.dumps(doc))


def test_decode_rejects_a_changed_entry() -> None:
    doc = good_doc()
    doc["entries"][2]["metadata"]["duration"] = 999
    with pytest.raises(CorruptBatch, match="entriesSha256"):
        decode_batch(orjson.dumps(doc))


@pytest.mark.parametrize("count", [0, 3, 5, -1])
def test_decode_rejects_a_wrong_count(count: int) -> None:
    doc = good_doc()
    doc["entryCount"] = count
    with pytest.raises(CorruptBatch, match="entryCount"):
        decode_batch(orjson.dumps(doc))


def test_decode_rejects_a_dropped_entry_with_a_matching_count() -> None:
    doc = good_doc()
    doc["entries"].pop()
    doc["entryCount"] = 3
    with pytest.raises(CorruptBatch, match="entriesSha256"):
        decode_batch(orjson.dumps(doc))


def test_decode_rejects_every_truncation() -> None:
    data = encode_batch(make_batch([entry(i) for i in range(3)]), timestamp_ms=NOW)
    for cut in range(len(data)):
        with pytest.raises(CorruptBatch):
            decode_batch(data[:cut])


@pytest.mark.parametrize("key", ["batchId", "entries", "entryCount", "entriesSha256"])
def test_decode_rejects_a_missing_key(key: str) -> None:
    doc = good_doc()
    del doc[key]
    with pytest.raises(CorruptBatch, match=f"missing {key}"):
        decode_batch(orjson.dumps(doc))


@pytest.mark.parametrize("data", [b"[]", b"5", b'"x"', b"null", b"\xff\xfe", b""])
def test_decode_rejects_non_objects_and_garbage(data: bytes) -> None:
    with pytest.raises(CorruptBatch):
        decode_batch(data)


def test_decode_rejects_entries_that_are_not_an_array() -> None:
    doc = good_doc()
    doc["entries"] = {"0": entry(0)}
    with pytest.raises(CorruptBatch, match="not an array"):
        decode_batch(orjson.dumps(doc))


# --------------------------------------------------------------------------------------------
# lookup


def test_find_and_iterate_batch_files(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    layout.prepare()
    ids = [make_batch_id(NOW, s) for s in (1, 5, 9, 12)]
    data = encode_batch(make_batch([entry(0)]), timestamp_ms=NOW)
    atomic_write(layout.aggregated / batch_file_name(ids[1]), data)
    atomic_write(layout.aggregated / batch_file_name(ids[0]), data)
    atomic_write(layout.recovery / f"{ids[2]}.failed.json", data)
    atomic_write(layout.abandoned / f"{ids[3]}.abandoned.json", data)
    (layout.aggregated / "notes.txt").write_text("not a batch")
    assert batch_locations(layout, ids[0])[0] == layout.aggregated / batch_file_name(ids[0])
    assert find_batch(layout, ids[0]) == layout.aggregated / batch_file_name(ids[0])
    assert find_batch(layout, ids[2]) == layout.recovery / f"{ids[2]}.failed.json"
    assert find_batch(layout, ids[3]) == layout.abandoned / f"{ids[3]}.abandoned.json"
    assert find_batch(layout, make_batch_id(NOW, 77)) is None
    assert [p.name for p in iter_batch_files(layout)] == [
        batch_file_name(ids[0]),
        batch_file_name(ids[1]),
        f"{ids[2]}.failed.json",
        f"{ids[3]}.abandoned.json",
    ]
    assert read_batch(layout.aggregated / batch_file_name(ids[0]))["entries"] == [entry(0)]


# --------------------------------------------------------------------------------------------
# atomic_write


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_write(target, b"first")
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write(target, b"second, longer than the first")
    assert target.read_bytes() == b"second, longer than the first"
    atomic_write(target, b"")
    assert target.read_bytes() == b""
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_atomic_write_large_data(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    atomic_write(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data
    assert no_temps(tmp_path)


def test_atomic_write_fsync_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.json"
    atomic_write(target, b"old")

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    with pytest.raises(OSError) as info:
        atomic_write(target, b"new")
    assert info.value.errno == errno.EIO
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_atomic_write_fsync_failure_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.json", b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_atomic_write_short_writes_are_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:3]))  # the kernel may accept less than asked

    monkeypatch.setattr(fsutil.os, "write", write)
    atomic_write(tmp_path / "f", b"0123456789abcdef")
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == b"0123456789abcdef"


def test_atomic_write_rename_failure_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.json"
    atomic_write(target, b"old")

    def rename(src: Any, dst: Any) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fsutil.os, "rename", rename)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_atomic_write_enospc_on_a_full_disk(fs: Any) -> None:
    directory = Path("/data/aggregated")
    fs.create_dir(directory)
    target = directory / "batch.json"
    atomic_write(target, b"old contents")
    fs.set_disk_usage(4096)
    with pytest.raises(OSError) as info:
        atomic_write(target, b"x" * 10_000)
    assert is_disk_full(info.value)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(directory) == ["batch.json"]
    # Space comes back: the next write goes through.
    fs.set_disk_usage(10 * 1024 * 1024)
    atomic_write(target, b"y" * 10_000)
    assert target.read_bytes() == b"y" * 10_000
    assert os.listdir(directory) == ["batch.json"]


def test_atomic_write_enospc_for_a_new_file(fs: Any) -> None:
    directory = Path("/data")
    fs.create_dir(directory)
    fs.set_disk_usage(1000)
    with pytest.raises(OSError) as info:
        atomic_write(directory / "health.json", b"z" * 5000)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(directory) == []


# --------------------------------------------------------------------------------------------
# stale temps and quarantine


def test_remove_stale_temps_only_removes_marked_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    stale = [a / f"{TEMP_MARK}batch.json.123", b / f"{TEMP_MARK}x.456"]
    keep = [
        a / "batch_1.json",
        a / "client.json.tmp",  # a client's spool temp is not ours
        a / "x.flowagg-tmp-",  # the mark elsewhere in the name does not count
        b / ".hidden",
    ]
    for p in stale + keep:
        p.write_bytes(b"data")
    removed = remove_stale_temps([a, b, tmp_path / "missing"])
    assert sorted(removed) == sorted(stale)
    assert all(not p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    assert remove_stale_temps([a, b]) == []


def test_quarantine_file_moves_and_explains(tmp_path: Path) -> None:
    errors = tmp_path / "errors"
    errors.mkdir()
    src_dir = tmp_path / "recovery"
    src_dir.mkdir()
    src = src_dir / "b1.failed.json"
    src.write_bytes(b"{broken")
    target = quarantine_file(errors, src, reason="not valid JSON", component="recovery", now_ms=NOW)
    assert not src.exists()
    assert target == errors / "b1.failed.json"
    assert target.read_bytes() == b"{broken"
    reason = orjson.loads((errors / "b1.failed.json.reason.json").read_bytes())
    assert reason == {
        "file": "b1.failed.json",
        "originalPath": str(src),
        "reason": "not valid JSON",
        "component": "recovery",
        "quarantinedAt": NOW,
    }
    assert no_temps(errors)


def test_quarantine_file_never_overwrites(tmp_path: Path) -> None:
    errors = tmp_path / "errors"
    errors.mkdir()
    contents = []
    targets = []
    for i in range(3):
        src = tmp_path / "same.json"
        src.write_bytes(b"version %d" % i)
        contents.append(b"version %d" % i)
        targets.append(quarantine_file(errors, src, reason=f"r{i}", component="t", now_ms=NOW))
    assert [t.name for t in targets] == ["same.json", "same.json.1", "same.json.2"]
    assert [t.read_bytes() for t in targets] == contents
    for i, t in enumerate(targets):
        reason = orjson.loads(t.with_name(t.name + ".reason.json").read_bytes())
        assert reason["reason"] == f"r{i}"
        assert reason["file"] == t.name


def test_quarantine_bytes_unique_and_overwrite(tmp_path: Path) -> None:
    errors = tmp_path / "errors"
    errors.mkdir()
    first = quarantine_bytes(errors, "x.bad", b"1", reason="r", component="c", now_ms=NOW)
    second = quarantine_bytes(
        errors, "x.bad", b"2", reason="r", component="c", now_ms=NOW, extra={"offset": 7}
    )
    assert (first.name, second.name) == ("x.bad", "x.bad.1")
    assert orjson.loads((errors / "x.bad.1.reason.json").read_bytes())["offset"] == 7
    again = quarantine_bytes(
        errors, "x.bad", b"3", reason="r", component="c", now_ms=NOW, overwrite=True
    )
    assert again == first
    assert first.read_bytes() == b"3"
    assert second.read_bytes() == b"2"


# --------------------------------------------------------------------------------------------
# small helpers


@pytest.mark.parametrize(
    ("code", "full"),
    [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EIO, False), (errno.EACCES, False)],
)
def test_is_disk_full(code: int, full: bool) -> None:
    assert is_disk_full(OSError(code, os.strerror(code))) is full
    assert is_disk_full(ValueError("no")) is False
