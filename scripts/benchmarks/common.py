"""What every figure shares: sizes, entries, statistics, daemons, socket clients, bookkeeping.

Real `flowagg run` daemons as subprocesses, driven only over their Unix socket
(newline-delimited JSON, no network). Every daemon started here is registered in LIVE_DAEMONS
so the entry point can kill what a failed figure left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
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
    tp8_requests: int = 250  # requests per client in the 8-client run (200,000 entries)
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
    remembered_entries: int = 1_000_000  # unique client entryIds, for RSS and the day restart
    remembered_big: int = 10_000_000  # RSS only (--big)
    day_big: int = 5_000_000  # restart with a day of journal (--big)
    hostile_timeout_s: float = 30.0
    power_cuts: int = 50
    spool_files: int = 5_000  # small spool files dropped into inbox/ at once
    spool_entries: int = 10  # entries per spool file


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
    remembered_entries=200_000,
    hostile_timeout_s=15.0,
    power_cuts=10,
    spool_files=1_000,
)


# -- entries and requests ------------------------------------------------------------------------
def make_entry(client: int, i: int, with_id: bool = False) -> dict[str, Any]:
    """Entry i of a client: the same bytes go to flowagg and to every baseline.

    `with_id` adds a client entryId shaped like a UUID (36 characters, what real clients
    send), unique per (client, i), so the daemon has to remember it for the dedupe window.
    """
    entry: dict[str, Any] = {
        "userId": f"user{client:02d}",
        "action": "code_edit",
        "timestamp": BASE_TS + i,
        "metadata": {
            "sessionId": f"s{client:02d}-{i // 1000}",
            "taskId": f"task-{i % 13}",
            "duration": 1000 + i % 997,
        },
    }
    if with_id:
        entry["entryId"] = f"{client:08x}-0000-4000-8000-{i:012x}"
    return entry


def entry_lines(client: int, first: int, count: int, with_id: bool = False) -> list[bytes]:
    return [orjson.dumps(make_entry(client, first + k, with_id)) for k in range(count)]


def add_request(lines: list[bytes]) -> bytes:
    return b'{"op":"add","entries":[' + b",".join(lines) + b"]}\n"


def client_requests(client: int, requests: int, per_request: int) -> list[list[bytes]]:
    """The entries of each request of one client, as compact JSON."""
    return [entry_lines(client, r * per_request, per_request) for r in range(requests)]


def iter_add_requests(
    client: int, requests: int, per_request: int, with_id: bool
) -> Iterator[bytes]:
    """The add requests of one client, made one at a time (millions of entries fit no list)."""
    for r in range(requests):
        yield add_request(entry_lines(client, r * per_request, per_request, with_id))


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
REPO = Path(__file__).resolve().parents[2]


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
    """Polls a process's RSS until stopped; keeps the peak.

    With `kill_above` (bytes) it SIGKILLs the process once its RSS passes that, so a figure
    that makes the daemon balloon cannot take the machine (and the other engineers) down.
    """

    def __init__(
        self, ps: psutil.Process, interval: float = 0.02, kill_above: int | None = None
    ) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.ps = ps
        self.interval = interval
        self.kill_above = kill_above
        self.killed = False
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, self.ps.memory_info().rss)
                if self.kill_above is not None and self.peak > self.kill_above:
                    self.ps.kill()
                    self.killed = True
                    return
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


def journal_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "journal").glob("seg-*.log"))


def cpu_seconds(ps: psutil.Process) -> float:
    times = ps.cpu_times()
    return times.user + times.system


EXITED = "(unattributed: tick rounding, ended threads)"


def thread_cpu(ps: psutil.Process) -> dict[str, float]:
    """User + system seconds per thread name, the whole process under "total".

    Names are the kernel's (`/proc/<pid>/task/<tid>/comm`, set by the daemon as each thread
    starts); threads that share a name are summed, the main thread is the event loop.
    """
    out: dict[str, float] = {"total": cpu_seconds(ps)}
    for t in ps.threads():
        if t.id == ps.pid:
            name = "main (event loop)"
        else:
            try:
                name = Path(f"/proc/{ps.pid}/task/{t.id}/comm").read_text().strip()
            except OSError:
                continue  # ended between the listing and the read: counted under EXITED
        out[name] = out.get(name, 0.0) + t.user_time + t.system_time
    return out


def thread_cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Seconds per thread name between two `thread_cpu` readings; what threads that ended
    meanwhile used is the part of the total that no live thread accounts for."""
    # A name whose threads ended meanwhile can read less than before: nothing, then.
    delta = {k: max(0.0, v - before.get(k, 0.0)) for k, v in after.items()}
    named = sum(v for k, v in delta.items() if k != "total")
    delta[EXITED] = max(0.0, delta["total"] - named)
    return delta


# -- client processes ----------------------------------------------------------------------------
def _client_job(conn: multiprocessing.connection.Connection, job: dict[str, Any]) -> None:
    """Prepare requests and connect, report ready, wait for the start time, send them all."""
    lines: Iterable[bytes]
    if job.get("with_ids"):
        # Made while sending: the client's serialization is charged to the run, which only
        # feeds a daemon and times nothing.
        lines = iter_add_requests(job["client"], job["requests"], job["per_request"], True)
    else:
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
    sock: Path,
    clients: int,
    requests: int,
    per_request: int,
    *,
    latencies: bool = False,
    with_ids: bool = False,
) -> list[dict[str, Any]]:
    """One job per client process.

    `with_ids`: entries carry unique client entryIds and are made while sending.
    """
    return [
        {
            "sock": str(sock),
            "client": c,
            "requests": requests,
            "per_request": per_request,
            "latencies": latencies,
            "with_ids": with_ids,
        }
        for c in range(clients)
    ]


def span(results: list[dict[str, Any]]) -> float:
    return max(r["end"] for r in results) - min(r["start"] for r in results)


# -- baselines' threads ---------------------------------------------------------------------------
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


# -- bookkeeping -----------------------------------------------------------------------------------
class Bench:
    """One benchmark run: options, sizes, temp dir, client pool, and every sample and error."""

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


def wait_stored(daemon: Daemon, timeout: float) -> float:
    """Flush until nothing is buffered; returns the monotonic time when that was seen.

    One socket flush is not enough: it can return while entries read back from the journal
    are still waiting to be written (see the report), so flush and poll `status`.
    """
    deadline = time.monotonic() + timeout
    while True:
        reply = daemon.request({"op": "flush"})
        if not reply.get("ok"):
            raise RuntimeError(f"flush failed: {reply}")
        buffered = daemon.status()["buffered"]
        if buffered["entries"] == 0:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"not stored within {timeout} s: {buffered}")
        time.sleep(0.01)


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench: --set {item!r} must look like KEY=VALUE")
        out[key] = value
    return out
