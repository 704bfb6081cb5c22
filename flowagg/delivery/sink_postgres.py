"""The PostgreSQL sink: every acknowledged entry in one table, exactly once.

One statement per batch: the batch document is sent as it is, the server turns its entries
into rows (`jsonb_to_recordset`) and inserts them with `ON CONFLICT (entry_id) DO NOTHING`.
The connection is in autocommit, so that statement is its own transaction: one round trip
per batch, where BEGIN, the insert and COMMIT took three (COPY into a temporary table, then
an insert-select, was measured slower still). Its answer arrives once the commit is durable,
and only then does the batch count as delivered. A batch sent again after any crash (of
flowagg before its local write, of the connection during the commit, of the server) adds
nothing, so every failure is safe to retry: none is ambiguous.

When some rows were already there, a second statement compares them with the batch: the same
content is a re-send (counted, silent); other content under the same entry_id is a collision
(two clients used one id): the batch's row is kept in `<table>_collisions` with both batch ids.
Were the connection lost between the two statements, the batch is sent again and compared
then, so no collision goes unrecorded.

Several deliveries may run at once (the flusher's senders, the recovery loop), each on a
connection of its own, taken from a pool that grows to the deliveries under way
(`sinkConnections` bounds the flusher's; sink_senders). ON CONFLICT makes the order in which
concurrent batches commit irrelevant: a row is stored once whichever commits first, and a
collision between two batches in flight is seen by the one that commits second.

Errors fall in four kinds (classify_error). Connection failures, admin shutdown, serialization
failures, lack of resources and timeouts are transient. A table-level error (a missing table,
column or schema, a revoked grant, a NOT NULL column flowagg does not fill) means the sink is
down, not the batch: the connection is dropped, so the next one checks the table again, and
the batch waits (SinkDownError). A data error (22xxx, 23xxx) is tied to entries: nothing of
the batch was stored, so it is split in savepoints, in one transaction, until the refused
entries stand alone; the rest is stored, the refused ones are reported for parking
(sink_refused). Anything else refuses the batch (permanent).
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
from flowagg.delivery.sink_deadline import Watchdog
from flowagg.delivery.sink_postgres_sql import (
    DDL_LOCK_KEY,
    batch_statements,
    classify_error,
    collisions_table,
    ddl_statements,
    quote_table,
)
from flowagg.delivery.sink_refused import Delivered, Refused

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("flowagg.sink")


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


class _Link:
    """One connection (None until made, or after a failure dropped it)."""

    def __init__(self) -> None:
        self.conn: psycopg.Connection[Any] | None = None

    def drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def cut(self) -> None:
        """Shut the connection's socket, so a call blocked on it returns (never blocks)."""
        conn = self.conn
        if conn is None:
            return
        with contextlib.suppress(Exception):
            sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()


class PostgresSink:
    """Deliveries over reused connections, one per delivery under way.

    `parallel`: how many batches the flusher may deliver at once (`sinkConnections`).
    """

    def __init__(
        self,
        dsn: str,
        table: str,
        timeout_s: float,
        host: str | None = None,
        *,
        parallel: int = 1,
    ) -> None:
        self._psycopg = import_psycopg()
        self.dsn = dsn
        self.table = check_table(table)
        self.timeout_s = timeout_s
        self.host = host or socket.gethostname()
        self.parallel = parallel
        self.name = f"postgres {redact_dsn(dsn)} table {table}"
        self._lock = threading.Lock()  # the idle links and the counters
        self._links: list[_Link] = []  # as many as deliveries ever ran at once
        self._idle: list[_Link] = []  # the last one returned is the next one taken
        self._watchdog = Watchdog("sink-deadline")
        self.rows_written = 0
        self.rows_already_there = 0
        self.rows_refused = 0
        self.collisions = 0
        self.connects = 0
        self._sql = batch_statements(self.table)

    @property
    def _conn(self) -> psycopg.Connection[Any] | None:
        """The connection the next delivery takes, if one is idle."""
        with self._lock:
            return self._idle[-1].conn if self._idle else None

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
            conn.autocommit = True
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self.connects += 1
        return conn

    # -- delivery -----------------------------------------------------------------------------
    def deliver(self, batch_id: str, data: bytes) -> Delivered:
        """Store the batch's rows but those refused one by one, and say what was found."""
        with self._lock:
            if not self._idle:
                self._links.append(_Link())
                self._idle.append(self._links[-1])
            link = self._idle.pop()
        try:
            counts, refused = self._deliver_on(link, batch_id, data)
        finally:
            with self._lock:
                self._idle.append(link)
        with self._lock:
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

    def _deliver_on(self, link: _Link, batch_id: str, data: bytes) -> tuple[_Counts, list[Refused]]:
        psycopg = self._psycopg
        deadline = self._watchdog.arm(self.timeout_s, link.cut)
        stage = "connecting"
        try:
            if link.conn is None or link.conn.closed:
                link.drop()
                link.conn = self._connect()
            conn = link.conn
            stage = "sending"
            refused: list[Refused] = []
            try:
                counts = self._insert_chunk(conn, batch_id, data.decode())
            except psycopg.Error as exc:
                if classify_error(psycopg, exc) != "entry" or deadline.expired:
                    raise
                # The statement failed whole, so nothing of the batch is stored: its entries
                # are tried again in halves, in one transaction.
                conn.execute("BEGIN")
                counts, refused = self._split(conn, batch_id, orjson.loads(data)["entries"])
            stage = "committing"
            # The split's transaction; a batch stored by its one statement has none open.
            conn.commit()
        except psycopg.Error as exc:
            raise self._failure(link, exc, stage, deadline.expired) from None
        finally:
            self._watchdog.disarm(deadline)
        return counts, refused

    def _insert_chunk(self, conn: psycopg.Connection[Any], batch_id: str, doc: str) -> _Counts:
        params = {"batch": batch_id, "host": self.host, "doc": doc}
        with conn.cursor() as cur:
            total, inserted = cur.execute(self._sql.insert, params).fetchone() or (0, 0)
            counts = _Counts(total, inserted)
            if total > inserted:
                differing, collided = cur.execute(self._sql.collide, params).fetchone() or (0, 0)
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

    def _failure(self, link: _Link, exc: BaseException, stage: str, expired: bool) -> Exception:
        conn = link.conn
        broken = conn is None or conn.closed or conn.broken
        if not broken and conn is not None:
            with contextlib.suppress(Exception):
                conn.rollback()
        else:
            link.drop()
        sqlstate = getattr(exc, "sqlstate", None)
        detail = first_line(exc) + (f" (SQLSTATE {sqlstate})" if sqlstate else "")
        if expired:
            link.drop()
            return TransientError(
                f"PostgreSQL did not answer within sinkTimeoutMs ({self.timeout_s:g} s) while"
                f" {stage}; the batch is sent again (safe: rows are stored once)"
            )
        kind = classify_error(self._psycopg, exc)
        if kind == "table":
            # The table, a column or a grant is not what flowagg needs: every batch would
            # fail alike. The next connection checks the tables again (and makes missing ones).
            link.drop()
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
        with self._lock:
            return {
                "table": self.table,
                "connected": any(
                    link.conn is not None and not link.conn.closed for link in self._links
                ),
                "connects": self.connects,
                "rowsWritten": self.rows_written,
                "rowsAlreadyThere": self.rows_already_there,
                "rowsRefused": self.rows_refused,
                "collisionsTable": collisions_table(self.table),
            }
