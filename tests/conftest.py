from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DaemonProc


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def daemons() -> Iterator[list[DaemonProc]]:
    """Daemons a test starts; any still running at the end are killed."""
    procs: list[DaemonProc] = []
    yield procs
    for proc in procs:
        if proc.proc.poll() is None:
            proc.kill()
