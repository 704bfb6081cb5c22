"""RSS with remembered entryIds (SPEC §4.1, §10): memory must not grow with traffic.

A daemon receives N entries, each with a unique client entryId, from 8 clients x 100-entry
requests; everything is flushed, so what is left in memory is what it remembers for the
dedupe window (24 h). The cleanly stopped root is then the day of journal that the restart
figure starts on.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import psutil

from .common import (
    MB,
    Bench,
    RssSampler,
    client_jobs,
    journal_bytes,
    running,
    wait_stored,
)

# 1000-entry batches keep the flusher ahead of 8 clients, so adds never wait on `busy`: the
# figure is about what the daemon remembers, not about writing batch files.
LARGE_BATCHES = {"batchSize": 1000, "maxBatchBytes": 1 << 20}
CLIENTS = 8


def rss_sizes(b: Bench) -> list[int]:
    s = b.sizes
    return [s.remembered_entries, *([s.remembered_big] if b.args.big else [])]


def day_sizes(b: Bench) -> list[int]:
    s = b.sizes
    return [s.remembered_entries, *([s.day_big] if b.args.big else [])]


def settled_rss(ps: psutil.Process, timeout: float = 10.0) -> float:
    """RSS in MB once it stops moving: the flush's buffers freed, nothing left in flight."""
    last = ps.memory_info().rss
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = ps.memory_info().rss
        if abs(now - last) < MB // 2:
            break
        last = now
    return last / MB


def build_remembered(b: Bench, entries: int) -> Path:
    """Feed `entries` unique client entryIds, store them all, record the RSS, stop cleanly."""
    assert b.pool is not None
    per_request = b.sizes.per_request
    requests = math.ceil(entries / CLIENTS / per_request)
    expected = CLIENTS * requests * per_request
    root = b.fresh_dir(f"remembered-{entries}")
    with running(root, b.settings(**LARGE_BATCHES), b.logs) as daemon:
        sampler = RssSampler(daemon.ps)
        sampler.start()
        started = time.monotonic()
        jobs = client_jobs(daemon.sock, CLIENTS, requests, per_request, with_ids=True)
        # Long feeds (--big: 10 million) outlast the pool's default guard.
        results = b.pool.run(jobs, timeout=600 + expected / 10_000)
        accepted = sum(r["accepted"] for r in results)
        if accepted != expected:
            raise RuntimeError(f"{accepted} of {expected} entries accepted as new")
        stored_at = wait_stored(daemon, b.sizes.drain_timeout_s)
        rss = settled_rss(daemon.ps)
        peak = sampler.stop()
    prefix = f"ids{entries}"
    b.record(f"{prefix}.rss_mb", rss)
    b.record(f"{prefix}.peak_rss_mb", peak)
    b.record(f"{prefix}.stored_rate", accepted / (stored_at - started))
    b.notes[f"day_{entries}_journal_bytes"] = journal_bytes(root)
    b.progress(
        f"  {accepted:,} entryIds stored in {stored_at - started:.1f} s;"
        f" RSS {rss:.1f} MB after the flush (peak {peak:.1f} MB)"
    )
    return root
