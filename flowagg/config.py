"""Configuration: defaults < TOML file < FLOWAGG_* environment < command-line flags (SPEC §9).

Every value remembers where it came from, so `flowagg config` can show it. Unknown keys and
out-of-range values are refused with the key named.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Setting:
    default: Any
    kind: type
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""


DAY_MS = 86_400_000

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
    "maxConnections": Setting(256, int, 1, 100_000, "socket connections open at once"),
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
    "spoolRescanMs": Setting(2_000, int, 10, DAY_MS, "inbox rescan interval (events can be lost)"),
    "journalSegmentBytes": Setting(64 << 20, int, 4096, 1 << 34, "journal segment size"),
    "logMaxBytes": Setting(10 << 20, int, 4096, 1 << 34, "log size before rotation"),
    "logBackups": Setting(5, int, 0, 1000, "rotated logs kept"),
    "logLevel": Setting("INFO", str, help="DEBUG, INFO, WARNING or ERROR"),
    "sinkType": Setting("none", str, help="none, http or command (forward every batch)"),
    "sinkUrl": Setting("", str, help="http sink: URL the batch JSON is POSTed to"),
    "sinkCommand": Setting("", str, help="command sink: program and arguments (shell words)"),
    "sinkTimeoutMs": Setting(10_000, int, 1, 3_600_000, "sink call timeout"),
    "breakerFailures": Setting(5, int, 1, 1_000_000, "consecutive sink failures that open"),
    "breakerCooldownMs": Setting(30_000, int, 1, DAY_MS, "open breaker's wait before a trial"),
}

SINK_TYPES = ("none", "http", "command")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def env_name(key: str) -> str:
    return "FLOWAGG_" + re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()


@dataclasses.dataclass(frozen=True)
class Config:
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    config_file: Path | None

    def __getattr__(self, name: str) -> Any:
        key = _snake_to_camel(name)
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def root_path(self) -> Path:
        return Path(self.values["root"]).expanduser().absolute()

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)


@functools.cache
def _snake_to_camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _coerce(key: str, raw: Any, origin: str) -> Any:
    setting = SETTINGS[key]
    value: Any
    if setting.kind is int:
        if isinstance(raw, str):
            try:
                raw = int(raw.replace("_", ""))
            except ValueError:
                raise ConfigError(
                    f"{key} ({origin}): must be an integer, got {raw!r}; fix the value"
                ) from None
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{key} ({origin}): must be an integer, got {raw!r}; fix the value")
        value = raw
    elif setting.kind is float:
        if isinstance(raw, str):
            try:
                raw = float(raw)
            except ValueError:
                raise ConfigError(
                    f"{key} ({origin}): must be a number, got {raw!r}; fix the value"
                ) from None
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{key} ({origin}): must be a number, got {raw!r}; fix the value")
        value = float(raw)
        if not math.isfinite(value):
            raise ConfigError(f"{key} ({origin}): must be a finite number, got {raw!r}")
    else:
        if not isinstance(raw, str) or (not raw and setting.default):
            raise ConfigError(f"{key} ({origin}): must be a non-empty string, got {raw!r}")
        value = raw
    if setting.minimum is not None and value < setting.minimum:
        raise ConfigError(
            f"{key} ({origin}): {value} is below the minimum {setting.minimum:g}; raise it"
        )
    if setting.maximum is not None and value > setting.maximum:
        raise ConfigError(
            f"{key} ({origin}): {value} is above the maximum {setting.maximum:g}; lower it"
        )
    if key == "logLevel" and value.upper() not in LOG_LEVELS:
        raise ConfigError(f"logLevel ({origin}): must be one of {', '.join(LOG_LEVELS)}")
    if key == "sinkType" and value not in SINK_TYPES:
        raise ConfigError(f"sinkType ({origin}): must be one of {', '.join(SINK_TYPES)}")
    return value


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; create it or drop --config"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}; fix the syntax") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    for key in data:
        if key not in SETTINGS:
            raise ConfigError(f"config file {path}: unknown key {key!r}; {_suggest(key)}")
    return data


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, SETTINGS, n=1)
    return f"did you mean {close[0]!r}?" if close else "see `flowagg config` for the known keys"


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective config. `flags` holds only the options given on the command line."""
    env = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values: dict[str, Any] = {k: s.default for k, s in SETTINGS.items()}
    sources: dict[str, str] = dict.fromkeys(SETTINGS, "default")

    known_env = {env_name(k) for k in SETTINGS} | {"FLOWAGG_CONFIG"}
    for key in env:
        if key.startswith("FLOWAGG_") and key not in known_env:
            raise ConfigError(
                f"environment variable {key} is not a flowagg setting; unset it or fix the name"
            )

    # The root decides where the default config file lives, so resolve it first.
    root_guess = flags.get("root") or env.get("FLOWAGG_ROOT")
    file_path: Path | None = None
    if config_path:
        file_path = Path(config_path)
    elif env.get("FLOWAGG_CONFIG"):
        file_path = Path(env["FLOWAGG_CONFIG"])
    else:
        candidate = Path(root_guess or SETTINGS["root"].default) / "flowagg.toml"
        if candidate.is_file():
            file_path = candidate

    if file_path is not None:
        for key, raw in read_toml(file_path).items():
            values[key] = _coerce(key, raw, f"file {file_path}")
            sources[key] = f"file {file_path}"
    for key in SETTINGS:
        name = env_name(key)
        if name in env:
            values[key] = _coerce(key, env[name], f"env {name}")
            sources[key] = f"env {name}"
    for key, raw in flags.items():
        if key not in SETTINGS:
            raise ConfigError(f"unknown setting {key!r}; {_suggest(key)}")
        values[key] = _coerce(key, raw, "flag")
        sources[key] = "flag"
    values["logLevel"] = values["logLevel"].upper()
    _check_sink(values, sources)
    return Config(values=values, sources=sources, config_file=file_path)


def _check_sink(values: dict[str, Any], sources: dict[str, str]) -> None:
    kind = values["sinkType"]
    if kind == "http" and not re.match(r"https?://", values["sinkUrl"]):
        raise ConfigError(
            f"sinkUrl ({sources['sinkUrl']}): sinkType is http, so sinkUrl must be an"
            f" http:// or https:// URL, got {values['sinkUrl']!r}"
        )
    if kind == "command":
        try:
            words = shlex.split(values["sinkCommand"])
        except ValueError as exc:
            raise ConfigError(f"sinkCommand ({sources['sinkCommand']}): {exc}") from None
        if not words:
            raise ConfigError(
                f"sinkCommand ({sources['sinkCommand']}): sinkType is command, so sinkCommand"
                " must name a program"
            )
