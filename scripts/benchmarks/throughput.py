"""Figures 1 and 6: durable `add` throughput beside the baselines, peak RSS, idle CPU."""

from __future__ import annotations

import shutil
import time
from typing import Any

from .baselines import baseline_atomic_files, baseline_persist_queue, baseline_raw, baseline_sqlite
from .common import (
    MB,
    Bench,
    Conn,
    RssSampler,
    add_request,
    client_jobs,
    cpu_seconds,
    entry_lines,
    running,
    span,
    thread_cpu,
    thread_cpu_delta,
    wait_stored,
)


def flowagg_throughput(
    b: Bench,
    clients: int,
    requests: int,
    prefix: str,
    idle: bool,
    settings: dict[str, Any] | None = None,
    *,
    with_ids: bool = False,
) -> None:
    """`with_ids`: client entryIds, so the daemon dedupes and remembers every entry; the
    daemon's CPU is then also taken from the first send until the last entry is stored."""
    s = b.sizes
    assert b.pool is not None
    root = b.fresh_dir(f"tp{clients}")
    with running(root, b.settings() if settings is None else settings, b.logs) as daemon:
        sampler = RssSampler(daemon.ps)
        sampler.start()
        with Conn(daemon.sock) as conn:  # warm-up: first request, imports, first segment
            conn.add(add_request(entry_lines(99, 0, s.per_request)))
        before = daemon.status()
        cpu_before = cpu_seconds(daemon.ps)
        threads_before = thread_cpu(daemon.ps)
        jobs = client_jobs(daemon.sock, clients, requests, s.per_request, with_ids=with_ids)
        results = b.pool.run(jobs)
        after = daemon.status()
        cpu_after = cpu_seconds(daemon.ps)
        accepted = sum(r["accepted"] for r in results)
        expected = clients * requests * s.per_request
        if accepted != expected:
            raise RuntimeError(f"{accepted} of {expected} entries accepted")
        elapsed = span(results)
        stored_at = wait_stored(daemon, s.drain_timeout_s)
        if with_ids:
            threads = thread_cpu_delta(threads_before, thread_cpu(daemon.ps))
            for name, seconds in threads.items():
                b.record(f"{prefix}.cpu_us_stored.{name}", seconds / accepted * 1e6)
        entries = after["journal"]["entries"] - before["journal"]["entries"]
        syncs = after["journal"]["syncs"] - before["journal"]["syncs"]
        rate = accepted / elapsed
        growth = after["buffered"]["entries"] - before["buffered"]["entries"]
        b.record(f"{prefix}.flowagg", rate)
        b.record(f"{prefix}.stored", accepted / (stored_at - min(r["start"] for r in results)))
        b.record(f"{prefix}.stored_during_run", (accepted - growth) / elapsed)
        b.record(f"{prefix}.buffered_at_end", after["buffered"]["entries"])
        b.record(f"{prefix}.entries_per_sync", entries / syncs if syncs else None)
        b.record(f"{prefix}.cpu_us_per_entry", (cpu_after - cpu_before) / accepted * 1e6)
        b.record(f"{prefix}.peak_rss_mb", sampler.stop())
        b.progress(
            f"  flowagg {clients} client(s): {rate:,.0f} entries/s,"
            f" {entries / max(1, syncs):.1f} entries/sync"
        )
        if idle:
            time.sleep(s.idle_wait_s)
            cpu0, t0 = cpu_seconds(daemon.ps), time.monotonic()
            time.sleep(s.idle_measure_s)
            cpu1, t1 = cpu_seconds(daemon.ps), time.monotonic()
            b.record("idle.cpu_pct", 100.0 * (cpu1 - cpu0) / (t1 - t0))
            b.record("idle.rss_mb", daemon.ps.memory_info().rss / MB)
    shutil.rmtree(root, ignore_errors=True)


def throughput(b: Bench) -> None:
    s = b.sizes
    b.progress("  baselines: raw, sqlite, persist-queue")
    b.record("tp8.raw", baseline_raw(b, 8, s.tp8_requests))
    b.record("tp8.atomic_files", baseline_atomic_files(b, 8, s.tp8_requests))
    b.record("tp1.raw", baseline_raw(b, 1, s.tp1_requests))
    b.record("tp8.sqlite", baseline_sqlite(b, 8, s.tp8_requests))
    b.record("tp1.sqlite", baseline_sqlite(b, 1, s.tp1_requests))
    b.record("tp8.pq_entry", baseline_persist_queue(b, 8, 1, s.pq_entry_puts))
    b.record(
        "tp8.pq_request",
        baseline_persist_queue(b, 8, s.per_request, 8 * s.tp8_requests * s.per_request),
    )
    flowagg_throughput(b, 1, s.tp1_requests, "tp1", idle=False)
    flowagg_throughput(b, 8, s.tp8_requests, "tp8", idle=True, with_ids=True)
    for prefix in ("tp1", "tp8"):
        flowagg = b.samples[f"{prefix}.flowagg"][-1]
        b.record(f"{prefix}.ratio_sqlite", flowagg / b.samples[f"{prefix}.sqlite"][-1])
        b.record(f"{prefix}.ratio_raw", flowagg / b.samples[f"{prefix}.raw"][-1])
    limit = b.samples["tp8.atomic_files"][-1]
    b.record("tp8.ratio_e2e", b.samples["tp8.stored"][-1] / limit)
    b.record(
        "tp8.ratio_while_adding",
        b.samples["tp8.stored_during_run"][-1] / b.samples["tp8.flowagg"][-1],
    )
