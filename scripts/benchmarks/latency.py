"""Figure 2: single-entry `add` latency from 1 client beside `ping` and one small fsync."""

from __future__ import annotations

import shutil
import time

from .baselines import fsync_latencies
from .common import Bench, Conn, add_request, entry_lines, pct, running


def latency(b: Bench) -> None:
    n = b.sizes.latency_requests
    root = b.fresh_dir("latency")
    adds = [add_request(entry_lines(0, i, 1)) for i in range(n)]
    with running(root, b.settings(), b.logs) as daemon, Conn(daemon.sock) as conn:
        for _ in range(50):  # warm-up
            conn.call(b'{"op":"ping"}\n')
        pings = []
        for _ in range(n):
            t = time.perf_counter()
            if not conn.call(b'{"op":"ping"}\n').get("ok"):
                raise RuntimeError("ping failed")
            pings.append(time.perf_counter() - t)
        add_times = []
        for line in adds:
            t = time.perf_counter()
            conn.add(line)
            add_times.append(time.perf_counter() - t)
        status = daemon.status()
    shutil.rmtree(root, ignore_errors=True)
    fsyncs = fsync_latencies(b, n)
    for name, samples in (("add", add_times), ("ping", pings), ("fsync", fsyncs)):
        b.record(f"lat.{name}_p50", pct(samples, 0.50) * 1000)
        b.record(f"lat.{name}_p99", pct(samples, 0.99) * 1000)
    bound = 3 * (pct(pings, 0.99) + pct(fsyncs, 0.99)) * 1000
    b.record("lat.bound", bound)
    b.record("lat.server_add_p99", status["latencyMs"]["addP99"])
    b.progress(
        f"  add p99 {pct(add_times, 0.99) * 1000:.3f} ms, ping p99"
        f" {pct(pings, 0.99) * 1000:.3f} ms, fsync p99 {pct(fsyncs, 0.99) * 1000:.3f} ms"
    )
