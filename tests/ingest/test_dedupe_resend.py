"""A resent entryId is answered only once its fate is known (issue #22, items 1 and 2).

A resend while the first write is in flight waits for that write: if it fails, the resend is
journaled itself, never answered `duplicate` for an entry that is not stored. A resend whose
lookup SQLite cannot answer (the index locked by someone else) is answered `busy`, never
accepted, and the lookup runs off the event loop, so `ping` keeps answering meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flowagg.core.config import load_config
from flowagg.core.layout import Layout
from flowagg.journal.dedupe import LookupBusy
from flowagg.journal.dedupe_sqlite import DB_NAME
from flowagg.journal.format import SEGMENT_PREFIX, SEGMENT_SUFFIX
from tests.harness import (
    DaemonProc,
    entry,
    ping,
    request,
    start_daemon,
    stored_id_counts,
    wait_for,
)
from tests.system.test_faults import Rig, until

HOLD_S = 30.0  # a bound on how long a test holds a fault, never a wait in itself


def run(root: Path, scenario: Callable[[Rig], Awaitable[None]], **settings: int) -> None:
    """test_faults' pipeline on real files, with `settings` on top of its config."""

    async def main() -> None:
        rig = Rig(root)
        flags = {"root": str(root), "maxAgeMs": 3_600_000, "batchSize": 1000, **settings}
        rig.config = load_config(flags=flags, environ={})
        await rig.start()
        try:
            await scenario(rig)
        finally:
            await rig.stop()

    asyncio.run(main())


class HeldFsync:
    """Once armed, the journal's next fsync of a segment waits for `fail()`, then raises EIO."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, journal: Path) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.released = threading.Event()
        real = os.fsync

        def held(fd: int) -> None:
            if self.armed and self._is_segment(fd, journal):
                self.armed = False
                self.entered.set()
                self.released.wait(HOLD_S)
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real(fd)

        monkeypatch.setattr(os, "fsync", held)

    @staticmethod
    def _is_segment(fd: int, journal: Path) -> bool:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        return (
            path.parent == journal
            and path.name.startswith(SEGMENT_PREFIX)
            and path.name.endswith(SEGMENT_SUFFIX)
        )

    def fail(self) -> None:
        self.released.set()


@pytest.mark.parametrize("rollover", [False, True], ids=["in-segment", "at-rollover"])
def test_a_resend_during_a_write_that_fails_is_stored_once(
    root: Path, monkeypatch: pytest.MonkeyPatch, rollover: bool
) -> None:
    held = HeldFsync(monkeypatch, root.resolve() / "journal")

    async def scenario(rig: Rig) -> None:
        pipeline = rig.pipeline
        assert pipeline is not None
        # 40 entries fill a 4 KiB segment: the next write opens a new one (its header fsync).
        assert (await rig.add(40 if rollover else 1))["ok"] is True
        x = entry(1000, entryId="resent")
        held.armed = True
        first = asyncio.ensure_future(pipeline.add([x]))
        await until(held.entered.is_set)
        resend = asyncio.ensure_future(pipeline.add([dict(x)]))  # the first reply was lost
        for _ in range(10):  # let it run as far as it can without the write's outcome
            await asyncio.sleep(0)
        held.fail()
        failed, second = await first, await resend
        assert failed.error is not None and failed.error.startswith("journal_unavailable")
        # Never `duplicate` of a write that failed: the resend stored the entry itself.
        assert second.error is None, second
        assert (second.accepted, second.duplicates) == (1, 0)
        rig.acked.add("resent")
        third = await pipeline.add([dict(x)])
        assert (third.accepted, third.duplicates) == (0, 1)
        await pipeline.flush()
        rig.check("aggregated")  # every acknowledged entry once, "resent" included

    run(root, scenario, journalSegmentBytes=4096 if rollover else 64 << 20)


@contextmanager
def index_locked(root: Path) -> Iterator[None]:
    """Another process's write lock on the dedupe index (what a backup tool or a stuck
    sqlite3 shell can hold), past every busy timeout flowagg has."""
    other = sqlite3.connect(root / "journal" / "dedupe" / DB_NAME, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        yield
        other.execute("ROLLBACK")
    finally:
        other.close()


def in_index(root: Path, entry_id: str) -> bool:
    """Committed to the index's SQLite tables (so a resend must be looked up there)."""
    db = sqlite3.connect(root / "journal" / "dedupe" / DB_NAME)
    try:
        tables = [n for (n,) in db.execute("SELECT name FROM sqlite_master") if n[:2] == "g_"]
        return any(
            db.execute(f"SELECT 1 FROM {t} WHERE id = ?", (entry_id,)).fetchone() for t in tables
        )
    finally:
        db.close()


def test_a_resend_the_locked_index_cannot_answer_is_busy_not_stored_twice(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        pipeline = rig.pipeline
        assert pipeline is not None
        x = entry(1, entryId="e1")
        assert (await rig.add(1))["accepted"] == 1  # stores e1
        await until(lambda: in_index(root, "e1"))
        await until(lambda: not pipeline.dedupe or not pipeline.dedupe.recent)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.ensure_future(ticker())
        try:
            with index_locked(root):
                started = time.monotonic()
                result = await pipeline.add([dict(x)])
                waited = time.monotonic() - started
            assert result.error == "busy" and result.retry_after_ms, result
            # The loop ran all along: the lookup was not on it.
            assert ticks >= 1 and waited < HOLD_S
        finally:
            beat.cancel()
        again = await pipeline.add([dict(x)])
        assert (again.accepted, again.duplicates) == (0, 1)
        assert pipeline.counters["busy"] == 1
        await pipeline.flush()
        rig.check("aggregated")

    run(root, scenario)


def test_confirm_refuses_to_guess_while_the_index_is_locked(root: Path) -> None:
    async def scenario(rig: Rig) -> None:
        pipeline = rig.pipeline
        assert pipeline is not None and pipeline.dedupe is not None
        index = pipeline.dedupe
        assert (await rig.add(3))["accepted"] == 3
        await until(lambda: not index.recent)
        now = pipeline.window_clock.now_ms()
        assert index.check("e2", now) is None  # a filter hit: only SQLite can tell
        with index_locked(root), pytest.raises(LookupBusy):
            index.confirm_later(["e2", "nope"], now).result(HOLD_S)
        assert index.confirm_later(["e2", "nope"], now).result(HOLD_S) == {"e2"}

    run(root, scenario)


def test_ping_answers_and_nothing_is_stored_twice_while_the_index_is_locked(
    root: Path, daemons: list[DaemonProc]
) -> None:
    daemon = start_daemon(root, {"maxAgeMs": 3_600_000})
    daemons.append(daemon)
    sock = Layout(root).socket
    sent = [entry(i, entryId=f"d{i}") for i in range(20)]
    assert request(sock, {"op": "add", "entries": sent})["accepted"] == 20
    wait_for(lambda: in_index(root, "d19"))
    answers: list[dict[str, object]] = []
    with index_locked(root):
        resend = threading.Thread(
            target=lambda: answers.append(request(sock, {"op": "add", "entries": sent}))
        )
        resend.start()
        try:
            # Until the resend is answered its lookup is blocked on the lock; the loop is not.
            pause = threading.Event()
            while resend.is_alive():
                assert ping(sock, timeout=5.0), "the daemon stopped answering ping"
                pause.wait(0.01)
        finally:
            resend.join(HOLD_S + 5)
    [answer] = answers
    assert answer.get("accepted", 0) == 0, answer  # busy, or duplicates: never stored again
    assert answer.get("error") == "busy" or answer.get("duplicates") == 20
    after = request(sock, {"op": "add", "entries": sent})
    assert (after["accepted"], after["duplicates"]) == (0, 20)
    assert request(sock, {"op": "flush"})["ok"]
    counts = stored_id_counts(root)
    assert counts == {e["entryId"]: 1 for e in sent}
    assert "dedupe index lookup failed" in daemon.log()


def test_concurrent_resends_through_failing_writes_store_each_acknowledged_id_once(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every third fsync of a segment fails (never the undo right after one, which must
    # succeed for the journal to go on); senders resend overlapping ids while writes fail.
    journal = root.resolve() / "journal"
    calls = 0
    real = os.fsync

    def flaky(fd: int) -> None:
        nonlocal calls
        if HeldFsync._is_segment(fd, journal):
            calls += 1
            if calls % 3 == 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    async def scenario(rig: Rig) -> None:
        pipeline = rig.pipeline
        assert pipeline is not None
        monkeypatch.setattr(os, "fsync", flaky)
        acked: set[str] = set()

        async def sender(first: int) -> None:
            for round_ in range(8):
                ids = [f"c{(first + round_ + k) % 12}" for k in range(4)]
                result = await pipeline.add([entry(n, entryId=i) for n, i in enumerate(ids)])
                if result.error is None:
                    assert result.accepted + result.duplicates == len(ids)
                    acked.update(ids)

        await asyncio.gather(*(sender(n) for n in range(6)))
        monkeypatch.setattr(os, "fsync", real)
        assert calls >= 3  # some writes did fail
        rig.acked = acked
        await pipeline.flush()
        rig.check("aggregated")  # each acknowledged id stored once, nothing else stored

    run(root, scenario)
