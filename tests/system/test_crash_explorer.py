"""Crash states (SPEC §12): for every workload of the explorer, the crash states that matter
most (names left unsynced by a killed run, names lost out of order, most names lost) are each
checked by a real daemon start. `scripts/torture --crash-states` checks all of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.crashmodel.explore import Recordings, explore
from tests.crashmodel.workloads import WORKLOADS

# States checked per workload, and per kill point of a start-up workload: a check starts and
# stops a daemon (0.7 s, more on a loaded machine), so all stay under two minutes on two cores.
BUDGET = 3


@pytest.fixture(scope="session")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Recordings:
    return Recordings(tmp_path_factory.mktemp("crash-recordings"))


@pytest.mark.parametrize("workload", [w.name for w in WORKLOADS if w.in_ci])
def test_crash_states_keep_every_acknowledged_entry_once(
    workload: str, recordings: Recordings, tmp_path: Path
) -> None:
    (summary,) = explore(tmp_path, BUDGET, names=[workload], recordings=recordings)
    assert summary.checked, summary.line()
    findings = [f"{f.verdict.summary()} at {f.where}" for f in summary.findings]
    assert not findings, summary.line() + "\n" + "\n".join(findings)
