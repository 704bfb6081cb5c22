"""Figure 3: group commit, entries per journal sync with 32 clients sending single-entry adds."""

from __future__ import annotations

import shutil

from .common import Bench, Conn, add_request, client_jobs, entry_lines, pct, running, span


def group_commit(b: Bench) -> None:
    s = b.sizes
    assert b.pool is not None
    root = b.fresh_dir("groupcommit")
    with running(root, b.settings(), b.logs) as daemon:
        with Conn(daemon.sock) as conn:
            conn.add(add_request(entry_lines(99, 0, 1)))
        before = daemon.status()
        jobs = client_jobs(daemon.sock, s.gc_clients, s.gc_requests, 1, latencies=True)
        results = b.pool.run(jobs)
        after = daemon.status()
    shutil.rmtree(root, ignore_errors=True)
    entries = after["journal"]["entries"] - before["journal"]["entries"]
    syncs = after["journal"]["syncs"] - before["journal"]["syncs"]
    accepted = sum(r["accepted"] for r in results)
    latencies = [x for r in results for x in r["latencies"]]
    b.record("gc.entries_per_sync", entries / syncs if syncs else None)
    b.record("gc.adds_per_s", accepted / span(results))
    b.record("gc.add_p50", pct(latencies, 0.50) * 1000)
    b.record("gc.add_p99", pct(latencies, 0.99) * 1000)
    b.progress(f"  {entries} entries in {syncs} syncs ({entries / max(1, syncs):.2f}/sync)")
