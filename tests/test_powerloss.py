from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lazyfs import LazyFS, LazyFSUnavailable, ensure_lazyfs
from tests.powerloss import run_powerloss

# SPEC §12's power-loss test; raise it locally with POWERLOSS_CUTS or use
# `scripts/torture --power-loss --cuts N`.
CUTS = int(os.environ.get("POWERLOSS_CUTS", "60"))


@pytest.fixture
def lazyfs(tmp_path: Path) -> Iterator[LazyFS]:
    try:
        binary = ensure_lazyfs()
    except LazyFSUnavailable as exc:
        pytest.skip(str(exc))
    with LazyFS(binary, tmp_path / "mnt", tmp_path / "lower", tmp_path / "lazyfs") as fs:
        yield fs


def test_power_cuts_lose_and_duplicate_nothing(lazyfs: LazyFS, tmp_path: Path) -> None:
    # The socket cannot be bound on FUSE, so runDir stays on the ordinary tmp dir.
    result = run_powerloss(lazyfs, tmp_path / "run", cuts=CUTS, seed=20261126)
    assert result.acknowledged > 0
    assert result.torn == [], result.summary()
    assert result.lost == [], result.summary()
    assert result.duplicated == [], result.summary()
    assert result.unexpected == [], result.summary()
    assert result.stored == result.acknowledged
