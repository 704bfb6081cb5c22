"""What a daemon imports over a run that nobody scrapes and with no sink: the suite starts
hundreds, each killed again and again by the crash tests, so start-up leaves out what a
setting would have to ask for."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.harness import DaemonProc, entry, request, stored_id_counts

# Top-level packages, or flowagg subpackages, that such a run never needs.
NOT_FOR_A_PLAIN_RUN = (
    "http.client",
    "prometheus_client",
    "psycopg",
    "pyarrow",
    "rich",
    "flowagg.read",
)


def _imported(log: str) -> set[str]:
    """Module names from `python -X importtime` lines ("import time: self | cumulative | name")."""
    return {
        line.rpartition("|")[2].strip()
        for line in log.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def test_a_plain_run_imports_no_metrics_sink_or_reader_modules(root: Path) -> None:
    log_path = root.parent / "importtime.log"
    daemon = DaemonProc(root, python=[sys.executable, "-X", "importtime"], log_path=log_path)
    daemon.wait_ready()
    reply = request(daemon.layout.socket, {"op": "add", "entries": [entry(1, entryId="i-1")]})
    assert reply["ok"], reply
    assert daemon.stop() == 0, daemon.log()
    assert stored_id_counts(root) == {"i-1": 1}
    imported = _imported(log_path.read_text())
    assert "apscheduler" in imported  # the log does list the daemon's imports
    loaded = {n for n in NOT_FOR_A_PLAIN_RUN for m in imported if m == n or m.startswith(n + ".")}
    assert sorted(loaded) == []
