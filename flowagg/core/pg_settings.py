"""PostgreSQL settings checked without a connection: table names, DSNs and their secrets.

The config checks them at load and the masking hides DSN secrets, both below the sink in
the import order; psycopg is imported only when a PostgreSQL setting is in use.
"""

from __future__ import annotations

import re
from typing import Any

from flowagg.core.errors import ConfigError

TABLE_RE = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,62}\.)?[A-Za-z_][A-Za-z0-9_]{0,62}")
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
            f" ({safe_dsn_error(first_line(exc))}); fix its syntax"
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


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
