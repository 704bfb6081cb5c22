"""The read commands' worker processes (`fanout`) and the validator's cheap path answer exactly
what one process checking every entry in full answers."""

from __future__ import annotations

import concurrent.futures
import gc
import gzip
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from flowagg.cli.main import main
from flowagg.core.entries import EntryError, plain_json, plainly_valid, validate_entry_json
from flowagg.read import fanout
from tests.read.test_validate import rewrite
from tests.readfixture import BASE_TS, Root, make_entry

NOW = BASE_TS + 400 * 86_400_000


def faulty_root(root: Path) -> None:
    """Many small batches, and among them every kind of fault a reader meets."""
    r = Root(root)
    entries = [make_entry(i) for i in range(400)]
    paths = [r.batch(entries[i : i + 10]) for i in range(0, 300, 10)]
    paths.append(r.batch(entries[300:310], kind="failed"))
    paths.append(r.batch(entries[310:320], kind="abandoned"))
    r.write_journal()
    faults: list[Any] = [
        lambda d: d["entries"][0].update(timestamp=4_000_000_000_000),  # the year 2096
        lambda d: d["entries"][1]["metadata"].update(duration="7"),
        lambda d: d["entries"][2].pop("entryId"),
        lambda d: d["entries"][3].update(userId="a\x00b"),
        lambda d: d["entries"][4]["metadata"].update(blob="x" * 70_000),  # > maxEntryBytes
        lambda d: d["entries"][5]["metadata"].update(deep=[[[[[[[[[1]]]]]]]]]),
        lambda d: d["entries"][6].update(action="bad action!"),
        lambda d: d["entries"][7].update(extra=1),
        lambda d: d["entries"][8].pop("timestamp"),  # export leaves it out
        lambda d: d["entries"][9]["metadata"].update(big=2**63),  # outside int64
    ]
    for path, fault in zip(paths[3::3], faults, strict=False):
        rewrite(path, fault)
    paths[1].write_bytes(paths[1].read_bytes()[:50])  # corrupt
    copy = paths[2].with_name(paths[2].name + ".gz")  # one batch stored twice
    copy.write_bytes(gzip.compress(paths[2].read_bytes()))
    shutil.copy(paths[4], paths[4].with_name(paths[4].name + ".gz"))  # a bad copy, never read
    os.mkfifo(root / "aggregated" / "batch_0000000000001_000000009999.json")


def run(root: Path, *args: str) -> tuple[int, bytes, bytes]:
    result = CliRunner().invoke(main, ["--root", str(root), *args], catch_exceptions=False)
    return result.exit_code, result.stdout_bytes, result.stderr_bytes


COMMANDS = [
    ("validate", "--json"),
    ("validate",),
    ("export", "--format", "jsonl"),
    ("export", "--format", "csv", "--include-failed"),
    ("report", "--by", "user,day", "--json", "--include-failed"),
    ("report", "--by", "task", "--user", "alice"),
]


def faulty_root_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> Path:
    """A root with every fault kind, read in chunks of 2 files by `workers` workers."""
    root = tmp_path / "root"
    faulty_root(root)
    monkeypatch.setattr(fanout, "CHUNK_FILES", 2)
    monkeypatch.setattr(fanout, "worker_count", lambda: workers)
    return root


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_workers_answer_as_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    root = faulty_root_in_chunks(tmp_path, monkeypatch, workers=1)
    alone = run(root, *args)
    pools: list[int] = []

    class CountedPool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, workers: int, **kwargs: Any) -> None:
            pools.append(workers)
            super().__init__(workers, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", CountedPool)
    monkeypatch.setattr(fanout, "worker_count", lambda: 3)
    assert run(root, *args) == alone
    # The answer above came from three workers (CSV's rows from a second pool of three).
    assert pools == ([3, 3] if "csv" in args else [3])
    assert alone[0] == 1  # the faults were found, not skipped over


def test_one_worker_per_core_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, workers in ((1, 1), (2, 2), (fanout.MAX_WORKERS + 5, fanout.MAX_WORKERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert fanout.worker_count() == workers


def _chunk_with_pid(items: Sequence[int]) -> tuple[list[int], int]:
    return list(items), os.getpid()


def test_map_chunks_keeps_the_order_of_the_items() -> None:
    items = list(range(500))
    answers = list(fanout.map_chunks(_chunk_with_pid, items, workers=2))
    assert [i for part, _ in answers for i in part] == items
    assert all(list(part) == got for part, (got, _) in answers)
    assert len({pid for _, (_, pid) in answers} - {os.getpid()}) >= 1


_ACTIONS = ("code_edit", "review", "bad action!", "", "x" * 65)
for _action in _ACTIONS[:2]:  # the validator remembers an action it found good
    validate_entry_json(
        make_entry(0) | {"action": _action}, 0, now_ms=NOW, max_entry_bytes=1 << 20, new_id=str
    )

_edges = st.sampled_from([-1, 0, 2**63 - 1, 2**63, 2**64, 1.5, True])
_values = st.one_of(
    st.none(),
    _edges,
    st.integers(),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
)
_metadata = st.dictionaries(
    st.sampled_from(["sessionId", "taskId", "duration", "other", "deep"]),
    _values | st.recursive(st.lists(st.none(), max_size=1), lambda c: st.lists(c, max_size=1)),
    max_size=3,
)
_fields: dict[str, st.SearchStrategy[Any]] = {
    "userId": st.one_of(st.text(max_size=130), _values),
    "action": st.one_of(st.sampled_from(_ACTIONS), _values),
    "timestamp": st.one_of(
        st.integers(min_value=946_684_800_000 - 2, max_value=946_684_800_001),
        st.integers(min_value=NOW + 86_400_000 - 2, max_value=NOW + 86_400_001),
        _values,
    ),
    "metadata": st.one_of(_metadata, _values),
    "entryId": st.one_of(st.text(max_size=130), _values),
    "extra": _values,
}


@st.composite
def _raw_entries(draw: st.DrawFn) -> dict[str, Any]:
    """A stored entry with one field changed or dropped: on the edge of one rule at a time."""
    entry = make_entry(draw(st.integers(min_value=0, max_value=50)))
    entry["action"] = draw(st.sampled_from(_ACTIONS[:2]))
    field = draw(st.sampled_from(sorted(_fields)))
    if draw(st.booleans()):
        entry.pop(field, None)
    else:
        entry[field] = draw(_fields[field])
    return entry


def _accepted(raw: Any) -> bool:
    try:
        _, client_id, data = validate_entry_json(
            raw, 0, now_ms=NOW, max_entry_bytes=1 << 20, new_id=str
        )
    except EntryError:
        return False
    return client_id and b"\\u0000" not in data


_EDGES: list[tuple[str, Any]] = [
    ("timestamp", NOW + 86_400_000),
    ("timestamp", NOW + 86_400_001),
    ("timestamp", 946_684_800_000),
    ("timestamp", 946_684_799_999),
    ("timestamp", 1.7e12),
    ("timestamp", True),
    ("userId", "u" * 128),
    ("userId", "u" * 129),
    ("userId", ""),
    ("entryId", "e" * 128),
    ("entryId", "e" * 129),
    ("entryId", ""),
    ("metadata", {"duration": 2**63 - 1}),
    ("metadata", {"duration": 2**63}),
    ("metadata", {"duration": -1}),
    ("metadata", {"duration": True}),
    ("metadata", {"other": 2**63}),
    ("metadata", {"other": -(2**63)}),
    ("metadata", {"other": -(2**63) - 1}),
    ("metadata", {"deep": [[2**64 - 1]]}),
    ("metadata", {"deep": {"a": -(2**63)}}),
    ("metadata", {"taskId": 7}),
    ("metadata", {"sessionId": None}),
    ("metadata", {"deep": [[[[[[[1]]]]]]]}),
    ("metadata", {"deep": [[[[[[[[1]]]]]]]]}),
    ("metadata", []),
    ("action", "bad action!"),
    ("extra", 1),
]


@pytest.mark.parametrize(("field", "value"), _EDGES)
def test_plainly_valid_on_the_edge_of_each_rule(field: str, value: Any) -> None:
    raw = make_entry(3) | {"action": "review", field: value}
    assert plainly_valid(raw, NOW) == _accepted(raw)
    del raw[field]
    assert plainly_valid(raw, NOW) == _accepted(raw)


@settings(max_examples=500)
@given(raw=st.one_of(_raw_entries(), _values))
def test_plainly_valid_only_says_so_of_what_the_validator_accepts_with_an_id(raw: Any) -> None:
    try:
        data = orjson.dumps(raw)  # the reader made the compact JSON first (see plainly_valid)
    except orjson.JSONEncodeError:
        return
    if plain_json(data) and plainly_valid(raw, NOW):
        assert _accepted(raw), raw


def test_validate_reports_every_planted_fault(tmp_path: Path) -> None:
    root = tmp_path / "root"
    faulty_root(root)
    code, out, _ = run(root, "validate")
    assert code == 1
    for fault in (
        "entry 10: metadata.big: an integer outside the signed 64-bit range",
        "timestamp: must be at most 1 day in the future",
        "metadata.duration: must be an integer",
        "entry 3: has no entryId",
        "entry 4: userId: must not contain U+0000",
        "over maxEntryBytes",
        "nested deeper than 8 levels",
        "entry 7: action:",
        'unknown key "extra"',
        "timestamp: must be an integer (ms since epoch), missing",
        "not JSON",
        "not valid gzip",
        "(a FIFO)",
    ):
        assert fault.encode() in out, fault


_PARENT = os.getpid()


def _killed_in_a_worker(work: Any, part: Any) -> Any:
    if os.getpid() != _PARENT:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer ends a process
    return work(part)


@pytest.mark.parametrize("args", [COMMANDS[0], COMMANDS[2], COMMANDS[4]], ids=" ".join)
def test_a_worker_killed_is_one_line_and_an_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    root = faulty_root_in_chunks(tmp_path, monkeypatch, workers=2)
    monkeypatch.setattr(fanout, "_run", _killed_in_a_worker)
    code, _, err = run(root, *args)
    lines = err.decode().splitlines()
    assert code != 0
    assert lines and lines[-1].startswith("flowagg: ") and "worker" in lines[-1], lines
    assert not any(line.startswith("Traceback") for line in lines), lines


def _private_dirty_kb(_items: Sequence[int]) -> int:
    gc.collect()  # what a worker's collector does sooner or later in a long read
    with open("/proc/self/smaps_rollup") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("Private_Dirty:"))


def test_a_worker_does_not_copy_the_parents_objects() -> None:
    # ~50 MB of objects the collector tracks, made before the workers are forked: a worker
    # that walks them (its collector) or touches their refcounts copies their pages.
    held = [{"n": i} for i in range(250_000)]
    answers = list(fanout.map_chunks(_private_dirty_kb, list(range(8)), workers=2))
    assert max(kb for _, kb in answers) < 8_000, answers
    assert len(held) == 250_000
