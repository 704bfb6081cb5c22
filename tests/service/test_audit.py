"""The audit log (SPEC §11): one JSON line per state-changing operation, with the peer."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from flowagg.core import audit
from flowagg.ingest.server import Peer
from tests.harness import cli, entry, request, start_daemon


def _lines(root: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (root / "logs" / "audit.log").read_bytes().splitlines()]


def test_a_record_names_the_peer_or_who_started_it() -> None:
    doc = audit.record("flush", peer=Peer(pid=42, uid=1000, gid=100), now_ms=1_704_067_200_000)
    assert doc["time"] == "2024-01-01T00:00:00.000+00:00"
    assert doc["peer"] == {"uid": 1000, "gid": 100, "pid": 42} and doc["by"] == "socket"
    doc = audit.record("recover", by="scheduler", outcome="error", error="x")
    assert doc["peer"] is None and doc["by"] == "scheduler" and doc["error"] == "x"


def test_flush_recover_reload_cleanup_each_leave_one_line_with_the_peer(tmp_path: Path) -> None:
    root = tmp_path / "data"
    daemon = start_daemon(root)
    marker = "do-not-log-this-metadata"
    try:
        reply = request(
            daemon.layout.socket,
            {"op": "add", "entries": [entry(i, metadata={"taskId": marker}) for i in range(5)]},
        )
        assert reply["accepted"] == 5, reply
        # Two days old: the daemon's own cleanup (7 days) keeps it, `--age 1d` removes it.
        born = int(time.time() * 1000) - 2 * 86_400_000
        old_snapshot = root / "health" / f"health-{born}.json"
        old_snapshot.write_bytes(b"{}")
        for args in (("flush",), ("recover",), ("reload",), ("cleanup", "--age", "1d")):
            proc = cli(root, *args)
            assert proc.returncode == 0, (args, proc.stderr)
        assert not old_snapshot.exists()
    finally:
        assert daemon.stop() == 0
    lines = _lines(root)
    events = [line["event"] for line in lines]
    assert events == ["start", "flush", "recover", "reload", "cleanup", "stop"], events
    by_event = {line["event"]: line for line in lines}
    for event in ("flush", "recover", "reload", "cleanup"):
        peer = by_event[event]["peer"]
        assert peer["uid"] == os.getuid() and peer["pid"] > 0, by_event[event]
        assert by_event[event]["outcome"] == "ok"
    assert by_event["flush"]["entries"] == 5
    assert by_event["reload"]["changed"] == []
    assert by_event["cleanup"]["removed"] == [
        {"file": f"health/{old_snapshot.name}", "bytes": 2, "why": "health snapshot"}
    ]
    assert by_event["stop"]["exitCode"] == 0 and by_event["stop"]["peer"] is None
    assert marker.encode() not in (root / "logs" / "audit.log").read_bytes()
    assert all(line["v"] == audit.AUDIT_FORMAT_VERSION for line in lines)


def test_a_quarantine_is_audited_without_the_contents(tmp_path: Path) -> None:
    from flowagg.core.fsutil import quarantine_bytes

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger(audit.LOGGER)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        quarantine_bytes(
            tmp_path, "x.jsonl", b"secret-body", reason="bad", component="spool", now_ms=1
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    (line,) = [orjson.loads(text) for text in seen]
    assert line["event"] == "quarantine" and line["file"] == "x.jsonl"
    assert line["component"] == "spool" and "secret-body" not in seen[0]
