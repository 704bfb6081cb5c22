"""`flowagg validate` (SPEC §8): every batch file checked, and with --full across files and
against the journal. A reader like export and report: no lock, no file changed."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from flowagg.cli.support import get_config, handles_errors, require_root
from flowagg.core.clock import SystemClock
from flowagg.core.layout import Layout
from flowagg.read.readout import quiet_when_stdout_closes

if TYPE_CHECKING:
    from flowagg.read.batchread import BatchPath
    from flowagg.read.validate import FileChecker, Summary

# The modules behind the command are imported inside it: `flowagg add` loads this module too.


@click.command()
@click.option("--full", is_flag=True, help="also check across files and against the journal")
@click.option("--json", "as_json", is_flag=True, help="findings and summary as JSON")
@click.pass_context
@handles_errors
def validate(ctx: click.Context, full: bool, as_json: bool) -> None:
    """Check every batch file in aggregated/, recovery/ and recovery/abandoned/.

    \b
    Each file: parses, has the batch shape and version, its name matches its batchId,
    entryCount and entriesSha256 match, every entry passes the entry rules.
    --full: no entryId twice across files, batch ids unique and ordered, the journal
    agrees with the files. A name that is not a regular file (a FIFO, a link) is not
    read: it is a finding. One line per finding. Exit 0 clean, 1 findings, 2 usage.
    """
    from flowagg.read.batchread import inflate_limit, list_batch_files
    from flowagg.read.readout import progress
    from flowagg.read.validate import FileChecker, Finding

    config = get_config(ctx)
    layout = Layout.for_config(config)
    require_root(layout)
    files = list_batch_files(layout)
    first = True

    def report(finding: Finding) -> None:
        nonlocal first
        if as_json:
            sys.stdout.write(("" if first else ",\n") + orjson.dumps(finding.as_dict()).decode())
        else:
            sys.stdout.write(finding.line() + "\n")
        first = False

    if as_json:
        sys.stdout.write('{"findings": [\n')
    checker = FileChecker(
        layout.root,
        now_ms=SystemClock().now_ms(),
        max_entry_bytes=config.values["maxEntryBytes"],
        limit=inflate_limit(config.values),
        report=report,
    )
    with (
        quiet_when_stdout_closes(lambda: 1 if checker.summary.findings else 0),
        progress(len(files), "validating") as advance,
    ):
        if full:
            summary = _validate_full(
                layout, checker, files, advance, config.values["retainBatchesMs"]
            )
        else:
            summary = checker.check_all(files, on_file=advance)
        if as_json:
            sys.stdout.write(
                "\n],\n"
                + f'"ok": {"false" if summary.findings else "true"},\n"summary": '
                + orjson.dumps(summary.as_dict() | {"full": full}).decode()
                + "}\n"
            )
        else:
            _summary_table(summary, full)
        sys.exit(1 if summary.findings else 0)


def _validate_full(
    layout: Layout,
    checker: FileChecker,
    files: list[BatchPath],
    advance: Callable[[], None],
    retention_ms: int,
) -> Summary:
    from flowagg.read.validate_full import CrossCheck
    from flowagg.service.health import running_pid

    with tempfile.TemporaryDirectory(prefix="flowagg-validate-") as tmp:
        cross = CrossCheck(layout, checker.report, Path(tmp))
        try:
            summary = checker.check_all(files, cross.add, advance)
            notes = cross.finish(journal=running_pid(layout) is None, retention=retention_ms > 0)
            summary.notes.extend(notes)
            summary.skipped.extend(cross.skipped)
        finally:
            cross.close()
    return summary


def _summary_table(summary: Summary, full: bool) -> None:
    from flowagg.read.readout import table

    d = summary.as_dict()
    rows: list[list[Any]] = [[f"{k} files", f"{v:,}"] for k, v in d["files"].items()]
    rows.append(["entries", f"{d['entries']:,}"])
    rows.append(["files with findings", f"{d['badFiles']:,}"])
    rows += [[f"finding: {what}", f"{n:,}"] for what, n in d["findings"].items()]
    title = "validate --full" if full else "validate"
    verdict = "clean" if not d["findingCount"] else f"{d['findingCount']:,} findings"
    table(f"{title}: {verdict}", ["what", "count"], rows, right={1})
    skipped = summary.skipped_line()
    if skipped:
        click.echo(skipped)
    for note in d["notes"]:
        click.echo(f"note: {note}")
