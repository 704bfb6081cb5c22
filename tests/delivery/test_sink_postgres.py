"""The PostgreSQL sink against a real server (tests/pgserver.py): rows out field by field,
re-sends that add nothing, the error mapping, the sinkTimeoutMs bound and the settings."""

from __future__ import annotations

import datetime
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.batches.storage import iter_batch_files, read_batch
from flowagg.core.clock import FakeClock
from flowagg.core.config import load_config
from flowagg.core.errors import ConfigError, TransientError
from flowagg.core.layout import Layout
from flowagg.core.pg_settings import redact_dsn
from flowagg.delivery.sink import CircuitBreaker, GuardedSink
from flowagg.delivery.sink_postgres import PostgresSink, classify_error
from tests.harness import BASE_TS, cli, request, start_daemon
from tests.pgserver import PgServer

psycopg = pytest.importorskip("psycopg", reason="psycopg missing: install the postgres extra")

BATCH_ID = "1704067200000_000000000001"


def rows(dsn: str, table: str = "flowagg_entries") -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(f"SELECT * FROM {table} ORDER BY entry_id")
        return cur.fetchall()


def batch_bytes(ids: list[str], batch_id: str = BATCH_ID) -> bytes:
    entries = [
        {
            "userId": "u",
            "action": "a",
            "timestamp": BASE_TS + i,
            "metadata": {"i": i},
            "entryId": eid,
        }
        for i, eid in enumerate(ids)
    ]
    return orjson.dumps({"batchId": batch_id, "entries": entries})


def pg_settings(dsn: str, **extra: Any) -> dict[str, Any]:
    return {"sinkType": "postgres", "sinkDsn": dsn, "batchSize": 5, "maxAgeMs": 60_000, **extra}


def test_round_trip_field_by_field(tmp_path: Path, pg: PgServer) -> None:
    dsn = pg.new_database()
    root = tmp_path / "data"
    daemon = start_daemon(root, pg_settings(dsn))
    sent = [
        {
            "userId": f"user{i % 3}",
            "action": "code.edit",
            "timestamp": BASE_TS + 1000 * i + 7,
            "metadata": {"taskId": f"t{i}", "duration": i, "nested": {"ok": [1, "é", None]}},
            "entryId": f"e{i:02d}",
        }
        for i in range(12)
    ]
    sent.append({"userId": "ünï", "action": "x", "timestamp": BASE_TS, "entryId": "no-meta"})
    reply = request(Layout(root).socket, {"op": "add", "entries": sent})
    assert reply["ok"] and reply["accepted"] == len(sent), reply
    assert request(Layout(root).socket, {"op": "flush"})["ok"]
    batch_of = {
        e["entryId"]: read_batch(p)["batchId"]
        for p in iter_batch_files(Layout(root))
        for e in read_batch(p)["entries"]
    }
    got = {r["entry_id"]: r for r in rows(dsn)}
    assert set(got) == {e["entryId"] for e in sent}
    for e in sent:
        row = got[e["entryId"]]
        assert row["user_id"] == e["userId"]
        assert row["action"] == e["action"]
        assert row["ts"] == datetime.datetime.fromtimestamp(e["timestamp"] / 1000, datetime.UTC)
        assert row["metadata"] == e.get("metadata", {})
        assert row["batch_id"] == batch_of[e["entryId"]]
        assert row["host"] == socket.gethostname()
        assert isinstance(row["received_at"], datetime.datetime)
    status = request(Layout(root).socket, {"op": "status"})
    sink = status["sink"]
    assert sink["type"].startswith("postgres ") and sink["rowsWritten"] == len(sent)
    assert sink["lastDeliveryAt"] is not None and sink["lagMs"] == 0
    assert sink["state"] == "closed" and sink["rowsAlreadyThere"] == 0
    assert request(Layout(root).socket, {"op": "health"})["sink"]["rowsWritten"] == len(sent)
    text = cli(root, "status").stdout.decode()
    assert f"rows written {len(sent)}" in text, text
    assert daemon.stop() == 0


def sink_for(dsn: str, timeout_s: float = 10.0) -> PostgresSink:
    return PostgresSink(dsn, "flowagg_entries", timeout_s, host="h1")


def test_redelivery_adds_nothing_and_counts_as_a_resend(pg: PgServer) -> None:
    dsn = pg.new_database()
    guarded = GuardedSink(sink_for(dsn), CircuitBreaker(3, 30.0, FakeClock()))
    guarded.deliver(BATCH_ID, batch_bytes(["a", "b", "c"]))
    # As after a crash between COMMIT and the local write: the journal re-cuts the batch,
    # perhaps with more entries.
    guarded.deliver(BATCH_ID, batch_bytes(["a", "b", "c", "d"]))
    assert [r["entry_id"] for r in rows(dsn)] == ["a", "b", "c", "d"]
    snap = guarded.snapshot()
    assert snap["resends"] == 1 and snap["rowsWritten"] == 4 and snap["rowsAlreadyThere"] == 3
    assert snap["delivered"] == 2 and snap["connects"] == 1  # the connection is reused


def test_connection_lost_during_commit_is_transient_and_safe_to_resend(
    pg: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = pg.new_database()
    sink = sink_for(dsn)
    sink.deliver(BATCH_ID, batch_bytes(["warm"]))
    conn = sink._conn
    assert conn is not None
    real_commit = conn.commit

    def commit_then_lose() -> None:
        real_commit()  # the server committed; its answer never arrives
        conn.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(conn, "commit", commit_then_lose)
    with pytest.raises(TransientError, match="during COMMIT") as caught:
        sink.deliver(BATCH_ID, batch_bytes(["x", "y"]))
    assert "Ambiguous" not in type(caught.value).__name__  # retried at once: it is idempotent
    assert sink.deliver(BATCH_ID, batch_bytes(["x", "y"])).already_held is True
    assert [r["entry_id"] for r in rows(dsn)] == ["warm", "x", "y"]
    assert sink.connects == 2


def test_server_restart_is_transient_then_reconnects(pg: PgServer) -> None:
    dsn = pg.new_database()
    sink = sink_for(dsn)
    sink.deliver(BATCH_ID, batch_bytes(["a"]))
    pg.stop("immediate")
    with pytest.raises(TransientError):
        sink.deliver(BATCH_ID, batch_bytes(["b"]))
    with pytest.raises(TransientError, match="connecting"):
        sink.deliver(BATCH_ID, batch_bytes(["b"]))
    pg.start()
    assert sink.deliver(BATCH_ID, batch_bytes(["b"])).already_held is False
    assert [r["entry_id"] for r in rows(dsn)] == ["a", "b"]


def test_a_blocked_statement_is_cut_at_sink_timeout(pg: PgServer) -> None:
    dsn = pg.new_database()
    sink = sink_for(dsn, timeout_s=1.0)
    sink.deliver(BATCH_ID, batch_bytes(["a"]))
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE flowagg_entries IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(TransientError):
            sink.deliver(BATCH_ID, batch_bytes(["b"]))
        assert time.monotonic() - started < 5
        locker.rollback()
    sink.deliver(BATCH_ID, batch_bytes(["b"]))
    assert [r["entry_id"] for r in rows(dsn)] == ["a", "b"]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("AdminShutdown", "transient"),
        ("CannotConnectNow", "transient"),
        ("SerializationFailure", "transient"),
        ("DeadlockDetected", "transient"),
        ("QueryCanceled", "transient"),
        ("DiskFull", "transient"),
        ("TooManyConnections", "transient"),
    ],
)
def test_error_mapping(error: str, kind: str) -> None:
    assert classify_error(psycopg, getattr(psycopg.errors, error)()) == kind


def sink_ddl() -> list[str]:
    from flowagg.delivery.sink_postgres import ddl_statements

    return ddl_statements("flowagg_entries")


def test_sink_init_prints_and_applies_the_ddl(tmp_path: Path, pg: PgServer) -> None:
    dsn = pg.new_database()
    printed = cli(tmp_path / "data", "sink", "init", "--table", "public.fa")
    assert printed.returncode == 0 and b'CREATE TABLE IF NOT EXISTS "public"."fa"' in printed.stdout
    applied = cli(
        tmp_path / "data", "sink", "init", "--table", "public.fa", "--dsn", dsn, "--apply"
    )
    assert applied.returncode == 0, applied.stderr
    assert rows(dsn, "public.fa") == []
    bad = cli(tmp_path / "data", "sink", "init", "--dsn", f"{dsn} port=1", "--apply")
    assert bad.returncode == 1 and bad.stderr.count(b"\n") == 1, bad.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sinkDsn": ""}, "sinkType is postgres, so sinkDsn must name"),
        ({"sinkDsn": "postgresql://u:s3cret@db/x"}, "holds a password"),
        ({"sinkDsn": "host=db password=s3cret"}, "holds a password"),
        ({"sinkDsn": "host='unclosed"}, "not a libpq connection string"),
        ({"sinkDsn": "host=db sslpassword=s3cret"}, r"holds a secret \(sslpassword\)"),
        ({"sinkDsn": "postgresql://u@db/x?sslpassword=s3cret"}, "holds a secret"),
        ({"sinkDsn": "host=db oauth_client_secret=s3cret"}, "holds a secret"),
        ({"sinkDsn": "postgresql://u:s3cret%ZZ@db/x"}, "invalid percent-encoded token"),
        ({"sinkDsn": "postgresql://u@db/x?sslpassword=s3cret%00"}, "forbidden value"),
        ({"sinkDsn": "host=db password=s3cret s3cret"}, "not a libpq connection string"),
        ({"sinkDsn": "host=db password=x s3cret=1"}, "invalid connection option"),
        ({"sinkDsn": "host=db", "sinkTable": "x; drop"}, "is not a table name"),
    ],
)
def test_settings_are_checked_at_load(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(flags={"sinkType": "postgres", **settings}, environ={})
    assert "s3cret" not in str(caught.value)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError, match=r"flowagg\[postgres\]"):
        load_config(flags={"sinkType": "postgres", "sinkDsn": "host=db"}, environ={})


def test_redacted_dsn_hides_a_password() -> None:
    shown = redact_dsn("postgresql://me:s3cret@db:5433/x?sslmode=require")
    assert "s3cret" not in shown and "host=db" in shown and "password=***" in shown


def test_redacted_dsn_hides_every_libpq_secret() -> None:
    secret = "host=db sslpassword=s3cret oauth_client_secret=s3cret scram_client_key=s3cret"
    shown = redact_dsn(secret)
    assert "s3cret" not in shown and "host=db" in shown and shown.count("=***") == 3


def test_a_refused_entry_keeps_the_connection(pg: PgServer) -> None:
    dsn = pg.new_database()
    sink = PostgresSink(dsn, "flowagg_entries", 10.0)
    bad = orjson.dumps(
        {"entries": [{"userId": "u\u0000", "action": "a", "timestamp": BASE_TS, "entryId": "z"}]}
    )
    [refused] = sink.deliver(BATCH_ID, bad).refused
    assert refused.entry_id == "z" and "22P05" in refused.reason
    sink.deliver(BATCH_ID, batch_bytes(["after"]))
    assert [r["entry_id"] for r in rows(dsn)] == ["after"] and sink.connects == 1


def test_a_role_with_only_the_documented_grants_delivers(pg: PgServer) -> None:
    dsn = pg.new_database()
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("DO $$ BEGIN CREATE ROLE inserter LOGIN; EXCEPTION WHEN duplicate_object"
                      " THEN NULL; END $$")  # fmt: skip
        for statement in sink_ddl():
            admin.execute(statement)
        grants = (Path(__file__).parents[2] / "README.md").read_text()
        grants = grants.split("The daemon's role then needs:")[1].split("```sql\n")[1]
        for statement in grants.split("```")[0].split(";\n")[:-1]:
            admin.execute(statement.replace(" TO flowagg", " TO inserter"))
    sink = sink_for(dsn.replace("user=postgres", "user=inserter"))
    sink.deliver(BATCH_ID, batch_bytes(["a", "b"]))
    assert sink.deliver(BATCH_ID, batch_bytes(["a", "b", "c"])).already_held is True
    assert [r["entry_id"] for r in rows(dsn)] == ["a", "b", "c"]


def test_readme_per_user_totals_sql(pg: PgServer) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    query = readme.split("Per-user totals")[1].split("```sql\n")[1].split("```")[0]
    dsn = pg.new_database()
    entries = [
        {"userId": f"u{i % 2}", "action": "a", "timestamp": BASE_TS + i,
         "metadata": {"duration": 100 * i}, "entryId": f"d{i}"}
        for i in range(5)
    ]  # fmt: skip
    sink_for(dsn).deliver(BATCH_ID, orjson.dumps({"entries": entries}))
    with psycopg.connect(dsn) as conn:
        got = [tuple(r[:3]) for r in conn.execute(query)]
    assert got == [("u0", 3, 600), ("u1", 2, 400)]
