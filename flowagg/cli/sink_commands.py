"""`flowagg sink init`: the PostgreSQL sink's table, printed for a DBA or created (`--apply`).

The daemon creates the table itself when it may; this is for a database where flowagg's
role may only insert.
"""

from __future__ import annotations

import sys

import click

from flowagg.core.config import load_config
from flowagg.core.errors import EXIT_DAEMON_FAILURE, FlowaggError


@click.group()
def sink() -> None:
    """The sink's own commands."""


@sink.command()
@click.option("--table", help="table to create (default: sinkTable)")
@click.option("--dsn", help="database to create it in with --apply (default: sinkDsn)")
@click.option("--apply", "apply_ddl", is_flag=True, help="run the DDL instead of printing it")
@click.pass_context
def init(ctx: click.Context, table: str | None, dsn: str | None, apply_ddl: bool) -> None:
    """Print (or with --apply run) the DDL of the PostgreSQL sink's table and indexes."""
    try:
        _init(ctx, table, dsn, apply_ddl)
    except FlowaggError as exc:
        click.echo(f"flowagg: {exc}", err=True)
        sys.exit(exc.exit_code)


def _init(ctx: click.Context, table: str | None, dsn: str | None, apply_ddl: bool) -> None:
    from flowagg.core.pg_settings import check_dsn, check_table, import_psycopg, redact_dsn
    from flowagg.delivery.sink_postgres import ddl_statements

    root = ctx.obj["root"] if ctx.obj else None
    config = load_config(flags={"root": root}, config_path=ctx.obj["config"] if ctx.obj else None)
    table = check_table(table or config.sink_table, "--table" if table else "sinkTable")
    statements = ddl_statements(table)
    if not apply_ddl:
        click.echo("".join(f"{s};\n" for s in statements), nl=False)
        return
    dsn = dsn or config.sink_dsn
    check_dsn(dsn, "--dsn" if dsn != config.sink_dsn else config.sources["sinkDsn"])
    psycopg = import_psycopg()
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            for statement in statements:
                conn.execute(statement)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FlowaggError(
            f"cannot create {table} in {redact_dsn(dsn)}: {first}; check the DSN and that the"
            " role may create tables there (or give the printed DDL to your DBA)",
            EXIT_DAEMON_FAILURE,
        ) from None
    click.echo(f"created {table} (if missing) in {redact_dsn(dsn)}")
