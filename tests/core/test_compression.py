"""batchCompression (SPEC §11): batch files as .json, .json.gz or .json.zst, read by suffix."""

from __future__ import annotations

import gzip
import random
import signal
import sys
from pathlib import Path

import orjson
import pytest

from flowagg.batches.storage import (
    CompletedFiles,
    CorruptBatch,
    find_batch,
    find_completed,
    iter_batch_files,
    read_batch,
)
from flowagg.core.clock import FakeClock
from flowagg.core.compression import COMPRESSIONS, SUFFIXES, TooLarge, compress, decompress
from flowagg.core.config import load_config
from flowagg.core.errors import ConfigError
from flowagg.core.layout import Layout
from flowagg.delivery.recovery import Recovery
from flowagg.delivery.retry_policy import RetryPolicy
from flowagg.delivery.sink import Completer
from tests.delivery.test_recovery import failed_doc, put_failed
from tests.harness import DaemonProc, entry, request, stored_id_counts

DOC = orjson.dumps({"entries": [{"userId": "u", "n": i} for i in range(200)]})


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_round_trip(kind: str) -> None:
    packed = compress(kind, DOC)
    assert decompress(f"batch_x{SUFFIXES[kind]}", packed) == DOC
    assert (packed == DOC) == (kind == "none")
    assert compress(kind, DOC) == packed, "the same batch compresses to the same bytes"


@pytest.mark.parametrize("suffix", [".json.gz", ".json.zst"])
def test_garbage_truncation_and_bombs_are_refused(suffix: str) -> None:
    kind = "gzip" if suffix.endswith("gz") else "zstd"
    with pytest.raises(ValueError):
        decompress(f"b{suffix}", b"\x00not compressed at all")
    packed = compress(kind, DOC)
    with pytest.raises(ValueError):
        decompress(f"b{suffix}", packed[: len(packed) // 2])
    bomb = compress(kind, b" " * 1_000_000)
    with pytest.raises(ValueError):  # TooLarge, or zstd's own refusal past the limit
        decompress(f"b{suffix}", bomb, limit=100_000)
    assert issubclass(TooLarge, ValueError)


def test_config_names_the_choices_and_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"batchCompression .*none, gzip, zstd"):
        load_config(flags={"root": str(tmp_path), "batchCompression": "lz4"}, environ={})
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"flowagg\[zstd\]"):
        load_config(flags={"root": str(tmp_path), "batchCompression": "zstd"}, environ={})
    config = load_config(flags={"root": str(tmp_path), "batchCompression": "gzip"}, environ={})
    assert config.batch_compression == "gzip"


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_recovery_writes_the_configured_compression(tmp_path: Path, kind: str) -> None:
    layout = Layout(tmp_path / "data")
    layout.prepare()
    files = CompletedFiles(layout, kind)
    doc = failed_doc("0000000001000_000000000001")
    put_failed(layout, doc)
    recovery = Recovery(
        layout,
        FakeClock(now_ms=10_000),
        random.Random(1),
        RetryPolicy(base_ms=1000, max_delay_ms=60_000, limit=3),
        store=Completer(files.write, files=files),
    )
    report = recovery.run_once(force=True)
    assert report.recovered == [doc["batchId"]]
    path = find_completed(layout, doc["batchId"])
    assert path is not None and path.name.endswith(SUFFIXES[kind])
    stored = read_batch(path)
    assert stored["entriesSha256"] == doc["entriesSha256"] and stored["recovered"] is True
    assert not list(layout.recovery.glob("*.failed.json"))


def test_a_corrupt_compressed_batch_is_a_corrupt_batch(tmp_path: Path) -> None:
    path = tmp_path / "batch_1_1.json.gz"
    path.write_bytes(gzip.compress(b"{not json", mtime=0))
    with pytest.raises(CorruptBatch):
        read_batch(path)
    path.write_bytes(b"\x1f\x8b broken")
    with pytest.raises(CorruptBatch):
        read_batch(path)


def test_a_daemon_killed_after_writing_compressed_batches_finds_them(tmp_path: Path) -> None:
    """Each start may use another compression; a batch written before a kill is found by its
    id whatever its suffix, so it is never written twice."""
    root = tmp_path / "data"
    acked: set[str] = set()
    n = 0
    for kind in ("gzip", "zstd", "none", "gzip"):
        daemon = DaemonProc(root, {"batchSize": 50, "batchCompression": kind}).wait_ready()
        entries = []
        for _ in range(170):
            n += 1
            entries.append(entry(n, entryId=f"c{n}"))
        reply = request(daemon.layout.socket, {"op": "add", "entries": entries})
        assert reply["ok"] and reply["accepted"] == 170, reply
        acked.update(e["entryId"] for e in entries)
        assert request(daemon.layout.socket, {"op": "flush"})["ok"]
        # Killed before the done records reach disk: the next start must find these files.
        daemon.send(signal.SIGKILL)
        daemon.kill()
        names = [p.name for p in daemon.layout.aggregated.iterdir()]
        assert any(name.endswith(SUFFIXES[kind]) for name in names), names
    counts = stored_id_counts(root)
    assert set(counts) == acked and max(counts.values()) == 1
    layout = Layout(root)
    kinds = {
        next(k for k, s in SUFFIXES.items() if p.name.endswith(s)) for p in iter_batch_files(layout)
    }
    assert kinds == set(COMPRESSIONS)
    some = iter_batch_files(layout)[0]
    batch_id = some.name.split("_", 1)[1].split(".")[0]
    assert find_batch(layout, batch_id) == some
