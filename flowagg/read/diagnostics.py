"""`flowagg diagnostics`: one page for an operator whose processing is slow.

Live from the daemon (its `status` and `health` answers) when one runs; from the files
otherwise (health/latest.json, the folders, the journal, the logs). Read-only either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from flowagg.core.layout import Layout
from flowagg.core.readsafe import NotRegular, open_regular
from flowagg.journal.view import JournalView, Waiting, iter_waiting, view
from flowagg.read.batchread import FAILED, BatchPath, list_batch_files
from flowagg.service.health import read_latest

LOG_TAIL_BYTES = 64 * 1024
RECENT_ERRORS = 10
LOG_NAMES = ("aggregation.log", "recovery.log")


def _usage(directory: Path, *, recurse: bool) -> dict[str, int]:
    files = size = 0
    stack = [directory]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            if recurse:
                                stack.append(Path(e.path))
                            continue
                        size += e.stat(follow_symlinks=False).st_size
                        files += 1
                    except OSError:
                        continue
        except OSError:
            continue
    return {"files": files, "bytes": size}


def disk_use(layout: Layout) -> dict[str, dict[str, int]]:
    """Per folder; recovery/ without its subfolders, which are listed apart."""
    folders = {
        "inbox": (layout.inbox, True),
        "journal": (layout.journal, True),
        "aggregated": (layout.aggregated, True),
        "recovery": (layout.recovery, False),
        "recovery/abandoned": (layout.abandoned, True),
        "recovery/errors": (layout.errors, True),
        "health": (layout.health, True),
        "logs": (layout.logs, True),
    }
    return {name: _usage(path, recurse=recurse) for name, (path, recurse) in folders.items()}


def _tail_lines(path: Path) -> list[str]:
    try:
        with open_regular(path) as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            fh.seek(max(0, end - LOG_TAIL_BYTES))
            data = fh.read(LOG_TAIL_BYTES)
    except (OSError, NotRegular):
        return []  # a log that is not a regular file holds no errors of flowagg's
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[1:] if end > LOG_TAIL_BYTES else lines  # the first may be cut


def recent_errors(layout: Layout) -> list[str]:
    """The last errors and warnings of the logs, oldest first (lines start with the time)."""
    found: set[str] = set()
    for name in LOG_NAMES:
        for line in _tail_lines(layout.logs / name):
            if " ERROR " in line or " WARNING " in line or " CRITICAL " in line:
                found.add(line)
    return sorted(found)[-RECENT_ERRORS:]


def pending(layout: Layout, now_ms: int) -> dict[str, Any]:
    """The journal: its size, and the entries it holds that no batch file holds yet."""
    journal = view(layout.journal)
    waiting = 0
    oldest: int | None = None
    for item in _waiting(journal):
        waiting += 1
        if oldest is None:
            oldest = item.arrival_ms
    return {
        "journal": {
            "bytes": journal.bytes,
            "segments": len(journal.segments),
            "doneSeq": journal.done_seq,
            "waitingEntries": waiting,
            "skipped": [f"{name} ({kind})" for name, kind in journal.skipped],
        },
        "oldestPendingEntry": None
        if oldest is None
        else {"arrivedAt": oldest, "ageMs": max(0, now_ms - oldest)},
    }


def _waiting(journal: JournalView) -> Iterator[Waiting]:
    try:
        yield from iter_waiting(journal)
    except OSError:
        return  # a segment compacted under us: what was seen is the answer


def _failed(layout: Layout) -> list[BatchPath]:
    return [bp for bp in list_batch_files(layout) if bp.kind == FAILED and bp.special is None]


def oldest_failed(layout: Layout, now_ms: int) -> dict[str, Any] | None:
    """The oldest failed batch by its id (arrival of its first entry): it waits longest."""
    failed = _failed(layout)
    if not failed:
        return None
    oldest = min(failed, key=lambda bp: bp.name_id)
    ms = oldest.name_id.partition("_")[0]
    arrived = int(ms) if ms.isdigit() else None
    return {
        "batchId": oldest.name_id,
        "ageMs": None if arrived is None else max(0, now_ms - arrived),
    }


def gather(
    layout: Layout, now_ms: int, live: tuple[dict[str, Any], dict[str, Any]] | None
) -> dict[str, Any]:
    """`live` is the running daemon's (status, health) replies, or None to read the files."""
    doc: dict[str, Any] = {"root": str(layout.root), "at": now_ms}
    if live is not None:
        status, health = live
        doc["source"] = "daemon"
        doc["daemon"] = {"pid": status["pid"], "uptimeS": status["uptimeS"]}
        doc["health"] = {"status": health.get("status"), "issues": health.get("issues", [])}
        doc["latencyMs"] = status["latencyMs"]
        doc["queue"] = status["queue"]
        agg = health.get("aggregatorHealth", {})
        doc["batches"] = {
            "written": status["counters"]["batches"],
            "successRate": agg.get("successRate"),
            "retries": agg.get("retryCount"),
            "inlineRetries": status["flusher"]["inlineRetries"],
        }
        doc["sink"] = status.get("sink")
        doc["buffered"] = status["buffered"]
        doc["daemon"]["rss"] = health.get("systemHealth", {}).get("processRss")
    else:
        snapshot = read_latest(layout)
        doc["source"] = "files"
        doc["daemon"] = None
        doc["health"] = (
            None
            if snapshot is None
            else {
                "status": snapshot.get("status"),
                "issues": snapshot.get("issues", []),
                "snapshotAt": snapshot.get("timestamp"),
            }
        )
        doc["latencyMs"] = snapshot.get("latencyMs") if snapshot else None
        agg = snapshot.get("aggregatorHealth", {}) if snapshot else {}
        doc["batches"] = {
            "written": None,
            "successRate": agg.get("successRate"),
            "retries": agg.get("retryCount"),
            "inlineRetries": None,
        }
        doc["sink"] = snapshot.get("sink") if snapshot else None
        counts = disk_use(layout)
        doc["queue"] = {
            "failed": len(_failed(layout)),
            "abandoned": counts["recovery/abandoned"]["files"],
            "errors": sum(1 for p in layout.errors.glob("*.reason.json")),
            "inbox": sum(1 for p in layout.inbox.glob("*") if p.suffix in (".json", ".jsonl")),
        }
        doc["buffered"] = None
    doc.update(pending(layout, now_ms))
    if doc["source"] == "files":
        doc["queue"]["buffered"] = doc["journal"]["waitingEntries"]
    doc["oldestFailedBatch"] = oldest_failed(layout, now_ms)
    doc["disk"] = disk_use(layout)
    try:
        usage = psutil.disk_usage(str(layout.root))
        doc["diskFree"] = {"available": usage.free, "total": usage.total}
    except OSError:
        doc["diskFree"] = None
    doc["recentErrors"] = recent_errors(layout)
    return doc
