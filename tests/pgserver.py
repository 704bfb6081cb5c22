"""A throwaway PostgreSQL cluster for the sink tests (and the bench): one per test session.

The server refuses to run as root, so when the tests run as root the cluster belongs to the
`postgres` user and every server command runs through `runuser`. It listens only on a Unix
socket in a temp dir; each test takes its own database.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

BIN_DIRS = (
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
)
START_TIMEOUT_S = 60


def find_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: Debian keeps them off PATH."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    for candidate in BIN_DIRS:
        if (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def unavailable_reason() -> str | None:
    """Why these tests cannot run here, or None when they can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (install flowagg with the postgres extra)"
    if find_bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a postgres user to own the cluster"
    return None


class PgServer:
    """initdb, pg_ctl start/stop/restart and fresh databases, on a socket in a temp dir."""

    def __init__(self, bin_dir: Path, base: Path, *, durable: bool = False) -> None:
        self.bin_dir = bin_dir
        # Tests need no crash safety from the server; the bench wants the real commit cost.
        self.durable = durable
        self.base = base
        self.data = base / "data"
        self.socket_dir = base / "sock"
        self.log = base / "server.log"
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count(1)

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S + 30, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {result.stderr}{self.log_tail()}")
        return result

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def init(self) -> PgServer:
        self.socket_dir.mkdir(parents=True)
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            for path in (self.base, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self) -> None:
        fsync = "on" if self.durable else "off"
        options = (
            f"-k {self.socket_dir} -c listen_addresses='' -c fsync={fsync}"
            " -c max_connections=100 -c shared_buffers=32MB"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
            "-t", str(START_TIMEOUT_S), "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host={self.socket_dir} dbname={dbname} user={user}"

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = f"{prefix}{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


@contextlib.contextmanager
def pg_server(*, durable: bool = False) -> Iterator[PgServer]:
    """A started cluster, stopped (immediately) and removed on the way out."""
    bin_dir = find_bin_dir()
    assert bin_dir is not None
    base = Path(tempfile.mkdtemp(prefix="flowagg-pg-"))
    server = PgServer(bin_dir, base, durable=durable)
    try:
        server.init().start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
