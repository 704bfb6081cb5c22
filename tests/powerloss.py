"""Power-loss torture: the data root on LazyFS, SIGKILL plus a dropped page cache at random.

SIGKILL alone keeps the kernel's page cache, so a missing fsync goes unnoticed. Here each cut
kills the daemon and then has LazyFS drop every byte that was not fsync'd, as a power cut
would. The writers and their acknowledgement bookkeeping are the crash torture's
(tests/torture.py). At the end the daemon is flushed and stopped, the power is cut once more,
and every batch file is read back: the stored entryIds must equal the acknowledged ones,
each exactly once, and no batch file may be torn.

LazyFS keeps directory operations (create, rename, unlink) even without a directory fsync;
tests/test_dir_fsync.py checks those. Run longer with `scripts/torture --power-loss --cuts N`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from flowagg.layout import Layout
from flowagg.storage import CorruptBatch, iter_batch_files, read_batch
from tests.harness import DaemonProc, request, wait_for
from tests.lazyfs import LazyFS, ensure_lazyfs
from tests.torture import SETTINGS, SocketWriter, SpoolWriter


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
    rng = random.Random(seed)
    root = fs.mount / "data"
    settings = {**SETTINGS, "runDir": str(run_dir)}
    layout = Layout(root, run_dir)
    log_path = run_dir.parent / "powerloss-daemon.log"
    stop = threading.Event()
    # Held by the spool writer while it writes a file, and by each cut.
    gate = threading.Lock()

    daemon = DaemonProc(root, settings, log_path=log_path).wait_ready()
    socket_writers = [
        SocketWriter(f"w{i}", layout.socket, random.Random(rng.random()), stop)
        for i in range(writers)
    ]
    spool_writer = SpoolWriter(layout, random.Random(rng.random()), stop, gate)
    all_writers = [*socket_writers, spool_writer]
    for w in all_writers:
        w.start()
    try:
        for k in range(cuts):
            if k:
                daemon = DaemonProc(root, settings, log_path=log_path)
                if rng.random() < 0.75:
                    daemon.wait_ready()
            # Random instant: during start-up and replay, or while entries and batches flow.
            time.sleep(rng.uniform(0.0, 0.3))
            with gate:
                daemon.kill()
                fs.clear_cache()
            if k % 20 == 0:
                log(f"cut {k + 1}/{cuts} at {time.monotonic() - started:.1f} s")
        stop.set()
        # Writers still resending their last request need a daemon to answer it.
        daemon = DaemonProc(root, settings, log_path=log_path).wait_ready()
        for w in all_writers:
            w.join(60)
            assert not w.is_alive(), f"writer {w.name} did not finish"
        # The spool is acknowledged by rename alone: wait until the daemon took every file.
        wait_for(lambda: not any(layout.inbox.glob("*.jsonl")), timeout=60)
        reply = request(layout.socket, {"op": "flush"})
        assert reply.get("ok"), reply
        code = daemon.stop(signal.SIGTERM)
        assert code == 0, f"final daemon exited {code}: {daemon.log()}"
        # A clean stop must leave everything durable too.
        fs.clear_cache()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            daemon.kill()
        for w in all_writers:
            w.join(10)

    errors = [e for w in socket_writers for e in w.errors]
    assert not errors, errors[:5]
    acked = set(spool_writer.acked)
    for w in socket_writers:
        acked |= w.acked
    counts: Counter[str] = Counter()
    torn = []
    files = iter_batch_files(layout)
    for path in files:
        try:
            counts.update(e["entryId"] for e in read_batch(path)["entries"])
        except CorruptBatch as exc:
            torn.append(f"{path.relative_to(root)}: {exc}")
    return PowerLossResult(
        cuts=cuts,
        acknowledged=len(acked),
        stored=sum(counts.values()),
        lost=sorted(acked - set(counts)),
        duplicated=sorted(i for i, c in counts.items() if c > 1),
        unexpected=sorted(set(counts) - acked),
        torn=torn,
        batch_files=len(files),
        seconds=time.monotonic() - started,
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
