"""Several connections delivering at once (sinkConnections), against a real server: they are
under way together, a daemon killed while they wait leaves every entry stored once, and a
collision between two batches in flight is kept like any other."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.core.clock import FakeClock
from flowagg.core.layout import Layout
from flowagg.delivery.sink import CircuitBreaker, GuardedSink
from flowagg.delivery.sink_postgres import PostgresSink
from flowagg.delivery.sink_postgres_sql import ddl_statements
from tests.harness import BASE_TS, request, start_daemon, stored_id_counts, wait_for
from tests.pgserver import PgServer

psycopg = pytest.importorskip("psycopg", reason="psycopg missing: install the postgres extra")

WAITING = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flowagg'"
    " AND wait_event_type = 'Lock' AND datname = current_database()"
)


def waiting_deliveries(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(WAITING).fetchone()
    return row[0] if row else 0


def table_counts(dsn: str) -> Counter[str]:
    with psycopg.connect(dsn) as conn:
        return Counter(r[0] for r in conn.execute("SELECT entry_id FROM flowagg_entries"))


def create_tables(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        for statement in ddl_statements("flowagg_entries"):
            conn.execute(statement)


def test_a_daemon_killed_with_batches_in_flight_on_several_connections_stores_each_once(
    tmp_path: Path, pg: PgServer
) -> None:
    dsn = pg.new_database()
    create_tables(dsn)
    root = tmp_path / "data"
    settings = {
        "sinkType": "postgres",
        "sinkDsn": dsn,
        "sinkConnections": 4,
        "sinkTimeoutMs": 60_000,
        "batchSize": 10,
        "maxAgeMs": 60_000,
    }
    ids = [f"k{i:03d}" for i in range(200)]
    with psycopg.connect(dsn) as locker:
        # Inserts wait behind this lock: the deliveries pile up, each on its own connection.
        locker.execute("LOCK TABLE flowagg_entries IN SHARE MODE")
        daemon = start_daemon(root, settings)
        entries = [
            {"userId": "u", "action": "a", "timestamp": BASE_TS + n, "entryId": eid}
            for n, eid in enumerate(ids)
        ]
        reply = request(Layout(root).socket, {"op": "add", "entries": entries})
        assert reply["ok"] and reply["accepted"] == len(ids), reply
        wait_for(lambda: waiting_deliveries(dsn) == 4, timeout=30)
        # Four batches in flight at once, and never more than sinkConnections.
        assert waiting_deliveries(dsn) == 4
        daemon.kill()
        # The server still runs the orphaned inserts once the lock goes: those batches are
        # stored while the daemon never learnt it, and the next start sends them again.
        locker.rollback()
    wait_for(lambda: sum(table_counts(dsn).values()) == 4 * 10, timeout=30)
    daemon = start_daemon(root, settings)
    try:
        wait_for(lambda: sum(table_counts(dsn).values()) >= len(ids), timeout=60)
        assert request(Layout(root).socket, {"op": "flush"})["ok"]
        wait_for(lambda: sum(stored_id_counts(root).values()) >= len(ids), timeout=60)
        status = request(Layout(root).socket, {"op": "status"})
        assert status["sink"]["rowsAlreadyThere"] > 0, status["sink"]  # the re-sent batches
        assert status["failed"] == 0 and status["abandoned"] == 0
    finally:
        assert daemon.stop() == 0
    counts = table_counts(dsn)
    assert set(counts) == set(ids) and max(counts.values()) == 1
    files = stored_id_counts(root)
    assert set(files) == set(ids) and max(files.values()) == 1


def batch(batch_id: str, user: str, ids: list[str]) -> bytes:
    entries = [
        {"userId": user, "action": "a", "timestamp": BASE_TS, "metadata": {}, "entryId": eid}
        for eid in ids
    ]
    return orjson.dumps({"batchId": batch_id, "entries": entries})


def test_a_collision_between_two_batches_in_flight_is_kept_once(pg: PgServer) -> None:
    dsn = pg.new_database()
    create_tables(dsn)
    sink = PostgresSink(dsn, "flowagg_entries", 30.0, host="h", parallel=2)
    guarded = GuardedSink(sink, CircuitBreaker(3, 30.0, FakeClock()))
    first, second = "1704067200000_000000000001", "1704067200000_000000000002"
    errors: list[BaseException] = []

    def deliver(batch_id: str, user: str, own: str) -> None:
        try:
            guarded.deliver(batch_id, batch(batch_id, user, ["shared", own]))
        except BaseException as exc:
            errors.append(exc)

    with psycopg.connect(dsn) as locker:
        # An uncommitted row under the shared id: both batches wait on it, side by side.
        locker.execute(
            "INSERT INTO flowagg_entries (entry_id, user_id, action, ts, batch_id, host)"
            " VALUES ('shared', 'locker', 'a', now(), 'none', 'h')"
        )
        senders = [
            threading.Thread(target=deliver, args=(first, "alice", "alice-1")),
            threading.Thread(target=deliver, args=(second, "bob", "bob-1")),
        ]
        for t in senders:
            t.start()
        wait_for(lambda: waiting_deliveries(dsn) == 2, timeout=30)
        locker.rollback()  # one batch stores the id; the other then finds it taken
    for t in senders:
        t.join(30)
    assert not errors, errors
    with psycopg.connect(dsn) as conn:
        stored = dict(conn.execute("SELECT entry_id, batch_id FROM flowagg_entries").fetchall())
        kept = conn.execute(
            "SELECT entry_id, batch_id, stored_batch_id, user_id FROM flowagg_entries_collisions"
        ).fetchall()
    assert set(stored) == {"shared", "alice-1", "bob-1"}
    winner = stored["shared"]
    loser = second if winner == first else first
    assert kept == [("shared", loser, winner, "bob" if loser == second else "alice")]
    snap: dict[str, Any] = guarded.snapshot()
    assert snap["collisions"] == 1 and snap["resends"] == 0 and snap["delivered"] == 2
    assert snap["connects"] == 2 and snap["rowsWritten"] == 3
