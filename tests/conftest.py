from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DaemonProc


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def daemons() -> list[DaemonProc]:
    """A list for the daemons a test starts (the autouse fixture below kills leftovers)."""
    return []


@pytest.fixture(autouse=True)
def _kill_leftover_daemons() -> Iterator[None]:
    # Wider-scoped fixtures start their daemons before this runs, so they are left alone.
    mark = len(DaemonProc.started)
    yield
    while len(DaemonProc.started) > mark:
        proc = DaemonProc.started.pop()
        if proc.proc.poll() is None:
            proc.kill()
