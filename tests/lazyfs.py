"""LazyFS (third_party/lazyfs): a FUSE file system that drops every un-fsync'd byte on command.

`ensure_lazyfs()` builds it into .cache/lazyfs once (or says why it cannot), and `LazyFS`
mounts it over a folder; `clear_cache()` is a synchronous simulated power cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
VENDORED = REPO / "third_party" / "lazyfs"
BUILD_DIR = Path(os.environ.get("LAZYFS_BUILD_DIR", REPO / ".cache" / "lazyfs"))
MOUNT_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 60.0
BUILD_TIMEOUT_S = 900.0
CLEAR_CACHE = b"lazyfs::clear-cache\n"
CLEARED = b"finished::clear-cache\n"
# The cache is reserved when mounting; the tests write a few MB, and a smaller cache mounts faster.
CACHE_SIZE = "256mb"


class LazyFSUnavailable(RuntimeError):
    """LazyFS cannot run here; the message says why (a reason to skip)."""


def ensure_lazyfs() -> Path:
    """The lazyfs binary, built from the vendored source on first use."""
    if not Path("/dev/fuse").exists():
        raise LazyFSUnavailable("/dev/fuse is missing: FUSE (and so LazyFS) cannot run here")
    binary = build_once()
    if shutil.which("fusermount3") is None:
        raise LazyFSUnavailable("fusermount3 is missing (Debian package fuse3): cannot unmount")
    return binary


def build_lock() -> FileLock:
    return FileLock(BUILD_DIR.with_name(BUILD_DIR.name + ".lock"))


def build_once() -> Path:
    """The binary, built first if missing or stale; test workers side by side (pytest-xdist)
    build it once: the others wait for the lock and find it built."""
    binary = BUILD_DIR / "bin" / "lazyfs"
    BUILD_DIR.parent.mkdir(parents=True, exist_ok=True)
    with build_lock():
        if not binary.exists() or not patches_built_in():
            _build(binary)
    return binary


def _build(binary: Path) -> None:
    # A fresh copy of the source, so that a changed patch applies too (CMake then
    # rebuilds in place).
    shutil.rmtree(BUILD_DIR / "src", ignore_errors=True)
    try:
        proc = subprocess.run(
            [str(VENDORED / "build.sh"), str(BUILD_DIR)],
            capture_output=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LazyFSUnavailable(f"LazyFS cannot be built: {exc}") from None
    if proc.returncode != 0 or not binary.exists():
        tail = (proc.stdout + proc.stderr).decode(errors="replace").strip()[-800:]
        raise LazyFSUnavailable(
            f"LazyFS cannot be built (third_party/lazyfs/build.sh exited"
            f" {proc.returncode}; run .ci/run as root to install its packages): {tail}"
        )


def patches_built_in() -> bool:
    """Whether the build has exactly the vendored patches (a build from before one was added
    would still have the bug it fixes; build.sh applies the missing one and rebuilds)."""
    try:
        recorded = (BUILD_DIR / "patches.sha256").read_text()
    except OSError:
        return False
    built = {}
    for line in recorded.splitlines():  # sha256sum's "DIGEST  NAME"
        digest, _, name = line.partition("  ")
        built[name] = digest
    wanted = {
        patch.name: hashlib.sha256(patch.read_bytes()).hexdigest()
        for patch in VENDORED.glob("*.patch")
    }
    return built == wanted


class LazyFS:
    """LazyFS mounted at `mount`, keeping its files in `underlying`; a context manager."""

    def __init__(self, binary: Path, mount: Path, underlying: Path, workdir: Path) -> None:
        self.binary = binary
        self.mount = mount
        self.underlying = underlying
        self.workdir = workdir
        self.faults_fifo = workdir / "faults.fifo"
        self.completed_fifo = workdir / "faults_completed.fifo"
        self.log_path = workdir / "lazyfs.log"
        self.cuts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._completed_fd: int | None = None
        self._faults_fd: int | None = None
        self._pending = b""

    def __enter__(self) -> LazyFS:
        try:
            self.start()
        except BaseException:
            self.unmount()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unmount()

    def start(self) -> None:
        for directory in (self.mount, self.underlying, self.workdir):
            directory.mkdir(parents=True, exist_ok=True)
        for fifo in (self.faults_fifo, self.completed_fifo):
            os.mkfifo(fifo)
        config = self.workdir / "lazyfs.toml"
        config.write_text(
            "[faults]\n"
            f'fifo_path="{self.faults_fifo}"\n'
            f'fifo_path_completed="{self.completed_fifo}"\n'
            "[cache]\n"
            "apply_eviction=false\n"
            "[cache.simple]\n"
            f'custom_size="{CACHE_SIZE}"\n'
            "blocks_per_page=1\n"
            "[filesystem]\n"
            "log_all_operations=false\n"
            f'logfile="{self.log_path}"\n'
        )
        # LazyFS's command thread blocks opening the completion FIFO until it has a reader:
        # this one stays open for the whole mount.
        self._completed_fd = os.open(self.completed_fifo, os.O_RDONLY | os.O_NONBLOCK)
        with (self.workdir / "lazyfs.out").open("ab") as out:
            self._proc = subprocess.Popen(
                [
                    str(self.binary),
                    str(self.mount),
                    # Relative: LazyFS ignores a config path containing "-o" (as in
                    # pytest-of-root), taking it for an option.
                    "--config-path",
                    config.name,
                    "-o",
                    "allow_other",
                    "-o",
                    "modules=subdir",
                    "-o",
                    f"subdir={self.underlying}",
                    "-f",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not os.path.ismount(self.mount):
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"LazyFS did not mount {self.mount} in {MOUNT_TIMEOUT_S} s")
            time.sleep(0.02)
        while self._faults_fd is None:
            try:
                self._faults_fd = os.open(self.faults_fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: LazyFS has not opened its end yet
                self._check_alive()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"lazyfs exited with {self._proc.returncode}: {self.output()}")

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / "lazyfs.out").read_text(errors="replace")[-2000:]
        return ""

    def clear_cache(self) -> None:
        """Drop every byte not fsync'd (a power cut) and return once LazyFS has done it."""
        assert self._faults_fd is not None and self._completed_fd is not None
        os.write(self._faults_fd, CLEAR_CACHE)
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        poller = select.poll()
        poller.register(self._completed_fd, select.POLLIN)
        while CLEARED not in self._pending:
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"LazyFS did not confirm clear-cache: {self.output()}")
            poller.poll(remaining * 1000)
            try:
                chunk = os.read(self._completed_fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                # No writer yet (LazyFS opens its end once its command thread runs).
                time.sleep(0.01)
            self._pending += chunk
        self._pending = self._pending.split(CLEARED, 1)[1]
        self.cuts += 1

    def unmount(self) -> None:
        """Unmount (lazily if something still holds a file) and wait for lazyfs to exit."""
        if self._proc is not None:
            deadline = time.monotonic() + MOUNT_TIMEOUT_S
            unmounted = False
            while not unmounted and self._proc.poll() is None and time.monotonic() < deadline:
                unmounted = self._fusermount("-u") == 0
                if not unmounted:
                    time.sleep(0.1)  # busy: a killed process is still releasing its files
            if not unmounted:
                # Still busy at the deadline, or lazyfs died and left a dead mount behind.
                self._fusermount("-u", "-z")
            try:
                self._proc.wait(MOUNT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        for fd in (self._faults_fd, self._completed_fd):
            if fd is not None:
                os.close(fd)
        self._faults_fd = self._completed_fd = None

    def _fusermount(self, *options: str) -> int:
        done = subprocess.run(
            ["fusermount3", *options, str(self.mount)], capture_output=True, check=False
        )
        return done.returncode
