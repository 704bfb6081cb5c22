"""Hostile tests of runs of batch files, compressed batches and the fast paths beside them.

Every step of a run (temp file create, write, fsync, rename, directory fsync) is broken at
the first, a middle and the last batch, once or for good; hostile files are planted in
aggregated/ where the journal expects a batch; real daemons are killed and stopped while
runs are in flight. After each: batches reported in order, every entry exactly once.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowagg import fsutil
from flowagg.clock import FakeClock
from flowagg.fsutil import TEMP_MARK
from flowagg.layout import Layout
from flowagg.recovery import Recovery, RetryPolicy
from tests.test_batch_runs import Run, make_batches, no_temp_files, where

RUN = 24
POLICY = RetryPolicy(base_ms=1000, max_delay_ms=300_000, limit=2)
OPS = {
    "open": errno.EACCES,
    "write": errno.ENOSPC,
    "fsync": errno.EIO,
    "rename": errno.EACCES,
    "dirfsync": errno.EIO,
}


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "data")
    layout.prepare()
    return layout


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
    """The recovery loop before any retry is due: a failed copy beside a durable completed one goes."""
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


def checked_fsync_dir(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    calls = [0]
    real = fsutil.fsync_dir

    def fsync_dir(path: Path) -> None:
        calls[0] += 1
        real(path)

    monkeypatch.setattr("flowagg.flusher.fsync_dir", fsync_dir)
    return lambda: calls[0]
