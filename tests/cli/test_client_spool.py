"""The client's spool write: a failure is one line naming the cause and leaves nothing behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import flowagg.cli.client
from flowagg.cli.client import write_spool_file
from flowagg.core.errors import RootUnusableError
from flowagg.core.layout import Layout

ENTRY = {"userId": "u", "action": "a", "timestamp": 1_704_067_200_000, "metadata": {}}


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "disk full"),
        (errno.EDQUOT, "disk full"),
        (errno.EIO, "fix the folder"),
    ],
)
def test_a_failed_spool_write_names_the_cause_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    layout = Layout(tmp_path / "data")
    layout.prepare()

    def failing_fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(flowagg.cli.client.os, "fsync", failing_fsync)
    with pytest.raises(RootUnusableError) as raised:
        write_spool_file(layout, [ENTRY])
    message = str(raised.value)
    assert words in message and "nothing was spooled" in message and "\n" not in message
    assert os.listdir(layout.inbox) == []
