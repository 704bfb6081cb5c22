"""Times and durations as a person reads them: ISO 8601 UTC, and h:mm:ss (SPEC §8)."""

from __future__ import annotations

import datetime
from typing import Any


def utc_moment(seconds: float) -> datetime.datetime | None:
    """Epoch seconds as a UTC datetime; None where no date can show it (before the year 1,
    after 9999, not finite): times read back from files may be anything."""
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return None


def iso_ms(ms: Any) -> str:
    """Epoch milliseconds as ISO 8601 UTC; what is not an integer is 'an unknown time'."""
    if not isinstance(ms, int) or isinstance(ms, bool):
        return "an unknown time"
    moment = utc_moment(ms / 1000)
    if moment is None:
        return f"{ms} ms since the epoch"
    return moment.isoformat(timespec="milliseconds")


def hms(seconds: float) -> str:
    """A duration as h:mm:ss (hours unbounded), rounded to the second."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
