"""Times and durations as a person reads them: ISO 8601 UTC, and h:mm:ss (SPEC §8)."""

from __future__ import annotations

import datetime
from typing import Any


def iso_ms(ms: Any) -> str:
    """Epoch milliseconds as ISO 8601 UTC; what is not an integer is 'an unknown time'."""
    if not isinstance(ms, int) or isinstance(ms, bool):
        return "an unknown time"
    try:
        moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms since the epoch"
    return moment.isoformat(timespec="milliseconds")


def hms(seconds: float) -> str:
    """A duration as h:mm:ss (hours unbounded), rounded to the second."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
