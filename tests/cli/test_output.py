"""Human output and `flowagg config`: ISO times, sensible units, the running daemon's view,
and warnings for settings that are valid but will not work."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import orjson

from flowagg.cli.admin_commands import _size, _status_word
from tests.harness import DaemonProc, clean_env, cli, entry, flowagg_cmd, start_daemon

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"


def test_status_shows_iso_times_and_the_last_reload(root: Path, daemons: list[DaemonProc]) -> None:
    daemons.append(start_daemon(root, {"maxAgeMs": 3_600_000, "batchSize": 7}))
    assert cli(root, "add", orjson.dumps(entry(1)).decode()).returncode == 0
    assert cli(root, "flush").returncode == 0
    (root / "flowagg.toml").write_text("batchSize = 0\n")
    assert cli(root, "reload").returncode == 1
    text = cli(root, "status").stdout.decode()
    assert re.search(rf"last flush at {ISO}", text), text
    assert re.search(r", up \d+:\d\d:\d\d\n", text), text  # h:mm:ss, not "up 134 s"
    assert re.search(rf"last reload at {ISO}: REFUSED: batchSize", text), text

    (root / "flowagg.toml").write_text("")
    running = orjson.loads(cli(root, "config", "--running", "--json").stdout)
    assert running["settings"]["batchSize"] == {"value": 7, "source": "flag"}
    local = orjson.loads(cli(root, "config", "--json").stdout)
    assert local["settings"]["batchSize"]["value"] == 50


def test_health_words_and_units() -> None:
    assert _status_word({"status": "critical", "severity": "critical"}) == "critical"
    assert _status_word({"status": "degraded", "severity": "warning"}) == "degraded (warning)"
    assert _size(512 * 1024) == "512.0 KiB"
    assert _size(3 * 2**20) == "3.0 MiB"
    assert _size(5 * 2**30) == "5.0 GiB"
    assert _size(12) == "12 bytes"


def _config(
    root: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        flowagg_cmd(root, "config", *args),
        capture_output=True,
        env=clean_env(env),
        timeout=60,
        check=False,
    )


def test_config_check_ignores_the_environment_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("batchSize = 10\n")
    env = {"FLOWAGG_BATCH_SIZE": "lots"}
    assert _config(tmp_path / "data", "--check", str(path), env=env).returncode == 0
    with_env = _config(tmp_path / "data", "--check", str(path), "--with-env", env=env)
    assert with_env.returncode == 2 and b"FLOWAGG_BATCH_SIZE" in with_env.stderr


def test_a_quoted_number_in_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('batchSize = "7"\n')
    proc = _config(tmp_path / "data", "--check", str(path))
    assert proc.returncode == 2
    assert b"must be an integer, got the string '7'" in proc.stderr


def test_a_sink_program_not_on_path_and_a_differing_root_are_warned(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'sinkType = "command"\nsinkCommand = "no-such-sink-xyz --flag"\n'
        f'root = "{tmp_path / "elsewhere"}"\n'
    )
    checked = _config(tmp_path / "data", "--check", str(path))
    assert checked.returncode == 0, checked.stderr
    message = checked.stderr.decode()
    assert "'no-such-sink-xyz' is not found on PATH" in message
    assert f"says {tmp_path / 'elsewhere'}, but {tmp_path / 'data'} is in use" in message


def test_the_documented_example_entry_is_valid() -> None:
    from flowagg.cli.daemon_commands import add
    from flowagg.core.entries import validate_entry

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Entries", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    examples = [orjson.loads(block), orjson.loads(_help_example(add.help or ""))]
    for doc in examples:
        validate_entry(doc, 0, now_ms=2_000_000_000_000, max_entry_bytes=65_536, new_id=str)


def _help_example(text: str) -> str:
    lines = text.split("optional):\n", 1)[1].splitlines()
    return "".join(line.strip() for line in lines[:2])
