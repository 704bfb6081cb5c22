"""What one request may cost: maxRequestEntries, a capped rejection list, batch ids that
cannot name a path, and socket errors that name the real cause."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from flowagg.core.errors import RootUnusableError
from flowagg.ingest.server import SocketServer, largest_top_array, request_shape
from tests.harness import cli, entry, request, start_daemon

RSS_LIMIT = 200 * 2**20
LIMITS = {"max_request_bytes": 1024, "max_request_entries": 10, "max_connections": 1}


def test_a_16_mib_request_of_zeros_is_refused_whole_in_bounded_memory(root: Path) -> None:
    daemon = start_daemon(root)
    head, tail = b'{"op":"add","entries":[', b"0]}\n"
    count = (16 * 2**20 - 64 - len(head) - len(tail)) // 2 + 1
    line = head + b"0," * (count - 1) + tail
    proc = psutil.Process(daemon.proc.pid)
    peak = [proc.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(proc.memory_info().rss)
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(str(daemon.layout.socket))
            s.sendall(line)
            reply = orjson.loads(s.makefile("rb").readline())
    finally:
        done.set()
        sampler.join()
    assert reply["ok"] is False and "rejected" not in reply
    assert reply["error"] == (
        f"too_many_entries: {count} entries, over maxRequestEntries=10000; split the request"
    )
    assert max(peak) < RSS_LIMIT, f"RSS peaked at {max(peak) / 2**20:.0f} MiB"
    status = request(daemon.layout.socket, {"op": "status"})
    assert status["socket"]["tooManyEntries"] == 1
    assert daemon.stop() == 0


def test_rejections_are_capped_with_a_total(root: Path) -> None:
    daemon = start_daemon(root)
    sock_path = daemon.layout.socket
    reply = request(sock_path, {"op": "add", "entries": [0] * 10_000})
    assert reply["ok"] is True and reply["accepted"] == 0
    assert reply["rejectedCount"] == 10_000
    assert [r["index"] for r in reply["rejected"]] == list(range(100))
    assert reply["rejected"][0]["error"].startswith("entry 1: must be a JSON object")
    mixed = [entry(i) if i % 2 else {"bad": i} for i in range(300)]
    reply = request(sock_path, {"op": "add", "entries": mixed})
    assert reply["accepted"] == 150 and reply["rejectedCount"] == 150
    assert len(reply["rejected"]) == 100
    status = request(sock_path, {"op": "status"})
    assert status["counters"]["rejected"] == 10_150
    assert daemon.stop() == 0


def test_cli_add_splits_for_a_low_limit_and_reports_totals(root: Path) -> None:
    daemon = start_daemon(root, {"maxRequestEntries": 300})
    good = [entry(i, entryId=f"ok-{i}") for i in range(1000)]
    proc = cli(root, "add", "--json", input=orjson.dumps(good))
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["accepted"] == 1000
    bad: list[Any] = [{"nope": i} for i in range(250)]
    proc = cli(root, "add", input=orjson.dumps(bad))
    assert proc.returncode == 2
    assert b"accepted 0, duplicates 0, rejected 250" in proc.stdout
    assert b"and 150 more rejected entries" in proc.stderr
    assert daemon.stop() == 0


def test_batch_ids_from_users_cannot_name_a_path(root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "x.abandoned.json"
    victim.write_text("{}")
    proc = cli(root, "recover", "--abandoned", "--batch", "../../x")
    assert proc.returncode == 2
    assert b"is not a batch id" in proc.stderr and len(proc.stderr.splitlines()) == 1
    daemon = start_daemon(root)
    for bad in ("../../x", "1704067200000_00000000000\u0661", "1704067200000_000000000001/"):
        reply = request(daemon.layout.socket, {"op": "recover", "abandoned": True, "batch": bad})
        assert reply["ok"] is False and "is not a batch id" in reply["error"]
    missing = request(
        daemon.layout.socket,
        {"op": "recover", "abandoned": True, "batch": "1704067200000_000000000001"},
    )
    assert missing["ok"] is False and "no abandoned batch" in missing["error"]
    assert victim.exists()
    assert daemon.stop() == 0


async def _no_handler(request: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


def test_bind_failure_names_the_errno_and_the_run_dir_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(asyncio.SelectorEventLoop, "create_unix_server", refuse)
    server = SocketServer(tmp_path / "s.sock", _no_handler, **LIMITS)
    with pytest.raises(RootUnusableError) as caught:
        asyncio.run(server.start())
    message = str(caught.value)
    assert "ENOSYS" in message and "Function not implemented" in message
    assert "set runDir to a local folder such as /run/flowagg" in message
    assert "108" not in message
    assert caught.value.exit_code == 4


def test_too_long_socket_path_names_the_limit(tmp_path: Path) -> None:
    server = SocketServer(tmp_path / ("d" * 120) / "s.sock", _no_handler, **LIMITS)
    with pytest.raises(RootUnusableError) as caught:
        asyncio.run(server.start())
    assert "108 bytes" in str(caught.value) and "runDir" in str(caught.value)


@pytest.mark.parametrize(
    ("request_doc", "largest"),
    [
        ({"op": "add", "entries": [0, 0, 0]}, 3),
        ({"op": "add", "entries": [{"a": [1, 2, 3, 4, 5]}, "x,y,[z]"]}, 2),
        ({"op": "add", "entries": [[1, 2], [3, 4]], "k": '",["'}, 2),
        ({"op": "add", "entries": ["\\\\", '"', ",,,"]}, 3),
    ],
)
def test_largest_top_array_counts_without_parsing(request_doc: Any, largest: int) -> None:
    assert largest_top_array(request_shape(orjson.dumps(request_doc))) == largest


def test_request_shape_is_linear_on_escaped_quotes() -> None:
    # `"[^"\\]*(?:\\.[^"\\]*)*"` retried from every escaped quote: 40 000 of them took 28 s.
    line = b'{"op":"add","entries":["' + b'\\"' * 4_000_000 + b"," * 20_000
    started = time.perf_counter()
    shape = request_shape(line)
    assert time.perf_counter() - started < 2.0
    # The string never closes, so the commas after it count: refused as too_many_entries.
    assert largest_top_array(shape) == 20_001


async def _never(request: dict[str, Any]) -> dict[str, Any]:
    raise AssertionError("a refused request never reaches the handler")


def test_a_request_of_containers_is_refused_unparsed() -> None:
    server = SocketServer(
        Path("unused"),
        _never,
        max_request_bytes=1 << 30,
        max_request_entries=10_000,
        max_connections=1,
    )
    line = b'{"op":"add","entries":[' + b"[]," * 1_000_000 + b"[]]}\n"
    reply = asyncio.run(server._handle_line(line))
    assert reply["error"].startswith("too_many_values: 1000003 arrays and objects")
