"""Restart figures: time until a fresh daemon answers `ping`, and its RSS meanwhile.

Figure 5 restarts on an unflushed backlog (the daemon was SIGKILLed); the day-of-journal
figure restarts on entries that are all stored but whose client entryIds are still inside
the dedupe window, so the journal is kept and the start has to remember them.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .common import (
    NO_FLUSH,
    Bench,
    Conn,
    Daemon,
    RssSampler,
    add_request,
    client_jobs,
    entry_lines,
    journal_bytes,
)


@contextlib.contextmanager
def timed_start(b: Bench, root: Path) -> Iterator[tuple[Daemon, RssSampler]]:
    """A default daemon spawned on root with its RSS polled every 10 ms; stopped at the end."""
    daemon = Daemon(root, b.settings(), b.logs)
    sampler = RssSampler(daemon.ps, interval=0.01)
    sampler.start()
    try:
        yield daemon, sampler
    finally:
        sampler.stop()
        daemon.stop()


# -- 5. restart with a journaled backlog ----------------------------------------------------------
def build_backlog(b: Bench, entries: int) -> tuple[Path, int]:
    """A root whose journal holds `entries` unflushed entries (the daemon was SIGKILLed)."""
    assert b.pool is not None
    root = b.fresh_dir(f"backlog-{entries}")
    per_request = 1000
    clients = 4
    requests = math.ceil(entries / per_request / clients)
    daemon = Daemon(root, b.settings(**NO_FLUSH), b.logs)
    try:
        daemon.wait_ready()
        jobs = client_jobs(daemon.sock, clients, requests, per_request)
        started = time.monotonic()
        results = b.pool.run(jobs)
        total = sum(r["accepted"] for r in results)
        status = daemon.status()
        if status["buffered"]["entries"] != total:
            raise RuntimeError(f"backlog: {status['buffered']} buffered, {total} accepted")
        b.progress(
            f"  journaled {total:,} entries in {time.monotonic() - started:.1f} s;"
            " SIGKILL the daemon"
        )
    finally:
        daemon.kill()
    b.notes[f"backlog_{entries}_entries"] = total
    b.notes[f"backlog_{entries}_journal_bytes"] = journal_bytes(root)
    return root, total


def restart(b: Bench, pristine: Path, prefix: str, expected: int) -> None:
    root = b.fresh_dir(f"restart-{prefix}")
    # The socket of the killed daemon cannot be copied; the new daemon makes its own.
    shutil.copytree(pristine, root, symlinks=True, ignore=shutil.ignore_patterns("*.sock"))
    with timed_start(b, root) as (daemon, sampler):
        ready = daemon.wait_ready(interval=0.005)
        with Conn(daemon.sock) as conn:
            probe = conn.add(add_request(entry_lines(77, 0, 1)))
        first_add = time.monotonic() - daemon.spawned_at
        deadline = time.monotonic() + b.sizes.drain_timeout_s
        while True:
            status = daemon.status()
            # The probe entry waits for its batch to fill (or maxAgeMs): not the backlog.
            if status["buffered"]["entries"] <= probe:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"backlog not drained within {b.sizes.drain_timeout_s} s: {status['buffered']}"
                )
            time.sleep(0.05)
        drained = time.monotonic() - daemon.spawned_at
        peak = sampler.stop()
        stored = sum(status["counters"]["batches"].values())
    shutil.rmtree(root, ignore_errors=True)
    b.record(f"{prefix}.ready_s", ready)
    b.record(f"{prefix}.first_add_s", first_add)
    b.record(f"{prefix}.drained_s", drained)
    b.record(f"{prefix}.drain_rate", expected / max(1e-9, drained - ready))
    b.record(f"{prefix}.peak_rss_mb", peak)
    b.progress(
        f"  ready {ready:.2f} s, drained {drained:.2f} s ({stored} batches), peak RSS {peak:.1f} MB"
    )


# -- restart with a day of journal ----------------------------------------------------------------
def restart_remembered(b: Bench, root: Path, entries: int) -> None:
    """Start on a cleanly stopped root whose `entries` client entryIds are all remembered.

    Nothing there needs draining, so the root is reused as is by every repeat (each start and
    clean stop leaves it in the same state) instead of copying gigabytes of journal.
    """
    prefix = f"day{entries}"
    with timed_start(b, root) as (daemon, sampler):
        ready = daemon.wait_ready(interval=0.005)
        peak = sampler.stop()
        # A resent entry must come back as a duplicate, or the start skipped the work measured.
        with Conn(daemon.sock) as conn:
            reply = conn.call(add_request(entry_lines(0, 0, 1, with_id=True)))
        if reply.get("duplicates") != 1:
            raise RuntimeError(f"a resent entryId was not answered as a duplicate: {reply}")
    b.record(f"{prefix}.ready_s", ready)
    b.record(f"{prefix}.peak_rss_mb", peak)
    b.progress(f"  ping ok after {ready:.2f} s, peak RSS {peak:.1f} MB while starting")
