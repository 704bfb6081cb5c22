"""The suite's spread over cores (tests/scheduling.py) and LazyFS's build under a lock, which
let ./scripts/test run the suite on every core."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import filelock
import pytest

from tests import lazyfs, scheduling

TESTS = Path(__file__).resolve().parent.parent


class Item:
    """What tests/scheduling.py reads of a collected test."""

    def __init__(self, nodeid: str, *fixtures: str) -> None:
        self.nodeid = nodeid
        self.fixturenames = ["request", *fixtures]


def test_a_module_is_a_unit_and_the_accounts_modules_share_one() -> None:
    [accounts_a, accounts_b, *_] = scheduling.SERIAL_UNITS["host-accounts"]
    assert scheduling.unit_of("tests/core/test_config.py::test_x[a::b]") == (
        "tests/core/test_config.py"
    )
    assert scheduling.unit_of(f"{accounts_a}::test_x") == "host-accounts"
    assert scheduling.unit_of(f"{accounts_b}::test_y") == "host-accounts"


def test_a_module_using_accounts_outside_the_unit_is_refused_with_its_fix() -> None:
    items = [
        Item("tests/core/test_a.py::test_one"),
        Item("tests/core/test_b.py::test_two", "accounts"),
        Item(f"{scheduling.SERIAL_UNITS['host-accounts'][0]}::test_three", "accounts"),
    ]
    assert scheduling.misplaced(items) == [  # type: ignore[arg-type]
        "tests/core/test_b.py uses the 'accounts' fixture: add it to"
        " SERIAL_UNITS['host-accounts'] in tests/scheduling.py so that it never runs beside"
        " the others"
    ]


def test_every_module_listed_in_a_unit_exists_and_uses_its_fixture() -> None:
    # The collection-time check above catches a module missing from a unit; this one a
    # module renamed or no longer using the fixture, left in a unit for nothing.
    for unit, modules in scheduling.SERIAL_UNITS.items():
        [fixture] = [f for f, u in scheduling.SERIAL_FIXTURES.items() if u == unit]
        for module in modules:
            tree = ast.parse((TESTS.parent / module).read_text())
            args = {
                a.arg
                for node in ast.walk(tree)
                if isinstance(node, ast.arguments)
                for a in node.args
            }
            assert fixture in args, f"{module} does not use {fixture!r}"


def test_the_longest_units_go_first_longest_first_and_the_rest_keep_their_order() -> None:
    accounts = scheduling.SERIAL_UNITS["host-accounts"]
    items = [
        Item("tests/a.py::t1"),
        Item(f"{accounts[0]}::t2"),
        Item("tests/b.py::t3"),
        Item("tests/system/test_powerloss.py::t4"),
        Item("tests/c.py::t5"),
        Item(f"{accounts[1]}::t6"),
        Item("tests/system/test_torture.py::t7"),
    ]
    scheduling.longest_first(items)  # type: ignore[arg-type]
    assert [item.nodeid.rpartition("::")[2] for item in items] == [
        "t7",
        "t4",
        "t2",
        "t6",
        "t1",
        "t3",
        "t5",
    ]


def test_every_unit_named_first_exists() -> None:
    for unit in scheduling.FIRST:
        assert unit in scheduling.SERIAL_UNITS or (TESTS.parent / unit).is_file(), unit


def test_the_lazyfs_build_runs_under_its_lock_and_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lazyfs, "BUILD_DIR", tmp_path / "cache" / "lazyfs")
    builds = []

    def build(binary: Path) -> None:
        # Another worker's build_once waits here until this build is done.
        with pytest.raises(filelock.Timeout):
            lazyfs.build_lock().acquire(timeout=0)
        builds.append(binary)
        binary.parent.mkdir(parents=True)
        binary.touch()
        (lazyfs.BUILD_DIR / "patches.sha256").write_text(
            "".join(
                f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                for p in lazyfs.VENDORED.glob("*.patch")
            )
        )

    monkeypatch.setattr(lazyfs, "_build", build)
    binary = lazyfs.build_once()
    assert builds == [binary] and binary == lazyfs.BUILD_DIR / "bin" / "lazyfs"
    assert lazyfs.build_once() == binary and len(builds) == 1
