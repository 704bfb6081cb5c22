"""How the suite is spread over cores (pytest-xdist, `--dist loadfile`, as ./scripts/test runs
it).

Each test module is one unit of work, so its module-scoped fixtures (a daemon, throwaway
accounts, a PostgreSQL database) are set up once, on one worker. The modules of a unit in
SERIAL_UNITS change state the whole host shares: they run one after the other on one worker.
The units in FIRST are handed out first, longest first, so that none of them is left to run
alone at the end while the other worker idles.

Units go by module path rather than by xdist_group marks: pytest-xdist's `loadgroup` marks
test ids, which pytest 9.2 no longer lets it change, and then silently spreads a group's tests
over all workers.
"""

from __future__ import annotations

from typing import Any

import pytest

SERIAL_UNITS = {
    # useradd and groupadd fail while another one holds /etc's lock, and each module's
    # `accounts` fixture sets and then removes ACL entries on the same folders above the
    # checkout: one module's clean-up would take away entries that another's accounts need.
    "host-accounts": (
        "tests/ingest/test_accounts.py",
        "tests/ingest/test_accounts_spool.py",
        "tests/ingest/test_inbox_hostile_members.py",
        "tests/ingest/test_trust_socket.py",
        "tests/service/test_restrict_suid_sgid.py",
    ),
}
# The longest units, longest first (pytest --durations, on two cores): the crash torture, the
# power-loss one, the crash explorer, the accounts above... The rest follow in collection order.
FIRST = (
    "tests/system/test_torture.py",
    "tests/system/test_powerloss.py",
    "tests/system/test_crash_explorer.py",
    "host-accounts",
    "tests/delivery/test_sink_postgres_faults.py",
    "tests/batches/test_attack_runs.py",
    "tests/service/test_install_walk.py",
    "tests/ingest/test_entry_codec.py",
)
# A module that uses one of these fixtures belongs in that unit.
SERIAL_FIXTURES = {"accounts": "host-accounts"}
UNIT_OF_MODULE = {module: unit for unit, modules in SERIAL_UNITS.items() for module in modules}


def module_of(nodeid: str) -> str:
    return nodeid.partition("::")[0]


def unit_of(nodeid: str) -> str:
    module = module_of(nodeid)
    return UNIT_OF_MODULE.get(module, module)


def misplaced(items: list[pytest.Item]) -> list[str]:
    """A message for each module that uses a fixture of SERIAL_FIXTURES outside its unit."""
    found = {
        (module_of(item.nodeid), fixture, unit)
        for item in items
        for fixture, unit in SERIAL_FIXTURES.items()
        if fixture in getattr(item, "fixturenames", ()) and unit_of(item.nodeid) != unit
    }
    return [
        f"{module} uses the {fixture!r} fixture: add it to SERIAL_UNITS[{unit!r}]"
        " in tests/scheduling.py so that it never runs beside the others"
        for module, fixture, unit in sorted(found)
    ]


def longest_first(items: list[pytest.Item]) -> None:
    rank = {unit: n for n, unit in enumerate(FIRST)}
    # Stable: the rest keeps the collection order.
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(FIRST)))


def make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's loadfile scheduler with the units above, handed out in the order the
    workers collected them (not biggest first, its default)."""
    from xdist.scheduler import LoadFileScheduling

    class UnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    config.option.loadscopereorder = False
    return UnitScheduling(config, log)
