"""Durations a person writes: '7d', '12h', '30m', '45s', '500ms'."""

from __future__ import annotations

import re

from flowagg.core.errors import FlowaggError

_DURATION_RE = re.compile(r"(\d+)(ms|s|m|h|d|w)?")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration_ms(text: str) -> int:
    """'7d', '12h', '30m', '45s', '500ms' or plain milliseconds."""
    match = _DURATION_RE.fullmatch(text.strip())
    if not match:
        raise FlowaggError(
            f"duration {text!r} is not understood; write e.g. 7d, 12h, 30m, 45s or 500ms", 2
        )
    return int(match.group(1)) * _UNIT_MS[match.group(2) or "ms"]
