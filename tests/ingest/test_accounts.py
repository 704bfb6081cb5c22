"""Other Unix accounts hand entries to a daemon that shares its socket and inbox/ with a group.

Real accounts (tests/accounts.py): a throwaway group, its members and an outsider, removed
afterwards; `flowagg add` runs as them through runuser.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import orjson

from flowagg.cli.client import ACL_XATTR
from flowagg.core.layout import Layout
from tests.accounts import Accounts, needs_accounts
from tests.harness import DaemonProc, entry, start_daemon, stored_entries, wait_for

pytestmark = needs_accounts


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_group_members_add_and_spool_outsiders_get_one_line(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    root = shared_root
    daemon = start_daemon(root, {"socketGroup": accounts.group, "maxAgeMs": 3_600_000})
    daemons.append(daemon)
    layout = Layout(root)
    assert _mode(root) == 0o710 and os.stat(root).st_gid == accounts.gid
    assert stat.S_IMODE(os.stat(layout.inbox).st_mode) == 0o1730
    assert os.stat(layout.inbox).st_gid == accounts.gid
    assert _mode(layout.run) == 0o750 and _mode(layout.socket) == 0o660
    assert os.stat(layout.socket).st_gid == accounts.gid
    for private in (layout.journal, layout.aggregated, layout.recovery, layout.logs):
        assert _mode(private) == 0o700, private

    member = accounts.run(
        accounts.member, "--root", str(root), "add", "--json", orjson.dumps(entry(1)).decode()
    )
    assert member.returncode == 0, member.stderr
    assert orjson.loads(member.stdout)["accepted"] == 1

    for extra in ([], ["--spool-if-down"]):
        outsider = accounts.run(
            accounts.outsider, "--root", str(root), "add", *extra, orjson.dumps(entry(2)).decode()
        )
        message = outsider.stderr.decode()
        assert outsider.returncode == 4, message
        assert message.count("\n") == 1 and "Traceback" not in message
        assert f"not in the {accounts.group} group" in message
        assert f"usermod -aG {accounts.group} {accounts.outsider}" in message

    spooled = accounts.run(
        accounts.member, "--root", str(root), "add", "--spool", orjson.dumps(entry(3)).decode()
    )
    assert spooled.returncode == 0, spooled.stderr
    wait_for(lambda: not os.listdir(layout.inbox))
    # The file was the member's: the daemon read its own copy.
    member_uid = accounts.uid(accounts.member)
    wait_for(lambda: f"came from uid {member_uid} ({accounts.member})" in daemon.log())
    wait_for(lambda: not os.listdir(layout.journal_spool))  # journaled, so the flush has it

    flushed = accounts.run(accounts.member, "--root", str(root), "flush")
    assert flushed.returncode == 0, flushed.stderr
    stored = sorted(e["timestamp"] for e in stored_entries(root))
    assert stored == [entry(1)["timestamp"], entry(3)["timestamp"]]
    assert f"flush requested by uid {member_uid} gid " in daemon.log()
    audit = [orjson.loads(line) for line in (layout.logs / "audit.log").read_bytes().splitlines()]
    (flush,) = [line for line in audit if line["event"] == "flush"]
    assert flush["peer"]["uid"] == member_uid and flush["outcome"] == "ok"


def test_without_socket_group_another_user_cannot_connect(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    root = shared_root
    daemon = start_daemon(root)
    daemons.append(daemon)
    layout = Layout(root)
    assert _mode(layout.socket) == 0o600
    # Open the way to the socket, so that only the socket's own mode stands in between.
    for folder in (root, layout.run):
        os.chmod(folder, 0o711)
    refused = accounts.run(
        accounts.member, "--root", str(root), "add", orjson.dumps(entry(1)).decode()
    )
    message = refused.stderr.decode()
    assert refused.returncode == 4, message
    assert message.count("\n") == 1 and "permission denied on the socket" in message


def test_spool_while_down_is_adopted_and_owned_by_the_daemon(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    root = shared_root
    settings = {"socketGroup": accounts.group, "maxAgeMs": 3_600_000}
    start_daemon(root, settings).stop()
    down = accounts.run(
        accounts.member,
        "--root",
        str(root),
        "add",
        "--spool-if-down",
        orjson.dumps(entry(5)).decode(),
    )
    assert down.returncode == 0, down.stderr
    (name,) = os.listdir(Layout(root).inbox)
    dropped = os.stat(Layout(root).inbox / name)
    assert dropped.st_uid == accounts.uid(accounts.member)
    # 0600 plus read for the daemon's user (an ACL whose mask shows as the group's bits).
    assert stat.S_IMODE(dropped.st_mode) == 0o640
    assert os.getxattr(Layout(root).inbox / name, ACL_XATTR)
    daemon = start_daemon(root, settings)
    daemons.append(daemon)
    wait_for(lambda: "the daemon reads its own copy (mode 0600)" in daemon.log())
    assert daemon.stop() == 0
    assert [e["timestamp"] for e in stored_entries(root)] == [entry(5)["timestamp"]]


def test_allowed_uids_refuse_other_peers_with_one_line(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    root = shared_root
    outsider_uid = accounts.uid(accounts.outsider)
    settings = {"socketGroup": accounts.group, "allowedUids": str(outsider_uid)}
    daemon = start_daemon(root, settings)
    daemons.append(daemon)
    refused = accounts.run(
        accounts.member, "--root", str(root), "add", orjson.dumps(entry(1)).decode()
    )
    message = refused.stderr.decode()
    assert refused.returncode == 4, message  # not_allowed: README's exit codes of `add`
    assert message.count("\n") == 1 and "not_allowed" in message and "allowedUids" in message
    member_uid = accounts.uid(accounts.member)
    wait_for(lambda: f"refused a request from uid {member_uid}" in daemon.log())
