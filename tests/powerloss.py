"""Power-loss torture: the data root on LazyFS, SIGKILL plus a dropped page cache at random.

SIGKILL alone keeps the kernel's page cache, so a missing fsync goes unnoticed. Here each cut
kills the daemon and then has LazyFS drop every byte that was not fsync'd, as a power cut
would. The writers and their acknowledgement bookkeeping are the crash torture's
(tests/torture.py). At the end the daemon is flushed and stopped, the power is cut once more,
and every batch file is read back: the stored entryIds must equal the acknowledged ones,
each exactly once, and no batch file may be torn.

LazyFS keeps directory operations (create, rename, unlink) even without a directory fsync;
tests/system/test_dir_fsync.py checks those. Run longer with
`scripts/torture --power-loss --cuts N`.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flowagg.core.layout import Layout
from tests.harness import DaemonProc
from tests.lazyfs import LazyFS, ensure_lazyfs
from tests.torture import SETTINGS, crash_loop

HUNG_S = 60.0


@dataclasses.dataclass
class PowerLossResult:
    cuts: int
    acknowledged: int
    stored: int
    lost: list[str]
    duplicated: list[str]
    unexpected: list[str]
    torn: list[str]  # batch files that do not read back whole
    batch_files: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected or self.torn)

    def summary(self) -> str:
        return (
            f"{self.cuts} power cuts, {self.acknowledged} acknowledged, {self.stored} stored in"
            f" {self.batch_files} batch files, lost {len(self.lost)}, duplicated"
            f" {len(self.duplicated)}, unexpected {len(self.unexpected)}, torn"
            f" {len(self.torn)} {self.torn[:3]} ({self.seconds:.1f} s)"
        )


def run_powerloss(
    fs: LazyFS,
    run_dir: Path,
    *,
    cuts: int,
    seed: int,
    writers: int = 3,
    log: Callable[[str], None] = lambda _msg: None,
) -> PowerLossResult:
    """Cut the power `cuts` times under a daemon whose root is on `fs`; `run_dir` is off it.

    Daemons are killed before returning, even on failure, so `fs` can be unmounted.
    """
    started = time.monotonic()
    root = fs.mount / "data"
    # Held by the spool writer while it writes a file, and by each cut.
    gate = threading.Lock()

    def cut(daemon: DaemonProc) -> None:
        # A spool write that never returns means LazyFS hung: fail with its log, not wait.
        if not gate.acquire(timeout=HUNG_S):
            raise TimeoutError(f"a write on LazyFS has not returned in {HUNG_S} s: {fs.output()}")
        try:
            daemon.kill()
            fs.clear_cache()
        finally:
            gate.release()

    tally = crash_loop(
        Layout(root, run_dir),
        {**SETTINGS, "runDir": str(run_dir)},
        crashes=cuts,
        rng=random.Random(seed),
        writers=writers,
        log_path=run_dir.parent / "powerloss-daemon.log",
        crash=cut,
        noun="cut",
        log=log,
        gate=gate,
        # A clean stop must leave everything durable too.
        after_stop=fs.clear_cache,
    )
    return PowerLossResult(
        cuts=cuts, torn=tally.torn, seconds=time.monotonic() - started, **tally.figures()
    )


def run_power_loss(
    tmp: Path,
    *,
    cuts: int,
    seed: int,
    writers: int = 3,
    log: Callable[[str], None] = lambda _msg: None,
) -> PowerLossResult:
    """Mount LazyFS under `tmp` (the data stays in tmp/lower/data) and run the torture on it."""
    with LazyFS(ensure_lazyfs(), tmp / "mnt", tmp / "lower", tmp / "lazyfs") as fs:
        return run_powerloss(fs, tmp / "run", cuts=cuts, seed=seed, writers=writers, log=log)
