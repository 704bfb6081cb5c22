"""Spool intake against a hostile inbox/ (SPEC §4.2, §12 "Hostile files").

An in-process pipeline and SpoolIntake on real files: special files, names of any bytes up to
255, lines that cannot be re-serialized, files of any size (streamed in chunks, resumed after
a crash), a full disk at start and a stop while intake waits.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flowagg.batches.storage import iter_batch_files, read_batch
from flowagg.core.clock import EntryIdFactory, SystemClock
from flowagg.core.config import load_config
from flowagg.core.fsutil import NAME_MAX, quarantine_bytes, quarantine_file
from flowagg.core.layout import Layout
from flowagg.delivery.recovery import write_completed
from flowagg.ingest import spool as spool_mod
from flowagg.ingest.add_result import AddResult
from flowagg.ingest.pipeline import Pipeline
from flowagg.ingest.spool import SpoolIntake
from flowagg.ingest.spool_read import CHUNK_LINES, read_chunk
from flowagg.journal.public import list_segments, scan_root, unframe
from tests.harness import DaemonProc, entry, ping, request, start_daemon, stored_id_counts, wait_for

WAIT_S = 20.0
MAX_ENTRY = 4096
MAX_FILE = 64 << 10


def line(i: int, **extra: Any) -> bytes:
    return orjson.dumps(entry(i, entryId=f"e{i}", **extra))


def deep(levels: int) -> bytes:
    """An entry nested deeper than orjson.dumps can write back (it stops at 255 levels)."""
    return b'{"userId":"u","action":"a","timestamp":1704067200000,"metadata":' + (
        b'{"k":' * levels + b"1" + b"}" * levels + b"}"
    )


class Rig:
    """A pipeline plus spool intake on `root`; `restart` is a new process on the same root."""

    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)
        self.layout.prepare()
        self.config = load_config(
            flags={
                "root": str(root),
                "maxAgeMs": 3_600_000,
                "batchSize": 100_000,
                "maxEntryBytes": MAX_ENTRY,
                "maxRequestBytes": MAX_FILE,
            },
            environ={},
        )
        self.pipeline: Pipeline | None = None
        self.spool: SpoolIntake | None = None

    async def start(self) -> SpoolIntake:
        result = scan_root(self.layout, self.config, now_ms=SystemClock().now_ms())
        self.pipeline = Pipeline(
            self.config,
            self.layout,
            SystemClock(),
            asyncio.get_running_loop(),
            EntryIdFactory(SystemClock(), random.Random(1)),
            next_retry_at=lambda now: now + 1000,
            store=lambda batch_id, data: write_completed(self.layout, batch_id, data),
        )
        self.pipeline.start(result)
        self.spool = SpoolIntake(self.layout, self.pipeline, rescan_s=0.05, max_file_bytes=MAX_FILE)
        await asyncio.wait_for(self.spool.recover(result.spool_sources), WAIT_S)
        return self.spool

    async def scan(self) -> int:
        assert self.spool is not None
        return await asyncio.wait_for(self.spool.scan_once(), WAIT_S)

    async def stop(self) -> None:
        if self.spool is not None:
            await asyncio.wait_for(self.spool.stop(), WAIT_S)
        if self.pipeline is not None:
            await asyncio.wait_for(self.pipeline.shutdown(), WAIT_S)
        self.spool = self.pipeline = None

    async def restart(self) -> SpoolIntake:
        await self.stop()
        return await self.start()

    def stored(self) -> Counter[str]:
        return Counter(
            e["entryId"] for p in iter_batch_files(self.layout) for e in read_batch(p)["entries"]
        )

    def reasons(self) -> list[dict[str, Any]]:
        return [orjson.loads(p.read_bytes()) for p in self.layout.errors.glob("*.reason.json")]

    def left(self) -> list[str]:
        return sorted(os.listdir(self.layout.inbox)) + sorted(os.listdir(self.layout.journal_spool))


async def adopted(rig: Rig, name: str) -> None:
    """Wait (with a deadline) until intake has taken `name` out of inbox/."""
    deadline = time.monotonic() + WAIT_S
    while rig.layout.inbox.joinpath(name).exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def run(root: Path, scenario: Callable[[Rig], Awaitable[None]]) -> None:
    async def main() -> None:
        rig = Rig(root)
        await rig.start()
        try:
            await scenario(rig)
        finally:
            await rig.stop()

    asyncio.run(main())


def test_a_line_nested_too_deep_to_write_back_costs_only_itself(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        bad = deep(300)
        (rig.layout.inbox / "mixed.jsonl").write_bytes(line(1) + b"\n" + bad + b"\n" + line(2))
        await rig.scan()
        assert rig.left() == []
        [rejected] = rig.layout.errors.glob("*mixed.jsonl.0.rejected.jsonl")
        assert rejected.read_bytes() == bad + b"\n"  # the raw bytes, never re-serialized
        [reason] = rig.reasons()
        assert reason["errorCount"] == 1 and "metadata" in reason["errors"][0]
        assert reason["originalName"] == "mixed.jsonl"
        await rig.restart()
        await rig.scan()

    run(root, scenario)
    assert Rig(root).stored() == {"e1": 1, "e2": 1}


def test_a_json_file_with_invalid_entries_is_copied_whole_with_their_indexes(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        data = b"[" + line(1) + b"," + deep(300) + b"," + line(2) + b',"x"]'
        (rig.layout.inbox / "doc.json").write_bytes(data)
        await rig.scan()
        [copy] = rig.layout.errors.glob("*doc.json.rejected.json")
        assert copy.read_bytes() == data
        [reason] = rig.reasons()
        assert reason["rejectedIndexes"] == [1, 3] and reason["errorCount"] == 2

    run(root, scenario)
    assert Rig(root).stored() == {"e1": 1, "e2": 1}


def test_special_files_are_quarantined_once_and_never_read(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.jsonl"
    target.write_bytes(line(9))

    async def scenario(rig: Rig) -> None:
        inbox = rig.layout.inbox
        os.mkfifo(inbox / "a.json")  # reading it would block forever
        os.symlink("/dev/zero", inbox / "b.jsonl")  # reading it would never end
        os.symlink(target, inbox / "c.jsonl")  # links are not followed, even to good files
        os.symlink(tmp_path / "missing", inbox / "d.json")
        (inbox / "e.json").mkdir()
        (inbox / "f.jsonl").write_bytes(line(1))
        await rig.scan()
        await rig.scan()
        assert rig.left() == []
        kinds = sorted(r["reason"].split(",")[0] for r in rig.reasons())
        assert kinds == ["a FIFO", "a directory"] + ["a symbolic link"] * 3
        assert all(os.path.lexists(rig.layout.errors / r["file"]) for r in rig.reasons())
        assert rig.spool is not None and rig.spool.files_quarantined == 5

    run(root, scenario)
    assert Rig(root).stored() == {"e1": 1}
    assert target.exists()


def test_a_special_file_swapped_in_after_adoption_is_quarantined(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        os.mkfifo(rig.layout.journal_spool / "1704067200000-000000-late.json")
        os.symlink("/dev/zero", rig.layout.journal_spool / "1704067200000-000001-z.jsonl")
        await rig.scan()
        assert rig.left() == []
        assert len(rig.reasons()) == 2
        assert {r["originalName"] for r in rig.reasons()} == {"late.json", "z.jsonl"}

    run(root, scenario)


def name_of(size: int, suffix: bytes, fill: bytes = b"n") -> str:
    raw = (fill * size)[: size - len(suffix)] + suffix
    assert len(raw) == size
    return os.fsdecode(raw)


def test_names_of_255_bytes_and_non_utf8_bytes_work(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        inbox = rig.layout.inbox
        (inbox / name_of(NAME_MAX, b".jsonl")).write_bytes(line(1) + b"\nnot json\n")
        (inbox / name_of(NAME_MAX, b".json", b"\xff")).write_bytes(line(2))
        (inbox / name_of(NAME_MAX, b".json", "é".encode())).write_bytes(b"[" + line(3) + b",1]")
        os.mkfifo(inbox / name_of(NAME_MAX, b".jsonl", b"\xfe"))
        (inbox / name_of(NAME_MAX, b".txt", b"\x80")).write_bytes(b"not a spool file")
        await rig.scan()
        assert rig.left() == []
        assert len(rig.reasons()) == 4
        for reason_file in rig.layout.errors.glob("*.reason.json"):
            assert os.path.lexists(str(reason_file).removesuffix(".reason.json"))
        names = [r["originalName"] for r in rig.reasons()]
        # Whole and readable, even where the adopted name was cut to fit its prefix.
        expected = {
            name_of(NAME_MAX, b, c) for b, c in [(b".jsonl", b"n"), (b".json", "é".encode())]
        }
        expected = {os.fsencode(n).decode("utf-8", "backslashreplace") for n in expected} | {
            "\\xfe" * (NAME_MAX - 6) + ".jsonl",
            "\\x80" * (NAME_MAX - 4) + ".txt",
        }
        assert sorted(names) == sorted(expected)

    run(root, scenario)
    assert Rig(root).stored() == {"e1": 1, "e2": 1, "e3": 1}


def test_quarantine_works_with_255_byte_names(tmp_path: Path) -> None:
    errors = tmp_path / "errors"
    errors.mkdir()
    name = name_of(NAME_MAX, b".json", b"\xff")
    for _ in range(3):  # the same name again takes a counter, still within 255 bytes
        src = tmp_path / name
        src.write_bytes(b"x")
        target = quarantine_file(errors, src, reason="r", component="test", now_ms=1)
        assert target.exists() and not src.exists()
        stored = quarantine_bytes(errors, name, b"y", reason="r", component="t", now_ms=1)
        assert stored.read_bytes() == b"y"
    assert len(list(errors.glob("*.reason.json"))) == 6


def test_each_chunk_of_a_long_named_file_keeps_its_own_rejected_copy(root: Path) -> None:
    body = b"\n".join(line(i) if i % CHUNK_LINES else b"bad" for i in range(2 * CHUNK_LINES + 1))

    async def scenario(rig: Rig) -> None:
        (rig.layout.inbox / name_of(NAME_MAX, b".jsonl")).write_bytes(body)
        await rig.scan()
        assert rig.left() == []
        copies = sorted(rig.layout.errors.glob("*.rejected.jsonl"))
        assert len(copies) == 3 and {c.read_bytes() for c in copies} == {b"bad\n"}

    run(root, scenario)
    assert len(Rig(root).stored()) == 2 * CHUNK_LINES - 2


def test_a_json_file_over_the_limit_is_quarantined_and_jsonl_is_streamed(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        count = MAX_FILE // 100
        big = b"\n".join(line(i) for i in range(count))
        assert len(big) > MAX_FILE
        (rig.layout.inbox / "big.json").write_bytes(b"[" + big.replace(b"\n", b",") + b"]")
        (rig.layout.inbox / "big.jsonl").write_bytes(big)
        await rig.scan()
        assert rig.left() == []
        [reason] = rig.reasons()
        assert "use .jsonl" in reason["reason"] and reason["originalName"] == "big.json"
        await rig.restart()

    run(root, scenario)
    assert Rig(root).stored() == {f"e{i}": 1 for i in range(MAX_FILE // 100)}


def test_chunks_are_deterministic_and_long_lines_are_not_buffered(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    lines = [b"x" * 50_000, b"\xff\x00 \r", b"", b"{}\r"] + [b"1"] * (CHUNK_LINES + 5) + [b"end"]
    path.write_bytes(b"\n".join(lines))
    fd = os.open(path, os.O_RDONLY)
    try:
        first = read_chunk(fd, 0, max_line=1000)
        assert len(first.lines) == CHUNK_LINES and not first.final
        assert first.lines[0].length == 50_000 and len(first.lines[0].data) < 50_000
        assert first.lines[1].data == b"\xff\x00 \r"
        second = read_chunk(fd, first.end, max_line=1000)
        assert second.final and second.lines[-1].data == b"end"
        assert second.end == path.stat().st_size
        assert [ln.length for ln in first.lines + second.lines] == [len(x) for x in lines]
        assert read_chunk(fd, first.end, max_line=1000) == second
    finally:
        os.close(fd)


def test_a_file_cut_short_by_a_crash_resumes_after_its_last_journaled_chunk(root: Path) -> None:
    count = 3 * CHUNK_LINES + 10
    body = b"\n".join(line(i) if i % 500 else b"garbage" for i in range(count)) + b"\n"

    async def scenario(rig: Rig) -> None:
        assert rig.pipeline is not None
        calls = 0
        real = rig.pipeline.add_valid

        async def full_after_two(*args: Any, **kw: Any) -> AddResult:
            nonlocal calls
            calls += 1
            if calls > 2:
                return AddResult(error="disk_full", retry_after_ms=1000)
            return await real(*args, **kw)

        rig.pipeline.add_valid = full_after_two  # type: ignore[method-assign]
        (rig.layout.inbox / "big.jsonl").write_bytes(body)
        await rig.scan()
        assert len(os.listdir(rig.layout.journal_spool)) == 1  # adopted, two chunks journaled
        before = {p.name: p.read_bytes() for p in rig.layout.errors.iterdir()}
        await rig.restart()  # like a crash after the second chunk: the journal holds two
        assert rig.left() == []
        after = {p.name: p.read_bytes() for p in rig.layout.errors.iterdir()}
        rejected = sorted(n for n in after if n.endswith(".rejected.jsonl"))
        assert len(rejected) == 4  # one file per chunk with a bad line, each written once
        for name in before:
            if name.endswith(".rejected.jsonl"):
                assert after[name] == before[name]

    run(root, scenario)
    assert Rig(root).stored() == {f"e{i}": 1 for i in range(count) if i % 500}


def test_a_full_disk_at_start_never_blocks_it(root: Path) -> None:
    adopted = "1704067200000-000000-tool.jsonl"

    async def scenario(rig: Rig) -> None:
        assert rig.pipeline is not None and rig.spool is not None
        await rig.stop()
        (rig.layout.journal_spool / adopted).write_bytes(line(1))
        waits = 0

        async def disk_full(*args: Any, **kw: Any) -> AddResult:
            nonlocal waits
            waits += 1
            return AddResult(error="disk_full", retry_after_ms=1000)

        original = Pipeline.add_valid
        Pipeline.add_valid = disk_full  # type: ignore[method-assign,assignment]
        try:
            started = time.monotonic()
            await rig.start()
            assert time.monotonic() - started < 5 and waits == 1
            assert rig.left() == [adopted]  # stays adopted, tried again at the next rescan
        finally:
            Pipeline.add_valid = original  # type: ignore[method-assign]
        await rig.scan()
        assert rig.left() == []

    run(root, scenario)
    assert Rig(root).stored() == {"e1": 1}


def test_stop_is_prompt_while_intake_waits_for_space(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        assert rig.pipeline is not None and rig.spool is not None
        rig.pipeline.aggregator.is_busy = lambda: True  # type: ignore[method-assign]
        (rig.layout.inbox / "a.jsonl").write_bytes(line(1))
        await rig.spool.start()
        await adopted(rig, "a.jsonl")
        started = time.monotonic()
        await rig.stop()
        assert time.monotonic() - started < 3
        await rig.start()  # the next start finishes the adopted file

    run(root, scenario)
    assert Rig(root).stored() == {"e1": 1}


def test_stop_cancels_intake_stuck_on_the_disk(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "STOP_GRACE_S", 0.2)

    async def scenario(rig: Rig) -> None:
        assert rig.pipeline is not None and rig.spool is not None
        stuck = asyncio.Event()

        async def hang(*args: Any, **kw: Any) -> AddResult:
            await stuck.wait()
            return AddResult(error="journal_unavailable: EIO", retry_after_ms=1000)

        rig.pipeline.add_valid = hang  # type: ignore[method-assign]
        (rig.layout.inbox / "a.jsonl").write_bytes(line(1))
        await rig.spool.start()
        await adopted(rig, "a.jsonl")
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await asyncio.wait_for(rig.spool.stop(), WAIT_S)
        assert time.monotonic() - started < 3
        stuck.set()
        rig.spool = None
        await rig.restart()  # the file stayed adopted; this start finishes it
        assert rig.left() == []

    run(root, scenario)
    assert Rig(root).stored() == {"e1": 1}


def test_an_unexpected_failure_quarantines_only_that_file(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        assert rig.pipeline is not None
        real, real_compiled = rig.pipeline.validate, rig.pipeline.validate_compiled

        def validate(items: list[Any]) -> Any:
            if items and items[0].get("entryId") == "e1":
                raise RuntimeError("a bug")
            return real(items)

        def validate_compiled(items: list[Any]) -> Any:  # the path valid lines take
            if items and items[0].entryId == "e1":
                raise RuntimeError("a bug")
            return real_compiled(items)

        rig.pipeline.validate = validate  # type: ignore[method-assign]
        rig.pipeline.validate_compiled = validate_compiled  # type: ignore[method-assign]
        (rig.layout.inbox / "a.jsonl").write_bytes(line(1))
        (rig.layout.inbox / "b.jsonl").write_bytes(line(2))
        await rig.scan()
        assert rig.left() == []
        [reason] = rig.reasons()
        assert reason["originalName"] == "a.jsonl" and "unexpectedly" in reason["reason"]

    run(root, scenario)
    assert Rig(root).stored() == {"e2": 1}


def test_new_adopted_names_never_take_an_old_one_after_the_clock_went_back(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        (rig.layout.journal_spool / "9000000000000-000000-old.jsonl").write_bytes(line(1))
        await rig.restart()
        (rig.layout.inbox / "new.jsonl").write_bytes(line(2))
        await rig.scan()
        records = [
            unframe(raw) for seg in list_segments(rig.layout.journal) for raw in seg.open("rb")
        ]
        sources = [r["src"] for r in records if r is not None and "src" in r]
        assert sources == ["9000000000000-000000-old.jsonl", "9000000000001-000000-new.jsonl"]

    run(root, scenario)
    assert Rig(root).stored() == {"e1": 1, "e2": 1}


def test_memory_of_finished_files_is_dropped(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        assert rig.spool is not None
        for i in range(20):
            (rig.layout.inbox / f"f{i}.jsonl").write_bytes(line(i))
        await rig.scan()
        assert rig.left() == [] and rig.spool._progress == {}

    run(root, scenario)
    assert len(Rig(root).stored()) == 20


@pytest.mark.parametrize("hostile", [b"\xff\xfe\n", b"\x00\x00", b"[" * 5000, b"\n\n\r\n"])
def test_hostile_bytes_in_a_jsonl_file_cost_only_their_line(root: Path, hostile: bytes) -> None:
    async def scenario(rig: Rig) -> None:
        (rig.layout.inbox / "h.jsonl").write_bytes(line(1) + b"\n" + hostile + b"\n" + line(2))
        await rig.scan()
        assert rig.left() == []

    run(root, scenario)
    assert Rig(root).stored() == {"e1": 1, "e2": 1}


# -- any file type, name and content (SPEC §12 "Hostile files") ---------------------------------

KINDS = ("regular", "fifo", "dir", "link-to-file", "dangling-link", "link-to-dev-zero")
SUFFIXES = (b".json", b".jsonl", b".tmp", b".txt", b"")
LINE_KINDS = ("valid", "garbage", "deep", "huge", "bad-utf8", "empty")


def spool_name(base: bytes, suffix: bytes, pad_to_max: bool) -> bytes:
    stem = base * (NAME_MAX // len(base) + 1) if pad_to_max else base
    return stem[: NAME_MAX - len(suffix)] + suffix


names = st.builds(
    spool_name,
    st.binary(min_size=1, max_size=260).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")),
    st.sampled_from(SUFFIXES),
    st.booleans(),  # padded to exactly 255 bytes
)
items = st.tuples(
    names.filter(lambda n: n not in (b".", b"..")),
    st.sampled_from(KINDS),
    st.lists(st.sampled_from(LINE_KINDS), max_size=8),
    st.sampled_from((b"\n", b"\r\n")),
    st.booleans(),  # a trailing newline
    st.booleans(),  # many valid lines (more than one chunk)
)


def is_taken(name: bytes) -> bool:
    return not name.startswith(b".") and not name.endswith(b".tmp")


def build(inbox: Path, outside: Path, item: tuple[Any, ...], ids: list[str]) -> bool:
    """Create one inbox item; True when it should end up in errors/ whole."""
    raw_name, kind, kinds, newline, trailing, many = item
    path = Path(os.fsdecode(bytes(inbox) + b"/" + raw_name))
    taken = is_taken(raw_name)
    if kind != "regular":
        {
            "fifo": lambda: os.mkfifo(path),
            "dir": lambda: path.mkdir(),
            "link-to-file": lambda: os.symlink(outside, path),
            "dangling-link": lambda: os.symlink(outside.with_name("missing"), path),
            "link-to-dev-zero": lambda: os.symlink("/dev/zero", path),
        }[kind]()
        return taken
    document = raw_name.endswith(b".json")
    spool = document or raw_name.endswith(b".jsonl")
    # A huge line is a JSON array: alone (blank lines aside) a .json file of it is valid JSON.
    parts = [k for k in kinds if k != "empty"]
    not_json = any(k in ("garbage", "bad-utf8") for k in kinds) or (
        "huge" in kinds and len(parts) > 1
    )
    if document and not not_json:
        lines = [lines_for(k, ids if taken else []) for k in parts]
        path.write_bytes(b"[" + b",".join(lines) + b"]")
        return False
    keep = ids if taken and spool and not document else []
    kinds = [*kinds, *(["valid"] * (CHUNK_LINES + 1) if many else [])]
    path.write_bytes(
        newline.join(lines_for(k, keep) for k in kinds) + (newline if trailing else b"")
    )
    return taken and (not spool or document)


_ids = itertools.count()


def lines_for(kind: str, ids: list[str]) -> bytes:
    """One line of `kind`; a valid one's entryId goes to `ids` (the entries expected stored)."""
    if kind == "valid":
        n = next(_ids)
        ids.append(f"e{n}")
        return line(n)
    return hostile_line(kind)


def hostile_line(kind: str) -> bytes:
    return {
        "garbage": b'{"userId": "u", "trunc',
        "deep": deep(300),
        "huge": b"[" + b"1," * 20_000 + b"1]",
        "bad-utf8": b'{"userId": "\xff\xfe"}',
        "empty": b"",
    }[kind]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(items, max_size=6, unique_by=lambda i: i[0]), st.booleans())
# A .json file of one "huge" line is a readable array of numbers (found by hypothesis).
@example([(b"_.json", "regular", ["huge"], b"\n", False, False)], False)
def test_any_inbox_never_crashes_stalls_or_loses_an_entry(
    inbox_items: list[tuple[Any, ...]], restart: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        outside = Path(tmp) / "outside.jsonl"
        outside.write_bytes(line(0))
        rig = Rig(root)
        ids: list[str] = []
        moved = sum(build(rig.layout.inbox, outside, item, ids) for item in inbox_items)

        async def main() -> None:
            await rig.start()
            try:
                await rig.scan()
                if restart:
                    await rig.restart()
                await rig.scan()
            finally:
                await rig.stop()

        asyncio.run(main())
        assert rig.stored() == Counter(ids)
        left = [os.fsencode(n) for n in os.listdir(rig.layout.inbox)]
        assert all(not is_taken(n) for n in left)
        assert os.listdir(rig.layout.journal_spool) == []
        whole = [r for r in rig.reasons() if "originalPath" in r]
        assert len(whole) == moved
        for name in os.listdir(rig.layout.errors):
            if not name.endswith(".reason.json"):
                assert (rig.layout.errors / f"{name}.reason.json").exists()


# -- a real daemon -----------------------------------------------------------------------------


def test_a_real_daemon_stays_up_through_a_hostile_inbox(
    root: Path, daemons: list[DaemonProc]
) -> None:
    settings = {"spoolRescanMs": 50, "maxAgeMs": 3_600_000}
    daemons.append(start_daemon(root, settings))
    layout = Layout(root)
    os.mkfifo(layout.inbox / "a.json")
    os.symlink("/dev/zero", layout.inbox / "b.jsonl")
    (layout.inbox / name_of(NAME_MAX, b".jsonl", b"\xff")).write_bytes(line(1) + b"\n")
    (layout.inbox / "deep.jsonl").write_bytes(line(2) + b"\n" + deep(300) + b"\n")
    wait_for(lambda: not os.listdir(layout.inbox) and not os.listdir(layout.journal_spool))
    assert ping(layout.socket)
    assert request(layout.socket, {"op": "status"})["counters"]["accepted"] == 2
    started = time.monotonic()
    assert daemons[-1].stop(timeout=30) == 0
    assert time.monotonic() - started < 30
    # A file adopted by a run that died before journaling it, with the line that used to
    # crash every start.
    adopted = layout.journal_spool / "1704067200000-000000-left.jsonl"
    adopted.write_bytes(line(3) + b"\n" + deep(300) + b"\n")
    daemons.append(start_daemon(root, settings))
    assert not adopted.exists() and ping(layout.socket)
    assert daemons[-1].stop(timeout=30) == 0
    assert stored_id_counts(root) == {"e1": 1, "e2": 1, "e3": 1}
    reasons = [orjson.loads(p.read_bytes()) for p in layout.errors.glob("*.reason.json")]
    assert sorted(r["reason"].split(",")[0] for r in reasons if "originalPath" in r) == [
        "a FIFO",
        "a symbolic link",
    ]
    assert sum(r.get("errorCount", 0) for r in reasons) == 2


def test_an_adoption_whose_folder_fsync_fails_is_journaled_only_once_it_is_durable(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Journaled while its rename could still be undone by a power cut, the file would come
    # back in inbox/ after the cut beside records that already hold its entries: twice.
    from flowagg.ingest import spool_adopt

    real = spool_adopt.fsync_dir
    broken = {"on": True}

    def fsync_dir(path: Path) -> None:
        if broken["on"]:
            raise OSError(5, "Input/output error", str(path))
        real(path)

    monkeypatch.setattr(spool_adopt, "fsync_dir", fsync_dir)

    async def scenario(rig: Rig) -> None:
        (rig.layout.inbox / "a.jsonl").write_bytes(line(1) + b"\n" + line(2) + b"\n")
        await rig.scan()
        assert rig.left() and not os.listdir(rig.layout.inbox)  # adopted, and waiting
        assert rig.pipeline is not None and rig.pipeline.counters["accepted"] == 0
        await rig.scan()  # still failing: still waiting
        assert rig.pipeline.counters["accepted"] == 0
        broken["on"] = False
        await rig.scan()
        assert rig.pipeline.counters["accepted"] == 2 and rig.left() == []
        await rig.pipeline.flush()
        assert rig.stored() == Counter({"e1": 1, "e2": 1})

    run(root, scenario)
