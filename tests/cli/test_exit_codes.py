"""The README's table of `flowagg add` exit codes, each code checked against real runs of
`flowagg add` and `provider-bridge aggregate`, so that the table and the code cannot drift."""

from __future__ import annotations

import re
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from flowagg.core.layout import Layout
from tests.harness import clean_env, cli, entry, request, start_daemon, stored_entries

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "### Exit codes of `flowagg add`"

Run = Callable[[Path, list[str], bytes], int]


def readme_codes() -> dict[int, str]:
    """code -> meaning, from the table under HEADING."""
    section = README.read_text().split(HEADING, 1)[1]
    rows: dict[int, str] = {}
    for line in section.splitlines():
        if match := re.match(r"\| (\d+) \| (.+?) \|", line):
            rows[int(match[1])] = match[2]
        elif rows and not line.startswith("|"):
            break
    return rows


def run_add(root: Path, args: list[str], data: bytes) -> int:
    return cli(root, "add", *args, input=data).returncode


def run_bridge(root: Path, args: list[str], data: bytes) -> int:
    bridge_args = ["--wait" if a == "--retry-timeout" else a for a in args]
    command = [sys.executable, "-m", "flowagg.cli.bridge", "--root", str(root), "aggregate"]
    command += bridge_args
    done = subprocess.run(
        command, input=data, capture_output=True, env=clean_env(), timeout=60, check=False
    )
    assert done.stdout.count(b"\n") == 1, done.stdout  # one JSON document, whatever happened
    return done.returncode


RUNS = {"add": run_add, "bridge": run_bridge}


def lines(*docs: object) -> bytes:
    return b"".join(orjson.dumps(d) + b"\n" for d in docs)


def stored_after_flush(root: Path) -> int:
    assert request(Layout(root).socket, {"op": "flush"})["ok"]
    return len(stored_entries(root))


class CannedDaemon(socketserver.ThreadingUnixStreamServer):
    """A socket that answers every request with one reply, as a daemon that refuses does."""

    def __init__(self, path: Path, reply: dict[str, object]) -> None:
        body = orjson.dumps(reply) + b"\n"

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while self.rfile.readline():
                    self.wfile.write(body)

        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(str(path), Handler)


@pytest.fixture
def canned(root: Path) -> Iterator[Callable[[dict[str, object]], None]]:
    servers: list[CannedDaemon] = []

    def serve(reply: dict[str, object]) -> None:
        server = CannedDaemon(Layout(root).socket, reply)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def code_0(root: Path, run: Run, canned: object) -> None:
    daemon = start_daemon(root)
    try:
        assert run(root, [], lines(entry(1), entry(2))) == 0
        assert stored_after_flush(root) == 2
    finally:
        assert daemon.stop() == 0


def code_1(root: Path, run: Run, canned: object) -> None:
    daemon = start_daemon(root, {"maxBufferedEntries": 1, "batchSize": 1000, "maxAgeMs": 600_000})
    try:
        assert run(root, [], lines(entry(1))) == 0
        assert run(root, ["--retry-timeout", "0"], lines(entry(2))) == 1  # busy
        assert stored_after_flush(root) == 1
    finally:
        assert daemon.stop() == 0


def code_2(root: Path, run: Run, canned: object) -> None:
    daemon = start_daemon(root)
    try:
        bad = entry(2, timestamp="2024-01-01")
        assert run(root, [], lines(entry(1), bad, entry(3))) == 2
        assert stored_after_flush(root) == 2
    finally:
        assert daemon.stop() == 0


def code_3(root: Path, run: Run, canned: object) -> None:
    assert run(root, [], lines(entry(1))) == 3


def code_4(root: Path, run: Run, canned: Callable[[dict[str, object]], None]) -> None:
    canned({"ok": False, "error": "disk_full", "retryAfterMs": 1000})
    assert run(root, ["--retry-timeout", "0"], lines(entry(1))) == 4
    Layout(root).socket.unlink()
    canned({"ok": False, "error": "not_allowed: uid 1000 is not in this daemon's allowedUids"})
    assert run(root, [], lines(entry(1))) == 4


def code_5(root: Path, run: Run, canned: object) -> None:
    daemon = start_daemon(root)
    try:
        assert run(root, [], lines(entry(1)) + b'{"userId": "u", "action"') == 5
        assert run(root, [], b"\n") == 5
        if run is run_add:
            assert run(root, ["--no-such-option"], lines(entry(1))) == 5
            assert run(root, ["--retry-timeout", "soon"], lines(entry(1))) == 5
        assert run(root, ["--spool"], lines(entry(1), {"userId": "x"})) == 5
        assert stored_after_flush(root) == 0
        assert list(Layout(root).inbox.iterdir()) == []
    finally:
        assert daemon.stop() == 0


SCENARIOS = {0: code_0, 1: code_1, 2: code_2, 3: code_3, 4: code_4, 5: code_5}


def test_the_readme_table_lists_exactly_the_codes_the_runs_check() -> None:
    assert sorted(readme_codes()) == sorted(SCENARIOS)


@pytest.mark.parametrize("tool", sorted(RUNS))
@pytest.mark.parametrize("code", sorted(SCENARIOS))
def test_each_code_means_what_the_readme_says(
    root: Path, canned: Callable[[dict[str, object]], None], code: int, tool: str
) -> None:
    assert code in readme_codes()
    SCENARIOS[code](root, RUNS[tool], canned)
