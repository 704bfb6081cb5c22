"""Property (issue 23): two hostile members of socketGroup fill a shared inbox/ at random.

They spool entries the documented way and by hand, drop junk of every kind (FIFOs, folders,
bad JSON, other names), hard-link and symlink each other's files and files outside the root,
and try to take each other's files away. Whatever they do, a root daemon never changes a byte,
the owner, group or mode of a file outside the root, and every entry a member spooled in a
file of its own is stored exactly once (and nothing from elsewhere is).
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import tempfile
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowagg.core.layout import Layout
from tests.accounts import Accounts, needs_accounts
from tests.harness import BASE_TS, DaemonProc, start_daemon, stored_entries, wait_for

pytestmark = needs_accounts

# Files outside the root: (owner, group is socketGroup, mode). Which ones a member may link
# is the kernel's business (protected_hardlinks): the daemon must leave all of them alone.
OUTSIDE = {
    "member_shared": ("member", True, 0o660),
    "other_shared": ("other", True, 0o660),
    "member_private": ("member", False, 0o600),
    "root_open": ("root", False, 0o666),
    "root_read_only": ("root", False, 0o644),
}

# Run as a member, the plan on stdin; prints the entryIds of the entries it did spool.
MEMBER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from flowagg.cli.client import write_spool_file
    from flowagg.core.layout import Layout

    plan = json.load(sys.stdin)
    layout = Layout(Path(plan["root"]))
    inbox = layout.inbox
    spooled = []

    def lines(entries):
        return b"".join(json.dumps(e).encode() + b"\\n" for e in entries)

    for act in plan["actions"]:
        kind, arg, path = act["kind"], act["arg"], inbox / act["name"]
        try:
            if kind == "spool":
                write_spool_file(layout, act["entries"])
                spooled += [e["entryId"] for e in act["entries"]]
            elif kind == "raw":
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
                fd = os.open(path.with_suffix(".jsonl"), flags, 0o600)
                os.write(fd, lines(act["entries"]))
                os.close(fd)
                spooled += [e["entryId"] for e in act["entries"]]
            elif kind == "fifo":
                os.mkfifo(path.with_suffix(".json"))
            elif kind == "folder":
                os.mkdir(path.with_suffix(".jsonl"))
            elif kind in ("bad_json", "open_junk", "other_name"):
                suffix = ".txt" if kind == "other_name" else ".json"
                mode = 0o666 if kind == "open_junk" else 0o600
                fd = os.open(path.with_suffix(suffix), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                os.fchmod(fd, mode)
                os.write(fd, b'[{"userId": "x"')
                os.close(fd)
            elif kind == "link":
                os.link(arg, path.with_suffix(".json"))
            elif kind == "symlink":
                os.symlink(arg, path.with_suffix(".jsonl"))
            elif kind == "steal":
                os.rename(arg, path.with_suffix(".txt"))
            elif kind == "delete":
                os.unlink(arg)
        except Exception:
            pass  # refused by the kernel (sticky inbox/, protected links): what a member meets
    print(json.dumps(spooled))
    """
)

OWN_KINDS = ["fifo", "folder", "bad_json", "open_junk", "other_name"]
ACTION = st.one_of(
    st.tuples(st.sampled_from(["spool", "raw"]), st.integers(1, 3)),
    st.tuples(st.sampled_from(OWN_KINDS), st.just(0)),
    # A target outside the root, or (an index into) the other member's files.
    st.tuples(st.sampled_from(["link", "symlink"]), st.sampled_from([*OUTSIDE, "theirs"])),
    st.tuples(st.sampled_from(["steal", "delete"]), st.just("theirs")),
)
ROUNDS = st.lists(st.lists(ACTION, max_size=6), min_size=3, max_size=3)
_example = itertools.count()


def _suffixed(act: dict[str, Any]) -> list[str]:
    """The names an action may leave in inbox/ (for the other member to aim at)."""
    return [act["name"] + s for s in (".json", ".jsonl", ".txt")]


def _plans(
    rounds: list[list[tuple[str, object]]], accounts: Accounts, root: Path, outside: Path
) -> list[tuple[str, dict[str, Any]]]:
    """Rounds alternate member, other, member; an action may aim at the other's names."""
    users = [accounts.member, accounts.other, accounts.member]
    names: dict[str, list[str]] = {accounts.member: [], accounts.other: []}
    seq = itertools.count()
    plans = []
    for user, acts in zip(users, rounds, strict=True):
        theirs = names[accounts.other if user == accounts.member else accounts.member]
        actions = []
        for i, (kind, arg) in enumerate(acts):
            n = next(seq)
            act: dict[str, Any] = {"kind": kind, "name": f"{user}-{n}", "arg": None}
            if kind in ("spool", "raw"):
                act["entries"] = [
                    {
                        "userId": user,
                        "action": "edit",
                        "timestamp": BASE_TS + n * 10 + k,
                        "entryId": f"{user}-{n}-{k}",
                    }
                    for k in range(int(str(arg)))
                ]
            elif arg == "theirs":
                act["arg"] = str(root / "inbox" / theirs[i % len(theirs)]) if theirs else "/"
            elif arg:
                act["arg"] = str(outside / str(arg))
            actions.append(act)
            names[user] += _suffixed(act)
        plans.append((user, {"root": str(root), "actions": actions}))
    return plans


def _make_outside(folder: Path, accounts: Accounts) -> dict[str, tuple[int, int, int, int, bytes]]:
    uids = {
        "member": accounts.uid(accounts.member),
        "other": accounts.uid(accounts.other),
        "root": 0,
    }
    snapshot = {}
    for name, (owner, shared, mode) in OUTSIDE.items():
        path = folder / name
        # Valid spool content: had the daemon read it, its entry would show in the batches.
        path.write_bytes(orjson.dumps({"userId": "x", "action": "a", "timestamp": BASE_TS}))
        os.chown(path, uids[owner], accounts.gid if shared else 0)
        os.chmod(path, mode)
        snapshot[name] = _inode(path)
    return snapshot


def _inode(path: Path) -> tuple[int, int, int, int, bytes]:
    st_ = os.lstat(path)
    return st_.st_ino, st_.st_uid, st_.st_gid, stat.S_IMODE(st_.st_mode), path.read_bytes()


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rounds=ROUNDS)
def test_hostile_members_never_touch_outside_files_and_entries_are_stored_once(
    accounts: Accounts, daemons: list[DaemonProc], rounds: list[list[tuple[str, object]]]
) -> None:
    holder = Path(tempfile.mkdtemp(prefix=f"flowagg-hostile-{next(_example)}-"))
    try:
        os.chmod(holder, 0o755)
        outside = holder / "outside"
        outside.mkdir()
        os.chmod(outside, 0o755)
        before = _make_outside(outside, accounts)
        root = holder / "data"
        layout = Layout(root)
        settings_ = {"socketGroup": accounts.group, "maxAgeMs": 3_600_000}
        start_daemon(root, settings_).stop()  # down while the members work: no race decides
        spooled: list[str] = []
        for user, plan in _plans(rounds, accounts, root, outside):
            done = accounts.python_as(user, "-c", MEMBER, input=orjson.dumps(plan))
            assert done.returncode == 0, done.stderr
            spooled += orjson.loads(done.stdout)

        daemon = start_daemon(root, settings_)
        daemons.append(daemon)
        wait_for(lambda: not os.listdir(layout.inbox) and not os.listdir(layout.journal_spool))
        assert daemon.stop() == 0

        assert {name: _inode(outside / name) for name in OUTSIDE} == before
        stored = Counter(e.get("entryId") for e in stored_entries(root))
        assert stored == Counter(spooled), daemon.log()
    finally:
        shutil.rmtree(holder, ignore_errors=True)
