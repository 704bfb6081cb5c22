"""What a member of socketGroup can do through the socket (SPEC §11, issue #23 items 4, 7, 8).

Real throwaway accounts (tests/accounts.py): a member floods, claims another user's userId and
asks for config, status and health; the daemon's own user (root here) must still be served,
memory must stay within the settings, and no secret must show.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from tests.accounts import Accounts, needs_accounts
from tests.harness import DaemonProc, entry, request, start_daemon, wait_for

pytestmark = needs_accounts

MIB = 1 << 20
TOKEN = "tok3n-Zq81xKv0secret"

# Run as a member: open N connections, send SIZE bytes of a request line that never ends on
# each, say so, then hold them until stdin closes; print each connection's reply, if any.
FLOOD = r"""
import socket, sys
path, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conns = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    try:
        s.connect(path)
        s.sendall(b'{"op": "add", "entries": ["' + b"x" * size)
    except OSError:
        pass
    conns.append(s)
print("sent", flush=True)
sys.stdin.read()
for s in conns:
    try:
        print(s.makefile("rb").readline().decode().strip() or "{}", flush=True)
    except OSError:
        print("{}", flush=True)
"""

# Run as a member: each argument is one request, sent on a connection of its own.
REQUESTS = r"""
import socket, sys
for payload in sys.argv[2:]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(sys.argv[1])
        s.sendall(payload.encode() + b"\n")
        print(s.makefile("rb").readline().decode().strip(), flush=True)
"""


@pytest.fixture
def flood(accounts: Accounts) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(30)


def _start_flood(
    accounts: Accounts, user: str, sock: Path, conns: int, size: int
) -> subprocess.Popen[bytes]:
    args = [str(sock), str(conns), str(size)]
    proc = subprocess.Popen(
        ["runuser", "-u", user, "--", accounts.python, "-c", FLOOD, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=accounts.env(),
        cwd="/",
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"sent\n"
    return proc


def _end_flood(proc: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    out, _ = proc.communicate(timeout=60)
    return [orjson.loads(line) for line in out.splitlines()]


def _requests_as(
    accounts: Accounts, user: str, sock: Path, *payloads: dict[str, Any]
) -> list[dict[str, Any]]:
    args = [orjson.dumps(p).decode() for p in payloads]
    done = accounts.python_as(user, "-c", REQUESTS, str(sock), *args)
    assert done.returncode == 0, done.stderr
    return [orjson.loads(line) for line in done.stdout.splitlines()]


def _rss(daemon: DaemonProc) -> int:
    return int(psutil.Process(daemon.proc.pid).memory_info().rss)


def _owner_add(daemon: DaemonProc, i: int) -> dict[str, Any]:
    return request(daemon.layout.socket, {"op": "add", "entries": [entry(i)]})


def test_a_refused_members_flood_takes_no_slot_and_no_memory(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc], flood: list[Any]
) -> None:
    member = accounts.uid(accounts.member)
    allowed = accounts.uid(accounts.other)
    settings = {"socketGroup": accounts.group, "allowedUids": str(allowed), "maxConnections": 16}
    daemon = start_daemon(shared_root, settings)
    daemons.append(daemon)
    before = _rss(daemon)
    # More connections than maxConnections, each holding 8 MiB of a line that never ends.
    proc = _start_flood(accounts, accounts.member, daemon.layout.socket, 24, 8 * MIB)
    flood.append(proc)
    during = _rss(daemon)
    reply = _owner_add(daemon, 1)
    assert reply["ok"] is True and reply["accepted"] == 1, reply
    assert during - before < 32 * MIB, (before, during)
    replies = _end_flood(proc)
    refused = [r for r in replies if "not_allowed" in r.get("error", "")]
    assert len(refused) >= 1
    assert all(r.get("ok") is not True for r in replies)
    status = request(daemon.layout.socket, {"op": "status"})
    # The one connection open is the one asking.
    assert status["socket"]["refusedPeers"] == 24 and status["socket"]["connections"] == 1
    # A flood of refusals is counted, not logged a line at a time.
    assert daemon.log().count(f"refused a request from uid {member} ") == 1
    assert _rss(daemon) - before < 32 * MIB


def test_an_allowed_members_connections_and_pending_bytes_are_capped(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc], flood: list[Any]
) -> None:
    settings = {
        "socketGroup": accounts.group,
        "maxConnections": 16,
        "maxConnectionsPerUid": 4,
        "maxRequestBytes": 2 * MIB,
        "maxPendingBytesPerUid": 4 * MIB,
        "partialRequestTimeoutMs": 1500,
    }
    daemon = start_daemon(shared_root, settings)
    daemons.append(daemon)
    sock = daemon.layout.socket
    before = _rss(daemon)
    # Connections first: 24 barely started lines, of which the uid may hold 4.
    proc = _start_flood(accounts, accounts.member, sock, 24, 0)
    flood.append(proc)
    # The daemon's own user is served beside them, and so is another member, whose uid has
    # a budget of its own.
    assert _owner_add(daemon, 1)["accepted"] == 1
    assert _requests_as(accounts, accounts.other, sock, {"op": "ping"}) == [{"ok": True}]
    # Every line the member left open is cut off within the timeout, with the reason.
    wait_for(lambda: request(sock, {"op": "status"})["socket"]["connections"] == 1)
    errors = Counter(r.get("error", "").partition(":")[0] for r in _end_flood(proc))
    assert errors == {"too_many_connections": 20, "request_timeout": 4}, errors

    # Then bytes: 24 lines of 1.5 MiB against 4 MiB for the uid.
    proc = _start_flood(accounts, accounts.member, sock, 24, int(1.5 * MIB))
    flood.append(proc)
    assert _owner_add(daemon, 2)["accepted"] == 1
    assert _rss(daemon) - before < 24 * MIB
    wait_for(lambda: request(sock, {"op": "status"})["socket"]["connections"] == 1)
    errors = Counter(r.get("error", "").partition(":")[0] for r in _end_flood(proc))
    assert errors["too_much_pending"] >= 1, errors
    assert errors["too_much_pending"] + errors["request_timeout"] == 24, errors
    assert _rss(daemon) - before < 24 * MIB


def test_a_member_claiming_alices_user_id_spends_its_own_budget(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    # Tokens come back once in about 17 minutes: nothing refills during the test.
    settings = {"socketGroup": accounts.group, "rateLimitPerUser": 0.001, "rateLimitBurst": 5}
    daemon = start_daemon(shared_root, settings)
    daemons.append(daemon)
    sock = daemon.layout.socket
    as_alice = [entry(i, userId="alice", entryId=f"claimed-{i}") for i in range(10)]
    hostile = _requests_as(accounts, accounts.member, sock, {"op": "add", "entries": as_alice})
    assert hostile[0]["error"] == "rate_limited" and hostile[0]["accepted"] == 5
    # A new connection from the same uid finds the same bucket, still empty.
    again = _requests_as(accounts, accounts.member, sock, {"op": "add", "entries": as_alice[:1]})
    assert again[0]["error"] == "rate_limited" and again[0]["accepted"] == 0
    alices = [entry(i, userId="alice", entryId=f"alice-{i}") for i in range(5)]
    real = _requests_as(accounts, accounts.other, sock, {"op": "add", "entries": alices})
    assert real == [{"ok": True, "accepted": 5, "duplicates": 0, "rejected": []}]


def test_a_member_sees_no_sink_secret_in_config_status_or_health(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    # The sink fails and says why on stderr, token included, as a careless program would.
    command = (
        f"sh -c 'cat >/dev/null; echo refused Bearer {TOKEN} >&2; exit 75' sink"
        f" --header 'Authorization: Bearer {TOKEN}'"
    )
    settings = {
        "socketGroup": accounts.group,
        "sinkType": "command",
        "sinkCommand": command,
        "breakerFailures": 1,
        "immediateRetries": 0,
    }
    daemon = start_daemon(shared_root, settings)
    daemons.append(daemon)
    sock = daemon.layout.socket
    assert _owner_add(daemon, 1)["accepted"] == 1
    request(sock, {"op": "flush"})
    wait_for(lambda: TOKEN in str(request(sock, {"op": "status"})["sink"]["lastError"]))
    # The daemon's own user sees what it configured, so the member's view has it to hide.
    own = request(sock, {"op": "config"})["settings"]["sinkCommand"]["value"]
    assert own == command
    assert TOKEN in orjson.dumps(request(sock, {"op": "health"})).decode()

    root = str(shared_root)
    for args in (["config", "--running", "--json"], ["status", "--json"], ["health", "--json"]):
        shown = accounts.run(accounts.member, "--root", root, *args)
        assert shown.returncode in (0, 1, 2), shown.stderr
        assert TOKEN not in shown.stdout.decode() + shown.stderr.decode(), args
        assert b"[MASKED]" in shown.stdout, args
    config = orjson.loads(
        accounts.run(accounts.member, "--root", root, "config", "--running", "--json").stdout
    )
    assert config["settings"]["sinkCommand"]["value"] == "[MASKED]"
    assert config["settings"]["sinkType"]["value"] == "command"
    status = orjson.loads(accounts.run(accounts.member, "--root", root, "status", "--json").stdout)
    assert status["sink"]["type"] == "command" and status["sink"]["failures"] >= 1
