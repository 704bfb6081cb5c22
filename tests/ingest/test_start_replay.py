"""A start after kill -9 replays the journal into the dedupe filter; it must not replay it all
again at every following start (#26: daemons killed before the periodic filter save made each
start slower with the journal's length)."""

from __future__ import annotations

from pathlib import Path

import orjson

from flowagg.ingest.pipeline import DEDUPE_SAVE_AFTER_REPLAY
from flowagg.journal.dedupe import FILTER_NAME
from tests.harness import entry, request, start_daemon, wait_for

SETTINGS = {"maxAgeMs": 3_600_000}


def filter_seq(path: Path) -> int:
    with path.open("rb") as fh:
        return int(orjson.loads(fh.readline())["seq"])


def test_a_start_that_replayed_many_ids_saves_the_filter_for_the_next(tmp_path: Path) -> None:
    root = tmp_path / "data"
    daemon = start_daemon(root, SETTINGS)
    requests = DEDUPE_SAVE_AFTER_REPLAY // 100 + 1
    for r in range(requests):
        entries = [entry(i, entryId=f"r{r}-{i}") for i in range(100)]
        reply = request(daemon.layout.socket, {"op": "add", "entries": entries})
        assert reply["accepted"] == 100, reply
    daemon.kill()
    saved = root / "journal" / "dedupe" / FILTER_NAME
    assert not saved.exists()  # the periodic save is minutes away: all of it is replayed

    again = start_daemon(root, SETTINGS)
    wait_for(saved.exists)
    assert filter_seq(saved) >= requests * 100
    again.kill()

    third = start_daemon(root, SETTINGS)
    resend = [entry(5, entryId="r0-5"), entry(6, entryId=f"r{requests - 1}-6")]
    reply = request(third.layout.socket, {"op": "add", "entries": resend})
    assert (reply["accepted"], reply["duplicates"]) == (0, 2), reply
    third.stop()
