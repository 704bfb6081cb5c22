"""Hostile tests of runs of batch files, compressed batches and the fast paths beside them.

Every step of a run (temp file create, write, fsync, rename, directory fsync) is broken at
the first, a middle and the last batch, once or for good; hostile files are planted in
aggregated/ where the journal expects a batch; real daemons are killed and stopped while
runs are in flight. After each: batches reported in order, every entry exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from flowagg.batches.storage import (
    Batch,
    CompletedFiles,
    CorruptBatch,
    batch_file_name,
    encode_batch,
    iter_batch_files,
    read_batch,
)
from flowagg.core import entries
from flowagg.core.clock import EntryIdFactory, FakeClock, _b32
from flowagg.core.compression import compress
from flowagg.core.fsutil import TEMP_MARK
from flowagg.core.layout import Layout
from flowagg.delivery.recovery import Recovery
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.journal.dedupe_writer import CHECKPOINT_ONLY_INTERVAL_S
from flowagg.journal.format import split_add
from flowagg.service.cleanup import apply_cleanup, plan_cleanup
from tests import torture
from tests.batches.test_batch_runs import Run, make_batches, no_temp_files, where
from tests.delivery.test_recovery import failed_doc, put_failed
from tests.faults import FaultInjector
from tests.harness import DaemonProc, entry, request, stored_id_counts
from tests.system.test_faults import Rig

RUN = 24
POLICY = RetryPolicy(base_ms=1000, max_delay_ms=300_000, limit=2)
OPS = {
    "open": errno.EACCES,
    "write": errno.ENOSPC,
    "fsync": errno.EIO,
    "rename": errno.EACCES,
    "dirfsync": errno.EIO,
}


class StepFaults:
    """Breaks one step (op) of writing the files of one batch, `times` times (None: for good).

    `dirfsync` breaks the fsync of aggregated/ once the victim's file was renamed into it.
    """

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, layout: Layout, op: str, victim: str
    ) -> None:
        self.op, self.code = op, OPS[op]
        self.victim = victim
        self.left: int | None = 1
        self.hits = 0
        self.victim_renamed = False
        self._fds: dict[int, str] = {}
        self._aggregated = os.fspath(layout.aggregated)
        real_open, real_write, real_fsync = os.open, os.write, os.fsync
        real_rename, real_close = os.rename, os.close

        def fake_open(path: Any, flags: int, *a: Any, **kw: Any) -> int:
            spath = os.fspath(path)
            if flags & os.O_CREAT and self._temp(spath):
                self._strike("open", spath)
            fd = real_open(path, flags, *a, **kw)
            self._fds[fd] = spath
            return fd

        def fake_write(fd: int, data: Any) -> int:
            if self._temp(self._fds.get(fd, "")):
                self._strike("write", self._fds[fd])
            return real_write(fd, data)

        def fake_fsync(fd: int) -> None:
            path = self._fds.get(fd, "")
            if self._temp(path):
                self._strike("fsync", path)
            if path.rstrip(os.sep) == self._aggregated and self.victim_renamed:
                self._strike("dirfsync", path)
            real_fsync(fd)

        def fake_rename(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            spath = os.fspath(dst)
            ours = spath.startswith(self._aggregated + os.sep) and self.victim in spath
            if ours:
                self._strike("rename", spath)
            real_rename(src, dst, *a, **kw)
            if ours:
                self.victim_renamed = True

        def fake_close(fd: int) -> None:
            self._fds.pop(fd, None)
            real_close(fd)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "write", fake_write)
        monkeypatch.setattr(os, "fsync", fake_fsync)
        monkeypatch.setattr(os, "rename", fake_rename)
        monkeypatch.setattr(os, "close", fake_close)

    def _temp(self, path: str) -> bool:
        name = os.path.basename(path)
        return (
            os.path.dirname(path) == self._aggregated
            and name.startswith(TEMP_MARK)
            and self.victim in name
        )

    def _strike(self, op: str, path: str) -> None:
        if op != self.op or self.left == 0:
            return
        if self.left is not None:
            self.left -= 1
        self.hits += 1
        raise OSError(self.code, os.strerror(self.code), path)

    def heal(self) -> None:
        self.left = 0


def reconcile(layout: Layout) -> None:
    """The recovery pass before any retry is due: a failed copy beside a completed one goes."""
    Recovery(layout, FakeClock(now_ms=5_000), random.Random(1), POLICY).run_once()


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("persistent", [False, True], ids=["heals", "persists"])
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_a_fault_at_any_step_and_place_of_a_run(
    layout: Layout,
    monkeypatch: pytest.MonkeyPatch,
    op: str,
    position: str,
    persistent: bool,
    compression: str,
) -> None:
    batches = make_batches(RUN)
    index = {"first": 0, "middle": RUN // 2, "last": RUN - 1}[position]
    victim = batches[index]
    faults = StepFaults(monkeypatch, layout, op, victim.batch_id)
    if persistent:
        faults.left = None
    run = Run(layout, immediate_retries=2, compression=compression)
    run.store(batches)
    faults.heal()
    assert faults.hits >= 1, "the fault struck"
    assert run.stored_ids() == [b.batch_id for b in batches], "reported once each, in order"
    reconcile(layout)
    found = where(layout)
    assert set(found) == {i for b in batches for i in b.entry_ids}, "every entry exactly once"
    folders = {found[i] for i in victim.entry_ids}
    expected = {"recovery"} if persistent and op != "dirfsync" else {"aggregated"}
    assert folders == expected
    others = {found[i] for b in batches if b is not victim for i in b.entry_ids}
    assert others == {"aggregated"}
    assert no_temp_files(layout)


# -- hostile files where the journal expects a batch ---------------------------------------


def journal_expecting_a_batch(root: Path, count: int = 30) -> tuple[Rig, Path]:
    """A stopped pipeline whose journal has no done record for the one batch it wrote."""

    async def main() -> Rig:
        rig = Rig(root)
        pipeline = await rig.start()
        assert pipeline.writer is not None
        pipeline.writer.append_done = lambda last_seq, batch_id: None  # type: ignore[method-assign]
        await rig.add(count)
        await pipeline.flush()
        await rig.stop()
        return rig

    rig = asyncio.run(main())
    [path] = iter_batch_files(rig.layout)
    return rig, path


def stored_without_done_records(
    root: Path,
    *,
    batches: int,
    unstored: int = 0,
    per_batch: int = 30,
    setup: Callable[[Rig], None] | None = None,
) -> Rig:
    """`batches` batches of `per_batch` entries stored, as a crash before their done records
    leaves them, then `unstored` entries journaled and never cut: the start must sort it out.
    `setup` may change the rig (its config) before the pipeline starts."""

    async def main() -> Rig:
        rig = Rig(root)
        if setup is not None:
            setup(rig)
        pipeline = await rig.start()
        assert pipeline.writer is not None
        pipeline.writer.append_done = lambda last_seq, batch_id: None  # type: ignore[method-assign]
        for _ in range(batches):
            await rig.add(per_batch)
            await pipeline.flush()
        if unstored:
            await rig.add(unstored)
        await pipeline.shutdown(flush_s=0)
        return rig

    return asyncio.run(main())


def restart(rig: Rig, timeout: float = 10.0) -> dict[str, int]:
    """Start the pipeline again on the same root, flush, stop; its counters after the flush."""
    box: list[dict[str, int]] = []

    async def main() -> None:
        pipeline = await rig.start()
        await pipeline.flush()
        box.append({**pipeline.counters, "batchesFoundAtStart": pipeline.batches_found_at_start})
        await rig.stop()

    worker = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "the start hung on a file in aggregated/"
    assert box, "the start failed"
    return box[0]


def test_the_untouched_batch_is_found_at_restart(tmp_path: Path) -> None:
    rig, _ = journal_expecting_a_batch(tmp_path / "data")
    counters = restart(rig)
    assert counters["batchesFoundAtStart"] == 1, "the journal expected this batch"
    rig.check("aggregated")


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_batch_under_another_suffix_is_found_not_written_again(tmp_path: Path, kind: str) -> None:
    rig, path = journal_expecting_a_batch(tmp_path / "data")
    moved = rig.layout.aggregated / batch_file_name(path.name[6:-5], kind)
    moved.write_bytes(compress(kind, path.read_bytes()))
    path.unlink()
    counters = restart(rig)
    assert counters["batchesFoundAtStart"] == 1
    rig.check("aggregated")
    assert [p.name for p in iter_batch_files(rig.layout)] == [moved.name]


def hostile(kind: str, target: Path, data: bytes, scratch: Path) -> None:
    """Put something that is not a batch flowagg wrote at `target`."""
    if kind == "truncated gzip":
        target.write_bytes(compress("gzip", data)[:-20])
    elif kind == "garbage zstd":
        target.write_bytes(os.urandom(300))
    elif kind == "zstd bomb":
        bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b" " * (8 << 20))
        target.write_bytes(bomb)
    elif kind == "directory":
        target.mkdir()
    elif kind == "symlink to a fifo":
        os.mkfifo(scratch / "fifo")
        target.symlink_to(scratch / "fifo")
    elif kind == "symlink to the batch":
        (scratch / "elsewhere.json.gz").write_bytes(compress("gzip", data))
        target.symlink_to(scratch / "elsewhere.json.gz")
    elif kind == "empty batch":
        target.write_bytes(
            encode_batch(Batch(target.name[6:24], "size", [], 1, 0, []), timestamp_ms=1)
        )
    else:
        raise AssertionError(kind)


HOSTILE = [
    "truncated gzip",
    "garbage zstd",
    "zstd bomb",
    "directory",
    "symlink to a fifo",
    "symlink to the batch",
    "empty batch",
]


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_file_named_like_the_expected_batch(tmp_path: Path, kind: str) -> None:
    """The real batch file is gone (a kill before its rename); something else has its name."""
    rig, path = journal_expecting_a_batch(tmp_path / "data")
    data = path.read_bytes()
    path.unlink()
    suffix = {"garbage zstd": ".json.zst", "zstd bomb": ".json.zst", "empty batch": ".json"}.get(
        kind, ".json.gz"
    )
    hostile(kind, path.with_suffix(suffix), data, tmp_path)
    counters = restart(rig)
    assert counters.get("batchesFoundAtStart", 0) == 0
    rig.check("aggregated")
    quarantined = [p.name for p in rig.layout.errors.iterdir()]
    assert any(n.startswith(path.name[:-5]) and not n.endswith(".reason.json") for n in quarantined)
    assert any(n.endswith(".reason.json") for n in quarantined), "kept, with a reason"


@pytest.mark.parametrize("kind", ["truncated gzip", "garbage zstd", "directory"])
def test_a_hostile_file_shadowing_the_real_batch_under_another_suffix(
    tmp_path: Path, kind: str
) -> None:
    """The real batch is .json.gz (written before the setting changed); a bad .json shadows it."""
    rig, path = journal_expecting_a_batch(tmp_path / "data")
    real = path.with_suffix(".json.gz")
    real.write_bytes(compress("gzip", path.read_bytes()))
    data = path.read_bytes()
    path.unlink()
    hostile(kind, path, data, tmp_path)  # the plain name is looked up first
    restart(rig)
    rig.check("aggregated")
    assert real.exists()


def test_cleanup_past_retention_leaves_what_flowagg_did_not_write(layout: Layout) -> None:
    old = make_batches(1)[0]
    files = CompletedFiles(layout, "gzip")
    batch = files.write(old.batch_id, encode_batch(old, timestamp_ms=1))
    odd_dir = layout.aggregated / batch_file_name("0000000000001_000000000001", "gzip")
    odd_dir.mkdir()
    odd_link = layout.aggregated / batch_file_name("0000000000002_000000000001", "zstd")
    odd_link.symlink_to(batch)
    temp_dir = layout.aggregated / f"{TEMP_MARK}batch_x.json.1"
    temp_dir.mkdir()
    for path in (batch, odd_dir, temp_dir):
        os.utime(path, (1, 1))
    plan = plan_cleanup(layout, 10**13, age_ms=1000, retain_batches_ms=1000)
    apply_cleanup(plan)
    assert [p.path for p in plan] == [batch], "only the batch flowagg wrote"
    assert not batch.exists() and odd_dir.is_dir() and odd_link.is_symlink()
    assert temp_dir.is_dir()


# -- real daemons -----------------------------------------------------------------------------


def test_sigkill_at_random_instants_with_compressed_runs(tmp_path: Path) -> None:
    """Writers, spool and socket, while daemons writing zstd batches in runs die by SIGKILL;
    the setting alternates, so a start finds batches under both suffixes."""
    layout = Layout(tmp_path / "data")
    rng = random.Random(23)
    kinds = iter(["zstd", "none"] * 20)
    settings = {**torture.SETTINGS, "batchSize": 3}

    def crash(daemon: DaemonProc) -> None:
        daemon.kill()

    class Alternating(dict[str, Any]):
        def items(self) -> Any:  # each DaemonProc reads the settings once, at its start
            return [*super().items(), ("batchCompression", next(kinds))]

    tally = torture.crash_loop(
        layout,
        Alternating(settings),
        crashes=20,
        rng=rng,
        writers=3,
        log_path=tmp_path / "daemon.log",
        crash=crash,
        noun="kill",
        log=lambda _msg: None,
    )
    assert not tally.torn, tally.torn[:3]
    assert tally.lost() == [] and tally.duplicated() == [] and tally.unexpected() == []
    names = [p.name for p in layout.aggregated.iterdir()]
    assert any(n.endswith(".json.zst") for n in names) and any(n.endswith(".json") for n in names)
    assert len(tally.acked) > 100


def add_many(sock: Path, first: int, count: int, prefix: str) -> list[str]:
    entries = [entry(first + i, entryId=f"{prefix}{first + i}") for i in range(count)]
    reply = request(sock, {"op": "add", "entries": entries})
    assert reply["ok"] and reply["accepted"] == count, reply
    return [e["entryId"] for e in entries]


@pytest.mark.parametrize("timeout_ms", [200, 10_000])
def test_a_stop_while_runs_are_in_flight(tmp_path: Path, timeout_ms: int) -> None:
    """SIGTERM with hundreds of batches queued: exit 0 within shutdownTimeoutMs; what was not
    stored by then is written by the next start, once."""
    root = tmp_path / "data"
    settings = {"batchSize": 2, "maxAgeMs": 60_000, "batchCompression": "gzip"}
    daemon = DaemonProc(root, {**settings, "shutdownTimeoutMs": timeout_ms}).wait_ready()
    acked = []
    for k in range(4):
        acked += add_many(daemon.layout.socket, k * 1000, 1000, "s")
    assert daemon.stop() == 0, daemon.log()
    daemon = DaemonProc(root, settings).wait_ready()
    try:
        assert request(daemon.layout.socket, {"op": "flush"})["ok"]
    finally:
        assert daemon.stop() == 0
    counts = stored_id_counts(root)
    assert set(counts) == set(acked) and max(counts.values()) == 1


@pytest.mark.parametrize("pause_s", [0.0, CHECKPOINT_ONLY_INTERVAL_S * 1.2])
def test_dedupe_after_a_kill_between_entries_without_and_with_ids(
    tmp_path: Path, pause_s: float
) -> None:
    """Entries without ids only move a loose checkpoint; a kill right after ids were
    acknowledged must not let the checkpoint hide them from the index after a restart.
    After the pause the loose checkpoint is due: it is committed past the ids."""
    root = tmp_path / "data"
    settings = {"batchSize": 5, "maxAgeMs": 60_000}
    daemon = DaemonProc(root, settings).wait_ready()
    sock = daemon.layout.socket
    plain = [entry(i) for i in range(300)]
    for k in range(0, 300, 30):
        assert request(sock, {"op": "add", "entries": plain[k : k + 30]})["accepted"] == 30
    keyed = add_many(sock, 1000, 50, "d")
    time.sleep(pause_s)  # the interval is real time: nothing to poll for
    plain_after = [entry(i) for i in range(2000, 2040)]
    assert request(sock, {"op": "add", "entries": plain_after})["accepted"] == 40
    daemon.send(signal.SIGKILL)
    daemon.kill()
    daemon = DaemonProc(root, settings).wait_ready()
    try:
        again = [entry(1000 + i, entryId=f"d{1000 + i}") for i in range(50)]
        reply = request(daemon.layout.socket, {"op": "add", "entries": again})
        assert reply["ok"] and reply["accepted"] == 0 and reply["duplicates"] == 50, reply
        assert request(daemon.layout.socket, {"op": "flush"})["ok"]
    finally:
        assert daemon.stop() == 0
    counts = stored_id_counts(root)
    assert sum(counts.values()) == 390 and max(counts.values()) == 1
    assert set(keyed) <= set(counts)


# -- fast paths against their slow twins -----------------------------------------------------


class NearWrap(random.Random):
    """Draws the random part of an id close below a 1024 boundary (or the top of 79 bits)."""

    def __init__(self, offsets: list[int]) -> None:
        super().__init__(0)
        self._offsets = offsets
        self._n = 0

    def getrandbits(self, k: int) -> int:
        self._n += 1
        offset = self._offsets[self._n % len(self._offsets)]
        top = (1 << k) if self._n % 3 == 0 else 1024 * (1 + self._n * 7919)
        return max(0, top - 1 - offset)


def reference_ids(steps: list[tuple[int, int]], rng: random.Random, start_ms: int) -> list[str]:
    """The ids as first specified: every digit encoded afresh for each id."""
    out = []
    last_ms, last_rand, now = -1, 0, start_ms
    for jump, count in steps:
        now += jump
        for _ in range(count):
            if now <= last_ms:
                last_rand += 1
            else:
                last_ms, last_rand = now, rng.getrandbits(79)
            out.append(_b32(last_ms, 10) + _b32(last_rand >> 10, 14) + _b32(last_rand & 1023, 2))
    return out


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(-3, 3), st.integers(1, 2100)), min_size=1, max_size=6),
    offsets=st.lists(st.integers(0, 1100), min_size=1, max_size=4),
)
def test_entry_ids_are_unique_sorted_and_as_specified(
    steps: list[tuple[int, int]], offsets: list[int]
) -> None:
    clock = FakeClock(now_ms=1_700_000_000_000)
    factory = EntryIdFactory(clock, NearWrap(offsets))
    ids = []
    for jump, count in steps:
        clock.jump(jump)
        ids.extend(factory.new() for _ in range(count))
    assert ids == reference_ids(steps, NearWrap(offsets), 1_700_000_000_000)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def reference_split(
    entries: list[bytes], client_idx: list[int], max_entries: int, max_bytes: int
) -> list[tuple[int, int, list[int]]]:
    pieces: list[tuple[int, int, list[int]]] = []
    start, size, chunk = 0, 0, []
    marks = set(client_idx)
    for i, data in enumerate(entries):
        if i > start and (i - start >= max_entries or size + len(data) > max_bytes):
            pieces.append((start, i, chunk))
            start, size, chunk = i, 0, []
        size += len(data) + 1
        if i in marks:
            chunk.append(i - start)
    pieces.append((start, len(entries), chunk))
    return pieces


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 60), max_size=30),
    data=st.data(),
    max_entries=st.integers(1, 12),
    max_bytes=st.integers(1, 400),
)
def test_split_add_fast_path_matches_the_loop(
    sizes: list[int], data: st.DataObject, max_entries: int, max_bytes: int
) -> None:
    entries = [b"x" * n for n in sizes]
    client_idx = sorted(data.draw(st.sets(st.integers(0, max(0, len(sizes) - 1)))))
    client_idx = [i for i in client_idx if i < len(sizes)]
    pieces = split_add(entries, list(client_idx), max_entries, max_bytes)
    assert pieces == reference_split(entries, client_idx, max_entries, max_bytes)
    assert [i for s, _, idx in pieces for i in (s + j for j in idx)] == client_idx


@settings(max_examples=200, deadline=None)
@given(
    action=st.text(max_size=70),
    metadata=st.dictionaries(st.text(max_size=10), st.integers(-(2**63), 2**63 - 1)),
)
def test_the_action_cache_never_admits_what_the_rule_refuses(
    action: str, metadata: dict[str, int]
) -> None:
    """Whatever the cache holds (full or not), an action is valid exactly when the rule says."""
    for n in range(entries.GOOD_ACTIONS_KEPT + 10):
        entries._remember_action(f"a{n}")
    assert len(entries._GOOD_ACTIONS) <= entries.GOOD_ACTIONS_KEPT
    raw = {"userId": "u", "action": action, "timestamp": 1_700_000_000_000, "metadata": metadata}
    valid = bool(entries._ACTION_RE.fullmatch(action))
    for _ in range(2):  # the second time from the cache, if it was remembered
        try:
            entries.validate_entry_json(
                dict(raw), 0, now_ms=1_700_000_000_000, max_entry_bytes=65536, new_id=lambda: "i"
            )
            accepted = True
        except entries.EntryError as exc:
            accepted = False
            assert "action" in str(exc) or "metadata" in str(exc)
        known_bad = (
            any(k in ("sessionId", "taskId") for k in metadata)
            or any(k == "duration" and v < 0 for k, v in metadata.items())
            or any("\x00" in k for k in metadata)  # SPEC §3: no U+0000 in any string
        )
        assert accepted == (valid and not known_bad)


def test_recovery_finds_the_completed_twin_behind_an_unreadable_copy(layout: Layout) -> None:
    """A failed batch also completed as .json.gz (its directory fsync had failed), and a bad
    .json of the same id: the retry must drop the failed copy, not complete it a second time."""
    doc = failed_doc("0000000001000_000000000001")
    put_failed(layout, doc)
    entries = [orjson.dumps(e) for e in doc["entries"]]
    batch = Batch(doc["batchId"], "size", entries, 1, 3, [e["entryId"] for e in doc["entries"]])
    CompletedFiles(layout, "gzip").write(batch.batch_id, encode_batch(batch, timestamp_ms=1))
    (layout.aggregated / batch_file_name(batch.batch_id)).write_bytes(b"{torn")
    files = CompletedFiles(layout)
    recovery = Recovery(
        layout, FakeClock(now_ms=5_000), random.Random(1), POLICY, store=files.write
    )
    recovery.run_once(force=True)
    counts: Counter[str] = Counter()
    for path in iter_batch_files(layout):
        with contextlib.suppress(CorruptBatch):
            counts.update(e["entryId"] for e in read_batch(path)["entries"])
    assert counts == Counter(batch.entry_ids), "each entry in exactly one readable batch"


@pytest.mark.parametrize("heal_after", [1, 5, 40])
def test_a_full_disk_under_a_whole_run_that_heals_part_way(
    layout: Layout, monkeypatch: pytest.MonkeyPatch, heal_after: int
) -> None:
    """Every temp file of the run hits ENOSPC until `heal_after` faults have struck."""
    faults = FaultInjector(monkeypatch)
    aggregated = os.fspath(layout.aggregated) + os.sep
    hits = [0]

    def site(path: str) -> bool:
        if not path.startswith(aggregated) or hits[0] >= heal_after:
            return False
        hits[0] += 1
        return True

    heal = faults.breaks(site, errno.ENOSPC)
    batches = make_batches(RUN)
    run = Run(layout, immediate_retries=1)
    run.store(batches)
    heal()
    assert run.stored_ids() == [b.batch_id for b in batches]
    found = where(layout)
    assert set(found) == {i for b in batches for i in b.entry_ids}
    assert no_temp_files(layout)


@pytest.mark.parametrize("later", ["json", "gzip", "failed"])
def test_a_torn_batch_followed_by_stored_ones(tmp_path: Path, later: str) -> None:
    """The journal expects A, B and C; A is torn. A's cut is journaled, so A alone is moved
    aside and written again under its id; B and C, wherever they lie, stay."""

    rig = stored_without_done_records(tmp_path / "data", batches=3)
    a, b, c = iter_batch_files(rig.layout)
    a.write_bytes(a.read_bytes()[:-30])
    if later == "gzip":
        b.with_suffix(".json.gz").write_bytes(compress("gzip", b.read_bytes()))
        b.unlink()
    elif later == "failed":
        doc = orjson.loads(c.read_bytes())
        doc.update({"retryCount": 0, "lastRetryAt": 1, "lastError": "x", "failedAt": 1})
        doc["nextRetryAt"] = 10**13
        (rig.layout.recovery / f"{doc['batchId']}.failed.json").write_bytes(orjson.dumps(doc))
        c.unlink()
    restart(rig)
    rig.check("aggregated" if later != "failed" else None)
    if later == "failed":
        assert len(list(rig.layout.recovery.glob("*.failed.json"))) == 1, "C stays for recovery"
    reasons = [p.name for p in rig.layout.errors.iterdir() if p.name.endswith(".reason.json")]
    assert len(reasons) == 1, "the torn batch, kept with a reason"


@pytest.mark.parametrize("kind", ["fifo", "symlink to a fifo"])
def test_a_fifo_named_like_a_failed_batch_does_not_hang_recovery(
    layout: Layout, tmp_path: Path, kind: str
) -> None:
    name = "0000000001000_000000000001.failed.json"
    target = layout.recovery / name
    fifo = target if kind == "fifo" else tmp_path / "fifo"
    os.mkfifo(fifo)
    if kind != "fifo":
        target.symlink_to(fifo)
    recovery = Recovery(layout, FakeClock(now_ms=5_000), random.Random(1), POLICY)
    worker = threading.Thread(target=recovery.run_once, kwargs={"force": True}, daemon=True)
    worker.start()
    worker.join(10)
    hung = worker.is_alive()
    if hung:  # let the blocked open return, so that the thread ends
        os.close(os.open(fifo, os.O_WRONLY))
    assert not hung, "the recovery pass hung on a FIFO"
    assert not os.path.lexists(target)
    assert any(p.name == f"{name}.reason.json" for p in layout.errors.iterdir())


def test_a_backlog_without_a_hole_sets_nothing_aside(tmp_path: Path) -> None:
    """The common start after a kill: stored batches, then entries never cut. Nothing is
    quarantined and nothing is stored twice."""

    rig = stored_without_done_records(tmp_path / "data", batches=2, unstored=30)
    restart(rig)
    rig.check("aggregated")
    assert not list(rig.layout.errors.iterdir())
