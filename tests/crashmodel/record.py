"""Record a workload: a real daemon under strace, driven through its socket.

The root is a copy of one made by a clean start and stop (so the trace holds the workload,
not the creation of the root), spool files meant to be acknowledged up front are dropped into
inbox/, and that is the snapshot the model starts from. The daemon is then run under strace,
driven one request at a time (so the n-th `{"ok":true,"accepted"` reply answers the n-th
add sent), and stopped with SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowagg.cli.client import write_spool_file
from flowagg.core.layout import Layout
from tests.crashmodel.check import SINK_LOG, entry_key, short_run_dir, sink_script
from tests.crashmodel.model import Fs, Op, State, snapshot
from tests.crashmodel.resolve import IGNORED, Resolver
from tests.crashmodel.strace import parse, strace_argv
from tests.harness import DaemonProc, clean_env, flowagg_cmd, ping, request, wait_for

Step = Callable[["Driver"], None]
STOP_DEADLINE_S = 60.0


@dataclasses.dataclass
class Recording:
    base: State  # the snapshot before the traced run
    ops: list[Op]
    fs: Fs  # the file system as the process saw it at the end
    replies: list[list[str]]  # entryIds of each answered add, in reply order
    upfront: list[str]  # entries in spool files placed before the start (check.entry_key)


class Driver:
    """What a workload's steps use: the socket, the layout, a place for a sink's files."""

    def __init__(self, layout: Layout, work: Path) -> None:
        self.layout = layout
        self.work = work
        self.replies: list[list[str]] = []

    def add(self, entries: list[dict[str, Any]]) -> None:
        deadline = time.monotonic() + STOP_DEADLINE_S
        while True:
            reply = request(self.layout.socket, {"op": "add", "entries": entries})
            if reply.get("ok"):
                self.replies.append([e["entryId"] for e in entries])
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"add not accepted: {reply}")
            time.sleep(reply.get("retryAfterMs", 50) / 1000)

    def op(self, name: str) -> dict[str, Any]:
        return request(self.layout.socket, {"op": name})


def settings_args(settings: dict[str, Any]) -> list[str]:
    return [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]


def fresh_root(work: Path) -> Path:
    """A root made by a clean start and stop (so a trace holds a workload, not the creation
    of the root); workloads start from copies of it."""
    root = work / "data"
    work.mkdir(parents=True)
    with short_run_dir() as run_dir:
        daemon = DaemonProc(root, {"runDir": str(run_dir)}, log_path=work / "init.log")
        assert daemon.wait_ready().stop() == 0, daemon.log()
    return root


def prepare_root(
    work: Path,
    run_dir: Path,
    template: Path,
    settings: dict[str, Any],
    spool: list[list[dict[str, Any]]],
) -> tuple[Layout, dict[str, Any], list[str]]:
    """A copy of the fresh root `template`, with `spool` files in inbox/."""
    work.mkdir(parents=True, exist_ok=True)
    settings = {**settings, "runDir": str(run_dir)}
    if settings.get("sinkType") == "command":
        settings["sinkCommand"] = f"{sink_script(work)} {work / SINK_LOG}"
    root = work / "data"
    shutil.copytree(template, root, symlinks=True)
    layout = Layout(root, run_dir)
    upfront = []
    for n, entries in enumerate(spool):
        write_spool_file(layout, entries, name=f"tool-{n:03d}")
        upfront += [entry_key(e) for e in entries]
    return layout, settings, upfront


def daemon_argv(root: Path, settings: dict[str, Any], maintenance_s: float | None) -> list[str]:
    argv = flowagg_cmd(root, "run", *settings_args(settings))
    if maintenance_s is None:
        return argv
    at = argv.index("flowagg")
    return [*argv[:at], "tests.crashmodel.maintenance", str(maintenance_s), *argv[at + 1 :]]


def traced_run(
    work: Path,
    layout: Layout,
    settings: dict[str, Any],
    steps: list[Step],
    maintenance_s: float | None = None,
) -> tuple[str, list[list[str]]]:
    """Run the daemon under strace through `steps`, stop it; (the trace, the add replies)."""
    trace = work / f"trace-{time.monotonic_ns()}.txt"
    argv = strace_argv(trace, daemon_argv(layout.root, settings, maintenance_s))
    log = (work / "traced.log").open("ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    driver = Driver(layout, work)
    pid = None
    try:
        wait_for(lambda: ping(layout.socket, 1.0) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, (work / "traced.log").read_text()[-2000:]
        pid = int(layout.pid_file.read_text())
        for step in steps:
            step(driver)
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(STOP_DEADLINE_S) == 0, (work / "traced.log").read_text()[-2000:]
    finally:
        # Killing strace alone would leave the daemon running, detached.
        if proc.poll() is None and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_DEADLINE_S)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return trace.read_text(), driver.replies


def record(
    work: Path,
    template: Path,
    settings: dict[str, Any],
    steps: list[Step],
    spool: list[list[dict[str, Any]]] = [],  # noqa: B006 - read only
    maintenance_s: float | None = None,
    before: Callable[[Path], list[str]] | None = None,
) -> tuple[Recording, dict[str, Any]]:
    with short_run_dir() as run_dir:
        layout, settings, upfront = prepare_root(work, run_dir, template, settings, spool)
        if before is not None:
            upfront += before(layout.root)
        base = snapshot(layout.root, IGNORED)
        text, replies = traced_run(work, layout, settings, steps, maintenance_s)
    fs = Fs.from_state(base)
    ops = Resolver(fs, layout.root, {work / SINK_LOG: SINK_LOG}).feed(parse(text))
    return Recording(base, ops, fs, replies, upfront), settings
