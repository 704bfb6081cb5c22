"""Power cuts survived: a hook for the LazyFS runner that tests/powerloss.py will provide.

The runner is expected to look like tests/torture.py's: `run_power_loss(root, *, cuts, seed)`
returning a result with `cuts`, `ok` (stored == acknowledged, no duplicates) and `summary()`.
Without it the row says the figure was not run; nothing is faked.
"""

from __future__ import annotations

import importlib
import sys
from typing import Protocol

from .common import REPO, Bench

RUNNER = "run_power_loss"
SEED = 20261126
NOT_RUN = "not run (no LazyFS power-loss runner in this tree)"


class PowerLossResult(Protocol):
    cuts: int
    ok: bool

    def summary(self) -> str: ...


def power_cuts(b: Bench) -> None:
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # appended: the benchmark's own modules keep precedence
    try:
        module = importlib.import_module("tests.powerloss")
    except ModuleNotFoundError as exc:
        if exc.name not in ("tests", "tests.powerloss"):
            raise  # the runner exists but misses something: an error, not "not run"
        module = None
    runner = getattr(module, RUNNER, None)
    if runner is None:
        b.notes["powerloss"] = NOT_RUN
        b.progress(f"  {NOT_RUN}")
        return
    result: PowerLossResult = runner(b.fresh_dir("powerloss"), cuts=b.sizes.power_cuts, seed=SEED)
    b.notes["powerloss"] = result.summary()
    b.record("power.cuts", result.cuts)
    b.record("power.ok", float(result.ok))
    b.progress(f"  {result.summary()}")
