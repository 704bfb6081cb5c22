"""A full disk gets one line each place it shows, never a traceback or a flood."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import types
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from flowagg.cli import client
from flowagg.cli.main import main
from flowagg.core.layout import Layout
from flowagg.service import logsetup
from flowagg.service.ops import bounded_flush
from tests.harness import entry


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_spool_on_a_full_disk_is_one_line_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(tmp_path / "data")
    layout.inbox.mkdir(parents=True)
    monkeypatch.setattr(client.os, "fsync", _enospc)
    result = CliRunner().invoke(
        main,
        ["--root", str(layout.root), "add", "--spool", orjson.dumps(entry(1)).decode()],
        env={"FLOWAGG_ROOT": None},
    )
    assert result.exit_code == 4, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "disk full" in result.output and "Traceback" not in result.output
    assert result.output.count("\n") == 1
    assert os.listdir(layout.inbox) == []


class BrokenStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def write(self, text: str) -> int:
        if self.broken:
            _enospc()
        return super().write(text)


def test_a_log_file_on_a_full_disk_says_so_once(tmp_path: Path) -> None:
    report = io.StringIO()
    handler = logsetup.LogFileHandler(tmp_path / "a.log", report_to=report)
    stream = BrokenStream()
    handler.stream = stream  # type: ignore[assignment]
    logger = logging.getLogger("flowagg.test-full-disk")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(1000):
            logger.error("line %d", i)
        lines = report.getvalue().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], lines
        stream.broken = False
        logger.error("after")
        lines = report.getvalue().splitlines()
        assert len(lines) == 2 and "works again; 1000 lines were lost" in lines[1]
        assert "after" in stream.getvalue()
        # A second incident right away stays quiet: one line per incident, rate-limited.
        stream.broken = True
        logger.error("again")
        stream.broken = False
        logger.error("fine")
        assert len(report.getvalue().splitlines()) == 2
    finally:
        logger.removeHandler(handler)
        handler.stream = io.StringIO()  # type: ignore[assignment]
        handler.close()


def test_a_flush_that_cannot_store_answers_why_in_bounded_time(tmp_path: Path) -> None:
    async def stuck(trigger: str) -> dict[str, int]:
        await asyncio.sleep(3600)
        return {}

    stalled = "OSError: [Errno 28] No space left on device"
    pipeline = types.SimpleNamespace(
        flush=stuck, flusher=types.SimpleNamespace(stalled_error=stalled)
    )
    daemon = types.SimpleNamespace(pipeline=pipeline, layout=Layout(tmp_path))

    async def go() -> dict[str, Any]:
        flush = bounded_flush(daemon, wait_s=60, stall_grace_s=0.3)  # type: ignore[arg-type]
        return await asyncio.wait_for(flush, 5)

    reply = asyncio.run(go())
    assert reply["ok"] is False
    assert reply["error"].startswith("disk_full: ") and "free space" in reply["error"]


def test_a_slow_flush_that_is_not_stalled_is_waited_for(tmp_path: Path) -> None:
    async def slow(trigger: str) -> dict[str, int]:
        await asyncio.sleep(0.6)
        return {"batches": 1, "entries": 3}

    pipeline = types.SimpleNamespace(flush=slow, flusher=types.SimpleNamespace(stalled_error=None))
    daemon = types.SimpleNamespace(pipeline=pipeline, layout=Layout(tmp_path))
    flush = bounded_flush(daemon, wait_s=60, stall_grace_s=0.1)  # type: ignore[arg-type]
    assert asyncio.run(flush) == {"ok": True, "batches": 1, "entries": 3}
