"""What a `flowagg add` process imports: the bridge runs one per entry, and the suite starts
hundreds, so it loads what adding needs and nothing of the daemon, the sink or the readers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import orjson

from flowagg.cli.main import COMMANDS, main
from tests.harness import clean_env, entry, start_daemon, stored_id_counts, wait_for

# Top-level packages, or flowagg subpackages, that adding an entry never needs.
NOT_FOR_ADD = (
    "apscheduler",
    "asyncio",
    "msgspec",
    "prometheus_client",
    "psutil",
    "psycopg",
    "pyarrow",
    "rich",
    "sqlite3",
    "watchdog",
    "zstandard",
    "flowagg.batches",
    "flowagg.delivery",
    "flowagg.ingest",
    "flowagg.journal",
    "flowagg.read",
    "flowagg.service",
)

# Runs a command in this interpreter; its last line: the exit code and what was loaded.
PROBE = """
import sys
from flowagg.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
loaded = sorted({n for n in NOT_FOR_ADD for m in sys.modules if m == n or m.startswith(n + ".")})
print(code, " ".join(loaded))
"""


def _add_in_probe(*args: str) -> str:
    """What the command loaded of NOT_FOR_ADD, space-separated; it must exit 0."""
    code = f"NOT_FOR_ADD = {NOT_FOR_ADD!r}\n{PROBE}"
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=True,
    )
    exit_code, _, loaded = done.stdout.strip().splitlines()[-1].partition(" ")
    assert exit_code == "0", done.stderr
    return loaded


def test_add_loads_none_of_the_daemon_sink_or_reader_modules(root: Path) -> None:
    daemon = start_daemon(root)
    one = orjson.dumps(entry(1, entryId="probe-1")).decode()
    spooled = orjson.dumps(entry(2, entryId="probe-2")).decode()
    try:
        assert _add_in_probe("--root", str(root), "add", one) == ""
        assert _add_in_probe("--root", str(root), "add", "--spool", spooled) == ""
        wait_for(lambda: not any(daemon.layout.inbox.glob("*.jsonl")))
    finally:
        daemon.stop()
    assert stored_id_counts(root) == {"probe-1": 1, "probe-2": 1}
    # The probe sees them when they are loaded: `--help` loads every command's module.
    assert "flowagg.read" in _add_in_probe("--help").split()


def test_every_listed_command_is_found_under_its_own_name() -> None:
    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name
    assert main.get_command(ctx, "no-such-command") is None
