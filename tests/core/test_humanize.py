"""Times and durations as people read them (SPEC §8: ISO-8601; durations as h:mm:ss)."""

from __future__ import annotations

import pytest

from flowagg.core.humanize import hms, iso_ms


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0:00:00"), (134, "0:02:14"), (3599.6, "1:00:00"), (90_061, "25:01:01"), (-1, "0:00:00")],
)
def test_durations_are_h_mm_ss(seconds: float, shown: str) -> None:
    assert hms(seconds) == shown


def test_times_are_iso_utc() -> None:
    assert iso_ms(1_796_281_253_394) == "2026-12-03T07:00:53.394+00:00"
    assert iso_ms(None) == "an unknown time"
    assert iso_ms(True) == "an unknown time"
    assert iso_ms(10**20) == f"{10**20} ms since the epoch"
