from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowagg.core.layout import Layout
from tests import scheduling
from tests.accounts import accounts, shared_root  # noqa: F401  (fixtures shared by modules)
from tests.harness import DaemonProc
from tests.pgserver import PgServer, pg_server, unavailable_reason


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    errors = scheduling.misplaced(items)
    if errors:
        raise pytest.UsageError("\n".join(errors))
    # Only an xdist worker's order matters: the controller hands out units in that order.
    if hasattr(config, "workerinput"):
        scheduling.longest_first(items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadfile":
        return None
    return scheduling.make_scheduler(config, log)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """A prepared data root's layout, for tests that drive one stage without a daemon."""
    layout = Layout(tmp_path / "data")
    layout.prepare()
    return layout


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


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgServer]:
    """One throwaway PostgreSQL cluster for the session; each test takes its own database."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"PostgreSQL sink tests need a local server: {reason}")
    with pg_server() as server:
        yield server


@pytest.fixture
def pg(pg_cluster: PgServer) -> Iterator[PgServer]:
    """The session's cluster, started again if a test stopped it."""
    yield pg_cluster
    if not pg_cluster.running():
        pg_cluster.start()
