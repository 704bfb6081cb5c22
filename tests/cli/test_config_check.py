"""`flowagg config --check` reports every mistake in a file, and `config --running` tells a
restart-only setting's running value from the one the file now holds."""

from __future__ import annotations

import socket
from pathlib import Path

import orjson

from tests.harness import cli, start_daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_check_reports_every_error_one_line_each(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'batchSize = "7"\n'
        "maxAgeMs = 0\n"
        "bacthSize = 3\n"
        'metricsListen = "nowhere"\n'
        'sinkType = "http"\n'
        'sinkUrl = "ftp://x"\n'
        "immediateRetries = 2\n"
    )
    proc = cli(tmp_path / "data", "config", "--check", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 5, lines
    for words in ("batchSize (", "maxAgeMs (", "'bacthSize'", "metricsListen (", "sinkUrl ("):
        assert sum(words in line for line in lines) == 1, (words, lines)
    assert all(line.startswith("flowagg: ") for line in lines)
    assert proc.stdout == b""


def test_an_absolute_sink_command_that_is_missing_is_named_as_such(tmp_path: Path) -> None:
    missing = tmp_path / "bin" / "deliver"
    path = tmp_path / "c.toml"
    path.write_text(f'sinkType = "command"\nsinkCommand = "{missing} --fast"\n')
    proc = cli(tmp_path / "data", "config", "--check", str(path))
    assert proc.returncode == 0, proc.stderr
    warning = proc.stderr.decode()
    assert f"sinkCommand (file {path}): {missing} does not exist" in warning, warning
    assert "PATH" not in warning
    missing.parent.mkdir()
    missing.write_text("#!/bin/sh\n")
    warning = cli(tmp_path / "data", "config", "--check", str(path)).stderr.decode()
    assert f"{missing} is not an executable file" in warning, warning


def test_running_shows_the_files_value_beside_a_restart_only_one(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir(mode=0o700)
    running, later = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    (root / "flowagg.toml").write_text(f'metricsListen = "{running}"\nbatchSize = 7\n')
    daemon = start_daemon(root)
    try:
        (root / "flowagg.toml").write_text(f'metricsListen = "{later}"\nbatchSize = 7\n')
        for reload in (False, True):
            if reload:
                assert cli(root, "reload").returncode == 0
            shown = cli(root, "config", "--running")
            assert shown.returncode == 0, shown.stderr
            row = next(r for r in shown.stdout.decode().splitlines() if "metricsListen" in r)
            assert f"{running} (running; the file says {later}, applied at restart)" in row, row
            batch = next(r for r in shown.stdout.decode().splitlines() if "batchSize" in r)
            assert "running;" not in batch
            doc = orjson.loads(cli(root, "config", "--running", "--json").stdout)
            item = doc["settings"]["metricsListen"]
            assert item["value"] == running
            assert item["atRestart"] == {"value": later, "source": f"file {root / 'flowagg.toml'}"}
    finally:
        assert daemon.stop() == 0
