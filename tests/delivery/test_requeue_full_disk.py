"""`recover --abandoned` on a full disk: the operator gets the cause, not "internal error"."""

from __future__ import annotations

import asyncio
import errno
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from flowagg.core.clock import FakeClock
from flowagg.delivery import recovery_requeue
from flowagg.delivery.recovery import Recovery
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.ingest.peers import UNKNOWN_PEER
from flowagg.service.ops import handle_request
from tests.delivery.test_recovery import failed_doc, make_layout

B1 = "1704067200000_000000000001"


def test_a_requeue_the_disk_refuses_names_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = make_layout(tmp_path)
    layout.abandoned.mkdir(parents=True, exist_ok=True)
    abandoned = layout.abandoned / f"{B1}.abandoned.json"
    abandoned.write_bytes(orjson.dumps(failed_doc(B1, abandonedAt=5, abandonReason="x")))
    recovery = Recovery(layout, FakeClock(), random.Random(1), RetryPolicy(1000, 8000, 3))

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(recovery_requeue, "atomic_write", full)

    async def recover(*, force: bool, requeue: bool, batch: str | None) -> dict[str, Any]:
        return {"requeued": recovery.requeue_abandoned(batch) if requeue else []}

    host = SimpleNamespace(pipeline=object(), recover=recover)
    request = {"op": "recover", "abandoned": True, "batch": B1}
    reply = asyncio.run(handle_request(host, request, UNKNOWN_PEER))  # type: ignore[arg-type]
    assert reply["ok"] is False
    assert "No space left on device" in reply["error"]
    assert abandoned.exists()  # still abandoned, as it was: nothing lost
