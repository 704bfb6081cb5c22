#!/usr/bin/env python3
"""Benchmark flowagg against baselines measured in the same run on the same machine (SPEC §10).

Run it through `scripts/bench` (it sets up .venv with the `bench` extra, i.e. persist-queue).
Never part of the test suite: absolute times on a shared machine mean little, so every flowagg
figure is printed beside baselines measured in the same run, and every figure is the median
over `--repeats` runs (the single runs are in `--json PATH`).

Everything happens in a temporary directory (`--dir` chooses its parent, so the disk under
test can be picked): real `flowagg run` daemons as subprocesses, driven only over their Unix
socket (newline-delimited JSON, no network), and the baselines' files and databases. Every
daemon started here is stopped or killed before the script exits. The daemons run a copy of
the flowagg package taken at the start (the working tree, or `--rev REV` from git), so edits
made while the benchmark runs do not mix into one run.

Figures (see the table notes for the details of each):
  1. durable `add` throughput, 1 and 8 socket clients x 100-entry requests, beside raw appends
     with one fsync per group of requests, SQLite (WAL, synchronous=FULL) from as many threads,
     and persist-queue's SQLiteAckQueue;
  2. single-entry `add` latency from 1 client beside `ping` and one small fsync'd append;
  3. group commit: entries per journal sync with 32 clients sending single-entry adds;
  4. manual flush latency with 50 and 500 entries buffered;
  5. restart with 100 000 (or, with --big, also 1 000 000) journaled unflushed entries:
     time until `ping` answers, until the backlog is stored, and peak RSS meanwhile;
  6. peak RSS during the throughput runs and idle CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil

BASE_TS = 1_704_067_200_000  # 2024-01-01T00:00:00Z: inside the accepted timestamp range
MAX_AGE_MS = 7 * 86_400_000  # the largest maxAgeMs: nothing flushes by age during a run
NO_FLUSH = {"batchSize": 1_000_000, "maxAgeMs": MAX_AGE_MS, "maxBatchBytes": 1 << 26}
READY_TIMEOUT_S = 120.0
MB = 1024 * 1024


# -- sizes ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sizes:
    per_request: int = 100  # entries per request in the throughput runs
    tp8_requests: int = 150  # requests per client in the 8-client run
    tp1_requests: int = 200  # requests in the 1-client run
    pq_entry_puts: int = 2_000  # persist-queue, one put (one commit) per entry
    latency_requests: int = 2_000  # single-entry adds (and pings, and fsyncs) from 1 client
    gc_clients: int = 32
    gc_requests: int = 150  # single-entry adds per client in the group commit run
    flush_rounds: int = 200  # manual flushes per buffered size
    startup_entries: int = 100_000
    big_entries: int = 1_000_000
    idle_wait_s: float = 2.0
    idle_measure_s: float = 3.0
    drain_timeout_s: float = 300.0


FULL = Sizes()
QUICK = Sizes(
    tp8_requests=25,
    tp1_requests=50,
    pq_entry_puts=400,
    latency_requests=300,
    gc_requests=25,
    flush_rounds=40,
    startup_entries=20_000,
    idle_wait_s=1.0,
    idle_measure_s=2.0,
    drain_timeout_s=120.0,
)


# -- entries and requests ------------------------------------------------------------------------
def make_entry(client: int, i: int) -> dict[str, Any]:
    """Entry i of a client: the same bytes go to flowagg and to every baseline."""
    return {
        "userId": f"user{client:02d}",
        "action": "code_edit",
        "timestamp": BASE_TS + i,
        "metadata": {
            "sessionId": f"s{client:02d}-{i // 1000}",
            "taskId": f"task-{i % 13}",
            "duration": 1000 + i % 997,
        },
    }


def entry_lines(client: int, first: int, count: int) -> list[bytes]:
    return [orjson.dumps(make_entry(client, first + k)) for k in range(count)]


def add_request(lines: list[bytes]) -> bytes:
    return b'{"op":"add","entries":[' + b",".join(lines) + b"]}\n"


def client_requests(client: int, requests: int, per_request: int) -> list[list[bytes]]:
    """The entries of each request of one client, as compact JSON."""
    return [entry_lines(client, r * per_request, per_request) for r in range(requests)]


# -- statistics ----------------------------------------------------------------------------------
def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def median(values: list[float]) -> float | None:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else None


# -- talking to a daemon -------------------------------------------------------------------------
class Conn:
    """One socket connection, many requests (newline-delimited JSON)."""

    def __init__(self, path: Path, timeout: float = 120.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rb")

    def call(self, line: bytes) -> dict[str, Any]:
        self.sock.sendall(line)
        reply = self.file.readline()
        if not reply:
            raise ConnectionError("the daemon closed the connection without a reply")
        result: dict[str, Any] = orjson.loads(reply)
        return result

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self.call(orjson.dumps(payload) + b"\n")

    def add(self, line: bytes) -> int:
        """Send one add request; retry while the daemon answers busy. Returns accepted."""
        while True:
            reply = self.call(line)
            if reply.get("ok"):
                if reply.get("rejected"):
                    raise RuntimeError(f"entries rejected: {reply['rejected'][:3]}")
                return int(reply["accepted"])
            if "retryAfterMs" in reply:
                time.sleep(reply["retryAfterMs"] / 1000)
                continue
            raise RuntimeError(f"add refused: {reply}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ping(path: Path, timeout: float = 1.0) -> bool:
    try:
        with Conn(path, timeout) as conn:
            return conn.call(b'{"op":"ping"}\n').get("ok") is True
    except (OSError, ValueError):
        return False


# Set by main(): PYTHONPATH pointing at the snapshot of flowagg that every daemon runs.
DAEMON_ENV: dict[str, str] = {}
REPO = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWAGG_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(DAEMON_ENV)
    return env


def snapshot_flowagg(dest: Path, rev: str | None) -> str:
    """Copy the flowagg package into dest, so every daemon of the run runs the same code.

    Without a rev: the working tree as it is now (edits made while the benchmark runs do not
    mix into it); with a rev: that git revision. Returns a description for the report.
    """
    dest.mkdir()
    if rev is None:
        shutil.copytree(
            REPO / "flowagg", dest / "flowagg", ignore=shutil.ignore_patterns("__pycache__")
        )
        what = "working tree"
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            head = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                check=True,
                text=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "--", "flowagg"],
                capture_output=True,
                check=True,
                text=True,
            ).stdout.strip()
            what = f"working tree at {head}" + (" with local changes" if dirty else "")
    else:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev, "flowagg"], capture_output=True, check=False
        )
        if archive.returncode != 0:
            raise SystemExit(f"bench: cannot read flowagg at {rev!r}: {archive.stderr.decode()}")
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        main_py = dest / "flowagg" / "__main__.py"
        if not main_py.exists():  # older revisions: `python -m flowagg` needs one
            main_py.write_text("from .cli import main\n\nmain()\n")
        what = f"git {rev}"
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(dest / "flowagg")], check=False
    )  # so that start-up times do not include compiling
    DAEMON_ENV["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(dest), os.environ.get("PYTHONPATH", "")) if p
    )
    return what


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the daemon gets SIGKILL if this benchmark dies without cleaning up."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


LIVE_DAEMONS: list[Daemon] = []


class Daemon:
    """A real `flowagg run` subprocess on its own data root, started like tests/harness.py."""

    def __init__(
        self,
        root: Path,
        settings: dict[str, Any],
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.sock = root / "run" / "flowagg.sock"
        args = [sys.executable, "-m", "flowagg", "--root", str(root), "run"]
        for key, value in settings.items():
            args += ["--set", f"{key}={value}"]
        self.log_path = log_dir / f"{root.name}.log"
        self._log = self.log_path.open("ab")
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**clean_env(), **(env or {})},
            cwd=root.parent,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        LIVE_DAEMONS.append(self)
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, interval: float = 0.01) -> float:
        """Poll `ping` until it answers ok; returns seconds since the spawn."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if ping(self.sock):
                return time.monotonic() - self.spawned_at
            time.sleep(interval)
        raise TimeoutError(f"daemon not ready within {timeout} s:\n{self.log()}")

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        with Conn(self.sock) as conn:
            return conn.request(payload)

    def status(self) -> dict[str, Any]:
        reply = self.request({"op": "status"})
        if not reply.get("ok"):
            raise RuntimeError(f"status failed: {reply}")
        return reply

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(30)
        self._close()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the daemon flushes and exits), SIGKILL if it takes too long."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"bench: daemon {self.proc.pid} ignored SIGTERM; killing it", file=sys.stderr)
        self.kill()

    def _close(self) -> None:
        self._log.close()
        with contextlib.suppress(ValueError):
            LIVE_DAEMONS.remove(self)


@contextlib.contextmanager
def running(root: Path, settings: dict[str, Any], log_dir: Path) -> Iterator[Daemon]:
    daemon = Daemon(root, settings, log_dir)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


class RssSampler(threading.Thread):
    """Polls a process's RSS until stopped; keeps the peak."""

    def __init__(self, ps: psutil.Process, interval: float = 0.02) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.ps = ps
        self.interval = interval
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, self.ps.memory_info().rss)
            except psutil.Error:
                return
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> float:
        """Stop sampling; returns the peak RSS in MB."""
        self._stop_event.set()
        self.join()
        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, self.ps.memory_info().rss)
        return self.peak / MB


def cpu_seconds(ps: psutil.Process) -> float:
    times = ps.cpu_times()
    return times.user + times.system


# -- client processes ----------------------------------------------------------------------------
def _client_job(conn: multiprocessing.connection.Connection, job: dict[str, Any]) -> None:
    """Prepare requests and connect, report ready, wait for the start time, send them all."""
    lines = [
        add_request(req)
        for req in client_requests(job["client"], job["requests"], job["per_request"])
    ]
    with Conn(Path(job["sock"])) as sock:
        conn.send(("ready", None))
        start_at = conn.recv()
        delay = start_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        latencies: list[float] = []
        accepted = 0
        started = time.monotonic()
        for line in lines:
            t = time.perf_counter()
            accepted += sock.add(line)
            latencies.append(time.perf_counter() - t)
        ended = time.monotonic()
    conn.send(
        (
            "done",
            {
                "start": started,
                "end": ended,
                "accepted": accepted,
                "latencies": latencies if job.get("latencies") else [],
            },
        )
    )


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        if not isinstance(job, dict):
            continue  # a start time meant for a job that failed to prepare
        try:
            _client_job(conn, job)
        except Exception:
            conn.send(("error", traceback.format_exc()))


class ClientPool:
    """Long-lived client processes (spawned once), so the client side is not GIL-bound."""

    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.workers: list[tuple[Any, multiprocessing.connection.Connection]] = []
        for _ in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.workers.append((proc, parent))

    def run(self, jobs: list[dict[str, Any]], timeout: float = 600.0) -> list[dict[str, Any]]:
        if len(jobs) > len(self.workers):
            raise ValueError("more jobs than client processes")
        active = [conn for _, conn in self.workers[: len(jobs)]]
        for conn, job in zip(active, jobs, strict=True):
            conn.send(job)
        errors: list[str] = []
        ready = []
        for conn in active:
            kind, payload = self._recv(conn, timeout)
            if kind == "ready":
                ready.append(conn)
            else:
                errors.append(payload)
        start_at = time.monotonic() + 0.05
        for conn in active:
            conn.send(start_at)
        results = []
        for conn in ready:
            kind, payload = self._recv(conn, timeout)
            if kind == "done":
                results.append(payload)
            else:
                errors.append(payload)
        if errors:
            raise RuntimeError("client process failed:\n" + errors[0])
        return results

    @staticmethod
    def _recv(conn: multiprocessing.connection.Connection, timeout: float) -> tuple[str, Any]:
        if not conn.poll(timeout):
            raise TimeoutError(f"a client process did not answer within {timeout} s")
        message: tuple[str, Any] = conn.recv()
        return message

    def close(self) -> None:
        for _proc, conn in self.workers:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc, conn in self.workers:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()


def client_jobs(
    sock: Path, clients: int, requests: int, per_request: int, *, latencies: bool = False
) -> list[dict[str, Any]]:
    return [
        {
            "sock": str(sock),
            "client": c,
            "requests": requests,
            "per_request": per_request,
            "latencies": latencies,
        }
        for c in range(clients)
    ]


def span(results: list[dict[str, Any]]) -> float:
    return max(r["end"] for r in results) - min(r["start"] for r in results)


# -- the benchmark -------------------------------------------------------------------------------
def timed_threads(
    threads: int, prepare: Callable[[int], tuple[Callable[[], None], Callable[[], None]]]
) -> float:
    """Run one worker per client, started together; seconds from the first start to the last end.

    `prepare(client)` runs untimed in the worker and returns (timed work, untimed clean-up).
    """
    barrier = threading.Barrier(threads + 1)
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def worker(client: int) -> None:
        try:
            timed, after = prepare(client)
            barrier.wait()
            started = time.monotonic()
            timed()
            spans.append((started, time.monotonic()))
            after()
        except BaseException as exc:
            errors.append(exc)
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()

    pool = [threading.Thread(target=worker, args=(c,)) for c in range(threads)]
    for t in pool:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return max(e for _, e in spans) - min(b for b, _ in spans)


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.sizes: Sizes = QUICK if args.quick else FULL
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.user_settings = parse_sets(args.set or [])
        self.samples: dict[str, list[float]] = {}
        self.errors: dict[str, str] = {}
        self.notes: dict[str, Any] = {}
        self._serial = 0
        self.pool: ClientPool | None = None

    # -- bookkeeping ---------------------------------------------------------------------------
    def record(self, name: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(name, []).append(float(value))

    def med(self, name: str) -> float | None:
        return median(self.samples.get(name, []))

    def fresh_dir(self, label: str) -> Path:
        self._serial += 1
        return self.tmp / f"{self._serial:03d}-{label}"

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return {**self.user_settings, **overrides}

    def progress(self, text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def section(self, name: str, func: Callable[[], None]) -> None:
        started = time.monotonic()
        try:
            func()
        except Exception:
            detail = traceback.format_exc()
            # The last line names the cause (for a daemon that died: the last line of its log).
            self.errors.setdefault(name, detail.strip().splitlines()[-1].strip())
            print(f"bench: {name} failed:\n{detail}", file=sys.stderr, flush=True)
        finally:
            for daemon in list(LIVE_DAEMONS):
                daemon.kill()
        self.progress(f"  {name} took {time.monotonic() - started:.1f} s")

    # -- 1. throughput baselines ---------------------------------------------------------------
    def baseline_raw(self, clients: int, requests: int) -> float:
        """Append every request's entries as JSON lines; one fsync per group of `clients`."""
        s = self.sizes
        reqs = [client_requests(c, requests, s.per_request) for c in range(clients)]
        groups = [
            b"".join(line + b"\n" for c in range(clients) for line in reqs[c][r])
            for r in range(requests)
        ]
        path = self.fresh_dir("raw")
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

    def baseline_sqlite(self, threads: int, requests: int) -> float:
        """INSERT the entries as JSON text; WAL, synchronous=FULL, one transaction per request."""
        s = self.sizes
        path = self.fresh_dir("sqlite")
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

    def baseline_persist_queue(self, threads: int, per_put: int, total_entries: int) -> float:
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

        s = self.sizes
        puts_per_thread = max(1, total_entries // per_put // threads)
        path = self.fresh_dir("pq")
        queue = SQLiteAckQueue(str(path), multithreading=True, serializer=Passthrough)
        self.notes["persist_queue_synchronous"] = queue._putter.execute(
            "PRAGMA synchronous"
        ).fetchone()[0]

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
            raise RuntimeError(
                f"persist-queue holds {stored} items, not {threads * puts_per_thread}"
            )
        shutil.rmtree(path)
        return threads * puts_per_thread * per_put / elapsed

    # -- 1 and 6. flowagg throughput, RSS, idle CPU --------------------------------------------
    def flowagg_throughput(self, clients: int, requests: int, prefix: str, idle: bool) -> None:
        s = self.sizes
        assert self.pool is not None
        root = self.fresh_dir(f"tp{clients}")
        with running(root, self.settings(), self.logs) as daemon:
            sampler = RssSampler(daemon.ps)
            sampler.start()
            with Conn(daemon.sock) as conn:  # warm-up: first request, imports, first segment
                conn.add(add_request(entry_lines(99, 0, s.per_request)))
            before = daemon.status()
            cpu_before = cpu_seconds(daemon.ps)
            jobs = client_jobs(daemon.sock, clients, requests, s.per_request)
            results = self.pool.run(jobs)
            after = daemon.status()
            cpu_after = cpu_seconds(daemon.ps)
            accepted = sum(r["accepted"] for r in results)
            expected = clients * requests * s.per_request
            if accepted != expected:
                raise RuntimeError(f"{accepted} of {expected} entries accepted")
            elapsed = span(results)
            stored_at = self.wait_stored(daemon)
            entries = after["journal"]["entries"] - before["journal"]["entries"]
            syncs = after["journal"]["syncs"] - before["journal"]["syncs"]
            rate = accepted / elapsed
            growth = after["buffered"]["entries"] - before["buffered"]["entries"]
            self.record(f"{prefix}.flowagg", rate)
            self.record(
                f"{prefix}.stored", accepted / (stored_at - min(r["start"] for r in results))
            )
            self.record(f"{prefix}.stored_during_run", (accepted - growth) / elapsed)
            self.record(f"{prefix}.buffered_at_end", after["buffered"]["entries"])
            self.record(f"{prefix}.entries_per_sync", entries / syncs if syncs else None)
            self.record(f"{prefix}.cpu_us_per_entry", (cpu_after - cpu_before) / accepted * 1e6)
            self.record(f"{prefix}.peak_rss_mb", sampler.stop())
            self.progress(
                f"  flowagg {clients} client(s): {rate:,.0f} entries/s,"
                f" {entries / max(1, syncs):.1f} entries/sync"
            )
            if idle:
                time.sleep(s.idle_wait_s)
                cpu0, t0 = cpu_seconds(daemon.ps), time.monotonic()
                time.sleep(s.idle_measure_s)
                cpu1, t1 = cpu_seconds(daemon.ps), time.monotonic()
                self.record("idle.cpu_pct", 100.0 * (cpu1 - cpu0) / (t1 - t0))
                self.record("idle.rss_mb", daemon.ps.memory_info().rss / MB)
        shutil.rmtree(root, ignore_errors=True)

    def wait_stored(self, daemon: Daemon) -> float:
        """Flush until nothing is buffered; returns the monotonic time when that was seen.

        One socket flush is not enough: it can return while entries read back from the journal
        are still waiting to be written (see the report), so flush and poll `status`.
        """
        deadline = time.monotonic() + self.sizes.drain_timeout_s
        while True:
            reply = daemon.request({"op": "flush"})
            if not reply.get("ok"):
                raise RuntimeError(f"flush failed: {reply}")
            buffered = daemon.status()["buffered"]
            if buffered["entries"] == 0:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"not stored within {self.sizes.drain_timeout_s} s: {buffered}")
            time.sleep(0.01)

    def throughput(self) -> None:
        s = self.sizes
        self.progress("  baselines: raw, sqlite, persist-queue")
        self.record("tp8.raw", self.baseline_raw(8, s.tp8_requests))
        self.record("tp1.raw", self.baseline_raw(1, s.tp1_requests))
        self.record("tp8.sqlite", self.baseline_sqlite(8, s.tp8_requests))
        self.record("tp1.sqlite", self.baseline_sqlite(1, s.tp1_requests))
        self.record("tp8.pq_entry", self.baseline_persist_queue(8, 1, s.pq_entry_puts))
        self.record(
            "tp8.pq_request",
            self.baseline_persist_queue(8, s.per_request, 8 * s.tp8_requests * s.per_request),
        )
        self.flowagg_throughput(1, s.tp1_requests, "tp1", idle=False)
        self.flowagg_throughput(8, s.tp8_requests, "tp8", idle=True)
        for prefix in ("tp1", "tp8"):
            flowagg = self.samples[f"{prefix}.flowagg"][-1]
            self.record(f"{prefix}.ratio_sqlite", flowagg / self.samples[f"{prefix}.sqlite"][-1])
            self.record(f"{prefix}.ratio_raw", flowagg / self.samples[f"{prefix}.raw"][-1])

    # -- 2. latency ------------------------------------------------------------------------------
    def latency(self) -> None:
        n = self.sizes.latency_requests
        root = self.fresh_dir("latency")
        adds = [add_request(entry_lines(0, i, 1)) for i in range(n)]
        with running(root, self.settings(), self.logs) as daemon, Conn(daemon.sock) as conn:
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
        fsyncs = self.fsync_latencies(n)
        for name, samples in (("add", add_times), ("ping", pings), ("fsync", fsyncs)):
            self.record(f"lat.{name}_p50", pct(samples, 0.50) * 1000)
            self.record(f"lat.{name}_p99", pct(samples, 0.99) * 1000)
        bound = 3 * (pct(pings, 0.99) + pct(fsyncs, 0.99)) * 1000
        self.record("lat.bound", bound)
        self.record("lat.server_add_p99", status["latencyMs"]["addP99"])
        self.progress(
            f"  add p99 {pct(add_times, 0.99) * 1000:.3f} ms, ping p99"
            f" {pct(pings, 0.99) * 1000:.3f} ms, fsync p99 {pct(fsyncs, 0.99) * 1000:.3f} ms"
        )

    def fsync_latencies(self, n: int) -> list[float]:
        """One small append (an entry line) and fsync, n times: the disk's round trip."""
        path = self.fresh_dir("fsync")
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

    # -- 3. group commit ------------------------------------------------------------------------
    def group_commit(self) -> None:
        s = self.sizes
        assert self.pool is not None
        root = self.fresh_dir("groupcommit")
        with running(root, self.settings(), self.logs) as daemon:
            with Conn(daemon.sock) as conn:
                conn.add(add_request(entry_lines(99, 0, 1)))
            before = daemon.status()
            jobs = client_jobs(daemon.sock, s.gc_clients, s.gc_requests, 1, latencies=True)
            results = self.pool.run(jobs)
            after = daemon.status()
        shutil.rmtree(root, ignore_errors=True)
        entries = after["journal"]["entries"] - before["journal"]["entries"]
        syncs = after["journal"]["syncs"] - before["journal"]["syncs"]
        accepted = sum(r["accepted"] for r in results)
        latencies = [x for r in results for x in r["latencies"]]
        self.record("gc.entries_per_sync", entries / syncs if syncs else None)
        self.record("gc.adds_per_s", accepted / span(results))
        self.record("gc.add_p50", pct(latencies, 0.50) * 1000)
        self.record("gc.add_p99", pct(latencies, 0.99) * 1000)
        self.progress(f"  {entries} entries in {syncs} syncs ({entries / max(1, syncs):.2f}/sync)")

    # -- 4. flush latency -----------------------------------------------------------------------
    def flush_latency(self) -> None:
        rounds = self.sizes.flush_rounds
        root = self.fresh_dir("flush")
        with (
            running(root, self.settings(**NO_FLUSH), self.logs) as daemon,
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
                self.record(f"flush{size}.p50", pct(samples, 0.50) * 1000)
                self.record(f"flush{size}.p99", pct(samples, 0.99) * 1000)
                self.progress(
                    f"  flush {size}: p50 {pct(samples, 0.5) * 1000:.2f} ms,"
                    f" p99 {pct(samples, 0.99) * 1000:.2f} ms"
                )
        shutil.rmtree(root, ignore_errors=True)

    # -- 5. restart with a journaled backlog ----------------------------------------------------
    def build_backlog(self, entries: int) -> tuple[Path, int]:
        """A root whose journal holds `entries` unflushed entries (the daemon was SIGKILLed)."""
        assert self.pool is not None
        root = self.fresh_dir(f"backlog-{entries}")
        per_request = 1000
        clients = 4
        requests = math.ceil(entries / per_request / clients)
        daemon = Daemon(root, self.settings(**NO_FLUSH), self.logs)
        try:
            daemon.wait_ready()
            jobs = client_jobs(daemon.sock, clients, requests, per_request)
            started = time.monotonic()
            results = self.pool.run(jobs)
            total = sum(r["accepted"] for r in results)
            status = daemon.status()
            if status["buffered"]["entries"] != total:
                raise RuntimeError(f"backlog: {status['buffered']} buffered, {total} accepted")
            self.progress(
                f"  journaled {total:,} entries in {time.monotonic() - started:.1f} s;"
                " SIGKILL the daemon"
            )
        finally:
            daemon.kill()
        self.notes[f"backlog_{entries}_entries"] = total
        self.notes[f"backlog_{entries}_journal_bytes"] = sum(
            p.stat().st_size for p in (root / "journal").glob("seg-*.log")
        )
        return root, total

    def restart(self, pristine: Path, prefix: str, expected: int) -> None:
        root = self.fresh_dir(f"restart-{prefix}")
        # The socket of the killed daemon cannot be copied; the new daemon makes its own.
        shutil.copytree(pristine, root, symlinks=True, ignore=shutil.ignore_patterns("*.sock"))
        daemon = Daemon(root, self.settings(), self.logs)
        sampler = RssSampler(daemon.ps, interval=0.01)
        sampler.start()
        try:
            ready = daemon.wait_ready(interval=0.005)
            with Conn(daemon.sock) as conn:
                probe = conn.add(add_request(entry_lines(77, 0, 1)))
            first_add = time.monotonic() - daemon.spawned_at
            deadline = time.monotonic() + self.sizes.drain_timeout_s
            while True:
                status = daemon.status()
                # The probe entry waits for its batch to fill (or maxAgeMs): not the backlog.
                if status["buffered"]["entries"] <= probe:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"backlog not drained within {self.sizes.drain_timeout_s} s:"
                        f" {status['buffered']}"
                    )
                time.sleep(0.05)
            drained = time.monotonic() - daemon.spawned_at
            peak = sampler.stop()
            stored = sum(status["counters"]["batches"].values())
        finally:
            sampler.stop()
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
        self.record(f"{prefix}.ready_s", ready)
        self.record(f"{prefix}.first_add_s", first_add)
        self.record(f"{prefix}.drained_s", drained)
        self.record(f"{prefix}.drain_rate", expected / max(1e-9, drained - ready))
        self.record(f"{prefix}.peak_rss_mb", peak)
        self.progress(
            f"  ready {ready:.2f} s, drained {drained:.2f} s ({stored} batches),"
            f" peak RSS {peak:.1f} MB"
        )

    # -- running it all --------------------------------------------------------------------------
    def run(self) -> None:
        s = self.sizes
        repeats = self.args.repeats
        self.pool = ClientPool(max(8, s.gc_clients))
        try:
            backlogs: dict[str, tuple[Path, int]] = {}

            def build(prefix: str, entries: int) -> None:
                backlogs[prefix] = self.build_backlog(entries)

            def restart(prefix: str) -> None:
                if prefix in backlogs:  # else building it failed, and that error is reported
                    pristine, entries = backlogs[prefix]
                    self.restart(pristine, prefix, entries)

            self.progress(f"building a journal of {s.startup_entries:,} unflushed entries")
            self.section("start", lambda: build("start", s.startup_entries))
            for rep in range(1, repeats + 1):
                self.progress(f"run {rep}/{repeats}")
                self.section("throughput", self.throughput)
                self.section("latency", self.latency)
                self.section("group commit", self.group_commit)
                self.section("flush", self.flush_latency)
                self.section("start", lambda: restart("start"))
            if self.args.big:
                self.progress(f"--big: building a journal of {s.big_entries:,} entries")
                self.section("big", lambda: build("big", s.big_entries))
                self.section("big", lambda: restart("big"))
        finally:
            self.pool.close()


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench: --set {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


# -- the report -----------------------------------------------------------------------------------
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


def build_rows(b: Bench) -> list[tuple[str, str, str, str, str]]:
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
            "entries stored in batch files/s\n8-client run, default batchSize",
            f"while adding: {fmt_rate(m('tp8.stored_during_run'))}\n"
            f"start to all stored: {fmt_rate(m('tp8.stored'))}\n"
            f"buffered at end: {fmt(m('tp8.buffered_at_end'), digits=0)}",
            "",
            "(no goal)",
            "info",
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
    return rows


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
            "Entries carry no entryId (flowagg assigns one); baselines store the same entry JSON"
            " (pre-serialized, so serialization is not charged to them).",
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
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark flowagg beside baselines measured in the same run (SPEC §10).",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run (< 1 min)")
    parser.add_argument("--repeats", type=int, help="runs per figure (default 3; --quick: 1)")
    parser.add_argument(
        "--big", action="store_true", help="also restart with 1,000,000 journaled entries"
    )
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers to PATH")
    parser.add_argument(
        "--dir", metavar="DIR", help="parent of the temp directory (the disk under test)"
    )
    parser.add_argument(
        "--rev",
        metavar="REV",
        help="benchmark flowagg as of this git revision (default: the working tree)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="daemon setting for every flowagg daemon (repeatable)",
    )
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    other_load = OtherLoad()
    with tempfile.TemporaryDirectory(prefix="flowagg-bench-", dir=args.dir) as tmp_name:
        bench = Bench(args, Path(tmp_name))
        bench.notes["flowagg"] = snapshot_flowagg(bench.tmp / "src", args.rev)
        try:
            bench.run()
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        finally:
            for daemon in list(LIVE_DAEMONS):
                daemon.kill()
        info = meta(bench)
    elapsed = time.monotonic() - started
    info["otherLoadCpus"] = round(other_load.cpus(), 3)
    print(
        f"flowagg benchmark: flowagg from the {info['flowagg']};"
        f" {'quick, ' if args.quick else ''}{args.repeats} run(s), {elapsed:.0f} s"
    )
    print(
        f"machine: {info['cpus']} CPUs, {info['memoryMB']:,} MB, Python {info['python']},"
        f" SQLite {info['sqlite']}, temp dir on {info['filesystem']}"
    )
    print(
        f"noise: other processes and the kernel kept {info['otherLoadCpus']:.2f} of"
        f" {info['cpus']} CPUs busy on average during the run"
        + (
            " -- figures are unreliable; rerun on a quieter machine"
            if info["otherLoadCpus"] > 0.25
            else ""
        )
    )
    print()
    print(render(build_rows(bench)))
    print()
    print("Notes:")
    for line in notes(bench).split("\n"):
        print(f"- {line}")
    if bench.errors:
        print()
        for name, error in bench.errors.items():
            print(f"ERROR in {name}: {error}")
    if args.json:
        doc = {
            "meta": info,
            "samples": bench.samples,
            "medians": {k: median(v) for k, v in bench.samples.items()},
            "errors": bench.errors,
            "elapsedS": elapsed,
        }
        Path(args.json).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
