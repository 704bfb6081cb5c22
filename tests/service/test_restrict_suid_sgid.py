"""The unit's RestrictSUIDSGID=true and a shared inbox/ go together (issue 23 item 3).

The daemon runs as a service account in socketGroup (the unit's User=flowagg) under a seccomp
filter that denies setuid/setgid bits the way systemd does (tests/nosgid.py). It must start,
turn an inbox/ an older version left setgid (2770) into the 1730 drop box, and take the spool
files of a member, which it reads through the file's ACL, not as root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import orjson
import pytest

from flowagg.core.layout import Layout
from tests import nosgid
from tests.accounts import Accounts, needs_accounts
from tests.harness import DaemonProc, entry, stored_entries, wait_for

NOSGID = str(Path(nosgid.__file__).resolve())
pytestmark = [
    needs_accounts,
    pytest.mark.skipif(not nosgid.supported(), reason="the seccomp filter is written for x86-64"),
]


def test_the_filter_denies_a_setgid_chmod_and_nothing_else(
    accounts: Accounts, shared_root: Path
) -> None:
    folder = shared_root.parent / "probe"
    folder.mkdir()
    os.chown(folder, accounts.uid(accounts.service), -1)
    probe = (
        "import os, sys\n"
        "os.chmod(sys.argv[1], 0o1730)\n"
        "try:\n"
        "    os.chmod(sys.argv[1], 0o2770)\n"
        "except PermissionError:\n"
        "    print('denied')\n"
    )
    done = accounts.python_as(accounts.service, NOSGID, accounts.python, "-c", probe, str(folder))
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"denied\n"
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o1730


def test_a_service_account_under_restrict_suid_sgid_shares_inbox(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    root = shared_root
    layout = Layout(root)
    service = accounts.uid(accounts.service)
    # What an older version left: the root and a setgid inbox/, owned by the service account.
    for folder, mode in ((root, 0o710), (layout.inbox, 0o2770)):
        folder.mkdir()
        os.chown(folder, service, accounts.gid)
        os.chmod(folder, mode)
    daemon = DaemonProc(
        root,
        {"socketGroup": accounts.group, "maxAgeMs": 3_600_000},
        env=accounts.env(),
        python=[accounts.python, NOSGID, "--user", accounts.service, accounts.python],
    )
    daemons.append(daemon)
    daemon.wait_ready()
    inbox = os.stat(layout.inbox)
    assert stat.S_IMODE(inbox.st_mode) == 0o1730 and inbox.st_gid == accounts.gid

    spooled = accounts.run(
        accounts.member, "--root", str(root), "add", "--spool", orjson.dumps(entry(1)).decode()
    )
    assert spooled.returncode == 0, spooled.stderr
    sent = accounts.run(
        accounts.member, "--root", str(root), "add", orjson.dumps(entry(2)).decode()
    )
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: not os.listdir(layout.inbox) and not os.listdir(layout.journal_spool))
    assert daemon.stop() == 0
    stored = sorted(e["timestamp"] for e in stored_entries(root))
    assert stored == [entry(1)["timestamp"], entry(2)["timestamp"]]
    assert not list(layout.errors.iterdir())
