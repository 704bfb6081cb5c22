"""`--sink postgres`: entries/s delivered into PostgreSQL end to end, beside a plain COPY.

One throwaway cluster (tests/pgserver.py, fsync on) serves the whole figure. flowagg: a
daemon with sinkType postgres, 8 socket clients x 100-entry adds, timed from the first add
until the daemon's `rowsWritten` reaches every entry (checked by a count in the table), with
batchSize 50 and 500. The baseline is what a user would write: one process, psycopg, the same
rows COPied straight into a table of the same shape, one transaction per 50 rows.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson

from .common import REPO, Bench, client_jobs, make_entry, running, span

BATCH_SIZES = (50, 500)
BASELINE_ROWS_PER_TX = 50
HOST = "bench"


@contextlib.contextmanager
def cluster() -> Iterator[Any]:
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # appended: the benchmark's own modules keep precedence
    pgserver = importlib.import_module("tests.pgserver")
    reason = pgserver.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cannot run the PostgreSQL figure: {reason}")
    with pgserver.pg_server(durable=True) as server:
        yield server


def baseline_copy(dsn: str, clients: int, requests: int, per_request: int) -> float:
    """Rows/s of COPY into the table, 50 rows per transaction, from one process."""
    import psycopg

    from flowagg.delivery.sink_postgres import ddl_statements

    rows = [
        (
            f"{c}-{i}",
            e["userId"],
            e["action"],
            _ts(e["timestamp"]),
            orjson.dumps(e["metadata"]).decode(),
            "b",
            HOST,
        )
        for c in range(clients)
        for i in range(requests * per_request)
        for e in (make_entry(c, i),)
    ]
    with psycopg.connect(dsn) as conn:
        for statement in ddl_statements("flowagg_entries"):
            conn.execute(statement)
        conn.commit()
        started = time.monotonic()
        for k in range(0, len(rows), BASELINE_ROWS_PER_TX):
            with conn.cursor() as cur:
                copy_sql = (
                    "COPY flowagg_entries (entry_id, user_id, action, ts, metadata, batch_id,"
                    " host) FROM STDIN"
                )
                with cur.copy(copy_sql) as copy:
                    for row in rows[k : k + BASELINE_ROWS_PER_TX]:
                        copy.write_row(row)
            conn.commit()
        elapsed = time.monotonic() - started
        count = conn.execute("SELECT count(*) FROM flowagg_entries").fetchone()
    if count is None or count[0] != len(rows):
        raise RuntimeError(f"baseline stored {count} of {len(rows)} rows")
    return len(rows) / elapsed


def _ts(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}+00"


def flowagg_sink(b: Bench, dsn: str | None, batch_size: int, clients: int, requests: int) -> float:
    """Entries/s from the first add until all are in the table (dsn None: without a sink,
    until all are in batch files: the ceiling the local store sets)."""
    import psycopg

    s = b.sizes
    assert b.pool is not None
    expected = clients * requests * s.per_request
    root = b.fresh_dir(f"pg{batch_size}")
    sink = {"sinkType": "postgres", "sinkDsn": dsn} if dsn else {}
    settings = b.settings(batchSize=batch_size, **sink)
    with running(root, settings, b.logs) as daemon:
        results = b.pool.run(client_jobs(daemon.sock, clients, requests, s.per_request))
        accepted = sum(r["accepted"] for r in results)
        if accepted != expected:
            raise RuntimeError(f"{accepted} of {expected} entries accepted")
        daemon.request({"op": "flush"})
        deadline = time.monotonic() + s.drain_timeout_s
        while True:
            status = daemon.status()
            stored = status["sink"]["rowsWritten"] if dsn else expected
            if stored >= expected and status["buffered"]["entries"] == 0:
                done = time.monotonic()
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{stored} of {expected} rows after the timeout")
            time.sleep(0.01)
        adding = span(results)
    if dsn:
        with psycopg.connect(dsn) as conn:
            count = conn.execute("SELECT count(*) FROM flowagg_entries").fetchone()
        if count is None or count[0] != expected:
            raise RuntimeError(f"the table holds {count} rows, expected {expected}")
        b.record(f"pg{batch_size}.add_rate", expected / adding)
    shutil.rmtree(root, ignore_errors=True)
    return expected / (done - min(r["start"] for r in results))


def sink_postgres(b: Bench) -> None:
    s = b.sizes
    clients, requests = 8, s.tp8_requests
    with cluster() as server:
        for rep in range(1, b.args.repeats + 1):
            b.progress(f"run {rep}/{b.args.repeats}: plain COPY, 50 rows per transaction")
            base = baseline_copy(server.new_database("base"), clients, requests, s.per_request)
            b.record("pg.copy50", base)
            b.progress(f"  COPY: {base:,.0f} rows/s")
            for batch_size in BATCH_SIZES:
                rate = flowagg_sink(
                    b, server.new_database(f"flowagg{batch_size}_"), batch_size, clients, requests
                )
                b.record(f"pg{batch_size}.flowagg", rate)
                b.record(f"pg{batch_size}.ratio", rate / base)
                b.progress(f"  flowagg batchSize {batch_size}: {rate:,.0f} entries/s delivered")
                local = flowagg_sink(b, None, batch_size, clients, requests)
                b.record(f"pg{batch_size}.no_sink", local)
                b.progress(f"  flowagg batchSize {batch_size}, no sink: {local:,.0f} entries/s")


def sink_rows(b: Bench) -> list[tuple[str, str, str, str, str]]:
    from .report import at_least, fmt, fmt_rate, verdict

    m = b.med
    entries = 8 * b.sizes.tp8_requests * b.sizes.per_request
    rows = []
    for batch_size in BATCH_SIZES:
        goal = batch_size == BASELINE_ROWS_PER_TX
        rows.append(
            (
                f"entries/s into PostgreSQL,\nend to end, batchSize {batch_size}\n"
                f"8 clients x {b.sizes.per_request}-entry adds\n({entries:,} entries)",
                f"{fmt_rate(m(f'pg{batch_size}.flowagg'))} delivered\n"
                f"(adds: {fmt_rate(m(f'pg{batch_size}.add_rate'))})",
                f"psycopg COPY, 1 process,\n50 rows/transaction:\n{fmt_rate(m('pg.copy50'))}\n"
                f"flowagg without a sink:\n{fmt_rate(m(f'pg{batch_size}.no_sink'))} stored",
                f"flowagg/COPY {fmt(m(f'pg{batch_size}.ratio'))}"
                + (" (goal >= 0.8)" if goal else " (reported)"),
                verdict(at_least(m(f"pg{batch_size}.ratio"), 0.8)) if goal else "info",
            )
        )
    return rows


def sink_notes(b: Bench) -> str:
    return "\n".join(
        [
            f"Every figure is the median of {b.args.repeats} run(s) (single runs: --json).",
            "PostgreSQL: a throwaway local cluster (Unix socket, fsync on, default"
            " synchronous_commit), one fresh database per run.",
            "flowagg: a `flowagg run` daemon with sinkType postgres and batchSize 50 or 500;"
            " 8 client processes send 100-entry adds; delivered = entries / (first add ->"
            " the daemon's sink.rowsWritten equals every entry), then a count(*) confirms it."
            " Each batch: one INSERT ... SELECT FROM jsonb_to_recordset(batch JSON) ON CONFLICT"
            " DO NOTHING in autocommit (one round trip, its own transaction); batches queued"
            " meanwhile are delivered sinkConnections (default 4) at a time, each on its own"
            " connection, then the accepted ones' local files written as a run, in order.",
            "flowagg without a sink: the same run with no sink, timed until every entry is in"
            " a batch file: the ceiling the local store (file fsync, rename, directory fsync per"
            " batch) sets for any sink at that batchSize.",
            "baseline: one process, psycopg 3, the same rows COPied straight into a table of"
            " the same shape (primary key and indexes), COMMIT every 50 rows; rows prepared"
            " before timing.",
        ]
    )
