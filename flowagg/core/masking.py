"""What the socket shows a peer that is neither root nor the daemon's own user (SPEC §11).

The sink settings carry credentials (a command with `Authorization: Bearer …`, a URL with a
token, a DSN), and a sink's errors may repeat them. Members of `socketGroup` see `config`,
`status` and `health` with those settings and the sink's details masked, and with every
fragment of them that looks like a credential replaced wherever else it appears.
"""

from __future__ import annotations

import re
import shlex
import urllib.parse
from typing import Any

MASK = "[MASKED]"
SECRET_SETTINGS = ("sinkUrl", "sinkCommand", "sinkDsn")
# A fragment shorter than this is not hunted down in other text: it would mask common words.
MIN_FRAGMENT = 6
# Credentials written into a command line or a URL: an auth scheme's token, or the value of
# a parameter or header whose name says secret.
_TOKENS = re.compile(
    r"(?i)\b(?:bearer|basic|token|digest)\s+([^\s'\"]+)"
    r"|(?i:pass(?:word|wd)?|secret|token|api[-_]?key|auth\w*|key|signature|sig)"
    r"[\"']?\s*[=:]\s*[\"']?(?:(?i:bearer|basic|token|digest)\s+)?([^\s&'\"]+)"
)


def token_fragments(text: str) -> list[str]:
    """The credential-looking values in a command line, a URL or a header."""
    found = [value for match in _TOKENS.finditer(text) for value in match.groups() if value]
    for word in _words(text):
        parts = urllib.parse.urlsplit(word) if "://" in word else None
        if parts is not None and parts.password:
            found.append(parts.password)
        if parts is not None and parts.query:
            found += [v for _, v in urllib.parse.parse_qsl(parts.query) if v]
    return found


def redact_url(url: str) -> str:
    """A URL as it may be shown in a message: password and query values replaced."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "(unparsable URL)"
    user = (
        f"{parts.username}:***@"
        if parts.password
        else f"{parts.username}@"
        if parts.username
        else ""
    )
    if ":" in host:
        host = f"[{host}]"
    query = "&".join(f"{k}=***" for k, _ in urllib.parse.parse_qsl(parts.query, True))
    return urllib.parse.urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, query, ""))


def secret_fragments(values: dict[str, Any]) -> list[str]:
    """Every piece of the secret-bearing settings worth hiding elsewhere, longest first."""
    from flowagg.core.pg_settings import dsn_secret_keys

    found: list[str] = []
    for key in SECRET_SETTINGS:
        value = values.get(key)
        if isinstance(value, str) and value:
            found += [value, *token_fragments(value)]
    dsn = values.get("sinkDsn")
    if isinstance(dsn, str) and dsn:
        try:
            from psycopg.conninfo import conninfo_to_dict

            params = conninfo_to_dict(dsn)
        except Exception:  # no driver, or not a DSN: the whole value is hidden anyway
            params = {}
        found += [str(params[k]) for k in dsn_secret_keys() if params.get(k)]
    unique = {f for f in found if len(f) >= MIN_FRAGMENT}
    return sorted(unique, key=len, reverse=True)


def scrub(doc: Any, fragments: list[str]) -> Any:
    """`doc` with every fragment replaced by MASK in every string, at any depth."""
    if isinstance(doc, str):
        for fragment in fragments:
            if fragment in doc:
                doc = doc.replace(fragment, MASK)
        return doc
    if isinstance(doc, dict):
        return {key: scrub(value, fragments) for key, value in doc.items()}
    if isinstance(doc, list | tuple):
        return [scrub(value, fragments) for value in doc]
    return doc


def mask_config_report(report: dict[str, Any]) -> dict[str, Any]:
    settings = {
        key: {**item, "value": MASK} if key in SECRET_SETTINGS and item["value"] else item
        for key, item in report["settings"].items()
    }
    return {**report, "settings": settings}


def mask_sink(sink: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The sink's snapshot with its target and its last error hidden: its kind and counts stay."""
    if sink is None:
        return None
    error = sink.get("lastError")
    return {**sink, "type": kind, "lastError": MASK if error else error}


def mask_report(doc: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A `status` or `health` reply for a member: sink details, reload errors and every secret
    fragment hidden. Health repeats the sink's last error in its issues: that is hidden too."""
    fragments = secret_fragments(values)
    sink = doc.get("sink")
    if isinstance(sink, dict) and isinstance(sink.get("lastError"), str):
        fragments = sorted({*fragments, sink["lastError"]}, key=len, reverse=True)
    masked = dict(doc)
    if isinstance(sink, dict):
        masked["sink"] = mask_sink(sink, values.get("sinkType", "sink"))
    reload = doc.get("lastReload")
    if isinstance(reload, dict) and reload.get("error"):
        masked["lastReload"] = {**reload, "error": MASK}
    return scrub(masked, fragments)


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()
