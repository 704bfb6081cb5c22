"""The settings flowagg knows (SPEC §9): each one's name, type, default, range and help.

Apart from loading and checking so that every module can read the schema (defaults, limits,
environment variable names) without pulling in how a config is assembled.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from flowagg.core.redact import DEFAULT_KEYS


@dataclasses.dataclass(frozen=True)
class Setting:
    default: Any
    kind: type
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""
    # For a setting where 0 means off: the smallest value it may take otherwise. A rate of
    # 1e-300 entries per second asks for waits no reply can carry.
    smallest_on: float | None = None


DAY_MS = 86_400_000
# One entry per 1000 s: the slowest rate limit whose retryAfterMs stays a plain number.
MIN_RATE = 0.001

SETTINGS: dict[str, Setting] = {
    "root": Setting("data", str, help="data root"),
    "runDir": Setting("", str, help="socket, pid and lock folder (empty: <root>/run)"),
    "batchSize": Setting(50, int, 1, 1_000_000, "entries per batch (size trigger)"),
    "maxAgeMs": Setting(30_000, int, 1, 7 * DAY_MS, "oldest entry's wait before an age flush"),
    "flushThreshold": Setting(0.9, float, 0.01, 1.0, "fraction of maxBatchBytes that flushes"),
    "maxBatchBytes": Setting(65_536, int, 1024, 1 << 30, "bytes of entries per batch"),
    "maxEntryBytes": Setting(65_536, int, 64, 16 << 20, "largest entry, as compact JSON"),
    "maxRequestBytes": Setting(16 << 20, int, 1024, 1 << 30, "largest socket request line"),
    "maxRequestEntries": Setting(
        10_000, int, 1, 10_000_000, "entries in one socket request; more are refused"
    ),
    "maxConnections": Setting(
        256, int, 1, 100_000, "socket connections open at once (root and the daemon's user apart)"
    ),
    "maxConnectionsPerUid": Setting(
        32, int, 1, 100_000, "socket connections one other uid may hold open at once"
    ),
    "maxPendingBytesPerUid": Setting(
        64 << 20, int, 1024, 1 << 40, "unanswered socket request bytes one other uid may hold"
    ),
    "partialRequestTimeoutMs": Setting(
        10_000, int, 100, 3_600_000, "a socket request line must end this long after it starts"
    ),
    "shutdownTimeoutMs": Setting(
        30_000, int, 100, 3_600_000, "SIGTERM exits within this; the rest stays journaled"
    ),
    "maxBufferedEntries": Setting(
        1_000_000, int, 1, 1 << 40, "unflushed entries before add answers busy"
    ),
    "maxBufferedBytes": Setting(
        1 << 30, int, 1024, 1 << 50, "unflushed entry bytes before add answers busy"
    ),
    "memoryWindowEntries": Setting(
        20_000, int, 1, 10_000_000, "unflushed entries held in memory; the rest wait on disk"
    ),
    "dedupeWindowMs": Setting(DAY_MS, int, 0, 365 * DAY_MS, "how long entryIds are remembered"),
    "dedupeMaxIds": Setting(
        10_000_000, int, 1000, 1_000_000_000, "client entryIds per window the filter is sized for"
    ),
    "busyRetryAfterMs": Setting(200, int, 1, 600_000, "retryAfterMs sent with busy"),
    "immediateRetries": Setting(3, int, 0, 10, "inline attempts before a batch fails"),
    "retryBaseMs": Setting(1_000, int, 1, DAY_MS, "first recovery retry delay"),
    "retryMaxDelayMs": Setting(300_000, int, 1, 7 * DAY_MS, "cap on a recovery retry delay"),
    "batchRetryLimit": Setting(5, int, 0, 1000, "failed retries before a batch is abandoned"),
    "scheduleIntervalMs": Setting(300_000, int, 100, DAY_MS, "recovery loop interval"),
    "healthCheckIntervalMs": Setting(60_000, int, 100, DAY_MS, "health snapshot interval"),
    "cleanupAgeMs": Setting(7 * DAY_MS, int, 1000, 3650 * DAY_MS, "age of removable files"),
    "retainBatchesMs": Setting(
        0, int, 0, 36500 * DAY_MS, "delete completed batches older than this (0 keeps them)"
    ),
    "exportRunEntries": Setting(
        50_000, int, 1000, 10_000_000, "entries export sorts in memory before spilling a run"
    ),
    "spoolRescanMs": Setting(2_000, int, 10, DAY_MS, "inbox rescan interval (events can be lost)"),
    "maxErrorFiles": Setting(
        1000, int, 0, 100_000_000, "files kept in recovery/errors/; oldest go first (0: all)"
    ),
    "journalSegmentBytes": Setting(64 << 20, int, 4096, 1 << 34, "journal segment size"),
    "logMaxBytes": Setting(10 << 20, int, 4096, 1 << 34, "log size before rotation"),
    "logBackups": Setting(5, int, 0, 1000, "rotated logs kept"),
    "logLevel": Setting("INFO", str, help="DEBUG, INFO, WARNING or ERROR"),
    "flushWriters": Setting(
        4, int, 1, 64, "batch files written side by side when batches queue up"
    ),
    "batchCompression": Setting(
        "none", str, help="none, gzip or zstd: batch files as .json, .json.gz or .json.zst"
    ),
    "sinkType": Setting("none", str, help="none, http, command or postgres (forward every batch)"),
    "sinkUrl": Setting("", str, help="http sink: URL the batch JSON is POSTed to"),
    "sinkCommand": Setting("", str, help="command sink: program and arguments (shell words)"),
    "sinkDsn": Setting(
        "", str, help="postgres sink: libpq conninfo or URL, no password (use PGPASSFILE)"
    ),
    "sinkTable": Setting("flowagg_entries", str, help="postgres sink: table (or schema.table)"),
    "sinkTimeoutMs": Setting(10_000, int, 1, 3_600_000, "sink call timeout"),
    "sinkConnections": Setting(
        4, int, 1, 32, "postgres sink: batches delivered at once, each on its own connection"
    ),
    "breakerFailures": Setting(5, int, 1, 1_000_000, "consecutive sink failures that open"),
    "breakerCooldownMs": Setting(30_000, int, 1, DAY_MS, "open breaker's wait before a trial"),
    "socketGroup": Setting(
        "", str, help="group (name or gid) that may use the socket and inbox/ (empty: owner only)"
    ),
    "allowedUids": Setting(
        (), tuple, help="uids the socket serves besides the daemon's own (empty: any that reach it)"
    ),
    "redactKeys": Setting(
        DEFAULT_KEYS, list, help="metadata keys (normalized, by substring) whose values are hidden"
    ),
    "redactPatterns": Setting(
        (), list, help="regular expressions redacted inside metadata string values"
    ),
    "rateLimitPerUser": Setting(
        0.0, float, 0, 1e9, "entries per second per userId (0: no limit)", MIN_RATE
    ),
    "rateLimitPerConnection": Setting(
        0.0,
        float,
        0,
        1e9,
        "entries per second per client process, uid and pid (0: no limit)",
        MIN_RATE,
    ),
    "rateLimitPerUid": Setting(
        0.0,
        float,
        0,
        1e9,
        "entries per second per peer uid, all its processes (0: no limit)",
        MIN_RATE,
    ),
    "rateLimitBurst": Setting(1000, int, 1, 1 << 40, "entries a rate limit lets through at once"),
    "rateLimitUsers": Setting(
        10_000, int, 1, 10_000_000, "userIds whose buckets are remembered (least recent go)"
    ),
    "metricsListen": Setting("", str, help="host:port serving /metrics over HTTP (empty: off)"),
    "metricsAllowRemote": Setting(
        False, bool, help="let metricsListen bind an address other hosts reach (no auth)"
    ),
    "metricsTextfile": Setting(
        "", str, help=".prom file rewritten for node_exporter's textfile collector (empty: off)"
    ),
    "metricsTextfileIntervalMs": Setting(
        15_000, int, 100, DAY_MS, "how often metricsTextfile is rewritten"
    ),
}

SINK_TYPES = ("none", "http", "command", "postgres")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def env_name(key: str) -> str:
    return "FLOWAGG_" + re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()
