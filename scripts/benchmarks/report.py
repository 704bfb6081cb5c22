"""The report: one row per figure (value, baselines, goal, verdict), the header and the notes."""

from __future__ import annotations

import dataclasses
import os
import platform
import sqlite3
import time
from pathlib import Path
from typing import Any

import psutil

from .common import MB, Bench
from .hostile import ITEMS, KILL_ABOVE, MAX_REQUEST_BYTES, REPLY_READ_CAP
from .memory import LARGE_BATCHES, day_sizes, rss_sizes
from .redaction import KEYS, METADATA, PATTERNS
from .spool import spool_row


def fmt_rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}/s"


def fmt(v: float | None, unit: str = "", digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}{unit}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("meets" if ok else "SHORT")


def at_least(v: float | None, goal: float) -> bool | None:
    return None if v is None else v >= goal


def below(v: float | None, goal: float) -> bool | None:
    return None if v is None else v < goal


def redaction_row(b: Bench) -> tuple[str, str, str, str, str]:
    m = b.med
    overhead = m("redact.overhead_pct")
    return (
        f"add throughput with redaction\n8 clients x {b.sizes.per_request}-entry requests\n"
        f"{len(KEYS)} keys, {len(PATTERNS)} patterns",
        f"on: {fmt_rate(m('redact_on.flowagg'))}\n"
        f"daemon CPU {fmt(m('redact_on.cpu_us_per_entry'), ' us', 1)}/entry",
        f"off: {fmt_rate(m('redact_off.flowagg'))}\n"
        f"daemon CPU {fmt(m('redact_off.cpu_us_per_entry'), ' us', 1)}/entry",
        f"overhead {fmt(overhead, ' %', 1)} (goal < 20 %)",
        verdict(None if overhead is None else overhead < 20.0),
    )


def redaction_scan_row(b: Bench) -> tuple[str, str, str, str, str]:
    m = b.med
    re2_ms = m("redact.email_60kb_re2_ms")
    return (
        f"README e-mail pattern on 60 KB\nwithout @; key check on\n{len(METADATA)}-key metadata",
        f"RE2: {fmt(re2_ms, ' ms', 2)}\n1 MB: {fmt(m('redact.email_1mb_re2_ms'), ' ms', 1)}\n"
        f"keys: {fmt(m('redact.keys_us_per_entry'), ' us', 2)}/entry",
        f"backtracking re:\n{fmt(m('redact.email_60kb_re_s'), ' s', 1)}",
        "milliseconds (goal < 100 ms)",
        verdict(below(re2_ms, 100.0)),
    )


def compression_row(b: Bench) -> tuple[str, str, str, str, str]:
    m = b.med
    ack, stored = m("compress.flowagg_overhead_pct"), m("compress.stored_overhead_pct")
    return (
        f"throughput with zstd batch files\n8 clients x {b.sizes.per_request}-entry requests",
        f"zstd: acks {fmt_rate(m('compress_zstd.flowagg'))}\n"
        f"end to end {fmt_rate(m('compress_zstd.stored'))}\n"
        f"daemon CPU {fmt(m('compress_zstd.cpu_us_per_entry'), ' us', 1)}/entry",
        f"none: acks {fmt_rate(m('compress_none.flowagg'))}\n"
        f"end to end {fmt_rate(m('compress_none.stored'))}\n"
        f"daemon CPU {fmt(m('compress_none.cpu_us_per_entry'), ' us', 1)}/entry",
        f"overhead: acks {fmt(ack, ' %', 1)},\nend to end {fmt(stored, ' %', 1)} (goal < 20 %)",
        verdict(None if ack is None or stored is None else max(ack, stored) < 20.0),
    )


def cpu_row(b: Bench) -> tuple[str, str, str, str, str]:
    """Daemon CPU per entry in the 8-client run, first send until stored, thread by thread."""
    prefix = "tp8.cpu_us_stored."
    names = sorted(
        (k[len(prefix) :] for k in b.samples if k.startswith(prefix) and not k.endswith(".total")),
        key=lambda name: -(b.med(prefix + name) or 0.0),
    )
    total = b.med(prefix + "total")
    per_thread = "\n".join(f"{name}: {fmt(b.med(prefix + name), ' us', 2)}" for name in names)
    return (
        "daemon CPU per entry\n8-client run, client entryIds,\nfirst send until stored"
        "\n(user + system, all threads)",
        f"{fmt(total, ' us', 2)}/entry",
        per_thread or "n/a",
        f"{fmt(total, ' us', 2)} (goal <= 8 us)",
        verdict(None if total is None else total <= 8.0),
    )


def build_rows(b: Bench) -> list[tuple[str, str, str, str, str]]:
    costs = [
        row(b)
        for flag, row in (
            ("redaction", redaction_row),
            ("redaction", redaction_scan_row),
            ("compression", compression_row),
        )
        if getattr(b.args, flag)
    ]
    if costs:
        return costs
    m = b.med
    s = b.sizes
    rows: list[tuple[str, str, str, str, str]] = []
    tp8_entries = 8 * s.tp8_requests * s.per_request
    rows.append(
        (
            f"durable add throughput, entries/s\n8 clients x {s.per_request}-entry requests\n"
            f"({tp8_entries:,} entries)",
            f"{fmt_rate(m('tp8.flowagg'))}\n"
            f"{fmt(m('tp8.entries_per_sync'), digits=0)} entries/sync\n"
            f"daemon CPU {fmt(m('tp8.cpu_us_per_entry'), ' us', 1)}/entry",
            f"sqlite 8 threads: {fmt_rate(m('tp8.sqlite'))}\n"
            f"raw, fsync per 8 req: {fmt_rate(m('tp8.raw'))}\n"
            f"persist-queue, put/entry: {fmt_rate(m('tp8.pq_entry'))}\n"
            f"persist-queue, put/request: {fmt_rate(m('tp8.pq_request'))}",
            f"flowagg/sqlite {fmt(m('tp8.ratio_sqlite'))} (goal >= 1.0)\n"
            f"flowagg/raw {fmt(m('tp8.ratio_raw'))} (reported)",
            verdict(at_least(m("tp8.ratio_sqlite"), 1.0)),
        )
    )
    rows.append(
        (
            f"durable add throughput, entries/s\n1 client x {s.per_request}-entry requests\n"
            f"({s.tp1_requests * s.per_request:,} entries)",
            f"{fmt_rate(m('tp1.flowagg'))}\n"
            f"{fmt(m('tp1.entries_per_sync'), digits=0)} entries/sync",
            f"sqlite 1 thread: {fmt_rate(m('tp1.sqlite'))}\n"
            f"raw, fsync per request: {fmt_rate(m('tp1.raw'))}",
            f"flowagg/sqlite {fmt(m('tp1.ratio_sqlite'))}\nflowagg/raw {fmt(m('tp1.ratio_raw'))}",
            "info",
        )
    )
    rows.append(
        (
            f"end to end, entries/s\nfirst add until all {tp8_entries:,}\nare in batch files"
            " (8-client run,\ndefault batchSize)",
            f"{fmt_rate(m('tp8.stored'))}",
            f"serial atomic 50-entry files\n(temp, fsync, rename, dir fsync):\n"
            f"{fmt_rate(m('tp8.atomic_files'))}",
            f"flowagg/atomic files {fmt(m('tp8.ratio_e2e'))}\n(goal >= 0.8)",
            verdict(at_least(m("tp8.ratio_e2e"), 0.8)),
        )
    )
    rows.append(cpu_row(b))
    rows.append(
        (
            "stored while adding, entries/s\n8-client run",
            f"{fmt_rate(m('tp8.stored_during_run'))}\n"
            f"buffered at end: {fmt(m('tp8.buffered_at_end'), digits=0)}",
            f"acknowledged: {fmt_rate(m('tp8.flowagg'))}",
            f"stored/acknowledged {fmt(m('tp8.ratio_while_adding'))}\n(goal >= 0.5)",
            verdict(at_least(m("tp8.ratio_while_adding"), 0.5)),
        )
    )
    rows.append(
        (
            f"single-entry add latency\n1 client, {s.latency_requests:,} requests",
            f"p50 {fmt(m('lat.add_p50'), ' ms', 3)}\np99 {fmt(m('lat.add_p99'), ' ms', 3)}",
            f"ping p50 {fmt(m('lat.ping_p50'), ' ms', 3)}, p99 {fmt(m('lat.ping_p99'), ' ms', 3)}\n"
            f"fsync p50 {fmt(m('lat.fsync_p50'), ' ms', 3)},"
            f" p99 {fmt(m('lat.fsync_p99'), ' ms', 3)}",
            f"goal p99 <= 3 x (ping p99 + fsync p99)\n= {fmt(m('lat.bound'), ' ms', 3)}",
            verdict(
                None
                if m("lat.add_p99") is None or m("lat.bound") is None
                else m("lat.add_p99") <= m("lat.bound")  # type: ignore[operator]
            ),
        )
    )
    rows.append(
        (
            f"group commit\n{s.gc_clients} clients x {s.gc_requests} single-entry adds",
            f"{fmt(m('gc.entries_per_sync'))} entries/sync\n"
            f"{fmt_rate(m('gc.adds_per_s'))} adds\n"
            f"add p50 {fmt(m('gc.add_p50'), ' ms')}, p99 {fmt(m('gc.add_p99'), ' ms')}",
            "",
            "goal >= 8 entries/sync",
            verdict(at_least(m("gc.entries_per_sync"), 8.0)),
        )
    )
    for size in (50, 500):
        rows.append(
            (
                f"manual flush, {size} entries buffered\nsocket round trip, {s.flush_rounds} x",
                f"p50 {fmt(m(f'flush{size}.p50'), ' ms')}\np99 {fmt(m(f'flush{size}.p99'), ' ms')}",
                f"ping p99 {fmt(m('lat.ping_p99'), ' ms', 3)}\n"
                f"fsync p99 {fmt(m('lat.fsync_p99'), ' ms', 3)}",
                "goal p99 < 5 ms" if size == 50 else "(no goal)",
                verdict(below(m("flush50.p99"), 5.0)) if size == 50 else "info",
            )
        )
    for prefix, entries in (("start", s.startup_entries), ("big", s.big_entries)):
        if f"{prefix}.ready_s" not in b.samples and prefix == "big":
            continue
        runs = len(b.samples.get(f"{prefix}.ready_s", []))
        rows.append(
            (
                f"restart, {entries:,} journaled\nunflushed entries"
                + ("" if runs != 1 or b.args.repeats == 1 else " (1 run)"),
                f"ping ok {fmt(m(f'{prefix}.ready_s'), ' s')}\n"
                f"first add {fmt(m(f'{prefix}.first_add_s'), ' s')}\n"
                f"drained {fmt(m(f'{prefix}.drained_s'), ' s')}\n"
                f"({fmt(m(f'{prefix}.drain_rate'), digits=0)} entries/s)",
                "",
                "goal: accepting adds < 10 s\n(SPEC: with 1,000,000)",
                verdict(below(m(f"{prefix}.first_add_s"), 10.0)),
            )
        )
        rows.append(
            (
                f"peak RSS, restart with\n{entries:,} entries until drained",
                fmt(m(f"{prefix}.peak_rss_mb"), " MB", 1),
                "",
                "goal < 80 MB",
                verdict(below(m(f"{prefix}.peak_rss_mb"), 80.0)),
            )
        )
    peak_tp = [
        v
        for v in (m("tp1.peak_rss_mb"), m("tp8.peak_rss_mb"))
        if v is not None  # the higher of the two runs
    ]
    rows.append(
        (
            "peak RSS, throughput runs",
            f"1 client {fmt(m('tp1.peak_rss_mb'), ' MB', 1)}\n"
            f"8 clients {fmt(m('tp8.peak_rss_mb'), ' MB', 1)}",
            "",
            "goal < 80 MB",
            verdict(below(max(peak_tp), 80.0) if peak_tp else None),
        )
    )
    rows.append(
        (
            f"idle CPU (after {s.idle_wait_s:g} s idle,\nmeasured over {s.idle_measure_s:g} s)",
            f"{fmt(m('idle.cpu_pct'), ' %')}\nRSS {fmt(m('idle.rss_mb'), ' MB', 1)}",
            "",
            "goal < 1 %",
            verdict(below(m("idle.cpu_pct"), 1.0)),
        )
    )
    once = "" if b.args.repeats == 1 else " (1 run)"
    for entries in rss_sizes(b):
        prefix = f"ids{entries}"
        rows.append(
            (
                f"RSS with {entries:,} remembered\nclient entryIds, all stored{once}",
                f"{fmt(m(f'{prefix}.rss_mb'), ' MB', 1)} after the flush\n"
                f"peak {fmt(m(f'{prefix}.peak_rss_mb'), ' MB', 1)} over the run\n"
                f"stored at {fmt_rate(m(f'{prefix}.stored_rate'))}",
                "",
                "goal < 80 MB\n(SPEC: with 10,000,000)",
                verdict(below(m(f"{prefix}.rss_mb"), 80.0)),
            )
        )
    for entries in day_sizes(b):
        prefix = f"day{entries}"
        journal = b.notes.get(f"day_{entries}_journal_bytes")
        rows.append(
            (
                f"restart with a day of journal:\n{entries:,} stored entries,\n"
                "entryIds still remembered",
                f"ping ok {fmt(m(f'{prefix}.ready_s'), ' s')}\n"
                f"peak RSS {fmt(m(f'{prefix}.peak_rss_mb'), ' MB', 1)}\n"
                f"journal {fmt(None if journal is None else journal / MB, ' MB', 0)}",
                "",
                "goal: ping ok < 10 s\n(SPEC: a full day of journal)",
                verdict(below(m(f"{prefix}.ready_s"), 10.0)),
            )
        )
    rows.append(hostile_row(b))
    rows.append(spool_row(b))
    rows.append(power_row(b))
    return rows


def hostile_row(b: Bench) -> tuple[str, str, str, str, str]:
    m = b.med
    whole, peak, alive = m("hostile.reply_whole"), m("hostile.peak_rss_mb"), m("hostile.ping_after")
    reply_s, reply_bytes = m("hostile.reply_s"), m("hostile.reply_bytes")
    if whole is None:
        reply = "n/a"
    elif whole >= 0.5:
        reply = f"reply {fmt(reply_s, ' s')}, {fmt(reply_bytes, ' bytes', 0)}"
    elif m("hostile.killed"):
        reply = (
            f"no reply after {fmt(m('hostile.elapsed_s'), ' s')}: killed\n"
            f"above {KILL_ABOVE / MB:,.0f} MB RSS by the bench"
        )
    else:
        reply = (
            f"no whole reply within {b.sizes.hostile_timeout_s:g} s\n"
            f"({fmt(reply_bytes, ' bytes', 0)} read, cap {REPLY_READ_CAP:,})"
        )
    ok = None
    if whole is not None and peak is not None and alive is not None:
        ok = (
            whole >= 0.5
            and reply_s is not None
            and reply_s < 2.0
            and reply_bytes is not None
            and reply_bytes < 64 * 1024
            and peak < 200.0
            and alive >= 0.5
        )
    return (
        f"hostile request: one line of\n{MAX_REQUEST_BYTES >> 20} MiB, {ITEMS:,} zeros\n"
        "as entries, fresh daemon",
        f"{reply}\npeak RSS {fmt(peak, ' MB', 1)}\n"
        f"ping after: {'n/a' if alive is None else ('answers' if alive >= 0.5 else 'NO ANSWER')}",
        "",
        "goal: peak RSS < 200 MB,\nreply < 2 s and < 64 KiB,\nping answers after",
        verdict(ok),
    )


def power_row(b: Bench) -> tuple[str, str, str, str, str]:
    cuts, ok = b.med("power.cuts"), b.med("power.ok")
    if cuts is None or ok is None:
        value = b.notes.get(
            "powerloss", "n/a (see the ERROR below)" if "power cuts" in b.errors else "n/a"
        )
        passed = None
    else:
        value = f"{cuts:,.0f} cuts, " + (
            "stored == acknowledged" if ok else "ENTRIES LOST/DUPLICATED"
        )
        passed = ok == 1.0
    return (
        "power cuts survived\n(LazyFS: SIGKILL + cache drop)",
        value,
        "",
        "goal: every cut, stored ==\nacknowledged (SPEC §12)",
        verdict(passed),
    )


def render(rows: list[tuple[str, ...]]) -> str:
    header = ("figure", "flowagg", "baseline(s)", "ratio / goal", "verdict")
    table = [tuple(cell.split("\n") for cell in row) for row in [header, *rows]]
    widths = [max(len(line) for row in table for line in row[i]) for i in range(len(header))]
    sep = "-+-".join("-" * w for w in widths)
    out = []
    for index, row in enumerate(table):
        height = max(len(cell) for cell in row)
        for k in range(height):
            cells = [
                (cell[k] if k < len(cell) else "").ljust(widths[i]) for i, cell in enumerate(row)
            ]
            out.append(" | ".join(cells).rstrip())
        if index < len(table) - 1:
            out.append(sep)
    return "\n".join(out)


def filesystem_of(path: Path) -> str:
    best = None
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        inside = str(path).startswith(mount.rstrip("/") + "/") or str(path) == mount
        if inside and (best is None or len(mount) > len(best.mountpoint)):
            best = part
    return f"{best.fstype} ({best.device} on {best.mountpoint})" if best else "unknown"


class OtherLoad:
    """CPU time the rest of the machine used while the benchmark ran (a noise indicator).

    System-wide busy time minus this process and its reaped children (daemons, clients).
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.system0 = self._system_busy()
        self.ours0 = self._ours()

    @staticmethod
    def _system_busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    @staticmethod
    def _ours() -> float:
        t = psutil.Process().cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def cpus(self) -> float:
        """Average number of CPUs kept busy by everything else (kernel threads included)."""
        other = (self._system_busy() - self.system0) - (self._ours() - self.ours0)
        return max(0.0, other) / (time.monotonic() - self.started)


def meta(b: Bench) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memoryMB": round(psutil.virtual_memory().total / MB),
        "filesystem": filesystem_of(b.tmp),
        "sqlite": sqlite3.sqlite_version,
        "repeats": b.args.repeats,
        "quick": b.args.quick,
        "big": b.args.big,
        "daemonSettings": b.user_settings,
        "sizes": dataclasses.asdict(b.sizes),
        **b.notes,
    }


def notes(b: Bench) -> str:
    s = b.sizes
    sync = b.notes.get("persist_queue_synchronous")
    return "\n".join(
        [
            f"Every figure is the median of {b.args.repeats} run(s) (single runs: --json);"
            " all runs on this machine, same temp dir, same entries.",
            "flowagg: real `flowagg run` daemons with default settings"
            + (f" plus --set {b.user_settings}" if b.user_settings else "")
            + "; socket clients are separate processes"
            " with pre-serialized requests (orjson); `add` returns after the journal fsync.",
            "Entries carry no entryId (flowagg assigns one), except in the 8-client run: there"
            " each carries a unique client entryId (36 characters), so the daemon dedupes and"
            " remembers every one; baselines store the same entry JSON (pre-serialized, so"
            " serialization is not charged to them).",
            "daemon CPU per entry: user + system seconds of the daemon (psutil) from just before"
            " the 8-client run's first send until its last entry is in a batch file, per"
            " entry; per thread by the kernel's thread names (psutil counts 10 ms ticks per"
            " thread, so the rounding, and threads that ended meanwhile, show as unattributed).",
            "raw: one thread appends the entries as JSON lines, write+fsync per group of 8"
            " requests (1 client: per request).",
            "sqlite: one connection per thread, WAL, synchronous=FULL,"
            " BEGIN IMMEDIATE + executemany + COMMIT per 100-entry request.",
            "persist-queue: SQLiteAckQueue(multithreading=True), 8 producer threads, WAL,"
            f" synchronous={sync} (its default); it commits every put (auto_commit=False is"
            " refused by the ack queue)."
            f" put/entry = one item per entry ({s.pq_entry_puts:,} puts: the queue's natural"
            " unit, one commit per entry); put/request = one item per 100-entry request (one"
            " commit per request, the same durability unit as flowagg and sqlite).",
            "end to end: the 8-client run, from the first add sent until `status` shows"
            " nothing buffered (socket flush polled every 10 ms, so the last partial batch is"
            " cut by hand); atomic files: the same entries as 50-entry batch files (bytes made"
            " before the clock starts) written one after another by one thread in the same temp"
            " dir: open, write, fsync, close, rename, directory fsync.",
            "stored while adding: (entries acknowledged - growth of buffered entries) / time of"
            " the adds, in the same 8-client run.",
            "group commit: journal.entries / journal.syncs delta from `status` (batch-done"
            " records ride on the next add's fsync and pay for none of their own).",
            "flush: batchSize=1000000, maxAgeMs=7 days, maxBatchBytes=64 MiB so only the"
            ' manual flush writes; time = socket {"op":"flush"} round trip (one batch file,'
            " fsync, rename, dir fsync).",
            "restart: the journal is built by a daemon that never flushes and is SIGKILLed;"
            " each run copies it and starts a default daemon, timing spawn -> ping ok, -> first"
            " add acknowledged, -> status buffered.entries == 0; RSS polled every 10 ms.",
            f"idle CPU: after the 8-client run and a flush, {s.idle_wait_s:g} s idle, then the"
            f" daemon's user+system CPU time over {s.idle_measure_s:g} s.",
            "remembered entryIds: 8 client processes x 100-entry requests, every entry with a"
            " unique 36-character UUID-shaped entryId (requests made while sending); default"
            " settings plus "
            + ", ".join(f"{k}={v}" for k, v in LARGE_BATCHES.items())
            + " so the flusher keeps up and adds never see busy;"
            " after everything is stored (socket flush until buffered == 0) RSS is polled every"
            " 0.5 s until it moves < 0.5 MB; peak = RSS polled every 20 ms from the first add"
            " to that point."
            " One root per size, built once.",
            "day of journal: that root after a clean stop (SIGTERM; the journal is kept for the"
            " 24 h dedupe window), restarted in place with default settings: spawn -> ping ok,"
            " RSS polled every 10 ms until then; a resent entryId must then come back as a"
            " duplicate, or the run fails.",
            f"hostile request: {b.notes.get('hostile_request_bytes', 0):,} bytes (default"
            f" maxRequestBytes {MAX_REQUEST_BYTES:,}) on a fresh default daemon; time = send ->"
            f" reply newline, reading at most {REPLY_READ_CAP:,} bytes for at most"
            f" {s.hostile_timeout_s:g} s; RSS polled every 10 ms until ping is polled for"
            f" 5 s afterwards; the daemon is SIGKILLed above {KILL_ABOVE / MB:,.0f} MB RSS.",
            f"spool intake: {s.spool_files:,} files of {s.spool_entries} entries (mode 0600,"
            " each with client entryIds) made in a folder beside inbox/ and synced, then renamed"
            " into inbox/ under a default daemon; time = first rename -> inbox/ and"
            " journal/spool/ both empty (polled every 5 ms); baseline: the same entries as"
            f" {s.spool_entries}-entry files written one after another like the atomic files"
            " above.",
            "redaction (--redaction only): the 8-client throughput run twice, redactKeys=[] and"
            f" redactPatterns=[] (off) beside {len(KEYS)} keys and {len(PATTERNS)} patterns"
            " (e-mail, card number, bearer token); the entries hold no secret, so every key is"
            " looked up and every string value scanned; overhead = 1 - on/off. In process: the"
            " e-mail pattern on 60 KB (and 1 MB) of `a` without `@`, median of 21 (5) scans with"
            " RE2 as the daemon runs it, and once with Python's re; the key check is the median"
            " of 3 passes over 100,000 copies of a 4-key metadata without a secret.",
            "compression (--compression only): the 8-client throughput run twice,"
            " batchCompression=none beside zstd (level 3); overhead = 1 - zstd/none, for the"
            " acknowledged rate and the end-to-end rate.",
            "power cuts: tests/powerloss.py's run_power_loss(root, cuts, seed) when present"
            f" ({s.power_cuts} cuts); it runs the working tree's flowagg, not the snapshot.",
        ]
    )
