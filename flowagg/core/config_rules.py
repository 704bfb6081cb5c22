"""Rules across settings: a value that is fine alone but not with the others it goes with.

Apart from config_values, which sees one key at a time; these run once every source is merged.
"""

from __future__ import annotations

import ipaddress
import shlex
import urllib.parse
from typing import Any

from flowagg.core.config_values import parse_listen
from flowagg.core.errors import ConfigError
from flowagg.core.masking import redact_url


def check_metrics(values: dict[str, Any], sources: dict[str, str]) -> None:
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


def check_sink(values: dict[str, Any], sources: dict[str, str]) -> None:
    kind = values["sinkType"]
    if kind == "http":
        _check_url(values["sinkUrl"], sources["sinkUrl"])
    if kind == "postgres":
        from flowagg.core.pg_settings import check_dsn, check_table

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
