"""Real throwaway accounts for the tests of other accounts (SPEC §12 Other accounts).

Each test module that uses `accounts` makes a throwaway group with two members, a service
account in the group (to run a daemon as, like the unit's User=flowagg) and an outsider, all
removed afterwards; `run` runs `flowagg` as one of them through runuser.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import clean_env

REPO = Path(__file__).resolve().parent.parent
needs_accounts = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("runuser") is None,
    reason="needs root, useradd and runuser to make throwaway accounts",
)


class Accounts:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.group = f"fag{tag}"
        self.member = f"fam{tag}"
        self.other = f"fab{tag}"  # a second member, hostile to the first
        self.service = f"fas{tag}"  # in the group, to run a daemon as
        self.outsider = f"fao{tag}"
        self.python = ""
        # (folder, had an ACL of its own) for each folder given a search entry for the group.
        self.opened: list[tuple[Path, bool]] = []

    def uid(self, user: str) -> int:
        return pwd.getpwnam(user).pw_uid

    @property
    def gid(self) -> int:
        return grp.getgrnam(self.group).gr_gid

    def env(self) -> dict[str, str]:
        # The venv's interpreter may sit under /root; another account imports flowagg and its
        # dependencies from the checkout and the venv's site-packages instead.
        site = sysconfig.get_paths()["purelib"]
        return clean_env(
            {"PYTHONPATH": f"{REPO}:{site}", "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/"}
        )

    def run(
        self, user: str, *args: str, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return self.python_as(user, "-m", "flowagg", *args, input=input)

    def python_as(
        self, user: str, *args: str, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["runuser", "-u", user, "--", self.python, *args],
            input=input,
            capture_output=True,
            env=self.env(),
            cwd="/",
            timeout=60,
            check=False,
        )


def _open_ancestors(accounts: Accounts) -> bool:
    """Let the throwaway accounts pass through the private folders above the checkout.

    A fresh clone in a `mktemp -d` folder (0700), or an interpreter under /root, is out of
    another account's reach. The group and the outsider get search (x) only, never read, on
    each folder in the way, and the fixture takes it back afterwards.
    """
    if shutil.which("setfacl") is None or shutil.which("getfacl") is None:
        return False
    targets = [REPO, Path(sysconfig.get_paths()["purelib"]), Path(os.path.realpath(sys.executable))]
    folders = dict.fromkeys(parent for target in targets for parent in target.parents)
    for folder in folders:
        if folder.stat().st_mode & 0o001:
            continue
        extended = subprocess.run(
            ["getfacl", "--skip-base", "--omit-header", str(folder)],
            capture_output=True,
            check=False,
        )
        done = subprocess.run(
            ["setfacl", "-m", f"g:{accounts.group}:x,u:{accounts.outsider}:x", str(folder)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            return False
        accounts.opened.append((folder, bool(extended.stdout.strip())))
    return True


def _usable_python(accounts: Accounts) -> str | None:
    """An interpreter of this Python version that the throwaway account can run."""
    name = f"python3.{sys.version_info.minor}"
    candidates = [sys.executable, os.path.realpath(sys.executable)]
    candidates += [f"{folder}/{name}" for folder in ("/usr/local/bin", "/usr/bin")]
    for python in dict.fromkeys(candidates):
        probe = subprocess.run(
            ["runuser", "-u", accounts.member, "--", python, "-c", "import orjson, flowagg"],
            capture_output=True,
            env=accounts.env(),
            cwd="/",
            timeout=60,
            check=False,
        )
        if probe.returncode == 0:
            return python
    return None


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    acc = Accounts()
    subprocess.run(["groupadd", acc.group], check=True, capture_output=True)
    try:
        members = [(user, ["-G", acc.group]) for user in (acc.member, acc.other, acc.service)]
        for user, extra in (*members, (acc.outsider, [])):
            subprocess.run(
                ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *extra, user],
                check=True,
                capture_output=True,
            )
        python = _usable_python(acc)
        if python is None and _open_ancestors(acc):
            python = _usable_python(acc)
        if python is None:
            reason = "no Python interpreter here that another account may run"
            if os.environ.get("CI") == "true":
                pytest.fail(f"{reason} (CI must run the tests of other accounts)")
            pytest.skip(reason)
        acc.python = python
        yield acc
    finally:
        for folder, had_acl in reversed(acc.opened):
            # `setfacl -x` leaves a mask entry behind; a folder that had no ACL gets none back.
            undo = ["-x", f"g:{acc.group},u:{acc.outsider}"] if had_acl else ["-b"]
            subprocess.run(["setfacl", *undo, str(folder)], capture_output=True, check=False)
        for user in (acc.member, acc.other, acc.service, acc.outsider):
            subprocess.run(["userdel", user], capture_output=True, check=False)
        subprocess.run(["groupdel", acc.group], capture_output=True, check=False)


@pytest.fixture
def shared_root() -> Iterator[Path]:
    # pytest's tmp_path sits in a 0700 folder no other account can pass through.
    holder = Path(tempfile.mkdtemp(prefix="flowagg-acct-"))
    os.chmod(holder, 0o755)
    try:
        yield holder / "data"
    finally:
        shutil.rmtree(holder, ignore_errors=True)
