"""The PostgreSQL sink: every acknowledged entry in one table, exactly once.

One transaction per batch, one statement: the batch document is sent as it is, the server
turns its entries into rows (`jsonb_to_recordset`) and inserts them with
`ON CONFLICT (entry_id) DO NOTHING`. A batch sent again after any crash (of flowagg before
its local write, of the connection during COMMIT, of the server) adds nothing, so every
failure is safe to retry: none is ambiguous. Rows the table already held are counted, and a
delivery that found some is reported as a re-send. (COPY into a temporary table, then an
insert-select, was measured slower: two more round trips and per-row work in the daemon.)

Connection failures, admin shutdown, serialization failures, lack of resources and timeouts
are transient; a refusal of this batch or this table (permissions, schema, bad data) is
permanent. psycopg is imported only when this sink is configured (the `postgres` extra).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import threading
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, PermanentError, SinkDownError, TransientError

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("flowagg.sink")

DEFAULT_TABLE = "flowagg_entries"
TABLE_RE = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,62}\.)?[A-Za-z_][A-Za-z0-9_]{0,62}")
# Serialises table creation between daemons that find it missing at the same moment.
DDL_LOCK_KEY = 0x666C6F77616767
MISSING_DRIVER = (
    "sinkType is postgres but psycopg is not installed; install the postgres extra:"
    " pip install 'flowagg[postgres]'"
)


def import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError(MISSING_DRIVER) from None
    return psycopg


def check_table(table: str, source: str = "sinkTable") -> str:
    if not TABLE_RE.fullmatch(table):
        raise ConfigError(
            f"sinkTable ({source}): {table!r} is not a table name; use letters, digits and"
            " underscores, optionally schema-qualified (schema.table)"
        )
    return table


# libpq's secret parameters: those it marks "*" (password-like: never shown) in PQconndefaults,
# and the SCRAM keys it marks as debug options, which stand in for the password. Asked of the
# installed libpq too (dsn_secret_keys), so a newer one's secrets are known without a release.
SECRET_DSN_KEYS = frozenset(
    ("password", "sslpassword", "oauth_client_secret", "scram_client_key", "scram_server_key")
)
# A libpq parse error quotes pieces of the DSN, which may be pieces of a secret: only these
# fragments (separators it names) are shown as they are; anything else quoted becomes "…".
_QUOTED = re.compile(r'"([^"]*)"')
_SHOWN_FRAGMENTS = frozenset(("=", "]", "?", "&", ":", "/", "@"))


def dsn_secret_keys() -> frozenset[str]:
    try:
        from psycopg import pq

        marked = {
            option.keyword.decode()
            for option in pq.Conninfo.get_defaults()
            if option.dispchar == b"*"
        }
    except Exception:  # no libpq here: the list above is what is known
        marked = set()
    return SECRET_DSN_KEYS | marked


def safe_dsn_error(message: str) -> str:
    """libpq's first line with every quoted piece of the DSN hidden."""

    def hide(match: re.Match[str]) -> str:
        return match.group(0) if match.group(1) in _SHOWN_FRAGMENTS else '"…"'

    return _QUOTED.sub(hide, message)


def check_dsn(dsn: str, source: str = "sinkDsn") -> None:
    """A DSN libpq can parse, and without a secret: a password goes in PGPASSFILE or
    PGPASSWORD, other secrets in a service file (PGSERVICEFILE)."""
    psycopg = import_psycopg()
    if not dsn:
        raise ConfigError(
            f"sinkDsn ({source}): sinkType is postgres, so sinkDsn must name the database,"
            " e.g. 'host=db.example dbname=flowagg user=flowagg'"
        )
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"sinkDsn ({source}): not a libpq connection string or URL"
            f" ({safe_dsn_error(_first_line(exc))}); fix its syntax"
        ) from None
    held = sorted(key for key in dsn_secret_keys() if params.get(key))
    if held:
        where = (
            "PGPASSFILE (~/.pgpass) or PGPASSWORD"
            if held == ["password"]
            else "a service file (PGSERVICEFILE, then service=<name> in sinkDsn)"
        )
        what = "a password" if held == ["password"] else f"a secret ({', '.join(held)})"
        raise ConfigError(
            f"sinkDsn ({source}): holds {what}, which would be shown and stored in the clear;"
            f" remove it and use {where} instead"
        )


def redact_dsn(dsn: str) -> str:
    """The DSN as it may be shown: key=value form, every secret parameter replaced."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        return "(dsn)"
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "(unparsable dsn)"
    secret = dsn_secret_keys()
    return " ".join(f"{k}={'***' if k in secret else v}" for k, v in params.items())


def quote_table(table: str) -> str:
    return ".".join(f'"{part}"' for part in table.split("."))


def ddl_statements(table: str) -> list[str]:
    """The statements that create the table and its indexes (each idempotent)."""
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
    ]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def classify_error(psycopg: Any, exc: BaseException) -> str:
    """'permanent' for a refusal retrying cannot fix; 'transient' for everything else."""
    permanent = (
        psycopg.ProgrammingError,  # 42xxx: permissions, missing table or column, syntax
        psycopg.DataError,  # 22xxx: a value the column refuses
        psycopg.IntegrityError,  # 23xxx other than the entry_id conflict, which is handled
        psycopg.NotSupportedError,
    )
    return "permanent" if isinstance(exc, permanent) else "transient"


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
        self.connects = 0
        q = quote_table(self.table)
        # The batch document goes to the server as it is, one parameter: the rows are made
        # there, so the daemon spends no per-row work (it shares the machine's cores with
        # its clients) and a batch costs one round trip plus the COMMIT.
        self._insert = (
            "WITH e AS (SELECT * FROM jsonb_to_recordset(%(doc)s::jsonb -> 'entries') AS e("
            '"entryId" text, "userId" text, action text, "timestamp" bigint, metadata jsonb)),'
            f" ins AS (INSERT INTO {q} (entry_id, user_id, action, ts, metadata, batch_id, host)"
            ' SELECT e."entryId", e."userId", e.action,'
            " timestamptz 'epoch' + e.\"timestamp\" * interval '1 millisecond',"
            " coalesce(e.metadata, '{}'), %(batch)s, %(host)s FROM e"
            " ON CONFLICT (entry_id) DO NOTHING RETURNING 1)"
            " SELECT (SELECT count(*) FROM e), (SELECT count(*) FROM ins)"
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
            table = conn.execute("SELECT to_regclass(%s)", [quote_table(self.table)]).fetchone()
            if table is None or table[0] is None:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [DDL_LOCK_KEY])
                for statement in ddl_statements(self.table):
                    conn.execute(statement)
                log.info("created table %s in PostgreSQL", self.table)
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
    def deliver(self, batch_id: str, data: bytes) -> bool:
        """Store the batch's rows; True when the table already held some of them."""
        with self._lock:
            return self._deliver_locked(batch_id, data)

    def _deliver_locked(self, batch_id: str, data: bytes) -> bool:
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
            with conn.cursor() as cur:
                cur.execute(
                    self._insert, {"batch": batch_id, "host": self.host, "doc": data.decode()}
                )
                counted = cur.fetchone()
            total, inserted = counted if counted is not None else (0, 0)
            stage = "committing"
            conn.commit()
        except psycopg.Error as exc:
            raise self._failure(exc, stage, expired) from None
        finally:
            timer.cancel()
        self.rows_written += inserted
        already = total - inserted
        self.rows_already_there += already
        if already:
            log.info(
                "batch %s: %d of %d rows were already in PostgreSQL (a re-send)",
                batch_id,
                already,
                total,
            )
        return already > 0

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
        detail = _first_line(exc) + (f" (SQLSTATE {sqlstate})" if sqlstate else "")
        if expired.is_set():
            self._drop()
            return TransientError(
                f"PostgreSQL did not answer within sinkTimeoutMs ({self.timeout_s:g} s) while"
                f" {stage}; the batch is sent again (safe: rows are stored once)"
            )
        if classify_error(self._psycopg, exc) == "permanent":
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
        }


def ddl_text(table: str) -> str:
    """`flowagg sink init`: the DDL as a DBA would run it."""
    return "".join(f"{s};\n" for s in ddl_statements(table))
