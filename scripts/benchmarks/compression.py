"""Throughput with zstd-compressed batch files beside uncompressed ones (batchCompression).

The same entries, the same 8 clients, default settings but for `batchCompression`: the
difference is what compressing each batch file costs the acknowledgements (the CPU is shared)
and the end-to-end rate (the flusher compresses before it writes).
"""

from __future__ import annotations

from .common import Bench
from .throughput import flowagg_throughput

VARIANTS = ("none", "zstd")


def compression(b: Bench) -> None:
    for kind in VARIANTS:
        flowagg_throughput(
            b,
            8,
            b.sizes.tp8_requests,
            f"compress_{kind}",
            idle=False,
            settings=b.settings(batchCompression=kind),
        )
    for figure in ("flowagg", "stored"):
        on = b.samples[f"compress_zstd.{figure}"][-1]
        off = b.samples[f"compress_none.{figure}"][-1]
        b.record(f"compress.{figure}_overhead_pct", 100.0 * (off - on) / off)
