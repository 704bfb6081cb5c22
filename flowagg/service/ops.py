"""The socket's operations (SPEC §4.1): each request gets one reply object."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import TYPE_CHECKING, Any

from flowagg import __version__
from flowagg.core.audit import audit
from flowagg.core.config import Config
from flowagg.core.config_schema import SETTINGS
from flowagg.core.entries import short_repr
from flowagg.core.fsutil import count_files
from flowagg.core.masking import mask_config_report, mask_report
from flowagg.delivery.recovery_folder import undelivered_lag_ms
from flowagg.delivery.recovery_format import check_batch_id
from flowagg.ingest.entry_codec import DecodedEntries
from flowagg.ingest.peers import privileged
from flowagg.ingest.ratelimit import add_limited
from flowagg.ingest.server import Peer, stopping_reply
from flowagg.service.metrics import snapshot
from flowagg.service.reloading import RESTART_ONLY

if TYPE_CHECKING:
    from flowagg.service.daemon_host import DaemonHost

log = logging.getLogger("flowagg.ops")

# A socket flush answers with the reason once batches have failed to store for
# FLUSH_STALL_GRACE_S, and at the latest after FLUSH_REPLY_WAIT_S (under the client's 60 s),
# instead of leaving the client to time out. The flush itself goes on.
FLUSH_STALL_GRACE_S = 2.0
FLUSH_REPLY_WAIT_S = 45.0
FLUSH_POLL_S = 0.25
STATE_CHANGING = ("flush", "recover", "reload")


async def handle_request(daemon: DaemonHost, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
    """One socket request; the reply is one JSON object."""
    assert daemon.pipeline is not None
    op = request.get("op")
    if op in STATE_CHANGING:
        log.info("%s requested by %s", op, peer)
    if op == "add":
        entries = request.get("entries")
        if not isinstance(entries, list):
            return {"ok": False, "error": 'add: "entries" must be an array of entries'}
        if daemon.stopping:
            return stopping_reply()
        if daemon.limiter.active:
            if isinstance(entries, DecodedEntries):
                entries = entries.plain()  # the limiter reads each entry's userId
            return await add_limited(daemon.pipeline.add, daemon.limiter, entries, peer)
        return (await daemon.pipeline.add(entries)).reply()
    if op == "ping":
        return {"ok": True}
    if op == "flush":
        reply = await bounded_flush(daemon)
        audit_reply("flush", reply, peer, ("batches", "entries"))
        return reply
    if op == "status":
        return {"ok": True, **shown_to(peer, daemon, daemon_status(daemon))}
    if op == "recover":
        batch = request.get("batch")
        if batch is not None and not isinstance(batch, str):
            return {"ok": False, "error": 'recover: "batch" must be a batch id string'}
        event = "requeue" if request.get("abandoned") else "recover"
        try:
            if batch is not None:
                check_batch_id(batch)
            report = await daemon.recover(
                force=True, requeue=bool(request.get("abandoned")), batch=batch
            )
        except (FileNotFoundError, ValueError) as exc:
            reply = {"ok": False, "error": f"recover: {exc}"}
        except OSError as exc:
            # A requeue's write into recovery/ (a full disk, a refused folder): what was not
            # moved stays abandoned, so the operator only needs to fix the cause and rerun.
            reply = {
                "ok": False,
                "error": f"recover: cannot write {exc.filename} ({exc.strerror}); free space"
                " or fix the folder's permissions, then run it again",
            }
        else:
            reply = {"ok": True, **report}
        audit_reply(event, reply, peer, RECOVERY_FIELDS)
        return reply
    if op == "health":
        return {"ok": True, **shown_to(peer, daemon, daemon.health_snapshot())}
    if op == "reload":
        return daemon.reload(peer)
    if op == "metrics":
        from flowagg.service.metrics_families import render

        text = render(
            snapshot(daemon, daemon_status(daemon)),
            # promtool and older scrapers read only the Prometheus text format.
            openmetrics=request.get("format") == "openmetrics",
        )
        return {"ok": True, "text": text.decode()}
    if op == "config":
        report = config_report(daemon.config, daemon.config_on_disk())
        return {"ok": True, **(report if privileged(peer) else mask_config_report(report))}
    return {
        "ok": False,
        "error": f"unknown op {short_repr(op)}; use add, flush, recover, status, health,"
        " reload, config, metrics or ping",
    }


def shown_to(peer: Peer, daemon: DaemonHost, doc: dict[str, Any]) -> dict[str, Any]:
    """`status` or `health` as this peer may see it: whole for root and the daemon's own user,
    with the sink's credentials and errors masked for everyone else."""
    return doc if privileged(peer) else mask_report(doc, dict(daemon.config.values))


RECOVERY_FIELDS = ("requeued", "recovered", "failedAgain", "abandoned", "quarantined")


def audit_reply(event: str, reply: dict[str, Any], peer: Peer, fields: tuple[str, ...]) -> None:
    """One audit line for a socket request: its outcome and the reply's counts and ids."""
    outcome = "ok" if reply.get("ok") else "error"
    details = {key: reply[key] for key in fields if key in reply}
    if not reply.get("ok"):
        details["error"] = reply.get("error")
    audit(event, peer=peer, outcome=outcome, **details)


def config_report(config: Config, on_disk: Config | None = None) -> dict[str, Any]:
    """`flowagg config`: every setting, its value and where it came from. With `on_disk` (what
    the file and environment say now), a running daemon's restart-only setting that differs
    also shows the value the next start will take (`atRestart`)."""
    settings: dict[str, dict[str, Any]] = {}
    for key in SETTINGS:
        item = {"value": config.values[key], "source": config.sources[key]}
        if on_disk is not None and key in RESTART_ONLY and on_disk.values[key] != item["value"]:
            item["atRestart"] = {"value": on_disk.values[key], "source": on_disk.sources[key]}
        settings[key] = item
    return {
        "configFile": str(config.config_file) if config.config_file else None,
        "settings": settings,
    }


async def bounded_flush(
    daemon: DaemonHost,
    wait_s: float = FLUSH_REPLY_WAIT_S,
    stall_grace_s: float = FLUSH_STALL_GRACE_S,
) -> dict[str, Any]:
    """A manual flush's reply: its counts, or why batches are not stored yet."""
    assert daemon.pipeline is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    flush = asyncio.ensure_future(daemon.pipeline.flush("manual"))
    flusher = daemon.pipeline.flusher
    stalled: str | None = None
    while True:
        try:
            return {"ok": True, **(await asyncio.wait_for(asyncio.shield(flush), FLUSH_POLL_S))}
        except TimeoutError:
            pass
        waited = loop.time() - started
        stalled = flusher.stalled_error if flusher is not None else None
        if (stalled and waited >= stall_grace_s) or waited >= wait_s:
            break
    if stalled and f"[Errno {errno.ENOSPC}]" in stalled:
        reason = f"disk_full: {stalled}; free space on {daemon.layout.root}"
    elif stalled:
        reason = f"batches cannot be stored: {stalled}; see logs/aggregation.log"
    else:
        reason = f"the flush is still running after {wait_s:g} s; it goes on: see `flowagg status`"
    return {"ok": False, "error": reason}


def daemon_status(daemon: DaemonHost) -> dict[str, Any]:
    """`status --json` (SPEC §8): counters, buffer, queues, sink."""
    assert daemon.pipeline is not None
    spool = daemon.spool
    queue = {
        "buffered": daemon.pipeline.aggregator.unflushed_entries,
        "failed": count_files(daemon.layout.recovery, ".failed.json"),
        "abandoned": count_files(daemon.layout.abandoned, ".abandoned.json"),
        "errors": count_files(daemon.layout.errors, ".reason.json"),
        # Quarantined files removed to keep errors/ within maxErrorFiles.
        "errorsRotated": spool.errors_rotated if spool else 0,
        "inbox": count_files(daemon.layout.inbox, (".json", ".jsonl")),
    }
    return {
        "pid": os.getpid(),
        "version": __version__,
        "root": str(daemon.layout.root),
        "uptimeS": round(daemon.clock.monotonic() - daemon.started_mono, 3),
        **daemon.pipeline.status(),
        "spool": {
            "filesIngested": spool.files_ingested if spool else 0,
            "filesQuarantined": spool.files_quarantined if spool else 0,
            "entriesRejected": spool.entries_rejected if spool else 0,
            "errorsRotated": spool.errors_rotated if spool else 0,
        },
        "socket": {
            "requests": daemon.server.requests if daemon.server else 0,
            "badRequests": daemon.server.bad_requests if daemon.server else 0,
            "tooManyEntries": daemon.server.too_many_entries if daemon.server else 0,
            "connections": daemon.server.connections if daemon.server else 0,
            "refusedConnections": daemon.server.refused_connections if daemon.server else 0,
            "refusedPeers": daemon.server.refused_peers if daemon.server else 0,
            "recreated": daemon.socket_recreated,
        },
        "lastReload": daemon.last_reload,
        "rateLimit": daemon.limiter.status(),
        "metrics": daemon.metrics.status(),
        "failed": queue["failed"],
        "abandoned": queue["abandoned"],
        "errors": queue["errors"],
        "queue": queue,
        "recovery": {
            "runs": daemon.recovery.runs,
            **daemon.recovery.totals,
            "paused": daemon.recovery.pause.snapshot(),
        },
        "sink": (
            {**daemon.sink.snapshot(), "lagMs": undelivered_lag_ms(daemon.layout, daemon.clock)}
            if daemon.sink
            else None
        ),
    }
