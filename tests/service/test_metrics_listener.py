"""The metrics listener (SPEC §11, issue #23 item 5): loopback unless asked, and bounded, so
that connections to it cannot take the daemon's file descriptors."""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowagg.core.config import load_config
from flowagg.core.errors import ConfigError
from tests.harness import DaemonProc, cli, entry, request, start_daemon, wait_for

IDLE_CONNECTIONS = 300
# Far below IDLE_CONNECTIONS, far above the listener's cap plus what a scrape and an add open.
FD_SLACK = 64


def _metrics_status(daemon: DaemonProc) -> dict[str, Any]:
    status: dict[str, Any] = request(daemon.layout.socket, {"op": "status"})["metrics"]
    return status


def _address(daemon: DaemonProc) -> tuple[str, int]:
    host, _, port = _metrics_status(daemon)["listen"].rpartition(":")
    return host, int(port)


def _scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as reply:
        body: bytes = reply.read()
    return body.decode()


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    proc = start_daemon(tmp_path / "data", {"metricsListen": "127.0.0.1:0"})
    try:
        yield proc
    finally:
        if proc.proc.poll() is None:
            assert proc.stop() == 0


def test_idle_connections_cannot_take_the_daemons_descriptors(daemon: DaemonProc) -> None:
    host, port = _address(daemon)
    fds = psutil.Process(daemon.proc.pid).num_fds
    before = fds()
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            sock = socket.create_connection((host, port), timeout=10)
            idle.append(sock)
        # Until the daemon has dealt with every connection: closed the extra ones, or holds all.
        wait_for(
            lambda: (
                _metrics_status(daemon).get("droppedConnections", 0) >= IDLE_CONNECTIONS - 64
                or fds() >= before + IDLE_CONNECTIONS
            )
        )
        held = fds()
        assert held <= before + FD_SLACK, f"{held - before} descriptors for idle connections"
        # The daemon still serves while the idle connections stay open on this side.
        added = cli(daemon.root, "add", input=orjson.dumps([entry(i) for i in range(5)]))
        assert added.returncode == 0, added.stderr
        text = _scrape(host, port)
        assert "flowagg_entries_accepted_total 5.0" in text
        assert fds() <= before + FD_SLACK
    finally:
        for sock in idle:
            sock.close()


def test_a_silent_connection_is_closed_by_the_daemon(daemon: DaemonProc) -> None:
    with socket.create_connection(_address(daemon), timeout=60) as sock:
        try:
            assert sock.recv(1) == b""  # closed by the daemon's read timeout, not ours
        except TimeoutError:
            pytest.fail("the daemon kept a silent connection open for 60 s")


def _raw(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=30) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def test_only_get_metrics_is_answered_and_bad_requests_do_not_stop_it(
    daemon: DaemonProc,
) -> None:
    address = _address(daemon)
    assert _raw(address, b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert _raw(address, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert _raw(address, b"\x00\xff junk\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw(address, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n") == b""
    head = _raw(address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    openmetrics = b"Accept: application/openmetrics-text; version=1.0.0\r\n"
    reply = _raw(address, b"GET /metrics?x=1 HTTP/1.1\r\n" + openmetrics + b"\r\n")
    assert b"application/openmetrics-text" in reply.split(b"\r\n\r\n")[0]
    assert reply.endswith(b"# EOF\n")
    assert "flowagg_buffer_entries" in _scrape(*address)


@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(
            st.sampled_from([b"GET", b"HEAD", b"POST", b"", b"get"]),
            st.sampled_from([b"/metrics", b"/", b"/metrics?a=b", b"*", b""]),
            st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"", b"FTP"]),
            st.binary(max_size=100),
        ).map(lambda t: b" ".join(t[:3]) + b"\r\n" + t[3]),
    )
)
def test_any_request_head_gets_an_http_answer(head: bytes) -> None:
    from flowagg.service.metrics_server import MetricsServer

    server = MetricsServer(lambda accept: (f"x 1 {accept}\n".encode(), "text/plain"))
    reply = server._answer(head + b"\r\n\r\n")
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.split(b" ")[:2] in (
        [b"HTTP/1.1", code] for code in (b"200", b"400", b"404", b"405")
    )
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"Connection: close" in headers
    if not head.startswith(b"HEAD "):
        assert f"Content-Length: {len(body)}".encode() in headers


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:0", "192.0.2.1:9464", "example.org:1"])
def test_a_remote_address_needs_metrics_allow_remote(listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(flags={"metricsListen": listen}, environ={})
    message = str(info.value)
    assert "metricsListen" in message and "metricsAllowRemote = true" in message
    allowed = load_config(flags={"metricsListen": listen, "metricsAllowRemote": "true"}, environ={})
    assert allowed.values["metricsAllowRemote"] is True


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.8.0.1:9464", "[::1]:9464", "localhost:0"])
def test_loopback_addresses_need_nothing(listen: str) -> None:
    assert load_config(flags={"metricsListen": listen}, environ={}).values["metricsListen"]


def test_metrics_allow_remote_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "flowagg.toml"
    path.write_text('metricsListen = "0.0.0.0:0"\nmetricsAllowRemote = true\n')
    assert load_config(config_path=path, environ={}).values["metricsAllowRemote"] is True
    path.write_text('metricsAllowRemote = "yes"\n')
    with pytest.raises(ConfigError, match=r"metricsAllowRemote .*drop the quotes"):
        load_config(config_path=path, environ={})
    env = {"FLOWAGG_METRICS_ALLOW_REMOTE": "maybe"}
    with pytest.raises(ConfigError, match=r"metricsAllowRemote .*true or false"):
        load_config(environ=env)


def test_a_daemon_told_to_listen_everywhere_does_not_start(tmp_path: Path) -> None:
    root = tmp_path / "data"
    proc = cli(root, "run", "--set", "metricsListen=0.0.0.0:0", timeout=60)
    assert proc.returncode != 0
    assert b"metricsAllowRemote" in proc.stderr, proc.stderr
