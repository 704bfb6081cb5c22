"""Exactly once into PostgreSQL under faults: the crash torture with the postgres sink while
the server itself is stopped (immediate mode) and started again, and a fleet of daemons on
separate roots writing into one table at once."""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flowagg.core.layout import Layout
from tests.harness import BASE_TS, DaemonProc, request, start_daemon, wait_for
from tests.pgserver import PgServer
from tests.system.test_crash_states import strip_done_records
from tests.torture import SETTINGS, crash_loop

psycopg = pytest.importorskip("psycopg", reason="psycopg missing: install the postgres extra")

KILLS = int(os.environ.get("PG_TORTURE_KILLS", "60"))
# Quick retries and a short breaker cooldown, so a server outage of a few seconds drains in
# the same run; the retry limit is out of reach, since giving up is not what is tested.
SINK_SETTINGS = {
    "sinkType": "postgres",
    "retryBaseMs": 50,
    "retryMaxDelayMs": 500,
    "breakerCooldownMs": 300,
    "batchRetryLimit": 1000,
    "scheduleIntervalMs": 200,
    "sinkTimeoutMs": 5000,
    # A failed delivery parks at once, so that even a short-lived daemon leaves its trace.
    "immediateRetries": 0,
}


def table_counts(dsn: str) -> Counter[str]:
    with psycopg.connect(dsn) as conn:
        return Counter(r[0] for r in conn.execute("SELECT entry_id FROM flowagg_entries"))


def drain_recovery(layout: Layout) -> None:
    """Ask for recovery passes until every parked batch is delivered and written."""

    def empty() -> bool:
        request(layout.socket, {"op": "recover"}, timeout=60)
        return not any(layout.recovery.glob("*.failed.json"))

    wait_for(empty, timeout=90, interval=0.3)


def test_crash_torture_with_server_restarts_stores_each_entry_once(
    tmp_path: Path, pg: PgServer
) -> None:
    dsn = pg.new_database()
    layout = Layout(tmp_path / "data")
    # Batches large enough for the sink to keep up with the writers: with the torture's 7,
    # each short-lived daemon would spend its life on the oldest batches.
    settings = {**SETTINGS, **SINK_SETTINGS, "sinkDsn": dsn, "batchSize": 40}
    rng = random.Random(20261126)
    kills = 0
    # The server goes down for a stretch of kills, twice: batches park, then drain.
    outages = {
        KILLS // 5: "stop",
        KILLS // 5 + 8: "start",
        KILLS // 2: "stop",
        KILLS // 2 + 5: "start",
    }

    def crash(daemon: DaemonProc) -> None:
        nonlocal kills
        daemon.kill()
        kills += 1
        action = outages.get(kills)
        if action == "stop":
            pg.stop("immediate")
        elif action == "start":
            pg.start()

    tally = crash_loop(
        layout,
        settings,
        crashes=KILLS,
        rng=rng,
        writers=3,
        log_path=tmp_path / "torture-daemon.log",
        crash=crash,
        noun="kill",
        log=lambda _msg: None,
        before_stop=lambda: drain_recovery(layout),
    )
    assert kills >= 50 or KILLS < 50
    assert not tally.torn, tally.torn[:3]
    assert tally.lost() == [] and tally.duplicated() == [] and tally.unexpected() == []
    counts = table_counts(dsn)
    assert len(tally.acked) > 0
    missing, extra = tally.acked - set(counts), set(counts) - tally.acked
    assert not missing and not extra, (sorted(missing)[:5], sorted(extra)[:5])
    assert max(counts.values()) == 1
    assert not any(layout.recovery.glob("*.failed.json"))
    assert not any(layout.abandoned.glob("*.abandoned.json"))
    # The faults did hit deliveries: batches parked while the server was down.
    assert "PostgreSQL unavailable" in daemon_logs(layout)
    # A kill between a COMMIT and the local write, made certain (random kills land there
    # only now and then): the newest batch file leaves the root and the journal forgets its
    # done records, so the next start delivers that batch again, and PostgreSQL must
    # recognise every row of it and add none.
    newest = max(layout.aggregated.glob("batch_*"), key=lambda p: p.name)
    newest.rename(tmp_path / newest.name)
    strip_done_records(layout)
    daemon = start_daemon(layout.root, settings)
    try:
        assert request(layout.socket, {"op": "flush"})["ok"]
    finally:
        assert daemon.stop() == 0
    assert (layout.aggregated / newest.name).exists()
    assert table_counts(dsn) == counts
    assert "already in PostgreSQL (a re-send)" in daemon_logs(layout)


def daemon_logs(layout: Layout) -> str:
    return "".join(p.read_text(errors="replace") for p in layout.logs.glob("*.log*"))


def test_fleet_of_daemons_into_one_database(tmp_path: Path, pg: PgServer) -> None:
    dsn = pg.new_database()
    # The table is created by whichever daemon delivers first: no DBA step beforehand.
    settings: dict[str, Any] = {
        **SINK_SETTINGS,
        "sinkDsn": dsn,
        "batchSize": 20,
        "maxAgeMs": 50,
    }
    roots = [tmp_path / f"host{i}" / "data" for i in range(3)]
    for root in roots:
        root.parent.mkdir()
    daemons = [start_daemon(root, settings) for root in roots]
    sent: set[str] = set()
    lock = threading.Lock()

    def writer(host: int, client: int) -> None:
        sock = Layout(roots[host]).socket
        for r in range(20):
            entries = [
                {
                    "userId": f"user{client}",
                    "action": "fleet",
                    "timestamp": BASE_TS + r,
                    # Overlapping ids across hosts would be one entry stored once; these
                    # are unique, as every client's are.
                    "entryId": f"h{host}-c{client}-r{r}-{i}",
                }
                for i in range(25)
            ]
            reply = request(sock, {"op": "add", "entries": entries})
            assert reply["ok"] and reply["accepted"] == 25, reply
            with lock:
                sent.update(e["entryId"] for e in entries)

    threads = [threading.Thread(target=writer, args=(h, c)) for h in range(3) for c in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(sent) == 3 * 3 * 20 * 25
    for root in roots:
        assert request(Layout(root).socket, {"op": "flush"})["ok"]
    wait_for(lambda: sum(table_counts(dsn).values()) >= len(sent), timeout=60)
    counts = table_counts(dsn)
    assert set(counts) == sent and max(counts.values()) == 1
    with psycopg.connect(dsn) as conn:
        batches = conn.execute("SELECT count(DISTINCT batch_id) FROM flowagg_entries").fetchone()
    assert batches is not None and batches[0] >= 3
    for root, daemon in zip(roots, daemons, strict=True):
        status = request(Layout(root).socket, {"op": "status"})
        assert status["sink"]["rowsWritten"] == 3 * 20 * 25, status["sink"]
        assert status["failed"] == 0 and status["abandoned"] == 0
        assert daemon.stop() == 0
