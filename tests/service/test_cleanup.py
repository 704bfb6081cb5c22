"""Cleanup: what goes (old snapshots, rotated logs, stale temps, batches past retention)
and what never does (abandoned batches, quarantined files, live logs, fresh files)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest

from flowagg.core.durations import parse_duration_ms
from flowagg.core.errors import FlowaggError
from flowagg.core.fsutil import TEMP_MARK
from flowagg.core.layout import Layout
from flowagg.service.cleanup import apply_cleanup, plan_cleanup
from tests.harness import cli

DAY = 86_400_000


def put(path: Path, text: str = "{}", age_ms: int = 0) -> None:
    path.write_text(text)
    when = time.time() - age_ms / 1000
    os.utime(path, (when, when))


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "data")
    layout.prepare()
    now = time.time_ns() // 1_000_000
    put(layout.health / f"health-{now - 8 * DAY}.json")
    put(layout.health / f"health-{now - 1 * DAY}.json")
    put(layout.health / "latest.json", age_ms=30 * DAY)
    put(layout.logs / "aggregation.log", "live log", age_ms=9 * DAY)
    put(layout.logs / "aggregation.log.1", "rotated", age_ms=8 * DAY)
    put(layout.logs / "recovery.log.2", "recent rotated")
    put(layout.aggregated / f"{TEMP_MARK}batch_x.json.1", "half", age_ms=2 * 3_600_000)
    put(layout.aggregated / f"{TEMP_MARK}batch_y.json.1", "in progress")
    put(layout.aggregated / f"batch_{now - 30 * DAY}_000000000001.json", age_ms=30 * DAY)
    put(layout.aggregated / f"batch_{now - DAY}_000000000002.json", age_ms=DAY)
    # Arrived a month ago, completed just now (recovered, or a drained backlog): kept.
    put(layout.aggregated / f"batch_{now - 30 * DAY}_000000000003.json")
    put(layout.abandoned / "old.abandoned.json", age_ms=100 * DAY)
    put(layout.errors / "bad.json", age_ms=100 * DAY)
    return layout


def names(layout: Layout, retain: int = 0) -> set[str]:
    now = time.time_ns() // 1_000_000
    plan = plan_cleanup(layout, now, age_ms=7 * DAY, retain_batches_ms=retain)
    return {item.path.name for item in plan}


def test_plan_without_batch_retention(layout: Layout) -> None:
    oldest_snapshot = sorted(p.name for p in layout.health.glob("health-*.json"))[0]
    assert names(layout) == {
        oldest_snapshot,
        "aggregation.log.1",
        f"{TEMP_MARK}batch_x.json.1",
    }


def test_batches_go_only_with_retention(layout: Layout) -> None:
    got = names(layout, retain=7 * DAY)
    batches = {n for n in got if n.startswith("batch_")}
    assert len(batches) == 1 and batches.pop().endswith("_000000000001.json")
    assert not any(n.endswith(".abandoned.json") or n == "bad.json" for n in got)


def test_apply_removes_and_counts_bytes(layout: Layout) -> None:
    now = time.time_ns() // 1_000_000
    plan = plan_cleanup(layout, now, age_ms=7 * DAY, retain_batches_ms=0)
    freed = apply_cleanup(plan)
    assert freed == sum(item.size for item in plan) > 0
    assert all(not item.path.exists() for item in plan)
    assert (layout.abandoned / "old.abandoned.json").exists()
    assert (layout.errors / "bad.json").exists()
    assert (layout.logs / "aggregation.log").exists()


def test_cleanup_command_dry_run_then_real(layout: Layout) -> None:
    dry = cli(layout.root, "cleanup", "--age", "7d", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = orjson.loads(dry.stdout)
    assert report["dryRun"] is True and len(report["removed"]) == 3
    assert all(Path(item["path"]).exists() for item in report["removed"])
    real = cli(layout.root, "cleanup", "--age", "7d")
    assert real.returncode == 0
    assert b"removed 3 files" in real.stdout
    assert all(not Path(item["path"]).exists() for item in report["removed"])


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("7d", 7 * DAY),
        ("12h", 43_200_000),
        ("30m", 1_800_000),
        ("45s", 45_000),
        ("500ms", 500),
        ("250", 250),
        ("2w", 14 * DAY),
    ],
)
def test_durations(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


def test_bad_duration_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(FlowaggError):
        parse_duration_ms("seven days")
    proc = cli(tmp_path / "data", "cleanup", "--age", "soon")
    assert proc.returncode == 2 and b"7d" in proc.stderr
