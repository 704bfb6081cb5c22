"""The PostgreSQL sink's three verdicts apart (SPEC §6a), against a real server: an entry the
table refuses is parked alone while its batch-mates are stored; a table-level error is the
sink down (batches wait, the breaker opens, the next connection checks the table again); an
entryId stored with other content is a collision, kept with both batch ids, not a re-send."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from flowagg.core.clock import FakeClock
from flowagg.core.errors import CircuitOpenError, SinkDownError
from flowagg.core.layout import Layout
from flowagg.delivery.sink import CircuitBreaker, GuardedSink
from flowagg.delivery.sink_postgres import PostgresSink, classify_error
from flowagg.delivery.sink_refused import RefusedStore
from tests.harness import BASE_TS, cli, request, start_daemon, wait_for
from tests.pgserver import PgServer

psycopg = pytest.importorskip("psycopg", reason="psycopg missing: install the postgres extra")

BATCH = "1704067200000_000000000001"
OTHER = "1704067200000_000000000002"


def rows(dsn: str, table: str = "flowagg_entries") -> list[dict[str, Any]]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(f"SELECT * FROM {table} ORDER BY entry_id, batch_id")
        return cur.fetchall()


def entry(eid: str, user: str = "u", **metadata: Any) -> dict[str, Any]:
    return {
        "userId": user,
        "action": "a",
        "timestamp": BASE_TS,
        "metadata": metadata,
        "entryId": eid,
    }


def doc(entries: list[dict[str, Any]], batch_id: str = BATCH) -> bytes:
    return orjson.dumps({"batchId": batch_id, "entries": entries})


def guarded(
    dsn: str, tmp_path: Path, *, host: str = "h1", failures: int = 3, clock: FakeClock | None = None
) -> GuardedSink:
    sink = PostgresSink(dsn, "flowagg_entries", 10.0, host=host)
    breaker = CircuitBreaker(failures, 30.0, clock or FakeClock())
    return GuardedSink(sink, breaker, RefusedStore(tmp_path / f"refused-{host}"))


# -- one entry refused ------------------------------------------------------------------------
def test_a_nul_entry_is_parked_alone_and_its_batch_mates_are_stored_once(
    tmp_path: Path, pg: PgServer
) -> None:
    """A batch stored before the ingest rule (or written by an older flowagg): two entries
    PostgreSQL's jsonb refuses among five. Sent again, as after a crash before the local
    write, it adds no row and no second parked file."""
    dsn = pg.new_database()
    sink = guarded(dsn, tmp_path)
    batch = doc(
        [
            entry("a"),
            entry("b", note="x\u0000"),
            entry("c"),
            entry("d", **{"k\u0000": 1}),
            entry("e"),
        ]
    )
    sink.deliver(BATCH, batch)
    assert [r["entry_id"] for r in rows(dsn)] == ["a", "c", "e"]
    assert {r["batch_id"] for r in rows(dsn)} == {BATCH}
    folder = tmp_path / "refused-h1"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{BATCH}.1.refused.json", f"{BATCH}.3.refused.json"]
    parked = orjson.loads((folder / names[0]).read_bytes())
    assert parked["batchId"] == BATCH and parked["entryId"] == "b" and parked["index"] == 1
    assert parked["entry"] == entry("b", note="x\u0000")
    assert "22P05" in parked["reason"], parked["reason"]
    sink.deliver(BATCH, batch, resend=True)
    assert [r["entry_id"] for r in rows(dsn)] == ["a", "c", "e"]
    assert sorted(p.name for p in folder.iterdir()) == names
    snap = sink.snapshot()
    assert snap["state"] == "closed" and snap["delivered"] == 2 and snap["failures"] == 0
    assert snap["rowsWritten"] == 3 and snap["refusedWaiting"] == 2 and snap["collisions"] == 0


def test_a_daemon_completes_an_old_failed_batch_holding_a_nul_entry(
    tmp_path: Path, pg: PgServer
) -> None:
    """Abandoned whole by an older flowagg: `recover --abandoned` used to abandon it again."""
    dsn = pg.new_database()
    root = tmp_path / "data"
    layout = Layout(root)
    layout.prepare()
    entries = [entry("r0"), entry("r1", user="nul\u0000"), entry("r2")]
    payload = orjson.dumps(entries)
    import hashlib

    failed = {
        "batchId": BATCH, "timestamp": BASE_TS, "version": "2.0.0", "trigger": "size",
        "entries": entries, "entryCount": 3, "entriesSha256": hashlib.sha256(payload).hexdigest(),
        "recovered": False, "retryCount": 0, "lastRetryAt": BASE_TS, "failedAt": BASE_TS,
        "lastError": "PermanentError: PostgreSQL refused the batch (SQLSTATE 22P05)",
        "abandonedAt": BASE_TS, "abandonReason": "permanent error",
    }  # fmt: skip
    (layout.abandoned / f"{BATCH}.abandoned.json").write_bytes(orjson.dumps(failed))
    daemon = start_daemon(root, {"sinkType": "postgres", "sinkDsn": dsn})
    assert request(layout.socket, {"op": "recover", "abandoned": True})["ok"]
    wait_for(lambda: list(layout.aggregated.glob(f"batch_*{BATCH}*")))
    assert [r["entry_id"] for r in rows(dsn)] == ["r0", "r2"]
    assert list(layout.abandoned.iterdir()) == []
    [parked] = layout.refused.glob("*.refused.json")
    assert orjson.loads(parked.read_bytes())["entryId"] == "r1"
    health = request(layout.socket, {"op": "health"})
    assert health["sink"]["refusedWaiting"] == 1
    assert any("refused 1 entries" in issue for issue in health["issues"]), health["issues"]
    assert daemon.stop() == 0


# -- the table is not what the sink needs -----------------------------------------------------
@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("UndefinedTable", "table"),
        ("UndefinedColumn", "table"),
        ("InsufficientPrivilege", "table"),
        ("InvalidSchemaName", "table"),
        ("DatatypeMismatch", "table"),
        ("NotNullViolation", "table"),
        ("UntranslatableCharacter", "entry"),
        ("CheckViolation", "entry"),
        ("StringDataRightTruncation", "entry"),
        ("FeatureNotSupported", "permanent"),
        ("AdminShutdown", "transient"),
    ],
)
def test_error_kinds(error: str, kind: str) -> None:
    assert classify_error(psycopg, getattr(psycopg.errors, error)()) == kind


def test_a_dropped_table_is_the_sink_down_and_the_next_connection_makes_it_again(
    tmp_path: Path, pg: PgServer
) -> None:
    dsn = pg.new_database()
    sink = guarded(dsn, tmp_path)
    sink.deliver(BATCH, doc([entry("a")]))
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("DROP TABLE flowagg_entries")
    with pytest.raises(SinkDownError, match="42P01"):
        sink.deliver(OTHER, doc([entry("b")]))
    assert sink.snapshot()["consecutiveFailures"] == 1 and not sink.snapshot()["connected"]
    sink.deliver(OTHER, doc([entry("b")]))
    assert [r["entry_id"] for r in rows(dsn)] == ["b"]


def test_a_revoked_grant_opens_the_breaker_and_batches_wait(tmp_path: Path, pg: PgServer) -> None:
    dsn = pg.new_database()
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("DO $$ BEGIN CREATE ROLE revoked LOGIN; EXCEPTION WHEN duplicate_object"
                      " THEN NULL; END $$")  # fmt: skip
    clock = FakeClock()
    sink = PostgresSink(dsn.replace("user=postgres", "user=revoked"), "flowagg_entries", 10.0)
    owner = guarded(dsn, tmp_path)
    owner.deliver(BATCH, doc([entry("a")]))  # the owner made the tables
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("ALTER TABLE flowagg_entries ADD COLUMN team text NOT NULL DEFAULT 't'")
        admin.execute("ALTER TABLE flowagg_entries ALTER COLUMN team DROP DEFAULT")
    column = guarded(dsn, tmp_path, host="h2", failures=5)
    with pytest.raises(SinkDownError, match="23502"):
        column.deliver(OTHER, doc([entry("n")]))
    grant = "INSERT, SELECT ON flowagg_entries, flowagg_entries_collisions"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("ALTER TABLE flowagg_entries DROP COLUMN team")
        admin.execute(f"GRANT {grant} TO revoked")
    down = GuardedSink(sink, CircuitBreaker(2, 30.0, clock), RefusedStore(tmp_path / "r"))
    down.deliver(BATCH, doc([entry("a")]))
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"REVOKE {grant} FROM revoked")
    for _ in range(2):
        with pytest.raises(SinkDownError, match="permission denied"):
            down.deliver(OTHER, doc([entry("b")]))
    with pytest.raises(CircuitOpenError):
        down.deliver(OTHER, doc([entry("b")]))
    assert down.snapshot()["state"] == "open" and sink.connects == 2  # reconnected after the first
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"GRANT {grant} TO revoked")
    clock.advance(31_000)
    down.deliver(OTHER, doc([entry("b")]))
    assert [r["entry_id"] for r in rows(dsn)] == ["a", "b"]
    assert down.snapshot()["state"] == "closed"


def test_a_daemon_whose_grant_is_missing_keeps_every_batch_and_delivers_once_granted(
    tmp_path: Path, pg: PgServer
) -> None:
    dsn = pg.new_database()
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("DO $$ BEGIN CREATE ROLE intruder LOGIN; EXCEPTION WHEN duplicate_object"
                      " THEN NULL; END $$")  # fmt: skip
        for statement in cli_ddl(tmp_path):
            admin.execute(statement)
    root = tmp_path / "data"
    layout = Layout(root)
    settings = {
        "sinkType": "postgres",
        "sinkDsn": dsn.replace("user=postgres", "user=intruder"),
        "batchSize": 5,
        "maxAgeMs": 60_000,
        "batchRetryLimit": 1,
        "breakerFailures": 2,
        "breakerCooldownMs": 200,
        "retryBaseMs": 10,
        "retryMaxDelayMs": 20,
    }
    daemon = start_daemon(root, settings)
    for n in range(3):
        entries = [entry(f"p{n}{i}") for i in range(5)]
        assert request(layout.socket, {"op": "add", "entries": entries})["ok"]
    wait_for(lambda: len(list(layout.recovery.glob("*.failed.json"))) == 3)
    for _ in range(3):  # far past batchRetryLimit: the sink is down, not the batches
        request(layout.socket, {"op": "recover"})
    assert list(layout.abandoned.iterdir()) == []
    health = request(layout.socket, {"op": "health"})
    assert health["sink"]["state"] in ("open", "half-open"), health["sink"]
    assert any("permission denied for table flowagg_entries" in i for i in health["issues"]), (
        health["issues"]
    )
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("GRANT INSERT, SELECT ON flowagg_entries, flowagg_entries_collisions"
                      " TO intruder")  # fmt: skip

    def delivered() -> bool:
        request(layout.socket, {"op": "recover"})
        return len(rows(dsn)) == 15

    wait_for(delivered)
    assert (
        list(layout.recovery.glob("*.failed.json")) == []
        and len(list(layout.aggregated.iterdir())) == 3
    )
    assert daemon.stop() == 0


def cli_ddl(tmp_path: Path) -> list[str]:
    printed = cli(tmp_path / "ddl", "sink", "init").stdout.decode()
    return [s.strip() for s in printed.split(";") if s.strip()]


# -- one id, two contents ---------------------------------------------------------------------
def test_colliding_client_ids_are_kept_apart_not_taken_for_re_sends(
    tmp_path: Path, pg: PgServer
) -> None:
    dsn = pg.new_database()
    alice = guarded(dsn, tmp_path, host="alice-laptop")
    bob = guarded(dsn, tmp_path, host="bob-desktop")
    alice.deliver(BATCH, doc([entry("task-1", user="alice", duration=5)]))
    bobs = doc([entry("task-1", user="bob", duration=7), entry("bob-2", user="bob")], OTHER)
    bob.deliver(OTHER, bobs)
    bob.deliver(OTHER, bobs, resend=True)  # a re-send of the colliding batch: still one
    stored = rows(dsn)
    assert [(r["entry_id"], r["user_id"]) for r in stored] == [
        ("bob-2", "bob"),
        ("task-1", "alice"),
    ]
    [kept] = rows(dsn, "flowagg_entries_collisions")
    assert (kept["entry_id"], kept["user_id"], kept["metadata"]) == (
        "task-1",
        "bob",
        {"duration": 7},
    )
    assert (kept["batch_id"], kept["stored_batch_id"], kept["host"]) == (
        OTHER,
        BATCH,
        "bob-desktop",
    )
    snap = bob.snapshot()
    assert snap["collisions"] == 1 and snap["resends"] == 1, snap  # the explicit re-send only
    # The same content under the same id from elsewhere is a true re-send: silent.
    carol = guarded(dsn, tmp_path, host="carol")
    carol.deliver(OTHER, doc([entry("bob-2", user="bob")], OTHER))
    assert carol.snapshot()["collisions"] == 0 and carol.snapshot()["resends"] == 1
    assert len(rows(dsn, "flowagg_entries_collisions")) == 1


def test_sink_init_creates_the_collisions_table(tmp_path: Path, pg: PgServer) -> None:
    dsn = pg.new_database()
    printed = cli(tmp_path / "data", "sink", "init", "--table", "s.fa").stdout.decode()
    assert 'CREATE TABLE IF NOT EXISTS "s"."fa_collisions"' in printed
    applied = cli(tmp_path / "data", "sink", "init", "--dsn", dsn, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert rows(dsn, "flowagg_entries_collisions") == []
