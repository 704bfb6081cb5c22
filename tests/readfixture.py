"""A data root built by hand for the read commands: batch files and a journal in SPEC format."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson

from flowagg.batches.storage import Batch, batch_file_name, encode_batch, make_batch_id
from flowagg.core.layout import Layout
from flowagg.journal.format import encode_add, frame, segment_name

BASE_TS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
USERS = ("alice", "bob", "carol")
ACTIONS = ("code_edit", "review", "meeting")


def make_entry(i: int) -> dict[str, Any]:
    """Entry i: timestamps interleave across batches, so export has to sort."""
    metadata: dict[str, Any] = {"taskId": f"T-{i % 4}", "duration": 1000 * (i % 9) + 7}
    if i % 5 == 0:
        metadata["sessionId"] = f"s{i // 5}"
    if i % 6 == 0:
        metadata["tags"] = {"team": "core", "level": i % 3}
    return {
        "userId": USERS[i % 3],
        "action": ACTIONS[i % 7 % 3],
        "timestamp": BASE_TS + (i * 7919) % 1000 * 3_600_000 + i,
        "metadata": metadata,
        "entryId": f"e-{i:06d}",
    }


class Root:
    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)
        self.layout.prepare()
        self.seq = 1
        self.journal: list[bytes] = [frame(orjson.dumps({"k": "h", "v": 1, "seq": 1}))]
        self.entries: list[dict[str, Any]] = []

    def batch(
        self,
        entries: list[dict[str, Any]],
        *,
        kind: str = "aggregated",
        compress: str = "",
        done: bool = True,
    ) -> Path:
        """Store entries as one batch (journaled first, as the daemon does)."""
        data = [orjson.dumps(e) for e in entries]
        arrival = BASE_TS + self.seq
        batch_id = make_batch_id(arrival, self.seq)
        self.journal.append(encode_add(self.seq, arrival, data, list(range(len(data)))))
        first = self.seq
        self.seq += len(entries)
        if done:
            record = {"k": "d", "q": self.seq - 1, "b": batch_id}
            self.journal.append(frame(orjson.dumps(record)))
        batch = Batch(batch_id, "size", data, first, self.seq - 1, [e["entryId"] for e in entries])
        body = encode_batch(batch, timestamp_ms=arrival + 5, recovered=False)
        if kind == "aggregated":
            path = self.layout.aggregated / batch_file_name(batch_id)
        else:
            doc = orjson.loads(body)
            doc.update(retryCount=2, lastRetryAt=arrival + 9, failedAt=arrival + 6)
            doc.update(nextRetryAt=arrival + 99, lastError="sink said 503")
            body = orjson.dumps(doc)
            folder = self.layout.recovery if kind == "failed" else self.layout.abandoned
            path = folder / f"{batch_id}.{kind}.json"
        if compress == "gz":
            path, body = path.with_name(path.name + ".gz"), gzip.compress(body)
        elif compress == "zst":
            import zstandard

            path, body = path.with_name(path.name + ".zst"), zstandard.compress(body)
        path.write_bytes(body)
        self.entries.extend(entries)
        return path

    def waiting(self, entries: list[dict[str, Any]]) -> None:
        """Journal entries that no batch holds yet."""
        data = [orjson.dumps(e) for e in entries]
        self.journal.append(encode_add(self.seq, BASE_TS + self.seq, data, []))
        self.seq += len(entries)

    def write_journal(self) -> None:
        (self.layout.journal / segment_name(1)).write_bytes(b"".join(self.journal))


def standard_root(root: Path, *, compressed: bool = True) -> Root:
    """60 entries: 4 aggregated batches (one gzip'd, one zstd'd), one failed, one abandoned."""
    r = Root(root)
    entries = [make_entry(i) for i in range(60)]
    r.batch(entries[0:10])
    r.batch(entries[10:20], compress="gz" if compressed else "")
    r.batch(entries[20:30], compress="zst" if compressed else "")
    r.batch(entries[30:40])
    r.batch(entries[40:50], kind="failed")
    r.batch(entries[50:60], kind="abandoned")
    r.write_journal()
    return r
