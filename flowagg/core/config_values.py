"""One setting's value, from text or TOML, checked against its schema entry.

Apart from the loader because this is per key: the type, the range and what a value must name
(a log level, a compression, a group, a listen address); rules across keys are in config_rules.
"""

from __future__ import annotations

import grp
import math
import re
from typing import Any

from flowagg.core.compression import COMPRESSIONS, zstd_module
from flowagg.core.config_schema import LOG_LEVELS, SETTINGS, SINK_TYPES
from flowagg.core.errors import ConfigError
from flowagg.core.redact import compile_patterns


def coerce(key: str, raw: Any, origin: str) -> Any:
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
