"""Crash states (SPEC §12): a bounded sample of every workload's crash states, each checked
by a real daemon start. `scripts/torture --crash-states` checks all of them."""

from __future__ import annotations

from pathlib import Path

from tests.crashmodel.explore import explore

# States checked per workload: about 0.6 s each, so the whole test stays under two minutes.
BUDGET = 10


def test_sampled_crash_states_keep_every_acknowledged_entry_once(tmp_path: Path) -> None:
    summaries = explore(tmp_path, BUDGET)
    assert all(s.checked for s in summaries)
    findings = [
        f"{f.workload}: {f.verdict.summary()} at {f.where}" for s in summaries for f in s.findings
    ]
    assert not findings, "\n".join(findings)
