"""Baselines measured in the same run as flowagg (SPEC §10): what the disk and SQLite allow.

raw appends with one fsync per group, SQLite (WAL, synchronous=FULL) from as many threads,
persist-queue's SQLiteAckQueue, serial atomic batch files (the end-to-end limit), and one
small fsync'd append (the disk's round trip).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable

from .common import Bench, client_requests, entry_lines, timed_threads


def baseline_raw(b: Bench, clients: int, requests: int) -> float:
    """Append every request's entries as JSON lines; one fsync per group of `clients`."""
    s = b.sizes
    reqs = [client_requests(c, requests, s.per_request) for c in range(clients)]
    groups = [
        b"".join(line + b"\n" for c in range(clients) for line in reqs[c][r])
        for r in range(requests)
    ]
    path = b.fresh_dir("raw")
    path.mkdir()
    fd = os.open(path / "entries.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        started = time.perf_counter()
        for data in groups:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    shutil.rmtree(path)
    return clients * requests * s.per_request / elapsed


def baseline_atomic_files(b: Bench, clients: int, requests: int, batch_size: int = 50) -> float:
    """The same entries as `batch_size`-entry batch files, one after another, each published
    the way SPEC §1.3 demands: temp file, write, fsync, rename, directory fsync.

    The files' bytes are made before the clock starts: this is what the disk allows, the
    limit a batch writer can approach, not a rival implementation.
    """
    s = b.sizes
    lines = [
        line
        for c in range(clients)
        for req in client_requests(c, requests, s.per_request)
        for line in req
    ]
    files = []
    for n, first in enumerate(range(0, len(lines), batch_size)):
        array = b"[" + b",".join(lines[first : first + batch_size]) + b"]"
        digest = hashlib.sha256(array).hexdigest().encode()
        head = b'{"batchId":"%013d_%012d","timestamp":0,"version":"2.0.0","trigger":"size",' % (
            n,
            first,
        )
        tail = b',"entryCount":%d,"entriesSha256":"%s","recovered":false}' % (
            len(lines[first : first + batch_size]),
            digest,
        )
        files.append((f"batch_{n:013d}.json", head + b'"entries":' + array + tail))
    path = b.fresh_dir("atomic")
    path.mkdir()
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        started = time.perf_counter()
        for name, data in files:
            tmp = f".tmp-{name}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(dir_fd)
    shutil.rmtree(path)
    return len(lines) / elapsed


def baseline_sqlite(b: Bench, threads: int, requests: int) -> float:
    """INSERT the entries as JSON text; WAL, synchronous=FULL, one transaction per request."""
    s = b.sizes
    path = b.fresh_dir("sqlite")
    path.mkdir()
    db = path / "entries.db"
    setup = sqlite3.connect(db)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE entries (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    setup.commit()
    setup.close()

    def prepare(client: int) -> tuple[Callable[[], None], Callable[[], None]]:
        rows = [
            [(line.decode(),) for line in req]
            for req in client_requests(client, requests, s.per_request)
        ]
        conn = sqlite3.connect(db, timeout=60, isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")

        def timed() -> None:
            for batch in rows:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO entries (body) VALUES (?)", batch)
                conn.execute("COMMIT")

        return timed, conn.close

    elapsed = timed_threads(threads, prepare)
    check = sqlite3.connect(db)
    stored = check.execute("SELECT count(*) FROM entries").fetchone()[0]
    mode = check.execute("PRAGMA journal_mode").fetchone()[0]
    check.close()
    expected = threads * requests * s.per_request
    if stored != expected or mode != "wal":
        raise RuntimeError(f"sqlite baseline stored {stored}/{expected} rows, mode {mode}")
    shutil.rmtree(path)
    return expected / elapsed


def baseline_persist_queue(b: Bench, threads: int, per_put: int, total_entries: int) -> float:
    """persist-queue's SQLiteAckQueue from `threads` producers; `per_put` entries per item."""
    from persistqueue import SQLiteAckQueue

    class Passthrough:
        """Store the pre-serialized JSON as is (like the other baselines)."""

        @staticmethod
        def dumps(value: bytes) -> bytes:
            return value

        @staticmethod
        def loads(value: bytes) -> bytes:
            return value

    s = b.sizes
    puts_per_thread = max(1, total_entries // per_put // threads)
    path = b.fresh_dir("pq")
    queue = SQLiteAckQueue(str(path), multithreading=True, serializer=Passthrough)
    b.notes["persist_queue_synchronous"] = queue._putter.execute("PRAGMA synchronous").fetchone()[0]

    def prepare(client: int) -> tuple[Callable[[], None], Callable[[], None]]:
        if per_put == 1:
            items = entry_lines(client, 0, puts_per_thread)
        else:
            items = [
                b"[" + b",".join(req) + b"]"
                for req in client_requests(client, puts_per_thread, s.per_request)
            ]

        def timed() -> None:
            for item in items:
                queue.put(item)

        return timed, lambda: None

    elapsed = timed_threads(threads, prepare)
    stored = queue.qsize()
    queue.close()
    if stored != threads * puts_per_thread:
        raise RuntimeError(f"persist-queue holds {stored} items, not {threads * puts_per_thread}")
    shutil.rmtree(path)
    return threads * puts_per_thread * per_put / elapsed


def fsync_latencies(b: Bench, n: int) -> list[float]:
    """One small append (an entry line) and fsync, n times: the disk's round trip."""
    path = b.fresh_dir("fsync")
    path.mkdir()
    line = entry_lines(0, 0, 1)[0] + b"\n"
    fd = os.open(path / "append.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    samples = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, line)
            os.fsync(fd)
            samples.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    shutil.rmtree(path)
    return samples
