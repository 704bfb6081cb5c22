"""Configuration: defaults < TOML file < FLOWAGG_* environment < command-line flags (SPEC §9).

Every value remembers where it came from, so `flowagg config` can show it. Unknown keys and
out-of-range values are refused with the key named.
"""

from __future__ import annotations

import dataclasses
import functools
import grp
import ipaddress
import math
import os
import re
import shlex
import shutil
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .compression import COMPRESSIONS, zstd_module
from .errors import ConfigError
from .masking import redact_url
from .redact import DEFAULT_KEYS, compile_patterns


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


@dataclasses.dataclass(frozen=True)
class Config:
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    config_file: Path | None
    # `root` as the file says it, when a flag or the environment chose another.
    file_root: str | None = None

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
    """Check one value. Only environment variables and flags are text, so only they are parsed:
    a TOML file has types, and `batchSize = "7"` there is a mistake to point out."""
    setting = SETTINGS[key]
    value: Any
    from_file = origin.startswith("file ")
    if from_file and isinstance(raw, str) and setting.kind in (int, float, tuple, list, bool):
        kind = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            tuple: "an array of integers",
            list: "an array of strings",
        }[setting.kind]
        raise ConfigError(
            f"{key} ({origin}): must be {kind}, got the string {raw!r}; drop the quotes"
        )
    if key == "socketGroup" and from_file and isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)  # a gid
    if setting.kind is bool:
        value = _bool(key, raw, origin)
    elif setting.kind is tuple:
        value = _uid_list(key, raw, origin)
    elif setting.kind is list:
        value = _str_list(key, raw, origin)
    elif setting.kind is int:
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
    if setting.smallest_on is not None and 0 < value < setting.smallest_on:
        raise ConfigError(
            f"{key} ({origin}): {value:g} is below the smallest rate {setting.smallest_on:g};"
            " raise it, or set 0 for no limit"
        )
    if setting.maximum is not None and value > setting.maximum:
        raise ConfigError(
            f"{key} ({origin}): {value} is above the maximum {setting.maximum:g}; lower it"
        )
    if key == "logLevel" and value.upper() not in LOG_LEVELS:
        raise ConfigError(f"logLevel ({origin}): must be one of {', '.join(LOG_LEVELS)}")
    if key == "batchCompression":
        if value not in COMPRESSIONS:
            raise ConfigError(
                f"batchCompression ({origin}): must be one of {', '.join(COMPRESSIONS)}"
            )
        if value == "zstd":
            zstd_module()
    if key == "sinkType" and value not in SINK_TYPES:
        raise ConfigError(f"sinkType ({origin}): must be one of {', '.join(SINK_TYPES)}")
    if key == "socketGroup" and value:
        resolve_group(value, origin)
    if key == "redactPatterns":
        compile_patterns(value, origin)
    if key == "metricsListen" and value:
        parse_listen(value, origin)
    return value


def parse_listen(value: str, origin: str = "metricsListen") -> tuple[str, int]:
    """`host:port` (`[::1]:9464` for IPv6); port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"metricsListen ({origin}): must be host:port such as 127.0.0.1:9464, got {value!r}"
        )
    return host, int(port)


def _bool(key: str, raw: Any, origin: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if isinstance(raw, str) and raw.strip().lower() in words:
        return words[raw.strip().lower()]
    if not isinstance(raw, bool):
        raise ConfigError(f"{key} ({origin}): must be true or false, got {raw!r}; fix the value")
    return raw


def _check_metrics(values: dict[str, Any], sources: dict[str, str]) -> None:
    """/metrics has no authentication: an address other hosts reach must be asked for."""
    if not values["metricsListen"] or values["metricsAllowRemote"]:
        return
    host, _ = parse_listen(values["metricsListen"], sources["metricsListen"])
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: only localhost is known not to leave the machine
        loopback = host.lower() == "localhost"
    if not loopback:
        raise ConfigError(
            f"metricsListen ({sources['metricsListen']}): {host} is not a loopback address and"
            " /metrics has no authentication; listen on 127.0.0.1 or [::1], or set"
            " metricsAllowRemote = true to serve other hosts"
        )


def _str_list(key: str, raw: Any, origin: str) -> tuple[str, ...]:
    """A TOML array of strings; from the environment or a flag a JSON array, or words
    separated by commas (a regular expression with a comma needs the JSON form)."""
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            import json

            try:
                raw = json.loads(text)
            except ValueError:
                raise ConfigError(
                    f"{key} ({origin}): {raw!r} is not a JSON array of strings; fix the value"
                ) from None
        else:
            raw = [word.strip() for word in text.split(",") if word.strip()]
    if not isinstance(raw, list | tuple) or not all(isinstance(s, str) and s for s in raw):
        raise ConfigError(f"{key} ({origin}): must be an array of non-empty strings, got {raw!r}")
    return tuple(raw)


def _uid_list(key: str, raw: Any, origin: str) -> tuple[int, ...]:
    if isinstance(raw, str):  # environment or flag: "1000,1001"
        try:
            raw = [int(word) for word in re.split(r"[\s,]+", raw.strip()) if word]
        except ValueError:
            raise ConfigError(
                f"{key} ({origin}): must be uids separated by commas, got {raw!r}; fix the value"
            ) from None
    if not isinstance(raw, list | tuple) or not all(
        isinstance(uid, int) and not isinstance(uid, bool) and uid >= 0 for uid in raw
    ):
        raise ConfigError(
            f"{key} ({origin}): must be an array of uids (integers >= 0), got {raw!r}"
        )
    return tuple(raw)


def resolve_group(value: str, origin: str = "socketGroup") -> int:
    """The gid of a group name or number; a group this machine does not know is refused."""
    try:
        return grp.getgrgid(int(value)).gr_gid if value.isdigit() else grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(
            f"socketGroup ({origin}): no group {value!r} on this machine; create it"
            f" (`groupadd {value}`) or fix the name"
        ) from None


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def read_toml(path: Path) -> dict[str, Any]:
    data = _parse_toml(path)
    for key in data:
        if key not in SETTINGS:
            raise _unknown_key(path, key)
    return data


def _unknown_key(path: Path, key: str) -> ConfigError:
    return ConfigError(f"config file {path}: unknown key {key!r}; {_suggest(key)}")


def _parse_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; create it or drop --config"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}; fix the syntax") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 (byte {exc.object[exc.start]:#04x} at offset"
            f" {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    return data


def _suggest(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, SETTINGS, n=1)
    return f"did you mean {close[0]!r}?" if close else "see `flowagg config` for the known keys"


def _is_file(path: Path) -> bool:
    """Path.is_file, except that a folder this user may not look into has no file either."""
    try:
        return path.is_file()
    except PermissionError:
        return False


def load_client_paths(
    *,
    root: str | None,
    config_path: str | Path | None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Path, Path | None]:
    """The data root and run dir for client commands (add, status, flush, health, ...).

    Clients need only these two paths, so a mistake elsewhere in the daemon's config (an
    unknown key, a bad value, a stray byte) never stops them from handing over entries: the
    file is read leniently here, and only `root` and `runDir` are taken from it.
    """
    env = os.environ if environ is None else environ
    chosen_root = root or env.get("FLOWAGG_ROOT")
    run_dir = env.get(env_name("runDir")) or None
    file_path = config_path or env.get("FLOWAGG_CONFIG")
    if not file_path:
        candidate = Path(chosen_root or SETTINGS["root"].default) / "flowagg.toml"
        file_path = candidate if _is_file(candidate) else None
    if file_path and (chosen_root is None or run_dir is None):
        try:
            data = tomllib.loads(Path(file_path).read_bytes().decode("utf-8", "replace"))
        except (OSError, tomllib.TOMLDecodeError):
            data = {}
        if chosen_root is None and isinstance(data.get("root"), str) and data["root"]:
            chosen_root = data["root"]
        if run_dir is None and isinstance(data.get("runDir"), str) and data["runDir"]:
            run_dir = data["runDir"]
    root_path = Path(chosen_root or SETTINGS["root"].default).expanduser().absolute()
    return root_path, Path(run_dir).expanduser().absolute() if run_dir else None


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective config. `flags` holds only the options given on the command line."""
    config, errors = check_config(flags=flags, config_path=config_path, environ=environ)
    if errors:
        raise errors[0]
    assert config is not None
    return config


def check_config(
    *,
    flags: Mapping[str, Any] | None = None,
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Config | None, list[ConfigError]]:
    """The config and every mistake in it, not only the first (`flowagg config --check`).

    A key that is refused keeps its default, so the checks across keys still run on the rest.
    The config is None only when the file cannot be parsed at all.
    """
    env = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values: dict[str, Any] = {k: s.default for k, s in SETTINGS.items()}
    sources: dict[str, str] = dict.fromkeys(SETTINGS, "default")
    errors: list[ConfigError] = []

    def take(key: str, raw: Any, origin: str) -> None:
        try:
            values[key] = _coerce(key, raw, origin)
            sources[key] = origin
        except ConfigError as exc:
            errors.append(exc)

    known_env = {env_name(k) for k in SETTINGS} | {"FLOWAGG_CONFIG"}
    for key in env:
        if key.startswith("FLOWAGG_") and key not in known_env:
            errors.append(
                ConfigError(
                    f"environment variable {key} is not a flowagg setting; unset it or fix the name"
                )
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
        if _is_file(candidate):
            file_path = candidate

    file_root: str | None = None
    if file_path is not None:
        try:
            data = _parse_toml(file_path)
        except ConfigError as exc:
            return None, [*errors, exc]
        for key, raw in data.items():
            if key in SETTINGS:
                take(key, raw, f"file {file_path}")
            else:
                errors.append(_unknown_key(file_path, key))
        file_root = values["root"] if sources["root"] != "default" else None
    for key in SETTINGS:
        name = env_name(key)
        if name in env:
            take(key, env[name], f"env {name}")
    for key, raw in flags.items():
        if key in SETTINGS:
            take(key, raw, "flag")
        else:
            errors.append(ConfigError(f"unknown setting {key!r}; {_suggest(key)}"))
    values["logLevel"] = values["logLevel"].upper()
    for check in (_check_sink, _check_metrics):
        try:
            check(values, sources)
        except ConfigError as exc:
            errors.append(exc)
    config = Config(values=values, sources=sources, config_file=file_path, file_root=file_root)
    return config, errors


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but will not do what they seem to (said at start and by
    `flowagg config`): nothing here stops the daemon."""
    warnings = []
    if config.values["sinkType"] == "command":
        program = shlex.split(config.values["sinkCommand"])[0]
        if os.sep in program and shutil.which(program) is None:
            # A path is run as it is: PATH plays no part in it.
            what = "is not an executable file" if os.path.exists(program) else "does not exist"
            warnings.append(
                f"sinkCommand ({config.sources['sinkCommand']}): {program} {what}; every batch"
                " will fail until it does: install the program there or fix the path (under"
                " systemd, ProtectHome and PrivateTmp hide /home and /tmp)"
            )
        elif shutil.which(program) is None:
            warnings.append(
                f"sinkCommand ({config.sources['sinkCommand']}): program {program!r} is not found"
                f" on PATH ({os.environ.get('PATH', '')}); every batch will fail until it is:"
                " use an absolute path (under systemd, ProtectHome and PrivateTmp hide /home"
                " and /tmp)"
            )
    if config.file_root is not None:
        in_file = Path(config.file_root).expanduser().absolute()
        if in_file != config.root_path:
            warnings.append(
                f"root: the config file {config.config_file} says {in_file}, but"
                f" {config.root_path} is in use ({config.sources['root']}); make them agree"
            )
    return warnings


def _check_url(url: str, source: str) -> None:
    # The URL may carry a token: messages show it through redact_url, never as written.
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise ConfigError(
            f"sinkUrl ({source}): not a URL (a bad port, or an unclosed [ in the host); fix it"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"sinkUrl ({source}): sinkType is http, so sinkUrl must be an http:// or https://"
            f" URL with a host, got {redact_url(url)!r}"
        )


def _check_sink(values: dict[str, Any], sources: dict[str, str]) -> None:
    kind = values["sinkType"]
    if kind == "http":
        _check_url(values["sinkUrl"], sources["sinkUrl"])
    if kind == "postgres":
        from .pg_settings import check_dsn, check_table

        check_table(values["sinkTable"], sources["sinkTable"])
        check_dsn(values["sinkDsn"], sources["sinkDsn"])
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
