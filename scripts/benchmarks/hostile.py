"""Hostile request: one request line just under maxRequestBytes, made of ~8 million non-entries.

The cost of one request must be bounded (SPEC §4.1): the reply (a capped rejection list), the
time to answer and the memory spent on it. The client reads a bounded number of reply bytes
with a deadline, and the daemon is SIGKILLed if its RSS passes KILL_ABOVE, so a daemon that
builds one rejection per item cannot take the machine down with it.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from .common import MB, Bench, Daemon, RssSampler, ping

MAX_REQUEST_BYTES = 16 << 20  # flowagg's default maxRequestBytes
REPLY_READ_CAP = 16 << 20  # no more of a runaway reply is read than this
KILL_ABOVE = 1536 * MB
PING_AFTER_S = 5.0


HEAD, TAIL = b'{"op":"add","entries":[0', b"]}\n"
ITEMS = 1 + (MAX_REQUEST_BYTES - 64 - len(HEAD) - len(TAIL)) // 2  # a little room under the limit


def hostile_line() -> bytes:
    """`{"op":"add","entries":[0,0,...]}`: ITEMS zeros, none of them an entry."""
    return HEAD + b",0" * (ITEMS - 1) + TAIL


def send_capped(path: Path, line: bytes, timeout: float, cap: int) -> tuple[int, bool]:
    """Send one line; read the reply until its newline, EOF, `cap` bytes or the deadline.

    Returns the reply bytes read and whether the whole reply line arrived.
    """
    deadline = time.monotonic() + timeout
    got = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(line)
            while got < cap:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(min(1 << 16, cap - got))
                if not chunk:
                    return got, False
                got += len(chunk)
                if b"\n" in chunk:
                    return got, True
        except OSError:  # the deadline, or the daemon died (or was killed) under the request
            return got, False
    return got, False


def answers_ping(daemon: Daemon, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and daemon.proc.poll() is None:
        if ping(daemon.sock):
            return True
        time.sleep(0.1)
    return False


def hostile(b: Bench) -> None:
    line = hostile_line()
    b.notes["hostile_request_bytes"] = len(line)
    root = b.fresh_dir("hostile")
    daemon = Daemon(root, b.settings(), b.logs)
    try:
        daemon.wait_ready()
        sampler = RssSampler(daemon.ps, interval=0.01, kill_above=KILL_ABOVE)
        sampler.start()
        started = time.perf_counter()
        got, whole = send_capped(daemon.sock, line, b.sizes.hostile_timeout_s, REPLY_READ_CAP)
        elapsed = time.perf_counter() - started
        # Still sampled (and guarded) here: a daemon can keep chewing after the client gave up.
        alive = answers_ping(daemon, PING_AFTER_S)
        peak = sampler.stop()
    finally:
        # Not SIGTERM: a daemon still busy with the request could hold the stop for long.
        daemon.kill()
    shutil.rmtree(root, ignore_errors=True)
    b.record("hostile.elapsed_s", elapsed)
    b.record("hostile.reply_s", elapsed if whole else None)
    b.record("hostile.reply_bytes", got)
    b.record("hostile.reply_whole", float(whole))
    b.record("hostile.peak_rss_mb", peak)
    b.record("hostile.killed", float(sampler.killed))
    b.record("hostile.ping_after", float(alive))
    b.progress(
        f"  {'reply' if whole else 'no whole reply'} after {elapsed:.2f} s, {got:,} bytes,"
        f" peak RSS {peak:.1f} MB{' (killed)' if sampler.killed else ''},"
        f" ping afterwards {'ok' if alive else 'no answer'}"
    )
