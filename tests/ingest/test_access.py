"""Access to the root, the socket and adopted spool files (SPEC §2, §11 Access)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from flowagg.cli import client
from flowagg.core.config import load_config
from flowagg.core.errors import ConfigError
from flowagg.core.fsutil import TEMP_MARK
from flowagg.core.layout import Layout
from flowagg.ingest import spool_open, spool_trust
from tests.harness import cli
from tests.ingest.test_spool import Rig, line


def test_world_writable_root_is_refused_with_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    os.chmod(root, 0o777)
    proc = cli(root, "run", timeout=30)
    message = proc.stderr.decode()
    assert proc.returncode == 4, message
    assert message.count("\n") == 1
    assert "world-writable" in message and f"chmod 0700 {root}" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another uid")
def test_a_root_owned_by_another_user_is_refused_with_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    proc = cli(root, "run", timeout=30)
    message = proc.stderr.decode()
    assert proc.returncode == 4, message
    assert message.count("\n") == 1
    assert f"owned by uid 65534, not {os.geteuid()}" in message and "run as its owner" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_an_adopted_file_is_copied_never_seized(tmp_path: Path) -> None:
    adopted = tmp_path / "0000000000001-000001-x.jsonl"
    adopted.write_bytes(b'{"a": 1}\n' * 20_000)
    os.chown(adopted, 65534, 65534)
    os.chmod(adopted, 0o640)
    original = os.open(adopted, os.O_RDONLY)
    fd = spool_trust.take_over(adopted, os.open(adopted, spool_trust.OPEN_FLAGS), os.stat(adopted))
    try:
        st = os.fstat(fd)
        assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600
        assert os.stat(adopted).st_ino == st.st_ino
        assert os.pread(fd, 1 << 20, 0) == b'{"a": 1}\n' * 20_000
        # Even a root daemon leaves the inode it was handed as its owner made it.
        kept = os.fstat(original)
        assert kept.st_ino != st.st_ino
        assert (kept.st_uid, kept.st_gid, stat.S_IMODE(kept.st_mode)) == (65534, 65534, 0o640)
    finally:
        os.close(fd)
        os.close(original)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TEMP_MARK)]


def test_socket_group_must_exist() -> None:
    with pytest.raises(ConfigError, match=r"no group .no-such-group-xyz.*groupadd"):
        load_config(flags={"socketGroup": "no-such-group-xyz"}, environ={})


def test_socket_group_and_allowed_uids_from_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("socketGroup = 0\nallowedUids = [1000, 1001]\n")
    config = load_config(config_path=path, environ={})
    assert config.values["socketGroup"] == "0"
    assert config.values["allowedUids"] == (1000, 1001)
    env = {"FLOWAGG_ALLOWED_UIDS": "7, 8"}
    assert load_config(config_path=path, environ=env).values["allowedUids"] == (7, 8)
    path.write_text('allowedUids = ["1000"]\n')
    with pytest.raises(ConfigError, match="allowedUids"):
        load_config(config_path=path, environ={})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another uid")
def test_a_spool_file_the_daemon_cannot_read_is_quarantined_not_retried_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path / "data")
    dropped = rig.layout.inbox / "other.jsonl"
    dropped.write_bytes(line(1) + b"\n")
    os.chown(dropped, 65534, 65534)
    os.chmod(dropped, 0o600)
    real_open = os.open

    def as_another_user(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        # What a daemon that is not root meets: another user's 0600 file.
        if Path(path).parent == rig.layout.journal_spool and os.stat(path).st_uid == 65534:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(spool_open.os, "open", as_another_user)

    async def go() -> None:
        await rig.start()
        try:
            await rig.scan()
        finally:
            await rig.stop()

    asyncio.run(go())
    reasons = [p.read_text() for p in rig.layout.errors.glob("*.reason.json")]
    assert len(reasons) == 1 and "unreadable: uid 65534" in reasons[0]
    assert os.listdir(rig.layout.journal_spool) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give inbox/ to another uid")
@pytest.mark.parametrize("acls", [True, False])
def test_a_shared_spool_file_is_readable_by_the_daemons_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, acls: bool
) -> None:
    layout = Layout(tmp_path / "data")
    layout.root.mkdir()
    layout.inbox.mkdir()
    os.chown(layout.inbox, 65534, 4242)  # the daemon's user and socketGroup
    os.chmod(layout.inbox, 0o1730)
    if not acls:

        def unsupported(*args: Any) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(client.os, "setxattr", unsupported)
    path = client.write_spool_file(layout, [{"userId": "u"}])
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o640 and len(path.stem.split("-")[1]) == 32
    if acls:
        # 0600 plus read for uid 65534 alone: the group's bits shown are the ACL's mask.
        acl = os.getxattr(path, client.ACL_XATTR)
        entries = {struct.unpack_from("<HHI", acl, 4 + 8 * i) for i in range(5)}
        assert entries == {
            (0x01, 6, 0xFFFFFFFF),
            (0x02, 4, 65534),
            (0x04, 0, 0xFFFFFFFF),
            (0x10, 4, 0xFFFFFFFF),
            (0x20, 0, 0xFFFFFFFF),
        }
    else:
        assert st.st_gid == 4242
