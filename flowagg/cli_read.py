"""The read commands of SPEC §8 (validate, export, report, diagnostics, top), registered on the
`main` group. They work with or without a running daemon, never take its lock and never
change a file under the root."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import orjson

from .batchread import BatchPath, list_batch_files
from .cli import client_layout, fail, get_config, handles_errors, main
from .clock import SystemClock
from .errors import EXIT_USAGE
from .health import running_pid
from .layout import Layout
from .readout import progress, table
from .validate import FileChecker, Finding, Summary


def _root_layout(ctx: click.Context) -> Layout:
    layout = client_layout(ctx)
    if not layout.root.is_dir():
        fail(
            f"data root {layout.root} does not exist; pass --root or set FLOWAGG_ROOT",
            EXIT_USAGE,
        )
    return layout


@main.command()
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
    agrees with the files. One line per finding. Exit 0 clean, 1 findings, 2 usage.
    """
    config = get_config(ctx)
    layout = Layout.for_config(config)
    if not layout.root.is_dir():
        fail(f"data root {layout.root} does not exist; pass --root or set FLOWAGG_ROOT", EXIT_USAGE)
    files = list_batch_files(layout)
    out = sys.stdout
    first = True

    def report(finding: Finding) -> None:
        nonlocal first
        if as_json:
            out.write(("" if first else ",\n") + orjson.dumps(finding.as_dict()).decode())
        else:
            out.write(finding.line() + "\n")
        first = False

    if as_json:
        out.write('{"findings": [\n')
    checker = FileChecker(
        layout.root,
        now_ms=SystemClock().now_ms(),
        max_entry_bytes=config.values["maxEntryBytes"],
        report=report,
    )
    with progress(len(files), "validating") as advance:
        if full:
            summary = _validate_full(layout, checker, files, advance)
        else:
            summary = checker.check_all(files, on_file=advance)
    if as_json:
        out.write(
            "\n],\n"
            + f'"ok": {"false" if summary.findings else "true"},\n"summary": '
            + orjson.dumps(summary.as_dict() | {"full": full}).decode()
            + "}\n"
        )
    else:
        _summary_table(summary, full)
    sys.exit(1 if summary.findings else 0)


def _validate_full(
    layout: Layout, checker: FileChecker, files: list[BatchPath], advance: Callable[[], None]
) -> Summary:
    from .validate_full import CrossCheck

    with tempfile.TemporaryDirectory(prefix="flowagg-validate-") as tmp:
        cross = CrossCheck(layout, checker.report, Path(tmp))
        try:
            summary = checker.check_all(files, cross.add, advance)
            summary.notes.extend(cross.finish(journal=running_pid(layout) is None))
        finally:
            cross.close()
    return summary


def _summary_table(summary: Summary, full: bool) -> None:
    d = summary.as_dict()
    rows: list[list[Any]] = [[f"{k} files", f"{v:,}"] for k, v in d["files"].items()]
    rows.append(["entries", f"{d['entries']:,}"])
    rows.append(["files with findings", f"{d['badFiles']:,}"])
    rows += [[f"finding: {what}", f"{n:,}"] for what, n in d["findings"].items()]
    title = "validate --full" if full else "validate"
    verdict = "clean" if not d["findingCount"] else f"{d['findingCount']:,} findings"
    table(f"{title}: {verdict}", ["what", "count"], rows, right={1})
    for note in d["notes"]:
        click.echo(f"note: {note}")
