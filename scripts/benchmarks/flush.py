"""Figure 4: manual flush latency (socket `flush` round trip) with 50 and 500 entries buffered."""

from __future__ import annotations

import shutil
import time

from .common import NO_FLUSH, Bench, Conn, add_request, entry_lines, pct, running


def flush_latency(b: Bench) -> None:
    rounds = b.sizes.flush_rounds
    root = b.fresh_dir("flush")
    with (
        running(root, b.settings(**NO_FLUSH), b.logs) as daemon,
        Conn(daemon.sock) as conn,
    ):
        for size in (50, 500):
            adds = [add_request(entry_lines(size, r * size, size)) for r in range(rounds + 1)]
            conn.add(adds[0])  # warm-up round, not timed
            conn.call(b'{"op":"flush"}\n')
            samples = []
            for line in adds[1:]:
                conn.add(line)
                t = time.perf_counter()
                reply = conn.call(b'{"op":"flush"}\n')
                samples.append(time.perf_counter() - t)
                if not reply.get("ok") or reply.get("entries") != size:
                    raise RuntimeError(f"flush of {size} entries answered {reply}")
            b.record(f"flush{size}.p50", pct(samples, 0.50) * 1000)
            b.record(f"flush{size}.p99", pct(samples, 0.99) * 1000)
            b.progress(
                f"  flush {size}: p50 {pct(samples, 0.5) * 1000:.2f} ms,"
                f" p99 {pct(samples, 0.99) * 1000:.2f} ms"
            )
    shutil.rmtree(root, ignore_errors=True)
