"""The shared inbox/ is a drop box (SPEC §4.2, issue 23 items 1 and 2), tried by real members.

A member of socketGroup cannot list inbox/, nor read, rename or delete another member's spool
file even knowing its name; a file a member planted there (a hard link to another account's
file, or a file someone else wrote) is refused, left as its owner made it, and the reason
names that owner.
"""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import orjson

from flowagg.core.layout import Layout
from tests.accounts import Accounts, needs_accounts
from tests.harness import DaemonProc, entry, request, start_daemon, stored_entries, wait_for

pytestmark = needs_accounts

# Run as the hostile member: each attempt on a path, and the errno it met (0: it worked).
ATTEMPTS = textwrap.dedent(
    """
    import errno, json, os, sys
    inbox, victim = sys.argv[1], sys.argv[2]
    def attempt(do):
        try:
            do()
            return 0
        except OSError as exc:
            return errno.errorcode[exc.errno]
    print(json.dumps({
        "list": attempt(lambda: os.listdir(inbox)),
        "read": attempt(lambda: open(victim, "rb").read()),
        "rename": attempt(lambda: os.rename(victim, os.path.join(inbox, "mine.jsonl"))),
        "delete": attempt(lambda: os.unlink(victim)),
        "overwrite": attempt(lambda: os.rename(sys.argv[3], victim)),
    }))
    """
)


def _settings(accounts: Accounts) -> dict[str, object]:
    return {"socketGroup": accounts.group, "maxAgeMs": 3_600_000}


def _settled(layout: Layout) -> bool:
    """inbox/ and journal/spool/ empty: the daemon took every file and is done with it."""
    return not os.listdir(layout.inbox) and not os.listdir(layout.journal_spool)


def _spool_as(accounts: Accounts, user: str, root: Path, item: dict[str, object]) -> Path:
    done = accounts.run(user, "--root", str(root), "add", "--spool", "--json", orjson.dumps(item))
    assert done.returncode == 0, done.stderr
    return Path(orjson.loads(done.stdout)["file"])


def test_members_cannot_list_read_rename_or_delete_each_others_spool_files(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    root = shared_root
    layout = Layout(root)
    start_daemon(root, _settings(accounts)).stop()  # down: the files wait in inbox/
    victim = _spool_as(accounts, accounts.member, root, entry(1))
    # The other member's own file, which it tries to rename over the victim's.
    own = _spool_as(accounts, accounts.other, root, entry(2))

    tried = accounts.python_as(
        accounts.other, "-c", ATTEMPTS, str(layout.inbox), str(victim), str(own)
    )
    assert tried.returncode == 0, tried.stderr
    assert orjson.loads(tried.stdout) == {
        "list": "EACCES",
        "read": "EACCES",
        "rename": "EPERM",
        "delete": "EPERM",
        "overwrite": "EPERM",
    }
    inbox = os.stat(layout.inbox)
    assert stat.S_IMODE(inbox.st_mode) == 0o1730 and inbox.st_gid == accounts.gid
    # The daemon's user still reads it: both entries are stored once.
    daemon = start_daemon(root, _settings(accounts))
    daemons.append(daemon)
    wait_for(lambda: _settled(layout))
    assert daemon.stop() == 0
    stored = sorted(e["timestamp"] for e in stored_entries(root))
    assert stored == [entry(1)["timestamp"], entry(2)["timestamp"]]


def _reasons(layout: Layout) -> list[dict[str, object]]:
    return [orjson.loads(p.read_bytes()) for p in layout.errors.glob("*.reason.json")]


def _audit(layout: Layout, event: str) -> list[dict[str, object]]:
    lines = (layout.logs / "audit.log").read_bytes().splitlines()
    return [doc for doc in map(orjson.loads, lines) if doc["event"] == event]


def _inode(path: Path) -> tuple[int, int, int, int, bytes]:
    st = os.stat(path)
    return st.st_ino, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), path.read_bytes()


def test_a_planted_hard_link_is_refused_and_its_owner_keeps_the_file(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    root = shared_root
    layout = Layout(root)
    daemon = start_daemon(root, _settings(accounts))
    daemons.append(daemon)
    # The member's own notes, shared with the group (so the law of protected_hardlinks lets
    # the other member link it), and valid spool content: only the planting is wrong.
    notes = root.parent / "notes.json"
    notes.write_bytes(orjson.dumps(entry(7)))
    os.chown(notes, accounts.uid(accounts.member), accounts.gid)
    os.chmod(notes, 0o660)
    before = _inode(notes)
    planted = accounts.python_as(
        accounts.other,
        "-c",
        f"import os; os.link({str(notes)!r}, {str(layout.inbox / 'n.json')!r})",
    )
    assert planted.returncode == 0, planted.stderr

    wait_for(lambda: _settled(layout))
    assert _inode(notes) == before  # same inode, owner, group, mode and bytes
    (reason,) = wait_for(lambda: _reasons(layout))
    member_uid = accounts.uid(accounts.member)
    assert f"hard link (2 names) to a file owned by uid {member_uid} ({accounts.member})" in str(
        reason["reason"]
    )
    (line,) = wait_for(lambda: _audit(layout, "quarantine"))  # written after the reason
    assert line["peer"] == {"uid": member_uid, "gid": accounts.gid, "pid": None}
    assert daemon.stop() == 0
    assert stored_entries(root) == []


def test_a_file_another_account_wrote_is_refused_naming_its_owner(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    root = shared_root
    layout = Layout(root)
    daemon = start_daemon(root, _settings(accounts))
    daemons.append(daemon)
    # The outsider left a file in a folder the member may write; the member renames it in.
    open_dir = root.parent / "drop"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    written = accounts.python_as(
        accounts.outsider,
        "-c",
        f"import os; fd = os.open({str(open_dir / 'x.json')!r}, os.O_WRONLY | os.O_CREAT, 0o644);"
        f" os.write(fd, {orjson.dumps(entry(8))!r}); os.close(fd)",
    )
    assert written.returncode == 0, written.stderr
    before = _inode(open_dir / "x.json")
    moved = accounts.python_as(
        accounts.member,
        "-c",
        f"import os; os.rename({str(open_dir / 'x.json')!r}, {str(layout.inbox / 'x.json')!r})",
    )
    assert moved.returncode == 0, moved.stderr

    wait_for(lambda: _settled(layout))
    assert daemon.stop() == 0
    assert stored_entries(root) == []
    (reason,) = wait_for(lambda: _reasons(layout))
    outsider_uid = accounts.uid(accounts.outsider)
    assert f"owned by uid {outsider_uid} ({accounts.outsider}), who cannot write to inbox/" in str(
        reason["reason"]
    )
    # The quarantined file is the outsider's inode, untouched.
    assert _inode(layout.errors / str(reason["file"])) == before
    (line,) = _audit(layout, "quarantine")
    assert line["peer"]["uid"] == outsider_uid  # type: ignore[index]


# Run as the flooding member: `count` junk files of every kind, under names no one else uses.
FLOOD = textwrap.dedent(
    """
    import os, sys
    inbox, count = sys.argv[1], int(sys.argv[2])
    for i in range(count):
        path = os.path.join(inbox, f"junk-{i:05d}")
        kind = i % 4
        if kind == 0:
            os.mkfifo(path + ".json")
        elif kind == 1:
            os.symlink("/etc/passwd", path + ".jsonl")
        elif kind == 2:
            with open(path + ".json", "wb") as f:
                f.write(b"{not json")
        else:
            with open(path + ".txt", "wb") as f:
                f.write(b"junk")
    """
)


def _all_audit_lines(layout: Layout) -> list[dict[str, object]]:
    lines = []
    for path in sorted(layout.logs.glob("audit.log*")):
        lines += [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return lines


FLOOD_FILES = 200


def _flood(
    accounts: Accounts, root: Path, daemons: list[DaemonProc], settings: dict[str, object]
) -> DaemonProc:
    """A daemon that took a member's junk flood and another member's spool file."""
    layout = Layout(root)
    daemon = start_daemon(root, {**_settings(accounts), **settings})
    daemons.append(daemon)
    done = accounts.python_as(accounts.member, "-c", FLOOD, str(layout.inbox), str(FLOOD_FILES))
    assert done.returncode == 0, done.stderr
    _spool_as(accounts, accounts.other, root, entry(1))

    def quarantined() -> bool:
        status = request(layout.socket, {"op": "status"})
        return status["spool"]["filesQuarantined"] == FLOOD_FILES and _settled(layout)

    wait_for(quarantined, timeout=60)
    return daemon


def test_a_junk_flood_keeps_the_audit_history_and_names_its_writer(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    # Small logs, one backup: the flood's audit lines rotate audit.log many times over.
    daemon = _flood(accounts, shared_root, daemons, {"logMaxBytes": 4096, "logBackups": 1})
    layout = Layout(shared_root)
    assert daemon.stop() == 0
    lines = _all_audit_lines(layout)
    events = [line["event"] for line in lines]
    assert events.count("start") == 1 and events.count("stop") == 1  # the history is all there
    assert len(list(layout.logs.glob("audit.log.*"))) > 1  # rotated, more than logBackups
    quarantines = [line for line in lines if line["event"] == "quarantine"]
    assert len(quarantines) == FLOOD_FILES
    writers = {line["peer"]["uid"] for line in quarantines}  # type: ignore[index]
    assert writers == {accounts.uid(accounts.member)}
    assert [e["timestamp"] for e in stored_entries(shared_root)] == [entry(1)["timestamp"]]


def test_a_junk_flood_leaves_at_most_max_error_files(
    accounts: Accounts, shared_root: Path, daemons: list[DaemonProc]
) -> None:
    daemon = _flood(accounts, shared_root, daemons, {"maxErrorFiles": 20})
    layout = Layout(shared_root)
    kept = FLOOD_FILES - 20

    def rotated() -> dict[str, object] | None:
        status = request(layout.socket, {"op": "status"})
        return status if status["queue"]["errorsRotated"] >= kept else None

    queue = wait_for(rotated)["queue"]
    assert queue["errors"] == 20 and queue["errorsRotated"] == kept
    assert len(list(layout.errors.glob("*.reason.json"))) == 20
    assert len(list(layout.errors.iterdir())) == 40  # each file beside its reason
    assert daemon.stop() == 0
    lines = [line for line in _all_audit_lines(layout) if line["event"] == "errors_rotated"]
    assert sum(int(line["fileCount"]) for line in lines) == kept  # type: ignore[call-overload]
    assert [e["timestamp"] for e in stored_entries(shared_root)] == [entry(1)["timestamp"]]
