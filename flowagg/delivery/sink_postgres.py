"""The PostgreSQL sink: every acknowledged entry in one table, exactly once.

One transaction per batch, one statement: the batch document is sent as it is, the server
turns its entries into rows (`jsonb_to_recordset`) and inserts them with
`ON CONFLICT (entry_id) DO NOTHING`. A batch sent again after any crash (of flowagg before
its local write, of the connection during COMMIT, of the server) adds nothing, so every
failure is safe to retry: none is ambiguous. (COPY into a temporary table, then an
insert-select, was measured slower: two more round trips and per-row work in the daemon.)

When some rows were already there, a second statement compares them with the batch: the same
content is a re-send (counted, silent); other content under the same entry_id is a collision
(two clients used one id): the batch's row is kept in `<table>_collisions` with both batch ids.

Errors fall in four kinds (classify_error). Connection failures, admin shutdown, serialization
failures, lack of resources and timeouts are transient. A table-level error (a missing table,
column or schema, a revoked grant, a NOT NULL column flowagg does not fill) means the sink is
down, not the batch: the connection is dropped, so the next one checks the table again, and
the batch waits (SinkDownError). A data error (22xxx, 23xxx) is tied to entries: the batch is
split in savepoints until the refused entries stand alone; the rest is stored, the refused
ones are reported for parking (sink_refused). Anything else refuses the batch (permanent).
psycopg is imported only when this sink is configured (the `postgres` extra).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
import threading
from typing import TYPE_CHECKING, Any

import orjson

from flowagg.core.errors import PermanentError, SinkDownError, TransientError
from flowagg.core.pg_settings import check_table, first_line, import_psycopg, redact_dsn
from flowagg.delivery.sink_refused import Delivered, Refused

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("flowagg.sink")

DEFAULT_TABLE = "flowagg_entries"
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


@dataclasses.dataclass
class _Counts:
    total: int = 0
    inserted: int = 0
    same: int = 0  # already stored with the same content: a re-send
    collided: int = 0  # newly recorded in the collisions table

    def add(self, other: _Counts) -> None:
        self.total += other.total
        self.inserted += other.inserted
        self.same += other.same
        self.collided += other.collided


class PostgresSink:
    """Deliveries over one reused connection, re-established after a failure.

    The flusher and the recovery loop may deliver at the same moment: a lock keeps the
    connection to one batch at a time.
    """

    def __init__(self, dsn: str, table: str, timeout_s: float, host: str | None = None) -> None:
        self._psycopg = import_psycopg()
        self.dsn = dsn
        self.table = check_table(table)
        self.timeout_s = timeout_s
        self.host = host or socket.gethostname()
        self.name = f"postgres {redact_dsn(dsn)} table {table}"
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self.rows_written = 0
        self.rows_already_there = 0
        self.rows_refused = 0
        self.collisions = 0
        self.connects = 0
        q = quote_table(self.table)
        qc = quote_table(collisions_table(self.table))
        entries = (
            "e AS (SELECT * FROM jsonb_to_recordset(%(doc)s::jsonb -> 'entries') AS e("
            '"entryId" text, "userId" text, action text, "timestamp" bigint, metadata jsonb))'
        )
        ts = "timestamptz 'epoch' + e.\"timestamp\" * interval '1 millisecond'"
        # The batch document goes to the server as it is, one parameter: the rows are made
        # there, so the daemon spends no per-row work (it shares the machine's cores with
        # its clients) and a batch costs one round trip plus the COMMIT.
        self._insert = (
            f"WITH {entries},"
            f" ins AS (INSERT INTO {q} (entry_id, user_id, action, ts, metadata, batch_id, host)"
            f' SELECT e."entryId", e."userId", e.action, {ts},'
            " coalesce(e.metadata, '{}'), %(batch)s, %(host)s FROM e"
            " ON CONFLICT (entry_id) DO NOTHING RETURNING 1)"
            " SELECT (SELECT count(*) FROM e), (SELECT count(*) FROM ins)"
        )
        # Run in the same transaction after the insert (a new snapshot under READ COMMITTED,
        # so a row another daemon committed meanwhile is seen): rows of this batch just
        # inserted and true re-sends have the same content; the rest are collisions.
        differs = (
            f'FROM e JOIN {q} s ON s.entry_id = e."entryId" WHERE (s.user_id, s.action, s.ts,'
            f' s.metadata) IS DISTINCT FROM (e."userId", e.action, {ts},'
            " coalesce(e.metadata, '{}'))"
        )
        self._collide = (
            f"WITH {entries},"
            f" c AS (INSERT INTO {qc} (entry_id, batch_id, stored_batch_id, user_id, action, ts,"
            f' metadata, host) SELECT e."entryId", %(batch)s, s.batch_id, e."userId", e.action,'
            f" {ts}, coalesce(e.metadata, '{{}}'), %(host)s {differs}"
            " ON CONFLICT (entry_id, batch_id) DO NOTHING RETURNING 1)"
            f" SELECT (SELECT count(*) {differs}), (SELECT count(*) FROM c)"
        )

    # -- connection ---------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        psycopg = self._psycopg
        # Keywords win over the DSN's own: only what the user left unset is filled in.
        given = psycopg.conninfo.conninfo_to_dict(self.dsn)
        defaults = {
            "connect_timeout": max(2, math.ceil(self.timeout_s)),
            "application_name": "flowagg",
        }
        extra = {key: value for key, value in defaults.items() if key not in given}
        conn = psycopg.connect(self.dsn, **extra)
        try:
            timeout_ms = max(1, int(self.timeout_s * 1000))
            conn.execute("SELECT set_config('statement_timeout', %s, false)", [str(timeout_ms)])
            # Both tables, at every connect: a connection is dropped after a table-level
            # error, so a dropped table is seen (and made again) by the next one.
            found = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
                [quote_table(self.table), quote_table(collisions_table(self.table))],
            ).fetchone()
            if found is None or not found[0]:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [DDL_LOCK_KEY])
                for statement in ddl_statements(self.table):
                    conn.execute(statement)
                log.info("created table %s (or its collisions table) in PostgreSQL", self.table)
            conn.commit()
        except BaseException:
            conn.close()
            raise
        self.connects += 1
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- delivery -----------------------------------------------------------------------------
    def deliver(self, batch_id: str, data: bytes) -> Delivered:
        """Store the batch's rows but those refused one by one, and say what was found."""
        with self._lock:
            return self._deliver_locked(batch_id, data)

    def _deliver_locked(self, batch_id: str, data: bytes) -> Delivered:
        psycopg = self._psycopg
        expired = threading.Event()
        timer = threading.Timer(self.timeout_s, self._cut, args=(expired,))
        timer.daemon = True
        stage = "connecting"
        try:
            timer.start()
            if self._conn is None or self._conn.closed:
                self._drop()
                self._conn = self._connect()
            conn = self._conn
            stage = "sending"
            refused: list[Refused] = []
            try:
                counts = self._insert_chunk(conn, batch_id, data.decode())
            except psycopg.Error as exc:
                if classify_error(psycopg, exc) != "entry" or expired.is_set():
                    raise
                conn.rollback()
                counts, refused = self._split(conn, batch_id, orjson.loads(data)["entries"])
            stage = "committing"
            conn.commit()
        except psycopg.Error as exc:
            raise self._failure(exc, stage, expired) from None
        finally:
            timer.cancel()
        self.rows_written += counts.inserted
        self.rows_already_there += counts.same
        self.rows_refused += len(refused)
        self.collisions += counts.collided
        if counts.same:
            log.info(
                "batch %s: %d of %d rows were already in PostgreSQL (a re-send)",
                batch_id,
                counts.same,
                counts.total,
            )
        if counts.collided:
            log.warning(
                "batch %s: %d entryIds were in PostgreSQL with other content (two clients used"
                " one id); kept in %s",
                batch_id,
                counts.collided,
                collisions_table(self.table),
            )
        return Delivered(counts.same > 0, tuple(refused), counts.collided)

    def _insert_chunk(self, conn: psycopg.Connection[Any], batch_id: str, doc: str) -> _Counts:
        params = {"batch": batch_id, "host": self.host, "doc": doc}
        with conn.cursor() as cur:
            total, inserted = cur.execute(self._insert, params).fetchone() or (0, 0)
            counts = _Counts(total, inserted)
            if total > inserted:
                differing, collided = cur.execute(self._collide, params).fetchone() or (0, 0)
                counts.same = total - inserted - differing
                counts.collided = collided
        return counts

    def _split(
        self, conn: psycopg.Connection[Any], batch_id: str, entries: list[dict[str, Any]]
    ) -> tuple[_Counts, list[Refused]]:
        """Halve the batch, each half in a savepoint, until every refused entry stands alone:
        one transaction still, so the rest is stored once, with the same ids, or not at all."""
        psycopg = self._psycopg
        counts = _Counts()
        refused: list[Refused] = []
        todo = [(0, len(entries))]
        while todo:
            lo, hi = todo.pop()
            conn.execute("SAVEPOINT flowagg_split")
            try:
                part = self._insert_chunk(
                    conn, batch_id, orjson.dumps({"entries": entries[lo:hi]}).decode()
                )
            except psycopg.Error as exc:
                if classify_error(psycopg, exc) != "entry":
                    raise
                conn.execute("ROLLBACK TO SAVEPOINT flowagg_split")
                if hi - lo == 1:
                    reason = first_line(exc) + f" (SQLSTATE {exc.sqlstate})"
                    refused.append(Refused(lo, str(entries[lo].get("entryId")), reason))
                else:
                    mid = (lo + hi) // 2
                    todo += [(mid, hi), (lo, mid)]
                continue
            conn.execute("RELEASE SAVEPOINT flowagg_split")
            counts.add(part)
        refused.sort(key=lambda item: item.index)
        return counts, refused

    def _cut(self, expired: threading.Event) -> None:
        """At the deadline: shut the connection's socket, so a call blocked on it returns."""
        expired.set()
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(Exception):
            fd = conn.pgconn.socket
            sock = socket.socket(fileno=os.dup(fd))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()

    def _failure(self, exc: BaseException, stage: str, expired: threading.Event) -> Exception:
        conn = self._conn
        broken = conn is None or conn.closed or conn.broken
        if not broken and conn is not None:
            with contextlib.suppress(Exception):
                conn.rollback()
        else:
            self._drop()
        sqlstate = getattr(exc, "sqlstate", None)
        detail = first_line(exc) + (f" (SQLSTATE {sqlstate})" if sqlstate else "")
        if expired.is_set():
            self._drop()
            return TransientError(
                f"PostgreSQL did not answer within sinkTimeoutMs ({self.timeout_s:g} s) while"
                f" {stage}; the batch is sent again (safe: rows are stored once)"
            )
        kind = classify_error(self._psycopg, exc)
        if kind == "table":
            # The table, a column or a grant is not what flowagg needs: every batch would
            # fail alike. The next connection checks the tables again (and makes missing ones).
            self._drop()
            return SinkDownError(
                f"PostgreSQL sink is down: {detail}; fix table {self.table} (or run"
                " `flowagg sink init --apply` as its owner); batches wait, none is lost"
            )
        if kind in ("permanent", "entry"):
            return PermanentError(f"PostgreSQL refused the batch: {detail}")
        if stage == "committing":
            return TransientError(
                f"PostgreSQL connection lost during COMMIT ({detail}); the batch may be"
                " stored: it is sent again, which is safe (rows are stored once)"
            )
        if stage == "connecting":
            return SinkDownError(f"PostgreSQL unavailable while {stage}: {detail}")
        return TransientError(f"PostgreSQL unavailable while {stage}: {detail}")

    def snapshot(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "connected": self._conn is not None and not self._conn.closed,
            "connects": self.connects,
            "rowsWritten": self.rows_written,
            "rowsAlreadyThere": self.rows_already_there,
            "rowsRefused": self.rows_refused,
            "collisionsTable": collisions_table(self.table),
        }


def ddl_text(table: str) -> str:
    """`flowagg sink init`: the DDL as a DBA would run it."""
    return "".join(f"{s};\n" for s in ddl_statements(table))
