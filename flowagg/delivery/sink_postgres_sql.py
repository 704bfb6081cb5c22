"""The PostgreSQL sink's SQL: the table's DDL, the batch's statements and the error kinds.

Text only, no connection: `flowagg sink init` prints the DDL from here, and the sink
(sink_postgres) runs the statements.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Serialises table creation between daemons that find it missing at the same moment.
DDL_LOCK_KEY = 0x666C6F77616767


def quote_table(table: str) -> str:
    return ".".join(f'"{part}"' for part in table.split("."))


def collisions_table(table: str) -> str:
    """`<table>_collisions`, within PostgreSQL's 63-byte names."""
    *schema, name = table.split(".")
    return ".".join([*schema, f"{name[:52]}_collisions"])


def ddl_statements(table: str) -> list[str]:
    """The statements that create the table, its indexes and its collisions table (each
    idempotent)."""
    q = quote_table(table)
    name = table.split(".")[-1][:50]
    return [
        f"CREATE TABLE IF NOT EXISTS {q} (\n"
        "    entry_id    text PRIMARY KEY,\n"
        "    user_id     text NOT NULL,\n"
        "    action      text NOT NULL,\n"
        "    ts          timestamptz NOT NULL,\n"
        "    metadata    jsonb NOT NULL DEFAULT '{}',\n"
        "    batch_id    text NOT NULL,\n"
        "    host        text NOT NULL,\n"
        "    received_at timestamptz NOT NULL DEFAULT now()\n"
        ")",
        f'CREATE INDEX IF NOT EXISTS "{name}_user_ts" ON {q} (user_id, ts)',
        f'CREATE INDEX IF NOT EXISTS "{name}_batch" ON {q} (batch_id)',
        # An entry whose id the table held with other content: the row it would have been,
        # and the batch whose row holds the id (stored_batch_id).
        f"CREATE TABLE IF NOT EXISTS {quote_table(collisions_table(table))} (\n"
        "    entry_id        text NOT NULL,\n"
        "    batch_id        text NOT NULL,\n"
        "    stored_batch_id text NOT NULL,\n"
        "    user_id         text NOT NULL,\n"
        "    action          text NOT NULL,\n"
        "    ts              timestamptz NOT NULL,\n"
        "    metadata        jsonb NOT NULL DEFAULT '{}',\n"
        "    host            text NOT NULL,\n"
        "    received_at     timestamptz NOT NULL DEFAULT now(),\n"
        "    PRIMARY KEY (entry_id, batch_id)\n"
        ")",
    ]


@dataclasses.dataclass(frozen=True)
class Statements:
    """The two statements a batch may need; parameters `doc` (the batch JSON), `batch`, `host`.

    `insert` answers (entries in the batch, rows inserted); `collide` answers (entries stored
    with other content, collisions newly recorded).
    """

    insert: str
    collide: str


def batch_statements(table: str) -> Statements:
    q = quote_table(table)
    qc = quote_table(collisions_table(table))
    entries = (
        "e AS (SELECT * FROM jsonb_to_recordset(%(doc)s::jsonb -> 'entries') AS e("
        '"entryId" text, "userId" text, action text, "timestamp" bigint, metadata jsonb))'
    )
    ts = "timestamptz 'epoch' + e.\"timestamp\" * interval '1 millisecond'"
    # The batch document goes to the server as it is, one parameter: the rows are made
    # there, so the daemon spends no per-row work (it shares the machine's cores with
    # its clients).
    insert = (
        f"WITH {entries},"
        f" ins AS (INSERT INTO {q} (entry_id, user_id, action, ts, metadata, batch_id, host)"
        f' SELECT e."entryId", e."userId", e.action, {ts},'
        " coalesce(e.metadata, '{}'), %(batch)s, %(host)s FROM e"
        " ON CONFLICT (entry_id) DO NOTHING RETURNING 1)"
        " SELECT (SELECT count(*) FROM e), (SELECT count(*) FROM ins)"
    )
    # Run after the insert, under a new snapshot (READ COMMITTED), so a row another
    # connection or daemon committed meanwhile is seen: rows this batch inserted and true
    # re-sends have the same content; the rest are collisions.
    differs = (
        f'FROM e JOIN {q} s ON s.entry_id = e."entryId" WHERE (s.user_id, s.action, s.ts,'
        f' s.metadata) IS DISTINCT FROM (e."userId", e.action, {ts},'
        " coalesce(e.metadata, '{}'))"
    )
    collide = (
        f"WITH {entries},"
        f" c AS (INSERT INTO {qc} (entry_id, batch_id, stored_batch_id, user_id, action, ts,"
        f' metadata, host) SELECT e."entryId", %(batch)s, s.batch_id, e."userId", e.action,'
        f" {ts}, coalesce(e.metadata, '{{}}'), %(host)s {differs}"
        " ON CONFLICT (entry_id, batch_id) DO NOTHING RETURNING 1)"
        f" SELECT (SELECT count(*) {differs}), (SELECT count(*) FROM c)"
    )
    return Statements(insert, collide)


# SQLSTATEs that are about the table, not the batch: class 42 (a missing table or column, a
# revoked grant, a changed type), 3F (a missing schema), and a NOT NULL column flowagg does
# not fill (every validated entry has the columns flowagg fills).
TABLE_CLASSES = ("42", "3F")
TABLE_STATES = frozenset({"23502"})
# A value a column refuses (22xxx) or a constraint one row breaks (23xxx): tied to entries.
ENTRY_CLASSES = ("22", "23")


def classify_error(psycopg: Any, exc: BaseException) -> str:
    """'table' (the sink is down), 'entry' (some entries are refused), 'permanent' (the batch
    is refused) or 'transient' (anything else: try again)."""
    state = getattr(exc, "sqlstate", None) or ""
    if state[:2] in TABLE_CLASSES or state in TABLE_STATES:
        return "table"
    if state[:2] in ENTRY_CLASSES:
        return "entry"
    if isinstance(exc, psycopg.ProgrammingError | psycopg.NotSupportedError):
        return "permanent"
    return "transient"
