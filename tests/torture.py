"""Crash torture: writers with unique entryIds while a real daemon is SIGKILLed at random.

Each socket writer resends a request until the daemon answers it (accepted or duplicate),
so every entry ends up acknowledged; a spool writer drops files into inbox/ (the rename is
the acknowledgement). Now and then junk is appended to the journal, as a torn write would
leave it. At the end the daemon is started once more and flushed, and every batch file is
read back: the stored entryIds must equal the acknowledged ones, each exactly once.

Run longer with `scripts/torture --kills N --seed S`; `scripts/torture --power-loss --cuts N`
runs the power-loss variant (tests/powerloss.py) instead, and `scripts/torture --crash-states`
checks every crash state of the explorer's workloads (tests/crashmodel).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from flowagg.batches.storage import CorruptBatch, iter_batch_files, read_batch
from flowagg.cli.client import write_spool_file
from flowagg.core.layout import Layout
from flowagg.journal.public import list_segments
from tests.harness import BASE_TS, DaemonProc, flush_all

SETTINGS = {
    "batchSize": 7,
    "maxAgeMs": 40,
    "memoryWindowEntries": 40,
    "journalSegmentBytes": 16384,
    "spoolRescanMs": 50,
}


@dataclasses.dataclass
class TortureResult:
    kills: int
    acknowledged: int
    stored: int
    lost: list[str]
    duplicated: list[str]
    unexpected: list[str]
    batch_files: int
    junk_appends: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)

    def summary(self) -> str:
        return (
            f"{self.kills} kills, {self.junk_appends} torn tails, {self.acknowledged} acknowledged,"
            f" {self.stored} stored in {self.batch_files} batch files, lost {len(self.lost)},"
            f" duplicated {len(self.duplicated)}, unexpected {len(self.unexpected)}"
            f" ({self.seconds:.1f} s)"
        )


class SocketWriter(threading.Thread):
    def __init__(self, name: str, sock_path: Path, rng: random.Random, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.sock_path = sock_path
        self.rng = rng
        self.stop_event = stop
        self.acked: set[str] = set()
        self.errors: list[str] = []
        self._n = 0
        self._sock: socket.socket | None = None
        self._file: Any = None

    def _connect(self) -> bool:
        self._close()
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(self.sock_path))
        except OSError:
            s.close()
            return False
        self._sock, self._file = s, s.makefile("rb")
        return True

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._file.close()
                self._sock.close()
        self._sock = self._file = None

    def _send(self, payload: bytes) -> dict[str, Any] | None:
        if self._sock is None and not self._connect():
            return None
        assert self._sock is not None
        try:
            self._sock.sendall(payload)
            line = self._file.readline()
        except OSError:
            self._close()
            return None
        if not line:
            self._close()
            return None
        reply: dict[str, Any] = orjson.loads(line)
        return reply

    def run(self) -> None:
        while not self.stop_event.is_set():
            count = self.rng.randint(1, 12)
            batch = []
            for _ in range(count):
                self._n += 1
                eid = f"{self.name}-{self._n}"
                batch.append(
                    {
                        "userId": self.name,
                        "action": "torture",
                        "timestamp": BASE_TS + self._n,
                        "metadata": {"duration": self._n},
                        "entryId": eid,
                    }
                )
            payload = orjson.dumps({"op": "add", "entries": batch}) + b"\n"
            # Resend until answered: an unanswered request may or may not have been journaled,
            # and the entryIds make the resend safe.
            while True:
                reply = self._send(payload)
                if reply is not None and reply.get("ok"):
                    if reply["accepted"] + reply["duplicates"] != count:
                        self.errors.append(f"odd reply {reply}")
                    self.acked.update(e["entryId"] for e in batch)
                    break
                if reply is not None and reply.get("error") not in ("busy", "stopping"):
                    self.errors.append(f"error reply {reply}")
                time.sleep(0.005 if reply is None else reply.get("retryAfterMs", 50) / 1000)
        self._close()


class SpoolWriter(threading.Thread):
    def __init__(
        self,
        layout: Layout,
        rng: random.Random,
        stop: threading.Event,
        gate: contextlib.AbstractContextManager[Any] | None = None,
    ):
        super().__init__(name="spool", daemon=True)
        self.layout = layout
        self.rng = rng
        self.stop_event = stop
        # Held while a file is written: a power cut takes it so that no client survives the
        # cut halfway through a write (a real one would have lost power too).
        self.gate = gate or contextlib.nullcontext()
        self.acked: set[str] = set()
        self._n = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.rng.uniform(0.005, 0.05)):
            batch = []
            for _ in range(self.rng.randint(1, 10)):
                self._n += 1
                batch.append(
                    {
                        "userId": "spool",
                        "action": "torture.spool",
                        "timestamp": BASE_TS + self._n,
                        "entryId": f"spool-{self._n}",
                    }
                )
            with self.gate:
                write_spool_file(self.layout, batch)
                self.acked.update(e["entryId"] for e in batch)


def append_junk(layout: Layout, rng: random.Random) -> bool:
    segments = list_segments(layout.journal)
    if not segments:
        return False
    junk = rng.choice([b"0000", b'deadbeef {"k":"a","q":', rng.randbytes(rng.randint(1, 40))])
    with segments[-1].open("ab") as fh:
        fh.write(junk)
    return True


@dataclasses.dataclass
class Tally:
    """What a crash loop acknowledged, and what the batch files hold once it is over."""

    acked: set[str]
    counts: Counter[str]
    torn: list[str]  # batch files that do not read back whole
    batch_files: int

    def lost(self) -> list[str]:
        return sorted(self.acked - set(self.counts))

    def duplicated(self) -> list[str]:
        return sorted(i for i, c in self.counts.items() if c > 1)

    def unexpected(self) -> list[str]:
        return sorted(set(self.counts) - self.acked)

    def figures(self) -> dict[str, Any]:
        """The fields both result types share."""
        return {
            "acknowledged": len(self.acked),
            "stored": sum(self.counts.values()),
            "lost": self.lost(),
            "duplicated": self.duplicated(),
            "unexpected": self.unexpected(),
            "batch_files": self.batch_files,
        }


def crash_loop(
    layout: Layout,
    settings: dict[str, Any],
    *,
    crashes: int,
    rng: random.Random,
    writers: int,
    log_path: Path,
    crash: Callable[[DaemonProc], None],
    noun: str,
    log: Callable[[str], None],
    gate: contextlib.AbstractContextManager[Any] | None = None,
    after_stop: Callable[[], None] = lambda: None,
    before_stop: Callable[[], None] = lambda: None,
) -> Tally:
    """Writers run while `crash` ends a daemon `crashes` times at random instants.

    Then a last daemon answers the writers' resends, takes the spool, flushes (`before_stop`
    follows) and stops (`after_stop` follows), and every batch file is read back. Daemons are
    killed before returning, even on failure.
    """
    started = time.monotonic()
    stop = threading.Event()
    daemon = DaemonProc(layout.root, settings, log_path=log_path).wait_ready()
    socket_writers = [
        SocketWriter(f"w{i}", layout.socket, random.Random(rng.random()), stop)
        for i in range(writers)
    ]
    spool_writer = SpoolWriter(layout, random.Random(rng.random()), stop, gate)
    all_writers = [*socket_writers, spool_writer]
    for w in all_writers:
        w.start()
    try:
        for k in range(crashes):
            if k:
                daemon = DaemonProc(layout.root, settings, log_path=log_path)
                if rng.random() < 0.75:
                    daemon.wait_ready()
            # Random instant: during start-up and replay, or while entries and batches flow.
            time.sleep(rng.uniform(0.0, 0.25))
            crash(daemon)
            if k % 20 == 0:
                log(f"{noun} {k + 1}/{crashes} at {time.monotonic() - started:.1f} s")
        stop.set()
        # Writers still resending their last request need a daemon to answer it.
        daemon = DaemonProc(layout.root, settings, log_path=log_path).wait_ready()
        for w in all_writers:
            w.join(60)
            assert not w.is_alive(), f"writer {w.name} did not finish"
        # The spool is acknowledged by rename alone: wait until the daemon took every file.
        wait_for_intake(layout)
        flush_all(layout)
        before_stop()
        code = daemon.stop(signal.SIGTERM)
        assert code == 0, f"final daemon exited {code}: {daemon.log()}"
        after_stop()
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
            torn.append(f"{path.relative_to(layout.root)}: {exc}")
    return Tally(acked, counts, torn, len(files))


def spool_backlog(layout: Layout) -> tuple[int, int]:
    """Spool files not taken yet: (in inbox/, adopted and not yet journaled and deleted)."""
    inbox = sum(1 for _ in layout.inbox.glob("*.jsonl"))
    adopted = sum(1 for p in layout.journal_spool.iterdir() if not p.name.startswith("."))
    return inbox, adopted


def wait_for_intake(
    layout: Layout,
    stall_s: float = 60.0,
    backlog: Callable[[Layout], tuple[int, int]] = spool_backlog,
) -> None:
    """Wait until the daemon took every spool file in inbox/ and journal/spool/, however many:
    no deadline in all, so the wait grows with the backlog the run left (--kills 1000 leaves
    tens of thousands); it fails only once neither count went down for `stall_s`."""
    left = backlog(layout)
    deadline = time.monotonic() + stall_s
    while any(left):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the daemon took no spool file in {stall_s} s; {left[0]} left in inbox/,"
                f" {left[1]} in journal/spool/"
            )
        time.sleep(0.05)
        now = backlog(layout)
        if now[0] < left[0] or now[1] < left[1]:
            deadline = time.monotonic() + stall_s
        left = now


def run_torture(
    root: Path,
    *,
    kills: int,
    seed: int,
    writers: int = 3,
    log: Callable[[str], None] = lambda _msg: None,
) -> TortureResult:
    started = time.monotonic()
    rng = random.Random(seed)
    layout = Layout(root)
    junk = 0

    def crash(daemon: DaemonProc) -> None:
        nonlocal junk
        daemon.kill()
        if rng.random() < 0.1 and append_junk(layout, rng):
            junk += 1

    tally = crash_loop(
        layout,
        SETTINGS,
        crashes=kills,
        rng=rng,
        writers=writers,
        log_path=root.parent / "torture-daemon.log",
        crash=crash,
        noun="kill",
        log=log,
    )
    assert not tally.torn, tally.torn[:3]
    return TortureResult(
        kills=kills, junk_appends=junk, seconds=time.monotonic() - started, **tally.figures()
    )


def main(argv: list[str] | None = None) -> int:
    # Here, not at the top: tests.powerloss imports this module's writers.
    from tests.powerloss import PowerLossResult, run_power_loss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument(
        "--power-loss",
        action="store_true",
        help="root on LazyFS; each cut is SIGKILL plus dropping what was not fsync'd",
    )
    parser.add_argument("--cuts", type=int, default=500, help="power cuts with --power-loss")
    parser.add_argument(
        "--crash-states",
        action="store_true",
        help="check every distinct crash state of the explorer's workloads (tests/crashmodel)",
    )
    parser.add_argument("--workload", action="append", help="with --crash-states: only these")
    parser.add_argument(
        "--count-only",
        action="store_true",
        help="with --crash-states: count the distinct states, start no daemon on them",
    )
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the data root for inspection")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="flowagg-torture-"))
    if args.crash_states:
        return crash_states(tmp, args.workload, args.keep, not args.count_only)
    result: TortureResult | PowerLossResult
    if args.power_loss:
        print(f"seed {args.seed}, data root {tmp / 'lower' / 'data'}", flush=True)
        result = run_power_loss(
            tmp,
            cuts=args.cuts,
            seed=args.seed,
            writers=args.writers,
            log=lambda m: print(m, flush=True),
        )
    else:
        print(f"seed {args.seed}, data root {tmp / 'data'}", flush=True)
        result = run_torture(
            tmp / "data",
            kills=args.kills,
            seed=args.seed,
            writers=args.writers,
            log=lambda m: print(m, flush=True),
        )
    print(result.summary())
    if not args.keep and result.ok:
        import shutil

        shutil.rmtree(tmp)
    return 0 if result.ok else 1


def crash_states(tmp: Path, names: list[str] | None, keep: bool, check: bool) -> int:
    from tests.crashmodel.explore import explore, table

    print(f"crash states under {tmp}", flush=True)
    summaries = explore(tmp, None, lambda m: print(m, flush=True), names, check=check)
    print(table(summaries))
    ok = not any(s.findings for s in summaries)
    if not keep and ok:
        import shutil

        shutil.rmtree(tmp)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
