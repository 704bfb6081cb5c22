"""Spool intake: small files taken from inbox/ per second, beside serial atomic files.

The files are made in a folder beside inbox/ before the clock starts, then renamed into
inbox/ under a running daemon (a rename is how a client hands a file over); the clock stops
when inbox/ and journal/spool/ are both empty, i.e. every file was adopted, journaled and
deleted. The daemon's CPU (user + system, per thread) over the same span is divided by the
files: on a shared machine it is the steadier figure, and the rate it allows on an idle disk
is what says whether intake keeps up there. The baseline publishes the same number of files,
one after another, the way SPEC §1.3 demands (temp, write, fsync, rename, dir fsync): the
disk's serial atomic-file rate.
"""

from __future__ import annotations

import os
import shutil
import time

from .baselines import baseline_atomic_files
from .common import Bench, entry_lines, running, thread_cpu, thread_cpu_delta

GOAL = 0.5  # issue #26: intake >= 0.5 x the serial atomic-file rate
POLL_S = 0.005


def spool_intake(b: Bench) -> None:
    s = b.sizes
    files, per_file = s.spool_files, s.spool_entries
    root = b.fresh_dir("spool")
    with running(root, b.settings(), b.logs) as daemon:
        inbox, adopted = root / "inbox", root / "journal" / "spool"
        staging = root / "staging"
        staging.mkdir()
        names = []
        for n in range(files):
            data = b"".join(line + b"\n" for line in entry_lines(n, 0, per_file, with_id=True))
            name = f"{n:08d}.jsonl"
            # Mode 0600, as `flowagg add --spool` writes them: other modes are read through a
            # private copy (spool_trust), which this figure does not measure.
            fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            names.append(name)
        os.sync()  # the staged bytes are on disk: the clock times the intake, not writeback
        before = daemon.status()["journal"]["entries"]
        threads_before = thread_cpu(daemon.ps)
        deadline = time.monotonic() + s.drain_timeout_s
        started = time.perf_counter()
        for name in names:
            os.rename(staging / name, inbox / name)
        while os.listdir(inbox) or os.listdir(adopted):
            if time.monotonic() > deadline:
                raise TimeoutError(f"spool not taken within {s.drain_timeout_s:g} s")
            time.sleep(POLL_S)
        elapsed = time.perf_counter() - started
        threads = thread_cpu_delta(threads_before, thread_cpu(daemon.ps))
        journaled = daemon.status()["journal"]["entries"] - before
    shutil.rmtree(root, ignore_errors=True)
    if journaled != files * per_file:
        raise RuntimeError(f"{journaled} entries journaled from the spool, not {files * per_file}")
    # The baseline makes clients x requests x per_request entries: the same count, as files.
    requests = files * per_file // s.per_request
    atomic = baseline_atomic_files(b, 1, requests, batch_size=per_file) / per_file
    rate = files / elapsed
    b.record("spool.files_per_s", rate)
    b.record("spool.atomic_files_per_s", atomic)
    b.record("spool.ratio", rate / atomic)
    for name, seconds in threads.items():
        b.record(f"spool.cpu_us.{name}", seconds / files * 1e6)
    b.progress(
        f"  {rate:,.0f} files/s taken; serial atomic files {atomic:,.0f}/s;"
        f" daemon CPU {threads['total'] / files * 1e6:,.0f} us/file"
    )


def spool_row(b: Bench) -> tuple[str, str, str, str, str]:
    s, m = b.sizes, b.med
    ratio = m("spool.ratio")
    cpu = m("spool.cpu_us.total")
    # What the daemon's CPU alone would allow: one core's worth of it per second.
    cpu_rate = None if not cpu else 1e6 / cpu
    return (
        f"spool intake\n{s.spool_files:,} files of {s.spool_entries} entries in inbox/",
        f"{fmt_files(m('spool.files_per_s'))}\n{fmt_ratio(ratio)} x baseline\n"
        f"daemon CPU {fmt_us(cpu)}/file\n{cpu_threads(b)}\n"
        f"(CPU alone allows {fmt_files(cpu_rate)})",
        f"serial atomic {s.spool_entries}-entry files\n(temp, fsync, rename, dir fsync):\n"
        f"{fmt_files(m('spool.atomic_files_per_s'))}",
        f"goal >= {GOAL} x serial atomic files",
        "n/a" if ratio is None else ("meets" if ratio >= GOAL else "SHORT"),
    )


def cpu_threads(b: Bench) -> str:
    """The daemon's CPU per file thread by thread, the busiest first."""
    prefix = "spool.cpu_us."
    names = {k[len(prefix) :] for k in b.samples if k.startswith(prefix)} - {"total"}
    ranked = sorted(names, key=lambda name: -(b.med(prefix + name) or 0.0))
    return "\n".join(f"  {name}: {fmt_us(b.med(prefix + name))}" for name in ranked)


def fmt_us(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f} us"


def fmt_files(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f} files/s"


def fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
