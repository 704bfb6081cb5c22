"""SIGHUP and `flowagg reload`: which settings a running daemon takes over."""

from __future__ import annotations

from flowagg.core.config import Config
from flowagg.core.config_schema import SETTINGS

# Settings fixed by what the daemon built at start (paths, the socket, log handlers).
RESTART_ONLY = (
    "root",
    "runDir",
    "maxRequestBytes",
    "maxRequestEntries",
    "maxConnections",
    "logMaxBytes",
    "logBackups",
    "socketGroup",
    "batchCompression",
    # The dedupe index is laid out in generations one window long, its filters sized by
    # dedupeMaxIds: both are fixed when it opens (a start rebuilds it for new values).
    "dedupeWindowMs",
    "dedupeMaxIds",
    "flushWriters",
    "metricsListen",
    "metricsAllowRemote",
    "metricsTextfile",
    "metricsTextfileIntervalMs",
)


def merge_reload(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """(config to run with, keys changed now, changed keys that wait for the next start)."""
    changed = [k for k in SETTINGS if new.values[k] != old.values[k]]
    restart = [k for k in changed if k in RESTART_ONLY]
    values = {k: (old.values[k] if k in RESTART_ONLY else new.values[k]) for k in SETTINGS}
    sources = {k: (old.sources[k] if k in RESTART_ONLY else new.sources[k]) for k in SETTINGS}
    merged = Config(values=values, sources=sources, config_file=new.config_file)
    return merged, [k for k in changed if k not in restart], restart
